"""How long read_video takes, and how much memory, on long clips: seeking versus one forward pass.

    python benchmarks/video_sampling.py [--frames 32] [--keep DIR]

Writes the clips with tests/clips.py into a temporary folder (or DIR), then measures each read
in a fresh child process so the peak resident memory (ru_maxrss) belongs to that read alone.
"forward" forces the one-pass path by raising SEEK_AFTER_S; "auto" is what users get.
Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def _second(i: int, width: int, height: int):
    """Frame i of a 25 fps clip shows the second it belongs to (the pattern holds 4,096)."""
    from clips import pattern_frame

    return pattern_frame(i // 25 % 4096, width, height)


# (name, write_clip arguments): an hour of tiny frames, and minutes of 640 x 360. The frames
# are flat quadrants, cheap to decode: real footage makes every decoded frame dearer, which
# favours seeking more than these numbers show.
CLIPS = [
    ("hour_25fps_64x48.mp4", dict(n_frames=90_000, fps=25, size=(64, 48), gop=250, color_fn=_second)),
    ("hour_25fps_64x48.mkv", dict(n_frames=90_000, fps=25, size=(64, 48), gop=250, color_fn=_second)),
    ("5min_25fps_640x360.mp4", dict(n_frames=7_500, fps=25, size=(640, 360), gop=250, color_fn=_second)),
]


def measure(path: str, mode: str, frames: int) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(ROOT / "tests"))
    from clips import frame_index_of

    from dycoke_cli.video import read as video

    if mode == "forward":
        video.SEEK_AFTER_S = float("inf")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    started = time.perf_counter()
    v = video.read_video(path, frames)
    elapsed = time.perf_counter() - started
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "seconds": round(elapsed, 3),
        "traced_peak_mb": round(traced_peak / 1e6, 2),
        "rss_growth_mb": round((rss_peak - rss_before) / 1e3, 1),
        "frames_mb": round(v.frames.nbytes / 1e6, 2),
        "sampled": v.info.sampled,
        "first_seconds": [frame_index_of(f) for f in v.frames[:4]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--keep", type=Path, help="write the clips here and keep them")
    parser.add_argument("--measure", nargs=2, metavar=("PATH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], args.measure[1], args.frames)))
        return

    sys.path.insert(0, str(ROOT / "tests"))
    from clips import write_clip

    folder = args.keep or Path(tempfile.mkdtemp(prefix="video-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    for name, kwargs in CLIPS:
        path = folder / name
        if not path.exists():
            started = time.perf_counter()
            write_clip(path, **kwargs)
            print(f"wrote {name}: {path.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - started:.1f} s",
                  file=sys.stderr)
        for mode in ("auto", "forward"):
            out = subprocess.run(
                [sys.executable, __file__, "--frames", str(args.frames), "--measure", str(path), mode],
                capture_output=True, text=True, check=True,
            )
            print(f"{name:26s} {mode:8s} {out.stdout.strip()}")
    if not args.keep:
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()


if __name__ == "__main__":
    main()
