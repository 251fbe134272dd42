"""Decode a video stream and pick the sampled frames: the decoding half of
:mod:`dycoke_cli.video.read`, whose docstring states the rules (Sampling rule, How, Damage, Rotation).

``Decoder``     seeks, and decodes frames in presentation order with the holes between them
``first_frame`` the first decoded frame (its rotation and size set the output's)
``sample``      feeds decoded frames to a ``Picker``, seeking ahead to far targets (a generator)
``Picker``      keeps the frame nearest each target time, counting those lost to holes
``Converter``   turns a picked frame into an RGB array, downscaled and rotated for display

Internal to :mod:`dycoke_cli.video.read`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from .container import Source

# FFmpeg's AVCOL_SPC_UNSPECIFIED and AVCOL_RANGE_UNSPECIFIED.
_UNSPECIFIED_COLORSPACE = 2
_UNSPECIFIED_RANGE = 0

# Two times closer than this (seconds) are the same time: frame pts are exact rationals, the
# targets are floats, and a tie must go to the earlier frame however the float rounds.
_TIME_EPS = 1e-9


@dataclass
class Decoded:
    """One step of the decode: a frame and its time, and the times of packets that produced no
    frame (holes) since the previous step. ``frame is None`` at the end of the stream."""

    time: float
    frame: av.VideoFrame | None
    holes: list[float]


class Decoder:
    """Seeks in the source's stream and decodes it from there."""

    def __init__(self, source: Source):
        self.source = source

    def seek(self, t: float) -> bool:
        """Seek to the keyframe at or before time ``t``; False if the file cannot seek."""
        source = self.source
        try:
            source.container.seek(math.floor(Fraction(t) / source.time_base),
                                  stream=source.stream, backward=True)
        except (av.FFmpegError, OverflowError):
            return False
        return True

    def frames(self, after_seek: bool = False) -> Iterator[Decoded]:
        """Decode from the current position: frames in presentation order, with the holes.

        A hole is a packet whose timestamp never came out of the decoder as a frame (decode
        error, or dropped because it was damaged). That needs frame pts to echo packet pts;
        when they do not (no pts, or a decoder that makes up its own), holes are not tracked.
        ``after_seek``: holes count from the first keyframe (a seek may land before one, and
        the decoder drops what it cannot decode without it).
        """
        time_base, frame_step = self.source.time_base, self.source.frame_step
        pending: set[int] = set()  # pts of packets sent, not yet seen as frames
        track = True
        last_time: float | None = None
        for packet in self._packets():
            after_seek = after_seek and not (packet is not None and packet.is_keyframe)
            if (packet is not None and packet.size and packet.pts is not None
                    and not packet.is_discard  # discarded by an edit list: no frame expected
                    and not after_seek):
                pending.add(packet.pts)
            for frame in self._decode(packet):
                if frame.pts is None:
                    track = False
                    t = 0.0 if last_time is None else last_time + frame_step
                else:
                    t = float(frame.pts * time_base)
                    track = track and frame.pts in pending
                holes: list[float] = []
                if track:
                    gone = [p for p in pending if p < frame.pts]
                    holes = [float(p * time_base) for p in gone]
                    pending.difference_update(gone)
                    pending.discard(frame.pts)
                else:
                    pending.clear()
                last_time = t
                yield Decoded(t, frame, holes)
        if track and pending:
            yield Decoded(math.inf, None, [float(p * time_base) for p in pending])

    def _decode(self, packet: av.Packet | None) -> list[av.VideoFrame]:
        """The frames a packet gives, none where it fails to decode. None, or the demuxer's
        final empty packet, flushes the decoder."""
        try:
            return packet.decode() if packet is not None else self.source.stream.decode(None)
        except (av.FFmpegError, ValueError):
            return []

    def _packets(self) -> Iterator[av.Packet | None]:
        """The stream's packets from the current position, ending with a flush. A demuxer error
        ends the stream early (None then asks the decoder for what it still holds). Timestamps
        are unwrapped from here on (see Timeline), so a seek starts a new timeline."""
        source = self.source
        packets = source.container.demux(source.stream)
        timeline = source.timeline()
        while True:
            source.reading.check_time()
            try:
                packet = next(packets)
            except StopIteration:
                return
            except (av.FFmpegError, OSError):
                yield None
                return
            timeline(packet)
            yield packet


def first_frame(source: Source, frames: Iterator[Decoded]) -> Decoded:
    """The first decoded frame, carrying every hole met before it."""
    holes: list[float] = []
    for item in frames:
        holes += item.holes
        if item.frame is not None:
            source.reading.check_size(item.frame.width, item.frame.height)
            return Decoded(item.time, item.frame, holes)
    raise source.reading.error("no decodable video frame (the file is truncated or damaged)")


