"""Qwen3-VL (dense and MoE) through our loop, checked against transformers' own model.

Tiny random checkpoints are built from configs and loaded through the real loader. The
references are transformers' ``Qwen3VLForConditionalGeneration`` / ``Qwen3VLMoe...`` forward and
``generate`` on input ids written the way its processor writes them (a timestamp, start and end
markers around each temporal step; ``Qwen3VLProcessor._calculate_timestamps`` for the times),
with the same pixel values.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from clips import write_clip
from conftest import TINY_WORDS
from test_cli import run_cli
from torch.testing import assert_close
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

from dycoke_cli.compression.baselines import plan_tokens
from dycoke_cli.compression.cache import PrunedKVCache
from dycoke_cli.decoding.loop import batch_positions, run_layers
from dycoke_cli.decoding.prompt import embed_parts, prefill_positions, prompt_embeds
from dycoke_cli.feature_cache import FeatureCache, model_identity
from dycoke_cli.models.loader import load_model
from dycoke_cli.models.preprocess import patchify_video
from dycoke_cli.models.qwen3_vl import PATCH, smart_resize, step_times
from dycoke_cli.options import CompressionOptions, Method, SamplingOptions
from dycoke_cli.pipeline import build_prefix, encode_video
from dycoke_cli.session import Session, ask

QUESTION = "what color is the cup?"
METHODS = ["none", "dycoke", "fastv", "random", "frames"]


def _checkpoint(tmp_path_factory, moe: bool, seed: int = 0, name: str = "q3"):
    from dycoke_cli.testing.tiny import TinyQwen3Spec, build_qwen3_vl, build_word_tokenizer, save_qwen3_checkpoint

    tok = build_word_tokenizer(TINY_WORDS, family="qwen3_vl")
    return save_qwen3_checkpoint(build_qwen3_vl(tok, TinyQwen3Spec(moe=moe), seed=seed), tok,
                                 tmp_path_factory.mktemp(name) / "model", dycoke_defaults={"prune_layer": 2})


@pytest.fixture(scope="module")
def q3_dir(tmp_path_factory):
    return _checkpoint(tmp_path_factory, moe=False)


@pytest.fixture(scope="module")
def q3moe_dir(tmp_path_factory):
    return _checkpoint(tmp_path_factory, moe=True)


@pytest.fixture(scope="module", params=["dense", "moe"])
def q3(request, q3_dir, q3moe_dir):
    return load_model(str(q3_dir if request.param == "dense" else q3moe_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def q3_dense(q3_dir):
    return load_model(str(q3_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """64 x 48 px at 10 fps: frame k at k / 10 s."""
    return write_clip(tmp_path_factory.mktemp("q3clips") / "clip.mp4", n_frames=30, size=(64, 48), fps=10)


def reference_ids(lm, enc, question: str, fps: float = 10.0) -> torch.Tensor:
    """input_ids as Qwen3VLProcessor writes them for this clip's sampled frames."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    text = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    indices = [round(t * fps) for t in enc.video.info.timestamps]
    times = Qwen3VLProcessor._calculate_timestamps(None, indices, fps, 2)
    video = "".join(f"<{t:.1f} seconds><|vision_start|>" + "<|video_pad|>" * enc.tokens_per_frame + "<|vision_end|>"
                    for t in times)
    text = re.sub(r"<\|vision_start\|>\s*<\|video_pad\|>\s*<\|vision_end\|>", lambda _: video, text, count=1)
    return torch.tensor(lm.tokenizer(text, add_special_tokens=False)["input_ids"])


def hf_inputs(lm, enc, question: str) -> dict:
    ids = reference_ids(lm, enc, question).unsqueeze(0)
    patches, grid = patchify_video(lm.preprocess(enc.video.frames), 2, PATCH, 2)
    return dict(input_ids=ids, pixel_values_videos=patches, video_grid_thw=grid,
                mm_token_type_ids=(ids == lm.video_token_id).int() * 2, attention_mask=torch.ones_like(ids))


