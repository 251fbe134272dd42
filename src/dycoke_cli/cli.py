"""The `dycoke` command line: parse, call the pipeline, show progress, map errors to exits.

Kept thin and fast to import: torch and transformers are imported only inside commands, so
`dycoke --help` does not pay for them.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from .errors import DycokeError, UsageError

app = typer.Typer(
    name="dycoke",
    help="Ask questions about videos with a video LLM, made fast by DyCoke token compression.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class MethodChoice(str, Enum):
    dycoke = "dycoke"
    fastv = "fastv"
    random = "random"
    frames = "frames"
    none = "none"


class DeviceChoice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DtypeChoice(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def _default_model() -> str:
    from .model import DEFAULT_MODEL

    return os.environ.get("DYCOKE_MODEL") or DEFAULT_MODEL


# readable=False: our own reader reports unreadable files (one line, exit 1), not click's usage error.
VideoArg = Annotated[Path, typer.Argument(help="Video file (anything FFmpeg reads).", show_default=False, readable=False)]
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Model folder, Hugging Face id, or 'demo'. Default: $DYCOKE_MODEL or llava-hf/llava-onevision-qwen2-0.5b-ov-hf.", show_default=False)]
FramesOpt = Annotated[Optional[int], typer.Option("--frames", "-f", help="Frames to sample uniformly by time [default: the model's, 32 for LLaVA-OV].", show_default=False)]
DeviceOpt = Annotated[DeviceChoice, typer.Option("--device", help="Where to run.")]
DtypeOpt = Annotated[DtypeChoice, typer.Option("--dtype", help="auto: fp16/bf16 on CUDA, bf16 on CPUs with AVX-512 BF16/AMX, else fp32.")]
PickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Also load pickle (.bin) weights. Only for checkpoints you trust.")]
MethodOpt = Annotated[MethodChoice, typer.Option("--method", help="Compression: dycoke, or a baseline at the same visual-token budget, or none.")]
TtmKOpt = Annotated[Optional[float], typer.Option("--ttm-k", help="TTM: fraction of tokens dropped from compared frames, in [0, 1) [default: model's, 0.7].", show_default=False)]
PrunePOpt = Annotated[Optional[float], typer.Option("--prune-p", help="Decode pruning: fraction of visual KV entries pruned, in [0, 1) [default: model's, 0.7].", show_default=False)]
PruneLayerOpt = Annotated[Optional[int], typer.Option("--prune-layer", help="First layer L whose attention is pruned (layer L-1 is probed) [default: model's, 3].", show_default=False)]
RefreshOpt = Annotated[float, typer.Option("--refresh-threshold", help="Re-select visual tokens when attention similarity falls below this, in [0, 1].")]
CoverageOpt = Annotated[float, typer.Option("--frame-coverage", help="Share of the decode budget spread evenly over frames, in [0, 1]; 0 = the paper's top-k (not in the paper).")]
class PositionsChoice(str, Enum):
    contiguous = "contiguous"
    original = "original"


PositionsOpt = Annotated[Optional[PositionsChoice], typer.Option("--positions", help="Position ids of kept visual tokens: contiguous (the paper) or original (as in the full video) [default: the model's, contiguous].", show_default=False)]
NoCompressOpt = Annotated[bool, typer.Option("--no-compress", help="Same as --method none.")]
OffloadOpt = Annotated[bool, typer.Option("--offload-pruned", help="Keep pruned KV entries in host memory instead of on the accelerator.")]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", help="Stop after this many tokens.")]
TempOpt = Annotated[float, typer.Option("--temperature", help="0 = greedy.")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass, in (0, 1].")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Seed for sampling (and the random baseline).", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of streaming text.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or stats on stderr.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dycoke {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Show the version and exit.", callback=_version, is_eager=True)] = False,
) -> None:
    """Ask questions about videos with a video LLM, made fast by DyCoke token compression."""


def _check_common(frames, max_new_tokens, temperature, top_p, ttm_k, prune_p, refresh, coverage=0.0) -> None:
    """Range checks that need no model (exit 2, one line)."""
    if frames is not None and frames < 1:
        raise UsageError(f"--frames must be at least 1 (got {frames})")
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    if temperature < 0:
        raise UsageError(f"--temperature must be >= 0 (got {temperature})")
    if not 0 < top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1] (got {top_p})")
    if ttm_k is not None and not 0 <= ttm_k < 1:
        raise UsageError(f"--ttm-k must be in [0, 1) (got {ttm_k})")
    if prune_p is not None and not 0 <= prune_p < 1:
        raise UsageError(f"--prune-p must be in [0, 1) (got {prune_p})")
    if not 0 <= refresh <= 1:
        raise UsageError(f"--refresh-threshold must be in [0, 1] (got {refresh})")
    if not 0 <= coverage <= 1:
        raise UsageError(f"--frame-coverage must be in [0, 1] (got {coverage})")


def _decode_timeout() -> float:
    """Seconds one file may take to decode (DYCOKE_DECODE_TIMEOUT, default 60)."""
    raw = os.environ.get("DYCOKE_DECODE_TIMEOUT", "60")
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"DYCOKE_DECODE_TIMEOUT must be a number of seconds (got {raw!r})") from None
    if value <= 0:
        raise UsageError(f"DYCOKE_DECODE_TIMEOUT must be positive (got {raw})")
    return value


def _check_video(path: Path) -> None:
    """Fail fast on a bad video, before paying for a model load."""
    from .video import probe_video

    probe_video(path, timeout_s=_decode_timeout())


class _CliListener:
    """Feeds the display; streams the answer to stdout unless the live panel shows it."""

    def __init__(self, display, stream_stdout: bool):
        self.display = display
        self.stream_stdout = stream_stdout
        self.text = ""  # the answer so far, for an interrupted run

    def stage(self, name: str, done: int = 0, total: int = 0) -> None:
        self.display.stage(name, done, total)

    def token(self, text: str, result) -> None:
        self.text = result.answer
        self.display.token(text, result)
        if self.stream_stdout:
            sys.stdout.write(text)
            sys.stdout.flush()


def _run_answer(video, question, *, model, frames, device, dtype, allow_pickle, method, ttm_k, prune_p,
                prune_layer, refresh_threshold, frame_coverage, positions, no_compress, offload_pruned, max_new_tokens, temperature,
                top_p, seed, json_out, quiet, caption=False) -> None:
    _check_common(frames, max_new_tokens, temperature, top_p, ttm_k, prune_p, refresh_threshold, frame_coverage)
    if not caption and not question.strip():
        raise UsageError("the question is empty")
    _check_video(video)
    from .display import make_display
    from .generate import SamplingOptions
    from .model import load_model, locate_model
    from .pipeline import CompressionOptions, Method, answer, encode_video

    model_name = model or _default_model()
    locate_model(model_name, allow_pickle)
    method_value = Method.none if no_compress else Method(method.value)
    compression = CompressionOptions(method=method_value, ttm_k=ttm_k, prune_p=prune_p, prune_layer=prune_layer,
                                     refresh_threshold=refresh_threshold, offload_pruned=offload_pruned,
                                     seed=seed if seed is not None else 0, frame_coverage=frame_coverage,
                                     positions=positions.value if positions else None)
    sampling = SamplingOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    display = make_display(quiet, json_out, model_name, method_value.value, stdout_is_terminal=sys.stdout.isatty())
    listener = _CliListener(display, stream_stdout=not json_out and display.state.answer is None)
    result = None
    settings = _RunSettings(frames, ttm_k, method_value.value, None if dtype.value == "auto" else f"torch.{dtype.value}")
    try:
        with _oom_guard(settings):
            display.stage("loading model")
            lm = load_model(model_name, device=device.value, dtype=dtype.value, allow_pickle=allow_pickle)
            if caption:
                question = lm.defaults.caption_prompt
            compression = compression.resolve(lm)
            n = frames if frames is not None else lm.defaults.num_frames
            settings.update_from(lm, n, compression)
            enc = encode_video(lm, video, n, listener, timeout_s=_decode_timeout())
            result = answer(lm, enc, question, compression, sampling, listener)
            result.stats["video"] = enc.video.info.to_dict()
    except KeyboardInterrupt:
        display.close()
        if json_out:
            sys.stdout.write(json.dumps({"answer": listener.text.strip(), "interrupted": True}) + "\n")
        elif listener.text:
            # streamed already: end the line; shown only in the panel: print it now
            sys.stdout.write("\n" if listener.stream_stdout else listener.text + "\n")
        sys.stdout.flush()
        print("dycoke: interrupted", file=sys.stderr)
        raise typer.Exit(130)
    finally:
        if result is None:
            display.close()
    display.finish(result.stats)
    display.close()
    if json_out:
        payload = {
            "answer": result.answer,
            "model": lm.describe(),
            "video": result.stats.pop("video"),
            "options": {**result.options, "frames": n, "question": question},
            "stats": result.stats,
        }
        typer.echo(json.dumps(payload, indent=2, default=str))
    elif listener.stream_stdout:
        sys.stdout.write("\n")
    else:
        typer.echo(result.answer)  # the live panel showed it while streaming; now the real stdout


class _RunSettings:
    """What a run uses, filled in as it becomes known, for out-of-memory advice."""

    def __init__(self, frames=None, ttm_k=None, method=None, dtype=None):
        self.frames, self.ttm_k, self.method, self.dtype = frames, ttm_k, method, dtype

    def update_from(self, lm, frames: int, compression) -> None:
        self.frames, self.ttm_k = frames, compression.ttm_k
        self.method, self.dtype = getattr(compression.method, "value", compression.method), str(lm.dtype)


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
    import torch

    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
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


@app.command()
def ask(
    video: VideoArg,
    question: Annotated[str, typer.Argument(help="The question about the video.", show_default=False)],
    model: ModelOpt = None,
    frames: FramesOpt = None,
    method: MethodOpt = MethodChoice.dycoke,
    ttm_k: TtmKOpt = None,
    prune_p: PrunePOpt = None,
    prune_layer: PruneLayerOpt = None,
    refresh_threshold: RefreshOpt = 0.9,
    frame_coverage: CoverageOpt = 0.0,
    positions: PositionsOpt = None,
    no_compress: NoCompressOpt = False,
    offload_pruned: OffloadOpt = False,
    max_new_tokens: MaxNewOpt = 256,
    temperature: TempOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = None,
    device: DeviceOpt = DeviceChoice.auto,
    dtype: DtypeOpt = DtypeChoice.auto,
    allow_pickle: PickleOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Answer a question about a video; the answer streams to stdout."""
    _run_answer(video, question, **{k: v for k, v in locals().items() if k not in {"video", "question"}})


