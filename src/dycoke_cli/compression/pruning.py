"""Stage 2 of DyCoke: dynamic pruning of the KV cache while decoding.

All cache internals live in this file. Pieces:

* ``register_attention()`` registers ``dycoke_sdpa`` with transformers' AttentionInterface:
  plain SDPA, except that at the one probed layer it also computes the head-averaged
  attention row of the last query over the visual positions (one [1, S] row, never a full map)
  and hands it to the active selector.
* ``DecodeSelector`` implements the paper's rule: at each decoding step, take that row at layer
  ``L - 1``; keep the top ``(1 - P)`` visual positions; recompute the selection only when the
  cosine similarity between this step's row and the row the current selection came from falls
  below ``threshold``, otherwise reuse it. Pruned entries stay in a store and come back when a
  later selection ranks them high again (counted as recalls).
* ``PrunedKVCache``: layers ``< L`` hold everything; each layer ``>= L`` keeps a compact
  working buffer ``[text before | selected visual slot | everything after]`` that attention
  reads directly, plus the store of all visual entries. The slot is rewritten only when the
  selection changes (one gather per layer per refresh), never copied per step. With
  ``offload=True`` the store lives in host memory (the accelerator holds only what is attended).
  Buffers are preallocated, so appending a token is an in-place write, not a concatenation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

ATTENTION_NAME = "dycoke_sdpa"
_registered = False


def register_attention() -> None:
    """Register the probing SDPA attention (and its mask function) with transformers, once."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def dycoke_sdpa(module, query, key, value, attention_mask, **kwargs):
        probe = kwargs.pop("dycoke_probe", None)
        if probe is not None and getattr(module, "layer_idx", None) == probe.layer:
            probe.observe(query, key, kwargs.get("scaling") or query.shape[-1] ** -0.5)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(ATTENTION_NAME, dycoke_sdpa)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    _registered = True


