"""Qwen3.5 / 3.6 / 3.8 (``Qwen3_5ForConditionalGeneration``, model_type ``qwen3_5``; the MoE
variant ``qwen3_5_moe``): Qwen3-VL's video and prompt with a hybrid text stack.

What is the same as Qwen3-VL, and shared with it (qwen3_vl.py): the video processor (patch 16,
merge 2, two frames a step, the clip-wide pixel budget, fps 2), the timestamp, start and end
markers around each temporal step, and ``get_rope_index``'s interleaved 3-D positions.

What is not:

* **No DeepStack.** The vision tower returns the merged tokens only.
* **A hybrid stack.** ``text_config.layer_types``: three of every four layers are Gated DeltaNet
  *linear attention* (a causal conv and a recurrent state of fixed size, no keys), the others
  (3, 7, 11, ...) full attention with a KV cache. The linear layers keep their state in our
  cache (compression/cache.py, a ``LinearAttentionLayer`` per linear layer).
* **DyCoke on it.** TTM runs as for Qwen3-VL. Decode-time pruning acts on the full-attention
  layers at or after L; the probe is the last full-attention layer before L; the linear layers
  see the whole (merged) video, whose every token their state has absorbed. ``--prune-layer``
  must leave a full-attention layer on each side (:func:`prune_layer_range`). FastV cuts after
  the first full-attention layer.
* **Kernels.** The linear layers' functions look for ``causal-conv1d`` / ``flash-linear-attention``
  and fall back to PyTorch, logging a notice; the notice is filtered here (:func:`quiet_kernel_notices`),
  nothing is fetched from the Hub (no ``use_kernels``).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from ..errors import ModelError
from .base import DEFAULTS_FILE, ModelDefaults
from .checkpoint import read_json
from .qwen3_vl import Qwen3VLAdapter

LINEAR = "linear_attention"
# The notice transformers logs (once per function) when a linear layer's kernel falls back to PyTorch.
FALLBACK_NOTICE = "falling back to its reference PyTorch implementation"
KERNEL_LOGGER = "transformers.integrations.hub_kernels"


def linear_layers(text_config) -> tuple[int, ...]:
    """Indices of the linear-attention layers of a hybrid text config (empty for a plain stack)."""
    return tuple(i for i, kind in enumerate(getattr(text_config, "layer_types", None) or ()) if kind == LINEAR)


def attention_layers(num_layers: int, linear: tuple[int, ...]) -> tuple[int, ...]:
    """The layers that attend over a KV cache."""
    return tuple(i for i in range(num_layers) if i not in linear)


def prune_layer_range(num_layers: int, linear: tuple[int, ...]) -> tuple[int, int] | None:
    """The valid first pruned layers L of a hybrid stack: a full-attention layer before L to probe
    and one at or after L to prune; None if the stack has fewer than two full-attention layers."""
    full = attention_layers(num_layers, linear)
    return (full[0] + 1, full[-1]) if len(full) >= 2 else None


class _DropFallbackNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return FALLBACK_NOTICE not in record.getMessage()


def quiet_kernel_notices() -> None:
    """Drop transformers' "... falling back to its reference PyTorch implementation" notices (the
    PyTorch path is what runs on a CPU, or wherever the kernel packages are absent). Once."""
    logger = logging.getLogger(KERNEL_LOGGER)
    if not any(isinstance(f, _DropFallbackNotice) for f in logger.filters):
        logger.addFilter(_DropFallbackNotice())


class Qwen35Adapter(Qwen3VLAdapter):
    model_type = "qwen3_5"

    def model_class(self):
        from transformers import Qwen3_5ForConditionalGeneration

        return Qwen3_5ForConditionalGeneration

    def folder_settings(self, folder, model, defaults):
        """Qwen3-VL's, with the first pruned layer after the first full-attention layer unless the
        folder's dycoke.json names one (the paper's L = 3 probes a linear layer here)."""
        settings = super().folder_settings(folder, model, defaults)
        text = model.config.text_config
        span = prune_layer_range(int(text.num_hidden_layers), linear_layers(text))
        path = folder / DEFAULTS_FILE
        named = path.is_file() and "prune_layer" in read_json(path, "DyCoke defaults")
        if span is not None and not named:
            settings["defaults"] = replace(settings["defaults"], prune_layer=span[0])
        layer = settings["defaults"].prune_layer
        if named and (span is None or not span[0] <= layer <= span[1]):
            valid = "impossible (fewer than two full-attention layers)" if span is None else f"in [{span[0]}, {span[1]}]"
            raise ModelError(f"{path}: prune_layer must be {valid} for this hybrid model: a full-attention layer "
                             f"before it is probed, those from it on are pruned (got {layer})")
        return settings

    def wrap(self, model, tokenizer, *, name: str, path: Path | None = None, defaults: ModelDefaults | None = None,
             video_spec=None):
        quiet_kernel_notices()
        lm = super().wrap(model, tokenizer, name=name, path=path, defaults=defaults, video_spec=video_spec)
        lm.linear_layers = linear_layers(model.config.text_config)
        if defaults is None and (span := prune_layer_range(lm.num_layers, lm.linear_layers)) is not None:
            lm.defaults = replace(lm.defaults, prune_layer=span[0])
        return lm


class Qwen35MoeAdapter(Qwen35Adapter):
    """The MoE variant: routed experts plus a shared expert in the text MLP; nothing else differs."""

    model_type = "qwen3_5_moe"

    def model_class(self):
        from transformers import Qwen3_5MoeForConditionalGeneration

        return Qwen3_5MoeForConditionalGeneration
