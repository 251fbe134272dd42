"""read_video reads the file it is given, all of it, on the right timeline.

- Names: a file whose name FFmpeg would parse (a protocol prefix, an option, an image-sequence
  pattern) is read as that very file. Each case sits next to decoys, clips with other frame
  indices under the names FFmpeg would read instead, so a misread shows in the frames.
- Discontinuities: MPEG-TS files joined with ``cat`` (the clock restarts) are sampled over
  every part; long MPEG-TS files, whose seeks land before a keyframe, still seek.
- Wrong stored durations (header bytes patched, see the helpers) do not confine sampling to
  the first moment, nor put most targets after the last frame.

Clips come from tests/clips.py (frame ``i`` shows the index ``i``), built in tmp_path; no mocks.
"""

from __future__ import annotations

import os
import shutil
import struct

import av
import pytest
from clips import frame_index_of, pattern_frame, write_clip, write_image

from dycoke_cli.errors import VideoError
from dycoke_cli.video import read as video_mod
from dycoke_cli.video.read import Video, probe_video, read_video

MP4 = "mov,mp4,m4a,3gp,3g2,mj2"


def indices(v: Video) -> list[int]:
    return [frame_index_of(f) for f in v.frames]


def offset_clip(path, offset: int, n_frames: int = 20, **kwargs):
    """A clip whose frame ``i`` shows index ``offset + i``."""
    return write_clip(path, n_frames=n_frames,
                      color_fn=lambda i, w, h: pattern_frame(offset + i, w, h), **kwargs)


# -- names FFmpeg would parse ----------------------------------------------------------------

# The decoys FFmpeg reads for these names: clip.mp4 (indices 100..), a.mp4 (200..) and b.mp4
# (300..), 20 frames each. The file named so is a copy of a clip with 30 frames showing
# 0..29: read as named, 4 targets (0.375 + 0.75 k s at 10 fps) give 4, 11, 19, 26.
TRICKY_NAMES = [
    "file:clip.mp4",  # the file protocol: would read clip.mp4
    "subfile,,start,0,end,0,,:clip.mp4",  # a byte range of clip.mp4
    "concat:a.mp4|b.mp4",  # a.mp4 then b.mp4
    "cache:clip.mp4", "async:clip.mp4", "crypto:clip.mp4", "pipe:0", "pipe:", "data:,x",
    "http:clip.mp4", "tcp:clip.mp4",
    "-i", "-", "--frames", "-y.mp4",  # options to the ffmpeg tool
    "q?x=1.mp4", "h#frag.mp4", "sp ace.mp4", " lead.mp4", "new\nline.mp4", "tab\t.mp4",
    "ünïcødé.mp4", "日本語.mp4", "pic%d.mp4", "pic%03d.mp4", "glob*?[x]{y}.mp4", "100%.mp4",
]


@pytest.fixture
def decoys(tmp_path, monkeypatch):
    offset_clip(tmp_path / "clip.mp4", 100)
    offset_clip(tmp_path / "a.mp4", 200)
    offset_clip(tmp_path / "b.mp4", 300)
    offset_clip(tmp_path / "pic1.mp4", 400)
    offset_clip(tmp_path / "pic001.mp4", 500)
    monkeypatch.chdir(tmp_path)  # relative names, as a user types them
    return write_clip(tmp_path / "content.mp4", n_frames=30)


@pytest.mark.parametrize("name", TRICKY_NAMES)
def test_a_name_ffmpeg_would_parse_is_read_as_that_file(decoys, name):
    shutil.copyfile(decoys, name)
    v = read_video(name, 4)
    assert indices(v) == [4, 11, 19, 26]
    assert (v.info.path, v.info.frame_count, v.info.container) == (name, 30, MP4)
    assert v.info.timestamps == pytest.approx([0.4, 1.1, 1.9, 2.6])
    assert probe_video(os.path.abspath(name)).path == os.path.abspath(name)


