"""Runs the numbered notebooks in order with papermill for one preset, renders each to
HTML with nbconvert, and writes ``reports/<run>/index.html``.

Parameters come from ``params/<preset>.yaml``: top-level keys go to every notebook that
declares them in its ``parameters`` cell; a ``notebooks:`` mapping sets values for one
notebook only. Command-line ``-p name value`` pairs override both. A name that no
notebook declares is refused before anything runs (papermill itself only warns, and the
run would silently use the default).

A ``task_runs:`` mapping in the parameter file names further runs on other tasks, after
the main one: each is the run ``<run>-<name>`` with its own ``stages`` (notebooks, in
pipeline order, among them those of :data:`TASK_STAGES`, which only a task run executes),
its own top-level parameters and ``notebooks:`` section (over the file's), and the same
command-line overrides. When the runs are done the pipeline puts Coconut's Table 1 of
every run side by side, one column per task, in ``reports/<run>/tables/table1_tasks``
(with a figure). ``--no-task-runs`` runs the main run alone.

    python -m latentlib.pipeline tiny               # the whole pipeline on the embedded default
    python -m latentlib.pipeline tiny -p seed 1 --run tiny-seed1
    python -m latentlib.pipeline tiny --only 00_teacher_extraction
    latentlib-pipeline tiny --project DIR           # installed: runs and reports under DIR

Notebooks and parameter files come from the project directory (``latentlib.project``):
the checkout, ``--project DIR``, else the copies shipped inside the package. The
notebooks run in the Jupyter kernel ``latentlib`` (``make install`` registers it) when it
belongs to this interpreter, else in ``python3`` (this interpreter's own kernel).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import time
from pathlib import Path

import yaml

from latentlib import project  # path resolution only: no torch
from latentlib.project import notebook_parameters

__all__ = ["STAGES", "TASK_STAGES", "UnknownParameterError", "notebook_parameters", "resolve_parameters", "task_runs",
           "run_pipeline", "choose_kernel", "use_project", "main"]

ROOT = project.project_dir()  # the project directory (None: an installed package used without --project)
NOTEBOOKS = project.notebooks_dir()
PARAMS = project.params_dir()
KERNEL = "latentlib"  # the Jupyter kernel the notebooks declare; `make install` registers it
STAGES = ("00_teacher_extraction", "01_sft", "02_curriculum", "03_grpo", "04_evaluation", "05_probes")
TASK_STAGES = ("06_latent_search",)  # notebooks that only a task run executes (they need its task: a graph)
ALL_STAGES = STAGES + TASK_STAGES


class UnknownParameterError(ValueError):
    """A parameter name that no notebook of the pipeline declares."""


def _coerce(value: str, default):
    """A command-line string converted to the type of the notebook's default."""
    if isinstance(default, bool):
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"{value!r} is not a boolean (use true/false)")
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    return value


def _params_spec(preset: str, params_file: Path | None) -> tuple[Path, dict]:
    from latentlib.presets import get_preset  # here, not at the top: a refused name costs no torch import

    get_preset(preset)  # an unknown preset fails here, with the list of known ones
    path = Path(params_file) if params_file is not None else PARAMS / f"{preset}.yaml"
    if params_file is not None and not path.is_file():
        raise FileNotFoundError(f"no parameter file {path}: give one of {sorted(p.name for p in PARAMS.glob('*.yaml'))}")
    spec = yaml.safe_load(path.read_text()) if path.exists() else {}
    return path, spec or {}


