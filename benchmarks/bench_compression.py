#!/usr/bin/env python
"""Benchmark: where the time and memory go, uncompressed vs DyCoke vs FastV, side by side.

Builds, with dycoke_cli.testing.tiny's builders and random weights, the LLaVA-OneVision-0.5B
architecture (``--arch llava-ov-0.5b``, the default: SigLIP so400m-patch14-384 with the 26 layers
LLaVA-OV uses + Qwen2-0.5B; short name ``0.5b``), the LLaVA-OneVision-7B one (``--arch llava-ov-7b``
or ``7b``: the same SigLIP + Qwen2-7B), the Qwen2.5-VL-7B one (``--arch qwen2.5-vl-7b``) or the
Qwen3-VL-8B one (``--arch qwen3-vl-8b``, with its DeepStack levels and timestamps) or the Qwen3.5-2B
one (``--arch qwen3.5-2b``: a hybrid stack, linear attention in 3 of every 4 layers); the large ones
need ~15-18 GB in bf16, a GPU (on CUDA every model is built directly on the device).
``--quick`` builds a scaled-down model of the chosen family. The
arithmetic and the memory traffic are those of the real checkpoint, only the answers are
gibberish. For each frame count it encodes a synthetic clip once (the vision tower is shared by
every method), then answers the same question with ``none``, ``dycoke`` (the paper's defaults)
and ``fastv`` (same visual budget), forcing a fixed number of decoded tokens so the methods are
comparable, and finally times ``model.generate`` on the uncompressed inputs (inputs_embeds,
default dynamic cache, greedy, the same number of tokens) against each method's answer (not for
Qwen-VL: see GENERATE_SKIPPED). Without --frames / --tokens: 8,16,32 frames and 32
decoded tokens on CPU, 32,64,128 frames and 64 tokens on CUDA.

Memory: "peak above the loaded model" is measured per method with dycoke_cli.memory.PeakMemory
(on Linux the kernel's resident-set high-water mark, reset before each method after freeing
the allocator's cached pages; where that is not allowed, 1 ms RSS sampling; on CUDA, the
allocator's peak), then again in a fresh process with glibc's allocator pinned (see pin_malloc).

Outputs: a Markdown table on stdout (progress on stderr), a JSON file and a PNG of the stage
times stacked per method and frame count (bench_report.py), by default under runs/bench/.

    python benchmarks/bench_compression.py --frames 8,16,32 --json bench.json --plot bench.png
    python benchmarks/bench_compression.py --quick   # scaled-down model, well under a minute
    python benchmarks/bench_compression.py --arch qwen2.5-vl-7b --quick --frames 8,16 --tokens 4
    python benchmarks/bench_compression.py --arch 7b --device cuda --dtype bfloat16   # on a GPU
    dycoke bench --quick                              # the same, from a source checkout
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

try:
    import dycoke_cli
except ImportError:  # a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import dycoke_cli

from bench_report import add_ratios, draw_plot, evaluate_targets, loadavg, machine_info, markdown

from dycoke_cli.errors import DycokeError
from dycoke_cli.memory import PeakMemory, rss_bytes
from dycoke_cli.testing.tiny import TinyQwen3Spec, TinyQwen35Spec, TinyQwenSpec, TinySpec

METHODS = ("none", "dycoke", "fastv")
MEMORY_PASS_TOKENS = 4
QUESTION = "describe the video in detail ."
WORDS = "describe the video in detail . what happens which color moves left right".split()


QWEN = "qwen2_5_vl"
QWEN3 = "qwen3_vl"
QWEN35 = "qwen3_5"
QWEN_FAMILIES = (QWEN, QWEN3, QWEN35)  # temporal steps of 2 frames, M-RoPE
GENERATE_SKIPPED = {family: (f"not timed for {name}: transformers' generate from inputs_embeds does not give the "
                             "video tokens their M-RoPE (t, h, w) positions, so its tokens are not comparable with ours")
                    for family, name in ((QWEN, "Qwen2.5-VL"), (QWEN3, "Qwen3-VL"), (QWEN35, "Qwen3.5"))}


@dataclass(frozen=True)
class Arch:
    """A named model to build (random weights): its family, testing/tiny.py's sizes, a vocabulary and
    the side of the synthetic square frames it is given."""

    name: str
    vocab: int
    spec: TinySpec | TinyQwenSpec | TinyQwen3Spec | TinyQwen35Spec
    family: str = "llava_onevision"
    frame_side: int = 0  # 0: the vision tower's image_size (LLaVA-OV)

    @property
    def frame_size(self) -> int:
        return self.frame_side or self.spec.image_size


# Qwen2-0.5B's config knobs (it ties its input and output embeddings); SigLIP's activation and eps.
_QWEN2_SIGLIP = dict(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, rope_theta=1_000_000.0,
                     rms_norm_eps=1e-6, tie_word_embeddings=True)
# llava-onevision-qwen2-0.5b-ov: SigLIP so400m-patch14-384 (27 layers, LLaVA-OV reads layer -1 of
# the first 26, so 26 are built), 27x27 patches pooled 2x2 to 14x14 = 196 tokens per frame;
# Qwen2-0.5B: hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864, vocab 151936, rope 1e6.
FULL = Arch("llava-onevision-qwen2-0.5b architecture, random weights", 151936, TinySpec(
    vision_hidden=1152, vision_layers=26, vision_heads=16, vision_intermediate=4304, image_size=384, patch_size=14,
    text_hidden=896, text_layers=24, text_heads=14, text_kv_heads=2, text_intermediate=4864,
    max_position_embeddings=32768, **_QWEN2_SIGLIP))
# A scaled-down model with the same structure (4 decoder layers so pruning from layer 3 and
# FastV at layer 2 both apply): the whole benchmark runs in seconds. For CI smoke tests.
QUICK = Arch("quick: scaled-down LLaVA-OneVision, random weights", 2048, TinySpec(
    vision_hidden=64, vision_layers=2, vision_heads=2, vision_intermediate=128, image_size=112, patch_size=14,
    text_hidden=64, text_layers=4, text_heads=4, text_kv_heads=2, text_intermediate=128,
    max_position_embeddings=8192, **_QWEN2_SIGLIP))
# Qwen2.5-VL-7B-Instruct's config.json: a ViT of 32 blocks (hidden 1280, 16 heads, MLP 3420, 112 px
# attention windows, full attention in blocks 7, 15, 23, 31) merged 2x2 into 3584; the text model:
# hidden 3584, 28 layers, 28 heads, 4 KV heads, MLP 18944, vocab 152064, rope 1e6, M-RoPE 16/24/24,
# untied embeddings. 448x448 frames stay 448x448 (within 128..768 tokens of 28x28 px), so every
# temporal step of 2 frames gives 16x16 = 256 tokens.
QWEN_7B = Arch("Qwen2.5-VL-7B architecture, random weights", 152064, TinyQwenSpec(
    vision_depth=32, vision_hidden=1280, vision_heads=16, vision_intermediate=3420, window_size=112,
    fullatt_block_indexes=(7, 15, 23, 31), text_hidden=3584, text_layers=28, text_heads=28, text_kv_heads=4,
    text_intermediate=18944, mrope_section=(16, 24, 24), max_position_embeddings=128000, tokens_per_second=2,
    rope_theta=1_000_000.0, tie_word_embeddings=False, min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28),
    family=QWEN, frame_side=448)
# TinyQwenSpec with a wider vision tower (4 decoder layers): 112x112 frames, 4x4 = 16 tokens per step.
QWEN_QUICK = Arch("quick: scaled-down Qwen2.5-VL, random weights", 2048, TinyQwenSpec(
    vision_hidden=64, vision_intermediate=128), family=QWEN, frame_side=112)
# llava-onevision-qwen2-7b-ov: the same SigLIP tower (so the same 196 tokens per frame) projected
# into Qwen2-7B: hidden 3584, 28 layers, 28 heads, 4 KV heads, MLP 18944, vocab 152064, rope 1e6,
# untied input and output embeddings. About 8.0 B parameters: ~15 GB in bf16, a GPU.
_QWEN2_7B = dict(text_hidden=3584, text_layers=28, text_heads=28, text_kv_heads=4, text_intermediate=18944,
                 tie_word_embeddings=False)
FULL_7B = Arch("llava-onevision-qwen2-7b architecture, random weights", 152064, replace(FULL.spec, **_QWEN2_7B))
# QUICK's sizes with the 7B's untied embeddings and a wider grouped-query ratio (4 heads on 1 KV head;
# the 7B has 7 per KV head): the same 16 tokens per frame, so the same token counts as QUICK.
QUICK_7B = Arch("quick: scaled-down LLaVA-OneVision-7B, random weights", 2048,
                replace(QUICK.spec, text_kv_heads=1, tie_word_embeddings=False))
# Qwen3-VL-8B-Instruct's config.json: a ViT of 27 blocks (hidden 1152, 16 heads, MLP 4304, 16 px
# patches, a 48x48 learned position grid) merged 2x2 into 4096, DeepStack levels after blocks 8, 16
# and 24; the text model (Qwen3-8B): hidden 4096, 36 layers, 32 heads, 8 KV heads, head_dim 128,
# MLP 12288, vocab 151936, rope 5e6, interleaved M-RoPE 24/20/20, untied embeddings. The pixel
# budget is the released checkpoints' video_preprocessor_config.json (4096 .. 25165824 px over a
# clip): 448x448 frames stay 448x448 up to 124 frames, 14x14 = 196 tokens a temporal step.
QWEN3_8B = Arch("Qwen3-VL-8B architecture, random weights", 151936, TinyQwen3Spec(
    vision_depth=27, vision_hidden=1152, vision_heads=16, vision_intermediate=4304, num_position_embeddings=2304,
    deepstack_visual_indexes=(8, 16, 24), text_hidden=4096, text_layers=36, text_heads=32, text_kv_heads=8,
    head_dim=128, text_intermediate=12288, mrope_section=(24, 20, 20), max_position_embeddings=262144,
    rope_theta=5_000_000.0, tie_word_embeddings=False, min_pixels=4096, max_pixels=25165824),
    family=QWEN3, frame_side=448)
# TinyQwen3Spec with a wider vision tower: 128x128 frames, 4x4 = 16 tokens per step, two DeepStack levels.
QWEN3_QUICK = Arch("quick: scaled-down Qwen3-VL, random weights", 2048, TinyQwen3Spec(
    vision_hidden=64, vision_intermediate=128, min_pixels=4096, max_pixels=25165824), family=QWEN3, frame_side=128)
# Qwen3.5-2B's text model: hidden 2048, 24 layers (linear attention but in 3, 7, ..., 23), 8 heads,
# 2 KV heads, head_dim 256 (a quarter rotated), MLP 6144, Gated DeltaNet with 16 key and 16 value
# heads of 128, conv 4, vocab 248320, rope 1e7, interleaved M-RoPE 11/11/10, tied embeddings. Its
# vision tower is taken as 24 blocks of 1024 (16 heads, MLP 4096) merged into 2048 (not checked
# against the released config). 448x448 frames: 14x14 = 196 tokens a temporal step.
QWEN35_2B = Arch("Qwen3.5-2B architecture, random weights", 248320, TinyQwen35Spec(
    vision_depth=24, vision_hidden=1024, vision_heads=16, vision_intermediate=4096, num_position_embeddings=2304,
    text_hidden=2048, text_layers=24, text_heads=8, text_kv_heads=2, head_dim=256, partial_rotary_factor=0.25,
    mrope_section=(11, 11, 10), text_intermediate=6144, linear_key_head_dim=128, linear_value_head_dim=128,
    linear_num_key_heads=16, linear_num_value_heads=16, max_position_embeddings=262144, rope_theta=10_000_000.0,
    tie_word_embeddings=True, min_pixels=4096, max_pixels=25165824), family=QWEN35, frame_side=448)
# TinyQwen35Spec with a wider vision tower (8 layers, full attention at 3 and 7): 128x128 frames.
QWEN35_QUICK = Arch("quick: scaled-down Qwen3.5, random weights", 2048, TinyQwen35Spec(
    vision_hidden=64, vision_intermediate=128, min_pixels=4096, max_pixels=25165824), family=QWEN35, frame_side=128)
ARCHS = {"llava-ov-0.5b": (FULL, QUICK), "llava-ov-7b": (FULL_7B, QUICK_7B),
         "qwen2.5-vl-7b": (QWEN_7B, QWEN_QUICK), "qwen3-vl-8b": (QWEN3_8B, QWEN3_QUICK),
         "qwen3.5-2b": (QWEN35_2B, QWEN35_QUICK)}  # --arch: (full, --quick)
ARCH_ALIASES = {"0.5b": "llava-ov-0.5b", "7b": "llava-ov-7b"}  # short --arch names


def pick_arch(option: str, quick: bool) -> Arch:
    return ARCHS[ARCH_ALIASES.get(option, option)][1 if quick else 0]


# ----------------------------------------------------------------------------- model


def build_model(arch: Arch, dtype, device, seed: int = 0):
    """A LoadedModel of ``arch`` with random weights, built directly in ``dtype`` (and, on CUDA,
    on the device) with the probing attention in the language model (what `dycoke ask` loads)."""
    import torch

    from dycoke_cli.compression.attention import ATTENTION_NAME, register_attention
    from dycoke_cli.models.base import ModelDefaults
    from dycoke_cli.models.llava_onevision import LlavaOneVisionAdapter
    from dycoke_cli.models.qwen2_5_vl import Qwen25VLAdapter, VideoSpec
    from dycoke_cli.models.qwen3_5 import Qwen35Adapter
    from dycoke_cli.models.qwen3_vl import Qwen3VLAdapter
    from dycoke_cli.models.qwen3_vl import VideoSpec as Qwen3VideoSpec

    register_attention()
    attn = {"text_config": ATTENTION_NAME, "vision_config": "sdpa", "": "sdpa"}
    where = torch.device(device) if torch.device(device).type == "cuda" else contextlib.nullcontext()
    with where:
        model, tok = _build_random(arch, dtype, device, seed, attn)
    if arch.family == QWEN:
        spec = VideoSpec(min_pixels=arch.spec.min_pixels, max_pixels=arch.spec.max_pixels)
        return Qwen25VLAdapter().wrap(model, tok, name=arch.name, defaults=ModelDefaults(), video_spec=spec)
    if arch.family in (QWEN3, QWEN35):
        spec = Qwen3VideoSpec(min_pixels=arch.spec.min_pixels, max_pixels=arch.spec.max_pixels)
        if arch.family == QWEN35:  # its own defaults: the first pruned layer after the first full-attention one
            return Qwen35Adapter().wrap(model, tok, name=arch.name, video_spec=spec)
        return Qwen3VLAdapter().wrap(model, tok, name=arch.name, defaults=ModelDefaults(), video_spec=spec)
    return LlavaOneVisionAdapter().wrap(model, tok, name=arch.name, defaults=ModelDefaults())


def _build_random(arch: Arch, dtype, device, seed: int = 0, attn=None):
    """(model, tokenizer) of ``arch`` from testing/tiny.py's builders."""
    from dycoke_cli.testing.tiny import (
        build_llava_onevision,
        build_qwen2_5_vl,
        build_qwen3_5,
        build_qwen3_vl,
        build_word_tokenizer,
    )

    tok = build_word_tokenizer(WORDS, family=arch.family)
    builder = {QWEN: build_qwen2_5_vl, QWEN3: build_qwen3_vl, QWEN35: build_qwen3_5}.get(arch.family,
                                                                                       build_llava_onevision)
    model = builder(tok, arch.spec, seed=seed, vocab_size=arch.vocab, dtype=dtype, device=device,
                    attn_implementation=attn)
    return model, tok


