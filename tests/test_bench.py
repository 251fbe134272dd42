"""Smoke test of the benchmark (`dycoke bench --quick`): it runs end to end and its JSON, table
and plot are consistent with each other. No speed or memory thresholds are asserted here."""

import json
import math

import pytest

from dycoke_cli import bench

FRAMES = (8, 16)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["--quick", "--frames", ",".join(map(str, FRAMES)), "--tokens", "4", "--threads", "1",
            "--json", str(out / "bench.json"), "--plot", str(out / "bench.png")]
    return out, argv


@pytest.fixture(scope="module")
def report(quick_run):
    import io
    from contextlib import redirect_stdout

    out, argv = quick_run
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert bench.main(argv) == 0
    return json.loads((out / "bench.json").read_text()), buf.getvalue(), out


def _run(rep, frames, method):
    [r] = [r for r in rep["runs"] if r["frames"] == frames and r["method"] == method]
    return r


def test_every_method_and_frame_count_is_measured(report):
    rep, _, _ = report
    assert [(r["frames"], r["method"]) for r in rep["runs"]] == [(f, m) for f in FRAMES for m in bench.METHODS]
    assert rep["config"]["frames"] == list(FRAMES) and rep["config"]["quick"] is True
    assert rep["machine"]["threads"] == 1 and rep["machine"]["dtype"] in ("bfloat16", "float32")
    for r in rep["runs"]:
        assert r["tokens_generated"] == 5 and r["decode_steps"] == 4  # EOS ignored: fixed length
        for key in ("vision_s", "prefill_s", "decode_s", "llm_s", "ttft_s", "total_s", "decode_ms_median"):
            assert r[key] > 0, key
        assert r["peak_bytes"] is None or r["peak_bytes"] >= 0
        assert r["kv_bytes"] > 0
        assert math.isclose(r["llm_s"], r["merge_s"] + r["prefill_s"] + r["decode_s"], rel_tol=1e-9)
        assert r["total_s"] >= r["ttft_s"] >= r["vision_s"]


def test_vision_time_is_shared_and_grows_with_frames(report):
    rep, _, _ = report
    for f in FRAMES:
        assert len({_run(rep, f, m)["vision_s"] for m in bench.METHODS}) == 1
    assert _run(rep, 16, "none")["vision_s"] > _run(rep, 8, "none")["vision_s"]


def test_token_budgets(report):
    rep, _, _ = report
    for f in FRAMES:
        none, dycoke, fastv = (_run(rep, f, m) for m in bench.METHODS)
        assert none["visual_tokens_prefill"] == none["visual_tokens_decode"] == f * rep["model"]["tokens_per_frame"]
        assert dycoke["visual_tokens_prefill"] < none["visual_tokens_prefill"]
        assert fastv["visual_tokens_decode"] == dycoke["visual_tokens_decode"]  # same budget


def test_ratios_are_computed_from_the_measured_numbers(report):
    rep, _, _ = report
    for f in FRAMES:
        none = _run(rep, f, "none")
        for m in bench.METHODS:
            r = _run(rep, f, m)
            q = r["ratios"]
            assert q["llm_speedup"] == pytest.approx(none["llm_s"] / r["llm_s"])
            assert q["decode_speedup"] == pytest.approx(none["decode_ms_median"] / r["decode_ms_median"])
            assert q["ttft_speedup"] == pytest.approx(none["ttft_s"] / r["ttft_s"])
            assert q["total_speedup"] == pytest.approx(none["total_s"] / r["total_s"])
            assert q["kv_reduction"] == pytest.approx(none["kv_bytes"] / r["kv_bytes"])
            if none["peak_bytes"] and r["peak_bytes"]:
                assert q["memory_reduction"] == pytest.approx(none["peak_bytes"] / r["peak_bytes"])
        assert none["ratios"]["llm_speedup"] == pytest.approx(1.0)


def test_generate_comparison_and_targets(report):
    rep, _, _ = report
    assert [g["frames"] for g in rep["generate"]] == list(FRAMES)
    for g in rep["generate"]:
        assert g["loop_over_generate"] == pytest.approx(g["loop_s"] / g["generate_s"])
        assert g["loop_s"] == _run(rep, g["frames"], "none")["answer_wall_s"]
        assert g["same_tokens"] is True  # our greedy loop reproduces model.generate
    keys = [t["key"] for t in rep["targets"]]
    assert keys == ["llm_stage", "decode_step", "loop_vs_generate", "peak_memory"]
    by = {t["key"]: t for t in rep["targets"]}
    assert all(t["frames"] == max(FRAMES) for t in rep["targets"])
    assert by["llm_stage"]["measured"] == _run(rep, max(FRAMES), "dycoke")["ratios"]["llm_speedup"]
    assert by["loop_vs_generate"]["measured"] == rep["generate"][-1]["loop_over_generate"]


def test_markdown_table_and_plot(report):
    rep, text, out = report
    rows = [line for line in text.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    method_rows = [r for r in rows if r.split("|")[2].strip() in bench.METHODS]
    assert len(method_rows) == len(FRAMES) * len(bench.METHODS)
    for line, r in zip(method_rows, rep["runs"]):
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert cells[0] == str(r["frames"]) and cells[1] == r["method"]
        assert cells[-5] == f"{r['ratios']['llm_speedup']:.2f}x"
    assert "model.generate" in text and "target" in text
    from PIL import Image

    with Image.open(out / "bench.png") as img:
        assert img.format == "PNG" and img.size[0] > 400


def test_bad_arguments_exit_with_usage_error():
    for argv in (["--frames", "eight"], ["--frames", "0"], ["--tokens", "0"]):
        with pytest.raises(SystemExit) as exc:
            bench.parse_args(argv)
        assert exc.value.code == 2


def test_packed_decode_attention_is_the_same_arithmetic():
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 14, 1, 64), torch.randn(1, 2, 300, 64), torch.randn(1, 2, 300, 64)
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    original = F.scaled_dot_product_attention
    with bench.decode_attention("packed"):
        assert F.scaled_dot_product_attention is not original
        got = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert F.scaled_dot_product_attention is original
    torch.testing.assert_close(got, want)
