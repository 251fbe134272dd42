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
"""

from __future__ import annotations

import io
import math
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from fractions import Fraction

import av
import numpy as np

from .errors import UsageError, VideoError

# Clips longer than this (seconds) are sampled by seeking to each target instead of decoding
# every frame; below it one forward pass is faster than the seeks.
SEEK_AFTER_S = 60.0

# Frames with more pixels than this are refused (8K UHD is 33 Mpx): such sizes come from
# damaged headers, and one RGB frame would take gigabytes.
MAX_PIXELS = 8192 * 8192

# FFmpeg's AVCOL_SPC_UNSPECIFIED and AVCOL_RANGE_UNSPECIFIED.
_UNSPECIFIED_COLORSPACE = 2
_UNSPECIFIED_RANGE = 0

# Two times closer than this (seconds) are the same time: frame pts are exact rationals, the
# targets are floats, and a tie must go to the earlier frame however the float rounds.
_TIME_EPS = 1e-9

# FFmpeg's AVFMT_TS_DISCONT: the format allows timestamp discontinuities (MPEG-TS, MPEG-PS).
_AVFMT_TS_DISCONT = 0x0200

# In such a format, a timestamp this far (seconds) past the previous one is a discontinuity, not
# a pause in the recording: FFmpeg's own default (ffmpeg -dts_delta_threshold).
_JUMP_S = 10.0

# A stored duration is believed when it ends within this many frames of where the last packet
# ends (which may lack its own duration); else the packets' end is used: a header claiming
# 0.04 s for 10 s of packets, hours for a few seconds, or an estimate from the bit rate.
_SLACK_FRAMES = 2

# Far past the end of any clip (seconds): a backward seek there lands on the last keyframe.
_FAR_S = 1e9

# The protocol whitelist FFmpeg gets: no protocol is named so (FFmpeg reads the file through
# the file object it is given, and opens nothing else).
_NO_PROTOCOL = "none"

# File signatures of containers we know, to tell "damaged video" from "not a video".
_VIDEO_MAGIC = (
    (4, b"ftyp"),  # MP4 / MOV / 3GP
    (0, b"\x1a\x45\xdf\xa3"),  # Matroska / WebM
    (0, b"RIFF"),  # AVI
    (0, b"GIF8"),
)


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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["timestamps"] = list(self.timestamps)
        d["sampled"] = self.sampled
        return d


@dataclass(frozen=True)
class Video:
    frames: np.ndarray  # uint8 [T, H, W, 3] RGB, T == info.sampled
    info: VideoInfo


def probe_video(path: str | os.PathLike, *, timeout_s: float = 60.0) -> VideoInfo:
    """Metadata only. Decodes the first frame (for rotation and display size, and to be sure the
    file decodes); demuxes, without decoding, the end of the stream to check the stored
    duration, or the whole stream where that is needed (see the module docstring, Duration)."""
    deadline = _deadline(timeout_s)
    with _Clip(path, deadline, timeout_s) as clip:
        first = _first_frame(clip, clip.frames())
        return clip.info(first.frame, requested=0, timestamps=(), lost=0)


def read_video(
    path: str | os.PathLike,
    num_frames: int = 32,
    *,
    max_side: int | None = None,
    timeout_s: float = 60.0,
) -> Video:
    """Sample ``num_frames`` frames uniformly by presentation time (see the module docstring).

    ``max_side``: frames whose longer side exceeds it are downscaled while decoding, aspect
    kept. ``timeout_s``: give up with :class:`VideoError` when reading takes longer.
    Returns RGB uint8 frames ``[T, H, W, 3]`` with ``T <= num_frames``.
    """
    if num_frames < 1:
        raise UsageError(f"--frames must be at least 1 (got {num_frames})")
    if max_side is not None and max_side < 1:
        raise UsageError(f"max_side must be at least 1 (got {max_side})")
    deadline = _deadline(timeout_s)
    with _Clip(path, deadline, timeout_s) as clip:
        frames = clip.frames()
        first = _first_frame(clip, frames)
        start = min([first.time, *first.holes])  # damaged leading frames still count
        end = clip.end_time()
        span = max(end - start, 0.0) if end is not None else 0.0
        convert = _Converter(first.frame, max_side)
        picker = _Picker(start, span, num_frames, convert)
        seek = span > SEEK_AFTER_S and not clip.discontinuous()  # seeks land by raw time
        _sample(clip, picker, first, frames, seek=seek)
        if not picker.arrays:
            raise clip.error("no decodable video frame (the file is truncated or damaged)")
        info = clip.info(first.frame, requested=num_frames, timestamps=tuple(picker.times),
                         lost=len(picker.lost))
        return Video(frames=np.stack(picker.arrays), info=info)


# --------------------------------------------------------------------------------------------
# Sampling


def _first_frame(clip: _Clip, frames: Iterator[_Decoded]) -> _Decoded:
    """The first decoded frame, carrying every hole met before it."""
    holes: list[float] = []
    for item in frames:
        holes += item.holes
        if item.frame is not None:
            clip.check_size(item.frame.width, item.frame.height)
            return _Decoded(item.time, item.frame, holes)
    raise clip.error("no decodable video frame (the file is truncated or damaged)")


def _sample(clip: _Clip, picker: _Picker, first: _Decoded, frames: Iterator[_Decoded],
            seek: bool) -> None:
    """Feed decoded frames to the picker; with ``seek``, jump ahead to far targets."""
    # How far before a target a backward seek lands (the keyframe distance), learnt from the
    # seeks made so far: seek only when the next target is farther ahead than that, otherwise
    # decoding on is cheaper (and is all that is left when keyframes are rare).
    keyframe_gap = 0.0
    # How far before its target a seek aims. A seek lands on the keyframe before the time asked
    # for, except in a format without an index (MPEG-TS): there it lands on some packet before
    # it, and decoding starts at the next keyframe, which may be past the target. Such a seek is
    # made again, aiming twice as far back, and later seeks aim that far back too.
    lead = 0.0
    landing_for: float | None = None  # target of the seek just made, until its first frame
    item: _Decoded | None = first
    while item is not None and not picker.done:
        if landing_for is not None and item.frame is not None:
            if item.time > landing_for + _TIME_EPS and landing_for - lead > picker.start:
                lead = max(2 * lead, item.time - landing_for, clip.frame_step)
                if clip.seek(landing_for - lead):
                    frames = clip.frames(after_seek=True)
                    item = next(frames, None)
                    continue
            keyframe_gap = max(keyframe_gap, landing_for - item.time)
            landing_for = None
        picker.feed(item)
        target = picker.next_target()
        if (seek and target is not None and item.frame is not None
                and target - item.time > keyframe_gap + _TIME_EPS):
            seek = clip.seek(target - lead)  # a file that cannot seek is read on
            if seek:
                picker.forget_position()
                landing_for = target
                frames = clip.frames(after_seek=True)
        item = next(frames, None)
    picker.finish()


class _Converter:
    """Turns picked frames into RGB arrays of one size, rotated for display."""

    def __init__(self, first: av.VideoFrame, max_side: int | None):
        self.turns = _rotation(first) // 90  # counter-clockwise quarter turns
        w, h = first.width, first.height  # coded orientation
        scale = 1.0 if max_side is None or max(w, h) <= max_side else max_side / max(w, h)
        self.width = max(1, round(w * scale))
        self.height = max(1, round(h * scale))
        self.interpolation = "AREA" if scale < 1 else "BILINEAR"

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        """RGB ``[H, W, 3]``; raises ``av.FFmpegError`` when swscale cannot convert the frame."""
        try:
            rgb = self._rgb(frame)
        except av.FFmpegError:
            # Damaged colour metadata (a reserved colour space) makes swscale refuse the frame;
            # read it as unspecified instead.
            frame.colorspace = _UNSPECIFIED_COLORSPACE
            frame.color_range = _UNSPECIFIED_RANGE
            rgb = self._rgb(frame)
        if self.turns:
            rgb = np.ascontiguousarray(np.rot90(rgb, self.turns))
        return rgb

    def _rgb(self, frame: av.VideoFrame) -> np.ndarray:
        return frame.to_ndarray(width=self.width, height=self.height, format="rgb24",
                                interpolation=self.interpolation)


@dataclass
class _Decoded:
    """One step of the decode: a frame and its time, and the times of packets that produced no
    frame (holes) since the previous step. ``frame is None`` at the end of the stream."""

    time: float
    frame: av.VideoFrame | None
    holes: list[float]


class _Picker:
    """Keeps, for each target time, the nearest decoded frame, holding one frame back.

    Frames must be fed in presentation order. After a seek call :meth:`forget_position`.
    """

    def __init__(self, start: float, span: float, n: int, convert: _Converter):
        self.start, self.n, self.convert = start, n, convert
        self.segment = span / n
        self.j = 0  # next target to settle
        self.prev: tuple[float, av.VideoFrame] | None = None
        self.holes: list[float] = []  # holes after prev
        self.arrays: list[np.ndarray] = []
        self.times: list[float] = []
        self.lost: set[float] = set()
        self.last: float | None = None  # time of the last frame picked or lost (dedup)
        self.stand_in: tuple[float, np.ndarray] | None = None

    @property
    def done(self) -> bool:
        return self.j >= self.n

    def next_target(self) -> float | None:
        return None if self.done else self.start + (self.j + 0.5) * self.segment

    def forget_position(self) -> None:
        self.prev, self.holes = None, []

    def feed(self, item: _Decoded) -> None:
        self.holes.extend(item.holes)
        if item.frame is None:
            return
        if self.prev is not None and item.time <= self.prev[0]:
            return  # out of order or repeated time: not a new frame
        target = self.next_target()
        while target is not None and target <= item.time + _TIME_EPS:
            self._settle(target, item.time, item.frame)
            self.j += 1
            target = self.next_target()
        self.prev, self.holes = (item.time, item.frame), []

    def finish(self) -> None:
        """End of stream: the remaining targets lie after the last frame."""
        while not self.done:
            self._settle(self.next_target(), None, None)
            self.j += 1
        if not self.arrays and self.stand_in is not None:
            self.times.append(self.stand_in[0])
            self.arrays.append(self.stand_in[1])

    def _settle(self, target: float, time_: float | None, frame: av.VideoFrame | None) -> None:
        # Candidates in time order: prev, holes after it, the frame just decoded.
        candidates: list[tuple[float, av.VideoFrame | None]] = []
        if self.prev is not None:
            candidates.append(self.prev)
        candidates += [(h, None) for h in sorted(self.holes)]
        if frame is not None:
            candidates.append((time_, frame))
        best: tuple[float, av.VideoFrame | None] | None = None
        for candidate in candidates:  # in time order, so a tie keeps the earlier one
            if best is None or abs(candidate[0] - target) < abs(best[0] - target) - _TIME_EPS:
                best = candidate
        if best is None:
            return
        best_time, best_frame = best
        if self.last is not None and best_time <= self.last:
            return  # already picked (or already lost) for an earlier target
        self.last = best_time
        rgb = self._convert(best_frame)
        if rgb is not None:
            self.arrays.append(rgb)
            self.times.append(best_time)
            return
        self.lost.add(best_time)
        if not self.arrays and self.stand_in is None:
            # Kept in case every target is lost: then the frame nearest the first lost one is
            # returned rather than nothing.
            for c_time, c_frame in sorted(candidates, key=lambda c: abs(c[0] - target)):
                rgb = self._convert(c_frame)
                if rgb is not None:
                    self.stand_in = (c_time, rgb)
                    break

    def _convert(self, frame: av.VideoFrame | None) -> np.ndarray | None:
        if frame is None:
            return None
        try:
            return self.convert(frame)
        except (av.FFmpegError, ValueError):
            return None  # a frame swscale cannot read is as lost as one the decoder dropped


# --------------------------------------------------------------------------------------------
# The file


class _Clip:
    """An open container and its chosen video stream; every failure becomes a VideoError."""

    def __init__(self, path: str | os.PathLike, deadline: float, timeout_s: float):
        self.path = os.fsdecode(path)
        self.deadline, self.timeout_s = deadline, timeout_s
        self.file = _open_file(self.path)
        try:
            self.container = _open_container(self.file)
        except (av.FFmpegError, OSError, ValueError) as e:
            error = self._open_error(e)
            self.file.close()
            raise error from None
        try:
            videos = [s for s in self.container.streams.video
                      if not s.disposition & av.stream.Disposition.attached_pic]
            if not videos:
                raise self.error("not a video file (no video stream)")
            defaults = [s for s in videos if s.disposition & av.stream.Disposition.default]
            self.stream = (defaults or videos)[0]
            if self.stream.codec_context is None:
                raise self.error("video codec not supported by this FFmpeg build")
            self.check_size(self.stream.codec_context.width, self.stream.codec_context.height)
            self.video_streams = len(videos)
            self.time_base = _fraction(self.stream.time_base) or Fraction(1, 1000)
            rate = self.stream.average_rate or self.stream.guessed_rate
            self.frame_step = float(1 / rate) if rate else 1 / 25  # for frames without pts
            # Timestamps may jump (restart) in this format: MPEG-TS, MPEG-PS. (The flags are an
            # int in PyAV 14 to 19; the value of an enum, should they become one.)
            flags = self.container.format.flags
            self.may_jump = bool(int(getattr(flags, "value", flags)) & _AVFMT_TS_DISCONT)
            self._timing_cache: tuple[float | None, float | None, bool] | None = None
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> _Clip:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.container.close()
        self.file.close()  # PyAV leaves a file object it was given open

    def error(self, problem: str) -> VideoError:
        return VideoError(f"{self.path}: {problem}")

    def _open_error(self, e: Exception) -> VideoError:
        if isinstance(e, PermissionError):
            return self.error("permission denied")
        try:
            self.file.seek(0)
            head = self.file.read(12)
        except OSError:
            head = b""
        if any(head[at:at + len(magic)] == magic for at, magic in _VIDEO_MAGIC):
            return self.error("damaged or truncated video file (FFmpeg cannot read it)")
        return self.error("not a video file (FFmpeg cannot read it)")

    def check_size(self, width: int, height: int) -> None:
        if width * height > MAX_PIXELS:
            raise self.error(f"{width}x{height} frames are too large (over {MAX_PIXELS / 1e6:.0f} megapixels)")

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise self.error(f"reading took longer than {self.timeout_s:g} s (timeout)")

    # -- metadata ------------------------------------------------------------------------

    def duration(self) -> float | None:
        """Stream duration, else container duration, where the packets bear it out, else
        measured by demuxing (see _timing)."""
        return self._timing()[0]

    def end_time(self) -> float | None:
        """Presentation time where the clip ends: the start the duration counts from, plus it."""
        return self._timing()[1]

    def discontinuous(self) -> bool:
        """Whether the timestamps jump, so that the times used are unwrapped (see _Timeline)."""
        return self._timing()[2]

    def _timing(self) -> tuple[float | None, float | None, bool]:
        """(duration, end, discontinuous). The stored duration where the last packets bear it
        out, else measured by demuxing: a look at the end of the stream (a seek to its last
        keyframe) checks the stored one, the whole stream is demuxed when none is stored, when
        the end cannot be reached by a seek, and in a format whose timestamps may jump."""
        if self._timing_cache is None:
            stored = self._stored()
            whole = stored is None or self.may_jump
            span = self._scan(whole)
            if span.end is None and not whole:
                span = self._scan(whole=True)
            self._timing_cache = self._reconcile(stored, span)
        return self._timing_cache

    def _reconcile(self, stored: tuple[float, float] | None,
                   span: _Span) -> tuple[float | None, float | None, bool]:
        """(duration, end, discontinuous) from the stored (duration, start) and the packets."""
        if stored is not None:
            duration, start = stored
            slack = _SLACK_FRAMES * self.frame_step
            if span.end is None or (not span.jumps and abs(start + duration - span.end) <= slack):
                return duration, start + duration, False
        if span.end is None:
            return None, None, False
        start = stored[1] if stored is not None and not span.jumps else span.first
        return max(span.end - start, 0.0), span.end, span.jumps > 0

    def _stored(self) -> tuple[float, float] | None:
        """(duration, start) as the file states them: the stream's, else the container's."""
        stream, container = self.stream, self.container
        if stream.duration and stream.duration > 0:
            return (float(stream.duration * self.time_base),
                    float((stream.start_time or 0) * self.time_base))
        if container.duration and container.duration > 0:
            return container.duration / av.time_base, (container.start_time or 0) / av.time_base
        return None

    def _scan(self, whole: bool) -> _Span:
        """Demux (not decode) the stream in a second handle: where its packets start and end, on
        the unwrapped timeline. All of it when ``whole``, else from a seek to its last keyframe
        (``first`` is then not the start)."""
        span = _Span()
        timeline = self._timeline()
        try:
            with _open_file(self.path) as f, _open_container(f) as c:
                stream = c.streams[self.stream.index]
                if whole or _seek_to_end(c, stream, self.time_base):
                    for packet in c.demux(stream):
                        self.check_time()
                        timeline(packet)
                        span.add(packet, self.time_base)
        except (av.FFmpegError, OSError, VideoError):
            pass  # keep what was read before the damage (or the file vanished meanwhile)
        self.check_time()  # a timeout is not damage
        span.jumps = timeline.jumps
        if whole and span.end is None and span.count:  # no timestamps: frames at the nominal rate
            span.first, span.end = 0.0, span.count * self.frame_step
        return span

    def _timeline(self) -> _Timeline:
        return _Timeline(self.may_jump, self.time_base, self.frame_step)

    def info(self, first: av.VideoFrame, *, requested: int, timestamps: tuple[float, ...],
             lost: int) -> VideoInfo:
        rotation = _rotation(first)
        w, h = first.width, first.height
        if rotation in (90, 270):
            w, h = h, w
        rate = self.stream.average_rate
        return VideoInfo(
            path=self.path,
            container=self.container.format.name,
            codec=self.stream.codec_context.codec.canonical_name,
            width=w,
            height=h,
            duration=self.duration(),
            fps=float(rate) if rate else None,
            frame_count=self.stream.frames or None,
            stream_index=self.stream.index,
            video_streams=self.video_streams,
            rotation=rotation,
            requested=requested,
            timestamps=timestamps,
            lost=lost,
        )

    # -- decoding ------------------------------------------------------------------------

    def seek(self, t: float) -> bool:
        """Seek to the keyframe at or before time ``t``; False if the file cannot seek."""
        try:
            self.container.seek(math.floor(Fraction(t) / self.time_base), stream=self.stream,
                                backward=True)
        except (av.FFmpegError, OverflowError):
            return False
        return True

    def frames(self, after_seek: bool = False) -> Iterator[_Decoded]:
        """Decode from the current position: frames in presentation order, with the holes.

        A hole is a packet whose timestamp never came out of the decoder as a frame (decode
        error, or dropped because it was damaged). That needs frame pts to echo packet pts;
        when they do not (no pts, or a decoder that makes up its own), holes are not tracked.
        ``after_seek``: holes count from the first keyframe (a seek may land before one, and
        the decoder drops what it cannot decode without it).
        """
        pending: set[int] = set()  # pts of packets sent, not yet seen as frames
        track = True
        last_time: float | None = None
        for packet in self._packets():
            after_seek = after_seek and not (packet is not None and packet.is_keyframe)
            if (packet is not None and packet.size and packet.pts is not None
                    and not packet.is_discard  # discarded by an edit list: no frame expected
                    and not after_seek):
                pending.add(packet.pts)
            try:  # None, or the demuxer's final empty packet, flushes the decoder
                decoded = packet.decode() if packet is not None else self.stream.decode(None)
            except (av.FFmpegError, ValueError):
                decoded = []
            for frame in decoded:
                if frame.pts is None:
                    track = False
                    t = 0.0 if last_time is None else last_time + self.frame_step
                else:
                    t = float(frame.pts * self.time_base)
                    track = track and frame.pts in pending
                holes: list[float] = []
                if track:
                    gone = [p for p in pending if p < frame.pts]
                    holes = [float(p * self.time_base) for p in gone]
                    pending.difference_update(gone)
                    pending.discard(frame.pts)
                else:
                    pending.clear()
                last_time = t
                yield _Decoded(t, frame, holes)
        if track and pending:
            yield _Decoded(math.inf, None, [float(p * self.time_base) for p in pending])

    def _packets(self) -> Iterator[av.Packet | None]:
        """The stream's packets from the current position, ending with a flush. A demuxer error
        ends the stream early (None then asks the decoder for what it still holds). Timestamps
        are unwrapped from here on (see _Timeline), so a seek starts a new timeline."""
        packets = self.container.demux(self.stream)
        timeline = self._timeline()
        while True:
            self.check_time()
            try:
                packet = next(packets)
            except StopIteration:
                return
            except (av.FFmpegError, OSError):
                yield None
                return
            timeline(packet)
            yield packet


@dataclass
class _Span:
    """Where demuxed packets start and end (seconds), and how many timestamp jumps were
    unwrapped on the way. ``count`` counts the packets, with or without timestamps."""

    first: float | None = None
    end: float | None = None  # the end of the last packet: its time plus its duration
    count: int = 0
    jumps: int = 0

    def add(self, packet: av.Packet, time_base: Fraction) -> None:
        if packet.size == 0 or packet.is_discard:  # the final empty packet; cut by an edit list
            return
        self.count += 1
        if packet.pts is not None:
            t = float(packet.pts * time_base)
            t_end = t + float((packet.duration or 0) * time_base)
            self.first = t if self.first is None else min(self.first, t)
            self.end = t_end if self.end is None else max(self.end, t_end)


class _Timeline:
    """Makes packet timestamps continuous, in a format where they may jump (FFmpeg's
    AVFMT_TS_DISCONT: MPEG-TS, MPEG-PS), e.g. two recordings joined with ``cat``, whose clock
    restarts halfway. Fed every packet in demux order from where demuxing started: when one's
    decode time goes backwards, or forward by more than ``_JUMP_S``, it and all after it are
    shifted to follow the previous packet by one frame."""

    def __init__(self, active: bool, time_base: Fraction, frame_step: float):
        self.active = active
        self.limit = _JUMP_S / time_base  # in time_base units, as the timestamps
        self.default_step = max(1, round(frame_step / time_base))
        self.shift = 0
        self.last: int | None = None  # shifted decode time of the previous packet
        self.step = self.default_step  # duration of the previous packet
        self.jumps = 0

    def __call__(self, packet: av.Packet) -> None:
        """Shift the packet's timestamps in place."""
        dts = packet.dts if packet.dts is not None else packet.pts
        if not self.active or packet.size == 0 or dts is None:
            return
        dts += self.shift
        if self.last is not None and (dts < self.last or dts - self.last > self.limit):
            self.shift += self.last + self.step - dts
            dts = self.last + self.step
            self.jumps += 1
        if self.shift and packet.pts is not None:
            packet.pts += self.shift
        if self.shift and packet.dts is not None:
            packet.dts += self.shift
        self.last, self.step = dts, packet.duration or self.default_step


