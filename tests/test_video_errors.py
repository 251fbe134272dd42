"""Bad input to read_video / probe_video: one-line VideoErrors naming the file, the file left
untouched, no other exception and no hang on damaged bytes; bounded time and memory on a
long clip."""

from __future__ import annotations

import os
import struct
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from clips import frame_index_of, write_audio, write_clip
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dycoke_cli.errors import UsageError, VideoError
from dycoke_cli.video import read as video_mod
from dycoke_cli.video.read import Video, probe_video, read_video


def snapshot(path: Path) -> tuple:
    """Bytes and mtime of a file, and what its folder holds: to show nothing was written."""
    folder = sorted(os.listdir(path.parent)) if path.parent.is_dir() else None
    if path.is_file():
        return path.read_bytes(), path.stat().st_mtime_ns, folder
    return None, None, folder


def expect_error(path, message: str, **kwargs) -> None:
    path = Path(path)
    before = snapshot(path)
    for read in (lambda: read_video(path, 8, **kwargs), lambda: probe_video(path, **kwargs)):
        with pytest.raises(VideoError) as exc:
            read()
        assert str(exc.value) == f"{path}: {message}"
    assert snapshot(path) == before


NOT_A_VIDEO = "not a video file (FFmpeg cannot read it)"
NO_VIDEO_STREAM = "not a video file (no video stream)"
TRUNCATED = "damaged or truncated video file (FFmpeg cannot read it)"
NO_FRAME = "no decodable video frame (the file is truncated or damaged)"


def test_missing_path(tmp_path):
    expect_error(tmp_path / "nope.mp4", "no such file")
    expect_error(tmp_path / "nope" / "clip.mp4", "no such file")


def test_directory(tmp_path):
    (tmp_path / "dir.mp4").mkdir()
    expect_error(tmp_path / "dir.mp4", "is a directory, not a video file")


