"""Stage ``base`` (notebook 00): the models every latent method starts from.

For a from-scratch preset (``tiny``) three models are trained on the task and saved under
``runs/<run>/base/<name>``: ``cot`` (question, steps, answer), ``nocot`` (question, answer)
and ``cot_markers`` (CoT with an empty ``<bot><eot>`` pair, Coconut's stage 0). For a
pretrained preset the same three are LoRA fine-tunes of the pretrained model (only the
adapter is saved), or, with no training steps, ``cot`` is the pretrained model as it is
(offline, a missing model fails at once with what to do). Either way each base model is
evaluated on the test split and its per-problem rows recorded for notebook 04.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from peft import PeftModel

from latentlib import artifacts
from latentlib.evaluate import evaluate, record_evaluation
from latentlib.hub import WeightsUnavailableError
from latentlib.methods.cot import BaseConfig, base_eval_spec, train_base
from latentlib.presets import Preset, get_preset, load_model
from latentlib.stages.reuse import build_or_reuse, checkpoint_every, identity, stage_key
from latentlib.tasks import Task, TaskConfig, load_task
from latentlib.tokens import add_special_tokens
from latentlib.training.lora import lora_for_preset
from latentlib.training.loop import TrainConfig

__all__ = ["BaseModelsConfig", "BaseModel", "base_model", "base_models", "task_of", "pretrained", "load_base",
           "base_identity", "check_scratch_fit", "load_trained"]

MADE_BY = "00_teacher_extraction.ipynb"
KINDS = {"cot": ("cot", False), "nocot": ("nocot", False), "cot_markers": ("cot", True)}


def task_of(model: str, task: TaskConfig) -> tuple[Preset, Task]:
    """The preset and the task's records in the format of the preset's tokenizer."""
    preset = get_preset(model)
    return preset, load_task(task, preset.step_separator, scratch=preset.source == "scratch")


def pretrained(preset: Preset):
    """A real preset's pretrained model with the methods' special tokens added."""
    try:
        model, tokenizer = load_model(preset.name)
    except WeightsUnavailableError as e:  # the message says what to do; the library's frames do not
        raise WeightsUnavailableError(str(e)) from None
    add_special_tokens(model, tokenizer)
    return model, tokenizer


def load_trained(run: str, preset: Preset, directory: Path):
    """``(model, tokenizer)`` of a model artifact, whatever it holds: a whole model (from-scratch
    presets), a LoRA adapter (real presets: only what was trained) loaded onto the model it
    was trained from and merged, or nothing but the note that it is the pretrained model.
    An adapter's metadata names what it started from (``started_from``: a stage and an
    artifact of the run, or ``None`` for the pretrained weights), loaded the same way."""
    meta = artifacts.read_meta(directory)
    if meta.get("pretrained_as_is"):
        return pretrained(preset)
    start = meta.get("started_from")

    def base():
        if start is None:
            return pretrained(preset)[0]
        return load_trained(run, preset, artifacts.artifact_dir(run, *start))[0]

    return artifacts.load_model_dir(directory, base=base)


def load_base(run: str, preset: Preset):
    """The CoT model the latent methods start from, with the special tokens:
    ``runs/<run>/base/cot`` (for a real preset, the pretrained weights, fine-tuned on the
    task's CoT when notebook 00 was given steps for it). A real preset's weights are
    loaded first, so a missing model fails at once with what to do."""
    if preset.source != "scratch":
        pretrained(preset)  # offline and not cached: the error that says how to get the weights
    return load_trained(run, preset, artifacts.require_artifact(run, "base", "cot", made_by=MADE_BY))


def base_identity(run: str, preset: Preset) -> str:
    """The base model's part of a later stage's key."""
    return identity(artifacts.require_artifact(run, "base", "cot", made_by=MADE_BY))


@dataclass(frozen=True)
class BaseModelsConfig:
    model: str = "tiny"  # preset
    task: TaskConfig = TaskConfig()  # the task and its splits
    train: TrainConfig = TrainConfig(steps=600, batch_size=128, lr=3e-3, warmup_steps=100)  # each model's optimisation
    seed: int = 0  # model initialisation
    kinds: tuple[str, ...] = ("cot", "nocot", "cot_markers")  # base models trained (from-scratch presets)
    eval_batch_size: int = 250  # problems per generation batch at evaluation

    def __post_init__(self):
        if isinstance(self.kinds, list):
            object.__setattr__(self, "kinds", tuple(self.kinds))
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"kinds={self.kinds!r}: choose among {tuple(KINDS)}")

    @classmethod
    def from_params(cls, p: Mapping) -> BaseModelsConfig:
        """Notebook 00's parameters: ``base_steps``, ``batch_size``, ``lr``, ``seed``, ``base_kinds``,
        ``checkpoint_every``, the task's."""
        steps = int(p["base_steps"])
        train = TrainConfig(steps=steps, batch_size=int(p["batch_size"]), lr=float(p["lr"]),
                            warmup_steps=min(100, steps // 5), seed=int(p["seed"]), log_every=max(1, steps // 30),
                            checkpoint_every=checkpoint_every(p))
        kinds = tuple(k.strip() for k in str(p.get("base_kinds", ",".join(cls.kinds))).split(",") if k.strip())
        return cls(model=p["model"], task=TaskConfig.from_params(p, get_preset(p["model"]).task), train=train,
                   seed=int(p["seed"]), kinds=kinds)

    def base_config(self, kind: str) -> BaseConfig:
        k, markers = KINDS[kind]
        return BaseConfig(k, markers=markers, train=self.train, seed=self.seed)


@dataclass
class BaseModel:
    name: str  # "cot", "nocot", "cot_markers" (or "cot" for a pretrained preset)
    model: object
    tokenizer: object
    history: list = field(default_factory=list)  # training rows (empty for a pretrained model)
    seconds: float = 0.0  # training wall time of the run that made it
    evaluation: pd.DataFrame = field(default_factory=pd.DataFrame)  # per-problem rows on the test split
    status: str = "pretrained"  # "trained", "retrained", "reused" or "pretrained"


def base_model(run: str, cfg: BaseModelsConfig, kind: str, *, stage: str = "base", progress: bool = True) -> BaseModel:
    """Trains (or reuses) one from-scratch base model, ``runs/<run>/<stage>/<kind>``.

    With ``stage`` other than ``"base"`` (another stage that needs a base model of its own
    budget) notebook 00's ``base/<kind>`` is reused when it was made with the same
    configuration and records, and a model of this configuration is trained into
    ``<stage>/<kind>`` otherwise."""
    preset, task = task_of(cfg.model, cfg.task)
    bc = cfg.base_config(kind)
    config, inputs = {"model": preset.name, "task": cfg.task, "base": bc}, {"records": task.digest}
    own = artifacts.artifact_dir(run, "base", kind)
    if stage != "base" and artifacts.is_complete(own) and artifacts.read_meta(own).get("key") == stage_key(config,
                                                                                                           inputs):
        stage = "base"
    out = artifacts.artifact_dir(run, stage, kind)

    def build(record, checkpoint):
        meta = {"kind": f"base model ({kind})", **record, "seed": bc.seed}
        if preset.source == "scratch":
            model, tokenizer = load_model(preset.name, words=list(task.words), seed=bc.seed)
            add_special_tokens(model, tokenizer)
        else:
            model, tokenizer = pretrained(preset)
            if not bc.train.steps:  # the pretrained model as it is: nothing to save but the note
                with artifacts.atomic_dir(out) as tmp:
                    artifacts.write_complete(tmp, {**meta, "pretrained_as_is": True, "history": [], "seconds": 0.0})
                return model, tokenizer
            model = lora_for_preset(model, tokenizer, preset, tokens=("<bot>", "<eot>") if bc.markers else ())
        result = train_base(model, tokenizer, task.splits.train, bc, task.format, checkpoint_dir=checkpoint,
                            progress=progress)
        artifacts.save_model(model, tokenizer, out, {**meta, "started_from": None, "history": result.history,
                                                     "seconds": result.seconds})
        if isinstance(model, PeftModel):
            model = model.merge_and_unload()
        return model.eval(), tokenizer

    built = build_or_reuse(out, config, inputs, build=build, load=lambda d, meta: load_trained(run, preset, d),
                           label=f"{stage}/{kind}")
    model, tokenizer = built.value
    return BaseModel(kind, model, tokenizer, built.meta.get("history", []), built.meta.get("seconds", 0.0),
                     status=built.status)


MAX_SCRATCH_VOCAB = 4096  # words a from-scratch word-level model is built for at most
SCRATCH_POSITIONS = 512  # its position table (presets.build_tiny_model): ProsQA's questions hold 36 facts on average


def check_scratch_fit(task: Task, preset: Preset, max_new_tokens: int = 16) -> None:
    """Refuses, before any training, a task a from-scratch word-level model cannot hold: a
    vocabulary too large for it, or problems longer than its positions."""
    if preset.source != "scratch":
        return
    if len(task.words) > MAX_SCRATCH_VOCAB:
        raise ValueError(f"task {task.name!r} has {len(task.words)} distinct words; a from-scratch word-level model "
                         f"({preset.name!r}) is built for at most {MAX_SCRATCH_VOCAB}: use a pretrained preset (e.g. "
                         "smollm2-135m) for this task, or a smaller one (an embedded task such as 'chain' or 'graph')")
    longest = max(len(r.question.split()) + sum(len(s.split()) for s in r.steps) + len(r.answer.split()) + 3
                  for r in [*task.splits.train, *task.splits.test])
    if longest + max_new_tokens > SCRATCH_POSITIONS:
        raise ValueError(f"task {task.name!r} has problems of {longest} words, and {preset.name!r} holds "
                         f"{SCRATCH_POSITIONS} positions with room for {max_new_tokens} generated: use smaller "
                         "problems (e.g. fewer graph_nodes) or a pretrained preset")


def base_models(run: str, cfg: BaseModelsConfig, *, progress: bool = True) -> dict[str, BaseModel]:
    """Trains (or reuses) each base model, evaluates it on the test split and records the
    per-problem rows (``runs/<run>/eval/``)."""
    preset, task = task_of(cfg.model, cfg.task)
    check_scratch_fit(task, preset)
    if preset.source != "scratch" and not cfg.train.steps:  # the pretrained model as it is: one CoT row
        models = {"cot": base_model(run, cfg, "cot", progress=progress)}
    else:
        models = {kind: base_model(run, cfg, kind, progress=progress) for kind in cfg.kinds}
    budget = task.answer_budget(preset.source == "scratch")
    for name, m in models.items():
        spec = base_eval_spec(name, m.tokenizer, markers=KINDS[name][1], max_new_tokens=budget)
        m.evaluation = evaluate(m.model, m.tokenizer, task.splits.test, spec, task.format,
                                batch_size=cfg.eval_batch_size, progress=progress)
    record_evaluation(run, pd.concat([m.evaluation for m in models.values()]), stage="00_teacher_extraction")
    return models
