"""read_video / probe_video on clips written by tests/clips.py: exact frame indices, no mocks."""

from __future__ import annotations

import json
import struct

import av
import numpy as np
import pytest
from clips import frame_index_of, write_clip, write_image

from dycoke_cli.video import read as video_mod
from dycoke_cli.video.read import Video, VideoInfo, probe_video, read_video

MP4 = "mov,mp4,m4a,3gp,3g2,mj2"
MKV = "matroska,webm"


def indices(v: Video) -> list[int]:
    return [frame_index_of(f) for f in v.frames]


def need_encoder(name: str) -> None:
    try:
        av.codec.Codec(name, "w")
    except Exception:  # noqa: BLE001 - any failure means this PyAV build lacks it
        pytest.skip(f"encoder {name} is not in this PyAV build")


def check_shape(v: Video, n: int, h: int, w: int) -> None:
    assert v.frames.shape == (n, h, w, 3)
    assert v.frames.dtype == np.uint8
    assert v.info.sampled == n == len(v.info.timestamps)


# -- uniform sampling, constant frame rate --------------------------------------------------

# 40 frames at 10 fps: frame i shows at i/10 s, the clip spans [0, 4.0).
# Targets are segment centres (k + 0.5) * 4.0 / n; ties go to the earlier frame
# (n = 8: target 0.25 sits between frames 2 and 3 and takes 2).
CFR_CASES = {
    1: [20],
    3: [7, 20, 33],
    4: [5, 15, 25, 35],
    5: [4, 12, 20, 28, 36],
    8: [2, 7, 12, 17, 22, 27, 32, 37],
}


@pytest.mark.parametrize("n, expected", CFR_CASES.items())
def test_uniform_sampling_picks_segment_centres(tmp_path, n, expected):
    path = write_clip(tmp_path / "cfr.mp4", n_frames=40)
    v = read_video(path, n)
    assert indices(v) == expected
    assert v.info.timestamps == pytest.approx([i / 10 for i in expected])
    check_shape(v, n, 48, 64)
    assert v.info.requested == n and v.info.lost == 0


CODECS = [
    (".mp4", "libx264", None, "h264", MP4),
    (".mov", "libx264", None, "h264", MP4),
    (".mkv", "libx264", None, "h264", MKV),
    (".webm", "libvpx-vp9", None, "vp9", MKV),
    (".webm", "libvpx", None, "vp8", MKV),
    (".avi", "mpeg4", None, "mpeg4", "avi"),
    (".gif", "gif", None, "gif", "gif"),
    (".mp4", "libx265", None, "hevc", MP4),
    (".mkv", "libx265", "yuv420p10le", "hevc", MKV),  # 10-bit
    (".mkv", "libsvtav1", None, "av1", MKV),
    (".mp4", "libsvtav1", None, "av1", MP4),
]


@pytest.mark.parametrize("suffix, encoder, pix_fmt, codec, container", CODECS,
                         ids=[f"{c[1]}{c[0]}{'-10bit' if c[2] else ''}" for c in CODECS])
def test_codecs_and_containers(tmp_path, suffix, encoder, pix_fmt, codec, container):
    need_encoder(encoder)
    path = write_clip(tmp_path / f"clip{suffix}", n_frames=40, codec=encoder, pix_fmt=pix_fmt)
    v = read_video(path, 4)
    assert indices(v) == [5, 15, 25, 35]
    check_shape(v, 4, 48, 64)
    assert (v.info.codec, v.info.container) == (codec, container)
    assert v.info.duration == pytest.approx(4.0)
    # every distinct frame once when more are asked for than there are
    assert indices(read_video(path, 64)) == list(range(40))


def test_mkv_and_webm_fall_back_to_container_duration(tmp_path):
    for name in ("clip.mkv", "clip.webm"):
        path = write_clip(tmp_path / name, n_frames=30)
        with av.open(str(path)) as c:  # what the fallback is for
            assert c.streams.video[0].frames == 0 and c.streams.video[0].duration is None
        info = read_video(path, 3).info
        assert info.frame_count is None
        assert info.duration == pytest.approx(3.0)
        assert indices(read_video(path, 3)) == [5, 15, 25]


# -- variable frame rate ---------------------------------------------------------------------

