"""The CLI driven in-process: exit codes, exact stdout, one-line stderr."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from dycoke_cli import __version__
from dycoke_cli.cli import main


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
    code = "import sys; from dycoke_cli.cli import app; print('torch' in sys.modules)"
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
    assert set(payload) == {"answer", "model", "video", "options", "stats"}
    assert payload["video"]["sampled"] == 8 and len(payload["video"]["timestamps"]) == 8
    assert payload["video"]["duration"] == pytest.approx(3.0)
    assert payload["options"]["method"] == "dycoke" and payload["options"]["frames"] == 8
    stats = payload["stats"]
    assert stats["tokens_generated"] == 6
    for key in ("decode_video", "encode", "prefill", "decode"):
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
        1, "", f"dycoke: error: {other}: unsupported model type 'bert' (supported: llava_onevision)\n")
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
