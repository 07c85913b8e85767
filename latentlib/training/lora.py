"""LoRA adapters through ``peft``: the one way any method wraps a model in adapters."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["apply_lora"]


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
    return get_peft_model(model, config)
