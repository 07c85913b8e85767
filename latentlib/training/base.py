"""Base models for the embedded default: the tiny Qwen3 trained from scratch on the
synthetic task, with written steps (CoT) or straight to the answer (no-CoT).

The CoT model is the starting point of every latent method in a ``tiny`` run, as the
pretrained model is for a real preset. Its format can include an empty ``<bot><eot>``
pair between question and steps (``markers=True``): the Coconut paper's stage 0, which
lets a later curriculum put thoughts between the markers without shifting every later
position relative to what the CoT model learned.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from latentlib import artifacts
from latentlib.batching import IGNORE, Encoded, Segment, collate, encode_record
from latentlib.presets import get_preset, load_model
from latentlib.recurrence import position_ids_for
from latentlib.tasks import ChainConfig, chain_vocabulary, make_chain_splits
from latentlib.tokens import add_special_tokens
from latentlib.training.loop import TrainConfig, TrainResult, train

__all__ = ["BaseConfig", "cot_segments", "nocot_segments", "lm_loss", "token_loss", "train_base",
           "save_model", "load_model_dir", "chain_task"]


@dataclass(frozen=True)
class BaseConfig:
    kind: str = "cot"  # "cot" (question, steps, answer) or "nocot" (question, answer)
    markers: bool = False  # put an empty <bot><eot> between question and steps (Coconut's stage 0)
    train: TrainConfig = TrainConfig(steps=1500, batch_size=128, lr=3e-3, warmup_steps=100)  # the optimisation
    seed: int = 0  # model initialisation

    def __post_init__(self):
        if self.kind not in ("cot", "nocot"):
            raise ValueError(f"kind={self.kind!r}: use 'cot' or 'nocot'")


def cot_segments(enc: Encoded, markers: tuple[int, int] | None = None) -> list[Segment]:
    segs: list[Segment] = [("prompt", enc.question)]
    if markers is not None:
        segs.append(("prompt", markers))  # the model never has to write the markers: they are forced
    segs.append(("target", tuple(t for s in enc.steps for t in s)))
    segs.append(("target", enc.answer))
    return segs


def nocot_segments(enc: Encoded) -> list[Segment]:
    return [("prompt", enc.question), ("target", enc.answer)]


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts label t+1; IGNORE labels have no loss."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


def lm_loss(model, batch) -> tuple[torch.Tensor, dict]:
    """Plain causal-LM loss on a text-only batch (left-padded)."""
    pos = position_ids_for(batch["attention_mask"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=pos).logits
    return token_loss(logits, batch["labels"]), {}


def chain_task(cfg: ChainConfig | None = None):
    """The embedded task's splits and vocabulary."""
    cfg = cfg or ChainConfig()
    return make_chain_splits(cfg), chain_vocabulary(cfg)


def save_model(model, tokenizer, directory, meta: dict) -> None:
    """``save_pretrained`` (safetensors) + tokenizer, atomically, with a completion marker."""
    with artifacts.atomic_dir(directory) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        artifacts.write_complete(tmp, meta)


def load_model_dir(directory):
    """Loads a model saved by :func:`save_model` (safetensors only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not artifacts.is_complete(directory):
        raise artifacts.MissingArtifactError(f"{directory} is not a complete saved model")
    model = AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.padding_side = "left"
    model.eval()
    return model, tokenizer


def train_base(run: str, cfg: BaseConfig, splits, words: list[str], *, name: str | None = None,
               preset: str = "tiny", progress: bool = True, resume: bool = True):
    """Trains the tiny model from scratch and saves it under ``<run>/base/<name>``.

    Returns ``(model, tokenizer, TrainResult)``. A complete saved model is reused (the
    cache): delete the directory to retrain.
    """
    name = name or (cfg.kind + ("_markers" if cfg.markers else ""))
    out = artifacts.artifact_dir(run, "base", name)
    if artifacts.is_complete(out):
        model, tokenizer = load_model_dir(out)
        info = artifacts.load_json(out / artifacts.COMPLETE)
        return model, tokenizer, TrainResult(history=info.get("history", []), seconds=info.get("seconds", 0.0),
                                             steps=cfg.train.steps)
    model, tokenizer = load_model(preset, words=words, seed=cfg.seed)
    ids = add_special_tokens(model, tokenizer)
    separator = get_preset(preset).step_separator
    markers = (ids["<bot>"], ids["<eot>"]) if cfg.markers else None
    encoded = [encode_record(tokenizer, r, separator) for r in splits.train]
    examples = [cot_segments(e, markers) if cfg.kind == "cot" else nocot_segments(e) for e in encoded]
    result = train(model, examples, lambda b: collate(b, tokenizer.pad_token_id), lm_loss, cfg.train,
                   checkpoint_dir=out.with_name(f".{name}.ckpt") if resume else None,
                   desc=f"base {name}", progress=progress)
    save_model(model, tokenizer, out, {"kind": f"base model ({name})", "config": asdict(cfg),
                                       "history": result.history, "seconds": result.seconds,
                                       "seed": cfg.seed, "train_seed": cfg.train.seed})
    return model, tokenizer, result
