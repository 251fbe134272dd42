"""A dispatch mode that records the operations that make a host wait for the device.

On CUDA these block the CPU until the queue drains (``.item()``, ``int(t)``, ``bool(t)``,
data-dependent output shapes); a CUDA graph cannot hold them. On the CPU they are free, which
is how a sync slips in unnoticed: this records them on any device, so CPU tests can prove a
decoding step has none."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique_dim", "_unique2", "unique_consecutive",
           "repeat_interleave", "is_nonzero", "item"}


class HostSyncs(TorchDispatchMode):
    """``with HostSyncs() as s: ...``; ``s.ops`` lists the syncing operations that ran."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def step_syncs(steps, token: torch.Tensor, n: int, sample=None) -> list[str]:
    """Syncing operations over ``n`` decoding steps (and the token choice, with ``sample``)."""
    with torch.inference_mode(), HostSyncs() as probe:
        for _ in range(n):
            logits = steps(token)
            token = sample(logits) if sample is not None else logits.argmax(dim=-1)
    return probe.ops
