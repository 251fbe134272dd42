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


class Selector(Protocol):
    """What the attention hook and the decoding loop need of a selector."""

    prunes: str  # "decode": per-step KV selection (PrunedKVCache); "prefill": one cut (drop_pruned)
    probe_layer: int  # the layer whose attention is observed
    prune_from: int  # the first layer that sees only the selection
    keep: int

    def observe(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None: ...


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
class SelectionCounts:
    steps: int = 0  # decoding steps observed
    selections: int = 0  # times a selection was computed (the first one included)
    refreshes: int = 0  # recomputations after the first, triggered by the similarity rule
    recalled: int = 0  # visual entries that came back after having been pruned


class DecodeSelector:
    """DyCoke's dynamic selection of visual KV entries (see the module docstring).

    Args:
        prune_from: the first pruned layer L; attention is probed at layer ``probe_layer`` = L - 1.
        span: (start, end) of the visual tokens in the prefill sequence.
        keep: visual entries layers >= L attend to at each step.
        threshold: refresh when cos(current row, reference row) < threshold.
    """

    prunes = "decode"

    def __init__(self, prune_from: int, span: tuple[int, int], keep: int, threshold: float = REFRESH_THRESHOLD,
                 frame_of: torch.Tensor | None = None, coverage: float = 0.0):
        if prune_from < 1:
            raise ValueError("the pruning layer must be >= 1 (layer L - 1 is probed)")
        if coverage > 0 and frame_of is None:
            raise ValueError("coverage needs frame_of (the frame of each visual position)")
        self.frame_of = frame_of
        self.coverage = coverage
        self.probe_layer = prune_from - 1
        self.prune_from = prune_from
        self.start, self.end = span
        self.keep = keep
        self.threshold = threshold
        self.selection: torch.Tensor | None = None  # ascending visual offsets, [keep]
        self.reference: torch.Tensor | None = None  # the row the selection came from
        self.version = 0  # bumped at every new selection; layers compare with theirs
        self.last_row: torch.Tensor | None = None
        self.counts = SelectionCounts()

    @property
    def total(self) -> int:
        return self.end - self.start

    def observe(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """The probed layer's attention: query [1, H, q, d], key [1, KVH, S, d]."""
        if query.shape[2] != 1:
            return  # prefill (many queries) is never pruned; decode steps have one query
        row = last_query_attention(query, key, scaling)[self.start : self.end]
        self.observe_row(row)

    def observe_row(self, row: torch.Tensor) -> None:
        """Apply the refresh rule to one step's visual attention row [total]."""
        self.counts.steps += 1
        self.last_row = row
        if self.reference is not None:
            similarity = torch.nn.functional.cosine_similarity(row, self.reference, dim=0).item()
            if similarity >= self.threshold:
                return  # stable attention: reuse the current selection
            self.counts.refreshes += 1
        self._select(row)

    def _select(self, row: torch.Tensor) -> None:
        if self.coverage > 0:
            new = balanced_topk(row, self.keep, self.frame_of.to(row.device), self.coverage)
        else:
            new = torch.sort(torch.topk(row, self.keep, sorted=False).indices).values
        if self.selection is not None:
            self.counts.recalled += int((~torch.isin(new, self.selection)).sum())
        self.selection = new
        self.reference = row
        self.version += 1
        self.counts.selections += 1


class PrefillSelector:
    """FastV-style one-shot selection (the static baseline): at prefill, at layer ``layer - 1``,
    keep the ``keep`` visual tokens the last prompt token attends to most; the decoding loop
    drops the others' hidden states before layer ``layer``, for all later layers and steps."""

    prunes = "prefill"

    def __init__(self, prune_from: int, span: tuple[int, int], keep: int):
        if prune_from < 1:
            raise ValueError("the pruning layer must be >= 1")
        self.probe_layer = prune_from - 1
        self.prune_from = prune_from
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
