"""`dycoke eval`: a QA file (JSON lines) answered by several methods, scored, and summed up.

Each clip is decoded and encoded once, and every method answers its questions from the same
visual tokens.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from pathlib import Path

from ..decoding.static import KeptSteps
from ..errors import DycokeError
from ..feature_cache import FeatureCache
from ..options import CompressionOptions, SamplingOptions
from ..pipeline import answer, encode_video
from .methods import MethodChoice, choices
from .stats import STATISTICS_NOTE, summarize

ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


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
