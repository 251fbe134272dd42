"""The demo model's toy world: renderer, questions and dataset writer; v1 (one event per clip,
render.py) and v2 (several, events.py)."""

from .dataset import WORLDS, write_dataset
from .events import EVENT_KINDS, EventSpec, Segment, event_caption, event_questions, sample_event_spec
from .render import COLORS, KINDS, MOTIONS, SHAPES, ClipSpec, questions_for, render_frames, sample_spec, write_clip

__all__ = ["COLORS", "EVENT_KINDS", "KINDS", "MOTIONS", "SHAPES", "WORLDS", "ClipSpec", "EventSpec", "Segment",
           "event_caption", "event_questions", "questions_for", "render_frames", "sample_event_spec", "sample_spec",
           "write_clip", "write_dataset"]
