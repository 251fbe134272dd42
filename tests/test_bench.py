"""The benchmark (benchmarks/bench_compression.py, also `dycoke bench`): a quick run measures
every method at every frame count with exact token counts, our loop gives model.generate's
tokens, and the table and plot show those runs. No speed or memory thresholds are asserted."""

import io
import json
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from test_cli import run_cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_compression as bench  # noqa: E402

FRAMES = (8, 16)
TOKENS = 4
# The quick model: 112 px frames, 14 px patches, pooled 2x2 -> 4x4 = 16 tokens per frame.
# TTM (k = 0.7) keeps every 4th frame whole and floor(0.3 * 16) = 4 tokens of the others;
# pruning (p = 0.7) then keeps floor(0.3 * that) for decoding; FastV gets the same budget.
EXPECTED = {  # frames: (none, dycoke prefill, decode budget)
    8: (128, 2 * 16 + 6 * 4, 16),
    16: (256, 4 * 16 + 12 * 4, 33),
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["--quick", "--frames", ",".join(map(str, FRAMES)), "--tokens", str(TOKENS), "--threads", "1",
            "--dtype", "float32", "--json", str(out / "bench.json"), "--plot", str(out / "bench.png")]
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert bench.main(argv) == 0
    return json.loads((out / "bench.json").read_text()), buf.getvalue(), out


def _run(rep, frames, method):
    [r] = [r for r in rep["runs"] if r["frames"] == frames and r["method"] == method]
    return r


def test_every_method_and_frame_count_is_measured_once(report):
    rep, _, _ = report
    assert [(r["frames"], r["method"]) for r in rep["runs"]] == [
        (f, m) for f in FRAMES for m in ("none", "dycoke", "fastv")]
    assert rep["config"]["frames"] == list(FRAMES) and rep["config"]["quick"] is True
    assert rep["machine"]["threads"] == 1 and rep["machine"]["dtype"] in ("bfloat16", "float32")
    for r in rep["runs"]:
        assert r["tokens_generated"] == TOKENS + 1 and r["decode_steps"] == TOKENS  # EOS ignored
        assert len(r["token_ids"]) == TOKENS + 1
        assert r["prefill_s"] > 0 and r["decode_ms_median"] > 0
        assert r["peak_bytes"] is None or r["peak_bytes"] >= 0


def test_token_counts_are_exact(report):
    rep, _, _ = report
    assert rep["model"]["tokens_per_frame"] == 16
    for f, (full, ttm, budget) in EXPECTED.items():
        none, dycoke, fastv = (_run(rep, f, m) for m in ("none", "dycoke", "fastv"))
        assert (none["visual_tokens_prefill"], none["visual_tokens_decode"]) == (full, full)
        assert (dycoke["visual_tokens_prefill"], dycoke["visual_tokens_decode"]) == (ttm, budget)
        assert (fastv["visual_tokens_prefill"], fastv["visual_tokens_decode"]) == (full, budget)
        assert none["prefill_tokens"] - dycoke["prefill_tokens"] == full - ttm
        assert fastv["prefill_tokens"] == none["prefill_tokens"]
        assert dycoke["kv_bytes"] < none["kv_bytes"] and fastv["kv_bytes"] < none["kv_bytes"]


def test_vision_is_encoded_once_per_frame_count(report):
    rep, _, _ = report
    for f in FRAMES:
        assert len({_run(rep, f, m)["vision_s"] for m in ("none", "dycoke", "fastv")}) == 1
    assert _run(rep, 16, "none")["vision_s"] > _run(rep, 8, "none")["vision_s"]


def test_our_loop_gives_the_tokens_of_model_generate(report):
    rep, _, _ = report
    assert [g["frames"] for g in rep["generate"]] == list(FRAMES)
    for g in rep["generate"]:
        assert g["same_tokens"] is True  # checked in fp32 (bf16 reports the logits' difference instead)
        assert g["token_ids"] == _run(rep, g["frames"], "none")["token_ids"]
        assert g["logits_rel_diff"] < 1e-4 and g["generate_no_cudnn_s"] is None  # cuDNN's variant: CUDA only
    assert [t["key"] for t in rep["targets"]] == ["llm_stage", "decode_step", "loop_vs_generate", "peak_memory"]
    assert all(t["frames"] == max(FRAMES) for t in rep["targets"])


def test_markdown_table_and_plot_show_the_runs(report):
    rep, text, out = report
    rows = [line for line in text.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    method_rows = [[c.strip() for c in row.split("|")[1:3]] for row in rows if row.count("|") > 10]
    assert method_rows == [[str(r["frames"]), r["method"]] for r in rep["runs"]]
    assert f"| {_run(rep, 16, 'dycoke')['visual_tokens_prefill']} → 33 |" in text
    assert "model.generate" in text and "target" in text
    from PIL import Image

    with Image.open(out / "bench.png") as img:
        assert img.format == "PNG" and img.size == (980, 560)


def test_each_method_is_set_against_model_generate(report):
    rep, text, _ = report
    for g in rep["generate"]:
        assert list(g["by_method"]) == ["none", "dycoke", "fastv"]
        for method, v in g["by_method"].items():
            r = _run(rep, g["frames"], method)
            assert v["loop_s"] == r["answer_wall_s"]
            assert v["loop_over_generate"] == r["loop_over_generate"] == r["answer_wall_s"] / g["generate_s"]
        assert g["loop_over_generate"] == g["by_method"]["none"]["loop_over_generate"]
    assert "| loop / generate (none / dycoke / fastv) |" in text


def test_bad_arguments_exit_with_usage_error():
    for argv in (["--frames", "eight"], ["--frames", "0"], ["--tokens", "0"], ["--arch", "qwen3-vl"],
                 ["--arch", "qwen2.5-vl-7b", "--frames", "8,7"]):
        with pytest.raises(SystemExit) as exc:
            bench.parse_args(argv)
        assert exc.value.code == 2


def test_outputs_default_to_the_ignored_runs_folder():
    args = bench.parse_args([])
    assert (args.json, args.plot) == ("runs/bench/bench.json", "runs/bench/bench.png")
    assert args.arch == "llava-ov-0.5b" and bench.parse_args(["--frames", "7"]).frame_counts == [7]


def test_short_arch_names_are_the_llava_onevision_ones():
    assert bench.parse_args(["--arch", "0.5b"]).arch == "llava-ov-0.5b"
    assert bench.parse_args(["--arch", "7b"]).arch == "llava-ov-7b"
    assert bench.pick_arch("7b", False) is bench.FULL_7B and bench.pick_arch("7b", True) is bench.QUICK_7B
    assert bench.pick_arch("llava-ov-0.5b", True) is bench.QUICK


def test_frames_and_tokens_left_out_take_the_device_defaults():
    import torch

    for device, frames, tokens in (("cpu", [8, 16, 32], 32), ("cuda", [32, 64, 128], 64)):
        args = bench.parse_args([])
        assert (args.frame_counts, args.tokens) == (None, None)
        bench.apply_device_defaults(args, torch.device(device))
        assert (args.frame_counts, args.tokens) == (frames, tokens)
    args = bench.parse_args(["--frames", "4,2", "--tokens", "3"])
    bench.apply_device_defaults(args, torch.device("cuda"))
    assert (args.frame_counts, args.tokens) == ([2, 4], 3)


def test_llava_ov_7b_has_the_checkpoints_size_and_refuses_without_room(monkeypatch):
    import torch

    with torch.device("meta"):
        model, _ = bench._build_random(bench.FULL_7B, torch.bfloat16, None)
    # llava-onevision-qwen2-7b-ov: 8.03 B parameters (its model card); Qwen2-7B unties its embeddings.
    assert sum(p.numel() for p in model.parameters()) == 8_030_348_832
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    text = model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size, text.vocab_size) == (3584, 28, 28, 4, 18944, 152064)
    monkeypatch.setattr(bench, "free_bytes", lambda device: 8 * 2**30)
    monkeypatch.setattr(bench, "build_model", lambda *a, **k: pytest.fail("built despite too little memory"))
    with pytest.raises(bench.DycokeError, match="^llava-onevision-qwen2-7b architecture, random weights needs "
                                                r"15\.0 GiB for its bfloat16 weights"):
        bench.main(["--arch", "7b", "--dtype", "bfloat16", "--device", "cpu", "--json", "", "--plot", ""])


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA device")
def test_the_7b_is_built_directly_on_the_gpu():
    import time

    import torch

    t0 = time.perf_counter()
    lm = bench.build_model(bench.FULL_7B, torch.bfloat16, torch.device("cuda"))
    built_s = time.perf_counter() - t0
    try:
        assert {p.device.type for p in lm.model.parameters()} == {"cuda"}
        assert built_s < 60, f"{built_s:.0f} s: initialised on the CPU, then moved?"
    finally:
        del lm
        torch.cuda.empty_cache()


# --arch qwen2.5-vl-7b --quick: 112 px frames stay 112 px (its max pixels are 112x112); 14 px
# patches merged 2x2 give 4x4 = 16 tokens per temporal step of 2 frames: 8 frames are 4 steps,
# 16 frames 8. TTM runs over steps: one window of 4 keeps 16 + 3 * 4 = 28; decode keeps
# floor(0.3 * 28) = 8 (two windows: 56 and 16); FastV gets the same budget.
QWEN_EXPECTED = {  # frames: (steps, none, dycoke prefill, decode budget)
    8: (4, 64, 28, 8),
    16: (8, 128, 56, 16),
}


@pytest.fixture(scope="module")
def qwen_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_qwen")
    argv = ["--arch", "qwen2.5-vl-7b", "--quick", "--frames", "8,16", "--tokens", str(TOKENS), "--threads", "1",
            "--json", str(out / "bench.json"), "--plot", str(out / "bench.png")]
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert bench.main(argv) == 0
    return json.loads((out / "bench.json").read_text()), buf.getvalue()


def test_quick_qwen_bench_measures_every_method_with_exact_token_counts(qwen_report):
    rep, _ = qwen_report
    assert rep["config"]["arch_option"] == "qwen2.5-vl-7b" and rep["config"]["arch"]["family"] == "qwen2_5_vl"
    assert [(r["frames"], r["method"]) for r in rep["runs"]] == [
        (f, m) for f in (8, 16) for m in ("none", "dycoke", "fastv")]
    assert (rep["model"]["frames_per_step"], rep["model"]["tokens_per_step"]) == (2, 16)
    for f, (steps, full, ttm, budget) in QWEN_EXPECTED.items():
        none, dycoke, fastv = (_run(rep, f, m) for m in ("none", "dycoke", "fastv"))
        assert {r["steps"] for r in (none, dycoke, fastv)} == {steps}
        assert (none["visual_tokens_prefill"], none["visual_tokens_decode"]) == (full, full)
        assert (dycoke["visual_tokens_prefill"], dycoke["visual_tokens_decode"]) == (ttm, budget)
        assert (fastv["visual_tokens_prefill"], fastv["visual_tokens_decode"]) == (full, budget)
        assert none["prefill_tokens"] - dycoke["prefill_tokens"] == full - ttm
        for r in (none, dycoke, fastv):
            assert r["tokens_generated"] == TOKENS + 1 and len(r["token_ids"]) == TOKENS + 1


def test_quick_qwen_bench_skips_generate_and_says_so(qwen_report):
    rep, text = qwen_report
    assert rep["generate"] == [] and "M-RoPE" in rep["config"]["generate_skipped"]
    [target] = [t for t in rep["targets"] if t["key"] == "loop_vs_generate"]
    assert (target["measured"], target["met"]) == (None, None)
    assert "### dycoke bench: quick: scaled-down Qwen2.5-VL, random weights (`--arch qwen2.5-vl-7b --quick`)" in text
    assert "model.generate: not timed for Qwen2.5-VL" in text and "| our loop s |" not in text
    assert "2 frames form one temporal step of 16 tokens" in text
    if rep["memory_method"].startswith("rss"):  # the fresh process built the same Qwen model
        assert "fresh process" in rep["memory_method"]


def test_the_7b_refuses_in_one_line_when_its_weights_do_not_fit(monkeypatch):
    monkeypatch.setattr(bench, "free_bytes", lambda device: 8 * 2**30)
    monkeypatch.setattr(bench, "build_model", lambda *a, **k: pytest.fail("built despite too little memory"))
    argv = ["--arch", "qwen2.5-vl-7b", "--dtype", "bfloat16", "--device", "cpu", "--json", "", "--plot", ""]
    with pytest.raises(bench.DycokeError) as exc:
        bench.main(argv)
    # Qwen2.5-VL-7B has 8.29 B parameters (its model card): 15.4 GiB in bf16.
    assert str(exc.value) == ("Qwen2.5-VL-7B architecture, random weights needs 15.4 GiB for its bfloat16 weights "
                              "(+10 %); cpu has 8.0 GiB free: run it on a larger GPU, or try --quick")


def test_the_package_does_not_ship_the_benchmark():
    import dycoke_cli

    assert not (Path(dycoke_cli.__file__).parent / "bench.py").exists()


def test_dycoke_bench_outside_a_source_checkout_is_one_line(tmp_path, capsys, monkeypatch):
    import dycoke_cli.cli.app

    monkeypatch.setattr(dycoke_cli.cli.app, "__file__", str(tmp_path / "site-packages" / "dycoke_cli" / "cli" / "app.py"))
    assert run_cli(["bench", "--quick"], capsys, monkeypatch) == (
        1, "", "dycoke: error: the benchmark ships with the source checkout (benchmarks/bench_compression.py), "
               "not with the installed package\n")


def test_packed_decode_attention_is_the_same_arithmetic_and_is_restored():
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 14, 1, 64), torch.randn(1, 2, 300, 64), torch.randn(1, 2, 300, 64)
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    original = F.scaled_dot_product_attention
    with pytest.raises(RuntimeError):
        with bench.decode_attention("packed"):
            assert F.scaled_dot_product_attention is not original
            got = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            raise RuntimeError("restored even when the run fails")
    assert F.scaled_dot_product_attention is original
    torch.testing.assert_close(got, want)
