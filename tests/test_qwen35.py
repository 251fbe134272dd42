"""Qwen3.5 (dense and MoE): a hybrid stack of linear attention (Gated DeltaNet) and full
attention, through our loop, checked against transformers' own model.

Tiny random checkpoints (8 layers: full attention at 3 and 7, linear attention elsewhere) are
built from configs and loaded through the real loader. The references are transformers'
``Qwen3_5ForConditionalGeneration`` / ``Qwen3_5MoeForConditionalGeneration`` forward and
``generate`` on input ids written as the processor writes them (test_qwen3.reference_ids),
and its text model over our embeddings where the prompt is compressed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from clips import write_clip
from conftest import TINY_WORDS
from test_cli import run_cli
from torch.testing import assert_close
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

from dycoke_cli.compression.baselines import plan_tokens
from dycoke_cli.compression.cache import PrunedKVCache, _LinearStateLayer
from dycoke_cli.compression.selectors import DecodeSelector
from dycoke_cli.decoding.loop import DecodeTimings, batch_positions, generate_tokens, run_layers
from dycoke_cli.decoding.prompt import embed_parts, prefill_positions, prompt_embeds
from dycoke_cli.errors import UsageError
from dycoke_cli.models.loader import load_model
from dycoke_cli.models.preprocess import patchify_video
from dycoke_cli.models.qwen3_vl import PATCH
from dycoke_cli.options import CompressionOptions, Method, OptionError, SamplingOptions
from dycoke_cli.testing.tiny import QWEN35_CHAT_TEMPLATE
from dycoke_cli.pipeline import build_prefix, encode_video
from dycoke_cli.session import Session, ask

QUESTION = "what color is the cup?"
METHODS = ["none", "dycoke", "fastv", "random", "frames"]
LINEAR, FULL = (0, 1, 2, 4, 5, 6), (3, 7)


def _checkpoint(tmp_path_factory, moe: bool, name: str):
    from dycoke_cli.testing.tiny import TinyQwen35Spec, build_bpe_tokenizer, build_qwen3_5, save_qwen3_5_checkpoint

    tok = build_bpe_tokenizer(TINY_WORDS)
    return save_qwen3_5_checkpoint(build_qwen3_5(tok, TinyQwen35Spec(moe=moe)), tok,
                                   tmp_path_factory.mktemp(name) / "model")


@pytest.fixture(scope="module")
def q35_dir(tmp_path_factory):
    return _checkpoint(tmp_path_factory, moe=False, name="q35")


@pytest.fixture(scope="module")
def q35moe_dir(tmp_path_factory):
    return _checkpoint(tmp_path_factory, moe=True, name="q35moe")


@pytest.fixture(scope="module", params=["dense", "moe"])
def q35(request, q35_dir, q35moe_dir):
    return load_model(str(q35_dir if request.param == "dense" else q35moe_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def dense(q35_dir):
    return load_model(str(q35_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """64 x 48 px at 10 fps: frame k at k / 10 s."""
    return write_clip(tmp_path_factory.mktemp("q35clips") / "clip.mp4", n_frames=30, size=(64, 48), fps=10)


def reference_ids(lm, enc, question: str, fps: float = 10.0) -> torch.Tensor:
    """input_ids as Qwen3VLProcessor writes them for this clip's sampled frames, thinking off
    (``enable_thinking=False``, our default)."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    text = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                            enable_thinking=False)
    indices = [round(t * fps) for t in enc.video.info.timestamps]
    times = Qwen3VLProcessor._calculate_timestamps(None, indices, fps, 2)
    video = "".join(f"<{t:.1f} seconds><|vision_start|>" + "<|video_pad|>" * enc.tokens_per_frame + "<|vision_end|>"
                    for t in times)
    text = text.replace("<|vision_start|><|video_pad|><|vision_end|>", video, 1)
    return torch.tensor(lm.tokenizer(text, add_special_tokens=False)["input_ids"])


def hf_inputs(lm, enc, question: str) -> dict:
    ids = reference_ids(lm, enc, question).unsqueeze(0)
    patches, grid = patchify_video(lm.preprocess(enc.video.frames), 2, PATCH, 2)
    return dict(input_ids=ids, pixel_values_videos=patches, video_grid_thw=grid,
                mm_token_type_ids=(ids == lm.video_token_id).int() * 2, attention_mask=torch.ones_like(ids))


