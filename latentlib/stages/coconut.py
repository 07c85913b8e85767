"""Stage ``coconut`` (notebook 02): Coconut's curriculum and the rows of the paper's Table 1.

Every trained model is one artifact under ``runs/<run>/curriculum/<name>`` (saved with its
configuration by :func:`latentlib.methods.coconut.save_coconut`, with its per-stage table
and its last evaluation), reused under the one reuse rule:

- ``cot_bracketed``: the base of the marker format, trained from scratch (the CoT with
  ``<bot> … <eot>`` around a random number of leading steps; see
  :mod:`latentlib.methods.coconut` for why);
- ``coconut_plain``, ``coconut_markers``: the curriculum in both formats, evaluated
  after every stage (notebooks 04 and 05 read them);
- the baselines of Table 1 (pause as thought, w/o curriculum), a second c, and the
  replication's variants (injection, positions, SEQ-VCR, the marker format from
  ``cot_markers``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import pandas as pd
from peft import PeftModel

from latentlib import artifacts
from latentlib.batching import collate, encode_record
from latentlib.evaluate import EvalSpec, evaluate, record_evaluation, summarize
from latentlib.injection import INJECTION_SPECS, make_injector
from latentlib.methods.coconut import (CoconutConfig, eval_spec, load_coconut, make_loss, make_vcr, save_coconut,
                                       stage_examples, train_coconut, without_curriculum)
from latentlib.presets import get_preset, load_model
from latentlib.stages.base import load_trained, task_of
from latentlib.stages.reuse import build_or_reuse, checkpoint_every, identity
from latentlib.tasks import TaskConfig
from latentlib.tokens import add_special_tokens, token_ids
from latentlib.training.curriculum import CurriculumConfig
from latentlib.training.lora import lora_for_preset
from latentlib.training.loop import TrainConfig
from latentlib.training.memory import saved_tensor_bytes

__all__ = ["CoconutStageConfig", "CoconutRunConfig", "CoconutModel", "CoconutResults", "bracketed_base",
           "coconut_model", "coconut_formats", "coconut_table1", "table1_across_tasks", "coconut_thoughts",
           "coconut_variants", "vcr_memory", "coconut", "load_coconut_run", "TABLE1_ROWS"]

STAGE = "02_curriculum"
BASES = ("scratch", "cot", "nocot", "cot_markers", "cot_bracketed")


@dataclass(frozen=True)
class CoconutRunConfig:
    model: str = "tiny"  # preset
    task: TaskConfig = TaskConfig()  # the task
    coconut: CoconutConfig = CoconutConfig()  # method, format, c, what a thought is
    curriculum: CurriculumConfig = CurriculumConfig()  # stages and their optimisation
    base: str = "cot"  # the model it starts from: "cot", "cot_markers" (00), "cot_bracketed" (this stage), "scratch"
    eval_stages: str = "all"  # evaluate on the test split after "all" stages, the "last" or "none"

    def __post_init__(self):
        if self.base not in BASES:
            raise ValueError(f"base={self.base!r}: use one of {BASES}")
        if self.eval_stages not in ("all", "last", "none"):
            raise ValueError(f"eval_stages={self.eval_stages!r}: use 'all', 'last' or 'none'")


@dataclass(frozen=True)
class CoconutStageConfig:
    """Notebook 02's Coconut parameters; builds the configuration of each of its runs."""

    model: str = "tiny"  # preset
    task: TaskConfig = TaskConfig()  # the task
    c_thought: int = 1  # c: continuous thoughts per removed step
    max_latent_stage: int = 6  # stages 1..max replace the first k steps by k*c thoughts
    steps_per_stage: int = 30  # optimizer steps of stages 1..max-1
    final_stage_steps: int = 90  # optimizer steps of the last stage
    batch_size: int = 128  # training batch
    lr: float = 1e-3  # peak learning rate of each stage
    uniform_prob: float = 0.3  # probability of an example at a random stage
    seed: int = 0  # data order
    bracketed_steps: int = 400  # optimizer steps of the marker format's base (from scratch)
    formats: tuple[str, ...] = ("plain", "markers")  # formats of the main curriculum (markers: + its own base)
    baselines: tuple[str, ...] = ("plain",)  # formats in which pause-as-thought and w/o curriculum are trained
    second_c: int = 2  # a second c for the accuracy-vs-thoughts figure (0: none)
    variant_steps_per_stage: int = 20  # optimizer steps per stage of each variant (stages 1..max-1)
    variant_final_steps: int = 60  # optimizer steps of each variant's last stage
    checkpoint_every: int = 0  # optimizer steps between checkpoints within a curriculum stage (0: at its end only)

    def __post_init__(self):
        for name in ("formats", "baselines"):
            value = getattr(self, name)
            if isinstance(value, (list, str)):
                items = value.split(",") if isinstance(value, str) else value
                object.__setattr__(self, name, tuple(f.strip() for f in items if f.strip()))
            bad = [f for f in getattr(self, name) if f not in ("plain", "markers")]
            if bad:
                raise ValueError(f"{name}={getattr(self, name)!r}: formats are 'plain' and 'markers' (comma-separated)")
        if not self.formats:
            raise ValueError("formats=(): train the curriculum in at least one format, 'plain' or 'markers'")

    @classmethod
    def from_params(cls, p: Mapping) -> CoconutStageConfig:
        return cls(model=p["model"], task=TaskConfig.from_params(p, get_preset(p["model"]).task),
                   c_thought=int(p["c_thought"]), max_latent_stage=int(p["max_latent_stage"]),
                   steps_per_stage=int(p["steps_per_stage"]), final_stage_steps=int(p["final_stage_steps"]),
                   batch_size=int(p["batch_size"]), lr=float(p["lr"]), uniform_prob=float(p["uniform_prob"]),
                   seed=int(p["seed"]), bracketed_steps=int(p["bracketed_steps"]),
                   formats=p.get("formats", cls.formats), baselines=p["baselines"],
                   second_c=int(p["second_c"]), variant_steps_per_stage=int(p["variant_steps_per_stage"]),
                   variant_final_steps=int(p["variant_final_steps"]), checkpoint_every=checkpoint_every(p))

    def coconut(self, fmt: str, **overrides) -> CoconutConfig:
        """The run's Coconut configuration in format ``fmt``; ``overrides`` win over the stage's
        values (iCoT-style sets its own ``uniform_prob``)."""
        return CoconutConfig(**{"format": fmt, "c_thought": self.c_thought, "max_latent_stage": self.max_latent_stage,
                                "uniform_prob": self.uniform_prob, **overrides})

    def curriculum(self, steps: int | None = None, final: int | None = None) -> CurriculumConfig:
        return CurriculumConfig(end_stage=self.max_latent_stage, steps_per_stage=self.steps_per_stage
                                if steps is None else steps,
                                final_stage_steps=self.final_stage_steps if final is None else final,
                                train=TrainConfig(steps=0, batch_size=self.batch_size, lr=self.lr, warmup_steps=10,
                                                  seed=self.seed, log_every=10,
                                                  checkpoint_every=self.checkpoint_every))

    def run(self, fmt: str, coconut: CoconutConfig | None = None, curriculum: CurriculumConfig | None = None,
            eval_stages: str = "all", base: str | None = None) -> CoconutRunConfig:
        """One run in format ``fmt``: from ``cot`` (plain) or ``cot_bracketed`` (markers)."""
        return CoconutRunConfig(model=self.model, task=self.task, coconut=coconut or self.coconut(fmt),
                                curriculum=curriculum or self.curriculum(), eval_stages=eval_stages,
                                base=base or ("cot_bracketed" if fmt == "markers" else "cot"))

    def bracketed(self) -> CoconutRunConfig:
        """The marker format's base: from scratch, every example at a random k with the
        removed steps written between the markers."""
        return CoconutRunConfig(
            model=self.model, task=self.task,
            coconut=CoconutConfig(method="cot", format="markers", max_latent_stage=self.max_latent_stage,
                                  uniform_prob=1.0),
            curriculum=CurriculumConfig(start_stage=self.max_latent_stage, end_stage=self.max_latent_stage,
                                        final_stage_steps=self.bracketed_steps,
                                        train=TrainConfig(steps=0, batch_size=self.batch_size, lr=3e-3,
                                                          warmup_steps=100, seed=self.seed, log_every=20,
                                                          checkpoint_every=self.checkpoint_every)),
            base="scratch", eval_stages="none")


