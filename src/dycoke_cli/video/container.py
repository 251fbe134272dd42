"""Open a video file and describe its video stream: the probing half of :mod:`dycoke_cli.video.read`,
whose docstring states the rules (Duration, Timeline, which problems are errors).

``Reading``        one read of one file: the name its errors cite, and its deadline
``Source``         the open file, its container and the chosen video stream
``measure_timing`` the clip's duration and end (a ``Timing``), checked against its packets
``Timeline``       makes jumping timestamps (MPEG-TS, MPEG-PS) continuous

Internal to :mod:`dycoke_cli.video.read`.
"""

from __future__ import annotations

import io
import os
import stat
import time
from dataclasses import dataclass
from fractions import Fraction

import av

from ..errors import UsageError, VideoError

# Frames with more pixels than this are refused (8K UHD is 33 Mpx): such sizes come from
# damaged headers, and one RGB frame would take gigabytes.
MAX_PIXELS = 8192 * 8192

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


class Reading:
    """One read of one file: the name its errors cite, and the time it must end by."""

    def __init__(self, path: str | os.PathLike, timeout_s: float):
        if not timeout_s > 0:
            raise UsageError(f"timeout must be positive (got {timeout_s})")
        self.deadline = time.monotonic() + timeout_s
        self.timeout_s = timeout_s
        self.path = os.fsdecode(path)

    def error(self, problem: str) -> VideoError:
        return VideoError(f"{self.path}: {problem}")

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise self.error(f"reading took longer than {self.timeout_s:g} s (timeout)")

    def check_size(self, width: int, height: int) -> None:
        if width * height > MAX_PIXELS:
            raise self.error(f"{width}x{height} frames are too large (over {MAX_PIXELS / 1e6:.0f} megapixels)")


# --------------------------------------------------------------------------------------------
# The open file


class Source:
    """The open file, its container and its chosen video stream, with what reading the stream
    needs to know of it. Every failure to open becomes a VideoError."""

    def __init__(self, reading: Reading):
        self.reading = reading
        self.file = _open_file(reading.path)
        try:
            self.container = _open_container(self.file)
        except (av.FFmpegError, OSError, ValueError) as e:
            error = _open_error(reading, self.file, e)
            self.file.close()
            raise error from None
        try:
            self.stream, self.video_streams = _choose_stream(reading, self.container)
            self.time_base = _fraction(self.stream.time_base) or Fraction(1, 1000)
            rate = self.stream.average_rate or self.stream.guessed_rate
            self.frame_step = float(1 / rate) if rate else 1 / 25  # for frames without pts
            self.may_jump = _may_jump(self.container)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.container.close()
        self.file.close()  # PyAV leaves a file object it was given open

    def timeline(self) -> Timeline:
        """A fresh timeline for this stream's packets, from where demuxing starts."""
        return Timeline(self.may_jump, self.time_base, self.frame_step)


def _choose_stream(reading: Reading,
                   container: av.container.InputContainer) -> tuple[av.video.VideoStream, int]:
    """The video stream to read (the default one, else the first; cover art is not a video
    stream), and how many video streams there are."""
    videos = [s for s in container.streams.video
              if not s.disposition & av.stream.Disposition.attached_pic]
    if not videos:
        raise reading.error("not a video file (no video stream)")
    defaults = [s for s in videos if s.disposition & av.stream.Disposition.default]
    stream = (defaults or videos)[0]
    if stream.codec_context is None:
        raise reading.error("video codec not supported by this FFmpeg build")
    reading.check_size(stream.codec_context.width, stream.codec_context.height)
    return stream, len(videos)


def _may_jump(container: av.container.InputContainer) -> bool:
    """Whether timestamps may jump (restart) in this format: MPEG-TS, MPEG-PS. (The flags are an
    int in PyAV 14 to 19; the value of an enum, should they become one.)"""
    flags = container.format.flags
    return bool(int(getattr(flags, "value", flags)) & _AVFMT_TS_DISCONT)


def _fraction(rational) -> Fraction | None:
    """A stream's time base as a Fraction (PyAV 19 returns its own ``AVRational``, falsy when
    unset; older PyAV a Fraction or None)."""
    return Fraction(rational.numerator, rational.denominator) if rational else None


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
    problem = file_problem(os.fstat(file.fileno()))
    if problem:
        file.close()
        raise VideoError(f"{path}: {problem}")
    os.set_blocking(file.fileno(), True)
    return file


