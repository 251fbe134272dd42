"""Write the sample clips shipped in sample_videos/ (and their qa.jsonl) with the toy-world
generator. Deterministic: rerunning rewrites identical specs.

    python training/make_samples.py [--out sample_videos]      # six clips of world v1, qa.jsonl
    python training/make_samples.py --world v2                 # three of world v2, qa_v2.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dycoke_cli.toyworld.events import EventSpec, Segment, event_questions, path_extent  # noqa: E402
from dycoke_cli.toyworld.render import FPS, HEIGHT, WIDTH, margin, questions_for, sample_spec, write_clip  # noqa: E402

# name -> fixed attributes; the rest (position, size, background, duration) comes from the seed.
SAMPLES = {
    "red_cup.mp4": dict(shape="cup", colors=("red",), motion="left", background="plain", duration=2.5),
    "blue_cup_turns_yellow.mp4": dict(shape="cup", colors=("blue", "yellow"), motion="right", background="stripes", duration=3.0),
    "green_ball_up.mp4": dict(shape="ball", colors=("green",), motion="up", background="plain", duration=2.5),
    "white_ball_turns_purple.mp4": dict(shape="ball", colors=("white", "purple"), motion="still", background="stripes", duration=3.0),
    "purple_box_still.mp4": dict(shape="box", colors=("purple",), motion="still", background="noise", duration=2.0),
    "yellow_box_down_turns_red.mp4": dict(shape="box", colors=("yellow", "red"), motion="down", background="plain", duration=3.0),
}

# Toy world v2 (several events per clip): name -> (shape, [(colour, motion), ...], background, seconds).
SAMPLES_V2 = {
    "white_box_up_green_still_blue_right.mp4": ("box", [("white", "up"), ("green", "still"), ("blue", "right")],
                                                "plain", 7.5),
    "red_ball_left_turns_blue.mp4": ("ball", [("red", "left"), ("blue", "left")], "stripes", 6.0),
    "yellow_cup_right_then_down.mp4": ("cup", [("yellow", "right"), ("yellow", "down")], "noise", 6.0),
}


def v2_spec(rng: np.random.Generator, shape: str, segments, background: str, seconds: float) -> EventSpec:
    """A v2 clip with fixed events, canonical look; the path starts where it stays in the frame."""
    size, travel = 30.0, 0.3 * WIDTH
    segs = tuple(Segment(c, m) for c, m in segments)
    x_lo, x_hi, y_lo, y_hi = path_extent([s.motion for s in segs], travel)
    half = margin(size)
    x0 = float(rng.uniform(half - x_lo, WIDTH - half - x_hi))
    y0 = float(rng.uniform(half - y_lo, HEIGHT - half - y_hi))
    frames = int(round(seconds * FPS / len(segs))) * len(segs)
    return EventSpec(shape=shape, segments=segs, duration=frames / FPS, background=background, size=size,
                     position=(x0, y0), travel=travel, bg_seed=int(rng.integers(2**31)), bg_param=float(rng.random()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=ROOT / "sample_videos")
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--world", choices=("v1", "v2"), default="v1")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = []
    if args.world == "v2":
        for i, (name, fixed) in enumerate(SAMPLES_V2.items()):
            spec = v2_spec(np.random.default_rng([args.seed, 100 + i]), *fixed)
            path = write_clip(spec, args.out / name, crf=26)
            print(f"{name}: {path.stat().st_size / 1024:.0f} KB, {spec.duration:.1f} s")
            for kind, q, a in event_questions(spec):
                lines.append(json.dumps({"video": name, "question": q, "answer": a, "kind": kind}))
        (args.out / "qa_v2.jsonl").write_text("\n".join(lines) + "\n")
        return
    for i, (name, fixed) in enumerate(SAMPLES.items()):
        rng = np.random.default_rng([args.seed, i])
        spec = sample_spec(rng, variety=False, **fixed)
        path = write_clip(spec, args.out / name, crf=26)
        print(f"{name}: {path.stat().st_size / 1024:.0f} KB, {spec.duration:.1f} s")
        for kind, q, a in questions_for(spec):
            lines.append(json.dumps({"video": name, "question": q, "answer": a, "kind": kind}))
    (args.out / "qa.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
