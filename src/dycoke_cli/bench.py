"""Benchmark: where the time and memory go, uncompressed vs DyCoke vs FastV, side by side.

Builds the LLaVA-OneVision-0.5B architecture (SigLIP so400m-patch14-384 with the 26 layers
LLaVA-OV uses + Qwen2-0.5B) from a config written here, with random weights: the arithmetic
and the memory traffic are those of the real checkpoint, only the answers are gibberish. For
each frame count it encodes a synthetic clip once (the vision tower is shared by every
method), then answers the same question with ``none``, ``dycoke`` (the paper's defaults) and
``fastv`` (same visual budget), forcing a fixed number of decoded tokens so the methods are
comparable, and finally times ``model.generate`` on the uncompressed inputs against our loop.

Memory: "peak above the loaded model" is measured per method in this one process. On Linux
the kernel's resident-set high-water mark is reset before each method (``/proc/self/clear_refs``
``5``) after freeing the allocator's cached pages (``malloc_trim``), so the peak is exact
(kernel-tracked, no sampling gap) and not inflated by an earlier method. Where that file is
not writable a 1 ms RSS-sampling thread is used instead; on CUDA, the allocator's peak.

Outputs: a Markdown table on stdout (progress on stderr), a JSON file and a PNG of the stage
times stacked per method and frame count (drawn with Pillow, no matplotlib needed).

    python benchmarks/bench_compression.py --frames 8,16,32 --json bench.json --plot bench.png
    dycoke bench --quick        # scaled-down model, well under a minute: a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as _dt
import gc
import json
import math
import os
import platform
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

METHODS = ("none", "dycoke", "fastv")
MEMORY_PASS_TOKENS = 4
QUESTION = "describe the video in detail ."
WORDS = "describe the video in detail . what happens which color moves left right".split()


@dataclass(frozen=True)
class Arch:
    """Sizes of the LLaVA-OneVision to build (random weights)."""

    name: str
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    image_size: int
    patch_size: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    vocab: int
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = True  # Qwen2-0.5B ties its input and output embeddings
    max_position_embeddings: int = 32768

    @property
    def tokens_per_frame(self) -> int:
        return math.ceil(self.image_size // self.patch_size / 2) ** 2


# llava-onevision-qwen2-0.5b-ov: SigLIP so400m-patch14-384 (27 layers, LLaVA-OV reads layer -1 of
# the first 26, so 26 are built), 27x27 patches pooled 2x2 to 14x14 = 196 tokens per frame;
# Qwen2-0.5B: hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864, vocab 151936, rope 1e6.
FULL = Arch("llava-onevision-qwen2-0.5b architecture, random weights",
            vision_hidden=1152, vision_layers=26, vision_heads=16, vision_intermediate=4304,
            image_size=384, patch_size=14,
            text_hidden=896, text_layers=24, text_heads=14, text_kv_heads=2, text_intermediate=4864,
            vocab=151936)
# A scaled-down model with the same structure (4 decoder layers so pruning from layer 3 and
# FastV at layer 2 both apply): the whole benchmark runs in seconds. For CI smoke tests.
QUICK = Arch("quick: scaled-down LLaVA-OneVision, random weights",
             vision_hidden=64, vision_layers=2, vision_heads=2, vision_intermediate=128,
             image_size=112, patch_size=14,
             text_hidden=64, text_layers=4, text_heads=4, text_kv_heads=2, text_intermediate=128,
             vocab=2048, max_position_embeddings=8192)


# ----------------------------------------------------------------------------- model


def build_model(arch: Arch, dtype, device, seed: int = 0):
    """A LoadedModel of ``arch`` with random weights, built directly in ``dtype``."""
    import torch
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from .compression.attention import ATTENTION_NAME, register_attention
    from .model import LlavaOneVisionAdapter, ModelDefaults
    from .tinymodel import IMAGE, VIDEO, build_word_tokenizer

    register_attention()
    tok = build_word_tokenizer(WORDS)
    config = LlavaOnevisionConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": arch.vision_hidden,
            "intermediate_size": arch.vision_intermediate,
            "num_hidden_layers": arch.vision_layers,
            "num_attention_heads": arch.vision_heads,
            "image_size": arch.image_size,
            "patch_size": arch.patch_size,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
            "vision_use_head": False,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": arch.vocab,
            "hidden_size": arch.text_hidden,
            "intermediate_size": arch.text_intermediate,
            "num_hidden_layers": arch.text_layers,
            "num_attention_heads": arch.text_heads,
            "num_key_value_heads": arch.text_kv_heads,
            "max_position_embeddings": arch.max_position_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": arch.rope_theta},
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": arch.tie_word_embeddings,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": None,
        },
        image_token_index=tok.convert_tokens_to_ids(IMAGE),
        video_token_index=tok.convert_tokens_to_ids(VIDEO),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=[[arch.image_size, arch.image_size]],
        tie_word_embeddings=arch.tie_word_embeddings,
    )
    config.eos_token_id = tok.eos_token_id
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration._from_config(
        config, dtype=dtype,
        attn_implementation={"text_config": ATTENTION_NAME, "vision_config": "sdpa", "": "sdpa"},
    )
    model.to(device).eval()
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id, gen.bos_token_id = tok.eos_token_id, tok.pad_token_id, None
    return LlavaOneVisionAdapter().wrap(model, tok, name=arch.name, defaults=ModelDefaults())


def synthetic_frames(n: int, size: int, seed: int = 0):
    """uint8 [n, size, size, 3]: a textured background and a disc drifting across it, so that
    neighbouring frames are similar but not equal (what TTM sees in real clips)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    background = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * xx + 4 * yy)], -1) * 200
    background += rng.normal(0, 8, background.shape)
    frames = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        cx, cy = 0.2 + 0.6 * i / max(n - 1, 1), 0.5 + 0.25 * math.sin(i / 3)
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < 0.015
        img = background.copy()
        img[disc] = (230, 40, 40)
        frames[i] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


