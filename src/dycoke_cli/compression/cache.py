"""The KV cache of the decoding loop; every cache internal of the project lives here.

Layers ``< L`` hold everything in a preallocated buffer (appending writes in place).
After the prefill, :meth:`PrunedKVCache.make_static` switches every layer to static shapes
for the decoding steps: a step writes its keys at a device index (``base + steps``) and
attention reads the whole capacity under a length mask (:meth:`PrunedKVCache.begin_step`), so
the step has the same shapes and addresses every time and can be captured as a CUDA graph. A
static step computes each distinct write index (``steps + base``, one per distinct length) and
one additive float mask (0 = attend, -inf = unused) per distinct layer shape once, before the layers
(:meth:`PrunedKVCache.begin_step`); the layers only read them. With a
:class:`~.selectors.DecodeSelector`, each layer ``>= L`` keeps a compact working buffer
``[text before | selected visual slot | everything after]`` that attention reads directly,
plus a store of every visual entry; the pruned layers' buffers are views of one block, so a
selection reaches every layer's slot in one gather. Steps rewrite the slots only when the
selection changes: eager steps branch on the host; a captured static step holds the gather in a
CUDA graph conditional node that the device enters only when the probe took a new selection
(:func:`run_if`). With ``offload=True`` the store lives in
host memory (the accelerator holds only what is attended). Pruned entries stay in the store
and come back when a later selection ranks them high again.
"""

from __future__ import annotations

import time

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, LinearAttentionLayer

from ..results import KVBytes
from .attention import ATTENTION_NAME
from .selectors import DecodeSelector

MASK_ALIGN = 16  # elements: the row stride memory-efficient SDPA wants of a mask (else it pads a copy)