@dataclass
class CoconutModel:
    name: str  # artifact name
    model: object
    tokenizer: object
    config: CoconutConfig
    curriculum: CurriculumConfig
    injector: object  # what a thought is (trained weights included)
    table: pd.DataFrame  # per evaluated stage: accuracy, visible tokens, thoughts, ...
    history: pd.DataFrame  # training rows with stage and global step
    per_problem: pd.DataFrame  # the last evaluated stage, one row per test problem
    seconds: float  # training wall time of the run that made it
    status: str  # "trained", "retrained" or "reused"


def _base_dir(run: str, base: str):
    """Where a starting model lives: notebook 00's base models, or this stage's bracketed base."""
    if base == "cot_bracketed":
        return artifacts.require_artifact(run, "curriculum", base, made_by="02_curriculum.ipynb")
    return artifacts.require_artifact(run, "base", base, made_by="00_teacher_extraction.ipynb")


def _started_from(cfg: CoconutRunConfig, preset) -> tuple[str, str] | None:
    """The artifact a run starts from (``base="scratch"`` with a pretrained preset: the
    base CoT model, since a pretrained model is not trained from scratch), or None."""
    if cfg.base == "scratch":
        return None if preset.source == "scratch" else ("base", "cot")
    return ("curriculum", cfg.base) if cfg.base == "cot_bracketed" else ("base", cfg.base)


