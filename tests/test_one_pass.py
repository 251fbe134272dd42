"""One pass over the data: each answer renders its prompt through the chat template once, and
the frame fit, the prefix reuse, the prefill and the server's usage all read that one render.

Counted on the real tokenizer of the demo model: its ``apply_chat_template`` is wrapped (and
still runs) for the length of a test."""

from __future__ import annotations

from pathlib import Path

import pytest

from dycoke_cli import load_model
from dycoke_cli.evaluation.compare import compare
from dycoke_cli.evaluation.methods import MethodChoice
from dycoke_cli.options import CompressionOptions, Method, SamplingOptions
from dycoke_cli.pipeline import encode_video
from dycoke_cli.results import Planned
from dycoke_cli.session import Session, ask

SAMPLES = Path(__file__).resolve().parents[1] / "sample_videos"
CLIP = SAMPLES / "red_cup.mp4"
SHORT = SamplingOptions(max_new_tokens=6)


@pytest.fixture(scope="module")
def demo():
    return load_model("demo")


@pytest.fixture
def renders(demo, monkeypatch):
    """How many times the chat template has been rendered since the test began."""
    count = [0]
    original = demo.tokenizer.apply_chat_template

    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(demo.tokenizer, "apply_chat_template", counted)
    return count


@pytest.mark.parametrize("method", [Method.none, Method.dycoke, Method.fastv, Method.random])
def test_one_answer_renders_its_prompt_once(demo, renders, method):
    result = ask(demo, CLIP, "what color is the cup?", compression=CompressionOptions(method=method), sampling=SHORT)
    assert result.text == "red"
    assert renders[0] == 1


def test_follow_ups_render_once_each_and_reuse_the_prefix(demo, renders):
    session = Session(demo, CLIP)
    reused = []
    for question in ("what color is the cup?", "which way does the cup move?", "what is in the video?"):
        events = list(session.stream(question, SHORT))
        reused += [e.prefix_reused for e in events if isinstance(e, Planned)]
    assert [a.text for a in session.answers] == ["red", "left", "cup"]
    assert reused == [False, True, True]
    assert renders[0] == 3


def test_a_comparison_renders_one_prompt_for_all_its_methods(demo, renders):
    enc = encode_video(demo, CLIP, 8)
    methods = [MethodChoice.of(Method.none), MethodChoice.of(Method.dycoke), MethodChoice.of(Method.fastv)]
    comp = compare(demo, enc, "what color is the cup?", methods, CompressionOptions(), SHORT)
    assert [r.text for r in comp.results] == ["red", "red", "red"]
    assert renders[0] == 1  # the warm-up runs and the three answers included


QUESTION_FIRST = ("{% for message in messages %}{{ '<|im_start|> ' + message['role'] + ' ' }}"
                  "{% for item in message['content'] | reverse %}{% if item['type'] == 'video' %}{{ '<video> ' }}"
                  "{% elif item['type'] == 'text' %}{{ item['text'] + ' ' }}{% endif %}{% endfor %}"
                  "{{ '<|im_end|> ' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|> assistant ' }}"
                  "{% endif %}")


def test_a_template_that_puts_the_question_first_gives_each_question_its_own_prefix(demo, monkeypatch):
    """The text before the video holds the question: a prefix made for one question must not
    serve the next. Each answer equals a fresh session's answer to the same question."""
    monkeypatch.setattr(demo.tokenizer, "chat_template", QUESTION_FIRST)
    questions = ("what color is the cup?", "which way does the cup move?")
    before = [demo.prompt_ids(q)[0].tolist() for q in questions]
    assert before[0] != before[1]  # the template does put the question before the video
    session = Session(demo, CLIP)
    reused = [[e.prefix_reused for e in session.stream(q, SHORT) if isinstance(e, Planned)] for q in questions]
    assert reused == [[False], [False]]
    fresh = [Session(demo, CLIP).ask(q, SHORT).token_ids for q in questions]
    assert [a.token_ids for a in session.answers] == fresh
    assert session.ask(questions[0], SHORT).token_ids == fresh[0]  # and back: the first prefix rebuilt


def test_a_server_request_renders_its_prompt_once(demo, renders, tmp_path):
    """Through the server's own plan and worker (in process, to count): one render per request,
    and a follow-up served by the kept session."""
    import shutil

    from dycoke_cli.server.answers import Reused
    from dycoke_cli.server.protocol import ChatRequest
    from dycoke_cli.server.service import Server, ServerConfig

    media = tmp_path / "media"
    media.mkdir()
    shutil.copy(CLIP, media / "red_cup.mp4")
    server = Server(demo, ServerConfig(allowed_media=media))
    seen = []
    for question in ("what color is the cup?", "what is in the video?"):
        body = ChatRequest.model_validate({"model": "demo", "max_tokens": 6, "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": f"file://{media}/red_cup.mp4"}},
            {"type": "text", "text": question}]}]})
        plan = server.plan(body)
        video = server.policy.open(plan.url)
        try:
            events = list(server.work(plan, video))
        finally:
            video.close()
        text = "".join(e.text for e in events if type(e).__name__ == "Token").strip()
        seen.append((text, [e.reused for e in events if isinstance(e, Reused)]))
    assert seen == [("red", [False]), ("cup", [True])]
    assert renders[0] == 2


def test_options_are_resolved_once_where_the_session_is_made(demo, monkeypatch):
    """Every stage takes the session's resolved options as given; a question with options of
    its own resolves them once, where it is asked."""
    calls = []
    original = CompressionOptions._resolved

    def counted(self, lm):
        calls.append(self.method)
        return original(self, lm)

    monkeypatch.setattr(CompressionOptions, "_resolved", counted)
    session = Session(demo, CLIP)
    assert [session.ask(q, SHORT).text for q in ("what color is the cup?", "what is in the video?")] == ["red", "cup"]
    assert calls == [Method.dycoke]
    assert session.ask("what color is the cup?", SHORT, CompressionOptions(method=Method.none)).text == "red"
    assert calls == [Method.dycoke, Method.none]


def test_resolved_options_pickle_and_copy_without_their_model(demo):
    import copy
    import pickle

    opts = CompressionOptions().resolve(demo)
    assert pickle.loads(pickle.dumps(opts)) == opts == copy.copy(opts)
    assert opts.resolve(demo) is opts and copy.copy(opts).resolve(demo) is not opts
