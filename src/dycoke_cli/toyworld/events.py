"""Toy world v2: several events per clip.

One cup, ball or box per clip (v1's objects, colours, backgrounds and drawing), 6 to 9 s at
30 fps, in 2 or 3 segments of equal length. Segment 1 has a colour and a motion; each later
segment changes the colour, the motion, or both. The object's path is continuous and stays
inside the frame; a moving segment travels about 30 % of the frame's width (at constant speed).

``sample_event_spec`` draws a random clip, ``event_caption`` and ``event_questions`` say what
happens in it; v1's ``render_frames`` and ``write_clip`` draw and write it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .render import (
    COLORS,
    DIRECTIONS,
    FPS,
    HEIGHT,
    MOTIONS,
    SHAPES,
    WIDTH,
    color_rgb,
    margin,
    sample_backdrop,
    sample_look,
    sample_size,
)

DURATION = (6.0, 9.0)  # seconds
SEGMENTS = (2, 3)
TRAVEL = (0.27, 0.33)  # a moving segment's travel, as a share of the frame's width
CHANGES = ("color", "motion", "both")
EVENT_KINDS = ("object", "start", "end", "count", "first", "last", "during", "caption")
COUNT_WORDS = ("none", "once", "twice")


@dataclass(frozen=True)
class Segment:
    color: str
    motion: str  # one of MOTIONS


@dataclass(frozen=True)
class EventSpec:
    """Everything needed to render one v2 clip deterministically.

    ``position`` is the object's centre in px at t = 0; each segment lasts ``duration /
    len(segments)`` seconds, and a moving one travels ``travel`` px along its motion. ``rgbs``
    are the RGB values drawn for each segment's colour (one per segment; a colour that comes
    back is drawn the same). The other fields mean what they mean in v1's ClipSpec, whose
    drawing code renders this spec too."""

    shape: str
    segments: tuple[Segment, ...]
    duration: float
    background: str
    size: float
    position: tuple[float, float]
    travel: float
    rgbs: tuple[tuple[int, int, int], ...] = ()
    bg_color: tuple[int, int, int] = (20, 20, 28)
    bg_seed: int = 0
    bg_param: float = 0.5
    style: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.rgbs:
            object.__setattr__(self, "rgbs", tuple(color_rgb(s.color) for s in self.segments))

    @property
    def num_frames(self) -> int:
        return max(1, int(round(self.duration * FPS)))

    @property
    def segment_duration(self) -> float:
        return self.duration / len(self.segments)

    @property
    def colors(self) -> tuple[str, ...]:
        return tuple(s.color for s in self.segments)

    @property
    def motions(self) -> tuple[str, ...]:
        return tuple(s.motion for s in self.segments)

    def segment_at(self, t: float) -> int:
        """The index of the segment playing at ``t`` seconds (a boundary starts the next one)."""
        k = int(np.floor(t / self.segment_duration + 1e-9))
        return min(max(k, 0), len(self.segments) - 1)

    def center_at(self, t: float) -> tuple[float, float]:
        """The object's centre at ``t`` seconds: piecewise linear, continuous at the boundaries."""
        t = min(max(t, 0.0), self.duration)
        x, y = self.position
        for k, seg in enumerate(self.segments):
            share = min(max(t / self.segment_duration - k, 0.0), 1.0)
            dx, dy = DIRECTIONS[seg.motion]
            x, y = x + dx * self.travel * share, y + dy * self.travel * share
        return x, y

    def rgb_at(self, t: float) -> tuple[int, int, int]:
        return self.rgbs[self.segment_at(t)]


def path_extent(motions, travel: float) -> tuple[float, float, float, float]:
    """(min x, max x, min y, max y) of the centre's offsets from its start over a path."""
    x = y = 0.0
    xs, ys = [0.0], [0.0]
    for motion in motions:
        dx, dy = DIRECTIONS[motion]
        x, y = x + dx * travel, y + dy * travel
        xs.append(x)
        ys.append(y)
    return min(xs), max(xs), min(ys), max(ys)


