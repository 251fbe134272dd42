"""The static-shape decoding step (the CUDA-graph path) on the CPU: the same tokens as the
eager loop for every method, no host sync inside a step, the chunked prefill, and the token
choice on the device. tests/test_gpu.py runs the CUDA side."""

from __future__ import annotations

from dataclasses import astuple

import pytest
import torch
from sync_probe import step_syncs
from torch.testing import assert_close

from dycoke_cli.compression.cache import PrunedKVCache
from dycoke_cli.compression.selectors import DecodeSelector, PrefillSelector
from dycoke_cli.decoding.loop import EagerSteps, run_layers, sample_token
from dycoke_cli.decoding.prompt import build_embeds
from dycoke_cli.decoding.static import StaticSteps
from dycoke_cli.models.loader import load_model
from dycoke_cli.options import CompressionOptions, Method, OptionError, SamplingOptions
from dycoke_cli.pipeline import answer, encode_video

QUESTION = "what color is the cup?"


@pytest.fixture(scope="module")
def enc(tiny_lm, clip_path):
    return encode_video(tiny_lm, clip_path, 8)


@pytest.mark.parametrize("method", list(Method))
@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "top_p": 0.8, "seed": 7}])
def test_static_steps_give_the_eager_tokens(tiny_lm, enc, method, sampling):
    opts = CompressionOptions(method=method)
    runs = {d: answer(tiny_lm, enc, QUESTION, opts, SamplingOptions(max_new_tokens=16, ignore_eos=True, decode=d,
                                                                    **sampling))
            for d in ("eager", "static")}
    assert runs["static"].token_ids == runs["eager"].token_ids
    assert len(runs["static"].token_ids) == 16
    assert (runs["eager"].stats.decode_path, runs["static"].stats.decode_path) == ("eager", "static")
    counts = [None if r.stats.selection is None else astuple(r.stats.selection)[:4] for r in runs.values()]
    assert counts[0] == counts[1]
    assert (counts[0] is not None) == (method == Method.dycoke)
    if method == Method.dycoke:
        assert counts[0][0] == 15  # steps observed: one per token after the first


def test_auto_decodes_eagerly_on_the_cpu(tiny_lm, enc):
    a = answer(tiny_lm, enc, QUESTION, CompressionOptions(), SamplingOptions(max_new_tokens=3, ignore_eos=True))
    assert a.stats.decode_path == "eager" and a.options["decode"] == "auto"


def test_decode_option_is_checked():
    with pytest.raises(OptionError, match=r"^decode must be one of auto, eager, static \(got 'graph'\)$"):
        SamplingOptions(decode="graph").validate()


def _prefilled(lm, selector_kind: str, keep: int = 9, seed: int = 0):
    """A prompt of 8 random frames prefilled into a fresh cache: (cache, selector, first token, seq)."""
    torch.manual_seed(seed)
    visual = torch.randn(8 * lm.tokens_per_frame, lm.hidden_size)
    embeds, span = build_embeds(lm, QUESTION, visual, None)
    seq = embeds.shape[1]
    sel, reduced = None, None
    if selector_kind == "decode":
        sel = DecodeSelector(prune_from=2, span=span, keep=keep)
    elif selector_kind == "prefill":
        sel = PrefillSelector(prune_from=2, span=span, keep=keep)
        reduced = (2, seq + 9 - (span[1] - span[0]) + keep)
    cache = PrunedKVCache(lm.num_layers, seq + 9, sel if selector_kind == "decode" else None, reduced=reduced)
    with torch.inference_mode():
        logits = run_layers(lm, embeds, torch.arange(seq)[None], cache, sel)
    return cache, sel, logits.argmax(dim=-1), seq


@pytest.mark.parametrize("kind", ["decode", "prefill", None])
def test_a_static_step_has_no_host_sync(tiny_lm, kind):
    cache, sel, token, seq = _prefilled(tiny_lm, kind)
    steps = StaticSteps(tiny_lm, cache, sel, seq, 2, graph=False)
    sampling = SamplingOptions(temperature=0.7, top_p=0.9, seed=1)
    generator = torch.Generator().manual_seed(1)
    # DyCoke: one read a step, the refresh flag that decides whether the slots are rewritten, read
    # from the CPU's own memory (cache.run_if); a captured CUDA step decides it on the device in a
    # conditional node, and an eager CUDA step rewrites them regardless (tests/test_gpu.py)
    expected = ["is_nonzero"] * 6 if kind == "decode" else []
    assert step_syncs(steps, token, 6, lambda logits: sample_token(logits, sampling, generator)) == expected
    if kind == "decode":
        assert sel.counts.steps == 6


