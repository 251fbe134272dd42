"""The KV cache of the decoding loop; every cache internal of the project lives here.

Layers ``< L`` hold everything in a preallocated buffer (appending writes in place).
After the prefill, :meth:`PrunedKVCache.make_static` switches every layer to static shapes
for the decoding steps: a step writes its keys at a device index (``base + steps``) and
attention reads the whole capacity under a length mask (:meth:`PrunedKVCache.step_masks`), so
the step has the same shapes and addresses every time and can be captured as a CUDA graph. With a
:class:`~.selectors.DecodeSelector`, each layer ``>= L`` keeps a compact working buffer
``[text before | selected visual slot | everything after]`` that attention reads directly,
plus a store of every visual entry. The slot is rewritten only when the selection changes (one
gather per layer per refresh), never copied per step. With ``offload=True`` the store lives in
host memory (the accelerator holds only what is attended). Pruned entries stay in the store
and come back when a later selection ranks them high again.
"""

from __future__ import annotations

import time

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..results import KVBytes
from .attention import ATTENTION_NAME
from .selectors import DecodeSelector


class _BufferLayer(CacheLayerMixin):
    """A preallocated full layer: appending writes in place; attention reads a view."""

    is_sliding = False

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self.steps: torch.Tensor | None = None  # static mode: the shared device count of decoding steps

    def lazy_initialization(self, key_states, value_states):
        b, h, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty(b, h, self.capacity, d)
        self.values = value_states.new_empty(b, h, self.capacity, d)
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

    def make_static(self, steps: torch.Tensor) -> None:
        """From now on one token per update, written at ``length + steps`` (a device index)."""
        if self.length + 1 > self.capacity:
            raise RuntimeError(f"KV cache full ({self.capacity} positions)")
        # The unused capacity is read under the mask: zeros, never stale memory (a NaN there
        # would reach the output through 0 * NaN).
        self.keys[:, :, self.length :].zero_()
        self.values[:, :, self.length :].zero_()
        self.steps = steps

    def _write_static(self, k, v):
        at = (self.steps + self.length).view(1)
        self.keys.index_copy_(2, at, k)
        self.values.index_copy_(2, at, v)
        return self.keys, self.values

    def step_mask(self) -> torch.Tensor:
        """Static mode: the keys in use after this step's write, [1, 1, 1, capacity] (True = attend)."""
        used = torch.arange(self.capacity, device=self.steps.device) <= self.steps + self.length
        return used.view(1, 1, 1, -1)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def held_bytes(self) -> int:
        return 0 if self.keys is None else 2 * self.keys[:, :, : self.length].numel() * self.keys.element_size()


