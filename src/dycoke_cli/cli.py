"""The `dycoke` command line: parse, call the pipeline, show progress, map errors to exits.

Kept thin and fast to import: torch and transformers are imported only inside commands, so
`dycoke --help` does not pay for them. Options shared by several commands are declared once
(``_OPTIONS``) and added to each command by :func:`_with`; the command receives them as one
:class:`Flags` object.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__, interrupts
from .errors import DycokeError, OutputError, UsageError
from .options import REFRESH_THRESHOLD, CompressionOptions, Method, OptionError, Positions, SamplingOptions

app = typer.Typer(
    name="dycoke",
    help="Ask questions about videos with a video LLM, made fast by DyCoke token compression.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class DeviceChoice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DtypeChoice(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


# -------------------------------------------------------------------------------- options
# name -> (annotation, default). Declared once; each command lists the ones it takes.

_OPTIONS: dict[str, tuple[object, object]] = {
    "model": (Annotated[Optional[str], typer.Option("--model", "-m", show_default=False, help="Model folder, Hugging Face id, or 'demo'. Default: $DYCOKE_MODEL or llava-hf/llava-onevision-qwen2-0.5b-ov-hf.")], None),
    "frames": (Annotated[Optional[int], typer.Option("--frames", "-f", show_default=False, help="Frames to sample uniformly by time \\[default: the model's, 32 for LLaVA-OV]; at most what the model's context holds.")], None),
    "method": (Annotated[Method, typer.Option("--method", help="Compression: dycoke, or a baseline at the same visual-token budget, or none.")], Method.dycoke),
    "methods": (Annotated[str, typer.Option("--methods", help="Comma-separated methods, first = baseline: none, dycoke, fastv, random, frames.")], "none,dycoke"),
    "ttm_k": (Annotated[Optional[float], typer.Option("--ttm-k", show_default=False, help="TTM: fraction of tokens dropped from compared frames, in [0, 1) \\[default: model's, 0.7].")], None),
    "prune_p": (Annotated[Optional[float], typer.Option("--prune-p", show_default=False, help="Decode pruning: fraction of visual KV entries pruned, in [0, 1) \\[default: model's, 0.7].")], None),
    "prune_layer": (Annotated[Optional[int], typer.Option("--prune-layer", show_default=False, help="First layer L whose attention is pruned (layer L-1 is probed) \\[default: model's, 3].")], None),
    "refresh_threshold": (Annotated[float, typer.Option("--refresh-threshold", help="Re-select visual tokens when attention similarity falls below this, in [0, 1].")], REFRESH_THRESHOLD),
    "frame_coverage": (Annotated[float, typer.Option("--frame-coverage", help="Share of the decode budget spread evenly over frames, in [0, 1]; 0 = the paper's top-k (not in the paper).")], 0.0),
    "positions": (Annotated[Optional[Positions], typer.Option("--positions", show_default=False, help="Position ids of kept visual tokens: contiguous (the paper) or original (as in the full video) \\[default: the model's, contiguous].")], None),
    "no_compress": (Annotated[bool, typer.Option("--no-compress", help="Same as --method none.")], False),
    "offload_pruned": (Annotated[bool, typer.Option("--offload-pruned", help="Keep pruned KV entries in host memory instead of on the accelerator.")], False),
    "max_new_tokens": (Annotated[int, typer.Option("--max-new-tokens", help="Stop after this many tokens.")], 256),
    "temperature": (Annotated[float, typer.Option("--temperature", help="0 = greedy, else in [0.01, 100].")], 0.0),
    "top_p": (Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass, in (0, 1].")], 1.0),
    "seed": (Annotated[Optional[int], typer.Option("--seed", show_default=False, help="Seed for sampling and the random baseline, in [0, 2^64 - 1].")], None),
    "device": (Annotated[DeviceChoice, typer.Option("--device", help="Where to run.")], DeviceChoice.auto),
    "dtype": (Annotated[DtypeChoice, typer.Option("--dtype", help="auto: fp16/bf16 on CUDA, bf16 on CPUs with AVX-512 BF16/AMX, else fp32.")], DtypeChoice.auto),
    "allow_pickle": (Annotated[bool, typer.Option("--allow-pickle", help="Also load pickle (.bin) weights. Only for checkpoints you trust.")], False),
    "no_cache": (Annotated[bool, typer.Option("--no-cache", help="Encode the clip afresh: neither read nor write the feature cache (`dycoke cache info`).")], False),
    "json_out": (Annotated[bool, typer.Option("--json", help="Print JSON instead of text: one object per answer, one per line.")], False),
    "quiet": (Annotated[bool, typer.Option("--quiet", "-q", help="No progress or stats on stderr.")], False),
}

MODEL = ("model", "device", "dtype", "allow_pickle", "no_cache")
COMPRESSION = ("ttm_k", "prune_p", "prune_layer", "refresh_threshold", "frame_coverage", "positions", "offload_pruned")
SAMPLING = ("max_new_tokens", "temperature", "top_p")
OUTPUT = ("json_out", "quiet")
ANSWER = ("frames", "method", *COMPRESSION, "no_compress", *SAMPLING, "seed", *MODEL, *OUTPUT)


@dataclass(frozen=True)
class Flags:
    """The shared options one command was given (those it does not take keep their defaults)."""

    model: str | None = None
    frames: int | None = None
    method: Method = Method.dycoke
    methods: str = "none,dycoke"
    ttm_k: float | None = None
    prune_p: float | None = None
    prune_layer: int | None = None
    refresh_threshold: float = REFRESH_THRESHOLD
    frame_coverage: float = 0.0
    positions: Positions | None = None
    no_compress: bool = False
    offload_pruned: bool = False
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    device: DeviceChoice = DeviceChoice.auto
    dtype: DtypeChoice = DtypeChoice.auto
    allow_pickle: bool = False
    no_cache: bool = False
    json_out: bool = False
    quiet: bool = False

    @property
    def model_name(self) -> str:
        from .model import DEFAULT_MODEL

        return self.model or os.environ.get("DYCOKE_MODEL") or DEFAULT_MODEL

    def compression(self, method: Method | None = None) -> CompressionOptions:
        method = method or (Method.none if self.no_compress else self.method)
        return CompressionOptions(method=method, ttm_k=self.ttm_k, prune_p=self.prune_p, prune_layer=self.prune_layer,
                                  refresh_threshold=self.refresh_threshold, offload_pruned=self.offload_pruned,
                                  seed=self.seed if self.seed is not None else 0, frame_coverage=self.frame_coverage,
                                  positions=self.positions).validate()

    def sampling(self) -> SamplingOptions:
        return SamplingOptions(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                               seed=self.seed).validate()

    def check(self) -> None:
        """Everything that can be checked before touching the video or the model."""
        if self.frames is not None and self.frames < 1:
            raise OptionError("frames", f"must be at least 1 (got {self.frames})")
        self.compression()
        self.sampling()

    def feature_cache(self):
        """The on-disk feature cache, or None with --no-cache."""
        from .feature_cache import FeatureCache

        return None if self.no_cache else FeatureCache()

    def locate(self) -> None:
        """Find and check the model folder (cheap: no weights are read)."""
        from .model import locate_model

        locate_model(self.model_name, self.allow_pickle)

    def load(self):
        from .model import load_model

        return load_model(self.model_name, device=self.device.value, dtype=self.dtype.value,
                          allow_pickle=self.allow_pickle)


def _with(*names: str, **defaults):
    """Add the shared options ``names`` to a command; it receives them as ``flags: Flags``.
    ``defaults`` overrides a shared default for this command."""

    def decorate(fn):
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "flags"]
        shared = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=_OPTIONS[n][0],
                                    default=defaults.get(n, _OPTIONS[n][1])) for n in names]

        @functools.wraps(fn)
        def command(**kwargs):
            flags = Flags(**{n: kwargs.pop(n) for n in names})
            return fn(**kwargs, flags=flags)

        command.__signature__ = inspect.Signature(own + shared)
        return command

    return decorate


def _version(value: bool) -> None:
    if value:
        _out(f"dycoke {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Show the version and exit.", callback=_version, is_eager=True)] = False,
) -> None:
    """Ask questions about videos with a video LLM, made fast by DyCoke token compression."""


# -------------------------------------------------------------------------------- output


class _ReaderLeft(Exception):
    """Stdout's reader closed the pipe (`| head`): no error, the run just ends. (Not an OSError,
    which click would turn into a silent exit 1 of its own.)"""


def _out(text: str) -> None:
    """Write to stdout now; a stdout that cannot be written is an OutputError."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise _ReaderLeft from None
    except (OSError, ValueError) as exc:
        raise OutputError(f"cannot write the output ({getattr(exc, 'strerror', None) or exc})") from None


