"""Wires the stages: video -> frames -> vision tower -> token plan -> decoding loop -> Answer.

Never prints. Progress is a stream of events (results.Stage / Planned / Token, then Done):
:func:`run` yields them for one question about one file; :func:`encoding` and
:func:`answering` are its two halves, generators that *return* the EncodedVideo and the
Answer; :func:`encode_video`, :func:`answer` and :func:`ask` are the same without events.
"""

from __future__ import annotations

import os
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, replace

import torch

from .compression.baselines import plan_tokens
from .compression.cache import PrunedKVCache
from .compression.flops import LMShape, plan_flops
from .compression.selectors import DecodeSelector, PrefillSelector
from .generate import DecodeTimings, TextStream, generate_tokens, sync
from .memory import PeakMemory, process_peak
from .options import CompressionOptions, SamplingOptions
from .preprocess import preprocess_frames
from .prompt import build_embeds, fit_context, fit_frames, prefill_positions
from .results import (Answer, AnswerStats, Done, EncodedVideo, Event, Planned, SelectionStats, Stage, Timings,
                      Token, TokenPlan)

ENCODE_CHUNK = 4  # frames per vision-tower call: bounds activation memory, drives the progress bar


def drain(events: Generator[Event, None, object]):
    """Run an event generator to its end and return its value."""
    while True:
        try:
            next(events)
        except StopIteration as stop:
            return stop.value


def encoding(lm, path: str | os.PathLike, num_frames: int,
             timeout_s: float = 60.0) -> Generator[Stage, None, EncodedVideo]:
    """Read ``num_frames`` frames by time and run the vision tower once over them."""
    from .video import read_video

    yield Stage("reading frames")
    t0 = time.perf_counter()
    spec = lm.frame_spec
    video = read_video(path, num_frames, max_side=2 * max(spec.height, spec.width), timeout_s=timeout_s)
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pixels = preprocess_frames(video.frames, spec)
    chunks, newline = [], None
    total = pixels.shape[0]
    for start in range(0, total, ENCODE_CHUNK):
        yield Stage("encoding", start, total)
        feats, newline = lm.encode_video(pixels[start : start + ENCODE_CHUNK])
        chunks.append(feats)
    yield Stage("encoding", total, total)
    features = torch.cat(chunks)
    sync(lm.device)
    return EncodedVideo(video, features, newline, read_s, time.perf_counter() - t0)


def encode_video(lm, path: str | os.PathLike, num_frames: int, timeout_s: float = 60.0) -> EncodedVideo:
    return drain(encoding(lm, path, num_frames, timeout_s))


@dataclass(frozen=True)
class _Prepared:
    """Everything an answer needs before its prefill."""

    plan: TokenPlan
    embeds: torch.Tensor  # [1, S, D]
    span: tuple[int, int]  # the visual tokens' place in the prompt
    positions: torch.Tensor | None
    sampling: SamplingOptions  # max_new_tokens shortened to what the context leaves
    selector: DecodeSelector | PrefillSelector | None
    cache: PrunedKVCache
    merge_s: float


