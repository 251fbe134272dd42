"""DyCoke's decode-time selection and FastV's cut, against references written plainly.

The reference decoder keeps transformers' own DynamicCache of every position and, at each
step: computes the probe layer's attention row from the full cache (the layer's own query
projection and rotary embedding, softmax over the keys, mean over heads); applies the rule
written out in Python (top-k, or a floor per frame then top-k of the rest; the refresh rule on
the cosine similarity); and runs the pruned layers under a boolean mask over the full cache.
Our loop must give the same tokens and logits over 40 steps in which refreshes and recalls
happen, for the paper's rule and for the default one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.testing import assert_close
from transformers import DynamicCache
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from dycoke_cli.compression.cache import PrunedKVCache
from dycoke_cli.compression.selectors import DecodeSelector, PrefillSelector
from dycoke_cli.decoding.layer_call import call_layer
from dycoke_cli.decoding.loop import EagerSteps, run_layers
from dycoke_cli.decoding.prompt import build_embeds
from dycoke_cli.decoding.static import StaticSteps
from dycoke_cli.options import FRAME_COVERAGE, CompressionOptions, Method, Selection

QUESTION = "describe the video."
SAMPLE = Path(__file__).resolve().parents[1] / "sample_videos" / "blue_cup_turns_yellow.mp4"
STEPS = 40
FRAMES = 8
PRUNE_FROM = 2


@pytest.fixture(scope="module")
def demo():
    """The trained demo model: its attention moves between frames as it answers (a random model's
    rows barely change from step to step, so no refresh rule would ever fire)."""
    from dycoke_cli.models.loader import load_model

    return load_model("demo", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def prompt(demo):
    """The caption prompt of the sample clip whose second colour top-k loses, after TTM."""
    from dycoke_cli.compression.baselines import plan_tokens
    from dycoke_cli.pipeline import encode_video

    enc = encode_video(demo, SAMPLE, FRAMES)
    plan = plan_tokens(enc, CompressionOptions(method=Method.dycoke).resolve(demo))
    embeds, span = build_embeds(demo, QUESTION, plan.tokens, enc.newline)
    return embeds, span, plan.index // enc.tokens_per_frame, plan.keep


def plain_rule(row: list[float], keep: int, frame_of: list[int], coverage: float) -> list[int]:
    """The selection rule, written out: each frame's ``floor(coverage * keep / frames)`` best
    positions (all of them in a smaller frame), then the best of the rest; ascending."""
    frames = sorted(set(frame_of))
    largest = max(frame_of.count(f) for f in frames)
    per_frame = min(int(coverage * keep // len(frames)), largest)
    chosen: set[int] = set()
    for f in frames:
        mine = sorted((i for i in range(len(row)) if frame_of[i] == f), key=lambda i: -row[i])
        chosen.update(mine[:per_frame])
    rest = sorted((i for i in range(len(row)) if i not in chosen), key=lambda i: -row[i])
    chosen.update(rest[: keep - len(chosen)])
    return sorted(chosen)


def probe_row(layer, hidden_in, cos, sin, keys) -> torch.Tensor:
    """The current token's attention over ``keys`` [1, KVH, S, d] at ``layer``, mean over heads."""
    attn = layer.self_attn
    heads, dim = attn.config.num_attention_heads, attn.head_dim
    q = attn.q_proj(layer.input_layernorm(hidden_in)).view(1, 1, heads, dim).transpose(1, 2)
    q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    k = keys.repeat_interleave(heads // keys.shape[1], dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * attn.scaling  # [1, H, 1, S]
    return scores.softmax(dim=-1).mean(dim=(0, 1, 2))


def reference_decode(lm, embeds, span, keep, threshold, frame_of, coverage):
    """Tokens, logits per step, refreshes and recalls of DyCoke decoding, computed plainly."""
    dec, seq = lm.decoder, embeds.shape[1]
    start, end = span
    cache = DynamicCache(config=lm.model.config.text_config)
    with torch.inference_mode():
        token = int(run_layers(lm, embeds, torch.arange(seq)[None], cache).argmax())
        tokens, logits, selection, reference = [], [], None, None
        refreshes = recalled = 0
        for step in range(STEPS):
            pos = torch.tensor([[seq + step]])
            hidden = dec.embed_tokens(torch.tensor([[token]]))
            cos, sin = dec.rotary_emb(hidden, pos)
            mask = None
            for i, layer in enumerate(dec.layers):
                hidden_in = hidden
                hidden = call_layer(layer, hidden, cache, attention_mask=mask, position_embeddings=(cos, sin),
                                    position_ids=pos)
                if i == PRUNE_FROM - 1:  # the probe: layer L - 1 sees the full cache
                    row = probe_row(layer, hidden_in, cos, sin, cache.layers[i].keys)[start:end]
                    if selection is None or float(torch.nn.functional.cosine_similarity(row, reference, dim=0)) \
                            < threshold:
                        new = plain_rule(row.tolist(), keep, frame_of.tolist(), coverage)
                        if selection is not None:
                            refreshes += 1
                            recalled += len(set(new) - set(selection))
                        selection, reference = new, row
                    mask = torch.ones(1, 1, 1, seq + step + 1, dtype=torch.bool)
                    mask[..., [start + j for j in range(end - start) if j not in set(selection)]] = False
            out = lm.lm_head(dec.norm(hidden))[:, -1].float()
            logits.append(out)
            token = int(out.argmax())
            tokens.append(token)
    return tokens, torch.cat(logits), refreshes, recalled


def our_decode(lm, embeds, span, keep, threshold, frame_of, coverage, static: bool):
    seq = embeds.shape[1]
    sel = DecodeSelector(PRUNE_FROM, span, keep, threshold, frame_of=frame_of, coverage=coverage)
    cache = PrunedKVCache(lm.num_layers, seq + STEPS + 1, sel)
    with torch.inference_mode():
        token = run_layers(lm, embeds, torch.arange(seq)[None], cache, sel).argmax(dim=-1)
        steps = (StaticSteps(lm, cache, sel, seq, 2, graph=False) if static else EagerSteps(lm, cache, sel, seq))
        tokens, logits = [], []
        for _ in range(STEPS):
            out = steps(token)
            logits.append(out.clone())
            token = out.argmax(dim=-1)
            tokens.append(int(token))
    return tokens, torch.cat(logits), sel.counts


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("coverage", [0.0, FRAME_COVERAGE], ids=["paper-topk", "coverage"])
def test_dycoke_decoding_equals_the_plain_reference(demo, prompt, coverage, static):
    embeds, span, frame_of, keep = prompt
    threshold = 0.1  # the demo's rows move: some steps re-select, others keep the selection
    want_tokens, want_logits, refreshes, recalled = reference_decode(demo, embeds, span, keep, threshold,
                                                                     frame_of, coverage)
    tokens, logits, counts = our_decode(demo, embeds, span, keep, threshold, frame_of, coverage, static)
    assert refreshes >= 3 and recalled >= 3 and STEPS - 1 - refreshes >= 3  # the rule both ways
    assert (counts.steps, counts.refreshes, counts.recalled) == (STEPS, refreshes, recalled)
    assert tokens == want_tokens
    assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)


