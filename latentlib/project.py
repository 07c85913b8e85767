"""Where a run finds its notebooks and parameter files, and where it writes.

A *project directory* holds ``notebooks/``, ``params/``, and receives ``runs/`` and
``reports/``. It is, in order:

1. ``$LATENTLIB_PROJECT`` (what ``latentlib-pipeline --project DIR`` sets, so that the
   notebook kernels it starts resolve the same paths);
2. the source checkout this module lies in (a directory with ``pyproject.toml`` and
   ``notebooks/``): ``make pipeline`` and an editable install;
3. none, for an installed wheel used without ``--project``.

Notebooks and parameter files come from the project directory when it has them, else
from the copies shipped inside the package (``latentlib/_shipped/``), so an installed
wheel runs its own pipeline. Runs go to ``$LATENTLIB_RUNS``, else ``<project>/runs``,
else ``~/.cache/latentlib/runs``; reports to ``$LATENTLIB_REPORTS``, else ``reports/``
beside the runs root.

This module imports nothing heavy: the pipeline's command line resolves paths with it
before torch is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["SHIPPED", "project_dir", "notebooks_dir", "params_dir", "runs_root", "reports_root", "reports_dir",
           "notebook_parameters", "describe"]

PACKAGE = Path(__file__).resolve().parent
CHECKOUT = PACKAGE.parent
SHIPPED = PACKAGE / "_shipped"  # notebooks/ and params/ as package data (in the checkout: links to the top-level ones)


def project_dir() -> Path | None:
    """``$LATENTLIB_PROJECT``, else the source checkout, else None (an installed wheel)."""
    env = os.environ.get("LATENTLIB_PROJECT")
    if env:
        path = Path(env).expanduser().resolve()
        if not path.is_dir():
            raise FileNotFoundError(f"LATENTLIB_PROJECT={env!r} is not a directory")
        return path
    if (CHECKOUT / "pyproject.toml").is_file() and (CHECKOUT / "notebooks").is_dir():
        return CHECKOUT
    return None


def _dir(name: str) -> Path:
    project = project_dir()
    if project is not None and (project / name).is_dir():
        return project / name
    shipped = SHIPPED / name
    if shipped.is_dir():
        return shipped
    where = f"{project}/{name}" if project is not None else f"a project directory's {name}/"
    raise FileNotFoundError(f"no {name}/ found: looked in {where} and in the package's {shipped}; "
                            "give a project directory (latentlib-pipeline --project DIR) or reinstall latentlib")


def notebooks_dir() -> Path:
    """The pipeline's notebooks: ``<project>/notebooks``, else the shipped copies."""
    return _dir("notebooks")


def params_dir() -> Path:
    """The presets' parameter files: ``<project>/params``, else the shipped copies."""
    return _dir("params")


def runs_root() -> Path:
    """``$LATENTLIB_RUNS``, else ``<project>/runs``, else ``~/.cache/latentlib/runs``."""
    env = os.environ.get("LATENTLIB_RUNS")
    if env:
        return Path(env)
    project = project_dir()
    if project is not None:
        return project / "runs"
    return Path.home() / ".cache" / "latentlib" / "runs"


def reports_root() -> Path:
    """``$LATENTLIB_REPORTS``, else ``reports/`` beside the runs root."""
    env = os.environ.get("LATENTLIB_REPORTS")
    return Path(env) if env else runs_root().parent / "reports"


def reports_dir(run: str) -> Path:
    """``reports/<run>/`` with its ``figures/`` and ``tables/``."""
    d = reports_root() / run
    (d / "figures").mkdir(parents=True, exist_ok=True)
    (d / "tables").mkdir(parents=True, exist_ok=True)
    return d


def notebook_parameters(path: Path) -> dict[str, object]:
    """The names and default values of a notebook's ``parameters`` cell (papermill's inspection)."""
    import ast

    import papermill

    inspected = papermill.inspect_notebook(str(path))
    if not inspected:
        raise ValueError(f"{Path(path).name} has no cell tagged 'parameters' (or it is empty); papermill cannot "
                         "inject values into it")
    return {name: ast.literal_eval(p["default"]) for name, p in inspected.items()}


def describe() -> str:
    """One line naming the directories a run uses (printed by the pipeline)."""
    return (f"notebooks {notebooks_dir()}, parameters {params_dir()}, runs {runs_root()}, "
            f"reports {reports_root()}")
