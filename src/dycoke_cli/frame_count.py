"""How many frames a clip is sampled at: the user's count, or the checkpoint's default for the
clip, within what the model's context holds with the chosen method."""

from __future__ import annotations

from .compression.baselines import prompt_visual_extent
from .decoding.prompt import context_length
from .options import CompressionOptions, OptionError
from .values import Prompt


def fit_frames(lm, frames: int | None, opts: CompressionOptions, prompt: Prompt, default: int | None = None) -> int:
    """The frame count to sample: ``frames``, refused with the bound when ``prompt`` (rendered
    once, see decoding.prompt.render_prompt) would not fit the model's context with ``opts``
    (resolved); without ``frames``, ``default`` (the model's default for the clip,
    ``lm.default_frames(path)``: its fps rule, say), cut to what fits."""
    n = frames if frames is not None else (default if default is not None else lm.defaults.num_frames)
    limit = context_length(lm)
    if limit is None:
        return n
    room = limit - prompt.text_tokens - 2  # the newline after the video, one new token
    per_step, fps, text = lm.tokens_per_frame, lm.frames_per_step, lm.text_per_step

    def fits(count: int) -> bool:
        steps = -(-count // fps)
        return prompt_visual_extent(steps, per_step, opts) + steps * text <= room

    if fits(n):
        return n
    lo, hi = 0, n  # the largest count that fits: lo fits (0 trivially), hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    if lo < 1:
        return n  # not even one frame fits: fit_context names the prompt's size
    if frames is None:
        return lo
    raise OptionError("frames", f"must be in [1, {lo}] for this model: its {limit}-token context holds at most "
                                f"{lo} frames of {per_step / fps:g} visual tokens with method {opts.method.value} "
                                f"(got {n})")
