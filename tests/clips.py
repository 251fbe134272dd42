"""Write small test clips with PyAV whose frames say which frame they are.

A helper module, not a test file: ``from clips import write_clip, frame_index_of``.

Frame ``i`` is split into 2 x 2 solid gray quadrants; each quadrant holds one base-8 digit of
``i`` as a gray level (``d * 255 / 7``), least significant digit top-left, then top-right,
bottom-left, bottom-right. Eight levels 36 apart survive lossy coding (h264, hevc, vp9, av1,
mpeg4, the 3-3-2 palette of GIF) and downscaling, so :func:`frame_index_of` reads the index
back from a decoded RGB frame. Up to ``MAX_INDEX + 1`` (4,096) distinct frames; a rotated frame
reads back as a different index (its quadrants move), which is how rotation is tested.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

LEVELS = 8
DIGITS = 4
MAX_INDEX = LEVELS**DIGITS - 1

# Default video codec per container suffix.
DEFAULT_CODEC = {
    ".mp4": "libx264",
    ".mov": "libx264",
    ".mkv": "libx264",
    ".avi": "mpeg4",
    ".webm": "libvpx-vp9",
    ".gif": "gif",
}

# Codec options that keep tiny clips readable and fast to write.
_CODEC_OPTIONS = {
    "libx264": {"preset": "ultrafast", "crf": "18"},
    "libx265": {"preset": "ultrafast", "crf": "18", "x265-params": "log-level=error"},
    "libvpx-vp9": {"crf": "20", "b": "0", "deadline": "realtime", "cpu-used": "8"},
    "libvpx": {"crf": "10", "b": "1M", "deadline": "realtime", "cpu-used": "8"},
    "libsvtav1": {"preset": "11", "crf": "20"},
    "mpeg4": {"qscale": "2"},
}

# Pixel format when the codec cannot take yuv420p.
_PIX_FMT = {"gif": "rgb8"}

ColorFn = Callable[[int, int, int], "np.ndarray | Sequence[int]"]


def level(digit: int) -> int:
    """Gray level that encodes one base-8 digit."""
    return round(digit * 255 / (LEVELS - 1))


def pattern_frame(index: int, width: int, height: int) -> np.ndarray:
    """The uint8 RGB ``[height, width, 3]`` image that encodes ``index`` (see module doc)."""
    if not 0 <= index <= MAX_INDEX:
        raise ValueError(f"frame index {index} outside 0..{MAX_INDEX}")
    img = np.empty((height, width, 3), np.uint8)
    hh, hw = height // 2, width // 2
    cells = [(slice(0, hh), slice(0, hw)), (slice(0, hh), slice(hw, None)),
             (slice(hh, None), slice(0, hw)), (slice(hh, None), slice(hw, None))]
    for k, (rows, cols) in enumerate(cells):
        img[rows, cols] = level(index // LEVELS**k % LEVELS)
    return img


def frame_index_of(rgb: np.ndarray) -> int:
    """Read back the index that :func:`pattern_frame` drew into a decoded RGB frame.

    Reads the middle half of each quadrant (edges blur under lossy coding), averaging the red
    and green channels (GIF's palette keeps only 2 bits of blue).
    """
    rgb = np.asarray(rgb)
    h, w = rgb.shape[:2]
    hh, hw = h // 2, w // 2
    index = 0
    for k, (r0, r1, c0, c1) in enumerate([(0, hh, 0, hw), (0, hh, hw, w), (hh, h, 0, hw), (hh, h, hw, w)]):
        qh, qw = r1 - r0, c1 - c0
        cell = rgb[r0 + qh // 4: r1 - qh // 4 or None, c0 + qw // 4: c1 - qw // 4 or None, :2]
        digit = int(round(float(cell.astype(np.float64).mean()) * (LEVELS - 1) / 255))
        index += min(max(digit, 0), LEVELS - 1) * LEVELS**k
    return index


def _image(color_fn: ColorFn | None, i: int, width: int, height: int) -> np.ndarray:
    if color_fn is None:
        return pattern_frame(i, width, height)
    out = color_fn(i, width, height)
    arr = np.asarray(out, dtype=np.uint8)
    if arr.ndim == 1:  # a solid colour
        arr = np.broadcast_to(arr, (height, width, 3)).copy()
    return arr


def _add_video_stream(container, *, codec, size, fps, pix_fmt, gop, rotation, options, time_base):
    width, height = size
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height = width, height
    stream.pix_fmt = pix_fmt or _PIX_FMT.get(codec, "yuv420p")
    opts = dict(_CODEC_OPTIONS.get(codec, {}))
    if gop is not None:
        stream.codec_context.gop_size = gop
        if codec == "libx264":
            opts["x264-params"] = f"keyint={gop}:min-keyint={gop}:scenecut=0"
        elif codec == "libx265":
            opts["x265-params"] = f"log-level=error:keyint={gop}:min-keyint={gop}:scenecut=0"
    opts.update(options or {})
    stream.options = opts
    stream.codec_context.time_base = time_base
    if rotation:
        stream.set_display_rotation(rotation)
    return stream


def _frame_times(n_frames: int, fps: float, pts: Sequence[float] | None) -> list[float]:
    if pts is None:
        return [i / fps for i in range(n_frames)]
    if len(pts) != n_frames:
        raise ValueError(f"pts has {len(pts)} entries for {n_frames} frames")
    if any(b <= a for a, b in zip(pts, pts[1:])):
        raise ValueError("pts must increase strictly")
    return [float(t) for t in pts]


def write_clip(
    path: str | os.PathLike,
    *,
    n_frames: int = 16,
    size: tuple[int, int] = (64, 48),
    fps: float = 10,
    codec: str | None = None,
    color_fn: ColorFn | None = None,
    pts: Sequence[float] | None = None,
    pix_fmt: str | None = None,
    gop: int | None = None,
    rotation: int = 0,
    options: dict[str, str] | None = None,
    corrupt: Sequence[int] = (),
    extra_streams: Sequence[dict] = (),
    default_stream: int | None = None,
) -> Path:
    """Write a clip; return its path.

    - ``size`` is ``(width, height)``; frame ``i`` shows :func:`pattern_frame` ``(i)`` unless
      ``color_fn(i, width, height)`` returns an image ``[H, W, 3]`` or a solid ``(r, g, b)``.
    - The container follows the suffix; ``codec`` defaults per suffix (:data:`DEFAULT_CODEC`).
    - ``pts``: explicit presentation times in seconds (variable frame rate), else ``i / fps``.
      Times are kept in a 1/1000 s time base when given, in 1/fps otherwise. With explicit pts,
      B-frames are turned off for libx264 so the container duration stays right.
    - ``gop``: keyframe interval in frames. ``rotation``: display rotation in degrees
      (counter-clockwise, as ``VideoFrame.rotation`` reads it back).
    - ``corrupt``: frame indices whose packets get their payload (all but a 4-byte prefix)
      zeroed at mux time, timestamps kept: damage in the middle of a file. Use ``gop=1`` for
      damage that does not spread to the frames predicted from the broken one.
    - ``extra_streams``: more video streams, each a dict of ``n_frames``, ``size``, ``fps``,
      ``codec``, ``color_fn``, ``index_offset`` (added to the frame index drawn). ``default_stream``:
      index of the stream to mark with the "default" disposition (others get none).
    """
    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1: errors only on stderr
    path = Path(path)
    suffix = path.suffix.lower()
    if codec is None:
        codec = DEFAULT_CODEC.get(suffix, "libx264")
    times = _frame_times(n_frames, fps, pts)
    time_base = Fraction(1, 1000) if pts is not None else 1 / Fraction(fps).limit_denominator(1000)
    opts = dict(options or {})
    if pts is not None and codec == "libx264":
        opts.setdefault("bf", "0")

    specs = [dict(n_frames=n_frames, size=size, fps=fps, codec=codec, color_fn=color_fn,
                  times=times, pix_fmt=pix_fmt, gop=gop, rotation=rotation, options=opts,
                  time_base=time_base, index_offset=0, corrupt=set(corrupt))]
    for extra in extra_streams:
        e_fps = extra.get("fps", fps)
        e_n = extra.get("n_frames", n_frames)
        specs.append(dict(n_frames=e_n, size=extra.get("size", size), fps=e_fps,
                          codec=extra.get("codec", codec), color_fn=extra.get("color_fn"),
                          times=_frame_times(e_n, e_fps, None), pix_fmt=extra.get("pix_fmt"),
                          gop=extra.get("gop"), rotation=extra.get("rotation", 0),
                          options=extra.get("options"),
                          time_base=1 / Fraction(e_fps).limit_denominator(1000),
                          index_offset=extra.get("index_offset", 0), corrupt=set()))

    with av.open(str(path), "w") as container:
        streams = [
            _add_video_stream(container, codec=s["codec"], size=s["size"], fps=s["fps"],
                              pix_fmt=s["pix_fmt"], gop=s["gop"], rotation=s["rotation"],
                              options=s["options"], time_base=s["time_base"])
            for s in specs
        ]
        if default_stream is not None:
            for k, st in enumerate(streams):
                st.disposition = av.stream.Disposition.default if k == default_stream else av.stream.Disposition(0)

        def mux(stream, packets, spec):
            for packet in packets:
                if spec["corrupt"] and packet.pts is not None:
                    idx = _nearest_index(spec["times"], float(packet.pts * packet.time_base))
                    if idx in spec["corrupt"]:
                        # Keep the 4-byte NAL length prefix (the mp4 muxer drops a packet it
                        # cannot parse), zero the rest: decoders reject or skip it.
                        junk = av.Packet(bytes(packet)[:4] + bytes(max(packet.size - 4, 0)))
                        junk.stream = stream  # before the timestamps: it resets time_base
                        junk.time_base = packet.time_base
                        junk.pts, junk.dts = packet.pts, packet.dts
                        junk.is_keyframe = packet.is_keyframe
                        packet = junk
                container.mux(packet)

        # Interleave the streams by time so the muxer does not buffer a whole stream.
        events = sorted((t, k, i) for k, s in enumerate(specs) for i, t in enumerate(s["times"]))
        for t, k, i in events:
            spec, stream = specs[k], streams[k]
            w, h = spec["size"]
            frame = av.VideoFrame.from_ndarray(_image(spec["color_fn"], i + spec["index_offset"], w, h), format="rgb24")
            frame.pts = round(t / spec["time_base"])
            frame.time_base = spec["time_base"]
            mux(stream, stream.encode(frame), spec)
        for spec, stream in zip(specs, streams):
            mux(stream, stream.encode(None), spec)
    return path


def _nearest_index(times: Sequence[float], t: float) -> int:
    return min(range(len(times)), key=lambda i: abs(times[i] - t))


def write_audio(path: str | os.PathLike, *, seconds: float = 1.0, rate: int = 8000) -> Path:
    """Write an audio-only file (a 440 Hz tone); codec by suffix: .wav, .m4a, .mp3, .ogg, .mka."""
    path = Path(path)
    codec = {".wav": "pcm_s16le", ".m4a": "aac", ".mp3": "mp3", ".ogg": "libopus", ".mka": "flac"}[path.suffix.lower()]
    if codec == "libopus":
        rate = 48000
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, layout="mono")
        total = int(seconds * rate)
        chunk = 1024
        for start in range(0, total, chunk):
            n = min(chunk, total - start)
            t = (np.arange(start, start + n) / rate).astype(np.float32)
            tone = 0.3 * np.sin(2 * np.pi * 440 * t)
            frame = av.AudioFrame.from_ndarray(tone[None, :].astype(np.float32), format="flt", layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            frame.time_base = Fraction(1, rate)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def write_image(path: str | os.PathLike, *, size: tuple[int, int] = (64, 48), index: int = 5) -> Path:
    """Write a still image (format by suffix: .png, .jpg) showing :func:`pattern_frame` ``(index)``."""
    from PIL import Image

    path = Path(path)
    Image.fromarray(pattern_frame(index, *size)).save(path)
    return path


def product_frames(lm, enc) -> np.ndarray:
    """The frames the pipeline decoded for an encoded clip, read again the way it reads them
    (it keeps only their features): uint8 ``[T, H, W, 3]``."""
    from dycoke_cli.video.read import read_video

    n = enc.video.info.requested
    return read_video(enc.video.info.path, n, size_for=lambda h, w: lm.target_size(n, h, w)).frames