def test_a_name_that_is_not_utf8_is_read(decoys):
    name = b"caf\xe9 file:clip.mp4"  # latin-1 bytes, as old file systems hold them
    shutil.copyfile(decoys, name)
    v = read_video(name, 4)
    assert indices(v) == [4, 11, 19, 26]
    assert v.info.path == os.fsdecode(name)


@pytest.mark.parametrize("name", ["pic%d.png", "pic*.png", "pic?.png", "pic[0].png"])
def test_a_still_image_named_like_a_sequence_pattern_is_that_image(tmp_path, name):
    # FFmpeg's image2 demuxer would read "pic%d.png" as pic0.png, pic1.png, ... and the glob
    # characters as a glob over the folder.
    for k in range(3):
        write_image(tmp_path / f"pic{k}.png", index=10 + k)
    write_image(tmp_path / name, index=7)
    v = read_video(tmp_path / name, 4)
    assert indices(v) == [7]
    assert v.info.codec == "png"


def error_of(name) -> str:
    with pytest.raises(VideoError) as exc:
        read_video(name, 4)
    return str(exc.value)


def test_error_messages_name_the_path_as_given(decoys):
    shutil.copyfile(decoys, "missing.mp4")
    assert error_of("file:missing.mp4") == "file:missing.mp4: no such file"
    with open("concat:a.mp4|b.mp4", "w") as f:  # a.mp4 and b.mp4 are videos, this is text
        f.write("not a video\n")
    assert error_of("concat:a.mp4|b.mp4") == (
        "concat:a.mp4|b.mp4: not a video file (FFmpeg cannot read it)")
    with open(decoys, "rb") as src, open("-i", "wb") as f:
        f.write(src.read(64))  # the ftyp box, then nothing
    assert error_of("-i") == "-i: damaged or truncated video file (FFmpeg cannot read it)"


@pytest.mark.parametrize("name, text", [
    ("list.mp4", "ffconcat version 1.0\nfile clip.mp4\n"),
    ("list.ffconcat", "ffconcat version 1.0\nfile clip.mp4\n"),
    ("list.m3u8", "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:2.0,\nclip.mp4\n#EXT-X-ENDLIST\n"),
])
def test_a_playlist_is_not_followed_to_the_files_it_names(decoys, name, text):
    # FFmpeg's concat and HLS demuxers open the files a playlist names: the user's file is
    # text, not a video, whatever it points to.
    with open(name, "w") as f:
        f.write(text)
    assert error_of(name) == f"{name}: not a video file (FFmpeg cannot read it)"


# -- timestamp discontinuities ---------------------------------------------------------------


def join(out, *parts):
    """``cat parts > out``: MPEG-TS is made to be cut and joined so."""
    out.write_bytes(b"".join(part.read_bytes() for part in parts))
    return out


def test_joined_mpegts_is_sampled_over_both_halves(tmp_path):
    # Two 2 s recordings, frames 0..19 and 100..119, both with a clock from 0. Unwrapped, the
    # second half follows the first one frame later: 100 shows at 2.0 s, the clip spans 4 s.
    a = offset_clip(tmp_path / "a.ts", 0)
    b = offset_clip(tmp_path / "b.ts", 100)
    path = join(tmp_path / "joined.ts", a, b)
    v = read_video(path, 8)  # targets 0.25 + 0.5 k, ties earlier
    assert indices(v) == [2, 7, 12, 17, 102, 107, 112, 117]
    assert v.info.timestamps == pytest.approx([0.2, 0.7, 1.2, 1.7, 2.2, 2.7, 3.2, 3.7])
    assert (v.info.container, v.info.duration) == ("mpegts", pytest.approx(4.0))
    assert probe_video(path).duration == pytest.approx(4.0)
    assert indices(read_video(path, 100)) == list(range(20)) + list(range(100, 120))


