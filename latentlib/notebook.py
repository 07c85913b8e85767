"""What every notebook does first: resolve the preset and run, fix threads and seeds,
and show the configuration (the first checked output).

A notebook's ``parameters`` cell holds flat scalars; the cell after it calls
``ctx = setup(model=model, run=run, seed=seed, threads=threads, **stage_params)``.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from latentlib import artifacts
from latentlib.presets import Preset, get_preset

__all__ = ["Context", "setup", "reports_dir"]


def reports_dir(run: str) -> Path:
    """``reports/<run>/`` next to the runs root (``$LATENTLIB_REPORTS`` overrides)."""
    env = os.environ.get("LATENTLIB_REPORTS")
    root = Path(env) if env else artifacts.runs_root().parent / "reports"
    d = root / run
    (d / "figures").mkdir(parents=True, exist_ok=True)
    (d / "tables").mkdir(parents=True, exist_ok=True)
    return d


@dataclass
class Context:
    preset: Preset  # the model preset
    run: str  # run name: artifacts under runs/<run>/, reports under reports/<run>/
    seed: int  # the stage's seed
    threads: int  # torch threads
    params: dict = field(default_factory=dict)  # the notebook's other parameters

    @property
    def reports(self) -> Path:
        return reports_dir(self.run)

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
        return {"model": self.preset.name, "run": self.run, "seed": self.seed, "threads": self.threads,
                **self.params}


def setup(*, model: str, run: str = "", seed: int = 0, threads: int = 2, **params) -> Context:
    """Validates the preset, fixes threads and every seed, and names the run."""
    preset = get_preset(model)
    if threads < 1:
        raise ValueError(f"threads={threads} must be >= 1")
    torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return Context(preset=preset, run=run or preset.name, seed=seed, threads=threads, params=params)
