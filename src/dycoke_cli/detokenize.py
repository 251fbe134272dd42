"""Incremental detokenisation for streaming answers."""

from __future__ import annotations


class TextStream:
    """Incremental detokenisation: the text each new token adds, held back while incomplete."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return ""  # an unfinished multi-byte character, or a merge that rewrote the tail
        delta, self.text = text[len(self.text) :], text
        return delta

    def finish(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        delta = text[len(self.text) :] if text.startswith(self.text) else ""
        self.text = text
        return delta
