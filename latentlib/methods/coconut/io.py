"""Saving and loading a trained Coconut model with what it needs to run: its
:class:`~latentlib.methods.coconut.config.CoconutConfig` (format, c, injection, ...), its
curriculum (which fixes the stage it is evaluated at) and, when the injector has weights
(a projection head), the injector. Weights go to safetensors, the rest to JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from latentlib import artifacts, distributed
from latentlib.injection import Injector, make_injector
from latentlib.methods.coconut.config import CoconutConfig
from latentlib.training.curriculum import CurriculumConfig
from latentlib.training.loop import TrainConfig

__all__ = ["SavedCoconut", "save_coconut", "load_coconut"]

INJECTOR_FILE = "injector.safetensors"


@dataclass
class SavedCoconut:
    model: object  # the causal LM, in eval mode
    tokenizer: object
    config: CoconutConfig  # how it was trained (format, c, injection, ...)
    curriculum: CurriculumConfig  # its curriculum: the model is evaluated at curriculum.last_stage
    injector: Injector  # what a thought is, with its trained weights if it has any
    meta: dict = field(default_factory=dict)  # everything else its COMPLETE marker holds


def save_coconut(directory, model, tokenizer, cfg: CoconutConfig, curriculum: CurriculumConfig, *,
                 injector: Injector | None = None, meta: dict | None = None,
                 tables: dict[str, pd.DataFrame] | None = None) -> None:
    """Atomically: the model (``save_pretrained``), the tokenizer, the injector's weights
    when it has any, ``tables`` as CSV files (name -> frame, e.g. the evaluation's rows) and
    the two configurations in the ``COMPLETE`` marker. In a distributed run every process
    calls it (a sharded model's tensors are gathered) and the main process writes."""
    state = artifacts.pretrained_state(model)
    injector_state = distributed.whole_state_dict(injector) if injector is not None else {}

    def write():
        with artifacts.atomic_dir(Path(directory)) as tmp:
            artifacts.write_pretrained(model, tmp, state)
            tokenizer.save_pretrained(tmp)
            if injector is not None and len(injector.state_dict()):
                artifacts.save_state_dict(injector_state, tmp / INJECTOR_FILE)
            for file, frame in (tables or {}).items():
                frame.to_csv(tmp / file, index=False)
            artifacts.write_complete(tmp, {"kind": "Coconut model", **(meta or {}), "coconut": asdict(cfg),
                                           "curriculum": asdict(curriculum)})

    distributed.on_main(write, what=f"writing {directory}")


def load_coconut(directory, *, base=None) -> SavedCoconut:
    """What :func:`save_coconut` wrote; a clear error for a directory that is not a Coconut
    model. A LoRA adapter is loaded onto ``base`` (the model it was trained from, or a
    function returning it) and merged."""
    directory = Path(directory)
    model, tokenizer = artifacts.load_model_dir(directory, base=base)
    meta = artifacts.read_meta(directory)
    if "coconut" not in meta or "curriculum" not in meta:
        raise ValueError(f"{directory} records no Coconut configuration (keys 'coconut', 'curriculum'): it was not "
                         "saved by save_coconut; train it with latentlib.stages.coconut (notebook 02_curriculum)")
    cfg = CoconutConfig(**meta["coconut"])
    cur = dict(meta["curriculum"])
    cur["train"] = TrainConfig(**cur["train"])
    injector = make_injector(cfg.injection, model, norm_match=cfg.norm_match)
    if (directory / INJECTOR_FILE).is_file():
        injector.load_state_dict(artifacts.load_state_dict_file(directory / INJECTOR_FILE))
    elif len(injector.state_dict()):
        raise artifacts.CorruptArtifactError(f"{directory} has no {INJECTOR_FILE}, but its injector "
                                             f"{cfg.injection!r} has weights: re-run the stage that saved it")
    injector.eval()
    return SavedCoconut(model, tokenizer, cfg, CurriculumConfig(**cur), injector, meta)
