import io
import re

from rich.console import Console

from dycoke_cli.cli.display import LiveState, PlainDisplay, comparison_table, render, summary_line

STATS = {
    "visual_tokens": 6272, "visual_tokens_prefill": 2968, "prefill_retention": 2968 / 6272,
    "visual_tokens_decode": 890, "prune_layer": 3, "refreshes": 3, "recalled": 120,
    "tokens_generated": 17, "decode_tokens_per_s": 7.25, "ttft_s": 9.5, "peak_memory_bytes": 3 * 1024**3,
    "flops_ratio_estimate": 2.31,
}


def render_text(renderable, width=80):
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, legacy_windows=False).print(renderable)
    return "".join(line.rstrip() + "\n" for line in buf.getvalue().splitlines())


def test_render_snapshot():
    state = LiveState(stage="generating", model="demo", method="dycoke", stats=STATS)
    assert render_text(render(state)) == (
        "dycoke · generating\n"
        "visual tokens        6272 -> 2968 after TTM/selection\n"
        "prefill retention    47.3 %\n"
        "decode retention     890/2968 visual KV entries (layers >= 3)\n"
        "refreshes / recalls  3 / 120\n"
        "tokens               17  (7.2 tok/s)\n"
        "time to first token  9.50 s\n"
        "peak memory          3.0 GB\n"
        "speedup (est.)       2.31x LLM FLOPs vs uncompressed\n"
    )


def test_render_progress_stage():
    text = render_text(render(LiveState(stage="encoding", done=8, total=32, method="none")))
    assert text.splitlines()[0] == "none · encoding"
    assert text.splitlines()[1].endswith(" 8/32")


def test_plain_fallback_lines():
    buf = io.StringIO()
    d = PlainDisplay(stream=buf, model="demo", method="dycoke")
    d.stage("reading frames")
    d.stage("encoding", 0, 8)
    d.stage("encoding", 4, 8)  # same stage: no new line
    d.stage("prefill")
    d.finish(STATS)
    assert buf.getvalue() == (
        "[dycoke] reading frames...\n[dycoke] encoding...\n[dycoke] prefill...\n" + summary_line(STATS) + "\n"
    )
    assert summary_line(STATS) == (
        "[dycoke] visual tokens 6272 -> 2968 (prefill 47.3 %, decode 890); refreshes 3, recalled 120; "
        "17 tokens at 7.2 tok/s; ttft 9.50 s; est. speedup 2.31x"
    )


def test_comparison_table_marks_changed_words():
    rows = []
    for method, answer_text in (("none", "a red cup moves left"), ("dycoke", "a red ball moves left")):
        rows.append({"method": method, "answer": answer_text, "diff": ["ball"] if method == "dycoke" else [],
                     "visual_tokens_prefill": 128, "visual_tokens_decode": 18, "overall_retention": 0.14,
                     "prefill_s": 0.5, "ttft_s": 0.6, "decode_tokens_per_s": 10.0, "llm_total_s": 1.0,
                     "peak_memory_above_start_bytes": 1024, "speedup": 1.0, "memory_ratio": 1.0,
                     "flops_ratio_estimate": 1.0, "decode_path": "cuda-graph" if method == "dycoke" else None})
    buf = io.StringIO()
    Console(file=buf, width=100, force_terminal=True, color_system="standard").print(comparison_table(rows, "q", 8))
    out = buf.getvalue()
    assert "\x1b[1;31mball\x1b[0m" in out  # bold red
    assert "\x1b[1;31mcup" not in out
    plain = re.sub(r"\x1b\[[0-9;]*m", "", out)
    assert [[cell.strip() for cell in line.split("│")[1:4]] for line in plain.splitlines()
            if "decoding steps" in line] == [["decoding steps", "n/a", "cuda-graph"]]


def test_the_panel_shows_frames_decoded_and_encoded_and_what_chose_the_count():
    from dycoke_cli.results import FramesChosen, Progress

    d = PlainDisplay(stream=io.StringIO(), model="demo", method="dycoke")
    d.show(FramesChosen(138, "context", {"context": 138, "memory": 900, "max_frames": None, "clip": 600}))
    d.show(Progress(decoded=44, encoded=40, total=138, seconds_left=95.4))
    lines = render_text(render(d.state)).splitlines()
    assert lines[0] == "dycoke · encoding" and lines[1].endswith(" 40/138")  # the bar: frames encoded
    assert lines[2:4] == ["frames       44/138 frames decoded, 40/138 encoded, about 1 min 35 s left",
                          "frame count  138 (as many as the context holds)"]


def test_plain_progress_lines_every_few_seconds_and_the_bound_in_the_summary():
    buf, now = io.StringIO(), [100.0]
    d = PlainDisplay(stream=buf, clock=lambda: now[0], model="demo", method="dycoke")
    from dycoke_cli.results import FramesChosen, Progress

    d.stage("reading frames")
    d.show(FramesChosen(64, "memory", {"context": 138, "memory": 64, "max_frames": None, "clip": 600}))
    for encoded, at in ((0, 100.0), (4, 101.0), (8, 104.9), (12, 105.0), (16, 107.0), (20, 110.1)):
        now[0] = at
        d.show(Progress(decoded=encoded + 4, encoded=encoded, total=64, seconds_left=None if not encoded else 30.0))
    d.stage("prefill")
    d.finish({**STATS, "frames_requested": 64, "frames_chosen_by": "memory"})
    assert buf.getvalue().splitlines()[:5] == [
        "[dycoke] reading frames...",
        "[dycoke] encoding...",
        "[dycoke] 16/64 frames decoded, 12/64 encoded, about 30 s left",  # 5 s after the encoding began
        "[dycoke] 24/64 frames decoded, 20/64 encoded, about 30 s left",  # 5 s after that line
        "[dycoke] prefill...",
    ]
    assert buf.getvalue().splitlines()[5].startswith("[dycoke] frames 64 (as many as the memory holds); visual")
