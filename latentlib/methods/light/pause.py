"""Pause tokens (Goyal et al. 2023, "Think before you speak").

``n`` copies of a learnable ``<pause>`` token are appended to the question (or put in
front of it), and the model answers only after the last one: the pauses give it ``n``
extra positions of computation before it must commit to the first answer token. The
loss ignores the pause positions (they are prompt segments: fed, never predicted).

The seed's claim to measure: only *trained* pauses help; inserting them at inference
into a model that never saw them ("inference-only delay") does not. Hence two settings:

- **untrained**: :func:`pause_spec` inserts the pauses at evaluation into any model (the
  ``<pause>`` row is the mean embedding that :func:`latentlib.tokens.add_special_tokens`
  gives a new token);
- **trained**: :func:`train_pause` trains with the pauses in place. ``trainable="all"``
  trains every weight together with the pause row (the paper's pause-training, what the
  tiny preset does from scratch: the paper's "pretrained and finetuned with pauses");
  ``trainable="pause_row"`` trains only the ``<pause>`` embedding row (a frozen model,
  the cheapest variant). For LoRA models use
  ``latentlib.tokens.trainable_token_config(tokenizer, ("<pause>",))``.

Departures: the paper appends pauses after the whole input at pretraining time too
(random positions) and at fine-tuning; here, on the embedded task, pretraining *is* the
task training, so "pause-pretrained and pause-finetuned" is one run from scratch. The
no-CoT format (question, pauses, answer) is the natural home of the method: there the
pauses are the only extra computation the model gets.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from latentlib.batching import Encoded, Segment, collate, encode_record
from latentlib.evaluate import EvalSpec
from latentlib.tasks import Format
from latentlib.tokens import MissingTokensError, add_special_tokens
from latentlib.training.loop import TrainConfig, TrainResult, train
from latentlib.training.losses import lm_loss

__all__ = ["PauseConfig", "pause_segments", "pause_prompt", "pause_spec", "only_rows_trainable", "train_pause"]

PLACEMENTS = ("append", "prepend")


@dataclass(frozen=True)
class PauseConfig:
    n_pause: int = 4  # n: pause tokens per example (the seed proposes 2-4; the paper uses 10 at 1B)
    placement: str = "append"  # "append": question, pauses, answer; "prepend": pauses, question, answer
    kind: str = "nocot"  # what follows the pauses: "nocot" (the answer) or "cot" (steps, then the answer)
    trainable: str = "all"  # "all" weights with the pause row, or only the "pause_row"
    train: TrainConfig = TrainConfig(steps=600, batch_size=128, lr=3e-3, warmup_steps=100)  # the optimisation

    def __post_init__(self):
        if not isinstance(self.n_pause, int) or self.n_pause < 1:
            raise ValueError(f"n_pause={self.n_pause!r}: use at least 1 pause token")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement={self.placement!r}: use one of {PLACEMENTS}")
        if self.kind not in ("nocot", "cot"):
            raise ValueError(f"kind={self.kind!r}: use 'nocot' or 'cot'")
        if self.trainable not in ("all", "pause_row"):
            raise ValueError(f"trainable={self.trainable!r}: use 'all' or 'pause_row'")
        if self.trainable == "pause_row" and self.train.weight_decay:
            raise ValueError(f"trainable='pause_row' with weight_decay={self.train.weight_decay}: AdamW would decay "
                             "the frozen embedding rows too; set weight_decay=0")


def pause_prompt(enc: Encoded, pause_id: int, n: int, placement: str = "append") -> tuple[int, ...]:
    """The prompt with ``n`` pauses: ``question + pauses`` or ``pauses + question``."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement={placement!r}: use one of {PLACEMENTS}")
    pauses = (pause_id,) * n
    return enc.question + pauses if placement == "append" else pauses + enc.question


def pause_segments(enc: Encoded, pause_id: int, n: int, *, placement: str = "append",
                   kind: str = "nocot") -> list[Segment]:
    """Training segments: the paused prompt (no loss on question or pauses), then the
    target: the answer (``kind="nocot"``) or the steps and the answer (``"cot"``)."""
    segs: list[Segment] = [("prompt", pause_prompt(enc, pause_id, n, placement))]
    if kind == "cot":
        segs.append(("target", tuple(t for s in enc.steps for t in s)))
    segs.append(("target", enc.answer))
    return segs


def pause_spec(tokenizer, n: int, fmt: Format, *, placement: str = "append", name: str | None = None,
               max_new_tokens: int = 16) -> EvalSpec:
    """Evaluation with ``n`` pauses in the prompt (trained or not: the model decides)."""
    pause_id = tokenizer.convert_tokens_to_ids("<pause>")
    if pause_id is None or pause_id == tokenizer.unk_token_id:
        raise MissingTokensError("the tokenizer lacks <pause>: call "
                                 "latentlib.tokens.add_special_tokens(model, tokenizer)")
    return EvalSpec(name or f"pause x{n}",
                    prompt=lambda r: pause_prompt(encode_record(tokenizer, r, fmt), pause_id, n, placement),
                    max_new_tokens=max_new_tokens)


@contextmanager
def only_rows_trainable(model: nn.Module, rows: Sequence[int]):
    """Freezes the model except the given rows of the input embedding (tied output rows
    included): the embedding matrix keeps ``requires_grad`` but its gradient is zeroed
    outside ``rows``. Restores every flag on exit."""
    weight = model.get_input_embeddings().weight
    flags = {p: p.requires_grad for p in model.parameters()}
    keep = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    keep[list(rows)] = 1
    for p in model.parameters():
        p.requires_grad_(False)
    weight.requires_grad_(True)
    handle = weight.register_hook(lambda g: g * keep)
    try:
        yield
    finally:
        handle.remove()
        for p, f in flags.items():
            p.requires_grad_(f)


def train_pause(model: nn.Module, tokenizer, records: Sequence, cfg: PauseConfig, fmt: Format, *,
                checkpoint_dir=None, progress: bool = True) -> TrainResult:
    """Trains ``model`` on ``records`` with ``cfg.n_pause`` pauses in every example."""
    pause_id = add_special_tokens(model, tokenizer, ("<pause>",))["<pause>"]
    examples = [pause_segments(encode_record(tokenizer, r, fmt), pause_id, cfg.n_pause,
                               placement=cfg.placement, kind=cfg.kind) for r in records]

    def run():
        return train(model, examples, lambda b: collate(b, tokenizer.pad_token_id), lm_loss, cfg.train,
                     checkpoint_dir=checkpoint_dir, desc=f"pause x{cfg.n_pause}", progress=progress)

    if cfg.trainable == "pause_row":
        with only_rows_trainable(model, [pause_id]):
            return run()
    return run()
