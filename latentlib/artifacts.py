"""Run directories, and atomic, pickle-free saving and loading of everything a run writes.

Layout: ``<runs root>/<run>/<stage>/<name>/``. Stages find each other's artifacts by run
name and stage name (never by a path in a config). The runs root is ``$LATENTLIB_RUNS``,
or ``runs/`` at the top of the checkout.

Every artifact directory is written to a temporary sibling and renamed into place, and
ends with a ``COMPLETE`` marker holding its metadata (seed, library versions, what it
is). A directory without the marker, such as one left by a killed process, is never
taken for a finished artifact.

Nothing here uses pickle: tensors go to safetensors, everything else to JSON. Nested
state (optimizer, scheduler, RNG) is stored as a JSON tree whose tensor leaves point
into a safetensors file.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import shutil
import time
import warnings
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from latentlib import distributed

__all__ = ["runs_root", "stage_dir", "artifact_dir", "MissingArtifactError", "CorruptArtifactError",
           "atomic_dir", "write_complete", "is_complete", "require_artifact", "save_tree", "load_tree",
           "save_json", "load_json", "versions", "rng_state", "set_rng_state", "save_state_dict",
           "load_state_dict_file", "save_model", "load_model_dir", "read_meta", "pretrained_state", "write_pretrained",
           "is_peft", "peft_quiet", "no_hf_bar"]

COMPLETE = "COMPLETE"


@contextlib.contextmanager
def peft_quiet() -> Iterator[None]:
    """Silences the one deprecation that peft (0.18-0.21) raises from inside its own
    ``PeftModel.__init__``: it reads ``model.is_gradient_checkpointing``, which transformers
    5.2x renamed ``is_activation_checkpointing``. The call is peft's, nothing a caller can
    change; every other warning passes through."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning)
        yield


@contextlib.contextmanager
def no_hf_bar() -> Iterator[None]:
    """Hides transformers' "Loading weights" and "Writing model shards" bars while a run's
    own model is read back from or saved to local disk: that takes well under a second,
    and a notebook saves and reloads its artifacts many times, each bar a line of stderr in
    the rendered report. Loading a preset's pretrained weights keeps its bar
    (:mod:`latentlib.hub`), since that can take minutes."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


class MissingArtifactError(FileNotFoundError):
    """A stage's input artifact does not exist (or was never completed)."""


class CorruptArtifactError(RuntimeError):
    """An artifact exists but cannot be read (truncated, edited, wrong format)."""


def runs_root() -> Path:
    """``$LATENTLIB_RUNS``, else ``runs/`` in the project directory, else ``~/.cache/latentlib/runs``
    (``latentlib.project`` resolves it)."""
    from latentlib import project

    return project.runs_root()


def stage_dir(run: str, stage: str) -> Path:
    return runs_root() / run / stage


def artifact_dir(run: str, stage: str, name: str) -> Path:
    return stage_dir(run, stage) / name


