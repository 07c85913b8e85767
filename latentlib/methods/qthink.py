"""QThink (the QThink card) and CODI: K continuous thoughts through a learned projection head,
then greedy text.

What is injected where. After the question, K latent slots; the input of slot k is the
projection head (Linear(D, D) -> GELU -> Linear(D, D) -> LayerNorm(D)) applied to the
last-layer hidden state of the position before it (the last question token for k = 1).
Then the model writes text greedily (for the embedded task: ``#### <answer>``). At
inference this is the engine's :func:`~latentlib.recurrence.generate` with
``ScriptedPolicy([LATENT] * K)`` and the :class:`~latentlib.injection.Projection`
injector: one forward per thought through the KV cache, as in the card's reference loop
(a test pins the equality). Training and the teacher signal are in
:mod:`latentlib.training.distill`.

Checkpoints follow the published release: a model directory (``save_pretrained``,
safetensors; or a PEFT adapter directory for LoRA) plus ``projection_head.pt``, the head's
state dict with keys ``mlp.0.weight``, ``mlp.0.bias``, ``mlp.2.weight``, ``mlp.2.bias``,
``mlp.3.weight``, ``mlp.3.bias``. The ``.pt`` file is read with
``torch.load(..., weights_only=True)``, which refuses any pickle that would import or
call code, and every tensor's shape is checked against the model before loading.

Departures from the card: the card's chat-template prompt becomes the task's prompt
(the encoded question); the card evaluates GSM8K with 2,048 new tokens of verbose text
after the thoughts, while the embedded task's target after the thoughts is the answer
line only (``target="cot"`` in the distillation config keeps the steps as text); a new
head's LayerNorm gain starts at the embeddings' RMS instead of 1 (see
:func:`make_projection`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from latentlib import artifacts
from latentlib.batching import Encoded, Segment, prompt_batch
from latentlib.evaluate import EvalSpec
from latentlib.injection import Projection, ProjectionHead, embedding_rms
from latentlib.policies import LATENT, ScriptedPolicy
from latentlib.recurrence import generate

__all__ = ["HEAD_FILE", "UnsafeCheckpointError", "HeadShapeError", "qthink_segments", "qthink_policy",
           "make_projection", "think", "qthink_spec", "save_head", "load_head", "save_qthink", "load_qthink"]

HEAD_FILE = "projection_head.pt"


class UnsafeCheckpointError(artifacts.CorruptArtifactError):
    """A ``.pt`` file whose pickle would import or run code: refused unread."""


class HeadShapeError(ValueError):
    """A projection head whose tensors do not fit the model's hidden size."""


# ---------------------------------------------------------------------------- the method


def qthink_segments(enc: Encoded, num_latent: int, latent_id: int, *, target: str = "answer",
                    max_answer_length: int | None = None) -> list[Segment]:
    """``[question, K latent slots, target]``: the target is the answer line (``"answer"``)
    or the written steps and the answer (``"cot"``), cut to ``max_answer_length`` tokens
    (eos is kept as the last token when the cut removes it)."""
    if target not in ("answer", "cot"):
        raise ValueError(f"target={target!r}: use 'answer' or 'cot'")
    text = list(enc.answer) if target == "answer" else [t for s in enc.steps for t in s] + list(enc.answer)
    if max_answer_length is not None and len(text) > max_answer_length:
        text = text[:max_answer_length - 1] + [enc.answer[-1]]
    return [("prompt", enc.question), ("latent", (latent_id,) * num_latent), ("target", tuple(text))]


def qthink_policy(num_latent: int) -> ScriptedPolicy:
    """K latent steps, then free (greedy) decoding."""
    return ScriptedPolicy([LATENT] * num_latent)


