"""SWITCH phase 2: the parallel curriculum that replaces the text inside every block by
``<latent>`` slots, and the training examples of each stage."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from latentlib.batching import Encoded, Segment
from latentlib.methods.switch.config import SwitchConfig, SwitchIds
from latentlib.methods.switch.spans import Span

__all__ = ["BlockPlan", "parallel_schedule", "schedule_stage", "switch_segments", "mark_stay_decisions",
           "phase2_examples", "render_switch_text"]


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


def render_switch_text(steps: Sequence[str], spans: Sequence[Span], separator: str,
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