def prefill(lm, enc, question: str, method=Method.none, chunk=None, **knobs):
    """Our prefill of the whole prompt: (logits [1, V], cache, embeds, positions [3, S], span, plan)."""
    opts = CompressionOptions(method=method, **knobs).resolve(lm)
    plan = plan_tokens(enc, opts, lm.fastv_layer)
    embeds, span = prompt_embeds(lm, question, plan, enc)
    positions = prefill_positions(lm, span, plan, enc, embeds.shape[1], opts.positions)
    cache = PrunedKVCache(lm.num_layers, embeds.shape[1] + 1, linear=lm.linear_layers)
    with torch.inference_mode():
        logits = run_layers(lm, embeds, batch_positions(positions), cache, chunk=chunk)
    return logits, cache, embeds, positions, span, plan


def hf_forward(lm, inputs):
    """transformers' whole model: (last logits [1, V], its DynamicCache)."""
    with torch.inference_mode():
        out = lm.model(**inputs, use_cache=True)
    return out.logits[:, -1].float(), out.past_key_values


def assert_states_equal(ours: PrunedKVCache, theirs) -> None:
    """Every linear layer's conv and recurrent state, and every full layer's keys, to 1e-5."""
    for i, (mine, ref) in enumerate(zip(ours.layers, theirs.layers)):
        if i in LINEAR:
            assert isinstance(mine, _LinearStateLayer)
            assert_close(mine.conv_states[0], ref.conv_states[0], rtol=1e-5, atol=1e-5)
            assert_close(mine.recurrent_states[0], ref.recurrent_states[0], rtol=1e-5, atol=1e-5)
        else:
            n = ref.keys.shape[2]
            assert_close(mine.keys[:, :, :n], ref.keys, rtol=1e-5, atol=1e-5)


# -- equality with transformers ------------------------------------------------------------------


def test_the_stack_is_hybrid_and_nothing_is_deepstacked(q35, clip):
    assert (q35.family in ("qwen3_5", "qwen3_5_moe"), q35.linear_layers, q35.attention_layers) == (True, LINEAR, FULL)
    assert (q35.defaults.prune_layer, q35.probe_layer(4), q35.probe_layer(7), q35.fastv_layer) == (4, 3, 3, 4)
    enc = encode_video(q35, clip, 8)
    assert (enc.frames, enc.rows, enc.cols, enc.deepstack) == (4, 2, 2, ())


def test_whole_prompt_and_chunked_prefill_equal_transformers(q35, clip):
    enc = encode_video(q35, clip, 8)
    inputs = hf_inputs(q35, enc, QUESTION)
    want, theirs = hf_forward(q35, inputs)
    got, cache, embeds, _, span, _ = prefill(q35, enc, QUESTION)
    assert embeds.shape[1] == inputs["input_ids"].shape[1]
    assert torch.equal(span.visual, torch.nonzero(inputs["input_ids"][0] == q35.video_token_id).flatten())
    assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_states_equal(cache, theirs)  # the linear layers' states after the prefill are transformers'
    chunked, chunked_cache, *_ = prefill(q35, enc, QUESTION, chunk=7)  # the state carries across pieces
    assert_close(chunked, want, rtol=1e-5, atol=1e-5)
    assert_states_equal(chunked_cache, theirs)


def test_a_session_follow_up_equals_transformers(q35, clip):
    """The prefix (text before, the video part) computed once, its linear states copied; then
    only the question, twice from the same prefix."""
    enc = encode_video(q35, clip, 8)
    want, _ = hf_forward(q35, hf_inputs(q35, enc, QUESTION))
    prefix = build_prefix(q35, enc, CompressionOptions(method=Method.none))
    assert [s is None for s in prefix.states] == [i not in LINEAR for i in range(8)]
    question = embed_parts(q35, q35.prompt_ids(QUESTION)[1])
    for _ in range(2):  # the prefix's states are copied in, never written through
        cache = PrunedKVCache(q35.num_layers, prefix.length + question.shape[1], linear=q35.linear_layers)
        cache.load_prefix(prefix.keys, prefix.values, prefix.states)
        positions = prefix.next_positions(q35, enc, question.shape[1])
        with torch.inference_mode():
            got = run_layers(q35, question, batch_positions(positions), cache)
        assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_first_greedy_tokens_equal_model_generate(q35, clip):
    enc = encode_video(q35, clip, 8)
    inputs = hf_inputs(q35, enc, QUESTION)
    pad = q35.tokenizer.pad_token_id  # generate stops at it only: EOS is generated like any token (ignore_eos)
    reference = q35.model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=pad,
                                   pad_token_id=pad)[0, inputs["input_ids"].shape[1]:]
    ours = ask(q35, clip, QUESTION, frames=8, compression=CompressionOptions(method=Method.none),
               sampling=SamplingOptions(max_new_tokens=8, ignore_eos=True))
    assert list(ours.token_ids) == reference.tolist() and len(ours.token_ids) == 8 and pad not in ours.token_ids


