"""Wires the stages: video -> frames -> vision tower -> token plan -> decoding loop -> Answer.

Never prints. Progress is a stream of events (results.Stage / Progress / Planned / Token):
:func:`encoding` (encoder.py: reading and encoding a clip) and :func:`answering` are generators
that yield them and *return* the EncodedVideo and the Answer; :func:`encode_video` and
:func:`answer` are the same without events. The prompt up to the question is a :class:`Prefix`,
computed once per clip and settings. session.py strings these together (Session, run, ask).
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator
from dataclasses import dataclass, replace

import torch

from .compression.baselines import plan_tokens
from .compression.cache import PrunedKVCache
from .compression.flops import LMShape, plan_flops
from .compression.selectors import DecodeSelector, PrefillSelector, SelectionCounts
from .decoding.detokenize import ReasoningSplit, TextStream
from .decoding.loop import (
    DecodeTimings,
    attention_backends,
    batch_positions,
    decodes_static,
    generate_tokens,
    run_layers,
    sync,
)
from .decoding.prompt import (
    embed_parts,
    fit_context,
    prefill_positions,
    prefix_embeds,
    prompt_embeds,
    render_prompt,
)
from .decoding.trace import StepTrace, kept_trace
from .encoder import drain, encode_video, encoding, step_seconds  # noqa: F401 (the pipeline's API)
from .errors import SettingError
from .memory import PeakMemory, process_peak
from .options import CompressionOptions, Decoding, Method, Positions, SamplingOptions
from .results import (
    Answer,
    AnswerStats,
    Event,
    KeptTrace,
    Planned,
    SelectionStats,
    Stage,
    Timings,
    Token,
)
from .values import EncodedVideo, Prompt, TokenPlan, VisualSpan


@dataclass(frozen=True)
class Prefix:
    """The prompt up to the question, ``[text before | visual tokens | newline]``, with its keys
    and values in every layer. It does not depend on the question, so it is computed once per
    clip and compression settings. (FastV selects tokens by the question: it has none.)"""

    opts: CompressionOptions  # resolved
    plan: TokenPlan
    span: VisualSpan  # the video part's place in the prompt, and its visual tokens' positions
    keys: tuple[torch.Tensor | None, ...]  # per layer [1, KVH, P, d] (None: a hybrid stack's linear layer)
    values: tuple[torch.Tensor | None, ...]
    plan_s: float  # choosing the visual tokens (TTM or a baseline)
    compute_s: float  # the language model over the prefix
    before: torch.Tensor  # [B] the prompt's token ids before the video (a system message included)
    system: str | None = None  # the system message before the video, if any
    # a hybrid stack's linear layers: a copy of each one's (conv, recurrent) state at the prefix's
    # end (None for the other layers), loaded afresh for every question; empty for a plain stack
    states: tuple = ()

    @property
    def length(self) -> int:
        return next(k for k in self.keys if k is not None).shape[2]

    def precedes(self, prompt: Prompt) -> bool:
        """Whether ``prompt`` starts with this prefix: the same text before the video (a template
        that puts text of the question there gives each question a prefix of its own)."""
        return prompt.system == self.system and torch.equal(prompt.before, self.before)

    @property
    def nbytes(self) -> int:
        """Bytes of tensors held: keys and values, and a hybrid stack's linear states."""
        tensors = [*self.keys, *self.values, *(t for state in self.states if state is not None for t in state)]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def next_positions(self, lm, enc: EncodedVideo, n: int) -> torch.Tensor:
        """Position ids of ``n`` tokens after the prefix ([n], or [3, n] for 3-D positions)."""
        whole = lm.positions(self.span, self.plan.index, enc, self.length + n,
                             Positions(self.opts.positions) == Positions.original)
        return torch.arange(self.length, self.length + n) if whole is None else whole[..., self.length:]


PREFIX_PROBE = "?"  # a question for a prompt whose text before the video is all that is read


def timed_prompt(lm, enc: EncodedVideo, prompt: Prompt) -> Prompt:
    """``prompt`` with the encoded clip's time instruction before its question (LLaVA-OneVision
    with timestamps on: rendered again, the question kept as asked), else ``prompt`` itself."""
    if enc.time_instruction is None:
        return prompt
    timed = render_prompt(lm, enc.prompt_question(prompt.question), prompt.system, prompt.thinking)
    return replace(timed, question=prompt.question)


