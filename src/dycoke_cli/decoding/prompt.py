"""The prompt around the video: its embeddings, its position ids, and whether it fits the context.

``[text before | video part | text after]``; the family adapter says where the video goes
(``prompt_ids``), what its part holds (``video_part``: the visual tokens and a newline, or for
Qwen3-VL a timestamp and markers around each temporal step) and how positions run
(``positions``).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..errors import SettingError
from ..options import Positions, SamplingOptions
from ..values import EncodedVideo, Prompt, TokenPlan, VisualSpan


def embed_parts(lm, *parts: torch.Tensor | None) -> torch.Tensor:
    """One [1, S, D] tensor of the parts in order: token ids [n] are embedded, vectors [n, D]
    (visual tokens, the newline) are taken as they are; None parts are skipped."""
    embed = lm.decoder.embed_tokens
    with torch.inference_mode():
        out = [embed(p.to(lm.device)) if not p.is_floating_point() else p.to(lm.device, lm.dtype)
               for p in parts if p is not None]
    return torch.cat(out).unsqueeze(0)


def build_embeds(lm, question: str, visual: torch.Tensor, newline: torch.Tensor | None):
    """[text before | visual | newline | text after] as one [1, S, D] tensor, plus the visual span."""
    before, after = lm.prompt_ids(question)
    return embed_parts(lm, before, visual, newline, after), (len(before), len(before) + visual.shape[0])


def render_prompt(lm, question: str, system: str | None = None, thinking: bool | str | None = None) -> Prompt:
    """``question``'s prompt (after a ``system`` message, if any) through the chat template, once.
    ``thinking``: see ``prompt_ids``."""
    before, after = lm.prompt_ids(question, system, thinking)
    return Prompt(question, before, after, system, thinking)


def prompt_embeds(lm, prompt: Prompt | str, plan: TokenPlan, enc: EncodedVideo) -> tuple[torch.Tensor, VisualSpan]:
    """The whole prompt (a :class:`Prompt`, or a question rendered here) with the plan's visual
    tokens, [1, S, D], and where its visual tokens are."""
    if isinstance(prompt, str):
        prompt = render_prompt(lm, prompt)
    return prefix_embeds(lm, prompt.before, plan, enc, prompt.after)


def prefix_embeds(lm, before: torch.Tensor, plan: TokenPlan, enc: EncodedVideo,
                  after: torch.Tensor | None = None) -> tuple[torch.Tensor, VisualSpan]:
    """``[before | video part | after]`` as [1, S, D], and the video part's VisualSpan."""
    pieces, offsets, length = lm.video_part(enc, plan)
    start = len(before)
    return embed_parts(lm, before, *pieces, after), VisualSpan(start, start + length, offsets + start)


def prefill_positions(lm, span: tuple[int, int], plan, enc, seq: int, mode) -> torch.Tensor | None:
    """Position ids of the prefill (None: contiguous; [S], or [3, S] for M-RoPE), from the family adapter."""
    return lm.positions(span, plan.index, enc, seq, Positions(mode) == Positions.original)


def context_length(lm) -> int | None:
    return getattr(lm.model.config.text_config, "max_position_embeddings", None)


def fit_context(lm, extent: int, visual: int, sampling: SamplingOptions) -> SamplingOptions:
    """Refuse a prompt longer than the model's context; shorten generation to what fits.
    ``extent`` is the prompt's extent in positions (its length, or more with original positions)."""
    limit = context_length(lm)
    if limit is None:
        return sampling
    if extent >= limit:
        raise SettingError(
            f"the prompt needs {extent} tokens ({visual} visual, {extent - visual} text) but the model's context is "
            f"{limit}; shorten the question or use fewer {{frames}}"
        )
    if extent + sampling.max_new_tokens > limit:
        return replace(sampling, max_new_tokens=limit - extent)
    return sampling
