"""The `dycoke` command line: parse, call the pipeline, show progress, map errors to exits.

Kept thin and fast to import: torch and transformers are imported only inside commands, so
`dycoke --help` does not pay for them. The options live in flags.py (declared once), what
goes to stdout in output.py, the out-of-memory advice in oom.py.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import __version__
from ..errors import DycokeError, OutputError, UsageError, one_line
from ..options import CompressionOptions, Method, OptionError
from . import interrupts
from .flags import ANSWER, COMPRESSION, FRAMES, MODEL, OUTPUT, SAMPLING, Flags, flag_words, with_flags
from .oom import RunSettings, is_oom, oom_advice, oom_guard
from .output import Answering, ReaderLeft, out, out_rich, silence_stdout

app = typer.Typer(
    name="dycoke",
    help="Ask questions about videos with a video LLM, made fast by DyCoke token compression.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        out(f"dycoke {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Show the version and exit.", callback=_version, is_eager=True)] = False,
) -> None:
    """Ask questions about videos with a video LLM, made fast by DyCoke token compression."""


# -------------------------------------------------------------------------------- output


def _decode_timeout() -> float:
    """Seconds one file may take to decode (DYCOKE_DECODE_TIMEOUT, default 60)."""
    return _env_seconds("DYCOKE_DECODE_TIMEOUT", 60)


def _env_seconds(name: str, default: int) -> float:
    """A positive number of seconds from the environment variable ``name``."""
    raw = os.environ.get(name, str(default))
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"{name} must be a number of seconds (got {raw!r})") from None
    if not 0 < value < float("inf"):
        raise UsageError(f"{name} must be a positive number of seconds (got {raw})")
    return value


def _check_video(path: Path):
    """The clip probed once (a Clip every later stage asks): a bad video fails fast, before paying
    for a model load."""
    from ..video.read import open_clip

    return open_clip(path, timeout_s=_decode_timeout())


def _check_question(question: str | None) -> None:
    if question is not None and not question.strip():
        raise UsageError("the question is empty")


def _run_answers(video: Path, questions: list[str | None], flags: Flags) -> None:
    """Answer each question in turn (None: the caption prompt) in one session: the model is
    loaded and the clip encoded once."""
    flags.check()
    for question in questions:
        _check_question(question)
    clip = _check_video(video)
    flags.locate()
    counted = flags.frame_options()
    settings = RunSettings(counted.frames if counted.counted else None, flags.compression().ttm_k,
                           flags.compression().method.value,
                           None if flags.dtype.value == "auto" else f"torch.{flags.dtype.value}")
    session = None
    for index, question in enumerate(questions):
        session = _answer_one(clip, question, flags, session, settings, index)


def _answer_one(clip, question: str | None, flags: Flags, session, settings: RunSettings, index: int = 0):
    """One answer through the display and stdout (and its picture with --show-kept); loads the
    model into a new session first."""
    from ..results import FramesChosen
    from ..session import Session
    from .display import make_display

    display = make_display(flags.quiet, flags.json_out, flags.model_name, flags.compression().method.value,
                           stdout_is_terminal=bool(sys.stdout.isatty()))
    answering = Answering(display, flags.json_out)
    interrupts.on_interrupt(answering.interrupted_output, display.close)
    try:
        with oom_guard(settings):
            if session is None:
                display.stage("loading model")
                lm = flags.load()
                session = Session(lm, clip, frames=flags.frame_options(), compression=flags.compression(),
                                  cache=flags.feature_cache(), timeout_s=_decode_timeout())
                settings.update_from(lm, settings.frames, session.compression)
            question = question if question is not None else session.lm.defaults.caption_prompt
            with interrupts.raising() as stop:
                for event in session.stream(question, flags.sampling(), trace=flags.trace):
                    if isinstance(event, FramesChosen):  # for the out-of-memory advice
                        settings.frames = event.count
                    answering.show(event)
                    if stop.is_set():  # a Ctrl-C whose KeyboardInterrupt a library swallowed
                        raise KeyboardInterrupt
    except KeyboardInterrupt:
        display.close()
        out(answering.interrupted_output())
        sys.stderr.write("dycoke: interrupted\n")
        raise typer.Exit(130)
    finally:
        interrupts.on_interrupt(None, None)
        display.close()
    out(answering.final_output(session.lm.describe()))
    if flags.show_kept is not None:
        from .kept import numbered, write_answer_picture

        write_answer_picture(numbered(flags.show_kept, index), answering.answer, session.encoded, clip.path,
                             _decode_timeout())
    return session


# -------------------------------------------------------------------------------- commands

MAX_TOYWORLD_CLIPS = 100_000  # about 2 GB of clips

VideoArg = Annotated[Path, typer.Argument(help="Video file (anything FFmpeg reads).", show_default=False, readable=False)]


@app.command()
@with_flags(*ANSWER)
def ask(
    video: VideoArg,
    questions: Annotated[list[str], typer.Argument(help="One or more questions; each is answered in turn, the clip encoded once.", show_default=False)],
    flags: Flags,
) -> None:
    """Answer questions about a video; each answer streams to stdout, one per line."""
    _run_answers(video, list(questions), flags)


@app.command()
@with_flags(*ANSWER)
def caption(video: VideoArg, flags: Flags) -> None:
    """Describe a video with the model's own caption prompt."""
    _run_answers(video, [None], flags)


