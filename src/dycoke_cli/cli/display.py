"""What the user sees on stderr while the tool works.

``LiveState`` is the whole picture; ``render(state)`` is a pure function of it (tested with a
Rich console writing to a string). ``LiveDisplay`` shows it through ``rich.live.Live`` on a
terminal; ``PlainDisplay`` writes a few plain lines when stderr is not a terminal;
``QuietDisplay`` writes nothing. The answer itself goes to stdout, never through these.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field

from rich.console import Console, Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from ..results import Done, FramesChosen, Planned, Progress, Stage, Token

STAGES = ("reading frames", "encoding", "prefill", "generating", "done")
REASONING_SHOWN = 600  # characters: the live panel shows the end of a long reasoning
PLAIN_EVERY_S = 5.0  # a plain progress line at most this often while a clip is read and encoded
# What chose the frame count (FrameCount.chosen_by), in words.
CHOSEN_BY = {"frames": "as asked", "rule": "the model's rule", "context": "as many as the context holds",
             "memory": "as many as the memory holds", "max_frames": "the maximum (--max-frames)",
             "clip": "every frame of the clip"}


@dataclass
class LiveState:
    stage: str = "starting"
    done: int = 0
    total: int = 0
    model: str = ""
    method: str = ""
    stats: dict = field(default_factory=dict)
    answer: str | None = None  # shown in the panel only when stdout is this same terminal
    reasoning: str = ""  # with --thinking on: the model's reasoning so far, shown dimmed
    progress: Progress | None = None  # while the clip is read and encoded


def _fmt_bytes(n) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "time left unknown yet"
    seconds = round(seconds)
    return f"about {seconds // 60} min {seconds % 60:02d} s left" if seconds >= 60 else f"about {seconds} s left"


def progress_text(p: Progress) -> str:
    """Frames decoded and encoded, and the time left, in words."""
    return f"{p.decoded}/{p.total} frames decoded, {p.encoded}/{p.total} encoded, {_duration(p.seconds_left)}"


def frames_text(s: dict) -> str | None:
    """The frame count and what chose it, e.g. "120 (as many as the context holds)"."""
    if s.get("frames_chosen_by") is None:
        return None
    return f"{s.get('frames_requested', s.get('frames'))} ({CHOSEN_BY.get(s['frames_chosen_by'], s['frames_chosen_by'])})"


def _head(state: LiveState) -> list:
    """The stage line, and a bar while a stage counts (while encoding: the frames encoded)."""
    parts: list = [Text.assemble((state.method or "dycoke", "bold cyan"), " · ", (state.stage, "yellow"))]
    done, total = state.done, state.total
    if state.progress is not None and state.stage == "encoding":
        done, total = state.progress.encoded, state.progress.total
    if total:
        bar = Table.grid(padding=(0, 1))
        bar.add_row(ProgressBar(total=total, completed=done, width=30), f"{done}/{total}")
        parts.append(bar)
    return parts


def render(state: LiveState):
    """The live panel for one state: stage line with a bar, then a two-column table of figures."""
    s = state.stats
    parts: list = _head(state)
    table = Table.grid(padding=(0, 2))
    table.add_column(style="dim")
    table.add_column()
    if state.progress is not None and state.stage == "encoding":
        table.add_row("frames", progress_text(state.progress))
    if frames_text(s) is not None:
        table.add_row("frame count", frames_text(s))
    if "visual_tokens" in s:
        table.add_row("visual tokens", f"{s['visual_tokens']} -> {s.get('visual_tokens_prefill', s['visual_tokens'])} after TTM/selection")
        table.add_row("prefill retention", _pct(s.get("prefill_retention")))
        total = s.get("visual_tokens_prefill") or 0
        active = s.get("visual_tokens_decode", total)
        layer = s.get("prune_layer")
        where = f" (layers >= {layer})" if layer is not None else ""
        pruned = s.get("pruned_layers")
        if pruned and layer is not None and list(pruned) != list(range(layer, layer + len(pruned))):  # a hybrid's
            where = f" (full-attention layers {', '.join(map(str, pruned))})"
        table.add_row("decode retention", f"{active}/{total} visual KV entries{where}")
    if "refreshes" in s:
        table.add_row("refreshes / recalls", f"{s.get('refreshes', 0)} / {s.get('recalled', 0)}")
    if "tokens_generated" in s:
        rate = s.get("decode_tokens_per_s")
        rate_txt = f"{rate:.1f} tok/s" if rate else "n/a"
        table.add_row("tokens", f"{s['tokens_generated']}  ({rate_txt})")
    if s.get("ttft_s") is not None:
        table.add_row("time to first token", f"{s['ttft_s']:.2f} s")
    setup = (s.get("timings_s") or {}).get("decode_setup")
    if setup:
        table.add_row("CUDA graph", f"captured in {setup * 1000:.0f} ms (once per session; not in tok/s)")
    elif s.get("decode_step_reused") and s.get("decode_path") == "cuda-graph":
        table.add_row("CUDA graph", "replayed (captured for an earlier answer)")
    kv = s.get("kv_bytes")
    if kv:
        where = "host" if kv.get("store_on_host") else "same device"
        extra = f" + {_fmt_bytes(kv['store'])} pruned-entry store ({where})" if kv.get("store") else ""
        table.add_row("KV cache", f"{_fmt_bytes(kv['working'])} attended{extra}")
    if s.get("peak_memory_bytes") is not None:
        table.add_row("peak memory", _fmt_bytes(s["peak_memory_bytes"]))
    if s.get("flops_ratio_estimate") is not None:
        table.add_row("speedup (est.)", f"{s['flops_ratio_estimate']:.2f}x LLM FLOPs vs uncompressed")
    for note in video_notes(s):
        table.add_row("note", note)
    parts.append(table)
    if state.reasoning:
        tail = state.reasoning[-REASONING_SHOWN:]
        cut = "..." if len(tail) < len(state.reasoning) else ""
        parts.append(Text.assemble(("thinking: ", "dim bold"), (cut + tail, "dim")))
    if state.answer is not None:
        parts.append(Text.assemble(("answer: ", "bold"), state.answer))
    return Group(*parts)


class _Base:
    def __init__(self, model: str = "", method: str = ""):
        self.state = LiveState(model=model, method=method)

    def show(self, event) -> None:
        """Take one pipeline event (results.Stage / Planned / Token / Done)."""
        if isinstance(event, Stage):
            self.stage(event.name, event.done, event.total)
        elif isinstance(event, Progress):
            self.state.progress = event
            if self.state.stage != "encoding":
                self.stage("encoding", event.encoded, event.total)
            self._changed(stage_changed=False)
        elif isinstance(event, FramesChosen):
            self.state.stats.update(frames_requested=event.count, frames_chosen_by=event.chosen_by)
            self._changed(stage_changed=False)
        elif isinstance(event, Planned):
            self.state.stats.update(asdict(event))
            self.state.stats["prefill_retention"] = event.visual_tokens_prefill / event.visual_tokens
            self._changed(stage_changed=False)
        elif isinstance(event, Token):
            self.token(event)
        elif isinstance(event, Done):
            self.finish({**event.answer.stats.to_dict(), "video": event.answer.video.to_dict()})

    def stage(self, name: str, done: int = 0, total: int = 0) -> None:
        self.state.stage, self.state.done, self.state.total = name, done, total
        self._changed(stage_changed=True)

    def token(self, event: Token) -> None:
        s = self.state.stats
        s.update(tokens_generated=event.tokens_generated, ttft_s=event.ttft_s,
                 decode_tokens_per_s=event.decode_tokens_per_s)
        if event.refreshes is not None:
            s.update(refreshes=event.refreshes, recalled=event.recalled)
        if event.reasoning:
            self.state.reasoning += event.text
        elif self.state.answer is not None:
            self.state.answer += event.text
        self._changed(stage_changed=False)

    def finish(self, stats: dict) -> None:
        self.state.stage, self.state.total = "done", 0
        self.state.stats = stats
        self._finished()

    def _changed(self, stage_changed: bool) -> None: ...
    def _finished(self) -> None: ...
    def close(self) -> None: ...


class QuietDisplay(_Base):
    pass


class PlainDisplay(_Base):
    """Non-terminal stderr: one line per stage, one summary line at the end."""

    def __init__(self, stream=None, clock=time.monotonic, **kw):
        super().__init__(**kw)
        self.stream = stream or sys.stderr
        self._last = None
        self.clock = clock
        self._progress_at: float | None = None  # when the last progress line was written

    def _changed(self, stage_changed: bool) -> None:
        if stage_changed and self.state.stage != self._last:
            self._last = self.state.stage
            print(f"[dycoke] {self.state.stage}...", file=self.stream, flush=True)
        if self.state.stage != "encoding" or self.state.progress is None:
            return
        now = self.clock()
        if stage_changed:  # the encoding began: a line every PLAIN_EVERY_S from now on (none for a short clip)
            self._progress_at = now
        elif now - self._progress_at >= PLAIN_EVERY_S:
            self._progress_at = now
            print(f"[dycoke] {progress_text(self.state.progress)}", file=self.stream, flush=True)

    def _finished(self) -> None:
        print(summary_line(self.state.stats), file=self.stream, flush=True)


def video_notes(s: dict) -> list[str]:
    """What the reader had to decide or work around: which stream, frames lost, fewer frames."""
    video = s.get("video") or {}
    notes = []
    if video.get("video_streams", 1) > 1:
        notes.append(f"read video stream {video['stream_index']} of {video['video_streams']} video streams")
    if video.get("lost"):
        notes.append(f"{video['lost']} sampled frame(s) lost to damage")
    if video and video.get("sampled", 0) + video.get("lost", 0) < video.get("requested", 0):
        notes.append(f"the clip has only {video['sampled']} distinct frames ({video['requested']} asked)")
    return notes


def summary_line(s: dict) -> str:
    frames = frames_text(s) if s.get("frames_chosen_by") not in ("frames", "rule") else None  # a bound chose
    parts = [f"[dycoke] frames {frames}"] if frames is not None else []
    parts += [f"{'' if parts else '[dycoke] '}visual tokens {s.get('visual_tokens')} -> {s.get('visual_tokens_prefill')}"
             f" (prefill {_pct(s.get('prefill_retention'))}, decode {s.get('visual_tokens_decode')})"]
    if "refreshes" in s:
        parts.append(f"refreshes {s.get('refreshes', 0)}, recalled {s.get('recalled', 0)}")
    rate = s.get("decode_tokens_per_s")
    parts.append(f"{s.get('tokens_generated', 0)} tokens" + (f" at {rate:.1f} tok/s" if rate else ""))
    if s.get("ttft_s") is not None:
        parts.append(f"ttft {s['ttft_s']:.2f} s")
    if s.get("kv_bytes"):
        parts.append(f"KV {_fmt_bytes(s['kv_bytes']['working'])} attended")
    if s.get("flops_ratio_estimate") is not None:
        parts.append(f"est. speedup {s['flops_ratio_estimate']:.2f}x")
    return "; ".join(parts + video_notes(s))


class LiveDisplay(_Base):
    """A Rich Live panel on stderr, refreshed a few times a second."""

    def __init__(self, console: Console, show_answer: bool = False, **kw):
        super().__init__(**kw)
        from rich.live import Live

        self.console = console
        if show_answer:
            self.state.answer = ""
        # With the answer in the panel, the panel goes away at the end and the CLI prints the
        # final answer (stdout) and a summary (stderr) below it.
        self.live = Live(render(self.state), console=console, refresh_per_second=8, transient=show_answer,
                         redirect_stdout=False, redirect_stderr=False)
        self.live.start()
        self._t = 0.0

    def _changed(self, stage_changed: bool) -> None:
        now = time.perf_counter()
        if stage_changed or now - self._t > 0.1:
            self._t = now
            self.live.update(render(self.state))

    def _finished(self) -> None:
        self.live.update(render(self.state))

    def close(self) -> None:
        self.live.stop()
        if self.state.answer is not None and self.state.stage == "done":
            # The transient panel is gone: leave the final figures (the answer follows on stdout).
            self.state.answer = None
            self.console.print(render(self.state))


def make_display(quiet: bool, json_mode: bool, model: str, method: str, console: Console | None = None,
                 stdout_is_terminal: bool = False):
    """Live panel on a terminal, plain lines otherwise, nothing with --quiet or --json."""
    if quiet or json_mode:
        return QuietDisplay(model=model, method=method)
    console = console or Console(stderr=True)
    if console.is_terminal:
        return LiveDisplay(console, show_answer=stdout_is_terminal, model=model, method=method)
    return PlainDisplay(model=model, method=method)


def _num(x, fmt: str, suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{fmt}}{suffix}"


def comparison_table(rows: list[dict], question: str, frames: int):
    """Methods side by side (first = baseline); words that differ from its answer in bold red."""
    table = Table(title=f"{question}  ({frames} frames; every method warmed up and prefilled from scratch, "
                        "run in this order)")
    table.add_column("", style="dim")
    for r in rows:
        table.add_column(r["method"], overflow="fold")
    def row(label, key, fmt, suffix=""):
        table.add_row(label, *[_num(r[key], fmt, suffix) for r in rows])
    answers = []
    for r in rows:
        text = Text()
        changed = set(r["diff"])
        for i, word in enumerate(r["answer"].split()):
            text.append("" if i == 0 else " ")
            text.append(word, style="bold red" if word in changed else "")
        answers.append(text)
    table.add_row("answer", *answers)
    table.add_row("visual tokens", *[f"{r['visual_tokens_prefill']} prefill / {r['visual_tokens_decode']} decode" for r in rows])
    table.add_row("retention", *[f"{100 * r['overall_retention']:.1f} %" for r in rows])
    row("prefill", "prefill_s", ".3f", " s")
    row("time to first token", "ttft_s", ".3f", " s")
    row("decode", "decode_tokens_per_s", ".1f", " tok/s")
    row("LLM total", "llm_total_s", ".3f", " s")
    table.add_row("peak memory (+)", *[_fmt_bytes(r["peak_memory_above_start_bytes"]) for r in rows])
    row("speedup (measured)", "speedup", ".2f", "x")
    row("memory ratio", "memory_ratio", ".2f", "x")
    row("FLOPs ratio (est.)", "flops_ratio_estimate", ".2f", "x")
    table.add_row("decoding steps", *[r.get("decode_path") or "n/a" for r in rows])
    return table


def eval_table(summary: dict):
    """Accuracy per question kind (rows) and method (columns) with its 95 % interval and the
    paired comparison against the first method, then retention and time (comparison_lines says
    each comparison in words)."""
    kinds = sorted({k for entry in summary.values() for k in entry.get("by_kind", {})})
    table = Table(title="accuracy by method")
    table.add_column("", style="dim")
    for method in summary:
        table.add_column(method, justify="right")
    table.add_row("overall", *[f"{100 * e['accuracy']:.1f} %" for e in summary.values()])
    table.add_row("95 % CI", *[_fmt_interval(e.get("ci95")) for e in summary.values()])
    first = next(iter(summary), "")
    table.add_row(f"vs {first}", *["baseline" if "vs_first" not in e else _fmt_paired(e["vs_first"])
                                   for e in summary.values()])
    for k in kinds:
        table.add_row(k, *[f"{100 * e['by_kind'][k]:.1f} %" if k in e.get("by_kind", {}) else "" for e in summary.values()])
    table.add_row("answers", *[str(e["n"]) for e in summary.values()])
    if any(e.get("skipped") for e in summary.values()):
        table.add_row("skipped (unreadable clip)", *[str(e["skipped"]) for e in summary.values()])
    table.add_row("retention", *[f"{100 * e['mean_retention']:.1f} %" for e in summary.values()])
    table.add_row("LLM s/answer", *[f"{e['mean_llm_s']:.3f}" for e in summary.values()])
    return table


def comparison_lines(summary: dict) -> list[str]:
    """The table's comparisons in words, one line each (never wrapped), then what the figures
    are; nothing with one method."""
    lines = [comparison_sentence(m, e["vs_first"]) for m, e in summary.items() if "vs_first" in e]
    if lines:
        lines.append("95 % CI: Wilson score interval. p: McNemar's exact test on the questions both methods "
                     "answered; a difference that is not significant at 5 % may be noise.")
    return lines


def _fmt_interval(ci) -> str:
    return "n/a" if ci is None else f"{100 * ci[0]:.1f}-{100 * ci[1]:.1f} %"


def _fmt_p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3g}"


def _fmt_paired(paired: dict) -> str:
    noise = "" if paired["significant"] else ", not significant"
    return f"{100 * paired['difference']:+.1f} pts{noise} ({_fmt_p(paired['p_value'])})"


def comparison_sentence(method: str, paired: dict) -> str:
    """One comparison in words, e.g. "dycoke vs none: -0.7 points on 300 paired questions (3 right
    only with none, 1 only with dycoke), not significant (p = 0.625)"."""
    verdict = "significant" if paired["significant"] else "not significant"
    return (f"{method} vs {paired['baseline']}: {100 * paired['difference']:+.1f} points on {paired['pairs']} "
            f"paired questions ({paired['only_baseline_right']} right only with {paired['baseline']}, "
            f"{paired['only_this_right']} only with {method}), {verdict} ({_fmt_p(paired['p_value'])})")
