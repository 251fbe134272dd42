"""`dycoke eval` under torchrun: clips shared out over 2 CPU processes (gloo) give the report
one process gives, rank 0 alone prints it, and a failing or stuck rank ends the run with one
line per error instead of a hang. The runs go through the real torchrun of the venv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dycoke_cli.distributed import Shard, launched_by_torchrun

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_videos"
TORCHRUN = Path(sys.executable).parent / "torchrun"
WAIT = 600  # only a hang gets near this (a run here takes seconds)

pytestmark = pytest.mark.skipif(not TORCHRUN.is_file(), reason="torchrun is not installed beside this Python")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")}
    # one thread per process in both runs, so the matrix products (and the answers) are the same
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _one_process(args, **env):
    return subprocess.run([sys.executable, "-m", "dycoke_cli", *args], capture_output=True, text=True,
                          timeout=WAIT, env=_env(**env), cwd=ROOT)


def _torchrun(nproc: int, args, **env):
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", str(nproc), *args],
                          capture_output=True, text=True, timeout=WAIT, env=_env(**env), cwd=ROOT)


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    """Three sample clips, three questions each: rank 0 gets clips 1 and 3, rank 1 clip 2."""
    lines = [json.loads(x) for x in (SAMPLES / "qa.jsonl").read_text().splitlines()]
    videos = ["red_cup.mp4", "blue_cup_turns_yellow.mp4", "green_ball_up.mp4"]
    chosen = [x for x in lines if x["video"] in videos and x["kind"] in ("shape", "motion", "color_end")]
    for x in chosen:
        x["video"] = str(SAMPLES / x["video"])
    assert [x["video"] for x in chosen][::3] == [str(SAMPLES / v) for v in videos]
    path = tmp_path_factory.mktemp("qa") / "qa.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in chosen))
    return path


def _without_times(report: dict) -> dict:
    """The report less what a clock measures (each answer's llm_s, each method's mean_llm_s)."""
    report = json.loads(json.dumps(report))
    for item in report["items"]:
        item.pop("llm_s")
    for entry in report["summary"].values():
        entry.pop("mean_llm_s")
    return report


@pytest.mark.timing
def test_two_ranks_give_the_report_of_one_process(qa_file):
    args = ["eval", str(qa_file), "--model", "demo", "--methods", "none,dycoke", "--max-new-tokens", "3"]
    one = _one_process([*args, "--json"])
    two = _torchrun(2, ["-m", "dycoke_cli", *args, "--json"])
    assert (one.returncode, one.stderr) == (0, "")
    assert (two.returncode, two.stderr) == (0, ""), two.stderr
    a, b = json.loads(one.stdout), json.loads(two.stdout)  # rank 1 printed nothing beside rank 0's JSON
    assert len(a["items"]) == 18
    assert [(i["video"], i["method"], i["question"], i["prediction"]) for i in b["items"]] == [
        (i["video"], i["method"], i["question"], i["prediction"]) for i in a["items"]]
    assert _without_times(b) == _without_times(a)
    assert list(b) == list(a) and list(b["summary"]["dycoke"]) == list(a["summary"]["dycoke"])

    # the table too, line for line but for the time row
    one, two = _one_process(args, COLUMNS="120"), _torchrun(2, ["-m", "dycoke_cli", *args], COLUMNS="120")
    assert one.returncode == two.returncode == 0
    assert one.stderr.splitlines() == ["[dycoke] loading model..."]
    assert two.stderr.splitlines() == ["[dycoke] loading model..."]  # rank 0's only
    untimed = [[x for x in p.stdout.splitlines() if "LLM s/answer" not in x] for p in (one, two)]
    assert untimed[0] == untimed[1] and any("dycoke vs none:" in x for x in untimed[1])


def test_a_bad_qa_file_is_one_line_on_every_rank(tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"video": "a.mp4", "question": "q"}\n')
    proc = _torchrun(2, ["-m", "dycoke_cli", "eval", str(qa), "--model", "demo"])
    assert (proc.returncode, proc.stdout) == (1, "")
    errors = [x for x in proc.stderr.splitlines() if x.startswith("dycoke:")]
    # each rank that gets to speak says it in one line; torchrun may stop a rank first (it ends
    # the others once one has failed), so one or two such lines, never anything else
    assert set(errors) == {f"dycoke: error: {qa}:1: missing answer"} and len(errors) in (1, 2)


LOST = "dycoke: error: rank 0: lost the other ranks while gathering the results ("


@pytest.mark.timing
def test_a_rank_that_fails_ends_the_run_with_its_line():
    proc = _torchrun(2, [str(ROOT / "tests" / "dist_worker.py"), "fail", "3"])
    assert (proc.returncode, proc.stdout) == (1, "")
    errors = [x for x in proc.stderr.splitlines() if x.startswith("dycoke:")]
    assert "dycoke: error: rank 1 failed before the gather" in errors
    # rank 0, waiting in the gather, either sees the connection go (one line; gloo words it
    # "Read error ..." or "Connection closed by peer ...") or is stopped by torchrun first (no
    # line), whichever comes first
    assert all(x.startswith(LOST) and x.endswith(")") for x in errors if "rank 1" not in x), proc.stderr


@pytest.mark.timing
def test_a_rank_that_hangs_is_given_up_after_the_timeout():
    # rank 1 never comes to the gather: rank 0 gives up after the timeout (3 s), and torchrun
    # then stops rank 1
    proc = _torchrun(2, [str(ROOT / "tests" / "dist_worker.py"), "slow", "3"])
    assert (proc.returncode, proc.stdout) == (1, "")
    errors = [x for x in proc.stderr.splitlines() if x.startswith("dycoke:")]
    assert len(errors) == 1 and errors[0].startswith(f"{LOST}Timed out waiting 3000ms"), proc.stderr


@pytest.mark.timing
def test_the_worker_gathers_when_every_rank_behaves():
    proc = _torchrun(2, [str(ROOT / "tests" / "dist_worker.py"), "ok", "60"])
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "[{'rank': 0}, {'rank': 1}]\n", "")


def test_torchrun_is_recognised_by_its_variables_and_clips_are_dealt_round_robin():
    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1"}
    assert launched_by_torchrun(env)
    assert not launched_by_torchrun({k: v for k, v in env.items() if k != "MASTER_ADDR"})
    assert not launched_by_torchrun({})
    assert [i for i in range(7) if Shard(1, 3).owns(i)] == [1, 4]


def test_a_bad_timeout_is_one_line_on_every_rank(qa_file):
    proc = _torchrun(2, ["-m", "dycoke_cli", "eval", str(qa_file), "--model", "demo"], DYCOKE_DIST_TIMEOUT="soon")
    assert (proc.returncode, proc.stdout) == (1, "")
    errors = [x for x in proc.stderr.splitlines() if x.startswith("dycoke:")]
    assert set(errors) == {"dycoke: error: DYCOKE_DIST_TIMEOUT must be a number of seconds (got 'soon')"}
    assert len(errors) in (1, 2)  # a rank torchrun stopped first says nothing (see above)


def test_the_timeout_variable_matters_only_under_torchrun(tmp_path):
    # without torchrun a bad DYCOKE_DIST_TIMEOUT is never read: the QA file's error comes first
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"video": "a.mp4", "question": "q"}\n')
    proc = _one_process(["eval", str(qa), "--model", "demo"], DYCOKE_DIST_TIMEOUT="soon")
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", f"dycoke: error: {qa}:1: missing answer\n")


def test_bad_rank_numbers_are_one_line():
    from dycoke_cli.distributed import process_group
    from dycoke_cli.errors import UsageError

    env = {"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    with pytest.raises(UsageError) as exc:
        with process_group("cpu", 5.0, env):
            pass
    assert str(exc.value) == "torchrun's RANK 2 and LOCAL_RANK 0 do not fit WORLD_SIZE 2"
