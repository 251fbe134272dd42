"""Qwen2.5-VL end to end on tiny random checkpoints in the Hugging Face layout (config,
safetensors, tokenizer, chat template, video preprocessor config), built here."""

from __future__ import annotations

import json

import pytest
import torch
from clips import product_frames, write_clip
from conftest import TINY_WORDS
from test_cli import run_cli
from torch.testing import assert_close

from dycoke_cli.compression.baselines import plan_tokens
from dycoke_cli.compression.cache import PrunedKVCache
from dycoke_cli.compression.selectors import DecodeSelector
from dycoke_cli.decoding.layer_call import call_layer
from dycoke_cli.decoding.loop import batch_positions, run_layers
from dycoke_cli.decoding.prompt import build_embeds, prefill_positions
from dycoke_cli.models.loader import load_model
from dycoke_cli.models.qwen2_5_vl import patchify, smart_resize
from dycoke_cli.options import CompressionOptions, Method, SamplingOptions
from dycoke_cli.pipeline import encode_video
from dycoke_cli.session import ask

QUESTION = "what color is the cup?"


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from dycoke_cli.testing.tiny import build_qwen2_5_vl, build_word_tokenizer, save_qwen_checkpoint

    tok = build_word_tokenizer(TINY_WORDS, family="qwen2_5_vl")
    return save_qwen_checkpoint(build_qwen2_5_vl(tok), tok, tmp_path_factory.mktemp("qwen") / "model",
                                dycoke_defaults={"prune_layer": 2})


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    return load_model(str(qwen_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def square_clip(tmp_path_factory):
    """112 x 112 px: 4 x 4 tokens a step, so the temporal positions of a short clip stay below
    the grid's (where transformers' get_rope_index and the Qwen reference rule agree)."""
    return write_clip(tmp_path_factory.mktemp("qclips") / "square.mp4", n_frames=30, size=(112, 112), fps=10)


def hf_inputs(lm, enc, question):
    """input_ids with the video pads, and the model's own video inputs, for the same frames."""
    before, after = lm.prompt_ids(question)
    ids = torch.cat([before, torch.full((enc.visual_tokens,), lm.video_token_id), after]).unsqueeze(0)
    patches, grid = patchify(lm.preprocess(product_frames(lm, enc)))
    return dict(input_ids=ids, pixel_values_videos=patches, video_grid_thw=grid,
                mm_token_type_ids=(ids == lm.video_token_id).int() * 2,
                second_per_grid_ts=torch.tensor([enc.step_seconds]), attention_mask=torch.ones_like(ids))


def our_first_logits(lm, enc, question, method=Method.none):
    opts = CompressionOptions(method=method).resolve(lm)
    plan = plan_tokens(enc, opts)
    embeds, span = build_embeds(lm, question, plan.tokens, enc.newline)
    positions = prefill_positions(lm, span, plan, enc, embeds.shape[1], opts.positions)
    with torch.inference_mode():
        return run_layers(lm, embeds, batch_positions(positions), PrunedKVCache(lm.num_layers, embeds.shape[1])), \
            positions, span, plan


def test_uncompressed_logits_and_tokens_equal_transformers(qwen, square_clip):
    enc = encode_video(qwen, square_clip, 4)
    assert (enc.frames, enc.rows, enc.cols, enc.visual_tokens) == (2, 4, 4, 32)
    inputs = hf_inputs(qwen, enc, QUESTION)
    with torch.inference_mode():
        want = qwen.model(**inputs).logits[:, -1].float()
    got, _, _, _ = our_first_logits(qwen, enc, QUESTION)
    assert_close(got, want, rtol=1e-5, atol=1e-5)
    reference = qwen.model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    ours = ask(qwen, square_clip, QUESTION, frames=4, compression=CompressionOptions(method=Method.none),
               sampling=SamplingOptions(max_new_tokens=12))
    ref = reference.tolist()
    ref = ref[: ref.index(qwen.tokenizer.eos_token_id)] if qwen.tokenizer.eos_token_id in ref else ref
    assert list(ours.token_ids) == ref and len(ref) >= 2


def test_ttm_kept_tokens_keep_their_full_sequence_positions(qwen, square_clip):
    enc = encode_video(qwen, square_clip, 8)
    _, full, span, _ = our_first_logits(qwen, enc, QUESTION)
    _, kept_pos, kept_span, plan = our_first_logits(qwen, enc, QUESTION, Method.dycoke)
    start = span[0]
    assert kept_span == (start, start + plan.prefill_visual) and plan.prefill_visual < enc.visual_tokens
    assert torch.equal(kept_pos[:, :start], full[:, :start])  # text before
    assert torch.equal(kept_pos[:, kept_span[0]:kept_span[1]], full[:, start + plan.index])  # gathered
    assert torch.equal(kept_pos[:, kept_span[1]:], full[:, span[1]:])  # text after: the full video's positions
    # t, h, w of the first kept token of step 1 (TTM keeps every token of a window's first step)
    assert full[:, start + 16].tolist() == [start + int(2 * enc.step_seconds), start, start]


def test_k0_p0_equals_uncompressed(qwen, square_clip):
    sampling = SamplingOptions(max_new_tokens=10, ignore_eos=True)
    none = ask(qwen, square_clip, QUESTION, frames=8, compression=CompressionOptions(method=Method.none),
               sampling=sampling)
    same = ask(qwen, square_clip, QUESTION, frames=8, sampling=sampling,
               compression=CompressionOptions(method=Method.dycoke, ttm_k=0.0, prune_p=0.0))
    assert same.token_ids == none.token_ids and same.stats.visual_tokens_decode == none.stats.visual_tokens


def test_pruned_cache_equals_the_masked_full_cache(qwen, square_clip):
    enc = encode_video(qwen, square_clip, 4)
    _, positions, span, plan = our_first_logits(qwen, enc, QUESTION)
    embeds, _ = build_embeds(qwen, QUESTION, plan.tokens, enc.newline)
    seq = embeds.shape[1]
    sel = DecodeSelector(prune_from=2, span=span, keep=9)
    cache = PrunedKVCache(qwen.num_layers, seq + 2, sel)
    step = torch.tensor([[int(positions.max()) + 1]])
    with torch.inference_mode():
        first = int(run_layers(qwen, embeds, batch_positions(positions), cache, sel).argmax())
        x = qwen.decoder.embed_tokens(torch.tensor([[first]]))
        got = run_layers(qwen, x, step, cache, sel)
        pruned = [p for p in range(*span) if p - span[0] not in set(sel.selection.tolist())]
        want = _masked_step(qwen, embeds, positions, first, step, pruned)
    assert len(pruned) == enc.visual_tokens - 9
    assert_close(got, want, rtol=1e-5, atol=1e-5)


def _masked_step(lm, embeds, positions, token, step, pruned):
    """The same step over a full cache, layers >= 2 masked off the pruned positions."""
    dec, seq = lm.decoder, embeds.shape[1]
    cache = PrunedKVCache(lm.num_layers, seq + 2)
    run_layers(lm, embeds, batch_positions(positions), cache)
    hidden = dec.embed_tokens(torch.tensor([[token]]))
    cos_sin = dec.rotary_emb(hidden, step)
    mask = torch.ones(1, 1, 1, seq + 1, dtype=torch.bool)
    mask[..., pruned] = False
    for i, layer in enumerate(dec.layers):
        hidden = call_layer(layer, hidden, cache, attention_mask=mask if i >= 2 else None,
                            position_embeddings=cos_sin, position_ids=None)
    return lm.lm_head(dec.norm(hidden))[:, -1].float()


@pytest.mark.parametrize("frames, size, steps, grid", [
    (1, (64, 48), 1, (2, 2)),  # one frame: repeated to make a step
    (5, (64, 48), 3, (2, 2)),  # an odd count: the last frame repeated
    (4, (90, 50), 2, (2, 3)),  # sides not multiples of 28: 50 x 90 -> 56 x 84
])
def test_awkward_shapes(frames, size, steps, grid, qwen, tmp_path):
    clip = write_clip(tmp_path / "c.mp4", n_frames=20, size=size, fps=10)
    enc = encode_video(qwen, clip, frames)
    assert (enc.frames, (enc.rows, enc.cols)) == (steps, grid)
    assert enc.video.info.sampled == frames
    r = ask(qwen, clip, QUESTION, frames=frames, sampling=SamplingOptions(max_new_tokens=3))
    assert r.stats.visual_tokens == steps * grid[0] * grid[1]


def test_smart_resize_and_patch_order():
    assert smart_resize(480, 640, 128 * 28 * 28, 768 * 28 * 28) == (476, 644)
    assert smart_resize(48, 64, 56 * 56, 112 * 112) == (56, 56)
    video = torch.arange(3 * 3 * 28 * 56, dtype=torch.float32).reshape(3, 3, 28, 56)
    patches, grid = patchify(video)
    assert grid.tolist() == [[2, 2, 4]] and patches.shape == (16, 3 * 2 * 14 * 14)
    # row 1 of the first step: the top-right patch of the first 2x2 group, frame 0, channel 0
    assert patches[1, :14].tolist() == video[0, 0, 0, 14:28].tolist()


def test_fps_sampling_by_default(qwen_dir, qwen, tmp_path):
    clip = write_clip(tmp_path / "long.mp4", n_frames=40, size=(64, 48), fps=10)  # 4 s at 2 fps: 8 frames
    r = ask(qwen, clip, QUESTION, sampling=SamplingOptions(max_new_tokens=2))
    assert (r.video.requested, r.stats.frames) == (8, 4)
    times = r.video.timestamps
    assert [frame_index_of_time(t) for t in times] == [2, 7, 12, 17, 22, 27, 32, 37]


def frame_index_of_time(t: float) -> int:
    return round(t * 10)


@pytest.mark.parametrize("method", [m.value for m in Method])
def test_cli_answers_with_every_method(method, qwen_dir, square_clip, capsys, monkeypatch):
    code, out, err = run_cli(["ask", str(square_clip), QUESTION, "--model", str(qwen_dir), "--method", method,
                              "--json", "--max-new-tokens", "3", "--frames", "8"], capsys, monkeypatch)
    assert (code, err) == (0, "")
    payload = json.loads(out)
    assert payload["model"]["family"] == "qwen2_5_vl" and payload["stats"]["frames"] == 4
    budget = {"none": 64, "fastv": 8, "random": 8, "frames": 16, "dycoke": 8}[method]
    assert payload["stats"]["visual_tokens_decode"] == budget


def test_chat_and_compare_with_qwen(qwen_dir, square_clip, capsys, monkeypatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTION}\n/method fastv\n{QUESTION}\n"))
    code, out, _ = run_cli(["chat", str(square_clip), "--model", str(qwen_dir), "-q", "--max-new-tokens", "2"],
                           capsys, monkeypatch)
    assert code == 0 and len(out.splitlines()) == 2
    code, out, _ = run_cli(["compare", str(square_clip), QUESTION, "--model", str(qwen_dir), "--json", "-q",
                            "--max-new-tokens", "2", "--methods", "none,dycoke,fastv"], capsys, monkeypatch)
    assert code == 0 and [m["method"] for m in json.loads(out)["methods"]] == ["none", "dycoke", "fastv"]


def test_eval_and_caption_with_qwen(qwen_dir, square_clip, tmp_path, capsys, monkeypatch):
    import shutil

    shutil.copy(square_clip, tmp_path / "a.mp4")
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"video": "a.mp4", "question": QUESTION, "answer": "red"}) + "\n")
    code, out, err = run_cli(["eval", str(qa), "--model", str(qwen_dir), "--json", "--methods", "none,dycoke",
                              "--max-new-tokens", "2"], capsys, monkeypatch)
    assert (code, err) == (0, "")
    summary = json.loads(out)["summary"]
    assert (summary["none"]["n"], summary["dycoke"]["n"]) == (1, 1)
    assert summary["dycoke"]["mean_retention"] < summary["none"]["mean_retention"] == 1.0
    code, out, _ = run_cli(["caption", str(square_clip), "--model", str(qwen_dir), "--json", "--max-new-tokens", "2"],
                           capsys, monkeypatch)
    assert code == 0 and json.loads(out)["options"]["question"] == "Describe this video in detail."