class _PrunedLayer(_BufferLayer):
    """A layer >= L: working buffer [before | selected slot | after] plus the visual store."""

    def __init__(self, capacity: int, selector: DecodeSelector, offload: bool):
        super().__init__(capacity)
        self.selector = selector
        self.offload_store = offload  # (not `offload`: that name is a method of the base class)
        self.store_k: torch.Tensor | None = None
        self.store_v: torch.Tensor | None = None
        self.seen = 0  # positions this layer has been given (its logical length)
        self.rebuild_seconds = 0.0  # writing selections into the working buffer
        self.pending = False  # eager: this step took a new selection, not yet in the slot
        self.ready: torch.cuda.Event | None = None  # an offloaded slot's copy in flight (CUDA)
        self.staging: tuple[torch.Tensor, torch.Tensor] | None = None  # pinned host buffers for that copy
        self.moved_bytes = 0  # bytes copied from an offloaded store to the accelerator

    def update(self, key_states, value_states, *args, **kwargs):
        sel = self.selector
        if self.steps is not None:
            self._gather_slot()  # branch-free: the selection this step's probe kept or replaced
            return self._write_static(key_states, value_states)
        if not self.is_initialized:
            # Prefill: attention sees everything; file the visual part in the store and leave
            # a slot of `keep` entries for the selection between the text before and after.
            s = key_states.shape[2]
            self.capacity = self.capacity - sel.total + sel.keep
            self.lazy_initialization(key_states, value_states)
            store_device = "cpu" if self.offload_store else key_states.device
            pin = self.offload_store and key_states.device.type == "cuda"
            self.store_k = key_states[:, :, sel.start : sel.end].to(store_device, copy=True)
            self.store_v = value_states[:, :, sel.start : sel.end].to(store_device, copy=True)
            if pin:
                self.store_k, self.store_v = self.store_k.pin_memory(), self.store_v.pin_memory()
            self._append(key_states[:, :, : sel.start], value_states[:, :, : sel.start])
            self.length += sel.keep  # the slot, filled at the first selection
            self._append(key_states[:, :, sel.end :], value_states[:, :, sel.end :])
            self.seen = s
            return key_states, value_states
        if not sel.started:
            if key_states.shape[2] == 1:
                raise RuntimeError("pruned KV layer: no selection arrived before a decoding step (the probing "
                                   f"attention '{ATTENTION_NAME}' must run at layer {sel.probe_layer})")
            # More prompt after a prefix computed earlier (the question after a reused video):
            # the prefill sees every visual entry, as a one-piece prefill would.
            self._append(key_states, value_states)
            self.seen += key_states.shape[2]
            return self._everything()
        if key_states.shape[2] == 1 and self.pending:  # eager: the cache read the decision once a step
            self._rebuild_slot()
            self.pending = False
        self._append(key_states, value_states)
        self.seen += key_states.shape[2]
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def _everything(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[before | every visual entry | after], in position order (a copy: prefill only)."""
        a, b = self.selector.start, self.selector.start + self.selector.keep
        k, v = self.keys, self.values
        return (torch.cat([k[:, :, :a], self.store_k.to(self.device), k[:, :, b : self.length]], dim=2),
                torch.cat([v[:, :, :a], self.store_v.to(self.device), v[:, :, b : self.length]], dim=2))

    def _rebuild_slot(self) -> None:
        t0 = time.perf_counter()
        if self.ready is not None:  # copied ahead on the side stream: wait for it on the device only
            torch.cuda.current_stream(self.device).wait_event(self.ready)
            self.ready = None
        else:
            self._gather_slot()
        self.rebuild_seconds += time.perf_counter() - t0

    def prefetch(self, idx: torch.Tensor, stream) -> None:
        """An offloaded store on a CUDA model: gather the selection ``idx`` (host) into pinned
        staging buffers and copy them into the slot on ``stream``, so the copy overlaps the
        layers before this one; :meth:`_rebuild_slot` makes the compute stream wait for it."""
        sel = self.selector
        a, b = sel.start, sel.start + sel.keep
        if self.staging is None:
            shape = (*self.store_k.shape[:2], sel.keep, self.store_k.shape[3])
            self.staging = tuple(torch.empty(shape, dtype=self.store_k.dtype, pin_memory=True) for _ in range(2))
        torch.index_select(self.store_k, 2, idx, out=self.staging[0])
        torch.index_select(self.store_v, 2, idx, out=self.staging[1])
        with torch.cuda.stream(stream):
            self.keys[:, :, a:b].copy_(self.staging[0], non_blocking=True)
            self.values[:, :, a:b].copy_(self.staging[1], non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(stream)
        self.moved_bytes += 2 * self.staging[0].numel() * self.staging[0].element_size()

    def _gather_slot(self) -> None:
        """Write the selected visual entries into the working buffer's slot."""
        sel = self.selector
        idx = sel.selection.to(self.store_k.device)
        a, b = sel.start, sel.start + sel.keep
        self.keys[:, :, a:b] = self.store_k.index_select(2, idx).to(self.device)
        self.values[:, :, a:b] = self.store_v.index_select(2, idx).to(self.device)
        if self.store_k.device != self.keys.device:
            self.moved_bytes += 2 * self.keys[:, :, a:b].numel() * self.keys.element_size()

    def make_static(self, steps: torch.Tensor) -> None:
        if self.offload_store:
            raise RuntimeError("static decoding reads the visual store on the device; it is offloaded")
        super().make_static(steps)

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
    """

    def __init__(self, num_layers: int, capacity: int, selector: DecodeSelector | None = None,
                 offload: bool = False, reduced: tuple[int, int] | None = None):
        layers: list[CacheLayerMixin] = []
        for i in range(num_layers):
            if selector is not None and i >= selector.prune_from:
                layers.append(_PrunedLayer(capacity, selector, offload))
            elif reduced is not None and i >= reduced[0]:
                layers.append(_BufferLayer(reduced[1]))  # a one-shot pruner left fewer tokens here
            else:
                layers.append(_BufferLayer(capacity))
        super().__init__(layers=layers)
        self.selector = selector
        self.steps: torch.Tensor | None = None  # static mode's device step counter
        self._copy_stream = None  # CUDA: where an offloaded store's slots are copied

    def load_prefix(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Fill every layer with a prompt prefix's keys and values [1, KVH, P, d] computed earlier
        (it must hold the whole visual span): as if the model had just prefilled it."""
        for layer, k, v in zip(self.layers, keys, values):
            layer.update(k, v)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        sel = self.selector
        if (sel is not None and layer_idx == sel.prune_from and self.steps is None and sel.started
                and key_states.shape[2] == 1):
            self._take_selection()
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _take_selection(self) -> None:
        """Eager step, at the first pruned layer: read once whether the probe took a new
        selection; if so every pruned layer rewrites its slot (an offloaded store on CUDA:
        all copies start now on a side stream, each layer waits only for its own)."""
        if not bool(self.selector.refreshed):
            return
        pruned = [layer for layer in self.layers if isinstance(layer, _PrunedLayer)]
        for layer in pruned:
            layer.pending = True
        if pruned[0].keys.device.type == "cuda" and self.offloaded:
            if self._copy_stream is None:
                self._copy_stream = torch.cuda.Stream(pruned[0].keys.device)
            self._copy_stream.wait_stream(torch.cuda.current_stream(pruned[0].keys.device))
            idx = self.selector.selection.cpu()
            for layer in pruned:
                layer.prefetch(idx, self._copy_stream)

    @property
    def offloaded(self) -> bool:
        """Whether the pruned entries' store lives in host memory."""
        return any(isinstance(layer, _PrunedLayer) and layer.offload_store for layer in self.layers)

    def make_static(self) -> torch.Tensor:
        """Switch every layer to static-shape decoding (see the module docstring); returns the
        device step counter, which :meth:`advance` moves on after each step."""
        device = self.layers[0].keys.device
        with torch.inference_mode():  # the buffers were made under it
            self.steps = torch.zeros((), dtype=torch.long, device=device)
            for layer in self.layers:
                layer.make_static(self.steps)
        return self.steps

    def step_masks(self) -> list[torch.Tensor]:
        """Static mode: each layer's attention mask for this step (one tensor per distinct layout)."""
        masks: dict[tuple[int, int], torch.Tensor] = {}
        return [masks.setdefault((layer.length, layer.capacity), layer.step_mask()) for layer in self.layers]

    def advance(self) -> None:
        self.steps += 1

    def rebuild_seconds(self) -> float:
        return sum(layer.rebuild_seconds for layer in self.layers if isinstance(layer, _PrunedLayer))

    def kv_bytes(self) -> KVBytes:
        """Bytes held: attended on the device, and in the pruned-entry stores (and where)."""
        working = sum(layer.held_bytes() for layer in self.layers)
        store = sum(layer.store_bytes() for layer in self.layers if isinstance(layer, _PrunedLayer))
        offloaded = self.offloaded
        on_accelerator = any(layer.keys is not None and layer.keys.device.type != "cpu" for layer in self.layers)
        # saved_on_device: what --offload-pruned took off the accelerator (a CPU's store is host memory anyway)
        moved = sum(layer.moved_bytes for layer in self.layers if isinstance(layer, _PrunedLayer))
        return KVBytes(working=working, store=store, store_on_host=offloaded,
                       device_total=working + (0 if offloaded else store),
                       saved_on_device=store if offloaded and on_accelerator else 0, moved_to_device=moved)
