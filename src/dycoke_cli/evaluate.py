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
from .feature_cache import FeatureCache
from .options import CompressionOptions, Method, SamplingOptions
from .pipeline import answer, encode_video
from .results import Answer, EncodedVideo

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
    results: list[Answer] = field(default_factory=list)

    def rows(self) -> list[dict]:
        """One dict per method, ratios against the first method (the baseline)."""
        base = self.results[0]
        base_total = base.stats.timings.prefill + base.stats.timings.decode
        base_mem = base.stats.peak_memory_above_start_bytes
        out = []
        for r in self.results:
            s = r.stats
            total = s.timings.prefill + s.timings.decode
            mem = s.peak_memory_above_start_bytes
            out.append({
                "method": r.method,
                "answer": r.text,
                "diff": [w for w, changed in word_diff(base.text, r.text) if changed],
                "visual_tokens_prefill": s.visual_tokens_prefill,
                "visual_tokens_decode": s.visual_tokens_decode,
                "overall_retention": s.overall_retention,
                "prefill_s": s.timings.prefill,
                "ttft_s": s.ttft_s,
                "decode_tokens_per_s": s.decode_tokens_per_s,
                "llm_total_s": total,
                "tokens_generated": s.tokens_generated,
                "peak_memory_above_start_bytes": mem,
                "speedup": base_total / total if total > 0 else None,
                "memory_ratio": (base_mem / mem) if mem and base_mem else None,
                "flops_ratio_estimate": s.flops_ratio_estimate,
                "decode_path": s.decode_path,
            })
        return out


def compare(lm, enc: EncodedVideo, question: str | None, methods: list[Method], base: CompressionOptions,
            sampling: SamplingOptions) -> Comparison:
    """Run every method on the same encoded frames; the first is the baseline of the ratios."""
    question = question or lm.defaults.caption_prompt
    # Warm-up: one short untimed run so the first timed method pays no one-off costs.
    answer(lm, enc, question, CompressionOptions(method=Method.none), SamplingOptions(max_new_tokens=2))
    comp = Comparison(question, enc.frames)
    for method in methods:
        comp.results.append(answer(lm, enc, question, replace(base, method=method), sampling))
    return comp


@dataclass
class EvalItem:
    video: str
    question: str
    answer: str
    kind: str | None


QA_FIELDS = ("video", "question", "answer")


def read_qa(path: Path) -> list[EvalItem]:
    """Read a QA file: UTF-8 JSON lines (a BOM and CRLF line ends are fine), each an object with
    string fields video, question, answer and an optional string kind. A bad line is a one-line
    error naming it."""
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise DycokeError(f"{path}: is a directory, not a QA file") from None
    except FileNotFoundError:
        raise DycokeError(f"{path}: no such file") from None
    except OSError as exc:
        raise DycokeError(f"{path}: cannot read ({exc.strerror or exc})") from None
    items = []
    for lineno, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").splitlines(), 1):
        if raw.strip():
            items.append(_qa_item(raw, f"{path}:{lineno}"))
    if not items:
        raise DycokeError(f"{path}: no QA lines")
    return items


def _qa_item(raw: bytes, where: str) -> EvalItem:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise DycokeError(f"{where}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise DycokeError(f"{where}: not a JSON object ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise DycokeError(f"{where}: not a JSON object (needs {', '.join(QA_FIELDS)})")
    missing = [k for k in QA_FIELDS if k not in obj]
    if missing:
        raise DycokeError(f"{where}: missing {', '.join(missing)}")
    wrong = [k for k in (*QA_FIELDS, "kind") if k in obj and not isinstance(obj[k], str)
             and not (k == "kind" and obj[k] is None)]
    if wrong:
        raise DycokeError(f"{where}: {', '.join(wrong)} must be text (got {type(obj[wrong[0]]).__name__})")
    if not obj["video"].strip() or not obj["question"].strip():
        raise DycokeError(f"{where}: empty {'video' if not obj['video'].strip() else 'question'}")
    return EvalItem(obj["video"], obj["question"], obj["answer"], obj.get("kind"))


def evaluate(lm, qa_path: Path, methods: list[Method], frames: int | None, base: CompressionOptions,
             sampling: SamplingOptions, progress=None, timeout_s: float = 60.0,
             items: list[EvalItem] | None = None, cache: FeatureCache | None = None) -> dict:
    """Accuracy per method (and per kind), mean retention and time. ``progress(done, total)``.

    A clip that cannot be read, or an answer that fails (a question too long for the context),
    is skipped and listed under ``failures`` (the summary counts them); the rest of the set is
    still evaluated."""
    items = items if items is not None else read_qa(qa_path)
    by_video: dict[str, list[EvalItem]] = {}
    for item in items:
        by_video.setdefault(item.video, []).append(item)
    records, failures = [], []
    done, total = 0, len(items) * len(methods)
    for video, group in by_video.items():
        try:
            path = qa_path.parent / video
            enc = encode_video(lm, path, frames or lm.default_frames(path), timeout_s=timeout_s, cache=cache)
        except DycokeError as exc:  # unreadable clip, frames that do not fit, a model-specific refusal
            failures.append({"video": video, "questions": len(group), "error": str(exc)})
            done += len(group) * len(methods)
            continue
        for method in methods:
            opts = replace(base, method=method)
            for item in group:
                try:
                    records.append(_score(lm, enc, item, opts, sampling))
                except DycokeError as exc:  # e.g. this question does not fit the context
                    failures.append({"video": video, "questions": 1, "method": method.value, "error": str(exc)})
                done += 1
                if progress:
                    progress(done, total)
    return {"summary": summarize(records, methods, failures), "items": records, "failures": failures}


def _score(lm, enc, item: EvalItem, opts: CompressionOptions, sampling: SamplingOptions) -> dict:
    r = answer(lm, enc, item.question, opts, sampling)
    return {
        "method": r.method, "video": item.video, "question": item.question, "answer": item.answer,
        "kind": item.kind, "prediction": r.text, "correct": is_correct(r.text, item.answer),
        "retention": r.stats.overall_retention, "llm_s": r.stats.timings.prefill + r.stats.timings.decode,
    }


def summarize(records: list[dict], methods: list[Method], failures: list[dict] = ()) -> dict:
    """Per method: answers scored, accuracy over them, and the questions skipped (a clip that
    could not be read counts for every method, a failed answer for its own)."""
    out = {}

    kinds = sorted({r["kind"] for r in records if r["kind"]})
    for method in methods:
        rs = [r for r in records if r["method"] == method.value]
        n = max(len(rs), 1)
        entry = {
            "n": len(rs),
            "skipped": sum(f["questions"] for f in failures if f.get("method") in (None, method.value)),
            "accuracy": sum(r["correct"] for r in rs) / n,
            "mean_retention": sum(r["retention"] for r in rs) / n,
            "mean_llm_s": sum(r["llm_s"] for r in rs) / n,
        }
        if kinds:
            entry["by_kind"] = {
                k: sum(r["correct"] for r in rs if r["kind"] == k) / max(1, sum(r["kind"] == k for r in rs))
                for k in kinds
            }
        out[method.value] = entry
    return out
