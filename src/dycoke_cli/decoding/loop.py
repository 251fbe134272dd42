"""The decoding loop: prefill, the decoding steps, and a generator of chosen tokens.

The language model is driven layer by layer through its public modules (embeddings are
built by the pipeline; rotary embeddings, decoder layers, final norm and head come from the
checkpoint), which lets a one-shot baseline drop hidden states mid-prefill and lets the
probing attention function see which layer it runs in. Batch size is 1 and nothing is padded.

On CUDA a long prompt is prefilled in chunks of ``PREFILL_CHUNK`` tokens, layer by layer, so
the activations stay bounded. Tokens are chosen on the device (:func:`sample_token`); the host
reads one small tensor per token (the id, with DyCoke's live counters). The steps run either
eagerly (:class:`EagerSteps`, exact-length tensors) or with static shapes
(:class:`~.static.StaticSteps`, captured as a CUDA graph on CUDA): ``decode`` in
:class:`~.options.SamplingOptions`; both give the same tokens.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..compression.attention import probing
from ..options import Decoding, SamplingOptions
from .layer_call import call_layer

# Prompt tokens per piece of a long prefill on CUDA (bounds activation memory). Not on the CPU:
# there a masked piece costs about 23 % more than one causal pass (0.5B, 6300 tokens, measured).
PREFILL_CHUNK = 4096


@dataclass
class DecodeTimings:
    prefill_s: float = 0.0
    step_s: list[float] = field(default_factory=list)  # one per decoding step after the first token
    path: str | None = None  # how the steps ran: "eager", "static" or "cuda-graph" (None: no step ran)
    path_note: str | None = None  # why a CUDA graph was not used, when it was asked for and failed
    refreshes: int | None = None  # DyCoke's live counters, read with each token
    recalled: int | None = None
    counters: tuple[int, ...] | None = None  # all four as of the last token kept (see DecodeSelector)
    setup_s: float = 0.0  # warming up and capturing the static step (not in step_s)
    reused: bool = False  # the static step was captured for an earlier answer of the session

    @property
    def decode_s(self) -> float:
        return sum(self.step_s)


def sync(device) -> None:
    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize(device)


def attention_backends(device, phase: str):
    """SDPA kernels per phase on CUDA: never cuDNN, whose attention builds a new plan for every
    new key length (2-4.5 ms of CPU per call, NOTES section 6). Prefill prefers flash (no mask)
    then memory-efficient (masked chunks); a decoding step attends under a mask: memory-efficient.
    Elsewhere nothing changes."""
    if getattr(device, "type", str(device)) != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if phase == "decode":
        order[:2] = order[1::-1]
    return sdpa_kernel(order)


def run_layers(lm, embeds: torch.Tensor, positions: torch.Tensor, cache, selector=None,
               head: bool = True, chunk: int | None = None, deepstack=None) -> torch.Tensor | None:
    """One forward pass of the language model over ``embeds`` [1, S, D] at ``positions`` [1, S]
    (or [3, 1, S] for M-RoPE), in chunks of ``chunk`` tokens (default: ``PREFILL_CHUNK`` on CUDA,
    the whole prompt elsewhere).

    Returns the logits of the last position [1, V] (None with ``head=False``). ``selector`` (compression.selectors) sees
    its probed layer's attention; one that ``prunes == "prefill"`` also makes a prefill drop
    the unselected visual hidden states after that layer, for every later layer and step.
    The chunks go through the model layer by layer (every chunk through a layer, then the
    next layer), so a one-shot pruner's cut still sees the whole prompt's last query.
    ``deepstack`` (Qwen3-VL): (positions [M] of the visual tokens in ``embeds``, levels [M, D]
    each); level k is added to those positions' hidden states after layer k, as the text model
    does (``_deepstack_process``); a one-shot cut keeps the levels of the tokens it keeps.
    """
    decoder = lm.decoder
    hidden = embeds
    cos, sin = decoder.rotary_emb(hidden, positions)
    chunk = chunk or (PREFILL_CHUNK if embeds.device.type == "cuda" else embeds.shape[1])
    cut_after = None
    if selector is not None and selector.prunes == "prefill" and embeds.shape[1] > 1:
        cut_after = selector.probe_layer
    where, levels = deepstack if deepstack is not None and len(deepstack[1]) else (None, ())
    if where is not None:
        where = where.to(hidden.device)
    with probing(selector):
        for i, layer in enumerate(decoder.layers):
            hidden = _layer_in_chunks(layer, hidden, positions, cos, sin, cache, chunk)
            if i < len(levels):
                hidden = hidden.index_add(1, where, levels[i].to(hidden.device, hidden.dtype).unsqueeze(0))
            if i == cut_after:
                keep = selector.kept_positions(hidden.shape[1], hidden.device)
                hidden, positions = hidden[:, keep], positions[..., keep]
                cos, sin = cos[:, keep], sin[:, keep]
                if i + 1 < len(levels):  # the visual tokens that survive the cut, at their new places
                    survived = torch.isin(where, keep)
                    where = torch.searchsorted(keep, where[survived])
                    levels = tuple(level.to(hidden.device)[survived] for level in levels)
    if not head:
        return None  # only the cache was wanted (a prompt prefix)
    hidden = decoder.norm(hidden[:, -1:])
    return lm.lm_head(hidden)[:, -1].float()


def _layer_in_chunks(layer, hidden, positions, cos, sin, cache, chunk: int) -> torch.Tensor:
    """One decoder layer over ``hidden`` [1, S, D], ``chunk`` queries at a time. A pruned
    cache layer takes its whole prompt in one piece (it files the visual part at its first
    update), and a last piece of one query would pass for a decoding step: both are avoided."""
    seq = hidden.shape[1]
    if seq == 1:  # a decoding step
        return call_layer(layer, hidden, cache, position_embeddings=(cos, sin),
                          position_ids=positions if positions.dim() == 2 else None)
    held = cache.layers[layer_index(layer)]
    if seq <= chunk or getattr(held, "whole_prompt", False):
        bounds = [(0, seq)]
    else:
        bounds = [(a, min(a + chunk, seq)) for a in range(0, seq, chunk)]
        if bounds[-1][1] - bounds[-1][0] == 1:
            bounds[-2:] = [(bounds[-2][0], seq)]
    flat_ids = positions if positions.dim() == 2 else None  # 3-D (M-RoPE) ids reach only the rotary
    outs = []
    for a, b in bounds:
        # a linear layer takes no mask (batch 1, no padding): its state carries the pieces before
        mask = None if getattr(held, "is_linear", False) else causal_after(held.get_seq_length(), b - a, hidden.device)
        outs.append(call_layer(layer, hidden[:, a:b], cache, attention_mask=mask,
                               position_embeddings=(cos[:, a:b], sin[:, a:b]),
                               position_ids=None if flat_ids is None else flat_ids[:, a:b]))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def layer_index(layer) -> int:
    """A decoder layer's index: its attention's, or a hybrid stack's linear layer's (Gated DeltaNet)."""
    mixer = getattr(layer, "self_attn", None) or getattr(layer, "linear_attn", None)
    return mixer.layer_idx


def batch_positions(positions: torch.Tensor) -> torch.Tensor:
    """[S] -> [1, S]; M-RoPE's [3, S] -> [3, 1, S]."""
    return positions.unsqueeze(0) if positions.dim() == 1 else positions.unsqueeze(1)