def _open_container(file: io.RawIOBase) -> av.container.InputContainer:
    """``av.open`` for reading an open file, one call for PyAV 14 to 19.

    FFmpeg gets a file object, never a name: a name is a URL to FFmpeg, and it would read
    ``concat:a.mp4|b.mp4`` as two other files, ``file:x`` as ``x``, ``pic%d.png`` as
    ``pic1.png``. With the protocol whitelist empty, a demuxer that opens the files a playlist
    names (ffconcat, HLS) cannot either: such a file is not a video itself.

    PyAV up to 18 decodes metadata strictly unless told ``metadata_errors="replace"`` (a tag in
    another encoding than UTF-8 would fail the open); PyAV 19 removed the argument, and decodes
    with ``surrogateescape``, which never fails. So it is passed, and left out where refused.
    """
    options = {"protocol_whitelist": _NO_PROTOCOL}
    try:
        return av.open(file, "r", container_options=options, metadata_errors="replace")
    except TypeError as e:
        if "metadata_errors" not in str(e):
            raise
    file.seek(0)
    return av.open(file, "r", container_options=options)


def _seek_to_end(container: av.container.InputContainer, stream: av.video.VideoStream,
                 time_base: Fraction) -> bool:
    """Seek to the stream's last keyframe (backward from far past any end); False if the file
    cannot seek."""
    try:
        container.seek(int(_FAR_S / time_base), stream=stream, backward=True)
    except (av.FFmpegError, OverflowError):
        return False
    return True