def _out_rich(renderable) -> None:
    """A Rich renderable on stdout, rendered for stdout's terminal (or plain when piped)."""
    from rich.console import Console

    console = Console()
    with console.capture() as captured:
        console.print(renderable)
    _out(captured.get())


def _decode_timeout() -> float:
    """Seconds one file may take to decode (DYCOKE_DECODE_TIMEOUT, default 60)."""
    raw = os.environ.get("DYCOKE_DECODE_TIMEOUT", "60")
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"DYCOKE_DECODE_TIMEOUT must be a number of seconds (got {raw!r})") from None
    if not 0 < value < float("inf"):
        raise UsageError(f"DYCOKE_DECODE_TIMEOUT must be a positive number of seconds (got {raw})")
    return value


def _check_video(path: Path) -> None:
    """Fail fast on a bad video, before paying for a model load."""
    from .video import probe_video

    probe_video(path, timeout_s=_decode_timeout())


def _check_question(question: str | None) -> None:
    if question is not None and not question.strip():
        raise UsageError("the question is empty")


class _Answering:
    """One answer on its way out: events feed the display, the text streams to stdout unless
    the live panel shows it, and an interrupt prints what came so far."""

    def __init__(self, display, json_out: bool):
        self.display = display
        self.json_out = json_out
        self.stream_stdout = not json_out and display.state.answer is None
        self.text = ""  # the answer so far
        self.answer = None  # results.Answer, at the end

    def show(self, event) -> None:
        from .results import Done, Token

        self.display.show(event)
        if isinstance(event, Token):
            self.text += event.text
            if self.stream_stdout:
                _out(event.text)
        elif isinstance(event, Done):
            self.answer = event.answer

    def interrupted_output(self) -> str:
        """What stdout gets when the run is interrupted: the partial answer (or JSON of it)."""
        if self.json_out:
            return json.dumps({"answer": self.text.strip(), "interrupted": True}) + "\n"
        if self.text:  # streamed already: end the line; shown only in the panel: print it now
            return "\n" if self.stream_stdout else self.text + "\n"
        return ""

    def final_output(self, model: dict) -> str:
        from .results import answer_json

        if self.json_out:
            return json.dumps(answer_json(self.answer, model), default=str) + "\n"
        # streamed: end the line; shown in the live panel: now the real stdout
        return "\n" if self.stream_stdout else self.answer.text + "\n"


