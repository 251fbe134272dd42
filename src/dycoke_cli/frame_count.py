"""How many frames a clip is sampled at, and why that many: a count asked for, ``--frames
max`` (as many as the model's context and the memory hold, after the method's selection), or
the model's rule for the clip (its count, or its rate over the clip's length: ``--fps`` within
``--max-frames``), cut to what the context and the memory hold.

The memory bound compares an estimate of the answer's peak above the loaded model
(:func:`estimate_peak`: the kept features, one chunk of frames being encoded, the prefill's
activations, the KV cache) with ``--memory-budget``, else with the device's free memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .compression.baselines import prompt_visual_extent
from .decoding.loop import PREFILL_CHUNK
from .decoding.prompt import context_length
from .memory import free_bytes
from .options import FRAME_LIMIT, CompressionOptions, FrameOptions, Method, OptionError
from .values import Prompt

# Frames per vision-tower call: bounds the activation memory while encoding (and drives the
# progress). Even: whole temporal steps of two frames.
ENCODE_CHUNK = 4

# -------------------------------------------------------------------------------- the count


# The bounds of --frames max, in the order a tie is named.
BOUNDS = ("context", "memory", "max_frames", "clip")


@dataclass(frozen=True)
class FrameCount:
    """The frames to sample from one clip, and what chose that many.

    ``chosen_by``: ``"frames"`` (a count asked for), ``"rule"`` (the model's rule, or --fps), or
    the bound that cut the rule's count or chose ``--frames max``'s: ``"context"`` (the model's
    context with this method), ``"memory"`` (the estimated peak against the free memory or
    --memory-budget), ``"max_frames"`` (--max-frames, or the server's ceiling), ``"clip"`` (the
    clip has no more frames). ``bounds``: each bound's largest count (None: unbounded), for
    ``--frames max``; empty otherwise."""

    count: int
    chosen_by: str
    bounds: dict = field(default_factory=dict)


def choose_frames(lm, info, frames: FrameOptions, opts: CompressionOptions, prompt: Prompt,
                  max_new_tokens: int = 256, ceiling: int | None = None) -> FrameCount:
    """The frame count for a clip whose probed VideoInfo is ``info`` (see FrameCount):
    a count asked for, refused with the bound it breaks; ``"max"``, the largest that every
    bound allows; else the model's rule (``lm.default_frames``, at --fps within --max-frames),
    cut to what the context and the memory hold. ``ceiling``: a limit set by whoever runs the
    tool (the server's --max-frames); ``opts`` resolved; ``prompt``: the question's, rendered once
    (decoding.prompt.render_prompt)."""
    room = FrameRoom(lm, info, frames, opts, prompt, max_new_tokens)
    if frames.counted:
        room.check(frames.frames)
        return FrameCount(frames.frames, "frames")
    top = min((m for m in (frames.max_frames, ceiling) if m is not None), default=None)
    if frames.as_many_as_fit:
        bounds = {"context": room.most(room.fits_context), "memory": room.most(room.fits_memory),
                  "max_frames": top, "clip": clip_frames(info)}
        count = min(b for b in bounds.values() if b is not None)
        chosen_by = next(name for name in BOUNDS if bounds[name] == count)
        if count < 1:  # not even one frame: the memory's error, or the prompt's own check of its size
            room.check(1)
            count = 1
        return FrameCount(count, chosen_by, bounds)
    n = lm.default_frames(info, frames.fps, top)
    for name, fits in (("context", room.fits_context), ("memory", room.fits_memory)):
        if not fits(n):
            most = room.most(fits, n)
            if most < 1:
                return FrameCount(n, "rule")  # not even one frame: the prompt's own check names its size
            return FrameCount(most, name)
    return FrameCount(n, "rule")


def clip_frames(info) -> int | None:
    """The frames a clip has (its stream's count, else its length times its rate); None when
    unknown. Sampling more only repeats them."""
    if info is None:
        return None
    if info.frame_count:
        return int(info.frame_count)
    if info.duration and info.fps:
        return max(1, round(info.duration * info.fps))
    return None


class FrameRoom:
    """How many frames fit one prompt: the model's context with the method, and the memory."""

    def __init__(self, lm, info, frames: FrameOptions, opts: CompressionOptions, prompt: Prompt,
                 max_new_tokens: int):
        self.lm, self.opts, self.max_new_tokens = lm, opts, max_new_tokens
        self.text = prompt.text_tokens + 2  # the newline after the video, one new token
        self.limit = context_length(lm)
        self.times = TimeText(lm, info) if timestamps_on(lm, frames) else None
        self.budget, self.budget_source = memory_budget(lm, frames)

    def steps(self, count: int) -> int:
        return -(-count // self.lm.frames_per_step)

    def prompt(self, count: int) -> int:
        """Positions the prompt of ``count`` frames spans (its visual part after the method's
        selection, the text around it, timestamps)."""
        steps = self.steps(count)
        text = self.text + steps * self.lm.text_per_step + (self.times.tokens(count) if self.times else 0)
        return prompt_visual_extent(steps, self.lm.tokens_per_frame, self.opts) + text

    def fits_context(self, count: int) -> bool:
        return self.limit is None or self.prompt(count) <= self.limit

    def fits_memory(self, count: int) -> bool:
        return self.budget is None or self.peak(count) <= self.budget

    def peak(self, count: int) -> int:
        return estimate_peak(self.lm, self.steps(count), self.prompt(count), self.opts, self.max_new_tokens)

    def most(self, fits, below: int | None = None) -> int:
        """The largest count that ``fits`` (a monotone test), at most FRAME_LIMIT (or ``below - 1``
        when ``below`` is given and does not fit); 0 when none does."""
        lo, hi = 0, below
        if hi is None:
            step = 1
            while fits(step) and step < FRAME_LIMIT:
                lo, step = step, step * 2
            if lo >= FRAME_LIMIT or (step >= FRAME_LIMIT and fits(FRAME_LIMIT)):
                return FRAME_LIMIT
            hi = min(step, FRAME_LIMIT)
        while hi - lo > 1:  # lo fits (0 trivially), hi does not
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    def check(self, count: int) -> None:
        """Refuse ``count`` frames, naming the bound, when the context or the memory cannot hold them."""
        if not self.fits_context(count):
            most = self.most(self.fits_context, count)
            if most >= 1:  # else not even one frame fits: the prompt's own check names its size
                per = self.lm.tokens_per_frame / self.lm.frames_per_step
                raise OptionError("frames", f"must be in [1, {most}] for this model: its {self.limit}-token context "
                                            f"holds at most {most} frames of {per:g} visual tokens with method "
                                            f"{Method(self.opts.method).value} (got {count})")
        if not self.fits_memory(count):
            most = self.most(self.fits_memory, count)
            if most < 1:
                raise OptionError("memory_budget", f"holds no frame: one needs an estimated {_gib(self.peak(1))} above "
                                                   f"the loaded model, more than {self.budget_source}")
            raise OptionError("frames", f"must be in [1, {most}] in this memory: {count} frames need an estimated "
                                        f"{_gib(self.peak(count))} above the loaded model, more than "
                                        f"{self.budget_source} (got {count})")


def memory_budget(lm, frames: FrameOptions) -> tuple[int | None, str]:
    """The bytes an answer may use above the loaded model, and how to name them in an error."""
    if frames.memory_budget is not None:
        return frames.memory_budget, f"{{memory_budget}} {_gib(frames.memory_budget)}"
    free = free_bytes(lm.device)
    where = "the GPU" if getattr(lm.device, "type", "") == "cuda" else "this machine"
    return free, f"the {_gib(free or 0)} free on {where}"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def timestamps_on(lm, frames: FrameOptions) -> bool:
    """Whether the prompt carries the time instruction (LLaVA-OneVision; the Qwen families write
    their own timestamps whatever this says)."""
    on = frames.timestamps if frames.timestamps is not None else lm.defaults.timestamps
    return bool(on) and lm.time_instruction(0.0, ()) is not None


class TimeText:
    """Tokens of the time instruction for ``count`` frames of a clip: the text without times,
    plus each time written as the clip's longest (its length), one token of slack each."""

    def __init__(self, lm, info):
        duration = (info.duration if info is not None else None) or 0.0
        tokenize = lambda text: len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
        self.base = tokenize(lm.time_instruction(duration, ()) + "\n")
        self.per_frame = tokenize(f"{duration:.2f}s,") + 1

    def tokens(self, count: int) -> int:
        return self.base + count * self.per_frame


def estimate_peak(lm, steps: int, prompt: int, opts: CompressionOptions, max_new_tokens: int) -> int:
    """Bytes an answer's peak needs above the loaded model, estimated from the shapes: the kept
    features (and DeepStack levels), one chunk of frames being encoded, the prompt's embeddings
    and the activations of its prefill, and the KV cache (the session's prefix and the answer's
    own copy, and DyCoke's store of the visual entries)."""
    text, vision = lm.model.config.text_config, lm.model.config.vision_config
    item = torch.empty((), dtype=lm.dtype).element_size()
    d, n = lm.hidden_size, lm.tokens_per_frame
    levels = 1 + len(getattr(vision, "deepstack_visual_indexes", None) or ())
    features = steps * n * d * item * levels
    patches = 4 * n  # tokens come from 2x2 pooled or merged patches
    v_hidden = int(getattr(vision, "hidden_size", d))
    v_inter = int(getattr(vision, "intermediate_size", 4 * v_hidden))
    v_heads = int(getattr(vision, "num_attention_heads", 1))
    encoding = ENCODE_CHUNK * lm.frames_per_step * (patches * (6 * v_hidden + 2 * v_inter) * 4
                                                    + v_heads * patches * patches * 4)
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or d // heads)
    entry = 2 * kv_heads * head_dim * item  # one position's keys and values in one layer
    layers = len(lm.attention_layers)
    capacity = prompt + max_new_tokens + 1
    kv = 2 * layers * entry * capacity  # the prefix, and the answer's cache loaded from it
    if Method(opts.method) == Method.dycoke:
        kv += (layers - opts.prune_layer) * entry * min(prompt, steps * n)  # the store of visual entries
    chunk = prompt if getattr(lm.device, "type", "") != "cuda" else min(prompt, PREFILL_CHUNK)
    inter = int(getattr(text, "intermediate_size", 4 * d))
    prefill = chunk * (6 * d + 3 * inter) * item + 2 * prompt * d * item  # activations; embeddings and plan
    return int(features + encoding + kv + prefill)


def frames_for_methods(lm, info, frames: FrameOptions, options: list[CompressionOptions], prompt: Prompt,
                       max_new_tokens: int = 256) -> FrameCount:
    """The count that every method can take (compare and eval run them all on the same frames):
    the smallest of their choices."""
    return min((choose_frames(lm, info, frames, opts, prompt, max_new_tokens) for opts in options),
               key=lambda chosen: chosen.count)
