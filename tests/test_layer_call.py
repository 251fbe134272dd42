"""The cache reaches every decoder layer under the name the installed transformers takes.

A cache keyword a layer does not name falls into its ``**kwargs``: the layer then runs with no
cache, writes no keys and no error says so. These tests fail loudly in that case. CI runs them at
both ends of the supported transformers range (.ci/run).
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_WORDS
from torch import nn

from dycoke_cli.compression.baselines import plan_tokens
from dycoke_cli.compression.cache import PrunedKVCache
from dycoke_cli.compression.selectors import DecodeSelector
from dycoke_cli.decoding.layer_call import call_layer
from dycoke_cli.decoding.loop import batch_positions, pick_steps, run_layers
from dycoke_cli.decoding.prompt import build_embeds, prefill_positions
from dycoke_cli.errors import ModelError
from dycoke_cli.models.loader import load_model
from dycoke_cli.options import CompressionOptions, Method, SamplingOptions
from dycoke_cli.pipeline import encode_video

QUESTION = "what color is the cup?"


@pytest.fixture(scope="module")
def qwen_lm(tmp_path_factory):
    from dycoke_cli.testing.tiny import build_qwen2_5_vl, build_word_tokenizer, save_qwen_checkpoint

    tok = build_word_tokenizer(TINY_WORDS, family="qwen2_5_vl")
    folder = save_qwen_checkpoint(build_qwen2_5_vl(tok), tok, tmp_path_factory.mktemp("qwen") / "model",
                                  dycoke_defaults={"prune_layer": 2})
    return load_model(str(folder), device="cpu", dtype="float32")


def _prefill_and_one_step(lm, clip, decode: str, selector_keep: int | None = None):
    """Prefill the question about ``clip``, then one decoding step; returns the cache, the
    prompt length and the selector (None without pruning)."""
    enc = encode_video(lm, clip, 4)
    opts = CompressionOptions(method=Method.none).resolve(lm)
    plan = plan_tokens(enc, opts)
    embeds, span = build_embeds(lm, QUESTION, plan.tokens, enc.newline)
    seq = embeds.shape[1]
    positions = prefill_positions(lm, span, plan, enc, seq, opts.positions)
    positions = batch_positions(torch.arange(seq) if positions is None else positions)
    sel = None if selector_keep is None else DecodeSelector(prune_from=2, span=span, keep=selector_keep)
    cache = PrunedKVCache(lm.num_layers, seq + 4, sel)
    with torch.inference_mode():
        token = run_layers(lm, embeds, positions, cache, sel).argmax(dim=-1)
        steps = pick_steps(lm, cache, sel, SamplingOptions(decode=decode), int(positions.max()) + 1, positions.dim())
        steps(token)
    return cache, seq, sel


def _written(layer) -> int:
    """Positions holding keys in a static layer: its buffer is zeroed past the prompt, and a
    written key of a random model is never all zeros."""
    return int((layer.keys[0].abs().sum(dim=(0, 2)) > 0).sum())


@pytest.fixture(params=["llava", "qwen"])
def family(request, tiny_lm, qwen_lm):
    return tiny_lm if request.param == "llava" else qwen_lm


def test_eager_prefill_and_step_write_every_layer(family, clip_path):
    cache, seq, _ = _prefill_and_one_step(family, clip_path, "eager")
    assert [layer.get_seq_length() for layer in cache.layers] == [seq + 1] * family.num_layers


def test_static_prefill_and_step_write_every_layer(family, clip_path):
    cache, seq, _ = _prefill_and_one_step(family, clip_path, "static")
    assert [_written(layer) for layer in cache.layers] == [seq + 1] * family.num_layers


def test_pruned_layers_hold_the_text_the_slot_and_the_new_token(family, clip_path):
    cache, seq, sel = _prefill_and_one_step(family, clip_path, "eager", selector_keep=5)
    held = [layer.length for layer in cache.layers]
    visual = sel.end - sel.start
    assert held == [seq + 1] * 2 + [seq + 1 - visual + 5] * (family.num_layers - 2)
    assert [layer.get_seq_length() for layer in cache.layers] == [seq + 1] * family.num_layers


class _NewNameLayer(nn.Module):
    """A layer as transformers 5.40 will declare it: ``cache`` only, anything else swallowed."""

    def forward(self, hidden_states, cache=None, use_cache=False, **kwargs):
        self.got = cache
        return hidden_states


class _OldNameLayer(nn.Module):
    """A layer as transformers 5.23 and 5.24 declare it."""

    def forward(self, hidden_states, past_key_values=None, use_cache=False, **kwargs):
        self.got = past_key_values
        return hidden_states


class _NoCacheLayer(nn.Module):
    def forward(self, hidden_states, **kwargs):
        return hidden_states


@pytest.mark.parametrize("cls", [_NewNameLayer, _OldNameLayer])
def test_the_cache_goes_under_the_name_the_layer_declares(cls):
    layer, cache = cls(), object()
    call_layer(layer, torch.zeros(1), cache)
    assert layer.got is cache


def test_a_layer_that_takes_no_cache_is_refused_by_name():
    with pytest.raises(ModelError) as err:
        call_layer(_NoCacheLayer(), torch.zeros(1), object())
    assert str(err.value) == ("_NoCacheLayer.forward takes no cache argument (looked for cache or "
                              "past_key_values); this transformers version is not supported")
