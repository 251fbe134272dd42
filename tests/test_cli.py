"""The CLI driven in-process: exit codes, exact stdout, one-line stderr."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dycoke_cli import __version__
from dycoke_cli.cli.app import main


def run_cli(args, capsys, monkeypatch, env=None):
    monkeypatch.setattr(sys, "argv", ["dycoke", *args])
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as exc:
        main()
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_version(capsys, monkeypatch):
    assert run_cli(["--version"], capsys, monkeypatch) == (0, f"dycoke {__version__}\n", "")


def test_help_does_not_import_torch():
    code = "import sys; from dycoke_cli.cli.app import app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_ask_streams_the_answer_and_json_agrees(tiny_model_dir, clip_path, capsys, monkeypatch):
    base = ["ask", str(clip_path), "what color is the cup?", "--model", str(tiny_model_dir), "--dtype", "float32",
            "--max-new-tokens", "6"]
    code, out, err = run_cli(base, capsys, monkeypatch)
    assert code == 0
    code, js, _ = run_cli([*base, "--json"], capsys, monkeypatch)
    assert code == 0
    payload = json.loads(js)
    assert out == payload["answer"] + "\n"
    assert len(payload["answer"].split()) >= 1
    assert "[dycoke] visual tokens 32 -> 14 (prefill 43.8 %, decode 4)" in err
    assert set(payload) == {"schema_version", "answer", "model", "video", "options", "stats", "kept"}
    assert payload["schema_version"] == 1
    assert payload["video"]["sampled"] == 8 and len(payload["video"]["timestamps"]) == 8
    assert payload["video"]["duration"] == pytest.approx(3.0)
    assert payload["options"]["method"] == "dycoke" and payload["options"]["frames"] == 8
    stats = payload["stats"]
    assert stats["tokens_generated"] == 6
    for key in ("read_video", "encode", "prefill", "decode"):
        assert stats["timings_s"][key] >= 0
    assert stats["ttft_s"] > 0 and stats["peak_memory_bytes"] > 0


def test_no_compress_and_quiet(tiny_model_dir, clip_path, capsys, monkeypatch):
    code, out, err = run_cli(["ask", str(clip_path), "what is in the video", "--model", str(tiny_model_dir),
                              "--no-compress", "--quiet", "--json", "--max-new-tokens", "3"], capsys, monkeypatch)
    assert code == 0 and err == ""
    stats = json.loads(out)["stats"]
    assert stats["visual_tokens_prefill"] == stats["visual_tokens_decode"] == 32


@pytest.mark.parametrize("args,message", [
    (["--prune-p", "1.5"], "dycoke: error: --prune-p must be in [0, 1) (got 1.5)\n"),
    (["--ttm-k", "-0.1"], "dycoke: error: --ttm-k must be in [0, 1) (got -0.1)\n"),
    (["--frames", "-3"], "dycoke: error: --frames must be at least 1 (got -3)\n"),
    (["--refresh-threshold", "2"], "dycoke: error: --refresh-threshold must be in [0, 1] (got 2.0)\n"),
    (["--top-p", "0"], "dycoke: error: --top-p must be in (0, 1] (got 0.0)\n"),
    (["--prune-layer", "9"], "dycoke: error: --prune-layer must be in [1, 3] for this 4-layer model (got 9)\n"),
])
def test_out_of_range_flags_are_usage_errors(args, message, tiny_model_dir, clip_path, capsys, monkeypatch):
    code, out, err = run_cli(["ask", str(clip_path), "what?", "--model", str(tiny_model_dir), *args], capsys, monkeypatch)
    assert (code, out) == (2, "")
    assert err.endswith(message)


def test_unknown_flag_is_one_line(capsys, monkeypatch):
    code, out, err = run_cli(["ask", "x.mp4", "q", "--bogus"], capsys, monkeypatch)
    assert (code, out, err) == (2, "", "dycoke: error: No such option: --bogus (see 'dycoke ask --help')\n")


def test_empty_question(clip_path, capsys, monkeypatch):
    assert run_cli(["ask", str(clip_path), "   "], capsys, monkeypatch) == (2, "", "dycoke: error: the question is empty\n")


@pytest.mark.parametrize("name,shown", [
    ("no such\nfile.mp4", "no such\\nfile.mp4"),
    ("tab\there\r.mp4", "tab\\there\\r.mp4"),
    ("\x1b[31mred\x85\u2028.mp4", "\\x1b[31mred\\x85\\u2028.mp4"),
])
def test_control_characters_in_a_name_are_escaped_so_the_error_is_one_line(name, shown, tmp_path, tiny_model_dir,
                                                                           capsys, monkeypatch):
    code, out, err = run_cli(["ask", str(tmp_path / name), "q", "--model", str(tiny_model_dir)], capsys, monkeypatch)
    assert (code, out, err) == (1, "", f"dycoke: error: {tmp_path}/{shown}: no such file\n")


def test_bad_inputs(tmp_path, tiny_model_dir, capsys, monkeypatch):
    model = ["--model", str(tiny_model_dir)]
    missing = tmp_path / "nope.mp4"
    assert run_cli(["ask", str(missing), "q", *model], capsys, monkeypatch) == (
        1, "", f"dycoke: error: {missing}: no such file\n")
    assert run_cli(["ask", str(tmp_path), "q", *model], capsys, monkeypatch) == (
        1, "", f"dycoke: error: {tmp_path}: is a directory, not a video file\n")
    text = tmp_path / "notes.txt"
    text.write_text("hello, not a video\n")
    code, out, err = run_cli(["ask", str(text), "q", *model], capsys, monkeypatch)
    assert (code, out) == (1, "") and err.startswith(f"dycoke: error: {text}") and err.count("\n") == 1
    assert text.read_text() == "hello, not a video\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_model_folder_errors(tmp_path, tiny_model_dir, clip_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(["ask", str(clip_path), "q", "--model", str(empty)], capsys, monkeypatch) == (
        1, "", f"dycoke: error: {empty}: not a model folder (no config.json)\n")
    noweights = tmp_path / "noweights"
    shutil.copytree(tiny_model_dir, noweights)
    (noweights / "model.safetensors").unlink()
    assert run_cli(["ask", str(clip_path), "q", "--model", str(noweights)], capsys, monkeypatch) == (
        1, "", f"dycoke: error: {noweights}: no weights found (expected *.safetensors)\n")
    (noweights / "pytorch_model.bin").write_bytes(b"not really")
    assert run_cli(["ask", str(clip_path), "q", "--model", str(noweights)], capsys, monkeypatch) == (
        1, "", f"dycoke: error: {noweights}: only pickle weights (.bin); pass --allow-pickle to load them\n")
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert run_cli(["ask", str(clip_path), "q", "--model", str(other)], capsys, monkeypatch) == (
        1, "", f"dycoke: error: {other}: unsupported model type 'bert' (supported: llava_onevision, qwen2_5_vl, qwen3_5, qwen3_5_moe, qwen3_vl, qwen3_vl_moe)\n")
    missing = tmp_path / "missing-model"
    assert run_cli(["ask", str(clip_path), "q", "--model", str(missing)], capsys, monkeypatch) == (
        1, "", f"dycoke: error: {missing}: model folder not found\n")


def test_uncached_hub_id_offline(tmp_path, clip_path, capsys, monkeypatch):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code, out, err = run_cli(["ask", str(clip_path), "q", "--model", "someone/some-video-model"], capsys, monkeypatch, env)
    assert (code, out) == (1, "")
    assert err == ("dycoke: error: someone/some-video-model: not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
                   "fetch it first with `hf download someone/some-video-model` (or pass a local folder with --model)\n")


def test_python_dash_m(tiny_model_dir):
    out = subprocess.run([sys.executable, "-m", "dycoke_cli", "--version"], capture_output=True, text=True,
                         env={**os.environ}, check=True).stdout
    assert out == f"dycoke {__version__}\n"


def test_caption_uses_the_checkpoint_prompt(tiny_model_dir, clip_path, capsys, monkeypatch):
    code, out, err = run_cli(["caption", str(clip_path), "--model", str(tiny_model_dir), "--json", "--max-new-tokens", "5",
                              "--prune-p", "0.5"], capsys, monkeypatch)
    assert code == 0
    payload = json.loads(out)
    assert payload["options"]["question"] == "Describe this video in detail."
    assert payload["options"]["prune_p"] == 0.5
    assert payload["stats"]["visual_tokens_decode"] == 7  # floor(0.5 * 14)


def test_compare_runs_both_on_the_same_frames(tiny_model_dir, clip_path, capsys, monkeypatch):
    code, out, err = run_cli(["compare", str(clip_path), "what color is the cup?", "--model", str(tiny_model_dir),
                              "--methods", "none,dycoke,fastv", "--max-new-tokens", "6", "--json"], capsys, monkeypatch)
    assert code == 0 and err == ""
    payload = json.loads(out)
    rows = payload["methods"]
    assert [r["method"] for r in rows] == ["none", "dycoke", "fastv"]
    assert payload["baseline"] == "none" and payload["frames"] == 8
    assert [(r["visual_tokens_prefill"], r["visual_tokens_decode"]) for r in rows] == [(32, 32), (14, 4), (32, 4)]
    base = rows[0]["llm_total_s"]
    for r in rows:
        assert r["answer"] and r["tokens_generated"] >= 1
        assert r["speedup"] == pytest.approx(base / r["llm_total_s"])
    assert rows[0]["speedup"] == 1.0 and rows[0]["diff"] == []


def test_compare_table_on_stdout(tiny_model_dir, clip_path, capsys, monkeypatch):
    code, out, err = run_cli(["compare", str(clip_path), "--model", str(tiny_model_dir), "--max-new-tokens", "3"],
                             capsys, monkeypatch)
    assert code == 0
    assert "speedup (measured)" in out and "none" in out and "dycoke" in out
    assert err == "[dycoke] loading model...\n[dycoke] comparing none, dycoke on 8 frames...\n"


def test_compare_rejects_unknown_method(clip_path, capsys, monkeypatch):
    assert run_cli(["compare", str(clip_path), "--methods", "none,fast"], capsys, monkeypatch) == (
        2, "", "dycoke: error: --methods: unknown method 'fast' (choose from dycoke, fastv, random, frames, none, dycoke-topk)\n")


def test_eval_scores_and_reports_items(tmp_path, tiny_model_dir, clip_path, capsys, monkeypatch):
    shutil.copy(clip_path, tmp_path / "a.mp4")
    lines = [{"video": "a.mp4", "question": "what color is the cup?", "answer": "red", "kind": "color"},
             {"video": "a.mp4", "question": "describe the video.", "answer": "a red cup stays still", "kind": "caption"}]
    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    code, out, err = run_cli(["eval", str(qa), "--model", str(tiny_model_dir), "--methods", "none,dycoke",
                              "--max-new-tokens", "4", "--json"], capsys, monkeypatch)
    assert code == 0
    report = json.loads(out)
    assert [(i["method"], i["question"]) for i in report["items"]] == [
        ("none", lines[0]["question"]), ("none", lines[1]["question"]),
        ("dycoke", lines[0]["question"]), ("dycoke", lines[1]["question"])]
    for method in ("none", "dycoke"):
        items = [i for i in report["items"] if i["method"] == method]
        summary = report["summary"][method]
        assert summary["n"] == 2
        assert summary["accuracy"] == sum(i["correct"] for i in items) / 2
        assert set(summary["by_kind"]) == {"color", "caption"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "qa.jsonl"]


def test_eval_bad_line(tmp_path, capsys, monkeypatch):
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"video": "a.mp4", "question": "q"}\n')
    assert run_cli(["eval", str(qa)], capsys, monkeypatch) == (
        1, "", f"dycoke: error: {qa}:1: missing answer\n")


def test_toyworld_writes_clips_and_qa(tmp_path, capsys, monkeypatch):
    code, out, err = run_cli(["toyworld", str(tmp_path / "w"), "--n", "2", "--seed", "5"], capsys, monkeypatch)
    assert (code, out) == (0, f"{tmp_path / 'w' / 'qa.jsonl'}\n")
    lines = [json.loads(x) for x in (tmp_path / "w" / "qa.jsonl").read_text().splitlines()]
    assert {x["video"] for x in lines} == {"clips/0000.mp4", "clips/0001.mp4"}
    assert all((tmp_path / "w" / x["video"]).is_file() for x in lines)


def test_question_beyond_the_context_is_refused_with_numbers(tmp_path, clip_path, capsys, monkeypatch):
    from dycoke_cli.testing.tiny import TinySpec, build_llava_onevision, build_word_tokenizer, save_checkpoint

    tok = build_word_tokenizer(["what", "color", "is", "the", "cup", "?"])
    spec = TinySpec(max_position_embeddings=64)
    folder = save_checkpoint(build_llava_onevision(tok, spec), tok, tmp_path / "short", dycoke_defaults={"num_frames": 8})
    long_question = " ".join(["what color is the cup"] * 20) + "?"
    capsys.readouterr()  # drop save_pretrained's progress bar
    code, out, err = run_cli(["ask", str(clip_path), long_question, "--model", str(folder), "--no-compress", "--quiet"],
                             capsys, monkeypatch)
    assert (code, out) == (2, "")
    # "<|im_start|> user" before the video, 32 visual + the newline token, then 100 question
    # words, "?" and "<|im_end|> <|im_start|> assistant": 2 + 33 + 104 = 139
    assert err == ("dycoke: error: the prompt needs 139 tokens (32 visual, 107 text) but the model's context is 64; "
                   "shorten the question or use fewer --frames\n")
    # a short question fits; generation is cut to what the context leaves
    code, out, err = run_cli(["ask", str(clip_path), "what color is the cup?", "--model", str(folder), "--no-compress",
                              "--json", "--max-new-tokens", "500"], capsys, monkeypatch)
    assert code == 0
    payload = json.loads(out)
    assert payload["stats"]["tokens_generated"] <= 64 - payload["stats"]["prefill_tokens"]


def test_dycoke_device_sets_what_auto_means(tmp_path):
    import torch

    clip = Path(__file__).resolve().parents[1] / "sample_videos" / "red_cup.mp4"
    args = [sys.executable, "-m", "dycoke_cli", "ask", str(clip), "what color is the cup?", "--model", "demo"]
    bad = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "DYCOKE_DEVICE": "tpu"}, timeout=300)
    assert (bad.returncode, bad.stdout, bad.stderr.splitlines()[-1]) == (
        2, "", "dycoke: error: DYCOKE_DEVICE must be auto, cpu or cuda (got 'tpu')")
    if not torch.cuda.is_available():  # auto now means cuda, which this machine lacks: the flag's own error
        cuda = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "DYCOKE_DEVICE": "cuda"},
                              timeout=300)
        assert cuda.returncode == 2 and cuda.stderr.splitlines()[-1].startswith(
            "dycoke: error: --device cuda: no CUDA device is available")
    explicit = subprocess.run([*args, "--device", "cpu", "-q"], capture_output=True, text=True,
                              env={**os.environ, "DYCOKE_DEVICE": "tpu"}, timeout=300)
    assert (explicit.returncode, explicit.stdout) == (0, "red\n")  # only auto reads it
