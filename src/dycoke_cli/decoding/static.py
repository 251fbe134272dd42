"""Decoding steps with static shapes, captured once as a CUDA graph and replayed.

After the prefill, the cache switches to static mode (compression/cache.py): a step writes its
keys at a device index and attention reads each layer's whole capacity under a length mask.
The token, its position and the step count are device tensors updated in place, and DyCoke's
selection runs branch-free on the device (compression/selectors.py), so every step launches
the same kernels on the same addresses, with no host sync inside. On CUDA the first step runs
eagerly on a side stream (it warms up the kernels and is a real step), the second is captured
as a CUDA graph, and every later step is one replay: a step's kernels (about 40 per layer)
become one launch.
Elsewhere (or when capture fails) the same step runs eagerly; it gives the same tokens.

Greedy decoding chooses the next token inside the step (an argmax written into the step's own
input), so the host can queue the next step before it reads this one's token (decoding/loop.py).

One step per session (:class:`KeptSteps`): a later answer whose cache fits takes over the
earlier answer's buffers (compression/cache.py), its lengths and counters are written into the
device values the captured step reads, and the step is replayed with no new capture.
"""

from __future__ import annotations

import os

import torch

from ..compression.attention import DECODE_KERNELS, decode_kernel, probing
from ..errors import UsageError
from .layer_call import call_layer

ATTENTION_ENV = "DYCOKE_DECODE_ATTENTION"  # the static step's attention kernel (see decode_attention)


def decode_attention(environ=os.environ) -> str:
    """The static decoding step's attention kernel: ``$DYCOKE_DECODE_ATTENTION``, ``sdpa`` (the
    default: nothing measured on a GPU has chosen the other yet) or ``matmul`` (two matmuls and
    a softmax, split over the keys: benchmarks/bench_attention.py compares them)."""
    chosen = environ.get(ATTENTION_ENV, "").strip() or "sdpa"
    if chosen not in DECODE_KERNELS:
        raise UsageError(f"{ATTENTION_ENV} must be {' or '.join(DECODE_KERNELS)} (got {chosen!r})")
    return chosen


