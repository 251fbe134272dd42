"""What an answer produces: the progress events a run streams (:class:`Stage`, :class:`Planned`,
:class:`Token`, :class:`Done`) and the answer with its stats. A low module: it imports no stage
(the clip and token values it refers to are in values.py).

``--json`` is :func:`answer_json` of an :class:`Answer`: one schema, versioned by
``SCHEMA_VERSION`` and documented in the README.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Union

from .values import VideoInfo

SCHEMA_VERSION = 1  # of the --json output; bump on any change that is not an added key


# -------------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Stage:
    """A stage began (or advanced: ``done`` of ``total``)."""

    name: str
    done: int = 0
    total: int = 0


@dataclass(frozen=True)
class FramesChosen:
    """The frame count chosen for the clip, and what chose it (frame_count.FrameCount)."""

    count: int
    chosen_by: str
    bounds: dict


@dataclass(frozen=True)
class Progress:
    """Reading and encoding a clip, a chunk of frames at a time: frames decoded (sampling targets
    settled) and frames encoded so far, of ``total``; the seconds left at the pace so far."""

    decoded: int
    encoded: int
    total: int
    seconds_left: float | None


@dataclass(frozen=True)
class Planned:
    """Known once the visual tokens are chosen, before the prefill."""

    visual_tokens: int
    visual_tokens_prefill: int
    visual_tokens_decode: int
    prune_layer: int | None
    flops_ratio_estimate: float
    prompt_tokens: int = 0  # the prompt's length as prefilled (a reused prefix included): exact for every family
    prefix_reused: bool = False  # the prompt up to the question came from an earlier answer (its keys and values)


@dataclass(frozen=True)
class Token:
    """Text one generated token added, with the cheap live counters."""

    text: str
    tokens_generated: int
    ttft_s: float
    decode_tokens_per_s: float | None
    refreshes: int | None  # DyCoke's selection counters, None for other methods
    recalled: int | None
    reasoning: bool = False  # the text is reasoning (a <think> block), not the answer


@dataclass(frozen=True)
class Done:
    answer: Answer


Event = Union[Stage, FramesChosen, Progress, Planned, Token, Done]


# -------------------------------------------------------------------------------- answer


@dataclass(frozen=True)
class Timings:
    """Seconds per stage of one answer."""

    read_video: float  # reading frames from the file
    encode: float  # vision tower
    merge: float  # TTM / baseline selection
    prefill: float
    decode: float  # decoding steps after the first token (warm-up and capture excluded)
    generate: float  # prefill + decoding, wall
    decode_setup: float = 0.0  # warming up and capturing the static decoding step (once per session)


@dataclass(frozen=True)
class SelectionStats:
    """DyCoke's dynamic selection over one answer."""

    steps: int  # decoding steps observed
    selections: int  # selections computed (the first included)
    refreshes: int  # recomputations after the first, triggered by the similarity rule
    recalled: int  # visual entries that came back after having been pruned
    rebuild_ms: float  # writing selected entries into the working buffers


@dataclass(frozen=True)
class KVBytes:
    working: int  # attended entries, all layers
    store: int  # pruned layers' store of every visual entry
    store_on_host: bool
    device_total: int
    saved_on_device: int  # what --offload-pruned took off the accelerator
    moved_to_device: int = 0  # bytes copied from an offloaded store to the accelerator (its price)
    linear_state: int = 0  # a hybrid stack's linear layers: their fixed-size states (in device_total)