def task_runs(preset: str, params_file: Path | None = None) -> dict[str, tuple[str, ...]]:
    """The task runs of the parameter file (name -> its stages), in the file's order."""
    path, spec = _params_spec(preset, params_file)
    runs = spec.get("task_runs") or {}
    out = {}
    for name, run_spec in runs.items():
        stages = tuple((run_spec or {}).get("stages") or ())
        unknown = [s for s in stages if s not in ALL_STAGES]
        if not stages or unknown:
            raise UnknownParameterError(f"{path}, task run {name!r}: list its stages, among {', '.join(ALL_STAGES)}"
                                        + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
        out[name] = tuple(s for s in ALL_STAGES if s in stages)  # pipeline order
    return out


def resolve_parameters(preset: str, overrides: dict[str, str] | None = None,
                       stages: tuple[str, ...] = STAGES, params_file: Path | None = None,
                       task_run: str | None = None) -> dict[str, dict]:
    """Per notebook, the parameters papermill will inject. Refuses unknown names, and a
    parameter file written for another preset (its ``model``). ``params_file``: default
    ``params/<preset>.yaml``. ``task_run``: a run of the file's ``task_runs`` section,
    whose parameters go over the file's."""
    path, spec = _params_spec(preset, params_file)
    if spec.get("model", preset) != preset:
        raise UnknownParameterError(f"{path} is the parameter file of preset {spec['model']!r}, not {preset!r}: use "
                                    f"params/{preset}.yaml, or run with the preset {spec['model']!r}")
    runs = spec.pop("task_runs", None) or {}
    per_nb = spec.pop("notebooks", {}) or {}
    run_spec, where = {}, str(path)
    if task_run is not None:
        if task_run not in runs:
            raise UnknownParameterError(f"{path} has no task run {task_run!r}: its task runs are {', '.join(runs)}")
        run_spec = dict(runs[task_run] or {})
        run_spec.pop("stages", None)
        run_nb = run_spec.pop("notebooks", {}) or {}
        where = f"{path}, task run {task_run}"
        per_nb = {nb: {**(per_nb.get(nb) or {}), **(run_nb.get(nb) or {})} for nb in {*per_nb, *run_nb}}
    declared = {s: notebook_parameters(NOTEBOOKS / f"{s}.ipynb") for s in stages if (NOTEBOOKS / f"{s}.ipynb").exists()}
    known = set().union(*declared.values()) if declared else set()
    # command-line names: declared by some notebook of the pipeline (a task run's notebooks included)
    every = {s: notebook_parameters(NOTEBOOKS / f"{s}.ipynb") for s in ALL_STAGES if (NOTEBOOKS / f"{s}.ipynb").exists()}
    known_anywhere = known.union(*every.values())

    def refuse(name, where, candidates):
        close = difflib.get_close_matches(name, candidates, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownParameterError(
            f"unknown parameter {name!r} ({where}): no notebook of the pipeline declares it.{hint} "
            f"Known parameters: {', '.join(sorted(candidates))}"
        )

    for name in spec:  # the file's names: a task run's notebooks need not declare those of the main run
        if name not in (known if task_run is None else known_anywhere):
            refuse(name, str(path), known if task_run is None else known_anywhere)
    for name in run_spec:
        if name not in known:
            refuse(name, where, known)
    spec.update(run_spec)
    for nb, values in per_nb.items():
        if nb not in ALL_STAGES:
            raise UnknownParameterError(f"{where} names notebook {nb!r}; notebooks are {', '.join(ALL_STAGES)}")
        for name in values or {}:
            if nb in every and name not in every[nb]:
                refuse(name, f"{where}, notebook {nb}", every[nb])
    overrides = overrides or {}
    if "model" in overrides and overrides["model"] != preset:
        raise UnknownParameterError(f"-p model {overrides['model']} conflicts with the preset {preset!r}: the preset "
                                    "names the model; run the pipeline with that preset instead")
    for name in overrides:
        if name not in known_anywhere:
            refuse(name, "command line", known_anywhere)
    out = {}
    for nb, params in declared.items():
        values = {"model": preset}
        values.update({k: v for k, v in spec.items() if k in params})
        values.update({k: v for k, v in (per_nb.get(nb) or {}).items()})
        values.update({k: _coerce(v, params[k]) for k, v in overrides.items() if k in params})
        out[nb] = {k: v for k, v in values.items() if k in params}
    return out


def _render_html(executed: Path) -> Path:
    """The executed notebook as a self-contained HTML page beside it (``latentlib.report``)."""
    from latentlib.report import render_html

    return render_html(executed)


def _write_index(report: Path, run: str, preset: str, results: list[dict]) -> Path:
    """``index.html``: the main table and headline figure on top, links to every notebook, table, figure."""
    from latentlib.report import write_index

    return write_index(report, run, preset, results, project=ROOT)


def _run_notebooks(preset: str, run: str, params: dict[str, dict], stages: tuple[str, ...], kernel: str) -> list[dict]:
    """Executes ``stages`` of one run in order, renders each to HTML and writes the run's
    report index; returns one status row per stage (a failure raises, after the index)."""
    import papermill as pm
    from tqdm.auto import tqdm

    report = project.reports_dir(run)
    results = []
    t_all = time.perf_counter()
    bar = tqdm(stages, desc=f"pipeline {run}", unit="notebook", dynamic_ncols=True)
    for stage in bar:
        src = NOTEBOOKS / f"{stage}.ipynb"
        if not src.exists():
            print(f"[pipeline] {stage}: not there yet (no notebooks/{stage}.ipynb); skipped", flush=True)
            results.append({"stage": stage, "status": "not there yet"})
            continue
        bar.set_postfix_str(stage)
        out = report / f"{stage}.ipynb"
        t0 = time.perf_counter()
        try:
            pm.execute_notebook(str(src), str(out), parameters=params[stage], cwd=str(NOTEBOOKS),
                                kernel_name=kernel, progress_bar=True, report_mode=False)
        except pm.PapermillExecutionError as e:
            results.append({"stage": stage, "status": "failed", "seconds": time.perf_counter() - t0})
            _render_html(out)
            _write_index(report, run, preset, results)
            raise RuntimeError(f"{stage} failed: {e.ename}: {e.evalue}; the executed notebook is {out} "
                               f"(HTML beside it)") from None
        results.append({"stage": stage, "status": "ok", "seconds": time.perf_counter() - t0})
        _render_html(out)
        print(f"[pipeline] {run}/{stage}: ok in {results[-1]['seconds']:.0f} s", flush=True)
    total = time.perf_counter() - t_all
    index = _write_index(report, run, preset, results)
    (report / "pipeline.json").write_text(json.dumps({"preset": preset, "run": run, "total_seconds": total,
                                                      "stages": results, "parameters": params}, indent=1))
    missing = [r["stage"] for r in results if r["status"] != "ok"]
    print(f"[pipeline] {run} done in {total:.0f} s; report: {index}" +
          (f"; not there yet: {', '.join(missing)}" if missing else ""), flush=True)
    return results


def _task_name(params: dict[str, dict], preset: str) -> str:
    """The task a run's notebooks were given (the preset's when none)."""
    from latentlib.presets import get_preset

    named = [p.get("task") for p in params.values() if p.get("task")]
    return named[0] if named else get_preset(preset).task


# the accuracy of a guess, for the dashed lines of the Table 1 figure: a digit mod 10 for chain,
# one of the two candidate concepts for the graph tasks
CHANCE = {"chain": 0.1, "graph": 0.5, "prosqa": 0.5, "prontoqa": 0.5}


def _table1_across_tasks(run: str, preset: str, runs: dict[str, str]) -> None:
    """Coconut's Table 1 of every run (its 02_curriculum's ``coconut_table1``) side by
    side, one column per task, with a figure, in ``reports/<run>/``."""
    import pandas as pd

    from latentlib import plots
    from latentlib.stages.coconut import table1_across_tasks

    tables = {task: pd.read_csv(project.reports_dir(r) / "tables" / "coconut_table1.csv") for task, r in runs.items()
              if (project.reports_dir(r) / "tables" / "coconut_table1.csv").is_file()}
    if len(tables) < 2:
        return
    long, wide = table1_across_tasks(tables)
    report = project.reports_dir(run)
    wide.to_csv(report / "tables" / "table1_tasks.csv", index=False)
    (report / "tables" / "table1_tasks.md").write_text(wide.to_markdown(index=False) + "\n\nRuns: " + ", ".join(
        f"{task}: reports/{r}/" for task, r in runs.items()) + "\n")
    fig = plots.table1_tasks(long, title=f"Coconut's Table 1 on {' and '.join(tables)} ({preset}; plain format)",
                             chance={t: CHANCE[t] for t in tables if t in CHANCE})
    fig.savefig(report / "figures" / "table1_tasks.png", dpi=120, bbox_inches="tight")
    print(f"[pipeline] Table 1 across tasks: {report / 'tables' / 'table1_tasks.csv'}", flush=True)


def run_pipeline(preset: str, *, run: str | None = None, overrides: dict[str, str] | None = None,
                 only: tuple[str, ...] | None = None, kernel: str = "python3",
                 with_task_runs: bool = True) -> list[dict]:
    """Executes the pipeline's notebooks in order, then each task run of the parameter file
    (unless ``with_task_runs`` is False), then Table 1 across the tasks; returns one status
    row per stage (with its run)."""
    for s in only or ():
        if s not in ALL_STAGES:
            raise ValueError(f"unknown stage {s!r}: stages are {', '.join(ALL_STAGES)}")
    run = run or preset
    overrides = dict(overrides or {})
    extra = task_runs(preset) if with_task_runs else {}
    # --only may name a task run's notebook for the main run when there are no task runs (e.g. 06 on ProsQA files)
    stages = tuple(s for s in only if s in (STAGES if extra else ALL_STAGES)) if only else STAGES
    # every run's parameters are resolved (and refused) before anything runs
    plans = [(run, stages, resolve_parameters(preset, {**overrides, "run": run}, stages))] if stages else []
    for name, run_stages in extra.items():
        run_stages = tuple(s for s in run_stages if s in only) if only else run_stages
        sub = f"{run}-{name}"
        if run_stages:
            plans.append((sub, run_stages, resolve_parameters(preset, {**overrides, "run": sub}, run_stages,
                                                              task_run=name)))
    t_all = time.perf_counter()
    results, tasks = [], {}
    for r, run_stages, params in plans:
        results += [{**row, "run": r} for row in _run_notebooks(preset, r, params, run_stages, kernel)]
        tasks.setdefault(_task_name(params, preset), r)
    total = time.perf_counter() - t_all
    if extra:
        _table1_across_tasks(run, preset, tasks)
        main_rows = [row for row in results if row["run"] == run]
        _write_index(project.reports_dir(run), run, preset, main_rows)
        per_run = {r: sum(row.get("seconds", 0) for row in results if row["run"] == r) for r, _, _ in plans}
        project.reports_dir(run)  # the main report exists even when only task runs ran
        (project.reports_dir(run) / "pipeline_runs.json").write_text(json.dumps(
            {"preset": preset, "total_seconds": total, "runs": per_run, "stages": results,
             "threads": {r: sorted({p.get("threads") for p in params.values()}) for r, _, params in plans}},
            indent=1))
        print(f"[pipeline] all runs done in {total:.0f} s: " + ", ".join(f"{r} {t:.0f} s" for r, t in per_run.items()),
              flush=True)
    return results


def _same_environment(executable: str) -> bool:
    """Whether a kernel's interpreter is this one's (the same bin/ directory: the same environment)."""
    import shutil

    exe = shutil.which(executable) or executable
    return Path(os.path.abspath(exe)).parent == Path(os.path.abspath(sys.executable)).parent


def choose_kernel(requested: str | None = None) -> str:
    """The kernel the notebooks run in: ``requested`` if given (it must exist), else
    ``latentlib`` when it is registered for this interpreter, else ``python3``.

    ``python3`` is jupyter_client's kernel for the interpreter that starts it, so the
    fallback runs the notebooks in the very environment the pipeline runs in; a
    ``latentlib`` kernel that is missing, or registered for another environment (another
    checkout's ``.venv``), is passed over with a message rather than stopping a run."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(requested or KERNEL)
    except NoSuchKernel:
        if requested:
            raise ValueError(f"no Jupyter kernel named {requested!r} (see `jupyter kernelspec list`)") from None
        print(f"[pipeline] the Jupyter kernel {KERNEL!r} is not registered: the notebooks run in 'python3', this "
              f"interpreter's own kernel ({sys.executable}). `make install` registers it, or: {sys.executable} -m "
              f"ipykernel install --sys-prefix --name {KERNEL}", flush=True)
        return "python3"
    if requested:
        return requested
    if not _same_environment(spec.argv[0]):
        print(f"[pipeline] the Jupyter kernel {KERNEL!r} runs {spec.argv[0]}, not this environment "
              f"({sys.executable}): the notebooks run in 'python3' instead. To point it here: {sys.executable} -m "
              f"ipykernel install --sys-prefix --name {KERNEL}", flush=True)
        return "python3"
    return KERNEL


def use_project(directory: str | os.PathLike) -> Path:
    """Makes ``directory`` the project directory of this process and of the kernels it starts."""
    global ROOT, NOTEBOOKS, PARAMS
    path = Path(directory).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["LATENTLIB_PROJECT"] = str(path)
    ROOT, NOTEBOOKS, PARAMS = project.project_dir(), project.notebooks_dir(), project.params_dir()
    return path


def main(argv: list[str] | None = None) -> int:
    prog = "latentlib-pipeline" if Path(sys.argv[0]).name == "latentlib-pipeline" else "python -m latentlib.pipeline"
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("preset", help="model preset (params/<preset>.yaml)")
    ap.add_argument("--run", default=None, help="run name (default: the preset name)")
    ap.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="override one notebook parameter")
    ap.add_argument("--only", default=None, help="comma-separated stages to run (default: all; with --no-task-runs "
                                                 "also a task run's notebook, e.g. 06_latent_search)")
    ap.add_argument("--no-task-runs", action="store_true", help="run the main run alone (no task_runs of the "
                                                                  "parameter file)")
    ap.add_argument("--project", default=None, metavar="DIR",
                    help="project directory: its notebooks/ and params/ if it has them (else the ones shipped with "
                         "the package); runs/ and reports/ are written under it (default: the checkout, or "
                         "$LATENTLIB_PROJECT)")
    ap.add_argument("--kernel", default=None,
                    help=f"Jupyter kernel to run the notebooks in (default: {KERNEL!r} if registered for this "
                         "environment, else 'python3')")
    args = ap.parse_args(argv)
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    try:
        if args.project:
            use_project(args.project)
        print(f"[pipeline] {project.describe()}", flush=True)
        kernel = choose_kernel(args.kernel)
        run_pipeline(args.preset, run=args.run, overrides=dict(args.parameter),
                     only=tuple(args.only.split(",")) if args.only else None, kernel=kernel,
                     with_task_runs=not args.no_task_runs)
    except (UnknownParameterError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
