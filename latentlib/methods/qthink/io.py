"""QThink checkpoints in the published release's layout: a model directory
(``save_pretrained``, safetensors; or a PEFT adapter directory for LoRA) plus
``projection_head.pt``, the head's state dict with keys ``mlp.0.weight``, ``mlp.0.bias``,
``mlp.2.weight``, ``mlp.2.bias``, ``mlp.3.weight``, ``mlp.3.bias``.

The ``.pt`` file is read with ``torch.load(..., weights_only=True)``, which refuses any
pickle that would import or call code (``pickle.UnpicklingError`` is caught only to name
the refusal; nothing is unpickled), and every tensor's shape is checked against the
model before loading.
"""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from latentlib import artifacts, distributed
from latentlib.injection import Projection, ProjectionHead
from latentlib.methods.qthink.model import make_projection

__all__ = ["HEAD_FILE", "UnsafeCheckpointError", "HeadShapeError", "save_head", "load_head", "save_qthink",
           "load_qthink"]

HEAD_FILE = "projection_head.pt"


class UnsafeCheckpointError(artifacts.CorruptArtifactError):
    """A ``.pt`` file whose pickle would import or run code: refused unread."""


class HeadShapeError(ValueError):
    """A projection head whose tensors do not fit the model's hidden size."""


def save_head(head: ProjectionHead, path: Path, state: dict | None = None) -> None:
    """``projection_head.pt`` as the release writes it: the head's state dict (tensors
    only; ``state``: the head's whole tensors when it was sharded, see
    :func:`latentlib.distributed.whole_state_dict`)."""
    state = head.state_dict() if state is None else state
    torch.save({k: v.detach().cpu().clone() for k, v in state.items()}, path)


def load_head(path: Path, hidden_size: int) -> ProjectionHead:
    """Reads ``projection_head.pt`` without running code, checks it fits ``hidden_size``."""
    path = Path(path)
    if not path.is_file():
        raise artifacts.MissingArtifactError(f"{path} does not exist: a QThink checkpoint holds {HEAD_FILE} "
                                             "beside the model directory's files")
    try:
        with warnings.catch_warnings():
            # torch's note on a plain (non-zip) pickle's protocol: the file is refused or read below either way
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path} was refused: its pickle imports or calls something other than tensors ({e}). A projection "
            "head file holds only a state dict of tensors; do not load this file with weights_only=False unless "
            "you trust whoever wrote it"
        ) from None
    except Exception as e:  # truncated zip, not a torch file, ...
        raise artifacts.CorruptArtifactError(f"{path} cannot be read as a torch state dict ({type(e).__name__}: "
                                             f"{e}); re-save the head or re-run the training") from e
    head = ProjectionHead(hidden_size)
    expected = head.state_dict()
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise artifacts.CorruptArtifactError(f"{path} does not hold a state dict of tensors (found "
                                             f"{type(state).__name__}); it is not a projection head")
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise HeadShapeError(f"{path}: the keys do not match ProjectionHead (missing {missing}, unexpected "
                             f"{extra}); expected {sorted(expected)}, the layout of the QThink release")
    wrong = [(k, tuple(expected[k].shape), tuple(state[k].shape)) for k in expected
             if state[k].shape != expected[k].shape]
    if wrong:
        k, want, got = wrong[0]
        found = state["mlp.0.weight"].shape[-1] if state["mlp.0.weight"].dim() == 2 else "?"
        raise HeadShapeError(
            f"{path}: {k} has shape {got}, but a head for this model (hidden size {hidden_size}) needs {want} "
            f"({len(wrong)} tensor(s) differ). The head was trained for hidden size {found}: load it with that "
            "model, or train a new head for this one"
        )
    head.load_state_dict(state)
    return head.eval()


def save_qthink(directory: Path, model, tokenizer, projection: Projection | None, meta: dict) -> None:
    """Model (full weights, or the PEFT adapter for a LoRA model: only the trained LoRA
    matrices) + tokenizer + ``projection_head.pt`` (omitted for the text-only SFT
    baseline), atomically. In a distributed run every process calls it (sharded weights
    are gathered) and the main process writes."""
    state = artifacts.pretrained_state(model)
    head_state = distributed.whole_state_dict(projection.head) if projection is not None else None

    def write():
        with artifacts.atomic_dir(Path(directory)) as tmp:
            artifacts.write_pretrained(model, tmp, state)
            tokenizer.save_pretrained(tmp)
            if projection is not None:
                save_head(projection.head, tmp / HEAD_FILE, head_state)
            artifacts.write_complete(tmp, {"kind": "qthink checkpoint", **meta})

    distributed.on_main(write, what=f"writing {directory}")


def load_qthink(directory: Path, *, base_model=None):
    """``(model, tokenizer, projection or None)`` from :func:`save_qthink`'s layout.

    An adapter directory needs its base model: ``base_model`` (a model or a directory),
    else the ``base_model_name_or_path`` the adapter config names.
    """
    directory = Path(directory)
    if not artifacts.is_complete(directory):
        raise artifacts.MissingArtifactError(f"{directory} is not a complete QThink checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.padding_side = "left"
    if (directory / "adapter_config.json").is_file():
        if base_model is None or isinstance(base_model, (str, Path)):
            source = base_model or json.loads((directory / "adapter_config.json").read_text())[
                "base_model_name_or_path"]
            with artifacts.no_hf_bar():
                base_model = AutoModelForCausalLM.from_pretrained(source, use_safetensors=True)
        with artifacts.peft_quiet():
            model = PeftModel.from_pretrained(base_model, directory)
    else:
        with artifacts.no_hf_bar():
            model = AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True)
    model.eval()
    projection = None
    if (directory / HEAD_FILE).is_file():
        hidden = model.get_input_embeddings().weight.shape[1]
        projection = make_projection(model, load_head(directory / HEAD_FILE, hidden))
        projection.eval()
    return model, tokenizer, projection
