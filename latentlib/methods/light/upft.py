"""UPFT: Unsupervised Prefix Fine-Tuning (Ji et al. 2025, "The First Few Tokens Are All
You Need").

The loss covers only the first ``n`` tokens of the reasoning (``n = 8`` by default):
the paper's "prefix self-consistency" says that different correct solutions share their
opening, so training on it is nearly as good as training on whole solutions, at a
fraction of the cost. A share ``structure_ratio`` of the examples keeps the whole
solution under the loss (the paper's structure examples), so the model still learns how
a solution goes on and ends.

Cost: under causal attention no position before ``p`` sees the tokens after ``p``, so
masking the labels after the prefix and *dropping* those tokens give the same loss and
the same gradients (pinned by a test); :func:`upft_segments` drops them
(``truncate=True``), which is where the training time goes down. Because a batch mixes
short prefix examples with a few whole ones, padding every row to the longest would
give the saving back: :func:`collate_buckets` pads the short and the long rows of a
batch separately and :func:`bucketed_lm_loss` returns exactly the loss of the one
padded batch (the mean over all labelled tokens).

Departures: the paper trains on prefixes of the model's *own* samples, without labels
(hence "unsupervised"); :func:`sample_prefixes` does that for a model that can already
solve some problems. A from-scratch model (the ``tiny`` preset) has nothing to sample
from, so there the prefixes are the dataset's own reasoning (``prefixes="gold"``), and
the comparison with the full-token loss at the same number of steps is what is measured.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from latentlib.batching import IGNORE, Encoded, Segment, collate, cot_segments, encode_record, prompt_batch
from latentlib.policies import TextPolicy
from latentlib.recurrence import generate, position_ids_for
from latentlib.tasks import Format
from latentlib.training.loop import TrainConfig, TrainResult, train
from latentlib.training.losses import token_count

__all__ = ["UPFTConfig", "first_n_mask", "upft_segments", "upft_examples", "collate_buckets", "bucketed_lm_loss",
           "sample_prefixes", "train_upft"]


@dataclass(frozen=True)
class UPFTConfig:
    prefix_tokens: int = 8  # n: reasoning tokens under the loss
    structure_ratio: float = 0.1  # share of examples kept whole (full-token loss), so the model learns to finish
    truncate: bool = True  # drop the tokens after the prefix (same loss and gradients, less compute)
    train: TrainConfig = TrainConfig(steps=600, batch_size=128, lr=3e-3, warmup_steps=100)  # the optimisation

    def __post_init__(self):
        if not isinstance(self.prefix_tokens, int) or self.prefix_tokens < 1:
            raise ValueError(f"prefix_tokens={self.prefix_tokens!r}: use at least 1 token (the paper uses 8 to 32)")
        if not 0.0 <= self.structure_ratio <= 1.0:
            raise ValueError(f"structure_ratio={self.structure_ratio!r}: use a share in [0, 1] (the paper uses 0.1)")


def first_n_mask(mask: torch.Tensor, n: int) -> torch.Tensor:
    """``(B, T)`` bool: the first ``n`` True positions of each row of ``mask`` (all of
    them when a row has fewer). The UPFT label mask, with ``mask`` the reasoning tokens."""
    mask = mask.bool()
    return mask & (mask.long().cumsum(-1) <= n)


def upft_segments(enc: Encoded, n: int, *, truncate: bool = True) -> list[Segment]:
    """The question (no loss), then the first ``n`` reasoning tokens (loss). The rest of
    the solution is dropped (``truncate``) or fed without loss."""
    reasoning = tuple(t for s in enc.steps for t in s)
    segs: list[Segment] = [("prompt", enc.question), ("target", reasoning[:n])]
    if not truncate:
        rest = reasoning[n:] + enc.answer
        if rest:
            segs.append(("prompt", rest))
    return segs


def upft_examples(encoded: Sequence[Encoded], cfg: UPFTConfig, *, seed: int = 0) -> list[list[Segment]]:
    """One example per record: whole (with probability ``structure_ratio``, seeded) or the prefix."""
    rng = random.Random(seed)
    return [cot_segments(e) if rng.random() < cfg.structure_ratio
            else upft_segments(e, cfg.prefix_tokens, truncate=cfg.truncate) for e in encoded]


def collate_buckets(examples: Sequence[list[Segment]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded batches of the short and the long examples, keys ``"0:input_ids"``,
    ``"1:input_ids"``, ...: the examples sorted by length and cut where the padded size
    of the two parts is smallest (one part when cutting saves nothing)."""
    lengths = [sum(len(ids) for _, ids in ex) for ex in examples]
    order = sorted(range(len(examples)), key=lengths.__getitem__)
    n, longest = len(order), lengths[order[-1]]
    best_k, best_cost = 0, n * longest
    for k in range(1, n):
        cost = k * lengths[order[k - 1]] + (n - k) * longest
        if cost < best_cost:
            best_k, best_cost = k, cost
    parts = [order[:best_k], order[best_k:]] if best_k else [order]
    batch = {}
    for i, part in enumerate(parts):
        for key, v in collate([examples[j] for j in part], pad_id).items():
            batch[f"{i}:{key}"] = v
    return batch


