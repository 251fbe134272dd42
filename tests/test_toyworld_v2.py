"""Toy world v2 (several events per clip): captions and answers for hand-made clips, the rules
every sampled clip follows, the rendered frames, and `dycoke toyworld --world v2`."""

from __future__ import annotations

import hashlib
import json

import av
import numpy as np
import pytest

from dycoke_cli.evaluation.qa import read_qa
from dycoke_cli.toyworld import render as R
from dycoke_cli.toyworld.events import (
    EVENT_KINDS, EventSpec, Segment, event_caption, event_questions, sample_event_spec,
)

from test_cli import run_cli


def _spec(shape, *segments, travel=96.0, position=(160.0, 120.0), duration=6.0, **kw):
    return EventSpec(shape=shape, segments=tuple(Segment(c, m) for c, m in segments), duration=duration,
                     background="plain", size=40.0, position=position, travel=travel, **kw)


def test_the_issues_example_caption_and_questions():
    spec = _spec("box", ("white", "up"), ("green", "still"), ("blue", "right"), position=(100.0, 180.0))
    assert event_caption(spec) == "a white box moves up, then turns green and stays still, then turns blue and moves right"
    assert event_questions(spec) == [
        ("object", "what object is in the video?", "box"),
        ("start", "what color is the box at the start?", "white"),
        ("end", "what color is the box at the end?", "blue"),
        ("count", "how many times does the box change color?", "twice"),
        ("first", "which way does the box move first?", "up"),
        ("last", "which way does the box move last?", "right"),
        ("during", "what color is the box when it moves right?", "blue"),
        ("during", "what color is the box when it moves up?", "white"),
        ("caption", "describe the video.", event_caption(spec)),
    ]


@pytest.mark.parametrize("segments, caption, count, during", [
    # colour only: the motion goes on, said once
    ((("red", "left"), ("yellow", "left")), "a red cup moves left, then turns yellow", "once", []),
    # motion only
    ((("green", "still"), ("green", "down")), "a green cup stays still, then moves down", "none",
     [("down", "green")]),
    # both, and a colour that comes back: two changes
    ((("purple", "right"), ("white", "still"), ("purple", "left")),
     "a purple cup moves right, then turns white and stays still, then turns purple and moves left", "twice",
     [("left", "purple"), ("right", "purple")]),
    # the same way twice (with a colour change between): "during" is not asked about it
    ((("blue", "up"), ("red", "up"), ("red", "still")), "a blue cup moves up, then turns red, then stays still",
     "once", []),
    # two moves, one colour throughout
    ((("white", "down"), ("white", "up"), ("white", "right")), "a white cup moves down, then moves up, then moves right",
     "none", [("right", "white"), ("up", "white"), ("down", "white")]),
])
def test_captions_and_answers_of_hand_made_clips(segments, caption, count, during):
    spec = _spec("cup", *segments, travel=60.0)
    assert event_caption(spec) == caption
    qs = event_questions(spec)
    answers = {kind: a for kind, _, a in qs if kind != "during"}
    assert answers == {"object": "cup", "start": segments[0][0], "end": segments[-1][0], "count": count,
                       "first": segments[0][1], "last": segments[-1][1], "caption": caption}
    assert [(q.removeprefix("what color is the cup when it moves ").removesuffix("?"), a)
            for kind, q, a in qs if kind == "during"] == during
    assert [kind for kind, _, _ in qs] == ["object", "start", "end", "count", "first", "last",
                                            *["during"] * len(during), "caption"]
    assert {kind for kind, _, _ in qs} <= set(EVENT_KINDS)


def test_the_path_of_a_hand_made_clip():
    # 3 segments of 2 s: right 96 px, still, up 96 px
    spec = _spec("ball", ("red", "right"), ("red", "still"), ("blue", "up"), position=(100.0, 150.0))
    assert spec.segment_duration == 2.0 and spec.num_frames == 180
    assert spec.center_at(0.0) == (100.0, 150.0)
    assert spec.center_at(1.0) == pytest.approx((148.0, 150.0))
    assert spec.center_at(2.0) == pytest.approx((196.0, 150.0))
    assert spec.center_at(3.0) == pytest.approx((196.0, 150.0))
    assert spec.center_at(5.0) == pytest.approx((196.0, 102.0))
    assert spec.center_at(6.0) == pytest.approx((196.0, 54.0))
    assert [spec.segment_at(t) for t in (0.0, 1.999, 2.0, 3.999, 4.0, 6.0)] == [0, 0, 1, 1, 2, 2]
    assert spec.rgb_at(3.99) == R.color_rgb("red") and spec.rgb_at(4.0) == R.color_rgb("blue")


SEEDS = range(60)


@pytest.fixture(scope="module")
def sampled():
    return [sample_event_spec(np.random.default_rng(seed)) for seed in SEEDS]


def test_sampling_is_reproducible(sampled):
    assert [sample_event_spec(np.random.default_rng(seed)) for seed in SEEDS] == sampled
    assert len({repr(s) for s in sampled}) == len(sampled)


def test_sampled_clips_follow_the_world_rules(sampled):
    for s in sampled:
        n = len(s.segments)
        assert s.shape in R.SHAPES and s.background in R.BACKGROUNDS and n in (2, 3)
        assert 6.0 <= s.duration <= 9.0
        assert s.num_frames % n == 0  # equal segments, in whole frames
        assert all(seg.color in R.COLORS and seg.motion in R.MOTIONS for seg in s.segments)
        for prev, seg in zip(s.segments, s.segments[1:]):
            assert (prev.color, prev.motion) != (seg.color, seg.motion)
        assert 0.27 * R.WIDTH <= s.travel <= 0.33 * R.WIDTH
        # a colour that comes back is drawn the same
        assert len({(seg.color, rgb) for seg, rgb in zip(s.segments, s.rgbs)}) == len(set(s.colors))
    # the sample covers the world: every shape, motion, segment count and kind of change
    assert {s.shape for s in sampled} == set(R.SHAPES)
    assert {m for s in sampled for m in s.motions} == set(R.MOTIONS)
    assert {len(s.segments) for s in sampled} == {2, 3}
    changes = {(a.color != b.color, a.motion != b.motion) for s in sampled for a, b in zip(s.segments, s.segments[1:])}
    assert changes == {(True, False), (False, True), (True, True)}