def sample_event_spec(rng: np.random.Generator, variety: bool = True) -> EventSpec:
    """A random v2 clip within the world's rules. ``variety`` jitters colours, proportions and
    textures as v1's does. The draws happen in a fixed order: the same seed gives the same clip.
    A path that would leave the frame (e.g. down, then down again) is drawn again."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    n = int(SEGMENTS[rng.integers(len(SEGMENTS))])
    # a whole number of frames per segment, so every segment shows as many frames
    frames_per_segment = int(round(rng.uniform(*DURATION) * FPS / n))  # 6 s..9 s: 90..135 (2), 60..90 (3)
    duration = n * frames_per_segment / FPS
    size = sample_size(rng, variety)
    travel = float(rng.uniform(*TRAVEL) * WIDTH)
    half = margin(size)
    while True:
        segments = _sample_segments(rng, n)
        x_lo, x_hi, y_lo, y_hi = path_extent([s.motion for s in segments], travel)
        if x_hi - x_lo <= WIDTH - 2 * half and y_hi - y_lo <= HEIGHT - 2 * half:
            break
    x0 = float(rng.uniform(half - x_lo, WIDTH - half - x_hi))
    y0 = float(rng.uniform(half - y_lo, HEIGHT - half - y_hi))
    background, bg_color = sample_backdrop(rng, variety)
    distinct = tuple(dict.fromkeys(s.color for s in segments))
    if variety:
        looks, style = sample_look(rng, distinct)
    else:
        looks, style = tuple(color_rgb(c) for c in distinct), {}
    rgb_of = dict(zip(distinct, looks))
    return EventSpec(
        shape=shape, segments=segments, duration=duration, background=background, size=size,
        position=(x0, y0), travel=travel, rgbs=tuple(rgb_of[s.color] for s in segments), bg_color=bg_color,
        bg_seed=int(rng.integers(2**31)), bg_param=float(rng.random()), style=style,
    )


def _sample_segments(rng: np.random.Generator, n: int) -> tuple[Segment, ...]:
    """``n`` segments: a first colour and motion, then each later one changes the colour, the
    motion or both (a change is always to another value)."""
    segments = [Segment(COLORS[rng.integers(len(COLORS))], MOTIONS[rng.integers(len(MOTIONS))])]
    for _ in range(n - 1):
        prev = segments[-1]
        change = CHANGES[rng.integers(len(CHANGES))]
        color, motion = prev.color, prev.motion
        if change in ("color", "both"):
            color = _other(rng, COLORS, prev.color)
        if change in ("motion", "both"):
            motion = _other(rng, MOTIONS, prev.motion)
        segments.append(Segment(color, motion))
    return tuple(segments)


def _other(rng: np.random.Generator, values: tuple[str, ...], current: str) -> str:
    """A value of ``values`` other than ``current``, uniformly."""
    rest = [v for v in values if v != current]
    return rest[rng.integers(len(rest))]


# ---------------------------------------------------------------------------------------------
# Captions and questions


def motion_phrase(motion: str) -> str:
    return "stays still" if motion == "still" else f"moves {motion}"


def event_caption(spec: EventSpec) -> str:
    """``a {c1} {obj} {motion 1}``, then ``, then {event}`` for each later segment, the event
    being ``turns {c}``, ``{motion}`` or ``turns {c} and {motion}``; e.g. "a white box moves up,
    then turns green and stays still, then turns blue and moves right"."""
    first = spec.segments[0]
    text = f"a {first.color} {spec.shape} {motion_phrase(first.motion)}"
    for prev, seg in zip(spec.segments, spec.segments[1:]):
        events = []
        if seg.color != prev.color:
            events.append(f"turns {seg.color}")
        if seg.motion != prev.motion:
            events.append(motion_phrase(seg.motion))
        text += ", then " + " and ".join(events)
    return text


def color_changes(spec: EventSpec) -> int:
    return sum(a.color != b.color for a, b in zip(spec.segments, spec.segments[1:]))


def event_questions(spec: EventSpec) -> list[tuple[str, str, str]]:
    """(kind, question, answer) for every question that applies to the clip, the answer in its
    first words. "during" is asked for each direction exactly one segment moves in."""
    obj = spec.shape
    out = [
        ("object", "what object is in the video?", obj),
        ("start", f"what color is the {obj} at the start?", spec.colors[0]),
        ("end", f"what color is the {obj} at the end?", spec.colors[-1]),
        ("count", f"how many times does the {obj} change color?", COUNT_WORDS[color_changes(spec)]),
        ("first", f"which way does the {obj} move first?", spec.motions[0]),
        ("last", f"which way does the {obj} move last?", spec.motions[-1]),
    ]
    for direction in ("left", "right", "up", "down"):
        moving = [s for s in spec.segments if s.motion == direction]
        if len(moving) == 1:
            out.append(("during", f"what color is the {obj} when it moves {direction}?", moving[0].color))
    out.append(("caption", "describe the video.", event_caption(spec)))
    return out
