"""Where does Coconut beat written CoT on the graph task? A sweep over graph sizes and model depth.

Coconut (arXiv 2412.06769, Table 1) beats CoT by 20 points on ProsQA; the embedded graph
task (:mod:`latentlib.tasks.graph`) regrows such problems. Each sweep point trains, through
the pipeline's own stage functions, the CoT and no-CoT base models
(:func:`latentlib.stages.base_models`) and Coconut in the plain format
(:func:`latentlib.stages.coconut_model`, every stage evaluated), and records their test
accuracy, with the accuracy split by the generator's shortcut cue (the answer is usually
the deeper candidate, :func:`latentlib.probes.cue_candidate`): a model that reads the cue
instead of searching is right where the cue is, and wrong where it is not. With
``--cot-control`` a point also trains the CoT base on for the curriculum's own steps and
schedule, writing every step: the control that tells a gain of the continuous thoughts
from a gain of the extra training.

    python -m benchmarks.graph_sweep point --model tiny --nodes 12 --min-path 3 --max-path 5
    python -m benchmarks.graph_sweep report      # the table and figure of every point run so far
    python -m benchmarks.graph_sweep status      # where each part of every point stands

Each point is one process and one run directory (``runs/sweep-<model>-n<nodes>-p<min>-<max>``),
so points run side by side, and a point run again reuses what it trained (the reuse rule).
``--only cot|nocot|coconut|control`` trains one part of a point and stops, so that one point's
parts can use both cores (Coconut and the control as soon as the CoT base is complete); the
point run without it then reuses them. Training checkpoints every
``--checkpoint-every`` steps (200): a part interrupted (a killed process, a session that ends)
and run again with the same arguments resumes from its last checkpoint and ends with the
weights and history of an uninterrupted run, its recorded training time included.
With ``--early-base-steps N`` Coconut's curriculum starts from a CoT base trained for only
N steps (its own warmup and cosine schedule), as the paper's ProsQA run starts its latent
stages after a short CoT stage 0 (``args/prosqa_coconut.yaml``: 5 of 50 epochs) rather than
from a CoT model trained to the end; the point's CoT row is still the fully trained base.
That early base and Coconut's curriculum live in a run of their own,
``runs/<point>-coconut``, because a curriculum takes its base from its own run; the
point's name ends in ``-early<N>``.
``heldout`` evaluates a finished point's models again on fresh problems of its size (1000 by
default, none of them in the point's splits): the test split's 200 leave about 3 points of
standard error on a difference. It also splits accuracy and the paired Coconut - CoT difference
by the length of the shortest path: the longer it is, the further ahead written CoT's first step
must look, while each continuous thought can widen the frontier by one edge. And it evaluates
the models on ``--train-check`` of the point's training problems (1000): how far accuracy there
exceeds accuracy on fresh problems is how much a model memorised its training set.

    python -m benchmarks.graph_sweep heldout --model tiny --nodes 12 ... --extra 1000   # the point's arguments

Results: ``benchmarks/results/graph_sweep/<point>.json`` (and ``heldout/<point>.json``),
``graph_sweep.md``, ``graph_sweep.png`` and (the heldout differences by path length)
``graph_sweep_gaps.png``; every point records its thread count and wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle threads must not spin

from benchmarks.common import RESULTS, machine, set_threads  # noqa: E402

OUT = RESULTS / "graph_sweep"


COT_AS_LONG = "CoT trained as long"  # the control row (--cot-control)
BY_LENGTH = "Coconut - CoT by path length"  # a heldout column
EARLY_BASE = "Coconut's early CoT base"  # its training time, with --early-base-steps
MEMORISED = "training problems - fresh, points (the methods in column order)"  # a heldout column


def point_name(model: str, nodes: int, min_path: int, max_path: int, tag: str = "") -> str:
    return f"sweep-{model}-n{nodes}-p{min_path}-{max_path}" + (f"-{tag}" if tag else "")


def coconut_run(name: str, args) -> str:
    """The run Coconut's curriculum trains in: the point's own, or with ``--early-base-steps``
    one of its own that also holds the short CoT base it starts from."""
    return f"{name}-coconut" if args.early_base_steps else name


def early_base_config(base_cfg, args):
    """The short CoT base Coconut starts from with ``--early-base-steps`` (None without it):
    the point's base configuration with fewer steps, its warmup and logging scaled alike."""
    from dataclasses import replace

    if not args.early_base_steps:
        return None
    n = args.early_base_steps
    return replace(base_cfg, kinds=("cot",), train=replace(base_cfg.train, steps=n, warmup_steps=min(100, n // 5),
                                                          log_every=max(1, n // 30)))


def point_configs(args):
    """The run name and the stage configurations of one point: the task, the two bases, Coconut's
    run and the control. Every training run checkpoints each ``args.checkpoint_every`` steps, which
    its key leaves out (:data:`latentlib.stages.reuse.NOT_IN_KEY`): an interrupted part run again
    resumes where it stopped, with the numbers of an uninterrupted run."""
    from dataclasses import replace

    from latentlib import stages
    from latentlib.tasks import TaskConfig
    from latentlib.training.loop import TrainConfig

    name = point_name(args.model, args.nodes, args.min_path, args.max_path, args.tag)
    if args.early_base_steps:
        name += f"-early{args.early_base_steps}"
    task = TaskConfig(name="graph", n_train=args.n_train, n_test=args.n_test, seed=args.seed,
                      graph_nodes=args.nodes, graph_min_path=args.min_path, graph_max_path=args.max_path)
    base_cfg = stages.BaseModelsConfig(
        model=args.model, task=task, kinds=("cot", "nocot"), seed=args.seed,
        train=TrainConfig(steps=args.base_steps, batch_size=args.batch_size, lr=args.base_lr,
                          warmup_steps=min(100, args.base_steps // 5), seed=args.seed,
                          log_every=max(1, args.base_steps // 30), checkpoint_every=args.checkpoint_every))
    coconut_cfg = stages.CoconutStageConfig(
        model=args.model, task=task, c_thought=args.c_thought, max_latent_stage=args.max_path,
        steps_per_stage=args.steps_per_stage,
        final_stage_steps=args.final_stage_steps, batch_size=args.batch_size, lr=args.lr,
        uniform_prob=args.uniform_prob, seed=args.seed, second_c=0, checkpoint_every=args.checkpoint_every)
    # the control the gain needs: the CoT base trained on for the curriculum's own steps and schedule,
    # writing every step (method "cot"), so that Coconut is not compared with a shorter-trained CoT
    # (c and the stage mixing change nothing it trains, as it writes every step at every stage: they are
    # fixed, so that points differing only in them share one control)
    fixed = replace(coconut_cfg, c_thought=1, uniform_prob=stages.CoconutStageConfig.uniform_prob)
    control_cfg = fixed.run("plain", coconut=fixed.coconut("plain", method="cot"), eval_stages="last")
    return name, task, base_cfg, coconut_cfg.run("plain"), control_cfg


def point_budget(args) -> dict:
    budget = {"base_steps": args.base_steps, "batch_size": args.batch_size, "base_lr": args.base_lr,
              "steps_per_stage": args.steps_per_stage, "final_stage_steps": args.final_stage_steps,
              "lr": args.lr, "uniform_prob": args.uniform_prob, "c_thought": args.c_thought}
    if args.early_base_steps:  # (only then: the budgets of points written before the option stay equal)
        budget["early_base_steps"] = args.early_base_steps
    return budget


PARTS = {"CoT": ("base", "cot"), "no-CoT": ("base", "nocot"), "Coconut": ("curriculum", "coconut_plain"),
         COT_AS_LONG: ("curriculum", "cot_as_long")}  # a point's rows: (stage, artifact name)


def point_part(name: str, part: str, base_cfg, coconut_cfg, control_cfg, args):
    """One part of a point (an artifact name of :data:`PARTS`), trained or reused by key.
    With ``--early-base-steps`` Coconut's part first trains (or reuses) its short CoT base."""
    from latentlib import stages

    if part in ("cot", "nocot"):
        return stages.base_model(name, base_cfg, part, progress=False)
    if part == "cot_as_long":
        return stages.coconut_model(name, control_cfg, part, progress=False)
    early = early_base_config(base_cfg, args)
    if early is not None:
        stages.base_model(coconut_run(name, args), early, "cot", progress=False)
    return stages.coconut_model(coconut_run(name, args), coconut_cfg, part, progress=False)


def part_dir(name: str, method: str, args):
    """The artifact directory of one of a point's rows (a method of :data:`PARTS`)."""
    from latentlib import artifacts

    stage, part = PARTS[method]
    return artifacts.artifact_dir(coconut_run(name, args) if method == "Coconut" else name, stage, part)


def run_part(args) -> None:
    """Trains one part of a point (``--only``) and stops: a point's parts can then run on
    separate cores, and ``point`` without ``--only`` reuses them (same configurations, so the
    same keys) for its result. Coconut and the control start from the CoT base, which must be
    complete: each can start as soon as it is, while the no-CoT base is still training."""
    from latentlib import artifacts

    set_threads(args.threads)
    name, _, base_cfg, coconut_cfg, control_cfg = point_configs(args)
    part = {"control": PARTS[COT_AS_LONG][1], "coconut": PARTS["Coconut"][1]}.get(args.only, args.only)
    own_base = args.only == "control" or (args.only == "coconut" and not args.early_base_steps)
    if own_base and not artifacts.is_complete(artifacts.artifact_dir(name, "base", "cot")):
        raise SystemExit(f"{name}: the {args.only} run starts from the CoT base, which is not trained yet: run the "
                         "same command with --only cot first (or wait for the process training it)")
    t0 = time.perf_counter()
    point_part(name, part, base_cfg, coconut_cfg, control_cfg, args)
    print(f"{name}: {args.only} done in {time.perf_counter() - t0:.0f} s")


def run_point(args) -> dict:
    import pandas as pd

    from latentlib import stages
    from latentlib.probes import cue_accuracy

    threads = set_threads(args.threads)
    name, task, base_cfg, coconut_cfg, control_cfg = point_configs(args)
    t0 = time.perf_counter()
    base = stages.base_models(name, base_cfg, progress=False)
    t_base = time.perf_counter() - t0
    coconut = point_part(name, "coconut_plain", base_cfg, coconut_cfg, control_cfg, args)
    frames = [("CoT", base["cot"].evaluation), ("no-CoT", base["nocot"].evaluation), ("Coconut", coconut.per_problem)]
    # each model's training time as its artifact recorded it, whichever call trained it (a reused
    # or copied part keeps the time of the run that made it; this call's own time is "total")
    trained = {"CoT": base["cot"].seconds, "no-CoT": base["nocot"].seconds, "Coconut": coconut.seconds}
    if args.cot_control:
        control = stages.coconut_model(name, control_cfg, "cot_as_long", progress=False)
        frames.append((COT_AS_LONG, control.per_problem))
        trained[COT_AS_LONG] = control.seconds
    early = None
    if args.early_base_steps:  # the short CoT base Coconut started from (reused: point_part made it)
        early = stages.base_models(coconut_run(name, args), early_base_config(base_cfg, args), progress=False)["cot"]
        trained[EARLY_BASE] = early.seconds  # (base_models also evaluates it on the test split)
    seconds = time.perf_counter() - t0
    _, t = stages.base.task_of(args.model, task)
    test = t.splits.test
    rows = []
    for method, frame in frames:
        rows.append({"method": method, "accuracy": float(frame.correct.mean()),
                     "visible_tokens": float(frame.visible_tokens.mean()),
                     "latent_steps": float(frame.latent_steps.mean()), **cue_accuracy(test, frame.correct)})
    path_len = pd.Series([len(r.steps) for r in test])
    result = {"point": name, "model": args.model, "nodes": args.nodes, "min_path": args.min_path,
              "max_path": args.max_path, "n_train": args.n_train, "n_test": len(test),
              "mean_question_words": float(pd.Series([len(r.question.split()) for r in test]).mean()),
              "path_lengths": {int(k): int(v) for k, v in path_len.value_counts().sort_index().items()},
              "budget": point_budget(args),
              **({"early_base": {"steps": args.early_base_steps, "accuracy": float(early.evaluation.correct.mean())}}
                 if early is not None else {}),
              "rows": rows, "coconut_stages": coconut.table.drop(columns=["method"], errors="ignore")
              .to_dict("records"),
              "seconds": {"base": t_base, "total": seconds, "trained": trained}, "threads": threads,
              "machine": machine(),
              "written_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(result, indent=1, default=float))
    print(json.dumps({"point": name, "rows": rows, "seconds": result["seconds"]}, indent=1, default=float))
    return result


def fresh_problems(model: str, task, extra: int) -> list:
    """``extra`` problems of the point's size that it never saw: the
    generator run on from the point's seed past the point's splits (it never draws one
    problem twice, so these are in none of them). The first records must be the point's own."""
    from dataclasses import replace

    from latentlib.stages.base import task_of

    _, own = task_of(model, task)
    _, longer = task_of(model, replace(task, n_test=task.n_test + extra))
    drawn = [*longer.splits.train, *longer.splits.valid, *longer.splits.test]
    before = [*own.splits.train, *own.splits.valid, *own.splits.test]
    if [r.question for r in drawn[:len(before)]] != [r.question for r in before]:
        raise RuntimeError(f"{task}: the generator run on does not start with the point's own splits")
    return drawn[len(before):len(before) + extra]  # (valid grows with n_test: more are drawn)


def run_heldout(args) -> dict:
    """Evaluates a point's trained models again on ``--extra`` problems they never saw (the
    point's own test split has 200: one standard error of a difference is about 3 points
    there), with each method's 95% interval and the paired Coconut - CoT difference."""
    import numpy as np

    from latentlib import artifacts
    from latentlib.evaluate import evaluate
    from latentlib.methods.coconut import eval_spec
    from latentlib.methods.cot import base_eval_spec
    from latentlib.stages.base import KINDS, task_of

    threads = set_threads(args.threads)
    name, task, base_cfg, coconut_cfg, control_cfg = point_configs(args)
    point = OUT / f"{name}.json"
    if not point.is_file() or read_point(point)["budget"] != point_budget(args):
        raise SystemExit(f"{name}: no finished point with this budget in {OUT}: run `point` with the same "
                         "arguments first (heldout only evaluates what a point trained)")
    present = {m: p for m, p in PARTS.items() if artifacts.is_complete(part_dir(name, m, args))}
    t0 = time.perf_counter()
    fresh = fresh_problems(args.model, task, args.extra)
    _, t = task_of(args.model, task)
    seen = list(t.splits.train[:args.train_check])
    budget = t.answer_budget(True)  # (the sweep's models are from scratch: one token per word)
    frames, on_train = {}, {}
    for method, (stage, part) in present.items():
        m = point_part(name, part, base_cfg, coconut_cfg, control_cfg, args)
        if stage == "base":
            spec = base_eval_spec(part, m.tokenizer, markers=KINDS[part][1], max_new_tokens=budget)
        else:
            spec = eval_spec(m.curriculum.end_stage, m.config, m.tokenizer, t.format, injector=m.injector,
                             name=method)
        frames[method] = evaluate(m.model, m.tokenizer, fresh, spec, t.format, batch_size=250, progress=False)
        if seen:  # the same model on problems it trained on: how much of it is memorised
            on_train[method] = float(evaluate(m.model, m.tokenizer, seen, spec, t.format, batch_size=250,
                                              progress=False).correct.mean())
    path = np.array([len(r.steps) for r in fresh])
    lengths, counts = np.unique(path, return_counts=True)

    def interval(c):  # a proportion's 95% interval (normal approximation)
        return float(1.96 * np.sqrt(c.mean() * (1 - c.mean()) / len(c)))

    def paired(d):  # the mean of paired differences and its 95% interval
        return {"mean": float(d.mean()), "ci95": float(1.96 * d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else
                float("nan"), "n": int(len(d))}

    rows = []
    for method, frame in frames.items():
        c = frame.correct.to_numpy(float)
        rows.append({"method": method, "accuracy": float(c.mean()), "ci95": interval(c),
                     "visible_tokens": float(frame.visible_tokens.mean()),
                     **({"train_accuracy": on_train[method], "train_n": len(seen)} if method in on_train else {}),
                     # the longer the shortest path, the further ahead the first written step must look
                     "by_path_length": {int(k): {"accuracy": float(c[path == k].mean()), "ci95": interval(c[path == k]),
                                                 "n": int((path == k).sum())} for k in lengths}})
    diffs, diffs_by_length = {}, {}
    for other in ("CoT", COT_AS_LONG):
        if "Coconut" in frames and other in frames:
            d = frames["Coconut"].correct.to_numpy(float) - frames[other].correct.to_numpy(float)
            diffs[f"Coconut - {other}"] = paired(d)
            diffs_by_length[f"Coconut - {other}"] = {int(k): paired(d[path == k]) for k in lengths}
    result = {"point": name, "n": len(fresh), "path_lengths": {int(k): int(v) for k, v in zip(lengths, counts)},
              "rows": rows, "paired": diffs, "paired_by_path_length": diffs_by_length,
              "threads": threads, "seconds": time.perf_counter() - t0,
              "machine": machine(), "written_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (OUT / "heldout").mkdir(parents=True, exist_ok=True)
    (OUT / "heldout" / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


def part_status(run_dir: Path, stage: str, name: str) -> str:
    """Where one part of a point stands: complete (its training time), training (the step and
    the loss of its last checkpoint; a curriculum's stage too) or not started."""
    from latentlib import artifacts

    done = run_dir / stage / name
    if artifacts.is_complete(done):
        return f"complete, {artifacts.read_meta(done).get('seconds', 0.0) / 60:.0f} min of training"
    written = sorted((run_dir / stage).glob(f".{name}-*.ckpt/**/checkpoint/progress.json"),
                     key=lambda f: f.stat().st_mtime)
    if not written:
        return "not started"
    newest = written[-1]  # the run going on (a checkpoint of an older configuration may linger)
    ckpt = next(d for d in newest.parents if d.name.endswith(".ckpt"))
    found = [json.loads(f.read_text()) for f in written if ckpt in f.parents]  # a curriculum: one per stage
    last, part = found[-1], newest.parent.parent.name  # "stage<k>" in a curriculum
    minutes = sum(f.get("seconds", 0.0) for f in found) / 60
    loss = f", loss {last['history'][-1]['loss']:.3f}" if last.get("history") else ""
    return (f"step {last['step']}{' of curriculum ' + part.replace('stage', 'stage ') if part.startswith('stage') else ''}"
            f" checkpointed, {minutes:.0f} min of training so far{loss}")


def status() -> None:
    """Every sweep point's run directory and where each of its parts stands."""
    from latentlib import artifacts

    runs = sorted(artifacts.runs_root().glob("sweep-*"))
    if not runs:
        print(f"no sweep point under {artifacts.runs_root()} yet")
    for run_dir in runs:
        # an --early-base-steps point's Coconut and the base it starts from (the run coconut_run names)
        if re.search(r"-early\d+-coconut$", run_dir.name):
            print(f"{run_dir.name} (Coconut of {run_dir.name.removesuffix('-coconut')})")
            print(f"  {EARLY_BASE}: {part_status(run_dir, 'base', 'cot')}")
            print(f"  Coconut: {part_status(run_dir, *PARTS['Coconut'])}")
            continue
        print(run_dir.name)
        for method, (stage, name) in PARTS.items():
            if method == "Coconut" and (run_dir.parent / f"{run_dir.name}-coconut").is_dir():
                continue  # an --early-base-steps point: its Coconut is in its own run, listed next
            print(f"  {method}: {part_status(run_dir, stage, name)}")


def read_point(path) -> dict:
    point = json.loads(path.read_text())
    point["budget"].setdefault("c_thought", 1)  # points written before --c-thought trained one thought per step
    return point


def load_points() -> list[dict]:
    return [read_point(p) for p in sorted(OUT.glob("*.json"))]


TRAIN_MINUTES = "training minutes (CoT / no-CoT / Coconut / control)"


def training_minutes(point: dict) -> str:
    """Each model's training time as its artifact recorded it (Coconut's as "early base +
    curriculum" with ``--early-base-steps``), or "not recorded" for a point written before
    these were kept (its "total" is only what the writing call itself trained)."""
    trained = point["seconds"].get("trained")
    if not trained:
        return "not recorded"
    cells = [f"{trained[m] / 60:.0f}" if m in trained else "-" for m in ("CoT", "no-CoT", "Coconut", COT_AS_LONG)]
    if EARLY_BASE in trained:  # Coconut's own short CoT base, then its curriculum
        cells[2] = f"{trained[EARLY_BASE] / 60:.0f} + {cells[2]}"
    return " / ".join(cells)


def coconut_steps(point: dict) -> int:
    """The optimizer steps of a point's curriculum, from its recorded budget (the result
    file holds no configuration): the curriculum :func:`point_configs` builds."""
    from latentlib.training.curriculum import CurriculumConfig

    b = point["budget"]
    return CurriculumConfig(end_stage=point["max_path"], steps_per_stage=b["steps_per_stage"],
                            final_stage_steps=b["final_stage_steps"]).total_steps


def coconut_base_steps(point: dict) -> int:
    """The steps of the CoT base a point's curriculum started from: its own base's, or the
    early base's with ``--early-base-steps``."""
    b = point["budget"]
    return b.get("early_base_steps", b["base_steps"])


def sweep_order(point: dict) -> tuple:
    """A point's place in the table and the figures: by model and size, then by budget."""
    b = point["budget"]
    return (point["model"], point["nodes"], f"{point['min_path']}-{point['max_path']}", b["base_steps"],
            coconut_steps(point), coconut_base_steps(point), b["c_thought"], b["uniform_prob"], b["lr"])


def sweep_table(points: list[dict]):
    """One row per point: size, paths, budget, and accuracy (overall and against the cue)
    of CoT, no-CoT and Coconut."""
    import pandas as pd

    rows = []
    for p in sorted(points, key=sweep_order):
        row = {"model": p["model"], "nodes": p["nodes"], "paths": f"{p['min_path']}-{p['max_path']}",
               "question_words": round(p["mean_question_words"], 1), "base_steps": p["budget"]["base_steps"],
               "coconut_steps": coconut_steps(p), "coconut_base_steps": coconut_base_steps(p), "n_train": p["n_train"],
               "c": p["budget"]["c_thought"], "uniform_prob": p["budget"]["uniform_prob"], "lr": p["budget"]["lr"],
               "n_test": p["n_test"]}
        for r in p["rows"]:
            row[r["method"]] = round(r["accuracy"], 3)
        for r in p["rows"]:
            row[f"{r['method']} (cue no help)"] = round(r["accuracy_cue_not_right"], 3)
        row["Coconut - CoT"] = round(row["Coconut"] - row["CoT"], 3)
        if COT_AS_LONG in row:
            row[f"Coconut - {COT_AS_LONG}"] = round(row["Coconut"] - row[COT_AS_LONG], 3)
        row[TRAIN_MINUTES] = training_minutes(p)
        rows.append(row)
    return pd.DataFrame(rows)


def load_heldouts(points: list[dict] | None = None) -> list[dict]:
    """The heldout results, in the sweep table's order of their points when ``points`` is
    given (file names would put a longer run's tag before the shorter run it extends)."""
    heldouts = [json.loads(p.read_text()) for p in sorted((OUT / "heldout").glob("*.json"))]
    if points is not None:
        rank = {p["point"]: i for i, p in enumerate(sorted(points, key=sweep_order))}
        heldouts.sort(key=lambda h: rank.get(h["point"], len(rank)))
    return heldouts


def gap_by_length(heldout: dict) -> dict | None:
    """Coconut - CoT by path length, or None for a heldout written before that split existed."""
    return heldout.get("paired_by_path_length", {}).get("Coconut - CoT")


def heldout_table(heldouts: list[dict]):
    """One row per point evaluated by ``heldout`` (:func:`load_heldouts`), or None when none was."""
    import pandas as pd

    rows = []
    for h in heldouts:
        row = {"point": h["point"], "fresh problems": h["n"]}
        for r in h["rows"]:
            row[r["method"]] = f"{100 * r['accuracy']:.1f} ± {100 * r['ci95']:.1f}"
        for name, d in h["paired"].items():
            row[name] = f"{100 * d['mean']:+.1f} ± {100 * d['ci95']:.1f}"
        if all("train_accuracy" in r for r in h["rows"]):
            row[MEMORISED] = " / ".join(f"{100 * (r['train_accuracy'] - r['accuracy']):+.1f}" for r in h["rows"])
        by_length = gap_by_length(h)
        if by_length:
            row[BY_LENGTH] = "; ".join(f"{k} edges: {100 * d['mean']:+.1f} ± {100 * d['ci95']:.1f} (n={d['n']})"
                                       for k, d in by_length.items())
        rows.append(row)
    if not rows:
        return None
    table = pd.DataFrame(rows)
    order = ["point", "fresh problems", "CoT", "no-CoT", "Coconut", COT_AS_LONG, "Coconut - CoT",
             f"Coconut - {COT_AS_LONG}", MEMORISED, BY_LENGTH]
    if BY_LENGTH in table:
        table[BY_LENGTH] = table[BY_LENGTH].fillna("not split (an earlier heldout)")
    if MEMORISED in table:
        table[MEMORISED] = table[MEMORISED].fillna("not measured (an earlier heldout)")
    return table[[c for c in order if c in table]].fillna("not trained")


def heldout_gaps(heldouts: list[dict]):
    """Coconut - CoT on each heldout point's fresh problems, overall and by path length
    (long format for :func:`latentlib.plots.graph_gaps`), or None when no heldout has the split."""
    import pandas as pd

    rows = []
    for h in heldouts:
        by_length = gap_by_length(h)
        if not by_length:
            continue
        overall = h["paired"]["Coconut - CoT"]
        rows.append({"point": h["point"], "subset": "all", "mean": overall["mean"], "ci95": overall["ci95"],
                     "n": h["n"]})
        rows += [{"point": h["point"], "subset": k, **d} for k, d in by_length.items()]
    return pd.DataFrame(rows) if rows else None


def report() -> None:
    from latentlib import plots

    points = load_points()
    if not points:
        raise SystemExit(f"no sweep points in {OUT}: run `python -m benchmarks.graph_sweep point ...` first")
    table = sweep_table(points)
    cue_n = {p["point"]: p["rows"][0]["n_cue_not_right"] for p in points}
    md = ["# Graph task: Coconut vs CoT vs no-CoT across graph sizes and depth\n",
          f"Written {time.strftime('%Y-%m-%d %H:%M')}; threads per point: "
          f"{sorted({p['threads'] for p in points})}. Accuracy on the test split (greedy); "
          "'cue no help': on the test problems where the deeper candidate is not the answer or both are as deep "
          f"({', '.join(f'{k}: {v}' for k, v in cue_n.items())} problems).\n",
          table.to_markdown(index=False)]
    heldouts = load_heldouts(points)
    held = heldout_table(heldouts)
    if held is not None:
        md += ["\n## The same models on fresh problems (`heldout`)\n",
               "Problems of each point's size that none of its splits holds, drawn by running its generator on; "
               "accuracy in % with a 95% interval, and the paired difference Coconut - CoT on the same problems.\n",
               held.to_markdown(index=False),
               "\n![Coconut - CoT on fresh problems by path length](graph_sweep_gaps.png)"]
    (RESULTS / "graph_sweep.md").write_text("\n".join(md) + "\n")
    fig = plots.graph_sweep(table)
    fig.savefig(RESULTS / "graph_sweep.png", dpi=120, bbox_inches="tight")
    written = [RESULTS / "graph_sweep.md", RESULTS / "graph_sweep.png"]
    gaps = heldout_gaps(heldouts)
    if gaps is not None:
        plots.graph_gaps(gaps).savefig(RESULTS / "graph_sweep_gaps.png", dpi=120, bbox_inches="tight")
        written.append(RESULTS / "graph_sweep_gaps.png")
    print("\n".join(md))
    print(f"\nwrote {', '.join(map(str, written))}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.graph_sweep", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)  # what a point is: its size and its budgets
    common.add_argument("--model", default="tiny", help="a from-scratch preset: tiny (4 layers), tiny-2l or tiny-6l")
    common.add_argument("--nodes", type=int, default=12)
    common.add_argument("--min-path", type=int, default=3)
    common.add_argument("--max-path", type=int, default=5)
    common.add_argument("--n-train", type=int, default=20000)
    common.add_argument("--n-test", type=int, default=200)
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--base-steps", type=int, default=600)
    common.add_argument("--batch-size", type=int, default=128)
    common.add_argument("--base-lr", type=float, default=3e-3)
    common.add_argument("--steps-per-stage", type=int, default=30)
    common.add_argument("--final-stage-steps", type=int, default=90)
    common.add_argument("--lr", type=float, default=1e-3)
    common.add_argument("--uniform-prob", type=float, default=0.3,
                        help="probability of a training example at a random earlier stage (the Coconut paper's "
                             "ProsQA: 0)")
    common.add_argument("--c-thought", type=int, default=1, help="continuous thoughts per removed step (c)")
    common.add_argument("--threads", type=int, default=2)
    common.add_argument("--early-base-steps", type=int, default=0,
                        help="start Coconut's curriculum from a CoT base trained this many steps, not the point's "
                             "fully trained one (the paper's short CoT stage 0); 0: from the point's CoT base")
    common.add_argument("--tag", default="", help="a suffix of the run name (another budget at the same size)")
    common.add_argument("--checkpoint-every", type=int, default=200,
                        help="steps between training checkpoints (0: only at the end); not part of the reuse key, "
                             "so an interrupted part resumes from its last checkpoint when run again")
    pt = sub.add_parser("point", parents=[common], help="train and evaluate one sweep point")
    pt.add_argument("--cot-control", action="store_true",
                    help="also train the CoT base on for the curriculum's steps, writing every step (a control row)")
    pt.add_argument("--only", choices=("cot", "nocot", "coconut", "control"),
                    help="train only this part of the point and stop (run parts side by side on separate cores; "
                         "the point without --only then reuses them)")
    ho = sub.add_parser("heldout", parents=[common],
                        help="evaluate a finished point's models again on problems of its size it never saw")
    ho.add_argument("--extra", type=int, default=1000, help="how many fresh problems")
    ho.add_argument("--train-check", type=int, default=1000,
                    help="also evaluate on this many of the point's training problems (0: none): accuracy there "
                         "minus on fresh ones is what the model memorised")
    sub.add_parser("report", help="the table and figure of every point run so far")
    sub.add_parser("status", help="where each part of every point stands (complete, checkpointed at a step, not "
                                  "started)")
    args = ap.parse_args(argv)
    if args.command in ("point", "heldout") and not 0 <= args.early_base_steps < args.base_steps:
        ap.error(f"--early-base-steps {args.early_base_steps}: give fewer steps than --base-steps "
                 f"({args.base_steps}), or 0 for Coconut from the point's own CoT base")
    if args.command == "point" and args.only:
        run_part(args)
    elif args.command == "point":
        run_point(args)
    elif args.command == "heldout":
        if args.extra < 1 or args.train_check < 0:
            ap.error(f"heldout needs --extra >= 1 and --train-check >= 0 (got {args.extra} and {args.train_check})")
        run_heldout(args)
    elif args.command == "status":
        status()
    else:
        report()


if __name__ == "__main__":
    main()
