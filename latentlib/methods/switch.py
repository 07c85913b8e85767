"""SWITCH (Yang et al. 2026, arXiv 2606.13106; the SWITCH card): switchable latent blocks.

The model writes ordinary text, emits ``<swi>`` to enter latent mode, thinks there by
hidden-state recurrence (each ``<latent>`` slot's input is the previous position's last
hidden state, as in Coconut), and emits ``</swi>`` to leave. The boundary tokens are
ordinary vocabulary items, so the model decides by itself where to think silently.

Three training phases, then inference:

1. **SFT** (:func:`wrap_high_entropy_spans`, :func:`label_spans`, :func:`train_phase1`):
   the high-entropy steps of each CoT are wrapped in ``<swi> ... </swi>`` (text still
   inside) and the model is fine-tuned on that format, learning where to emit ``<swi>``.
2. **Curriculum** (:func:`parallel_schedule`, :func:`train_phase2`): the text inside the
   blocks is replaced by ``<latent>`` slots progressively, in every block at once.
3. **Switch-GRPO**: on-policy RL with real hidden-state injection in the rollouts, in
   :mod:`latentlib.training.grpo`.
4. **Inference**: the engine's :class:`~latentlib.policies.SwitchPolicy` (enter on
   ``<swi>``, at least K_min and at most K_max latent steps, leave on ``</swi>``), one
   batched generation whose sequences are in different modes in the same forward.

Definitions and where this departs from the paper/card:

- *Step entropy.* The entropy of the next-token distribution at each token of a step
  (the distribution the token is drawn from), aggregated over the step by ``max`` or
  ``mean``. Sources: the teacher rollouts of :mod:`latentlib.teacher` (correct rollouts
  whose steps are the gold steps, averaged over rollouts), else the base model on the
  gold CoT by teacher forcing (:func:`gold_step_entropies`).
- *Span rule* (:class:`SpanRule`). A step is wrapped when its entropy exceeds a
  threshold: a fixed one, or the ``1 - top_q`` quantile of all candidate steps (so about
  a ``top_q`` fraction is wrapped). Adjacent wrapped steps merge into one block (or,
  with ``isolate``, the second stays text). The last step is not wrapped by default (it
  carries the answer, which stays checkable).
  ``pool_by="op"`` (the embedded chain task) replaces each step's entropy by the mean
  entropy of its operation over the training set. Why: the from-scratch tiny model is
  nearly certain everywhere (step entropies around 4e-3 nats), so per-problem entropies
  are dominated by noise and the model could not learn where to put ``<swi>``; pooled
  per operation, the rule wraps the steps of the operations the base model is least
  sure of, which is a learnable, deterministic function of the question.
  ``isolate`` (the tiny default) keeps every block to one step between written values:
  the 4-layer model does one step in latent mode well (96% on problems whose blocks are
  single steps) but not two in a row (55-60% on problems with a two-step block, with or
  without merging, after the same budget).
- *Curriculum units are steps.* Stage ``s`` replaces, in every block, its first ``s``
  steps by ``c * s`` latent slots (on the tiny task a step is one token, so units are
  also tokens). A block whose steps are all replaced gets at least K_min slots (the
  inference policy forces K_min steps, so training shows the same count) and at most
  K_max. The card's per-sample cap (48) is applied block by block, left to right: a
  block that would exceed it keeps its text.
- *Stages are optimizer steps* (:mod:`latentlib.training.curriculum`), not epochs, and
  the last stage always makes every block entirely latent (the inference format).
- *Positions.* ``SwitchConfig.positions="block"`` (the tiny default; the paper's is
  "continue") keeps every written token at its CoT position: ``<swi>`` and the slots are
  position-neutral (each shares the position of the token after it: the engine's
  ``neutral_token_ids`` and ``latent_positions="skip"``), and ``</swi>`` is neutral after
  text (phase 1) but takes one position after slots, the position of the step the block
  replaced. The from-scratch tiny model locates the operations by position: markers that
  shift the text cost it hundreds of steps to relearn (phase-1 loss 0.28 after 250 steps
  against 0.004 after 125), and one-step latent blocks that each shift it by one stall
  phase 2 (loss 0.32, 26% accuracy after 200 steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from latentlib import artifacts
from latentlib.batching import Encoded, Segment, collate, encode_record
from latentlib.evaluate import EvalSpec, evaluate, summarize
from latentlib.policies import SwitchPolicy, TextPolicy
from latentlib.recurrence import latent_forward, position_ids_for
from latentlib.tokens import require_tokens
from latentlib.training.base import token_loss
from latentlib.training.loop import TrainConfig, TrainResult, train

__all__ = ["SWITCH_TOKENS", "SwitchIds", "switch_ids", "SpanRule", "SwitchConfig", "Span", "BlockPlan",
           "step_entropy", "entropy_threshold", "wrap_high_entropy_spans", "pool_entropies", "chain_step_keys",
           "label_spans", "gold_step_entropies", "teacher_step_entropies", "render_switch_text",
           "parallel_schedule", "schedule_stage", "switch_segments", "mark_stay_decisions", "phase2_examples",
           "switch_loss", "make_trainable", "train_phase1", "train_phase2", "switch_policy", "RecordingPolicy",
           "latent_blocks", "evaluate_switch", "summarize_switch", "save_switch_model", "load_switch_model",
           "load_switch_adapter", "load_switch_config"]

SWITCH_TOKENS = ("<swi>", "</swi>", "<latent>")
AGGREGATES = ("max", "mean")
POOLS = (None, "op")
POSITIONS = ("continue", "block")


@dataclass(frozen=True)
class SwitchIds:
    swi: int  # <swi>: enter latent mode
    swi_end: int  # </swi>: leave latent mode
    latent: int  # <latent>: placeholder of a slot (never embedded)
    eos: int
    pad: int


def switch_ids(tokenizer) -> SwitchIds:
    """The ids SWITCH needs; :class:`~latentlib.tokens.MissingTokensError` when the tokenizer lacks them."""
    ids = require_tokens(tokenizer, "switch")
    return SwitchIds(ids["<swi>"], ids["</swi>"], ids["<latent>"], tokenizer.eos_token_id, tokenizer.pad_token_id)


@dataclass(frozen=True)
class SpanRule:
    aggregate: str = "max"  # token entropies -> step entropy: "max" or "mean" over the step's tokens
    top_q: float | None = 0.3  # wrap about this fraction of candidate steps (threshold = the 1 - top_q quantile)
    threshold: float | None = None  # or a fixed entropy threshold in nats (then top_q must be None)
    pool_by: str | None = None  # None (each step its own entropy) or "op" (chain task: mean entropy per operation)
    wrap_last: bool = False  # may the last step (the one that carries the answer) be wrapped
    merge: bool = True  # merge adjacent wrapped steps into one block
    isolate: bool = False  # never wrap a step right after a wrapped one: one-step blocks between written values

    def __post_init__(self):
        checks = [
            (self.aggregate in AGGREGATES, f"aggregate={self.aggregate!r}: use one of {AGGREGATES}"),
            ((self.top_q is None) != (self.threshold is None),
             f"top_q={self.top_q}, threshold={self.threshold}: give exactly one of them (the other None)"),
            (self.top_q is None or 0 < self.top_q < 1, f"top_q={self.top_q} must be a fraction in (0, 1)"),
            (self.threshold is None or self.threshold >= 0, f"threshold={self.threshold} must be >= 0 nats"),
            (self.pool_by in POOLS, f"pool_by={self.pool_by!r}: use None or 'op' (the chain task's operations)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


@dataclass(frozen=True)
class SwitchConfig:
    c_thought: int = 2  # c: latent slots per replaced step (card: 2)
    k_min: int = 4  # K_min: latent steps a block takes at least (card: 4, at inference)
    k_max: int = 8  # K_max: latent steps a block takes at most (card: 8)
    latent_cap: int = 48  # latent slots per sample at most (card: 48)
    injection: str = "hs[-1]"  # what a slot's input is (the card: last-layer hidden state)
    positions: str = "continue"  # position ids: "continue" (every token and slot advances) or "block" (see below)
    max_new_tokens: int = 64  # generation budget at evaluation (latent steps included)

    def __post_init__(self):
        checks = [
            (self.c_thought >= 1, f"c_thought={self.c_thought} must be >= 1"),
            (0 <= self.k_min <= self.k_max, f"k_min={self.k_min}, k_max={self.k_max}: need 0 <= k_min <= k_max"),
            (self.k_max >= 1, f"k_max={self.k_max} must be >= 1"),
            (self.latent_cap >= self.k_max,
             f"latent_cap={self.latent_cap} < k_max={self.k_max}: a sample could not hold one full block"),
            (self.positions in POSITIONS, f"positions={self.positions!r}: use one of {POSITIONS}"),
            (self.positions != "block" or self.k_min >= 1,
             f"positions='block' with k_min={self.k_min}: a latent block must hold a slot; use k_min >= 1"),
            (self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens} must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def latent_positions(self) -> str:
        """The engine's mode for slots: "skip" (position-neutral) under "block" positions."""
        return "skip" if self.positions == "block" else "continue"

    def neutral_ids(self, ids: SwitchIds, mode: str = "latent") -> tuple[int, ...]:
        """The generated text tokens that do not advance the position counter: under
        "block" positions ``<swi>``, and ``</swi>`` too when blocks hold text (``mode="text"``,
        phase 1); a ``</swi>`` that closes slots stands for the step they replace."""
        if self.positions != "block":
            return ()
        return (ids.swi, ids.swi_end) if mode == "text" else (ids.swi,)

    def position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, latent_mask: torch.Tensor,
                     ids: SwitchIds) -> torch.Tensor:
        """Position ids ``(B, T)`` of SWITCH sequences, as generation assigns them."""
        if self.positions != "block":
            return position_ids_for(attention_mask)
        latent = latent_mask.bool()
        enter = (input_ids == ids.swi) & ~latent
        leave = (input_ids == ids.swi_end) & ~latent
        skipped = latent | enter
        open_ = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        has_slot = torch.zeros_like(open_)
        for t in range(input_ids.shape[1]):  # a </swi> is neutral when it closes a block that held no slot
            skipped[:, t] |= leave[:, t] & open_ & ~has_slot
            has_slot = (has_slot | latent[:, t]) & ~enter[:, t]
            open_ = (open_ | enter[:, t]) & ~leave[:, t]
        return position_ids_for(attention_mask, skipped, "skip")

    @property
    def max_stage(self) -> int:
        """The stage after which no block changes any more: ceil(K_max / c)."""
        return math.ceil(self.k_max / self.c_thought)


