"""The toy world of the built-in demo model: one cup, ball or box per clip, on a dark
static background, moving left/right/up/down at constant speed or staying still, optionally
changing colour once between 35 % and 65 % of the clip.

Everything is plain numpy + pillow (+ PyAV to write mp4). ``sample_spec`` draws a random clip
description, ``render_frames`` draws it at given times, ``write_clip`` encodes it as h264,
``questions_for`` lists the questions the demo model answers about it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

WIDTH, HEIGHT, FPS = 320, 240, 30

SHAPES = ("cup", "ball", "box")
COLORS = ("red", "green", "blue", "yellow", "purple", "white")
MOTIONS = ("left", "right", "up", "down", "still")
BACKGROUNDS = ("plain", "noise", "stripes")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}  # unit steps in px
KINDS = ("shape", "motion", "color", "color_start", "color_end", "caption")

# Canonical RGB of each colour name (first entry) and variants other renderers plausibly use
# (pure primaries, web colours, darker/lighter shades). Training samples among them.
PALETTE: dict[str, tuple[tuple[int, int, int], ...]] = {
    "red": ((220, 30, 30), (255, 0, 0), (200, 20, 40), (235, 60, 50), (180, 0, 0)),
    "green": ((40, 190, 50), (0, 200, 0), (0, 128, 0), (60, 220, 90), (0, 255, 0)),
    "blue": ((40, 70, 230), (0, 0, 255), (30, 110, 255), (20, 40, 200), (0, 0, 180)),
    "yellow": ((240, 220, 30), (255, 255, 0), (250, 200, 0), (230, 230, 70), (255, 215, 0)),
    "purple": ((150, 50, 200), (128, 0, 128), (160, 32, 240), (120, 40, 170), (190, 80, 220)),
    "white": ((240, 240, 240), (255, 255, 255), (220, 220, 220), (250, 250, 230), (200, 205, 210)),
}


def color_rgb(name: str) -> tuple[int, int, int]:
    """The canonical RGB of a colour name."""
    return PALETTE[name][0]


def nearest_color(rgb) -> str:
    """The colour name whose palette (any variant) is nearest to ``rgb``."""
    rgb = np.asarray(rgb, dtype=np.float64)
    best, best_d = "", float("inf")
    for name, variants in PALETTE.items():
        for v in variants:
            d = float(np.sum((rgb - np.asarray(v, dtype=np.float64)) ** 2))
            if d < best_d:
                best, best_d = name, d
    return best


@dataclass(frozen=True)
class ClipSpec:
    """Everything needed to render one clip deterministically.

    Positions are the object's centre in pixels of the 320x240 frame at t = 0 (for a cup, the
    centre of its body); ``speed`` is in pixels per second along ``motion``; ``change_time`` is
    in seconds (None: no colour change); ``rgbs`` are the RGB values actually drawn for
    ``colors`` (palette values, possibly jittered).
    """

    shape: str
    colors: tuple[str, ...]  # one colour, or two when it changes
    change_time: float | None
    motion: str
    background: str
    size: float  # px across (ball diameter, box side, cup body height)
    position: tuple[float, float]
    speed: float
    duration: float
    rgbs: tuple[tuple[int, int, int], ...] = ()
    bg_color: tuple[int, int, int] = (20, 20, 28)
    bg_seed: int = 0
    bg_param: float = 0.5  # texture strength/scale knob, in [0, 1]
    style: dict = field(default_factory=dict)  # cup proportions, handle side, rim

    def __post_init__(self):
        if not self.rgbs:
            object.__setattr__(self, "rgbs", tuple(color_rgb(c) for c in self.colors))

    @property
    def num_frames(self) -> int:
        return max(1, int(round(self.duration * FPS)))

    @property
    def changes(self) -> bool:
        return len(self.colors) > 1

    def center_at(self, t: float) -> tuple[float, float]:
        dx, dy = DIRECTIONS[self.motion]
        return self.position[0] + dx * self.speed * t, self.position[1] + dy * self.speed * t

    def color_index_at(self, t: float) -> int:
        return 1 if (self.changes and self.change_time is not None and t >= self.change_time) else 0

    def rgb_at(self, t: float) -> tuple[int, int, int]:
        return self.rgbs[self.color_index_at(t)]


def sample_spec(rng: np.random.Generator, variety: bool = True, **overrides) -> ClipSpec:
    """A random clip within the world's rules. ``variety`` jitters colours, proportions and
    textures the way other renderers of the same world might differ (used for training and
    held-out sets); without it canonical colours and cup proportions are used. Keyword
    overrides fix fields (e.g. ``shape="cup", colors=("red",), motion="still"``).
    (The random draws happen in a fixed order: the same seed gives the same clip.)"""
    shape = overrides.pop("shape", None) or SHAPES[rng.integers(len(SHAPES))]
    colors = tuple(overrides.pop("colors")) if "colors" in overrides else _sample_colors(rng)
    motion = overrides.pop("motion", None) or MOTIONS[rng.integers(len(MOTIONS))]
    duration = float(overrides.pop("duration", None) or rng.choice([2.0, 2.5, 3.0, 3.5, 4.0]) + (rng.uniform(-0.2, 0.2) if variety else 0.0))
    duration = min(4.0, max(2.0, duration))
    size = float(overrides.pop("size", None) or sample_size(rng, variety))
    change_time = float(rng.uniform(0.35, 0.65) * duration) if len(colors) > 1 else None
    (x0, y0), dist = _sample_path(rng, motion, size)
    background, bg_color = sample_backdrop(rng, variety, overrides.pop("background", None))
    rgbs, style = sample_look(rng, colors) if variety else (tuple(color_rgb(c) for c in colors), {})
    spec = ClipSpec(
        shape=shape, colors=colors, change_time=change_time, motion=motion, background=background,
        size=size, position=(float(x0), float(y0)), speed=float(dist / duration), duration=duration, rgbs=rgbs,
        bg_color=bg_color, bg_seed=int(rng.integers(2**31)), bg_param=float(rng.random()), style=style,
    )
    return replace(spec, **overrides) if overrides else spec


def sample_size(rng: np.random.Generator, variety: bool) -> float:
    """The object's size in px (ball diameter, box side, cup body height)."""
    return float(rng.uniform(HEIGHT / 6, HEIGHT / 4) * (rng.uniform(0.9, 1.1) if variety else 1.0))


