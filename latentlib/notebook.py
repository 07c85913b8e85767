"""What every notebook does first: read its parameters, resolve the preset, the task and
the run, fix threads and seeds, and show the configuration (the first checked output).

A notebook's ``parameters`` cell holds flat scalars; the cell after it calls
``ctx = setup("00_teacher_extraction", globals())``. The parameter names come from the
notebook's own ``parameters`` cell (papermill's parameter inspection), and their values
from the notebook's namespace (after papermill's injected overrides), so the recorded
configuration lists every parameter without the notebook naming them twice.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from latentlib import project
from latentlib.presets import Preset, get_preset
from latentlib.project import notebook_parameters, reports_dir
from latentlib.tasks import Task, TaskConfig, load_task

__all__ = ["Context", "setup", "context", "reports_dir", "notebook_path", "notebook_parameters"]

def notebook_path(name: str) -> Path:
    """``notebooks/<name>.ipynb`` of the project."""
    notebooks = project.notebooks_dir()
    path = notebooks / f"{name.removesuffix('.ipynb')}.ipynb"
    if not path.is_file():
        raise FileNotFoundError(f"no notebook {path}: name one of {sorted(p.stem for p in notebooks.glob('*.ipynb'))}")
    return path


@dataclass
class Context:
    preset: Preset  # the model preset
    run: str  # run name: artifacts under runs/<run>/, reports under reports/<run>/
    seed: int  # the stage's seed
    threads: int  # torch threads
    params: dict = field(default_factory=dict)  # every parameter of the notebook, with its value in this run

    @property
    def reports(self) -> Path:
        return reports_dir(self.run)

    @property
    def task_config(self) -> TaskConfig:
        """The notebook's task (``task``, ``n_train``, ``n_test``, ``seed``; the preset's default task)."""
        return TaskConfig.from_params(self.params, self.preset.task)

    @cached_property
    def task(self) -> Task:
        """The task's records, in the format of the preset's tokenizer."""
        return load_task(self.task_config, self.preset.step_separator, scratch=self.preset.source == "scratch")

    def figure(self, fig, name: str) -> Path:
        """Saves a figure under reports/<run>/figures/ (PNG) and returns the path."""
        path = self.reports / "figures" / f"{name}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        return path

    def table(self, df, name: str) -> Path:
        """Saves a table as CSV and Markdown under reports/<run>/tables/."""
        path = self.reports / "tables" / f"{name}.csv"
        df.to_csv(path, index=False)
        (path.with_suffix(".md")).write_text(df.to_markdown(index=False))
        return path

    def show(self) -> dict:
        """The configuration as a plain dict (display it as the first checked output)."""
        return {**self.params, "model": self.preset.name, "run": self.run}


def setup(notebook: str, namespace: Mapping) -> Context:
    """Reads notebook ``notebook``'s parameters from ``namespace`` (its ``globals()``),
    validates the preset, fixes threads and every seed, and names the run."""
    names = notebook_parameters(notebook_path(notebook))
    missing = [n for n in names if n not in namespace]
    if missing:
        raise NameError(f"parameters {missing} of {notebook} are not defined: run the notebook's parameters cell first")
    return context({n: namespace[n] for n in names})


def context(params: Mapping) -> Context:
    """The run's context from a notebook's parameter values (what :func:`setup` and the
    stage commands share): the preset validated, threads and every seed fixed."""
    params = dict(params)
    preset = get_preset(params["model"])
    threads, seed = int(params.get("threads", 2)), int(params.get("seed", 0))
    if threads < 1:
        raise ValueError(f"threads={threads} must be >= 1")
    torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    params["run"] = params.get("run") or preset.name
    return Context(preset=preset, run=params["run"], seed=seed, threads=threads, params=params)