def check_free_memory(arch: Arch, dtype, device) -> int:
    """Refuse, before building, a model whose weights do not fit in the memory free on the
    device (CPU: MemAvailable, so it fails now rather than swapping). Returns the weight bytes,
    counted on a model built on the meta device (no memory)."""
    import torch

    with torch.device("meta"):
        model, _ = _build_random(arch, dtype, None)
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    free = _free_bytes(torch.device(device))
    if free is not None and free < need * 1.1:  # + 10 % for activations, the KV cache, the encoded clip
        raise DycokeError(f"{arch.name} needs {need / 2**30:.1f} GiB for its {str(dtype).replace('torch.', '')} "
                          f"weights (+10 %); {torch.device(device)} has {free / 2**30:.1f} GiB free: run it on a "
                          f"larger GPU, or try --quick")
    return need


def _free_bytes(device) -> int | None:
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


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
    from dycoke_cli.video.read import Video, VideoInfo

    t, h, w = frames.shape[:3]
    info = VideoInfo(path="<synthetic>", container="synthetic", codec="rawvideo", width=w, height=h,
                     duration=t / 4.0, fps=4.0, frame_count=t, stream_index=0, video_streams=1, rotation=0,
                     requested=requested, timestamps=tuple(i / 4.0 for i in range(t)))
    return Video(frames, info)


