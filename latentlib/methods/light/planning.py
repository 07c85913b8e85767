"""Planning tokens (Wang et al., ICLR 2024, "Guiding Language Model Reasoning with
Planning Tokens").

A learned special token comes before each reasoning step; the model is trained to write
it (it is part of the target) and so writes it by itself at inference, getting one
extra position of computation before every step. A reader never sees it: evaluation
counts only non-special tokens as visible.

The token is a new special token ``<plan>``, added with
:func:`latentlib.tokens.add_special_tokens` (mean-initialised row, embeddings resized);
its embedding row is trained with the model. We use a new token rather than reusing
``<pause>``, so a model can carry both methods and a pause-trained row never leaks into
the planning run. For LoRA models make the row trainable with
``latentlib.tokens.trainable_token_config(tokenizer, ("<plan>",))``.

Departure: the paper gives planning tokens *types* (inferred from each step: its
arithmetic operator, or a k-means / SQ-VAE cluster of the step's embedding), so the
token also says what kind of step follows. Here there is one type; the planning token
is then a learned per-step delay, the step-level sibling of pause tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from latentlib.batching import Encoded, Segment, collate, encode_record
from latentlib.tasks import Format
from latentlib.tokens import add_special_tokens
from latentlib.training.loop import TrainConfig, TrainResult, train
from latentlib.training.losses import lm_loss

__all__ = ["PLAN_TOKEN", "PlanningConfig", "add_plan_token", "planning_segments", "train_planning"]

PLAN_TOKEN = "<plan>"


@dataclass(frozen=True)
class PlanningConfig:
    token: str = PLAN_TOKEN  # the planning token, added if missing
    train: TrainConfig = TrainConfig(steps=600, batch_size=128, lr=3e-3, warmup_steps=100)  # the optimisation

    def __post_init__(self):
        if not (self.token.startswith("<") and self.token.endswith(">")):
            raise ValueError(f"token={self.token!r}: use a special-token spelling such as '<plan>'")


def add_plan_token(model: nn.Module, tokenizer, token: str = PLAN_TOKEN) -> int:
    """Adds ``token`` (if missing), resizes the embeddings, and returns its id."""
    return add_special_tokens(model, tokenizer, (token,))[token]


def planning_segments(enc: Encoded, plan_id: int) -> list[Segment]:
    """The question (no loss), then ``<plan> step`` for each step and the answer, all
    under the loss: the model learns to write the planning tokens itself."""
    body = tuple(t for step in enc.steps for t in (plan_id, *step))
    return [("prompt", enc.question), ("target", body), ("target", enc.answer)]


def train_planning(model: nn.Module, tokenizer, records: Sequence, cfg: PlanningConfig, fmt: Format, *,
                   checkpoint_dir=None, progress: bool = True) -> TrainResult:
    """Trains ``model`` on ``records`` with a planning token before every step."""
    plan_id = add_plan_token(model, tokenizer, cfg.token)
    examples = [planning_segments(encode_record(tokenizer, r, fmt), plan_id) for r in records]
    return train(model, examples, lambda b: collate(b, tokenizer.pad_token_id), lm_loss, cfg.train,
                 checkpoint_dir=checkpoint_dir, desc="planning tokens", progress=progress)
