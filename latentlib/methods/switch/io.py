"""Saving and loading SWITCH models: a LoRA model in the published adapter layout (the
SWITCH card's quick-start loads it), a fully trained one (tiny) as a whole model; the
``COMPLETE`` marker holds the :class:`SwitchConfig` later phases and inference use."""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from latentlib import artifacts, distributed
from latentlib.methods.switch.config import SwitchConfig, switch_ids
from latentlib.presets import get_preset, load_model
from latentlib.tokens import grow_embeddings

__all__ = ["save_switch_model", "AdapterMismatchError", "load_switch_adapter", "load_switch_model",
           "load_switch_config"]


def save_switch_model(model, tokenizer, directory, meta: dict, *, files: dict | None = None) -> None:
    """Atomically saves a stage's model: a LoRA model in the published adapter layout
    (``adapter_config.json``, ``adapter_model.safetensors`` and the tokenizer with the
    three tokens), a fully trained one (tiny) as a whole model. ``files``: more JSON files
    to write beside it (name -> value), e.g. phase 1's ``spans.json``.

    The adapter holds only what was trained: the LoRA matrices and the trained embedding
    and head (``modules_to_save``), not the frozen base embeddings PEFT adds by default
    once the vocabulary has grown (on SmolLM2-135M 246 MB instead of 699 MB). In a
    distributed run every process calls it (a sharded model is gathered) and the main
    process writes."""
    state = artifacts.pretrained_state(model)

    def write():
        with artifacts.atomic_dir(Path(directory)) as tmp:
            artifacts.write_pretrained(model, tmp, state)
            tokenizer.save_pretrained(tmp)
            for file, value in (files or {}).items():
                artifacts.save_json(value, tmp / file)
            artifacts.write_complete(tmp, {"adapter": isinstance(model, PeftModel), **meta})

    distributed.on_main(write, what=f"writing {directory}")


class AdapterMismatchError(ValueError):
    """A LoRA adapter whose shapes do not fit the base model it is loaded onto."""


def load_switch_adapter(base_model_or_preset, adapter_dir, *, is_trainable: bool = False):
    """``(model, tokenizer)`` from the card's layout: the tokenizer from the adapter
    directory (it holds ``<swi>``, ``</swi>``, ``<latent>``), the base model's embeddings
    resized to it, then ``PeftModel.from_pretrained``.

    ``base_model_or_preset``: a loaded model, a preset name (real presets, offline-safe
    through :func:`latentlib.presets.load_model`) or a local directory of a saved model.
    """
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} has no adapter_config.json: point at the directory that "
                                "PeftModel.save_pretrained wrote (with the tokenizer saved beside it)")
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    switch_ids(tokenizer)
    tokenizer.padding_side = "left"
    if isinstance(base_model_or_preset, nn.Module):
        base = base_model_or_preset
    elif Path(str(base_model_or_preset)).is_dir():
        with artifacts.no_hf_bar():
            base = AutoModelForCausalLM.from_pretrained(base_model_or_preset, use_safetensors=True)
    else:
        preset = get_preset(str(base_model_or_preset))
        if preset.source == "scratch":
            raise ValueError(f"preset {preset.name!r} has no pretrained base: pass the base model or its directory")
        base, _ = load_model(preset.name)
    if base.get_input_embeddings().weight.shape[0] != len(tokenizer):
        # as the tokens were added for training (mean rows): the adapter holds only what was trained
        grow_embeddings(base, len(tokenizer))
    try:
        with artifacts.peft_quiet():
            model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=is_trainable)
    except RuntimeError as e:
        if "size mismatch" not in str(e):
            raise
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e)[:300])
        raise AdapterMismatchError(
            f"the adapter in {adapter_dir} does not fit this base model ({first}): it was trained on another "
            f"model (width {base.config.hidden_size} here); load it onto the base named in adapter_config.json"
        ) from None
    if not is_trainable:
        model.eval()
    return model, tokenizer


def load_switch_model(directory, preset=None, *, is_trainable: bool = False):
    """Loads what :func:`save_switch_model` wrote: an adapter onto the preset's base model,
    or a whole model."""
    directory = Path(directory)
    if not artifacts.is_complete(directory):
        raise artifacts.MissingArtifactError(f"{directory} is not a complete saved SWITCH model")
    if (directory / "adapter_config.json").is_file():
        if preset is None:
            raise ValueError(f"{directory} holds a LoRA adapter: pass the preset (or base model) it was trained on")
        return load_switch_adapter(preset, directory, is_trainable=is_trainable)
    model, tokenizer = artifacts.load_model_dir(directory)
    if is_trainable:
        model.train()
    return model, tokenizer


def load_switch_config(directory) -> SwitchConfig:
    """The :class:`SwitchConfig` a saved phase was trained with."""
    return SwitchConfig(**artifacts.load_json(Path(directory) / artifacts.COMPLETE)["switch_config"])
