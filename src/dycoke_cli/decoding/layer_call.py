"""The one place our decoding loop calls a transformers decoder layer.

transformers 5.25 renamed the layers' cache argument from ``past_key_values`` to ``cache``
(the old name warns until 5.40, then is gone). A keyword a layer does not name would fall into
its ``**kwargs`` and be dropped: the layer would run with no cache, write no keys and give wrong
tokens with no error. So the name is read from the layer's own signature, once per layer class,
and a layer that names neither is refused.
"""

from __future__ import annotations

import functools
import inspect

import torch

from ..errors import ModelError

CACHE_NAMES = ("cache", "past_key_values")  # the newest first: 5.25 takes both and warns on the old


class UnsupportedLayer(ModelError):
    """A decoder layer whose forward takes no cache argument this code knows."""


@functools.cache
def cache_argument(layer_class: type) -> str:
    """The name under which ``layer_class.forward`` takes its KV cache. Decorators that wrap
    ``forward`` (gradient checkpointing, deprecated keywords) keep ``__wrapped__``, which
    :func:`inspect.signature` follows to the real parameters."""
    params = inspect.signature(layer_class.forward).parameters
    for name in CACHE_NAMES:
        if name in params:
            return name
    raise UnsupportedLayer(f"{layer_class.__name__}.forward takes no cache argument (looked for "
                           f"{' or '.join(CACHE_NAMES)}); this transformers version is not supported")


def call_layer(layer, hidden: torch.Tensor, cache, **kwargs) -> torch.Tensor:
    """``layer(hidden, **kwargs)`` with ``cache`` passed under the name the layer takes, and
    ``use_cache=True``. Returns the layer's hidden states."""
    kwargs[cache_argument(type(layer))] = cache
    return layer(hidden, use_cache=True, **kwargs)
