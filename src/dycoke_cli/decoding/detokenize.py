"""Incremental detokenisation for streaming answers.

The technique of vLLM's incremental detokenizer: keep a prefix
offset and a read offset into the answer's ids. The ids before the read offset are already out as
text; those from the prefix offset to the read offset are kept only as context. Each new token
decodes the small window from the prefix offset twice, without and with the unread ids, and emits
the difference. The context matters because a decode treats its first token specially (a
SentencePiece or WordPiece decoder drops that token's leading space): slicing the context's own
text off the window's text gives exactly what the whole decode adds. While the window's text ends
with U+FFFD (a character whose bytes span several tokens, not all here yet) the text is held back;
once it is complete the offsets move up, so every decode sees a few ids, not the whole answer.

Special tokens are skipped (``skip_special_tokens=True``), as the whole decode skips them, and are
never put in the window: they add no text, so in it they would be held back and pile up (a long
run of them would make every decode long again).
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what a decode gives for an unfinished multi-byte character


class TextStream:
    """The text each new token adds, held back while incomplete; decodes only a window of recent ids.

    The concatenation of every :meth:`push` and :meth:`finish` equals
    ``tokenizer.decode(ids, skip_special_tokens=True)``.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._window: list[int] = []  # text ids from the prefix offset on (specials left out)
        self._read = 0  # window[:_read]: ids already out as text, kept as context
        self._skipped: dict[int, bool] = {}

    def push(self, token: int) -> str:
        """Add ``token``; return the text it completes ('' while a character is unfinished)."""
        self.ids.append(token)
        if self._is_skipped(token):
            return ""
        self._window.append(token)
        context, text = self._decode_window()
        if len(text) <= len(context) or text.endswith(REPLACEMENT):
            return ""
        return self._emit(text[len(context) :])

    def finish(self) -> str:
        """Return whatever is still held back (an unfinished character comes out as U+FFFD)."""
        context, text = self._decode_window()
        return self._emit(text[len(context) :])

    def _decode_window(self) -> tuple[str, str]:
        """The text of the context ids alone, and of the context plus the unread ids."""
        decode = self.tokenizer.decode
        context = decode(self._window[: self._read], skip_special_tokens=True) if self._read else ""
        return context, decode(self._window, skip_special_tokens=True)

    def _emit(self, delta: str) -> str:
        """Record ``delta`` as out; the unread ids become the context (prefix offset := read offset)."""
        self._window = self._window[self._read :]
        self._read = len(self._window)
        self.text += delta
        return delta

    def _is_skipped(self, token: int) -> bool:
        """Whether a decode with ``skip_special_tokens=True`` drops ``token`` (asked once per id).

        Asked of the tokenizer rather than read from ``all_special_ids``, which can miss added
        special tokens that decode skips all the same (e.g. Qwen's vision markers)."""
        if token not in self._skipped:
            decode = self.tokenizer.decode
            self._skipped[token] = decode([token], skip_special_tokens=True) == "" != decode([token])
        return self._skipped[token]


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class ReasoningSplit:
    """Streamed text -> (reasoning, answer) pieces, for a model that reasons first: everything up to
    ``</think>`` is reasoning (a ``<think>`` at the start, when the model writes it rather than the
    prompt, is dropped), the rest is the answer, its leading blank lines dropped. A tag split over
    two pieces is held back until it is whole."""

    def __init__(self):
        self.thinking = True
        self.held = ""  # text that may be the start of a tag
        self.reasoning, self.answer = "", ""

    def push(self, text: str) -> tuple[str, str]:
        """The reasoning and the answer ``text`` adds (either may be empty)."""
        self.held += text
        if self.thinking:
            self.held = self.held.lstrip() if not self.reasoning else self.held
            if self.held.startswith(THINK_OPEN) and not self.reasoning:
                self.held = self.held[len(THINK_OPEN):].lstrip()
            if THINK_CLOSE in self.held:
                before, after = self.held.split(THINK_CLOSE, 1)
                self.thinking, self.held = False, after
                return self._take(before.rstrip(), "")[0], self._answer_part()
            cut = _safe_end(self.held, (THINK_CLOSE, THINK_OPEN))
            piece, self.held = self.held[:cut], self.held[cut:]
            return self._take(piece, "")
        return "", self._answer_part()

    def finish(self) -> tuple[str, str]:
        """What was held back at the end (the model stopped inside a tag)."""
        held, self.held = self.held, ""
        return self._take(held, "") if self.thinking else self._take("", held)

    def _answer_part(self) -> str:
        text = self.held if self.answer else self.held.lstrip()
        self.held = "" if text or self.answer else self.held
        return self._take("", text)[1]

    def _take(self, reasoning: str, answer: str) -> tuple[str, str]:
        self.reasoning += reasoning
        self.answer += answer
        return reasoning, answer


def _safe_end(text: str, tags: tuple[str, ...]) -> int:
    """Where ``text`` can be cut without splitting a tag that may be starting at its end."""
    for start in range(max(0, len(text) - max(map(len, tags)) + 1), len(text)):
        if any(tag.startswith(text[start:]) for tag in tags):
            return start
    return len(text)
