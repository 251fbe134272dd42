"""One static decoding step per session, run one step ahead of the host.

On the CPU the kept step is the same StaticSteps object the first answer built: a follow-up runs
that object's own step (bound to the first answer's cache and selector objects), exactly what
a CUDA graph replay would run. So "same tokens as eager" here shows that every value such a
replay reads was set for the follow-up. tests/test_gpu.py runs the CUDA graph itself."""

from __future__ import annotations

from dataclasses import astuple
from pathlib import Path

import pytest

from dycoke_cli.models.loader import load_model
from dycoke_cli.options import CompressionOptions, Method, SamplingOptions, Selection
from dycoke_cli.session import Session

SAMPLES = Path(__file__).resolve().parents[1] / "sample_videos"
CLIP = SAMPLES / "red_cup.mp4"
QUESTIONS = ("what color is the cup?", "which way does the cup move?", "describe the video.",
             "what color is the cup at the end?")
SETTINGS = [
    CompressionOptions(method=Method.none),
    CompressionOptions(method=Method.dycoke),
    CompressionOptions(method=Method.dycoke, selection=Selection.topk),
    CompressionOptions(method=Method.fastv),
]


@pytest.fixture(scope="module")
def demo():
    return load_model("demo")


def _counts(answer):
    return None if answer.stats.selection is None else astuple(answer.stats.selection)[:4]


@pytest.mark.parametrize("opts", SETTINGS, ids=["none", "dycoke", "dycoke-topk", "fastv"])
def test_follow_ups_replay_the_kept_step_and_give_the_eager_answers(demo, opts):
    static = Session(demo, CLIP, compression=opts)
    eager = Session(demo, CLIP, compression=opts)
    for i, question in enumerate(QUESTIONS):
        a = static.ask(question, SamplingOptions(decode="static"))
        b = eager.ask(question, SamplingOptions(decode="eager"))
        assert a.token_ids == b.token_ids, question
        assert _counts(a) == _counts(b), question
        assert (a.stats.decode_path, a.stats.decode_step_reused) == ("static", i > 0), question
        assert b.stats.decode_step_reused is False
        assert a.stats.timings.decode_setup == 0.0  # no warm-up or capture on the CPU
    assert static.kept.steps.answers == len(QUESTIONS)


def test_the_next_step_is_queued_before_the_host_reads_the_token(demo):
    """A greedy static answer that ends at EOS has run one step past it (queued while the host
    read the EOS): the device counters show it, the answer's counters do not."""
    opts = CompressionOptions(method=Method.dycoke)
    session = Session(demo, CLIP, compression=opts)
    a = session.ask("describe the video.", SamplingOptions(decode="static"))
    b = Session(demo, CLIP, compression=opts).ask("describe the video.", SamplingOptions(decode="eager"))
    assert a.token_ids == b.token_ids and len(a.token_ids) < 256  # it stopped at EOS
    steps = session.kept.steps
    # tokens after the first: len - 1 steps; the EOS: one more; queued ahead and dropped: one more
    assert steps.calls == len(a.token_ids) + 1
    assert a.stats.selection.steps == b.stats.selection.steps == len(a.token_ids)
    assert int(steps.selector.counters[0]) == a.stats.selection.steps + 1


def test_an_answer_cut_at_the_limit_queues_nothing_past_it(demo):
    session = Session(demo, CLIP, compression=CompressionOptions(method=Method.dycoke))
    a = session.ask("describe the video.", SamplingOptions(decode="static", max_new_tokens=3))
    assert len(a.token_ids) == 3
    assert session.kept.steps.calls == 2
    assert a.stats.selection.steps == int(session.kept.steps.selector.counters[0]) == 2


def test_the_step_is_captured_again_when_the_follow_up_does_not_fit(demo):
    opts = CompressionOptions(method=Method.dycoke)
    session = Session(demo, CLIP, compression=opts)
    first = session.ask(QUESTIONS[0], SamplingOptions(decode="static", max_new_tokens=8))
    kept = session.kept.steps
    longer = session.ask(QUESTIONS[1], SamplingOptions(decode="static", max_new_tokens=400))  # more room
    assert (first.stats.decode_step_reused, longer.stats.decode_step_reused) == (False, False)
    assert session.kept.steps is not kept
    other = session.ask(QUESTIONS[1], SamplingOptions(decode="static"), CompressionOptions(method=Method.none))
    assert other.stats.decode_step_reused is False  # another method: another layout
    sampled = session.ask(QUESTIONS[1], SamplingOptions(decode="static", temperature=0.8, seed=3),
                          CompressionOptions(method=Method.none))
    assert sampled.stats.decode_step_reused is False  # the greedy step chooses inside itself; sampling does not
    again = session.ask(QUESTIONS[0], SamplingOptions(decode="static", temperature=0.8, seed=3),
                        CompressionOptions(method=Method.none))
    assert again.stats.decode_step_reused is True
    fresh = Session(demo, CLIP).ask(QUESTIONS[0], SamplingOptions(decode="eager", temperature=0.8, seed=3),
                                    CompressionOptions(method=Method.none))
    assert again.token_ids == fresh.token_ids  # the seeded device generator, as the eager loop draws it


def test_choosing_other_frames_drops_the_kept_step(demo):
    session = Session(demo, CLIP)
    session.ask(QUESTIONS[0], SamplingOptions(decode="static", max_new_tokens=4))
    assert session.kept.steps is not None
    session.set_frames(4)
    assert session.kept.steps is None
