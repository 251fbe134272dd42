"""Wide and tall clips reach every family's model at the size its own processor gives them.

Frames are decoded at twice the model's target size on both axes (never from the longer side
alone), and the Qwen families size their frames from the clip's own display size, so the token
count per temporal step is the processor's: for 2560x480 a frame shrunk to a longer side of
twice a square target would have come out 1 token short a step (Qwen2.5-VL), or been upscaled
from 12 px rows (LLaVA-OneVision).
"""

from __future__ import annotations

import pytest
from clips import write_clip
from conftest import TINY_WORDS
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as qwen2_reference
from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as qwen3_reference

from dycoke_cli.models.loader import load_model
from dycoke_cli.pipeline import encode_video
from dycoke_cli.testing.tiny import TinyQwen3Spec, TinyQwenSpec

SHAPES = [(2560, 480), (480, 2560), (1920, 800)]  # (width, height): wide, tall, cinema


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    return {(w, h): write_clip(folder / f"{w}x{h}.mp4", n_frames=8, size=(w, h), fps=8) for w, h in SHAPES}


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory):
    from dycoke_cli.testing.tiny import build_qwen2_5_vl, build_word_tokenizer, save_qwen_checkpoint

    tok = build_word_tokenizer(TINY_WORDS, family="qwen2_5_vl")
    folder = save_qwen_checkpoint(build_qwen2_5_vl(tok), tok, tmp_path_factory.mktemp("q25") / "model")
    return load_model(str(folder), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    from dycoke_cli.testing.tiny import build_qwen3_vl, build_word_tokenizer, save_qwen3_checkpoint

    tok = build_word_tokenizer(TINY_WORDS, family="qwen3_vl")
    folder = save_qwen3_checkpoint(build_qwen3_vl(tok), tok, tmp_path_factory.mktemp("q3") / "model")
    return load_model(str(folder), device="cpu", dtype="float32")


@pytest.mark.parametrize("shape", SHAPES)
def test_qwen2_5_vl_gets_the_processors_size(qwen25, clips, shape):
    w, h = shape
    spec = TinyQwenSpec()
    want_h, want_w = qwen2_reference(h, w, factor=28, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
    enc = encode_video(qwen25, clips[shape], 8)
    assert (enc.rows, enc.cols) == (want_h // 28, want_w // 28)
    assert enc.tokens_per_frame == want_h * want_w // (28 * 28)
    frames = enc.video.frames
    assert frames.shape[1] >= min(h, 2 * want_h) and frames.shape[2] >= min(w, 2 * want_w)


@pytest.mark.parametrize("shape", SHAPES)
def test_qwen3_vl_gets_the_processors_size(qwen3, clips, shape):
    w, h = shape
    spec = TinyQwen3Spec()
    want_h, want_w = qwen3_reference(8, h, w, temporal_factor=2, factor=32, min_pixels=spec.min_pixels,
                                     max_pixels=spec.max_pixels)
    enc = encode_video(qwen3, clips[shape], 8)
    assert (enc.rows, enc.cols) == (want_h // 32, want_w // 32)
    assert enc.tokens_per_frame == want_h * want_w // (32 * 32)
    frames = enc.video.frames
    assert frames.shape[1] >= min(h, 2 * want_h) and frames.shape[2] >= min(w, 2 * want_w)


@pytest.mark.parametrize("shape", SHAPES)
def test_llava_onevision_frames_are_never_decoded_below_twice_its_square(tiny_lm, clips, shape):
    side = tiny_lm.frame_spec.height  # 32 px frames for the tiny model
    enc = encode_video(tiny_lm, clips[shape], 8)
    frames = enc.video.frames
    assert frames.shape[1] >= 2 * side and frames.shape[2] >= 2 * side
    assert enc.tokens_per_frame == tiny_lm.tokens_per_frame