def encode_prefixes(lm, frames, counts: list[int]):
    """Encode ``max(counts)`` frames once, in chunks that end at every count (whole temporal
    steps: counts are even for Qwen2.5-VL, and so is ENCODE_CHUNK); return the features (one
    row per step), the newline, for each count the vision-tower seconds of its first ``count``
    frames, one step's token grid (rows, cols) and the DeepStack levels (Qwen3-VL; all steps)."""
    import torch

    from dycoke_cli.decoding.loop import sync
    from dycoke_cli.pipeline import ENCODE_CHUNK

    total = max(counts)
    pixels = lm.preprocess(frames[:total])
    cuts = sorted(set(range(0, total, ENCODE_CHUNK)) | set(counts) | {total})
    feats, levels, ends, secs, newline = [], [], [], [], None
    for a, b in zip(cuts[:-1], cuts[1:]):
        t0 = time.perf_counter()
        f, newline, deep = lm.encode_video(pixels[a:b])
        sync(lm.device)
        secs.append(time.perf_counter() - t0)
        ends.append(b)
        feats.append(f)
        levels.append(deep)
    features = torch.cat(feats)
    deepstack = tuple(torch.cat(level) for level in zip(*levels))
    per_count = {c: sum(s for s, e in zip(secs, ends) if e <= c) for c in counts}
    return features, newline, per_count, lm.token_grid(pixels), deepstack


