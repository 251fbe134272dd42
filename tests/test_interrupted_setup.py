"""A Ctrl-C while the static decoding step is set up or run leaves the session consistent
(issue 34, item 7): the interrupt is injected at a real function boundary (the step's own
forward, or the CUDA graph's constructor), and the same session then answers as an untouched
one would, saying which path it took."""

from __future__ import annotations

from dataclasses import astuple

import pytest
import torch

from dycoke_cli.compression.cache import PrunedKVCache
from dycoke_cli.compression.selectors import DecodeSelector
from dycoke_cli.decoding.loop import run_layers
from dycoke_cli.decoding.prompt import build_embeds
from dycoke_cli.decoding.static import StaticSteps
from dycoke_cli.options import CompressionOptions, Method, SamplingOptions
from dycoke_cli.session import Session

QUESTIONS = ("what color is the cup?", "which way does the cup move?")


def _interrupt_once(monkeypatch, owner, name: str, at_call: int = 1) -> None:
    """``owner.name`` raises KeyboardInterrupt at its ``at_call``-th call, and is itself otherwise."""
    real, calls = getattr(owner, name), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, interrupted)


def _graph_steps(lm):
    """Static steps that ask for a CUDA graph (on the CPU: a warm-up step, then a capture that
    fails and falls back to the eager static step)."""
    torch.manual_seed(0)
    visual = torch.randn(8 * lm.tokens_per_frame, lm.hidden_size)
    embeds, span = build_embeds(lm, QUESTIONS[0], visual, None)
    seq = embeds.shape[1]
    sel = DecodeSelector(prune_from=2, span=span, keep=9)
    cache = PrunedKVCache(lm.num_layers, seq + 9, sel)
    with torch.inference_mode():
        token = run_layers(lm, embeds, torch.arange(seq)[None], cache, sel).argmax(dim=-1)
    return StaticSteps(lm, cache, sel, seq, 2, graph=True, greedy=True), cache, sel, token


@pytest.mark.parametrize("stage", ["warm-up", "capture"])
def test_an_interrupted_setup_leaves_no_half_made_step(tiny_lm, monkeypatch, stage):
    steps, cache, sel, token = _graph_steps(tiny_lm)
    if stage == "warm-up":
        _interrupt_once(monkeypatch, StaticSteps, "_step")
    else:
        _interrupt_once(monkeypatch, torch.cuda, "CUDAGraph")
    with torch.inference_mode():
        if stage == "capture":
            steps(token)  # the warm-up
        with pytest.raises(KeyboardInterrupt):
            steps(token)
    assert (steps.calls, steps.graph, steps.setup) == (0, None, False)
    assert steps.note == f"the {stage} of the static decoding step was interrupted; the next answer sets it up again"
    assert not steps.fits(tiny_lm, cache, sel, 2, greedy=True)  # the session's next answer sets up a new one


def test_a_session_answers_as_before_after_a_ctrl_c_in_its_static_step(tiny_lm, clip_path, monkeypatch):
    opts = CompressionOptions(method=Method.dycoke)
    static, eager = Session(tiny_lm, clip_path, frames=8, compression=opts), Session(tiny_lm, clip_path, frames=8,
                                                                                       compression=opts)
    sampling = {"max_new_tokens": 12, "ignore_eos": True}
    _interrupt_once(monkeypatch, StaticSteps, "_step", at_call=3)  # the first answer's third static step
    with pytest.raises(KeyboardInterrupt):
        static.ask(QUESTIONS[0], SamplingOptions(decode="static", **sampling))
    monkeypatch.undo()
    assert static.answers == []
    for question in QUESTIONS:
        a = static.ask(question, SamplingOptions(decode="static", **sampling))
        b = eager.ask(question, SamplingOptions(decode="eager", **sampling))
        assert a.token_ids == b.token_ids and len(a.token_ids) == 12
        assert astuple(a.stats.selection)[:4] == astuple(b.stats.selection)[:4]
        assert (a.stats.decode_path, a.stats.decode_step_reused) == ("static", True)
