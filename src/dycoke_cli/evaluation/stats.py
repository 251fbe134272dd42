"""The statistics of an evaluation: accuracy per method with its Wilson interval, and a paired
test (McNemar's exact) of every method against the first."""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .methods import MethodChoice

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