def _start_model(run: str, cfg: CoconutRunConfig, preset, words):
    """A fresh copy of the run's starting model (a new random one for ``base="scratch"``
    with a from-scratch preset), made trainable the preset's way (all weights, or LoRA
    with the markers' and pauses' rows)."""
    start = _started_from(cfg, preset)
    if start is None:  # like notebook 00's base models
        model, tok = load_model(cfg.model, words=list(words), seed=cfg.curriculum.train.seed)
        add_special_tokens(model, tok)
    else:
        model, tok = load_trained(run, preset, _base_dir(run, start[1]))
    return lora_for_preset(model, tok, preset, tokens=("<bot>", "<eot>", "<pause>")), tok


def coconut_model(run: str, cfg: CoconutRunConfig, name: str, *, progress: bool = True) -> CoconutModel:
    """Trains (or reuses) one Coconut run and saves it under ``runs/<run>/curriculum/<name>``
    (a real preset's run saves its LoRA adapter, loaded back onto the model it started from)."""
    preset, task = task_of(cfg.model, cfg.task)
    out = artifacts.artifact_dir(run, "curriculum", name)
    scratch = cfg.eval_stages == "none"
    start = _started_from(cfg, preset)
    inputs = {"records": task.digest}
    if start is not None:
        inputs["base"] = identity(_base_dir(run, start[1]))

    def build(record, checkpoint):
        model, tok = _start_model(run, cfg, preset, task.words)
        encoded = [encode_record(tok, r, task.format) for r in task.splits.train]
        res = train_coconut(model, tok, task.splits.train, cfg.coconut, cfg.curriculum, task.format,
                            eval_records=None if scratch else task.splits.test,
                            eval_stages="all" if scratch else cfg.eval_stages, name=name, encoded=encoded,
                            checkpoint_dir=checkpoint, progress=progress)
        model.eval()
        save_coconut(out, model, tok, cfg.coconut, cfg.curriculum, injector=res.injector,
                     meta={**record, "seed": cfg.curriculum.train.seed, "seconds": res.seconds, "started_from": start,
                           "table": res.table.to_dict("records"), "history": res.history.to_dict("records")},
                     tables={"evaluation.csv": res.per_problem} if len(res.per_problem) else None)
        if isinstance(model, PeftModel):
            model = model.merge_and_unload().eval()
        return model, tok, res.injector, res.per_problem

    def load(directory, meta):
        saved = load_coconut(directory, base=lambda: load_trained(run, preset, _base_dir(run, start[1]))[0]
                             if start is not None else None)
        per_problem = pd.read_csv(directory / "evaluation.csv") if (directory / "evaluation.csv").is_file() \
            else pd.DataFrame()
        return saved.model, saved.tokenizer, saved.injector, per_problem

    built = build_or_reuse(out, cfg, inputs, build=build, load=load, label=f"curriculum/{name}")
    model, tok, injector, per_problem = built.value
    meta = built.meta
    return CoconutModel(name, model, tok, cfg.coconut, cfg.curriculum, injector, pd.DataFrame(meta.get("table", [])),
                        pd.DataFrame(meta.get("history", [])), per_problem, meta.get("seconds", 0.0), built.status)