def test_empty_file(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    expect_error(tmp_path / "empty.mp4", "empty file")


def test_text_file(tmp_path):
    (tmp_path / "notes.txt").write_text("these are my notes\nnot a video\n")
    expect_error(tmp_path / "notes.txt", NOT_A_VIDEO)
    (tmp_path / "notes.mp4").write_text("a text file named like a video\n" * 50)
    expect_error(tmp_path / "notes.mp4", NOT_A_VIDEO)


def test_random_bytes(tmp_path):
    rng = np.random.default_rng(7)
    for i in range(5):
        path = tmp_path / f"random{i}.mp4"
        path.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
        expect_error(path, NOT_A_VIDEO)


def test_fifo_is_refused_without_blocking(tmp_path):
    path = tmp_path / "pipe.mp4"
    os.mkfifo(path)
    expect_error(path, "not a regular file")


def test_truncated_files(tmp_path):
    mp4 = write_clip(tmp_path / "full.mp4", n_frames=40).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(mp4[: len(mp4) // 2])  # the index (moov) is at the end
    expect_error(tmp_path / "cut.mp4", TRUNCATED)
    mkv = write_clip(tmp_path / "full.mkv", n_frames=40).read_bytes()
    (tmp_path / "header.mkv").write_bytes(mkv[:200])  # not even the whole header
    expect_error(tmp_path / "header.mkv", TRUNCATED)
    (tmp_path / "cut.mkv").write_bytes(mkv[:700])  # header, no whole frame
    expect_error(tmp_path / "cut.mkv", NO_FRAME)


def test_truncated_mkv_keeps_the_frames_it_has(tmp_path):
    mkv = write_clip(tmp_path / "full.mkv", n_frames=40).read_bytes()
    (tmp_path / "cut.mkv").write_bytes(mkv[: len(mkv) // 2])
    v = read_video(tmp_path / "cut.mkv", 40)
    got = [frame_index_of(f) for f in v.frames]
    assert got == list(range(len(got))) and 5 < len(got) < 40


@pytest.mark.parametrize("name", ["tone.m4a", "tone.wav", "tone.mp3", "tone.ogg"])
def test_audio_only(tmp_path, name):
    expect_error(write_audio(tmp_path / name), NO_VIDEO_STREAM)


def _read_without_root(path: Path) -> str:
    """read_video in a forked child that dropped root (root reads any file), result as text."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        msg = "no error"
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            read_video(path, 8)
        except VideoError as e:
            msg = f"VideoError: {e}"
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            msg = f"{type(e).__name__}: {e}"
        finally:
            os.write(w, msg.encode())
            os._exit(0)
    os.close(w)
    out = b""
    while chunk := os.read(r, 4096):
        out += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return out.decode()


def test_file_without_read_permission(tmp_path):
    path = write_clip(tmp_path / "locked.mp4", n_frames=4)
    path.chmod(0)
    try:
        if os.geteuid() == 0:
            tmp_path.chmod(0o755)
            assert _read_without_root(path) == f"VideoError: {path}: permission denied"
        else:
            expect_error(path, "permission denied")
    finally:
        path.chmod(0o644)


def test_absurd_frame_size_is_refused_before_decoding(tmp_path):
    # a damaged GIF header claiming a 20000 x 5000 screen (one RGB frame would be 300 MB)
    data = bytearray(write_clip(tmp_path / "tiny.gif", n_frames=3, size=(16, 16)).read_bytes())
    data[6:10] = struct.pack("<HH", 20000, 5000)
    (tmp_path / "huge.gif").write_bytes(bytes(data))
    expect_error(tmp_path / "huge.gif", "20000x5000 frames are too large (over 67 megapixels)")


def test_timeout(tmp_path):
    path = write_clip(tmp_path / "clip.mp4", n_frames=40)
    expect_error(path, "reading took longer than 1e-06 s (timeout)", timeout_s=1e-6)


def test_usage_errors(tmp_path):
    from dycoke_cli.cli.flags import flag_words

    path = write_clip(tmp_path / "clip.mp4", n_frames=4)
    for n in (0, -3):
        with pytest.raises(UsageError) as exc:
            read_video(path, n)
        # the library names its setting; the command line words it as its flag
        assert str(exc.value) == f"frames must be at least 1 (got {n})"
        assert flag_words(exc.value) == f"--frames must be at least 1 (got {n})"
    with pytest.raises(UsageError):
        read_video(path, 4, max_side=0)


# -- damage in the middle --------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".webm"])
def test_corrupt_packets_are_decoded_around(tmp_path, suffix):
    # every frame a keyframe, so the damage does not spread to the frames after it
    path = write_clip(tmp_path / f"hurt{suffix}", n_frames=40, gop=1, corrupt=[10, 11])
    before = snapshot(path)
    v = read_video(path, 40)  # one target per frame: 0.05 + 0.1 k, ties go earlier
    assert [frame_index_of(f) for f in v.frames] == [i for i in range(40) if i not in (10, 11)]
    assert (v.info.sampled, v.info.lost) == (38, 2)
    v = read_video(path, 4)  # targets 0.5, 1.5, 2.5, 3.5 miss the damage
    assert [frame_index_of(f) for f in v.frames] == [5, 15, 25, 35] and v.info.lost == 0
    assert snapshot(path) == before


def test_damaged_first_frame_still_counts_in_the_span(tmp_path):
    path = write_clip(tmp_path / "hurt.mp4", n_frames=40, gop=1, corrupt=[0])
    v = read_video(path, 40)
    assert [frame_index_of(f) for f in v.frames] == list(range(1, 40))
    assert v.info.lost == 1


def test_only_damaged_targets_give_the_nearest_survivor(tmp_path):
    path = write_clip(tmp_path / "hurt.mp4", n_frames=41, gop=1, corrupt=[20])
    v = read_video(path, 1)  # target 2.05: frame 20 is gone, frame 21 (2.1) is nearer than 19
    assert [frame_index_of(f) for f in v.frames] == [21]
    assert (v.info.sampled, v.info.lost) == (1, 1)


def test_every_packet_damaged(tmp_path):
    path = write_clip(tmp_path / "dead.mp4", n_frames=10, gop=1, corrupt=range(10))
    expect_error(path, NO_FRAME)


# -- fuzz: mutated and truncated bytes -------------------------------------------------------


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("seeds")
    return {
        ".mp4": write_clip(folder / "s.mp4", n_frames=12, size=(32, 32), gop=4).read_bytes(),
        ".mkv": write_clip(folder / "s.mkv", n_frames=12, size=(32, 32), gop=4).read_bytes(),
        ".webm": write_clip(folder / "s.webm", n_frames=12, size=(32, 32)).read_bytes(),
        ".gif": write_clip(folder / "s.gif", n_frames=6, size=(16, 16)).read_bytes(),
    }


def _mutate(data: st.DataObject, seed: bytes) -> bytes:
    out = bytearray(seed)
    kind = data.draw(st.sampled_from(["truncate", "flip", "header", "splice", "mixed"]))
    if kind in ("truncate", "mixed"):
        out = out[: data.draw(st.integers(1, len(out)))]
    if kind in ("flip", "header", "mixed"):  # header: many flips where sizes and codecs live
        region = min(len(out), 600) if kind == "header" else len(out)
        for _ in range(data.draw(st.integers(1, 40 if kind == "header" else 8))):
            at = data.draw(st.integers(0, region - 1))
            out[at] = data.draw(st.integers(0, 255))
    if kind == "splice":  # drop or repeat a run of bytes
        a = data.draw(st.integers(0, len(out) - 1))
        b = data.draw(st.integers(a, min(len(out), a + 512)))
        out = out[:a] + out[b:] if data.draw(st.booleans()) else out[:b] + out[a:]
    return bytes(out) or b"\0"


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_bytes_give_a_video_or_a_video_error(seeds, data):
    suffix = data.draw(st.sampled_from(sorted(seeds)))
    blob = _mutate(data, seeds[suffix])
    n = data.draw(st.sampled_from([1, 4, 32]))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"fuzz{suffix}"
        path.write_bytes(blob)
        started = time.monotonic()
        try:
            v = read_video(path, n, timeout_s=10)
        except VideoError as e:
            assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
        else:
            assert isinstance(v, Video)
            assert v.frames.dtype == np.uint8 and v.frames.ndim == 4 and v.frames.shape[3] == 3
            assert 1 <= v.frames.shape[0] == v.info.sampled <= n
            assert list(v.info.timestamps) == sorted(set(v.info.timestamps))
        assert time.monotonic() - started < 15
        assert path.read_bytes() == blob and os.listdir(folder) == [path.name]


# -- long clips: time and memory stay bounded ------------------------------------------------


def _peak(fn):
    """Run fn; return its result, seconds, peak traced Python allocation, and peak resident
    growth in bytes (None where /proc/self/clear_refs cannot reset the high-water mark).
    Both are needed: PyAV hands out frames in FFmpeg's buffers, which tracemalloc cannot see."""

    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        rss_before = status("VmRSS")
    except OSError:
        rss_before = None
    tracemalloc.start()
    try:
        started = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - started
        traced = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    rss_growth = None if rss_before is None else status("VmHWM") - rss_before
    return result, elapsed, traced, rss_growth


def test_hour_long_clip_is_sampled_in_bounded_time_and_memory(tmp_path):
    # One hour at 1 fps (3,600 frames, a keyframe a minute) of 160 x 120: every frame held as
    # RGB would be 3,600 x 58 KB = 207 MB; the 32 sampled ones are 1.8 MB.
    path = write_clip(tmp_path / "hour.mp4", n_frames=3600, fps=1, size=(160, 120), gop=60)
    read_video(path, 1)  # warm up: the first read maps libraries and decoder tables
    v, elapsed, traced, rss = _peak(lambda: read_video(path, 32))
    assert v.info.duration == pytest.approx(3600)
    assert v.info.duration > video_mod.SEEK_AFTER_S  # the seeking path
    # targets 56.25 + 112.5 k, nearest frame at whole seconds
    assert [frame_index_of(f) for f in v.frames] == [int((k + 0.5) * 112.5 + 0.5) for k in range(32)]
    assert elapsed < 20, elapsed  # generous: about 0.1 s here
    assert traced < 8_000_000, traced  # about 1.9 MB here
    assert rss is None or rss < 40_000_000, rss  # about 2-4 MB here


def test_forward_pass_holds_only_the_sampled_frames(tmp_path):
    # 50 s at 30 fps, below SEEK_AFTER_S: one forward pass over 1,500 frames (86 MB as RGB).
    path = write_clip(tmp_path / "short.mp4", n_frames=1500, fps=30, size=(160, 120))
    read_video(path, 1)
    v, elapsed, traced, rss = _peak(lambda: read_video(path, 8))
    assert [frame_index_of(f) for f in v.frames] == [94, 281, 469, 656, 844, 1031, 1219, 1406]
    assert elapsed < 20, elapsed
    assert traced < 4_000_000, traced
    assert rss is None or rss < 30_000_000, rss
