"""A second, independent renderer of the toy world, for testing only: the demo model is
never trained on it. Written from the spec, not from dycoke_cli.toyworld.render: other
drawing code (4x supersampled, anti-aliased edges), pure CSS colours, a differently shaped
cup (straight-sided taper, "C" handle, no rim), other textures and encoder settings.

    python training/alt_world.py OUT_DIR --n 120 --seed 99
    python training/eval_demo.py --data OUT_DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

W, H, FPS = 320, 240, 30
CSS = {"red": (255, 0, 0), "green": (0, 170, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
       "purple": (128, 0, 128), "white": (255, 255, 255)}
SS = 4  # supersampling factor


def _mask(shape: str, cx: float, cy: float, s: float, side: int) -> np.ndarray:
    """Anti-aliased coverage [H, W] in [0, 1] of the object centred at (cx, cy)."""
    x0, x1 = int(max(0, cx - s)), int(min(W, cx + s + 1))
    y0, y1 = int(max(0, cy - s)), int(min(H, cy + s + 1))
    ys = (np.arange(y0 * SS, y1 * SS) + 0.5) / SS
    xs = (np.arange(x0 * SS, x1 * SS) + 0.5) / SS
    X, Y = np.meshgrid(xs - cx, ys - cy)
    if shape == "ball":
        m = X ** 2 + Y ** 2 <= (s / 2) ** 2
    elif shape == "box":
        m = (np.abs(X) <= s / 2) & (np.abs(Y) <= s / 2)
    else:
        h = s
        t = (Y + h / 2) / h  # 0 at the top, 1 at the bottom
        half = (0.42 - 0.14 * t) * h  # top 0.84 h wide, bottom 0.56 h
        body = (np.abs(Y) <= h / 2) & (np.abs(X) <= half)
        hx = side * 0.36 * h  # handle: a "C" (ring, inner side hidden by the body)
        r = np.sqrt((X - hx) ** 2 + (Y + 0.03 * h) ** 2)
        ring = (r <= 0.24 * h) & (r >= 0.14 * h) & (side * X > 0)
        m = body | ring
    small = m.reshape(y1 - y0, SS, x1 - x0, SS).mean(axis=(1, 3))
    out = np.zeros((H, W), dtype=np.float32)
    out[y0:y1, x0:x1] = small
    return out


def _background(kind: str, rng) -> np.ndarray:
    base = rng.integers(5, 40)
    bg = np.full((H, W, 3), base, dtype=np.float32) + rng.integers(-5, 6, size=3)
    if kind == "noise":
        bg += rng.uniform(-10, 10, size=(H, W, 1))
    elif kind == "stripes":
        period = int(rng.integers(6, 30))
        vertical = rng.random() < 0.5
        idx = np.arange(W if vertical else H)
        band = ((idx // period) % 2).astype(np.float32) * rng.uniform(8, 20)
        bg += band[None, :, None] if vertical else band[:, None, None]
    return np.clip(bg, 0, 60)


def sample(rng):
    shape = ["cup", "ball", "box"][rng.integers(3)]
    colors = list(rng.choice(list(CSS), size=2, replace=False))
    if rng.random() < 0.5:
        colors = colors[:1]
    motion = ["left", "right", "up", "down", "still"][rng.integers(5)]
    dur = float(rng.uniform(2.0, 4.0))
    s = float(rng.uniform(H / 6, H / 4))
    change = float(rng.uniform(0.35, 0.65)) * dur if len(colors) > 1 else None
    dist = 0.5 * (W if motion in ("left", "right") else H) if motion != "still" else 0.0
    m = s * 0.8
    vx, vy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}[motion]
    x0 = rng.uniform(m + (dist if vx < 0 else 0), W - m - (dist if vx > 0 else 0))
    y0 = rng.uniform(m + (dist if vy < 0 else 0), H - m - (dist if vy > 0 else 0))
    return dict(shape=shape, colors=colors, motion=motion, duration=dur, size=s, change=change,
                start=(x0, y0), vel=(vx * dist / dur, vy * dist / dur), side=int(rng.choice([-1, 1])),
                background=["plain", "noise", "stripes"][rng.integers(3)], crf=int(rng.integers(18, 28)))


def write(spec, path: Path, rng) -> None:
    import av

    bg = _background(spec["background"], rng)
    n = int(round(spec["duration"] * FPS))
    with av.open(str(path), mode="w") as c:
        st = c.add_stream("libx264", rate=FPS)
        st.width, st.height, st.pix_fmt = W, H, "yuv420p"
        st.options = {"crf": str(spec["crf"]), "preset": "fast"}
        for i in range(n):
            t = i / FPS
            cx, cy = spec["start"][0] + spec["vel"][0] * t, spec["start"][1] + spec["vel"][1] * t
            col = spec["colors"][1] if spec["change"] is not None and t >= spec["change"] else spec["colors"][0]
            a = _mask(spec["shape"], cx, cy, spec["size"], spec["side"])[..., None]
            img = (bg * (1 - a) + np.asarray(CSS[col], dtype=np.float32) * a).round().astype(np.uint8)
            for p in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in st.encode():
            c.mux(p)


def qa(spec):
    n, c = spec["shape"], spec["colors"]
    cap = f"a {c[0]} {n} " + ("stays still" if spec["motion"] == "still" else f"moves {spec['motion']}")
    if len(c) > 1:
        cap += f" and turns {c[1]}"
    out = [("shape", "what is in the video?", n), ("motion", f"which way does the {n} move?", spec["motion"])]
    if len(c) == 1:
        out.append(("color", f"what color is the {n}?", c[0]))
    out += [("color_start", f"what color is the {n} at the start?", c[0]),
            ("color_end", f"what color is the {n} at the end?", c[-1]), ("caption", "describe the video.", cap)]
    return out


def write_alt_dataset(out: Path, n: int, seed: int) -> Path:
    out = Path(out)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        spec = sample(rng)
        rel = f"clips/{i:04d}.mp4"
        write(spec, out / rel, rng)
        for kind, q, a in qa(spec):
            lines.append(json.dumps({"video": rel, "question": q, "answer": a, "kind": kind}))
    (out / "qa.jsonl").write_text("\n".join(lines) + "\n")
    return out / "qa.jsonl"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--seed", type=int, default=99)
    a = ap.parse_args()
    print(write_alt_dataset(a.out, a.n, a.seed))
