"""The toy world's renderer, questions and dataset writer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dycoke_cli.toyworld import render as R
from dycoke_cli.toyworld import write_dataset


def _spec(**kw):
    base = dict(shape="cup", colors=("red",), change_time=None, motion="still", background="plain",
                size=50.0, position=(160.0, 120.0), speed=0.0, duration=3.0)
    base.update(kw)
    return R.ClipSpec(**base)


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def test_sample_spec_is_deterministic_per_seed():
    a = [R.sample_spec(np.random.default_rng(5)) for _ in range(2)]
    assert a[0] == a[1]
    f0 = R.render_frames(a[0], [0.0, 1.0, 1.9])
    f1 = R.render_frames(a[1], [0.0, 1.0, 1.9])
    assert f0.dtype == np.uint8 and f0.shape == (3, 240, 320, 3)
    assert np.array_equal(f0, f1)
    other = R.sample_spec(np.random.default_rng(6))
    assert other != a[0]


@pytest.mark.parametrize("seed", range(40))
def test_sampled_specs_follow_the_world_rules(seed):
    s = R.sample_spec(np.random.default_rng(seed))
    assert s.shape in R.SHAPES and s.motion in R.MOTIONS and s.background in R.BACKGROUNDS
    assert all(c in R.COLORS for c in s.colors) and len(s.colors) in (1, 2)
    assert 2.0 <= s.duration <= 4.0
    assert 240 / 6 * 0.85 <= s.size <= 240 / 4 * 1.15
    if s.changes:
        assert s.colors[0] != s.colors[1]
        assert 0.35 <= s.change_time / s.duration <= 0.65
    else:
        assert s.change_time is None
    # Travel of roughly half the frame, the object staying inside it.
    start, end = s.center_at(0.0), s.center_at(s.duration)
    travel = abs(end[0] - start[0]) + abs(end[1] - start[1])
    axis = R.WIDTH if s.motion in ("left", "right") else R.HEIGHT
    if s.motion == "still":
        assert travel == 0
    else:
        assert 0.39 * axis <= travel <= 0.61 * axis
    for x, y in (start, end):
        assert 0 < x - s.size / 2 and x + s.size / 2 < R.WIDTH
        assert 0 < y - s.size / 2 and y + s.size / 2 < R.HEIGHT
    # The background stays dark: never the object's colour.
    frame = R.render_frames(s, [0.0])[0]
    _, mask = R.render_frames(s, [0.0], with_masks=True)
    assert frame[mask[0] == 0].max() <= 62


@pytest.mark.parametrize("shape", R.SHAPES)
@pytest.mark.parametrize("color", R.COLORS)
def test_centre_pixel_has_the_named_colour(shape, color):
    s = _spec(shape=shape, colors=(color,), background="noise")
    frame = R.render_frames(s, [0.0])[0]
    assert tuple(frame[120, 160]) == R.color_rgb(color)
    assert R.nearest_color(frame[120, 160]) == color
    # Jittered palettes still read as their colour name.
    for seed in range(20):
        j = R.sample_spec(np.random.default_rng(seed), shape=shape, colors=(color,), motion="still")
        x, y = (int(round(v)) for v in j.position)
        px = R.render_frames(j, [0.0])[0][y, x]
        assert tuple(px) == j.rgbs[0]
        assert R.nearest_color(px) == color


@pytest.mark.parametrize("motion,sign", [("left", (-1, 0)), ("right", (1, 0)), ("up", (0, -1)), ("down", (0, 1)), ("still", (0, 0))])
def test_motion_moves_the_centroid(motion, sign):
    for seed in range(5):
        s = R.sample_spec(np.random.default_rng(seed), motion=motion, shape="ball")
        _, masks = R.render_frames(s, [0.0, s.duration / 2, s.duration], with_masks=True)
        c = [_centroid(m) for m in masks]
        for a, b in zip(c, c[1:]):
            dx, dy = b[0] - a[0], b[1] - a[1]
            for d, sg in ((dx, sign[0]), (dy, sign[1])):
                if sg == 0:
                    assert abs(d) < 1.0
                else:
                    assert d * sg > 20


def test_colour_change_happens_between_35_and_65_percent():
    seen = 0
    for seed in range(60):
        s = R.sample_spec(np.random.default_rng(seed))
        if not s.changes:
            continue
        seen += 1
        times = R.frame_times(s)
        x, y = (int(round(v)) for v in s.center_at(0.0))
        frames = R.render_frames(s, times)
        cols = []
        for t, f in zip(times, frames):
            cx, cy = (int(round(v)) for v in s.center_at(t))
            cols.append(tuple(f[cy, cx]))
        first_new = next(i for i, c in enumerate(cols) if c == s.rgbs[1])
        assert all(c == s.rgbs[0] for c in cols[:first_new])
        assert all(c == s.rgbs[1] for c in cols[first_new:])
        assert 0.35 <= times[first_new] / s.duration <= 0.65 + 1 / 30 / s.duration
    assert seen >= 10


def test_questions_and_answers_for_a_constructed_spec():
    s = _spec(shape="ball", colors=("green",), motion="up", speed=30.0)
    assert R.questions_for(s) == [
        ("shape", "what is in the video?", "ball"),
        ("motion", "which way does the ball move?", "up"),
        ("color", "what color is the ball?", "green"),
        ("color_start", "what color is the ball at the start?", "green"),
        ("color_end", "what color is the ball at the end?", "green"),
        ("caption", "describe the video.", "a green ball moves up"),
    ]
    c = _spec(shape="cup", colors=("red", "blue"), change_time=1.5, motion="still")
    assert R.questions_for(c) == [
        ("shape", "what is in the video?", "cup"),
        ("motion", "which way does the cup move?", "still"),
        ("color_start", "what color is the cup at the start?", "red"),
        ("color_end", "what color is the cup at the end?", "blue"),
        ("caption", "describe the video.", "a red cup stays still and turns blue"),
    ]
    assert R.caption_for(_spec(shape="box", colors=("white", "purple"), change_time=1.0, motion="left", speed=50.0)) \
        == "a white box moves left and turns purple"
    assert R.question_text("color_end", "cup", "colour", mark=False) == "what colour is the cup at the end"
    assert R.question_text("caption", "cup") == "describe the video."


def test_write_clip_is_320x240_30fps_h264(tmp_path):
    av = pytest.importorskip("av")
    s = _spec(shape="box", colors=("yellow",), motion="right", speed=40.0, duration=2.0, position=(80.0, 120.0))
    path = R.write_clip(s, tmp_path / "c.mp4")
    with av.open(str(path)) as c:
        st = c.streams.video[0]
        assert st.codec_context.name == "h264"
        assert (st.width, st.height) == (320, 240)
        assert round(float(st.average_rate)) == 30
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(st)]
    assert len(frames) == 60
    # Decoded colour at the object's centre is still close to the drawn yellow.
    px = frames[0][120, 80].astype(int)
    assert np.abs(px - np.array(R.color_rgb("yellow"))).max() < 30


def test_write_dataset_lines(tmp_path):
    pytest.importorskip("av")
    qa = write_dataset(tmp_path / "ds", 6, seed=11)
    assert qa == tmp_path / "ds" / "qa.jsonl"
    rows = [json.loads(line) for line in qa.read_text().splitlines()]
    rng = np.random.default_rng(11)
    specs = [R.sample_spec(rng) for _ in range(6)]
    assert len(rows) == sum(5 if s.changes else 6 for s in specs)
    videos = sorted({r["video"] for r in rows})
    assert len(videos) == 6
    for v in videos:
        assert (tmp_path / "ds" / v).is_file()
    assert {r["kind"] for r in rows} <= set(R.KINDS)
    for r in rows:
        assert set(r) == {"video", "question", "answer", "kind"}
    # Same seed, same set.
    qa2 = write_dataset(tmp_path / "ds2", 6, seed=11)
    assert qa2.read_text() == qa.read_text()


def test_demo_model_answers_the_sample_clips():
    """The shipped demo model, loaded with plain transformers, answers every question about
    the shipped sample clips (decoded from h264 by segment centres) correctly."""
    pytest.importorskip("av")
    torch = pytest.importorskip("torch")
    from pathlib import Path

    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

    from dycoke_cli.models.preprocess import FrameSpec, preprocess_frames

    root = Path(__file__).resolve().parents[1]
    folder = root / "src" / "dycoke_cli" / "demo_model"
    samples = root / "sample_videos"
    if not (folder / "model.safetensors").is_file() or not (samples / "qa.jsonl").is_file():
        pytest.skip("demo model or sample clips not present")
    try:
        from dycoke_cli.video.read import read_video
    except ImportError:
        pytest.skip("dycoke_cli.video not available")
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    from dycoke_cli.models.base import ModelDefaults
    from dycoke_cli.video.read import probe_video

    defaults = ModelDefaults.from_folder(folder)
    cfg = model.config.vision_config
    fspec = FrameSpec.from_pretrained(folder, cfg.image_size)
    per_frame = (-(-(cfg.image_size // cfg.patch_size) // 2)) ** 2
    video = tok.convert_tokens_to_ids("<video>")
    rows = [json.loads(line) for line in (samples / "qa.jsonl").read_text().splitlines()]
    pix = {}
    wrong = []
    for r in rows:
        if r["video"] not in pix:
            count = defaults.frames_for(probe_video(samples / r["video"]).duration)  # the product's default
            frames = read_video(str(samples / r["video"]), count).frames
            pix[r["video"]] = preprocess_frames(np.asarray(frames), fspec)[None]
        p = pix[r["video"]]
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": r["question"]}]}],
            add_generation_prompt=True, tokenize=False)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        i = ids.index(video)
        ids = ids[:i] + [video] * (p.shape[1] * per_frame + 1) + ids[i + 1:]
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]), pixel_values_videos=p, max_new_tokens=32, do_sample=False)
        got = tok.decode(out[0, len(ids):], skip_special_tokens=True).strip()
        if got != r["answer"]:
            wrong.append((r["video"], r["question"], r["answer"], got))
    assert not wrong, wrong