@app.command()
@with_flags(*FRAMES, "method", *COMPRESSION, *SAMPLING, "seed", *MODEL, *OUTPUT)
def chat(video: VideoArg, flags: Flags) -> None:
    """Many questions about one video: the model is loaded and the clip encoded once (/help).

    Questions come from the terminal (a line of three double quotes starts and ends one over
    several lines) or one per line from a pipe. Ctrl-C stops the current answer; Ctrl-D ends.
    FastV picks its tokens by each question, so it prefills the whole prompt every time; the
    other methods reuse the video's prefix."""
    from ..session import Session
    from .chat import Chat, ChatActions, read_questions

    flags.check()
    clip = _check_video(video)
    if sys.stdin is None:  # started with stdin closed: no question will come
        return
    lm = _load_announced(flags)
    session = Session(lm, clip, frames=flags.frame_options(), compression=flags.compression(),
                      cache=flags.feature_cache(), timeout_s=_decode_timeout())
    interactive = sys.stdin.isatty()
    if interactive and not flags.quiet:
        print("[dycoke] ask about the video; /help lists commands, Ctrl-D ends", file=sys.stderr)
    actions = ChatActions(answer=lambda q: _chat_answer(session, q, flags),
                          compare=lambda q: _chat_compare(session, q, flags), out=out,
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
    answering = Answering(display, flags.json_out)
    try:  # Ctrl-C stops the answer between two tokens, never inside the session's generator
        frames = session.count.count if session.count is not None else None
        with oom_guard(RunSettings(frames, session.compression.ttm_k, session.compression.method.value)), \
                interrupts.requested() as stop:
            events = session.stream(question, flags.sampling(), trace=flags.trace)
            for event in events:
                answering.show(event)
                if stop.is_set():
                    events.close()
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        display.close()
        out(answering.interrupted_output())
        raise
    finally:
        display.close()
    out(answering.final_output(session.lm.describe()))


def _chat_compare(session, question: str | None, flags: Flags) -> None:
    from ..evaluation.compare import compare as run_compare
    from ..evaluation.methods import MethodChoice
    from ..pipeline import drain

    sampling = flags.sampling()
    prompt = session.prompt(question or session.lm.defaults.caption_prompt, sampling.thinking)
    drain(session.encoding(prompt))
    chosen = [Method.none, session.compression.method] if session.compression.method != Method.none else [Method.none]
    methods = [MethodChoice.of(m) for m in chosen]
    comp = run_compare(session.lm, session.encoded, prompt, methods, session.compression, sampling)
    _show_comparison(comp, flags, session.video, session.lm)


def _prepare_methods(flags: Flags) -> tuple[list, CompressionOptions]:
    from ..evaluation.methods import parse_methods

    chosen = parse_methods(flags.methods)
    flags.check()
    return chosen, flags.compression()


@app.command()
@with_flags("methods", *FRAMES, *COMPRESSION, "max_new_tokens", "seed", *MODEL, *OUTPUT, "picture")
def compare(
    video: VideoArg,
    flags: Flags,
    question: Annotated[Optional[str], typer.Argument(help="Question; without one, captions are compared.", show_default=False)] = None,
) -> None:
    """Run the uncompressed model and the compressed one on the same frames, side by side."""
    chosen, base = _prepare_methods(flags)
    _check_question(question)
    clip = _check_video(video)
    from ..decoding.prompt import render_prompt
    from ..evaluation.compare import compare as run_compare
    from ..frame_count import frames_for_methods, timestamps_on
    from ..pipeline import encode_video
    from .display import CHOSEN_BY

    settings = RunSettings()
    frames = flags.frame_options()
    with oom_guard(settings):
        lm = _load_announced(flags)
        base = base.resolve(lm)
        sampling = flags.sampling()
        prompt = render_prompt(lm, question if question is not None else lm.defaults.caption_prompt,
                               thinking=sampling.thinking)
        # the frames must fit the context with every method
        count = frames_for_methods(lm, clip.info, frames, [m.options(base).resolve(lm) for m in chosen], prompt,
                                   flags.max_new_tokens)
        n = count.count
        why = "" if count.chosen_by in ("frames", "rule") else f" ({CHOSEN_BY[count.chosen_by]})"
        _say(flags, f"[dycoke] comparing {', '.join(m.value for m in chosen)} on {n} frames{why}...")
        settings.update_from(lm, n, base)
        enc = encode_video(lm, clip, n, timeout_s=_decode_timeout(), cache=flags.feature_cache(),
                           timestamps=timestamps_on(lm, frames))
        comp = run_compare(lm, enc, prompt, chosen, base, sampling, trace=flags.trace)
    _show_comparison(comp, flags, video, lm, count)
    if flags.picture is not None:
        from .kept import write_compare_picture

        write_compare_picture(flags.picture, comp, enc, clip.path, _decode_timeout())


def _show_comparison(comp, flags: Flags, video, lm, count=None) -> None:
    rows = comp.rows()
    for row, result in zip(rows, comp.results):
        if result.kept is not None:  # --json, --picture: what each method kept
            row["kept"] = result.kept.to_dict()
    if flags.json_out:
        chosen = {} if count is None else {"frames_chosen_by": count.chosen_by, "frame_bounds": count.bounds or None}
        out(json.dumps({"question": comp.question, "frames": comp.frames, **chosen, "video": str(video),
                         "model": lm.describe(), "baseline": rows[0]["method"], "methods": rows,
                         "prefix": "fresh", "note": "every method prefills its whole prompt (no prefix reused) and was "
                         "warmed up once, untimed; methods run in the order listed"},
                        indent=2, default=str) + "\n")
        return
    from .display import comparison_table

    out_rich(comparison_table(rows, comp.question, comp.frames))


def _say(flags: Flags, line: str) -> None:
    if not (flags.quiet or flags.json_out):
        print(line, file=sys.stderr)


def _load_announced(flags: Flags):
    flags.locate()
    _say(flags, "[dycoke] loading model...")
    return flags.load()


@app.command("eval")
@with_flags("methods", *FRAMES, *COMPRESSION[:-1], "max_new_tokens", "seed", *MODEL, *OUTPUT,
       methods="none,dycoke,fastv,random,frames", max_new_tokens=32)
def eval_cmd(
    qa: Annotated[Path, typer.Argument(help="QA file: JSON lines with video (relative to the file), question, answer, optional kind.", show_default=False, readable=False)],
    flags: Flags,
) -> None:
    """Accuracy of each method on a QA set (each video encoded once). Exits 1 if any item failed.

    Under torchrun (`torchrun --nproc-per-node N -m dycoke_cli eval ...`) the clips are shared
    out over the ranks; rank 0 prints the same report one process would."""
    from ..distributed import launched_by_torchrun, process_group
    from ..evaluation.qa import evaluate, read_qa

    chosen, base = _prepare_methods(flags)
    items = read_qa(qa)
    from rich.console import Console
    from rich.progress import Progress

    from .display import comparison_lines, eval_table

    settings = RunSettings()
    err = Console(stderr=True)
    wait = _env_seconds("DYCOKE_DIST_TIMEOUT", 1800) if launched_by_torchrun() else None  # on a collective
    with process_group(flags.device.value, wait, teardown=False) as shard, oom_guard(settings):
        if shard is not None and shard.rank != 0:  # only rank 0 speaks, and prints the report
            flags = replace(flags, quiet=True)
        lm = _load_announced(flags)
        base = base.resolve(lm)
        n = flags.frame_options()  # frames=None: each clip's default (the model's count, or its fps rule)
        settings.update_from(lm, n.frames if n.counted else None, base)
        with Progress(console=err, disable=flags.quiet or flags.json_out or not err.is_terminal, transient=True) as bar:
            task = bar.add_task("evaluating", total=None)
            report = evaluate(lm, qa, chosen, n, base, flags.sampling(), items=items, cache=flags.feature_cache(),
                              progress=lambda done, total: bar.update(task, completed=done, total=total),
                              timeout_s=_decode_timeout(), shard=shard)
    if report is None:  # a rank other than 0: its results went to rank 0
        return
    if flags.json_out:
        out(json.dumps(report, indent=2) + "\n")
    else:
        out_rich(eval_table(report["summary"]))
        out("".join(f"{line}\n" for line in comparison_lines(report["summary"])))
    for failure in report["failures"]:
        error = failure["error"]  # names the file already when the reader failed
        where = "" if failure["video"] in error else f"{failure['video']}: "
        _error(f"{where}{error}")
    if report["failures"]:
        raise typer.Exit(1)


class ToyWorld(str, Enum):
    v1 = "v1"
    v2 = "v2"


@app.command()
def toyworld(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write clips/ and qa.jsonl into (new, or empty).", show_default=False)],
    n: Annotated[int, typer.Option("--n", help="Number of clips.")] = 200,
    seed: Annotated[int, typer.Option("--seed", help="Seed; the same seed gives the same clips.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Write into a folder that already holds files, replacing its qa.jsonl and clips/ files of the same names.")] = False,
    world: Annotated[ToyWorld, typer.Option("--world", help="v1: one object, one motion, at most one colour change (2-4 s); v2: 2 or 3 segments, each changing the colour, the motion or both (6-9 s).")] = ToyWorld.v1,
) -> None:
    """Write clips of the demo model's toy world and a QA file for `dycoke eval`."""
    from ..toyworld.dataset import write_dataset

    if not 1 <= n <= MAX_TOYWORLD_CLIPS:
        raise OptionError("n", f"must be in [1, {MAX_TOYWORLD_CLIPS}] (got {n})")
    qa = write_dataset(out_dir, n, seed, overwrite=force, world=world.value)
    out(f"{qa}\n")


@app.command()
@with_flags("frames", "fps", "memory_budget", "timestamps", "method", *COMPRESSION, "no_compress", *SAMPLING, "seed",
            *MODEL, "quiet")
def serve(
    flags: Flags,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on (0: any free one, printed on stderr).")] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="DYCOKE_API_KEY", show_default=False, show_envvar=True, help="Require 'Authorization: Bearer KEY' on every /v1 route.")] = None,
    allowed_local_media_path: Annotated[Optional[Path], typer.Option("--allowed-local-media-path", show_default=False, help="Folder whose files file:// URLs may name (without it, file:// URLs are refused).")] = None,
    max_frames: Annotated[int, typer.Option("--max-frames", help="Most frames a request may get: a ceiling on its count, its rule and its 'max'.")] = 64,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Most tokens a request may ask for (max_tokens).")] = 1024,
    max_upload_mb: Annotated[int, typer.Option("--max-upload-mb", help="Largest video a data: URL may carry, in MB.")] = 100,
    queue: Annotated[int, typer.Option("--queue", help="Requests that may wait while one generates; more get 429.")] = 16,
    sessions: Annotated[int, typer.Option("--sessions", help="Recent sessions kept (encoded video and prefix KV) for follow-up turns.")] = 8,
    sessions_mb: Annotated[int, typer.Option("--sessions-mb", help="Most memory the kept sessions may hold, in MB.")] = 2048,
    allowed_host: Annotated[Optional[list[str]], typer.Option("--allowed-host", show_default=False, help="Another name the Host header may carry (repeatable); the bound address and localhost always are. Others get 403 (DNS rebinding).")] = None,
) -> None:
    """Serve an OpenAI-compatible API (/v1/chat/completions with a video_url part, /v1/models, /health).

    The compression and sampling flags are the defaults of every request; a request may override
    them within the server's limits. One generation runs at a time. Ctrl-C or SIGTERM finishes
    the current token, then exits 0."""
    from ..server.app import serve as run_server
    from ..server.service import ServerConfig

    flags.check()
    config = ServerConfig(
        host=host, port=port, api_key=api_key, allowed_media=allowed_local_media_path, max_frames=max_frames,
        max_tokens=max_tokens, max_upload_bytes=max_upload_mb * 2**20, queue=queue, sessions=sessions,
        sessions_bytes=sessions_mb * 2**20, frames=flags.frame_options(), compression=flags.compression(),
        sampling=flags.sampling(), cache=flags.feature_cache(), timeout_s=_decode_timeout(), quiet=flags.quiet,
        allowed_hosts=tuple(allowed_host or ()),
    ).check()
    lm = _load_announced(flags)
    run_server(lm, config)


cache_app = typer.Typer(help="The on-disk cache of vision features ($DYCOKE_CACHE, else $XDG_CACHE_HOME/dycoke).",
                        no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("info")
def cache_info(json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Where the cache is, how many entries it holds, and their size against the limit."""
    from ..feature_cache import FeatureCache

    cache = FeatureCache()
    entries, size = cache.entries(), cache.size()
    if json_out:
        out(json.dumps({"folder": str(cache.folder), "entries": len(entries), "bytes": size,
                         "limit_bytes": cache.limit}) + "\n")
        return
    out(f"{cache.folder}: {len(entries)} entries, {size / 2**20:.1f} MB of {cache.limit / 2**20:.0f} MB\n")


@cache_app.command("clear")
def cache_clear() -> None:
    """Remove every cache entry (only files the cache wrote)."""
    from ..feature_cache import FeatureCache

    cache = FeatureCache()
    out(f"{cache.folder}: removed {cache.clear()} entries\n")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def bench(ctx: typer.Context) -> None:
    """Benchmark none / dycoke / fastv against model.generate on random-weight architectures (--arch 0.5b, 7b, qwen2.5-vl-7b, qwen3-vl-8b, qwen3.5-2b). `dycoke bench --help` for flags."""
    script = Path(__file__).resolve().parents[3] / "benchmarks" / "bench_compression.py"
    if not script.is_file():
        raise DycokeError("the benchmark ships with the source checkout (benchmarks/bench_compression.py), "
                          "not with the installed package")
    if str(script.parent) not in sys.path:
        sys.path.insert(0, str(script.parent))
    from bench_compression import main as bench_main

    raise typer.Exit(bench_main(list(ctx.args)) or 0)


# -------------------------------------------------------------------------------- errors


def _error(message: str) -> None:
    """One line on stderr, written in one call: under torchrun every rank shares the stream, and
    print's separate newline let two ranks' lines run together."""
    sys.stderr.write(f"dycoke: error: {one_line(message)}\n")
    sys.stderr.flush()


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
    except (ReaderLeft, BrokenPipeError):  # the reader left (`| head`): a silent exit, as SIGPIPE gives
        silence_stdout()
        return 141
    except DycokeError as exc:
        if debug:
            raise
        _error(flag_words(exc))
        if isinstance(exc, OutputError):
            silence_stdout()
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - the last resort: one line, never a traceback
        if debug:
            raise
        if is_oom(exc):
            _error(oom_advice(RunSettings()))
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
    from ..distributed import leave

    sys.exit(leave(_run_command(sys.argv[1:], debug)))