def last_query_attention(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention probabilities of one query over all keys, averaged over heads.

    query [1, H, 1, d] (the last query), key [1, KVH, S, d] (grouped-query heads share keys) -> [S] float32.
    """
    _, h, _, d = query.shape
    kvh = key.shape[1]
    q = query.float().reshape(kvh, h // kvh, d)  # heads grouped by the KV head they read
    scores = torch.einsum("gqd,gsd->gqs", q, key[0].float()) * scaling  # [KVH, group, S]
    return scores.softmax(dim=-1).mean(dim=(0, 1))


def balanced_topk(row: torch.Tensor, keep: int, frame_of: torch.Tensor, coverage: float) -> torch.Tensor:
    """Top-``keep`` positions of ``row`` with a share reserved for every frame.

    ``coverage`` of the budget is spread evenly: each frame first gets its
    ``floor(coverage * keep / frames)`` highest-attention positions; the rest of the budget goes
    to the highest remaining positions overall. ``coverage = 0`` is plain top-k (the paper's
    rule). Not in the paper: plain top-k by one token's attention can drop whole frames at the
    step that decides whether the answer goes on (NOTES section 5); this keeps every frame in
    view. Returns ascending positions [keep].
    """
    frames = torch.unique(frame_of)
    per_frame = int(coverage * keep // len(frames))
    chosen = torch.zeros_like(row, dtype=torch.bool)
    if per_frame > 0:
        for f in frames.tolist():
            where = torch.nonzero(frame_of == f).flatten()
            best = torch.topk(row[where], min(per_frame, len(where)), sorted=False).indices
            chosen[where[best]] = True
    rest = keep - int(chosen.sum())
    if rest > 0:
        remaining = row.masked_fill(chosen, float("-inf"))
        chosen[torch.topk(remaining, rest, sorted=False).indices] = True
    return torch.nonzero(chosen).flatten()


@dataclass
class SelectorStats:
    steps: int = 0  # decoding steps observed
    selections: int = 0  # times a selection was computed (the first one included)
    refreshes: int = 0  # recomputations after the first, triggered by the similarity rule
    recalled: int = 0  # visual entries that came back after having been pruned
    rebuild_seconds: float = 0.0  # time spent writing selected entries into working buffers

    def to_dict(self) -> dict:
        return {
            "steps": self.steps,
            "selections": self.selections,
            "refreshes": self.refreshes,
            "recalled": self.recalled,
            "rebuild_ms": round(self.rebuild_seconds * 1000, 3),
        }


class DecodeSelector:
    """DyCoke's dynamic selection of visual KV entries (see the module docstring).

    Args:
        layer: the first pruned layer L; attention is probed at layer L - 1.
        span: (start, end) of the visual tokens in the prefill sequence.
        keep: visual entries layers >= L attend to at each step.
        threshold: refresh when cos(current row, reference row) < threshold.
    """

    def __init__(self, layer: int, span: tuple[int, int], keep: int, threshold: float = 0.9,
                 frame_of: torch.Tensor | None = None, coverage: float = 0.0):
        if layer < 1:
            raise ValueError("the pruning layer must be >= 1 (layer L - 1 is probed)")
        if coverage > 0 and frame_of is None:
            raise ValueError("coverage needs frame_of (the frame of each visual position)")
        self.frame_of = frame_of
        self.coverage = coverage
        self.layer = layer - 1  # the probed layer; read by the attention function
        self.prune_from = layer
        self.start, self.end = span
        self.keep = keep
        self.threshold = threshold
        self.selection: torch.Tensor | None = None  # ascending visual offsets, [keep]
        self.reference: torch.Tensor | None = None  # the row the selection came from
        self.version = 0  # bumped at every new selection; layers compare with theirs
        self.last_row: torch.Tensor | None = None
        self.stats = SelectorStats()

    @property
    def total(self) -> int:
        return self.end - self.start

    def observe(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        if query.shape[2] != 1:
            return  # prefill (many queries) is never pruned; decode steps have one query
        row = last_query_attention(query, key, scaling)[self.start : self.end]
        self.observe_row(row)

    def observe_row(self, row: torch.Tensor) -> None:
        """Apply the refresh rule to one step's visual attention row [total]."""
        self.stats.steps += 1
        self.last_row = row
        if self.reference is not None:
            similarity = torch.nn.functional.cosine_similarity(row, self.reference, dim=0).item()
            if similarity >= self.threshold:
                return  # stable attention: reuse the current selection
            self.stats.refreshes += 1
        self._select(row)

    def _select(self, row: torch.Tensor) -> None:
        if self.coverage > 0:
            new = balanced_topk(row, self.keep, self.frame_of.to(row.device), self.coverage)
        else:
            new = torch.sort(torch.topk(row, self.keep, sorted=False).indices).values
        if self.selection is not None:
            self.stats.recalled += int((~torch.isin(new, self.selection)).sum())
        self.selection = new
        self.reference = row
        self.version += 1
        self.stats.selections += 1


class PrefillSelector:
    """FastV-style one-shot selection (the static baseline): at prefill, at layer ``layer - 1``,
    keep the ``keep`` visual tokens the last prompt token attends to most; the decoding loop
    drops the others' hidden states before layer ``layer``, for all later layers and steps."""

    def __init__(self, layer: int, span: tuple[int, int], keep: int):
        if layer < 1:
            raise ValueError("the pruning layer must be >= 1")
        self.layer = layer - 1
        self.prune_from = layer
        self.start, self.end = span
        self.keep = keep
        self.selection: torch.Tensor | None = None

    @property
    def total(self) -> int:
        return self.end - self.start

    def observe(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        if query.shape[2] == 1 or self.selection is not None:
            return
        row = last_query_attention(query[:, :, -1:], key, scaling)[self.start : self.end]
        self.selection = torch.sort(torch.topk(row, self.keep, sorted=False).indices).values

    def kept_positions(self, seq_len: int, device) -> torch.Tensor:
        """Sequence positions that survive: text before, the selection, everything after."""
        return torch.cat([
            torch.arange(self.start, device=device),
            self.selection.to(device) + self.start,
            torch.arange(self.end, seq_len, device=device),
        ])


class _BufferLayer(CacheLayerMixin):
    """A preallocated full layer: appending writes in place; attention reads a view."""

    is_sliding = False

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

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
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._append(key_states, value_states)
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

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
        self.version = 0
        self.store_k: torch.Tensor | None = None
        self.store_v: torch.Tensor | None = None
        self.seen = 0  # positions this layer has been given (its logical length)

    def update(self, key_states, value_states, *args, **kwargs):
        sel = self.selector
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
        if sel.selection is None:
            raise RuntimeError("pruned KV layer: no selection arrived before a decoding step (the probing "
                               f"attention '{ATTENTION_NAME}' must run at layer {sel.layer}; see register_attention)")
        if self.version != sel.version:
            self._rebuild_slot()
        self._append(key_states, value_states)
        self.seen += key_states.shape[2]
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def _rebuild_slot(self) -> None:
        sel = self.selector
        t0 = time.perf_counter()
        idx = sel.selection.to(self.store_k.device)
        a, b = sel.start, sel.start + sel.keep
        self.keys[:, :, a:b] = self.store_k.index_select(2, idx).to(self.device, non_blocking=True)
        self.values[:, :, a:b] = self.store_v.index_select(2, idx).to(self.device, non_blocking=True)
        self.version = sel.version
        sel.stats.rebuild_seconds += time.perf_counter() - t0

    def get_seq_length(self) -> int:
        return self.seen

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

    def kv_bytes(self) -> dict:
        """Bytes held: attended on the device, and in the pruned-entry stores (and where)."""
        working = sum(layer.held_bytes() for layer in self.layers)
        store = sum(layer.store_bytes() for layer in self.layers if isinstance(layer, _PrunedLayer))
        offloaded = any(isinstance(layer, _PrunedLayer) and layer.offload_store for layer in self.layers)
        on_accelerator = any(layer.keys is not None and layer.keys.device.type != "cpu" for layer in self.layers)
        return {
            "working": working,
            "store": store,
            "store_on_host": offloaded,
            "device_total": working + (0 if offloaded else store),
            # what --offload-pruned took off the accelerator (on a CPU the store is host memory anyway)
            "saved_on_device": store if offloaded and on_accelerator else 0,
        }
