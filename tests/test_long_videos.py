"""Long videos (issue 33): frames by rate (--fps) or by budget (--max-frames, --frames max), the
bound that chose the count, LLaVA-OneVision's timestamps, reading a long clip by seeking, and one
probe per clip. Real clips written with PyAV, tiny checkpoints through the real loader, the real
CLI in-process and a real server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from clips import write_clip
from conftest import TINY_WORDS
from test_cli import run_cli

from dycoke_cli.decoding.prompt import render_prompt
from dycoke_cli.frame_count import choose_frames
from dycoke_cli.models.loader import load_model
from dycoke_cli.options import CompressionOptions, FrameOptions, Method
from dycoke_cli.video import read as video_read
from dycoke_cli.pipeline import encode_video
from dycoke_cli.video.read import open_clip, read_video

QUESTION = "what color is the cup?"
BIG = "1TB"  # a memory budget that never binds, whatever this machine has free


def ask(clip, model, *extra) -> list[str]:
    return ["ask", str(clip), QUESTION, "--model", str(model), "--dtype", "float32", "--max-new-tokens", "1", "-q",
            *extra]


def asked(capsys, monkeypatch, *args) -> dict:
    code, out, err = run_cli([*args, "--json"], capsys, monkeypatch)
    assert (code, err) == (0, ""), err
    return json.loads(out)


# -------------------------------------------------------------------------------- counts


@pytest.fixture(scope="module")
def families(tmp_path_factory, tiny_model_dir):
    """The tiny checkpoint of each family that counts frames its own way: LLaVA-OneVision (8
    frames in its dycoke.json, no rate), Qwen2.5-VL and Qwen3-VL (2 fps within [2, 16])."""
    from dycoke_cli.testing.tiny import (
        build_qwen2_5_vl,
        build_qwen3_vl,
        build_word_tokenizer,
        save_qwen3_checkpoint,
        save_qwen_checkpoint,
    )

    q25 = build_word_tokenizer(TINY_WORDS, family="qwen2_5_vl")
    q3 = build_word_tokenizer(TINY_WORDS, family="qwen3_vl")
    folders = {"llava_onevision": tiny_model_dir,
               "qwen2_5_vl": save_qwen_checkpoint(build_qwen2_5_vl(q25), q25, tmp_path_factory.mktemp("q25") / "m",
                                                  dycoke_defaults={"prune_layer": 2}),
               "qwen3_vl": save_qwen3_checkpoint(build_qwen3_vl(q3), q3, tmp_path_factory.mktemp("q3") / "m",
                                                 dycoke_defaults={"prune_layer": 2})}
    return {name: load_model(str(folder), device="cpu", dtype="float32") for name, folder in folders.items()}


# clip_path lasts 3.0 s. LLaVA-OV: round(3.0 * fps) within [1, max] (max: --max-frames, else its 8 frames);
# Qwen2.5-VL round() and Qwen3-VL int() of 3.0 * fps within [2, max] (max: --max-frames, else 16), even.
@pytest.mark.parametrize("family, fps, max_frames, count", [
    ("llava_onevision", None, None, 8), ("llava_onevision", 2, None, 6), ("llava_onevision", 2.5, None, 8),
    ("llava_onevision", 0.1, None, 1), ("llava_onevision", None, 5, 5), ("llava_onevision", 4, None, 8),
    ("llava_onevision", 4, 10, 10),
    ("qwen2_5_vl", None, None, 6), ("qwen2_5_vl", 2.5, None, 8), ("qwen2_5_vl", 3, None, 8),
    ("qwen2_5_vl", 10, None, 16), ("qwen2_5_vl", 10, 20, 20), ("qwen2_5_vl", 0.1, None, 2),
    ("qwen2_5_vl", None, 4, 4),
    ("qwen3_vl", None, None, 6), ("qwen3_vl", 2.5, None, 6), ("qwen3_vl", 3.1, None, 8),
    ("qwen3_vl", 10, 21, 20), ("qwen3_vl", 0.1, None, 2),
])
def test_fps_and_max_frames_give_the_rules_count(families, clip_path, family, fps, max_frames, count):
    lm = families[family]
    chosen = choose_frames(lm, open_clip(clip_path).info, FrameOptions(fps=fps, max_frames=max_frames, memory_budget=2**40),
                           CompressionOptions().resolve(lm), render_prompt(lm, QUESTION))
    assert (chosen.count, chosen.chosen_by) == (count, "rule")


def test_the_cli_samples_by_rate_for_each_family(families, tiny_model_dir, clip_path, capsys, monkeypatch):
    payload = asked(capsys, monkeypatch, *ask(clip_path, tiny_model_dir, "--fps", "2"))
    assert (payload["stats"]["frames_requested"], payload["video"]["sampled"]) == (6, 6)
    assert payload["options"]["fps"] == 2.0 and payload["stats"]["frames_chosen_by"] == "rule"
    q3 = families["qwen3_vl"].path
    payload = asked(capsys, monkeypatch, *ask(clip_path, q3, "--fps", "10", "--max-frames", "12"))
    assert (payload["stats"]["frames_requested"], payload["stats"]["frames"]) == (12, 6)  # 6 steps of 2 frames


# -------------------------------------------------------------------------------- --frames max


@pytest.fixture(scope="module")
def short_context(tmp_path_factory):
    """The tiny LLaVA-OneVision with a 256-token context: with the question's 13 tokens of text,
    243 positions for frames of 4 tokens: 60 frames uncompressed; DyCoke's TTM keeps 7 tokens of
    every window of 4 frames (a whole anchor and 1 token of each other frame): 138 frames."""
    from dycoke_cli.testing.tiny import TinySpec, build_llava_onevision, build_word_tokenizer, save_checkpoint

    tok = build_word_tokenizer(TINY_WORDS)
    model = build_llava_onevision(tok, TinySpec(max_position_embeddings=256), seed=0)
    return save_checkpoint(model, tok, tmp_path_factory.mktemp("short") / "model",
                           dycoke_defaults={"num_frames": 8, "prune_layer": 2})


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    """Ten minutes at 1 fps, 32x24: 600 frames, more than any context here holds."""
    return write_clip(tmp_path_factory.mktemp("long") / "long.mp4", n_frames=600, fps=1, size=(32, 24), gop=30)


@pytest.mark.parametrize("method, most", [("none", 60), ("dycoke", 138)])
def test_frames_max_is_the_most_the_context_holds(short_context, long_clip, capsys, monkeypatch, method, most):
    payload = asked(capsys, monkeypatch, *ask(long_clip, short_context, "--frames", "max", "--method", method,
                                              "--memory-budget", BIG))
    stats = payload["stats"]
    assert (stats["frames_requested"], payload["video"]["sampled"], stats["frames_chosen_by"]) == (most, most, "context")
    assert stats["frame_bounds"]["context"] == most and stats["frame_bounds"]["clip"] == 600
    assert payload["options"]["frames_asked"] == "max" and payload["options"]["frames"] == most
    code, out, err = run_cli(ask(long_clip, short_context, "--frames", str(most + 1), "--method", method,
                                 "--memory-budget", BIG), capsys, monkeypatch)
    assert (code, out, err) == (2, "", f"dycoke: error: --frames must be in [1, {most}] for this model: its 256-token "
                                       f"context holds at most {most} frames of 4 visual tokens with method {method} "
                                       f"(got {most + 1})\n")


def test_frames_max_within_a_memory_budget(short_context, long_clip, capsys, monkeypatch):
    budget = "1MB"
    payload = asked(capsys, monkeypatch, *ask(long_clip, short_context, "--frames", "max", "--memory-budget", budget))
    stats = payload["stats"]
    most = stats["frames_requested"]
    assert stats["frames_chosen_by"] == "memory" and stats["frame_bounds"]["memory"] == most
    assert 1 <= most < stats["frame_bounds"]["context"] == 138
    code, out, err = run_cli(ask(long_clip, short_context, "--frames", str(most + 1), "--memory-budget", budget),
                             capsys, monkeypatch)
    assert (code, out) == (2, "")
    assert err.startswith(f"dycoke: error: --frames must be in [1, {most}] in this memory: {most + 1} frames need an "
                          "estimated ") and err.endswith(f" above the loaded model, more than --memory-budget 1.0 MiB "
                                                         f"(got {most + 1})\n") and err.count("\n") == 1


def test_frames_max_takes_every_frame_of_a_short_clip_and_max_frames_bounds_it(tiny_model_dir, clip_path, capsys,
                                                                              monkeypatch):
    payload = asked(capsys, monkeypatch, *ask(clip_path, tiny_model_dir, "--frames", "max", "--memory-budget", BIG))
    assert (payload["stats"]["frames_requested"], payload["stats"]["frames_chosen_by"]) == (30, "clip")
    payload = asked(capsys, monkeypatch, *ask(clip_path, tiny_model_dir, "--frames", "max", "--max-frames", "12",
                                              "--memory-budget", BIG))
    assert (payload["stats"]["frames_requested"], payload["stats"]["frames_chosen_by"]) == (12, "max_frames")


# -------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("args, message", [
    (["--fps", "0"], "--fps must be in (0, 240] (got 0.0)"),
    (["--fps", "-1"], "--fps must be in (0, 240] (got -1.0)"),
    (["--fps", "nan"], "--fps must be in (0, 240] (got nan)"),
    (["--fps", "inf"], "--fps must be in (0, 240] (got inf)"),
    (["--fps", "1e9"], "--fps must be in (0, 240] (got 1000000000.0)"),
    (["--max-frames", "0"], "--max-frames must be at least 1 (got 0)"),
    (["--max-frames", "-5"], "--max-frames must be at least 1 (got -5)"),
    (["--frames", "0"], "--frames must be at least 1 (got 0)"),
    (["--frames", "lots"], "--frames must be a whole number of frames or 'max' (got 'lots')"),
    (["--frames", "2.5"], "--frames must be a whole number of frames or 'max' (got '2.5')"),
    (["--frames", "8", "--fps", "2"], "--fps sets the rate of the model's rule, which a frame count replaces "
                                      "(got both: 8 frames and 2 fps)"),
    (["--frames", "9", "--max-frames", "4"], "--frames must be at most the maximum, 4 (got 9)"),
    (["--memory-budget", "0"], "--memory-budget must be a positive size such as 512MB or 8GB (got '0')"),
    (["--memory-budget", "-2GB"], "--memory-budget must be a positive size such as 512MB or 8GB (got '-2GB')"),
    (["--memory-budget", "nanGB"], "--memory-budget must be a positive size such as 512MB or 8GB (got 'nanGB')"),
    (["--memory-budget", "lots"], "--memory-budget must be a positive size such as 512MB or 8GB (got 'lots')"),
    (["--frames", "100000000000"], "--frames must be in [1, 2332] for this model: its 4096-token context holds at "
                                   "most 2332 frames of 4 visual tokens with method dycoke (got 100000000000)"),
])
def test_bad_frame_settings_are_one_line_usage_errors(tiny_model_dir, clip_path, capsys, monkeypatch, args, message):
    assert run_cli(ask(clip_path, tiny_model_dir, *args), capsys, monkeypatch) == (2, "", f"dycoke: error: {message}\n")


# -------------------------------------------------------------------------------- timestamps


TIMES = ("The video lasts for 3.00 seconds, and 8 frames are uniformly sampled from it. These frames are located at "
         "0.20s,0.60s,0.90s,1.30s,1.70s,2.10s,2.40s,2.80s.Please answer the following questions related to this video.")


def test_timestamps_follow_lmms_eval_and_are_off_by_default(tiny_lm, clip_path):
    from dycoke_cli import Session

    assert tiny_lm.time_instruction(12.345, (0.5, 1.25)) == (
        "The video lasts for 12.35 seconds, and 2 frames are uniformly sampled from it. These frames are located at "
        "0.50s,1.25s.Please answer the following questions related to this video.")
    plain = Session(tiny_lm, clip_path)
    without = plain.ask(QUESTION)
    assert plain.encoded.time_instruction is None
    timed = Session(tiny_lm, clip_path, frames=FrameOptions(timestamps=True))
    with_times = timed.ask(QUESTION)
    assert timed.encoded.time_instruction == TIMES
    assert timed.encoded.prompt_question(QUESTION) == f"{TIMES}\n{QUESTION}"
    tokens = lambda text: len(tiny_lm.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    grown = tokens(f"{TIMES}\n{QUESTION}") - tokens(QUESTION)  # the prompt carries the instruction, nothing else
    assert with_times.stats.prefill_tokens == without.stats.prefill_tokens + grown > without.stats.prefill_tokens
    assert Session(tiny_lm, clip_path, frames=FrameOptions(timestamps=False)).ask(QUESTION).token_ids == \
        without.token_ids


def test_a_checkpoint_turns_timestamps_on_and_the_flag_off(tiny_model_dir, clip_path, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "timed"
    shutil.copytree(tiny_model_dir, folder)
    settings = json.loads((folder / "dycoke.json").read_text())
    (folder / "dycoke.json").write_text(json.dumps({**settings, "timestamps": True}))
    default = asked(capsys, monkeypatch, *ask(clip_path, tiny_model_dir))
    on = asked(capsys, monkeypatch, *ask(clip_path, folder))
    off = asked(capsys, monkeypatch, *ask(clip_path, folder, "--no-timestamps"))
    assert off["stats"]["prefill_tokens"] == default["stats"]["prefill_tokens"] < on["stats"]["prefill_tokens"]
    (folder / "dycoke.json").write_text(json.dumps({**settings, "timestamps": "yes"}))
    code, _, err = run_cli(ask(clip_path, folder), capsys, monkeypatch)
    assert (code, err) == (1, f'dycoke: error: {folder}/dycoke.json: timestamps must be true or false (got "yes")\n')


# -------------------------------------------------------------------------------- long clips


def _fastest(read, runs: int = 3) -> float:
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        read()
        best = min(best, time.perf_counter() - started)
    return best


def test_a_long_clip_reads_by_seeking(long_clip, clip_path):
    """16 frames of a 10-minute clip (600 frames, a keyframe every 30) against 16 of a 3-second one
    (30 frames): seeking decodes about 16 short runs, not the 600 frames."""
    short = _fastest(lambda: read_video(open_clip(clip_path), 16))
    long = _fastest(lambda: read_video(open_clip(long_clip), 16))
    video = read_video(open_clip(long_clip), 16)
    assert video.info.timestamps == tuple(round((k + 0.5) * 37.5) for k in range(16))  # targets 18.75 + 37.5 k
    print(f"\n[long clip] 16 frames of 600 s: {long * 1000:.0f} ms; of 3 s: {short * 1000:.0f} ms")
    assert long < 8 * short + 0.05, (long, short)


def test_peak_memory_while_encoding_stays_flat_as_frames_grow():
    """The benchmark's own measurement (benchmarks/bench_long.py, --quick): the read-and-encode
    stage's peak above its start, at 16 and 96 frames of frames decoded at 224 px (each frame
    150 KB as RGB, 600 KB as the model's input: 96 of them held at once would be 70 MB)."""
    sys.path.insert(0, str(os.path.join(os.path.dirname(__file__), "..", "benchmarks")))
    import bench_long

    peaks = bench_long.encoding_peaks([16, 96], seconds=120)
    print(f"\n[encoding peak] {', '.join(f'{n} frames: {p / 2**20:.1f} MiB' for n, p in peaks.items())}")
    assert peaks[96] < 2 * peaks[16] + 16 * 2**20, peaks