def encoded(lm, frames, features, newline, encode_s: float, grid: tuple[int, int], deepstack=()):
    """The EncodedVideo of ``frames`` (uint8, the synthetic clip's first frames): their steps'
    ``features``, the token grid and the clip time of a step (4 fps timestamps: Qwen 0.5 s)."""
    from dycoke_cli.pipeline import step_seconds
    from dycoke_cli.values import EncodedVideo

    video = stand_in_video(frames, len(frames))
    steps = len(frames) // lm.frames_per_step
    return EncodedVideo(video, features[:steps], newline, 0.0, encode_s, grid[0], grid[1],
                        step_seconds(video.info.timestamps, lm.frames_per_step),
                        tuple(level[:steps] for level in deepstack))


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


def bench_memory(device) -> PeakMemory:
    """Settled (gc, malloc_trim, CUDA cache) before each method; 1 ms sampling where needed."""
    return PeakMemory(device, interval_s=0.001, settle=True)


# ----------------------------------------------------------------------------- runs


def run_method(lm, enc, method: str, tokens: int, vision_s: float, mem: PeakMemory) -> dict:
    """Answer once with ``method``; forced to 1 + ``tokens`` tokens (the first comes from the
    prefill, then ``tokens`` timed decoding steps)."""
    import torch

    from dycoke_cli.options import CompressionOptions, Method, SamplingOptions
    from dycoke_cli.pipeline import answer

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
        "frames": enc.video.info.frame_count,
        "steps": enc.frames,
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
    of tokens, EOS suppressed): building the embeddings + generate, wall clock. As users call it
    (``generate_s``: SDPA picks its backend, cuDNN included on CUDA, which re-plans at every new
    key length), and on CUDA again with cuDNN's SDPA off (``generate_no_cudnn_s``: the baseline
    a well-configured user gets). Also the first step's logits against our loop's
    (``logits_max_abs_diff``, and over the logits' spread), which says "same computation" where
    bf16's flat random logits make the greedy tokens flip."""
    import torch

    from dycoke_cli.compression.cache import PrunedKVCache
    from dycoke_cli.decoding.loop import run_layers, sync
    from dycoke_cli.decoding.prompt import build_embeds

    n = tokens + 1

    def run() -> tuple[float, list[int]]:
        t0 = time.perf_counter()
        embeds, _ = build_embeds(lm, QUESTION, enc.features.reshape(-1, enc.features.shape[-1]), enc.newline)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        with torch.inference_mode():
            out = lm.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                    do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
        sync(lm.device)
        ids = out[0].tolist()
        return time.perf_counter() - t0, ids[-n:] if len(ids) >= n else ids

    wall, ids = run()
    result = {"generate_s": wall, "token_ids": ids, "generate_no_cudnn_s": None}
    if lm.device.type == "cuda":
        was = torch.backends.cuda.cudnn_sdp_enabled()
        torch.backends.cuda.enable_cudnn_sdp(False)
        try:
            result["generate_no_cudnn_s"] = run()[0]
        finally:
            torch.backends.cuda.enable_cudnn_sdp(was)
    embeds, _ = build_embeds(lm, QUESTION, enc.features.reshape(-1, enc.features.shape[-1]), enc.newline)
    with torch.inference_mode():
        theirs = lm.model(inputs_embeds=embeds).logits[0, -1].float()
        ours = run_layers(lm, embeds, torch.arange(embeds.shape[1], device=embeds.device)[None],
                          PrunedKVCache(lm.num_layers, embeds.shape[1]))[0]
    diff = float((ours - theirs).abs().max())
    result.update(logits_max_abs_diff=diff, logits_rel_diff=diff / max(float(theirs.std()), 1e-12))
    return result



def memory_pass_subprocess(args, counts, layout: dict, log) -> dict | None:
    """Run ``_memory_child`` in a fresh interpreter; {"frames/method": peak bytes} or None.
    ``layout``: the encoded clip's shape (per_step, hidden, rows, cols, newline)."""
    import subprocess

    cfg = {"arch": args.arch, "quick": bool(args.quick), "dtype": args.dtype, "device": args.device,
           "threads": args.threads, "counts": list(counts), **layout}
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
            "from bench_compression import _memory_child; _memory_child(json.loads(sys.argv[1]))")
    env = dict(os.environ)
    src = str(Path(dycoke_cli.__file__).resolve().parents[1])  # the dycoke_cli this process uses
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
    """Child of memory_pass_subprocess: pin the allocator first, build the same model, warm up,
    then one answer per (frame count, method) on random visual tokens of the real shape (TTM keeps
    a fixed number of tokens per step, so the memory is that of real features), peaks as JSON."""
    pinned = pin_malloc()
    import torch

    from dycoke_cli.models.loader import pick_device, pick_dtype

    torch.set_num_threads(cfg["threads"])
    device = pick_device(cfg["device"])
    dtype = pick_dtype(cfg["dtype"], device)
    lm = build_model(pick_arch(cfg["arch"], cfg["quick"]), dtype, device)
    mem = bench_memory(device)
    g = torch.Generator().manual_seed(0)
    top = max(cfg["counts"])
    steps = -(-top // lm.frames_per_step)
    feats = (torch.randn(steps, cfg["per_step"], cfg["hidden"], generator=g) * 0.5).to(device, dtype)
    newline = torch.randn(1, cfg["hidden"], generator=g).to(device, dtype) if cfg["newline"] else None
    deepstack = tuple((torch.randn(feats.shape, generator=g) * 0.5).to(device, dtype)
                      for _ in range(cfg.get("deepstack", 0)))

    def enc(count):
        return encoded(lm, synthetic_frames(count, 8), feats, newline, 0.0, (cfg["rows"], cfg["cols"]), deepstack)

    warm = enc(min(4, top))
    for method in METHODS:
        run_method(lm, warm, method, 1, 0.0, mem)
    peaks = {}
    for count in cfg["counts"]:
        e = enc(count)
        for method in METHODS:
            peaks[f"{count}/{method}"] = run_method(lm, e, method, MEMORY_PASS_TOKENS, 0.0, mem)["peak_bytes"]
    peaks["pinned"] = pinned
    peaks["arch"] = lm.name
    print(json.dumps(peaks), flush=True)


# ----------------------------------------------------------------------------- main


DEFAULT_FRAMES = {"cpu": "8,16,32", "cuda": "32,64,128"}  # --frames left out, by device type
DEFAULT_TOKENS = {"cpu": 32, "cuda": 64}  # --tokens left out


class _OneLineErrors(argparse.ArgumentParser):
    """A bad flag is one line on stderr and exit 2, like every other dycoke command."""

    def error(self, message):
        self.exit(2, f"dycoke: error: {message} (see '{self.prog} --help')\n")


def parse_args(argv):
    p = _OneLineErrors(prog="dycoke bench", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="llava-ov-0.5b", choices=[*ARCHS, *ARCH_ALIASES],
                   help="architecture to build with random weights (default llava-ov-0.5b, also '0.5b'; "
                        "llava-ov-7b, also '7b', qwen2.5-vl-7b and qwen3-vl-8b need ~15-18 GB in bf16: a GPU)")
    p.add_argument("--frames", default=None,
                   help="comma-separated frame counts (default %s on CPU, %s on CUDA; even for qwen2.5-vl-7b)"
                        % (DEFAULT_FRAMES["cpu"], DEFAULT_FRAMES["cuda"]))
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bf16 on CPUs with AVX-512 BF16/AMX and on CUDA, else fp32")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default 2)")
    p.add_argument("--tokens", type=int, default=None,
                   help="decoding steps timed after the first token (>= 1; default %d on CPU, %d on CUDA)"
                        % (DEFAULT_TOKENS["cpu"], DEFAULT_TOKENS["cuda"]))
    p.add_argument("--quick", action="store_true",
                   help="scaled-down model of the --arch family: a smoke test in seconds")
    p.add_argument("--json", default="runs/bench/bench.json", help="where to write the JSON ('' to skip)")
    p.add_argument("--plot", default="runs/bench/bench.png", help="where to write the PNG ('' to skip)")
    p.add_argument("--markdown", default="", help="also write the Markdown table to this file (default: stdout only)")
    p.add_argument("--no-generate", action="store_true", help="skip timing model.generate")
    p.add_argument("--decode-attention", default="stock", choices=["stock", "packed"],
                   help="what-if: 'packed' runs single-query GQA attention as KV-head-grouped queries "
                        "(same arithmetic, a faster CPU kernel); default: stock")
    args = p.parse_args(argv)
    args.arch = ARCH_ALIASES.get(args.arch, args.arch)
    args.frame_counts = None if args.frames is None else _frame_counts(p, args.frames, args.arch)
    if args.tokens is not None and args.tokens < 1:
        p.error("--tokens must be >= 1")
    if args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def _frame_counts(p, text: str, arch: str) -> list[int]:
    """--frames as sorted distinct counts, or a usage error."""
    try:
        counts = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        p.error(f"--frames: expected comma-separated integers (got {text!r})")
    if not counts or min(counts) < 1:
        p.error("--frames: frame counts must be >= 1")
    odd = [c for c in counts if c % 2]
    if odd and pick_arch(arch, False).family in QWEN_FAMILIES:
        p.error(f"--frames: {arch} encodes frames in temporal steps of 2; give even frame counts "
                f"(got {','.join(map(str, odd))})")
    return counts