def file_problem(st: os.stat_result) -> str | None:
    """What makes a file unreadable as a video by its stat alone (a folder, not a regular file, empty), or None."""
    if stat.S_ISDIR(st.st_mode):
        return "is a directory, not a video file"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    return None if st.st_size else "empty file"


def _open_nonblocking(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NONBLOCK)


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


def _open_error(reading: Reading, file: io.RawIOBase, e: Exception) -> VideoError:
    """Why FFmpeg could not open the file: a known container's signature makes it a damaged
    video, anything else is not a video."""
    if isinstance(e, PermissionError):
        return reading.error("permission denied")
    try:
        file.seek(0)
        head = file.read(12)
    except OSError:
        head = b""
    if any(head[at:at + len(magic)] == magic for at, magic in _VIDEO_MAGIC):
        return reading.error("damaged or truncated video file (FFmpeg cannot read it)")
    return reading.error("not a video file (FFmpeg cannot read it)")


# --------------------------------------------------------------------------------------------
# Timing


@dataclass(frozen=True)
class Timing:
    """Where the clip ends and how long it lasts (seconds, None when unknown);
    ``discontinuous``: its timestamps jump, so the times used are unwrapped (see Timeline)."""

    duration: float | None
    end: float | None
    discontinuous: bool


def measure_timing(source: Source) -> Timing:
    """The stored duration (the stream's, else the container's) where the last packets bear it
    out, else measured by demuxing: a look at the end of the stream (a seek to its last
    keyframe) checks the stored one; the whole stream is demuxed when none is stored, when the
    end cannot be reached by a seek, and in a format whose timestamps may jump."""
    stored = _stored(source)
    whole = stored is None or source.may_jump
    span = _scan(source, whole)
    if span.end is None and not whole:
        span = _scan(source, whole=True)
    return _reconcile(stored, span, source.frame_step)


def _reconcile(stored: tuple[float, float] | None, span: _Span, frame_step: float) -> Timing:
    """The timing from the stored (duration, start) and where the packets lie."""
    if stored is not None:
        duration, start = stored
        slack = _SLACK_FRAMES * frame_step
        if span.end is None or (not span.jumps and abs(start + duration - span.end) <= slack):
            return Timing(duration, start + duration, False)
    if span.end is None:
        return Timing(None, None, False)
    start = stored[1] if stored is not None and not span.jumps else span.first
    return Timing(max(span.end - start, 0.0), span.end, span.jumps > 0)


def _stored(source: Source) -> tuple[float, float] | None:
    """(duration, start) as the file states them: the stream's, else the container's."""
    stream, container = source.stream, source.container
    if stream.duration and stream.duration > 0:
        return (float(stream.duration * source.time_base),
                float((stream.start_time or 0) * source.time_base))
    if container.duration and container.duration > 0:
        return container.duration / av.time_base, (container.start_time or 0) / av.time_base
    return None


def _scan(source: Source, whole: bool) -> _Span:
    """Demux (not decode) the stream in a second handle: where its packets start and end, on
    the unwrapped timeline. All of it when ``whole``, else from a seek to its last keyframe
    (``first`` is then not the start)."""
    span = _Span()
    timeline = source.timeline()
    reading = source.reading
    try:
        with _open_file(reading.path) as f, _open_container(f) as c:
            stream = c.streams[source.stream.index]
            if whole or _seek_to_end(c, stream, source.time_base):
                for packet in c.demux(stream):
                    reading.check_time()
                    timeline(packet)
                    span.add(packet, source.time_base)
    except (av.FFmpegError, OSError, VideoError):
        pass  # keep what was read before the damage (or the file vanished meanwhile)
    reading.check_time()  # a timeout is not damage
    span.jumps = timeline.jumps
    if whole and span.end is None and span.count:  # no timestamps: frames at the nominal rate
        span.first, span.end = 0.0, span.count * source.frame_step
    return span


def _seek_to_end(container: av.container.InputContainer, stream: av.video.VideoStream,
                 time_base: Fraction) -> bool:
    """Seek to the stream's last keyframe (backward from far past any end); False if the file
    cannot seek."""
    try:
        container.seek(int(_FAR_S / time_base), stream=stream, backward=True)
    except (av.FFmpegError, OverflowError):
        return False
    return True


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


class Timeline:
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