def sample_backdrop(rng: np.random.Generator, variety: bool, background: str | None = None) -> tuple[str, tuple]:
    """The background's kind (unless given) and its dark base colour (tinted with ``variety``)."""
    background = background or BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    base = rng.integers(0, 45)
    tint = rng.integers(-8, 9, size=3) if variety else np.zeros(3, dtype=int)
    return background, tuple(int(v) for v in np.clip(base + tint, 0, 60))


def margin(size: float) -> float:
    """How far the object reaches from its centre, cup handle included (px): a centre at least
    this far from every edge keeps the whole object inside the frame."""
    return size * 0.75 + 4


def _sample_colors(rng: np.random.Generator) -> tuple[str, ...]:
    """One colour, or (40 %) a first and a different second one."""
    c0 = COLORS[rng.integers(len(COLORS))]
    if rng.random() >= 0.4:
        return (c0,)
    c1 = COLORS[rng.integers(len(COLORS) - 1)]
    return c0, c1 if COLORS.index(c1) < COLORS.index(c0) else COLORS[COLORS.index(c1) + 1]


def _sample_path(rng: np.random.Generator, motion: str, size: float) -> tuple[tuple[float, float], float]:
    """Start position and travel: roughly half the frame along the motion axis, the whole
    object (cup handle included) inside the frame."""
    frac = rng.uniform(0.4, 0.6)
    half = margin(size)
    if motion in ("left", "right"):
        dist = frac * WIDTH
        lo, hi = half, WIDTH - half - dist
        x0 = rng.uniform(lo, max(lo, hi))
        return (x0 if motion == "right" else WIDTH - x0, rng.uniform(half, HEIGHT - half)), dist
    if motion in ("up", "down"):
        dist = frac * HEIGHT
        lo, hi = half, HEIGHT - half - dist
        y0 = rng.uniform(lo, max(lo, hi))
        x0 = rng.uniform(half, WIDTH - half)
        return (x0, y0 if motion == "down" else HEIGHT - y0), dist
    return (rng.uniform(half, WIDTH - half), rng.uniform(half, HEIGHT - half)), 0.0


