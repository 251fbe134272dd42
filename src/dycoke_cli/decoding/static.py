"""Decoding steps with static shapes, captured once as a CUDA graph and replayed.

After the prefill, the cache switches to static mode (compression/cache.py): a step writes its
keys at a device index and attention reads each layer's whole capacity under a length mask.
The token, its position and the step count are device tensors updated in place, and DyCoke's
selection runs branch-free on the device (compression/selectors.py), so every step launches
the same kernels on the same addresses, with no host sync inside. On CUDA the first step runs
eagerly on a side stream (it warms up the kernels and is a real step), the second is captured
as a CUDA graph, and every later step is one replay: about 800 kernel launches become one.
Elsewhere (or when capture fails) the same step runs eagerly; it gives the same tokens.
"""

from __future__ import annotations

import os

import torch

from ..compression.attention import probing
from .layer_call import call_layer


class StaticSteps:
    """Callable: ``logits = steps(token)`` for one decoding step after ``token`` [1] (device)."""

    def __init__(self, lm, cache, selector, next_position: int, position_dims: int, graph: bool):
        self.lm, self.cache, self.selector = lm, cache, selector
        device = lm.device
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        shape = (3, 1, 1) if position_dims == 3 else (1, 1)  # M-RoPE: the text's three ids are equal
        self.position = torch.full(shape, next_position, dtype=torch.long, device=device)
        cache.make_static()
        if selector is not None and selector.prunes == "decode":
            selector.branch_free = True
        self.logits: torch.Tensor | None = None
        self.want_graph = graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.calls = 0
        self.note: str | None = None  # why no graph, when one was wanted

    @property
    def path(self) -> str:
        return "cuda-graph" if self.graph is not None else "static"

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        self.token.copy_(token.view(1, 1))
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
        elif self.want_graph and self.calls == 1:
            self._warm_up()
        elif self.want_graph and self.calls == 2:
            self._capture()
        else:
            self._step()
        return self.logits

    def _step(self) -> None:
        """One step; every operation reads and writes fixed tensors (graph-capturable)."""
        decoder = self.lm.decoder
        hidden = decoder.embed_tokens(self.token)
        cos, sin = decoder.rotary_emb(hidden, self.position)
        flat_ids = self.position if self.position.dim() == 2 else None
        masks = self.cache.step_masks()
        with probing(self.selector):
            for layer, mask in zip(decoder.layers, masks):
                hidden = call_layer(layer, hidden, self.cache, attention_mask=mask, position_embeddings=(cos, sin),
                                    position_ids=flat_ids)
        logits = self.lm.lm_head(decoder.norm(hidden))[:, -1].float()
        if self.logits is None:
            self.logits = logits
        else:
            self.logits.copy_(logits)
        self.cache.advance()
        self.position += 1

    def _warm_up(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step()
        torch.cuda.current_stream().wait_stream(side)

    def _capture(self) -> None:
        """Capture one step (capturing runs nothing), then replay it for this step. A failure
        leaves the eager static step, and says why."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._step()
        except Exception as exc:  # an operation that cannot be captured: keep going without a graph
            if os.environ.get("DYCOKE_DEBUG"):
                raise
            self.want_graph, self.note = False, f"CUDA graph capture failed ({type(exc).__name__}: {exc})"
            self._step()
            return
        self.graph = graph
        graph.replay()