# -------------------------------------------------------------------------------- one probe per clip


@pytest.fixture()
def probes(monkeypatch):
    """Counts the clip's probes: measuring its timing (a second handle demuxing the end of the stream)
    is what a probe does, once per clip; the real function runs."""
    calls = []
    measure = video_read.measure_timing

    def counted(source):
        calls.append(source.reading.path)
        return measure(source)

    monkeypatch.setattr(video_read, "measure_timing", counted)
    return calls


def test_dycoke_ask_probes_the_clip_once(probes, clip_path, capsys, monkeypatch):
    # the demo model's count follows the clip's length (2 fps): once to check it, once for the count,
    # once to read it, before
    payload = asked(capsys, monkeypatch, "ask", str(clip_path), QUESTION, "--model", "demo", "--no-cache",
                    "--max-new-tokens", "1")
    assert payload["stats"]["frames_requested"] == 6 and probes == [str(clip_path)]


def test_a_server_request_probes_the_clip_once(probes, clip_path, tmp_path):
    import uvicorn

    from dycoke_cli.server.app import _listen, create_app
    from dycoke_cli.server.service import ServerConfig

    shutil.copy(clip_path, tmp_path / "clip.mp4")
    config = ServerConfig(allowed_media=tmp_path, quiet=True).check()
    app = create_app(load_model("demo"), config)
    sock = _listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        body = {"model": "demo", "max_tokens": 1, "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": f"file://{tmp_path}/clip.mp4"}},
            {"type": "text", "text": QUESTION}]}]}
        request = urllib.request.Request(f"http://127.0.0.1:{sock.getsockname()[1]}/v1/chat/completions",
                                         data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(request, timeout=120).read())
    finally:
        server.should_exit = True
        thread.join(60)
        app.state.server.runner.stop(wait=True)
        sock.close()
    assert reply["dycoke"]["stats"]["frames_requested"] == 6
    assert len(probes) == 1 and probes[0].startswith("/proc/self/fd/")  # the file opened once, never by name