def test_the_coverage_rule_keeps_every_frame_and_topk_need_not():
    torch.manual_seed(1)
    frame_of = torch.arange(64) // 8
    row = torch.rand(64) + (frame_of == 3) * 10  # one frame draws all the attention
    from dycoke_cli.compression.selectors import BalancedTopk, ascending_topk

    topk = ascending_topk(row, 16).tolist()
    covered = BalancedTopk(16, frame_of, FRAME_COVERAGE)(row).tolist()
    assert {int(frame_of[i]) for i in topk} == {3, *{int(frame_of[i]) for i in topk}} and len(set(
        int(frame_of[i]) for i in topk)) < 8
    assert sorted({int(frame_of[i]) for i in covered}) == list(range(8))
    assert covered == plain_rule(row.tolist(), 16, frame_of.tolist(), FRAME_COVERAGE)
    assert topk == plain_rule(row.tolist(), 16, frame_of.tolist(), 0.0)


def test_fastv_keeps_the_top_k_of_the_last_querys_attention_at_its_layer(demo, prompt):
    embeds, span, _, _ = prompt
    seq, start, end = embeds.shape[1], *span
    sel = PrefillSelector(prune_from=2, span=span, keep=12)
    with torch.inference_mode():
        run_layers(demo, embeds, torch.arange(seq)[None],
                   PrunedKVCache(demo.num_layers, seq, None, reduced=(2, seq - (end - start) + 12)), sel)
        # plainly: the whole prompt through layer 0, then layer 1's last query over all its keys
        dec, cache = demo.decoder, DynamicCache(config=demo.model.config.text_config)
        cos, sin = dec.rotary_emb(embeds, torch.arange(seq)[None])
        hidden = call_layer(dec.layers[0], embeds, cache, position_embeddings=(cos, sin),
                            position_ids=torch.arange(seq)[None])
        call_layer(dec.layers[1], hidden, cache, position_embeddings=(cos, sin), position_ids=torch.arange(seq)[None])
        row = probe_row(dec.layers[1], hidden[:, -1:], cos[:, -1:], sin[:, -1:], cache.layers[1].keys)[start:end]
    want = sorted(sorted(range(end - start), key=lambda i: -float(row[i]))[:12])
    assert sel.selection.tolist() == want