def test_three_joined_parts_with_bframes(tmp_path):
    # B-frames: packets come in decode order, the clock restarts at each join.
    opts = {"preset": "medium"}
    a = offset_clip(tmp_path / "a.ts", 0, n_frames=30, options=opts)
    b = offset_clip(tmp_path / "b.ts", 100, n_frames=30, options=opts)
    path = join(tmp_path / "joined.ts", a, b, a)
    v = read_video(path, 9)  # 9 s: targets 0.5 + k s
    assert indices(v) == [5, 15, 25, 105, 115, 125, 5, 15, 25]
    assert v.info.duration == pytest.approx(9.0)
    assert indices(read_video(path, 200)) == [*range(30), *range(100, 130), *range(30)]


def test_a_clock_jump_forward_is_a_discontinuity_a_short_one_a_pause(tmp_path):
    # Frames 0..19 at 0..1.9 s, then 20..39 from 1000 s: read as following at 2.0 s. (With
    # explicit times the packets carry no duration, so the clip ends where its last frame starts.)
    first = [k / 10 for k in range(20)]
    path = write_clip(tmp_path / "jump.ts", n_frames=40, pts=first + [1000 + t for t in first])
    v = read_video(path, 4)  # span 3.9 s: targets 0.4875 + 0.975 k
    assert indices(v) == [5, 15, 24, 34]
    assert v.info.timestamps == pytest.approx([0.5, 1.5, 2.4, 3.4])
    # A 5 s pause (under FFmpeg's 10 s threshold) is kept: it is part of the recording.
    path = write_clip(tmp_path / "pause.ts", n_frames=40, pts=first + [7 + t for t in first])
    v = read_video(path, 3)  # the stored 9 s (no jump, so believed): targets 1.5, 4.5, 7.5
    assert indices(v) == [15, 20, 25]
    assert v.info.timestamps == pytest.approx([1.5, 7.0, 7.5])


def test_a_long_discontinuous_file_is_read_in_one_pass(tmp_path):
    # 2 x 40 s at 1 fps: past SEEK_AFTER_S, but a seek lands by the raw clock, which names two
    # places in this file; one forward pass on the unwrapped timeline gets both halves.
    a = offset_clip(tmp_path / "a.ts", 0, n_frames=40, fps=1, size=(32, 32), gop=10)
    b = offset_clip(tmp_path / "b.ts", 100, n_frames=40, fps=1, size=(32, 32), gop=10)
    path = join(tmp_path / "joined.ts", a, b)
    v = read_video(path, 8)  # targets 5 + 10 k
    assert indices(v) == [5, 15, 25, 35, 105, 115, 125, 135]
    assert v.info.duration == pytest.approx(80.0)


def test_a_long_continuous_mpegts_is_sampled_by_seeking(tmp_path, monkeypatch):
    # MPEG-TS has no index: a seek lands on some packet before the time asked for, and
    # decoding starts at the next keyframe (here up to 10 s later), past the target. The
    # frames are those of one forward pass, and the packets skipped are not damage.
    path = offset_clip(tmp_path / "long.ts", 0, n_frames=120, fps=1, size=(32, 32), gop=10)
    v = read_video(path, 8)
    assert v.info.duration > video_mod.SEEK_AFTER_S
    assert indices(v) == [7, 22, 37, 52, 67, 82, 97, 112]  # targets 7.5 + 15 k, ties earlier
    assert v.info.lost == 0
    monkeypatch.setattr(video_mod, "SEEK_AFTER_S", 1e9)
    forward = read_video(path, 8)
    assert indices(forward) == indices(v) and forward.info == v.info


# -- stored durations that are wrong ---------------------------------------------------------