def load_coconut_run(run: str, preset, name: str):
    """A Coconut model of the run (:class:`~latentlib.methods.coconut.SavedCoconut`), an
    adapter loaded onto the model it started from."""
    directory = artifacts.require_artifact(run, "curriculum", name, made_by="02_curriculum.ipynb")
    start = artifacts.read_meta(directory).get("started_from")
    return load_coconut(directory, base=lambda: load_trained(run, preset, _base_dir(run, start[1]))[0])


def bracketed_base(run: str, cfg: CoconutStageConfig, *, progress: bool = True) -> CoconutModel:
    """The marker format's base model, ``runs/<run>/curriculum/cot_bracketed``."""
    return coconut_model(run, cfg.bracketed(), "cot_bracketed", progress=progress)


def coconut_formats(run: str, cfg: CoconutStageConfig, *, progress: bool = True) -> dict[str, CoconutModel]:
    """The curriculum in the plain format (from ``cot``) and the paper's marker format (from
    ``cot_bracketed``), those of ``cfg.formats``: ``coconut_plain`` and ``coconut_markers``,
    evaluated at every stage."""
    if "markers" in cfg.formats:
        bracketed_base(run, cfg, progress=progress)
    return {fmt: coconut_model(run, cfg.run(fmt), f"coconut_{fmt}", progress=progress) for fmt in cfg.formats}


def _row(method: str, fmt: str, table: pd.DataFrame) -> dict:
    return {"method": method, "format": fmt, **table.iloc[-1][["accuracy", "visible_tokens", "latent_steps"]].to_dict()}


TABLE1_ROWS = ("CoT", "no-CoT", "iCoT-style", "pause token", "Coconut", "w/o curriculum", "w/o thought",
               "pause as thought")  # the order of Coconut's Table 1


