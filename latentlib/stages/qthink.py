"""Stage ``qthink`` (notebook 01): the QThink / CODI comparison. Every row starts from the
same base model, trains on the same problems with the same budget, and is saved under
``runs/<run>/qthink/<row>`` (the QThink release's layout) and evaluated on the test split:

- discrete SFT (``sft``), latent without a teacher (``latent``);
- QThink with the uniform or the reward-weighted teacher, final-step or per-step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import pandas as pd

from latentlib import artifacts
from latentlib.evaluate import EvalSpec, evaluate, record_evaluation, summarize
from latentlib.methods.qthink import DistillConfig, load_qthink, qthink_spec, save_qthink, train_qthink
from latentlib.presets import get_preset
from latentlib.stages.base import base_identity, load_base, task_of
from latentlib.stages.reuse import build_or_reuse, checkpoint_every, input_identity
from latentlib.tasks import TaskConfig
from latentlib.teacher import load_teacher, normalize_layers, parse_layers
from latentlib.training.loop import TrainConfig

__all__ = ["QThinkConfig", "QThinkRow", "QThinkComparison", "qthink_row", "qthink_comparison", "ROWS"]

MADE_BY = "00_teacher_extraction.ipynb"
# row label -> (artifact name, mode, distill_steps)
ROWS = {
    "discrete SFT": ("sft", "sft", "final"),
    "latent, no teacher": ("latent", "latent", "final"),
    "QThink uniform final-step": ("uniform_final", "uniform", "final"),
    "QThink RW final-step": ("rw_final", "reward_weighted", "final"),
    "QThink uniform per-step": ("uniform_per_step", "uniform", "per_step"),
    "QThink RW per-step": ("rw_per_step", "reward_weighted", "per_step"),
}


@dataclass(frozen=True)
class QThinkConfig:
    model: str = "tiny"  # preset
    task: TaskConfig = TaskConfig()  # the task (the splits of notebook 00)
    teacher_problems: int = 2000  # the problems the teacher covers: the training set of every row
    distill: DistillConfig = DistillConfig()  # shared by every row (each row sets mode and distill_steps)
    layers: str = "0"  # teacher layers distilled: "0", "-1", "all", "0,-1", ...
    rows: tuple[str, ...] = tuple(ROWS)  # which rows of the comparison to train
    eval_batch_size: int = 250  # problems per generation batch at evaluation

    def __post_init__(self):
        if isinstance(self.rows, list):
            object.__setattr__(self, "rows", tuple(self.rows))
        unknown = [r for r in self.rows if r not in ROWS]
        if unknown:
            raise ValueError(f"rows {unknown}: choose among {list(ROWS)}")

    @classmethod
    def from_params(cls, p: Mapping) -> QThinkConfig:
        """Notebook 01's ``qthink_*``, ``distill_*``, ``num_latent`` and LoRA parameters."""
        steps = int(p["qthink_steps"])
        train = TrainConfig(steps=steps, batch_size=int(p["qthink_batch_size"]), lr=float(p["qthink_lr"]),
                            warmup_steps=max(1, steps // 10), seed=int(p["seed"]), log_every=max(1, steps // 30),
                            checkpoint_every=checkpoint_every(p))
        preset = get_preset(p["model"])
        distill = DistillConfig(num_latent=int(p["num_latent"]), gamma=float(p["distill_gamma"]),
                                distance=str(p["distill_distance"]), use_lora=bool(p["use_lora"]),
                                lora_r=int(p["lora_r"]), lora_alpha=int(p["lora_alpha"]),
                                lora_targets=preset.lora_targets, train=train)
        return cls(model=p["model"], task=TaskConfig.from_params(p, preset.task),
                   teacher_problems=int(p["teacher_problems"]), distill=distill, layers=str(p["distill_layers"]),
                   eval_batch_size=int(p["eval_batch_size"]))

    def row(self, label: str, num_layers: int) -> DistillConfig:
        """The distillation config of one row (``num_layers``: the model's, to resolve ``layers``)."""
        _, mode, steps = ROWS[label]
        layers = None if self.layers == "all" else tuple(parse_layers(self.layers, num_layers))
        return replace(self.distill, mode=mode, distill_steps=steps, layers=layers)


@dataclass
class QThinkRow:
    label: str  # the row of the comparison
    config: DistillConfig
    model: object  # the trained model (LoRA-wrapped under use_lora)
    tokenizer: object
    projection: object  # the projection injector (None for discrete SFT)
    history: list = field(default_factory=list)
    seconds: float = 0.0  # training wall time of the run that made it
    status: str = "trained"


@dataclass
class QThinkComparison:
    table: pd.DataFrame  # one row per method: mode, per-step, gamma, accuracy, visible tokens, ...
    per_problem: pd.DataFrame  # every evaluated problem (base row included)
    rows: dict[str, QThinkRow]  # the trained rows
    train_records: int  # problems every row trained on
    teacher_summary: dict  # the teacher's summary (fraction correct, layers, ...)

    @property
    def curves(self) -> dict[str, list]:
        return {label: r.history for label, r in self.rows.items()}


def _records(run: str, cfg: QThinkConfig, task):
    """The teacher's problems, and those with a teacher (what the rows without a teacher train on)."""
    directory = artifacts.require_artifact(run, "teacher", "teacher", made_by=MADE_BY)
    index = artifacts.load_json(directory / "index.json")
    records = task.splits.train[:cfg.teacher_problems]
    if index["summary"]["problems"] != len(records):
        raise ValueError(f"the teacher covers {index['summary']['problems']} problems, not teacher_problems="
                         f"{cfg.teacher_problems}: use notebook 00's value")
    has_teacher = load_teacher(run, layers=[]).has_teacher  # no states needed here
    if not has_teacher.any():
        raise ValueError(f"no problem of the teacher has a correct rollout (0 of {len(records)}): every row trains on "
                         "the problems with a teacher, so there is nothing to learn from; give notebook 00 a base "
                         "model that solves some problems (more base_steps), or more teacher_rollouts")
    return records, [r for r, keep in zip(records, has_teacher.tolist()) if keep], index


def qthink_row(run: str, cfg: QThinkConfig, label: str, *, progress: bool = True) -> QThinkRow:
    """Trains (or reuses) one row of the comparison."""
    preset, task = task_of(cfg.model, cfg.task)
    name = ROWS[label][0]
    records, with_teacher, index = _records(run, cfg, task)
    distill = cfg.row(label, index["num_layers"])
    out = artifacts.artifact_dir(run, "qthink", name)
    inputs = {"base": base_identity(run, preset), "teacher": input_identity(run, "teacher", "teacher", made_by=MADE_BY),
              "records": task.digest}

    def build(record, checkpoint):
        model, tokenizer = load_base(run, preset)
        states = None
        if distill.uses_teacher:
            chosen = None if distill.layers is None else normalize_layers(distill.layers,
                                                                         model.config.num_hidden_layers)
            states = load_teacher(run, weighting=distill.mode, layers=chosen)
        # distilled rows get the teacher's problem list (they skip problems without a teacher); the others that subset
        model, projection, result = train_qthink(model, tokenizer, records if distill.uses_teacher else with_teacher,
                                                 distill, task.format, teacher=states, checkpoint_dir=checkpoint,
                                                 desc=f"qthink {name}", progress=progress)
        save_qthink(out, model, tokenizer, projection, {
            **record, "config": record["stage_config"]["distill"], "layers": list(states.states) if states else [],
            "history": result.history, "seconds": result.seconds, "seed": distill.train.seed})
        return model, tokenizer, projection

    def load(directory, meta):
        base = load_base(run, preset)[0] if (directory / "adapter_config.json").is_file() else None
        return load_qthink(directory, base_model=base)

    built = build_or_reuse(out, {"model": cfg.model, "task": cfg.task, "teacher_problems": cfg.teacher_problems,
                                 "distill": distill}, inputs, build=build, load=load, label=f"qthink/{name}")
    model, tokenizer, projection = built.value
    return QThinkRow(label, distill, model, tokenizer, projection, built.meta.get("history", []),
                     built.meta.get("seconds", 0.0), built.status)


def qthink_comparison(run: str, cfg: QThinkConfig, *, progress: bool = True) -> QThinkComparison:
    """Every row of ``cfg.rows`` trained (or reused) and evaluated on the test split, beside
    the base model; the rows' per-problem evaluations are recorded for notebook 04."""
    preset, task = task_of(cfg.model, cfg.task)
    _, with_teacher, index = _records(run, cfg, task)
    base_model, base_tok = load_base(run, preset)
    frames = [evaluate(base_model, base_tok, task.splits.test, EvalSpec("base (CoT)", max_new_tokens=16), task.format,
                       batch_size=cfg.eval_batch_size, progress=progress)]
    info = [{"method": "base (CoT)", "mode": "-", "per_step": "-", "gamma": "-", "train_seconds": 0.0}]
    rows = {}
    for label in cfg.rows:
        row = rows[label] = qthink_row(run, cfg, label, progress=progress)
        d = row.config
        spec = (EvalSpec(label, max_new_tokens=16) if row.projection is None
                else qthink_spec(label, row.projection, d.num_latent))
        frames.append(evaluate(row.model, row.tokenizer, task.splits.test, spec, task.format,
                               batch_size=cfg.eval_batch_size, progress=progress))
        info.append({"method": label, "mode": d.mode,
                     "per_step": {"final": "no", "per_step": "yes"}[d.distill_steps] if d.uses_teacher else "-",
                     "gamma": {"sft": "-", "latent": 0.0}.get(d.mode, d.gamma), "train_seconds": round(row.seconds, 1)})
    if len(frames) > 1:
        record_evaluation(run, pd.concat(frames[1:]), stage="01_sft")  # the base row is 00's "cot"
    per_problem = pd.concat(frames, ignore_index=True)
    table = pd.DataFrame(info).merge(summarize(per_problem)[
        ["method", "accuracy", "visible_tokens", "latent_steps", "ms_per_problem", "n"]], on="method")
    return QThinkComparison(table, per_problem, rows, len(with_teacher), index["summary"])