@dataclass(frozen=True)
class AnswerStats:
    frames: int
    frames_requested: int
    tokens_per_frame: int
    visual_tokens: int
    visual_tokens_prefill: int
    visual_tokens_decode: int
    prefill_tokens: int
    prune_layer: int | None
    tokens_generated: int
    timings: Timings
    ttft_s: float
    decode_tokens_per_s: float | None
    decode_ms_per_token_median: float | None
    kv_bytes: KVBytes
    peak_memory_bytes: int | None  # process peak (CPU: resident high-water mark; CUDA: allocator)
    peak_memory_above_start_bytes: int | None  # this answer's own peak above what it started with
    flops_estimate: float
    flops_ratio_estimate: float  # uncompressed LLM FLOPs / this answer's
    selection: SelectionStats | None
    decode_path: str | None = None  # how the decoding steps ran: "eager", "static" or "cuda-graph"
    decode_path_note: str | None = None  # why not a CUDA graph, when one was wanted and failed
    decode_step_reused: bool = False  # the static step (CUDA graph) was captured for an earlier answer
    # the layers that see only the reduced visual tokens after the prefill (DyCoke: the KV layers
    # from L on, a hybrid stack's full-attention ones only; FastV: every layer after its cut)
    pruned_layers: tuple[int, ...] | None = None
    # what chose the frame count (frame_count.FrameCount.chosen_by), and with --frames max each
    # bound's largest count (context, memory, max_frames, clip; null: no such bound)
    frames_chosen_by: str | None = None
    frame_bounds: dict | None = None

    @property
    def prefill_retention(self) -> float:
        return self.visual_tokens_prefill / self.visual_tokens

    @property
    def decode_retention(self) -> float:
        return self.visual_tokens_decode / self.visual_tokens_prefill if self.visual_tokens_prefill else 1.0

    @property
    def overall_retention(self) -> float:
        return self.visual_tokens_decode / self.visual_tokens

    def to_dict(self) -> dict:
        """Flat, as in ``--json``: selection counters beside the rest, timings under ``timings_s``."""
        out = asdict(self)
        out["timings_s"] = out.pop("timings")
        selection = out.pop("selection")
        out.update(selection or {})
        out.update(prefill_retention=self.prefill_retention, decode_retention=self.decode_retention,
                   overall_retention=self.overall_retention)
        return out


def hex_mask(bits) -> str:
    """A kept-token mask as hex: token i is bit i, the first token the most significant bit of
    the first digit (4 tokens a digit; the last digit padded with zeros)."""
    bits = [bool(b) for b in bits]
    bits += [False] * (-len(bits) % 4)
    return "".join("0123456789abcdef"[sum(b << (3 - j) for j, b in enumerate(bits[i:i + 4]))]
                   for i in range(0, len(bits), 4))


@dataclass(frozen=True)
class KeptTrace:
    """What one answer kept, per frame (a temporal step of a Qwen family), for its picture and
    ``--json``'s ``kept``. The attended counts are run-length: ``attended[i]`` holds from step
    ``selection_steps[i]`` up to the next one (DyCoke takes a new selection only then)."""

    frames: int
    rows: int  # one frame's token grid (LLaVA-OneVision: the pooled grid; Qwen: one temporal step's)
    cols: int
    frames_per_step: int  # video frames one cell covers (Qwen families: 2)
    mask: tuple[str, ...]  # per frame, hex_mask of the tokens the pruned part of the model may see after the prefill
    kept: tuple[int, ...]  # per frame, how many that is
    pruned_from: int | None  # the first layer that sees only the attended entries (None: no layer prunes)
    steps: int  # decoding steps after the first token; step s has the answer's token s as its query
    selection_steps: tuple[int, ...]  # the steps that took a new selection (the first is step 0)
    attended: tuple[tuple[int, ...], ...]  # per selection, attended entries per frame
    tokens: tuple[str, ...]  # the text of the answer's token at each step

    def to_dict(self) -> dict:
        return {"frames": self.frames, "grid": [self.rows, self.cols], "frames_per_step": self.frames_per_step,
                "mask": list(self.mask), "kept": list(self.kept), "pruned_from": self.pruned_from,
                "steps": self.steps, "refresh_steps": list(self.selection_steps[1:]),
                "selections": [{"step": s, "counts": list(c)} for s, c in zip(self.selection_steps, self.attended)],
                "tokens": list(self.tokens)}


@dataclass(frozen=True)
class Answer:
    text: str
    token_ids: tuple[int, ...]
    method: str
    options: dict  # compression and sampling options as used
    stats: AnswerStats
    video: VideoInfo | None = None
    question: str = ""
    reasoning: str | None = None  # with thinking on: the <think> block's text (``text`` is the answer alone)
    kept: KeptTrace | None = None  # what it kept, when asked for (a picture, --json)


def answer_json(answer: Answer, model: dict) -> dict:
    """The ``--json`` object of one answer (schema ``SCHEMA_VERSION``, see the README)."""
    reasoning = {} if answer.reasoning is None else {"reasoning": answer.reasoning}
    return {
        "schema_version": SCHEMA_VERSION,
        "answer": answer.text,
        **reasoning,
        "model": model,
        "video": answer.video.to_dict() if answer.video is not None else None,
        "options": {**answer.options, "frames": answer.stats.frames_requested, "question": answer.question},
        "stats": answer.stats.to_dict(),
        **({} if answer.kept is None else {"kept": answer.kept.to_dict()}),
    }
