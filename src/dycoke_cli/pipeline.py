"""Wires the stages: video -> frames -> vision tower -> token selection -> decoding loop.

Never prints: progress goes to an optional ``Listener`` (the CLI's display), the outcome is a
``Result`` dataclass. Data flows one way: video.read_video -> preprocess -> model.encode_video
-> compression (ttm / baselines) -> generate.decode (with compression.pruning) -> Result.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import torch

from .compression.flops import LMShape, answer_flops
from .compression.pruning import DecodeSelector, PrefillSelector, PrunedKVCache
from .compression.ttm import kept_per_frame, merged_count, temporal_merge
from .errors import UsageError
from .generate import DecodeTimings, decode, sync
from .options import FASTV_LAYER, CompressionOptions, Method, OptionError, Positions, SamplingOptions
from .memory import PeakMemory
from .preprocess import preprocess_frames

ENCODE_CHUNK = 4  # frames per vision-tower call: bounds activation memory, drives the progress bar


@dataclass
class EncodedVideo:
    """A clip decoded and encoded once, shared by every method run on it."""

    video: object  # video.Video
    features: torch.Tensor  # [T, N, D] per-frame visual tokens
    newline: torch.Tensor | None  # [1, D] token appended after the video, if the family has one
    decode_s: float
    encode_s: float

    @property
    def frames(self) -> int:
        return self.features.shape[0]

    @property
    def tokens_per_frame(self) -> int:
        return self.features.shape[1]


@dataclass
class Plan:
    """Which visual tokens enter the language model and what the decoding loop prunes."""

    tokens: torch.Tensor  # [M, D] visual tokens entering the prefill
    index: torch.Tensor  # [M] their flat indices frame * N + position
    selector: object | None  # DecodeSelector / PrefillSelector, built once the span is known
    keep: int  # visual tokens the pruned layers attend to
    prune_from: int | None  # first layer with pruning, or None


class Listener(Protocol):
    def stage(self, name: str, done: int = 0, total: int = 0) -> None: ...
    def token(self, text: str, result: "Result") -> None: ...


@dataclass
class Result:
    answer: str
    token_ids: list[int]
    method: str
    options: dict
    stats: dict = field(default_factory=dict)


def visual_budget(frames: int, per_frame: int, k: float, p: float) -> int:
    """Visual tokens DyCoke's pruned layers attend to: TTM's count times (1 - P).
    The static baselines get exactly this many."""
    merged = merged_count(frames, per_frame, k)
    return max(1, kept_per_frame(merged, p)) if p > 0 else merged


def encode_video(lm, path: str | os.PathLike, num_frames: int, listener: Listener | None = None,
                 timeout_s: float = 60.0) -> EncodedVideo:
    """Decode ``num_frames`` frames by time and run the vision tower once over them."""
    from .video import read_video

    if listener:
        listener.stage("decoding frames")
    t0 = time.perf_counter()
    spec = lm.frame_spec
    video = read_video(path, num_frames, max_side=2 * max(spec.height, spec.width), timeout_s=timeout_s)
    decode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pixels = preprocess_frames(video.frames, spec)
    chunks, newline = [], None
    total = pixels.shape[0]
    for start in range(0, total, ENCODE_CHUNK):
        if listener:
            listener.stage("encoding", start, total)
        feats, newline = lm.encode_video(pixels[start : start + ENCODE_CHUNK])
        chunks.append(feats)
    if listener:
        listener.stage("encoding", total, total)
    features = torch.cat(chunks)
    sync(lm.device)
    return EncodedVideo(video, features, newline, decode_s, time.perf_counter() - t0)


def plan_tokens(enc: EncodedVideo, opts: CompressionOptions) -> Plan:
    """Apply the method's pre-LLM selection; say what the decoding loop will prune."""
    t, n = enc.frames, enc.tokens_per_frame
    flat = enc.features.reshape(t * n, -1)
    everything = torch.arange(t * n, device=flat.device)
    budget = visual_budget(t, n, opts.ttm_k, opts.prune_p)
    method = Method(opts.method)
    if method == Method.none:
        return Plan(flat, everything, None, t * n, None)
    if method == Method.dycoke:
        tokens, index = temporal_merge(enc.features, opts.ttm_k)
        return Plan(tokens, index, "dycoke", budget, opts.prune_layer)
    if method == Method.fastv:
        return Plan(flat, everything, "fastv", budget, FASTV_LAYER)
    if method == Method.random:
        g = torch.Generator().manual_seed(opts.seed)
        index = torch.sort(torch.randperm(t * n, generator=g)[:budget]).values.to(flat.device)
        return Plan(flat[index], index, None, budget, None)
    # Method.frames: uniformly fewer frames with (about) the same number of tokens
    f = max(1, min(t, round(budget / n)))
    chosen = [int((i + 0.5) * t / f) for i in range(f)]
    index = torch.cat([torch.arange(n, device=flat.device) + c * n for c in chosen])
    return Plan(flat[index], index, None, f * n, None)