def _fraction(rational) -> Fraction | None:
    """A stream's time base as a Fraction (PyAV 19 returns its own ``AVRational``, falsy when
    unset; older PyAV a Fraction or None)."""
    return Fraction(rational.numerator, rational.denominator) if rational else None


def _rotation(frame: av.VideoFrame) -> int:
    """Counter-clockwise display rotation of a frame, snapped to 0/90/180/270."""
    try:
        degrees = frame.rotation or 0
    except (av.FFmpegError, ValueError, TypeError):
        return 0
    return int(round(degrees / 90)) % 4 * 90


def _deadline(timeout_s: float) -> float:
    if not timeout_s > 0:
        raise UsageError(f"timeout must be positive (got {timeout_s})")
    return time.monotonic() + timeout_s


def _open_file(path: str) -> io.FileIO:
    """The file, open for reading; what FFmpeg should never be handed (it could hang on a FIFO
    or a device) or cannot read is a VideoError. Opened without blocking (a FIFO would wait for
    a writer), then checked: the file checked is the file read."""
    try:
        file = open(path, "rb", buffering=0, opener=_open_nonblocking)
    except (FileNotFoundError, NotADirectoryError):
        raise VideoError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise VideoError(f"{path}: is a directory, not a video file") from None
    except PermissionError:
        raise VideoError(f"{path}: permission denied") from None
    except (OSError, ValueError) as e:
        raise VideoError(f"{path}: cannot open ({getattr(e, 'strerror', None) or e})") from None
    problem = _file_problem(os.fstat(file.fileno()))
    if problem:
        file.close()
        raise VideoError(f"{path}: {problem}")
    os.set_blocking(file.fileno(), True)
    return file


def _file_problem(st: os.stat_result) -> str | None:
    if stat.S_ISDIR(st.st_mode):
        return "is a directory, not a video file"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    return None if st.st_size else "empty file"


def _open_nonblocking(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NONBLOCK)