# -------------------------------------------------------------------------------- an hour-long file


@pytest.fixture(scope="module")
def hour_clip(tmp_path_factory):
    """One hour at 1 fps: 3,600 frames of 32x24, a keyframe a minute."""
    return write_clip(tmp_path_factory.mktemp("hour") / "hour.mp4", n_frames=3600, fps=1, size=(32, 24), gop=60)


def test_an_hour_long_file_answers_with_frames_max(hour_clip, capsys, monkeypatch):
    payload = asked(capsys, monkeypatch, "ask", str(hour_clip), QUESTION, "--model", "demo", "--frames", "max",
                    "--no-cache", "--max-new-tokens", "2")
    stats, video = payload["stats"], payload["video"]
    assert video["duration"] == pytest.approx(3600) and stats["frames_chosen_by"] == "context"
    assert video["sampled"] == stats["frames_requested"] == stats["frame_bounds"]["context"] > 16
    assert stats["frame_bounds"]["clip"] == 3600


@pytest.mark.timing
def test_ctrl_c_while_an_hour_long_file_is_encoded_exits_130(hour_clip, tiny_model_dir, tmp_path):
    cmd = [sys.executable, "-m", "dycoke_cli", "ask", str(hour_clip), QUESTION, "--model", str(tiny_model_dir),
           "--frames", "max", "--no-cache", "--memory-budget", BIG]  # not quiet: the stages on stderr
    err_path = tmp_path / "stderr"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while "[dycoke] encoding..." not in err_path.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, err_path.read_text()
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = err_path.read_text()
    if "[dycoke] prefill..." in stderr:
        pytest.skip("the encoding ended before the signal")
    assert (proc.returncode, out) == (130, b"")
    assert "[dycoke] encoding..." in stderr and stderr.splitlines()[-1] == "dycoke: interrupted", stderr
    assert "Traceback" not in stderr


