"""The picture of an answer: which visual tokens each method kept, as a PNG 1280 px wide.

One panel per method, side by side. A panel has the sampled frames as a strip (one cell per
frame, or per temporal step of a Qwen family), each frame's token grid laid over its pixels:
the tokens the prefill kept are shown as they are, the others (TTM's merged tokens, or what a
baseline dropped) dimmed. Below the strip, a heatmap of decoding steps against frames: each
cell is how many of that frame's entries the pruned layers attended at that step; refresh
steps are marked, and the answer's tokens label the step axis.

It draws from the ``kept`` object of ``--json`` (results.KeptTrace.to_dict), so the picture and
the JSON cannot disagree. matplotlib is imported only here, and only when a picture is drawn
(the ``picture`` extra); nothing else in the package imports this module's dependencies.

Pixels a test can read back: a cell is framed by a 2 px border of pure magenta (255, 0, 255);
inside it a kept token's pixels have every channel >= 64 and a dimmed token's every channel
<= 63, so magenta occurs nowhere else in a strip. The strip is drawn at 1:1 scale.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

WIDTH_PX = 1280
DPI = 100
BORDER = (255, 0, 255)  # the cell frame: a colour no cell pixel can take (see the module docstring)
BORDER_PX = 2
GAP_PX = 6  # between cells
TOP_PX, TITLE_PX, HEAT_GAP_PX, BOTTOM_PX, SIDE_PX = 10, 58, 30, 96, 70
LEGEND = ("Frames: the tokens the prefill kept as they are, the others (merged by TTM, or dropped) dimmed.  "
          "Heatmap: entries of each frame the pruned layers attended at each decoding step;  ▼ a refresh "
          "(a new selection).")
MAX_TOKEN_LABELS = 80
INSTALL_HINT = "pip install 'dycoke-cli[picture]'"


class PictureUnavailable(RuntimeError):
    """matplotlib is not installed (the ``picture`` extra)."""


@contextlib.contextmanager
def _quiet():
    """matplotlib's warnings and log notices (building its font cache, a cache folder it cannot
    write) kept off the user's stderr while it is imported and draws; the logger's level is
    restored after."""
    logger = logging.getLogger("matplotlib")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def require_matplotlib() -> None:
    """Fail early, before a model is loaded, when the picture cannot be drawn."""
    try:
        with _quiet():
            import matplotlib.figure  # noqa: F401
    except ImportError:
        raise PictureUnavailable(f"the picture needs matplotlib, which is not installed: {INSTALL_HINT}") from None


@dataclass(frozen=True)
class Panel:
    """One method's part of the picture."""

    title: str  # method, retention, speedup
    kept: dict  # the ``kept`` object of --json
    thumbs: object = None  # uint8 [T, h, w, 3]: one picture per cell (the first frame of a temporal step), or None


def mask_bits(hex_mask: str, n: int) -> list[bool]:
    """A frame's kept-token mask from its hex form: token i is bit i, first token most significant."""
    bits = bin(int(hex_mask, 16))[2:].zfill(len(hex_mask) * 4) if hex_mask else ""
    return [b == "1" for b in bits[:n]]


def per_step(kept: dict) -> list[list[int]]:
    """The attended count per frame at every decoding step (``kept["selections"]`` holds one row
    per selection, each lasting until the next)."""
    rows, selections = [], kept["selections"]
    for i, sel in enumerate(selections):
        end = selections[i + 1]["step"] if i + 1 < len(selections) else kept["steps"]
        rows += [sel["counts"]] * max(0, end - sel["step"])
    return rows


def cell_image(thumb, bits: list[bool], rows: int, cols: int, token_px: int):
    """One framed cell: the thumbnail resized to the token grid, kept tokens in [64, 255] and
    dimmed ones in [0, 63] per channel, a magenta border around it. -> uint8 [h, w, 3]."""
    import numpy as np
    from PIL import Image

    h, w = rows * token_px, cols * token_px
    if thumb is None:
        base = np.full((h, w, 3), 200, dtype=np.uint16)
    else:
        base = np.asarray(Image.fromarray(np.asarray(thumb, dtype=np.uint8)).resize((w, h), Image.BILINEAR),
                          dtype=np.uint16)
    keep = np.repeat(np.repeat(np.array(bits, dtype=bool).reshape(rows, cols), token_px, 0), token_px, 1)
    lifted = 64 + base * 191 // 255
    dimmed = base * 63 // 255
    inner = np.where(keep[..., None], lifted, dimmed).astype(np.uint8)
    out = np.empty((h + 2 * BORDER_PX, w + 2 * BORDER_PX, 3), dtype=np.uint8)
    out[:] = BORDER
    out[BORDER_PX:-BORDER_PX, BORDER_PX:-BORDER_PX] = inner
    return out