def our_logits(lm, enc, question: str, method=Method.none, chunk=None):
    opts = CompressionOptions(method=method).resolve(lm)
    plan = plan_tokens(enc, opts)
    embeds, span = prompt_embeds(lm, question, plan, enc)
    positions = prefill_positions(lm, span, plan, enc, embeds.shape[1], opts.positions)
    with torch.inference_mode():
        logits = run_layers(lm, embeds, batch_positions(positions), PrunedKVCache(lm.num_layers, embeds.shape[1]),
                            chunk=chunk, deepstack=(span.visual, plan.deepstack))
    return logits, embeds, positions, span, plan


def hf_logits(lm, inputs) -> torch.Tensor:
    with torch.inference_mode():
        return lm.model(**inputs).logits[:, -1].float()


# -- equality with transformers ------------------------------------------------------------------


def test_whole_prompt_and_chunked_prefill_equal_transformers(q3, clip):
    enc = encode_video(q3, clip, 8)
    assert (enc.frames, enc.rows, enc.cols) == (4, 2, 2) and len(enc.deepstack) == 2
    inputs = hf_inputs(q3, enc, QUESTION)
    want = hf_logits(q3, inputs)
    got, embeds, _, span, _ = our_logits(q3, enc, QUESTION)
    assert embeds.shape[1] == inputs["input_ids"].shape[1]
    assert torch.equal(span.visual, torch.nonzero(inputs["input_ids"][0] == q3.video_token_id).flatten())
    assert_close(got, want, rtol=1e-5, atol=1e-5)
    chunked, *_ = our_logits(q3, enc, QUESTION, chunk=7)  # pieces of 7 queries, layer by layer
    assert_close(chunked, want, rtol=1e-5, atol=1e-5)


def test_a_session_follow_up_equals_transformers(q3, clip):
    """The prefix (text before, the video part) computed once, then only the question."""
    enc = encode_video(q3, clip, 8)
    want = hf_logits(q3, hf_inputs(q3, enc, QUESTION))
    prefix = build_prefix(q3, enc, CompressionOptions(method=Method.none))
    question = embed_parts(q3, q3.prompt_ids(QUESTION)[1])
    cache = PrunedKVCache(q3.num_layers, prefix.length + question.shape[1])
    cache.load_prefix(prefix.keys, prefix.values)
    positions = prefix.next_positions(q3, enc, question.shape[1])
    with torch.inference_mode():
        got = run_layers(q3, question, batch_positions(positions), cache)
    assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_first_greedy_tokens_equal_model_generate(q3, clip):
    enc = encode_video(q3, clip, 8)
    inputs = hf_inputs(q3, enc, QUESTION)
    reference = q3.model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    ours = ask(q3, clip, QUESTION, frames=8, compression=CompressionOptions(method=Method.none),
               sampling=SamplingOptions(max_new_tokens=8, ignore_eos=True))
    assert list(ours.token_ids) == reference.tolist() and len(ours.token_ids) == 8


def test_deepstack_matters_and_our_path_follows_it(q3_dir, clip):
    lm = load_model(str(q3_dir), device="cpu", dtype="float32")
    enc = encode_video(lm, clip, 8)
    inputs = hf_inputs(lm, enc, QUESTION)
    with_deepstack = hf_logits(lm, inputs)
    with torch.no_grad():
        for merger in lm.model.model.visual.deepstack_merger_list:
            merger.linear_fc2.weight.zero_()
            merger.linear_fc2.bias.zero_()
    zeroed_enc = encode_video(lm, clip, 8)
    assert all(not level.any() for level in zeroed_enc.deepstack)
    without = hf_logits(lm, inputs)
    assert (with_deepstack - without).abs().max() > 1e-3
    assert_close(our_logits(lm, zeroed_enc, QUESTION)[0], without, rtol=1e-5, atol=1e-5)
    assert_close(our_logits(lm, enc, QUESTION)[0], with_deepstack, rtol=1e-5, atol=1e-5)


# -- timestamps, TTM, positions -------------------------------------------------------------------