class _BufferLayer(CacheLayerMixin):
    """A preallocated full layer: appending writes in place; attention reads a view."""

    is_sliding = False

    def __init__(self, capacity: int, arena: "_BufferLayer | None" = None):
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self.steps: torch.Tensor | None = None  # static mode: the shared device count of decoding steps
        self.base: torch.Tensor | None = None  # static mode: the device length before the first step
        self.at: torch.Tensor | None = None  # static mode: [1] this step's write index, base + steps (begin_step)
        self.arena = arena  # an earlier answer's layer whose buffers this one takes over (see PrunedKVCache)

    def lazy_initialization(self, key_states, value_states):
        b, h, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        shape = (b, h, self.capacity, d)
        if _fits(getattr(self.arena, "keys", None), shape, key_states):
            self.keys, self.values = self.arena.keys, self.arena.values
        else:
            self.keys = key_states.new_empty(shape)
            self.values = value_states.new_empty(shape)
        self.arena = None
        self.is_initialized = True

    def _append(self, k, v):
        n = k.shape[2]
        if self.length + n > self.capacity:
            raise RuntimeError(f"KV cache full ({self.capacity} positions)")
        self.keys[:, :, self.length : self.length + n] = k
        self.values[:, :, self.length : self.length + n] = v
        self.length += n

    def update(self, key_states, value_states, *args, **kwargs):
        if self.steps is not None:
            return self._write_static(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._append(key_states, value_states)
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def make_static(self, steps: torch.Tensor, base: torch.Tensor, at: torch.Tensor) -> None:
        """From now on one token per update, written at ``at`` (device values: a captured step
        reads them, so another answer can set them and replay it). ``base``: the device tensor
        that holds this layer's length (shared by the layers of the same length, filled here);
        ``at`` [1]: where :meth:`PrunedKVCache.begin_step` puts ``steps + base`` each step."""
        if self.length + 1 > self.capacity:
            raise RuntimeError(f"KV cache full ({self.capacity} positions)")
        # The unused capacity is read under the mask: zeros, never stale memory (a NaN there
        # would reach the output through 0 * NaN).
        self.keys[:, :, self.length :].zero_()
        self.values[:, :, self.length :].zero_()
        self.steps, self.base, self.at = steps, base.fill_(self.length), at

    def _write_static(self, k, v):
        self.keys.index_copy_(2, self.at, k)
        self.values.index_copy_(2, self.at, v)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def held_bytes(self) -> int:
        return 0 if self.keys is None else 2 * self.keys[:, :, : self.length].numel() * self.keys.element_size()


def _fits(buffer: torch.Tensor | None, shape: tuple, like: torch.Tensor) -> bool:
    """Whether an earlier answer's ``buffer`` can be taken over for ``shape`` (``like``'s kind)."""
    return (buffer is not None and tuple(buffer.shape) == tuple(shape) and buffer.dtype == like.dtype
            and buffer.device == like.device)


class _LinearStateLayer(LinearAttentionLayer):
    """A hybrid stack's linear-attention layer (Gated DeltaNet): a conv state and a recurrent
    state of fixed size, updated in place (transformers' ``LinearAttentionLayer``: the layer
    reads and writes them through the cache's ``get_conv_state`` / ``update_*_state``). It holds
    no keys, is never pruned, and has absorbed every token it was given: it can be copied (a
    session's prefix) but not rolled back. ``arena``: an earlier answer's layer whose tensors
    this one takes over (a kept static step reads them)."""

    is_linear = True
    keys = None  # no KV entries

    def __init__(self, arena: "_LinearStateLayer | None" = None):
        super().__init__()
        self.arena = arena

    def lazy_initialization(self, conv_states=None, recurrent_states=None, state_idx: int = 0,
                            conv_kernel_size: int | None = None) -> None:
        super().lazy_initialization(conv_states, recurrent_states, state_idx, conv_kernel_size)
        old = self.arena
        for mine, theirs, given in ((self.conv_states, getattr(old, "conv_states", None), conv_states),
                                    (self.recurrent_states, getattr(old, "recurrent_states", None), recurrent_states)):
            if given is not None and theirs is not None and _fits(theirs.get(state_idx), tuple(mine[state_idx].shape),
                                                                  mine[state_idx]):
                mine[state_idx] = theirs[state_idx].zero_()

    def state(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(conv [B, C, kernel], recurrent [B, H, dk, dv]) as they are now, or None before any token."""
        if not self.has_previous_state[0]:
            return None
        return self.conv_states[0], self.recurrent_states[0]

    def load(self, conv: torch.Tensor, recurrent: torch.Tensor, seen: int) -> None:
        """Continue from a state computed earlier (copied in: the layer keeps its own tensors)."""
        if not self.is_conv_states_initialized[0]:
            self.lazy_initialization(conv_states=conv, conv_kernel_size=conv.shape[-1])
        if not self.is_recurrent_states_initialized[0]:
            self.lazy_initialization(recurrent_states=recurrent)
        self.conv_states[0].copy_(conv)
        self.recurrent_states[0].copy_(recurrent)
        self.has_previous_state[0] = True
        if hasattr(self, "cumulative_length_linear"):  # transformers >= 5.25 counts the tokens a layer saw
            self.cumulative_length_linear.fill_(seen)
        self.arena = None

    def held_bytes(self) -> int:
        states = self.state()
        return 0 if states is None else sum(t.numel() * t.element_size() for t in states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0


def run_if(flag: torch.Tensor, fn) -> None:
    """``fn()`` only where the device flag ``flag`` (bool []) is set, with no host wait on a GPU.

    While a CUDA graph is captured, ``fn``'s kernels go into a conditional node: at each replay
    the device reads ``flag`` and runs them or skips them. On the CPU the host reads the flag (its
    own memory: nothing to wait for). Elsewhere (a CUDA step run eagerly: the warm-up, a failed
    capture; a torch without conditional nodes; the meta device) ``fn`` runs every time: callers
    pass an ``fn`` that gives the same result when the flag is false (it rewrites what is there)."""
    if flag.device.type == "cpu":
        if bool(flag):
            fn()
        return
    if flag.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        graph_class = torch.cuda.CUDAGraph
        graph = getattr(graph_class, "get_currently_capturing_graph", lambda: None)()
        if graph is not None and hasattr(graph, "begin_capture_to_if_node"):
            try:
                graph.begin_capture_to_if_node(flag)
            except RuntimeError:  # a driver without conditional nodes (CUDA < 12.4): unconditional
                fn()
                return
            try:
                fn()
            finally:
                graph.end_capture_to_conditional_node()
            return
    fn()


class _PrunedBlock:
    """Storage shared by the pruned layers: one working buffer [2 (k, v), layers, B, H, capacity, d]
    and one store of every visual entry [2, layers, B, H, visual, d], so that a selection is
    written into every layer's slot by one gather and one copy (two kernels, not four per layer).
    Allocated at the first pruned layer's prefill, when the shapes are known."""

    def __init__(self, layers: int, selector: DecodeSelector, offload: bool, arena: "_PrunedBlock | None" = None):
        self.layers, self.selector, self.offload, self.arena = layers, selector, offload, arena
        self.work: torch.Tensor | None = None
        self.store: torch.Tensor | None = None
        self.staging: torch.Tensor | None = None  # offloaded store: host [layers, 2, B, H, keep, d] (see stage)
        self.landing: torch.Tensor | None = None  # its device twin, on CUDA
        self.moved_bytes = 0  # bytes copied from an offloaded store to the accelerator
        self.rebuild_seconds = 0.0  # writing selections into the slots

    def allocate(self, like: torch.Tensor, capacity: int) -> None:
        b, h, _, d = like.shape
        sel = self.selector
        arena, self.arena = self.arena, None
        work_shape, store_shape = (2, self.layers, b, h, capacity, d), (2, self.layers, b, h, sel.total, d)
        if (not self.offload and arena is not None
                and _fits(arena.work, work_shape, like) and _fits(arena.store, store_shape, like)):
            self.work, self.store = arena.work, arena.store  # an earlier answer's: its captured step reads them
            return
        self.work = like.new_empty(work_shape)
        pin = self.offload and like.device.type == "cuda"
        store_device = "cpu" if self.offload else like.device
        self.store = torch.empty(2, self.layers, b, h, sel.total, d, dtype=like.dtype, device=store_device,
                                 pin_memory=pin)

    @property
    def slot(self) -> slice:
        return slice(self.selector.start, self.selector.start + self.selector.keep)

    def gather(self) -> None:
        """Every layer's slot <- the selected entries of its store (no host sync when the store is
        on the device: one index_select straight into the slots; an offloaded store needs the
        selection on the host)."""
        slots = self.work[..., self.slot, :]
        if self.store.device == self.work.device:
            torch.index_select(self.store, 4, self.selector.selection, out=slots)
            return
        slots.copy_(self.store.index_select(4, self.selector.selection.to(self.store.device)))
        self.moved_bytes += slots.numel() * slots.element_size()

    def stage(self) -> torch.Tensor:
        """An offloaded store: the selected entries gathered on the host into staging laid out
        layer first, [layers, 2 (k, v), B, H, keep, d] (pinned when the work buffer is on CUDA), so
        that each layer's part is one contiguous block: a copy from pinned contiguous memory is
        what the device can take asynchronously (a strided source goes through pageable memory
        and blocks the host)."""
        if self.staging is None:
            layers, b, h, d = self.store.shape[1], self.store.shape[2], self.store.shape[3], self.store.shape[5]
            self.staging = torch.empty((layers, 2, b, h, self.selector.keep, d), dtype=self.store.dtype,
                                       pin_memory=self.work.device.type == "cuda")
        torch.index_select(self.store, 4, self.selector.selection.cpu(), out=self.staging.transpose(0, 1))
        return self.staging

    def prefetch(self, stream) -> list:
        """An offloaded store on CUDA: gather the selection into contiguous pinned staging on the
        host, then on ``stream`` copy each layer's block to a contiguous device buffer and from
        there into its slot; returns one event per layer, so layer L+k's copy overlaps layers
        L..L+k-1."""
        staging = self.stage()
        if self.landing is None:
            self.landing = torch.empty(staging.shape, dtype=staging.dtype, device=self.work.device)
        events = []
        with torch.cuda.stream(stream):
            for j in range(self.layers):
                self.landing[j].copy_(staging[j], non_blocking=True)  # contiguous to contiguous: asynchronous
                self.work[:, j, ..., self.slot, :].copy_(self.landing[j])  # on the device
                events.append(torch.cuda.Event())
                events[-1].record(stream)
        self.moved_bytes += staging.numel() * staging.element_size()
        return events


class _PrunedLayer(_BufferLayer):
    """A layer >= L: working buffer [before | selected slot | after] plus the visual store, both
    views of the block shared by the pruned layers."""

    def __init__(self, capacity: int, block: _PrunedBlock, index: int):
        super().__init__(capacity)
        self.block, self.index = block, index
        self.selector = block.selector
        self.store_k: torch.Tensor | None = None
        self.store_v: torch.Tensor | None = None
        self.seen = 0  # positions this layer has been given (its logical length)
        self.ready = None  # eager, offloaded on CUDA: the event of this layer's slot copy

    @property
    def offload_store(self) -> bool:
        return self.block.offload

    def lazy_initialization(self, key_states, value_states):
        block = self.block
        if block.work is None:
            block.allocate(key_states, self.capacity)
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.values = block.work[0, self.index], block.work[1, self.index]
        self.store_k, self.store_v = block.store[0, self.index], block.store[1, self.index]
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        sel = self.selector
        if self.steps is not None:
            if self.index == 0:  # only when this step's probe took a new selection, decided on the device
                run_if(sel.refreshed, self.block.gather)
            return self._write_static(key_states, value_states)
        if not self.is_initialized:
            return self._file_prompt(key_states, value_states)
        if not sel.started:
            if key_states.shape[2] == 1:
                raise RuntimeError("pruned KV layer: no selection arrived before a decoding step (the probing "
                                   f"attention '{ATTENTION_NAME}' must run at layer {sel.probe_layer})")
            # More prompt after a prefix computed earlier (the question after a reused video):
            # the prefill sees every visual entry, as a one-piece prefill would.
            self._append(key_states, value_states)
            self.seen += key_states.shape[2]
            return self._everything()
        if self.ready is not None:  # eager, offloaded: this layer's slot is being copied ahead
            torch.cuda.current_stream(self.device).wait_event(self.ready)
            self.ready = None
        self._append(key_states, value_states)
        self.seen += key_states.shape[2]
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def _file_prompt(self, key_states, value_states):
        """Prefill: attention sees everything; file the visual part in the store and leave a slot
        of ``keep`` entries for the selection between the text before and after."""
        sel = self.selector
        self.capacity = self.capacity - sel.total + sel.keep
        self.lazy_initialization(key_states, value_states)
        layout = sel.layout
        visual = slice(sel.start, sel.end) if layout.contiguous else layout.on(key_states.device)
        rest = layout.text_after_start(key_states.shape[2], key_states.device)
        self.store_k.copy_(key_states[:, :, visual])
        self.store_v.copy_(value_states[:, :, visual])
        self._append(key_states[:, :, : sel.start], value_states[:, :, : sel.start])
        self.length += sel.keep  # the slot, filled at the first selection
        # the text after the first visual token (between steps too): attention in a decoding step
        # and in a later prompt piece sees every cached key, so their order here does not matter
        self._append(key_states[:, :, rest], value_states[:, :, rest])
        self.seen = key_states.shape[2]
        return key_states, value_states

    def _everything(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[before | every visual entry | the text after], a copy for a later prompt piece (prefill
        only): in position order for one block of visual tokens; the order of cached keys does not
        matter to queries that see all of them."""
        a, b = self.selector.start, self.selector.start + self.selector.keep
        k, v = self.keys, self.values
        return (torch.cat([k[:, :, :a], self.store_k.to(self.device), k[:, :, b : self.length]], dim=2),
                torch.cat([v[:, :, :a], self.store_v.to(self.device), v[:, :, b : self.length]], dim=2))

    def make_static(self, steps: torch.Tensor, base: torch.Tensor, at: torch.Tensor) -> None:
        if self.offload_store:
            raise RuntimeError("static decoding reads the visual store on the device; it is offloaded")
        super().make_static(steps, base, at)

    def get_seq_length(self) -> int:
        return self.seen

    @property
    def whole_prompt(self) -> bool:
        """The first update (the prompt) must come in one piece: it files the visual part."""
        return not self.is_initialized

    def store_bytes(self) -> int:
        return 0 if self.store_k is None else 2 * self.store_k.numel() * self.store_k.element_size()


class PrunedKVCache(Cache):
    """KV cache for the decoding loop; with ``selector=None`` it is a plain preallocated cache.

    Args:
        num_layers: decoder layers.
        capacity: positions to preallocate (prefill length + new tokens).
        selector: a DecodeSelector, or None for no pruning.
        offload: keep the pruned layers' visual store in host memory.
        reduced: (first layer, capacity) for layers that hold fewer positions (FastV's after its cut).
        arena: an earlier answer's cache whose captured decoding step is kept (decoding/static.py):
            every buffer of the same shape is taken over, so that step can be replayed on this one.
        linear: a hybrid stack's linear-attention layers: each holds its fixed-size state
            (:class:`_LinearStateLayer`), is never pruned, and sees every token it is given.
    """

    def __init__(self, num_layers: int, capacity: int, selector: DecodeSelector | None = None,
                 offload: bool = False, reduced: tuple[int, int] | None = None,
                 arena: "PrunedKVCache | None" = None, linear: tuple[int, ...] = ()):
        layers: list[CacheLayerMixin] = []
        self.block = None
        old = list(arena.layers) if arena is not None and len(arena.layers) == num_layers else [None] * num_layers
        pruned = [] if selector is None else [i for i in range(selector.prune_from, num_layers) if i not in linear]
        if selector is not None:
            self.block = _PrunedBlock(len(pruned), selector, offload, arena.block if arena is not None else None)
        for i in range(num_layers):
            same = old[i] if old[i] is not None and not isinstance(old[i], _PrunedLayer) else None
            if i in linear:
                layers.append(_LinearStateLayer(same if isinstance(same, _LinearStateLayer) else None))
            elif i in pruned:
                layers.append(_PrunedLayer(capacity, self.block, pruned.index(i)))
            elif reduced is not None and i >= reduced[0]:
                layers.append(_BufferLayer(reduced[1], same))  # a one-shot pruner left fewer tokens here
            else:
                layers.append(_BufferLayer(capacity, same))
        super().__init__(layers=layers)
        self.selector = selector
        self.first_pruned = pruned[0] if pruned else None  # where an eager step takes a new selection
        self.steps: torch.Tensor | None = None  # static mode's device step counter
        self.static: _StepValues | None = None  # static mode: what a step computes before the layers
        self._copy_stream = None  # CUDA: where an offloaded store's slots are copied

    def load_prefix(self, keys: list[torch.Tensor], values: list[torch.Tensor], states=()) -> None:
        """Fill every layer with a prompt prefix's keys and values [1, KVH, P, d] computed earlier
        (it must hold the whole visual span): as if the model had just prefilled it. A hybrid
        stack's linear layers (None keys) take their ``states`` entry, (conv, recurrent) as
        :meth:`linear_states` gave it."""
        states = list(states) or [None] * len(self.layers)
        seen = max((k.shape[2] for k in keys if k is not None), default=0)
        for layer, k, v, state in zip(self.layers, keys, values, states):
            if getattr(layer, "is_linear", False):
                layer.load(*state, seen)
            else:
                layer.update(k, v)

    def linear_states(self) -> tuple:
        """Per layer, a copy of a linear layer's (conv, recurrent) state, None for the others."""
        return tuple(tuple(t.clone() for t in layer.state()) if getattr(layer, "is_linear", False) else None
                     for layer in self.layers)

    def kv_layers(self) -> list:
        """The layers that hold keys and values (all but a hybrid stack's linear ones)."""
        return [layer for layer in self.layers if not getattr(layer, "is_linear", False)]

    @property
    def capacity(self) -> int:
        """Positions the first KV layer holds (never a pruned or cut layer: they come later)."""
        return self.kv_layers()[0].capacity

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        sel = self.selector
        if (sel is not None and layer_idx == self.first_pruned and self.steps is None and sel.started
                and key_states.shape[2] == 1):
            self._take_selection()
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _take_selection(self) -> None:
        """Eager step, at the first pruned layer: read once whether the probe took a new
        selection; if so write it into every pruned layer's slot (an offloaded store on CUDA:
        the copies start now on a side stream, each layer waits only for its own)."""
        if not bool(self.selector.refreshed):
            return
        t0 = time.perf_counter()
        block = self.block
        if block.offload and block.work.device.type == "cuda":
            if self._copy_stream is None:
                self._copy_stream = torch.cuda.Stream(block.work.device)
            self._copy_stream.wait_stream(torch.cuda.current_stream(block.work.device))
            pruned = [layer for layer in self.layers if isinstance(layer, _PrunedLayer)]
            for layer, event in zip(pruned, block.prefetch(self._copy_stream)):
                layer.ready = event
        else:
            block.gather()
        block.rebuild_seconds += time.perf_counter() - t0

    @property
    def offloaded(self) -> bool:
        """Whether the pruned entries' store lives in host memory."""
        return self.block is not None and self.block.offload

    def make_static(self, like: "PrunedKVCache | None" = None) -> torch.Tensor:
        """Switch every layer to static-shape decoding (see the module docstring); returns the
        device step counter, which :meth:`advance` moves on after each step. ``like``: an earlier
        answer's static cache whose buffers this one took over; its step values (the device
        tensors its captured step reads) are taken over too, reset to this answer's lengths."""
        layers = self.kv_layers()  # a linear layer's state is updated in place already: static as it is
        with torch.inference_mode():  # the buffers were made under it
            self.static = like.static if like is not None else _StepValues(layers)
            self.steps = self.static.steps.zero_()
            lengths, _ = _groups(layers)
            for layer, group in zip(layers, lengths):
                layer.make_static(self.steps, self.static.bases[group], self.static.ats[group])
        return self.steps

    def layout_key(self) -> tuple:
        """What a captured static step bakes in about this cache: each layer's kind, capacity and
        buffer, which layers share a write index (a length) and which share a mask (a shape).
        Equal keys: one step serves both caches."""
        layers = self.kv_layers()
        lengths, shapes = _groups(layers)
        linear = tuple(layer.recurrent_states[0].data_ptr() for layer in self.layers if getattr(layer, "is_linear", 0))
        return linear + tuple((type(layer).__name__, layer.capacity, layer.keys.data_ptr(), length, shape)
                              for layer, length, shape in zip(layers, lengths, shapes))

    def begin_step(self) -> list[torch.Tensor | None]:
        """Static mode, before the layers of a step: each distinct write index ``steps + length``
        once, and each layer's additive attention mask [1, 1, 1, capacity] (0 where a key is in
        use after this step's write, -inf elsewhere; None for a linear layer), one per distinct
        shape (capacity and length: two under DyCoke, the plain and the pruned layers), shared by
        the layers of that shape. A float mask is what SDPA adds as it is (a boolean one it
        converts in every layer); its rows are MASK_ALIGN-aligned, and each starts a fresh
        buffer, as memory-efficient SDPA requires of a mask's address and strides."""
        values = self.static
        for base, at in zip(values.bases, values.ats):
            torch.add(self.steps, base, out=at)
        masks = [torch.where(positions <= values.ats[group], values.zero, values.minus_inf).view(1, 1, 1, -1)[..., :capacity]
                 for positions, capacity, group in values.shapes]  # rows of the aligned width, cut to the capacity
        shape_of = iter(values.shape_of)
        return [None if getattr(layer, "is_linear", False) else masks[next(shape_of)] for layer in self.layers]

    def advance(self) -> None:
        self.steps += 1

    def rebuild_seconds(self) -> float:
        return 0.0 if self.block is None else self.block.rebuild_seconds

    def kv_bytes(self) -> KVBytes:
        """Bytes held: attended on the device, and in the pruned-entry stores (and where)."""
        working = sum(layer.held_bytes() for layer in self.kv_layers())
        linear = sum(layer.held_bytes() for layer in self.layers if getattr(layer, "is_linear", False))
        store = sum(layer.store_bytes() for layer in self.layers if isinstance(layer, _PrunedLayer))
        offloaded = self.offloaded
        on_accelerator = any(layer.keys is not None and layer.keys.device.type != "cpu" for layer in self.kv_layers())
        # saved_on_device: what --offload-pruned took off the accelerator (a CPU's store is host memory anyway)
        moved = 0 if self.block is None else self.block.moved_bytes
        return KVBytes(working=working, store=store, store_on_host=offloaded,
                       device_total=working + linear + (0 if offloaded else store),
                       saved_on_device=store if offloaded and on_accelerator else 0, moved_to_device=moved,
                       linear_state=linear)


def _groups(layers) -> tuple[list[int], list[int]]:
    """Per layer, the rank of its length among the distinct lengths, and of its shape (capacity,
    length) among the distinct shapes: which layers share a write index, and which a mask."""
    lengths = sorted({layer.length for layer in layers})
    shapes = sorted({(layer.capacity, layer.length) for layer in layers})
    return ([lengths.index(layer.length) for layer in layers],
            [shapes.index((layer.capacity, layer.length)) for layer in layers])


class _StepValues:
    """The device values a static step reads, made once per kept step: the step count; per
    distinct length a base (that length) and the write index ``at`` [1] = steps + base; per
    distinct shape the positions ``arange`` of its capacity rounded up to MASK_ALIGN, the
    capacity and the length rank; and the mask's two values in the keys' dtype."""

    def __init__(self, layers):
        first = layers[0].keys
        device = first.device
        lengths, shapes = _groups(layers)
        self.steps = torch.zeros((), dtype=torch.long, device=device)
        self.bases = [torch.zeros(1, dtype=torch.long, device=device) for _ in set(lengths)]
        self.ats = [torch.zeros(1, dtype=torch.long, device=device) for _ in set(lengths)]
        self.shape_of = shapes
        self.shapes = []
        for shape in range(len(set(shapes))):
            layer, group = next((layer, g) for layer, g, s in zip(layers, lengths, shapes) if s == shape)
            width = -(-layer.capacity // MASK_ALIGN) * MASK_ALIGN
            self.shapes.append((torch.arange(width, device=device), layer.capacity, group))
        self.zero = torch.zeros((), dtype=first.dtype, device=device)
        self.minus_inf = torch.full((), float("-inf"), dtype=first.dtype, device=device)
