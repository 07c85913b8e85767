"""From records to token segments to left-padded training batches.

A training example is a list of *segments*, each a run of token ids with a role:

- ``"prompt"``: fed to the model, no loss (the question);
- ``"latent"``: thought slots: placeholder ids whose inputs the engine injects, no loss;
- ``"target"``: fed and predicted (steps, answer, eos): the loss is on these.

Methods build their examples by arranging segments (Coconut replaces the first k step
segments by a latent segment, pause tokens insert a prompt segment, ...); one collate
function turns any list of them into the engine's batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from latentlib.tasks.task import Format

__all__ = ["Encoded", "encode_record", "Segment", "cot_segments", "nocot_segments", "collate", "prompt_batch",
           "IGNORE"]

IGNORE = -100  # label of positions without loss (the convention of torch and transformers)


@dataclass(frozen=True)
class Encoded:
    """A record's token ids, split where the methods need to cut it."""

    question: tuple[int, ...]  # the prompt, ending with the separator
    steps: tuple[tuple[int, ...], ...]  # one tuple per reasoning step, each ending with the separator
    answer: tuple[int, ...]  # "#### <answer>" + eos


def encode_record(tokenizer, record, fmt: Format) -> Encoded:
    """Tokenises question, each step and the answer separately (as Coconut does), so that
    a step can be removed or replaced without re-tokenising its neighbours. ``fmt``: the
    task's :class:`~latentlib.tasks.task.Format` (``task.format``)."""

    def ids(text):
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; set tokenizer.eos_token before encoding records")
    return Encoded(
        question=ids(fmt.question(record)),
        steps=tuple(ids(step) for step in fmt.steps(record)),
        answer=ids(fmt.answer(record)) + (eos,),
    )


Segment = tuple[str, tuple[int, ...] | list[int]]  # (role, ids)
_ROLES = ("prompt", "latent", "target")


def cot_segments(enc: Encoded, markers: tuple[int, int] | None = None) -> list[Segment]:
    """The CoT format: question (no loss), the written steps and the answer (loss).
    ``markers``: an empty ``<bot><eot>`` pair forced after the question (no loss)."""
    segs: list[Segment] = [("prompt", enc.question)]
    if markers is not None:
        segs.append(("prompt", markers))  # the model never has to write the markers: they are forced
    segs.append(("target", tuple(t for s in enc.steps for t in s)))
    segs.append(("target", enc.answer))
    return segs


def nocot_segments(enc: Encoded) -> list[Segment]:
    """The no-CoT format: question (no loss), then straight to the answer."""
    return [("prompt", enc.question), ("target", enc.answer)]


def collate(examples: list[list[Segment]], pad_id: int, *, align: str = "end") -> dict[str, torch.Tensor]:
    """Left-padded batch: ``input_ids``, ``attention_mask``, ``latent_mask``, ``labels``.

    ``align="end"``: sequences end at the last column (left padding only; what generation
    uses). ``align="first_latent"``: sequences are shifted so that their first thought
    falls in the same column (right padding fills the tail), so a batch whose examples
    have questions of different lengths still needs only one pass per thought column.
    """
    if align not in ("end", "first_latent"):
        raise ValueError(f"align={align!r}: use 'end' or 'first_latent'")
    rows = []
    for ex in examples:
        ids, roles = [], []
        for role, seg in ex:
            if role not in _ROLES:
                raise ValueError(f"segment role {role!r}: use one of {_ROLES}")
            ids.extend(seg)
            roles.extend([role] * len(seg))
        if not ids:
            raise ValueError("an example has no tokens")
        rows.append((ids, roles))
    lead = [0] * len(rows)
    if align == "first_latent":
        firsts = [r.index("latent") if "latent" in r else len(r) for _, r in rows]
        lead = [max(firsts) - f for f in firsts]
        T = max(lead[i] + len(rows[i][0]) for i in range(len(rows)))
    else:
        T = max(len(ids) for ids, _ in rows)
        lead = [T - len(ids) for ids, _ in rows]
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    latent_mask = torch.zeros((B, T), dtype=torch.bool)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    for i, (ids, roles) in enumerate(rows):
        s = lead[i]
        e = s + len(ids)
        input_ids[i, s:e] = torch.tensor(ids)
        attention_mask[i, s:e] = 1
        latent_mask[i, s:e] = torch.tensor([r == "latent" for r in roles])
        labels[i, s:e] = torch.tensor([t if r == "target" else IGNORE for t, r in zip(ids, roles)])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "latent_mask": latent_mask, "labels": labels}


def prompt_batch(prompts: list[list[int] | tuple[int, ...]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, attention_mask)`` for generation."""
    batch = collate([[("prompt", p)] for p in prompts], pad_id)
    return batch["input_ids"], batch["attention_mask"]