def _prepare(lm, enc: EncodedVideo, question: str, opts: CompressionOptions, sampling: SamplingOptions) -> _Prepared:
    t0 = time.perf_counter()
    plan = plan_tokens(enc, opts)
    merge_s = time.perf_counter() - t0
    embeds, span = build_embeds(lm, question, plan.tokens, enc.newline)
    seq = embeds.shape[1]
    positions = prefill_positions(lm, span, plan, enc.visual_tokens, seq, opts.positions)
    extent = seq if positions is None else int(positions[-1]) + 1
    sampling = fit_context(lm, extent, span[1] - span[0], sampling)
    selector, reduced = None, None
    capacity = seq + sampling.max_new_tokens + 1
    if plan.prunes == "decode":
        selector = DecodeSelector(plan.prune_from, span, plan.keep, opts.refresh_threshold,
                                  frame_of=plan.index // enc.tokens_per_frame, coverage=opts.frame_coverage)
    elif plan.prunes == "prefill":
        selector = PrefillSelector(plan.prune_from, span, plan.keep)
        reduced = (plan.prune_from, capacity - plan.prefill_visual + plan.keep)  # its cut layers hold fewer
    cache = PrunedKVCache(lm.num_layers, capacity, selector if plan.prunes == "decode" else None,
                          opts.offload_pruned, reduced=reduced)
    return _Prepared(plan, embeds, span, positions, sampling, selector, cache, merge_s)


def answering(lm, enc: EncodedVideo, question: str, opts: CompressionOptions,
              sampling: SamplingOptions) -> Generator[Event, None, Answer]:
    """Answer ``question`` about an encoded clip with one compression method."""
    opts = opts.resolve(lm)
    prep = _prepare(lm, enc, question, opts, sampling.validate())
    shape = LMShape.from_config(lm.model.config.text_config)
    seq = prep.embeds.shape[1]
    yield Planned(enc.visual_tokens, prep.plan.prefill_visual, prep.plan.keep, prep.plan.prune_from,
                  plan_flops(shape, prep.plan, seq, enc.visual_tokens, 1)[1])
    yield Stage("prefill")
    stream, ids, timings, ttft = TextStream(lm.tokenizer), [], DecodeTimings(), None
    t_gen = time.perf_counter()
    with PeakMemory(lm.device) as memory:
        for token in generate_tokens(lm, prep.embeds, prep.cache, prep.sampling, prep.selector, timings,
                                     prep.positions):
            if ttft is None:
                ttft = time.perf_counter() - t_gen
                yield Stage("generating")
            ids.append(token)
            if delta := stream.push(token):
                yield _token_event(delta, len(ids), ttft, timings, prep.selector)
    if tail := stream.finish():
        yield _token_event(tail, len(ids), ttft or 0.0, timings, prep.selector)
    gen_s = time.perf_counter() - t_gen
    stats = _stats(lm, enc, prep, shape, len(ids), timings, ttft if ttft is not None else gen_s, gen_s,
                   memory.peak_above_start)
    return Answer(stream.text.strip(), tuple(ids), opts.method.value, {**opts.to_dict(), **prep.sampling.to_dict()},
                  stats, question=question)


def answer(lm, enc: EncodedVideo, question: str, opts: CompressionOptions, sampling: SamplingOptions) -> Answer:
    return drain(answering(lm, enc, question, opts, sampling))


def _token_event(text: str, generated: int, ttft: float, timings: DecodeTimings, selector) -> Token:
    rate = len(timings.step_s) / timings.decode_s if timings.decode_s > 0 else None
    counts = selector.counts if isinstance(selector, DecodeSelector) else None
    return Token(text, generated, ttft, rate, counts and counts.refreshes, counts and counts.recalled)


def _stats(lm, enc: EncodedVideo, prep: _Prepared, shape: LMShape, generated: int, timings: DecodeTimings,
           ttft: float, gen_s: float, peak_above_start: int | None) -> AnswerStats:
    plan, seq = prep.plan, prep.embeds.shape[1]
    flops, ratio = plan_flops(shape, plan, seq, enc.visual_tokens, generated)
    selection = None
    if isinstance(prep.selector, DecodeSelector):
        c = prep.selector.counts
        selection = SelectionStats(c.steps, c.selections, c.refreshes, c.recalled,
                                   round(prep.cache.rebuild_seconds() * 1000, 3))
    return AnswerStats(
        frames=enc.frames, frames_requested=enc.video.info.requested, tokens_per_frame=enc.tokens_per_frame,
        visual_tokens=enc.visual_tokens, visual_tokens_prefill=plan.prefill_visual, visual_tokens_decode=plan.keep,
        prefill_tokens=seq, prune_layer=plan.prune_from, tokens_generated=generated,
        timings=Timings(enc.read_s, enc.encode_s, prep.merge_s, timings.prefill_s, timings.decode_s, gen_s),
        ttft_s=ttft,
        decode_tokens_per_s=len(timings.step_s) / timings.decode_s if timings.decode_s > 0 else None,
        decode_ms_per_token_median=_median_ms(timings.step_s),
        kv_bytes=prep.cache.kv_bytes(), peak_memory_bytes=process_peak(lm.device),
        peak_memory_above_start_bytes=peak_above_start, flops_estimate=flops, flops_ratio_estimate=ratio,
        selection=selection,
    )


def _median_ms(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    med = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return med * 1000


def run(lm, video_path: str | os.PathLike, question: str, *, frames: int | None = None,
        compression: CompressionOptions = CompressionOptions(), sampling: SamplingOptions = SamplingOptions(),
        timeout_s: float = 60.0) -> Iterator[Event]:
    """Events of one question about one file, ending with ``Done(answer)``."""
    compression = compression.resolve(lm)
    n = fit_frames(lm, frames, compression, question)
    enc = yield from encoding(lm, video_path, n, timeout_s)
    result = yield from answering(lm, enc, question, compression, sampling)
    yield Done(replace(result, video=enc.video.info))


def ask(lm, video_path: str | os.PathLike, question: str, *, frames: int | None = None,
        compression: CompressionOptions = CompressionOptions(), sampling: SamplingOptions = SamplingOptions(),
        timeout_s: float = 60.0) -> Answer:
    """Read, encode and answer in one call (the Python API behind ``dycoke ask``)."""
    for event in run(lm, video_path, question, frames=frames, compression=compression, sampling=sampling,
                     timeout_s=timeout_s):
        if isinstance(event, Done):
            return event.answer
    raise AssertionError("run() ended without an answer")  # pragma: no cover
