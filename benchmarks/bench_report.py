"""The benchmark's report: ratios against ``none``, the issue's targets, the machine, the
Markdown table and the PNG of stage times (drawn with Pillow, no matplotlib needed).
Pure functions of the report dict that benchmarks/bench_compression.py builds."""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
from pathlib import Path


def add_ratios(runs: list[dict]) -> None:
    """Ratios against ``none`` at the same frame count: > 1 means the method is faster / smaller."""
    base = {r["frames"]: r for r in runs if r["method"] == "none"}

    def ratio(a, b):
        return (a / b) if (a is not None and b) else None

    for r in runs:
        b = base.get(r["frames"])
        if b is None:
            continue
        r["ratios"] = {
            "llm_speedup": ratio(b["llm_s"], r["llm_s"]),
            "decode_speedup": ratio(b["decode_ms_median"], r["decode_ms_median"]),
            "prefill_speedup": ratio(b["prefill_s"], r["prefill_s"]),
            "ttft_speedup": ratio(b["ttft_s"], r["ttft_s"]),
            "total_speedup": ratio(b["total_s"], r["total_s"]),
            "memory_reduction": ratio(b["peak_bytes"], r["peak_bytes"]),
            "kv_reduction": ratio(b["kv_bytes"], r["kv_bytes"]),
        }


TARGETS = (
    # (key, what, method, ratio field or "loop_vs_generate", threshold, direction)
    ("llm_stage", "LLM stage (prefill + decode) speedup, DyCoke vs none", "dycoke", "llm_speedup", 2.0, ">="),
    ("decode_step", "decode step speedup with pruning, DyCoke vs none", "dycoke", "decode_speedup", 1.4, ">="),
    ("loop_vs_generate", "our uncompressed loop / model.generate (time)", "none", "loop_over_generate", 1.05, "<="),
    ("peak_memory", "peak memory above the model, none / DyCoke", "dycoke", "memory_reduction", 1.8, ">="),
)


def evaluate_targets(runs: list[dict], generate: list[dict]) -> list[dict]:
    """The issue's targets, at the largest frame count measured (32 by default)."""
    if not runs:
        return []
    frames = max(r["frames"] for r in runs)
    out = []
    for key, what, method, field, threshold, direction in TARGETS:
        if field == "loop_over_generate":
            g = next((g for g in generate if g["frames"] == frames), None)
            value = g["loop_over_generate"] if g else None
        else:
            r = next((r for r in runs if r["frames"] == frames and r["method"] == method), None)
            value = r["ratios"][field] if r and "ratios" in r else None
        met = None if value is None else (value >= threshold if direction == ">=" else value <= threshold)
        out.append({"key": key, "what": what, "frames": frames, "measured": value,
                    "target": f"{direction} {threshold}", "met": met})
    return out



def machine_info(device, dtype, threads: int) -> dict:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_end": loadavg(),
    }
    if getattr(device, "type", "") == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _f(x, fmt="{:.2f}", none="–"):
    return none if x is None else fmt.format(x)


def _mb(x):
    return _f(None if x is None else x / 2**20, "{:.0f}")


def _x(x):
    return _f(x, "{:.2f}x")


def markdown(report: dict) -> str:
    """The whole report as Markdown: the per-run table, the model.generate comparison, the
    machine's load and the targets."""
    lines = _runs_table(report) + ["", *_generate_table(report["generate"], report["config"].get("generate_skipped"))]
    lines += _load_note(report)
    if report["targets"]:
        lines += ["", "| target (at %d frames) | measured | wanted | met |" % report["targets"][0]["frames"],
                  "|---|---:|---:|---|"]
        for t in report["targets"]:
            met = "–" if t["met"] is None else ("yes" if t["met"] else "**no**")
            lines.append(f"| {t['what']} | {_f(t['measured'], '{:.3f}')} | {t['target']} | {met} |")
    return "\n".join(lines) + "\n"


