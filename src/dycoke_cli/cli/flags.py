"""The command line's options: declared once, added to each command that takes them.

``_OPTIONS`` maps a name to its Typer annotation and default; :func:`with_flags` adds the named
ones to a command, which receives them as one :class:`Flags` object. Flags turn into the
library's options (options.py), whose one validation names fields; the CLI shows flags.
"""

from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import SettingError
from ..options import (
    REFRESH_THRESHOLD,
    CompressionOptions,
    Decoding,
    FrameOptions,
    Method,
    OptionError,
    Positions,
    SamplingOptions,
    Selection,
    parse_frames,
    parse_size,
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


class ThinkingChoice(str, Enum):
    on = "on"
    off = "off"
    low = "low"  # on, at a reasoning effort (a template that takes reasoning_effort: Qwen3.8)
    medium = "medium"
    high = "high"


# name -> (annotation, default). Declared once; each command lists the ones it takes.

_OPTIONS: dict[str, tuple[object, object]] = {
    "model": (Annotated[Optional[str], typer.Option("--model", "-m", show_default=False, help="Model folder, Hugging Face id, or 'demo'. Default: $DYCOKE_MODEL or llava-hf/llava-onevision-qwen2-0.5b-ov-hf.")], None),
    "frames": (Annotated[Optional[str], typer.Option("--frames", "-f", show_default=False, help="Frames to sample uniformly by time: a number (at most what the model's context and the memory hold), or 'max' for as many as they hold \\[default: the model's rule, 32 for LLaVA-OV].")], None),
    "fps": (Annotated[Optional[float], typer.Option("--fps", show_default=False, help="Frames per second of the clip: the model's rule at this rate, within --max-frames \\[default: the model's, if it has one].")], None),
    "max_frames": (Annotated[Optional[int], typer.Option("--max-frames", show_default=False, help="The most frames the model's rule (or --fps, or --frames max) may give \\[default: the model's].")], None),
    "memory_budget": (Annotated[Optional[str], typer.Option("--memory-budget", show_default=False, help="Memory an answer may use above the loaded model, e.g. 4GB: bounds --frames max, and refuses a count that needs more \\[default: the device's free memory].")], None),
    "timestamps": (Annotated[Optional[bool], typer.Option("--timestamps/--no-timestamps", show_default=False, help="LLaVA-OneVision: tell the model when each frame was taken (LLaVA-Video's time instruction, as lmms-eval writes it) \\[default: the checkpoint's dycoke.json, else off]. The Qwen families always write their own.")], None),
    "method": (Annotated[Method, typer.Option("--method", help="Compression: dycoke, or a baseline at the same visual-token budget, or none.")], Method.dycoke),
    "methods": (Annotated[str, typer.Option("--methods", help="Comma-separated methods, first = baseline: none, dycoke, fastv, random, frames.")], "none,dycoke"),
    "ttm_k": (Annotated[Optional[float], typer.Option("--ttm-k", show_default=False, help="TTM: fraction of tokens dropped from compared frames, in [0, 1) \\[default: model's, 0.7].")], None),
    "prune_p": (Annotated[Optional[float], typer.Option("--prune-p", show_default=False, help="Decode pruning: fraction of visual KV entries pruned, in [0, 1) \\[default: model's, 0.7].")], None),
    "prune_layer": (Annotated[Optional[int], typer.Option("--prune-layer", show_default=False, help="First layer L whose attention is pruned (layer L-1 is probed; on a hybrid model such as Qwen3.5, the full-attention layers from L on, the last one before L probed) \\[default: model's, 3].")], None),
    "refresh_threshold": (Annotated[float, typer.Option("--refresh-threshold", help="Re-select visual tokens when attention similarity falls below this, in [0, 1].")], REFRESH_THRESHOLD),
    "selection": (Annotated[Optional[Selection], typer.Option("--selection", show_default=False, help="DyCoke's decode-time rule: coverage (a floor of entries in every frame, then attention; not in the paper) or topk (the paper's: attention alone) \\[default: the model's, coverage].")], None),
    "frame_coverage": (Annotated[Optional[float], typer.Option("--frame-coverage", show_default=False, help="With --selection coverage: share of the decode budget spread evenly over frames, in [0, 1] \\[default: the model's, 0.5].")], None),
    "positions": (Annotated[Optional[Positions], typer.Option("--positions", show_default=False, help="Position ids of kept visual tokens: contiguous (the paper) or original (as in the full video) \\[default: the model's, contiguous].")], None),
    "no_compress": (Annotated[bool, typer.Option("--no-compress", help="Same as --method none.")], False),
    "offload_pruned": (Annotated[bool, typer.Option("--offload-pruned", help="Keep pruned KV entries in host memory instead of on the accelerator.")], False),
    "max_new_tokens": (Annotated[int, typer.Option("--max-new-tokens", help="Stop after this many tokens.")], 256),
    "temperature": (Annotated[float, typer.Option("--temperature", help="0 = greedy, else in [0.01, 100].")], 0.0),
    "top_p": (Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass, in (0, 1].")], 1.0),
    "seed": (Annotated[Optional[int], typer.Option("--seed", show_default=False, help="Seed for sampling and the random baseline, in [0, 2^64 - 1].")], None),
    "decode": (Annotated[Decoding, typer.Option("--decode", help="Decoding steps: auto = static shapes captured as a CUDA graph on CUDA, eager elsewhere; eager = the plain loop (for checking); static = static shapes (a CUDA graph on CUDA).")], Decoding.auto),
    "thinking": (Annotated[Optional[ThinkingChoice], typer.Option("--thinking", show_default=False, help="Reason first (a <think> block shown dimmed on stderr, kept out of the answer and in --json's 'reasoning') where the chat template has enable_thinking (Qwen3.5) or reasoning_effort (Qwen3.8: low, medium or high sets the effort; on is medium) \\[default: off].")], None),
    "device": (Annotated[DeviceChoice, typer.Option("--device", help="Where to run.")], DeviceChoice.auto),
    "dtype": (Annotated[DtypeChoice, typer.Option("--dtype", help="auto: fp16/bf16 on CUDA, bf16 on CPUs with AVX-512 BF16/AMX, else fp32.")], DtypeChoice.auto),
    "allow_pickle": (Annotated[bool, typer.Option("--allow-pickle", help="Also load pickle (.bin) weights. Only for checkpoints you trust.")], False),
    "no_cache": (Annotated[bool, typer.Option("--no-cache", help="Encode the clip afresh: neither read nor write the feature cache (`dycoke cache info`).")], False),
    "json_out": (Annotated[bool, typer.Option("--json", help="Print JSON instead of text: one object per answer, one per line.")], False),
    "quiet": (Annotated[bool, typer.Option("--quiet", "-q", help="No progress or stats on stderr.")], False),
    "show_kept": (Annotated[Optional[Path], typer.Option("--show-kept", metavar="FILE.png", show_default=False, help="Draw what the answer kept: the frames with the tokens the prefill kept, and the entries attended at each decoding step (several questions: FILE-2.png ...). Needs matplotlib (pip install 'dycoke-cli[picture]').")], None),
    "picture": (Annotated[Optional[Path], typer.Option("--picture", metavar="FILE.png", show_default=False, help="Draw what each method kept, side by side, with its measured speedup. Needs matplotlib (pip install 'dycoke-cli[picture]').")], None),
}

# The command line's words for the library's settings (errors.SettingError): each setting's flag,
# read from the declarations above (the CLI's one table). "n" is toyworld's own count.
def _long_flag(annotation) -> str:
    info = annotation.__metadata__[0]  # typer's OptionInfo: the first name is held as its "default"
    return next(d for d in (info.default, *info.param_decls) if isinstance(d, str) and d.startswith("--"))


FLAGS = {name: _long_flag(annotation) for name, (annotation, _) in _OPTIONS.items()} | {"n": "--n"}


def flag_words(exc: BaseException) -> str:
    """A library error in the command line's words (its flags)."""
    return exc.worded(FLAGS) if isinstance(exc, SettingError) else str(exc)


MODEL = ("model", "device", "dtype", "allow_pickle", "no_cache")
COMPRESSION = ("ttm_k", "prune_p", "prune_layer", "refresh_threshold", "selection", "frame_coverage", "positions",
               "offload_pruned")
SAMPLING = ("max_new_tokens", "temperature", "top_p", "decode", "thinking")
OUTPUT = ("json_out", "quiet")
FRAMES = ("frames", "fps", "max_frames", "memory_budget", "timestamps")
ANSWER = (*FRAMES, "method", *COMPRESSION, "no_compress", *SAMPLING, "seed", *MODEL, *OUTPUT, "show_kept")


@dataclass(frozen=True)
class Flags:
    """The shared options one command was given (those it does not take keep their defaults)."""

    model: str | None = None
    frames: str | None = None  # a count or "max", as typed (frame_options parses it)
    fps: float | None = None
    max_frames: int | None = None
    memory_budget: str | None = None
    timestamps: bool | None = None
    method: Method = Method.dycoke
    methods: str = "none,dycoke"
    ttm_k: float | None = None
    prune_p: float | None = None
    prune_layer: int | None = None
    refresh_threshold: float = REFRESH_THRESHOLD
    selection: Selection | None = None
    frame_coverage: float | None = None
    positions: Positions | None = None
    no_compress: bool = False
    offload_pruned: bool = False
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    decode: Decoding = Decoding.auto
    thinking: ThinkingChoice | None = None
    device: DeviceChoice = DeviceChoice.auto
    dtype: DtypeChoice = DtypeChoice.auto
    allow_pickle: bool = False
    no_cache: bool = False
    json_out: bool = False
    quiet: bool = False
    show_kept: Path | None = None  # ask, caption: the picture of each answer
    picture: Path | None = None  # compare: the picture of every method

    @property
    def trace(self) -> bool:
        """Whether answers record what they kept (for a picture, or --json's ``kept``)."""
        return self.json_out or self.show_kept is not None or self.picture is not None

    @property
    def model_name(self) -> str:
        from ..models.loader import DEFAULT_MODEL

        return self.model or os.environ.get("DYCOKE_MODEL") or DEFAULT_MODEL

    def compression(self, method: Method | None = None) -> CompressionOptions:
        method = method or (Method.none if self.no_compress else self.method)
        return CompressionOptions(method=method, ttm_k=self.ttm_k, prune_p=self.prune_p, prune_layer=self.prune_layer,
                                  refresh_threshold=self.refresh_threshold, offload_pruned=self.offload_pruned,
                                  seed=self.seed if self.seed is not None else 0, frame_coverage=self.frame_coverage,
                                  selection=self.selection, positions=self.positions).validate()

    def sampling(self) -> SamplingOptions:
        choice = None if self.thinking is None else ThinkingChoice(self.thinking)
        thinking = None if choice is None else {"on": True, "off": False}.get(choice.value, choice.value)
        return SamplingOptions(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                               seed=self.seed, decode=self.decode, thinking=thinking).validate()

    def frame_options(self) -> FrameOptions:
        frames = None if self.frames is None else parse_frames(self.frames)
        budget = None if self.memory_budget is None else parse_size("memory_budget", self.memory_budget)
        return FrameOptions(frames=frames, fps=self.fps, max_frames=self.max_frames, memory_budget=budget,
                            timestamps=self.timestamps).validate()

    def check(self) -> None:
        """Everything that can be checked before touching the video or the model."""
        self.frame_options()
        from .kept import check_picture_path

        for flag, path in (("--show-kept", self.show_kept), ("--picture", self.picture)):
            if path is not None:
                check_picture_path(path, flag)
        self.compression()
        self.sampling()

    def feature_cache(self):
        """The on-disk feature cache, or None with --no-cache."""
        from ..feature_cache import FeatureCache

        return None if self.no_cache else FeatureCache()

    def locate(self) -> None:
        """Find and check the model folder (cheap: no weights are read)."""
        from ..models.loader import locate_model

        locate_model(self.model_name, self.allow_pickle)

    def load(self):
        from ..models.loader import load_model

        return load_model(self.model_name, device=self.device.value, dtype=self.dtype.value,
                          allow_pickle=self.allow_pickle)


def with_flags(*names: str, **defaults):
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
