"""Stage 1 of DyCoke: temporal token merging (TTM), a pure tensor function.

Frames are taken in windows of four, f0 f1 f2 f3. Pair stage: f1 is compared with f0 and f3
with f2, token by token at the same spatial position, by cosine similarity. Anchor stage: f2
is compared with f0. Each compared frame keeps its ``floor((1 - k) * N)`` LEAST similar tokens
(the rest are dropped: "merging" in the paper prunes, it does not average); f0 is kept whole.
A last partial window keeps the same roles for the frames it has (f1 vs f0, f2 vs f0, f3 vs
f2), so every frame count T >= 1 works and no frame is silently dropped.

Tokens per full window: ``N * (1 + 3 (1 - k))``; retention ``(1 + 3 (1 - k)) / 4`` (47.5 % at
k = 0.7).
"""

from __future__ import annotations

import math

import torch

WINDOW = 4
# Within a window, frame j is compared with frame PARTNER[j]; frame 0 has no partner.
PARTNER = {1: 0, 2: 0, 3: 2}


def kept_per_frame(n: int, k: float) -> int:
    """Tokens a compared frame keeps: floor((1 - k) * n), with a guard against 0.3*10=2.9999."""
    return int(math.floor((1.0 - k) * n + 1e-6))


def merged_count(t: int, n: int, k: float, window: int = WINDOW) -> int:
    """Number of tokens :func:`temporal_merge` keeps for ``t`` frames of ``n`` tokens."""
    if k == 0:
        return t * n
    anchors = math.ceil(t / window)
    return anchors * n + (t - anchors) * kept_per_frame(n, k)


def temporal_merge(frames: torch.Tensor, k: float, window: int = WINDOW) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop temporally redundant tokens.

    Args:
        frames: float tensor [T, N, D] of per-frame visual tokens.
        k: fraction of tokens each compared frame drops, in [0, 1).
        window: frames per window; the paper uses 4 (pair + anchor stages need 4).

    Returns:
        kept tokens [M, D] and their flat indices ``frame * N + position`` [M], ascending.
    """
    if frames.dim() != 3:
        raise ValueError(f"frames must be [T, N, D], got shape {tuple(frames.shape)}")
    if not 0.0 <= k < 1.0:
        raise ValueError(f"k must be in [0, 1), got {k}")
    if window != WINDOW:
        raise ValueError(f"only windows of {WINDOW} frames are defined by the paper, got {window}")
    t, n, _ = frames.shape
    if k == 0 or t == 1:
        index = torch.arange(t * n, device=frames.device)
        return frames.reshape(t * n, -1), index
    keep = kept_per_frame(n, k)
    x = frames.float()
    kept: list[torch.Tensor] = []
    for start in range(0, t, window):
        kept.append(torch.arange(n, device=frames.device) + start * n)  # f0: whole
        for j in range(1, min(window, t - start)):
            f, partner = start + j, start + PARTNER[j]
            sim = torch.nn.functional.cosine_similarity(x[f], x[partner], dim=-1)  # [N]
            # The `keep` least similar positions; ties broken by position (stable sort).
            order = torch.sort(sim, stable=True).indices[:keep]
            kept.append(torch.sort(order).values + f * n)
    index = torch.cat(kept)  # windows and frames are visited in order, so this is ascending
    return frames.reshape(t * n, -1)[index], index
