"""LoRA through peft, as every method wraps a real model: quiet, and a tied LM head stays tied."""

import dataclasses
import warnings

import torch

from latentlib.presets import Preset
from latentlib.training.lora import lora_for_preset

LORA = Preset("test-lora", "scratch", hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
              intermediate_size=128, use_lora=True, lora_r=4, lora_alpha=8)


def test_lora_with_new_token_rows_warns_nothing_and_the_tied_head_reads_the_trained_rows(tiny):
    model, tok, ids = tiny
    assert model.config.tie_word_embeddings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft's "nothing to tie" and its deprecated-property read included
        peft_model = lora_for_preset(model, tok, LORA, tokens=("<swi>", "</swi>"))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("trainable_tokens" in n for n in trainable) and any("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "trainable_tokens_delta" in n:
                p.add_(1.0)  # as training would move the new rows
    out = peft_model(torch.tensor([[3, 4, 5]]), output_hidden_states=True)
    row = peft_model.get_input_embeddings()(torch.tensor([ids["<swi>"]]))[0]
    assert torch.allclose(out.logits[0, -1, ids["<swi>"]], out.hidden_states[-1][0, -1] @ row, atol=1e-4)


def test_lora_without_new_tokens_warns_nothing(tiny):
    model, tok, _ = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peft_model = lora_for_preset(model, tok, dataclasses.replace(LORA, lora_targets=("q_proj", "v_proj")))
    assert all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