def test_encoding_between_chunks_is_not_reading_time(long_clip):
    """DYCOKE_DECODE_TIMEOUT bounds the reading; the time the caller spends on each chunk (the
    vision tower) does not count: here 4 chunks a quarter of a second each, under a 0.5 s bound."""
    chunks = []
    for chunk in video_read.read_chunks(open_clip(long_clip), 8, 2, timeout_s=0.5):
        chunks.append(chunk.timestamps)
        time.sleep(0.25)  # stands in for encoding the chunk
    assert [len(c) for c in chunks] == [2, 2, 2, 2]


def test_the_feature_cache_keeps_chunks_and_an_interrupted_encoding_goes_on(tiny_lm, long_clip, tmp_path):
    """200 frames: entries of 64, 64, 64 and 8 frames. An encoding stopped after 140 frames kept its
    first two entries; the next one reads and encodes only the 72 frames after them, and gives the
    features and times of an encoding in one go."""
    import torch

    from dycoke_cli.encoder import encoding
    from dycoke_cli.feature_cache import FeatureCache
    from dycoke_cli.results import Progress

    clip = open_clip(long_clip)
    whole = encode_video(tiny_lm, clip, 200)  # no cache
    cache = FeatureCache(tmp_path / "cache")
    events = encoding(tiny_lm, clip, 200, cache=cache)
    for event in events:
        if isinstance(event, Progress) and event.encoded >= 140:
            events.close()  # as Ctrl-C would: the generator stops here
            break
    assert len(cache.entries()) == 2
    progress = []
    events = encoding(tiny_lm, clip, 200, cache=cache)
    while True:
        try:
            event = next(events)
        except StopIteration as stop:
            resumed = stop.value
            break
        if isinstance(event, Progress):
            progress.append(event.encoded)
    assert progress[0] == 128 and progress[-1] == 200 and len(progress) == 2 * 72 // 4
    assert torch.equal(resumed.features, whole.features) and resumed.video.info == whole.video.info
    assert len(cache.entries()) == 4
    hit = encode_video(tiny_lm, clip, 200, cache=cache)
    assert hit.encode_s == 0.0 and torch.equal(hit.features, whole.features) and hit.video.info == whole.video.info


def test_a_budget_that_holds_no_frame_says_so(tiny_model_dir, clip_path, capsys, monkeypatch):
    for frames in ("max", "4"):
        code, out, err = run_cli(ask(clip_path, tiny_model_dir, "--frames", frames, "--memory-budget", "100"),
                                 capsys, monkeypatch)
        assert (code, out) == (2, "") and err.count("\n") == 1
        assert err.startswith("dycoke: error: --memory-budget holds no frame: one needs an estimated ")
        assert err.endswith(" above the loaded model, more than --memory-budget 0.0 MiB\n")
