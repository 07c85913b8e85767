"""LoRA adapters through ``peft``: the one way any method wraps a model in adapters."""

from __future__ import annotations

from collections.abc import Sequence

from latentlib.artifacts import peft_quiet

__all__ = ["apply_lora", "lora_for_preset"]


def apply_lora(model, *, r: int, alpha: float, targets: Sequence[str], dropout: float = 0.0, **extra):
    """Wraps ``model`` with LoRA adapters of rank ``r`` and scale ``alpha`` on the modules
    named ``targets``; only the adapters (and ``extra`` options' modules, e.g.
    ``modules_to_save``) stay trainable. ``extra`` goes to ``peft.LoraConfig``."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise ValueError(f"lora_targets {missing} are not modules of this model; it has e.g. "
                         f"{sorted(n for n in present if 'proj' in n or 'attn' in n)[:8]}: use the preset's targets")
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout,
                        task_type="CAUSAL_LM", **{"bias": "none", **extra})
    with peft_quiet():
        return get_peft_model(model, config)


def lora_for_preset(model, tokenizer, preset, tokens: Sequence[str] = ()):
    """The preset's way to train ``model``: every weight for a from-scratch preset; LoRA on
    the preset's targets (rank and alpha) for a real one, with the rows of ``tokens`` (the
    method's special tokens, new to the pretrained vocabulary) trainable too. A tied LM
    head stays tied."""
    if not preset.use_lora:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    extra = {}
    if tokens:
        ids = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
        extra["trainable_token_indices"] = {"embed_tokens": ids}
    # peft's trainable token rows reach a tied LM head by themselves (ensure_weight_tying is for
    # modules_to_save and target_modules; asked here, peft only warns that it has nothing to tie)
    return apply_lora(model, r=preset.lora_r, alpha=preset.lora_alpha, targets=preset.lora_targets, **extra)