# -- the prompt: timestamps, pads per step, positions ----------------------------------------------


def test_the_prompt_layout_equals_the_processors(dense, clip):
    enc = encode_video(dense, clip, 16)
    assert enc.frames == 8
    plan = plan_tokens(enc, CompressionOptions(method=Method.none).resolve(dense))
    pieces, _, _ = dense.video_part(enc, plan)
    text = dense.tokenizer.decode(torch.cat([p for p in pieces if not p.is_floating_point()]).tolist())
    indices = [round(t * 10) for t in enc.video.info.timestamps]
    expected = [f"{t:.1f}" for t in Qwen3VLProcessor._calculate_timestamps(None, indices, 10.0, 2)]
    assert re.findall(r"<([0-9.]+)seconds>", text.replace(" ", "")) == expected
    _, _, _, full_pos, full_span, _ = prefill(dense, enc, QUESTION)
    inputs = hf_inputs(dense, enc, QUESTION)
    reference, _ = dense.model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                    video_grid_thw=inputs["video_grid_thw"])
    assert torch.equal(full_pos, reference[:, 0])
    # after TTM: each step carries its kept tokens, at the full prompt's positions
    _, _, _, kept_pos, span, plan = prefill(dense, enc, QUESTION, Method.dycoke)
    per_step = torch.bincount(plan.index // enc.tokens_per_frame, minlength=enc.frames)
    vectors = [p for p in dense.video_part(enc, plan)[0] if p.is_floating_point()]
    assert [v.shape[0] for v in vectors] == per_step.tolist() and plan.prefill_visual < enc.visual_tokens
    keep = torch.ones(full_pos.shape[1], dtype=torch.bool)
    keep[full_span.visual] = False
    keep[full_span.visual[plan.index]] = True
    assert torch.equal(kept_pos, full_pos[:, keep])


# -- DyCoke on the hybrid: what is pruned, what is probed ----------------------------------------------


def dycoke_run(lm, enc, steps: int = 6, **knobs):
    """DyCoke through our loop with the pipeline's parts; returns (tokens, cache, selector, text
    model's DynamicCache after the same prefill, the embeds and positions)."""
    opts = CompressionOptions(method=Method.dycoke, **knobs).resolve(lm)
    plan = plan_tokens(enc, opts, lm.fastv_layer)
    embeds, span = prompt_embeds(lm, QUESTION, plan, enc)
    positions = prefill_positions(lm, span, plan, enc, embeds.shape[1], opts.positions)
    selector = DecodeSelector(plan.prune_from, span, plan.keep, frame_of=plan.index // enc.tokens_per_frame,
                              coverage=opts.coverage, probe_layer=lm.probe_layer(plan.prune_from))
    cache = PrunedKVCache(lm.num_layers, embeds.shape[1] + steps + 1, selector, linear=lm.linear_layers)
    tokens = list(generate_tokens(lm, embeds, cache, SamplingOptions(max_new_tokens=steps, ignore_eos=True,
                                                                     decode="eager"),
                                  selector, DecodeTimings(), positions))
    return tokens, cache, selector, embeds, positions, plan


def test_dycoke_prunes_full_attention_layers_from_l_and_probes_the_last_one_before(dense, clip):
    enc = encode_video(dense, clip, 8)
    tokens, cache, selector, embeds, _, plan = dycoke_run(dense, enc)
    kinds = [type(layer).__name__ for layer in cache.layers]
    assert kinds == ["_LinearStateLayer"] * 3 + ["_BufferLayer"] + ["_LinearStateLayer"] * 3 + ["_PrunedLayer"]
    assert (selector.probe_layer, plan.prune_from, cache.first_pruned) == (3, 4, 7)
    assert selector.counts.steps == len(tokens) - 1 == 5  # every decoding step was probed at layer 3
    pruned, full = cache.layers[7], cache.layers[3]
    fed = len(tokens) - 1
    assert full.length == embeds.shape[1] + fed  # layer 3 (the probe) keeps every entry
    assert pruned.length == embeds.shape[1] - plan.prefill_visual + plan.keep + fed  # layer 7 keeps the selection


def test_linear_layers_see_the_whole_video_under_dycoke(dense, clip):
    """DyCoke's prefill leaves every linear layer (and every full layer) exactly as transformers'
    text model leaves it over the same merged prompt: nothing is pruned before the decoding steps,
    and the linear layers never lose a token (a mutant that cut their input fails here)."""
    enc = encode_video(dense, clip, 8)
    _, cache, _, embeds, positions, plan = dycoke_run(dense, enc, steps=1)
    assert plan.prefill_visual < enc.visual_tokens
    with torch.inference_mode():
        ref = dense.model.model.language_model(inputs_embeds=embeds, position_ids=batch_positions(positions),
                                               use_cache=True).past_key_values
    for i in LINEAR:
        assert_close(cache.layers[i].conv_states[0], ref.layers[i].conv_states[0], rtol=1e-5, atol=1e-5)
        assert_close(cache.layers[i].recurrent_states[0], ref.layers[i].recurrent_states[0], rtol=1e-5, atol=1e-5)
    assert_close(cache.layers[3].keys[:, :, : embeds.shape[1]], ref.layers[3].keys, rtol=1e-5, atol=1e-5)
    store = cache.layers[7].store_k  # layer 7 filed every visual key of the prompt
    assert_close(store, ref.layers[7].keys[:, :, _span_visual(dense, enc, plan)], rtol=1e-5, atol=1e-5)


def _span_visual(lm, enc, plan) -> torch.Tensor:
    _, span = prompt_embeds(lm, QUESTION, plan, enc)
    return span.visual


def test_dycoke_with_nothing_merged_or_pruned_equals_none(q35, clip):
    none = ask(q35, clip, QUESTION, frames=8, compression=CompressionOptions(method=Method.none),
               sampling=SamplingOptions(max_new_tokens=8, ignore_eos=True))
    off = ask(q35, clip, QUESTION, frames=8, compression=CompressionOptions(method=Method.dycoke, ttm_k=0.0,
                                                                             prune_p=0.0),
              sampling=SamplingOptions(max_new_tokens=8, ignore_eos=True))
    assert off.token_ids == none.token_ids and off.stats.visual_tokens_decode == 16 and off.stats.prune_layer == 4


@pytest.mark.parametrize("layer, ok", [(1, False), (3, False), (4, True), (7, True)])
def test_prune_layer_must_leave_a_full_attention_layer_to_probe_and_to_prune(dense, clip, layer, ok):
    opts = CompressionOptions(prune_layer=layer)
    if ok:
        assert opts.resolve(dense).prune_layer == layer
        return
    with pytest.raises(UsageError, match=r"^prune_layer must be in \[4, 7\] for this hybrid model \(full attention "
                                         rf"at layers 3, 7: one before L is probed, those from L on are pruned\) "
                                         rf"\(got {layer}\)$"):
        opts.resolve(dense)


def test_a_dycoke_json_prune_layer_that_probes_a_linear_layer_is_refused_at_load(q35_dir, clip, tmp_path, capsys,
                                                                                   monkeypatch):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(q35_dir, folder)
    (folder / "dycoke.json").write_text(json.dumps({"prune_layer": 2}))
    assert run_cli(["ask", str(clip), QUESTION, "--model", str(folder), "-q"], capsys, monkeypatch) == (
        1, "", f"dycoke: error: {folder / 'dycoke.json'}: prune_layer must be in [4, 7] for this hybrid model: a "
               "full-attention layer before it is probed, those from it on are pruned (got 2)\n")


def test_a_bad_prune_layer_is_one_line_from_the_command_line(q35_dir, clip, capsys, monkeypatch):
    code, out, err = run_cli(["ask", str(clip), QUESTION, "--model", str(q35_dir), "--prune-layer", "2", "-q"],
                             capsys, monkeypatch)
    assert (code, out) == (2, "") and err.count("\n") == 1
    assert "--prune-layer must be in [4, 7] for this hybrid model" in err and "(got 2)" in err


# -- every method, sessions, static decoding ---------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_session_answers_equal_fresh_asks(q35, clip, method):
    sampling = SamplingOptions(max_new_tokens=8, ignore_eos=True)
    opts = CompressionOptions(method=Method(method))
    session = Session(q35, clip, frames=8, compression=opts)
    questions = [QUESTION, "which way does the cup move"]
    got = [session.ask(q, sampling).token_ids for q in questions]
    want = [ask(q35, clip, q, frames=8, compression=opts, sampling=sampling).token_ids for q in questions]
    assert got == want and all(len(t) == 8 for t in got)


@pytest.mark.parametrize("method", ["none", "dycoke"])
def test_static_decoding_gives_the_eager_tokens_and_a_session_replays_it(dense, clip, method):
    opts = CompressionOptions(method=Method(method))
    questions = [QUESTION, "which way does the cup move"]
    static, eager = (Session(dense, clip, frames=8, compression=opts) for _ in range(2))
    for i, q in enumerate(questions):
        a = static.ask(q, SamplingOptions(max_new_tokens=8, ignore_eos=True, decode="static"))
        b = eager.ask(q, SamplingOptions(max_new_tokens=8, ignore_eos=True, decode="eager"))
        assert a.token_ids == b.token_ids and a.stats.decode_path == "static"
        assert a.stats.decode_step_reused == (i > 0)


def test_stats_count_the_linear_state_and_the_pruned_layers(dense, clip):
    r = ask(dense, clip, QUESTION, frames=8, compression=CompressionOptions(method=Method.dycoke),
            sampling=SamplingOptions(max_new_tokens=6, ignore_eos=True))
    s = r.stats
    conv = 2 * 16 * 2 + 4 * 16  # q, k (2 heads of 16) and v (4 heads of 16) channels
    per_layer = 4 * (conv * 4 + 4 * 16 * 16)  # fp32: conv state (kernel 4) and recurrent state (4 heads, 16 x 16)
    assert s.kv_bytes.linear_state == 6 * per_layer
    assert s.kv_bytes.device_total == s.kv_bytes.working + s.kv_bytes.store + s.kv_bytes.linear_state
    assert (s.visual_tokens, s.visual_tokens_prefill, s.visual_tokens_decode) == (16, 7, 2)
    assert (s.prune_layer, s.pruned_layers, s.decode_retention) == (4, (7,), 2 / 7)  # the pruned layer only
    fastv = ask(dense, clip, QUESTION, frames=8, compression=CompressionOptions(method=Method.fastv),
                sampling=SamplingOptions(max_new_tokens=2, ignore_eos=True)).stats
    assert (fastv.prune_layer, fastv.pruned_layers) == (4, (4, 5, 6, 7))  # after its cut every layer sees fewer
    import io

    from rich.console import Console

    from dycoke_cli.cli.display import LiveState, render

    console = Console(file=io.StringIO(), width=120)  # the panel names the pruned layers
    console.print(render(LiveState(stats=s.to_dict())))
    assert "2/7 visual KV entries (full-attention layers 7)" in console.file.getvalue()


# -- the command line ------------------------------------------------------------------------------------


def test_ask_caption_compare_eval_and_chat_answer_with_no_library_notices(q35moe_dir, clip, tmp_path, capsys,
                                                                           monkeypatch):
    import io

    model = ["--model", str(q35moe_dir), "--frames", "8"]
    code, out, err = run_cli(["ask", str(clip), QUESTION, *model, "--max-new-tokens", "3", "--json"], capsys,
                             monkeypatch)
    assert (code, err) == (0, "") and json.loads(out)["model"]["family"] == "qwen3_5_moe"
    code, out, err = run_cli(["caption", str(clip), *model, "--max-new-tokens", "2", "-q"], capsys, monkeypatch)
    assert (code, err) == (0, "") and out.strip()
    code, out, err = run_cli(["compare", str(clip), QUESTION, *model, "--methods", ",".join(METHODS),
                              "--max-new-tokens", "3", "--json"], capsys, monkeypatch)
    assert (code, err) == (0, "")
    rows = json.loads(out)["methods"]
    assert [r["method"] for r in rows] == METHODS
    assert [r["visual_tokens_prefill"] for r in rows] == [16, 7, 16, 2, 4]
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"video": str(clip), "question": QUESTION, "answer": "red"}) + "\n")
    code, out, err = run_cli(["eval", str(qa), *model, "--methods", "none,dycoke", "--max-new-tokens", "2",
                              "--json"], capsys, monkeypatch)
    report = json.loads(out)
    assert (code, err, report["failures"]) == (0, "", [])
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTION}\n/method fastv\n{QUESTION}\n"))
    code, out, err = run_cli(["chat", str(clip), *model, "-q", "--max-new-tokens", "2"], capsys, monkeypatch)
    assert (code, err) == (0, "[dycoke] method: fastv\n") and len(out.splitlines()) == 2


