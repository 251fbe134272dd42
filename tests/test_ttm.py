import math

import pytest
import torch

from dycoke_cli.compression.ttm import kept_per_frame, merged_count, temporal_merge

N, D = 10, 6


def frames_from(rows):
    return torch.stack(rows)


def orthogonal_frames(t):
    """Frame f: every token is the basis vector e_(f mod D): neighbours are orthogonal."""
    out = torch.zeros(t, N, D)
    for f in range(t):
        out[f, :, f % D] = 1.0
    return out


def test_kept_per_frame_uses_floor_with_guard():
    assert kept_per_frame(10, 0.7) == 3  # 0.3 * 10 = 2.9999999999999996 in floats
    assert kept_per_frame(196, 0.7) == 58
    assert kept_per_frame(196, 0.3) == 137
    assert kept_per_frame(16, 0.7) == 4


def test_identical_frames_keep_anchor_and_first_positions_of_others():
    # one vector at every position: all similarities are bitwise equal, so ties are exact
    base = torch.randn(1, D, generator=torch.Generator().manual_seed(0)).expand(N, D)
    frames = base.expand(4, N, D).clone()
    tokens, index = temporal_merge(frames, 0.7)
    # All similarities are 1: ties resolve to the lowest positions.
    expected = list(range(10)) + [10, 11, 12] + [20, 21, 22] + [30, 31, 32]
    assert index.tolist() == expected
    assert torch.equal(tokens, frames.reshape(-1, D)[index])


def test_one_odd_token_per_frame_is_kept():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1, D, generator=g).expand(N, D)
    frames = base.expand(8, N, D).clone()
    odd = {1: 7, 2: 4, 3: 9, 5: 2, 6: 8, 7: 5}  # frame -> position made different
    for f, p in odd.items():
        frames[f, p] = -frames[f, p]
    _, index = temporal_merge(frames, 0.7)
    # f3 is compared with f2 (pair stage): f2's odd token (4) differs from f3's at 4 too.
    expected = (
        list(range(0, 10))
        + [10 + 0, 10 + 1, 10 + 7]  # f1 vs f0: odd 7, then ties 0, 1
        + [20 + 0, 20 + 1, 20 + 4]  # f2 vs f0 (anchor): odd 4
        + [30 + 4, 30 + 9, 30 + 0]  # f3 vs f2: 9 (odd in f3) and 4 (odd in f2), then 0
        + list(range(40, 50))
        + [50 + 0, 50 + 1, 50 + 2]
        + [60 + 0, 60 + 1, 60 + 8]
        + [70 + 5, 70 + 8, 70 + 0]
    )
    assert index.tolist() == sorted(expected)


def test_least_similar_tokens_win():
    g = torch.Generator().manual_seed(2)
    f0 = torch.randn(N, D, generator=g)
    f1 = f0.clone()
    # position p of f1 gets similarity that decreases with p: keep the last three
    for p in range(N):
        angle = p * 0.15
        f1[p] = torch.cos(torch.tensor(angle)) * f0[p] + torch.sin(torch.tensor(angle)) * torch.roll(f0[p], 1)
    _, index = temporal_merge(torch.stack([f0, f1]), 0.7)
    sims = torch.nn.functional.cosine_similarity(f0, f1, dim=-1)
    least = torch.sort(torch.argsort(sims)[:3]).values + N
    assert index.tolist() == list(range(N)) + least.tolist()


@pytest.mark.parametrize("t", [1, 2, 3, 4, 5, 6, 7, 8, 9, 32, 33])
def test_every_frame_count(t):
    frames = orthogonal_frames(t)
    tokens, index = temporal_merge(frames, 0.7)
    anchors = math.ceil(t / 4)
    assert len(index) == anchors * N + (t - anchors) * 3 == merged_count(t, N, 0.7)
    assert tokens.shape == (len(index), D)
    assert torch.all(index[1:] > index[:-1])
    # every frame is represented; anchors (f0 of each window) whole
    per_frame = torch.bincount(index // N, minlength=t).tolist()
    assert per_frame == [N if f % 4 == 0 else 3 for f in range(t)]


def test_k_zero_is_identity():
    frames = torch.randn(7, N, D)
    tokens, index = temporal_merge(frames, 0.0)
    assert index.tolist() == list(range(7 * N))
    assert torch.equal(tokens, frames.reshape(-1, D))


def test_paper_retention_at_k_07():
    assert merged_count(32, 196, 0.7) == 8 * 196 + 24 * 58
    assert merged_count(32, 196, 0.7) / (32 * 196) == pytest.approx((1 + 3 * 58 / 196) / 4)


@pytest.mark.parametrize("k", [-0.1, 1.0, 1.5])
def test_bad_k(k):
    with pytest.raises(ValueError, match=r"k must be in \[0, 1\)"):
        temporal_merge(torch.zeros(4, N, D), k)