def build_embeds(lm, question: str, visual: torch.Tensor, newline: torch.Tensor | None):
    """[text before | visual | newline | text after] as one [1, S, D] tensor, plus the visual span."""
    before, after = lm.prompt_ids(question)
    embed = lm.decoder.embed_tokens
    with torch.inference_mode():
        parts = [embed(before.to(lm.device)), visual.to(lm.dtype)]
        if newline is not None:
            parts.append(newline.to(lm.dtype))
        parts.append(embed(after.to(lm.device)))
    span = (len(before), len(before) + visual.shape[0])
    return torch.cat(parts).unsqueeze(0), span


class TextStream:
    """Incremental detokenisation: the text each new token adds, held back while incomplete."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return ""  # an unfinished multi-byte character, or a merge that rewrote the tail
        delta, self.text = text[len(self.text) :], text
        return delta

    def finish(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        delta = text[len(self.text) :] if text.startswith(self.text) else ""
        self.text = text
        return delta


def peak_memory(device) -> int | None:
    """Peak bytes: allocator peak on CUDA, the process's own resident high-water mark on CPU
    (VmHWM; ru_maxrss would also count the parent's size at spawn on Linux)."""
    if getattr(device, "type", "") == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):
        return None


def answer(lm, enc: EncodedVideo, question: str, opts: CompressionOptions, sampling: SamplingOptions,
           listener: Listener | None = None) -> Result:
    """Answer ``question`` about an encoded clip with one compression method."""
    opts = opts.resolve(lm)
    method = opts.method
    t_start = time.perf_counter()
    plan = plan_tokens(enc, opts)
    merge_s = time.perf_counter() - t_start
    embeds, span = build_embeds(lm, question, plan.tokens, enc.newline)
    seq = embeds.shape[1]
    total_visual = enc.frames * enc.tokens_per_frame
    positions = prefill_positions(span, plan, total_visual, seq, opts.positions)
    extent = seq if positions is None else int(positions[-1]) + 1
    sampling = _fit_context(lm, extent, span, sampling)
    selector = None
    if plan.selector == "dycoke":
        selector = DecodeSelector(plan.prune_from, span, plan.keep, opts.refresh_threshold,
                                  frame_of=plan.index // enc.tokens_per_frame, coverage=opts.frame_coverage)
    elif plan.selector == "fastv":
        selector = PrefillSelector(plan.prune_from, span, plan.keep)
    capacity = seq + sampling.max_new_tokens + 1
    reduced = (plan.prune_from, capacity - (span[1] - span[0]) + plan.keep) if plan.selector == "fastv" else None
    cache = PrunedKVCache(lm.num_layers, capacity, selector if isinstance(selector, DecodeSelector) else None,
                          opts.offload_pruned, reduced=reduced)
    stream = TextStream(lm.tokenizer)
    result = Result("", [], method.value, {**opts.to_dict(), **sampling.to_dict()})
    result.stats = _base_stats(enc, plan, total_visual, seq, opts)
    timings = DecodeTimings()
    if listener:
        listener.stage("prefill")
    first_token_at = None
    t_gen = time.perf_counter()
    with PeakMemory(lm.device) as memory:
        for token in decode(lm, embeds, cache, sampling, selector, timings, positions):
            if first_token_at is None:
                first_token_at = time.perf_counter() - t_gen
                if listener:
                    listener.stage("generating")
            result.token_ids.append(token)
            delta = stream.push(token)
            result.answer = stream.text
            _update_live(lm, result, timings, selector, first_token_at, t_gen, plan, seq)
            if listener and delta:
                listener.token(delta, result)
    result.stats["peak_memory_above_start_bytes"] = memory.peak_above_start
    tail = stream.finish()
    result.answer = stream.text.strip()
    if listener and tail:
        listener.token(tail, result)
    gen_s = time.perf_counter() - t_gen
    _final_stats(lm, result, enc, plan, selector, cache, timings, first_token_at, gen_s, merge_s, seq, span)
    return result


def prefill_positions(span: tuple[int, int], plan: Plan, total_visual: int, seq: int,
                      mode: str) -> torch.Tensor | None:
    """Position ids of the prefill: None (contiguous 0..S-1) or, in "original" mode, the text
    before the video, each kept visual token at ``start + its flat index``, and everything after
    the video shifted as if no token had been dropped."""
    if mode == Positions.contiguous or plan.tokens.shape[0] == total_visual:
        return None
    start, end = span
    after = torch.arange(start + total_visual, start + total_visual + seq - end)
    return torch.cat([torch.arange(start), plan.index.cpu() + start, after])


def prompt_visual_extent(frames: int, per_frame: int, opts: CompressionOptions) -> int:
    """Positions the visual part of the prompt spans for ``frames`` frames with ``opts``."""
    method = opts.method
    if method in (Method.none, Method.fastv) or opts.positions == Positions.original:
        return frames * per_frame
    if method == Method.dycoke:
        return merged_count(frames, per_frame, opts.ttm_k)
    budget = visual_budget(frames, per_frame, opts.ttm_k, opts.prune_p)
    if method == Method.frames:
        return max(1, min(frames, round(budget / per_frame))) * per_frame
    return budget


def fit_frames(lm, frames: int | None, opts: CompressionOptions, question: str) -> int:
    """The frame count to sample (``frames``, else the model's default), refused with the bound
    when the prompt would not fit the model's context with ``opts`` (resolved)."""
    n = frames if frames is not None else lm.defaults.num_frames
    limit = context_length(lm)
    if limit is None:
        return n
    before, after = lm.prompt_ids(question)
    room = limit - len(before) - len(after) - 2  # the newline after the video, one new token
    per_frame = lm.tokens_per_frame
    if prompt_visual_extent(n, per_frame, opts) <= room:
        return n
    lo, hi = 0, n  # largest count that fits: lo fits (0 trivially), hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if prompt_visual_extent(mid, per_frame, opts) <= room else (lo, mid)
    if lo < 1:
        return n  # not even one frame fits: the context check names the prompt's size
    raise OptionError("frames", f"must be in [1, {lo}] for this model: its {limit}-token context holds at most "
                                f"{lo} frames of {per_frame} visual tokens with method {opts.method.value} (got {n})")


def context_length(lm) -> int | None:
    return getattr(lm.model.config.text_config, "max_position_embeddings", None)


def _fit_context(lm, seq: int, span: tuple[int, int], sampling: SamplingOptions) -> SamplingOptions:
    """Refuse a prompt longer than the model's context; shorten generation to what fits.
    ``seq`` is the prompt's extent in positions (its length, or more with original positions)."""
    limit = context_length(lm)
    if limit is None:
        return sampling
    visual = span[1] - span[0]
    if seq >= limit:
        raise UsageError(
            f"the prompt needs {seq} tokens ({visual} visual, {seq - visual} text) but the model's context is "
            f"{limit}; shorten the question or use fewer --frames"
        )
    if seq + sampling.max_new_tokens > limit:
        return replace(sampling, max_new_tokens=limit - seq)
    return sampling


def _base_stats(enc, plan, total_visual, seq, opts) -> dict:
    info = enc.video.info
    return {
        "frames": enc.frames,
        "frames_requested": info.requested,
        "tokens_per_frame": enc.tokens_per_frame,
        "visual_tokens": total_visual,
        "visual_tokens_prefill": int(plan.tokens.shape[0]),
        "prefill_retention": plan.tokens.shape[0] / total_visual,
        "visual_tokens_decode": plan.keep,
        "prefill_tokens": seq,
        "prune_layer": plan.prune_from,
        "tokens_generated": 0,
    }


def _update_live(lm, result, timings, selector, ttft, t_gen, plan, seq) -> None:
    s = result.stats
    s["tokens_generated"] = len(result.token_ids)
    s["peak_memory_bytes"] = peak_memory(lm.device)
    s["flops_estimate"], s["flops_ratio_estimate"] = _flops(lm, plan, seq, s["visual_tokens"], len(result.token_ids))
    s["ttft_s"] = ttft
    elapsed = time.perf_counter() - t_gen
    s["elapsed_s"] = elapsed
    if timings.step_s:
        s["decode_tokens_per_s"] = len(timings.step_s) / timings.decode_s
    if isinstance(selector, DecodeSelector):
        s.update(selector.stats.to_dict())


def _final_stats(lm, result, enc, plan, selector, cache, timings, ttft, gen_s, merge_s, seq, span) -> None:
    s = result.stats
    total_visual = s["visual_tokens"]
    generated = len(result.token_ids)
    m = int(plan.tokens.shape[0])
    s.update({
        "tokens_generated": generated,
        "decode_retention": plan.keep / m if m else 1.0,
        "overall_retention": plan.keep / total_visual,
        "timings_s": {
            "decode_video": enc.decode_s,
            "encode": enc.encode_s,
            "merge": merge_s,
            "prefill": timings.prefill_s,
            "decode": timings.decode_s,
            "generate": gen_s,
        },
        "ttft_s": ttft if ttft is not None else gen_s,
        "decode_tokens_per_s": (len(timings.step_s) / timings.decode_s) if timings.decode_s > 0 else None,
        "decode_ms_per_token_median": _median_ms(timings.step_s),
        "kv_bytes": cache.kv_bytes(),
        "peak_memory_bytes": peak_memory(lm.device),
    })
    if isinstance(selector, DecodeSelector):
        s.update(selector.stats.to_dict())
    s["flops_estimate"], s["flops_ratio_estimate"] = _flops(lm, plan, seq, total_visual, generated)


def _flops(lm, plan: Plan, seq: int, total_visual: int, generated: int) -> tuple[float, float]:
    """Estimated LLM FLOPs of this answer and the uncompressed run's / this one's (see flops.py)."""
    shape = LMShape.from_config(lm.model.config.text_config)
    m = int(plan.tokens.shape[0])
    full_seq = seq - m + total_visual
    base = answer_flops(shape, [full_seq] * shape.layers, [full_seq + 1] * shape.layers, max(generated, 1))
    prefill, ctx = _token_profile(shape.layers, seq, m, plan)
    mine = answer_flops(shape, prefill, ctx, max(generated, 1))
    return mine, base / mine


def _token_profile(layers: int, seq: int, m: int, plan: Plan) -> tuple[list[int], list[int]]:
    """Tokens entering each layer at prefill, keys each layer attends to at the first step."""
    if plan.prune_from is None:
        return [seq] * layers, [seq + 1] * layers
    reduced = seq - m + plan.keep
    if plan.selector == "fastv":
        prefill = [seq if i < plan.prune_from else reduced for i in range(layers)]
    else:
        prefill = [seq] * layers
    ctx = [(seq if i < plan.prune_from else reduced) + 1 for i in range(layers)]
    return prefill, ctx


def _median_ms(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    med = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return med * 1000


def ask(lm, video_path: str | os.PathLike, question: str, *, frames: int | None = None,
        compression: CompressionOptions = CompressionOptions(), sampling: SamplingOptions = SamplingOptions(),
        listener: Listener | None = None) -> Result:
    """Decode, encode and answer in one call (the Python API behind ``dycoke ask``)."""
    compression = compression.resolve(lm)
    n = fit_frames(lm, frames, compression, question)
    enc = encode_video(lm, video_path, n, listener)
    result = answer(lm, enc, question, compression, sampling, listener)
    result.stats["video"] = enc.video.info.to_dict()
    return result