def _runs_table(report: dict) -> list[str]:
    m, c = report["machine"], report["config"]
    option = f" (`--arch {c['arch_option']}{' --quick' if c['quick'] else ''}`)" if c.get("arch_option") else ""
    lines = [
        f"### dycoke bench: {c['arch']['name']}{option}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, {m['device']}, {m['dtype']}; "
        f"torch {m['torch']}, transformers {m['transformers']}; {m['date']}. "
        f"One run; {report['config']['tokens']} decoding steps after the first token (EOS ignored). "
        f"Ratios are against `none` at the same frame count (> 1: faster / smaller)."
        + (" **What-if run: single-query GQA attention packed per KV head (`--decode-attention packed`).**"
           if report["config"].get("decode_attention") == "packed" else ""),
        "",
        "| frames | method | visual tokens prefill → decode | vision s | prefill s | decode ms/token | "
        "LLM s | TTFT s | total s | peak MB | KV MB | LLM × | decode × | TTFT × | total × | memory × |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["runs"]:
        q = r.get("ratios", {})
        lines.append(
            f"| {r['frames']} | {r['method']} | {r['visual_tokens_prefill']} → {r['visual_tokens_decode']} | "
            f"{_f(r['vision_s'])} | {_f(r['prefill_s'])} | {_f(r['decode_ms_median'], '{:.1f}')} | "
            f"{_f(r['llm_s'])} | {_f(r['ttft_s'])} | {_f(r['total_s'])} | {_mb(r['peak_bytes'])} | "
            f"{_f(r['kv_bytes'] / 2**20, '{:.1f}')} | {_x(q.get('llm_speedup'))} | {_x(q.get('decode_speedup'))} | "
            f"{_x(q.get('ttft_speedup'))} | {_x(q.get('total_speedup'))} | {_x(q.get('memory_reduction'))} |"
        )
    return lines + [
        "",
        _vision_note(report) + " LLM = TTM + prefill + decode. "
        "TTFT and total include the vision tower. peak MB: resident memory above the loaded model and the encoded "
        f"video during the answer ({report['memory_method']}). KV MB: cache bytes held at the end, "
        "everything included (DyCoke: the attended working buffers + the store of pruned entries).",
    ]


def _vision_note(report: dict) -> str:
    if report["config"]["arch"].get("family") == "qwen2_5_vl":
        model = report["model"]
        return (f"vision: Qwen2.5-VL ViT + 2x2 patch merger, shared by all methods (encoded once); "
                f"{model['frames_per_step']} frames form one temporal step of {model['tokens_per_step']} "
                f"tokens, and TTM's windows run over steps.")
    return "vision: SigLIP + projector + pooling, shared by all methods (encoded once)."


def _generate_table(generate: list[dict], skipped: str | None = None) -> list[str]:
    """model.generate on the uncompressed inputs against our loop, per method: each method's
    answer time over generate's at the same frame count (< 1: our loop is faster)."""
    if not generate and skipped:
        return [f"model.generate: {'not timed (--no-generate)' if skipped == '--no-generate' else skipped}."]
    methods = list(generate[0].get("by_method") or {"none": None}) if generate else ["none"]
    names = " / ".join(methods)
    lines = [f"| frames | model.generate s | generate, cuDNN SDPA off s | our loop s ({names}) | "
             f"loop / generate ({names}) | same tokens | first logits, max diff / spread |",
             "|---:|---:|---:|---:|---:|---|---:|"]
    for g in generate:
        by = g.get("by_method") or {"none": {"loop_s": g["loop_s"], "loop_over_generate": g["loop_over_generate"]}}
        loops = " / ".join(_f(by.get(m, {}).get("loop_s")) for m in methods)
        ratios = " / ".join(_f(by.get(m, {}).get("loop_over_generate"), "{:.3f}") for m in methods)
        same = {True: "yes", False: "no", None: "– (not fp32)"}[g.get("same_tokens")]
        lines.append(f"| {g['frames']} | {_f(g['generate_s'])} | {_f(g.get('generate_no_cudnn_s'))} | {loops} | "
                     f"{ratios} | {same} | {_f(g.get('logits_rel_diff'), '{:.1e}')} |")
    return lines + ["", "model.generate: inputs_embeds of the uncompressed prompt, default (dynamic) cache, greedy, "
                        "the same number of tokens as our loop (EOS suppressed), as users call it and (CUDA) with "
                        "cuDNN's SDPA off; loop / generate < 1: ours is faster (against the first). Same tokens are "
                        "checked in fp32 only: in bf16 random weights give flat logits and greedy tokens flip, so "
                        "the first step's logits, ours against transformers' forward, stand for it."]


def _load_note(report: dict) -> list[str]:
    m = report["machine"]
    utils = [r["cpu_util"] for r in report["runs"] if r.get("cpu_util") is not None]
    if not utils:
        return []
    lines = ["", f"CPU utilisation during the answers (process CPU time / wall / threads): "
                 f"{min(utils):.2f} to {max(utils):.2f}; load average at start {m.get('loadavg_start')}, "
                 f"at end {m.get('loadavg_end')}."]
    if min(utils) < 0.8:
        lines.append("**Warning: the machine was busy (utilisation below 0.8): timings are inflated and noisy.**")
    return lines


STAGE_COLOURS = (("vision_s", "vision tower", (150, 150, 150)), ("merge_s", "TTM", (120, 80, 170)),
                 ("prefill_s", "LLM prefill", (60, 110, 200)), ("decode_s", "decode", (235, 140, 40)))
GENERATE_COLOUR = (90, 170, 110)  # model.generate (prefill + decode), stacked on the shared vision tower
BAR_STAGES = (*((key, colour) for key, _, colour in STAGE_COLOURS), ("generate_s", GENERATE_COLOUR))


def _bar_total(r: dict) -> float:
    return sum(r.get(key, 0.0) for key, _ in BAR_STAGES)


PLOT_SIZE, PLOT_MARGINS = (980, 560), (80, 200, 60, 80)  # left, right, top, bottom


def draw_plot(report: dict, path: str | os.PathLike) -> None:
    """Stacked bars (vision, TTM, prefill, decode seconds) per method, grouped by frame count."""
    from PIL import Image, ImageDraw

    runs = [*report["runs"], *_generate_bars(report)]
    img = Image.new("RGB", PLOT_SIZE, "white")
    d = ImageDraw.Draw(img)
    font, small = _fonts()
    left, right, top, bottom = PLOT_MARGINS
    m = report["machine"]
    d.text((left, 12), f"Stage times per answer ({report['config']['tokens'] + 1} tokens), "
           f"{m['dtype']}, {m['threads']} threads", fill="black", font=font)
    d.text((left, 32), f"{m.get('gpu') or m['cpu']} | {m['date']}" + (
        " | under each bar: its answer time / model.generate's" if report.get("generate") else ""),
        fill=(90, 90, 90), font=small)
    vmax = max((_bar_total(r) for r in runs), default=1.0) or 1.0
    step = _nice_step(vmax / 6)
    vmax = math.ceil(vmax / step) * step
    plot_h, plot_w = PLOT_SIZE[1] - top - bottom, PLOT_SIZE[0] - left - right

    def y_of(v):
        return top + plot_h - plot_h * v / vmax

    tick = 0.0
    while tick <= vmax + 1e-9:
        y = y_of(tick)
        d.line([(left, y), (left + plot_w, y)], fill=(225, 225, 225))
        d.text((left - 8, y), f"{tick:g}", fill="black", font=small, anchor="rm")
        tick += step
    d.text((left - 8, top - 10), "seconds", fill="black", font=small, anchor="rb")
    _draw_bars(d, report, runs, y_of, (font, small))
    d.line([(left, top), (left, top + plot_h), (left + plot_w, top + plot_h)], fill="black")
    lx, ly = left + plot_w + 24, top + 10
    legend = [(label, colour) for _, label, colour in reversed(STAGE_COLOURS)]
    if report.get("generate"):
        legend.append(("model.generate", GENERATE_COLOUR))
    for label, colour in legend:
        d.rectangle([lx, ly, lx + 16, ly + 16], fill=colour)
        d.text((lx + 24, ly + 8), label, fill="black", font=font, anchor="lm")
        ly += 28
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _fonts():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=14), ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1: bitmap font only
        return ImageFont.load_default(), ImageFont.load_default()


