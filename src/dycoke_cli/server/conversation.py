"""A request's ``messages`` turned into the one string the pipeline places after the video.

The pipeline builds its prompt with the model's chat template around one user message,
``[video, question]``: ``B + <video> + M + question + S``. A conversation rendered by the same
template, with the video first in the first user message, is ``B + <video> + R``. When ``R``
starts with ``M`` and ends with ``S``, the question ``R[len(M):-len(S)]`` makes the pipeline's
prompt exactly the conversation's, earlier turns placed as the template places them, and the
prompt before the video (and so its KV, kept in the session) stays the same for every turn.

A system (or developer) message at the start goes before the video as the template places it:
the pipeline's prompt takes it too (``system``), and it is part of what a kept session is for.
What cannot be placed is refused with a 400 that says why: a system message after the
conversation has started, a video outside the first user message, more or fewer than one video,
parts other than text and video, and text holding one of the model's control tokens (it would
forge a turn or a second video).
"""

from __future__ import annotations

from dataclasses import dataclass

from .protocol import ApiError, ChatRequest, valid_unicode

_PROBE = "\ue000dycoke-question\ue001"  # private-use characters: no template or user text holds them


@dataclass(frozen=True)
class Conversation:
    url: str  # the one video's URL
    question: str  # what the pipeline places after the video
    turns: int  # user messages
    system: str | None = None  # the system message before the video, if any


def video_urls(request: ChatRequest) -> list[str]:
    return [part.url or "" for m in request.messages if isinstance(m.content, list)
            for part in m.content if part.is_video]


def parse(lm, request: ChatRequest) -> Conversation:
    urls = video_urls(request)
    if not urls:
        raise ApiError(400, "no video: the first user message must carry one video_url content part", "no_video")
    if len(urls) > 1:
        raise ApiError(400, f"one video per conversation (found {len(urls)} video_url parts)", "too_many_videos")
    messages, turns, system = [], 0, None
    for i, m in enumerate(request.messages):
        if m.role in ("system", "developer"):
            if messages or system is not None:
                raise ApiError(400, f"messages[{i}]: a {m.role} message is taken only as the first message",
                               "unsupported_role")
            system = _system_text(lm, i, m)
            continue
        if m.role not in ("user", "assistant"):
            raise ApiError(400, f"messages[{i}]: role must be user or assistant (got {m.role!r})", "invalid_role")
        turns += m.role == "user"
        messages.append({"role": m.role, "content": _content(lm, i, m)})
    first = messages[0] if messages else {"role": None, "content": None}
    if first["role"] != "user" or not isinstance(first["content"], list) or not first["content"] \
            or first["content"][0]["type"] != "video":
        raise ApiError(400, "the video must be in the first message, a user message", "video_not_first")
    if messages[-1]["role"] != "user":
        raise ApiError(400, "the last message must be a user message", "invalid_role")
    last = request.messages[-1].content
    texts = [last] if isinstance(last, str) else [p.text or "" for p in last or [] if p.type == "text"]
    if not any(t.strip() for t in texts):
        raise ApiError(400, "the question is empty (the last user message has no text)", "empty_question")
    return Conversation(urls[0], _question(lm, messages, system), turns, system)


def _system_text(lm, i: int, message) -> str:
    content = message.content
    if isinstance(content, list):
        if any(part.type != "text" for part in content):
            raise ApiError(400, f"messages[{i}]: a {message.role} message takes text only", "unsupported_content")
        content = " ".join(part.text or "" for part in content)
    text = content or ""
    _check_text(lm, i, text)
    return text


def _content(lm, i: int, message) -> list[dict] | str:
    """The template's content of one message: the video first, then the text parts in order."""
    content = message.content
    if content is None:
        content = ""
    if isinstance(content, str):
        _check_text(lm, i, content)
        return content
    video, texts = [], []
    for part in content:
        if part.is_video:
            if message.role != "user":
                raise ApiError(400, f"messages[{i}]: only a user message may carry the video", "video_not_first")
            video.append({"type": "video"})
        elif part.type == "text":
            _check_text(lm, i, part.text or "")
            texts.append({"type": "text", "text": part.text or ""})
        else:
            raise ApiError(400, f"messages[{i}]: content parts of type {part.type!r} are not supported "
                                "(text and one video_url)", "unsupported_content")
    if not video:  # text parts only: the template's plain form, as clients usually send it
        return " ".join(t["text"] for t in texts) if message.role == "assistant" else texts
    return video + texts


def _check_text(lm, i: int, text: str) -> None:
    if not valid_unicode(text):
        raise ApiError(400, f"messages[{i}]: the text is not valid Unicode (it holds a lone UTF-16 surrogate)",
                       "invalid_text")
    for token in _control_tokens(lm):
        if token in text:
            raise ApiError(400, f"messages[{i}]: the text holds the model's control token {token!r}", "invalid_text")


def _control_tokens(lm) -> list[str]:
    tok = lm.tokenizer
    named = set(getattr(tok, "all_special_tokens", []) or [])
    added = {t.content if hasattr(t, "content") else str(t)
             for t in (getattr(tok, "added_tokens_decoder", {}) or {}).values()}
    return sorted(t for t in named | added if t)


def _render(lm, messages: list[dict]) -> tuple[str, str]:
    """The rendered prompt split at the video token: (before, after)."""
    try:
        text = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # noqa: BLE001 - jinja errors of the checkpoint's template
        raise ApiError(400, f"the model's chat template cannot render these messages ({type(exc).__name__})",
                       "template_error") from None
    video = lm.tokenizer.convert_ids_to_tokens(lm.video_token_id)
    if text.count(video) != 1:
        raise ApiError(400, "the model's chat template does not place the video once", "template_error")
    before, _, after = text.partition(video)
    return before, after


def _question(lm, messages: list[dict], system: str | None) -> str:
    content = messages[0]["content"]
    if len(messages) == 1 and len(content) == 2:  # [video, text]: one question, the pipeline's own prompt
        return content[1]["text"]
    head = [] if system is None else [{"role": "system", "content": system}]
    probe_before, probe_after = _render(lm, [*head, {"role": "user", "content": [{"type": "video"},
                                                                                 {"type": "text", "text": _PROBE}]}])
    middle, _, suffix = probe_after.partition(_PROBE)
    before, after = _render(lm, [*head, *messages])
    if before != probe_before or not after.startswith(middle) or not after.endswith(suffix) \
            or len(after) < len(middle) + len(suffix):
        raise ApiError(400, "this model's chat template places these messages differently from one question "
                            "after the video; send the video first in the first user message", "template_error")
    return after[len(middle):len(after) - len(suffix)]
