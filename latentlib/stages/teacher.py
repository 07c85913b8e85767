"""Stage ``teacher`` (notebook 00): G sampled CoT rollouts per training problem from the
base model, graded, with token entropies and the hidden states a latent student is taught
from (:mod:`latentlib.teacher`), under ``runs/<run>/teacher/teacher``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import pandas as pd

from latentlib import artifacts
from latentlib.presets import get_preset
from latentlib.stages.base import base_identity, load_base, task_of
from latentlib.stages.reuse import build_or_reuse
from latentlib.tasks import TaskConfig
from latentlib.teacher import (TeacherConfig, TeacherSummary, extract_teacher, measure_throughput, parse_layers,
                               read_summary)

__all__ = ["TeacherStageConfig", "teacher", "teacher_throughput"]


@dataclass(frozen=True)
class TeacherStageConfig:
    model: str = "tiny"  # preset
    task: TaskConfig = TaskConfig()  # the task; the teacher covers its first `problems` training records
    problems: int = 2000  # training problems given G rollouts each
    layers: str = "all"  # layers whose states are kept: "all", "last" or indices such as "0,-1"
    teacher: TeacherConfig = TeacherConfig()  # sampling, K, storage (its capture_layers come from `layers`)

    def __post_init__(self):
        if self.problems < 1:
            raise ValueError(f"problems={self.problems}: give the teacher at least one training problem")

    @classmethod
    def from_params(cls, p: Mapping) -> TeacherStageConfig:
        """Notebook 00's ``teacher_*`` parameters and ``seed``."""
        cfg = TeacherConfig(num_generations=int(p["teacher_rollouts"]), temperature=float(p["teacher_temperature"]),
                            max_completion_length=int(p["teacher_max_tokens"]), num_steps=int(p["teacher_steps"]),
                            shard_size=int(p["teacher_shard_size"]), generation_batch_size=int(p["teacher_batch_size"]),
                            seed=int(p["seed"]))
        return cls(model=p["model"], task=TaskConfig.from_params(p, get_preset(p["model"]).task),
                   problems=int(p["teacher_problems"]), layers=str(p["teacher_layers"]), teacher=cfg)


def teacher(run: str, cfg: TeacherStageConfig, *, name: str = "teacher", progress: bool = True) -> TeacherSummary:
    """Extracts (or reuses) the teacher of the first ``cfg.problems`` training records."""
    preset, task = task_of(cfg.model, cfg.task)
    records = task.splits.train[:cfg.problems]
    if len(records) < cfg.problems:
        raise ValueError(f"problems={cfg.problems} but the task has {len(records)} training records: lower "
                         "teacher_problems or raise n_train")
    out = artifacts.artifact_dir(run, "teacher", name)

    def build(record, checkpoint):
        model, tokenizer = load_base(run, preset)
        layers = tuple(parse_layers(cfg.layers, model.config.num_hidden_layers))
        return extract_teacher(model, tokenizer, records, replace(cfg.teacher, capture_layers=layers), task.format,
                               directory=out, key=record["key"], meta={**record, "seed": cfg.teacher.seed},
                               progress=progress)

    built = build_or_reuse(out, cfg, {"base": base_identity(run, preset), "records": task.digest}, build=build,
                           load=lambda d, meta: read_summary(d), label=f"teacher/{name}")
    summary = built.value
    summary.reused = built.reused
    return summary


def teacher_throughput(run: str, cfg: TeacherStageConfig, problems: int) -> pd.DataFrame:
    """The same rollouts of the first ``problems`` training problems generated one at a time
    and in one batched call (``cfg.teacher.generation_batch_size``): rollouts per second of
    the extraction's work, no disk. The seeds are per rollout, so both give the same samples."""
    preset, task = task_of(cfg.model, cfg.task)
    model, tokenizer = load_base(run, preset)
    layers = tuple(parse_layers(cfg.layers, model.config.num_hidden_layers))
    return measure_throughput(model, tokenizer, task.splits.train[:problems], replace(cfg.teacher, capture_layers=layers),
                              task.format, batch_sizes=(1, cfg.teacher.generation_batch_size))
