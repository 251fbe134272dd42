"""The training recipe's teacher-forced DyCoke (training/common.py, ``packed_logits(prune=...)``)
against the product's own decoding.

The demo model is fine-tuned under decode-time pruning by emulating it in one teacher-forced
pass: each answer position sees, from the pruning layer on, the visual entries the product's
selector would keep at that step. That is only worth training on if it is the product's rule.
So: the product answers a caption with DyCoke (greedy, float32); the emulation, fed that answer,
must give the logits the product computed at every step, for the paper's rule, the default and
an even split, at the default budget and a harsher one. Pruning the probed layer too (a bug
this test was written after) moves them by up to 0.4; float32 noise is about 1e-5. And some
answer must differ from TTM alone, or the comparison could not tell pruning from none.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from dycoke_cli.models.preprocess import preprocess_frames
from dycoke_cli.options import CompressionOptions, Method, SamplingOptions
from dycoke_cli.pipeline import answer, encode_video
from dycoke_cli.video.read import probe_video, read_video

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_videos"
sys.path.insert(0, str(ROOT / "training"))
from common import DecodePruning, Packer, packed_logits

CAPTIONED = [json.loads(line)["video"] for line in (SAMPLES / "qa_v2.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "caption"] + ["blue_cup_turns_yellow.mp4"]
QUESTION = "describe the video."


@pytest.fixture(scope="module")
def demo():
    from dycoke_cli.models.loader import load_model

    return load_model("demo", device="cpu", dtype="float32")


def product_pixels(lm, path: Path, frames: int) -> torch.Tensor:
    """[1, T, 3, h, w]: the frames as the product reads them (scaled by the decoder to the model's
    size), preprocessed as it does."""
    video = read_video(str(path), frames, size_for=lambda h, w: lm.target_size(frames, h, w))
    return preprocess_frames(np.asarray(video.frames), lm.frame_spec)[None]


def teacher_forced(lm, path: Path, text: str, prune: DecodePruning | None) -> torch.Tensor:
    """Logits [answer tokens + 1, vocab] that predict each token of ``text`` and then the end, in
    one packed pass (the first from the prompt's last position, as the product's prefill)."""
    frames = lm.default_frames(probe_video(path))
    packer = Packer(lm.tokenizer, frames * lm.tokens_per_frame + 1, branch_len=48)
    ids, labels = packer.branch(QUESTION, text)
    labels_t = torch.tensor([[labels]])
    with torch.no_grad():
        logits = packed_logits(lm.model, packer, product_pixels(lm, path, frames), torch.tensor([[ids]]),
                               ttm_k=lm.defaults.ttm_k, prune=prune, decoding=labels_t != -100)
    answered = torch.tensor(labels[1:] + [-100]) != -100
    return logits[0, 0][answered]


def product_answer(lm, enc, opts: CompressionOptions) -> tuple[str, torch.Tensor]:
    """The product's greedy answer and the logits of each of its steps [steps, vocab]."""
    steps = []
    hook = lm.model.lm_head.register_forward_hook(lambda m, i, out: steps.append(out.detach()[0, -1].clone()))
    try:
        text = answer(lm, enc, QUESTION, opts, SamplingOptions(max_new_tokens=40)).text
    finally:
        hook.remove()
    return text, torch.stack(steps)


@pytest.mark.parametrize("p", [0.7, 0.95])
def test_the_emulation_gives_the_logits_the_product_decodes_with(demo, p):
    layer = demo.defaults.prune_layer
    differs_from_ttm = 0
    for name in CAPTIONED:
        path = SAMPLES / name
        enc = encode_video(demo, path, demo.default_frames(probe_video(path)))
        for coverage in (0.0, 0.5, 1.0):
            opts = CompressionOptions(method=Method.dycoke, prune_p=p, frame_coverage=coverage,
                                      selection="topk" if coverage == 0 else "coverage")
            text, logits = product_answer(demo, enc, opts)
            emulated = teacher_forced(demo, path, text, DecodePruning(p=p, layer=layer, coverage=coverage))
            assert emulated.shape == logits.shape, (name, coverage, text)
            where = f"{name}, coverage {coverage}, {text!r}"
            assert_close(emulated, logits, atol=1e-4, rtol=1e-4, msg=lambda m, where=where: f"{where}: {m}")
            ttm_only = teacher_forced(demo, path, text, None)
            differs_from_ttm += not torch.equal(ttm_only.argmax(-1), logits.argmax(-1))
    assert differs_from_ttm > 0