# ---------------------------------------------------------------------------- phase 1: spans


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
def gold_step_entropies(model: nn.Module, tokenizer, records: Sequence, *, separator: str = "\n",
                        aggregate: str = "max", batch_size: int = 256) -> list[list[float]]:
    """Per record, the entropy of each gold CoT step under ``model`` by teacher forcing
    (one plain forward per batch; a token's entropy is that of the distribution that
    predicts it)."""
    from latentlib.training.base import cot_segments

    model.eval()
    out: list[list[float]] = []
    dev = next(model.parameters()).device
    for s in range(0, len(records), batch_size):
        encs = [encode_record(tokenizer, r, separator) for r in records[s:s + batch_size]]
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


def teacher_step_entropies(rollouts: pd.DataFrame, records: Sequence, *, separator: str = "\n",
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
        written = [p.strip() for p in str(row.text).split("####")[0].split(separator) if p.strip()]
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


def render_switch_text(steps: Sequence[str], spans: Sequence[Span], separator: str = " ",
                       plans: Sequence[BlockPlan] | None = None) -> str:
    """The CoT as the model sees it, e.g. ``7 <swi> 9 </swi> 1`` (phase 1) or, with
    ``plans``, ``7 <swi> <latent> <latent> </swi> 1``."""
    parts, b = [], 0
    for span in spans:
        if not span.wrapped:
            parts += list(steps[span.start:span.end])
            continue
        r = plans[b].replaced if plans is not None else 0
        n = plans[b].latents if plans is not None else 0
        parts += ["<swi>", *["<latent>"] * n, *steps[span.start + r:span.end], "</swi>"]
        b += 1
    return separator.join(parts)


# ---------------------------------------------------------------------------- phase 2: curriculum


@dataclass(frozen=True)
class BlockPlan:
    replaced: int  # steps of the block replaced by slots (from its start)
    latents: int  # latent slots in their place


def parallel_schedule(block_units: Sequence[int], stage: int, *, c: int = 2, k_min: int = 4, k_max: int = 8,
                      latent_cap: int = 48) -> list[BlockPlan]:
    """Stage ``stage`` of the parallel curriculum for one sample with blocks of
    ``block_units`` steps (pure).

    In every block the first ``r = min(stage, units)`` steps go and ``min(c * r, K_max)``
    slots come; a fully replaced block gets at least ``K_min`` (capped by K_max). Blocks
    are taken left to right against ``latent_cap``: one whose slots would not fit keeps
    its text (``BlockPlan(0, 0)``). Stage 0 is phase 1's format.
    """
    if stage < 0 or c < 1 or not 0 <= k_min <= k_max or latent_cap < 0:
        raise ValueError(f"stage={stage}, c={c}, k_min={k_min}, k_max={k_max}, latent_cap={latent_cap}: "
                         "need stage >= 0, c >= 1, 0 <= k_min <= k_max, latent_cap >= 0")
    plans, used = [], 0
    for units in block_units:
        if units < 1:
            raise ValueError(f"a block of {units} steps: every block holds at least one step")
        r = min(stage, units)
        n = min(c * r, k_max)
        if r == units:
            n = min(max(n, k_min), k_max)
        if r == 0 or used + n > latent_cap:
            plans.append(BlockPlan(0, 0))
            continue
        plans.append(BlockPlan(r, n))
        used += n
    return plans


def schedule_stage(stage: int, end_stage: int, cfg: SwitchConfig) -> int:
    """The schedule's stage for curriculum stage ``stage`` of ``1 .. end_stage``: the last
    one replaces every block entirely (``cfg.max_stage``), so training ends in the
    inference format even when ``end_stage`` is short of the longest block."""
    return cfg.max_stage if stage >= end_stage else stage


def switch_segments(enc: Encoded, spans: Sequence[Span], ids: SwitchIds,
                    plans: Sequence[BlockPlan] | None = None) -> list[Segment]:
    """One training example: the question (prompt), then the steps with their blocks, the
    answer. Targets include ``<swi>`` and ``</swi>`` (the model learns to switch); slots
    are ``latent`` segments (no loss). ``plans=None``: phase 1 (text inside blocks)."""
    segs: list[Segment] = [("prompt", enc.question)]
    b = 0
    for span in spans:
        tokens = tuple(t for s in enc.steps[span.start:span.end] for t in s)
        if not span.wrapped:
            segs.append(("target", tokens))
            continue
        plan = plans[b] if plans is not None else BlockPlan(0, 0)
        b += 1
        kept = tuple(t for s in enc.steps[span.start + plan.replaced:span.end] for t in s)
        segs.append(("target", (ids.swi,)))
        if plan.latents:
            segs.append(("latent", (ids.latent,) * plan.latents))
        segs.append(("target", kept + (ids.swi_end,)))
    segs.append(("target", enc.answer))
    return segs


def mark_stay_decisions(batch: dict, k_min: int) -> dict:
    """Adds ``stay_mask`` ``(B, T)``: the slots whose output decides, at inference, that
    the block goes on.

    The policy reads the token sampled after latent step ``i`` only when ``i >= K_min``
    (``</swi>`` ends the block); the last slot is trained to predict ``</swi>``. Without a
    signal at slots ``K_min <= i < n``, a block of several steps learns nothing against
    leaving at K_min, so :func:`switch_loss` adds ``-log(1 - p(</swi>))`` there (an
    unlikelihood term: it only pushes ``</swi>`` down, it does not pull the thought
    towards some token). ``K_min = 0``: ``<swi>``'s own output is a decision too.
    In place; returns ``batch``."""
    latent = batch["latent_mask"]
    run = torch.zeros(latent.shape[0], dtype=torch.long)
    stay = torch.zeros_like(latent)
    for t in range(latent.shape[1] - 1):
        run = torch.where(latent[:, t], run + 1, torch.zeros_like(run))  # slot index of column t (0: not a slot)
        # column t decides "stay" when the next column is another slot of the same block
        opens = (run == 0) & latent[:, t + 1] & (k_min == 0)  # <swi> itself, when blocks may be empty
        stay[:, t] = latent[:, t + 1] & (((run >= k_min) & (run >= 1)) | opens)
    batch["stay_mask"] = stay
    return batch


def phase2_examples(encoded: Sequence[Encoded], spans: Sequence[Sequence[Span]], stage: int, cfg: SwitchConfig,
                    ids: SwitchIds) -> list[list[Segment]]:
    """Every training problem at curriculum ``stage``."""
    out = []
    for enc, sp in zip(encoded, spans):
        units = [s.units for s in sp if s.wrapped]
        plans = parallel_schedule(units, stage, c=cfg.c_thought, k_min=cfg.k_min, k_max=cfg.k_max,
                                  latent_cap=cfg.latent_cap)
        out.append(switch_segments(enc, sp, ids, plans))
    return out


# ---------------------------------------------------------------------------- training


def switch_loss(cfg: SwitchConfig, ids: SwitchIds, injector=None) -> Callable:
    """``loss_fn(model, batch)``: the engine's forward (thoughts injected at slots, SWITCH
    position ids) and next-token cross-entropy on the targets."""

    def loss_fn(model, batch):
        pos = cfg.position_ids(batch["input_ids"], batch["attention_mask"], batch["latent_mask"], ids)
        out = latent_forward(model, batch["input_ids"], batch["attention_mask"], batch["latent_mask"],
                             injector=injector, position_ids=pos)
        ce = token_loss(out.logits, batch["labels"])
        stay = batch.get("stay_mask")
        if stay is None or not stay.any():
            return ce, {}
        p_exit = torch.softmax(out.logits[stay].float(), -1)[:, ids.swi_end]  # (n,)
        unlikely = -torch.log1p(-p_exit.clamp(max=1 - 1e-6)).mean()
        return ce + unlikely, {"ce": ce.item(), "stay": unlikely.item()}

    return loss_fn


def make_trainable(model: nn.Module, tokenizer, preset) -> nn.Module:
    """Real presets (``preset.use_lora``): LoRA on the preset's targets (the card: r=32,
    alpha=64 on q/k/v/o/gate/up/down) plus the whole embedding and LM head
    (``modules_to_save``, the card's "resized embeddings + LM head"). Tiny: all weights."""
    if not preset.use_lora:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    from latentlib.tokens import trainable_token_config

    switch_ids(tokenizer)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    cfg = LoraConfig(r=preset.lora_r, lora_alpha=preset.lora_alpha, target_modules=list(preset.lora_targets),
                     lora_dropout=0.0, task_type="CAUSAL_LM", ensure_weight_tying=tied,  # a tied head stays tied
                     **trainable_token_config(tokenizer, SWITCH_TOKENS, whole_matrices=True))
    return get_peft_model(model, cfg)


def train_phase1(model: nn.Module, tokenizer, records: Sequence, spans: Sequence[Sequence[Span]],
                 train_cfg: TrainConfig, cfg: SwitchConfig = SwitchConfig(), *, separator: str = "\n",
                 checkpoint_dir=None, progress: bool = True, on_log=None) -> TrainResult:
    """SFT on the CoT with ``<swi>``/``</swi>`` around the wrapped spans (text inside)."""
    ids = switch_ids(tokenizer)
    examples = [switch_segments(encode_record(tokenizer, r, separator), sp, ids) for r, sp in zip(records, spans)]
    return train(model, examples, lambda b: collate(b, tokenizer.pad_token_id), switch_loss(cfg, ids), train_cfg,
                 checkpoint_dir=checkpoint_dir, desc="switch phase 1", progress=progress, on_log=on_log)


def train_phase2(model: nn.Module, tokenizer, records: Sequence, spans: Sequence[Sequence[Span]],
                 cfg: SwitchConfig, curriculum, *, separator: str = "\n", injector=None, checkpoint_dir=None,
                 after_stage=None, progress: bool = True):
    """The parallel curriculum: stage ``s`` from ``curriculum.start_stage`` to
    ``curriculum.end_stage``, the last one fully latent (:func:`schedule_stage`; a
    :class:`~latentlib.training.curriculum.CurriculumConfig`;
    its stage lengths, optimizer and reset settings apply, its Coconut-only fields
    ``c_thought``/``max_latent_stage``/``uniform_prob`` do not: SWITCH's c is
    ``cfg.c_thought``). Returns the per-stage results."""
    from latentlib.injection import make_injector
    from latentlib.training.curriculum import train_curriculum

    ids = switch_ids(tokenizer)
    injector = injector if injector is not None else make_injector(cfg.injection, model)
    end = curriculum.end_stage
    if end > cfg.max_stage:
        raise ValueError(f"end_stage={end} is beyond the schedule: with c={cfg.c_thought} and K_max={cfg.k_max} "
                         f"stage {cfg.max_stage} already replaces every block entirely and later stages would "
                         f"train the same format again; use at most {cfg.max_stage} stages (or raise K_max)")
    encoded = [encode_record(tokenizer, r, separator) for r in records]
    pad = tokenizer.pad_token_id
    return train_curriculum(model, lambda s: phase2_examples(encoded, spans, schedule_stage(s, end, cfg), cfg, ids),
                            lambda b: mark_stay_decisions(collate(b, pad, align="first_latent"), cfg.k_min),
                            switch_loss(cfg, ids, injector), curriculum,
                            checkpoint_dir=checkpoint_dir, after_stage=after_stage, desc="switch phase 2",
                            progress=progress)


# ---------------------------------------------------------------------------- inference and evaluation


def switch_policy(tokenizer, cfg: SwitchConfig) -> SwitchPolicy:
    ids = switch_ids(tokenizer)
    return SwitchPolicy(enter_id=ids.swi, exit_id=ids.swi_end, k_min=cfg.k_min, k_max=cfg.k_max)


class RecordingPolicy:
    """Wraps a policy and keeps what it decided per step (``latent``, ``token``), so that
    an evaluation can count blocks and their lengths afterwards."""

    def __init__(self, inner):
        self.inner = inner
        self.latent: list[torch.Tensor] = []
        self.tokens: list[torch.Tensor] = []

    def start(self, batch_size, device):
        return self.inner.start(batch_size, device)

    def step(self, state, sampled):
        latent, token = self.inner.step(state, sampled)
        self.latent.append(latent.clone())
        self.tokens.append(token.clone())
        return latent, token


def latent_blocks(latent: Sequence[bool], tokens: Sequence[int], enter_id: int, eos_id: int) -> list[int]:
    """Latent steps of each *closed* block of one sequence, up to its eos (pure): a block
    opens at an ``enter_id`` text token, holds the latent steps that follow it and closes
    at the next text token. A block still open when the sequence stops (cut by the
    generation budget) is left out; a block with no step counts as 0."""
    blocks: list[int] = []
    count = None  # latent steps of the open block, None outside blocks
    for lat, tok in zip(latent, tokens):
        lat, tok = bool(lat), int(tok)
        if lat:
            if count is not None:
                count += 1
            continue
        if count is not None:
            blocks.append(count)
        count = 0 if tok == enter_id else None
        if tok == eos_id:
            break
    return blocks


def switch_eval_spec(tokenizer, cfg: SwitchConfig, *, mode: str = "latent", name: str | None = None,
                     injector=None) -> EvalSpec:
    """How a SWITCH model runs at evaluation: ``mode="latent"`` is SWITCH inference
    (:class:`SwitchPolicy`, K_min/K_max from ``cfg``), ``mode="text"`` plain decoding."""
    if mode not in ("latent", "text"):
        raise ValueError(f"mode={mode!r}: use 'latent' (SWITCH inference) or 'text' (plain decoding)")
    ids = switch_ids(tokenizer)

    def policy(chunk):
        return switch_policy(tokenizer, cfg) if mode == "latent" else TextPolicy()

    return EvalSpec(name or f"switch ({mode})", policy=policy, injector=injector,
                    latent_positions=cfg.latent_positions, max_new_tokens=cfg.max_new_tokens,
                    neutral_token_ids=cfg.neutral_ids(ids, mode))


def evaluate_switch(model, tokenizer, records: Sequence, cfg: SwitchConfig, *, mode: str = "latent",
                    name: str | None = None, injector=None, separator: str = "\n", batch_size: int = 250,
                    progress: bool = False) -> pd.DataFrame:
    """Greedy evaluation (:func:`latentlib.evaluate.evaluate`) with per-problem block counts.

    ``mode="latent"``: SWITCH inference (:class:`SwitchPolicy`). ``mode="text"``: plain
    decoding (phase 1, whose blocks hold text; ``latent_steps`` is then 0 and
    ``block_steps`` empty). Adds ``blocks`` (``<swi>`` emitted), ``block_steps`` (latent
    steps per block) and ``kmin_violations`` (blocks shorter than K_min).
    """
    ids = switch_ids(tokenizer)
    recorders: list[RecordingPolicy] = []
    spec = switch_eval_spec(tokenizer, cfg, mode=mode, name=name, injector=injector)
    inner = spec.policy

    def policy(chunk):
        recorders.append(RecordingPolicy(inner(chunk)))
        return recorders[-1]

    spec.policy = policy
    df = evaluate(model, tokenizer, records, spec, batch_size=batch_size, progress=progress,
                  encode=lambda r: encode_record(tokenizer, r, separator))
    blocks = []
    for rec in recorders:
        lat, tok = torch.stack(rec.latent, 1), torch.stack(rec.tokens, 1)  # (B, S)
        blocks += [latent_blocks(lat[b], tok[b], ids.swi, ids.eos) for b in range(lat.shape[0])]
    df["blocks"] = [len(b) for b in blocks]
    df["block_steps"] = blocks if mode == "latent" else [[] for _ in blocks]
    df["kmin_violations"] = [sum(n < cfg.k_min for n in b) if mode == "latent" else 0 for b in blocks]
    return df


def summarize_switch(df: pd.DataFrame) -> pd.DataFrame:
    """:func:`~latentlib.evaluate.summarize` plus the fraction of problems with a block
    (``<swi>`` emitted at least once), mean blocks and K_min violations."""
    table = summarize(df)
    g = df.groupby("method", sort=False)
    extra = pd.DataFrame({"with_block": g["blocks"].apply(lambda x: (x > 0).mean()).round(4),
                          "blocks": g["blocks"].mean().round(2),
                          "kmin_violations": g["kmin_violations"].sum()}).reset_index()
    return table.merge(extra, on="method", how="left")


# ---------------------------------------------------------------------------- saving and loading


def save_switch_model(model, tokenizer, directory, meta: dict) -> None:
    """Atomically saves a stage's model: a LoRA model in the published adapter layout
    (``adapter_config.json``, ``adapter_model.safetensors`` and the tokenizer with the
    three tokens), a fully trained one (tiny) as a whole model."""
    from peft import PeftModel

    with artifacts.atomic_dir(Path(directory)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        artifacts.write_complete(tmp, {"adapter": isinstance(model, PeftModel), **meta})


class AdapterMismatchError(ValueError):
    """A LoRA adapter whose shapes do not fit the base model it is loaded onto."""


def load_switch_adapter(base_model_or_preset, adapter_dir, *, is_trainable: bool = False):
    """``(model, tokenizer)`` from the card's layout: the tokenizer from the adapter
    directory (it holds ``<swi>``, ``</swi>``, ``<latent>``), the base model's embeddings
    resized to it, then ``PeftModel.from_pretrained``.

    ``base_model_or_preset``: a loaded model, a preset name (real presets, offline-safe
    through :func:`latentlib.presets.load_model`) or a local directory of a saved model.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} has no adapter_config.json: point at the directory that "
                                "PeftModel.save_pretrained wrote (with the tokenizer saved beside it)")
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    switch_ids(tokenizer)
    tokenizer.padding_side = "left"
    if isinstance(base_model_or_preset, nn.Module):
        base = base_model_or_preset
    elif Path(str(base_model_or_preset)).is_dir():
        base = AutoModelForCausalLM.from_pretrained(base_model_or_preset, use_safetensors=True)
    else:
        from latentlib.presets import get_preset, load_model

        preset = get_preset(str(base_model_or_preset))
        if preset.source == "scratch":
            raise ValueError(f"preset {preset.name!r} has no pretrained base: pass the base model or its directory")
        base, _ = load_model(preset.name)
    if base.get_input_embeddings().weight.shape[0] != len(tokenizer):
        base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    try:
        model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=is_trainable)
    except RuntimeError as e:
        if "size mismatch" not in str(e):
            raise
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e)[:300])
        raise AdapterMismatchError(
            f"the adapter in {adapter_dir} does not fit this base model ({first}): it was trained on another "
            f"model (width {base.config.hidden_size} here); load it onto the base named in adapter_config.json"
        ) from None
    if not is_trainable:
        model.eval()
    return model, tokenizer


def load_switch_model(directory, preset=None, *, is_trainable: bool = False):
    """Loads what :func:`save_switch_model` wrote: an adapter onto the preset's base model,
    or a whole model."""
    from latentlib.training.base import load_model_dir

    directory = Path(directory)
    if not artifacts.is_complete(directory):
        raise artifacts.MissingArtifactError(f"{directory} is not a complete saved SWITCH model")
    if (directory / "adapter_config.json").is_file():
        if preset is None:
            raise ValueError(f"{directory} holds a LoRA adapter: pass the preset (or base model) it was trained on")
        return load_switch_adapter(preset, directory, is_trainable=is_trainable)
    model, tokenizer = load_model_dir(directory)
    if is_trainable:
        model.train()
    return model, tokenizer


def load_switch_config(directory) -> SwitchConfig:
    """The :class:`SwitchConfig` a saved phase was trained with."""
    return SwitchConfig(**artifacts.load_json(Path(directory) / artifacts.COMPLETE)["switch_config"])
