"""`dycoke compare` and `dycoke eval`: several methods over the same encoded frames.

Each video is decoded and encoded once; every method then answers from the same visual
tokens, in the order given, after one untimed warm-up run.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import string
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import NormalDist

from .decoding.static import KeptSteps
from .errors import DycokeError, UsageError
from .feature_cache import FeatureCache
from .options import CompressionOptions, Method, SamplingOptions, Selection
from .pipeline import answer, encode_video
from .results import Answer, EncodedVideo

ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


@dataclass(frozen=True)
class MethodChoice:
    """One entry of ``--methods``: a method, or a named variant of one (``value`` names it in
    tables and JSON). ``dycoke-topk`` is DyCoke with the paper's decode-time selection, to set
    beside our default (coverage) on request."""

    value: str
    method: Method
    overrides: tuple[tuple[str, object], ...] = ()

    @classmethod
    def of(cls, method: Method) -> "MethodChoice":
        return cls(Method(method).value, Method(method))

    def options(self, base: CompressionOptions) -> CompressionOptions:
        return replace(base, method=self.method, **dict(self.overrides))


VARIANTS = {"dycoke-topk": MethodChoice("dycoke-topk", Method.dycoke, (("selection", Selection.topk),))}


def choices(methods) -> list[MethodChoice]:
    """Methods or choices -> choices (a plain Method is its own choice)."""
    return [m if isinstance(m, MethodChoice) else MethodChoice.of(m) for m in methods]


def parse_methods(text: str) -> list[MethodChoice]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    valid = ", ".join([*(m.value for m in Method), *VARIANTS])
    if not names:
        raise UsageError(f"--methods is empty (choose from {valid})")
    out = []
    for name in names:
        if name in VARIANTS:
            choice = VARIANTS[name]
        else:
            try:
                choice = MethodChoice.of(Method(name))
            except ValueError:
                raise UsageError(f"--methods: unknown method {name!r} (choose from {valid})") from None
        if choice in out:
            raise UsageError(f"--methods: {name!r} is listed twice")
        out.append(choice)
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


def compare(lm, enc: EncodedVideo, question: str | None, methods: list[MethodChoice], base: CompressionOptions,
            sampling: SamplingOptions) -> Comparison:
    """Run every method on the same encoded frames; the first is the baseline of the ratios.

    Like with like: every method prefills its whole prompt (no prefix is reused, whatever a chat
    session keeps), and every method has run once, untimed, in this process before it is timed,
    so none pays one-off costs (first calls of its kernels and code paths) that another paid
    earlier. In a chat, a method already warmed by an earlier comparison is not warmed again."""
    question = question or lm.defaults.caption_prompt
    chosen = list(choices(methods))
    for choice in chosen:
        _warm(lm, enc, question, choice.options(base))
    comp = Comparison(question, enc.frames)
    for choice in chosen:
        comp.results.append(replace(answer(lm, enc, question, choice.options(base), sampling), method=choice.value))
    return comp


_WARMED: set[tuple[int, CompressionOptions]] = set()


def _warm(lm, enc: EncodedVideo, question: str, opts: CompressionOptions) -> None:
    """One short untimed run of a method, once per model and options in this process."""
    key = (id(lm), opts)
    if key not in _WARMED:
        answer(lm, enc, question, opts, SamplingOptions(max_new_tokens=2))
        _WARMED.add(key)


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


def evaluate(lm, qa_path: Path, methods: list[MethodChoice], frames: int | None, base: CompressionOptions,
             sampling: SamplingOptions, progress=None, timeout_s: float = 60.0,
             items: list[EvalItem] | None = None, cache: FeatureCache | None = None, shard=None) -> dict | None:
    """Accuracy per method (and per kind), mean retention and time. ``progress(done, total)``.

    A clip that cannot be read, or an answer that fails (a question too long for the context),
    is skipped and listed under ``failures`` (the summary counts them); the rest of the set is
    still evaluated.

    With a ``shard`` (distributed.Shard), this process evaluates only the clips the shard owns
    (a clip's questions stay together, so it is encoded once), and the report, the same as one
    process would make, is returned on rank 0; the other ranks return None."""
    items = items if items is not None else read_qa(qa_path)
    by_video: dict[str, list[EvalItem]] = {}
    for item in items:
        by_video.setdefault(item.video, []).append(item)
    mine = [(i, video, group) for i, (video, group) in enumerate(by_video.items()) if shard is None or shard.owns(i)]
    total = sum(len(group) for _, _, group in mine) * len(methods)
    done = 0

    def count(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    outcomes = [(i, *_evaluate_clip(lm, qa_path.parent / video, video, group, methods, frames, base, sampling,
                                    timeout_s, cache, count))
                for i, video, group in mine]
    if shard is not None:
        gathered = shard.gather(outcomes)
        if gathered is None:
            return None
        outcomes = sorted((o for rank in gathered for o in rank), key=lambda o: o[0])  # the QA file's clip order
    records = [r for _, rs, _ in outcomes for r in rs]
    failures = [f for _, _, fs in outcomes for f in fs]
    return {"summary": summarize(records, methods, failures), "items": records, "failures": failures,
            "statistics": STATISTICS_NOTE}


def _evaluate_clip(lm, path: Path, video: str, group: list[EvalItem], methods: list[MethodChoice], frames: int | None,
                   base: CompressionOptions, sampling: SamplingOptions, timeout_s: float,
                   cache: FeatureCache | None, count) -> tuple[list[dict], list[dict]]:
    """Every method on every question about one clip, the clip encoded once: (records, failures)."""
    records, failures = [], []
    try:
        enc = encode_video(lm, path, frames or lm.default_frames(path), timeout_s=timeout_s, cache=cache)
    except DycokeError as exc:  # unreadable clip, frames that do not fit, a model-specific refusal
        count(len(group) * len(methods))
        return records, [{"video": video, "questions": len(group), "error": str(exc)}]
    for choice in choices(methods):
        opts = choice.options(base)
        kept = KeptSteps()  # static decoding: one step (a CUDA graph) for this method's questions
        for item in group:
            try:
                records.append(_score(lm, enc, item, choice.value, opts, sampling, kept))
            except DycokeError as exc:  # e.g. this question does not fit the context
                failures.append({"video": video, "questions": 1, "method": choice.value, "error": str(exc)})
            count(1)
    return records, failures


def _score(lm, enc, item: EvalItem, label: str, opts: CompressionOptions, sampling: SamplingOptions,
           kept=None) -> dict:
    r = answer(lm, enc, item.question, opts, sampling, kept=kept)
    return {
        "method": label, "video": item.video, "question": item.question, "answer": item.answer,
        "kind": item.kind, "prediction": r.text, "correct": is_correct(r.text, item.answer),
        "retention": r.stats.overall_retention, "llm_s": r.stats.timings.prefill + r.stats.timings.decode,
    }


def summarize(records: list[dict], methods: list[MethodChoice], failures: list[dict] = ()) -> dict:
    """Per method: answers scored, accuracy over them with its 95 % Wilson interval, and the
    questions skipped (a clip that could not be read counts for every method, a failed answer
    for its own). Every method after the first also gets ``vs_first``: a paired comparison with
    the first method on the questions both answered (McNemar's exact test)."""
    out = {}

    kinds = sorted({r["kind"] for r in records if r["kind"]})
    for method in methods:
        rs = [r for r in records if r["method"] == method.value]
        n = max(len(rs), 1)
        correct = sum(r["correct"] for r in rs)
        entry = {
            "n": len(rs),
            "skipped": sum(f["questions"] for f in failures if f.get("method") in (None, method.value)),
            "accuracy": correct / n,
            "mean_retention": sum(r["retention"] for r in rs) / n,
            "mean_llm_s": sum(r["llm_s"] for r in rs) / n,
            "correct": correct,
            "ci95": wilson_interval(correct, len(rs)),
        }
        if kinds:
            entry["by_kind"] = {
                k: sum(r["correct"] for r in rs if r["kind"] == k) / max(1, sum(r["kind"] == k for r in rs))
                for k in kinds
            }
        if method != methods[0]:
            entry["vs_first"] = paired_comparison(records, methods[0].value, method.value)
        out[method.value] = entry
    return out


# -------------------------------------------------------------------------------- statistics

CONFIDENCE = 0.95
SIGNIFICANCE = 0.05
STATISTICS_NOTE = {
    "interval": "Wilson score interval, 95 %",
    "paired_test": "McNemar's exact test (two-sided binomial on the discordant pairs) against the first method",
    "significance_level": SIGNIFICANCE,
}


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> list[float] | None:
    """The Wilson score interval ``[low, high]`` of a proportion ``successes / n`` (None when
    ``n`` is 0). Unlike the normal approximation it stays inside [0, 1] and is not empty at 0
    or n successes."""
    if n <= 0:
        return None
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact at the ends, not 1e-17 off
    high = 1.0 if successes == n else min(1.0, centre + half)
    return [low, high]


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided p-value of McNemar's exact test: ``b`` and ``c`` are the discordant pairs (only
    the first method right; only the second right). Under the null hypothesis each discordant
    pair falls either way with probability 1/2, so the p-value is twice the binomial tail of the
    smaller count, at most 1 (1 when there is no discordant pair)."""
    n = b + c
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def paired_comparison(records: list[dict], first: str, other: str) -> dict:
    """``other`` against ``first`` on the questions both answered (the same QA line: a question
    asked twice about a clip pairs by its occurrence)."""
    a, b = _outcomes(records, first), _outcomes(records, other)
    keys = [k for k in a if k in b]
    only_first = sum(a[k] and not b[k] for k in keys)
    only_other = sum(b[k] and not a[k] for k in keys)
    p = mcnemar_exact(only_first, only_other)
    return {
        "baseline": first,
        "pairs": len(keys),
        "both_right": sum(a[k] and b[k] for k in keys),
        "only_baseline_right": only_first,
        "only_this_right": only_other,
        "difference": (only_other - only_first) / len(keys) if keys else 0.0,
        "p_value": p,
        "significant": p < SIGNIFICANCE,
    }


def _outcomes(records: list[dict], method: str) -> dict[tuple, bool]:
    """Whether each question was answered right by ``method``, keyed by (video, question,
    occurrence)."""
    seen: dict[tuple, int] = {}
    out = {}
    for r in records:
        if r["method"] == method:
            key = (r["video"], r["question"])
            seen[key] = seen.get(key, -1) + 1
            out[(*key, seen[key])] = bool(r["correct"])
    return out