def _run_answers(video: Path, questions: list[str | None], flags: Flags) -> None:
    """Answer each question in turn (None: the caption prompt) in one session: the model is
    loaded and the clip encoded once."""
    flags.check()
    for question in questions:
        _check_question(question)
    _check_video(video)
    flags.locate()
    settings = _RunSettings(flags.frames, flags.compression().ttm_k, flags.compression().method.value,
                            None if flags.dtype.value == "auto" else f"torch.{flags.dtype.value}")
    session = None
    for question in questions:
        session = _answer_one(video, question, flags, session, settings)


def _answer_one(video: Path, question: str | None, flags: Flags, session, settings: _RunSettings):
    """One answer through the display and stdout; loads the model into a new session first."""
    from .display import make_display
    from .session import Session

    display = make_display(flags.quiet, flags.json_out, flags.model_name, flags.compression().method.value,
                           stdout_is_terminal=bool(sys.stdout.isatty()))
    out = _Answering(display, flags.json_out)
    interrupts.on_interrupt(out.interrupted_output, display.close)
    try:
        with _oom_guard(settings):
            if session is None:
                display.stage("loading model")
                lm = flags.load()
                session = Session(lm, video, frames=flags.frames, compression=flags.compression(),
                                  cache=flags.feature_cache(), timeout_s=_decode_timeout())
                settings.update_from(lm, flags.frames or lm.default_frames(video), session.compression)
            question = question if question is not None else session.lm.defaults.caption_prompt
            with interrupts.raising():
                for event in session.stream(question, flags.sampling()):
                    out.show(event)
    except KeyboardInterrupt:
        display.close()
        _out(out.interrupted_output())
        sys.stderr.write("dycoke: interrupted\n")
        raise typer.Exit(130)
    finally:
        interrupts.on_interrupt(None, None)
        display.close()
    _out(out.final_output(session.lm.describe()))
    return session


