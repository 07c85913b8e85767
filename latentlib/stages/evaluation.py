"""Stage ``evaluate`` (notebook 04): every method side by side.

Collects the per-problem evaluations the earlier stages recorded (``runs/<run>/eval/``: all
made by :func:`latentlib.evaluate.evaluate` on the same test split and graded the same
way), adds the inference-time methods evaluated on the run's CoT model (random prefix
perturbation and a steering vector) and, with ``light_training``, the light-weight
trained methods (:mod:`latentlib.stages.light`), and makes the one table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import pandas as pd

from latentlib import artifacts
from latentlib.batching import encode_record
from latentlib.evaluate import EvalSpec, collect_evaluations, summarize
from latentlib.methods.light import (PrefixConfig, contrast_directions, evaluate_random_prefix, first_step_even_rate,
                                     first_step_parity_pairs, steering_sweep)
from latentlib.presets import get_preset
from latentlib.stages.base import load_base, task_of
from latentlib.stages.light import LightConfig, light_methods_table
from latentlib.tasks import TaskConfig

__all__ = ["EvaluationConfig", "Evaluation", "evaluation", "BASE_LABELS"]

BASE_LABELS = {"cot": "CoT", "nocot": "no-CoT", "cot_markers": "CoT (markers)"}  # notebook 00's model names
STAGE = "04_evaluation"


@dataclass(frozen=True)
class EvaluationConfig:
    model: str = "tiny"  # preset
    task: TaskConfig = TaskConfig()  # the task (the other stages' test split)
    prefix: PrefixConfig = PrefixConfig(n_prefix=2, scale=1.0, num_draws=4)  # random prefix perturbation
    steer_pairs: int = 128  # steering: contrast pairs (first step even vs odd) from the valid split
    steer_layer: int = 0  # steering: decoder layer
    steer_coefficient: float = 1.0  # steering: coefficient of the direction
    light_training: bool = False  # also train the light-weight methods (pause, UPFT, planning tokens)
    batch_size: int = 250  # problems per generation batch
    max_new_tokens: int = 16  # generation budget of the inference-time methods (at least the task's answer budget)

    @classmethod
    def from_params(cls, p: Mapping) -> EvaluationConfig:
        """Notebook 04's parameters."""
        seed = int(p["seed"])
        return cls(model=p["model"], task=TaskConfig.from_params(p, get_preset(p["model"]).task),
                   prefix=PrefixConfig(n_prefix=int(p["prefix_n"]), scale=float(p["prefix_scale"]),
                                       num_draws=int(p["prefix_draws"]), seed=seed),
                   steer_pairs=int(p["steer_pairs"]), steer_layer=int(p["steer_layer"]),
                   steer_coefficient=float(p["steer_coefficient"]), light_training=bool(p["light_training"]))


@dataclass
class Evaluation:
    main: pd.DataFrame  # one row per method: accuracy, visible tokens, latent steps, time, where it was evaluated
    per_problem: pd.DataFrame  # every method's per-problem rows
    prefix: dict  # random prefix: accuracy of baseline and draws, oracle coverage, ...
    steering: pd.DataFrame  # the steering sweep (unsteered and the chosen setting; empty off the chain task)
    consistency: float  # mean pairwise cosine of the steering pairs' differences (nan off the chain task)
    light: pd.DataFrame = field(default_factory=pd.DataFrame)  # the light-weight methods' table (light_training)


def evaluation(run: str, cfg: EvaluationConfig, *, progress: bool = True) -> Evaluation:
    """The side-by-side table of every method the run has evaluated; see the module docstring."""
    recorded = collect_evaluations(run)
    if recorded.empty:
        raise artifacts.MissingArtifactError(f"run {run!r} has no recorded evaluations: run 00_teacher_extraction.ipynb "
                                             "(and the later stages) first")
    preset, task = task_of(cfg.model, cfg.task)
    test, fmt = task.splits.test, task.format
    cfg = replace(cfg, max_new_tokens=max(cfg.max_new_tokens, task.answer_budget(preset.source == "scratch")))
    cot, tok = load_base(run, preset)

    prefix = evaluate_random_prefix(cot, tok, test, cfg.prefix, fmt, max_new_tokens=cfg.max_new_tokens,
                                    batch_size=cfg.batch_size, progress=progress)
    extra = [prefix.per_problem[prefix.per_problem.draw >= 0].assign(method="random prefix")]

    sweep, consistency = pd.DataFrame(), float("nan")
    if task.name == "chain":  # the contrast (first step even or odd) is the chain task's
        pairs = first_step_parity_pairs(task.splits.valid, cfg.steer_pairs, seed=cfg.prefix.seed)
        pair_ids = [(encode_record(tok, a, fmt).question, encode_record(tok, b, fmt).question) for a, b in pairs]
        directions = contrast_directions(cot, pair_ids, [cfg.steer_layer], pad_id=tok.pad_token_id)
        sweep, sweep_rows = steering_sweep(cot, tok, test, directions, [cfg.steer_coefficient],
                                           EvalSpec("steer", max_new_tokens=cfg.max_new_tokens), fmt,
                                           positions="prompt", readout=first_step_even_rate,
                                           batch_size=cfg.batch_size, progress=progress)
        label = f"steering (layer {cfg.steer_layer}, x{cfg.steer_coefficient:g})"
        extra.append(sweep_rows[sweep_rows.layer == cfg.steer_layer].assign(method=label))
        consistency = directions[cfg.steer_layer].consistency

    light = pd.DataFrame()
    if cfg.light_training:
        result = light_methods_table(run, LightConfig(model=cfg.model, task=cfg.task, seed=cfg.prefix.seed))
        light = result.table
        rows = result.per_problem
        extra.append(rows[~rows.method.isin(["baseline (CoT)", "no-CoT", "steering"])
                          & ~rows.method.str.startswith("random prefix")])

    frames = [recorded] + [f.assign(stage=STAGE) for f in extra if len(f)]
    per_problem = pd.concat(frames, ignore_index=True)  # (an empty frame in the list would turn ints to float)
    per_problem["method"] = per_problem.method.replace(BASE_LABELS)
    evaluated_in = per_problem.groupby("method").stage.first()
    main = summarize(per_problem)
    main.insert(1, "evaluated_in", main.method.map(evaluated_in))
    main = main.sort_values(["evaluated_in", "method"], kind="stable", ignore_index=True)
    return Evaluation(main, per_problem, prefix.summary, sweep, consistency, light)
