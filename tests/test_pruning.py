import torch
from test_selection import plain_rule
from torch.testing import assert_close

from dycoke_cli.compression.cache import PrunedKVCache, _PrunedLayer
from dycoke_cli.compression.selectors import BalancedTopk, DecodeSelector, last_query_attention
from dycoke_cli.decoding.layer_call import call_layer
from dycoke_cli.decoding.loop import generate_tokens, run_layers
from dycoke_cli.decoding.prompt import build_embeds
from dycoke_cli.options import SamplingOptions


def row(peaks, total=10, base=0.01):
    r = torch.full((total,), base)
    for p in peaks:
        r[p] = 1.0
    return r


def test_refresh_rule_reuses_selection_while_attention_is_stable():
    sel = DecodeSelector(prune_from=2, span=(3, 13), keep=3, threshold=0.9)
    sel.observe_row(row([1, 4, 7]))
    assert sel.selection.tolist() == [1, 4, 7]
    assert (sel.counts.selections, sel.counts.refreshes, bool(sel.refreshed)) == (1, 0, True)
    # similar attention (cos >= 0.9) with a different top-3: the selection is reused
    stable = row([1, 4, 7]) + 0.2 * row([2], base=0.0)
    assert torch.nn.functional.cosine_similarity(stable, row([1, 4, 7]), dim=0) >= 0.9
    sel.observe_row(stable)
    assert sel.selection.tolist() == [1, 4, 7]
    assert (sel.counts.selections, sel.counts.refreshes, bool(sel.refreshed)) == (1, 0, False)


def test_shift_refreshes_and_recall_brings_pruned_entries_back():
    sel = DecodeSelector(prune_from=2, span=(3, 13), keep=3, threshold=0.9)
    sel.observe_row(row([1, 4, 7]))
    sel.observe_row(row([0, 4, 9]))  # attention moved: 0 and 9 were pruned, now come back
    assert sel.selection.tolist() == [0, 4, 9]
    assert (sel.counts.refreshes, sel.counts.recalled) == (1, 2)
    sel.observe_row(row([1, 4, 7]))  # back again: 1 and 7 recalled
    assert sel.selection.tolist() == [1, 4, 7]
    assert (sel.counts.selections, sel.counts.refreshes, sel.counts.recalled, sel.counts.steps) == (3, 2, 4, 3)


def test_pruned_layer_serves_text_selected_visual_and_new_tokens():
    sel = DecodeSelector(prune_from=1, span=(2, 8), keep=2)
    cache = PrunedKVCache(2, capacity=8 + 3, selector=sel, offload=True)
    layer = cache.layers[1]
    assert isinstance(layer, _PrunedLayer) and not isinstance(cache.layers[0], _PrunedLayer)
    keys = torch.arange(8, dtype=torch.float32).view(1, 1, 8, 1).repeat(1, 2, 1, 3)
    k, v = cache.update(keys, -keys, 1)
    assert torch.equal(k, keys)  # prefill sees everything
    sel.observe_row(row([1, 4], total=6))
    new = torch.full((1, 2, 1, 3), 100.0)
    k, v = cache.update(new, -new, 1)
    # text before (0, 1), visual offsets 1 and 4 (positions 3 and 6), newline/after (none), new token
    assert k[0, 0, :, 0].tolist() == [0, 1, 3, 6, 100]
    assert torch.equal(v, -k)
    sel.observe_row(row([0, 5], total=6))  # a shift: positions 2 and 7 come back
    k, _ = cache.update(new + 1, -new - 1, 1)
    assert k[0, 0, :, 0].tolist() == [0, 1, 2, 7, 100, 101]
    assert layer.get_seq_length() == 10
    assert layer.store_k.device.type == "cpu"


def test_last_query_attention_matches_softmax_with_grouped_heads():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 1, 8, generator=g)
    k = torch.randn(1, 2, 5, 8, generator=g)
    got = last_query_attention(q, k, 8**-0.5)
    full_k = k.repeat_interleave(2, dim=1)
    want = torch.softmax((q @ full_k.transpose(-1, -2)) * 8**-0.5, dim=-1).mean(dim=(0, 1, 2))
    assert_close(got, want)


