"""SDPA backends per phase, on the shapes a video LLM prefill and decoding step have.

The decoding loop picks the attention kernels per phase (generate.attention_backends): never
cuDNN, whose attention builds a new plan for every new key length (NOTES section 6); flash,
then memory-efficient, for prefill; memory-efficient for the masked static decoding step. This
measures each backend on each phase's shapes so the choice rests on figures:

* prefill, causal, no mask (a whole prompt): flash / efficient / cudnn / math;
* prefill chunk under an explicit mask (a 4096-query chunk after earlier chunks): efficient / math
  (flash takes no mask);
* a decoding step: one query (grouped heads packed, as transformers does) over the whole
  capacity under a length mask: efficient / cudnn / math; and, for reference, the unmasked
  exact-length step the eager loop runs (flash / efficient / cudnn), at a new key length each
  call, as decoding has.

Then the static decoding step's attention kernels side by side (issue 34): one query over a
capacity of 32, 64 and 128 frames of keys (196 tokens a frame) at the 0.5B and 7B head shapes:
``sdpa`` (the float mask, packed heads, the decode phase's backends: what the step runs by
default), ``matmul`` (compression/attention.matmul_decode_attention, two matmuls and a softmax
split over the keys: DYCOKE_DECODE_ATTENTION=matmul), and on CUDA ``varlen`` (torch's
flash varlen attention with ``seqused_k``, for reference: the step cannot take it yet). On
CUDA each is timed inside a CUDA graph (20 calls captured, replayed: what a replayed step
pays; "-" = it does not capture). The last line says which kernel the figures pick.
FlexAttention is left out: it needs torch.compile, and a block mask rebuilt for each length.
Finally, on CUDA, the kernels one static decoding step launches (torch profiler; the demo
model in bf16, DyCoke and none), per step and per layer.

Run on a GPU (seconds):  python benchmarks/bench_attention.py --arch 7b [--json out.json]
On a CPU (about a minute) the per-phase part runs tiny shapes (``--tokens 512``); the decode
kernels run at their real lengths.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

ARCHS = {"0.5b": (14, 2, 64), "7b": (28, 4, 128)}  # attention heads, KV heads, head dim (Qwen2)
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def timed(fn, repeat: int, device) -> float | None:
    """Median ms of ``fn`` over ``repeat`` calls after one warm-up; None if the backend refuses."""
    try:
        fn()
    except RuntimeError:
        return None
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    return sorted(times)[len(times) // 2]


def prefill_cases(heads, kv, d, tokens, chunk, dtype, device):
    q = torch.randn(1, heads, tokens, d, dtype=dtype, device=device)
    k = torch.randn(1, heads, tokens, d, dtype=dtype, device=device)  # repeat_kv'd, as transformers does
    whole = lambda: sdpa(q, k, k, is_causal=True)  # noqa: E731
    past = max(0, tokens - chunk)
    mask = torch.ones(chunk, tokens, dtype=torch.bool, device=device).tril(diagonal=past)[None, None]
    qc = q[:, :, past:]
    chunked = lambda: sdpa(qc, k, k, attn_mask=mask)  # noqa: E731
    return {"prefill causal": whole, f"prefill chunk {chunk} masked": chunked}


def decode_cases(heads, kv, d, tokens, dtype, device):
    capacity = tokens + 64
    q = torch.randn(1, kv, heads // kv, d, dtype=dtype, device=device)  # grouped heads packed as queries
    k = torch.randn(1, kv, capacity, d, dtype=dtype, device=device)
    mask = (torch.arange(capacity, device=device) <= tokens).view(1, 1, 1, -1)
    lengths = iter(range(tokens, tokens + 10**6))

    def exact():  # the eager loop: the key length grows by one every call
        n = next(lengths) % capacity + 1
        return sdpa(q, k[:, :, :n], k[:, :, :n])

    return {"decode static (masked capacity)": lambda: sdpa(q, k, k, attn_mask=mask),
            "decode eager (exact length, new each call)": exact}


FRAME_TOKENS = 196  # LLaVA-OneVision's tokens per frame
DECODE_FRAMES = (32, 64, 128)


def graph_timed(fn, repeat: int, device, calls: int = 20) -> float | None:
    """Median ms of one ``fn`` call replayed from a CUDA graph of ``calls`` calls (elsewhere:
    :func:`timed`); None when it fails or does not capture."""
    if device.type != "cuda":
        return timed(fn, repeat, device)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # warm-up off the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    except Exception:  # a kernel this torch or card refuses, or one that cannot be captured
        return None
    ms = timed(graph.replay, repeat, device)
    return None if ms is None else ms / calls


def decode_kernels(heads, kv, d, frames, dtype, device) -> dict:
    """The static step's attention candidates over ``frames`` frames of keys: name -> call."""
    from dycoke_cli.compression.attention import matmul_decode_attention
    from dycoke_cli.decoding.loop import attention_backends

    used = frames * FRAME_TOKENS + 100  # the video and some text
    capacity = used + 64
    query = torch.randn(1, heads, 1, d, dtype=dtype, device=device)
    packed = query.reshape(1, kv, heads // kv, d)
    k = torch.randn(1, kv, capacity, d, dtype=dtype, device=device)
    v = torch.randn_like(k)
    mask = torch.where(torch.arange(capacity, device=device) < used, 0.0, float("-inf")).to(dtype).view(1, 1, 1, -1)

    def masked_sdpa():
        with attention_backends(device, "decode"):
            return sdpa(packed, k, v, attn_mask=mask)

    cases = {"sdpa": masked_sdpa, "matmul": lambda: matmul_decode_attention(query, k, v, mask, d**-0.5)}
    if device.type == "cuda":
        cases["varlen"] = _varlen_case(query, k, v, used)
    return cases


def _varlen_case(query, k, v, used: int):
    from torch.nn.attention.varlen import varlen_attn

    device = query.device
    q = query[0].transpose(0, 1)  # [1, H, d]
    keys, values = k[0].transpose(0, 1), v[0].transpose(0, 1)  # [capacity, KVH, d]
    cu_q = torch.tensor([0, 1], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, keys.shape[0]], dtype=torch.int32, device=device)
    seqused = torch.tensor([used], dtype=torch.int32, device=device)
    return lambda: varlen_attn(q, keys, values, cu_q, cu_k, 1, keys.shape[0], enable_gqa=True, seqused_k=seqused)