# -- every flag reaches the code that uses it ---------------------------------------------------


def _answer_counts(lm, **opts):
    from dycoke_cli.options import SamplingOptions
    from dycoke_cli.pipeline import answer, encode_video

    enc = encode_video(lm, SAMPLE, FRAMES)
    r = answer(lm, enc, QUESTION, CompressionOptions(method=Method.dycoke, **opts),
               SamplingOptions(max_new_tokens=24, ignore_eos=True))
    return r.stats.selection


def test_refresh_threshold_reaches_the_rule(demo):
    never = _answer_counts(demo, refresh_threshold=0.0)
    always = _answer_counts(demo, refresh_threshold=1.0)
    assert (never.selections, never.refreshes) == (1, 0)
    assert always.refreshes == 22 and always.selections == 23  # every step after the first re-selects


def test_selection_and_frame_coverage_reach_the_rule(demo, prompt):
    embeds, span, frame_of, keep = prompt
    assert CompressionOptions(method=Method.dycoke).resolve(demo).coverage == FRAME_COVERAGE
    resolved = {s: CompressionOptions(method=Method.dycoke, selection=s).resolve(demo) for s in Selection}
    assert (resolved[Selection.topk].coverage, resolved[Selection.coverage].coverage) == (0.0, FRAME_COVERAGE)
    assert CompressionOptions(method=Method.dycoke, frame_coverage=1.0).resolve(demo).coverage == 1.0
    chosen = {}
    for coverage in (0.0, FRAME_COVERAGE, 1.0):
        sel = DecodeSelector(PRUNE_FROM, span, keep, frame_of=frame_of, coverage=coverage)
        cache = PrunedKVCache(demo.num_layers, embeds.shape[1] + 2, sel)
        with torch.inference_mode():
            token = run_layers(demo, embeds, torch.arange(embeds.shape[1])[None], cache, sel).argmax(dim=-1)
            EagerSteps(demo, cache, sel, embeds.shape[1])(token)
        chosen[coverage] = set(sel.selection.tolist())
    frames = {c: {int(frame_of[i]) for i in chosen[c]} for c in chosen}
    assert len(frames[0.0]) < 8 and len(frames[FRAME_COVERAGE]) == len(frames[1.0]) == 8
    assert len(chosen[0.0] - chosen[FRAME_COVERAGE]) >= 1 and len(chosen[FRAME_COVERAGE] - chosen[1.0]) >= 1


def test_the_probe_sits_at_layer_l_minus_1():
    for layer in (1, 2, 3):
        sel = DecodeSelector(layer, (5, 37), 8)
        assert (sel.probe_layer, sel.prune_from) == (layer - 1, layer)


def test_the_sample_clip_is_captioned_in_full_by_default(demo):
    """The clip of issue 21, at the model's own frame count: DyCoke's default gives the
    uncompressed caption. (The demo model of 2026-12-07 no longer loses it with the paper's
    top-k either: the frame-dropping step is shown above, on the selection itself.)"""
    from dycoke_cli.session import ask

    default = ask(demo, SAMPLE, QUESTION).text
    uncompressed = ask(demo, SAMPLE, QUESTION, compression=CompressionOptions(method=Method.none)).text
    assert (default, uncompressed) == ("a blue cup moves right and turns yellow",) * 2
