"""A multi-stage curriculum: which stages run, for how many optimizer steps, with a fresh
or a continued optimizer, each through the one training loop.

Nothing here knows what a stage does to an example: the method turns a stage number into
training examples (Coconut: the first k steps replaced by k*c thoughts,
:mod:`latentlib.methods.coconut`; SWITCH: every block's first s steps replaced by slots,
:mod:`latentlib.methods.switch`). This module decides the stages and runs them.

Where this departs from the Coconut reference implementation (which the stage numbers
follow): stage lengths are optimizer steps, not epochs (a tiny task's stage takes a
fraction of an epoch), ``final_stage_steps`` lets the last stage run longer, and each
stage has its own warmup and decay (``TrainConfig.schedule``; the reference uses a
constant learning rate). The optimizer is reset at each stage by default, as in the
paper; with ``reset_optimizer=False`` AdamW's moments carry over.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from torch import nn

from latentlib.training.loop import TrainConfig, TrainResult, train

__all__ = ["CurriculumConfig", "stage_schedule", "StageResult", "train_curriculum"]


@dataclass(frozen=True)
class CurriculumConfig:
    start_stage: int = 1  # first stage trained (0 is usually the format the base model already has)
    end_stage: int = 6  # last stage trained; start_stage == end_stage trains the last stage alone
    steps_per_stage: int = 200  # optimizer steps of each stage before the last
    final_stage_steps: int | None = None  # optimizer steps of the last stage (None: steps_per_stage)
    reset_optimizer: bool = True  # fresh AdamW moments at every stage (the Coconut paper's setting)
    # the optimisation of each stage (its steps and seed are set per stage)
    train: TrainConfig = TrainConfig(steps=0, batch_size=128, lr=1e-3, warmup_steps=20)

    def __post_init__(self):
        checks = [
            (0 <= self.start_stage <= self.end_stage,
             f"start_stage={self.start_stage}, end_stage={self.end_stage}: need 0 <= start_stage <= end_stage"),
            (self.steps_per_stage >= 0, f"steps_per_stage={self.steps_per_stage} must be >= 0"),
            (self.final_stage_steps is None or self.final_stage_steps >= 0,
             f"final_stage_steps={self.final_stage_steps} must be >= 0 or None (same as steps_per_stage)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def last_stage(self) -> int:
        """The stage a fully trained model is evaluated at."""
        return self.end_stage

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole curriculum."""
        return sum(s for _, s in stage_schedule(self))


def stage_schedule(cfg: CurriculumConfig) -> list[tuple[int, int]]:
    """``[(stage, optimizer steps), ...]`` in training order."""
    stages = list(range(cfg.start_stage, cfg.end_stage + 1))
    final = cfg.steps_per_stage if cfg.final_stage_steps is None else cfg.final_stage_steps
    return [(k, final if k == cfg.end_stage else cfg.steps_per_stage) for k in stages]


@dataclass
class StageResult:
    stage: int  # the stage trained
    result: TrainResult  # its loop's history and time
    metrics: dict = field(default_factory=dict)  # what `after_stage` returned (e.g. test accuracy)


def train_curriculum(model: nn.Module, build_examples: Callable[[int], Sequence], make_batch: Callable,
                     loss_fn: Callable, cfg: CurriculumConfig, *, extra_modules: dict[str, nn.Module] | None = None,
                     checkpoint_dir: Path | None = None, after_stage: Callable[[int], dict] | None = None,
                     desc: str = "curriculum", progress: bool = True) -> list[StageResult]:
    """Trains stage after stage with :func:`latentlib.training.loop.train`.

    ``build_examples(stage) -> examples`` (the method's segments for that stage);
    ``after_stage(stage) -> metrics`` runs after each stage (evaluation, saving). Each
    stage checkpoints under ``checkpoint_dir/stage<k>`` and resumes from there.
    """
    results: list[StageResult] = []
    optimizer = None  # without reset: the first stage's AdamW, continued (made by the loop, after any sharding)
    for stage, steps in stage_schedule(cfg):
        tcfg = replace(cfg.train, steps=steps, seed=cfg.train.seed + stage,
                       warmup_steps=min(cfg.train.warmup_steps, steps // 2))
        ckpt = Path(checkpoint_dir) / f"stage{stage}" if checkpoint_dir is not None else None
        res = train(model, build_examples(stage), make_batch, loss_fn, tcfg, checkpoint_dir=ckpt,
                    extra_modules=extra_modules, desc=f"{desc} stage {stage}", progress=progress,
                    optimizer=optimizer)
        if not cfg.reset_optimizer:
            optimizer = res.optimizer
        metrics = after_stage(stage) if after_stage is not None else {}
        results.append(StageResult(stage, res, metrics or {}))
    return results