def compare_decode_kernels(device, dtype, repeat: int) -> dict:
    """Prints one line per shape, the candidates side by side, then the pick."""
    table, totals = {}, {}
    for arch, (heads, kv, d) in ARCHS.items():
        for frames in DECODE_FRAMES:
            row = {name: graph_timed(fn, repeat, device)
                   for name, fn in decode_kernels(heads, kv, d, frames, dtype, device).items()}
            table[f"{arch} {frames} frames"] = row
            for name in ("sdpa", "matmul"):
                if row[name] is not None:
                    totals[name] = totals.get(name, 0.0) + row[name]
            print(f"decode {arch:5s} {frames:3d} frames ({frames * FRAME_TOKENS + 100:5d} keys)  "
                  + "  ".join(f"{n} {'-' if ms is None else f'{ms:.4f} ms'}" for n, ms in row.items())
                  + f"  matmul/sdpa {_ratio(row)}", flush=True)
    pick = min(totals, key=totals.get) if len(totals) == 2 else "sdpa"
    print(f"decode kernel these figures pick: {pick} (summed over the shapes: "
          + ", ".join(f"{n} {ms:.3f} ms" for n, ms in totals.items())
          + f"); the step runs sdpa unless DYCOKE_DECODE_ATTENTION=matmul ({device.type})", flush=True)
    return {"ms": table, "pick": pick}


def _ratio(row: dict) -> str:
    a, b = row.get("matmul"), row.get("sdpa")
    return "-" if a is None or b is None else f"{a / b:.2f}x"


def step_kernels(repeat_device) -> dict | None:
    """CUDA only: kernels one static decoding step launches (eager, profiled), per step and per
    layer, for DyCoke and none on the demo model in bf16."""
    if repeat_device.type != "cuda":
        print("kernels per static step: CUDA only (tests/test_step_cost.py counts the operations on the CPU)")
        return None
    from torch.profiler import ProfilerActivity, profile

    from dycoke_cli.compression.cache import PrunedKVCache
    from dycoke_cli.compression.selectors import DecodeSelector
    from dycoke_cli.decoding.loop import run_layers
    from dycoke_cli.decoding.prompt import build_embeds
    from dycoke_cli.decoding.static import StaticSteps
    from dycoke_cli.models.loader import load_model

    lm = load_model("demo", device="cuda", dtype="bfloat16")
    visual = torch.randn(8 * lm.tokens_per_frame, lm.hidden_size, device="cuda", dtype=torch.bfloat16)
    embeds, span = build_embeds(lm, "describe the video.", visual, None)
    seq, out = embeds.shape[1], {}
    for method in ("dycoke", "none"):
        sel = DecodeSelector(prune_from=lm.num_layers // 2, span=span, keep=9) if method == "dycoke" else None
        cache = PrunedKVCache(lm.num_layers, seq + 16, sel)
        with torch.inference_mode():
            token = run_layers(lm, embeds, torch.arange(seq, device="cuda")[None], cache, sel).argmax(dim=-1)
            steps = StaticSteps(lm, cache, sel, seq, 2, graph=False, greedy=True)
            steps(token)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                steps()
                torch.cuda.synchronize()
        kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        out[method] = kernels
        print(f"kernels per static step ({method}, demo model, {lm.num_layers} layers): {kernels}, "
              f"{kernels / lm.num_layers:.1f} per layer", flush=True)
    return out


def run(args) -> dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    heads, kv, d = ARCHS[args.arch]
    tokens = args.tokens or (25088 if device.type == "cuda" else 512)  # 128 frames x 196 tokens
    cases = {**prefill_cases(heads, kv, d, tokens, min(args.chunk, tokens), dtype, device),
             **decode_cases(heads, kv, d, tokens, dtype, device)}
    results = {}
    for case, fn in cases.items():
        for name, backend in BACKENDS.items():
            if device.type != "cuda" and name in ("flash", "efficient", "cudnn"):
                continue
            with sdpa_kernel([backend]):
                results.setdefault(case, {})[name] = timed(fn, args.repeat, device)
        print(f"{case:45s} " + "  ".join(f"{n} {'-' if ms is None else f'{ms:.3f} ms'}"
                                         for n, ms in results[case].items()), flush=True)
    decode = compare_decode_kernels(device, dtype, args.repeat)
    kernels = step_kernels(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    return {"device": name, "dtype": str(dtype), "arch": args.arch, "tokens": tokens, "ms": results,
            "decode_kernels": decode, "step_kernels": kernels, "date": time.strftime("%Y-%m-%d")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="7b", choices=list(ARCHS))
    p.add_argument("--tokens", type=int, default=0, help="prompt tokens (default 25088 on CUDA, 512 on a CPU)")
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", default="", help="write the figures here")
    args = p.parse_args(argv)
    out = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
