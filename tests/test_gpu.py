"""The CUDA side of the decoding loop (skipped without CUDA; `pytest -m gpu` on a GPU box):
the CUDA graph gives the eager loop's tokens, the pruned cache equals the masked full cache,
a decoding step never waits on the host, and --offload-pruned really moves the store off the
accelerator. tests/test_static_decode.py proves the same logic on the CPU."""

from __future__ import annotations

from dataclasses import astuple

import pytest
import torch
from torch.testing import assert_close

from dycoke_cli.compression.cache import PrunedKVCache
from dycoke_cli.compression.selectors import DecodeSelector
from dycoke_cli.decoding.layer_call import call_layer
from dycoke_cli.decoding.loop import run_layers, sample_token
from dycoke_cli.decoding.prompt import build_embeds
from dycoke_cli.decoding.static import StaticSteps
from dycoke_cli.models.loader import load_model
from dycoke_cli.options import CompressionOptions, Method, SamplingOptions
from dycoke_cli.pipeline import answer, encode_video

pytestmark = pytest.mark.gpu
QUESTION = "what color is the cup?"


@pytest.fixture(scope="module")
def cuda_lm(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cuda", dtype="float32")


@pytest.fixture(scope="module")
def cuda_enc(cuda_lm, clip_path):
    return encode_video(cuda_lm, clip_path, 8)


@pytest.mark.parametrize("method", [Method.dycoke, Method.none, Method.fastv])
@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "top_p": 0.8, "seed": 5}])
def test_cuda_graph_gives_the_eager_tokens(cuda_lm, cuda_enc, method, sampling):
    runs = [answer(cuda_lm, cuda_enc, QUESTION, CompressionOptions(method=method),
                   SamplingOptions(max_new_tokens=24, ignore_eos=True, decode=d, **sampling))
            for d in ("eager", "auto")]
    assert [r.stats.decode_path for r in runs] == ["eager", "cuda-graph"], runs[1].stats.decode_path_note
    assert runs[1].token_ids == runs[0].token_ids and len(runs[1].token_ids) == 24
    if method == Method.dycoke:
        assert runs[1].stats.selection.steps == runs[0].stats.selection.steps == 23
        assert runs[1].stats.selection.refreshes == runs[0].stats.selection.refreshes


def _prefilled(lm, keep: int = 9, offload: bool = False):
    torch.manual_seed(0)
    visual = torch.randn(8 * lm.tokens_per_frame, lm.hidden_size, device="cuda")
    embeds, span = build_embeds(lm, QUESTION, visual, None)
    seq = embeds.shape[1]
    sel = DecodeSelector(prune_from=2, span=span, keep=keep)
    cache = PrunedKVCache(lm.num_layers, seq + 12, sel, offload=offload)
    with torch.inference_mode():
        token = run_layers(lm, embeds, torch.arange(seq, device="cuda")[None], cache, sel).argmax(dim=-1)
    return embeds, span, cache, sel, token


def test_pruned_cache_logits_equal_the_masked_full_cache_on_cuda(cuda_lm):
    embeds, span, cache, sel, token = _prefilled(cuda_lm)
    seq = embeds.shape[1]
    steps = StaticSteps(cuda_lm, cache, sel, seq, 2, graph=False)
    with torch.inference_mode():
        got = steps(token).clone()
        kept = set((sel.selection + span[0]).tolist())
        full = PrunedKVCache(cuda_lm.num_layers, seq + 1)
        run_layers(cuda_lm, embeds, torch.arange(seq, device="cuda")[None], full)
        dec = cuda_lm.decoder
        hidden = dec.embed_tokens(token.view(1, 1))
        pos = torch.tensor([[seq]], device="cuda")
        cos_sin = dec.rotary_emb(hidden, pos)
        mask = torch.ones(1, 1, 1, seq + 1, dtype=torch.bool, device="cuda")
        mask[..., [p for p in range(*span) if p not in kept]] = False
        for i, layer in enumerate(dec.layers):
            hidden = call_layer(layer, hidden, full, attention_mask=mask if i >= 2 else None,
                                position_embeddings=cos_sin, position_ids=pos)
        want = cuda_lm.lm_head(dec.norm(hidden))[:, -1].float()
    assert len(kept) == 9
    assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("graph", [True, False])
