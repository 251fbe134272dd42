"""Reading a picture of what was kept back from its pixels (see src/dycoke_cli/picture.py): each
cell is framed in pure magenta; inside it, a kept token's pixels have every channel >= 64 and a
dimmed token's every channel <= 63."""

from __future__ import annotations

import numpy as np
from PIL import Image

MAGENTA = np.array([255, 0, 255])


def load(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def cells(img: np.ndarray) -> list[tuple[int, int, int, int]]:
    """The magenta-framed boxes (x0, y0, x1, y1), x1 and y1 inclusive, ordered by panel (a gap of
    more than half the box width between two columns of boxes), then row, then column."""
    m = (img == MAGENTA).all(axis=2)
    pad = np.pad(m, 1)
    corner = pad[1:-1, 1:-1] & ~pad[1:-1, :-2] & ~pad[:-2, 1:-1] & pad[1:-1, 2:] & pad[2:, 1:-1]
    boxes = []
    for y, x in zip(*np.nonzero(corner)):
        x1, y1 = x, y
        while x1 + 1 < m.shape[1] and m[y, x1 + 1]:
            x1 += 1
        while y1 + 1 < m.shape[0] and m[y1 + 1, x]:
            y1 += 1
        if x1 - x > 8 and y1 - y > 8 and m[y1, x:x1 + 1].all() and m[y:y1 + 1, x1].all():
            boxes.append((int(x), int(y), int(x1), int(y1)))
    return boxes


def kept_in(img: np.ndarray, box: tuple[int, int, int, int], rows: int, cols: int) -> int:
    """Tokens shown kept in one cell: its inner grid sampled at each token's centre."""
    x0, y0, x1, y1 = box
    border = 0
    while (img[y0 + border, x0 + border] == MAGENTA).all():
        border += 1
    ix0, iy0, iw, ih = x0 + border, y0 + border, x1 - x0 + 1 - 2 * border, y1 - y0 + 1 - 2 * border
    kept = 0
    for r in range(rows):
        for c in range(cols):
            pixel = img[iy0 + int((r + 0.5) * ih / rows), ix0 + int((c + 0.5) * iw / cols)]
            assert pixel.min() >= 64 or pixel.max() <= 63, f"token ({r}, {c}) is neither kept nor dimmed: {pixel}"
            kept += int(pixel.min() >= 64)
    return kept


def panels(boxes: list[tuple[int, int, int, int]]) -> list[list[tuple[int, int, int, int]]]:
    """Boxes grouped into side-by-side panels (by the horizontal gaps between them), each in
    reading order."""
    if not boxes:
        return []
    width = boxes[0][2] - boxes[0][0]
    xs = sorted({b[0] for b in boxes})
    starts = [xs[0]] + [b for a, b in zip(xs, xs[1:]) if b - a > width + 20]
    groups: list[list] = [[] for _ in starts]
    for box in boxes:
        groups[max(i for i, s in enumerate(starts) if box[0] >= s)].append(box)
    return [sorted(g, key=lambda b: (b[1], b[0])) for g in groups]