def patch_mp4_duration(path, seconds: float) -> None:
    """Make an MP4's headers claim ``seconds``: the 32-bit duration fields of mvhd and tkhd (in
    the movie time scale) and mdhd (in the track's), all version 0 as PyAV writes them. The edit
    list (elst) is left to cover every sample, as a muxer that got only the headers wrong would."""
    data = bytearray(path.read_bytes())

    def box(name: bytes) -> int:  # offset of the box: size, type, version and flags, ...
        at = data.index(name) - 4
        assert data[at + 8] == 0, f"{name} is not version 0"
        return at

    movie_scale = struct.unpack(">I", data[box(b"mvhd") + 20:box(b"mvhd") + 24])[0]
    track_scale = struct.unpack(">I", data[box(b"mdhd") + 20:box(b"mdhd") + 24])[0]
    for name, at, scale in [(b"mvhd", 24, movie_scale), (b"tkhd", 28, movie_scale),
                            (b"mdhd", 24, track_scale)]:
        data[box(name) + at:box(name) + at + 4] = struct.pack(">I", round(seconds * scale))
    path.write_bytes(bytes(data))


def patch_mkv_duration(path, seconds: float) -> None:
    """Make a Matroska file's Segment Info claim ``seconds``: its Duration element (ID 0x4489,
    an 8-byte float in TimestampScale units, milliseconds as PyAV writes it)."""
    data = bytearray(path.read_bytes())
    at = data.index(b"\x44\x89\x88")
    assert data.count(b"\x44\x89\x88") == 1
    data[at + 3:at + 11] = struct.pack(">d", seconds * 1000)
    path.write_bytes(bytes(data))


def stored_duration(path) -> float:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return float(s.duration * s.time_base) if s.duration else c.duration / av.time_base


def test_an_mp4_whose_header_claims_too_short_a_duration(tmp_path):
    path = write_clip(tmp_path / "short.mp4", n_frames=100)  # 10 s at 10 fps
    patch_mp4_duration(path, 0.04)
    assert stored_duration(path) == pytest.approx(0.04, abs=0.001)  # what the test is for
    v = read_video(path, 5)  # targets 1 + 2 k
    assert indices(v) == [10, 30, 50, 70, 90]
    assert v.info.duration == pytest.approx(10.0)
    assert probe_video(path).duration == pytest.approx(10.0)
    assert indices(read_video(path, 200)) == list(range(100))


@pytest.mark.parametrize("claim", [0.04, 1.0, 1000.0, 1e6])
def test_an_mkv_whose_header_claims_a_wrong_duration(tmp_path, claim):
    # Too short confined every target to the first moment (one frame back); too long put
    # most targets after the last frame (the first part densely, then the last frame).
    path = write_clip(tmp_path / "wrong.mkv", n_frames=100)
    patch_mkv_duration(path, claim)
    assert stored_duration(path) == pytest.approx(claim)
    v = read_video(path, 5)
    assert indices(v) == [10, 30, 50, 70, 90]
    assert v.info.duration == pytest.approx(10.0)


@pytest.mark.parametrize("claim", [1.0, 1e5])
def test_a_long_clip_with_a_wrong_duration_is_sampled_by_seeking(tmp_path, claim):
    # 120 s at 1 fps, a keyframe every 10 s: past SEEK_AFTER_S once the end is right.
    path = write_clip(tmp_path / "long.mkv", n_frames=120, fps=1, size=(32, 32), gop=10)
    patch_mkv_duration(path, claim)
    v = read_video(path, 8)  # targets 7.5 + 15 k, ties earlier
    assert indices(v) == [7, 22, 37, 52, 67, 82, 97, 112]
    assert v.info.duration == pytest.approx(120.0)


def test_an_mpeg_ps_duration_estimated_short_is_not_believed(tmp_path):
    # FFmpeg estimates an MPEG-PS file's duration; for these 40 frames at 25 fps (1.6 s) it
    # says 1.4 s, and the last frames were never sampled.
    path = write_clip(tmp_path / "ps.mpg", n_frames=40, fps=25, codec="mpeg2video")
    assert stored_duration(path) == pytest.approx(1.4)
    v = read_video(path, 4)  # targets 0.2 + 0.4 k s after the first frame
    assert indices(v) == [5, 15, 25, 35]
    assert v.info.duration == pytest.approx(1.6)
    assert indices(read_video(path, 50)) == list(range(40))
