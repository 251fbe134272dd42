"""The attention hook: plain SDPA that also shows the probed layer's attention to a selector.

``register_attention()`` adds one named implementation, ``dycoke_sdpa``, to transformers'
AttentionInterface (an addition to its registry: no existing implementation changes). The
text model of a loaded checkpoint uses it; it runs transformers' own SDPA, and in addition,
while a selector is active (:func:`probing`, a context variable: nothing global is rewired),
hands the selector the query and keys at its ``probe_layer``: the selector computes one
attention row from them, never a full map.

A static decoding step (one query over a layer's whole capacity under an additive mask) can
run another kernel (:func:`decode_kernel`, a context variable like the selector's):
``"matmul"`` is :func:`matmul_decode_attention`, two batched matmuls and a softmax, which a GPU
splits over the keys; ``"sdpa"`` (the default) is SDPA, whose memory-efficient kernel runs one
block per KV head for one query under a mask (NOTES section 14).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

ATTENTION_NAME = "dycoke_sdpa"
DECODE_KERNELS = ("sdpa", "matmul")  # a static decoding step's attention (see decode_kernel)

_active = ContextVar("dycoke_selector", default=None)
_decode_kernel = ContextVar("dycoke_decode_kernel", default="sdpa")
_registered = False


@contextmanager
def probing(selector) -> Iterator[None]:
    """While inside, ``selector.observe`` sees the attention at ``selector.probe_layer``."""
    token = _active.set(selector)
    try:
        yield
    finally:
        _active.reset(token)


@contextmanager
def decode_kernel(name: str) -> Iterator[None]:
    """While inside, a one-query attention under an additive (float) mask runs ``name`` (one of
    ``DECODE_KERNELS``). Prefill, eager steps (no mask) and boolean masks always run SDPA."""
    if name not in DECODE_KERNELS:
        raise ValueError(f"decode kernel must be one of {', '.join(DECODE_KERNELS)} (got {name!r})")
    token = _decode_kernel.set(name)
    try:
        yield
    finally:
        _decode_kernel.reset(token)


def matmul_decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                            scaling: float) -> torch.Tensor:
    """One query's attention as two batched matmuls and a softmax (three kernels, each split
    over the keys by the GPU's matmul). query [1, H, 1, d]; key, value [1, KVH, S, d] (the heads
    of a group share a KV head: they are the rows of one matmul); mask additive, broadcastable
    to [S] (0 = attend, -inf = not), the scores' start. -> [1, 1, H, d], as transformers'
    attention functions return it."""
    _, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    q = query.reshape(kv_heads, heads // kv_heads, dim)
    scores = torch.baddbmm(mask.reshape(1, 1, -1), q, key[0].transpose(1, 2), alpha=scaling)  # [KVH, group, S]
    return torch.bmm(scores.softmax(dim=-1), value[0]).reshape(1, 1, heads, dim)


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
        if (_decode_kernel.get() == "matmul" and query.shape[2] == 1 and attention_mask is not None
                and attention_mask.dtype != torch.bool):
            scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
            return matmul_decode_attention(query, key, value, attention_mask, scaling), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(ATTENTION_NAME, dycoke_sdpa)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    _registered = True