class _RunSettings:
    """What a run uses, filled in as it becomes known, for out-of-memory advice."""

    def __init__(self, frames=None, ttm_k=None, method=None, dtype=None):
        self.frames, self.ttm_k, self.method, self.dtype = frames, ttm_k, method, dtype

    def update_from(self, lm, frames: int, compression) -> None:
        self.frames, self.ttm_k = frames, compression.ttm_k
        self.method, self.dtype = Method(compression.method).value, str(lm.dtype)


@contextmanager
def _oom_guard(settings: _RunSettings):
    """Turn an out-of-memory failure (host or GPU) into one line with settings that need less."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - everything else propagates unchanged
        if _is_oom(exc):
            raise DycokeError(_oom_advice(settings)) from None
        raise


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _oom_advice(s: _RunSettings) -> str:
    tips = []
    if s.frames is None:
        tips.append("fewer --frames")
    elif s.frames > 1:
        tips.append(f"--frames {s.frames // 2}")
    if s.method in (None, "dycoke") and (s.ttm_k is None or s.ttm_k < 0.9):
        tips.append(f"--ttm-k {min(0.9, round((s.ttm_k if s.ttm_k is not None else 0.7) + 0.15, 2))}")
    elif s.method in ("none", "random", "frames", "fastv"):
        tips.append("--method dycoke")
    if s.dtype in (None, "torch.float32"):
        tips.append("--dtype bfloat16")
    if not tips:
        return "out of memory even at the smallest settings; try a machine with more memory"
    listed = tips[0] if len(tips) == 1 else ", ".join(tips[:-1]) + f"{',' if len(tips) > 2 else ''} or {tips[-1]}"
    return f"out of memory; settings that need less: {listed}"


# -------------------------------------------------------------------------------- commands

VideoArg = Annotated[Path, typer.Argument(help="Video file (anything FFmpeg reads).", show_default=False, readable=False)]


@app.command()
@_with(*ANSWER)
def ask(
    video: VideoArg,
    questions: Annotated[list[str], typer.Argument(help="One or more questions; each is answered in turn, the clip encoded once.", show_default=False)],
    flags: Flags,
) -> None:
    """Answer questions about a video; each answer streams to stdout, one per line."""
    _run_answers(video, list(questions), flags)


@app.command()
@_with(*ANSWER)
def caption(video: VideoArg, flags: Flags) -> None:
    """Describe a video with the model's own caption prompt."""
    _run_answers(video, [None], flags)


@app.command()
@_with("frames", "method", *COMPRESSION, *SAMPLING, "seed", *MODEL, *OUTPUT)
def chat(video: VideoArg, flags: Flags) -> None:
    """Many questions about one video: the model is loaded and the clip encoded once (/help).

    Questions come from the terminal (a line of three double quotes starts and ends one over
    several lines) or one per line from a pipe. Ctrl-C stops the current answer; Ctrl-D ends.
    FastV picks its tokens by each question, so it prefills the whole prompt every time; the
    other methods reuse the video's prefix."""
    from .chat import Chat, ChatActions, read_questions
    from .session import Session

    flags.check()
    _check_video(video)
    lm = _load_announced(flags)
    session = Session(lm, video, frames=flags.frames, compression=flags.compression(),
                      cache=flags.feature_cache(), timeout_s=_decode_timeout())
    interactive = sys.stdin is not None and sys.stdin.isatty()
    if interactive and not flags.quiet:
        print("[dycoke] ask about the video; /help lists commands, Ctrl-D ends", file=sys.stderr)
    actions = ChatActions(answer=lambda q: _chat_answer(session, q, flags),
                          compare=lambda q: _chat_compare(session, q, flags), out=_out,
                          note=lambda text: print(f"[dycoke] {text}", file=sys.stderr))
    conversation = Chat(session, flags.sampling(), actions)
    with interrupts.raising():
        for line in read_questions(sys.stdin, interactive):
            if not conversation.handle(line):
                break


def _chat_answer(session, question: str, flags: Flags) -> None:
    from .display import make_display

    display = make_display(flags.quiet, flags.json_out, flags.model_name, session.compression.method.value,
                           stdout_is_terminal=bool(sys.stdout.isatty()))
    out = _Answering(display, flags.json_out)
    try:
        for event in session.stream(question, flags.sampling()):
            out.show(event)
    except KeyboardInterrupt:
        display.close()
        _out(out.interrupted_output())
        raise
    finally:
        display.close()
    _out(out.final_output(session.lm.describe()))