@pytest.mark.parametrize("config, message", [
    ({"size": {"shortest_edge": "many"}}, "/video_preprocessor_config.json: unreadable preprocessor config (ValueError)"),
    ({"fps": 0}, ": bad video preprocessor config (min/max pixels, fps, frame counts, mean/std)"),
    ({"size": {"shortest_edge": 20000, "longest_edge": 10000}},
     ": bad video preprocessor config (min/max pixels, fps, frame counts, mean/std)"),
])
def test_a_bad_video_preprocessor_config_is_one_line(config, message, qwen_dir, square_clip, tmp_path, capsys,
                                                       monkeypatch):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(qwen_dir, folder)
    (folder / "video_preprocessor_config.json").write_text(json.dumps(config))
    assert run_cli(["ask", str(square_clip), QUESTION, "--model", str(folder), "-q"], capsys, monkeypatch) == (
        1, "", f"dycoke: error: {folder}{message}\n")


@pytest.mark.parametrize("method", [Method.dycoke, Method.none, Method.fastv])
def test_static_steps_give_the_eager_tokens_with_3d_positions(qwen, square_clip, method):
    enc = encode_video(qwen, square_clip, 4)
    from dycoke_cli.pipeline import answer

    runs = [answer(qwen, enc, QUESTION, CompressionOptions(method=method),
                   SamplingOptions(max_new_tokens=8, ignore_eos=True, decode=d)) for d in ("eager", "static")]
    assert runs[1].token_ids == runs[0].token_ids and len(runs[1].token_ids) == 8
    assert [r.stats.decode_path for r in runs] == ["eager", "static"]


def test_a_static_step_with_3d_positions_has_no_host_sync(qwen, square_clip):
    from sync_probe import step_syncs

    from dycoke_cli.decoding.static import StaticSteps

    enc = encode_video(qwen, square_clip, 4)
    _, positions, span, plan = our_first_logits(qwen, enc, QUESTION)
    embeds, _ = build_embeds(qwen, QUESTION, plan.tokens, enc.newline)
    sel = DecodeSelector(prune_from=2, span=span, keep=9)
    cache = PrunedKVCache(qwen.num_layers, embeds.shape[1] + 5, sel)
    with torch.inference_mode():
        token = run_layers(qwen, embeds, batch_positions(positions), cache, sel).argmax(dim=-1)
    steps = StaticSteps(qwen, cache, sel, int(positions.max()) + 1, 3, graph=False)
    # the one read: DyCoke's refresh flag, from CPU memory (a captured CUDA step: a conditional node)
    assert step_syncs(steps, token, 4) == ["is_nonzero"] * 4
    assert sel.counts.steps == 4 and steps.position[:, 0, 0].tolist() == [int(positions.max()) + 5] * 3
