"""End-to-end hardening through the CLI (the issue "awkward videos, broken files, interrupts,
and resource limits"): every clip is written here with PyAV (tests/clips.py) and fed to
``dycoke ask`` with the tiny random LLaVA-OV checkpoint. The reader's own behaviour is tested
in test_video.py / test_video_errors.py; this file checks what a user sees: exit codes, the
exact one-line messages, the ``video`` block of ``--json``, and that nothing is written next
to the video. No mocks, except one documented knob for the decode timeout (the CLI has none).

Slow parts are subprocesses (Ctrl-C, out of memory, the hour-long clip): about 20 s of the
file's ~35 s on two busy cores. ``pytest -s`` prints what they measured.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import small_pipe
from clips import write_audio, write_clip, write_image
from test_cli import run_cli

MP4 = "mov,mp4,m4a,3gp,3g2,mj2"
MKV = "matroska,webm"
QUESTION = "what color is the cup?"
ASK = ["--json", "--max-new-tokens", "2", "--frames", "8", "--dtype", "float32"]


def snapshot(folder: Path) -> dict:
    """Every entry of a folder with its bytes (files) and mtime: to show nothing was written or
    changed there."""
    out = {}
    for p in sorted(folder.iterdir()):
        st = p.lstat()
        out[p.name] = (p.read_bytes() if p.is_file() and os.access(p, os.R_OK) else None, st.st_mtime_ns, st.st_mode)
    return out


def ask(path, tiny_model_dir, capsys, monkeypatch, *extra, args=ASK):
    """``dycoke ask PATH QUESTION --model TINY ...`` in-process, run from the video's folder
    (so a stray relative write would land there too); the folder must be unchanged after."""
    path = Path(path)
    folder = path.parent
    monkeypatch.chdir(folder)
    before = snapshot(folder)
    result = run_cli(["ask", str(path), QUESTION, "--model", str(tiny_model_dir), *args, *extra], capsys, monkeypatch)
    assert snapshot(folder) == before, "the CLI wrote or changed something next to the video"
    assert "Traceback" not in result[1] + result[2]
    return result


# -- 1. inputs that must give an answer ------------------------------------------------------

TEN_FPS_8 = [0.1, 0.4, 0.6, 0.9, 1.1, 1.4, 1.6, 1.9]  # 20 frames at 10 fps, 8 targets 0.125 + 0.25 k
BASE = dict(container=MP4, codec="h264", width=64, height=48, duration=2.0, fps=10.0, frame_count=20,
            stream_index=0, video_streams=1, rotation=0, requested=8, lost=0, sampled=8, timestamps=TEN_FPS_8)

# (id, file name, write_clip kwargs or "image", expected `video` fields over BASE)
GOOD = [
    ("h264-mp4", "clip.mp4", dict(n_frames=20), {}),
    ("hevc10-mkv", "clip.mkv", dict(n_frames=20, codec="libx265", pix_fmt="yuv420p10le"),
     dict(container=MKV, codec="hevc", frame_count=None)),
    ("vp9-webm", "clip.webm", dict(n_frames=20), dict(container=MKV, codec="vp9", frame_count=None)),
    ("av1-mkv", "clip.mkv", dict(n_frames=20, codec="libsvtav1"), dict(container=MKV, codec="av1", frame_count=None)),
    ("mpeg4-avi", "clip.avi", dict(n_frames=20), dict(container="avi", codec="mpeg4")),
    ("h264-mov", "clip.mov", dict(n_frames=20), {}),
    ("gif", "clip.gif", dict(n_frames=20), dict(container="gif", codec="gif")),
    # frames at 0, .1, .15, .9, 1, 2.5, 2.6, 4 s: sampled by time, 6 distinct frames for 8 targets
    ("vfr", "vfr.mp4", dict(n_frames=8, pts=[0.0, 0.1, 0.15, 0.9, 1.0, 2.5, 2.6, 4.0]),
     dict(duration=4.1, fps=8 / 4.1, frame_count=8, sampled=6,
          timestamps=[0.15, 0.9, 1.0, 2.5, 2.6, 4.0])),
    ("single-frame", "one.mp4", dict(n_frames=1), dict(duration=0.1, frame_count=1, sampled=1, timestamps=[0.0])),
    ("16x16", "tiny.mp4", dict(n_frames=20, size=(16, 16)), dict(width=16, height=16)),
    ("4k", "uhd.mp4", dict(n_frames=2, size=(3840, 2160)),
     dict(width=3840, height=2160, duration=0.2, frame_count=2, sampled=2, timestamps=[0.0, 0.1])),
    # phone videos: display size and counter-clockwise rotation as applied
    ("rotated-90", "rot.mp4", dict(n_frames=4, rotation=90),
     dict(width=48, height=64, rotation=90, duration=0.4, frame_count=4, sampled=4, timestamps=[0.0, 0.1, 0.2, 0.3])),
    ("rotated-cw", "rot.mov", dict(n_frames=4, rotation=-90),
     dict(width=48, height=64, rotation=270, duration=0.4, frame_count=4, sampled=4, timestamps=[0.0, 0.1, 0.2, 0.3])),
    # two video streams, the second marked default: that one is read (32x32, 10 frames at 10
    # fps, targets 0.0625 + 0.125 k s)
    ("two-streams-default", "two.mp4",
     dict(n_frames=20, extra_streams=[dict(n_frames=10, size=(32, 32), index_offset=100)], default_stream=1),
     dict(width=32, height=32, duration=1.0, frame_count=10, stream_index=1, video_streams=2,
          timestamps=[0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9])),
    ("two-streams-no-default", "two.mkv",
     dict(n_frames=20, extra_streams=[dict(n_frames=10, size=(32, 32), index_offset=100)]),
     dict(container=MKV, frame_count=None, video_streams=2)),
    # a raw elementary stream: no duration, no frame count, no timestamps (FFmpeg assumes 25 fps)
    ("raw-h264-no-duration", "clip.h264", dict(n_frames=20),
     dict(container="h264", duration=0.8, fps=25.0, frame_count=None,
          timestamps=[0.04, 0.16, 0.24, 0.36, 0.44, 0.56, 0.64, 0.76])),
    # a still image is a one-frame clip (the documented choice, see video/read.py)
    ("png-still", "still.png", "image",
     dict(container="png_pipe", codec="png", duration=0.04, fps=25.0, frame_count=None, sampled=1, timestamps=[0.0])),
]


@pytest.mark.parametrize("name, kwargs, expected", [g[1:] for g in GOOD], ids=[g[0] for g in GOOD])
def test_awkward_inputs_are_answered(name, kwargs, expected, tmp_path, tiny_model_dir, capsys, monkeypatch):
    path = write_image(tmp_path / name) if kwargs == "image" else write_clip(tmp_path / name, **kwargs)
    capsys.readouterr()  # encoders' chatter
    code, out, err = ask(path, tiny_model_dir, capsys, monkeypatch)
    assert (code, err) == (0, "")
    payload = json.loads(out)
    want = {**BASE, **expected, "path": str(path)}
    got = payload["video"]
    assert got.pop("timestamps") == pytest.approx(want.pop("timestamps"))
    assert got == pytest.approx(want)
    assert payload["stats"]["frames"] == want["sampled"]  # the model saw what was sampled
    assert payload["stats"]["tokens_generated"] >= 1 and payload["answer"]


# -- 2. inputs that must give a clear error --------------------------------------------------

NOT_A_VIDEO = "not a video file (FFmpeg cannot read it)"


def _random_bytes(p: Path) -> None:
    p.write_bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _truncated(p: Path) -> None:
    data = write_clip(p, n_frames=40).read_bytes()
    p.write_bytes(data[: len(data) // 2])  # the mp4 index (moov) is at the end: gone


def _header_only(p: Path) -> None:
    data = write_clip(p, n_frames=40).read_bytes()
    p.write_bytes(data[:700])  # Matroska header, no whole frame


# (id, file name, how to make it (None: leave it missing), message after "PATH: ")
BAD = [
    ("missing", "nope.mp4", None, "no such file"),
    ("directory", "folder.mp4", lambda p: p.mkdir(), "is a directory, not a video file"),
    ("empty", "empty.mp4", lambda p: p.write_bytes(b""), "empty file"),
    ("text", "notes.txt", lambda p: p.write_text("my notes, not a video\n"), NOT_A_VIDEO),
    ("text-named-mp4", "notes.mp4", lambda p: p.write_text("a text file named like a video\n" * 40), NOT_A_VIDEO),
    ("random-bytes", "random.mkv", _random_bytes, NOT_A_VIDEO),
    ("truncated-mp4", "cut.mp4", _truncated, "damaged or truncated video file (FFmpeg cannot read it)"),
    ("truncated-mkv", "cut.mkv", _header_only, "no decodable video frame (the file is truncated or damaged)"),
    ("audio-only", "tone.m4a", lambda p: write_audio(p), "not a video file (no video stream)"),
    ("fifo", "pipe.mp4", lambda p: os.mkfifo(p), "not a regular file"),
    ("every-packet-corrupt", "dead.mp4", lambda p: write_clip(p, n_frames=10, gop=1, corrupt=range(10)),
     "no decodable video frame (the file is truncated or damaged)"),
]


@pytest.mark.parametrize("name, make, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_are_one_line_errors(name, make, message, tmp_path, tiny_model_dir, capsys, monkeypatch):
    folder = tmp_path / "videos"
    folder.mkdir()
    path = folder / name
    if make is not None:
        make(path)
    capsys.readouterr()
    # ask() also checks the folder (and so the file's bytes and mtime) is unchanged
    assert ask(path, tiny_model_dir, capsys, monkeypatch) == (1, "", f"dycoke: error: {path}: {message}\n")


def _quiet_cli(args: list[str]) -> list:
    """The CLI in-process without pytest's capture: [exit code, stdout, stderr]."""
    from dycoke_cli.cli.app import main

    saved = sys.argv
    sys.argv = ["dycoke", *args]
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as e:
                return [e.code, out.getvalue(), err.getvalue()]
    finally:
        sys.argv = saved
    return [None, out.getvalue(), err.getvalue()]


