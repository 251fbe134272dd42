"""Write the sample clips shipped in sample_videos/ (and their qa.jsonl) with the toy-world
generator. Deterministic: rerunning rewrites identical specs.

    python training/make_samples.py [--out sample_videos]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dycoke_cli.toyworld.render import questions_for, sample_spec, write_clip  # noqa: E402

# name -> fixed attributes; the rest (position, size, background, duration) comes from the seed.
SAMPLES = {
    "red_cup.mp4": dict(shape="cup", colors=("red",), motion="left", background="plain", duration=2.5),
    "blue_cup_turns_yellow.mp4": dict(shape="cup", colors=("blue", "yellow"), motion="right", background="stripes", duration=3.0),
    "green_ball_up.mp4": dict(shape="ball", colors=("green",), motion="up", background="plain", duration=2.5),
    "white_ball_turns_purple.mp4": dict(shape="ball", colors=("white", "purple"), motion="still", background="stripes", duration=3.0),
    "purple_box_still.mp4": dict(shape="box", colors=("purple",), motion="still", background="noise", duration=2.0),
    "yellow_box_down_turns_red.mp4": dict(shape="box", colors=("yellow", "red"), motion="down", background="plain", duration=3.0),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=ROOT / "sample_videos")
    ap.add_argument("--seed", type=int, default=2024)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = []
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