@app.command()
def caption(
    video: VideoArg,
    model: ModelOpt = None,
    frames: FramesOpt = None,
    method: MethodOpt = MethodChoice.dycoke,
    ttm_k: TtmKOpt = None,
    prune_p: PrunePOpt = None,
    prune_layer: PruneLayerOpt = None,
    refresh_threshold: RefreshOpt = 0.9,
    frame_coverage: CoverageOpt = 0.0,
    positions: PositionsOpt = None,
    no_compress: NoCompressOpt = False,
    offload_pruned: OffloadOpt = False,
    max_new_tokens: MaxNewOpt = 256,
    temperature: TempOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = None,
    device: DeviceOpt = DeviceChoice.auto,
    dtype: DtypeOpt = DtypeChoice.auto,
    allow_pickle: PickleOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Describe a video with the model's own caption prompt."""
    _run_answer(video, "", caption=True, **{k: v for k, v in locals().items() if k != "video"})


MethodsOpt = Annotated[str, typer.Option("--methods", help="Comma-separated methods, first = baseline: none, dycoke, fastv, random, frames.")]


def _load_for(model, allow_pickle, device, dtype, quiet):
    from .model import load_model, locate_model

    name = model or _default_model()
    locate_model(name, allow_pickle)
    if not quiet:
        print("[dycoke] loading model...", file=sys.stderr)
    return load_model(name, device=device.value, dtype=dtype.value, allow_pickle=allow_pickle)


def _base_options(ttm_k, prune_p, prune_layer, refresh_threshold, frame_coverage, positions, offload_pruned, seed):
    from .pipeline import CompressionOptions

    return CompressionOptions(ttm_k=ttm_k, prune_p=prune_p, prune_layer=prune_layer,
                              refresh_threshold=refresh_threshold, offload_pruned=offload_pruned,
                              seed=seed if seed is not None else 0, frame_coverage=frame_coverage,
                              positions=positions.value if positions else None)


@app.command()
def compare(
    video: VideoArg,
    question: Annotated[Optional[str], typer.Argument(help="Question; without one, captions are compared.", show_default=False)] = None,
    methods: MethodsOpt = "none,dycoke",
    model: ModelOpt = None,
    frames: FramesOpt = None,
    ttm_k: TtmKOpt = None,
    prune_p: PrunePOpt = None,
    prune_layer: PruneLayerOpt = None,
    refresh_threshold: RefreshOpt = 0.9,
    frame_coverage: CoverageOpt = 0.0,
    positions: PositionsOpt = None,
    offload_pruned: OffloadOpt = False,
    max_new_tokens: MaxNewOpt = 256,
    seed: SeedOpt = None,
    device: DeviceOpt = DeviceChoice.auto,
    dtype: DtypeOpt = DtypeChoice.auto,
    allow_pickle: PickleOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run the uncompressed model and the compressed one on the same frames, side by side."""
    from .evaluate import compare as run_compare, parse_methods

    chosen = parse_methods(methods)
    _check_common(frames, max_new_tokens, 0.0, 1.0, ttm_k, prune_p, refresh_threshold, frame_coverage)
    if question is not None and not question.strip():
        raise UsageError("the question is empty")
    _check_video(video)
    from .generate import SamplingOptions

    lm = _load_for(model, allow_pickle, device, dtype, quiet or json_out)
    base = _base_options(ttm_k, prune_p, prune_layer, refresh_threshold, frame_coverage, positions, offload_pruned, seed).resolve(lm)
    n = frames if frames is not None else lm.defaults.num_frames
    if not (quiet or json_out):
        print(f"[dycoke] comparing {', '.join(m.value for m in chosen)} on {n} frames...", file=sys.stderr)
    settings = _RunSettings()
    settings.update_from(lm, n, base)
    with _oom_guard(settings):
        comp = run_compare(lm, video, question, chosen, n, base, SamplingOptions(max_new_tokens=max_new_tokens),
                           timeout_s=_decode_timeout())
    rows = comp.rows()
    if json_out:
        typer.echo(json.dumps({"question": comp.question, "frames": comp.frames, "video": str(video),
                               "model": lm.describe(), "baseline": rows[0]["method"], "methods": rows,
                               "note": "measured after one warm-up run, methods in the order listed"},
                              indent=2, default=str))
        return
    from rich.console import Console

    from .display import comparison_table

    Console().print(comparison_table(rows, comp.question, comp.frames))


@app.command("eval")
def eval_cmd(
    qa: Annotated[Path, typer.Argument(help="QA file: JSON lines with video (relative to the file), question, answer, optional kind.", show_default=False, readable=False)],
    methods: MethodsOpt = "none,dycoke,fastv,random,frames",
    model: ModelOpt = None,
    frames: FramesOpt = None,
    ttm_k: TtmKOpt = None,
    prune_p: PrunePOpt = None,
    prune_layer: PruneLayerOpt = None,
    refresh_threshold: RefreshOpt = 0.9,
    frame_coverage: CoverageOpt = 0.0,
    positions: PositionsOpt = None,
    max_new_tokens: MaxNewOpt = 32,
    seed: SeedOpt = None,
    device: DeviceOpt = DeviceChoice.auto,
    dtype: DtypeOpt = DtypeChoice.auto,
    allow_pickle: PickleOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Accuracy of each method on a QA set (each video encoded once)."""
    from .evaluate import evaluate, parse_methods, read_qa

    chosen = parse_methods(methods)
    _check_common(frames, max_new_tokens, 0.0, 1.0, ttm_k, prune_p, refresh_threshold, frame_coverage)
    read_qa(qa)
    from rich.console import Console
    from rich.progress import Progress

    from .display import eval_table
    from .generate import SamplingOptions

    lm = _load_for(model, allow_pickle, device, dtype, quiet or json_out)
    base = _base_options(ttm_k, prune_p, prune_layer, refresh_threshold, frame_coverage, positions, False, seed).resolve(lm)
    n = frames if frames is not None else lm.defaults.num_frames
    err = Console(stderr=True)
    with Progress(console=err, disable=quiet or json_out or not err.is_terminal, transient=True) as bar:
        task = bar.add_task("evaluating", total=None)
        settings = _RunSettings()
        settings.update_from(lm, n, base)
        with _oom_guard(settings):
            report = evaluate(lm, qa, chosen, n, base, SamplingOptions(max_new_tokens=max_new_tokens),
                              progress=lambda done, total: bar.update(task, completed=done, total=total),
                              timeout_s=_decode_timeout())
    if json_out:
        typer.echo(json.dumps(report, indent=2))
        return
    Console().print(eval_table(report["summary"]))


@app.command()
def toyworld(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write clips/ and qa.jsonl into.", show_default=False)],
    n: Annotated[int, typer.Option("--n", help="Number of clips.")] = 200,
    seed: Annotated[int, typer.Option("--seed", help="Seed; the same seed gives the same clips.")] = 0,
) -> None:
    """Write clips of the demo model's toy world and a QA file for `dycoke eval`."""
    if n < 1:
        raise UsageError(f"--n must be at least 1 (got {n})")
    if out_dir.exists() and not out_dir.is_dir():
        raise DycokeError(f"{out_dir}: exists and is not a folder")
    from .toyworld.dataset import write_dataset

    qa = write_dataset(out_dir, n, seed)
    typer.echo(str(qa))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def bench(ctx: typer.Context) -> None:
    """Benchmark none / dycoke / fastv on the LLaVA-OV-0.5B architecture (random weights). `dycoke bench --help` for flags."""
    from .bench import main as bench_main

    raise typer.Exit(bench_main(list(ctx.args)) or 0)


def main() -> None:
    """Console entry point: one-line errors, exit 1 (2 for usage), tracebacks with DYCOKE_DEBUG=1."""
    try:  # typer >= 0.22 vendors its own click
        from typer._click import exceptions as cx
    except ImportError:  # pragma: no cover - older typer on plain click
        import click.exceptions as cx

    debug = os.environ.get("DYCOKE_DEBUG", "") not in {"", "0"}
    command = typer.main.get_command(app)
    try:
        code = command.main(args=sys.argv[1:], prog_name="dycoke", standalone_mode=False)
    except cx.NoArgsIsHelpError:
        code = 2  # typer has printed the help
    except cx.UsageError as exc:
        if debug:
            raise
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        print(f"dycoke: error: {exc.format_message()}{hint}", file=sys.stderr)
        code = 2
    except typer.Abort:
        print("dycoke: interrupted", file=sys.stderr)
        code = 130
    except DycokeError as exc:
        if debug:
            raise
        print(f"dycoke: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("dycoke: interrupted", file=sys.stderr)
        code = 130
    except Exception as exc:  # noqa: BLE001 - a last net for out-of-memory outside the guarded runs
        if debug or not _is_oom(exc):
            raise
        print(f"dycoke: error: {_oom_advice(_RunSettings())}", file=sys.stderr)
        code = 1
    except BrokenPipeError:
        code = 0
    sys.exit(code if isinstance(code, int) else 0)
