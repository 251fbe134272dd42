"""What an answer kept, recorded for its picture and ``--json``'s ``kept`` (only when asked for).

:class:`StepTrace` follows DyCoke's decode-time selection: after each decoding step it counts,
per frame, the visual entries the pruned layers attended (a bincount on the device, no host
read), and the selection counter, so the steps that took a new selection are known at the
end. It works the same for eager steps and static ones (a CUDA graph updates the selection in
place: the count is queued after the step, before the next). Nothing runs when no trace is asked.

:func:`kept_trace` puts it together with what the prefill kept into a results.KeptTrace.
"""

from __future__ import annotations

import torch

from ..compression.selectors import DecodeSelector, PrefillSelector
from ..results import KeptTrace, hex_mask
from ..values import TokenPlan


class StepTrace:
    """Per decoding step: attended entries per frame, and the selection count (see the module)."""

    def __init__(self, frame_of: torch.Tensor, frames: int):
        self.frame_of = frame_of  # [V] the frame (temporal step) of each visual entry, in prompt order
        self.frames = frames
        self.counts: list[torch.Tensor] = []  # per step [frames]
        self.selections: list[torch.Tensor] = []  # per step []: selections made so far

    def record(self, selector) -> None:
        """After a decoding step: queue the counts of the selection that step attended."""
        if not isinstance(selector, DecodeSelector) or selector.selection is None:
            return
        frame_of = self.frame_of
        if frame_of.device != selector.selection.device:
            frame_of = self.frame_of = frame_of.to(selector.selection.device)
        self.counts.append(torch.bincount(frame_of[selector.selection], minlength=self.frames))
        self.selections.append(selector.counters[1].clone())

    def rows(self, steps: int) -> tuple[list[int], list[list[int]]]:
        """(steps that took a new selection, each one's counts per frame) over the first ``steps``
        steps (a static answer queued one step more than it kept). One host read."""
        if not self.counts or steps <= 0:
            return [], []
        counts = torch.stack(self.counts[:steps]).tolist()
        made = torch.stack(self.selections[:steps]).tolist()
        chosen = [s for s in range(len(made)) if made[s] > (made[s - 1] if s else 0)]
        return chosen, [counts[s] for s in chosen]


def _mask(plan: TokenPlan, selector, frames: int, per_frame: int) -> torch.Tensor:
    """bool [frames, per_frame]: the tokens the pruned part of the model may see after the
    prefill: TTM's (DyCoke), FastV's cut, the baselines' selection, or every token."""
    index = plan.index
    if isinstance(selector, PrefillSelector) and selector.selection is not None:
        index = plan.index[selector.selection.to(plan.index.device)]
    mask = torch.zeros(frames * per_frame, dtype=torch.bool)
    mask[index.cpu()] = True
    return mask.view(frames, per_frame)


def kept_trace(plan: TokenPlan, selector, trace: StepTrace | None, frames: int, grid: tuple[int, int],
               frames_per_step: int, steps: int, tokens: list[str]) -> KeptTrace:
    """The KeptTrace of one answer over ``frames`` frames (temporal steps) of ``grid`` tokens.
    ``steps``: decoding steps run (after the first token); ``tokens``: the text of each answer
    token, the query of the step of the same index."""
    mask = _mask(plan, selector, frames, grid[0] * grid[1])
    kept = mask.sum(dim=1).tolist()
    chosen, rows = trace.rows(steps) if isinstance(selector, DecodeSelector) and trace else ([], [])
    if not chosen and steps > 0:  # no per-step selection: every step sees what the prefill kept
        chosen, rows = [0], [kept]
    return KeptTrace(frames=frames, rows=grid[0], cols=grid[1], frames_per_step=frames_per_step,
                     mask=tuple(hex_mask(m) for m in mask.tolist()), kept=tuple(kept),
                     pruned_from=plan.prune_from, steps=steps, selection_steps=tuple(chosen),
                     attended=tuple(tuple(r) for r in rows), tokens=tuple(tokens[:steps]))
