"""The values one stage hands the next: the clip as read (:class:`VideoInfo`, :class:`Video`),
the clip encoded (:class:`EncodedVideo`), where the video sits in a prompt (:class:`VisualSpan`)
and which visual tokens enter the language model (:class:`TokenPlan`). A low module: it imports
no stage, so every stage can import it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch


@dataclass(frozen=True)
class VideoInfo:
    """What was read and how. Times are in seconds."""

    path: str
    container: str  # FFmpeg format name, e.g. "mov,mp4,m4a,3gp,3g2,mj2"
    codec: str  # codec name, e.g. "h264", "hevc", "vp9", "av1"
    width: int  # display size of the source, after rotation
    height: int
    duration: float | None  # stream duration, else container's, else measured (see Duration)
    fps: float | None  # average frame rate, if the file says
    frame_count: int | None  # as the stream reports it (None when it does not)
    stream_index: int  # the video stream read (the default one, else the first)
    video_streams: int  # how many video streams the file has (cover art not counted)
    rotation: int  # counter-clockwise degrees applied: 0, 90, 180 or 270
    requested: int  # frames asked for
    timestamps: tuple[float, ...]  # presentation time of each returned frame
    lost: int = 0  # sampled frames that could not be decoded (damaged packets)

    @property
    def sampled(self) -> int:
        return len(self.timestamps)

    @classmethod
    def from_dict(cls, d: dict) -> "VideoInfo":
        """The inverse of :meth:`to_dict`."""
        fields = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**{**fields, "timestamps": tuple(fields["timestamps"])})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["timestamps"] = list(self.timestamps)
        d["sampled"] = self.sampled
        return d


@dataclass(frozen=True)
class Video:
    frames: np.ndarray | None  # uint8 [T, H, W, 3] RGB, T == info.sampled (None: features came from a cache)
    info: VideoInfo


@dataclass(frozen=True)
class EncodedVideo:
    """A clip decoded and encoded once, shared by every method run on it."""

    video: Video
    features: torch.Tensor  # [T, N, D] per-frame visual tokens
    newline: torch.Tensor | None  # [1, D] token appended after the video, if the family has one
    read_s: float  # reading frames from the file
    encode_s: float  # the vision tower
    rows: int = 0  # one temporal step's tokens form a rows x cols grid (positions of 3-D families)
    cols: int = 0
    step_seconds: float = 0.0  # time one temporal step covers in the clip (sampled timestamps)
    deepstack: tuple[torch.Tensor, ...] = ()  # Qwen3-VL: per level [T, N, D], added after decoder layer k

    @property
    def frames(self) -> int:
        """Temporal steps: frames, or pairs of frames for a family with frames_per_step 2."""
        return self.features.shape[0]

    @property
    def tokens_per_frame(self) -> int:
        return self.features.shape[1]

    @property
    def visual_tokens(self) -> int:
        return self.frames * self.tokens_per_frame


class VisualSpan(tuple):
    """Where the video sits in a prompt: ``(start, end)`` of the video part, as a tuple, plus
    ``visual``, the positions of its visual tokens [V], ascending. For one block of visual tokens
    (LLaVA-OneVision, Qwen2.5-VL) ``visual`` is ``start .. end - 1``; in Qwen3-VL's video part
    each temporal step is preceded by its timestamp and framed by start and end markers, text
    that ``visual`` skips (that text is never pruned)."""

    visual: torch.Tensor

    def __new__(cls, start: int, end: int, visual: torch.Tensor | None = None):
        span = super().__new__(cls, (int(start), int(end)))
        if visual is None:
            import torch

            visual = torch.arange(int(start), int(end))
        span.visual = visual
        return span

    @property
    def count(self) -> int:
        """Visual tokens in the span."""
        return int(self.visual.numel())

    @property
    def contiguous(self) -> bool:
        return self.count == self[1] - self[0]


def visual_positions(span) -> torch.Tensor:
    """The visual tokens' positions [V] of a :class:`VisualSpan` or a plain ``(start, end)``."""
    visual = getattr(span, "visual", None)
    if visual is not None:
        return visual
    import torch

    return torch.arange(span[0], span[1])


@dataclass(frozen=True)
class TokenPlan:
    """Which visual tokens enter the language model, and what is pruned after that."""

    tokens: torch.Tensor  # [M, D] visual tokens entering the prefill
    index: torch.Tensor  # [M] their flat indices frame * N + position, ascending
    keep: int  # visual tokens the pruned layers attend to (== M when nothing is pruned later)
    prune_from: int | None  # first layer that sees only ``keep`` visual tokens, or None
    prunes: str | None = None  # "decode" (DyCoke, per step), "prefill" (FastV, once), or None
    deepstack: tuple[torch.Tensor, ...] = ()  # the same tokens of every DeepStack level, [M, D] each

    @property
    def prefill_visual(self) -> int:
        return int(self.tokens.shape[0])


@dataclass(frozen=True)
class Prompt:
    """One question's prompt around the video, rendered through the chat template once: the
    token ids before the video part and after it. Fitting the frames to the context, reusing a
    prefix, the prefill and the server's ``usage`` all read this one value."""

    question: str
    before: torch.Tensor  # [B] token ids before the video (a system message, the user turn's start)
    after: torch.Tensor  # [A] token ids after it (the question, the assistant turn's start)
    system: str | None = None  # the system message before the video, if any
    thinking: bool | str | None = None  # reasoning on (True or an effort) or off, as rendered

    @property
    def text_tokens(self) -> int:
        """Tokens of text around the video."""
        return len(self.before) + len(self.after)
