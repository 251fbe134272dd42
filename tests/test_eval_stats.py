"""`dycoke eval`'s error bars: Wilson intervals and McNemar's exact test, checked against
figures worked out by hand, then end to end with the demo model on the sample clips."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_cli import run_cli

from dycoke_cli.evaluation.stats import mcnemar_exact, paired_comparison, summarize, wilson_interval
from dycoke_cli.options import Method

SAMPLES = Path(__file__).resolve().parents[1] / "sample_videos"

# z = 1.959963985 (the normal quantile at 0.975), z^2 = 3.841458821.
# Wilson: centre = (p + z^2/2n) / (1 + z^2/n), half = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2).
#  0/10: p = 0: centre = half = (z^2/20) / (1 + z^2/10) -> [0, z^2 / (10 + z^2)] = [0, 3.841459/13.841459]
# 10/10: the mirror image: [10 / (10 + z^2), 1] = [10/13.841459, 1]
#  5/10: centre 0.5, half = 1.959964/1.3841459 * sqrt(0.025 + 0.0096036) = 1.4160097 * 0.1860206 = 0.2634069
Z2 = 3.841458821


@pytest.mark.parametrize("k, n, expected", [
    (0, 10, (0.0, Z2 / (10 + Z2))),            # (0, 0.277533)
    (10, 10, (10 / (10 + Z2), 1.0)),           # (0.722467, 1)
    (5, 10, (0.5 - 0.2634069, 0.5 + 0.2634069)),  # (0.236593, 0.763407)
    (1, 1, (1 / (1 + Z2), 1.0)),               # (0.206549, 1)
])
def test_wilson_interval_matches_hand_figures(k, n, expected):
    low, high = wilson_interval(k, n)
    assert (low, high) == pytest.approx(expected, abs=1e-6)


def test_wilson_interval_ends_are_exact_and_empty_sets_have_none():
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) is None
    # 300 questions at 98.8 %: the interval is about 3 points wide, so half a point is inside it
    low, high = wilson_interval(296, 300)
    assert low < 0.987 - 0.005 and high > 0.987 + 0.005


@pytest.mark.parametrize("b, c, expected", [
    (10, 0, 2 / 1024),            # 2 * C(10,0) / 2^10 = 0.001953125
    (0, 10, 2 / 1024),            # symmetric
    (3, 1, 2 * (1 + 4) / 16),     # 2 * (C(4,0) + C(4,1)) / 2^4 = 0.625
    (6, 1, 2 * (1 + 7) / 128),    # 2 * (1 + 7) / 2^7 = 0.125
    (5, 5, 1.0),                  # 2 * 638/1024 > 1: capped at 1
    (0, 0, 1.0),                  # no discordant pair: no evidence either way
    (1, 0, 1.0),                  # 2 * 1/2 = 1
])
def test_mcnemar_exact_matches_hand_figures(b, c, expected):
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_exact_handles_hundreds_of_pairs():
    # 60 against 40 discordant pairs: 2 * sum_{i<=40} C(100,i) / 2^100, summed exactly here
    exact = 2 * sum(math.comb(100, i) for i in range(41)) / 2**100
    assert mcnemar_exact(60, 40) == pytest.approx(exact, rel=1e-12)
    assert 0.05 < exact < 0.06  # 20 points apart on 100 discordant pairs is not yet significant


def _records(method: str, outcomes: list[bool], video: str = "a.mp4") -> list[dict]:
    return [{"method": method, "video": video, "question": f"q{i}", "answer": "x", "kind": "k",
             "prediction": "x" if ok else "y", "correct": ok, "retention": 1.0, "llm_s": 0.1}
            for i, ok in enumerate(outcomes)]


def test_half_a_point_over_300_questions_reads_as_noise():
    # none right on 296 of 300, dycoke on 294 (0.67 points apart): 3 questions only none gets,
    # 1 only dycoke gets -> p = 2 * (C(4,0) + C(4,1)) / 2^4 = 0.625
    none = [True] * 296 + [False] * 4
    dycoke = list(none)
    for i in (0, 1, 2):
        dycoke[i] = False
    dycoke[296] = True
    records = _records("none", none) + _records("dycoke", dycoke)
    summary = summarize(records, [Method.none, Method.dycoke])
    assert "vs_first" not in summary["none"]
    assert summary["none"]["correct"] == 296 and summary["dycoke"]["correct"] == 294
    assert summary["none"]["ci95"] == wilson_interval(296, 300)
    assert summary["dycoke"]["vs_first"] == {
        "baseline": "none", "pairs": 300, "both_right": 293, "only_baseline_right": 3, "only_this_right": 1,
        "difference": -2 / 300, "p_value": 0.625, "significant": False}

    from rich.console import Console

    from dycoke_cli.cli.display import comparison_lines, eval_table

    console = Console(width=200)
    with console.capture() as captured:
        console.print(eval_table(summary))
    row = next(x for x in captured.get().splitlines() if "vs none" in x)
    assert "baseline" in row and "-0.7 pts, not significant (p = 0.625)" in row
    assert comparison_lines(summary)[0] == (
        "dycoke vs none: -0.7 points on 300 paired questions (3 right only with none, 1 only with dycoke), "
        "not significant (p = 0.625)")


def test_pairs_are_the_questions_both_methods_answered():
    # a question asked twice about a clip pairs by occurrence; a question one method failed on
    # (missing from its records) is left out of the pairs
    base = _records("none", [True, False]) + _records("none", [True], video="b.mp4")
    base[1]["question"] = "q0"  # the same question twice about a.mp4
    other = _records("random", [False, True])
    other[1]["question"] = "q0"
    paired = paired_comparison(base + other, "none", "random")
    assert (paired["pairs"], paired["only_baseline_right"], paired["only_this_right"]) == (2, 1, 1)
    assert paired["p_value"] == 1.0 and paired["difference"] == 0.0


def test_a_clear_difference_is_significant():
    records = _records("none", [True] * 10) + _records("random", [False] * 10)
    paired = summarize(records, [Method.none, Method.random])["random"]["vs_first"]
    assert (paired["p_value"], paired["significant"], paired["difference"]) == (2 / 1024, True, -1.0)


# -- end to end: the demo model on two sample clips ---------------------------------------------


@pytest.fixture(scope="module")
def small_qa(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qa")
    lines = [json.loads(x) for x in (SAMPLES / "qa.jsonl").read_text().splitlines()]
    chosen = [x for x in lines if x["video"] in ("red_cup.mp4", "green_ball_up.mp4") and x["kind"] != "caption"]
    for x in chosen:
        x["video"] = str(SAMPLES / x["video"])
    qa = folder / "qa.jsonl"
    qa.write_text("".join(json.dumps(x) + "\n" for x in chosen))
    return qa, len(chosen)


def test_eval_reports_intervals_and_paired_tests(small_qa, capsys, monkeypatch):
    qa, n = small_qa
    args = ["eval", str(qa), "--model", "demo", "--methods", "none,random", "--max-new-tokens", "3"]
    code, out, err = run_cli([*args, "--json"], capsys, monkeypatch)
    assert (code, err) == (0, "")
    report = json.loads(out)
    assert report["statistics"]["significance_level"] == 0.05
    summary = report["summary"]
    for method in ("none", "random"):
        items = [i for i in report["items"] if i["method"] == method]
        entry = summary[method]
        assert entry["n"] == n and entry["correct"] == sum(i["correct"] for i in items)
        assert entry["ci95"] == wilson_interval(entry["correct"], n)
    assert "vs_first" not in summary["none"]
    paired = summary["random"]["vs_first"]
    right = {m: [i["correct"] for i in report["items"] if i["method"] == m] for m in ("none", "random")}
    b = sum(x and not y for x, y in zip(right["none"], right["random"]))
    c = sum(y and not x for x, y in zip(right["none"], right["random"]))
    assert (paired["baseline"], paired["pairs"], paired["only_baseline_right"], paired["only_this_right"]) == (
        "none", n, b, c)
    assert paired["p_value"] == mcnemar_exact(b, c)
    assert paired["significant"] == (paired["p_value"] < 0.05)

    code, out, err = run_cli(args, capsys, monkeypatch, env={"COLUMNS": "120"})
    assert code == 0
    lines = out.splitlines()
    verdict = "significant" if paired["significant"] else "not significant"
    p = paired["p_value"]
    p_text = "p < 0.001" if p < 0.001 else f"p = {p:.3g}"
    assert lines[-2] == (
        f"random vs none: {100 * paired['difference']:+.1f} points on {n} paired questions ({b} right only with "
        f"none, {c} only with random), {verdict} ({p_text})")
    assert lines[-1].startswith("95 % CI: Wilson score interval. p: McNemar's exact test")
    ci = summary["none"]["ci95"]
    row = next(x for x in lines if "95 % CI" in x and "│" in x)
    assert f"{100 * ci[0]:.1f}-{100 * ci[1]:.1f} %" in row
    noise = "" if paired["significant"] else ", not significant"
    cell = f"{100 * paired['difference']:+.1f} pts{noise} ({p_text})"
    assert any("vs none" in x and "baseline" in x and cell in x for x in lines)
