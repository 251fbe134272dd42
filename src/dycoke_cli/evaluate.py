"""`dycoke compare` and `dycoke eval`: several methods over the same encoded frames.

Each video is decoded and encoded once; every method then answers from the same visual
tokens, in the order given, after one untimed warm-up run.
"""

from __future__ import annotations

import difflib
import json
import re
import string
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import DycokeError, UsageError
from .generate import SamplingOptions
from .pipeline import CompressionOptions, Method, Result, answer, encode_video

ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def parse_methods(text: str) -> list[Method]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    valid = ", ".join(m.value for m in Method)
    if not names:
        raise UsageError(f"--methods is empty (choose from {valid})")
    out = []
    for name in names:
        try:
            method = Method(name)
        except ValueError:
            raise UsageError(f"--methods: unknown method {name!r} (choose from {valid})") from None
        if method in out:
            raise UsageError(f"--methods: {name!r} is listed twice")
        out.append(method)
    return out


def normalize(text: str) -> list[str]:
    """Lowercase, strip punctuation and articles; return the words."""
    return [w for w in _PUNCT.sub(" ", text.lower()).split() if w not in ARTICLES]


def is_correct(prediction: str, reference: str) -> bool:
    """A one-word reference is right when it is the prediction's first content word; a longer
    one (a caption) must match exactly after normalisation."""
    ref, pred = normalize(reference), normalize(prediction)
    if len(ref) == 1:
        return bool(pred) and pred[0] == ref[0]
    return pred == ref


def word_diff(reference: str, other: str) -> list[tuple[str, bool]]:
    """``other``'s words, each flagged True when it differs from ``reference``."""
    a, b = reference.split(), other.split()
    flags = [True] * len(b)
    for block in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_matching_blocks():
        for j in range(block.b, block.b + block.size):
            flags[j] = False
    return list(zip(b, flags))


@dataclass
class Comparison:
    question: str
    frames: int
    results: list[Result] = field(default_factory=list)

    def rows(self) -> list[dict]:
        """One dict per method, ratios against the first method (the baseline)."""
        base = self.results[0].stats
        out = []
        for r in self.results:
            s = r.stats
            t = s["timings_s"]
            total = t["prefill"] + t["decode"]
            base_total = base["timings_s"]["prefill"] + base["timings_s"]["decode"]
            mem, base_mem = s.get("peak_memory_above_start_bytes"), base.get("peak_memory_above_start_bytes")
            out.append({
                "method": r.method,
                "answer": r.answer,
                "diff": [w for w, changed in word_diff(self.results[0].answer, r.answer) if changed],
                "visual_tokens_prefill": s["visual_tokens_prefill"],
                "visual_tokens_decode": s["visual_tokens_decode"],
                "overall_retention": s["overall_retention"],
                "prefill_s": t["prefill"],
                "ttft_s": s["ttft_s"],
                "decode_tokens_per_s": s["decode_tokens_per_s"],
                "llm_total_s": total,
                "tokens_generated": s["tokens_generated"],
                "peak_memory_above_start_bytes": mem,
                "speedup": base_total / total if total > 0 else None,
                "memory_ratio": (base_mem / mem) if mem and base_mem else None,
                "flops_ratio_estimate": s["flops_ratio_estimate"],
            })
        return out


def compare(lm, video_path, question: str | None, methods: list[Method], frames: int,
            base: CompressionOptions, sampling: SamplingOptions, listener=None, timeout_s: float = 60.0) -> Comparison:
    """Run every method on the same encoded frames; the first is the baseline of the ratios."""
    question = question or lm.defaults.caption_prompt
    enc = encode_video(lm, video_path, frames, listener, timeout_s=timeout_s)
    # Warm-up: one short untimed run so the first timed method pays no one-off costs.
    answer(lm, enc, question, CompressionOptions(method=Method.none), SamplingOptions(max_new_tokens=2))
    comp = Comparison(question, enc.frames)
    for method in methods:
        if listener:
            listener.stage(f"running {method.value}")
        opts = replace(base, method=method)
        comp.results.append(answer(lm, enc, question, opts, sampling))
    return comp


@dataclass
class EvalItem:
    video: str
    question: str
    answer: str
    kind: str | None


def read_qa(path: Path) -> list[EvalItem]:
    if not path.is_file():
        raise DycokeError(f"{path}: no such file")
    items = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            items.append(EvalItem(str(obj["video"]), str(obj["question"]), str(obj["answer"]), obj.get("kind")))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DycokeError(f"{path}:{lineno}: not a QA line ({type(exc).__name__}: needs video, question, answer)") from None
    if not items:
        raise DycokeError(f"{path}: no QA lines")
    return items


def evaluate(lm, qa_path: Path, methods: list[Method], frames: int, base: CompressionOptions,
             sampling: SamplingOptions, progress=None, timeout_s: float = 60.0) -> dict:
    """Accuracy per method (and per kind), mean retention and time. ``progress(done, total)``."""
    items = read_qa(qa_path)
    by_video: dict[str, list[EvalItem]] = {}
    for item in items:
        by_video.setdefault(item.video, []).append(item)
    records = []
    done, total = 0, len(items) * len(methods)
    for video, group in by_video.items():
        enc = encode_video(lm, qa_path.parent / video, frames, timeout_s=timeout_s)
        for method in methods:
            opts = replace(base, method=method)
            for item in group:
                r = answer(lm, enc, item.question, opts, sampling)
                t = r.stats["timings_s"]
                records.append({
                    "method": method.value, "video": item.video, "question": item.question, "answer": item.answer,
                    "kind": item.kind, "prediction": r.answer, "correct": is_correct(r.answer, item.answer),
                    "retention": r.stats["overall_retention"], "llm_s": t["prefill"] + t["decode"],
                })
                done += 1
                if progress:
                    progress(done, total)
    return {"summary": summarize(records, methods), "items": records}


def summarize(records: list[dict], methods: list[Method]) -> dict:
    out = {}
    kinds = sorted({r["kind"] for r in records if r["kind"]})
    for method in methods:
        rs = [r for r in records if r["method"] == method.value]
        entry = {
            "n": len(rs),
            "accuracy": sum(r["correct"] for r in rs) / len(rs),
            "mean_retention": sum(r["retention"] for r in rs) / len(rs),
            "mean_llm_s": sum(r["llm_s"] for r in rs) / len(rs),
        }
        if kinds:
            entry["by_kind"] = {
                k: sum(r["correct"] for r in rs if r["kind"] == k) / max(1, sum(r["kind"] == k for r in rs))
                for k in kinds
            }
        out[method.value] = entry
    return out
