#!/usr/bin/env python
"""Benchmark: a long video, uncompressed against DyCoke, as the frame count grows.

Writes a synthetic 60-minute clip with PyAV (96x72 px, 1 fps, a keyframe a minute: a textured
background and a disc that drifts), then for 16, 64 and 256 frames reads and encodes it the way
`dycoke ask` does (seeking, in chunks of ENCODE_CHUNK frames) and answers one question with
``none`` and with ``dycoke`` (the paper's defaults), a fixed number of decoded tokens each.
Per frame count and method: the time per stage (reading, vision tower, TTM, prefill, decode),
the peak memory above the loaded model (read-and-encode, and the answer), and whether the prompt
fits the 32k context; and per method, the largest frame count that fits it (frame_count's
``--frames max`` with the memory left out).

Model: ``--arch 0.5b`` (the default on CUDA) builds the LLaVA-OneVision-0.5B architecture with
random weights (benchmarks/bench_compression.py's FULL); ``--quick`` (the default on a CPU) the
same token counts at scaled-down widths: the vision tower at 384 px with 14 px patches pooled to
196 tokens a frame and a 32,768-token context, as the 0.5B, but 64-wide layers, so that 256
frames run in a few minutes on two cores. The frames that fit depend only on those counts, so
they are the 0.5B's either way.

Outputs: a Markdown table on stdout (progress on stderr), a JSON file and a PNG of the stage
times and the peaks, by default under runs/bench_long/.

    python benchmarks/bench_long.py                       # --quick on a CPU: a few minutes
    python benchmarks/bench_long.py --frames 16,64 --tokens 4
    python benchmarks/bench_long.py --arch 0.5b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

try:
    import dycoke_cli
except ImportError:  # a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import dycoke_cli  # noqa: F401

from bench_compression import FULL, Arch, build_model
from bench_report import machine_info

from dycoke_cli.errors import DycokeError
from dycoke_cli.memory import PeakMemory
from dycoke_cli.testing.tiny import TinySpec

METHODS = ("none", "dycoke")
QUESTION = "describe the video in detail ."
CLIP_SECONDS = 3600
CLIP_SIZE = (96, 72)
NO_MEMORY_BOUND = 2**50  # bytes: leaves the context as the only bound
# The 0.5B's token counts (384 px frames, 14 px patches: 196 tokens a frame; a 32k context) at
# 64-wide layers: what runs 256 frames in minutes on a CPU.
QUICK = Arch("quick: LLaVA-OneVision-0.5B's token counts, scaled-down widths, random weights", 2048,
             replace(FULL.spec, vision_hidden=64, vision_layers=2, vision_heads=2, vision_intermediate=128,
                     text_hidden=64, text_layers=4, text_heads=4, text_kv_heads=2, text_intermediate=128))


def write_long_clip(path: Path, seconds: int = CLIP_SECONDS, size: tuple[int, int] = CLIP_SIZE) -> Path:
    """A synthetic clip of ``seconds`` at 1 fps (h264, a keyframe a minute): a textured background
    and a disc drifting across it, so that neighbouring frames are similar but not equal."""
    import av
    import numpy as np

    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    background = np.stack([xx / w, yy / h, 0.5 + 0.5 * np.sin(xx / 7 + yy / 5)], -1) * 200
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=1, options={"preset": "ultrafast", "g": "60"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(seconds):
            img = background.copy()
            cx, cy = (i * 0.37) % w, h / 2 + h / 4 * math.sin(i / 9)
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < (h / 6) ** 2] = (230, 40, 40)
            frame = av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def encode_once(lm, clip, frames: int) -> tuple[object, int | None]:
    """The clip read and encoded as `dycoke ask` does (no feature cache), and the peak memory above
    the start of that stage."""
    from dycoke_cli.pipeline import encode_video

    with PeakMemory(lm.device, settle=True) as mem:
        enc = encode_video(lm, clip, frames, timeout_s=600)
    return enc, mem.peak_above_start


def encoding_peaks(counts: list[int], seconds: int = 120, arch: Arch = QUICK) -> dict[int, int]:
    """The read-and-encode stage's peak above its start, per frame count, on a clip of ``seconds``
    (what tests/test_long_videos.py asserts stays flat)."""
    import torch

    from dycoke_cli.video.read import open_clip

    lm = build_model(arch, torch.float32, "cpu")
    with tempfile.TemporaryDirectory() as folder:
        clip = open_clip(write_long_clip(Path(folder) / "clip.mp4", seconds))
        encode_once(lm, clip, min(counts))  # warm-up: the first call pays for lazy allocations
        return {n: encode_once(lm, clip, n)[1] for n in counts}


def fits(lm, info, frames, method: str) -> int | None:
    """The largest count that fits the context with ``method`` (frame_count's --frames max bound)."""
    from dycoke_cli.decoding.prompt import render_prompt
    from dycoke_cli.frame_count import choose_frames
    from dycoke_cli.options import CompressionOptions, FrameOptions

    chosen = choose_frames(lm, info, FrameOptions(frames=frames, memory_budget=NO_MEMORY_BOUND),
                           CompressionOptions(method=method).resolve(lm), render_prompt(lm, QUESTION))
    return chosen.bounds.get("context")


def answer_row(lm, enc, method: str, tokens: int, read: tuple[float, float, int | None]) -> dict:
    """One method's answer on the encoded clip: stage times and the answer's peak."""
    from dycoke_cli.options import CompressionOptions, SamplingOptions
    from dycoke_cli.pipeline import answer

    opts = CompressionOptions(method=method)
    sampling = SamplingOptions(max_new_tokens=tokens, ignore_eos=True, decode="eager")
    with PeakMemory(lm.device, settle=True) as mem:
        r = answer(lm, enc, QUESTION, opts, sampling)
    t = r.stats.timings
    read_s, encode_s, encode_peak = read
    return {"frames": enc.video.info.requested, "method": method, "fits": True,
            "prefill_tokens": r.stats.prefill_tokens, "visual_tokens_prefill": r.stats.visual_tokens_prefill,
            "read_s": read_s, "vision_s": encode_s, "merge_s": t.merge, "prefill_s": t.prefill, "decode_s": t.decode,
            "total_s": read_s + encode_s + t.merge + t.prefill + t.decode,
            "encode_peak_bytes": encode_peak, "answer_peak_bytes": mem.peak_above_start}


def run(args, log=lambda msg: None) -> dict:
    import torch

    from dycoke_cli.options import OptionError
    from dycoke_cli.video.read import open_clip

    arch = QUICK if args.quick else FULL
    dtype = getattr(torch, args.dtype)
    log(f"building {arch.name} ({args.dtype}, {args.device})...")
    lm = build_model(arch, dtype, args.device)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "long_clip.mp4"
    if not path.is_file():
        log(f"writing a {CLIP_SECONDS // 60}-minute clip to {path}...")
        write_long_clip(path)
    clip = open_clip(path, timeout_s=600)
    most = {m: fits(lm, clip.info, "max", m) for m in METHODS}
    rows = []
    for n in args.frames:
        log(f"{n} frames: reading and encoding...")
        enc, peak = encode_once(lm, clip, n)
        for method in METHODS:
            try:
                fits(lm, clip.info, n, method)
            except OptionError:
                rows.append({"frames": n, "method": method, "fits": False})
                log(f"  {method}: does not fit the {lm.model.config.text_config.max_position_embeddings}-token context")
                continue
            log(f"  {method}: answering...")
            rows.append(answer_row(lm, enc, method, args.tokens, (enc.read_s, enc.encode_s, peak)))
        del enc
    return {"machine": {**machine_info(lm.device, dtype, torch.get_num_threads()),
                        "date": time.strftime("%Y-%m-%d")},
            "config": {"arch": arch.name, "clip": f"{CLIP_SECONDS} s, {CLIP_SIZE[0]}x{CLIP_SIZE[1]} px, 1 fps",
                       "tokens": args.tokens, "context": lm.model.config.text_config.max_position_embeddings},
            "most_frames": most, "runs": rows}


def _mib(x) -> str:
    return "–" if x is None else f"{x / 2**20:,.0f}"


def markdown(report: dict) -> str:
    c, m = report["config"], report["machine"]
    lines = [f"{c['arch']}; clip {c['clip']}; {c['tokens']} tokens decoded; {m['cpu']}, {m['threads']} threads, "
             f"{m['dtype']}, {m['date']}", "",
             "| frames | method | prompt tokens | read s | vision s | TTM s | prefill s | decode s | total s "
             "| encode peak MiB | answer peak MiB |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["runs"]:
        if not r["fits"]:
            lines.append(f"| {r['frames']} | {r['method']} | over the {c['context']:,}-token context | | | | | | | | |")
            continue
        lines.append(f"| {r['frames']} | {r['method']} | {r['prefill_tokens']:,} | {r['read_s']:.2f} "
                     f"| {r['vision_s']:.1f} | {r['merge_s']:.3f} | {r['prefill_s']:.2f} | {r['decode_s']:.2f} "
                     f"| {r['total_s']:.1f} | {_mib(r['encode_peak_bytes'])} | {_mib(r['answer_peak_bytes'])} |")
    lines += ["", "Most frames that fit the " + f"{c['context']:,}-token context: " +
              ", ".join(f"{method} {n:,}" for method, n in report["most_frames"].items())]
    return "\n".join(lines) + "\n"


def draw_plot(report: dict, path: Path) -> None:
    """Two panels: the stage times stacked per method and frame count, and the two peaks."""
    from PIL import Image, ImageDraw, ImageFont

    stages = (("read_s", "read", (180, 180, 180)), ("vision_s", "vision tower", (120, 120, 120)),
              ("merge_s", "TTM", (120, 80, 170)), ("prefill_s", "prefill", (60, 110, 200)),
              ("decode_s", "decode", (235, 140, 40)))
    img = Image.new("RGB", (1100, 520), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    m = report["machine"]
    d.text((20, 10), f"{report['config']['arch']} | {m['cpu']} | {m['date']}", fill="black", font=font)
    runs = report["runs"]
    panels = ((60, "seconds", lambda r: [(r.get(k, 0.0), c) for k, _, c in stages]),
              (600, "peak MiB (encode | answer)", lambda r: [((r.get("encode_peak_bytes") or 0) / 2**20,
                                                                (90, 170, 110)),
                                                               ((r.get("answer_peak_bytes") or 0) / 2**20,
                                                                (60, 110, 200))]))
    for x0, title, parts in panels:
        _panel(d, font, x0, title, runs, parts, stacked=title == "seconds")
    legend = [(label, colour) for _, label, colour in stages] + [("encode peak", (90, 170, 110)),
                                                                  ("answer peak", (60, 110, 200))]
    for i, (label, colour) in enumerate(legend):
        d.rectangle([60 + i * 140, 490, 72 + i * 140, 502], fill=colour)
        d.text((76 + i * 140, 490), label, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _panel(d, font, x0: int, title: str, runs: list[dict], parts, stacked: bool) -> None:
    top, height, width = 50, 380, 460
    values = [sum(v for v, _ in parts(r)) if stacked else max((v for v, _ in parts(r)), default=0)
              for r in runs if r["fits"]]
    vmax = max(values, default=1.0) or 1.0
    d.text((x0, top - 20), title, fill="black", font=font)
    d.line([(x0, top), (x0, top + height), (x0 + width, top + height)], fill="black")
    bar = width / max(len(runs), 1)
    for i, r in enumerate(runs):
        x = x0 + i * bar + 4
        label = f"{r['frames']} {r['method'][:2]}"
        d.text((x, top + height + 4), label, fill="black", font=font)
        if not r["fits"]:
            d.text((x, top + height - 14), "over", fill=(200, 0, 0), font=font)
            continue
        acc = 0.0
        for j, (v, colour) in enumerate(parts(r)):
            if stacked:
                y1, y0 = top + height - height * acc / vmax, top + height - height * (acc + v) / vmax
                d.rectangle([x, y0, x + bar - 8, y1], fill=colour)
                acc += v
            else:
                half = (bar - 8) / 2
                d.rectangle([x + j * half, top + height - height * v / vmax, x + (j + 1) * half - 1, top + height],
                            fill=colour)
        total = acc if stacked else max(v for v, _ in parts(r))
        d.text((x, top + height - height * total / vmax - 14), f"{total:.1f}", fill="black", font=font)


class _OneLineErrors(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"bench_long: error: {message}\n")


def parse_args(argv):
    import torch

    p = _OneLineErrors(description="A 60-minute clip: none against DyCoke at 16, 64 and 256 frames.")
    cuda = torch.cuda.is_available()
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=not cuda,
                   help="the 0.5B's token counts at scaled-down widths (default on a CPU)")
    p.add_argument("--frames", default="16,64,256", help="comma-separated frame counts")
    p.add_argument("--tokens", type=int, default=8, help="tokens decoded per answer")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--out", default="runs/bench_long", help="folder of the clip, the JSON and the plot")
    args = p.parse_args(argv)
    try:
        args.frames = [int(x) for x in args.frames.split(",")]
    except ValueError:
        p.error(f"--frames must be comma-separated whole numbers (got {args.frames!r})")
    if not args.frames or min(args.frames) < 1 or args.tokens < 1:
        p.error("--frames and --tokens must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        report = run(args, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except DycokeError as exc:
        print(f"bench_long: error: {exc}", file=sys.stderr)
        return 1
    out = Path(args.out)
    (out / "bench_long.json").write_text(json.dumps(report, indent=2) + "\n")
    draw_plot(report, out / "bench_long.png")
    print(markdown(report), end="")
    print(f"[bench_long] wrote {out / 'bench_long.json'} and {out / 'bench_long.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
