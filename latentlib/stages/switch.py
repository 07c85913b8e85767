"""SWITCH's three phases as pipeline stages (the method itself is :mod:`latentlib.methods.switch`).

| phase | notebook | in | out |
|---|---|---|---|
| 1 | 01_sft | ``base/cot`` (from-scratch presets) or the pretrained weights (as the card); ``teacher/teacher`` if present | ``sft/switch_phase1`` |
| 2 | 02_curriculum | ``sft/switch_phase1`` | ``curriculum/switch_phase2`` |
| 3 | 03_grpo | ``curriculum/switch_phase2`` | ``grpo/switch_phase3`` |

Each artifact's ``COMPLETE`` marker holds the :class:`~latentlib.methods.switch.SwitchConfig`
it was trained with (later phases inherit its positions), its history and what decided
it; a complete artifact is reused only under the one reuse rule (:mod:`latentlib.stages.reuse`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd

from latentlib import artifacts
from latentlib.methods import switch as sw
from latentlib.methods.switch import Span, SpanRule, SwitchConfig, SwitchGRPOConfig
from latentlib.presets import Preset, get_preset
from latentlib.stages.base import base_identity, load_base, pretrained, task_of
from latentlib.stages.reuse import build_or_reuse, checkpoint_every, identity
from latentlib.tasks import Format, TaskConfig
from latentlib.teacher import load_rollouts
from latentlib.training.curriculum import CurriculumConfig
from latentlib.training.loop import TrainConfig

__all__ = ["Phase1Config", "Phase2Config", "Phase3Config", "PhaseResult", "phase1_entropies", "load_spans",
           "switch_phase1", "switch_phase2", "switch_phase3", "latest_switch_model"]


def _choice(value: str, options: dict, name: str):
    if value not in options:
        raise ValueError(f"{name}={value!r}: use one of {list(options)}")
    return options[value]


@dataclass(frozen=True)
class Phase1Config:
    model: str = "tiny"  # preset
    task: TaskConfig = TaskConfig()  # the task
    rule: SpanRule = SpanRule()  # which steps are wrapped in <swi> ... </swi>
    switch: SwitchConfig = SwitchConfig()  # block settings (positions matter here; c, K_min, K_max from phase 2)
    train: TrainConfig = TrainConfig(steps=120, batch_size=128, lr=3e-3, warmup_steps=20)  # the SFT

    @classmethod
    def from_params(cls, p: Mapping) -> Phase1Config:
        """Notebook 01's ``switch_*`` parameters; ``"auto"`` values follow the task and preset."""
        preset = get_preset(p["model"])
        task = TaskConfig.from_params(p, preset.task)
        chain = task.name == "chain"
        rule = SpanRule(aggregate=str(p["switch_aggregate"]), top_q=float(p["switch_top_q"]),
                        pool_by=_choice(p["switch_pool_by"], {"auto": "op" if chain else None, "op": "op", "none": None},
                                        "switch_pool_by"),
                        isolate=_choice(p["switch_isolate"], {"auto": chain, "yes": True, "no": False},
                                        "switch_isolate"))
        positions = sw.default_positions(preset) if p["switch_positions"] == "auto" else str(p["switch_positions"])
        steps = int(p["switch_sft_steps"])
        train = TrainConfig(steps=steps, batch_size=int(p["switch_batch_size"]), lr=float(p["switch_sft_lr"]),
                            warmup_steps=min(20, steps // 5), seed=int(p["seed"]), log_every=max(1, steps // 30),
                            checkpoint_every=checkpoint_every(p))
        return cls(model=p["model"], task=task, rule=rule, switch=SwitchConfig(positions=positions), train=train)


@dataclass(frozen=True)
class Phase2Config:
    model: str = "tiny"  # preset
    task: TaskConfig = TaskConfig()  # the task (phase 1's)
    c_thought: int = 2  # c: latent slots per replaced step (card: 2)
    k_min: int = 4  # K_min (card: 4)
    k_max: int = 8  # K_max (card: 8)
    latent_cap: int = 48  # latent slots per sample at most (card: 48)
    curriculum: CurriculumConfig = CurriculumConfig(end_stage=1)  # stages, their lengths and optimisation
    evaluate: bool = True  # evaluate on the test split after every stage

    @classmethod
    def from_params(cls, p: Mapping) -> Phase2Config:
        """Notebook 02's ``switch_*`` parameters."""
        per_stage = int(p["switch_steps_per_stage"])
        curriculum = CurriculumConfig(
            start_stage=1, end_stage=int(p["switch_stages"]), steps_per_stage=per_stage,
            final_stage_steps=int(p["switch_final_steps"]),
            train=TrainConfig(steps=0, batch_size=int(p["switch_batch_size"]), lr=float(p["switch_lr"]),
                              warmup_steps=10, seed=int(p["seed"]), log_every=max(1, per_stage // 10),
                              checkpoint_every=checkpoint_every(p)))
        return cls(model=p["model"], task=TaskConfig.from_params(p, get_preset(p["model"]).task),
                   c_thought=int(p["switch_c"]), k_min=int(p["switch_k_min"]), k_max=int(p["switch_k_max"]),
                   latent_cap=int(p["switch_latent_cap"]), curriculum=curriculum)

    def switch_config(self, phase1: SwitchConfig) -> SwitchConfig:
        """Phase 1's settings (its positions) with this phase's block sizes."""
        return replace(phase1, c_thought=self.c_thought, k_min=self.k_min, k_max=self.k_max,
                       latent_cap=self.latent_cap)


@dataclass(frozen=True)
class Phase3Config:
    model: str = "tiny"  # preset
    task: TaskConfig = TaskConfig()  # the task (the prompts are its training problems)
    grpo: SwitchGRPOConfig = SwitchGRPOConfig()  # Switch-GRPO

    @classmethod
    def from_params(cls, p: Mapping) -> Phase3Config:
        """Notebook 03's parameters."""
        G = int(p["num_generations"])
        grpo = SwitchGRPOConfig(
            num_generations=G, generation_batch_size=G * int(p["prompts_per_step"]), max_steps=int(p["max_steps"]),
            learning_rate=float(p["learning_rate"]), beta=float(p["beta"]), epsilon=float(p["epsilon"]),
            temperature=float(p["temperature"]), max_completion_length=int(p["max_completion_length"]),
            reward_weights=(float(p["reward_correctness"]), float(p["reward_format"]),
                            float(p["reward_latent_usage"])),
            logging_steps=int(p["logging_steps"]), seed=int(p["seed"]), save_steps=checkpoint_every(p))
        return cls(model=p["model"], task=TaskConfig.from_params(p, get_preset(p["model"]).task), grpo=grpo)


@dataclass
class PhaseResult:
    model: object  # the trained model (a PeftModel for LoRA presets)
    tokenizer: object
    cfg: SwitchConfig  # SWITCH settings the model was trained with
    history: list  # training rows (phase 2: with "stage")
    info: dict  # what decided the phase (span rule and threshold, per-stage evaluation, ...)
    seconds: float  # training wall time (of the run that made the artifact)
    status: str  # "trained", "retrained" or "reused"

    @property
    def reused(self) -> bool:
        return self.status == "reused"


def phase1_entropies(run: str, model, tokenizer, records: Sequence, rule: SpanRule, fmt: Format, *,
                     teacher: str = "teacher") -> tuple[list, str]:
    """Step entropies for phase 1 and where they came from.

    Preferred: the teacher rollouts of notebook 00 (``runs/<run>/teacher/<teacher>``),
    whose problems are taken to be the first training records (checked: a rollout only
    counts when its steps are that record's gold steps). Records the teacher does not
    cover are measured on the gold CoT by teacher forcing, unless pooling per operation
    makes them unnecessary.
    """
    ents: list = [None] * len(records)
    source = "gold CoT, teacher-forced"
    if artifacts.is_complete(artifacts.artifact_dir(run, "teacher", teacher)):
        rollouts = load_rollouts(run, teacher, columns=["problem", "correct", "text", "positions", "entropy"])
        n = int(rollouts["problem"].max()) + 1 if len(rollouts) else 0
        ents[:n] = sw.teacher_step_entropies(rollouts, records[:n], fmt, aggregate=rule.aggregate)
        covered = sum(e is not None for e in ents)
        source = f"teacher rollouts ({covered} problems)"
        if covered == 0:
            source = "gold CoT, teacher-forced (the teacher's rollouts matched no training record)"
    missing = [i for i, e in enumerate(ents) if e is None]
    if missing and (rule.pool_by is None or len(missing) == len(records)):
        todo = missing if rule.pool_by is None else missing[:2000]  # pooling needs a sample, not every record
        measured = sw.gold_step_entropies(model, tokenizer, [records[i] for i in todo], fmt,
                                          aggregate=rule.aggregate)
        for i, e in zip(todo, measured):
            ents[i] = e
        if len(todo) < len(records) and source.startswith("teacher"):
            source += f" + {len(todo)} teacher-forced"
    return ents, source


def load_spans(directory) -> list[list[Span]]:
    """The spans phase 1 wrapped, per training record."""
    return [[Span(a, b, bool(w)) for a, b, w in sp] for sp in artifacts.load_json(Path(directory) / "spans.json")]


def _adapter_base(preset: Preset) -> str | None:
    return preset.name if preset.use_lora else None


def _load(preset: Preset):
    def load(directory, meta):
        model, tok = sw.load_switch_model(directory, _adapter_base(preset))
        return model, tok, sw.load_switch_config(directory)
    return load


def _result(built, cfg=None) -> PhaseResult:
    model, tok, switch_cfg = built.value
    meta = built.meta
    return PhaseResult(model, tok, cfg or switch_cfg, meta["history"], meta["info"], meta["seconds"], built.status)


def _same_records(directory, digest: str, made_by: str) -> None:
    """Refuses an input artifact trained on other records than this stage's."""
    if artifacts.read_meta(directory).get("inputs", {}).get("records") != digest:
        raise ValueError(f"{directory} was trained on other training records than this stage's (n_train, seed, "
                         f"task): use the same values as {made_by}, or a new run name")


def switch_phase1(run: str, cfg: Phase1Config, *, name: str = "switch_phase1", progress: bool = True) -> PhaseResult:
    """Phase 1: label spans, SFT, save ``runs/<run>/sft/<name>`` (the model, ``spans.json``)."""
    preset, task = task_of(cfg.model, cfg.task)
    out = artifacts.artifact_dir(run, "sft", name)
    teacher_dir = artifacts.artifact_dir(run, "teacher", "teacher")
    start = base_identity(run, preset) if preset.source == "scratch" else f"pretrained {preset.name} ({preset.hub_id})"
    inputs = {"base": start, "records": task.digest,
              "teacher": identity(teacher_dir) if artifacts.is_complete(teacher_dir) else "none"}

    def build(record, checkpoint):
        # a from-scratch preset starts from notebook 00's CoT model; a real one, as the SWITCH card, from the
        # pretrained weights, so that its adapters load with the card's quick-start onto those weights
        model, tok = load_base(run, preset) if preset.source == "scratch" else pretrained(preset)
        ents, source = phase1_entropies(run, model, tok, task.splits.train, cfg.rule, task.format)
        spans, info = sw.label_spans(task.splits.train, ents, cfg.rule)
        info["entropy_source"] = source
        info["examples"] = [sw.render_switch_text(r.steps, sp, " ") for r, sp in zip(task.splits.train[:5], spans[:5])]
        model = sw.make_trainable(model, tok, preset)
        res = sw.train_phase1(model, tok, task.splits.train, spans, cfg.train, cfg.switch, task.format,
                              checkpoint_dir=checkpoint, progress=progress)
        model.eval()
        meta = {"kind": "SWITCH phase 1 (SFT on <swi>-wrapped CoT)", **record, "switch_config": asdict(cfg.switch),
                "info": info, "history": res.history, "seconds": res.seconds, "seed": cfg.train.seed}
        sw.save_switch_model(model, tok, out, meta,
                             files={"spans.json": [[[s.start, s.end, s.wrapped] for s in sp] for sp in spans]})
        return model, tok, cfg.switch

    return _result(build_or_reuse(out, cfg, inputs, build=build, load=_load(preset), label=f"sft/{name}"))


def switch_phase2(run: str, cfg: Phase2Config, *, name: str = "switch_phase2", progress: bool = True) -> PhaseResult:
    """Phase 2: the parallel curriculum from phase 1's model and spans, evaluated after each
    stage on the test split, saved under ``runs/<run>/curriculum/<name>``."""
    preset, task = task_of(cfg.model, cfg.task)
    out = artifacts.artifact_dir(run, "curriculum", name)
    src = artifacts.require_artifact(run, "sft", "switch_phase1", made_by="01_sft.ipynb")
    _same_records(src, task.digest, "01_sft.ipynb")
    switch_cfg = cfg.switch_config(sw.load_switch_config(src))

    def build(record, checkpoint):
        model, tok = sw.load_switch_model(src, _adapter_base(preset), is_trainable=True)
        rows: list[dict] = []

        def after_stage(stage):
            if not cfg.evaluate:
                return {}
            df = sw.evaluate_switch(model, tok, task.splits.test, switch_cfg, task.format, name=f"stage {stage}")
            row = {"stage": stage, **sw.summarize_switch(df).iloc[0].to_dict()}
            rows.append(row)
            model.train()
            return row

        results = sw.train_phase2(model, tok, task.splits.train, load_spans(src), switch_cfg, cfg.curriculum,
                                  task.format, checkpoint_dir=checkpoint, after_stage=after_stage, progress=progress)
        model.eval()
        history, offset = [], 0
        for s in results:
            history += [{**r, "stage": s.stage, "global_step": offset + r["step"]} for r in s.result.history]
            offset += s.result.steps
        info = {"stages": pd.DataFrame(rows).to_dict("records") if rows else []}
        sw.save_switch_model(model, tok, out, {
            "kind": "SWITCH phase 2 (parallel curriculum)", **record, "switch_config": asdict(switch_cfg),
            "info": info, "history": history, "seconds": sum(s.result.seconds for s in results),
            "seed": cfg.curriculum.train.seed})
        return model, tok, switch_cfg

    inputs = {"phase1": identity(src), "records": task.digest}
    return _result(build_or_reuse(out, cfg, inputs, build=build, load=_load(preset), label=f"curriculum/{name}"))


def switch_phase3(run: str, cfg: Phase3Config, *, name: str = "switch_phase3", progress: bool = True) -> PhaseResult:
    """Switch-GRPO: from ``runs/<run>/curriculum/switch_phase2`` to ``runs/<run>/grpo/<name>``,
    with checkpoints and exact resume."""
    preset, task = task_of(cfg.model, cfg.task)
    out = artifacts.artifact_dir(run, "grpo", name)
    src = artifacts.require_artifact(run, "curriculum", "switch_phase2", made_by="02_curriculum.ipynb")
    _same_records(src, task.digest, "02_curriculum.ipynb")

    def build(record, checkpoint):
        switch_cfg = sw.load_switch_config(src)
        model, tok = sw.load_switch_model(src, _adapter_base(preset), is_trainable=True)
        result = sw.train_switch_grpo(model, tok, task.splits.train, cfg.grpo, switch_cfg, task.format,
                                      progress=progress, checkpoint_dir=checkpoint)
        model.eval()
        info = {"samples": result.samples, "grpo_config": asdict(cfg.grpo)}
        sw.save_switch_model(model, tok, out, {
            "kind": "SWITCH phase 3 (Switch-GRPO)", **record, "switch_config": asdict(switch_cfg), "info": info,
            "history": result.result.history, "seconds": result.result.seconds, "seed": cfg.grpo.seed})
        return model, tok, switch_cfg

    inputs = {"phase2": identity(src), "records": task.digest}
    return _result(build_or_reuse(out, cfg, inputs, build=build, load=_load(preset), label=f"grpo/{name}"))


def latest_switch_model(run: str, preset: Preset):
    """``(model, tokenizer, SwitchConfig, label)`` of the last SWITCH phase the run has
    (phase 3 if notebook 03 ran, else phase 2)."""
    phase3 = artifacts.artifact_dir(run, "grpo", "switch_phase3")
    if artifacts.is_complete(phase3):
        directory, label = phase3, "SWITCH phase 3"
    else:
        directory = artifacts.require_artifact(run, "curriculum", "switch_phase2", made_by="02_curriculum.ipynb")
        label = "SWITCH phase 2"
    model, tok = sw.load_switch_model(directory, _adapter_base(preset))
    return model, tok, sw.load_switch_config(directory), label