def _cli_as_nobody(args: list[str]) -> dict:
    """Run the CLI in a forked child that dropped root (root reads any file); report what the
    child saw of the file, and (exit code, stdout, stderr)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        report: dict = {}
        try:
            os.close(r)
            # Import what the CLI needs while still root: the interpreter's own files may live
            # where nobody can read (here, under /root).
            _quiet_cli(["ask", os.path.join(os.path.dirname(args[1]), "missing.mp4"), *args[2:]])
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            report["exists"] = os.path.exists(args[1])
            report["readable"] = os.access(args[1], os.R_OK)
            report["result"] = _quiet_cli(args)
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            report["crash"] = f"{type(e).__name__}: {e}"
        finally:
            os.write(w, json.dumps(report).encode())
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


def test_file_without_read_permission(tiny_model_dir, capsys, monkeypatch):
    # A folder everyone may enter (pytest's tmp_path is private to root), a file no one may read.
    # Today: (2, "", "dycoke: error: Invalid value for 'video': path '...' is not readable. (see
    # 'dycoke ask --help')").
    with tempfile.TemporaryDirectory(prefix="dycoke-perm-") as d:
        folder = Path(d)
        folder.chmod(0o755)
        path = write_clip(folder / "locked.mp4", n_frames=4)
        path.chmod(0)
        before = snapshot(folder)
        args = ["ask", str(path), QUESTION, "--model", str(tiny_model_dir), *ASK]
        if os.geteuid() == 0:
            report = _cli_as_nobody(args)
            assert (report.get("exists"), report.get("readable"), report.get("crash")) == (True, False, None)
            result = tuple(report["result"])
        else:
            result = run_cli(args, capsys, monkeypatch)
        assert snapshot(folder) == before
        path.chmod(0o644)
        assert result == (1, "", f"dycoke: error: {path}: permission denied\n")


def test_whitespace_question_is_a_usage_error(clip_path, capsys, monkeypatch):
    assert run_cli(["ask", str(clip_path), " \t\n "], capsys, monkeypatch) == (
        2, "", "dycoke: error: the question is empty\n")


# -- 3. damage in the middle: decoded around, losses counted ---------------------------------


@pytest.mark.parametrize("corrupt, frames, lost, sampled", [
    ([10, 11], "40", 2, 38),  # one target per frame (0.05 + 0.1 k): frames 10 and 11 are gone
    ([12], "8", 1, 7),  # target 1.25 s ties between frames 12 and 13, takes 12: damaged
    ([10, 11], "8", 0, 8),  # targets 0.25 + 0.5 k miss the damage
])
def test_corrupt_packets_are_decoded_around(corrupt, frames, lost, sampled, tmp_path, tiny_model_dir,
                                             capsys, monkeypatch):
    path = write_clip(tmp_path / "hurt.mp4", n_frames=40, gop=1, corrupt=corrupt)
    args = ["--json", "--max-new-tokens", "2", "--frames", frames]
    code, out, err = ask(path, tiny_model_dir, capsys, monkeypatch, args=args)
    assert (code, err) == (0, "")
    video = json.loads(out)["video"]
    assert (video["lost"], video["sampled"], video["requested"]) == (lost, sampled, int(frames))
    damaged = {round(i / 10, 3) for i in corrupt}
    assert not damaged & {round(t, 3) for t in video["timestamps"]}


# The issue asks the tool to "say which" stream it took and "say how many were lost".
def test_plain_output_says_which_stream(tmp_path, tiny_model_dir, capsys, monkeypatch):
    path = write_clip(tmp_path / "two.mp4", n_frames=20, default_stream=1,
                      extra_streams=[dict(n_frames=10, size=(32, 32), index_offset=100)])
    code, out, err = ask(path, tiny_model_dir, capsys, monkeypatch, args=["--max-new-tokens", "2", "--frames", "8"])
    assert code == 0
    assert err.splitlines()[-1].endswith("; read video stream 1 of 2 video streams"), err


def test_plain_output_says_how_many_frames_were_lost(tmp_path, tiny_model_dir, capsys, monkeypatch):
    path = write_clip(tmp_path / "hurt.mp4", n_frames=40, gop=1, corrupt=[10, 11])
    code, out, err = ask(path, tiny_model_dir, capsys, monkeypatch, args=["--max-new-tokens", "2", "--frames", "40"])
    assert code == 0
    assert err.splitlines()[-1].endswith("; 2 sampled frame(s) lost to damage"), err


# -- 7. decode timeout -----------------------------------------------------------------------


def test_decode_timeout_is_a_one_line_error(tmp_path, tiny_model_dir, capsys, monkeypatch):
    # DYCOKE_DECODE_TIMEOUT is the per-file budget of the early probe and of the sampling pass.
    monkeypatch.setenv("DYCOKE_DECODE_TIMEOUT", "1e-6")
    path = write_clip(tmp_path / "clip.mp4", n_frames=40)
    assert ask(path, tiny_model_dir, capsys, monkeypatch) == (
        1, "", f"dycoke: error: {path}: reading took longer than 1e-06 s (timeout)\n")


def test_decode_timeout_must_be_a_positive_number(clip_path, capsys, monkeypatch):
    monkeypatch.setenv("DYCOKE_DECODE_TIMEOUT", "soon")
    assert ask(clip_path, "unused-model", capsys, monkeypatch) == (
        2, "", "dycoke: error: DYCOKE_DECODE_TIMEOUT must be a number of seconds (got 'soon')\n")


# -- 4. Ctrl-C during generation -------------------------------------------------------------


def _drain(stream, chunks: list[bytes]) -> None:
    while chunk := stream.read1(4096):
        chunks.append(chunk)


@pytest.mark.timing
def test_ctrl_c_prints_the_partial_answer_and_exits_130(tiny_model_dir, clip_path):
    # The answer runs to the 4,096-token context (about 18 KB) into a pipe of one page that
    # nobody reads until the signal is sent: it cannot end first, however loaded the machine.
    _ctrl_c_once(tiny_model_dir, clip_path)


def _ctrl_c_once(tiny_model_dir, clip_path):
    cmd = [sys.executable, "-m", "dycoke_cli", "ask", str(clip_path), QUESTION, "--model", str(tiny_model_dir),
           "--max-new-tokens", "100000", "--no-compress", "--dtype", "float32"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    small_pipe.shrink(proc.stdout)
    out, err = [], []
    readers = [threading.Thread(target=_drain, args=(s, c), daemon=True) for s, c in ((proc.stdout, out), (proc.stderr, err))]
    readers[1].start()
    try:
        deadline = time.monotonic() + 60
        while not small_pipe.unread(proc.stdout) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert small_pipe.unread(proc.stdout), f"no answer text within 60 s (exit {proc.poll()}): {b''.join(err).decode()}"
        seen = proc.stdout.read1(small_pipe.unread(proc.stdout))
        out.append(seen)
        seen = seen.decode()
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        readers[0].start()
        code = proc.wait(timeout=15)
        stopped_after = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for t in readers:
        t.join(5)
    stdout, stderr = b"".join(out).decode(), b"".join(err).decode()
    print(f"\n[ctrl-c] exit {code} {stopped_after:.2f} s after SIGINT; {len(seen.split())} words printed "
          f"before it, {len(stdout.split())} in all")
    assert code == 130
    assert stopped_after < 8, stopped_after  # about 1 s here, most of it interpreter teardown
    assert "Traceback" not in stdout + stderr
    assert stderr.endswith("\ndycoke: interrupted\n")
    assert "[dycoke] generating...\n" in stderr and "[dycoke] visual tokens" not in stderr  # no summary
    # the partial answer, then one newline
    assert stdout.startswith(seen) and stdout.endswith("\n") and stdout.count("\n") == 1
    assert stdout.strip()


# -- 5. out of memory ------------------------------------------------------------------------

# In a child: load the model once (what loading needs), cap the address space a little above
# that peak, then run the CLI in-process several times under the cap.
_OOM_CHILD = r"""
import contextlib, io, json, resource, sys
def vm(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
model, margin, runs = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
from dycoke_cli.cli.app import main
from dycoke_cli.models.loader import load_model
load_model(model, device="cpu", dtype="float32")
limit = vm("VmPeak") + margin
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
report = {"limit": limit, "runs": []}
for args in runs:
    sys.argv = ["dycoke", *args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main()
            code = None
        except SystemExit as e:
            code = e.code
        except BaseException as e:
            code = f"uncaught {type(e).__name__}: {str(e)[:200]}"
    report["runs"].append([code, out.getvalue(), err.getvalue(), vm("VmPeak")])
print(json.dumps(report))
"""
OOM_FRAMES = 256
OOM_MARGIN = 500_000_000


@pytest.fixture(scope="module")
def oom_runs(tmp_path_factory):
    """One child, three runs under one address-space cap: 8 frames (fits), 256 frames with
    `ask` and with `compare` (do not: frames are encoded in chunks, so the frames' pixels never
    add up, but DyCoke keeps about 17,500 of their 36,864 tokens, and the prompt of a language model
    1,024 wide takes about 65 KB a token to prefill, its keys and values included: over 1 GB)."""
    from conftest import TINY_WORDS

    from dycoke_cli.testing.tiny import TinySpec, build_llava_onevision, build_word_tokenizer, save_checkpoint

    folder = tmp_path_factory.mktemp("oom")
    tok = build_word_tokenizer(TINY_WORDS)
    # 384 px frames as LLaVA-OV takes them, cut into 16 px patches: 144 tokens a frame; a wide text
    # model of two layers (80 MB of weights, loaded again under the cap) with a 32k context, so the
    # prompt's tokens dominate memory.
    spec = TinySpec(image_size=384, patch_size=16, text_hidden=1024, text_layers=2, text_heads=16, text_kv_heads=16,
                    text_intermediate=2048, max_position_embeddings=32768)
    model = save_checkpoint(build_llava_onevision(tok, spec), tok, folder / "model384",
                            dycoke_defaults={"num_frames": 8, "prune_layer": 1})
    clip = write_clip(folder / "many.mp4", n_frames=OOM_FRAMES, size=(384, 216), fps=25)
    common = ["--model", str(model), "--max-new-tokens", "2", "--dtype", "float32", "--device", "cpu"]
    runs = [["ask", str(clip), QUESTION, *common, "--json", "--frames", "8"],
            ["ask", str(clip), QUESTION, *common, "--json", "--frames", str(OOM_FRAMES)],
            # methods whose prompt fits the 32,768-token context at 256 frames (none's would not)
            ["compare", str(clip), QUESTION, *common, "--json", "--frames", str(OOM_FRAMES),
             "--methods", "dycoke,frames"]]
    # Few threads and malloc arenas: each reserves address space, and their number follows
    # the machine's core count, not the work. No CUDA: its driver maps tens of GB of addresses.
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "MALLOC_ARENA_MAX": "2",
           "CUDA_VISIBLE_DEVICES": ""}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _OOM_CHILD, str(model), str(OOM_MARGIN), json.dumps(runs)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    print(f"\n[oom] cap {report['limit'] / 1e6:.0f} MB address space, VmPeak after each run "
          f"{[round(r[3] / 1e6) for r in report['runs']]} MB, {time.perf_counter() - started:.1f} s")
    return report["runs"]


def test_out_of_memory_is_reported_with_settings_that_need_less(oom_runs):
    code, out, err, _ = oom_runs[0]
    assert (code, err) == (0, ""), "8 frames must fit under the cap"
    assert json.loads(out)["video"]["sampled"] == 8
    assert oom_runs[1][:3] == [1, "", "dycoke: error: out of memory; settings that need less: --frames 128, "
                                      "--ttm-k 0.85, or --dtype bfloat16\n"]


def test_out_of_memory_in_compare_is_one_line(oom_runs):
    code, out, err, _ = oom_runs[2]
    assert not str(code).startswith("uncaught"), code  # today: uncaught RuntimeError: ... can't allocate memory
    assert code == 1 and out == "" and err.startswith("dycoke: error: out of memory") and err.count("\n") == 1, code


# -- 6. an hour-long clip: bounded time and memory -------------------------------------------


# `python -m dycoke_cli` unchanged, plus an exit hook that writes the process's own peak
# resident size (VmHWM) to a file. Not ru_maxrss: wait4 / RUSAGE_CHILDREN report at least the
# RSS the parent had when it spawned the child (Linux carries the pre-exec high-water mark
# over exec), i.e. pytest's own size, not the CLI's.
_WITH_PEAK_RSS = r"""
import atexit, os, runpy, sys
def _peak():
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    with open(os.environ["DYCOKE_TEST_PEAK_FILE"], "w") as f:
        f.write(str(kib * 1024))
atexit.register(_peak)
runpy.run_module("dycoke_cli", run_name="__main__", alter_sys=True)
"""


def test_hour_long_clip_in_bounded_time_and_memory(tmp_path, tiny_model_dir):
    # One hour at 1 fps (3,600 frames of 160x120, a keyframe a minute), 32 frames asked.
    folder = tmp_path / "videos"
    folder.mkdir()
    path = write_clip(folder / "hour.mp4", n_frames=3600, fps=1, size=(160, 120), gop=60)
    before = snapshot(folder)
    peak_file = tmp_path / "peak_rss"
    cmd = [sys.executable, "-c", _WITH_PEAK_RSS, "ask", str(path), QUESTION, "--model", str(tiny_model_dir),
           "--frames", "32", "--max-new-tokens", "2", "--json", "--dtype", "float32", "--device", "cpu"]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=folder,
                                env={**os.environ, "DYCOKE_TEST_PEAK_FILE": str(peak_file)})
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    assert (proc.returncode, stderr) == (0, ""), stderr
    peak_rss = int(peak_file.read_text())
    payload = json.loads(stdout)
    video, stats = payload["video"], payload["stats"]
    print(f"\n[hour-long clip] wall {wall:.2f} s (read_video {stats['timings_s']['read_video']:.3f} s), "
          f"peak RSS {peak_rss / 2**20:.0f} MiB (VmHWM), user+sys CPU {usage.ru_utime + usage.ru_stime:.2f} s; "
          f"ru_maxrss {usage.ru_maxrss / 2**10:.0f} MiB and stats.peak_memory_bytes "
          f"{stats['peak_memory_bytes'] / 2**20:.0f} MiB (either can be pytest's own RSS at spawn)")
    assert video["duration"] == pytest.approx(3600) and (video["sampled"], video["lost"]) == (32, 0)
    # targets 56.25 + 112.5 k s, nearest frame on whole seconds
    assert video["timestamps"] == [round((k + 0.5) * 112.5) for k in range(32)]
    assert wall < 60, wall
    assert stats["timings_s"]["read_video"] < 10, stats  # about 0.05-0.1 s: 32 seeks, not 3,600 decodes
    assert peak_rss < 2 * 2**30, peak_rss  # about 400 MiB, nearly all of it torch and transformers
    assert snapshot(folder) == before


@pytest.mark.timing
def test_ctrl_c_with_json_prints_the_partial_answer_as_json(tiny_model_dir, clip_path, tmp_path):
    cmd = [sys.executable, "-m", "dycoke_cli", "ask", str(clip_path), QUESTION, "--model", str(tiny_model_dir),
           "--max-new-tokens", "100000", "--no-compress", "--dtype", "float32", "--json"]
    cache = tmp_path / "cache"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env={**os.environ, "DYCOKE_CACHE": str(cache)})
    try:
        # The clip's features reach the feature cache once encoded: the answer is being generated
        # then (to the 4096-token context: seconds more). A fixed sleep raced a fast machine.
        deadline = time.monotonic() + 120
        while not any(cache.rglob("*.safetensors")) and time.monotonic() < deadline:
            assert proc.poll() is None
            time.sleep(0.01)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert stderr.decode() == "dycoke: interrupted\n"
    payload = json.loads(stdout)
    assert payload["interrupted"] is True and set(payload) == {"answer", "interrupted"}
    assert isinstance(payload["answer"], str)


def test_a_ctrl_c_that_a_library_swallows_still_reaches_the_answer_loop(monkeypatch):
    # numpy's C check of whether a class comes from ctypes (np.dtype of a class; safetensors'
    # save reaches it with each feature-cache entry) clears any error its Python half raised: a
    # KeyboardInterrupt raised there is lost, and a Ctrl-C during a cache write once let `ask`
    # run to the end of a 4,096-token answer. raising()'s event keeps the request for the loop.
    from dycoke_cli.cli import interrupts

    monkeypatch.setattr(interrupts, "_installed", True)
    previous = signal.getsignal(signal.SIGINT)
    try:
        with interrupts.raising() as stop:

            class Signalling(type):
                @property
                def __mro__(cls):  # numpy's check reads it; the handler runs in this loop
                    _signal_and_wait(stop)
                    return (cls, object)

            try:  # numpy 2.4: no KeyboardInterrupt comes out (a later numpy may let it out)
                np.dtype(Signalling("Plain", (), {}))
            except KeyboardInterrupt:
                pass
            requested = stop.is_set()
            stop.clear()
            with pytest.raises(KeyboardInterrupt):  # and one that no library catches does
                _signal_and_wait(stop)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert requested


def _signal_and_wait(stop, seconds: float = 10.0) -> None:
    """SIGINT to this process, then Python code until its handler has run (the kernel may hand
    the signal to another thread first, so the handler can come a moment later)."""
    os.kill(os.getpid(), signal.SIGINT)
    deadline = time.monotonic() + seconds
    while not stop.is_set() and time.monotonic() < deadline:
        pass
