"""One weight-gradient product per weight for the thought passes of a training forward.

Why: each thought pass of :func:`latentlib.recurrence.latent_forward` runs every linear
layer on only ``batch`` rows (it cannot start before the previous pass has produced its
hidden state). Autograd then computes, per pass and per weight, a weight gradient
``g^T x`` of rank ``batch`` and adds it into the full-size gradient: a small product the
BLAS runs far below its speed on many rows (on SmolLM2-135M with 8 rows, twice the time
per row of the CoT pass's products, see ``benchmarks/training.py``), plus a read and a
write of the whole gradient per pass. Deferring those products and doing one product
over all the thought passes' rows gives the same gradient with one large product.

PyTorch has no switch for this, so it is done here with its extension points:

- a :class:`~torch.overrides.TorchFunctionMode`, active only around a thought pass, sends
  that pass's ``F.linear`` calls on the chosen weights to :class:`_LinearInputGrad`, whose
  backward returns the input gradient and keeps ``(x, g)`` instead of computing ``g^T x``;
- the weight those calls see is an alias made by :class:`_WeightSink`, created before the
  first thought pass; every deferred use depends on it, so autograd runs its backward
  after all of them, and it turns the kept pairs into one product ``G^T X`` that goes to
  the weight through autograd's own accumulation (gradient hooks, e.g. DDP's, fire as
  usual).

The model's modules are not changed. A weight that is sharded or replaced for the forward
(FSDP) is not in the table and takes the ordinary path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["DeferredWeightGrads", "worth_deferring"]


# Measured, not derived: between the tiny model's largest weights (65,536 elements), where
# deferring loses, and SmolLM2-135M's smallest (110,592), where it gains.
MIN_DEFERRED_NUMEL = 100_000


def worth_deferring(rows: int, weight: torch.Tensor) -> bool:
    """Whether a weight's gradient is better deferred for thought passes of ``rows`` rows.

    Deferring costs a fixed amount of Python per call (routing, a custom autograd
    function). It pays when the weight is large, so that each pass's full-size
    accumulation and small product cost more than that, and the rows are few against the
    weight's smaller side. Measured on a 2-core CPU: SmolLM2-135M's weights (110k to 885k
    elements) at 8 rows gain (a 6-thought step from 1.34x to 1.28x a CoT step, side by
    side), the tiny model's (at most 65k elements) lose at 8 to 32 rows (2.75x to 3.14x
    at 8) and are even at 128.
    """
    return rows * 4 <= min(weight.shape) and weight.numel() >= MIN_DEFERRED_NUMEL


class _WeightSink(torch.autograd.Function):
    """Identity on the weight; its backward adds the deferred products ``G^T X``."""

    @staticmethod
    def forward(ctx, weight, stash):
        ctx.stash = stash
        ctx.set_materialize_grads(False)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        xs, gs = ctx.stash
        if xs:
            x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs])
            g = torch.cat([t.reshape(-1, t.shape[-1]) for t in gs])
            deferred = g.t() @ x
            grad = deferred if grad is None else grad + deferred
            xs.clear()
            gs.clear()
        return grad, None


class _LinearInputGrad(torch.autograd.Function):
    """``F.linear`` whose backward gives the input (and bias) gradient and keeps ``(x, g)``
    for the weight's sink instead of computing the weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, stash):
        ctx.save_for_backward(x, weight)
        ctx.stash = stash
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        ctx.stash[0].append(x)
        ctx.stash[1].append(g)
        grad_bias = g.reshape(-1, g.shape[-1]).sum(0) if ctx.has_bias else None
        return g @ weight, None, grad_bias, None


class DeferredWeightGrads:
    """The weights of ``module``'s linear layers that train and are worth deferring for a
    thought pass of ``rows`` rows, with their sinks (made on first use). ``with
    deferred.active(): ...`` routes these weights' linear calls inside through
    :class:`_LinearInputGrad`. Routing every chunk of a forward, not only the thought
    passes, leaves each weight one gradient product over all the rows and one
    accumulation, as in a plain forward. Empty (false) when no weight qualifies: then
    nothing needs routing."""

    def __init__(self, module: nn.Module, rows: int):
        self._weights = {id(m.weight): m.weight for m in module.modules()
                         if isinstance(m, nn.Linear) and m.weight.requires_grad and worth_deferring(rows, m.weight)}
        self._sinks: dict[int, tuple[torch.Tensor, tuple[list, list]]] = {}

    def __bool__(self) -> bool:
        return bool(self._weights)

    def held_bytes(self, rows: int) -> int:
        """Bytes of output gradients held until the weight products, for a forward of
        ``rows`` rows in all (every routed linear keeps its ``(rows, out_features)`` gradient)."""
        return sum(rows * w.shape[0] * w.element_size() for w in self._weights.values())

    def _sink(self, weight: torch.Tensor):
        entry = self._sinks.get(id(weight))
        if entry is None:
            stash: tuple[list, list] = ([], [])
            entry = self._sinks[id(weight)] = (_WeightSink.apply(weight, stash), stash)
        return entry

    def active(self) -> TorchFunctionMode:
        return _Route(self)


class _Route(TorchFunctionMode):
    def __init__(self, deferred: DeferredWeightGrads):
        super().__init__()
        self.deferred = deferred

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if id(weight) in self.deferred._weights and torch.is_grad_enabled():
                alias, stash = self.deferred._sink(weight)
                return _LinearInputGrad.apply(x, alias, bias, stash)
        return func(*args, **kwargs)