def test_sampled_paths_are_continuous_and_travel_their_segments(sampled):
    for s in sampled:
        times = R.frame_times(s)
        points = np.array([s.center_at(float(t)) for t in times])
        step = np.abs(np.diff(points, axis=0)).sum(axis=1)
        per_frame = s.travel / (s.segment_duration * R.FPS)
        assert step.max() <= per_frame + 1e-9  # no jump anywhere, boundaries included
        for k, seg in enumerate(s.segments):
            start = np.array(s.center_at(k * s.segment_duration))
            end = np.array(s.center_at((k + 1) * s.segment_duration))
            assert end - start == pytest.approx(np.array(R.DIRECTIONS[seg.motion]) * s.travel)


def test_sampled_objects_stay_inside_the_frame(sampled):
    for s in sampled:
        # the path is piecewise linear: its extremes are at the segment boundaries
        times = [k * s.segment_duration for k in range(len(s.segments) + 1)]
        _, masks = R.render_frames(s, times, with_masks=True)
        for mask in masks:
            assert mask.any()
            assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def test_segment_boundaries_match_the_durations(sampled):
    for s in sampled[:12]:
        per = s.num_frames // len(s.segments)
        times = R.frame_times(s)
        assert [s.segment_at(float(t)) for t in times] == [i // per for i in range(s.num_frames)]
        # the drawn colour changes on the first frame of a segment, not a frame early or late
        for k in range(1, len(s.segments)):
            frames = (k * per - 1, k * per)
            pics = R.render_frames(s, [times[i] for i in frames])
            for i, pic in zip(frames, pics):
                x, y = (int(round(v)) for v in s.center_at(float(times[i])))
                assert tuple(pic[y, x]) == s.rgbs[i // per]


def test_v1_is_unchanged():
    # v1's specs and questions for these seeds, as written before v2 existed
    h = hashlib.sha256()
    for seed in range(20):
        rng = np.random.default_rng(seed)
        for _ in range(2):
            spec = R.sample_spec(rng)
            h.update(repr(spec).encode())
            h.update(repr(R.questions_for(spec)).encode())
    assert h.hexdigest() == "6317509dcdc5e6d5598b3e28acb3486c1660559fbba6dc94876bbba903ff8a60"


def test_toyworld_v2_writes_readable_clips_and_their_answers(tmp_path, capsys, monkeypatch):
    out = tmp_path / "v2"
    assert run_cli(["toyworld", str(out), "--world", "v2", "--n", "3", "--seed", "7"], capsys, monkeypatch) == (
        0, f"{out / 'qa.jsonl'}\n", "")
    rng = np.random.default_rng(7)
    specs = [sample_event_spec(rng) for _ in range(3)]
    lines = [json.loads(x) for x in (out / "qa.jsonl").read_text().splitlines()]
    expected = [{"video": f"clips/{i:04d}.mp4", "question": q, "answer": a, "kind": k}
                for i, s in enumerate(specs) for k, q, a in event_questions(s)]
    assert lines == expected
    assert len(read_qa(out / "qa.jsonl")) == len(expected)  # what `dycoke eval` reads
    assert sorted(p.name for p in (out / "clips").iterdir()) == ["0000.mp4", "0001.mp4", "0002.mp4"]
    for i, s in enumerate(specs):
        with av.open(str(out / "clips" / f"{i:04d}.mp4")) as container:
            stream = container.streams.video[0]
            assert (stream.width, stream.height, stream.average_rate) == (320, 240, 30)
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert len(frames) == s.num_frames
        per = s.num_frames // len(s.segments)
        for k, seg in enumerate(s.segments):  # the middle frame of each segment shows its colour
            mid = k * per + per // 2
            x, y = (int(round(v)) for v in s.center_at(mid / R.FPS))
            assert R.nearest_color(frames[mid][y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).mean(axis=0)) == seg.color


def test_toyworld_v2_never_overwrites_without_force(tmp_path, capsys, monkeypatch):
    out = tmp_path / "world"
    out.mkdir()
    (out / "qa.jsonl").write_text("mine\n")
    assert run_cli(["toyworld", str(out), "--world", "v2", "--n", "1"], capsys, monkeypatch) == (
        1, "", f"dycoke: error: {out}: the folder already holds files; choose a new or empty one "
               "(or pass --force to replace its qa.jsonl and clips)\n")
    assert (out / "qa.jsonl").read_text() == "mine\n" and not (out / "clips").exists()
    assert run_cli(["toyworld", str(out), "--world", "v2", "--n", "1", "--force"], capsys, monkeypatch) == (
        0, f"{out / 'qa.jsonl'}\n", "")
    assert json.loads((out / "qa.jsonl").read_text().splitlines()[0])["kind"] == "object"


def test_toyworld_refuses_an_unknown_world(tmp_path, capsys, monkeypatch):
    code, out, err = run_cli(["toyworld", str(tmp_path / "w"), "--world", "v3"], capsys, monkeypatch)
    assert (code, out) == (2, "")
    assert err == ("dycoke: error: Invalid value for '--world': Value error, 'v3' is not one of 'v1', 'v2'. "
                   "(see 'dycoke toyworld --help')\n")
    assert not (tmp_path / "w").exists()
