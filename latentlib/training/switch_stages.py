"""SWITCH's three phases as pipeline stages: each finds its input artifact by run name,
trains, evaluates and saves atomically under ``runs/<run>/<stage>/<name>``, and reuses a
complete artifact (the notebooks call these; the method itself is
:mod:`latentlib.methods.switch` and :mod:`latentlib.training.grpo`).

| phase | notebook | in | out |
|---|---|---|---|
| 1 | 01_sft | ``base/cot`` (tiny) or pretrained weights; ``teacher/teacher`` | ``sft/switch_phase1`` |
| 2 | 02_curriculum | ``sft/switch_phase1`` | ``curriculum/switch_phase2`` |
| 3 | 03_grpo | ``curriculum/switch_phase2`` | ``grpo/switch_phase3`` |

Each artifact's ``COMPLETE`` marker holds the :class:`~latentlib.methods.switch.SwitchConfig`
it was trained with (later phases inherit it), its history, a fingerprint of the training
records (a phase refuses inputs made from other records) and a signature of its configs
and its input artifact: a complete artifact is reused only when the signature matches,
otherwise the phase is retrained.
"""

from __future__ import annotations

from collections.abc import Sequence
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from latentlib import artifacts
from latentlib.methods import switch as sw
from latentlib.methods.switch import Span, SpanRule, SwitchConfig
from latentlib.training import grpo
from latentlib.training.loop import TrainConfig

__all__ = ["task_splits", "default_positions", "load_base", "phase1_entropies", "PhaseResult",
           "records_fingerprint", "check_records", "run_phase1", "load_spans", "run_phase2", "run_phase3"]


def task_splits(preset, *, seed: int = 0, n_train: int = 20000, n_test: int = 500):
    """The preset's task as train/valid/test records (the chain task for ``tiny``)."""
    from latentlib.tasks import ChainConfig, Splits, load_gsm8k, make_chain_splits, make_gsm_symbolic, split_records

    if preset.task == "chain":
        return make_chain_splits(ChainConfig(n_train=n_train, n_test=n_test, seed=seed))
    if preset.task == "gsm_symbolic":
        return split_records(make_gsm_symbolic(n_train + n_test, seed), 0, n_test, seed)
    if preset.task == "gsm8k":
        return Splits(train=load_gsm8k("train")[:n_train], valid=[], test=load_gsm8k("test")[:n_test])
    raise ValueError(f"preset {preset.name!r} has task {preset.task!r}, which SWITCH's notebooks do not load")


def default_positions(preset) -> str:
    """``"block"`` for the from-scratch tiny model (it locates operations by position, see
    :mod:`latentlib.methods.switch`), ``"continue"`` (the paper's) for pretrained models."""
    return "block" if preset.source == "scratch" else "continue"


def load_base(run: str, preset):
    """The model SWITCH starts from, with the special tokens: for ``tiny`` the CoT base
    model of notebook 00; for a real preset its pretrained weights (offline-safe: a
    missing model fails at once with :class:`latentlib.hub.WeightsUnavailableError`)."""
    from latentlib.presets import load_model
    from latentlib.tokens import add_special_tokens
    from latentlib.training.base import load_model_dir

    if preset.source == "scratch":
        d = artifacts.require_artifact(run, "base", "cot", made_by="00_teacher_extraction.ipynb")
        return load_model_dir(d)
    from latentlib.hub import WeightsUnavailableError

    try:
        model, tokenizer = load_model(preset.name)
    except WeightsUnavailableError as e:  # the message says what to do; the library's frames do not
        raise WeightsUnavailableError(str(e)) from None
    add_special_tokens(model, tokenizer)
    return model, tokenizer


def phase1_entropies(run: str, model, tokenizer, records: Sequence, rule: SpanRule, *, separator: str = "\n",
                     teacher: str = "teacher", progress: bool = False) -> tuple[list, str]:
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
        from latentlib.teacher import load_rollouts

        rollouts = load_rollouts(run, teacher, columns=["problem", "correct", "text", "positions", "entropy"])
        n = int(rollouts["problem"].max()) + 1 if len(rollouts) else 0
        ents[:n] = sw.teacher_step_entropies(rollouts, records[:n], separator=separator, aggregate=rule.aggregate)
        covered = sum(e is not None for e in ents)
        source = f"teacher rollouts ({covered} problems)"
        if covered == 0:
            source = "gold CoT, teacher-forced (the teacher's rollouts matched no training record)"
    missing = [i for i, e in enumerate(ents) if e is None]
    if missing and (rule.pool_by is None or len(missing) == len(records)):
        todo = missing if rule.pool_by is None else missing[:2000]  # pooling needs a sample, not every record
        measured = sw.gold_step_entropies(model, tokenizer, [records[i] for i in todo], separator=separator,
                                       aggregate=rule.aggregate)
        for i, e in zip(todo, measured):
            ents[i] = e
        if len(todo) < len(records) and source.startswith("teacher"):
            source += f" + {len(todo)} teacher-forced"
    return ents, source