VFR_PTS = [0.0, 0.1, 0.15, 0.9, 1.0, 2.5, 2.6, 4.0]


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_vfr_is_sampled_by_time_not_index(tmp_path, suffix):
    path = write_clip(tmp_path / f"vfr{suffix}", n_frames=8, pts=VFR_PTS)
    v = read_video(path, 4)
    # The clip spans [0, 4.1) (last frame lasts 0.1 s): targets 0.5125, 1.5375, 2.5625, 3.5875.
    # Nearest frames by time: 0.15 (2), 1.0 (4), 2.6 (6), 4.0 (7). By index it would be 1,3,5,7.
    assert v.info.duration == pytest.approx(4.1)
    assert indices(v) == [2, 4, 6, 7]
    assert v.info.timestamps == pytest.approx([0.15, 1.0, 2.6, 4.0])


def test_vfr_fewer_distinct_frames_than_targets(tmp_path):
    path = write_clip(tmp_path / "vfr.mp4", n_frames=8, pts=VFR_PTS)
    v = read_video(path, 8)
    # targets 0.25625 + 0.5125 k: frames 2, 3, 4 (twice -> once), 5, 6, 7 (twice -> once)...
    assert indices(v) == [2, 3, 4, 5, 6, 7]
    assert v.info.requested == 8 and v.info.sampled == 6
    assert indices(read_video(path, 100)) == list(range(8))


# -- fewer frames than requested, tiny clips -------------------------------------------------


def test_fewer_frames_than_requested_returns_each_once(tmp_path):
    path = write_clip(tmp_path / "five.mp4", n_frames=5)
    v = read_video(path, 32)
    assert indices(v) == [0, 1, 2, 3, 4]
    assert v.info.sampled == 5 and v.info.requested == 32
    assert len(set(v.info.timestamps)) == 5


def test_single_frame_clip(tmp_path):
    path = write_clip(tmp_path / "one.mp4", n_frames=1, color_fn=lambda i, w, h: (200, 10, 10))
    v = read_video(path, 32)
    check_shape(v, 1, 48, 64)
    assert np.abs(v.frames[0].astype(int) - (200, 10, 10)).max() < 12
    assert v.info.timestamps == (0.0,)


def test_16x16_frames(tmp_path):
    path = write_clip(tmp_path / "tiny.mp4", n_frames=20, size=(16, 16))
    v = read_video(path, 4)
    check_shape(v, 4, 16, 16)
    assert indices(v) == [2, 7, 12, 17]  # targets 0.25, 0.75, 1.25, 1.75; ties go earlier


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_still_image_is_a_one_frame_clip(tmp_path, suffix):
    path = write_image(tmp_path / f"still{suffix}", size=(64, 48), index=5)
    v = read_video(path, 32)
    check_shape(v, 1, 48, 64)
    assert indices(v) == [5]
    assert probe_video(path).codec == ("png" if suffix == ".png" else "mjpeg")


# -- downscaling -----------------------------------------------------------------------------


def test_max_side_downscales_keeping_aspect(tmp_path):
    path = write_clip(tmp_path / "big.mp4", n_frames=12, size=(320, 240))
    v = read_video(path, 3, max_side=64)
    check_shape(v, 3, 48, 64)
    assert indices(v) == [2, 6, 10]
    assert (v.info.width, v.info.height) == (320, 240)  # the source's size
    # a bound larger than the frame changes nothing; a portrait-ish odd ratio rounds
    assert read_video(path, 1, max_side=1000).frames.shape == (1, 240, 320, 3)
    assert read_video(path, 1, max_side=10).frames.shape == (1, 8, 10, 3)


# -- rotation --------------------------------------------------------------------------------

# frame 1 draws digit 1 in its top-left quadrant (index 1). Rotated for display, that quadrant
# moves: counter-clockwise 90 -> bottom-left (reads 64), 180 -> bottom-right (512),
# clockwise 90 -> top-right (8).
@pytest.mark.parametrize("degrees, rotation, reads", [(0, 0, 1), (90, 90, 64), (180, 180, 512), (-90, 270, 8)])
def test_rotation_metadata_is_applied(tmp_path, degrees, rotation, reads):
    path = write_clip(tmp_path / "rot.mp4", n_frames=2, rotation=degrees)
    v = read_video(path, 2)
    portrait = rotation in (90, 270)
    h, w = (64, 48) if portrait else (48, 64)
    check_shape(v, 2, h, w)
    assert (v.info.width, v.info.height, v.info.rotation) == (w, h, rotation)
    assert indices(v) == [0, reads]
    # downscaling happens before rotating, the bound still holds on the displayed frame
    assert read_video(path, 1, max_side=32).frames.shape[1:3] == ((32, 24) if portrait else (24, 32))


