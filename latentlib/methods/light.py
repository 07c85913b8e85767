"""The light-weight methods side by side: baseline, random prefix, pause tokens
(untrained / trained), steering, UPFT and planning tokens, in the shape of the seed's
comparison matrix (accuracy, visible tokens, training time relative to the baseline).

- :func:`light_methods_table` runs every row on the embedded ``tiny`` task. The baseline
  is the from-scratch CoT base model (:func:`latentlib.training.base.train_base`); every
  trained row is trained *from scratch with the same budget* (steps, batch, lr, seed,
  data order), so "training time" compares like with like. Trained models are cached
  under ``runs/<run>/light/<name>``.
- :func:`training_free_table` runs the rows that need no training (random prefix,
  steering) on any model, e.g. ``smollm2-135m`` on ``gsm_symbolic`` problems.

Three cost columns, all relative to the baseline: ``train_time_x`` is the wall time of
each training run (noisy on a shared CPU, and cached models report the time of the run
that trained them); ``step_time_x`` is the median time of one optimizer step on that
method's batches, measured side by side in one process with the methods interleaved
(:func:`step_time_ratios`: robust to other load); ``train_tokens_x`` counts the real
(non-padding) tokens the training forwards saw.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import statistics
import time

import pandas as pd
import torch

from latentlib import artifacts
from latentlib.batching import collate, encode_record
from latentlib.evaluate import EvalSpec, evaluate, summarize
from latentlib.methods.pause import PauseConfig, pause_segments, pause_spec, train_pause
from latentlib.methods.planning import PlanningConfig, planning_segments, train_planning
from latentlib.methods.prefix import PrefixConfig, embedding_rms_table, evaluate_random_prefix
from latentlib.methods.steering import (contrast_directions, first_step_even_rate, first_step_parity_pairs,
                                        steering_sweep)
from latentlib.methods.upft import UPFTConfig, bucketed_lm_loss, collate_buckets, train_upft, upft_examples
from latentlib.training.base import (BaseConfig, cot_segments, lm_loss, load_model_dir, nocot_segments, save_model,
                                     train_base)
from latentlib.training.loop import TrainConfig, batch_indices

__all__ = ["LightConfig", "LightResult", "light_methods_table", "pause_comparison", "step_time_ratios",
           "training_free_table",
           "chat_prompt", "instruction_pairs"]


@dataclass(frozen=True)
class LightConfig:
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

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps={self.steps}: use at least 1 optimizer step")
        if not set(self.pause_kinds) <= {"nocot", "cot"}:
            raise ValueError(f"pause_kinds={self.pause_kinds}: use 'nocot' and/or 'cot'")
        if self.steer_row[0] not in self.steer_layers or self.steer_row[1] not in self.steer_coefficients:
            raise ValueError(f"steer_row={self.steer_row}: pick a (layer, coefficient) inside steer_layers "
                             f"{self.steer_layers} and steer_coefficients {self.steer_coefficients}")

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                           warmup_steps=min(self.warmup_steps, self.steps // 5), seed=self.seed,
                           log_every=max(1, self.steps // 30))


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


def _train_cached(run: str, name: str, words, seed: int, fit: Callable, meta: dict):
    """A fresh tiny model (special tokens added, as the base models have) trained by
    ``fit(model, tokenizer) -> TrainResult``, saved under ``<run>/light/<name>``; reused if complete."""
    from latentlib.presets import load_model
    from latentlib.tokens import add_special_tokens

    import json

    out = artifacts.artifact_dir(run, "light", name)
    if artifacts.is_complete(out):
        info = artifacts.load_json(out / artifacts.COMPLETE)
        saved, wanted = (json.dumps(c, sort_keys=True, default=str)
                         for c in (info.get("config"), json.loads(json.dumps(meta.get("config"), default=str))))
        if saved != wanted:
            raise ValueError(f"{out} holds a model trained with another configuration ({saved}); delete that "
                             "directory to retrain, or use another run name")
        model, tokenizer = load_model_dir(out)
        return model, tokenizer, info["seconds"], info["history"]
    model, tokenizer = load_model("tiny", words=words, seed=seed)
    add_special_tokens(model, tokenizer)
    result = fit(model, tokenizer)
    model.eval()
    save_model(model, tokenizer, out, {"kind": f"light method ({name})", **meta, "seconds": result.seconds,
                                       "history": result.history})
    return model, tokenizer, result.seconds, result.history


def light_methods_table(run: str, splits, words: list[str], cfg: LightConfig = LightConfig(), *,
                        progress: bool = False) -> LightResult:
    """Every light-weight method on the embedded task; see the module docstring."""
    from latentlib.presets import get_preset

    torch.manual_seed(cfg.seed)
    sep = get_preset("tiny").step_separator
    tc = cfg.train_config()
    test = list(splits.test)
    rows, frames, details = [], [], {}

    def add(name, model, tok, spec, *, base, training, seconds, tokens, note=""):
        df = evaluate(model, tok, test, spec, batch_size=cfg.eval_batch, progress=progress)
        df["method"] = name
        frames.append(df)
        s = summarize(df).iloc[0]
        rows.append({"method": name, "model": base, "training": training, "accuracy": s.accuracy,
                     "visible_tokens": s.visible_tokens, "train_seconds": seconds,
                     "train_tokens": round(tokens), "note": note})

    # -- base models (the baseline is the CoT model; no-CoT is the pause tokens' reference)
    cot, tok_cot, res_cot = train_base(run, BaseConfig("cot", train=tc, seed=cfg.seed), splits, words,
                                       name="cot", progress=progress)
    nocot, tok_nocot, res_nocot = train_base(run, BaseConfig("nocot", train=tc, seed=cfg.seed), splits, words,
                                             name="nocot", progress=progress)
    enc = [encode_record(tok_cot, r, sep) for r in splits.train]
    per_step = cfg.steps * cfg.batch_size
    cot_tokens = _tokens([cot_segments(e) for e in enc]) * per_step
    nocot_tokens = _tokens([nocot_segments(e) for e in enc]) * per_step
    plain = EvalSpec("", max_new_tokens=cfg.max_new_tokens)
    add("baseline (CoT)", cot, tok_cot, plain, base="cot", training="from scratch", seconds=res_cot.seconds,
        tokens=cot_tokens)
    add("no-CoT", nocot, tok_nocot, plain, base="nocot", training="from scratch", seconds=res_nocot.seconds,
        tokens=nocot_tokens)

    # -- random prefix (inference only), on both base models
    pcfg = PrefixConfig(n_prefix=cfg.n_prefix, scale=cfg.prefix_scale, num_draws=cfg.prefix_draws, seed=cfg.seed)
    for label, model, tok, res, tokens in (("CoT", cot, tok_cot, res_cot, cot_tokens),
                                           ("no-CoT", nocot, tok_nocot, res_nocot, nocot_tokens)):
        pr = evaluate_random_prefix(model, tok, test, pcfg, max_new_tokens=cfg.max_new_tokens,
                                    batch_size=cfg.eval_batch, progress=progress)
        details[f"prefix {label}"] = pr.summary
        draws = pr.per_problem[pr.per_problem.draw >= 0]
        frames.append(draws.assign(method=f"random prefix ({label})"))
        s = pr.summary
        rows.append({"method": f"random prefix ({label})", "model": label.lower().replace("-", ""),
                     "training": "none (inference)", "accuracy": s["accuracy_prefix"],
                     "visible_tokens": s["visible_tokens_prefix"], "train_seconds": res.seconds,
                     "train_tokens": round(tokens),
                     "note": f"n={cfg.n_prefix} x{cfg.prefix_scale} RMS, {cfg.prefix_draws} draws: "
                             f"range {s['accuracy_prefix_min']:.3f}-{s['accuracy_prefix_max']:.3f}, "
                             f"oracle {s['oracle_coverage']:.3f} (with baseline {s['oracle_with_baseline']:.3f})"})

    # -- pause tokens: inference-only delays in both base models, then trained with pauses
    for label, model, tok, res, tokens in (("no-CoT", nocot, tok_nocot, res_nocot, nocot_tokens),
                                           ("CoT", cot, tok_cot, res_cot, cot_tokens)):
        add(f"pause x{cfg.n_pause} untrained ({label})", model, tok,
            pause_spec(tok, cfg.n_pause, separator=sep, max_new_tokens=cfg.max_new_tokens),
            base=label.lower().replace("-", ""), training="none (inference)", seconds=res.seconds, tokens=tokens,
            note="pauses inserted at inference into a model trained without them")
    pid = tok_cot.convert_tokens_to_ids("<pause>")
    for kind in cfg.pause_kinds:
        pause_cfg = PauseConfig(n_pause=cfg.n_pause, kind=kind, train=tc)
        m, tok, secs, hist = _train_cached(run, f"pause{cfg.n_pause}_{kind}", words, cfg.seed,
                                           lambda m, t, pause_cfg=pause_cfg: train_pause(
                                               m, t, splits.train, pause_cfg, separator=sep, progress=progress),
                                           {"config": asdict(pause_cfg)})
        label = {"nocot": "no-CoT", "cot": "CoT"}[kind]
        add(f"pause x{cfg.n_pause} trained ({label})", m, tok,
            pause_spec(tok, cfg.n_pause, separator=sep, max_new_tokens=cfg.max_new_tokens),
            base=f"{kind}+pause", training="from scratch", seconds=secs,
            tokens=_tokens([pause_segments(e, pid, cfg.n_pause, kind=kind) for e in enc]) * per_step,
            note=f"question, pauses (no loss), {'steps, ' if kind == 'cot' else ''}answer; all weights trained")
        details[f"history pause {kind}"] = hist

    # -- steering the CoT model: parity of the first step
    pairs = first_step_parity_pairs(splits.valid, cfg.steer_pairs, seed=cfg.seed)
    pair_ids = [(encode_record(tok_cot, a, sep).question, encode_record(tok_cot, b, sep).question) for a, b in pairs]
    directions = contrast_directions(cot, pair_ids, cfg.steer_layers, pad_id=tok_cot.pad_token_id)
    sweep, sweep_df = steering_sweep(cot, tok_cot, test, directions, cfg.steer_coefficients,
                                     EvalSpec("steer", max_new_tokens=cfg.max_new_tokens),
                                     positions=cfg.steer_positions, readout=first_step_even_rate,
                                     batch_size=cfg.eval_batch, progress=progress)
    details["steering directions"] = pd.DataFrame([d.summary() for d in directions.values()])
    details["steering sweep"] = sweep
    layer, coef = cfg.steer_row
    chosen = sweep[(sweep.layer == layer) & (sweep.coefficient == coef)].iloc[0]
    base_row = sweep[sweep.layer == -1].iloc[0]
    frames.append(sweep_df[(sweep_df.layer == layer) & (sweep_df.coefficient == coef)].assign(method="steering"))
    rows.append({"method": f"steering (layer {layer}, x{coef:g})", "model": "cot", "training": "none (inference)",
                 "accuracy": chosen.accuracy, "visible_tokens": chosen.visible_tokens,
                 "train_seconds": res_cot.seconds, "train_tokens": round(cot_tokens),
                 "note": f"'first step even' direction (consistency {directions[layer].consistency:.2f}): "
                         f"even first steps {base_row.first_step_even:.2f} -> {chosen.first_step_even:.2f}, "
                         f"later steps follow the written first step {chosen.follows_first_step:.2f}"})

    # -- UPFT at each prefix length, from scratch with the baseline's budget
    for n in cfg.upft_tokens:
        ucfg = UPFTConfig(prefix_tokens=n, structure_ratio=cfg.upft_structure_ratio, train=tc)
        m, tok, secs, hist = _train_cached(run, f"upft{n}", words, cfg.seed,
                                           lambda m, t, ucfg=ucfg: train_upft(m, t, splits.train, ucfg, separator=sep,
                                                                              progress=progress),
                                           {"config": asdict(ucfg)})
        add(f"UPFT n={n}", m, tok, plain, base="upft", training="from scratch", seconds=secs,
            tokens=_tokens(upft_examples(enc, ucfg, seed=tc.seed)) * per_step,
            note=f"loss on the first {n} reasoning tokens; {cfg.upft_structure_ratio:.0%} whole examples")
        details[f"history upft{n}"] = hist

    # -- planning tokens, from scratch with the baseline's budget
    plan_cfg = PlanningConfig(train=tc)
    m, tok, secs, hist = _train_cached(run, "planning", words, cfg.seed,
                                       lambda m, t: train_planning(m, t, splits.train, plan_cfg, separator=sep,
                                                                   progress=progress),
                                       {"config": asdict(plan_cfg)})
    plan_id = tok.convert_tokens_to_ids(plan_cfg.token)
    add("planning tokens", m, tok, plain, base="planning", training="from scratch", seconds=secs,
        tokens=_tokens([planning_segments(e, plan_id) for e in enc]) * per_step,
        note="<plan> before every step, written by the model (not visible)")
    details["history planning"] = hist
    if cfg.planning_long_steps:
        long_cfg = PlanningConfig(train=TrainConfig(**{**asdict(tc), "steps": cfg.planning_long_steps,
                                                       "log_every": max(1, cfg.planning_long_steps // 30)}))
        m, tok, secs, hist = _train_cached(run, f"planning_{cfg.planning_long_steps}", words, cfg.seed,
                                           lambda m, t: train_planning(m, t, splits.train, long_cfg, separator=sep,
                                                                       progress=progress),
                                           {"config": asdict(long_cfg)})
        add(f"planning tokens ({cfg.planning_long_steps} steps)", m, tok, plain, base="planning",
            training="from scratch", seconds=secs,
            tokens=_tokens([planning_segments(e, plan_id) for e in enc]) * cfg.planning_long_steps * cfg.batch_size,
            note=f"the same recipe with {cfg.planning_long_steps / cfg.steps:g}x the steps")
        details[f"history planning_{cfg.planning_long_steps}"] = hist

    # -- cost of one step of each training recipe, side by side
    def fresh():
        from latentlib.presets import load_model
        from latentlib.tokens import add_special_tokens

        m, t = load_model("tiny", words=words, seed=cfg.seed)
        add_special_tokens(m, t, ("<bot>", "<eot>", "<latent>", "<swi>", "</swi>", "<pause>", plan_cfg.token))
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
    recipe_of = {"baseline (CoT)": "cot", "no-CoT": "nocot", "random prefix (CoT)": "cot",
                 "random prefix (no-CoT)": "nocot", f"pause x{cfg.n_pause} untrained (no-CoT)": "nocot",
                 f"pause x{cfg.n_pause} untrained (CoT)": "cot",
                 f"pause x{cfg.n_pause} trained (no-CoT)": "pause nocot",
                 f"pause x{cfg.n_pause} trained (CoT)": "pause cot",
                 f"steering (layer {layer}, x{coef:g})": "cot", "planning tokens": "planning",
                 f"planning tokens ({cfg.planning_long_steps} steps)": "planning",
                 **{f"UPFT n={n}": f"upft{n}" for n in cfg.upft_tokens}}

    table = pd.DataFrame(rows)
    table.insert(6, "train_time_x", (table.train_seconds / res_cot.seconds).round(2))
    table.insert(7, "step_time_x", [ratios[recipe_of[m]] for m in table.method])
    table.insert(8, "train_tokens_x", (table.train_tokens / round(cot_tokens)).round(2))
    table["train_seconds"] = table.train_seconds.round(1)
    details["embedding_rms"] = embedding_rms_table(("tiny",), models={"tiny (trained CoT base)": cot}, words=words)
    details["config"] = asdict(cfg)
    return LightResult(table=table, per_problem=pd.concat(frames, ignore_index=True), details=details)


def pause_comparison(run: str, splits, words: list[str], cfg: LightConfig = LightConfig(), *,
                     progress: bool = False) -> pd.DataFrame:
    """No-CoT against pause tokens on one task: the no-CoT base model, the same model with
    ``n_pause`` pauses inserted at inference (untrained), and a model trained from scratch
    with the pauses (same budget). Use a ``run`` per task (e.g. ``tiny_k3`` for K=3)."""
    from latentlib.presets import get_preset

    sep = get_preset("tiny").step_separator
    tc = cfg.train_config()
    nocot, tok, res = train_base(run, BaseConfig("nocot", train=tc, seed=cfg.seed), splits, words, name="nocot",
                                 progress=progress)
    pause_cfg = PauseConfig(n_pause=cfg.n_pause, kind="nocot", train=tc)
    paused, ptok, secs, _ = _train_cached(run, f"pause{cfg.n_pause}_nocot", words, cfg.seed,
                                          lambda m, t: train_pause(m, t, splits.train, pause_cfg, separator=sep,
                                                                   progress=progress),
                                          {"config": asdict(pause_cfg)})
    rows = []
    for name, model, t, spec, seconds in (
            ("no-CoT", nocot, tok, EvalSpec("", max_new_tokens=cfg.max_new_tokens), res.seconds),
            (f"pause x{cfg.n_pause} untrained", nocot, tok,
             pause_spec(tok, cfg.n_pause, separator=sep, max_new_tokens=cfg.max_new_tokens), res.seconds),
            (f"pause x{cfg.n_pause} trained", paused, ptok,
             pause_spec(ptok, cfg.n_pause, separator=sep, max_new_tokens=cfg.max_new_tokens), secs)):
        df = evaluate(model, t, list(splits.test), spec, batch_size=cfg.eval_batch, progress=progress)
        s = summarize(df).iloc[0]
        rows.append({"method": name, "accuracy": s.accuracy, "visible_tokens": s.visible_tokens,
                     "distinct_answers": int(df.extracted_strict.nunique()), "train_seconds": round(seconds, 1)})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- real models, no training


def chat_prompt(tokenizer, instruction: str = "Solve the problem step by step. Write the final answer on the "
                                                 "last line as '#### N'.") -> Callable:
    """record -> prompt ids: the question (and ``instruction``) as a user turn of the chat template."""

    def prompt(record):
        text = tokenizer.apply_chat_template([{"role": "user", "content": f"{record.question}\n{instruction}"}],
                                             tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return prompt


def instruction_pairs(tokenizer, records: Sequence, positive: str, negative: str) -> list[tuple[list, list]]:
    """Contrast pairs: each question as a chat prompt with the positive and the negative
    instruction (e.g. "reason step by step" against "reply with only the number")."""
    pos, neg = chat_prompt(tokenizer, positive), chat_prompt(tokenizer, negative)
    return [(pos(r), neg(r)) for r in records]


def training_free_table(model, tokenizer, records: Sequence, *, prompt: Callable, pairs: Sequence,
                        layers: Sequence[int], coefficients: Sequence[float], prefix: PrefixConfig = PrefixConfig(),
                        positions: str = "all", max_new_tokens: int = 160, grade_mode: str = "strict",
                        batch_size: int = 50, progress: bool = False) -> LightResult:
    """Baseline, random prefix and a steering sweep on any model (no training).

    ``prompt``: record -> ids (e.g. :func:`chat_prompt`); ``pairs``: contrast pairs of
    ids for the steering direction (e.g. :func:`instruction_pairs` on other problems).
    """
    details: dict = {"embedding_rms": embedding_rms_table((), models={"model": model})}
    pr = evaluate_random_prefix(model, tokenizer, records, prefix, prompt=prompt, max_new_tokens=max_new_tokens,
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
    sweep, sweep_df = steering_sweep(model, tokenizer, records, directions, coefficients, spec, positions=positions,
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