def test_a_decoding_step_never_waits_on_the_host(cuda_lm, graph):
    _, _, cache, sel, token = _prefilled(cuda_lm)
    steps = StaticSteps(cuda_lm, cache, sel, cache.layers[0].length, 2, graph=graph)
    opts = SamplingOptions(temperature=0.8, top_p=0.9, seed=3)
    generator = torch.Generator(device="cuda").manual_seed(3)
    with torch.inference_mode():
        for _ in range(3 if graph else 0):  # warm-up and capture synchronise by design
            token = sample_token(steps(token), opts, generator)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(6):
                token = sample_token(steps(token), opts, generator)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert steps.path == ("cuda-graph" if graph else "static")
    assert sel.counts.steps == (9 if graph else 6)


def test_offload_moves_the_store_off_the_accelerator(cuda_lm, cuda_enc):
    torch.cuda.synchronize()
    held = {}
    for offload in (False, True):
        before = torch.cuda.memory_allocated()
        _, _, cache, sel, _ = _prefilled(cuda_lm, offload=offload)
        torch.cuda.synchronize()
        held[offload] = (torch.cuda.memory_allocated() - before, cache.kv_bytes())
        del cache, sel
    store = held[True][1].store
    assert store > 0 and held[True][1].saved_on_device == store
    assert held[False][0] - held[True][0] >= store
    a = answer(cuda_lm, cuda_enc, QUESTION, CompressionOptions(offload_pruned=True),
               SamplingOptions(max_new_tokens=8, ignore_eos=True))
    plain = answer(cuda_lm, cuda_enc, QUESTION, CompressionOptions(), SamplingOptions(max_new_tokens=8,
                                                                                       ignore_eos=True))
    assert a.stats.decode_path == "eager" and a.token_ids == plain.token_ids
    slot = a.stats.kv_bytes.working  # moved at least one slot per pruned layer (the first selection)
    assert a.stats.kv_bytes.moved_to_device > 0 and a.stats.kv_bytes.store_on_host
    assert a.stats.kv_bytes.moved_to_device <= a.stats.selection.selections * slot


@pytest.mark.parametrize("method", [Method.dycoke, Method.none])
def test_a_session_captures_one_graph_and_replays_it(cuda_lm, clip_path, method):
    from dycoke_cli.session import Session

    opts = CompressionOptions(method=method)
    graphed, eager = Session(cuda_lm, clip_path, frames=8, compression=opts), Session(cuda_lm, clip_path, frames=8,
                                                                                        compression=opts)
    for i, q in enumerate([QUESTION, "which way does the cup move?", "describe the video."]):
        a = graphed.ask(q, SamplingOptions(max_new_tokens=20, ignore_eos=True, decode="static"))
        b = eager.ask(q, SamplingOptions(max_new_tokens=20, ignore_eos=True, decode="eager"))
        assert a.token_ids == b.token_ids, q
        assert (a.stats.decode_path, a.stats.decode_step_reused) == ("cuda-graph", i > 0)
        assert (a.stats.timings.decode_setup > 0) == (i == 0)  # warm-up and capture: the first answer only
    assert graphed.kept.steps.answers == 3


def _recording(monkeypatch):
    """Per answer, the logits of each decoding step as the loop gets them (static and eager steps'
    own __call__, wrapped to keep a copy): returns the list they are appended to."""
    from dycoke_cli.decoding.loop import EagerSteps

    seen: list[torch.Tensor] = []
    for cls in (StaticSteps, EagerSteps):
        real = cls.__call__

        def call(self, *args, _real=real, **kwargs):
            logits = _real(self, *args, **kwargs)
            seen.append(logits.clone())  # in stream order: the next replay overwrites the step's own
            return logits

        monkeypatch.setattr(cls, "__call__", call)
    return seen