def test_twelve_frames_give_six_timestamps_as_the_processor_writes_them(q3_dense, clip):
    enc = encode_video(q3_dense, clip, 12)
    assert len(enc.video.info.timestamps) == 12 and enc.frames == 6
    plan = plan_tokens(enc, CompressionOptions(method=Method.none).resolve(q3_dense))
    embeds, span = prompt_embeds(q3_dense, QUESTION, plan, enc)
    before, after = q3_dense.prompt_ids(QUESTION)
    pieces, _, length = q3_dense.video_part(enc, plan)
    ids = [p for p in pieces if not p.is_floating_point()]
    text = q3_dense.tokenizer.decode(torch.cat(ids).tolist()).replace(" ", "")
    written = re.findall(r"<([0-9.]+)seconds>", text)
    indices = [round(t * 10) for t in enc.video.info.timestamps]
    expected = [f"{t:.1f}" for t in Qwen3VLProcessor._calculate_timestamps(None, indices, 10.0, 2)]
    assert written == expected and len(written) == 6
    assert [round(t, 6) for t in step_times(enc.video.info.timestamps)] == \
        [round(t, 6) for t in Qwen3VLProcessor._calculate_timestamps(None, indices, 10.0, 2)]
    assert embeds.shape[1] == len(before) + length + len(after)


def test_after_ttm_each_step_carries_its_kept_tokens_with_their_full_positions(q3_dense, clip):
    enc = encode_video(q3_dense, clip, 16)
    assert enc.frames == 8
    full_logits, _, full_pos, full_span, _ = our_logits(q3_dense, enc, QUESTION)
    _, embeds, kept_pos, span, plan = our_logits(q3_dense, enc, QUESTION, Method.dycoke)
    n = enc.tokens_per_frame
    per_step = torch.bincount(plan.index // n, minlength=enc.frames)
    assert plan.prefill_visual < enc.visual_tokens and span.count == plan.prefill_visual
    # the pads of each step: count the visual offsets between consecutive start markers
    pieces, offsets, _ = q3_dense.video_part(enc, plan)
    vectors = [p for p in pieces if p.is_floating_point()]
    assert [v.shape[0] for v in vectors] == per_step.tolist()
    # positions: the full sequence's, gathered at what was kept (text always; visual by plan.index)
    keep = torch.ones(full_pos.shape[1], dtype=torch.bool)
    keep[full_span.visual] = False
    keep[full_span.visual[plan.index]] = True
    assert torch.equal(kept_pos, full_pos[:, keep])
    # and the full sequence's positions are transformers' get_rope_index
    inputs = hf_inputs(q3_dense, enc, QUESTION)
    reference, _ = q3_dense.model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                       video_grid_thw=inputs["video_grid_thw"])
    assert torch.equal(full_pos, reference[:, 0])
    assert all(level.shape == (plan.prefill_visual, level.shape[1]) for level in plan.deepstack)
    assert len(plan.deepstack) == 2
    assert all(torch.equal(level, full.reshape(-1, full.shape[-1])[plan.index])
               for level, full in zip(plan.deepstack, enc.deepstack))


def test_decode_pruning_selects_visual_positions_only(q3_dense, clip):
    r = ask(q3_dense, clip, QUESTION, frames=8, compression=CompressionOptions(method=Method.dycoke),
            sampling=SamplingOptions(max_new_tokens=12, ignore_eos=True))
    s = r.stats
    assert (s.visual_tokens, s.visual_tokens_prefill) == (16, 7)  # 4 steps of 2 x 2: TTM keeps 4 + 3 x 1
    assert s.visual_tokens_decode == 2 and s.selection.steps == 11
    assert s.kv_bytes.store > 0


# -- every method, sessions, static decoding ---------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_session_answers_equal_fresh_asks(q3, clip, method):
    sampling = SamplingOptions(max_new_tokens=8, ignore_eos=True)
    opts = CompressionOptions(method=Method(method))
    session = Session(q3, clip, frames=8, compression=opts)
    questions = [QUESTION, "which way does the cup move"]
    got = [session.ask(q, sampling).token_ids for q in questions]
    want = [ask(q3, clip, q, frames=8, compression=opts, sampling=sampling).token_ids for q in questions]
    assert got == want and all(len(t) == 8 for t in got)