def strip_image(kept: dict, thumbs, width: int):
    """Every cell in rows that fit ``width`` px, on white. -> uint8 [H, W, 3], cells per row."""
    import numpy as np

    t, (rows, cols) = kept["frames"], kept["grid"]
    per_row = max(1, min(t, width // 96)) if t > 8 else t
    cell_w = (width - GAP_PX * (per_row - 1)) // per_row
    token_px = max(1, (cell_w - 2 * BORDER_PX) // cols)
    n = rows * cols
    cells = [cell_image(None if thumbs is None else thumbs[i], mask_bits(kept["mask"][i], n), rows, cols, token_px)
             for i in range(t)]
    ch, cw = cells[0].shape[:2]
    lines = math.ceil(t / per_row)
    strip = np.full((lines * ch + (lines - 1) * GAP_PX, per_row * cw + (per_row - 1) * GAP_PX, 3), 255, np.uint8)
    for i, cell in enumerate(cells):
        y, x = divmod(i, per_row)
        strip[y * (ch + GAP_PX): y * (ch + GAP_PX) + ch, x * (cw + GAP_PX): x * (cw + GAP_PX) + cw] = cell
    return strip


def _heat_height(frames: int) -> int:
    return min(420, max(120, 7 * frames))


def _token_label(text: str) -> str:
    shown = text.replace("\n", "\\n").replace("$", r"\$") or "·"
    return shown if shown.strip() else repr(text)[1:-1] or "·"


def _draw_heatmap(ax, kept: dict) -> None:
    import numpy as np

    steps = per_step(kept)
    t = kept["frames"]
    data = np.array(steps, dtype=float).T if steps else np.zeros((t, 1))
    image = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis", origin="upper",
                      extent=(-0.5, data.shape[1] - 0.5, t - 0.5, -0.5), vmin=0)
    bar = ax.figure.colorbar(image, ax=ax, fraction=0.03, pad=0.01)
    bar.ax.tick_params(labelsize=7)
    bar.set_label("entries attended", fontsize=7)
    ax.set_ylabel("frame", fontsize=8)
    ax.set_yticks(range(0, t, max(1, math.ceil(t / 16))))
    ax.tick_params(labelsize=7)
    refresh = kept["refresh_steps"]
    if refresh:
        ax.plot(refresh, [-0.5] * len(refresh), linestyle="none", marker="v", color="tab:red", markersize=6,
                clip_on=False)
    tokens = kept["tokens"][: len(steps)]
    every = max(1, math.ceil(len(tokens) / MAX_TOKEN_LABELS))
    ax.set_xticks(range(0, len(tokens), every))
    ax.set_xticklabels([_token_label(tokens[i]) for i in range(0, len(tokens), every)], rotation=90, fontsize=7)
    if not steps:
        ax.set_xticks([])
        ax.text(0, t / 2, "no decoding step", fontsize=8, color="white", va="center")
    layer = f"layers {kept['pruned_from']}+" if kept.get("pruned_from") is not None else "every layer"
    ax.set_xlabel(f"decoding step (its token); attended by {layer}", fontsize=8)


def layout(panels: list[Panel]) -> tuple[int, int, list]:
    """(height px, panel width px, each panel's strip image)."""
    width = (WIDTH_PX - SIDE_PX * (len(panels) + 1)) // len(panels)
    strips = [strip_image(p.kept, p.thumbs, width) for p in panels]
    heat = max(_heat_height(p.kept["frames"]) for p in panels)
    height = TOP_PX + TITLE_PX + max(s.shape[0] for s in strips) + HEAT_GAP_PX + heat + BOTTOM_PX
    return height, width, strips


def draw(panels: list[Panel], path: str | Path) -> tuple[int, int]:
    """Write the picture of ``panels`` (one per method, side by side) to ``path`` as a PNG.
    Returns its (width, height) in pixels. Library warnings (a glyph a font lacks) stay here."""
    require_matplotlib()
    from matplotlib.figure import Figure

    height, width, strips = layout(panels)
    heat = max(_heat_height(p.kept["frames"]) for p in panels)
    fig = Figure(figsize=(WIDTH_PX / DPI, height / DPI), dpi=DPI)
    with _quiet():
        for i, (panel, strip) in enumerate(zip(panels, strips)):
            x = SIDE_PX + i * (width + SIDE_PX)
            sh, sw = strip.shape[:2]
            top = TOP_PX + TITLE_PX
            ax = fig.add_axes((x / WIDTH_PX, 1 - (top + sh) / height, sw / WIDTH_PX, sh / height))
            ax.imshow(strip, interpolation="nearest", aspect="auto")
            ax.set_axis_off()
            fig.text((x + width / 2) / WIDTH_PX, 1 - TOP_PX / height, panel.title, ha="center", va="top",
                     fontsize=10 if len(panels) < 3 else 8.5)
            heat_top = top + max(s.shape[0] for s in strips) + HEAT_GAP_PX
            hx = fig.add_axes((x / WIDTH_PX, 1 - (heat_top + heat) / height, width / WIDTH_PX, heat / height))
            _draw_heatmap(hx, panel.kept)
        fig.text(0.5, 6 / height, LEGEND, ha="center", va="bottom", fontsize=8, wrap=True)
        fig.savefig(path, dpi=DPI, format="png")
    return WIDTH_PX, height
