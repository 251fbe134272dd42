"""What a run is asked to do: the compression method and its knobs, and how tokens are sampled.

Each options class validates itself in one place and raises :class:`OptionError`, which names
the field (``ttm_k``); the CLI shows it under the flag's name (``--ttm-k``). ``None`` fields of
:class:`CompressionOptions` take the checkpoint's defaults in :meth:`CompressionOptions.resolve`.
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass, replace
from enum import Enum

from .errors import SettingError, UsageError

# The paper's refresh rule: re-select the visual tokens when the cosine similarity between this
# step's attention and the one the selection came from falls below this.
REFRESH_THRESHOLD = 0.9
# FastV prunes after layer K = 2 (its paper's default), from layer K - 1's attention.
FASTV_LAYER = 2
# Temperatures below this overflow float32 logits (logits / t); 0 means greedy.
TEMPERATURE_MIN = 0.01
TEMPERATURE_MAX = 100.0
EFFORTS = ("low", "medium", "high")  # reasoning efforts (thinking on, at that effort, where a template takes one)
SEED_MAX = 2**64 - 1  # torch generators take 64-bit seeds
FRAMES_MAX = "max"  # --frames max: as many frames as the context and the memory hold
# More frames than any model's context holds (a 1M-token context at one token a frame): where
# --frames max looks no further.
FRAME_LIMIT = 1_000_000
FPS_LIMIT = 240.0  # sampling rates above this are typos (the same bound as dycoke.json's fps)


class Method(str, Enum):
    """How visual tokens are reduced. All but ``none`` keep the same visual-token budget."""

    dycoke = "dycoke"  # TTM before the LLM + dynamic KV pruning while decoding (the paper)
    fastv = "fastv"  # one-shot pruning at prefill by the last prompt token's attention
    random = "random"  # random visual tokens
    frames = "frames"  # uniformly fewer frames
    none = "none"  # uncompressed


class Positions(str, Enum):
    """Position ids of kept visual tokens."""

    contiguous = "contiguous"  # renumbered after merging (the paper)
    original = "original"  # as in the full video; the text after it sits where it would


class Selection(str, Enum):
    """How DyCoke's decode-time pruning picks the visual entries the pruned layers attend to."""

    coverage = "coverage"  # a floor of entries in every frame, the rest by attention (ours; the default)
    topk = "topk"  # the top entries by the current token's attention alone (the paper)


# The share of the decode budget spread over the frames with Selection.coverage: 0.5 gives each of
# 8 frames 1 of 16 entries. Chosen on a held-out split of our own (training/alt_world.py, seed 4040,
# 200 clips, 1089 questions; never the evaluation sets): DyCoke 99.17 % (captions 95.5 %) with the
# paper's top-k, the same at 0.25 (no frame gets a whole entry), 100.0 % (100.0 %) at 0.5.
FRAME_COVERAGE = 0.5


class Decoding(str, Enum):
    """How the decoding steps run."""

    auto = "auto"  # static on CUDA, eager elsewhere
    eager = "eager"  # the plain loop: exact-length tensors, host reads where convenient (CPU; checking)
    static = "static"  # static shapes, no host sync inside a step; captured as a CUDA graph on CUDA


class OptionError(SettingError):
    """An option out of range: the setting ``name``, then the ``problem`` (see SettingError)."""

    def __init__(self, name: str, problem: str):
        self.name, self.problem = name, problem
        super().__init__(f"{{{name}}} {problem}")


def check_range(name: str, value, low, high, *, low_open: bool = False, high_open: bool = False) -> None:
    """Raise OptionError unless ``low <(=) value <(=) high`` (NaN is never in range)."""
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):  # False for NaN
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise OptionError(name, f"must be in {interval} (got {value})")


def check_count(name: str, value: int, low: int = 1, high: int | None = None) -> None:
    if value < low or (high is not None and value > high):
        bound = f"at least {low}" if high is None else f"in [{low}, {high}]"
        raise OptionError(name, f"must be {bound} (got {value})")