class StaticSteps:
    """Callable: ``logits = steps()`` runs one decoding step after the token in ``self.token``
    (``steps(token)``: after ``token``).

    ``greedy``: the step also writes its argmax into ``self.token`` (the next step's input) and
    ``self.report``; otherwise the caller chooses and calls :meth:`feed`. ``report`` [5] (device):
    the step's token, then DyCoke's counters (steps, selections, refreshes, recalled; zeros
    without a selector), what the host reads per token."""

    def __init__(self, lm, cache, selector, next_position: int, position_dims: int, graph: bool,
                 greedy: bool = False):
        self.lm, self.cache, self.selector, self.greedy = lm, cache, selector, greedy
        device = lm.device
        self.position_dims = position_dims
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.report = torch.zeros(5, dtype=torch.long, device=device)
        shape = (3, 1, 1) if position_dims == 3 else (1, 1)  # M-RoPE: the text's three ids are equal
        self.position = torch.full(shape, next_position, dtype=torch.long, device=device)
        cache.make_static()
        if selector is not None and selector.prunes == "decode":
            selector.branch_free = True
        self.logits: torch.Tensor | None = None
        self.want_graph = graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.calls = 0
        self.answers = 1  # answers this step has served (a graph captured once, replayed by the later ones)
        self.setup = False  # the last call warmed up or captured (its time is not a decoding step's)
        self.note: str | None = None  # why no graph, when one was wanted
        self.attention = decode_attention()  # the attention kernel of every layer in a step

    @property
    def path(self) -> str:
        return "cuda-graph" if self.graph is not None else "static"

    @property
    def reused(self) -> bool:
        return self.answers > 1

    def feed(self, token: torch.Tensor) -> None:
        """The next step's input ``token`` [1] (device), chosen outside the step."""
        self.token.copy_(token.view(1, 1))
        self._emit(token)

    def __call__(self, token: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [1, V] of one step; ``token`` [1] (device): its input, when not already fed."""
        if token is not None:
            self.token.copy_(token.view(1, 1))
        self.calls += 1
        self.setup = self.graph is None and self.want_graph and self.calls <= 2
        if self.graph is not None:
            self.graph.replay()
        elif self.setup:
            self._set_up(self._warm_up if self.calls == 1 else self._capture)
        else:
            self._step()
        return self.logits

    def _set_up(self, stage) -> None:
        """Warm up or capture. Stopped in the middle (Ctrl-C, or any error), it leaves no half-made
        step behind: the count restarts at zero, so this step fits no later answer (:meth:`fits`),
        and the session's next answer sets a new one up (its ``decode_path`` says how it ran)."""
        finished = False
        try:
            stage()
            finished = True
        finally:
            if not finished:
                what = "warm-up" if stage == self._warm_up else "capture"
                self.calls, self.graph, self.setup = 0, None, False
                self.note = f"the {what} of the static decoding step was interrupted; the next answer sets it up again"

    def _emit(self, token: torch.Tensor) -> None:
        self.report[:1].copy_(token.view(1))
        counters = getattr(self.selector, "counters", None)
        if counters is not None:
            self.report[1:].copy_(counters)

    def _step(self) -> None:
        """One step; every operation reads and writes fixed tensors (graph-capturable)."""
        decoder = self.lm.decoder
        hidden = decoder.embed_tokens(self.token)
        cos, sin = decoder.rotary_emb(hidden, self.position)
        flat_ids = self.position if self.position.dim() == 2 else None
        masks = self.cache.begin_step()  # write indices and masks, once for all layers
        with probing(self.selector), decode_kernel(self.attention):
            for layer, mask in zip(decoder.layers, masks):
                hidden = call_layer(layer, hidden, self.cache, attention_mask=mask, position_embeddings=(cos, sin),
                                    position_ids=flat_ids)
        logits = self.lm.lm_head(decoder.norm(hidden))[:, -1].float()
        if self.logits is None:
            self.logits = logits
        else:
            self.logits.copy_(logits)
        self.cache.advance()
        self.position += 1
        if self.greedy:  # the next input, on the device: the host need not answer before the next step
            chosen = self.logits.argmax(dim=-1)
            self.token.copy_(chosen.view(1, 1))
            self._emit(chosen)

    def _warm_up(self) -> None:
        """The first step, on a side stream on CUDA (what capture wants); the main stream waits for
        it however it ends."""
        if self.lm.device.type != "cuda":
            self._step()
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                self._step()
        finally:
            torch.cuda.current_stream().wait_stream(side)

    def _capture(self) -> None:
        """Capture one step (capturing runs nothing), then replay it for this step. A failure
        leaves the eager static step, and says why."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._step()
        except Exception as exc:  # an operation that cannot be captured: keep going without a graph
            if os.environ.get("DYCOKE_DEBUG"):
                raise
            self.want_graph, self.note = False, f"CUDA graph capture failed ({type(exc).__name__}: {exc})"
            self._step()
            return
        self.graph = graph
        graph.replay()

    # -- one step for a whole session ------------------------------------------------------------

    def fits(self, lm, cache, selector, position_dims: int, greedy: bool) -> bool:
        """Whether this (captured) step can run another answer's decoding: same model, same
        choice of token, a cache that took over this one's buffers with the same layout, and
        the same selection rule. A step whose setup was interrupted has a count of zero: it fits none."""
        if lm is not self.lm or position_dims != self.position_dims or greedy != self.greedy:
            return False
        if self.calls == 0 or any(layer.keys is None for layer in cache.kv_layers()):
            return False
        if cache.layout_key() != self.cache.layout_key():
            return False
        if (selector is None) != (self.selector is None) or type(selector) is not type(self.selector):
            return False
        return selector is None or getattr(selector, "prunes", None) != "decode" or selector.same_rule(self.selector)

    def rebind(self, cache, selector, next_position: int) -> "StaticSteps":
        """Run another answer's decoding with this step: its cache's lengths and a zero step
        count go into the device values the step reads, its selector takes over this one's
        (reset) state, and the position restarts at ``next_position``."""
        with torch.inference_mode():
            cache.make_static(like=self.cache)
            if selector is not None and selector.prunes == "decode":
                selector.continue_from(self.selector)
            self.position.fill_(next_position)
            self.report.zero_()
        self.answers += 1
        self.setup = False
        return self


class KeptSteps:
    """The static decoding step a session keeps for its next answers (one at a time: a step
    holds its cache's buffers). ``arena``: the cache a new answer's cache takes over;
    ``capacity(n)``: the capacity a new answer's cache gets (the kept one's when ``n``
    positions fit in it; else ``n`` rounded up, with room for longer follow-up questions)."""

    ROUND = 64  # positions: a new cache is rounded up to a multiple, plus one more multiple of room

    def __init__(self):
        self.steps: StaticSteps | None = None

    @property
    def arena(self):
        return None if self.steps is None else self.steps.cache

    def capacity(self, needed: int) -> int:
        kept = None if self.steps is None else self.steps.cache.capacity
        if kept is not None and needed <= kept:
            return kept
        return -(-needed // self.ROUND) * self.ROUND + self.ROUND

    def clear(self) -> None:
        self.steps = None

    def nbytes(self) -> int:
        """Bytes of the tensors the kept step holds: its cache's buffers (the pruning store and
        slot included) and its own inputs and outputs, each storage counted once."""
        if self.steps is None:
            return 0
        cache = self.steps.cache
        holders = [self.steps, cache, *getattr(cache, "layers", []), getattr(cache, "block", None),
                   getattr(cache, "selector", None), getattr(cache, "static", None)]
        seen: dict[int, int] = {}
        for holder in holders:
            for value in vars(holder).values() if holder is not None else ():
                for tensor in _tensors(value):
                    storage = tensor.untyped_storage()
                    seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in ``value``: itself, or those in a list or tuple of them (nested)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [tensor for item in value for tensor in _tensors(item)]
    return []