@dataclass
class PhaseResult:
    model: nn.Module  # the trained model (a PeftModel for LoRA presets)
    tokenizer: object
    cfg: SwitchConfig  # SWITCH settings the model was trained with
    history: list  # training rows (phase 2: with "stage")
    info: dict  # what decided the phase (span rule and threshold, per-stage evaluation, ...)
    seconds: float  # training wall time (of the run that made the artifact)
    reused: bool  # loaded from a complete artifact instead of trained


def records_fingerprint(records: Sequence) -> str:
    """A short hash of the training records (questions and answers, in order)."""
    import hashlib

    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.question}\x00{r.answer}\x01".encode())
    return h.hexdigest()[:16]


def signature(*parts) -> str:
    """A short hash of what a phase's artifact depends on (configs, the input artifact's
    completion time, the records): a complete artifact is reused only when it matches."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _written_at(directory) -> str:
    return artifacts.load_json(Path(directory) / artifacts.COMPLETE).get("written_at", "")


def _reusable(out, sig: str) -> bool:
    """A complete artifact made with the same signature (anything else is retrained)."""
    return artifacts.is_complete(out) and artifacts.load_json(Path(out) / artifacts.COMPLETE).get("signature") == sig


def check_records(directory, records, made_by: str) -> None:
    """Refuses an artifact trained on other records than ``records``."""
    meta = artifacts.load_json(Path(directory) / artifacts.COMPLETE)
    if meta.get("records") != records_fingerprint(records):
        raise ValueError(f"{directory} was trained on other training records than this notebook's (n_train, seed, "
                         f"task): use the same values as {made_by}, or a new run name")


def run_phase1(run: str, preset, splits, rule: SpanRule, train_cfg: TrainConfig, cfg: SwitchConfig, *,
               separator: str = "\n", name: str = "switch_phase1", progress: bool = True) -> PhaseResult:
    """Phase 1 as a pipeline stage: label spans, SFT, save ``runs/<run>/sft/<name>``
    (the model, ``spans.json``), reusing a complete artifact."""
    out = artifacts.artifact_dir(run, "sft", name)
    base_dir = artifacts.artifact_dir(run, "base", "cot")
    upstream = _written_at(base_dir) if artifacts.is_complete(base_dir) else preset.name
    sig = signature(asdict(rule), asdict(train_cfg), asdict(cfg), upstream, records_fingerprint(splits.train))
    if _reusable(out, sig):
        model, tok = sw.load_switch_model(out, preset.name if preset.use_lora else None)
        meta = artifacts.load_json(out / artifacts.COMPLETE)
        return PhaseResult(model, tok, sw.load_switch_config(out), meta["history"], meta["info"], meta["seconds"], True)
    model, tok = load_base(run, preset)
    ents, source = phase1_entropies(run, model, tok, splits.train, rule, separator=separator)
    spans, info = sw.label_spans(splits.train, ents, rule)
    info["entropy_source"] = source
    info["examples"] = [sw.render_switch_text(r.steps, sp, " ") for r, sp in zip(splits.train[:5], spans[:5])]
    model = sw.make_trainable(model, tok, preset)
    res = sw.train_phase1(model, tok, splits.train, spans, train_cfg, cfg, separator=separator, progress=progress)
    model.eval()
    meta = {"kind": "SWITCH phase 1 (SFT on <swi>-wrapped CoT)", "switch_config": asdict(cfg), "info": info,
            "train_config": asdict(train_cfg), "history": res.history, "seconds": res.seconds,
            "records": records_fingerprint(splits.train), "signature": sig}
    sw.save_switch_model(model, tok, out, meta)
    artifacts.save_json([[[s.start, s.end, s.wrapped] for s in sp] for sp in spans], out / "spans.json")
    return PhaseResult(model, tok, cfg, res.history, info, res.seconds, False)


def load_spans(directory) -> list[list[Span]]:
    """The spans phase 1 wrapped, per training record."""
    return [[Span(a, b, bool(w)) for a, b, w in sp] for sp in artifacts.load_json(Path(directory) / "spans.json")]


def run_phase2(run: str, preset, splits, cfg: SwitchConfig, curriculum, *, separator: str = "\n",
               name: str = "switch_phase2", eval_records: Sequence | None = None,
               progress: bool = True) -> PhaseResult:
    """Phase 2 as a pipeline stage: the parallel curriculum from phase 1's model and spans,
    evaluated after each stage on ``eval_records``, saved under
    ``runs/<run>/curriculum/<name>``; a complete artifact is reused."""
    import pandas as pd

    out = artifacts.artifact_dir(run, "curriculum", name)
    base = preset.name if preset.use_lora else None
    src = artifacts.require_artifact(run, "sft", "switch_phase1", made_by="01_sft.ipynb")
    check_records(src, splits.train, "01_sft.ipynb")
    sig = signature(asdict(cfg), asdict(curriculum), _written_at(src), len(eval_records or []))
    if _reusable(out, sig):
        model, tok = sw.load_switch_model(out, base)
        meta = artifacts.load_json(out / artifacts.COMPLETE)
        return PhaseResult(model, tok, sw.load_switch_config(out), meta["history"], meta["info"], meta["seconds"], True)
    p1 = sw.load_switch_config(src)
    if cfg.positions != p1.positions:
        raise ValueError(f"positions={cfg.positions!r} but phase 1 was trained with {p1.positions!r}: keep "
                         "phase 1's (start from load_switch_config of its artifact)")
    model, tok = sw.load_switch_model(src, base, is_trainable=True)
    spans = load_spans(src)
    rows: list[dict] = []

    def after_stage(stage):
        if eval_records is None:
            return {}
        df = sw.evaluate_switch(model, tok, eval_records, cfg, separator=separator, name=f"stage {stage}")
        row = {"stage": stage, **sw.summarize_switch(df).iloc[0].to_dict()}
        rows.append(row)
        model.train()
        return row

    results = sw.train_phase2(model, tok, splits.train, spans, cfg, curriculum, separator=separator,
                           after_stage=after_stage, progress=progress)
    model.eval()
    history, offset = [], 0
    for s in results:
        history += [{**r, "stage": s.stage, "global_step": offset + r["step"]} for r in s.result.history]
        offset += s.result.steps
    seconds = sum(s.result.seconds for s in results)
    info = {"stages": pd.DataFrame(rows).to_dict("records") if rows else []}
    meta = {"kind": "SWITCH phase 2 (parallel curriculum)", "switch_config": asdict(cfg), "info": info,
            "curriculum": asdict(curriculum), "history": history, "seconds": seconds,
            "records": records_fingerprint(splits.train), "signature": sig}
    sw.save_switch_model(model, tok, out, meta)
    return PhaseResult(model, tok, cfg, history, info, seconds, False)


def run_phase3(run: str, preset, splits, cfg: grpo.SwitchGRPOConfig, *, separator: str = "\n",
               name: str = "switch_phase3", progress: bool = True):
    """Switch-GRPO as a pipeline stage: from ``runs/<run>/curriculum/switch_phase2`` (made
    by 02_curriculum) to ``runs/<run>/grpo/<name>``, with checkpoints and exact resume; a
    complete artifact is reused."""
    out = artifacts.artifact_dir(run, "grpo", name)
    base = preset.name if preset.use_lora else None
    src = artifacts.require_artifact(run, "curriculum", "switch_phase2", made_by="02_curriculum.ipynb")
    check_records(src, splits.train, "02_curriculum.ipynb")
    sig = signature(asdict(cfg), _written_at(src))
    if _reusable(out, sig):
        model, tok = sw.load_switch_model(out, base)
        meta = artifacts.load_json(out / artifacts.COMPLETE)
        return PhaseResult(model, tok, sw.load_switch_config(out), meta["history"], meta["info"], meta["seconds"],
                           True)
    switch_cfg = sw.load_switch_config(src)
    model, tok = sw.load_switch_model(src, base, is_trainable=True)
    ckpt = out.with_name(f".{name}.ckpt")
    stamp = ckpt / "signature.json"
    if ckpt.exists() and (not stamp.is_file() or artifacts.load_json(stamp) != sig):
        shutil.rmtree(ckpt)  # a checkpoint of another configuration or input: start afresh
    ckpt.mkdir(parents=True, exist_ok=True)
    artifacts.save_json(sig, stamp)
    result = grpo.train_switch_grpo(model, tok, splits.train, cfg, switch_cfg, separator=separator,
                                    progress=progress, checkpoint_dir=ckpt)
    model.eval()
    info = {"samples": result.samples, "grpo_config": asdict(cfg)}
    meta = {"kind": "SWITCH phase 3 (Switch-GRPO)", "switch_config": asdict(switch_cfg), "info": info,
            "history": result.result.history, "seconds": result.result.seconds,
            "records": records_fingerprint(splits.train), "signature": sig}
    sw.save_switch_model(model, tok, out, meta)
    return PhaseResult(model, tok, switch_cfg, result.result.history, info, result.result.seconds, False)
