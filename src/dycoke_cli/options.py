"""What a run is asked to do: the compression method and its knobs, and how tokens are sampled.

Each options class validates itself in one place and raises :class:`OptionError`, which names
the field (``ttm_k``); the CLI shows it under the flag's name (``--ttm-k``). ``None`` fields of
:class:`CompressionOptions` take the checkpoint's defaults in :meth:`CompressionOptions.resolve`.
"""

from __future__ import annotations

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
        """Fill ``None`` fields from the model's defaults (``lm.defaults``) and check its depth."""
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
