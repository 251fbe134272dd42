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

Run on a GPU (seconds):  python benchmarks/bench_attention.py --arch 7b [--json out.json]
On a CPU it runs tiny shapes (``--tokens 512``), a smoke test of the script only.
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
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    return {"device": name, "dtype": str(dtype), "arch": args.arch, "tokens": tokens, "ms": results,
            "date": time.strftime("%Y-%m-%d")}


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
