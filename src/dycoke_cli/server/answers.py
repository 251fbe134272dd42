"""One answer on its way to the client: the text released as it grows (stop strings cut it, and
what could still turn into one is held back), how it finished, its usage and its stats.

Items come from the worker (runner.py) in order: pipeline events (results.Stage, Planned,
Token, Done), the server's :class:`PromptTokens` and :class:`Reused`, then runner.Ended.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..results import SCHEMA_VERSION, Done, Token, answer_json
from .protocol import usage


@dataclass(frozen=True)
class PromptTokens:
    """The prompt's length in tokens (known before the prefill; usage when no Done comes)."""

    tokens: int


@dataclass(frozen=True)
class Reused:
    """Whether this answer started from a kept session's encoded video and prefix."""

    reused: bool


class Reply:
    def __init__(self, stops: list[str], max_new_tokens: int):
        self.stops = stops
        self.max_new_tokens = max_new_tokens
        self.raw = ""  # the text so far, as generated
        self.cut: int | None = None  # where a stop string begins in ``raw``
        self.sent = 0  # characters of the answer handed out
        self.tokens = 0
        self.prompt_tokens = 0
        self.reused = False
        self.answer = None  # results.Answer, when the generation ran to its end
        self.reasoning: str | None = None  # thinking on: the reasoning so far (never in ``raw``)
        self.reasoning_sent = 0  # characters of it handed out

    @property
    def stopped(self) -> bool:
        return self.cut is not None

    def feed(self, item) -> str:
        """Take one item; return the text it releases (a stop string found sets ``stopped``)."""
        if isinstance(item, PromptTokens):
            self.prompt_tokens = item.tokens
        elif isinstance(item, Reused):
            self.reused = item.reused
        elif isinstance(item, Done):
            self.answer = item.answer
        elif isinstance(item, Token) and item.reasoning:
            self.tokens = item.tokens_generated
            self.reasoning = (self.reasoning or "") + item.text
        elif isinstance(item, Token) and not self.stopped:
            self.tokens = item.tokens_generated
            start = max(0, len(self.raw) - max((len(s) for s in self.stops), default=0))
            self.raw += item.text
            found = [i for i in (self.raw.find(s, start) for s in self.stops) if i >= 0]
            if found:
                self.cut = min(found)
        return self._release(final=False)

    @property
    def final_reasoning(self) -> str | None:
        """The whole reasoning, stripped (None with thinking off)."""
        return None if self.reasoning is None else self.reasoning.strip()

    def take_reasoning(self) -> str:
        """The reasoning not handed out yet (a stream's ``reasoning_content`` deltas)."""
        if self.reasoning is None:
            return ""
        out = self.reasoning[self.reasoning_sent :].lstrip() if not self.reasoning_sent else \
            self.reasoning[self.reasoning_sent :]
        self.reasoning_sent = len(self.reasoning)
        return out

    def finish(self) -> str:
        """The rest of the text, once nothing more comes."""
        return self._release(final=True)

    @property
    def text(self) -> str:
        """The whole answer: stripped like the CLI's, cut before a stop string."""
        return self.raw[: self.cut].strip()

    def _release(self, final: bool) -> str:
        whole = self.raw[: self.cut].lstrip()
        end = len(whole.rstrip())
        if not (final or self.stopped):
            for stop in self.stops:  # hold back a tail that may begin a stop string
                for k in range(min(len(stop) - 1, len(whole)), 0, -1):
                    if whole.endswith(stop[:k]):
                        end = min(end, len(whole) - k)
                        break
        out = whole[self.sent : end] if end > self.sent else ""
        self.sent += len(out)
        return out

    @property
    def finish_reason(self) -> str:
        if self.stopped:
            return "stop"
        generated = self.answer.stats.tokens_generated if self.answer is not None else self.tokens
        limit = self.answer.options.get("max_new_tokens", self.max_new_tokens) if self.answer else self.max_new_tokens
        return "length" if generated >= limit else "stop"

    def usage(self) -> dict:
        """Tokens of the prompt and of the answer (up to the token that completed a stop string)."""
        if self.answer is not None and not self.stopped:
            return usage(self.answer.stats.prefill_tokens, self.answer.stats.tokens_generated)
        return usage(self.prompt_tokens, self.tokens)

    def dycoke(self, model: dict, label: str) -> dict:
        """The ``dycoke`` object: ``--json``'s keys for this answer (the video named by what the
        client sent) and ``reused``. A stop string stops the generation: ``stopped_by`` says so,
        and ``stats`` is null unless the generation had ended before the stop took effect."""
        head = {"reused": self.reused, **({"stopped_by": "stop"} if self.stopped else {})}
        if self.answer is None:
            return {**head, "schema_version": SCHEMA_VERSION, "model": model, "stats": None}
        out = answer_json(self.answer, model)
        out["options"].pop("question", None)
        if out["video"] is not None:
            out["video"]["path"] = label
        out.pop("answer")
        return {**head, **out}