BLOCK_NETWORK = """
import socket, sys
def refuse(*args, **kwargs):
    sys.stderr.write("NETWORK %r\\n" % (args[1:],))
    raise OSError("network blocked by the test")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
from dycoke_cli.cli.entry import main
sys.argv = ["dycoke"] + sys.argv[1:]
main()
"""


def test_a_command_with_the_network_blocked_makes_no_request_and_prints_no_notice(q35_dir, clip):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_HUB_OFFLINE")}  # no offline switch either
    run = subprocess.run([sys.executable, "-c", BLOCK_NETWORK, "ask", str(clip), QUESTION, "--model", str(q35_dir),
                          "--frames", "8", "--max-new-tokens", "3", "--method", "dycoke", "-q"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert (run.returncode, run.stderr) == (0, "") and run.stdout.strip()


def test_serve_answers_as_ask_does_and_returns_reasoning_apart(thinker, clip, tmp_path, capsys, monkeypatch):
    """A real `dycoke serve` process with the hybrid model: the answer `ask` gives; with
    chat_template_kwargs' enable_thinking the reasoning in reasoning_content (whole or streamed)."""
    import time
    import urllib.error
    import urllib.request

    folder, _ = thinker
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "dycoke_cli", "serve", "--model", str(folder), "--port", "0",
                                 "--frames", "8", "--allowed-local-media-path", str(clip.parent)],
                                stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 120
        while "(Ctrl-C stops)" not in err_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, err_path.read_text()
            time.sleep(0.05)
        model_id, base = re.search(r"serving (.+) at (http://\S+/v1) ", err_path.read_text()).groups()

        def post(**extra):
            body = {"model": model_id, "max_tokens": 8, "messages": [{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": f"file://{clip}"}}, {"type": "text", "text": QUESTION}]}],
                **extra}
            req = urllib.request.Request(f"{base}/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=120) as resp:
                    raw = resp.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read())
            if not extra.get("stream"):
                return 200, json.loads(raw)["choices"][0]["message"]
            deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in raw.splitlines()
                      if line.startswith("data: {") and '"choices"' in line]
            return 200, {k: "".join(d.get(k) or "" for d in deltas) for k in ("content", "reasoning_content")}

        plain = post()
        thought = post(chat_template_kwargs={"enable_thinking": True})
        streamed = post(chat_template_kwargs={"enable_thinking": True}, stream=True)
        effort = post(reasoning_effort="high")  # OpenAI's field: on (this template has no efforts)
        off_by_effort = post(chat_template_kwargs={"reasoning_effort": "none"})
        refused = post(chat_template_kwargs={"enable_thinking": True, "top_k": 3})
        bad_effort = post(reasoning_effort="extreme")
    finally:
        proc.terminate()
        proc.wait(60)
    args = ["ask", str(clip), QUESTION, "--model", str(folder), "--frames", "8", "--max-new-tokens", "8", "--json"]
    off = json.loads(run_cli(args, capsys, monkeypatch)[1])
    on = json.loads(run_cli([*args, "--thinking", "on"], capsys, monkeypatch)[1])
    assert plain == (200, {"role": "assistant", "content": off["answer"]})
    assert thought == (200, {"role": "assistant", "content": on["answer"], "reasoning_content": on["reasoning"]})
    assert streamed == (200, {"content": on["answer"], "reasoning_content": on["reasoning"]})
    assert effort == thought and off_by_effort == plain
    assert refused[0] == 400 and "chat_template_kwargs: only" in refused[1]["error"]["message"]
    assert (bad_effort[0], bad_effort[1]["error"]["message"]) == (
        400, "reasoning_effort must be one of none, minimal, low, medium, high (got 'extreme')")
    assert "falling back" not in err_path.read_text() and "Traceback" not in err_path.read_text()


def test_the_flops_estimate_counts_linear_layers_at_their_fixed_cost(dense):
    from dycoke_cli.compression.flops import LMShape, answer_flops

    shape = LMShape.from_config(dense.model.config.text_config)
    # d 64; keys 2 x 16, values 4 x 16, 4 value heads; MLP 128; conv 4: projections, conv, delta rule
    c_lin = 2 * (64 * (2 * 32 + 2 * 64 + 2 * 4) + 64 * 64 + 3 * 64 * 128) + 2 * 4 * (2 * 32 + 64) + 8 * 4 * 16 * 16
    assert (shape.linear, shape.linear_token) == (LINEAR, c_lin)
    longer = [100 if i in LINEAR else 50 for i in range(8)]  # a linear layer's context costs nothing
    assert answer_flops(shape, [50] * 8, [60] * 8, 1) + 6 * 50 * c_lin == answer_flops(shape, longer, [60] * 8, 1)


# -- thinking ----------------------------------------------------------------------------------------------


def test_reasoning_split_holds_back_a_tag_cut_in_two():
    from dycoke_cli.decoding.detokenize import ReasoningSplit

    split, got = ReasoningSplit(), []
    for piece in ["<th", "ink>\nlet me", " see</", "think>\n\nThe cup", " is red"]:
        got.append(split.push(piece))
    got.append(split.finish())
    assert got == [("", ""), ("let me", ""), (" see", ""), ("", "The cup"), ("", " is red"), ("", "")]
    assert (split.reasoning, split.answer) == ("let me see", "The cup is red")


@pytest.fixture(scope="module")
def thinker(q35_dir, dense, clip, tmp_path_factory):
    """The tiny checkpoint with two vocabulary rows swapped (embedding and head): ``</think>`` and the
    token it greedily writes fourth with thinking on. It then writes ``</think>`` there and goes on
    exactly as before: three tokens of reasoning, then the answer. Returns (folder, tokens before)."""
    import shutil

    from safetensors.torch import load_file, save_file

    before = ask(dense, clip, QUESTION, frames=8, sampling=SamplingOptions(max_new_tokens=8, ignore_eos=True,
                                                                           thinking=True)).token_ids
    close = dense.tokenizer.convert_tokens_to_ids("</think>")
    prompt = set(torch.cat(dense.prompt_ids(QUESTION, None, True)).tolist())
    swap = before[3]
    assert swap not in prompt and swap not in before[:3] and close not in before
    assert not set(before) & set(dense.eos_token_ids)  # the command line, without --ignore-eos, writes them all
    folder = tmp_path_factory.mktemp("thinker") / "model"
    shutil.copytree(q35_dir, folder)
    weights = load_file(folder / "model.safetensors")
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        w = weights[name]
        w[[swap, close]] = w[[close, swap]]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder, before


def test_thinking_is_off_by_default_where_the_template_has_the_switch(dense):
    assert dense.has_thinking_switch
    decode = dense.tokenizer.decode
    assert decode(dense.prompt_ids(QUESTION)[1]).endswith("assistant\n<think>\n\n</think>\n\n")
    assert torch.equal(dense.prompt_ids(QUESTION)[1], dense.prompt_ids(QUESTION, None, False)[1])
    assert decode(dense.prompt_ids(QUESTION, None, True)[1]).endswith("assistant\n<think>\n")


# Qwen3.8's switch is reasoning_effort ("none" or an effort); this template writes the effort it got
EFFORT_TEMPLATE = QWEN35_CHAT_TEMPLATE.replace(
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{% else %}{{ '<think>\\n' }}{% endif %}",
    "{% if reasoning_effort == 'none' %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{% else %}{{ '<think>\\neffort ' + reasoning_effort + '\\n' }}{% endif %}")


def test_a_template_with_reasoning_effort_gets_off_or_the_effort_asked(dense, monkeypatch):
    assert EFFORT_TEMPLATE != QWEN35_CHAT_TEMPLATE and "enable_thinking" not in EFFORT_TEMPLATE
    monkeypatch.setattr(dense.tokenizer, "chat_template", EFFORT_TEMPLATE)
    assert dense.has_thinking_switch

    def ending(thinking) -> str:
        return dense.tokenizer.decode(dense.prompt_ids(QUESTION, None, thinking)[1]).split("assistant\n")[-1]

    assert [ending(t) for t in (None, False, True, "low", "high")] == [
        "<think>\n\n</think>\n\n", "<think>\n\n</think>\n\n", "<think>\neffort medium\n", "<think>\neffort low\n",
        "<think>\neffort high\n"]
    with pytest.raises(OptionError, match=r"^thinking must be on, off or an effort: low, medium, high \(got 'max'\)$"):
        SamplingOptions(thinking="max").validate()


def test_thinking_on_keeps_the_reasoning_apart_from_the_answer(thinker, clip, capsys, monkeypatch):
    folder, before = thinker
    lm = load_model(str(folder), device="cpu", dtype="float32")
    r = ask(lm, clip, QUESTION, frames=8, sampling=SamplingOptions(max_new_tokens=8, ignore_eos=True, thinking=True))
    close = lm.tokenizer.convert_tokens_to_ids("</think>")
    assert list(r.token_ids) == [*before[:3], close, *before[4:]]
    reasoning, answer = (lm.tokenizer.decode(ids).strip() for ids in (before[:3], before[4:]))
    assert (r.reasoning, r.text) == (reasoning, answer) and answer and reasoning
    args = ["ask", str(clip), QUESTION, "--model", str(folder), "--frames", "8", "--max-new-tokens", "8",
            "--thinking", "on"]
    code, out, err = run_cli([*args, "-q"], capsys, monkeypatch)
    assert (code, out.strip(), err) == (0, answer, "")  # stdout: the answer alone (as streamed, then a newline)
    code, out, _ = run_cli([*args, "--json"], capsys, monkeypatch)
    payload = json.loads(out)
    assert (code, payload["answer"], payload["reasoning"], payload["options"]["thinking"]) == (0, answer, reasoning,
                                                                                             True)
    code, out, _ = run_cli([*args[:-1], "high", "--json"], capsys, monkeypatch)  # an effort is on, too
    payload = json.loads(out)
    assert (code, payload["answer"], payload["reasoning"], payload["options"]["thinking"]) == (0, answer, reasoning,
                                                                                             "high")
    code, out, _ = run_cli([*args[:-2], "--json"], capsys, monkeypatch)  # off: no reasoning field
    assert code == 0 and "reasoning" not in json.loads(out) and json.loads(out)["options"]["thinking"] is None


def test_the_live_panel_shows_the_reasoning_dimmed():
    import io

    from rich.console import Console

    from dycoke_cli.cli.display import LiveState, render

    console = Console(file=io.StringIO(), force_terminal=True, color_system="standard", width=100)
    console.print(render(LiveState(stage="generating", reasoning="the cup looks red", answer="")))
    text = console.file.getvalue()
    assert "\x1b[2mthe cup looks red" in text and "thinking:" in text


def test_bench_builds_the_qwen3_5_2b_shapes():
    """`dycoke bench --arch qwen3.5-2b`: Qwen3.5-2B's text model (counted on the meta device)."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_compression as bench

    assert bench.parse_args(["--arch", "qwen3.5-2b"]).arch == "qwen3.5-2b"
    arch = bench.pick_arch("qwen3.5-2b", False)
    with torch.device("meta"):
        model, _ = bench._build_random(arch, torch.bfloat16, None)
    text = model.config.text_config
    assert [i for i, kind in enumerate(text.layer_types) if kind == "full_attention"] == [3, 7, 11, 15, 19, 23]
    language = sum(p.numel() for p in model.model.language_model.parameters())
    assert language == 1_881_825_088 and bench.pick_arch("qwen3.5-2b", True).family == "qwen3_5"  # 0.51 B embedding
