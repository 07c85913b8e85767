"""Stage ``light`` (notebook 04 with ``light_training``): the light-weight methods side by
side: baseline, random prefix, pause tokens (untrained / trained), steering, UPFT and
planning tokens, in the shape of the seed's comparison matrix (accuracy, visible tokens,
training cost relative to the baseline).

- :func:`light_methods_table` runs every row on a from-scratch preset. The baseline is the
  CoT base model with the same budget as every trained row (notebook 00's ``base/cot``
  when it was trained with that budget, else one trained here); every trained row is
  trained *from scratch with the same budget* (steps, batch, lr, seed, data order), so
  "training time" compares like with like. Trained models are artifacts under
  ``runs/<run>/light/<name>``, reused under the one reuse rule.
- :func:`training_free_table` runs the rows that need no training (random prefix,
  steering) on any model, e.g. a pretrained preset with chat prompts.

Three cost columns, all relative to the baseline: ``train_time_x`` is the wall time of
each training run (noisy on a shared CPU, and reused models report the time of the run
that trained them); ``step_time_x`` is the median time of one optimizer step on that
method's batches, measured side by side in one process with the methods interleaved
(:func:`step_time_ratios`: robust to other load); ``train_tokens_x`` counts the real
(non-padding) tokens the training forwards saw.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import pandas as pd
import torch

from latentlib import artifacts
from latentlib.batching import collate, cot_segments, encode_record, nocot_segments
from latentlib.evaluate import EvalSpec, evaluate, summarize
from latentlib.methods.light.pause import PauseConfig, pause_segments, pause_spec, train_pause
from latentlib.methods.light.planning import PlanningConfig, planning_segments, train_planning
from latentlib.methods.light.prefix import PrefixConfig, embedding_rms_table, evaluate_random_prefix
from latentlib.methods.light.steering import (contrast_directions, first_step_even_rate, first_step_parity_pairs,
                                              steering_sweep)
from latentlib.methods.light.upft import UPFTConfig, bucketed_lm_loss, collate_buckets, train_upft, upft_examples
from latentlib.presets import get_preset, load_model
from latentlib.stages.base import BaseModelsConfig, base_model, task_of
from latentlib.stages.reuse import build_or_reuse, checkpoint_every
from latentlib.tasks import Format, TaskConfig
from latentlib.tokens import add_special_tokens
from latentlib.training.loop import TrainConfig, batch_indices
from latentlib.training.losses import lm_loss

__all__ = ["LightConfig", "LightResult", "light_methods_table", "step_time_ratios", "training_free_table"]

ALL_TOKENS = ("<bot>", "<eot>", "<latent>", "<swi>", "</swi>", "<pause>")


@dataclass(frozen=True)
class LightConfig:
    model: str = "tiny"  # preset (a from-scratch one: every trained row starts from a random model)
    task: TaskConfig = TaskConfig()  # the task (notebook 00's splits)
    steps: int = 600  # optimizer steps of the baseline and of every trained row
    batch_size: int = 128  # training batch
    lr: float = 3e-3  # peak learning rate
    warmup_steps: int = 100  # linear warmup
    seed: int = 0  # initialisation, data order, prefix draws, contrast pairs
    n_prefix: int = 2  # random prefix: vectors per prompt
    prefix_scale: float = 1.0  # random prefix: RMS in units of the embedding RMS
    prefix_draws: int = 4  # random prefix: draws per problem (oracle coverage over them)
    n_pause: int = 4  # pause tokens between question and answer
    pause_kinds: tuple[str, ...] = ("nocot", "cot")  # formats trained with pauses: question, pauses, (steps,) answer
    upft_tokens: tuple[int, ...] = (8, 3)  # UPFT prefix lengths n (8: the paper's; the chain's reasoning is 6 tokens)
    upft_structure_ratio: float = 0.1  # UPFT: share of whole examples
    steer_pairs: int = 128  # contrast pairs for the steering direction (from the valid split)
    steer_layers: tuple[int, ...] = (0, 1, 2, 3)  # decoder layers swept
    steer_coefficients: tuple[float, ...] = (-2.0, -1.0, -0.5, 0.5, 1.0, 2.0)  # coefficients swept
    steer_positions: str = "prompt"  # "prompt" (ActAdd) or "all" positions
    steer_row: tuple[int, float] = (0, 1.0)  # (layer, coefficient) shown in the table
    planning_long_steps: int = 0  # > 0: also train planning tokens with this budget (a row "planning tokens (N steps)")
    eval_batch: int = 250  # evaluation batch
    max_new_tokens: int = 24  # generation budget (CoT with planning tokens writes 14 tokens + eos)
    checkpoint_every: int = 0  # optimizer steps between checkpoints of each trained row (0: only the final one)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps={self.steps}: use at least 1 optimizer step")
        if not set(self.pause_kinds) <= {"nocot", "cot"}:
            raise ValueError(f"pause_kinds={self.pause_kinds}: use 'nocot' and/or 'cot'")
        if len(self.steer_row) != 2:
            raise ValueError(f"steer_row={self.steer_row}: give (layer, coefficient), e.g. (0, 1.0)")
        if self.steer_row[0] not in self.steer_layers or self.steer_row[1] not in self.steer_coefficients:
            raise ValueError(f"steer_row={self.steer_row}: pick a (layer, coefficient) inside steer_layers "
                             f"{self.steer_layers} and steer_coefficients {self.steer_coefficients}")

    @classmethod
    def from_params(cls, p) -> LightConfig:
        """Notebook 04's parameters (``seed``, ``checkpoint_every`` and the task's); the rest are the defaults."""
        return cls(model=p["model"], task=TaskConfig.from_params(p, get_preset(p["model"]).task), seed=int(p["seed"]),
                   checkpoint_every=checkpoint_every(p))

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                           warmup_steps=min(self.warmup_steps, self.steps // 5), seed=self.seed,
                           log_every=max(1, self.steps // 30), checkpoint_every=self.checkpoint_every)


@dataclass
class LightResult:
    table: pd.DataFrame  # the comparison matrix, one row per method
    per_problem: pd.DataFrame  # every evaluated problem of every row
    details: dict = field(default_factory=dict)  # prefix summary, steering sweep and directions, histories, RMS


def _tokens(examples) -> float:
    """Mean real tokens per training example."""
    return sum(sum(len(ids) for _, ids in ex) for ex in examples) / len(examples)


def step_time_ratios(make_model: Callable, methods: dict[str, tuple], *, batch_size: int, rounds: int = 12,
                     seed: int = 0, baseline: str | None = None) -> dict[str, float]:
    """Median seconds of one training step (forward, backward, AdamW) per method, relative
    to ``baseline`` (default the first method), measured side by side in one process.

    ``methods``: ``{name: (examples, make_batch, loss_fn)}``; ``make_model()`` returns a
    fresh model with every token the examples use. Each round runs one step of every
    method in turn on the same batch indices, so background load hits all of them alike.
    """
    models = {name: make_model() for name in methods}
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(rounds + 1):  # round 0 warms up
        for name, (examples, make_batch, loss_fn) in methods.items():
            model, opt = models[name], opts[name]
            model.train()
            batch = make_batch([examples[i] for i in batch_indices(len(examples), batch_size, r, seed)])
            t0 = time.perf_counter()
            loss, _ = loss_fn(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if r:
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) for name, v in times.items()}
    ref = med[baseline or next(iter(methods))]
    return {name: round(v / ref, 3) for name, v in med.items()}


def _light_model(run: str, cfg: LightConfig, name: str, method_cfg, fit: Callable, progress: bool):
    """A fresh from-scratch model (special tokens added, as the base models have) trained by
    ``fit(model, tokenizer, checkpoint_dir) -> TrainResult``, the artifact ``<run>/light/<name>``.
    Returns ``(model, tokenizer, seconds, history)``."""
    preset, task = task_of(cfg.model, cfg.task)
    out = artifacts.artifact_dir(run, "light", name)

    def build(record, checkpoint):
        model, tokenizer = load_model(preset.name, words=list(task.words), seed=cfg.seed)
        add_special_tokens(model, tokenizer)
        result = fit(model, tokenizer, checkpoint)
        model.eval()
        artifacts.save_model(model, tokenizer, out, {"kind": f"light method ({name})", **record, "seed": cfg.seed,
                                                     "seconds": result.seconds, "history": result.history})
        return model, tokenizer

    built = build_or_reuse(out, {"model": preset.name, "task": cfg.task, "method": method_cfg, "seed": cfg.seed},
                           {"records": task.digest}, build=build, load=lambda d, meta: artifacts.load_model_dir(d),
                           label=f"light/{name}", verbose=progress)
    model, tokenizer = built.value
    return model, tokenizer, built.meta["seconds"], built.meta["history"]


class _Rows:
    """The comparison matrix being built: one table row and the per-problem rows of each method."""

    def __init__(self, cfg: LightConfig, test: list, fmt: Format, progress: bool):
        self.cfg, self.test, self.fmt, self.progress = cfg, test, fmt, progress
        self.rows: list[dict] = []
        self.frames: list[pd.DataFrame] = []

    def add(self, name, model, tok, spec, *, base, training, seconds, tokens, note=""):
        df = evaluate(model, tok, self.test, spec, self.fmt, batch_size=self.cfg.eval_batch, progress=self.progress)
        df["method"] = name
        self.frames.append(df)
        s = summarize(df).iloc[0]
        self.rows.append({"method": name, "model": base, "training": training, "accuracy": s.accuracy,
                          "visible_tokens": s.visible_tokens, "train_seconds": seconds, "train_tokens": round(tokens),
                          "note": note})


def _prefix_rows(rows: _Rows, bases: dict, details: dict) -> None:
    """Random prefix (inference only), on both base models."""
    cfg = rows.cfg
    pcfg = PrefixConfig(n_prefix=cfg.n_prefix, scale=cfg.prefix_scale, num_draws=cfg.prefix_draws, seed=cfg.seed)
    for label, (model, tok, res, tokens) in bases.items():
        pr = evaluate_random_prefix(model, tok, rows.test, pcfg, rows.fmt, max_new_tokens=cfg.max_new_tokens,
                                    batch_size=cfg.eval_batch, progress=rows.progress)
        details[f"prefix {label}"] = pr.summary
        draws = pr.per_problem[pr.per_problem.draw >= 0]
        rows.frames.append(draws.assign(method=f"random prefix ({label})"))
        s = pr.summary
        rows.rows.append({"method": f"random prefix ({label})", "model": label.lower().replace("-", ""),
                          "training": "none (inference)", "accuracy": s["accuracy_prefix"],
                          "visible_tokens": s["visible_tokens_prefix"], "train_seconds": res.seconds,
                          "train_tokens": round(tokens),
                          "note": f"n={cfg.n_prefix} x{cfg.prefix_scale} RMS, {cfg.prefix_draws} draws: "
                                  f"range {s['accuracy_prefix_min']:.3f}-{s['accuracy_prefix_max']:.3f}, "
                                  f"oracle {s['oracle_coverage']:.3f} (with baseline {s['oracle_with_baseline']:.3f})"})


def _steering_row(rows: _Rows, splits, cot, tok_cot, res_cot, cot_tokens, details: dict) -> None:
    """Steering the CoT model: the parity of the first step."""
    cfg = rows.cfg
    pairs = first_step_parity_pairs(splits.valid, cfg.steer_pairs, seed=cfg.seed)
    pair_ids = [(encode_record(tok_cot, a, rows.fmt).question, encode_record(tok_cot, b, rows.fmt).question)
                for a, b in pairs]
    directions = contrast_directions(cot, pair_ids, cfg.steer_layers, pad_id=tok_cot.pad_token_id)
    sweep, sweep_df = steering_sweep(cot, tok_cot, rows.test, directions, cfg.steer_coefficients,
                                     EvalSpec("steer", max_new_tokens=cfg.max_new_tokens), rows.fmt,
                                     positions=cfg.steer_positions, readout=first_step_even_rate,
                                     batch_size=cfg.eval_batch, progress=rows.progress)
    details["steering directions"] = pd.DataFrame([d.summary() for d in directions.values()])
    details["steering sweep"] = sweep
    layer, coef = cfg.steer_row
    chosen = sweep[(sweep.layer == layer) & (sweep.coefficient == coef)].iloc[0]
    base_row = sweep[sweep.layer == -1].iloc[0]
    rows.frames.append(sweep_df[(sweep_df.layer == layer) & (sweep_df.coefficient == coef)].assign(method="steering"))
    rows.rows.append({"method": f"steering (layer {layer}, x{coef:g})", "model": "cot", "training": "none (inference)",
                      "accuracy": chosen.accuracy, "visible_tokens": chosen.visible_tokens,
                      "train_seconds": res_cot.seconds, "train_tokens": round(cot_tokens),
                      "note": f"'first step even' direction (consistency {directions[layer].consistency:.2f}): "
                              f"even first steps {base_row.first_step_even:.2f} -> {chosen.first_step_even:.2f}, "
                              f"later steps follow the written first step {chosen.follows_first_step:.2f}"})


@dataclass
class _Trained:
    seconds: float
    history: list


def light_methods_table(run: str, cfg: LightConfig = LightConfig(), *, progress: bool = False) -> LightResult:
    """Every light-weight method on the task of ``cfg``; see the module docstring."""
    torch.manual_seed(cfg.seed)
    preset, task = task_of(cfg.model, cfg.task)
    if preset.source != "scratch":
        raise ValueError(f"light_methods_table trains every row from scratch; preset {preset.name!r} is pretrained: "
                         "use training_free_table for it")
    splits, fmt = task.splits, task.format
    tc = cfg.train_config()
    rows = _Rows(cfg, list(splits.test), fmt, progress)
    details: dict = {}

    # -- base models with the rows' budget (the baseline is the CoT model; no-CoT is the pause tokens' reference)
    base_cfg = BaseModelsConfig(model=cfg.model, task=cfg.task, train=tc, seed=cfg.seed)
    trained = {kind: base_model(run, base_cfg, kind, stage="light", progress=progress) for kind in ("cot", "nocot")}
    (cot, tok_cot), (nocot, tok_nocot) = [(trained[k].model, trained[k].tokenizer) for k in ("cot", "nocot")]
    res_cot, res_nocot = [_Trained(trained[k].seconds, trained[k].history) for k in ("cot", "nocot")]
    enc = [encode_record(tok_cot, r, fmt) for r in splits.train]
    per_step = cfg.steps * cfg.batch_size
    cot_tokens = _tokens([cot_segments(e) for e in enc]) * per_step
    nocot_tokens = _tokens([nocot_segments(e) for e in enc]) * per_step
    plain = EvalSpec("", max_new_tokens=cfg.max_new_tokens)
    rows.add("baseline (CoT)", cot, tok_cot, plain, base="cot", training="from scratch", seconds=res_cot.seconds,
             tokens=cot_tokens)
    rows.add("no-CoT", nocot, tok_nocot, plain, base="nocot", training="from scratch", seconds=res_nocot.seconds,
             tokens=nocot_tokens)
    _prefix_rows(rows, {"CoT": (cot, tok_cot, res_cot, cot_tokens), "no-CoT": (nocot, tok_nocot, res_nocot,
                                                                               nocot_tokens)}, details)

    # -- pause tokens: inference-only delays in both base models, then trained with pauses
    for label, model, tok, res, tokens in (("no-CoT", nocot, tok_nocot, res_nocot, nocot_tokens),
                                           ("CoT", cot, tok_cot, res_cot, cot_tokens)):
        rows.add(f"pause x{cfg.n_pause} untrained ({label})", model, tok,
                 pause_spec(tok, cfg.n_pause, fmt, max_new_tokens=cfg.max_new_tokens),
                 base=label.lower().replace("-", ""), training="none (inference)", seconds=res.seconds,
                 tokens=tokens, note="pauses inserted at inference into a model trained without them")
    pid = tok_cot.convert_tokens_to_ids("<pause>")
    for kind in cfg.pause_kinds:
        pause_cfg = PauseConfig(n_pause=cfg.n_pause, kind=kind, train=tc)
        m, tok, secs, hist = _light_model(run, cfg, f"pause{cfg.n_pause}_{kind}", pause_cfg,
                                          lambda m, t, ck, pc=pause_cfg: train_pause(m, t, splits.train, pc, fmt,
                                                                                      checkpoint_dir=ck,
                                                                                      progress=progress), progress)
        label = {"nocot": "no-CoT", "cot": "CoT"}[kind]
        rows.add(f"pause x{cfg.n_pause} trained ({label})", m, tok,
                 pause_spec(tok, cfg.n_pause, fmt, max_new_tokens=cfg.max_new_tokens),
                 base=f"{kind}+pause", training="from scratch", seconds=secs,
                 tokens=_tokens([pause_segments(e, pid, cfg.n_pause, kind=kind) for e in enc]) * per_step,
                 note=f"question, pauses (no loss), {'steps, ' if kind == 'cot' else ''}answer; all weights trained")
        details[f"history pause {kind}"] = hist

    _steering_row(rows, splits, cot, tok_cot, res_cot, cot_tokens, details)

    # -- UPFT at each prefix length, from scratch with the baseline's budget
    for n in cfg.upft_tokens:
        ucfg = UPFTConfig(prefix_tokens=n, structure_ratio=cfg.upft_structure_ratio, train=tc)
        m, tok, secs, hist = _light_model(run, cfg, f"upft{n}", ucfg,
                                          lambda m, t, ck, uc=ucfg: train_upft(m, t, splits.train, uc, fmt,
                                                                               checkpoint_dir=ck, progress=progress),
                                          progress)
        rows.add(f"UPFT n={n}", m, tok, plain, base="upft", training="from scratch", seconds=secs,
                 tokens=_tokens(upft_examples(enc, ucfg, seed=tc.seed)) * per_step,
                 note=f"loss on the first {n} reasoning tokens; {cfg.upft_structure_ratio:.0%} whole examples")
        details[f"history upft{n}"] = hist

    # -- planning tokens, from scratch with the baseline's budget (and optionally a longer one)
    plan_cfg = PlanningConfig(train=tc)
    budgets = {"planning": (plan_cfg, "planning tokens", cfg.steps)}
    if cfg.planning_long_steps:
        long = PlanningConfig(train=replace(tc, steps=cfg.planning_long_steps,
                                            log_every=max(1, cfg.planning_long_steps // 30)))
        budgets[f"planning_{cfg.planning_long_steps}"] = (long, f"planning tokens ({cfg.planning_long_steps} steps)",
                                                          cfg.planning_long_steps)
    plan_id = None
    for name, (pc, label, steps) in budgets.items():
        m, tok, secs, hist = _light_model(run, cfg, name, pc,
                                          lambda m, t, ck, pc=pc: train_planning(m, t, splits.train, pc, fmt,
                                                                                 checkpoint_dir=ck, progress=progress),
                                          progress)
        plan_id = tok.convert_tokens_to_ids(pc.token)
        rows.add(label, m, tok, plain, base="planning", training="from scratch", seconds=secs,
                 tokens=_tokens([planning_segments(e, plan_id) for e in enc]) * steps * cfg.batch_size,
                 note="<plan> before every step, written by the model (not visible)" if name == "planning"
                 else f"the same recipe with {steps / cfg.steps:g}x the steps")
        details[f"history {name}"] = hist

    # -- cost of one step of each training recipe, side by side
    def fresh():
        m, t = load_model(preset.name, words=list(task.words), seed=cfg.seed)
        add_special_tokens(m, t, (*ALL_TOKENS, plan_cfg.token))
        return m

    pad = tok_cot.pad_token_id
    by_collate = (lambda b: collate(b, pad)), lm_loss
    recipes = {"cot": ([cot_segments(e) for e in enc], *by_collate),
               "nocot": ([nocot_segments(e) for e in enc], *by_collate),
               **{f"pause {k}": ([pause_segments(e, pid, cfg.n_pause, kind=k) for e in enc], *by_collate)
                  for k in cfg.pause_kinds},
               "planning": ([planning_segments(e, plan_id) for e in enc], *by_collate)}
    for n in cfg.upft_tokens:
        ucfg = UPFTConfig(prefix_tokens=n, structure_ratio=cfg.upft_structure_ratio, train=tc)
        recipes[f"upft{n}"] = (upft_examples(enc, ucfg, seed=tc.seed), lambda b: collate_buckets(b, pad),
                               bucketed_lm_loss)
    ratios = step_time_ratios(fresh, recipes, batch_size=cfg.batch_size, seed=cfg.seed)
    details["step_time_ratios"] = ratios
    layer, coef = cfg.steer_row
    recipe_of = {"baseline (CoT)": "cot", "no-CoT": "nocot", "random prefix (CoT)": "cot",
                 "random prefix (no-CoT)": "nocot", f"pause x{cfg.n_pause} untrained (no-CoT)": "nocot",
                 f"pause x{cfg.n_pause} untrained (CoT)": "cot",
                 f"pause x{cfg.n_pause} trained (no-CoT)": "pause nocot",
                 f"pause x{cfg.n_pause} trained (CoT)": "pause cot",
                 f"steering (layer {layer}, x{coef:g})": "cot", "planning tokens": "planning",
                 f"planning tokens ({cfg.planning_long_steps} steps)": "planning",
                 **{f"UPFT n={n}": f"upft{n}" for n in cfg.upft_tokens}}

    table = pd.DataFrame(rows.rows)
    table.insert(6, "train_time_x", (table.train_seconds / res_cot.seconds).round(2))
    table.insert(7, "step_time_x", [ratios[recipe_of[m]] for m in table.method])
    table.insert(8, "train_tokens_x", (table.train_tokens / round(cot_tokens)).round(2))
    table["train_seconds"] = table.train_seconds.round(1)
    details["embedding_rms"] = embedding_rms_table((preset.name,), models={f"{preset.name} (trained CoT base)": cot},
                                                   words=list(task.words))
    details["config"] = cfg
    return LightResult(table=table, per_problem=pd.concat(rows.frames, ignore_index=True), details=details)


# ---------------------------------------------------------------------------- any model, no training


def training_free_table(model, tokenizer, records: Sequence, fmt: Format, *, prompt: Callable, pairs: Sequence,
                        layers: Sequence[int], coefficients: Sequence[float], prefix: PrefixConfig = PrefixConfig(),
                        positions: str = "all", max_new_tokens: int = 160, grade_mode: str = "strict",
                        batch_size: int = 50, progress: bool = False) -> LightResult:
    """Baseline, random prefix and a steering sweep on any model (no training).

    ``prompt``: record -> ids (e.g. :func:`chat_prompt`); ``pairs``: contrast pairs of
    ids for the steering direction (e.g. :func:`instruction_pairs` on other problems).
    """
    details: dict = {"embedding_rms": embedding_rms_table((), models={"model": model})}
    pr = evaluate_random_prefix(model, tokenizer, records, prefix, fmt, prompt=prompt, max_new_tokens=max_new_tokens,
                                grade_mode=grade_mode, batch_size=batch_size, progress=progress)
    details["prefix"] = pr.summary
    s = pr.summary
    rows = [{"method": "baseline", "accuracy": s["accuracy_baseline"],
             "accuracy_flexible": s["accuracy_baseline_flexible"], "visible_tokens": s["visible_tokens_baseline"],
             "note": ""},
            {"method": f"random prefix (n={prefix.n_prefix}, x{prefix.scale:g} RMS)", "accuracy": s["accuracy_prefix"],
             "accuracy_flexible": s["accuracy_prefix_flexible"], "visible_tokens": s["visible_tokens_prefix"],
             "note": f"{prefix.num_draws} draws: oracle {s['oracle_coverage']:.3f} (flexible "
                     f"{s['oracle_coverage_flexible']:.3f}), answer changed {s['answer_changed']:.2f}"}]
    directions = contrast_directions(model, pairs, layers, pad_id=tokenizer.pad_token_id, batch_size=batch_size)
    details["steering directions"] = pd.DataFrame([d.summary() for d in directions.values()])
    spec = EvalSpec("steer", prompt=prompt, max_new_tokens=max_new_tokens, grade_mode=grade_mode)
    baseline = pr.per_problem[pr.per_problem.draw == -1].drop(columns=["draw", "problem"]).reset_index(drop=True)
    sweep, sweep_df = steering_sweep(model, tokenizer, records, directions, coefficients, spec, fmt, positions=positions,
                                     unsteered=baseline, batch_size=batch_size, progress=progress)
    details["steering sweep"] = sweep
    for _, r in sweep[sweep.layer >= 0].iterrows():
        d = directions[int(r.layer)]
        rows.append({"method": f"steering (layer {int(r.layer)}, x{r.coefficient:g})", "accuracy": r.accuracy,
                     "accuracy_flexible": r.accuracy_flexible, "visible_tokens": r.visible_tokens,
                     "note": f"consistency {d.consistency:.2f}, |v| {d.norm:.1f} vs |h| {d.activation_norm:.1f}, "
                             f"answer changed {r.answer_changed:.2f}"})
    per_problem = pd.concat([pr.per_problem.assign(layer=-1, coefficient=0.0),
                             sweep_df[sweep_df.layer >= 0]], ignore_index=True)
    return LightResult(table=pd.DataFrame(rows), per_problem=per_problem, details=details)