def _reference_step_logits(lm, embeds, token, pruned_positions, prune_from):
    """Full cache, pruned positions masked out (bool mask) in layers >= prune_from."""
    seq = embeds.shape[1]
    cache = PrunedKVCache(lm.num_layers, seq + 2)
    with torch.inference_mode():
        run_layers(lm, embeds, torch.arange(seq).unsqueeze(0), cache)
        decoder = lm.decoder
        hidden = decoder.embed_tokens(torch.tensor([[token]]))
        pos = torch.tensor([[seq]])
        cos_sin = decoder.rotary_emb(hidden, pos)
        mask = torch.ones(1, 1, 1, seq + 1, dtype=torch.bool)
        mask[..., pruned_positions] = False
        for i, layer in enumerate(decoder.layers):
            hidden = call_layer(layer, hidden, cache, attention_mask=mask if i >= prune_from else None,
                                position_embeddings=cos_sin, position_ids=pos)
        return lm.lm_head(decoder.norm(hidden))[:, -1].float()


def test_pruned_cache_logits_equal_masked_full_cache(tiny_lm):
    torch.manual_seed(0)
    t, n = 8, tiny_lm.tokens_per_frame
    visual = torch.randn(t * n, tiny_lm.hidden_size)
    embeds, span = build_embeds(tiny_lm, "what color is the cup?", visual, None)
    seq = embeds.shape[1]
    sel = DecodeSelector(prune_from=2, span=span, keep=9)
    cache = PrunedKVCache(tiny_lm.num_layers, seq + 2, sel)
    with torch.inference_mode():
        first = int(run_layers(tiny_lm, embeds, torch.arange(seq).unsqueeze(0), cache, sel).argmax())
        x = tiny_lm.decoder.embed_tokens(torch.tensor([[first]]))
        got = run_layers(tiny_lm, x, torch.tensor([[seq]]), cache, sel)
    assert sel.selection is not None and len(sel.selection) == 9
    kept = set((sel.selection + span[0]).tolist())
    pruned = [p for p in range(*span) if p not in kept]
    assert len(pruned) == t * n - 9
    want = _reference_step_logits(tiny_lm, embeds, first, pruned, prune_from=2)
    assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and pruning changed something: the unmasked full-cache logits differ
    unmasked = _reference_step_logits(tiny_lm, embeds, first, [], prune_from=2)
    assert not torch.allclose(got, unmasked, atol=1e-6)


def test_keep_everything_gives_exactly_the_uncompressed_tokens(tiny_lm):
    torch.manual_seed(1)
    visual = torch.randn(32, tiny_lm.hidden_size)
    embeds, span = build_embeds(tiny_lm, "describe the video.", visual, None)
    seq = embeds.shape[1]
    opts = SamplingOptions(max_new_tokens=12)
    plain = list(generate_tokens(tiny_lm, embeds, PrunedKVCache(tiny_lm.num_layers, seq + 13), opts))
    sel = DecodeSelector(prune_from=1, span=span, keep=32)
    pruned = list(generate_tokens(tiny_lm, embeds, PrunedKVCache(tiny_lm.num_layers, seq + 13, sel), opts, sel))
    assert pruned == plain
    assert len(plain) > 0


def test_balanced_topk_keeps_every_frame_in_view():
    frame_of = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    r = torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 0.3, 0.2, 0.1])  # frame 2 barely attended
    assert BalancedTopk(3, frame_of, 0.0)(r).tolist() == [0, 1, 2]  # plain top-k drops frames 1 and 2
    assert BalancedTopk(3, frame_of, 1.0)(r).tolist() == [0, 3, 6]  # one per frame
    assert BalancedTopk(6, frame_of, 0.5)(r).tolist() == [0, 1, 2, 3, 4, 6]  # 1 each, then the best 3 left


def test_selector_with_coverage():
    sel = DecodeSelector(prune_from=1, span=(0, 6), keep=2, frame_of=torch.tensor([0, 0, 0, 1, 1, 1]), coverage=1.0)
    sel.observe_row(torch.tensor([5.0, 4.0, 3.0, 0.1, 0.3, 0.2]))
    assert sel.selection.tolist() == [0, 4]


def test_balanced_topk_matches_the_rule_on_uneven_frames():
    g = torch.Generator().manual_seed(4)
    frame_of = torch.tensor([0] * 7 + [1] * 2 + [2] * 5 + [3] * 1 + [4] * 6)  # TTM leaves frames uneven
    for keep, coverage in [(6, 1.0), (10, 0.5), (15, 1.0), (3, 0.0), (21, 0.7)]:
        for _ in range(20):
            r = torch.rand(21, generator=g)
            assert BalancedTopk(keep, frame_of, coverage)(r).tolist() == \
                plain_rule(r.tolist(), keep, frame_of.tolist(), coverage), (keep, coverage)
