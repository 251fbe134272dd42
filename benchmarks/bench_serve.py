"""`dycoke serve` against the in-process answer, side by side in one run (demo model, CPU).

1. Server overhead: time to first token (TTFT) of a streamed request to a real `dycoke serve`
   process (``--sessions 0 --no-cache``: every request reads, encodes and prefills afresh)
   against the same first answer in process (a new Session, no feature cache), alternating.
   The client is plain http.client, timing from the request to the first content chunk.
2. Follow-up turns: on a server that keeps sessions (``--no-cache``), the first turn about each
   sample clip against its second turn (the earlier turns in ``messages``), which reuses the
   session's encoded video and prefix KV.

    .venv/bin/python benchmarks/bench_serve.py [--reps 15]
    .venv/bin/python benchmarks/bench_serve.py --model FOLDER --frames 32 --max-tokens 2 --reps 1
        # a larger checkpoint (e.g. the LLaVA-OV-0.5B architecture saved with random weights)

Prints medians and the ratios; absolute times depend on the machine, the ratios are the result.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_videos"
QUESTION = "Describe this video in detail."
FOLLOW_UP = "which way does it move?"


MODEL = "demo"  # --model: what the server loads and the in-process side too
EXTRA: dict = {}  # request fields every request carries (--max-tokens, --frames)


class Server:
    def __init__(self, *args: str):
        self.err = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "dycoke_cli", "serve", "--model", MODEL, "--port", "0",
                                      "--allowed-local-media-path", str(SAMPLES), *args],
                                     stdout=subprocess.DEVNULL, stderr=self.err)
        while "(Ctrl-C stops)" not in Path(self.err.name).read_text():
            if self.proc.poll() is not None:
                raise SystemExit(Path(self.err.name).read_text())
            time.sleep(0.05)
        line = next(x for x in Path(self.err.name).read_text().splitlines() if " at http://" in x)
        self.host, self.port = line.split("http://")[1].split("/")[0].rsplit(":", 1)

    def ttft(self, messages: list[dict], **extra) -> tuple[float, str]:
        """Seconds to the first content chunk, and the whole answer."""
        from dycoke_cli.server.service import served_name

        body = json.dumps({"model": served_name(MODEL), "stream": True, "messages": messages, **EXTRA, **extra})
        conn = http.client.HTTPConnection(self.host, int(self.port), timeout=600)
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        first, text = None, ""
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            content = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
            if content:
                first = first if first is not None else time.perf_counter() - t0
                text += content
        conn.close()
        return first, text

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        os.unlink(self.err.name)


def turn(name: str, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"file://{SAMPLES / name}"}},
                                         {"type": "text", "text": question}]}]


def in_process_ttft(lm, name: str) -> tuple[float, str]:
    from dycoke_cli import Session
    from dycoke_cli.results import Done, Token

    t0 = time.perf_counter()
    first, text = None, ""
    from dycoke_cli.options import SamplingOptions

    sampling = SamplingOptions(max_new_tokens=EXTRA.get("max_tokens", SamplingOptions.max_new_tokens),
                               ignore_eos=EXTRA.get("ignore_eos", False))
    frames = EXTRA.get("dycoke", {}).get("frames")
    for event in Session(lm, SAMPLES / name, frames=frames).stream(QUESTION, sampling):
        if isinstance(event, Token) and first is None:
            first = time.perf_counter() - t0
        if isinstance(event, Done):
            text = event.answer.text
    return first, text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--model", default="demo", help="model folder (default: the demo model)")
    parser.add_argument("--frames", type=int, default=None, help="frames per clip (default: the model's)")
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens per answer (default: the model's 256)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="always generate --max-tokens (a random-weight checkpoint may end at once)")
    args = parser.parse_args(argv)
    global MODEL
    MODEL = args.model
    if args.max_tokens is not None:
        EXTRA["max_tokens"] = args.max_tokens
    if args.frames is not None:
        EXTRA["dycoke"] = {"frames": args.frames}
    if args.ignore_eos:
        EXTRA["ignore_eos"] = True
    from dycoke_cli import load_model

    clips = sorted(p.name for p in SAMPLES.glob("*.mp4"))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; model {MODEL}; "
          f"{args.reps} repetitions; {time.strftime('%Y-%m-%d')}")

    lm = load_model(MODEL)
    fresh = Server("--sessions", "0", "--no-cache")
    try:
        inproc, served = [], []
        for i in range(args.reps + 1):  # the first pair warms up both sides
            name = clips[i % len(clips)]
            a, text_a = in_process_ttft(lm, name)
            b, text_b = fresh.ttft(turn(name, QUESTION))
            assert text_a == text_b, (text_a, text_b)
            if i:
                inproc.append(a)
                served.append(b)
    finally:
        fresh.stop()
    med_in, med_srv = statistics.median(inproc), statistics.median(served)
    print(f"\n1. first answer, TTFT median: in process {med_in * 1000:.1f} ms, through the server "
          f"{med_srv * 1000:.1f} ms: overhead {med_srv - med_in:+.4f} s = {(med_srv / med_in - 1) * 100:+.1f} % "
          f"(server / in process {med_srv / med_in:.3f})")

    kept = Server("--no-cache")
    try:
        kept.ttft(turn(clips[0], QUESTION))  # warm-up
        firsts, follows = [], []
        for i in range(args.reps):
            name = clips[(i + 1) % len(clips)]
            # a frame count not seen before: a new session each round
            frames = (args.frames or 4) + (i // len(clips))
            messages, pick = turn(name, QUESTION), {"dycoke": {"frames": frames}}
            t1, answer = kept.ttft(messages, **pick)
            t2, _ = kept.ttft([*messages, {"role": "assistant", "content": answer},
                               {"role": "user", "content": FOLLOW_UP}], **pick)
            firsts.append(t1)
            follows.append(t2)
    finally:
        kept.stop()
    med_1, med_2 = statistics.median(firsts), statistics.median(follows)
    print(f"2. conversation, TTFT median: first turn {med_1 * 1000:.1f} ms, follow-up turn {med_2 * 1000:.1f} ms: "
          f"follow-up {med_1 / med_2:.1f}x sooner")
    return 0


if __name__ == "__main__":
    sys.exit(main())