def apply_device_defaults(args, device) -> None:
    """--frames and --tokens left out: the defaults of the device's type (CUDA: longer clips and
    answers, where the GPU's decode and DyCoke's savings show; CPU: what finishes in minutes)."""
    kind = "cuda" if getattr(device, "type", str(device)) == "cuda" else "cpu"
    if args.frame_counts is None:
        args.frames = DEFAULT_FRAMES[kind]
        args.frame_counts = [int(x) for x in args.frames.split(",")]
    if args.tokens is None:
        args.tokens = DEFAULT_TOKENS[kind]


def run(args, log=lambda msg: None) -> dict:
    """The whole benchmark: build, warm up, encode once, time every (frame count, method), time
    model.generate, redo the memory peaks in a fresh process; the report as a dict."""
    import torch

    from dycoke_cli.models.loader import pick_device, pick_dtype

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    apply_device_defaults(args, device)
    dtype = pick_dtype(args.dtype, device)
    arch = pick_arch(args.arch, args.quick)
    log(f"{device}, {dtype}: frames {args.frames}, {args.tokens} decoded tokens")
    check_free_memory(arch, dtype, device)
    mem = bench_memory(device)
    load_start = loadavg()
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    lm = build_model(arch, dtype, device)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in lm.model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    log(f"built {arch.name}: {params / 1e6:.0f} M parameters, {weight_bytes / 2**20:.0f} MB {dtype} "
        f"in {build_s:.1f} s")
    skipped = "--no-generate" if args.no_generate else GENERATE_SKIPPED.get(arch.family)
    frames = synthetic_frames(max(args.frame_counts), arch.frame_size)
    _warm_up(lm, frames, mem, skipped is None)
    log(f"warm-up done ({time.perf_counter() - t_start:.0f} s)")
    runs, generate, rss_loaded, layout = _timed_runs(args, lm, frames, mem, skipped is None, log)
    memory_method = _memory_pass(args, lm, mem, runs, layout, log)
    add_ratios(runs)
    report = {
        "machine": {**machine_info(device, dtype, args.threads), "loadavg_start": load_start},
        "config": {**_config(args, arch, lm), "generate_skipped": skipped},
        "model": {"parameters": params, "weight_bytes": weight_bytes, "build_s": build_s,
                  "rss_before_build_bytes": rss0, "rss_loaded_bytes": rss_loaded,
                  "frames_per_step": lm.frames_per_step, "tokens_per_step": layout["per_step"],
                  "tokens_per_frame": layout["per_step"] / lm.frames_per_step if lm.frames_per_step > 1
                  else layout["per_step"]},
        "memory_method": memory_method,
        "runs": runs,
        "generate": generate,
    }
    report["targets"] = evaluate_targets(runs, generate)
    report["wall_s"] = time.perf_counter() - t_start
    return report


