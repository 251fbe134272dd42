"""The demo model's toy world: renderer, questions and dataset writer."""

from .dataset import write_dataset
from .render import COLORS, KINDS, MOTIONS, SHAPES, ClipSpec, questions_for, render_frames, sample_spec, write_clip

__all__ = ["COLORS", "KINDS", "MOTIONS", "SHAPES", "ClipSpec", "questions_for", "render_frames",
           "sample_spec", "write_clip", "write_dataset"]