def _chat_compare(session, question: str | None, flags: Flags) -> None:
    from .evaluate import compare as run_compare
    from .pipeline import drain

    drain(session.encoding())
    methods = [Method.none, session.compression.method] if session.compression.method != Method.none else [Method.none]
    comp = run_compare(session.lm, session.encoded, question, methods, session.compression, flags.sampling())
    _show_comparison(comp, flags, session.video, session.lm)


def _prepare_methods(flags: Flags) -> tuple[list[Method], CompressionOptions]:
    from .evaluate import parse_methods

    chosen = parse_methods(flags.methods)
    flags.check()
    return chosen, flags.compression()


@app.command()
@_with("methods", "frames", *COMPRESSION, "max_new_tokens", "seed", *MODEL, *OUTPUT)
def compare(
    video: VideoArg,
    flags: Flags,
    question: Annotated[Optional[str], typer.Argument(help="Question; without one, captions are compared.", show_default=False)] = None,
) -> None:
    """Run the uncompressed model and the compressed one on the same frames, side by side."""
    chosen, base = _prepare_methods(flags)
    _check_question(question)
    _check_video(video)
    from .evaluate import compare as run_compare
    from .pipeline import encode_video
    from .prompt import fit_frames

    settings = _RunSettings()
    with _oom_guard(settings):
        lm = _load_announced(flags)
        base = base.resolve(lm)
        question = question if question is not None else lm.defaults.caption_prompt
        for method in chosen:  # the frames must fit the context with every method
            n = fit_frames(lm, flags.frames, replace(base, method=method), question, video)
        _say(flags, f"[dycoke] comparing {', '.join(m.value for m in chosen)} on {n} frames...")
        settings.update_from(lm, n, base)
        enc = encode_video(lm, video, n, timeout_s=_decode_timeout(), cache=flags.feature_cache())
        comp = run_compare(lm, enc, question, chosen, base, flags.sampling())
    _show_comparison(comp, flags, video, lm)


def _show_comparison(comp, flags: Flags, video, lm) -> None:
    rows = comp.rows()
    if flags.json_out:
        _out(json.dumps({"question": comp.question, "frames": comp.frames, "video": str(video),
                         "model": lm.describe(), "baseline": rows[0]["method"], "methods": rows,
                         "note": "measured after one warm-up run, methods in the order listed"},
                        indent=2, default=str) + "\n")
        return
    from .display import comparison_table

    _out_rich(comparison_table(rows, comp.question, comp.frames))


def _say(flags: Flags, line: str) -> None:
    if not (flags.quiet or flags.json_out):
        print(line, file=sys.stderr)


def _load_announced(flags: Flags):
    flags.locate()
    _say(flags, "[dycoke] loading model...")
    return flags.load()


@app.command("eval")
@_with("methods", "frames", *COMPRESSION[:-1], "max_new_tokens", "seed", *MODEL, *OUTPUT,
       methods="none,dycoke,fastv,random,frames", max_new_tokens=32)
def eval_cmd(
    qa: Annotated[Path, typer.Argument(help="QA file: JSON lines with video (relative to the file), question, answer, optional kind.", show_default=False, readable=False)],
    flags: Flags,
) -> None:
    """Accuracy of each method on a QA set (each video encoded once). Exits 1 if any item failed."""
    from .evaluate import evaluate, read_qa

    chosen, base = _prepare_methods(flags)
    items = read_qa(qa)
    from rich.console import Console
    from rich.progress import Progress

    from .display import eval_table

    settings = _RunSettings()
    err = Console(stderr=True)
    with _oom_guard(settings):
        lm = _load_announced(flags)
        base = base.resolve(lm)
        n = flags.frames  # None: each clip's default (the model's frame count, or its fps rule)
        settings.update_from(lm, n, base)
        with Progress(console=err, disable=flags.quiet or flags.json_out or not err.is_terminal, transient=True) as bar:
            task = bar.add_task("evaluating", total=None)
            report = evaluate(lm, qa, chosen, n, base, flags.sampling(), items=items, cache=flags.feature_cache(),
                              progress=lambda done, total: bar.update(task, completed=done, total=total),
                              timeout_s=_decode_timeout())
    if flags.json_out:
        _out(json.dumps(report, indent=2) + "\n")
    else:
        _out_rich(eval_table(report["summary"]))
    for failure in report["failures"]:
        print(f"dycoke: error: {failure['video']}: {failure['error']}", file=sys.stderr)
    if report["failures"]:
        raise typer.Exit(1)


