#!/usr/bin/env python
"""Many questions about one clip: what the session and the feature cache buy, measured side by
side in one run.

The LLaVA-OneVision-0.5B architecture (random weights, saved to a temporary folder as a user's
checkpoint would be) answers questions about a synthetic clip (a drifting disc, h264):

1. ``dycoke ask`` twice on the same clip, each in a fresh process with the same feature cache
   (empty at first), one token each: the second finds the clip's vision features on disk. Time
   to the first answer, model loading and imports included (the process's wall clock).
   The first of them asks two questions: one session, whose first answer reads and encodes the
   clip and prefills the prompt's prefix, and whose follow-up prefills only its own question.
   Time to the first token of each once the model is loaded (from the answers' own timings).
2. For every method: a session's answers to two questions against fresh single-question runs,
   token for token (4 frames, to keep the run short).

Targets (the issue): follow-up TTFT >= 20x sooner, a cache-hit ``ask`` >= 5x sooner, identical
tokens for every method.

    python benchmarks/bench_session.py                 # 32 frames, bf16 where the CPU has it
    python benchmarks/bench_session.py --quick         # scaled-down model: a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import dycoke_cli  # noqa: F401
except ImportError:  # a source checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent / "src"))

from bench_compression import FULL, QUICK, WORDS, synthetic_frames  # noqa: E402

QUESTIONS = ["describe the video in detail .", "what happens ?", "which color moves left ?"]


def save_model(arch, folder: Path, dtype: str) -> Path:
    """The architecture with random weights, saved in the Hugging Face layout."""
    import torch

    from dycoke_cli.testing.tiny import build_llava_onevision, build_word_tokenizer, save_checkpoint

    tok = build_word_tokenizer(WORDS)
    model = build_llava_onevision(tok, arch.spec, vocab_size=arch.vocab, dtype=getattr(torch, dtype))
    return save_checkpoint(model, tok, folder / "model", dycoke_defaults={"num_frames": 32})


def write_clip(path: Path, frames: int, size: int) -> Path:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "18"}
        for rgb in synthetic_frames(frames, size):
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def cli_ask(model: Path, clip: Path, frames: int, dtype: str, cache: Path, questions: list[str]) -> list[dict]:
    """`dycoke ask` with ``questions`` in a fresh process, one token each. Per answer: its --json
    line and the wall seconds from the process's start to that line (model loading and imports
    included)."""
    cmd = [sys.executable, "-m", "dycoke_cli", "ask", str(clip), *questions, "--model", str(model),
           "--frames", str(frames), "--dtype", dtype, "--max-new-tokens", "1", "--json", "--quiet"]
    env = {**os.environ, "DYCOKE_CACHE": str(cache), "PYTHONPATH": os.pathsep.join(sys.path)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    answers = [{**json.loads(line), "wall_s": time.perf_counter() - t0} for line in proc.stdout]
    if proc.wait() != 0 or len(answers) != len(questions):
        raise SystemExit(f"dycoke ask failed (exit {proc.returncode})")
    return answers


def to_first_token(answer: dict) -> float:
    """Seconds this answer took to its first token once the model was loaded: reading and
    encoding the clip (zero when a session had done it), then the prompt up to the token."""
    t = answer["stats"]["timings_s"]
    return t["read_video"] + t["encode"] + answer["stats"]["ttft_s"]


def same_tokens(lm, clip: Path, frames: int, tokens: int, cache: Path) -> dict[str, bool]:
    """Per method: a session's answers equal fresh single-question runs, token for token (the
    fresh runs take the vision features from the cache, and compute everything else again)."""
    from dycoke_cli.feature_cache import FeatureCache
    from dycoke_cli.options import CompressionOptions, Method, SamplingOptions
    from dycoke_cli.session import Session, ask

    sampling = SamplingOptions(max_new_tokens=tokens, ignore_eos=True)
    features = FeatureCache(cache)
    result = {}
    for method in Method:
        opts = CompressionOptions(method=method)
        session = Session(lm, clip, frames=frames, compression=opts, cache=features)
        result[method.value] = all(
            session.ask(q, sampling).token_ids == ask(lm, clip, q, frames=frames, compression=opts, sampling=sampling,
                                                      cache=features).token_ids for q in QUESTIONS[:2])
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="scaled-down model: a smoke test in seconds")
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--equality-frames", type=int, default=4, help="frames for the token-equality check")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: bf16 if the CPU has it")
    args = p.parse_args(argv)
    import torch

    from dycoke_cli.models.loader import cpu_supports_bf16, load_model

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    dtype = args.dtype or ("bfloat16" if cpu_supports_bf16() else "float32")
    arch = QUICK if args.quick else FULL
    log = lambda msg: print(f"[bench_session] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="dycoke-bench-session-") as tmp:
        tmp = Path(tmp)
        model = save_model(arch, tmp, dtype)
        clip = write_clip(tmp / "clip.mp4", max(args.frames, 48), arch.spec.image_size)
        log(f"saved {arch.name} ({dtype}) and a {max(args.frames, 48)}-frame clip")
        first = cli_ask(model, clip, args.frames, dtype, tmp / "cache", QUESTIONS[:2])
        log(f"dycoke ask, two questions: first answer at {first[0]['wall_s']:.1f} s, second at "
            f"{first[1]['wall_s']:.1f} s")
        hit = cli_ask(model, clip, args.frames, dtype, tmp / "cache", QUESTIONS[:1])
        log(f"dycoke ask again, features cached: first answer at {hit[0]['wall_s']:.1f} s")
        lm = load_model(str(model), device="cpu", dtype=dtype)
        equal = same_tokens(lm, clip, args.equality_frames, 8, tmp / "cache-equality")
    ttft_first, ttft_follow = to_first_token(first[0]), to_first_token(first[1])
    report = {
        "arch": arch.name, "dtype": dtype, "frames": args.frames, "threads": torch.get_num_threads(),
        "ask_first_s": first[0]["wall_s"], "ask_cache_hit_s": hit[0]["wall_s"],
        "ask_ratio": first[0]["wall_s"] / hit[0]["wall_s"],
        "same_answer_across_asks": first[0]["answer"] == hit[0]["answer"],
        "session_first_ttft_s": ttft_first, "session_follow_up_ttft_s": ttft_follow,
        "session_ratio": ttft_first / ttft_follow, "same_tokens_per_method": equal,
        "equality_frames": args.equality_frames,
    }
    print(markdown(report))
    print(json.dumps(report, indent=2))
    return 0


def markdown(r: dict) -> str:
    ok = lambda good: "met" if good else "MISSED"  # noqa: E731
    rows = [
        "| measure | first | then | ratio | target |",
        "|---|---:|---:|---:|---|",
        f"| `dycoke ask` to first token, loading included (cache hit) | {r['ask_first_s']:.1f} s | "
        f"{r['ask_cache_hit_s']:.1f} s | {r['ask_ratio']:.1f}x | >= 5x: {ok(r['ask_ratio'] >= 5)} |",
        f"| session: first question / follow-up, to first token | {r['session_first_ttft_s']:.2f} s | "
        f"{r['session_follow_up_ttft_s']:.3f} s | {r['session_ratio']:.0f}x | >= 20x: {ok(r['session_ratio'] >= 20)} |",
    ]
    same = ", ".join(f"{m} {'yes' if v else 'NO'}" for m, v in r["same_tokens_per_method"].items())
    return (f"{r['arch']}, {r['dtype']}, {r['frames']} frames, {r['threads']} threads\n\n" + "\n".join(rows)
            + f"\n\nsession tokens == fresh single-question tokens ({r['equality_frames']} frames, 2 questions): "
            + same + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