@dataclass(frozen=True)
class CompressionOptions:
    """How to compress. ``None`` fields take the model's defaults (see :meth:`resolve`)."""

    method: Method = Method.dycoke
    ttm_k: float | None = None  # TTM: fraction of tokens dropped from compared frames
    prune_p: float | None = None  # decode pruning: fraction of visual KV entries pruned
    prune_layer: int | None = None  # first pruned layer L (layer L - 1 is probed)
    refresh_threshold: float = REFRESH_THRESHOLD
    offload_pruned: bool = False  # keep pruned KV entries in host memory
    seed: int = 0  # for the random baseline
    frame_coverage: float | None = None  # share of the decode budget spread over frames (Selection.coverage)
    positions: Positions | None = None
    selection: Selection | None = None  # DyCoke's decode-time rule (None: the model's, coverage)

    def validate(self) -> "CompressionOptions":
        """Range checks that need no model; returns self with enums normalised."""
        opts = replace(self, method=_enum(Method, "method", self.method),
                       positions=None if self.positions is None else _enum(Positions, "positions", self.positions),
                       selection=None if self.selection is None else _enum(Selection, "selection", self.selection))
        if opts.ttm_k is not None:
            check_range("ttm_k", opts.ttm_k, 0, 1, high_open=True)
        if opts.prune_p is not None:
            check_range("prune_p", opts.prune_p, 0, 1, high_open=True)
        check_range("refresh_threshold", opts.refresh_threshold, 0, 1)
        if opts.frame_coverage is not None:
            check_range("frame_coverage", opts.frame_coverage, 0, 1)
        check_count("seed", opts.seed, 0, SEED_MAX)
        return opts

    def resolve(self, lm) -> "CompressionOptions":
        """Fill ``None`` fields from the model's defaults (``lm.defaults``) and check its depth.
        Options resolved for ``lm`` come back as they are: they are resolved once, where a
        Session is made or asked, and every stage after that takes them as given (a copy made
        with ``replace`` is resolved afresh)."""
        marker = self.__dict__.get("_resolved_for")
        if marker is not None and marker() is lm:
            return self
        opts = self._resolved(lm)
        object.__setattr__(opts, "_resolved_for", weakref.ref(lm))
        return opts

    def __getstate__(self) -> dict:  # pickled or copied: the marker stays behind (a weak reference)
        return {k: v for k, v in self.__dict__.items() if k != "_resolved_for"}

    def _resolved(self, lm) -> "CompressionOptions":
        defaults, num_layers = lm.defaults, lm.num_layers
        opts = replace(
            self,
            ttm_k=defaults.ttm_k if self.ttm_k is None else self.ttm_k,
            prune_p=defaults.prune_p if self.prune_p is None else self.prune_p,
            prune_layer=defaults.prune_layer if self.prune_layer is None else self.prune_layer,
            positions=defaults.positions if self.positions is None else self.positions,
            selection=defaults.selection if self.selection is None else self.selection,
            frame_coverage=defaults.frame_coverage if self.frame_coverage is None else self.frame_coverage,
        ).validate()
        if not 1 <= opts.prune_layer <= num_layers - 1:
            raise OptionError("prune_layer", f"must be in [1, {num_layers - 1}] for this {num_layers}-layer model "
                                             f"(got {opts.prune_layer})")
        linear = tuple(getattr(lm, "linear_layers", ()) or ())
        if linear:
            _check_hybrid_prune_layer(opts.prune_layer, num_layers, linear)
        if opts.method == Method.fastv and num_layers <= FASTV_LAYER:
            raise UsageError(f"fastv needs more than {FASTV_LAYER} layers (this model has {num_layers})")
        return opts

    @property
    def coverage(self) -> float:
        """The share of the decode budget kept per frame by the rule in force (0 for top-k)."""
        if self.selection is not None and Selection(self.selection) == Selection.topk:
            return 0.0
        return self.frame_coverage if self.frame_coverage is not None else FRAME_COVERAGE

    def to_dict(self) -> dict:
        out = asdict(self)
        out["method"] = Method(self.method).value
        out["positions"] = None if self.positions is None else Positions(self.positions).value
        out["selection"] = None if self.selection is None else Selection(self.selection).value
        return out


@dataclass(frozen=True)
class FrameOptions:
    """How many frames to sample, and how they are described to the model.

    ``frames``: a count, ``"max"`` (the most that the context and the memory hold), or None (the
    model's rule for the clip: its count, or its rate over the clip's length). ``fps`` and
    ``max_frames`` replace the rule's rate and ceiling (``max_frames`` bounds ``"max"`` too).
    ``memory_budget``: bytes the answer may use above the loaded model (None: the device's free
    memory). ``timestamps``: LLaVA-OneVision's time instruction before the question (None: the
    checkpoint's dycoke.json, else off)."""

    frames: int | str | None = None
    fps: float | None = None
    max_frames: int | None = None
    memory_budget: int | None = None
    timestamps: bool | None = None

    def validate(self) -> "FrameOptions":
        if isinstance(self.frames, str):
            if self.frames != FRAMES_MAX:
                raise OptionError("frames", f"must be a whole number of frames or 'max' (got {self.frames!r})")
        elif self.frames is not None:  # too many for the context or the memory: frame_count says which
            _check_whole("frames", self.frames, 1)
        if self.max_frames is not None:
            _check_whole("max_frames", self.max_frames, 1)
        if self.fps is not None:
            check_range("fps", _number("fps", self.fps), 0, FPS_LIMIT, low_open=True)
        if self.memory_budget is not None and not (isinstance(self.memory_budget, int) and self.memory_budget > 0):
            raise OptionError("memory_budget", f"must be a positive size (got {self.memory_budget!r})")
        if self.counted and self.fps is not None:
            raise OptionError("fps", f"sets the rate of the model's rule, which a frame count replaces (got both: "
                                     f"{self.frames} frames and {self.fps:g} fps)")
        if self.counted and self.max_frames is not None and self.frames > self.max_frames:
            raise OptionError("frames", f"must be at most the maximum, {self.max_frames} (got {self.frames})")
        return self

    @property
    def counted(self) -> bool:
        """A fixed count was asked for (not the rule, not "max")."""
        return isinstance(self.frames, int) and not isinstance(self.frames, bool)

    @property
    def as_many_as_fit(self) -> bool:
        return self.frames == FRAMES_MAX

    def to_dict(self) -> dict:
        return {"frames_asked": self.frames, "fps": self.fps, "max_frames": self.max_frames,
                "memory_budget_bytes": self.memory_budget, "timestamps": self.timestamps}