@app.command()
def toyworld(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write clips/ and qa.jsonl into (new, or empty).", show_default=False)],
    n: Annotated[int, typer.Option("--n", help="Number of clips.")] = 200,
    seed: Annotated[int, typer.Option("--seed", help="Seed; the same seed gives the same clips.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Write into a folder that already holds files, replacing its qa.jsonl and clips/ files of the same names.")] = False,
) -> None:
    """Write clips of the demo model's toy world and a QA file for `dycoke eval`."""
    from .toyworld.dataset import write_dataset

    if n < 1:
        raise OptionError("n", f"must be at least 1 (got {n})")
    qa = write_dataset(out_dir, n, seed, overwrite=force)
    _out(f"{qa}\n")


cache_app = typer.Typer(help="The on-disk cache of vision features ($DYCOKE_CACHE, else $XDG_CACHE_HOME/dycoke).",
                        no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("info")
def cache_info(json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Where the cache is, how many entries it holds, and their size against the limit."""
    from .feature_cache import FeatureCache

    cache = FeatureCache()
    entries, size = cache.entries(), cache.size()
    if json_out:
        _out(json.dumps({"folder": str(cache.folder), "entries": len(entries), "bytes": size,
                         "limit_bytes": cache.limit}) + "\n")
        return
    _out(f"{cache.folder}: {len(entries)} entries, {size / 2**20:.1f} MB of {cache.limit / 2**20:.0f} MB\n")


@cache_app.command("clear")
def cache_clear() -> None:
    """Remove every cache entry (only files the cache wrote)."""
    from .feature_cache import FeatureCache

    cache = FeatureCache()
    _out(f"{cache.folder}: removed {cache.clear()} entries\n")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def bench(ctx: typer.Context) -> None:
    """Benchmark none / dycoke / fastv on the LLaVA-OV-0.5B architecture (random weights). `dycoke bench --help` for flags."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_compression.py"
    if not script.is_file():
        raise DycokeError("the benchmark ships with the source checkout (benchmarks/bench_compression.py), "
                          "not with the installed package")
    if str(script.parent) not in sys.path:
        sys.path.insert(0, str(script.parent))
    from bench_compression import main as bench_main

    raise typer.Exit(bench_main(list(ctx.args)) or 0)


# -------------------------------------------------------------------------------- errors


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _error(message: str) -> None:
    print(f"dycoke: error: {message}", file=sys.stderr)


def _run_command(args: list[str], debug: bool) -> int:
    """Run one command; every failure becomes one line on stderr and an exit code."""
    try:  # typer >= 0.22 vendors its own click
        from typer._click import exceptions as cx
    except ImportError:  # pragma: no cover - older typer on plain click
        import click.exceptions as cx

    try:
        code = typer.main.get_command(app).main(args=args, prog_name="dycoke", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except cx.NoArgsIsHelpError:
        return 2  # typer has printed the help
    except cx.UsageError as exc:
        if debug:
            raise
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        _error(f"{exc.format_message()}{hint}")
        return 2
    except (typer.Abort, KeyboardInterrupt):
        print("dycoke: interrupted", file=sys.stderr)
        return 130
    except (_ReaderLeft, BrokenPipeError):  # the reader left (`| head`): a silent exit, as SIGPIPE gives
        _silence_stdout()
        return 141
    except DycokeError as exc:
        if debug:
            raise
        _error(exc.for_flag() if isinstance(exc, OptionError) else str(exc))
        if isinstance(exc, OutputError):
            _silence_stdout()
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - the last resort: one line, never a traceback
        if debug:
            raise
        if _is_oom(exc):
            _error(_oom_advice(_RunSettings()))
        else:
            text = " ".join(str(exc).split())[:300]
            _error(f"internal error: {type(exc).__name__}: {text} (DYCOKE_DEBUG=1 shows the traceback)")
        return 1


def main() -> None:
    """Console entry point: one-line errors, exit 1 (2 for usage), tracebacks with DYCOKE_DEBUG=1."""
    debug = os.environ.get("DYCOKE_DEBUG", "") not in {"", "0"}
    if sys.stderr is None:  # started with stderr closed: errors go nowhere rather than crash
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    if sys.stdout is None:
        _error("cannot write the output (stdout is closed)")
        sys.exit(1)
    sys.exit(_run_command(sys.argv[1:], debug))
