"""SWITCH's loss and its two supervised phases (SFT on the wrapped CoT; the parallel
curriculum), each through the one training loop."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from latentlib.batching import collate, encode_record
from latentlib.injection import make_injector
from latentlib.methods.switch.config import SWITCH_TOKENS, SwitchConfig, SwitchIds, switch_ids
from latentlib.methods.switch.schedule import mark_stay_decisions, phase2_examples, schedule_stage, switch_segments
from latentlib.methods.switch.spans import Span
from latentlib.recurrence import latent_forward
from latentlib.tasks import Format
from latentlib.tokens import trainable_token_config
from latentlib.training.curriculum import CurriculumConfig, train_curriculum
from latentlib.training.lora import apply_lora
from latentlib.training.loop import TrainConfig, TrainResult, train
from latentlib.training.losses import token_loss

__all__ = ["switch_loss", "make_trainable", "train_phase1", "train_phase2"]


def switch_loss(cfg: SwitchConfig, ids: SwitchIds, injector=None) -> Callable:
    """``loss_fn(model, batch)``: the engine's forward (thoughts injected at slots, SWITCH
    position ids) and next-token cross-entropy on the targets."""

    def loss_fn(model, batch):
        pos = cfg.position_ids(batch["input_ids"], batch["attention_mask"], batch["latent_mask"], ids)
        out = latent_forward(model, batch["input_ids"], batch["attention_mask"], batch["latent_mask"],
                             injector=injector, position_ids=pos)
        ce = token_loss(out.logits, batch["labels"])
        stay = batch.get("stay_mask")
        if stay is None or not stay.any():
            return ce, {}
        p_exit = torch.softmax(out.logits[stay].float(), -1)[:, ids.swi_end]  # (n,)
        unlikely = -torch.log1p(-p_exit.clamp(max=1 - 1e-6)).mean()
        return ce + unlikely, {"ce": ce.item(), "stay": unlikely.item()}

    return loss_fn


def make_trainable(model: nn.Module, tokenizer, preset) -> nn.Module:
    """Real presets (``preset.use_lora``): LoRA on the preset's targets (the card: r=32,
    alpha=64 on q/k/v/o/gate/up/down) plus the whole embedding and LM head
    (``modules_to_save``, the card's "resized embeddings + LM head"). Tiny: all weights."""
    if not preset.use_lora:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    switch_ids(tokenizer)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    return apply_lora(model, r=preset.lora_r, alpha=preset.lora_alpha, targets=preset.lora_targets,
                      ensure_weight_tying=tied,  # a tied head stays tied
                      **trainable_token_config(tokenizer, SWITCH_TOKENS, whole_matrices=True))


def train_phase1(model: nn.Module, tokenizer, records: Sequence, spans: Sequence[Sequence[Span]],
                 train_cfg: TrainConfig, cfg: SwitchConfig, fmt: Format, *,
                 checkpoint_dir=None, progress: bool = True, on_log=None) -> TrainResult:
    """SFT on the CoT with ``<swi>``/``</swi>`` around the wrapped spans (text inside)."""
    ids = switch_ids(tokenizer)
    examples = [switch_segments(encode_record(tokenizer, r, fmt), sp, ids) for r, sp in zip(records, spans)]
    return train(model, examples, lambda b: collate(b, tokenizer.pad_token_id), switch_loss(cfg, ids), train_cfg,
                 checkpoint_dir=checkpoint_dir, desc="switch phase 1", progress=progress, on_log=on_log)


def train_phase2(model: nn.Module, tokenizer, records: Sequence, spans: Sequence[Sequence[Span]],
                 cfg: SwitchConfig, curriculum: CurriculumConfig, fmt: Format, *, injector=None, checkpoint_dir=None,
                 after_stage=None, progress: bool = True):
    """The parallel curriculum: stage ``s`` from ``curriculum.start_stage`` to
    ``curriculum.end_stage``, the last one fully latent (:func:`schedule_stage`; a
    :class:`~latentlib.training.curriculum.CurriculumConfig`;
    its stage lengths, optimizer and reset settings apply, its Coconut-only fields
    ``c_thought``/``max_latent_stage``/``uniform_prob`` do not: SWITCH's c is
    ``cfg.c_thought``). Returns the per-stage results."""
    ids = switch_ids(tokenizer)
    injector = injector if injector is not None else make_injector(cfg.injection, model)
    end = curriculum.end_stage
    if end > cfg.max_stage:
        raise ValueError(f"end_stage={end} is beyond the schedule: with c={cfg.c_thought} and K_max={cfg.k_max} "
                         f"stage {cfg.max_stage} already replaces every block entirely and later stages would "
                         f"train the same format again; use at most {cfg.max_stage} stages (or raise K_max)")
    encoded = [encode_record(tokenizer, r, fmt) for r in records]
    pad = tokenizer.pad_token_id
    return train_curriculum(model, lambda s: phase2_examples(encoded, spans, schedule_stage(s, end, cfg), cfg, ids),
                            lambda b: mark_stay_decisions(collate(b, pad, align="first_latent"), cfg.k_min),
                            switch_loss(cfg, ids, injector), curriculum,
                            checkpoint_dir=checkpoint_dir, after_stage=after_stage, desc="switch phase 2",
                            progress=progress)
