"""What a Coconut stage does to a problem: which steps go, how many thoughts come, the
training segments that result, and the scripted start of generation at evaluation."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from latentlib.batching import Encoded, Segment, encode_record
from latentlib.evaluate import EvalSpec
from latentlib.injection import Injector
from latentlib.methods.coconut.config import CoconutConfig
from latentlib.policies import FREE, LATENT, ScriptedPolicy
from latentlib.tasks import Format
from latentlib.tokens import TokenIds, token_ids

__all__ = ["StagePlan", "stage_plan", "sample_stage", "smoothed_stage", "plan_for", "coconut_segments", "stage_examples",
           "thought_script", "eval_spec"]


@dataclass(frozen=True)
class StagePlan:
    removed: int  # reasoning steps removed from the front
    thoughts: int  # thought slots that replace them


def stage_plan(stage: int, n_steps: int, *, c_thought: int = 1, max_latent_stage: int = 6,
               pad_latent_to_max: bool = True) -> StagePlan:
    """How stage ``stage`` rewrites a problem of ``n_steps`` reasoning steps (pure).

    ``stage <= max_latent_stage``: the first ``min(stage, n_steps)`` steps go, ``stage * c``
    thoughts come. Beyond: every step goes, ``max_latent_stage * c`` thoughts come
    (``pad_latent_to_max``) or ``min(n_steps, max_latent_stage) * c``.
    """
    if stage < 0 or n_steps < 0:
        raise ValueError(f"stage={stage} and n_steps={n_steps} must be >= 0")
    if stage <= max_latent_stage:
        return StagePlan(min(stage, n_steps), stage * c_thought)
    n = max_latent_stage if pad_latent_to_max else min(n_steps, max_latent_stage)
    return StagePlan(n_steps, n * c_thought)


def sample_stage(scheduled: int, n_steps: int, uniform_prob: float, rng: random.Random) -> int:
    """The scheduled stage, or with probability ``uniform_prob`` one drawn from ``0..n_steps``."""
    if uniform_prob > 0 and rng.random() < uniform_prob:
        return rng.randint(0, n_steps)
    return scheduled


def smoothed_stage(stage: int, n_steps: int, lam: float, rng: random.Random) -> int:
    """iCoT's removal smoothing (Deng et al. 2024): ``stage + s`` with ``P(s) ~ exp(-lam s)``
    for ``s >= 0``, at most ``n_steps`` (so the model sees, now and then, the removals of
    the stages to come)."""
    if lam <= 0:
        return stage
    s = 0
    while s < n_steps and rng.random() < math.exp(-lam):  # geometric: P(s) = (1 - q) q^s with q = exp(-lam)
        s += 1
    return min(stage + s, max(stage, n_steps))


def plan_for(stage: int, n_steps: int, cfg: CoconutConfig) -> StagePlan:
    """The curriculum's plan for one problem; ``icot`` and ``cot`` have no latent slot (``cot``
    writes the removed steps where the thoughts would be)."""
    plan = stage_plan(stage, n_steps, c_thought=cfg.c_thought, max_latent_stage=cfg.max_latent_stage,
                      pad_latent_to_max=cfg.pad_latent_to_max)
    return StagePlan(plan.removed, 0) if cfg.method in ("icot", "cot") else plan


def _slots(n: int, cfg: CoconutConfig, ids: TokenIds, written: tuple[int, ...] = ()) -> list[Segment]:
    if cfg.method == "cot":
        return [("target", written)] if written else []  # the removed steps, written where thoughts would be
    if n == 0:
        return []
    if cfg.method == "pause":
        return [("prompt", (ids.pause,) * n)]  # forced at inference: no loss, nothing injected
    return [("latent", (ids.latent,) * n)]


def coconut_segments(enc: Encoded, plan: StagePlan, cfg: CoconutConfig, ids: TokenIds) -> list[Segment]:
    """One training example: question, (markers around) the thought slots, the steps left, the answer."""
    segs: list[Segment] = [("prompt", enc.question)]
    slots = _slots(plan.thoughts, cfg, ids, tuple(t for s in enc.steps[:plan.removed] for t in s))
    if cfg.format == "markers":
        # The markers are forced at inference, so they are fed but never predicted.
        segs += [("prompt", (ids.bot,)), *slots, ("prompt", (ids.eot,))]
    else:
        segs += slots
    rest = tuple(t for s in enc.steps[plan.removed:] for t in s)
    if rest:
        segs.append(("target", rest))
    segs.append(("target", enc.answer))
    return segs


def stage_examples(encoded: Sequence[Encoded], stage: int, cfg: CoconutConfig, ids: TokenIds,
                   seed: int = 0) -> list[list[Segment]]:
    """Every training problem at ``stage`` (or, with ``uniform_prob``, at a random stage)."""
    rng = random.Random(seed * 1_000_003 + stage)
    out = []
    for enc in encoded:
        k = sample_stage(stage, len(enc.steps), cfg.uniform_prob, rng)
        k = smoothed_stage(k, len(enc.steps), cfg.removal_smoothing, rng)
        out.append(coconut_segments(enc, plan_for(k, len(enc.steps), cfg), cfg, ids))
    return out


def thought_script(n_thoughts: int, cfg: CoconutConfig, ids: TokenIds, *, written: int = 0) -> list[int]:
    """The scripted start of generation: ``[<bot>] + slots + [<eot>]`` (markers) or the slots
    (plain). ``method="cot"`` writes its ``written`` tokens freely in the slots."""
    if cfg.method == "coconut":
        slots = [LATENT] * n_thoughts
    elif cfg.method == "pause":
        slots = [ids.pause] * n_thoughts
    elif cfg.method == "cot":
        slots = [FREE] * written
    else:
        slots = []
    return [ids.bot, *slots, ids.eot] if cfg.format == "markers" else slots


def eval_spec(stage: int, cfg: CoconutConfig, tokenizer, fmt: Format, *, injector: Injector | None = None,
              name: str | None = None) -> EvalSpec:
    """How to evaluate a model trained to ``stage``: the scripted thoughts per problem, then free text."""
    ids = token_ids(tokenizer)

    def script(record):
        plan = plan_for(stage, len(record.steps), cfg)
        written = 0
        if cfg.method == "cot":
            written = sum(map(len, encode_record(tokenizer, record, fmt).steps[:plan.removed]))
        return thought_script(plan.thoughts, cfg, ids, written=written)

    def policy(records):
        return ScriptedPolicy([script(r) for r in records])

    longest = len(thought_script(plan_for(stage, 10**6, cfg).thoughts, cfg, ids))
    return EvalSpec(name or f"{cfg.method} stage {stage}", policy=policy, injector=injector,
                    latent_positions=cfg.latent_positions, max_new_tokens=longest + cfg.max_new_tokens)
