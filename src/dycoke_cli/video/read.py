"""Read a video file into a few RGB frames sampled uniformly by presentation time (PyAV only).

Sampling rule
    The clip spans ``[start, end)``: ``start`` is the presentation time of its first frame
    (its first packet, even if damaged); ``end`` is where the clip's duration ends (see
    Duration). That span is cut into ``num_frames`` equal segments and the target times are
    their centres: ``start + (k + 0.5) * span / num_frames`` for ``k = 0 .. num_frames - 1``.
    Each target takes the decoded frame whose presentation time (``frame.pts * time_base``) is
    nearest to it, ties going to the earlier frame. Times, not frame indices, so
    variable-frame-rate clips are sampled evenly in time. A frame nearest to several targets is
    returned once: a clip with fewer distinct frames than requested yields each of them once
    (``info.sampled < info.requested``); frames are never duplicated.

How
    Clips up to ``SEEK_AFTER_S`` long are decoded in one forward pass that keeps only the frame
    nearest each target. Longer clips seek (backward, to the keyframe before each target) and
    decode forward to the target; when the next target is closer than the keyframe distance
    seen so far, decoding just continues (so rare keyframes degrade to one forward pass, not to
    a re-decode per target). Where a seek lands past its target (MPEG-TS has no index: it
    lands on a packet before the time asked for, and decoding starts at the next keyframe),
    it is made again aiming twice as far back, and later seeks aim that far back too. Only the
    sampled frames are held, converted to RGB (and downscaled) as they are picked.

Duration
    The stored duration (the stream's, else the container's) is checked against where the
    packets end: a second handle seeks to the stream's last keyframe and demuxes (does not
    decode) what follows. A stored duration that ends more than ``_SLACK_FRAMES`` frames from
    the end of the last packet is wrong (a header claiming 0.04 s for 10 s of packets, or hours
    for seconds, or an MPEG-PS estimate from the bit rate): the clip then ends where its last
    packet ends. Where nothing is stored, where that seek fails, and in the formats of
    Timeline, the whole stream is demuxed instead.

Timeline
    In a format whose timestamps may jump (FFmpeg's ``AVFMT_TS_DISCONT``: MPEG-TS, MPEG-PS),
    e.g. two recordings joined with ``cat``, whose clock restarts halfway, times are unwrapped:
    when a packet's decode time goes backwards, or forward by more than ``_JUMP_S`` (a shorter
    step forward is a pause, and kept), it and every packet after it are shifted to follow the
    previous packet by one frame. Such a file is demuxed whole for its duration, on the same
    timeline (the stored duration counts only if no jump is found), and a file found to jump is
    read in one forward pass (a seek lands by the raw clock); ``info.timestamps`` are
    unwrapped times.

Damage
    A packet that fails to decode, or that the decoder silently drops, leaves a hole. A target
    whose nearest frame fell into a hole is not filled with a neighbour: it counts in
    ``info.lost`` (distinct frames, deduplicated like the sampled ones) and nothing is returned
    for it, except that when every target is lost the surviving frame nearest the first one
    is returned. A file with no decodable frame at all raises :class:`VideoError`.

Rotation
    The display matrix (phone videos) is read from the first decoded frame
    (``VideoFrame.rotation``, counter-clockwise degrees) and applied, so frames come out the way
    a player shows them; ``info.rotation`` is that angle in 0/90/180/270 (counter-clockwise) and
    ``info.width``/``info.height`` are the display size. Flips and non-square sample aspect
    ratios are not applied.

Still images
    A PNG or JPEG (anything FFmpeg opens as a one-picture stream) is read as a one-frame clip:
    ``sampled == 1`` whatever ``num_frames`` is. That is friendlier than an error for "ask about
    this screenshot".

Every problem a user can cause (missing, unreadable, empty, not a video, audio only, no
decodable frame, too slow) raises :class:`VideoError` with one line that names the file. The
file is only read, never written.

Layout
    This module holds the public names and joins the two halves: ``container`` opens
    the file, chooses the stream and measures the timing (Duration, Timeline);
    ``frames`` decodes and picks the frames (Sampling rule, How, Damage, Rotation). What a read
    returns (``Video``, ``VideoInfo``) are values, defined in values.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import av
import numpy as np

# MAX_PIXELS, VideoError, Video and VideoInfo are imported for those who import them from here.
from ..errors import SettingError, UsageError, VideoError  # noqa: F401
from ..values import Video, VideoInfo  # noqa: F401
from .container import MAX_PIXELS, Reading, Source, Timing, measure_timing  # noqa: F401
from .frames import Converter, Decoder, Picker, first_frame, rotation, sample

# Clips longer than this (seconds) are sampled by seeking to each target instead of decoding
# every frame; below it one forward pass is faster than the seeks.
SEEK_AFTER_S = 60.0


def probe_video(path: str | os.PathLike, *, timeout_s: float = 60.0) -> VideoInfo:
    """Metadata only. Decodes the first frame (for rotation and display size, and to be sure the
    file decodes); demuxes, without decoding, the end of the stream to check the stored
    duration, or the whole stream where that is needed (see the module docstring, Duration)."""
    reading = Reading(path, timeout_s)
    with Source(reading) as source:
        first = first_frame(source, Decoder(source).frames())
        return _info(source, measure_timing(source), first.frame, requested=0, timestamps=(),
                     lost=0)


def read_video(
    path: str | os.PathLike,
    num_frames: int = 32,
    *,
    max_side: int | None = None,
    size_for: Callable[[int, int], tuple[int, int]] | None = None,
    timeout_s: float = 60.0,
) -> Video:
    """Sample ``num_frames`` frames uniformly by presentation time (see the module docstring).

    ``max_side``: frames whose longer side exceeds it are downscaled while decoding, aspect
    kept. ``size_for(height, width)``: the size (height, width) a model will resize frames of
    that display size to; frames are then decoded at the smallest scale that keeps both sides at
    least twice that (never enlarged), so the model's own resize is the only one that matters
    (instead of ``max_side``). ``timeout_s``: give up with :class:`VideoError` when reading
    takes longer.
    Returns RGB uint8 frames ``[T, H, W, 3]`` with ``T <= num_frames``.
    """
    if num_frames < 1:
        raise SettingError(f"{{frames}} must be at least 1 (got {num_frames})")
    if max_side is not None and max_side < 1:
        raise UsageError(f"max_side must be at least 1 (got {max_side})")
    reading = Reading(path, timeout_s)
    with Source(reading) as source:
        decoder = Decoder(source)
        frames = decoder.frames()
        first = first_frame(source, frames)
        start = min([first.time, *first.holes])  # damaged leading frames still count
        timing = measure_timing(source)
        span = max(timing.end - start, 0.0) if timing.end is not None else 0.0
        picker = Picker(start, span, num_frames, Converter(first.frame, max_side, size_for))
        seek = span > SEEK_AFTER_S and not timing.discontinuous  # seeks land by raw time
        sample(decoder, picker, first, frames, seek=seek)
        if not picker.arrays:
            raise reading.error("no decodable video frame (the file is truncated or damaged)")
        info = _info(source, timing, first.frame, requested=num_frames,
                     timestamps=tuple(picker.times), lost=len(picker.lost))
        return Video(frames=np.stack(picker.arrays), info=info)


def _info(source: Source, timing: Timing, first: av.VideoFrame, *, requested: int,
          timestamps: tuple[float, ...], lost: int) -> VideoInfo:
    """The metadata of the stream read, with the first frame's rotation and display size."""
    turned = rotation(first)
    w, h = first.width, first.height
    if turned in (90, 270):
        w, h = h, w
    stream = source.stream
    rate = stream.average_rate
    return VideoInfo(
        path=source.reading.path,
        container=source.container.format.name,
        codec=stream.codec_context.codec.canonical_name,
        width=w,
        height=h,
        duration=timing.duration,
        fps=float(rate) if rate else None,
        frame_count=stream.frames or None,
        stream_index=stream.index,
        video_streams=source.video_streams,
        rotation=turned,
        requested=requested,
        timestamps=timestamps,
        lost=lost,
    )
