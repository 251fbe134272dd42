"""`dycoke compare`: several methods over the same encoded frames.

The clip is decoded and encoded once; every method then answers from the same visual tokens,
in the order given, after one untimed warm-up run.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace

from ..decoding.prompt import render_prompt
from ..options import CompressionOptions, SamplingOptions
from ..pipeline import answer
from ..results import Answer
from ..values import EncodedVideo, Prompt
from .methods import MethodChoice, choices


def word_diff(reference: str, other: str) -> list[tuple[str, bool]]:
    """``other``'s words, each flagged True when it differs from ``reference``."""
    a, b = reference.split(), other.split()
    flags = [True] * len(b)
    for block in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_matching_blocks():
        for j in range(block.b, block.b + block.size):
            flags[j] = False
    return list(zip(b, flags))


@dataclass
class Comparison:
    question: str
    frames: int
    results: list[Answer] = field(default_factory=list)

    def rows(self) -> list[dict]:
        """One dict per method, ratios against the first method (the baseline)."""
        base = self.results[0]
        base_total = base.stats.timings.prefill + base.stats.timings.decode
        base_mem = base.stats.peak_memory_above_start_bytes
        out = []
        for r in self.results:
            s = r.stats
            total = s.timings.prefill + s.timings.decode
            mem = s.peak_memory_above_start_bytes
            out.append({
                "method": r.method,
                "answer": r.text,
                "diff": [w for w, changed in word_diff(base.text, r.text) if changed],
                "visual_tokens_prefill": s.visual_tokens_prefill,
                "visual_tokens_decode": s.visual_tokens_decode,
                "overall_retention": s.overall_retention,
                "prefill_s": s.timings.prefill,
                "ttft_s": s.ttft_s,
                "decode_tokens_per_s": s.decode_tokens_per_s,
                "llm_total_s": total,
                "tokens_generated": s.tokens_generated,
                "peak_memory_above_start_bytes": mem,
                "speedup": base_total / total if total > 0 else None,
                "memory_ratio": (base_mem / mem) if mem and base_mem else None,
                "flops_ratio_estimate": s.flops_ratio_estimate,
                "decode_path": s.decode_path,
            })
        return out


def compare(lm, enc: EncodedVideo, question: str | Prompt | None, methods: list[MethodChoice], base: CompressionOptions,
            sampling: SamplingOptions, trace: bool = False) -> Comparison:
    """Run every method on the same encoded frames; the first is the baseline of the ratios.
    ``trace``: each answer records what it kept (``Answer.kept``, for ``--picture``).

    Like with like: every method prefills its whole prompt (no prefix is reused, whatever a chat
    session keeps), and every method has run once, untimed, in this process before it is timed,
    so none pays one-off costs (first calls of its kernels and code paths) that another paid
    earlier. In a chat, a method already warmed by an earlier comparison is not warmed again."""
    prompt = question if isinstance(question, Prompt) else \
        render_prompt(lm, question or lm.defaults.caption_prompt, thinking=sampling.thinking)
    chosen = list(choices(methods))
    for choice in chosen:
        _warm(lm, enc, prompt, choice.options(base))
    comp = Comparison(prompt.question, enc.frames)
    for choice in chosen:
        comp.results.append(replace(answer(lm, enc, prompt, choice.options(base), sampling, trace=trace),
                                    method=choice.value))
    return comp


_WARMED: set[tuple[int, CompressionOptions]] = set()


def _warm(lm, enc: EncodedVideo, prompt: Prompt, opts: CompressionOptions) -> None:
    """One short untimed run of a method, once per model and options in this process."""
    key = (id(lm), opts)
    if key not in _WARMED:
        answer(lm, enc, prompt, opts, SamplingOptions(max_new_tokens=2))
        _WARMED.add(key)