@pytest.mark.parametrize("method", ["none", "dycoke"])
def test_static_decoding_gives_the_eager_tokens(q3_dense, clip, method):
    opts = CompressionOptions(method=Method(method))
    eager = ask(q3_dense, clip, QUESTION, frames=8, compression=opts,
                sampling=SamplingOptions(max_new_tokens=10, ignore_eos=True, decode="eager"))
    static = ask(q3_dense, clip, QUESTION, frames=8, compression=opts,
                 sampling=SamplingOptions(max_new_tokens=10, ignore_eos=True, decode="static"))
    assert static.token_ids == eager.token_ids and static.stats.decode_path == "static"


@pytest.mark.parametrize("method", ["none", "dycoke"])
def test_a_session_replays_its_static_step_with_3d_positions(q3_dense, clip, method):
    """Follow-ups run the first answer's static step (a CUDA graph's replay on a GPU): the
    timestamps' 3-D positions and the lengths are set for each answer."""
    opts = CompressionOptions(method=Method(method))
    questions = [QUESTION, "which way does the cup move", "what color is the cup at the end of the clip?"]
    static, eager = (Session(q3_dense, clip, frames=8, compression=opts) for _ in range(2))
    for i, q in enumerate(questions):
        a = static.ask(q, SamplingOptions(max_new_tokens=10, ignore_eos=True, decode="static"))
        b = eager.ask(q, SamplingOptions(max_new_tokens=10, ignore_eos=True, decode="eager"))
        assert a.token_ids == b.token_ids and a.stats.decode_step_reused == (i > 0)


def test_compare_and_eval_run_every_method_from_the_command_line(q3moe_dir, clip, tmp_path, capsys, monkeypatch):
    model = ["--model", str(q3moe_dir), "--dtype", "float32"]
    code, out, err = run_cli(["compare", str(clip), QUESTION, *model, "--frames", "8", "--methods", ",".join(METHODS),
                              "--max-new-tokens", "4", "--json"], capsys, monkeypatch)
    assert code == 0, err
    rows = json.loads(out)["methods"]
    assert [r["method"] for r in rows] == METHODS
    assert [r["visual_tokens_prefill"] for r in rows] == [16, 7, 16, 2, 4]
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"video": str(clip), "question": q, "answer": "red"}) + "\n"
                          for q in (QUESTION, "describe the video.")))
    code, out, err = run_cli(["eval", str(qa), *model, "--frames", "8", "--methods", ",".join(METHODS),
                              "--max-new-tokens", "3", "--json"], capsys, monkeypatch)
    report = json.loads(out)
    assert (code, err, report["failures"]) == (0, "", [])
    assert [(m, report["summary"][m]["n"]) for m in METHODS] == [(m, 2) for m in METHODS]


# -- the feature cache ---------------------------------------------------------------------------------


def test_the_feature_cache_keys_the_checkpoint_and_frames_and_keeps_deepstack(tmp_path_factory, q3_dir, clip,
                                                                              tmp_path):
    other = _checkpoint(tmp_path_factory, moe=False, seed=1, name="q3other")
    a, b = (load_model(str(d), device="cpu", dtype="float32") for d in (q3_dir, other))
    assert model_identity(a) != model_identity(b)
    cache = FeatureCache(tmp_path / "cache")
    first = encode_video(a, clip, 8, cache=cache)
    assert len(cache.entries()) == 1
    hit = encode_video(a, clip, 8, cache=cache)
    assert hit.video.frames is None and len(cache.entries()) == 1  # served from the cache
    assert all(torch.equal(x, y) for x, y in zip(hit.deepstack, first.deepstack)) and len(hit.deepstack) == 2
    encode_video(b, clip, 8, cache=cache)  # another checkpoint: a miss, a new entry
    encode_video(a, clip, 12, cache=cache)  # another frame count: a miss too
    assert len(cache.entries()) == 3
    assert our_logits(a, hit, QUESTION)[0].equal(our_logits(a, first, QUESTION)[0])


