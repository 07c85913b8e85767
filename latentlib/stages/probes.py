"""Notebook 05's inputs and its one measurement that runs the methods themselves: the
ablations of the injected states; and notebook 06's, the latent search on a graph task:
the Coconut model forced to write after k thoughts, and its thoughts read against the
graph's nodes. The other measurements are :mod:`latentlib.probes` functions called on the
models this module loads; nothing here trains."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from latentlib import artifacts
from latentlib.evaluate import evaluate
from latentlib.injection import make_injector
from latentlib.methods import switch as sw
from latentlib.methods.coconut import SavedCoconut, eval_spec
from latentlib.stages.coconut import load_coconut_run
from latentlib.presets import get_preset
from latentlib.probes import ABLATIONS, AblatedInjector, collect_traces, lens_step_matrix, stack_thoughts
from latentlib.stages.base import load_trained, task_of
from latentlib.stages.switch import latest_switch_model
from latentlib.tasks import Task, TaskConfig

__all__ = ["ProbeModels", "probe_models", "ablations", "coconut_lens", "LatentSearchModels", "latent_search_models",
           "forced_switch", "latent_nodes"]


@dataclass
class ProbeModels:
    task: Task  # the task (its test split is what every probe runs on)
    switch_model: object  # the run's latest SWITCH phase
    switch_tokenizer: object
    switch_config: sw.SwitchConfig  # its K_min, K_max, positions, injection
    switch_name: str  # "SWITCH phase 3" (or phase 2 when 03 has not run)
    coconut: dict[str, SavedCoconut]  # the two last-stage Coconut models, by format

    def summary(self) -> pd.DataFrame:
        """What each model thinks with."""
        s = self.switch_config
        return pd.DataFrame([{"model": self.switch_name, "thoughts": f"blocks of {s.k_min}..{s.k_max}",
                              "injection": s.injection, "positions": s.positions}]
                            + [{"model": f"Coconut ({fmt})", "thoughts": c.config.c_thought * c.config.max_latent_stage,
                                "injection": c.config.injection, "positions": c.config.latent_positions}
                               for fmt, c in self.coconut.items()])


def probe_models(run: str, model: str, task: TaskConfig) -> ProbeModels:
    """The latest SWITCH phase of the run and the Coconut models of notebook 02."""
    preset, t = task_of(model, task)
    switch_model, switch_tok, switch_cfg, name = latest_switch_model(run, get_preset(model))
    coconut = {fmt: load_coconut_run(run, preset, f"coconut_{fmt}") for fmt in ("plain", "markers")}
    return ProbeModels(t, switch_model, switch_tok, switch_cfg, name, coconut)


def ablations(models: ProbeModels, *, seed: int = 0, batch_size: int = 250) -> tuple[dict, pd.DataFrame]:
    """Each model on the test split as evaluated, with its injected states unablated
    (``none``), zeroed, replaced by random vectors of the same norm, or shuffled across the
    batch. Returns the per-problem frames by ``(model, ablation)`` and a table with the
    accuracy on every problem and on the *diagnostic subset* (for SWITCH the problems on
    which the unablated model opens a block; for Coconut every problem thinks)."""
    test, fmt = models.task.splits.test, models.task.format

    def injector(model, spec, mode):
        return AblatedInjector(make_injector(spec, model), mode, seed=seed)

    frames = {}
    for mode in ABLATIONS:
        frames[(models.switch_name, mode)] = sw.evaluate_switch(
            models.switch_model, models.switch_tokenizer, test, models.switch_config, fmt, name=models.switch_name,
            injector=injector(models.switch_model, models.switch_config.injection, mode), batch_size=batch_size)
    for fmt_name, c in models.coconut.items():
        for mode in ABLATIONS:
            inj = AblatedInjector(c.injector, mode, seed=seed)
            spec = eval_spec(c.curriculum.last_stage, c.config, c.tokenizer, fmt, injector=inj,
                             name=f"Coconut ({fmt_name})")
            frames[(f"Coconut ({fmt_name})", mode)] = evaluate(c.model, c.tokenizer, test, spec, fmt,
                                                               batch_size=batch_size, progress=False)
    rows = []
    for (name, mode), df in frames.items():
        clean = frames[(name, "none")]
        diagnostic = clean.blocks > 0 if "blocks" in clean else pd.Series(True, index=clean.index)
        rows.append({"model": name, "ablation": mode, "accuracy": df.correct.mean(),
                     "diagnostic_accuracy": df.correct[diagnostic.values].mean() if diagnostic.any() else float("nan"),
                     "diagnostic_n": int(diagnostic.sum()), "latent_steps": df.latent_steps.mean(),
                     "visible_tokens": df.visible_tokens.mean()})
    return frames, pd.DataFrame(rows)


def coconut_lens(models: ProbeModels, *, batch_size: int = 250) -> tuple[dict, dict]:
    """The logit lens of each Coconut model's thoughts on the test split: per model, the
    ``(K, S)`` matrix of :func:`latentlib.probes.lens_step_matrix` and the thoughts
    ``(N, K, D)`` themselves."""
    test, fmt = models.task.splits.test, models.task.format
    lens, vectors = {}, {}
    for fmt_name, c in models.coconut.items():
        name = f"Coconut ({fmt_name})"
        spec = eval_spec(c.curriculum.last_stage, c.config, c.tokenizer, fmt, injector=c.injector, name=name)
        traces = collect_traces(c.model, c.tokenizer, test, spec, fmt, capture_layers=(), batch_size=batch_size)
        vectors[name] = stack_thoughts(traces)
        lens[name] = lens_step_matrix(c.model, c.tokenizer, vectors[name], [list(r.steps) for r in test])
    return lens, vectors


# ---------------------------------------------------------------------------- notebook 06: the latent search


@dataclass
class LatentSearchModels:
    task: Task  # a graph task (its records carry the graph in meta)
    base: dict  # notebook 00's models by name ("cot", "nocot"): (model, tokenizer)
    coconut: SavedCoconut  # the last-stage Coconut model of notebook 02
    name: str  # its row label, e.g. "Coconut (plain)"

    @property
    def max_thoughts(self) -> int:
        """The thoughts it takes as trained (its last stage)."""
        c = self.coconut
        return c.config.c_thought * c.config.max_latent_stage


def latent_search_models(run: str, model: str, task: TaskConfig, *, fmt: str = "plain") -> LatentSearchModels:
    """The graph run's CoT and no-CoT models (notebook 00) and its Coconut model in ``fmt``
    (notebook 02). Refuses a task whose records carry no graph (the analyses read it)."""
    from latentlib.tasks.graph import COCONUT_GRAPH_FIELDS

    preset, t = task_of(model, task)
    missing = [f for f in (*COCONUT_GRAPH_FIELDS, "depth", "height") if f not in t.splits.test[0].meta]
    if missing:
        raise ValueError(f"task {t.name!r} has no graph in its records (meta lacks {', '.join(missing)}): the latent "
                         "search is measured on graph tasks; run the notebooks with task='graph' (or 'prosqa')")
    base = {name: load_trained(run, preset, artifacts.require_artifact(run, "base", name,
                                                                       made_by="00_teacher_extraction.ipynb"))
            for name in ("cot", "nocot")}
    coconut = load_coconut_run(run, preset, f"coconut_{fmt}")
    return LatentSearchModels(t, base, coconut, f"Coconut ({fmt})")


def forced_switch(models: LatentSearchModels, thoughts=None, *, batch_size: int = 250) -> pd.DataFrame:
    """What the models write, one row per problem and setting: the CoT and no-CoT models as
    they are, and the Coconut model forced to switch to language after ``k`` thoughts for
    each ``k`` in ``thoughts`` (default ``0 .. max_thoughts``), with the class of its output
    (:func:`latentlib.probes.classify_output`) and whether the answer is right."""
    from latentlib.evaluate import EvalSpec
    from latentlib.probes import classify_output

    test, fmt = models.task.splits.test, models.task.format
    budget = models.task.answer_budget(True)
    ks = list(range(models.max_thoughts + 1)) if thoughts is None else list(thoughts)
    c = models.coconut
    runs = [("CoT", 0, *models.base["cot"], EvalSpec("CoT", max_new_tokens=budget)),
            ("no-CoT", 0, *models.base["nocot"], EvalSpec("no-CoT", max_new_tokens=budget))]
    for k in ks:
        if k % c.config.c_thought:
            raise ValueError(f"{k} thoughts: with c = {c.config.c_thought} the model takes thoughts in groups of c")
        runs.append((models.name, k, c.model, c.tokenizer,
                     eval_spec(k // c.config.c_thought, c.config, c.tokenizer, fmt, injector=c.injector,
                               name=models.name)))
    frames = []
    for label, k, model, tok, spec in runs:
        df = evaluate(model, tok, test, spec, fmt, batch_size=batch_size, progress=False)
        classes = [classify_output(r.meta, k, p) for r, p in zip(test, df.prediction)]
        frames.append(df.assign(model=label, k=k if label == models.name else label, output_class=classes))
    return pd.concat(frames, ignore_index=True)


def latent_nodes(models: LatentSearchModels, *, batch_size: int = 250) -> pd.DataFrame:
    """The Coconut model's thoughts on the test split (as evaluated, at its last stage) read
    against every node of each problem's graph (:func:`latentlib.probes.thought_nodes`)."""
    from latentlib.probes import thought_nodes

    c, test, fmt = models.coconut, models.task.splits.test, models.task.format
    spec = eval_spec(c.curriculum.last_stage, c.config, c.tokenizer, fmt, injector=c.injector, name=models.name)
    traces = collect_traces(c.model, c.tokenizer, test, spec, fmt, capture_layers=(), batch_size=batch_size,
                            progress=False)
    return thought_nodes(c.model, c.tokenizer, test, stack_thoughts(traces))
