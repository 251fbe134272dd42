"""Which visual positions the pruned layers attend to: the selector contract and its two
implementations.

A selector is given, at its probed layer ``probe_layer`` (= ``prune_from - 1``), the current
query and the keys (see attention.py), and decides which visual positions layers
``>= prune_from`` see:

* :class:`DecodeSelector` (DyCoke, ``prunes == "decode"``): at each decoding step, the top
  ``keep`` visual positions by the head-averaged attention of the current token; re-selected
  only when the cosine similarity to the row the selection came from falls below the threshold.
  The pruned cache (cache.py) reads ``selection`` and ``version``.
* :class:`PrefillSelector` (FastV, ``prunes == "prefill"``): once, at prefill, the top ``keep``
  by the last prompt token's attention; the decoding loop drops the other hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..options import REFRESH_THRESHOLD
from ..values import visual_positions


class Selector(Protocol):
    """What the attention hook and the decoding loop need of a selector."""

    prunes: str  # "decode": per-step KV selection (PrunedKVCache); "prefill": one cut (drop_pruned)
    probe_layer: int  # the layer whose attention is observed
    prune_from: int  # the first layer that sees only the selection
    keep: int

    def observe(self, query: torch.Tensor, key: torch.Tensor, scaling: float,
                mask: torch.Tensor | None = None) -> None: ...


def last_query_attention(query: torch.Tensor, key: torch.Tensor, scaling: float,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention probabilities of one query over all keys, averaged over heads.

    query [1, H, 1, d] (the last query), key [1, KVH, S, d] (grouped-query heads share keys),
    mask (optional) broadcastable to [S], boolean (True = attend) or additive (0 or -inf): keys
    it excludes (the unused capacity of a static-shape cache) get no probability. -> [S] float32.
    """
    _, h, _, d = query.shape
    kvh = key.shape[1]
    q = query.float().reshape(kvh, h // kvh, d)  # heads grouped by the KV head they read
    scores = torch.einsum("gqd,gsd->gqs", q, key[0].float()) * scaling  # [KVH, group, S]
    if mask is not None and mask.dtype == torch.bool:
        scores = torch.where(mask.reshape(1, 1, -1), scores, float("-inf"))
    elif mask is not None:
        scores = scores + mask.reshape(1, 1, -1)
    return scores.softmax(dim=-1).mean(dim=(0, 1))


def ascending_topk(row: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` highest positions of ``row``, ascending [keep] (static shape, no host sync)."""
    return torch.sort(torch.topk(row, keep, sorted=False).indices).values


class BalancedTopk:
    """Top-``keep`` positions of a row with a share reserved for every frame.

    ``coverage`` of the budget is spread evenly: each frame first gets its
    ``floor(coverage * keep / frames)`` highest-attention positions; the rest of the budget goes
    to the highest remaining positions overall. ``coverage = 0`` is plain top-k (the paper's
    rule). Not in the paper: plain top-k by one token's attention can drop whole frames at the
    step that decides whether the answer goes on (NOTES section 5); this keeps every frame in
    view. The frames' layout is read once, here; a call is static-shape tensor work with no
    host sync (a padded [frames, longest] gather, two top-k, one stable sort).
    """

    def __init__(self, keep: int, frame_of: torch.Tensor, coverage: float):
        frame_of = frame_of.cpu()
        total = frame_of.numel()
        frames, sizes = torch.unique(frame_of, return_counts=True)
        self.keep = keep
        self.per_frame = min(int(coverage * keep // len(frames)), int(sizes.max()))
        groups = torch.full((len(frames), int(sizes.max())), total)  # padding points at a -inf slot
        for g, f in enumerate(frames.tolist()):
            where = torch.nonzero(frame_of == f).flatten()
            groups[g, : len(where)] = where
        self.groups = groups
        self.rest = keep - int(sizes.clamp(max=self.per_frame).sum())  # a constant: no count at run time

    def __call__(self, row: torch.Tensor) -> torch.Tensor:
        # the chosen positions in ascending order: exactly `keep` of them, so a static shape
        return torch.argsort((~self.chosen(row)).to(torch.uint8), stable=True)[: self.keep]

    def chosen(self, rows: torch.Tensor) -> torch.Tensor:
        """bool [..., total]: the ``keep`` positions the rule picks in each row [..., total] (any
        leading dimensions: the training recipe applies it to every answer position at once)."""
        lead, total = rows.shape[:-1], rows.shape[-1]
        chosen = torch.zeros(*lead, total + 1, dtype=torch.bool, device=rows.device)
        if self.per_frame > 0:
            padded = torch.cat([rows, rows.new_full((*lead, 1), float("-inf"))], dim=-1)
            if self.groups.device != rows.device:
                self.groups = self.groups.to(rows.device)  # once: a step copies nothing from the host
            groups = self.groups
            best = torch.topk(padded[..., groups], self.per_frame, dim=-1, sorted=False).indices
            # a frame's padding lands on the extra slot
            chosen.scatter_(-1, groups.expand(*lead, -1, -1).gather(-1, best).flatten(-2), True)
        chosen = chosen[..., :total]
        if self.rest > 0:
            top = torch.topk(rows.masked_fill(chosen, float("-inf")), self.rest, dim=-1, sorted=False).indices
            chosen.scatter_(-1, top, True)
        return chosen


@dataclass
class SelectionCounts:
    steps: int = 0  # decoding steps observed
    selections: int = 0  # times a selection was computed (the first one included)
    refreshes: int = 0  # recomputations after the first, triggered by the similarity rule
    recalled: int = 0  # visual entries that came back after having been pruned


class DecodeSelector:
    """DyCoke's dynamic selection of visual KV entries (see the module docstring).

    For static decoding (``branch_free``) the rule runs on the device with no host sync: every step computes the
    candidate selection and the similarity to the reference row, and keeps the old selection
    and reference where the similarity is at or above the threshold (``torch.where``). The
    selection, reference and counters are tensors updated in place, so a decoding step can be
    captured once as a CUDA graph and replayed. ``refreshed`` tells whether the last step took
    a new selection; ``counts`` reads the counters (one transfer; at the end, or with the token).
    The eager loop reads the similarity on the host and skips the top-k of a stable step; the
    selections, and so the tokens, are the same.

    Args:
        prune_from: the first pruned layer L; attention is probed at layer ``probe_layer``: L - 1,
            or on a hybrid stack the last full-attention layer before L (its linear layers have none).
        span: (start, end) of the visual tokens in the prefill sequence, or a VisualSpan whose
            visual tokens have text between them (only visual positions are ever pruned).
        keep: visual entries layers >= L attend to at each step.
        threshold: refresh when cos(current row, reference row) < threshold.
    """

    prunes = "decode"

    def __init__(self, prune_from: int, span: tuple[int, int], keep: int, threshold: float = REFRESH_THRESHOLD,
                 frame_of: torch.Tensor | None = None, coverage: float = 0.0, probe_layer: int | None = None):
        if prune_from < 1:
            raise ValueError("the pruning layer must be >= 1 (layer L - 1 is probed)")
        if coverage > 0 and frame_of is None:
            raise ValueError("coverage needs frame_of (the frame of each visual position)")
        self.probe_layer = prune_from - 1 if probe_layer is None else probe_layer
        self.prune_from = prune_from
        self.layout = _VisualIndex(span)
        self.start, self.end, self.total = self.layout.start, self.layout.end, self.layout.total
        self.keep = keep
        self.threshold = threshold
        self._candidates = BalancedTopk(keep, frame_of, coverage) if coverage > 0 else None
        self.started = False  # a decoding step has been observed (host-side: set once)
        self.branch_free = False  # set by static decoding: no host read inside a step
        self.selection: torch.Tensor | None = None  # ascending visual offsets [keep], updated in place
        self.reference: torch.Tensor | None = None  # the row the selection came from [total]
        self.refreshed: torch.Tensor | None = None  # bool []: the last step took a new selection
        self.counters: torch.Tensor | None = None  # int64 [4]: steps, selections, refreshes, recalled

    @property
    def counts(self) -> SelectionCounts:
        """The counters, read from the device (a host sync: read them at the end)."""
        if self.counters is None:
            return SelectionCounts()
        return SelectionCounts(*self.counters.tolist())

    def observe(self, query: torch.Tensor, key: torch.Tensor, scaling: float,
                mask: torch.Tensor | None = None) -> None:
        """The probed layer's attention: query [1, H, q, d], key [1, KVH, S, d], mask (static
        shapes) True where a key is in use."""
        if query.shape[2] != 1:
            return  # prefill (many queries) is never pruned; decode steps have one query
        self.observe_row(self.layout.take(last_query_attention(query, key, scaling, mask)))

    def candidates(self, row: torch.Tensor) -> torch.Tensor:
        return ascending_topk(row, self.keep) if self._candidates is None else self._candidates(row)

    def observe_row(self, row: torch.Tensor) -> None:
        """Apply the refresh rule to one step's visual attention row [total], on the device."""
        if self.counters is None:
            self._allocate(row.device)
        similarity = torch.nn.functional.cosine_similarity(row, self.reference, dim=0)
        if not self.branch_free and self.started and similarity.item() >= self.threshold:
            self.counters[0] += 1  # eager steps may branch on the host: a stable step costs no top-k
            self.refreshed.fill_(False)
            return
        candidate = self.candidates(row)
        has_reference = self.counters[1] > 0  # a selection exists
        again = (similarity < self.threshold) & has_reference  # a refresh after the first selection
        refresh = again | ~has_reference
        member = torch.zeros(self.total, dtype=torch.bool, device=row.device).index_fill_(0, self.selection, True)
        recalled = (~member[candidate]).sum() * again
        self.counters[0] += 1
        self.counters[1:] += torch.stack([refresh, again, recalled])
        # in place (out= the tensor itself): the addresses a captured step reads stay the same
        torch.where(refresh, candidate, self.selection, out=self.selection)
        torch.where(refresh, row, self.reference, out=self.reference)
        self.refreshed.copy_(refresh)  # what the cache reads: it rewrites the slots only after a refresh
        self.started = True

    def same_rule(self, other: "DecodeSelector") -> bool:
        """Whether a step captured with ``other`` runs this selector's rule: the same layers,
        budget, threshold and visual layout (a captured step bakes them in)."""
        mine, theirs = self._candidates, other._candidates
        return (type(other) is DecodeSelector and other.counters is not None
                and (self.probe_layer, self.keep, self.threshold) == (other.probe_layer, other.keep, other.threshold)
                and torch.equal(self.layout.where, other.layout.where)
                and (mine is None) == (theirs is None)
                and (mine is None or ((mine.per_frame, mine.rest) == (theirs.per_frame, theirs.rest)
                                      and torch.equal(mine.groups.cpu(), theirs.groups.cpu()))))

    def continue_from(self, other: "DecodeSelector") -> None:
        """Take over ``other``'s device state (selection, reference, counters), reset as a fresh
        selector's: a step captured with ``other`` then runs this selector's answer."""
        other.selection.zero_()
        other.reference.zero_()
        other.refreshed.fill_(False)
        other.counters.zero_()
        self.selection, self.reference, self.refreshed, self.counters = (
            other.selection, other.reference, other.refreshed, other.counters)
        self.branch_free = True

    def _allocate(self, device) -> None:
        self.selection = torch.zeros(self.keep, dtype=torch.long, device=device)
        self.reference = torch.zeros(self.total, dtype=torch.float32, device=device)
        self.refreshed = torch.zeros((), dtype=torch.bool, device=device)
        self.counters = torch.zeros(4, dtype=torch.long, device=device)


class PrefillSelector:
    """FastV-style one-shot selection (the static baseline): at prefill, at layer ``layer - 1``,
    keep the ``keep`` visual tokens the last prompt token attends to most; the decoding loop
    drops the others' hidden states before layer ``layer``, for all later layers and steps."""

    prunes = "prefill"

    def __init__(self, prune_from: int, span: tuple[int, int], keep: int, probe_layer: int | None = None):
        if prune_from < 1:
            raise ValueError("the pruning layer must be >= 1")
        self.probe_layer = prune_from - 1 if probe_layer is None else probe_layer
        self.prune_from = prune_from
        self.layout = _VisualIndex(span)
        self.start, self.end, self.total = self.layout.start, self.layout.end, self.layout.total
        self.keep = keep
        self.selection: torch.Tensor | None = None

    def observe(self, query: torch.Tensor, key: torch.Tensor, scaling: float,
                mask: torch.Tensor | None = None) -> None:
        """A prefill's probed layer; in a chunked prefill the last chunk (the prompt's last
        query, over every key) runs last and decides."""
        if query.shape[2] == 1 or key.shape[2] < self.end:
            return  # a decoding step, or an early chunk that has not reached the video's end
        if mask is not None:
            mask = mask[..., -1, :]  # the last query's row of a chunk's mask
        row = self.layout.take(last_query_attention(query[:, :, -1:], key, scaling, mask))
        self.selection = ascending_topk(row, self.keep)

    def kept_positions(self, seq_len: int, device) -> torch.Tensor:
        """Sequence positions that survive, ascending: every text position and the selection."""
        if self.layout.contiguous:
            return torch.cat([
                torch.arange(self.start, device=device),
                self.selection.to(device) + self.start,
                torch.arange(self.end, seq_len, device=device),
            ])
        keep = torch.ones(seq_len, dtype=torch.bool, device=device)
        keep[self.layout.where.to(device)] = False
        keep[self.layout.where.to(device)[self.selection.to(device)]] = True
        return torch.nonzero(keep).flatten()


class _VisualIndex:
    """The visual positions of a prompt, as selectors and the pruned cache read them: a slice
    when they form one block, an index (moved to the attention's device once) otherwise."""

    def __init__(self, span):
        self.where = visual_positions(span).cpu().long()
        self.start, self.end = int(self.where[0]), int(self.where[-1]) + 1
        self.total = int(self.where.numel())
        self.contiguous = self.total == self.end - self.start
        self._on: dict = {}

    def on(self, device) -> torch.Tensor:
        """``where`` on ``device`` (copied once per device: a step copies nothing from the host)."""
        key = str(device)
        if key not in self._on:
            self._on[key] = self.where.to(device)
        return self._on[key]

    def take(self, row: torch.Tensor) -> torch.Tensor:
        """The visual entries of a row over prompt positions (and any after them)."""
        return row[self.start : self.end] if self.contiguous else row.index_select(0, self.on(row.device))

    def text_after_start(self, seq: int, device) -> torch.Tensor | slice:
        """Positions in ``[start, seq)`` that are not visual: the text the pruned layers keep after
        their selected slot (a slice for one block of visual tokens)."""
        if self.contiguous:
            return slice(self.end, seq)
        text = torch.ones(seq - self.start, dtype=torch.bool)
        text[self.where - self.start] = False
        return (torch.nonzero(text).flatten() + self.start).to(device)

