"""SWITCH phase 1: which steps of each CoT are wrapped in ``<swi> ... </swi>``, from the
entropy of the base model's next-token distributions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from latentlib.batching import collate, cot_segments, encode_record
from latentlib.methods.switch.config import AGGREGATES, SpanRule
from latentlib.recurrence import position_ids_for
from latentlib.tasks import Format

__all__ = ["Span", "step_entropy", "entropy_threshold", "wrap_high_entropy_spans", "pool_entropies",
           "chain_step_keys", "label_spans", "gold_step_entropies", "teacher_step_entropies"]


@dataclass(frozen=True)
class Span:
    start: int  # first step of the span
    end: int  # one past its last step
    wrapped: bool  # inside <swi> ... </swi>

    @property
    def units(self) -> int:
        return self.end - self.start


def step_entropy(token_entropies: Sequence[float], aggregate: str = "max") -> float:
    """One step's entropy from its tokens' entropies (nats)."""
    if len(token_entropies) == 0:
        raise ValueError("a step without tokens has no entropy")
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate={aggregate!r}: use one of {AGGREGATES}")
    return float(max(token_entropies) if aggregate == "max" else sum(token_entropies) / len(token_entropies))


def entropy_threshold(entropies: Sequence[float], top_q: float) -> float:
    """The ``1 - top_q`` quantile: steps strictly above it are about a ``top_q`` fraction."""
    values = np.asarray(list(entropies), dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("no finite step entropies to take a quantile of")
    return float(np.quantile(values, 1.0 - top_q))


def wrap_high_entropy_spans(steps: Sequence, step_entropies: Sequence[float], threshold: float, *,
                            wrap_last: bool = False, merge: bool = True, isolate: bool = False) -> list[Span]:
    """Cuts one CoT into spans: steps whose entropy exceeds ``threshold`` are wrapped
    (adjacent ones merged into one block when ``merge``; with ``isolate`` a step right
    after a wrapped one stays text, left to right), the rest are text. Pure; the spans
    cover every step in order."""
    if len(steps) != len(step_entropies):
        raise ValueError(f"{len(steps)} steps but {len(step_entropies)} step entropies: give one per step")
    n = len(steps)
    hot = [bool(e > threshold) and (wrap_last or k < n - 1) for k, e in enumerate(step_entropies)]
    if isolate:
        for k in range(1, n):
            hot[k] = hot[k] and not hot[k - 1]
    spans: list[Span] = []
    for k, w in enumerate(hot):
        prev = spans[-1] if spans else None
        if prev is not None and prev.wrapped == w and (not w or merge):
            spans[-1] = Span(prev.start, k + 1, w)
        else:
            spans.append(Span(k, k + 1, w))
    return spans


def pool_entropies(step_entropies: Sequence[Sequence[float] | None], keys: Sequence[Sequence]) -> dict:
    """Mean step entropy per key (e.g. per operation) over every step that has one."""
    sums: dict = {}
    for ents, ks in zip(step_entropies, keys):
        if ents is None:
            continue
        for e, k in zip(ents, ks):
            s = sums.setdefault(k, [0.0, 0])
            s[0] += e
            s[1] += 1
    return {k: s / n for k, (s, n) in sums.items()}


def chain_step_keys(record) -> list[str]:
    """The chain task's operation of each step (question ``"3 +4 *7 ... ="``)."""
    ops = record.question.split()[1:-1]
    if len(ops) != len(record.steps):
        raise ValueError(f"question {record.question!r} has {len(ops)} operations for {len(record.steps)} steps: "
                         "pool_by='op' needs the chain task's format")
    return ops