def test_iphone_portrait_matrix_written_by_hand(tmp_path):
    """Independent of PyAV's writer: patch the QuickTime track header of a plain landscape
    clip with the matrix iPhones write for portrait video ({0, 1, 0, -1, 0, 0, tx, 0, 1}:
    shown turned 90 degrees clockwise). The top-left quadrant must end up top-right."""
    path = write_clip(tmp_path / "phone.mp4", n_frames=2)
    data = bytearray(path.read_bytes())
    at = data.index(b"tkhd")
    version = data[at + 4]
    matrix_at = at + 4 + 4 + (28 if version == 1 else 20) + 8 + 8
    assert struct.unpack(">9i", data[matrix_at:matrix_at + 36]) == (65536, 0, 0, 0, 65536, 0, 0, 0, 1 << 30)
    data[matrix_at:matrix_at + 36] = struct.pack(">9i", 0, 65536, 0, -65536, 0, 0, 48 << 16, 0, 1 << 30)
    path.write_bytes(bytes(data))
    v = read_video(path, 2)
    assert v.info.rotation == 270  # counter-clockwise, i.e. 90 clockwise
    check_shape(v, 2, 64, 48)
    assert indices(v) == [0, 8]


# -- several video streams -------------------------------------------------------------------


def test_default_video_stream_is_used(tmp_path):
    extra = [dict(n_frames=10, size=(32, 32), index_offset=100)]
    path = write_clip(tmp_path / "two.mp4", n_frames=20, extra_streams=extra, default_stream=1)
    v = read_video(path, 2)
    assert (v.info.stream_index, v.info.video_streams) == (1, 2)
    check_shape(v, 2, 32, 32)
    assert indices(v) == [102, 107]


def test_first_video_stream_without_default(tmp_path):
    extra = [dict(n_frames=10, size=(32, 32), index_offset=100)]
    path = write_clip(tmp_path / "two.mkv", n_frames=20, extra_streams=extra)
    with av.open(str(path)) as c:
        assert not any(s.disposition & av.stream.Disposition.default for s in c.streams)
    v = read_video(path, 2)
    assert (v.info.stream_index, v.info.video_streams) == (0, 2)
    assert indices(v) == [5, 15]


# -- info ------------------------------------------------------------------------------------


def test_probe_info_fields(tmp_path):
    path = write_clip(tmp_path / "clip.mp4", n_frames=40)
    assert probe_video(path) == VideoInfo(
        path=str(path), container=MP4, codec="h264", width=64, height=48, duration=4.0,
        fps=10.0, frame_count=40, stream_index=0, video_streams=1, rotation=0, requested=0,
        timestamps=(), lost=0,
    )


def test_read_info_and_to_dict(tmp_path):
    path = write_clip(tmp_path / "clip.mkv", n_frames=40)
    info = read_video(str(path), 4).info
    d = info.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d == {
        "path": str(path), "container": MKV, "codec": "h264", "width": 64, "height": 48,
        "duration": 4.0, "fps": 10.0, "frame_count": None, "stream_index": 0,
        "video_streams": 1, "rotation": 0, "requested": 4, "timestamps": [0.5, 1.5, 2.5, 3.5],
        "lost": 0, "sampled": 4,
    }


# -- long clips: seeking ---------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".webm"])
def test_long_clip_is_sampled_by_seeking(tmp_path, suffix):
    # 120 s at 1 fps, a keyframe every 10 s: past SEEK_AFTER_S, so the seeking path runs.
    path = write_clip(tmp_path / f"long{suffix}", n_frames=120, fps=1, size=(32, 32), gop=10)
    assert probe_video(path).duration > video_mod.SEEK_AFTER_S
    v = read_video(path, 8)
    # targets 7.5 + 15 k; ties go to the earlier frame
    assert indices(v) == [7, 22, 37, 52, 67, 82, 97, 112]
    assert indices(read_video(path, 200)) == list(range(120))


@pytest.mark.parametrize("name, kwargs", [
    ("bframes.mp4", dict(n_frames=60, options={"preset": "medium"})),
    ("vfr.mkv", dict(n_frames=8, pts=VFR_PTS)),
    ("vp9.webm", dict(n_frames=60, gop=7)),
    ("damaged.mp4", dict(n_frames=60, gop=1, corrupt=[10, 11, 30])),
    ("long_gop.mkv", dict(n_frames=60, gop=1000)),
])
def test_seeking_and_forward_pass_pick_the_same_frames(tmp_path, monkeypatch, name, kwargs):
    path = write_clip(tmp_path / name, **kwargs)
    for n in (2, 5, 13, 32, 100):
        forward = read_video(path, n)
        monkeypatch.setattr(video_mod, "SEEK_AFTER_S", 0.0)
        seeking = read_video(path, n)
        monkeypatch.undo()
        assert indices(seeking) == indices(forward)
        assert seeking.info == forward.info