def _check_whole(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(name, f"must be a whole number (got {value!r})")
    check_count(name, value, low, high)


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(name, f"must be a number (got {value!r})")
    return float(value)


_SIZE_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
               "G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40, "TIB": 2**40}


def parse_size(name: str, text: str) -> int:
    """Bytes of a size such as ``512MB``, ``8GB`` or ``1.5GiB`` (a bare number is bytes; units
    are powers of 1024); OptionError naming ``name`` otherwise."""
    raw = str(text).strip()
    number = raw.rstrip("KMGTBkmgtbIi ")
    unit = raw[len(number):].strip().upper()
    try:
        value = float(number)
    except ValueError:
        value = float("nan")
    if unit not in _SIZE_UNITS or not 0 < value * _SIZE_UNITS[unit] < 2**63:
        raise OptionError(name, f"must be a positive size such as 512MB or 8GB (got {text!r})")
    return max(1, int(value * _SIZE_UNITS[unit]))


def parse_frames(text: str) -> int | str:
    """--frames: a whole number or ``max``."""
    raw = str(text).strip().lower()
    if raw == FRAMES_MAX:
        return FRAMES_MAX
    try:
        return int(raw)
    except ValueError:
        raise OptionError("frames", f"must be a whole number of frames or 'max' (got {text!r})") from None


@dataclass(frozen=True)
class SamplingOptions:
    """How answer tokens are chosen."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling mass
    seed: int | None = None  # None: a fresh seed per run (torch's global RNG is left alone)
    ignore_eos: bool = False  # always produce max_new_tokens (benchmarks: fixed decode length)
    decode: Decoding = Decoding.auto
    # reason first (a <think> ... </think> block, kept apart from the answer): True, or an effort
    # of EFFORTS, through the chat template's enable_thinking or reasoning_effort; None or False: off
    thinking: bool | str | None = None

    def validate(self) -> "SamplingOptions":
        check_count("max_new_tokens", self.max_new_tokens)
        _enum(Decoding, "decode", self.decode)
        if self.temperature != 0 and not TEMPERATURE_MIN <= self.temperature <= TEMPERATURE_MAX:
            raise OptionError("temperature", f"must be 0 (greedy) or in [{TEMPERATURE_MIN:g}, {TEMPERATURE_MAX:g}] "
                                             f"(got {self.temperature})")
        check_range("top_p", self.top_p, 0, 1, low_open=True)
        if self.seed is not None:
            check_count("seed", self.seed, 0, SEED_MAX)
        if isinstance(self.thinking, str) and self.thinking not in EFFORTS:
            raise OptionError("thinking", f"must be on, off or an effort: {', '.join(EFFORTS)} (got {self.thinking!r})")
        return self

    def to_dict(self) -> dict:
        return {**asdict(self), "decode": Decoding(self.decode).value}


def _check_hybrid_prune_layer(layer: int, num_layers: int, linear: tuple[int, ...]) -> None:
    """A hybrid stack (linear-attention layers have no keys): L must leave a full-attention layer
    before it to probe and one at or after it to prune."""
    full = [i for i in range(num_layers) if i not in linear]
    if len(full) >= 2 and full[0] < layer <= full[-1]:
        return
    where = ", ".join(map(str, full)) or "none"
    valid = f"in [{full[0] + 1}, {full[-1]}]" if len(full) >= 2 else "impossible: it has fewer than two"
    raise OptionError("prune_layer", f"must be {valid} for this hybrid model (full attention at layers {where}: "
                                     f"one before L is probed, those from L on are pruned) (got {layer})")


def _enum(kind: type[Enum], name: str, value):
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(m.value for m in kind)
        raise OptionError(name, f"must be one of {choices} (got {value!r})") from None