def causal_after(past: int, n: int, device) -> torch.Tensor | None:
    """The attention mask of ``n`` new queries after ``past`` cached positions: query i sees
    the cache and new positions up to i ([1, 1, n, past + n], True = attend). None where no
    mask is needed: a whole prompt at once is plainly causal, one query sees everything. (SDPA's
    own is_causal aligns the triangle to the top left, wrong once a cache holds a prefix.)"""
    if past == 0 or n == 1:
        return None
    return torch.ones(n, past + n, dtype=torch.bool, device=device).tril(diagonal=past)[None, None]


def make_generator(opts: SamplingOptions, device) -> torch.Generator | None:
    """A generator on the model's device for sampling (None when greedy): seeded with
    ``opts.seed``, else freshly; torch's global RNG is left alone."""
    if opts.temperature <= 0:
        return None
    generator = torch.Generator(device=device)
    if opts.seed is None:
        generator.seed()
    else:
        generator.manual_seed(opts.seed)
    return generator


def sample_token(logits: torch.Tensor, opts: SamplingOptions, generator: torch.Generator | None) -> torch.Tensor:
    """The next token id [1] on the logits' device, with no host sync: greedy when temperature
    is 0, else temperature + nucleus (top-p). The draw is an exponential race (argmax of
    p / E with E ~ Exp(1), which picks i with probability p_i), one kernel instead of
    multinomial's host-side checks."""
    if opts.temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits[0].float() / opts.temperature, dim=-1)
    if opts.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cut = sorted_probs.cumsum(0) - sorted_probs > opts.top_p  # drop tokens once the mass before them exceeds p
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs.masked_fill(cut, 0.0))
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax().view(1)