def make_projection(model, head: ProjectionHead | None = None) -> Projection:
    """The projection injector on the last layer, sized and placed for ``model``.

    A new head starts with its LayerNorm gain at the RMS of the model's input embeddings,
    so its first thoughts have the scale of ordinary token embeddings (with the gain of 1
    they would be about 12 times larger than the tiny model's embeddings). The layout
    stays the release's.
    """
    weight = model.get_input_embeddings().weight
    if head is None:
        head = ProjectionHead(weight.shape[1])
        with torch.no_grad():
            head.mlp[3].weight.fill_(embedding_rms(model))
    return Projection(weight.shape[1], layer=-1, head=head).to(weight.device)


@torch.no_grad()
def think(model, tokenizer, projection: Projection, prompts: list, *, num_latent: int,
          max_new_tokens: int = 32, latent_positions: str = "continue"):
    """K thoughts, then greedy text, for a batch of prompts (token id lists): a ``Trace``."""
    input_ids, mask = prompt_batch(prompts, tokenizer.pad_token_id)
    dev = model.get_input_embeddings().weight.device
    return generate(model, input_ids.to(dev), mask.to(dev), policy=qthink_policy(num_latent),
                    max_new_tokens=num_latent + max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id, injector=projection,
                    latent_token_id=tokenizer.get_vocab().get("<latent>"), latent_positions=latent_positions)


def qthink_spec(name: str, projection: Projection, num_latent: int, *, max_new_tokens: int = 16,
                latent_positions: str = "continue") -> EvalSpec:
    """How :func:`latentlib.evaluate.evaluate` runs a QThink model (the budget counts the thoughts)."""
    return EvalSpec(name, policy=lambda records: qthink_policy(num_latent), injector=projection,
                    latent_positions=latent_positions, max_new_tokens=num_latent + max_new_tokens)


# ---------------------------------------------------------------------------- checkpoints


def save_head(head: ProjectionHead, path: Path) -> None:
    """``projection_head.pt`` as the release writes it: the head's state dict (tensors only)."""
    torch.save({k: v.detach().cpu().clone() for k, v in head.state_dict().items()}, path)


def load_head(path: Path, hidden_size: int) -> ProjectionHead:
    """Reads ``projection_head.pt`` without running code, checks it fits ``hidden_size``."""
    import pickle

    path = Path(path)
    if not path.is_file():
        raise artifacts.MissingArtifactError(f"{path} does not exist: a QThink checkpoint holds {HEAD_FILE} "
                                             "beside the model directory's files")
    try:
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
    """Model (full weights, or the PEFT adapter for a LoRA model) + tokenizer +
    ``projection_head.pt`` (omitted for the text-only SFT baseline), atomically."""
    with artifacts.atomic_dir(Path(directory)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if projection is not None:
            save_head(projection.head, tmp / HEAD_FILE)
        artifacts.write_complete(tmp, {"kind": "qthink checkpoint", **meta})


def load_qthink(directory: Path, *, base_model=None):
    """``(model, tokenizer, projection or None)`` from :func:`save_qthink`'s layout.

    An adapter directory needs its base model: ``base_model`` (a model or a directory),
    else the ``base_model_name_or_path`` the adapter config names.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    if not artifacts.is_complete(directory):
        raise artifacts.MissingArtifactError(f"{directory} is not a complete QThink checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.padding_side = "left"
    if (directory / "adapter_config.json").is_file():
        from peft import PeftModel

        if base_model is None or isinstance(base_model, (str, Path)):
            source = base_model or json.loads((directory / "adapter_config.json").read_text())[
                "base_model_name_or_path"]
            base_model = AutoModelForCausalLM.from_pretrained(source, use_safetensors=True)
        model = PeftModel.from_pretrained(base_model, directory)
    else:
        model = AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True)
    model.eval()
    projection = None
    if (directory / HEAD_FILE).is_file():
        hidden = model.get_input_embeddings().weight.shape[1]
        projection = make_projection(model, load_head(directory / HEAD_FILE, hidden))
        projection.eval()
    return model, tokenizer, projection
