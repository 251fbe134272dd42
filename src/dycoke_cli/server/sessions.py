"""Recent sessions, least recently used evicted first, bounded in count and in bytes.

A session is one clip at one frame count with one set of compression options: its encoded
video and the prompt up to the question with its KV (session.py). Its key is the clip's
content (SHA-256), not its name, so the same video sent again as a ``data:`` URL or under
another name finds it. Only the runner's one worker thread touches this.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


def session_bytes(session) -> int:
    """What a kept session holds in tensors: the encoded video and its prefixes' keys and values."""
    enc = session.encoded
    total = 0
    if enc is not None:
        total += enc.features.numel() * enc.features.element_size()
        if enc.newline is not None:
            total += enc.newline.numel() * enc.newline.element_size()
    # Session keeps its prefixes in a private dict; read-only here until it reports its size itself.
    for prefix in getattr(session, "_prefixes", {}).values():
        total += prefix.nbytes  # keys, values and a hybrid model's linear states
    return total


class SessionLRU:
    def __init__(self, max_count: int, max_bytes: int):
        self.max_count, self.max_bytes = max_count, max_bytes
        self._items: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()

    def take(self, key: Hashable):
        """The session kept under ``key`` (removed until :meth:`keep` puts it back), or None."""
        item = self._items.pop(key, None)
        return item[0] if item is not None else None

    def keep(self, key: Hashable, session) -> None:
        """Keep ``session`` as the most recent; evict the oldest beyond the bounds (a session
        larger than the byte bound alone is not kept)."""
        size = session_bytes(session)
        if self.max_count < 1 or size > self.max_bytes:
            return
        self._items[key] = (session, size)
        while len(self._items) > self.max_count or self.bytes > self.max_bytes:
            self._items.popitem(last=False)

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self._items.values())

    def __len__(self) -> int:
        return len(self._items)
