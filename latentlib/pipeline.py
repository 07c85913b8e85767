"""Runs the numbered notebooks in order with papermill for one preset, renders each to
HTML with nbconvert, and writes ``reports/<run>/index.html``.

Parameters come from ``params/<preset>.yaml``: top-level keys go to every notebook that
declares them in its ``parameters`` cell; a ``notebooks:`` mapping sets values for one
notebook only. Command-line ``-p name value`` pairs override both. A name that no
notebook declares is refused before anything runs (papermill itself only warns, and the
run would silently use the default).

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

__all__ = ["STAGES", "UnknownParameterError", "notebook_parameters", "resolve_parameters", "run_pipeline",
           "choose_kernel", "use_project", "main"]

ROOT = project.project_dir()  # the project directory (None: an installed package used without --project)
NOTEBOOKS = project.notebooks_dir()
PARAMS = project.params_dir()
KERNEL = "latentlib"  # the Jupyter kernel the notebooks declare; `make install` registers it
STAGES = ("00_teacher_extraction", "01_sft", "02_curriculum", "03_grpo", "04_evaluation", "05_probes")


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


def resolve_parameters(preset: str, overrides: dict[str, str] | None = None,
                       stages: tuple[str, ...] = STAGES, params_file: Path | None = None) -> dict[str, dict]:
    """Per notebook, the parameters papermill will inject. Refuses unknown names, and a
    parameter file written for another preset (its ``model``). ``params_file``: default
    ``params/<preset>.yaml``."""
    from latentlib.presets import get_preset  # here, not at the top: a refused name costs no torch import

    get_preset(preset)  # an unknown preset fails here, with the list of known ones
    path = Path(params_file) if params_file is not None else PARAMS / f"{preset}.yaml"
    if params_file is not None and not path.is_file():
        raise FileNotFoundError(f"no parameter file {path}: give one of {sorted(p.name for p in PARAMS.glob('*.yaml'))}")
    spec = yaml.safe_load(path.read_text()) if path.exists() else {}
    spec = spec or {}
    if spec.get("model", preset) != preset:
        raise UnknownParameterError(f"{path} is the parameter file of preset {spec['model']!r}, not {preset!r}: use "
                                    f"params/{preset}.yaml, or run with the preset {spec['model']!r}")
    per_nb = spec.pop("notebooks", {}) or {}
    declared = {s: notebook_parameters(NOTEBOOKS / f"{s}.ipynb") for s in stages if (NOTEBOOKS / f"{s}.ipynb").exists()}
    known = set().union(*declared.values()) if declared else set()

    def refuse(name, where, candidates):
        close = difflib.get_close_matches(name, candidates, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownParameterError(
            f"unknown parameter {name!r} ({where}): no notebook of the pipeline declares it.{hint} "
            f"Known parameters: {', '.join(sorted(candidates))}"
        )

    for name in spec:
        if name not in known:
            refuse(name, str(path), known)
    for nb, values in per_nb.items():
        if nb not in STAGES:
            raise UnknownParameterError(f"{path} names notebook {nb!r}; notebooks are {', '.join(STAGES)}")
        for name in values or {}:
            if nb in declared and name not in declared[nb]:
                refuse(name, f"{path}, notebook {nb}", declared[nb])
    overrides = overrides or {}
    if "model" in overrides and overrides["model"] != preset:
        raise UnknownParameterError(f"-p model {overrides['model']} conflicts with the preset {preset!r}: the preset "
                                    "names the model; run the pipeline with that preset instead")
    for name in overrides:
        if name not in known:
            refuse(name, "command line", known)
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


def run_pipeline(preset: str, *, run: str | None = None, overrides: dict[str, str] | None = None,
                 only: tuple[str, ...] | None = None, kernel: str = "python3") -> list[dict]:
    """Executes the pipeline's notebooks in order; returns one status row per stage."""
    import papermill as pm
    from tqdm.auto import tqdm

    stages = tuple(only) if only else STAGES
    for s in stages:
        if s not in STAGES:
            raise ValueError(f"unknown stage {s!r}: stages are {', '.join(STAGES)}")
    run = run or preset
    overrides = dict(overrides or {})
    overrides["run"] = run
    params = resolve_parameters(preset, overrides, stages)
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
        print(f"[pipeline] {stage}: ok in {results[-1]['seconds']:.0f} s", flush=True)
    total = time.perf_counter() - t_all
    index = _write_index(report, run, preset, results)
    (report / "pipeline.json").write_text(json.dumps({"preset": preset, "run": run, "total_seconds": total,
                                                      "stages": results, "parameters": params}, indent=1))
    missing = [r["stage"] for r in results if r["status"] != "ok"]
    print(f"[pipeline] done in {total:.0f} s; report: {index}" +
          (f"; not there yet: {', '.join(missing)}" if missing else ""), flush=True)
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
    ap.add_argument("--only", default=None, help="comma-separated stages to run (default: all)")
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
                     only=tuple(args.only.split(",")) if args.only else None, kernel=kernel)
    except (UnknownParameterError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