def label_spans(records: Sequence, step_entropies: Sequence[Sequence[float] | None], rule: SpanRule
                ) -> tuple[list[list[Span]], dict]:
    """Spans of every record under ``rule``, and what decided them (threshold, pooled table).

    ``step_entropies[i]``: one entropy per step of record ``i``, or None (no measurement;
    allowed only with pooling, where the record takes its keys' pooled values).
    """
    if len(records) != len(step_entropies):
        raise ValueError(f"{len(records)} records but {len(step_entropies)} entropy lists")
    info: dict = {"rule": asdict(rule)}
    if rule.pool_by == "op":
        keys = [chain_step_keys(r) for r in records]
        table = pool_entropies(step_entropies, keys)
        missing = sorted({k for ks in keys for k in ks} - set(table))
        if missing:
            raise ValueError(f"no entropy measured for the operations {missing}: measure more problems")
        ents = [[table[k] for k in ks] for ks in keys]
        info["pooled"] = dict(sorted(table.items(), key=lambda kv: -kv[1]))
    else:
        if any(e is None for e in step_entropies):
            raise ValueError("some records have no step entropies; without pooling every record needs them")
        ents = [list(e) for e in step_entropies]
    if rule.threshold is not None:
        threshold = rule.threshold
    else:
        candidates = [e for es in ents for k, e in enumerate(es) if rule.wrap_last or k < len(es) - 1]
        threshold = entropy_threshold(candidates, rule.top_q)
    info["threshold"] = threshold
    spans = [wrap_high_entropy_spans(r.steps, e, threshold, wrap_last=rule.wrap_last, merge=rule.merge,
                                     isolate=rule.isolate) for r, e in zip(records, ents)]
    wrapped = sum(s.units for sp in spans for s in sp if s.wrapped)
    info["fraction_steps_wrapped"] = wrapped / max(1, sum(len(r.steps) for r in records))
    info["fraction_problems_with_block"] = sum(any(s.wrapped for s in sp) for sp in spans) / max(1, len(spans))
    if rule.pool_by == "op":
        info["wrapped_keys"] = [k for k, v in info["pooled"].items() if v > threshold]
    return spans, info


@torch.no_grad()
def gold_step_entropies(model: nn.Module, tokenizer, records: Sequence, fmt: Format, *,
                        aggregate: str = "max", batch_size: int = 256) -> list[list[float]]:
    """Per record, the entropy of each gold CoT step under ``model`` by teacher forcing
    (one plain forward per batch; a token's entropy is that of the distribution that
    predicts it)."""
    model.eval()
    out: list[list[float]] = []
    dev = next(model.parameters()).device
    for s in range(0, len(records), batch_size):
        encs = [encode_record(tokenizer, r, fmt) for r in records[s:s + batch_size]]
        batch = collate([cot_segments(e) for e in encs], tokenizer.pad_token_id)
        mask = batch["attention_mask"].to(dev)
        logits = model(input_ids=batch["input_ids"].to(dev), attention_mask=mask,
                       position_ids=position_ids_for(mask)).logits.float()
        logp = torch.log_softmax(logits, -1)
        ent = -(logp.exp() * logp).sum(-1)  # (B, T): entropy of the distribution predicting column t + 1
        T = ent.shape[1]
        for b, e in enumerate(encs):
            start = T - sum(len(x) for x in (e.question, *e.steps, e.answer)) + len(e.question)
            row = []
            for step in e.steps:
                row.append(step_entropy(ent[b, start - 1:start - 1 + len(step)].tolist(), aggregate))
                start += len(step)
            out.append(row)
    return out


def teacher_step_entropies(rollouts: pd.DataFrame, records: Sequence, fmt: Format, *,
                           aggregate: str = "max") -> list[list[float] | None]:
    """Per record, step entropies read from the teacher rollouts (:func:`latentlib.teacher.load_rollouts`).

    A rollout counts when it is correct and its written steps are the record's gold
    steps (so its entropies describe the gold CoT, and a misaligned problem index is
    caught); its step ``k`` is the generated tokens after step ``k-1``'s end up to step
    ``k``'s end (the stored ``positions``). Entropies are averaged over counting
    rollouts; records without one get None. ``records`` are the records the teacher was
    extracted from, in the same order.
    """
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    for row in rollouts.itertuples(index=False):
        i = int(row.problem)
        if not row.correct or i >= len(records):
            continue
        steps = records[i].steps
        written = [p.strip() for p in str(row.text).split("####")[0].split(fmt.separator) if p.strip()]
        if written != [s.strip() for s in steps]:
            continue
        pos = list(row.positions)[:len(steps)]
        ent = list(row.entropy)
        if len(pos) < len(steps) or any(p < 0 for p in pos):
            continue
        bounds = [-1, *pos]
        vals = np.array([step_entropy(ent[bounds[k] + 1:bounds[k + 1] + 1], aggregate) for k in range(len(steps))])
        sums[i] = sums.get(i, 0.0) + vals
        counts[i] = counts.get(i, 0) + 1
    return [list(sums[i] / counts[i]) if i in sums else None for i in range(len(records))]