class EagerSteps:
    """Decoding steps as plain calls: exact-length tensors, host reads where convenient."""

    path = "eager"
    note = None  # (static steps say here why they run without a CUDA graph)
    reused = False  # (static steps: captured for an earlier answer of the session)

    def __init__(self, lm, cache, selector, next_position: int):
        self.lm, self.cache, self.selector = lm, cache, selector
        self.position = next_position

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """Logits [1, V] after feeding ``token`` [1] (a device tensor)."""
        pos = torch.tensor([[self.position]], device=token.device)
        self.position += 1
        x = self.lm.decoder.embed_tokens(token.view(1, 1))
        return run_layers(self.lm, x, pos, self.cache, self.selector)


def decodes_static(lm, opts: SamplingOptions, offloaded: bool) -> bool:
    """Whether the steps run with static shapes: ``opts.decode``; ``auto``: on CUDA unless the
    pruned entries are offloaded to the host (their gather needs host indices)."""
    mode = Decoding(opts.decode)
    if mode == Decoding.auto:
        return lm.device.type == "cuda" and not offloaded
    return mode == Decoding.static


def pick_steps(lm, cache, selector, opts: SamplingOptions, next_position: int, position_dims: int = 2,
               kept=None):
    """The decoding steps ``opts.decode`` asks for (see :func:`decodes_static`). ``kept``
    (static.KeptSteps, a session's): its step is reused when this answer's cache fits it, and
    a new static step is kept there for the next answers."""
    if not decodes_static(lm, opts, cache.offloaded):
        return EagerSteps(lm, cache, selector, next_position)
    from .static import StaticSteps

    greedy = opts.temperature <= 0
    if kept is not None and kept.steps is not None and kept.steps.fits(lm, cache, selector, position_dims, greedy):
        return kept.steps.rebind(cache, selector, next_position)
    steps = StaticSteps(lm, cache, selector, next_position, position_dims, graph=lm.device.type == "cuda",
                        greedy=greedy)
    if kept is not None:
        kept.steps = steps
    return steps


def _note(values: list[int], selector, timings: DecodeTimings) -> int:
    """Keep the counters read with a token; returns its id. ``values``: [id, steps, selections,
    refreshes, recalled]."""
    if getattr(selector, "counters", None) is not None:
        timings.counters = tuple(values[1:5])
        timings.refreshes, timings.recalled = values[3], values[4]
    return values[0]


def _read(token: torch.Tensor, selector, timings: DecodeTimings) -> int:
    """The one host read per token: the id, and DyCoke's live counters in the same transfer."""
    counters = getattr(selector, "counters", None)
    if counters is None:
        return int(token)
    return _note(torch.cat([token.view(1), counters]).tolist(), selector, timings)


