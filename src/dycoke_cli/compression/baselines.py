"""The token plan of every method: DyCoke's TTM, and the baselines at the same visual budget.

DyCoke's pruned layers attend to ``visual_budget`` visual tokens (TTM's count times 1 - P);
FastV keeps that many from its cut on, random keeps that many random tokens, and ``frames``
keeps about that many tokens as uniformly fewer whole frames.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..options import FASTV_LAYER, CompressionOptions, Method
from ..values import EncodedVideo, TokenPlan
from .ttm import kept_per_frame, merged_count, temporal_merge


def visual_budget(frames: int, per_frame: int, k: float, p: float) -> int:
    """Visual tokens DyCoke's pruned layers attend to: TTM's count times (1 - P)."""
    merged = merged_count(frames, per_frame, k)
    return max(1, kept_per_frame(merged, p)) if p > 0 else merged


def plan_tokens(enc: EncodedVideo, opts: CompressionOptions, fastv_layer: int = FASTV_LAYER) -> TokenPlan:
    """Apply the method's selection before the language model; say what is pruned later. Every
    DeepStack level (Qwen3-VL) keeps the same tokens, in the same order. ``fastv_layer``: FastV's
    K (a hybrid stack's: after its first full-attention layer, ``LoadedModel.fastv_layer``)."""
    plan = _plan(enc, opts, fastv_layer)
    if not enc.deepstack:
        return plan
    t, n = enc.frames, enc.tokens_per_frame
    levels = tuple(level.reshape(t * n, -1)[plan.index] for level in enc.deepstack)
    return replace(plan, deepstack=levels)


def _plan(enc: EncodedVideo, opts: CompressionOptions, fastv_layer: int) -> TokenPlan:
    t, n = enc.frames, enc.tokens_per_frame
    flat = enc.features.reshape(t * n, -1)
    everything = torch.arange(t * n, device=flat.device)
    budget = visual_budget(t, n, opts.ttm_k, opts.prune_p)
    method = Method(opts.method)
    if method == Method.none:
        return TokenPlan(flat, everything, t * n, None)
    if method == Method.dycoke:
        tokens, index = temporal_merge(enc.features, opts.ttm_k)
        return TokenPlan(tokens, index, budget, opts.prune_layer, "decode")
    if method == Method.fastv:
        return TokenPlan(flat, everything, budget, fastv_layer, "prefill")
    if method == Method.random:
        g = torch.Generator().manual_seed(opts.seed)
        index = torch.sort(torch.randperm(t * n, generator=g)[:budget]).values.to(flat.device)
        return TokenPlan(flat[index], index, budget, None)
    index = frames_index(t, n, budget, flat.device)
    return TokenPlan(flat[index], index, int(index.shape[0]), None)


def frames_index(t: int, n: int, budget: int, device=None) -> torch.Tensor:
    """Uniformly fewer frames with (about) ``budget`` tokens: flat indices of their tokens."""
    f = max(1, min(t, round(budget / n)))
    chosen = [int((i + 0.5) * t / f) for i in range(f)]
    return torch.cat([torch.arange(n, device=device) + c * n for c in chosen])


def prompt_visual_extent(frames: int, per_frame: int, opts: CompressionOptions) -> int:
    """Positions the visual part of the prompt spans for ``frames`` frames with ``opts``."""
    method = Method(opts.method)
    if method in (Method.none, Method.fastv) or opts.positions == "original":
        return frames * per_frame
    if method == Method.dycoke:
        return merged_count(frames, per_frame, opts.ttm_k)
    budget = visual_budget(frames, per_frame, opts.ttm_k, opts.prune_p)
    if method == Method.frames:
        return max(1, min(frames, round(budget / per_frame))) * per_frame
    return budget
