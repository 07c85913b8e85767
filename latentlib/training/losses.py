"""The language-modelling losses every method builds on.

Token means over a distributed batch. With several processes each holds a share of the
global batch; averaging the processes' own token means (what averaging their gradients
does) weights a token by how many tokens its process happens to hold. Inside
:func:`global_token_mean` (the training loop's loss), :func:`token_count` is instead the
whole global batch's count divided by the number of processes, so that average is the
global batch's token mean, the one-process loss. With one process nothing changes.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F

from latentlib import distributed
from latentlib.batching import IGNORE
from latentlib.recurrence import position_ids_for

__all__ = ["token_loss", "lm_loss", "global_token_mean", "token_count"]

_GLOBAL = contextvars.ContextVar("latentlib_global_token_mean", default=False)


@contextlib.contextmanager
def global_token_mean():
    """Inside it, on several processes, token means are taken over the global batch
    (every process must compute the same losses: :func:`token_count` is a collective)."""
    token = _GLOBAL.set(True)
    try:
        yield
    finally:
        _GLOBAL.reset(token)


def token_count(local: torch.Tensor) -> torch.Tensor | None:
    """The divisor for a token mean of ``local`` tokens: inside :func:`global_token_mean`
    on several processes, the global count over the number of processes (all-reduced);
    else None (divide by ``local``)."""
    if not _GLOBAL.get() or not distributed.is_distributed():
        return None
    total = local.detach().float().reshape(1).clone()
    torch.distributed.all_reduce(total)
    return total / distributed.world()


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts label t+1; IGNORE labels have no loss."""
    flat_logits, flat_labels = logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten()
    count = token_count((flat_labels != IGNORE).sum())
    if count is None:
        return F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE)
    return F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE, reduction="sum") / count.clamp(min=1.0)[0]


def lm_loss(model, batch) -> tuple[torch.Tensor, dict]:
    """Plain causal-LM loss on a text-only batch (left-padded)."""
    pos = position_ids_for(batch["attention_mask"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=pos).logits
    return token_loss(logits, batch["labels"]), {}