def test_a_prefill_and_static_steps_run_on_the_meta_device(tiny_model_dir):
    """No CPU tensor hides in a step: on the meta device any would fail to mix with the rest."""
    lm = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    lm.model.to("meta")
    lm.device = torch.device("meta")
    for kind in ("decode", None):
        visual = torch.randn(8 * lm.tokens_per_frame, lm.hidden_size, device="meta")
        embeds, span = build_embeds(lm, QUESTION, visual, None)
        seq = embeds.shape[1]
        sel = DecodeSelector(prune_from=2, span=span, keep=9) if kind else None
        cache = PrunedKVCache(lm.num_layers, seq + 9, sel)
        with torch.inference_mode():
            logits = run_layers(lm, embeds, torch.arange(seq, device="meta")[None], cache, sel)
            steps = StaticSteps(lm, cache, sel, seq, 2, graph=False)
            token = logits.argmax(dim=-1)
            for _ in range(3):
                token = steps(token).argmax(dim=-1)
        assert token.device.type == "meta" and token.shape == (1,)


def test_the_probe_sees_the_eager_loops_syncs(tiny_lm):
    """The detector is not blind: the eager DyCoke step reads the refresh decision on the host."""
    cache, sel, token, seq = _prefilled(tiny_lm, "decode")
    ops = step_syncs(EagerSteps(tiny_lm, cache, sel, seq), token, 2)
    # step 1: bool(refreshed), read once by the cache; step 2 also reads the similarity
    assert ops == ["is_nonzero", "item", "is_nonzero"]


def test_static_step_ignores_whatever_the_unused_capacity_held(tiny_lm):
    """The capacity after the prompt is attended under a mask; NaN left there must not leak."""
    results = []
    for poison in (False, True):
        cache, sel, token, seq = _prefilled(tiny_lm, "decode")
        with torch.inference_mode():  # (the buffers are inference tensors)
            for layer in cache.layers if poison else ():
                layer.keys[:, :, layer.length :] = float("nan")
                layer.values[:, :, layer.length :] = float("nan")
        steps = StaticSteps(tiny_lm, cache, sel, seq, 2, graph=False)
        with torch.inference_mode():
            logits = [steps(token).clone() for _ in range(3)]
        results.append(torch.stack(logits))
    assert not results[1].isnan().any()
    assert torch.equal(results[0], results[1])


def test_static_and_eager_logits_agree_step_by_step(tiny_lm):
    eager_cache, eager_sel, token, seq = _prefilled(tiny_lm, "decode")
    static_cache, static_sel, _, _ = _prefilled(tiny_lm, "decode")
    eager = EagerSteps(tiny_lm, eager_cache, eager_sel, seq)
    static = StaticSteps(tiny_lm, static_cache, static_sel, seq, 2, graph=False)
    with torch.inference_mode():
        for _ in range(5):
            want, got = eager(token), static(token)
            assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert torch.equal(static_sel.selection, eager_sel.selection)
            token = want.argmax(dim=-1)


@pytest.mark.parametrize("kind", [None, "prefill"])
def test_a_chunked_prefill_equals_the_whole_one(tiny_lm, kind):
    torch.manual_seed(3)
    visual = torch.randn(8 * tiny_lm.tokens_per_frame, tiny_lm.hidden_size)
    embeds, span = build_embeds(tiny_lm, QUESTION, visual, None)
    seq = embeds.shape[1]
    out = []
    for chunk in (None, 7, seq - 1):  # seq - 1 would leave a last chunk of one query: merged
        sel = PrefillSelector(prune_from=2, span=span, keep=9) if kind else None
        cache = PrunedKVCache(tiny_lm.num_layers, seq, reduced=(2, seq - 32 + 9) if kind else None)
        with torch.inference_mode():
            logits = run_layers(tiny_lm, embeds, torch.arange(seq)[None], cache, sel, chunk=chunk)
        out.append((logits, [layer.keys[:, :, : layer.length] for layer in cache.layers],
                    None if sel is None else sel.selection.tolist()))
    for logits, keys, selection in out[1:]:
        assert_close(logits, out[0][0], rtol=1e-5, atol=1e-5)
        for k, want in zip(keys, out[0][1]):
            assert_close(k, want, rtol=1e-5, atol=1e-5)
        assert selection == out[0][2]
    assert out[0][1][-1].shape[2] == (seq - 32 + 9 if kind else seq)