@pytest.mark.parametrize("method", [Method.dycoke, Method.none])
def test_replayed_answers_equal_eager_and_freshly_captured_ones(monkeypatch, method):
    """The demo model in float32, greedy answers that end at EOS: each answer a session replays
    from its kept graph equals, in tokens, selection counters and per-step logits, the same
    question asked of an eager session and of a fresh session (a graph captured for it)."""
    from pathlib import Path

    from dycoke_cli.session import Session

    clip = Path(__file__).resolve().parents[1] / "sample_videos" / "red_cup.mp4"
    demo = load_model("demo", device="cuda", dtype="float32")
    opts = CompressionOptions(method=method)
    seen = _recording(monkeypatch)
    replayed, eager = Session(demo, clip, compression=opts), Session(demo, clip, compression=opts)
    questions = ["describe the video.", "what color is the cup?", "which way does the cup move?"]
    for i, question in enumerate(questions):
        runs = {}
        for name, session, decode in (("replayed", replayed, "auto"), ("eager", eager, "eager"),
                                      ("fresh", Session(demo, clip, compression=opts), "auto")):
            seen.clear()
            answer_ = session.ask(question, SamplingOptions(decode=decode))
            runs[name] = (answer_, [t.cpu() for t in seen])
        a, logits = runs["replayed"]
        assert (a.stats.decode_path, a.stats.decode_step_reused) == ("cuda-graph", i > 0), a.stats.decode_path_note
        assert runs["fresh"][0].stats.decode_step_reused is False
        assert 0 < len(a.token_ids) < 256  # it ended at EOS
        steps = len(a.token_ids)  # decoding steps up to the EOS (a static answer queues one more)
        for other in ("eager", "fresh"):
            b, other_logits = runs[other]
            assert a.token_ids == b.token_ids, (question, other)
            if method == Method.dycoke:
                assert astuple(a.stats.selection)[:4] == astuple(b.stats.selection)[:4], (question, other)
            assert len(logits) >= steps and len(other_logits) >= steps
            assert_close(torch.stack(logits[:steps]), torch.stack(other_logits[:steps]), rtol=1e-4, atol=1e-4)


def test_a_captured_run_if_runs_only_where_the_device_flag_is_set():
    """The pruned slot's gather in a captured step sits in a conditional node (cache.run_if): at
    each replay the device reads the flag; the host reads nothing."""
    from dycoke_cli.compression.cache import run_if

    if not hasattr(torch.cuda.CUDAGraph, "get_currently_capturing_graph"):
        pytest.skip("this torch has no CUDA graph conditional nodes")
    flag = torch.zeros((), dtype=torch.bool, device="cuda")
    total = torch.zeros(4, device="cuda")
    one = torch.ones(4, device="cuda")
    total.add_(one)  # warm the kernel up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_if(flag, lambda: total.add_(one))
    total.zero_()
    for value in (False, True, True, False, True):
        flag.fill_(value)
        graph.replay()
    torch.cuda.synchronize()
    assert total.tolist() == [3.0] * 4


def test_memory_the_caching_allocator_holds_unused_counts_as_free():
    """An earlier answer's activations stay reserved by torch's allocator: the memory bound of
    --frames (frame_count) must see them as free, or a second answer could be refused a count
    the first was given."""
    from dycoke_cli.memory import free_bytes

    device = torch.device("cuda")
    torch.cuda.empty_cache()
    before = free_bytes(device)
    block = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    assert free_bytes(device) <= before - 256 * 2**20 + 2**20
    del block  # back to the allocator's cache, not to the driver
    assert torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device) >= 256 * 2**20
    assert abs(free_bytes(device) - before) <= 2**20
