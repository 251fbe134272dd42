"""What an answer kept: --json's ``kept`` and the picture of --show-kept / --picture, from the real
CLI with the shipped demo model. The pictures are read back from their pixels (tests/pictures.py)
and must say what the JSON says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="the pictures need matplotlib (pip install -e '.[test]')")

import pictures  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_videos"
TURNS = SAMPLES / "blue_cup_turns_yellow.mp4"
INSTALL = "pip install 'dycoke-cli[picture]'"


def dycoke(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dycoke_cli", *args, "--model", "demo"], capture_output=True,
                          text=True, timeout=600, env={**os.environ, **(env or {})}, cwd=ROOT)


def popcount(hex_mask: str, n: int) -> int:
    return bin(int(hex_mask, 16))[2:].zfill(4 * len(hex_mask))[:n].count("1")


def picture_counts(path: Path, kept: dict) -> list[int]:
    img = pictures.load(path)
    rows, cols = kept["grid"]
    return [pictures.kept_in(img, box, rows, cols) for box in pictures.cells(img)]


def test_each_answer_has_its_picture_and_the_json_says_the_same(tmp_path):
    out = tmp_path / "kept.png"
    proc = dycoke("ask", str(TURNS), "describe the video.", "what color is the cup?", "--frames", "8",
                  "--json", "--show-kept", str(out), env={"MPLCONFIGDIR": str(tmp_path / "mpl")})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # matplotlib building its font cache afresh says nothing
    answers = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [a["answer"] for a in answers] == ["a blue cup moves right and turns yellow", "yellow"]
    for answer, png in zip(answers, [out, tmp_path / "kept-2.png"]):
        kept, stats = answer["kept"], answer["stats"]
        assert (kept["frames"], kept["grid"], kept["frames_per_step"], kept["pruned_from"]) == (8, [4, 4], 1, 3)
        # TTM: the first frame of each window of four whole, the three others 30 % of 16 tokens
        assert kept["kept"] == [16, 4, 4, 4, 16, 4, 4, 4]
        assert [popcount(m, 16) for m in kept["mask"]] == kept["kept"]
        assert sum(kept["kept"]) == stats["visual_tokens_prefill"] == 56
        assert all(sum(s["counts"]) == stats["visual_tokens_decode"] == 16 for s in kept["selections"])
        assert kept["steps"] == stats["steps"] == stats["tokens_generated"]  # each ended at EOS
        assert len(kept["refresh_steps"]) == stats["refreshes"]
        assert [s["step"] for s in kept["selections"]] == [0, *kept["refresh_steps"]]
        assert "".join(kept["tokens"]).strip() == answer["answer"]
        assert pictures.load(png).shape[1] == 1280
        assert picture_counts(png, kept) == kept["kept"]  # one cell per frame, as many tokens kept
    assert answers[0]["kept"]["refresh_steps"] == [2, 3, 4, 5, 6, 7]


def test_compare_draws_one_panel_per_method(tmp_path):
    out = tmp_path / "compare.png"
    proc = dycoke("compare", str(TURNS), "--methods", "none,dycoke,fastv,random,frames", "--picture", str(out),
                  "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["methods"]
    img = pictures.load(out)
    assert img.shape[1] == 1280
    drawn = pictures.panels(pictures.cells(img))
    assert len(drawn) == 5
    for row, boxes in zip(rows, drawn):
        kept = row["kept"]
        assert len(boxes) == kept["frames"] == 6
        assert [pictures.kept_in(img, box, 4, 4) for box in boxes] == kept["kept"], row["method"]
    by_method = {row["method"]: row["kept"] for row in rows}
    assert by_method["none"]["kept"] == [16] * 6
    assert sum(by_method["fastv"]["kept"]) == rows[2]["visual_tokens_decode"] == 14  # FastV's cut, drawn
    assert sorted(set(by_method["frames"]["kept"])) == [0, 16]  # whole frames or none


def test_64_frames_stay_readable_at_1280_px(tmp_path):
    out = tmp_path / "long.png"
    proc = dycoke("ask", str(SAMPLES / "white_box_up_green_still_blue_right.mp4"), "what color is the box?",
                  "--frames", "64", "--show-kept", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    kept = json.loads(proc.stdout)["kept"]
    img = pictures.load(out)
    boxes = pictures.cells(img)
    assert img.shape[1] == 1280 and len(boxes) == 64
    assert min(x1 - x0 for x0, _, x1, _ in boxes) >= 64  # 16 px a token of the 4 x 4 grid
    assert img.shape[0] <= 1600
    assert [pictures.kept_in(img, box, 4, 4) for box in boxes] == kept["kept"]
    assert len(json.dumps(kept)) < 2000  # compact: 64 masks and the run-length counts


def test_features_from_the_cache_still_get_their_frames_drawn(tmp_path):
    env = {"DYCOKE_CACHE": str(tmp_path / "cache")}
    runs = []
    for name in ("first.png", "cached.png"):
        proc = dycoke("caption", str(TURNS), "--frames", "4", "--json", "--show-kept", str(tmp_path / name), env=env)
        assert proc.returncode == 0, proc.stderr
        runs.append(json.loads(proc.stdout))
    assert runs[0]["stats"]["timings_s"]["encode"] > 0 and runs[1]["stats"]["timings_s"]["encode"] == 0  # a hit
    assert runs[1]["kept"] == runs[0]["kept"]
    first, cached = pictures.load(tmp_path / "first.png"), pictures.load(tmp_path / "cached.png")
    assert first.shape == cached.shape
    for img in (first, cached):
        assert [pictures.kept_in(img, box, 4, 4) for box in pictures.cells(img)] == runs[0]["kept"]["kept"]
    # the frames were read again: the cells show the clip, not a blank
    assert all(len(np.unique(cached[y0:y1, x0:x1].reshape(-1, 3), axis=0)) > 8
               for x0, y0, x1, y1 in pictures.cells(cached))


def test_static_steps_record_what_eager_steps_record():
    from dycoke_cli import load_model
    from dycoke_cli.options import SamplingOptions
    from dycoke_cli.session import Session

    lm = load_model("demo")
    session = Session(lm, TURNS, frames=8, cache=None)
    question = "describe the video."
    eager = session.ask(question, SamplingOptions(decode="eager"), trace=True)
    static = session.ask(question, SamplingOptions(decode="static"), trace=True)
    assert static.stats.decode_path == "static"
    assert static.text == eager.text
    assert static.kept == eager.kept
    assert static.kept.steps == static.stats.selection.steps == 8
    assert session.ask(question).kept is None  # not asked for: nothing recorded


def test_no_picture_no_matplotlib_import():
    code = ("import sys; from dycoke_cli.cli.app import _run_command; "
            f"rc = _run_command(['ask', {str(TURNS)!r}, 'what color is the cup?', '--model', 'demo', '--json', '-q'], "
            "False); print(rc, 'matplotlib' in sys.modules, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.stderr.strip() == "0 False"
    assert json.loads(proc.stdout)["kept"]["frames"] == 6


def test_without_matplotlib_one_line_before_the_model_loads(tmp_path):
    blocked = tmp_path / "blocked"
    (blocked / "matplotlib").mkdir(parents=True)
    (blocked / "matplotlib" / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    path = os.pathsep.join([str(blocked), os.environ.get("PYTHONPATH", "")])
    proc = dycoke("ask", str(TURNS), "what color is the cup?", "--show-kept", str(tmp_path / "k.png"),
                  env={"PYTHONPATH": path})
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == f"dycoke: error: the picture needs matplotlib, which is not installed: {INSTALL}\n"
    assert not (tmp_path / "k.png").exists()


@pytest.mark.parametrize("flag,name,code,message", [
    ("--show-kept", "kept.jpg", 2, "--show-kept must name a .png file (got {dir}/kept.jpg)"),
    ("--show-kept", "missing/kept.png", 1, "cannot write {dir}/missing/kept.png (no such folder: {dir}/missing)"),
    ("--picture", "missing/c.png", 1, "cannot write {dir}/missing/c.png (no such folder: {dir}/missing)"),
])
def test_a_picture_path_that_cannot_be_written_is_one_line(tmp_path, flag, name, code, message):
    command = "compare" if flag == "--picture" else "caption"
    proc = dycoke(command, str(TURNS), flag, str(tmp_path / name))
    assert (proc.returncode, proc.stdout) == (code, "")
    assert proc.stderr == f"dycoke: error: {message.format(dir=tmp_path)}\n"


def _tiny_qwen(family: str, folder: Path):
    from conftest import TINY_WORDS

    from dycoke_cli.testing import tiny

    tok = tiny.build_word_tokenizer(TINY_WORDS, family=family)
    if family == "qwen2_5_vl":
        return tiny.save_qwen_checkpoint(tiny.build_qwen2_5_vl(tok), tok, folder, dycoke_defaults={"prune_layer": 2})
    return tiny.save_qwen3_checkpoint(tiny.build_qwen3_vl(tok), tok, folder, dycoke_defaults={"prune_layer": 2})


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_a_qwen_family_is_drawn_per_temporal_step_of_two_frames(tmp_path, family):
    from clips import write_clip

    from dycoke_cli import load_model
    from dycoke_cli.cli.kept import write_answer_picture
    from dycoke_cli.options import CompressionOptions, Method, SamplingOptions
    from dycoke_cli.session import Session

    lm = load_model(str(_tiny_qwen(family, tmp_path / "model")), device="cpu", dtype="float32")
    clip = write_clip(tmp_path / "clip.mp4", n_frames=30, size=(64, 48), fps=10)
    session = Session(lm, clip, frames=8, cache=None)
    answer = session.ask("what color is the cup?", SamplingOptions(max_new_tokens=6, ignore_eos=True), trace=True)
    kept, enc = answer.kept, session.encoded
    assert (kept.frames, kept.frames_per_step) == (enc.frames, 2) == (4, 2)  # 8 frames, 4 temporal steps
    assert (kept.rows, kept.cols) == (enc.rows, enc.cols) and kept.rows * kept.cols == enc.tokens_per_frame
    assert sum(kept.kept) == answer.stats.visual_tokens_prefill
    assert kept.kept[0] == enc.tokens_per_frame  # TTM keeps the first step of its window whole
    assert kept.steps == answer.stats.selection.steps == 5
    assert all(sum(row) == answer.stats.visual_tokens_decode for row in kept.attended)
    write_answer_picture(tmp_path / "q.png", answer, enc, clip, 60.0)
    img = pictures.load(tmp_path / "q.png")
    assert [pictures.kept_in(img, box, kept.rows, kept.cols) for box in pictures.cells(img)] == list(kept.kept)
    fastv = session.ask("what color is the cup?", SamplingOptions(max_new_tokens=2),
                        CompressionOptions(method=Method.fastv), trace=True)
    assert sum(fastv.kept.kept) == fastv.stats.visual_tokens_decode  # its cut, among the visual tokens only
