"""latentlib: a Jupyter-first, reproducible toolkit for latent chain-of-thought reasoning.

Layers, each importing only the ones below it:

- the engine (:mod:`latentlib.recurrence`, :mod:`~latentlib.injection`,
  :mod:`~latentlib.policies`, :mod:`~latentlib.batching`, :mod:`~latentlib.tokens`): a
  batched, KV-cached forward and generation loop where each position is a token or a
  thought injected from hidden states;
- :mod:`latentlib.training`: the one training loop, the curriculum schedule, the losses;
- :mod:`latentlib.methods`: each method whole (``coconut``, ``switch``, ``qthink``,
  ``light``, and ``cot`` for the written-reasoning baselines);
- :mod:`latentlib.stages`: what a notebook cell or a command runs, one function per
  pipeline stage, with one rule for reusing a finished stage;
- beside them, used from above: :mod:`~latentlib.tasks`, :mod:`~latentlib.presets`,
  :mod:`~latentlib.hub`, :mod:`~latentlib.artifacts`, :mod:`~latentlib.evaluate`,
  :mod:`~latentlib.teacher`, :mod:`~latentlib.probes`, :mod:`~latentlib.plots`.

Glossary (the papers' symbols): **K** latent steps (thoughts) per answer; **c** thoughts per
replaced reasoning step (Coconut, SWITCH phase 2); **K_min** / **K_max** the fewest and most
latent steps of a SWITCH block; **G** rollouts (completions) per prompt; **beta** the KL
coefficient and **epsilon** the clip range of GRPO; **gamma** the weight of QThink's
distillation distance.

The names below are the small public API; they import on first use.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("latentlib")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+source"

_API = {
    "setup": "latentlib.notebook",
    "Format": "latentlib.tasks",
    "Record": "latentlib.tasks",
    "TaskConfig": "latentlib.tasks",
    "load_task": "latentlib.tasks",
    "load_model": "latentlib.presets",
    "get_preset": "latentlib.presets",
    "latent_forward": "latentlib.recurrence",
    "generate": "latentlib.recurrence",
    "EvalSpec": "latentlib.evaluate",
    "evaluate": "latentlib.evaluate",
    "TrainConfig": "latentlib.training.loop",
    "train": "latentlib.training.loop",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'latentlib' has no attribute {name!r}")