def sample_look(rng: np.random.Generator, colors: tuple[str, ...]) -> tuple[tuple, dict]:
    """Jittered RGB of each colour and the object's proportions (the ``variety`` renderer)."""
    rgbs = []
    for c in colors:
        variants = PALETTE[c]
        v = np.asarray(variants[rng.integers(len(variants))], dtype=np.float64)
        v = v * rng.uniform(0.88, 1.05) + rng.uniform(-15, 15, size=3)
        rgbs.append(tuple(int(x) for x in np.clip(v, 0, 255)))
    style = {
        "top": float(rng.uniform(0.55, 0.8)),  # cup top width / height
        "bottom": float(rng.uniform(0.35, 0.55)),  # cup bottom width / height
        "handle_side": int(rng.choice([-1, 1])),
        "handle_w": float(rng.uniform(0.22, 0.38)),
        "handle_h": float(rng.uniform(0.4, 0.65)),
        "handle_t": float(rng.uniform(0.07, 0.13)),
        "rim": bool(rng.random() < 0.7),
        "box_scale": float(rng.uniform(0.85, 1.0)),
    }
    return tuple(rgbs), style


# ---------------------------------------------------------------------------------------------
# Drawing


def _background(spec: ClipSpec) -> np.ndarray:
    """The static background, uint8 [240, 320, 3]."""
    base = np.asarray(spec.bg_color, dtype=np.float32)
    img = np.broadcast_to(base, (HEIGHT, WIDTH, 3)).astype(np.float32)
    rng = np.random.default_rng(spec.bg_seed)
    if spec.background == "noise":
        strength = 4 + 10 * spec.bg_param
        if rng.random() < 0.5:  # fine per-pixel noise
            noise = rng.normal(0, strength, size=(HEIGHT, WIDTH, 1))
        else:  # blotchy noise: low resolution, upsampled
            cell = int(rng.integers(4, 16))
            small = rng.normal(0, strength, size=(HEIGHT // cell + 2, WIDTH // cell + 2, 1))
            noise = np.repeat(np.repeat(small, cell, 0), cell, 1)[:HEIGHT, :WIDTH]
        img = img + noise
    elif spec.background == "stripes":
        period = 8 + 40 * spec.bg_param
        amp = float(rng.uniform(6, 18))
        yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
        angle = float(rng.choice([0.0, math.pi / 2, math.pi / 4, -math.pi / 4]))
        u = xx * math.cos(angle) + yy * math.sin(angle)
        wave = np.sign(np.sin(2 * math.pi * u / period)) if rng.random() < 0.5 else np.sin(2 * math.pi * u / period)
        img = img + (amp * wave)[..., None]
    return np.clip(img, 0, 62).astype(np.uint8)


def _draw_object(draw, spec: ClipSpec, cx: float, cy: float, rgb, fill_mask: bool = False) -> None:
    """Draw the object with PIL ``draw`` centred at (cx, cy)."""
    s = spec.size
    col = 255 if fill_mask else tuple(int(v) for v in rgb)
    if spec.shape == "ball":
        r = s / 2
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
    elif spec.shape == "box":
        r = s * spec.style.get("box_scale", 0.92) / 2
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=col)
    else:  # cup: trapezoid body narrower at the bottom, open top (rim), handle on one side
        st = spec.style
        h = s
        wt, wb = st.get("top", 0.7) * h, st.get("bottom", 0.46) * h
        side = st.get("handle_side", 1)
        hw, hh, ht = st.get("handle_w", 0.3) * h, st.get("handle_h", 0.5) * h, st.get("handle_t", 0.1) * h
        top, bot = cy - h / 2, cy + h / 2
        # Handle: a ring whose inner half overlaps the body side.
        mid_w = (wt + wb) / 4  # half-width of the body at mid-height
        hx = cx + side * (mid_w + hw * 0.25)
        draw.ellipse([hx - hw / 2 - hw * 0.25, cy - hh / 2, hx + hw / 2 + hw * 0.25, cy + hh / 2],
                     outline=col, width=max(2, int(round(ht))))
        draw.polygon([(cx - wt / 2, top), (cx + wt / 2, top), (cx + wb / 2, bot), (cx - wb / 2, bot)], fill=col)
        if st.get("rim", True):
            inner = 255 if fill_mask else tuple(int(v * 0.55) for v in rgb)
            eh = max(3.0, 0.16 * h)
            draw.ellipse([cx - wt / 2 + 2, top - eh / 2, cx + wt / 2 - 2, top + eh / 2], fill=inner)


def render_frames(spec: ClipSpec, times, with_masks: bool = False):
    """Render ``spec`` at each time in ``times`` (seconds): uint8 [T, 240, 320, 3]. ``spec`` is a
    ClipSpec or a v2 EventSpec (anything with ``center_at``, ``rgb_at``, the object's and the
    background's fields).

    With ``with_masks`` also returns a uint8 [T, 240, 320] object mask (255 inside)."""
    from PIL import Image, ImageDraw

    bg = Image.fromarray(_background(spec))
    frames = np.empty((len(times), HEIGHT, WIDTH, 3), dtype=np.uint8)
    masks = np.empty((len(times), HEIGHT, WIDTH), dtype=np.uint8) if with_masks else None
    for i, t in enumerate(times):
        cx, cy = spec.center_at(float(t))
        rgb = spec.rgb_at(float(t))
        img = bg.copy()
        _draw_object(ImageDraw.Draw(img), spec, cx, cy, rgb)
        frames[i] = np.asarray(img)
        if with_masks:
            m = Image.new("L", (WIDTH, HEIGHT), 0)
            _draw_object(ImageDraw.Draw(m), spec, cx, cy, rgb, fill_mask=True)
            masks[i] = np.asarray(m)
    return (frames, masks) if with_masks else frames


def frame_times(spec: ClipSpec) -> np.ndarray:
    """Presentation times of every frame of the clip at 30 fps."""
    return np.arange(spec.num_frames) / FPS


def encode_frames(frames: np.ndarray, path_or_file, crf: int = 23, fps: int = FPS, preset: str = "medium") -> None:
    """Encode uint8 RGB frames [T, H, W, 3] as h264 (yuv420p) mp4."""
    import av

    with av.open(path_or_file, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": preset}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_clip(spec: ClipSpec, path: str | Path, crf: int = 23) -> Path:
    """Render every frame of ``spec`` and write it as a 320x240, 30 fps h264 mp4."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    encode_frames(render_frames(spec, frame_times(spec)), str(path), crf=crf)
    return path


# ---------------------------------------------------------------------------------------------
# Questions


def caption_for(spec: ClipSpec, noun: str | None = None) -> str:
    noun = noun or spec.shape
    text = f"a {spec.colors[0]} {noun} " + ("stays still" if spec.motion == "still" else f"moves {spec.motion}")
    if spec.changes:
        text += f" and turns {spec.colors[-1]}"
    return text


def questions_for(spec: ClipSpec) -> list[tuple[str, str, str]]:
    """(kind, question, answer) for every question that applies to the clip, in canonical
    wording: the object's own noun, "color", a trailing "?" ("describe the video." ends in a
    period). ``color`` is only asked about clips without a colour change."""
    n = spec.shape
    out = [
        ("shape", "what is in the video?", spec.shape),
        ("motion", f"which way does the {n} move?", spec.motion),
    ]
    if not spec.changes:
        out.append(("color", f"what color is the {n}?", spec.colors[0]))
    out += [
        ("color_start", f"what color is the {n} at the start?", spec.colors[0]),
        ("color_end", f"what color is the {n} at the end?", spec.colors[-1]),
        ("caption", "describe the video.", caption_for(spec)),
    ]
    return out


def question_text(kind: str, noun: str, colour_word: str = "color", mark: bool = True) -> str:
    """The question of ``kind`` with a chosen noun, spelling of colour and final mark."""
    q = {
        "shape": "what is in the video",
        "motion": f"which way does the {noun} move",
        "color": f"what {colour_word} is the {noun}",
        "color_start": f"what {colour_word} is the {noun} at the start",
        "color_end": f"what {colour_word} is the {noun} at the end",
        "caption": "describe the video",
    }[kind]
    if mark:
        q += "." if kind == "caption" else "?"
    return q


def answer_for(spec: ClipSpec, kind: str) -> str:
    return {
        "shape": spec.shape,
        "motion": spec.motion,
        "color": spec.colors[0],
        "color_start": spec.colors[0],
        "color_end": spec.colors[-1],
        "caption": caption_for(spec),
    }[kind]