def build_prefix(lm, enc: EncodedVideo, opts: CompressionOptions, prompt: Prompt | None = None) -> Prefix:
    """Plan the visual tokens and run the language model over ``prompt`` (the chat prompt of any
    question when None) up to the video's end."""
    opts = opts.resolve(lm)
    prompt = prompt if prompt is not None else render_prompt(lm, PREFIX_PROBE)
    t0 = time.perf_counter()
    plan = plan_tokens(enc, opts, lm.fastv_layer)
    plan_s = time.perf_counter() - t0
    with torch.inference_mode():
        embeds, span = prefix_embeds(lm, prompt.before, plan, enc)
        length = embeds.shape[1]
        positions = prefill_positions(lm, span, plan, enc, length, opts.positions)
        cache = PrunedKVCache(lm.num_layers, length, linear=lm.linear_layers)
        ids = positions if positions is not None else torch.arange(length)
        with attention_backends(lm.device, "prefill"):
            run_layers(lm, embeds, batch_positions(ids.to(lm.device)), cache, head=False,
                       deepstack=(span.visual, plan.deepstack))
        states = cache.linear_states() if lm.linear_layers else ()
    sync(lm.device)
    keys = tuple(None if layer.keys is None else layer.keys[:, :, :length] for layer in cache.layers)
    values = tuple(None if layer.keys is None else layer.values[:, :, :length] for layer in cache.layers)
    return Prefix(opts, plan, span, keys, values, plan_s, time.perf_counter() - t0 - plan_s, prompt.before,
                  prompt.system, states)


@dataclass(frozen=True)
class _Prepared:
    """Everything an answer needs before its prefill."""

    plan: TokenPlan
    embeds: torch.Tensor  # [1, S', D] what the prefill still has to run: the question, or the whole prompt
    positions: torch.Tensor | None  # [S'] their position ids (None: 0..S'-1)
    seq: int  # the whole prompt's length
    sampling: SamplingOptions  # max_new_tokens shortened to what the context leaves
    deepstack: tuple | None  # (visual positions in ``embeds``, levels) for the prefill, or None
    selector: DecodeSelector | PrefillSelector | None
    cache: PrunedKVCache
    setup_s: float  # planning the visual tokens, when no prefix did


def _prepare(lm, enc: EncodedVideo, prompt: Prompt, opts: CompressionOptions, sampling: SamplingOptions,
             prefix: Prefix | None, kept=None) -> _Prepared:
    t0 = time.perf_counter()
    plan = prefix.plan if prefix is not None else plan_tokens(enc, opts, lm.fastv_layer)
    setup_s = time.perf_counter() - t0
    if prefix is not None:
        embeds = embed_parts(lm, prompt.after)
        span, seq = prefix.span, prefix.length + embeds.shape[1]
        positions = prefix.next_positions(lm, enc, embeds.shape[1])
        extent = int(positions.max()) + 1
        deepstack = None  # the prefix, computed with them, holds every visual token
    else:
        embeds, span = prompt_embeds(lm, prompt, plan, enc)
        seq = embeds.shape[1]
        positions = prefill_positions(lm, span, plan, enc, seq, opts.positions)
        extent = seq if positions is None else int(positions.max()) + 1
        deepstack = (span.visual, plan.deepstack) if plan.deepstack else None
    sampling = fit_context(lm, extent, span.count, sampling)
    selector, reduced = None, None
    capacity = seq + sampling.max_new_tokens + 1
    arena = None
    if kept is not None and decodes_static(lm, sampling, opts.offload_pruned):
        # a session's static step: this cache takes over the kept one's buffers when they fit
        capacity, arena = kept.capacity(capacity), kept.arena
    if plan.prunes == "decode":
        selector = DecodeSelector(plan.prune_from, span, plan.keep, opts.refresh_threshold,
                                  frame_of=plan.index // enc.tokens_per_frame, coverage=opts.coverage,
                                  probe_layer=lm.probe_layer(plan.prune_from))
    elif plan.prunes == "prefill":
        selector = PrefillSelector(plan.prune_from, span, plan.keep, probe_layer=lm.probe_layer(plan.prune_from))
        reduced = (plan.prune_from, capacity - plan.prefill_visual + plan.keep)  # its cut layers hold fewer
    cache = PrunedKVCache(lm.num_layers, capacity, selector if plan.prunes == "decode" else None,
                          opts.offload_pruned, reduced=reduced, arena=arena, linear=lm.linear_layers)
    if prefix is not None:
        cache.load_prefix(prefix.keys, prefix.values, prefix.states)
    return _Prepared(plan, embeds, positions, seq, sampling, deepstack, selector, cache, setup_s)


