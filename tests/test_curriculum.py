"""The curriculum's schedule and Coconut's stage plan (pure functions, table-tested), and the stage loop."""

import random

import pytest
import torch
from torch import nn

from latentlib.methods.coconut import CoconutConfig, StagePlan, sample_stage, stage_plan, without_curriculum
from latentlib.training import curriculum as cur
from latentlib.training.curriculum import CurriculumConfig, stage_schedule, train_curriculum
from latentlib.training.loop import TrainConfig

# (stage, n_steps, c, max_latent_stage, pad_latent_to_max) -> (steps removed, thoughts)
PLAN_TABLE = [
    ((0, 6, 1, 6, True), (0, 0)),  # stage 0: the CoT format
    ((1, 6, 1, 6, True), (1, 1)),
    ((3, 6, 1, 6, True), (3, 3)),
    ((6, 6, 1, 6, True), (6, 6)),  # the last latent stage removes every step
    ((3, 6, 2, 6, True), (3, 6)),  # c = 2: two thoughts per removed step
    ((2, 3, 2, 3, True), (2, 4)),
    ((4, 6, 2, 3, True), (6, 6)),  # beyond max_latent_stage: all steps go, max*c thoughts
    ((9, 6, 2, 3, True), (6, 6)),  # any later stage is the same
    ((4, 2, 1, 3, True), (2, 3)),  # a short problem padded to max thoughts
    ((4, 2, 1, 3, False), (2, 2)),  # ... or not: min(n_steps, max) * c
    ((4, 5, 2, 3, False), (5, 6)),  # not padded, but the problem has more steps than max
    ((3, 2, 1, 6, True), (2, 3)),  # within max, more stages than steps: k*c thoughts (as the reference)
    ((0, 0, 1, 6, True), (0, 0)),  # a problem without steps
]


@pytest.mark.parametrize("args,expected", PLAN_TABLE)
def test_stage_plan_table(args, expected):
    stage, n, c, mx, pad = args
    assert stage_plan(stage, n, c_thought=c, max_latent_stage=mx, pad_latent_to_max=pad) == StagePlan(*expected)


def test_stage_plan_rejects_negative_stage():
    with pytest.raises(ValueError, match="stage=-1"):
        stage_plan(-1, 6)


@pytest.mark.parametrize("cfg,expected", [
    (CurriculumConfig(steps_per_stage=5), [(k, 5) for k in range(1, 7)]),
    (CurriculumConfig(steps_per_stage=5, final_stage_steps=9, start_stage=0, end_stage=3),
     [(0, 5), (1, 5), (2, 5), (3, 9)]),
    (CurriculumConfig(steps_per_stage=5, end_stage=4), [(1, 5), (2, 5), (3, 5), (4, 5)]),
    # without curriculum: the whole budget at the last stage
    (without_curriculum(CoconutConfig(), CurriculumConfig(steps_per_stage=5))[1], [(6, 30)]),
    (without_curriculum(CoconutConfig(), CurriculumConfig(steps_per_stage=5), 12)[1], [(6, 12)]),
])
def test_stage_schedule_table(cfg, expected):
    assert stage_schedule(cfg) == expected


@pytest.mark.parametrize("config,bad,match", [
    (CoconutConfig, {"c_thought": 0}, "c_thought=0"),
    (CoconutConfig, {"max_latent_stage": 0}, "max_latent_stage=0"),
    (CurriculumConfig, {"start_stage": 4, "end_stage": 2}, "start_stage=4"),
    (CoconutConfig, {"uniform_prob": 1.5}, "uniform_prob=1.5"),
    (CurriculumConfig, {"steps_per_stage": -1}, "steps_per_stage=-1"),
])
def test_config_errors_name_the_value(config, bad, match):
    with pytest.raises(ValueError, match=match):
        config(**bad)


def test_without_curriculum_has_no_earlier_stage():
    cfg, cur_ = without_curriculum(CoconutConfig(uniform_prob=0.3), CurriculumConfig(steps_per_stage=5))
    assert cfg.uniform_prob == 0.0 and cur_.start_stage == cur_.end_stage == 6


def test_sample_stage_mixes_in_every_stage_at_uniform_prob():
    rng = random.Random(0)
    assert {sample_stage(4, 6, 0.0, rng) for _ in range(200)} == {4}
    assert {sample_stage(4, 6, 1.0, rng) for _ in range(500)} == set(range(7))
    mixed = [sample_stage(4, 6, 0.3, rng) for _ in range(2000)]
    share = sum(s != 4 for s in mixed) / len(mixed)
    assert 0.2 < share < 0.3  # 0.3 * 6/7 of the draws land on another stage


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)


def _toy_run(monkeypatch, reset):
    seen = []
    real_train = cur.train

    def spy(*args, optimizer=None, **kw):
        seen.append(optimizer)
        return real_train(*args, optimizer=optimizer, **kw)

    monkeypatch.setattr(cur, "train", spy)
    model = _Toy()
    data = [torch.randn(3) for _ in range(8)]
    stages_seen = []

    def build(stage):
        stages_seen.append(stage)
        return data

    cfg = CurriculumConfig(steps_per_stage=2, end_stage=3, reset_optimizer=reset,
                           train=TrainConfig(steps=0, batch_size=4, lr=1e-2, warmup_steps=0))
    res = train_curriculum(model, build, lambda b: {"x": torch.stack(b)},
                           lambda m, b: (m.lin(b["x"]).pow(2).mean(), {}), cfg,
                           after_stage=lambda k: {"stage_seen": k}, progress=False)
    return seen, stages_seen, res


def test_optimizer_reset_per_stage_or_carried(monkeypatch):
    seen, stages, res = _toy_run(monkeypatch, reset=True)
    assert seen == [None, None, None]  # a fresh AdamW in every stage
    assert stages == [1, 2, 3] and [r.metrics["stage_seen"] for r in res] == [1, 2, 3]
    seen, _, res = _toy_run(monkeypatch, reset=False)
    # one AdamW whose moments carry over: the first stage's loop makes it (after any sharding), the next ones continue it
    assert seen[0] is None and seen[1] is res[0].result.optimizer and all(o is seen[1] for o in seen[1:])
    assert seen[1].state[next(iter(seen[1].state))]["step"] == 6  # 3 stages x 2 steps