def coconut_table1(run: str, cfg: CoconutStageConfig, main: dict[str, CoconutModel], *,
                   progress: bool = True) -> pd.DataFrame:
    """The shape of Coconut's Table 1, per format: CoT and no-CoT (notebook 00's models);
    Coconut; its ablations w/o curriculum (straight to the last stage), w/o thought (the
    curriculum removes steps and puts nothing in their place) and pause as thought
    (``<pause>`` in the thought slots); pause token (the pauses without curriculum); and
    iCoT-style stepwise internalisation (steps removed stage by stage, no thought, no
    mixing of earlier stages, iCoT's removal smoothing with lambda 4). Trains the
    baselines; records every trained row's per-problem evaluation for notebook 04."""
    preset, task = task_of(cfg.model, cfg.task)
    test = task.splits.test

    def evaluated(method, fmt, model, tok, spec):
        df = evaluate(model, tok, test, spec, task.format, batch_size=250, progress=progress)
        return _row(method, fmt, summarize(df))

    def base(name):
        return load_trained(run, preset, _base_dir(run, name))

    budget = task.answer_budget(preset.source == "scratch")  # the whole written chain (ProsQA's sentences are long)
    rows = [evaluated("CoT", "plain", *base("cot"), EvalSpec("CoT", max_new_tokens=budget)),
            evaluated("no-CoT", "plain", *base("nocot"), EvalSpec("no-CoT", max_new_tokens=budget))]
    if "markers" in cfg.formats:
        model, tok = base("cot_bracketed")  # every step written between the markers
        rows.append(evaluated("CoT", "markers", model, tok, eval_spec(cfg.max_latent_stage, cfg.bracketed().coconut,
                                                                      tok, task.format, name="CoT")))
    recorded = []
    for fmt in cfg.baselines:
        baselines = {  # row -> (artifact, configs, the method's name in notebook 04's table)
            "pause as thought": (f"pause_{fmt}", cfg.coconut(fmt, method="pause"), cfg.curriculum(),
                                 f"pause as thought ({fmt})"),
            "w/o curriculum": (f"coconut_nocurriculum_{fmt}",
                               *without_curriculum(cfg.coconut(fmt), cfg.curriculum()),
                               f"Coconut without curriculum ({fmt})"),  # (a file name: no "/")
            "w/o thought": (f"nothought_{fmt}", cfg.coconut(fmt, method="icot"), cfg.curriculum(),
                            f"Coconut without thought ({fmt})"),
            "pause token": (f"pausetoken_{fmt}", *without_curriculum(cfg.coconut(fmt, method="pause"),
                                                                     cfg.curriculum()), f"pause token ({fmt})"),
            "iCoT-style": (f"icot_{fmt}", cfg.coconut(fmt, method="icot", uniform_prob=0.0, removal_smoothing=4.0),
                           cfg.curriculum(), f"iCoT-style ({fmt})"),
        }
        for method, (name, coco, cur, recorded_as) in baselines.items():
            r = coconut_model(run, cfg.run(fmt, coco, cur, eval_stages="last"), name, progress=progress)
            rows.append(_row(method, fmt, r.table))
            recorded.append(r.per_problem.assign(method=recorded_as))
    for fmt, r in main.items():
        rows.append(_row("Coconut", fmt, r.table))
        recorded.append(r.per_problem.assign(method=f"Coconut ({fmt})"))
    record_evaluation(run, pd.concat(recorded, ignore_index=True), stage=STAGE)
    order = {m: i for i, m in enumerate(TABLE1_ROWS)}
    return pd.DataFrame(rows).sort_values(["format", "method"],
                                          key=lambda s: s.map(order) if s.name == "method" else s, ignore_index=True)