def _config(args, arch: Arch, lm) -> dict:
    return {
        "arch": asdict(arch),
        "arch_option": args.arch,
        "quick": bool(args.quick),
        "frames": args.frame_counts,
        "tokens": args.tokens,
        "question": QUESTION,
        "decode_attention": args.decode_attention,
        "methods": list(METHODS),
        "defaults": {"ttm_k": lm.defaults.ttm_k, "prune_p": lm.defaults.prune_p,
                     "prune_layer": lm.defaults.prune_layer, "refresh_threshold": 0.9, "fastv_layer": 2},
    }


def _warm_up(lm, frames, mem: PeakMemory, with_generate: bool) -> None:
    """Not timed: first calls create kernels and fault in library pages."""
    import torch

    warm = frames[:4]
    with torch.inference_mode():
        features, newline, _, grid, deepstack = encode_prefixes(lm, warm, [len(warm)])
    warm_enc = encoded(lm, warm, features, newline, 0.0, grid, deepstack)
    for method in METHODS:
        run_method(lm, warm_enc, method, 2, 0.0, mem)
    if with_generate:
        time_generate(lm, warm_enc, 2)


def _timed_runs(args, lm, frames, mem: PeakMemory, with_generate: bool, log):
    """Encode once, then every method at every frame count, and model.generate against ours.
    Returns (runs, generate, RSS once encoded, the encoded clip's layout for the memory pass)."""
    counts = args.frame_counts
    t0 = time.perf_counter()
    features, newline, vision_s, grid, deepstack = encode_prefixes(lm, frames, counts)
    log(f"vision tower: {max(counts)} frames in {time.perf_counter() - t0:.1f} s")
    rss_loaded = rss_bytes()
    layout = {"per_step": int(features.shape[1]), "hidden": int(features.shape[2]), "rows": grid[0],
              "cols": grid[1], "newline": newline is not None, "deepstack": len(deepstack)}
    runs, generate = [], []
    for count in counts:
        enc = encoded(lm, frames[:count], features, newline, vision_s[count], grid, deepstack)
        for method in METHODS:
            r = run_method(lm, enc, method, args.tokens, vision_s[count], mem)
            runs.append(r)
            log(f"{count:3d} frames  {method:7s} prefill {r['prefill_s']:7.2f} s  decode "
                f"{r['decode_ms_median']:7.1f} ms/token  peak {(r['peak_bytes'] or 0) / 2**20:6.0f} MB")
        if with_generate:
            g = _against_generate(lm, enc, args.tokens, [r for r in runs if r["frames"] == count])
            generate.append(g)
            log(f"{count:3d} frames  model.generate {g['generate_s']:.2f} s; our loop / generate: " + ", ".join(
                f"{m} {v['loop_over_generate']:.2f}" for m, v in g["by_method"].items()))
    return runs, generate, rss_loaded, layout