def stand_in_video(frames, requested: int):
    from .video import Video, VideoInfo

    t, h, w = frames.shape[:3]
    info = VideoInfo(path="<synthetic>", container="synthetic", codec="rawvideo", width=w, height=h,
                     duration=t / 4.0, fps=4.0, frame_count=t, stream_index=0, video_streams=1, rotation=0,
                     requested=requested, timestamps=tuple(i / 4.0 for i in range(t)))
    return Video(frames, info)


def encode_prefixes(lm, frames, counts: list[int]):
    """Encode ``max(counts)`` frames once, in chunks that end at every count; return the features
    and, for each count, the vision-tower seconds of its first ``count`` frames."""
    import torch

    from .generate import sync
    from .pipeline import ENCODE_CHUNK
    from .preprocess import preprocess_frames

    total = max(counts)
    pixels = preprocess_frames(frames[:total], lm.frame_spec)
    cuts = sorted(set(range(0, total, ENCODE_CHUNK)) | set(counts) | {total})
    feats, ends, secs, newline = [], [], [], None
    for a, b in zip(cuts[:-1], cuts[1:]):
        t0 = time.perf_counter()
        f, newline = lm.encode_video(pixels[a:b])
        sync(lm.device)
        secs.append(time.perf_counter() - t0)
        ends.append(b)
        feats.append(f)
    features = torch.cat(feats)
    per_count = {c: sum(s for s, e in zip(secs, ends) if e <= c) for c in counts}
    return features, newline, per_count