def table1_across_tasks(tables: Mapping[str, pd.DataFrame], fmt: str = "plain") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Coconut's Table 1 with the tasks as columns: ``tables`` maps a task to its
    :func:`coconut_table1` (its rows in format ``fmt``, where every baseline is trained).
    Returns the long table (method, task, accuracy, visible tokens) and the wide one (a row
    per method in the paper's order; per task its accuracy and visible tokens)."""
    long = pd.concat([t[t.format == fmt].assign(task=task)[["method", "task", "accuracy", "visible_tokens"]]
                      for task, t in tables.items()], ignore_index=True)
    order = {m: i for i, m in enumerate(TABLE1_ROWS)}
    long = long.sort_values(["method", "task"], key=lambda s: s.map(order) if s.name == "method" else s.map(
        {t: i for i, t in enumerate(tables)}), ignore_index=True)
    wide = long.pivot(index="method", columns="task", values=["accuracy", "visible_tokens"])
    wide = wide.reindex([m for m in TABLE1_ROWS if m in wide.index])
    columns = {(v, t): f"{t} {'accuracy' if v == 'accuracy' else 'visible tokens'}" for t in tables
               for v in ("accuracy", "visible_tokens")}
    wide = wide[list(columns)].set_axis(list(columns.values()), axis=1).reset_index()
    return long, wide


def coconut_thoughts(run: str, cfg: CoconutStageConfig, plain: CoconutModel, *, progress: bool = True) -> pd.DataFrame:
    """Accuracy against the number of thoughts: every stage of the plain run, and of a run
    with ``second_c`` (same budget)."""
    table = plain.table.assign(c=cfg.c_thought)
    if cfg.second_c:
        r = coconut_model(run, cfg.run("plain", cfg.coconut("plain", c_thought=cfg.second_c)),
                          f"coconut_plain_c{cfg.second_c}", progress=progress)
        table = pd.concat([table, r.table.assign(c=cfg.second_c)], ignore_index=True)
    return table[["c", "stage", "thoughts", "accuracy", "visible_tokens"]]


def coconut_variants(run: str, cfg: CoconutStageConfig, *, progress: bool = True) -> pd.DataFrame:
    """The replication's variants at a reduced budget, in the plain format, accuracy at the
    last stage: what is injected, the thoughts' positions, SEQ-VCR, and the marker format
    started from ``cot_markers`` instead of ``cot_bracketed``."""
    vcur = cfg.curriculum(steps=cfg.variant_steps_per_stage, final=cfg.variant_final_steps)
    variants = {spec: cfg.run("plain", cfg.coconut("plain", injection=spec), vcur, "last") for spec in INJECTION_SPECS}
    variants["positions: skip"] = cfg.run("plain", cfg.coconut("plain", latent_positions="skip"), vcur, "last")
    variants["SEQ-VCR"] = cfg.run("plain", cfg.coconut("plain", vcr_var=0.1, vcr_cov=0.004), vcur, "last")
    variants["markers from cot_markers"] = cfg.run("markers", curriculum=vcur, eval_stages="last", base="cot_markers")
    rows = []
    for label, run_cfg in variants.items():
        safe = "".join(ch if ch.isalnum() else "_" for ch in label).strip("_")
        r = coconut_model(run, run_cfg, f"variant_{safe}", progress=progress)
        rows.append({"variant": label, **r.table.iloc[-1][["accuracy", "visible_tokens"]], "seconds": r.seconds})
    return pd.DataFrame(rows)


def vcr_memory(run: str, cfg: CoconutStageConfig) -> pd.DataFrame:
    """One training step at the last stage with and without SEQ-VCR, from the CoT base
    trained the way Coconut trains it (LoRA for a real preset): the bytes autograd keeps
    for the backward (exact) and the step's wall time."""
    import time

    preset, task = task_of(cfg.model, cfg.task)
    model, tok = load_trained(run, preset, _base_dir(run, "cot"))
    model = lora_for_preset(model, tok, preset, tokens=("<bot>", "<eot>", "<pause>"))
    ids = token_ids(tok)
    encoded = [encode_record(tok, r, task.format) for r in task.splits.train[:cfg.batch_size]]
    rows = []
    model.train()
    for name, coco in {"Coconut": cfg.coconut("plain"),
                       "Coconut + SEQ-VCR": cfg.coconut("plain", vcr_var=0.1, vcr_cov=0.004)}.items():
        injector = make_injector(coco.injection, model, norm_match=coco.norm_match)
        batch = collate(stage_examples(encoded, cfg.max_latent_stage, replace(coco, uniform_prob=0.0), ids),
                        tok.pad_token_id, align="first_latent")
        t0 = time.perf_counter()
        saved, (loss, _) = saved_tensor_bytes(lambda: make_loss(coco, injector, make_vcr(coco, model))(model, batch))
        loss.backward()
        rows.append({"config": name, "saved_for_backward_mb": saved / 2**20, "step_seconds": time.perf_counter() - t0})
        model.zero_grad(set_to_none=True)
    model.eval()
    return pd.DataFrame(rows).round(3)


@dataclass
class CoconutResults:
    models: dict[str, CoconutModel]  # the two formats' last-stage models
    stage_table: pd.DataFrame  # every stage of both formats
    table1: pd.DataFrame  # the shape of Coconut's Table 1
    thoughts: pd.DataFrame  # accuracy against the number of thoughts
    variants: pd.DataFrame = field(default_factory=pd.DataFrame)  # the replication's variants (if run)
    memory: pd.DataFrame = field(default_factory=pd.DataFrame)  # SEQ-VCR's memory cost


def coconut(run: str, cfg: CoconutStageConfig, *, variants: bool = False, progress: bool = True) -> CoconutResults:
    """The whole Coconut stage (what ``python -m latentlib.train coconut`` runs)."""
    models = coconut_formats(run, cfg, progress=progress)
    stage_table = pd.concat([r.table.assign(format=f) for f, r in models.items()], ignore_index=True)
    return CoconutResults(models, stage_table, coconut_table1(run, cfg, models, progress=progress),
                          coconut_thoughts(run, cfg, models["plain"], progress=progress),
                          coconut_variants(run, cfg, progress=progress) if variants else pd.DataFrame(),
                          vcr_memory(run, cfg))