def versions() -> dict[str, str]:
    """Versions of the libraries that decide the numbers."""
    out = {"python": platform.python_version()}
    for pkg in ("latentlib", "torch", "transformers", "peft", "accelerate", "datasets", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    out["torch_threads"] = str(torch.get_num_threads())
    return out


class atomic_dir:
    """``with atomic_dir(final) as tmp:`` write into ``tmp``; on success it replaces ``final``.

    On an exception the temporary directory is removed and ``final`` is left as it was.
    """

    def __init__(self, final: Path):
        self.final = Path(final)
        self.tmp = self.final.with_name(f".{self.final.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(self.final)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        for f in self.tmp.iterdir():  # data on disk before the rename makes it visible
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if self.final.exists():
            old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}-{time.monotonic_ns()}")
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


def _remove_stale(final: Path) -> None:
    """Removes temporary siblings of ``final`` left by a writer that was killed (its
    process no longer exists on this machine), e.g. a checkpoint half-written when a
    distributed run was torn down; they were never taken for the artifact."""
    for d in final.parent.glob(f".{final.name}.tmp-*"):
        try:
            pid = int(d.name.rsplit(".tmp-", 1)[1].split("-")[0])
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:
            pass


def _seeds(meta: Any) -> list:
    """Every value stored under a key named ``seed`` anywhere in ``meta``."""
    if isinstance(meta, dict):
        return [v for k, v in meta.items() if k == "seed"] + [s for v in meta.values() for s in _seeds(v)]
    if isinstance(meta, (list, tuple)):
        return [s for v in meta for s in _seeds(v)]
    return []


def write_complete(directory: Path, meta: dict[str, Any]) -> None:
    """Writes the completion marker (last, inside the temporary directory), with the
    library versions. ``meta`` must record the seed that made the artifact (a ``seed``
    key, at any depth: e.g. inside the training configuration)."""
    if not _seeds(meta):
        raise ValueError(f"the metadata of {Path(directory).name} records no seed: put the seed that made the "
                         "artifact (or the configuration holding it) into the metadata")
    info = {"written_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": versions(), **meta}
    (Path(directory) / COMPLETE).write_text(json.dumps(info, indent=1, default=str))


def is_complete(directory: Path) -> bool:
    return (Path(directory) / COMPLETE).is_file()


def require_artifact(run: str, stage: str, name: str, *, made_by: str) -> Path:
    """The artifact's directory, or an error naming the notebook that makes it."""
    d = artifact_dir(run, stage, name)
    if not is_complete(d):
        state = "is incomplete (an interrupted write)" if d.exists() else "does not exist"
        raise MissingArtifactError(
            f"{stage}/{name} of run {run!r} {state} (looked in {d}); run {made_by} first for this run "
            f"(e.g. papermill notebooks/{made_by} out.ipynb -p run {run})"
        )
    return d


def read_meta(directory: Path) -> dict:
    """The metadata a complete artifact's ``COMPLETE`` marker holds."""
    return load_json(Path(directory) / COMPLETE)


def load_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise CorruptArtifactError(f"{path} is not valid JSON ({e}); delete it and re-run the stage that wrote it") from e


def save_json(obj: Any, path: Path) -> None:
    """Writes JSON atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def save_state_dict(state: dict[str, torch.Tensor], path: Path, metadata_: dict | None = None) -> None:
    """A flat tensor dict to safetensors. A tensor on a GPU is moved to the CPU on its own
    (the device never holds a second copy of the whole state); a CPU tensor is written as
    it is, copied only where safetensors needs it: when it shares its storage with an
    earlier entry (tied weights) or is not contiguous."""
    flat, seen = {}, set()
    for k, v in state.items():
        v = v.detach()
        if v.device.type != "cpu":
            v = v.to("cpu").contiguous()
        else:
            ptr = v.untyped_storage().data_ptr()
            if (ptr and ptr in seen) or not v.is_contiguous():
                v = v.contiguous().clone()
            seen.add(ptr)
        flat[k] = v
    save_file(flat, str(path), metadata={k: str(v) for k, v in (metadata_ or {}).items()})


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise MissingArtifactError(f"{path} does not exist")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/invalid files
        raise CorruptArtifactError(
            f"{path} cannot be read as safetensors ({type(e).__name__}: {e}); the file is truncated or not a "
            "checkpoint: delete it and resume from the previous checkpoint, or re-run the stage"
        ) from e


# ---------------------------------------------------------------------------- JSON trees with tensor leaves


def _encode(obj, tensors: dict[str, torch.Tensor], path: str):
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        tensors[path] = torch.from_numpy(obj.copy())
        return {"__ndarray__": path}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _encode(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise TypeError(f"cannot store a {type(obj).__name__} at {path} without pickle")


def _decode(obj, tensors):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy()
        if "__dict__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def save_tree(tree: Any, directory: Path, name: str) -> None:
    """Saves a nested structure (e.g. an optimizer state dict) as ``name.json`` + ``name.safetensors``."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(tree, tensors, name)
    if tensors:  # safetensors cannot read back a file with no tensors in it
        save_state_dict(tensors, Path(directory) / f"{name}.safetensors")
    (Path(directory) / f"{name}.json").write_text(json.dumps(skeleton))


def load_tree(directory: Path, name: str) -> Any:
    skeleton = load_json(Path(directory) / f"{name}.json")
    has_tensors = '"__tensor__"' in json.dumps(skeleton) or '"__ndarray__"' in json.dumps(skeleton)
    tensors = load_state_dict_file(Path(directory) / f"{name}.safetensors") if has_tensors else {}
    return _decode(skeleton, tensors)


def rng_state() -> dict:
    """Every RNG the training loop draws from."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(tuple(state["numpy"]))


# ---------------------------------------------------------------------------- whole models


def pretrained_state(model) -> dict[str, torch.Tensor]:
    """What :func:`write_pretrained` writes of ``model``: for a PEFT model only what is
    trained (its adapters, trainable token rows, ``modules_to_save``; not the frozen base
    embeddings PEFT would otherwise add when the vocabulary was resized), else every
    tensor; whole tensors even when the model is sharded. Every process of a distributed
    run must call it (it gathers); the main process writes."""
    return distributed.whole_state_dict(model, trainable_only=is_peft(model))


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def write_pretrained(model, directory: Path, state: dict[str, torch.Tensor]) -> None:
    """``model.save_pretrained`` of ``state`` (from :func:`pretrained_state`): the
    Hugging Face layout, or PEFT's adapter layout (``adapter_config.json`` +
    ``adapter_model.safetensors``) holding only what was trained."""
    with no_hf_bar():
        if is_peft(model):
            model.save_pretrained(directory, safe_serialization=True, save_embedding_layers=False, state_dict=state)
        else:
            model.save_pretrained(directory, state_dict=state)


def save_model(model, tokenizer, directory: Path, meta: dict) -> None:
    """``save_pretrained`` (safetensors) + tokenizer, atomically, with a completion marker;
    written by the main process of a distributed run (every process calls it)."""
    state = pretrained_state(model)

    def write():
        with atomic_dir(directory) as tmp:
            write_pretrained(model, tmp, state)
            tokenizer.save_pretrained(tmp)
            write_complete(tmp, meta)

    distributed.on_main(write, what=f"writing {directory}")


def load_model_dir(directory: Path, base=None):
    """``(model, tokenizer)`` saved by :func:`save_model` (safetensors only), in eval mode,
    on this process's device.

    A LoRA adapter directory (what ``save_pretrained`` of a PEFT model writes: only what was
    trained) is loaded onto ``base`` (the model it was trained from, or a function that
    returns it) and merged into it, so the result is a plain model. In a distributed run
    every process loads it; if one cannot (the directory is not on its machine), every
    process stops with one error."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    model = tokenizer = error = None
    try:
        if not is_complete(directory):
            raise MissingArtifactError(f"{directory} is not a complete saved model")
        tokenizer = AutoTokenizer.from_pretrained(directory)
        if (directory / "adapter_config.json").is_file():
            from peft import PeftModel

            if base is None:
                raise ValueError(f"{directory} holds a LoRA adapter (only what was trained): pass the model it was "
                                 "trained from as base=")
            base_model = base() if callable(base) else base
            with peft_quiet():
                model = PeftModel.from_pretrained(base_model, directory).merge_and_unload()
        else:
            with no_hf_bar():
                model = AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True)
    except Exception as e:  # noqa: BLE001 - reported by check_all_ranks
        error = e
    distributed.check_all_ranks(error, f"loading the model in {directory}",
                                fix="every process reads the run's artifacts: put runs/ ($LATENTLIB_RUNS) on a "
                                    "filesystem every machine sees")
    tokenizer.padding_side = "left"
    model.to(distributed.device())
    model.eval()
    return model, tokenizer