def bucketed_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Causal-LM loss over every part of a :func:`collate_buckets` batch: the sum of the
    token losses over all parts divided by the number of labelled tokens, i.e. the same
    value as :func:`latentlib.training.losses.lm_loss` on the whole batch padded at once."""
    total, count = 0.0, 0
    for part in sorted({k.split(":", 1)[0] for k in batch}):
        b = {k.split(":", 1)[1]: v for k, v in batch.items() if k.startswith(part + ":")}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       position_ids=position_ids_for(b["attention_mask"])).logits  # (B, T, V)
        labels = b["labels"][:, 1:]
        total = total + F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                        ignore_index=IGNORE, reduction="sum")
        count += int((labels != IGNORE).sum())
    divisor = token_count(torch.tensor(count))  # several processes: the global batch's count (see losses)
    return total / (max(count, 1) if divisor is None else divisor.clamp(min=1.0)[0]), {}


@torch.no_grad()
def sample_prefixes(model: nn.Module, tokenizer, records: Sequence, n: int, fmt: Format, *, temperature: float = 0.7,
                    seed: int = 0, batch_size: int = 64) -> list[Encoded]:
    """The paper's unsupervised data: the first ``n`` tokens the model itself samples for
    each question (no answer checking), as :class:`Encoded` records with one step."""
    out = []
    model.eval()
    for s in range(0, len(records), batch_size):
        chunk = [encode_record(tokenizer, r, fmt) for r in records[s:s + batch_size]]
        ids, mask = prompt_batch([e.question for e in chunk], tokenizer.pad_token_id)
        trace = generate(model, ids, mask, policy=TextPolicy(), max_new_tokens=n, temperature=temperature,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         seeds=[seed * 1_000_003 + s + b for b in range(len(chunk))])
        for b, e in enumerate(chunk):
            out.append(Encoded(question=e.question, steps=(tuple(trace.text_ids(b)),), answer=e.answer))
    return out


def train_upft(model: nn.Module, tokenizer, records: Sequence, cfg: UPFTConfig, fmt: Format, *,
               encoded: Sequence[Encoded] | None = None, checkpoint_dir=None,
               progress: bool = True) -> TrainResult:
    """Trains on UPFT examples of ``records`` (or of ``encoded``, e.g. from :func:`sample_prefixes`)."""
    encoded = encoded if encoded is not None else [encode_record(tokenizer, r, fmt) for r in records]
    examples = upft_examples(encoded, cfg, seed=cfg.train.seed)
    return train(model, examples, lambda b: collate_buckets(b, tokenizer.pad_token_id), bucketed_lm_loss, cfg.train,
                 checkpoint_dir=checkpoint_dir, desc=f"upft n={cfg.prefix_tokens}", progress=progress)