def generate_tokens(lm, embeds: torch.Tensor, cache, opts: SamplingOptions, selector=None,
                    timings: DecodeTimings | None = None, positions: torch.Tensor | None = None,
                    deepstack=None, kept=None, trace=None) -> Iterator[int]:
    """Prefill ``embeds`` [1, S, D], then yield token ids one by one until EOS or the limit.

    ``positions`` [S] (or [3, S]) are the prefill's position ids (default ``0..S-1``); generated
    tokens continue after the largest one. ``deepstack``: see :func:`run_layers`. ``kept``: a
    session's static.KeptSteps (see :func:`pick_steps`). ``trace``: a trace.StepTrace that
    records each step's selection (None: nothing is recorded). The EOS token itself is not yielded.
    """
    timings = timings if timings is not None else DecodeTimings()
    device = embeds.device
    generator = make_generator(opts, device)
    eos = set() if opts.ignore_eos else set(lm.eos_token_ids)
    with torch.inference_mode():
        t0 = time.perf_counter()
        if positions is None:
            positions = torch.arange(embeds.shape[1], device=device)
        positions = batch_positions(positions.to(device))
        next_position = int(positions.max()) + 1  # 3-D positions: the text goes on after the largest
        with attention_backends(device, "prefill"):
            token = sample_token(run_layers(lm, embeds, positions, cache, selector, deepstack=deepstack), opts,
                                 generator)
        value = _read(token, selector, timings)
        timings.prefill_s = time.perf_counter() - t0
        if opts.max_new_tokens < 1 or value in eos:
            return
        yield value
        if opts.max_new_tokens == 1:
            return
        steps = pick_steps(lm, cache, selector, opts, next_position, positions.dim(), kept)
        timings.path, timings.reused = steps.path, steps.reused
        if isinstance(steps, EagerSteps):
            yield from _eager(steps, token, opts, generator, selector, eos, timings, trace)
        else:
            yield from _queued(steps, token, opts, generator, selector, eos, timings, trace)


def _eager(steps, token, opts: SamplingOptions, generator, selector, eos: set, timings: DecodeTimings, trace=None):
    """Eager steps: one step, one host read, the next step (tokens 1.. of the answer)."""
    device = token.device
    for _ in range(1, opts.max_new_tokens):
        t0 = time.perf_counter()
        with attention_backends(device, "decode"):
            token = sample_token(steps(token), opts, generator)
        if trace is not None:
            trace.record(selector)
        value = _read(token, selector, timings)
        timings.step_s.append(time.perf_counter() - t0)
        if value in eos:
            return
        yield value


def _queued(steps, token, opts: SamplingOptions, generator, selector, eos: set, timings: DecodeTimings,
            trace=None):
    """Static steps, one ahead of the host: step k+1 is queued (its input is step k's token,
    on the device) before the host reads step k's token, so the device never waits for the
    host. Each step's report (token and counters) is copied into one of two pinned host slots
    and read after its event. An answer that ends at EOS has queued one step too many: it is
    discarded, and the counters kept are those read with the EOS (they are exact). Warm-up and
    capture are timed apart (``setup_s``), not as decoding steps."""
    device = token.device
    cuda = device.type == "cuda"
    host = torch.zeros(2, 5, dtype=torch.long, pin_memory=cuda)
    steps.feed(token)

    def queue(k: int):
        t0 = time.perf_counter()
        # a replay needs no kernel choice (the capture made it): no context per token
        with contextlib.nullcontext() if steps.graph is not None else attention_backends(device, "decode"):
            logits = steps()
            if trace is not None:  # queued after this step, before the next: its selection
                trace.record(selector)
            if not steps.greedy:
                steps.feed(sample_token(logits, opts, generator))
        slot = host[k % 2]
        slot.copy_(steps.report, non_blocking=cuda)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        if steps.setup:  # once per session: wait for it, and keep its time out of the steps'
            sync(device)
            timings.setup_s += time.perf_counter() - t0
        timings.path, timings.path_note = steps.path, steps.note
        return slot, event

    last, setup_at = time.perf_counter(), timings.setup_s
    pending = queue(1)
    for k in range(1, opts.max_new_tokens):
        ahead = queue(k + 1) if k + 1 < opts.max_new_tokens else None
        slot, event = pending
        if event is not None:
            event.synchronize()
        value = _note(slot.tolist(), selector, timings)
        now = time.perf_counter()
        timings.step_s.append(max(now - last - (timings.setup_s - setup_at), 0.0))  # setup: timed apart
        last, setup_at = now, timings.setup_s
        if value in eos:
            return  # the step queued ahead is dropped
        yield value
        if ahead is None:
            return
        pending = ahead