def test_other_weights_under_the_same_names_sizes_and_times_get_another_key(tmp_path_factory, q3_dir):
    import os
    import shutil

    other = _checkpoint(tmp_path_factory, moe=False, seed=2, name="q3seed2")
    copy = tmp_path_factory.mktemp("q3copy") / "model"
    shutil.copytree(q3_dir, copy)
    shutil.copyfile(other / "model.safetensors", copy / "model.safetensors")  # same size, other weights
    stat = (q3_dir / "model.safetensors").stat()
    os.utime(copy / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    a, b = (load_model(str(d), device="cpu", dtype="float32") for d in (q3_dir, copy))
    assert (copy / "model.safetensors").stat().st_size == stat.st_size
    assert model_identity(a) != model_identity(b)


def test_no_cache_neither_reads_nor_writes(q3_dir, clip, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "cache"
    env = {"DYCOKE_CACHE": str(folder)}
    args = ["ask", str(clip), QUESTION, "--model", str(q3_dir), "--frames", "8", "--max-new-tokens", "2", "-q"]
    assert run_cli([*args, "--no-cache"], capsys, monkeypatch, env)[0] == 0
    assert not folder.exists() or not any(folder.iterdir())
    assert run_cli(args, capsys, monkeypatch, env)[0] == 0  # writes one entry
    entries = sorted(folder.iterdir())
    assert len(entries) == 1
    before = entries[0].stat().st_mtime_ns
    entries[0].write_bytes(b"damaged: a read would miss and rewrite it")
    assert run_cli([*args, "--no-cache"], capsys, monkeypatch, env)[0] == 0
    assert entries[0].read_bytes() == b"damaged: a read would miss and rewrite it" and before > 0


# -- frame sizes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("frames,height,width,want", [
    (8, 48, 64, (64, 64)),  # the tiny budget: 16 x 64 x 64 px over 8 frames
    (16, 1080, 1920, (32, 64)),
    (4, 30, 20, (64, 32)),  # below one 32 px patch: scaled up first
])
def test_smart_resize_matches_the_processor(frames, height, width, want):
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as reference

    got = smart_resize(frames, height, width, 4 * 32 * 32, 16 * 64 * 64)
    assert got == reference(frames, height, width, temporal_factor=2, factor=32, min_pixels=4 * 32 * 32,
                            max_pixels=16 * 64 * 64) == want


@pytest.mark.parametrize("config", [{"patch_size": 14}, {"fps": 0}, {"merge_size": 3},
                                    {"size": {"shortest_edge": 20000, "longest_edge": 10000}}])
def test_a_bad_video_preprocessor_config_is_one_line(config, q3_dir, clip, tmp_path, capsys, monkeypatch):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(q3_dir, folder)
    (folder / "video_preprocessor_config.json").write_text(json.dumps(config))
    assert run_cli(["ask", str(clip), QUESTION, "--model", str(folder), "-q"], capsys, monkeypatch) == (
        1, "", f"dycoke: error: {folder}: bad video preprocessor config (size, fps, frame counts, mean/std, "
               "patch 16, merge 2 and temporal patch 2 are supported)\n")


def test_the_prompt_length_known_before_the_prefill_is_the_prefilled_length(q3_dense, clip):
    """The server's usage.prompt_tokens when a stop string ends an answer (no Done to read it
    from): Planned.prompt_tokens, the timestamps' text and a reused prefix included."""
    from dycoke_cli import Session
    from dycoke_cli.results import Done, Planned

    session = Session(q3_dense, clip)
    for question in ("what color is the cup?", "which way does the cup move?"):  # fresh, then a reused prefix
        events = list(session.stream(question, SamplingOptions(max_new_tokens=3)))
        planned = next(e for e in events if isinstance(e, Planned))
        done = next(e for e in events if isinstance(e, Done))
        assert planned.prompt_tokens == done.answer.stats.prefill_tokens > done.answer.stats.visual_tokens_prefill
