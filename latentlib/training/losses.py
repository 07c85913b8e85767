"""The language-modelling losses every method builds on."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from latentlib.batching import IGNORE
from latentlib.recurrence import position_ids_for

__all__ = ["token_loss", "lm_loss"]


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts label t+1; IGNORE labels have no loss."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


def lm_loss(model, batch) -> tuple[torch.Tensor, dict]:
    """Plain causal-LM loss on a text-only batch (left-padded)."""
    pos = position_ids_for(batch["attention_mask"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=pos).logits
    return token_loss(logits, batch["labels"]), {}