def test_greedy_is_the_argmax_on_the_device():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9]])
    token = sample_token(logits, SamplingOptions(), None)
    assert token.tolist() == [1] and token.dtype == torch.long


def test_sampling_follows_temperature_and_top_p():
    """Counts over 20000 seeded draws: top-p removes the tail, the rest keep their odds."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None]
    g = torch.Generator().manual_seed(0)
    opts = SamplingOptions(temperature=1.0, top_p=0.75, seed=0)
    draws = torch.cat([sample_token(logits, opts, g) for _ in range(20000)])
    counts = torch.bincount(draws, minlength=4).tolist()
    assert counts[2] == counts[3] == 0  # the mass before token 2 is 0.8 > 0.75
    assert abs(counts[0] / 20000 - 0.5 / 0.8) < 0.015 and abs(counts[1] / 20000 - 0.3 / 0.8) < 0.015
    hot = SamplingOptions(temperature=100.0, seed=0)
    flat = torch.bincount(torch.cat([sample_token(logits, hot, g) for _ in range(20000)]), minlength=4)
    assert (flat - 5000).abs().max() < 300  # a high temperature is almost uniform


def test_the_same_seed_gives_the_same_sampled_answer(tiny_lm, enc):
    sampling = SamplingOptions(max_new_tokens=12, ignore_eos=True, temperature=1.5, seed=11)
    first, again = (answer(tiny_lm, enc, QUESTION, CompressionOptions(), sampling).token_ids for _ in range(2))
    other = answer(tiny_lm, enc, QUESTION, CompressionOptions(),
                   SamplingOptions(max_new_tokens=12, ignore_eos=True, temperature=1.5, seed=12)).token_ids
    assert first == again and first != other


def test_static_decoding_refuses_an_offloaded_store(tiny_lm, enc, tiny_model_dir, clip_path, capsys, monkeypatch):
    from test_cli import run_cli

    from dycoke_cli.errors import UsageError

    # the library names its settings; the command line says its flags
    with pytest.raises(UsageError, match=r"^decode static reads the pruned entries on the device; "
                                         r"offload_pruned keeps them in host memory: use decode eager"):
        answer(tiny_lm, enc, QUESTION, CompressionOptions(offload_pruned=True),
               SamplingOptions(max_new_tokens=2, decode="static"))
    code, out, err = run_cli(["ask", str(clip_path), QUESTION, "--model", str(tiny_model_dir), "--frames", "8",
                              "--decode", "static", "--offload-pruned", "-q"], capsys, monkeypatch)
    assert (code, out, err) == (2, "", "dycoke: error: --decode static reads the pruned entries on the device; "
                                       "--offload-pruned keeps them in host memory: use --decode eager (or auto) "
                                       "with it\n")
    auto = answer(tiny_lm, enc, QUESTION, CompressionOptions(offload_pruned=True),
                  SamplingOptions(max_new_tokens=4, ignore_eos=True))
    assert auto.stats.decode_path == "eager" and auto.stats.kv_bytes.store_on_host


def test_offload_staging_gives_each_layer_one_contiguous_block(tiny_lm):
    """The host side of --offload-pruned's prefetch: each pruned layer's selected keys and values
    are one contiguous block of the staging buffer (what an asynchronous copy to the device
    needs), holding exactly that layer's selected store entries."""
    torch.manual_seed(0)
    visual = torch.randn(8 * tiny_lm.tokens_per_frame, tiny_lm.hidden_size)
    embeds, span = build_embeds(tiny_lm, QUESTION, visual, None)
    seq = embeds.shape[1]
    sel = DecodeSelector(prune_from=2, span=span, keep=9)
    cache = PrunedKVCache(tiny_lm.num_layers, seq + 4, sel, offload=True)
    with torch.inference_mode():
        token = run_layers(tiny_lm, embeds, torch.arange(seq)[None], cache, sel).argmax(dim=-1)
        EagerSteps(tiny_lm, cache, sel, seq)(token)
        staging = cache.block.stage()
    store, chosen = cache.block.store, sel.selection
    assert staging.shape[:2] == (tiny_lm.num_layers - 2, 2) and staging.shape[4] == 9
    for j in range(staging.shape[0]):
        assert staging[j].is_contiguous()
        assert torch.equal(staging[j], store[:, j].index_select(3, chosen))