def answering(lm, enc: EncodedVideo, question: str | Prompt, opts: CompressionOptions, sampling: SamplingOptions,
              prefix: Prefix | None = None, prefix_is_new: bool = False,
              system: str | None = None, kept=None, trace: bool = False) -> Generator[Event, None, Answer]:
    """Answer ``question`` about an encoded clip with one compression method. ``question``: its
    :class:`Prompt` (rendered once by the caller), or its text, rendered here after a ``system``
    message, if any. ``prefix``: the prompt up to the question, computed earlier for this clip
    and these options (else it is computed here, for every method that can reuse one);
    ``prefix_is_new``: it was computed for this answer, whose timings then count it. ``kept``:
    the session's decoding.static.KeptSteps (static decoding replays the step it keeps when this
    answer fits it). ``trace``: record what the answer kept (``Answer.kept``, for its picture and
    ``--json``); off, nothing is recorded."""
    opts = opts.resolve(lm)
    prompt = question if isinstance(question, Prompt) else render_prompt(lm, question, system, sampling.thinking)
    prompt = timed_prompt(lm, enc, prompt)  # after the clip's time instruction, when it carries one
    t_gen = time.perf_counter() - (prefix.plan_s + prefix.compute_s if prefix_is_new else 0.0)
    built = prefix if prefix_is_new else None  # a prefix computed for this answer counts in its timings
    if prefix is None and opts.method != Method.fastv:
        prefix = built = build_prefix(lm, enc, opts, prompt)
    if prefix is not None and (prefix.opts != opts or opts.method == Method.fastv or not prefix.precedes(prompt)):
        raise ValueError("this prefix was computed for other options, or cannot precede this question")
    if opts.offload_pruned and sampling.decode == Decoding.static and opts.method == Method.dycoke:
        raise SettingError("{decode} static reads the pruned entries on the device; {offload_pruned} keeps them "
                           "in host memory: use {decode} eager (or auto) with it")
    prep = _prepare(lm, enc, prompt, opts, sampling.validate(), prefix, kept)
    shape = LMShape.from_config(lm.model.config.text_config)
    yield Planned(enc.visual_tokens, prep.plan.prefill_visual, prep.plan.keep, prep.plan.prune_from,
                  plan_flops(shape, prep.plan, prep.seq, enc.visual_tokens, 1)[1], prep.seq,
                  prefix_reused=prefix is not None and built is None)
    yield Stage("prefill")
    stream, ids, pieces, timings, ttft = TextStream(lm.tokenizer), [], [], DecodeTimings(), None
    split = ReasoningSplit() if prep.sampling.thinking else None  # reasoning first, kept apart
    steps = StepTrace(prep.plan.index // enc.tokens_per_frame, enc.frames) if trace else None
    with PeakMemory(lm.device) as memory:
        for token in generate_tokens(lm, prep.embeds, prep.cache, prep.sampling, prep.selector, timings,
                                     prep.positions, prep.deepstack, kept, steps):
            if ttft is None:
                ttft = time.perf_counter() - t_gen
                yield Stage("generating")
            ids.append(token)
            pieces.append(stream.push(token))  # this token's text ("" while a character is incomplete)
            if pieces[-1]:
                yield from _token_events(pieces[-1], split, len(ids), ttft, timings)
    rest = stream.finish()  # text held back at the end (an incomplete character): the last token's
    if pieces:
        pieces[-1] += rest
    yield from _token_events(rest, split, len(ids), ttft or 0.0, timings, last=True)
    gen_s = time.perf_counter() - t_gen
    stats = _stats(lm, enc, prep, shape, len(ids), timings, built, ttft if ttft is not None else gen_s, gen_s,
                   memory.peak_above_start)
    text, reasoning = (stream.text, None) if split is None else (split.answer, split.reasoning.strip())
    what = _kept(lm, enc, prep, steps, len(timings.step_s), pieces) if trace else None
    return Answer(text.strip(), tuple(ids), opts.method.value, {**opts.to_dict(), **prep.sampling.to_dict()},
                  stats, question=prompt.question, reasoning=reasoning, kept=what)


def answer(lm, enc: EncodedVideo, question: str | Prompt, opts: CompressionOptions, sampling: SamplingOptions,
           prefix: Prefix | None = None, kept=None, trace: bool = False) -> Answer:
    return drain(answering(lm, enc, question, opts, sampling, prefix, kept=kept, trace=trace))


def _kept(lm, enc: EncodedVideo, prep: _Prepared, steps: StepTrace | None, ran: int, pieces: list[str]) -> KeptTrace:
    """What the answer kept: the prefill's tokens per frame, and each step's attended entries."""
    rows, cols, n = enc.rows, enc.cols, enc.tokens_per_frame
    if rows * cols != n:  # a layout the feature cache did not keep: square when it can be, else one row
        side = math.isqrt(n)
        rows, cols = (side, side) if side * side == n else (1, n)
    return kept_trace(prep.plan, prep.selector, steps, enc.frames, (rows, cols), lm.frames_per_step, ran, pieces)


def _token_events(text: str, split: ReasoningSplit | None, generated: int, ttft: float, timings: DecodeTimings,
                  last: bool = False):
    """The Token events of one piece of text: as it is, or its reasoning and answer parts (``split``);
    ``last``: the end of the answer (a split gives what it held back)."""
    if split is None:
        parts = [(text, False)]
    else:
        reasoning, answer = split.push(text)
        if last:
            more = split.finish()
            reasoning, answer = reasoning + more[0], answer + more[1]
        parts = [(reasoning, True), (answer, False)]
    for piece, is_reasoning in parts:
        if piece:
            yield replace(_token_event(piece, generated, ttft, timings), reasoning=is_reasoning)


def _token_event(text: str, generated: int, ttft: float, timings: DecodeTimings) -> Token:
    """The live figures: DyCoke's counters as read with the token (no read of their own)."""
    rate = len(timings.step_s) / timings.decode_s if timings.decode_s > 0 else None
    return Token(text, generated, ttft, rate, timings.refreshes, timings.recalled)


def _stats(lm, enc: EncodedVideo, prep: _Prepared, shape: LMShape, generated: int, timings: DecodeTimings,
           built: Prefix | None, ttft: float, gen_s: float, peak_above_start: int | None) -> AnswerStats:
    plan, seq = prep.plan, prep.seq
    merge_s = prep.setup_s + (built.plan_s if built is not None else 0.0)
    prefill_s = timings.prefill_s + (built.compute_s if built is not None else 0.0)
    flops, ratio = plan_flops(shape, plan, seq, enc.visual_tokens, generated)
    selection = None
    if isinstance(prep.selector, DecodeSelector):
        # as read with the last token kept (a static answer ran one step more, and dropped it)
        c = SelectionCounts(*timings.counters) if timings.counters is not None else prep.selector.counts
        selection = SelectionStats(c.steps, c.selections, c.refreshes, c.recalled,
                                   round(prep.cache.rebuild_seconds() * 1000, 3))
    return AnswerStats(
        frames=enc.frames, frames_requested=enc.video.info.requested, tokens_per_frame=enc.tokens_per_frame,
        visual_tokens=enc.visual_tokens, visual_tokens_prefill=plan.prefill_visual, visual_tokens_decode=plan.keep,
        prefill_tokens=seq, prune_layer=plan.prune_from, tokens_generated=generated,
        timings=Timings(enc.read_s, enc.encode_s, merge_s, prefill_s, timings.decode_s, gen_s, timings.setup_s),
        ttft_s=ttft,
        decode_tokens_per_s=len(timings.step_s) / timings.decode_s if timings.decode_s > 0 else None,
        decode_ms_per_token_median=_median_ms(timings.step_s),
        kv_bytes=prep.cache.kv_bytes(), peak_memory_bytes=process_peak(lm.device),
        peak_memory_above_start_bytes=peak_above_start, flops_estimate=flops, flops_ratio_estimate=ratio,
        selection=selection, decode_path=timings.path, decode_path_note=timings.path_note,
        decode_step_reused=timings.reused, pruned_layers=_pruned_layers(lm, plan),
    )


def _pruned_layers(lm, plan: TokenPlan) -> tuple[int, ...] | None:
    """The layers that see only the plan's ``keep`` visual tokens (see AnswerStats.pruned_layers)."""
    if plan.prune_from is None:
        return None
    later = range(plan.prune_from, lm.num_layers)
    return tuple(i for i in later if plan.prunes == "prefill" or i not in lm.linear_layers)


def _median_ms(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    med = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return med * 1000
