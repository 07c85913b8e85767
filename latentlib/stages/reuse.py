"""The one rule for reusing a finished stage.

A stage's artifact (``runs/<run>/<stage>/<name>/``) records a *key*: a hash of the stage's
whole configuration and of the identities of its inputs (each input artifact's own key, the
task's record digest, the pretrained weights' name). Asked to run again:

- a complete artifact with the same key is loaded (**reused**);
- one with another key is trained again and replaces it atomically (**retrained**), and
  the message names what changed;
- no artifact: **trained**.

Because an artifact's key includes its inputs' keys, changing a parameter of an early stage
changes every later stage's key, so nothing downstream is silently reused. Training
checkpoints carry the key in their directory name (``.<name>-<key>.ckpt``), so an
interrupted run resumes only into the same configuration.

Settings that change how a run is carried out but not what it makes (:data:`NOT_IN_KEY`:
how often it checkpoints) are left out of the key, so that a run interrupted without
periodic checkpoints can be restarted with them, and a finished artifact is reused
whatever they were. Such a field that a configuration gained after keys had been written
is dropped from the key altogether, so that those keys stay what they were.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from latentlib import artifacts, distributed

__all__ = ["Built", "stage_key", "identity", "input_identity", "build_or_reuse", "jsonable", "NOT_IN_KEY",
           "checkpoint_every"]

# configuration fields (at any depth) that do not change a stage's result, with the value the
# key takes for them: the default, so that keys written before a field was set are unchanged,
# or None, leaving the field out (one added to its configuration after keys had been written)
NOT_IN_KEY = {"checkpoint_every": 0, "save_steps": None}

T = TypeVar("T")


def checkpoint_every(params: Mapping) -> int:
    """The notebooks' ``checkpoint_every`` parameter (optimizer steps between training
    checkpoints; 0, the default: at the end of each run or curriculum stage only)."""
    return int(params.get("checkpoint_every", NOT_IN_KEY["checkpoint_every"]))


def _plain(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return _plain(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def jsonable(obj: Any) -> Any:
    """A configuration as plain JSON values (dataclasses, also inside dicts and lists, to
    dicts; tuples to lists)."""
    return json.loads(json.dumps(_plain(obj), sort_keys=True, default=str))


def _keyed(tree: Any) -> Any:
    """A JSON configuration with the fields of :data:`NOT_IN_KEY` set to their key value (or left out)."""
    if isinstance(tree, dict):
        return {k: NOT_IN_KEY[k] if k in NOT_IN_KEY else _keyed(v) for k, v in tree.items()
                if not (k in NOT_IN_KEY and NOT_IN_KEY[k] is None)}
    if isinstance(tree, list):
        return [_keyed(v) for v in tree]
    return tree


def stage_key(config: Any, inputs: Mapping[str, str]) -> str:
    """The hash of a stage's configuration (without :data:`NOT_IN_KEY`) and its inputs' identities."""
    payload = json.dumps({"config": _keyed(jsonable(config)), "inputs": dict(sorted(inputs.items()))},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def identity(directory: Path) -> str:
    """What a complete artifact contributes to the keys of the stages that read it: its key."""
    meta = artifacts.read_meta(directory)
    key = meta.get("key")
    if not key:
        raise artifacts.CorruptArtifactError(
            f"{directory} records no key: it was written by an older version of latentlib; delete it (or use a new "
            "run name) so that the stage that makes it runs again")
    return key


def input_identity(run: str, stage: str, name: str, *, made_by: str) -> str:
    """The identity of an input artifact, or an error naming the notebook that makes it."""
    return identity(artifacts.require_artifact(run, stage, name, made_by=made_by))


def _changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted names of the leaves where two JSON trees differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _changes(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1]} {old!r} -> {new!r}"]


@dataclass
class Built(Generic[T]):
    value: T  # what the stage made (or loaded)
    directory: Path  # the artifact
    key: str  # its key
    status: str  # "reused", "trained" or "retrained"
    meta: dict = field(default_factory=dict)  # the artifact's metadata

    @property
    def reused(self) -> bool:
        return self.status == "reused"


def build_or_reuse(directory: Path, config: Any, inputs: Mapping[str, str], *,
                   build: Callable[[dict, Path], T], load: Callable[[Path, dict], T], label: str,
                   verbose: bool = True) -> Built[T]:
    """Loads the artifact at ``directory`` when its key matches ``config`` and ``inputs``,
    else calls ``build(record, checkpoint_dir)``, which trains and writes the artifact with
    ``record`` (the key, the configuration, the inputs) in its metadata. Prints which
    happened, with what changed when an artifact is replaced."""
    directory = Path(directory)
    verbose = verbose and distributed.is_main()
    key = stage_key(config, inputs)
    record = {"key": key, "stage_config": jsonable(config), "inputs": dict(inputs)}
    # In a distributed run the main process decides and every process follows (they read
    # the same runs/ directory, but the main process may write it before a slower one looks).
    status, changed = distributed.broadcast(_decide(directory, key, record) if distributed.is_main() else None)
    if status == "reused":
        meta = artifacts.read_meta(directory)
        if verbose:
            print(f"{label}: reused ({directory.name}, key {key})")
        return Built(load(directory, meta), directory, key, "reused", meta)
    if verbose:
        if status == "retrained":
            what = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
            print(f"{label}: retrained, its configuration or an input changed ({what or 'an older artifact'})")
        else:
            print(f"{label}: training (no artifact yet)")
    checkpoint = directory.with_name(f".{directory.name}-{key}.ckpt")
    value = build(record, checkpoint)
    meta = artifacts.read_meta(directory) if artifacts.is_complete(directory) else {}
    if meta.get("key") != key:
        raise RuntimeError(f"{label}: the stage did not write its artifact with key {key} to {directory}")
    # the artifact holds the final weights; the main process removes the checkpoint, the others wait
    distributed.on_main(shutil.rmtree, checkpoint, ignore_errors=True, what=f"removing {checkpoint}")
    if verbose:
        print(f"{label}: {status} ({directory.name}, key {key})")
    return Built(value, directory, key, status, meta)


def _decide(directory: Path, key: str, record: dict) -> tuple[str, list[str]]:
    """``("reused" | "retrained" | "trained", what changed)``."""
    if not artifacts.is_complete(directory):
        return "trained", []
    meta = artifacts.read_meta(directory)
    if meta.get("key") == key:
        return "reused", []
    old = {"config": _keyed(meta.get("stage_config")), "inputs": meta.get("inputs")}
    return "retrained", _changes(old, {"config": _keyed(record["stage_config"]), "inputs": record["inputs"]})