def _against_generate(lm, enc, tokens: int, runs: list[dict]) -> dict:
    """Time model.generate on ``enc`` uncompressed and set, on each method's run at that frame
    count, its answer's wall time over generate's (< 1: our loop is faster). The top-level
    loop_s / loop_over_generate / same_tokens are those of ``none`` (same inputs, same tokens;
    same_tokens only in fp32, None otherwise: the logits' difference stands for it)."""
    import torch

    g = time_generate(lm, enc, tokens)
    for r in runs:
        r["loop_over_generate"] = r["answer_wall_s"] / g["generate_s"]
    ours = next(r for r in runs if r["method"] == "none")
    exact = lm.dtype == torch.float32  # in bf16 random weights give flat logits: tokens flip, logits tell
    g.update({"frames": enc.video.info.frame_count, "loop_s": ours["answer_wall_s"],
              "loop_over_generate": ours["loop_over_generate"],
              "same_tokens": g["token_ids"] == ours["token_ids"] if exact else None,
              "by_method": {r["method"]: {"loop_s": r["answer_wall_s"], "loop_over_generate": r["loop_over_generate"]}
                            for r in runs}})
    return g


def _memory_pass(args, lm, mem: PeakMemory, runs: list[dict], layout: dict, log) -> str:
    """The timings ran with the allocator as users get it, in a process that has already run the
    vision tower, model.generate and other methods, whose heap state moved a method's RSS peak by
    up to 1.5x. The peaks are taken again in a fresh process (as a `dycoke ask` is), with glibc's
    allocator pinned from its start (see pin_malloc); ``runs`` get those. Returns how."""
    memory_method = mem.method + " (allocator as is, during the timed runs)"
    if mem.cuda or mem.method == "unavailable":
        return memory_method
    log("memory pass in a fresh process ...")
    peaks = memory_pass_subprocess(args, args.frame_counts, layout, log)
    if peaks is None or peaks.get("arch") != lm.name:
        if peaks is not None:
            log(f"memory pass built {peaks.get('arch')!r}, not {lm.name!r}; keeping the peaks of the timed runs")
        return memory_method
    for r in runs:
        r["peak_bytes"] = peaks.get(f"{r['frames']}/{r['method']}")
        log(f"{r['frames']:3d} frames  {r['method']:7s} peak {(r['peak_bytes'] or 0) / 2**20:6.0f} MB "
            f"(fresh process, allocator pinned; {(r['peak_bytes_default_allocator'] or 0) / 2**20:.0f} "
            f"MB in the timed run)")
    return (f"{mem.method}, fresh process, glibc's mmap threshold pinned to "
            f"{PINNED_MMAP_THRESHOLD // 1024} KiB, {MEMORY_PASS_TOKENS} decoding steps")


def check_output_path(path: str, flag: str) -> None:
    """Refuse, before any work, an output path that is a folder or cannot be written (tried
    with a temporary file in the nearest existing folder, removed at once)."""
    import tempfile

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
    for path, flag in ((args.json, "--json"), (args.plot, "--plot"), (args.markdown, "--markdown")):
        if path:
            check_output_path(path, flag)
    start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - start:6.1f} s] {msg}", file=sys.stderr, flush=True)

    with decode_attention(args.decode_attention):
        report = run(args, log)
    table = markdown(report)
    sys.stdout.write(table)
    sys.stdout.flush()
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table)
        log(f"wrote {args.markdown}")
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
    try:
        raise SystemExit(main())
    except DycokeError as exc:
        print(f"dycoke: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
