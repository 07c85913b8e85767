"""What a training step keeps for its backward, measured exactly."""

from __future__ import annotations

import torch

__all__ = ["saved_tensor_bytes"]


def saved_tensor_bytes(fn) -> tuple[int, object]:
    """Bytes autograd keeps for the backward while ``fn()`` builds its graph (each storage once),
    and ``fn()``'s result. This is the activation memory a loss term adds, measured exactly."""
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out