def _generate_bars(report: dict) -> list[dict]:
    """model.generate as a pseudo-run per frame count: the shared vision tower + its wall time."""
    vision = {r["frames"]: r["vision_s"] for r in report["runs"]}
    return [{"frames": g["frames"], "method": "generate", "vision_s": vision.get(g["frames"], 0.0),
             "generate_s": g["generate_s"]} for g in report.get("generate") or []]


def _draw_bars(d, report: dict, runs: list[dict], y_of, fonts) -> None:
    """One group of bars per frame count, one bar per method (then model.generate's, when timed),
    stages stacked bottom-up; under each method's bar, its answer time / model.generate's."""
    font, small = fonts
    methods = [*report["config"]["methods"], *(["generate"] if report.get("generate") else [])]
    frames = sorted({r["frames"] for r in runs})
    left, right, top, bottom = PLOT_MARGINS
    plot_h, plot_w = PLOT_SIZE[1] - top - bottom, PLOT_SIZE[0] - left - right
    group_w = plot_w / max(len(frames), 1)
    bar_w = group_w / (len(methods) + 1)
    if report.get("generate"):
        d.text((left - 8, top + plot_h + 22), "/ gen.", fill=(90, 90, 90), font=small, anchor="rt")
    for gi, fcount in enumerate(frames):
        gx = left + gi * group_w + bar_w / 2
        for mi, method in enumerate(methods):
            r = next((r for r in runs if r["frames"] == fcount and r["method"] == method), None)
            if r is None:
                continue
            x0, x1 = gx + mi * bar_w + 2, gx + (mi + 1) * bar_w - 2
            acc = 0.0
            for key, colour in BAR_STAGES:
                if r.get(key, 0.0) > 0:
                    d.rectangle([x0, y_of(acc + r[key]), x1, y_of(acc)], fill=colour)
                acc += r.get(key, 0.0)
            d.text(((x0 + x1) / 2, y_of(acc) - 4), f"{acc:.1f}", fill="black", font=small, anchor="mb")
            d.text(((x0 + x1) / 2, top + plot_h + 6), method, fill="black", font=small, anchor="mt")
            if r.get("loop_over_generate") is not None:
                d.text(((x0 + x1) / 2, top + plot_h + 22), f"{r['loop_over_generate']:.2f}", fill=(90, 90, 90),
                       font=small, anchor="mt")
        d.text((gx + len(methods) * bar_w / 2, top + plot_h + 42), f"{fcount} frames", fill="black", font=font,
               anchor="mt")


def _nice_step(raw: float) -> float:
    if raw <= 0:
        return 1.0
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag

