"""The attention hook: plain SDPA that also shows the probed layer's attention to a selector.

``register_attention()`` adds one named implementation, ``dycoke_sdpa``, to transformers'
AttentionInterface (an addition to its registry: no existing implementation changes). The
text model of a loaded checkpoint uses it; it runs transformers' own SDPA, and in addition,
while a selector is active (:func:`probing`, a context variable: nothing global is rewired),
hands the selector the query and keys at its ``probe_layer``: the selector computes one
attention row from them, never a full map.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

ATTENTION_NAME = "dycoke_sdpa"

_active = ContextVar("dycoke_selector", default=None)
_registered = False


@contextmanager
def probing(selector) -> Iterator[None]:
    """While inside, ``selector.observe`` sees the attention at ``selector.probe_layer``."""
    token = _active.set(selector)
    try:
        yield
    finally:
        _active.reset(token)


def register_attention() -> None:
    """Register ``dycoke_sdpa`` (and its mask function, transformers' ``sdpa_mask``), once."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def dycoke_sdpa(module, query, key, value, attention_mask, **kwargs):
        selector = _active.get()
        if selector is not None and getattr(module, "layer_idx", None) == selector.probe_layer:
            selector.observe(query, key, kwargs.get("scaling") or query.shape[-1] ** -0.5, attention_mask)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(ATTENTION_NAME, dycoke_sdpa)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    _registered = True