@contextlib.contextmanager
def decode_attention(kind: str):
    """``stock``: torch's SDPA as transformers calls it. ``packed``: a what-if for single-query
    steps with grouped-query attention: the query heads sharing a KV head are passed as that KV
    head's queries ([1, H, 1, d] -> [1, KVH, H/KVH, d]), the same arithmetic without the
    ``enable_gqa`` path, which on CPU is many times slower per decoding step at long contexts."""
    import torch.nn.functional as F

    if kind == "stock":
        yield
        return
    original = F.scaled_dot_product_attention

    def packed(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if enable_gqa and query.shape[2] == 1 and attn_mask is None and key.shape[1] != query.shape[1]:
            b, h, _, d = query.shape
            kvh = key.shape[1]
            out = original(query.reshape(b, kvh, h // kvh, d), key, value, dropout_p=dropout_p, scale=scale)
            return out.reshape(b, h, 1, d)
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa)

    F.scaled_dot_product_attention = packed
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


# ----------------------------------------------------------------------------- memory


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def current_rss() -> int | None:
    return _status_kb("VmRSS")


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
PINNED_MMAP_THRESHOLD = 64 * 1024


def pin_malloc() -> bool:
    """Make glibc return freed tensor memory to the OS at once: a fixed mmap threshold (which
    also switches off its dynamic growth up to 32 MiB) and a small trim threshold. Without it,
    how much freed memory the heap keeps depends on what ran before, and a method's RSS peak
    varied by 1.6x between two identical runs; with it, repeated runs agree within a few MB."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, PINNED_MMAP_THRESHOLD)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, 2 * PINNED_MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


class PeakMemory:
    """Peak bytes above the level at ``start()``: CUDA allocator peak, else resident set size."""

    def __init__(self, device):
        self.cuda = getattr(device, "type", "") == "cuda"
        self.device = device
        self.method = "cuda-allocator" if self.cuda else self._cpu_method()
        self.base = 0
        self._thread = None
        self._peak = 0
        self._stop = threading.Event()

    @staticmethod
    def _cpu_method() -> str:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            if _status_kb("VmHWM") is not None:
                return "rss-high-water-mark"
        except OSError:
            pass
        return "rss-sampling-1ms" if current_rss() is not None else "unavailable"

    def start(self) -> None:
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        _malloc_trim()
        if self.method == "rss-high-water-mark":
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.base = current_rss()
        elif self.method == "rss-sampling-1ms":
            self.base = self._peak = current_rss()
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, current_rss() or 0)

    def stop(self) -> int | None:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device) - self.base)
        if self.method == "rss-high-water-mark":
            return max(0, _status_kb("VmHWM") - self.base)
        if self.method == "rss-sampling-1ms":
            self._stop.set()
            self._thread.join()
            return max(0, max(self._peak, current_rss() or 0) - self.base)
        return None


# ----------------------------------------------------------------------------- runs


def run_method(lm, enc, method: str, tokens: int, vision_s: float, mem: PeakMemory) -> dict:
    """Answer once with ``method``; forced to 1 + ``tokens`` tokens (the first comes from the
    prefill, then ``tokens`` timed decoding steps)."""
    import torch

    from .options import CompressionOptions, Method, SamplingOptions
    from .pipeline import answer

    sampling = SamplingOptions(max_new_tokens=tokens + 1, ignore_eos=True)
    mem.start()
    c0, t0 = time.process_time(), time.perf_counter()
    r = answer(lm, enc, QUESTION, CompressionOptions(method=Method(method)), sampling)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    peak = mem.stop()
    s = r.stats.to_dict()
    t = s["timings_s"]
    kv = s["kv_bytes"]
    llm = t["merge"] + t["prefill"] + t["decode"]
    return {
        "frames": enc.frames,
        "method": method,
        "visual_tokens": s["visual_tokens"],
        "visual_tokens_prefill": s["visual_tokens_prefill"],
        "visual_tokens_decode": s["visual_tokens_decode"],
        "prefill_tokens": s["prefill_tokens"],
        "tokens_generated": s["tokens_generated"],
        "decode_steps": s["tokens_generated"] - 1,
        "vision_s": vision_s,
        "merge_s": t["merge"],
        "prefill_s": t["prefill"],
        "decode_s": t["decode"],
        "decode_ms_median": s["decode_ms_per_token_median"],
        "llm_s": llm,
        "ttft_llm_s": t["merge"] + s["ttft_s"],
        "ttft_s": vision_s + t["merge"] + s["ttft_s"],
        "answer_wall_s": wall,
        "cpu_util": cpu / wall / torch.get_num_threads() if wall > 0 else None,
        "total_s": vision_s + wall,
        "peak_bytes": peak,
        "kv_bytes": kv["working"] + kv["store"],  # everything held, wherever it lives
        "kv_attended_bytes": kv["working"],
        "kv_store_bytes": kv["store"],
        "peak_bytes_default_allocator": peak,
        "flops_ratio_estimate": s["flops_ratio_estimate"],
        "selections": s.get("selections"),
        "refreshes": s.get("refreshes"),
        "token_ids": list(r.token_ids),
    }


def time_generate(lm, enc, tokens: int) -> dict:
    """transformers' ``model.generate`` on the uncompressed inputs (same embeddings, same number
    of tokens, EOS suppressed): building the embeddings + generate, wall clock."""
    import torch

    from .generate import sync
    from .prompt import build_embeds

    n = tokens + 1
    t0 = time.perf_counter()
    embeds, _ = build_embeds(lm, QUESTION, enc.features.reshape(-1, enc.features.shape[-1]), enc.newline)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    with torch.inference_mode():
        out = lm.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    sync(lm.device)
    wall = time.perf_counter() - t0
    ids = out[0].tolist()
    return {"generate_s": wall, "token_ids": ids[-n:] if len(ids) >= n else ids}


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


def memory_pass_subprocess(args, arch: Arch, counts, per_frame: int, hidden: int, log) -> dict | None:
    """Run ``_memory_child`` in a fresh interpreter; {"frames/method": peak bytes} or None."""
    import subprocess

    cfg = {"quick": bool(args.quick), "dtype": args.dtype, "device": args.device, "threads": args.threads,
           "counts": list(counts), "per_frame": per_frame, "hidden": hidden}
    code = "import json, sys; from dycoke_cli.bench import _memory_child; _memory_child(json.loads(sys.argv[1]))"
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        out = subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], capture_output=True, text=True,
                             env=env, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log(f"memory pass failed ({type(exc).__name__}); keeping the peaks of the timed runs")
        return None
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1][:200]
        log(f"memory pass failed (exit {out.returncode}: {tail}); keeping the peaks of the timed runs")
        return None
    return json.loads(lines[-1])


def _memory_child(cfg: dict) -> None:
    """Child of memory_pass_subprocess: pin the allocator first, build the model, warm up, then one
    answer per (frame count, method) on random visual tokens of the real shape (TTM keeps a fixed
    number of tokens per frame, so the memory is that of real features), peaks as JSON on stdout."""
    pinned = pin_malloc()
    import torch

    from .model import pick_device, pick_dtype
    from .results import EncodedVideo

    torch.set_num_threads(cfg["threads"])
    device = pick_device(cfg["device"])
    dtype = pick_dtype(cfg["dtype"], device)
    lm = build_model(QUICK if cfg["quick"] else FULL, dtype, device)
    mem = PeakMemory(device)
    g = torch.Generator().manual_seed(0)
    top = max(cfg["counts"])
    feats = (torch.randn(top, cfg["per_frame"], cfg["hidden"], generator=g) * 0.5).to(device, dtype)
    newline = torch.randn(1, cfg["hidden"], generator=g).to(device, dtype)

    def enc(count):
        return EncodedVideo(stand_in_video(synthetic_frames(count, 8), count), feats[:count], newline, 0.0, 0.0)

    warm = enc(min(4, top))
    for method in METHODS:
        run_method(lm, warm, method, 1, 0.0, mem)
    peaks = {}
    for count in cfg["counts"]:
        e = enc(count)
        for method in METHODS:
            peaks[f"{count}/{method}"] = run_method(lm, e, method, MEMORY_PASS_TOKENS, 0.0, mem)["peak_bytes"]
    peaks["pinned"] = pinned
    print(json.dumps(peaks), flush=True)


# ----------------------------------------------------------------------------- report


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
        "loadavg_end": _loadavg(),
    }
    if getattr(device, "type", "") == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _loadavg():
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
    m = report["machine"]
    lines = [
        f"### dycoke bench: {report['config']['arch']['name']}",
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
    lines += [
        "",
        "vision: SigLIP + projector + pooling, shared by all methods (encoded once). LLM = TTM + prefill + decode. "
        "TTFT and total include the vision tower. peak MB: resident memory above the loaded model and the encoded "
        f"video during the answer ({report['memory_method']}). KV MB: cache bytes held at the end, "
        "everything included (DyCoke: the attended working buffers + the store of pruned entries).",
        "",
        "| frames | our loop s | model.generate s | loop / generate | same tokens |",
        "|---:|---:|---:|---:|---|",
    ]
    for g in report["generate"]:
        lines.append(f"| {g['frames']} | {_f(g['loop_s'])} | {_f(g['generate_s'])} | "
                     f"{_f(g['loop_over_generate'], '{:.3f}')} | {'yes' if g['same_tokens'] else 'no'} |")
    utils = [r["cpu_util"] for r in report["runs"] if r.get("cpu_util") is not None]
    if utils:
        lines += ["", f"CPU utilisation during the answers (process CPU time / wall / threads): "
                      f"{min(utils):.2f} to {max(utils):.2f}; load average at start {m.get('loadavg_start')}, "
                      f"at end {m.get('loadavg_end')}."]
        if min(utils) < 0.8:
            lines.append("**Warning: the machine was busy (utilisation below 0.8): timings are inflated and noisy.**")
    if report["targets"]:
        lines += ["", "| target (at %d frames) | measured | wanted | met |" % report["targets"][0]["frames"],
                  "|---|---:|---:|---|"]
        for t in report["targets"]:
            met = "–" if t["met"] is None else ("yes" if t["met"] else "**no**")
            lines.append(f"| {t['what']} | {_f(t['measured'], '{:.3f}')} | {t['target']} | {met} |")
    return "\n".join(lines) + "\n"


STAGE_COLOURS = (("vision_s", "vision tower", (150, 150, 150)), ("merge_s", "TTM", (120, 80, 170)),
                 ("prefill_s", "LLM prefill", (60, 110, 200)), ("decode_s", "decode", (235, 140, 40)))


def draw_plot(report: dict, path: str | os.PathLike) -> None:
    """Stacked bars (vision, TTM, prefill, decode seconds) per method, grouped by frame count."""
    from PIL import Image, ImageDraw, ImageFont

    runs = report["runs"]
    frames = sorted({r["frames"] for r in runs})
    width, height = 980, 560
    left, right, top, bottom = 80, 200, 60, 80
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=14)
        small = ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1: bitmap font only
        font = small = ImageFont.load_default()
    m = report["machine"]
    d.text((left, 12), f"Stage times per answer ({report['config']['tokens'] + 1} tokens), "
           f"{m['dtype']}, {m['threads']} threads", fill="black", font=font)
    d.text((left, 32), f"{m['cpu']} | {m['date']}", fill=(90, 90, 90), font=small)
    vmax = max((sum(r[k] for k, _, _ in STAGE_COLOURS) for r in runs), default=1.0) or 1.0
    step = _nice_step(vmax / 6)
    vmax = math.ceil(vmax / step) * step
    plot_h = height - top - bottom
    plot_w = width - left - right

    def y_of(v):
        return top + plot_h - plot_h * v / vmax

    tick = 0.0
    while tick <= vmax + 1e-9:
        y = y_of(tick)
        d.line([(left, y), (left + plot_w, y)], fill=(225, 225, 225))
        d.text((left - 8, y), f"{tick:g}", fill="black", font=small, anchor="rm")
        tick += step
    d.text((left - 8, top - 10), "seconds", fill="black", font=small, anchor="rb")
    group_w = plot_w / max(len(frames), 1)
    bar_w = group_w / (len(METHODS) + 1)
    for gi, fcount in enumerate(frames):
        gx = left + gi * group_w + bar_w / 2
        for mi, method in enumerate(METHODS):
            r = next((r for r in runs if r["frames"] == fcount and r["method"] == method), None)
            if r is None:
                continue
            x0, x1 = gx + mi * bar_w + 2, gx + (mi + 1) * bar_w - 2
            acc = 0.0
            for key, _, colour in STAGE_COLOURS:
                v = r[key]
                if v > 0:
                    d.rectangle([x0, y_of(acc + v), x1, y_of(acc)], fill=colour)
                acc += v
            d.text(((x0 + x1) / 2, y_of(acc) - 4), f"{acc:.1f}", fill="black", font=small, anchor="mb")
            d.text(((x0 + x1) / 2, top + plot_h + 6), method, fill="black", font=small, anchor="mt")
        d.text((gx + len(METHODS) * bar_w / 2, top + plot_h + 28), f"{fcount} frames", fill="black", font=font,
               anchor="mt")
    d.line([(left, top), (left, top + plot_h), (left + plot_w, top + plot_h)], fill="black")
    lx, ly = left + plot_w + 24, top + 10
    for _, label, colour in reversed(STAGE_COLOURS):
        d.rectangle([lx, ly, lx + 16, ly + 16], fill=colour)
        d.text((lx + 24, ly + 8), label, fill="black", font=font, anchor="lm")
        ly += 28
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _nice_step(raw: float) -> float:
    if raw <= 0:
        return 1.0
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


# ----------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(prog="dycoke bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", default="8,16,32", help="comma-separated frame counts (default 8,16,32)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bf16 on CPUs with AVX-512 BF16/AMX and on CUDA, else fp32")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default 2)")
    p.add_argument("--tokens", type=int, default=32, help="decoding steps timed after the first token (>= 1)")
    p.add_argument("--quick", action="store_true", help="scaled-down model: a smoke test in seconds")
    p.add_argument("--json", default="runs/bench/bench.json", help="where to write the JSON ('' to skip)")
    p.add_argument("--plot", default="runs/bench/bench.png", help="where to write the PNG ('' to skip)")
    p.add_argument("--no-generate", action="store_true", help="skip timing model.generate")
    p.add_argument("--decode-attention", default="stock", choices=["stock", "packed"],
                   help="what-if: 'packed' runs single-query GQA attention as KV-head-grouped queries "
                        "(same arithmetic, a faster CPU kernel); default: stock")
    args = p.parse_args(argv)
    try:
        args.frame_counts = sorted({int(x) for x in args.frames.split(",") if x.strip()})
    except ValueError:
        p.error(f"--frames: expected comma-separated integers (got {args.frames!r})")
    if not args.frame_counts or min(args.frame_counts) < 1:
        p.error("--frames: frame counts must be >= 1")
    if args.tokens < 1:
        p.error("--tokens must be >= 1")
    if args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def run(args, log=lambda msg: None) -> dict:
    import torch

    from .model import pick_device, pick_dtype
    from .results import EncodedVideo

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    arch = QUICK if args.quick else FULL
    mem = PeakMemory(device)

    load_start = _loadavg()
    rss0 = current_rss()
    t0 = time.perf_counter()
    lm = build_model(arch, dtype, device)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in lm.model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    log(f"built {arch.name}: {params / 1e6:.0f} M parameters, {weight_bytes / 2**20:.0f} MB {dtype} "
        f"in {build_s:.1f} s")

    counts = args.frame_counts
    frames = synthetic_frames(max(counts), arch.image_size)
    # Warm-up (not timed): first calls create kernels and fault in library pages.
    with torch.inference_mode():
        warm = frames[:4]
        features, newline, _ = encode_prefixes(lm, warm, [len(warm)])
    warm_enc = EncodedVideo(stand_in_video(warm, len(warm)), features, newline, 0.0, 0.0)
    for method in METHODS:
        run_method(lm, warm_enc, method, 2, 0.0, mem)
    if not args.no_generate:
        time_generate(lm, warm_enc, 2)
    log(f"warm-up done ({time.perf_counter() - t_start:.0f} s)")

    t0 = time.perf_counter()
    features, newline, vision_s = encode_prefixes(lm, frames, counts)
    log(f"vision tower: {max(counts)} frames in {time.perf_counter() - t0:.1f} s")
    rss_loaded = current_rss()

    runs, generate = [], []
    for count in counts:
        enc = EncodedVideo(stand_in_video(frames[:count], count), features[:count], newline, 0.0, vision_s[count])
        for method in METHODS:
            r = run_method(lm, enc, method, args.tokens, vision_s[count], mem)
            runs.append(r)
            log(f"{count:3d} frames  {method:7s} prefill {r['prefill_s']:7.2f} s  decode "
                f"{r['decode_ms_median']:7.1f} ms/token  peak {(r['peak_bytes'] or 0) / 2**20:6.0f} MB")
        if not args.no_generate:
            g = time_generate(lm, enc, args.tokens)
            ours = next(r for r in runs if r["frames"] == count and r["method"] == "none")
            g.update({"frames": count, "loop_s": ours["answer_wall_s"],
                      "loop_over_generate": ours["answer_wall_s"] / g["generate_s"],
                      "same_tokens": g["token_ids"] == ours["token_ids"]})
            generate.append(g)
            log(f"{count:3d} frames  model.generate {g['generate_s']:.2f} s vs our loop {g['loop_s']:.2f} s")

    # Memory pass: the timings above ran with the allocator as users get it, in a process that has
    # already run the vision tower, model.generate and other methods, whose heap state moved a
    # method's RSS peak by up to 1.5x. The peaks are taken again in a fresh process (as a
    # `dycoke ask` is), with glibc's allocator pinned from its start (see pin_malloc).
    memory_method = mem.method + " (allocator as is, during the timed runs)"
    if not mem.cuda and mem.method != "unavailable":
        log("memory pass in a fresh process ...")
        peaks = memory_pass_subprocess(args, arch, counts, lm.tokens_per_frame, lm.hidden_size, log)
        if peaks is not None:
            memory_method = (f"{mem.method}, fresh process, glibc's mmap threshold pinned to "
                             f"{PINNED_MMAP_THRESHOLD // 1024} KiB, {MEMORY_PASS_TOKENS} decoding steps")
            for r in runs:
                r["peak_bytes"] = peaks.get(f"{r['frames']}/{r['method']}")
                log(f"{r['frames']:3d} frames  {r['method']:7s} peak {(r['peak_bytes'] or 0) / 2**20:6.0f} MB "
                    f"(fresh process, allocator pinned; {(r['peak_bytes_default_allocator'] or 0) / 2**20:.0f} "
                    f"MB in the timed run)")

    add_ratios(runs)
    report = {
        "machine": {**machine_info(device, dtype, args.threads), "loadavg_start": load_start},
        "config": {
            "arch": asdict(arch),
            "quick": bool(args.quick),
            "frames": counts,
            "tokens": args.tokens,
            "question": QUESTION,
            "decode_attention": args.decode_attention,
            "methods": list(METHODS),
            "defaults": {"ttm_k": lm.defaults.ttm_k, "prune_p": lm.defaults.prune_p,
                         "prune_layer": lm.defaults.prune_layer, "refresh_threshold": 0.9, "fastv_layer": 2},
        },
        "model": {"parameters": params, "weight_bytes": weight_bytes, "build_s": build_s,
                  "rss_before_build_bytes": rss0, "rss_loaded_bytes": rss_loaded,
                  "tokens_per_frame": lm.tokens_per_frame},
        "memory_method": memory_method,
        "runs": runs,
        "generate": generate,
    }
    report["targets"] = evaluate_targets(runs, generate)
    report["wall_s"] = time.perf_counter() - t_start
    return report


def check_output_path(path: str, flag: str) -> None:
    """Refuse, before any work, an output path that is a folder or cannot be written (tried
    with a temporary file in the nearest existing folder, removed at once)."""
    import tempfile

    from .errors import DycokeError

    target = Path(path)
    try:
        if target.is_dir():
            raise DycokeError(f"{flag} {path}: is a folder; give a file name")
        folder = target.absolute().parent
        while not folder.exists():  # the nearest existing folder is where it would be created
            folder = folder.parent
        if not folder.is_dir():
            raise NotADirectoryError(20, f"{folder} is not a folder")
        with tempfile.TemporaryFile(dir=folder):
            pass
        if target.exists() and not os.access(target, os.W_OK):
            raise PermissionError(13, "permission denied")
    except OSError as exc:
        raise DycokeError(f"{flag} {path}: cannot write there ({exc.strerror or exc})") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    for path, flag in ((args.json, "--json"), (args.plot, "--plot")):
        if path:
            check_output_path(path, flag)
    start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - start:6.1f} s] {msg}", file=sys.stderr, flush=True)

    with decode_attention(args.decode_attention):
        report = run(args, log)
    sys.stdout.write(markdown(report))
    sys.stdout.flush()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {args.json}")
    if args.plot:
        draw_plot(report, args.plot)
        log(f"wrote {args.plot}")
    log(f"done in {report['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