def sample(decoder: Decoder, picker: Picker, first: Decoded, frames: Iterator[Decoded],
           seek: bool) -> Iterator[None]:
    """Feed decoded frames to the picker; with ``seek``, jump ahead to far targets. A generator:
    it pauses after every frame fed, so that the caller can take the frames picked so far
    (``Picker.take``) and work on them while the rest is decoded."""
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
    item: Decoded | None = first
    while item is not None and not picker.done:
        if landing_for is not None and item.frame is not None:
            if item.time > landing_for + _TIME_EPS and landing_for - lead > picker.start:
                lead = max(2 * lead, item.time - landing_for, decoder.source.frame_step)
                if decoder.seek(landing_for - lead):
                    frames = decoder.frames(after_seek=True)
                    item = next(frames, None)
                    continue
            keyframe_gap = max(keyframe_gap, landing_for - item.time)
            landing_for = None
        picker.feed(item)
        yield
        target = picker.next_target()
        if (seek and target is not None and item.frame is not None
                and target - item.time > keyframe_gap + _TIME_EPS):
            seek = decoder.seek(target - lead)  # a file that cannot seek is read on
            if seek:
                picker.forget_position()
                landing_for = target
                frames = decoder.frames(after_seek=True)
        item = next(frames, None)
    picker.finish()


class Picker:
    """Keeps, for each target time, the nearest decoded frame, holding one frame back.

    Frames must be fed in presentation order. After a seek call :meth:`forget_position`.
    """

    def __init__(self, start: float, span: float, n: int, convert: Converter):
        self.start, self.n, self.convert = start, n, convert
        self.segment = span / n
        self.j = 0  # next target to settle
        self.prev: tuple[float, av.VideoFrame] | None = None
        self.holes: list[float] = []  # holes after prev
        self.arrays: list[np.ndarray] = []  # picked, not taken yet (see take)
        self.times: list[float] = []
        self.targets: list[int] = []  # the target each of them was picked for
        self.picked = 0  # frames picked so far, taken or not
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

    def feed(self, item: Decoded) -> None:
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
        if not self.picked and self.stand_in is not None:
            self._pick(*self.stand_in)

    def resume(self, settled: int, last: float, picked: int) -> None:
        """Go on from an earlier read of the same clip and count that stopped after a frame at time
        ``last``, picked for target ``settled - 1``, the ``picked``-th frame."""
        self.j, self.last, self.picked = settled, last, picked

    def take(self, at_most: int | None = None) -> tuple[list[np.ndarray], list[float], list[int]]:
        """The frames picked and not taken yet (the first ``at_most`` of them), with their times
        and the targets they were picked for."""
        n = len(self.arrays) if at_most is None else min(at_most, len(self.arrays))
        arrays, times, targets = self.arrays[:n], self.times[:n], self.targets[:n]
        del self.arrays[:n], self.times[:n], self.targets[:n]
        return arrays, times, targets

    def _pick(self, time_: float, rgb: np.ndarray) -> None:
        self.arrays.append(rgb)
        self.times.append(time_)
        self.targets.append(self.j)
        self.picked += 1

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
            self._pick(best_time, rgb)
            return
        self.lost.add(best_time)
        if not self.picked and self.stand_in is None:
            self._keep_stand_in(target, candidates)

    def _keep_stand_in(self, target: float,
                       candidates: list[tuple[float, av.VideoFrame | None]]) -> None:
        """Kept in case every target is lost: then the frame nearest the first lost one is
        returned rather than nothing."""
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


class Converter:
    """Turns picked frames into RGB arrays of one size, rotated for display."""

    def __init__(self, first: av.VideoFrame, max_side: int | None, size_for=None):
        self.turns = rotation(first) // 90  # counter-clockwise quarter turns
        w, h = first.width, first.height  # coded orientation
        if size_for is not None:  # twice the model's size on both axes, never enlarged
            shown_h, shown_w = (h, w) if self.turns % 2 == 0 else (w, h)
            target_h, target_w = size_for(shown_h, shown_w)
            scale = min(1.0, max(2 * target_h / shown_h, 2 * target_w / shown_w))
        else:
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


def rotation(frame: av.VideoFrame) -> int:
    """Counter-clockwise display rotation of a frame, snapped to 0/90/180/270."""
    try:
        degrees = frame.rotation or 0
    except (av.FFmpegError, ValueError, TypeError):
        return 0
    return int(round(degrees / 90)) % 4 * 90
