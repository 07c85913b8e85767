"""The training loop's optimizer: AdamW with PyTorch's fused kernel where the device has it
(what transformers' Trainer, and so TRL, uses by default), the same update up to rounding."""

import pytest
import torch

from latentlib.batching import collate, cot_segments, encode_record
from latentlib.presets import Preset, build_tiny_model, build_tiny_tokenizer
from latentlib.tasks import ChainConfig, Format, chain_vocabulary, make_chain_splits
from latentlib.training.losses import lm_loss
from latentlib.training.loop import TrainConfig, adamw, train


def _small_setup():
    cfg = ChainConfig(n_train=64, n_valid=0, n_test=0, seed=3)
    tok = build_tiny_tokenizer(chain_vocabulary(cfg))
    model = build_tiny_model(len(tok), Preset("t", "scratch", hidden_size=32, num_layers=2, num_heads=2,
                                              num_kv_heads=1, intermediate_size=64), seed=1)
    examples = [cot_segments(encode_record(tok, r, Format(" "))) for r in make_chain_splits(cfg).train]
    return model, tok, examples


def test_adamw_is_fused_on_cpu_and_steps_like_the_per_tensor_loop():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(32))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    fused, plain = adamw(a, 1e-2, 0.1), torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1, foreach=False)
    assert fused.param_groups[0]["fused"] is True
    for step in range(5):
        g = [torch.randn_like(p, generator=torch.Generator().manual_seed(step * 10 + i)) for i, p in enumerate(a)]
        for p, q, gi in zip(a, b, g):
            p.grad, q.grad = gi.clone(), gi.clone()
        fused.step()
        plain.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)


def test_adamw_falls_back_where_there_is_no_fused_kernel():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64).to("meta"))
    assert not adamw([p], 1e-3).param_groups[0]["fused"]


def test_train_with_the_fused_default_matches_the_per_tensor_optimizer():
    """The loop's default optimizer against an explicitly passed per-tensor AdamW. The update
    is the same up to rounding (the test above); over six steps at lr 1e-2 the rounding
    differences grow through the model to about 1e-4 of the loss, so the curve is compared
    at 1e-3."""
    runs = {}
    for name in ("default", "per_tensor"):
        model, tok, examples = _small_setup()
        cfg = TrainConfig(steps=6, batch_size=4, lr=1e-2, warmup_steps=2, log_every=1, seed=0)
        opt = None if name == "default" else torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                                               lr=cfg.lr, foreach=False)
        res = train(model, examples, lambda b: collate(b, tok.pad_token_id), lm_loss, cfg, progress=False,
                    optimizer=opt)
        runs[name] = ([r["loss"] for r in res.history], [p.detach().clone() for p in model.parameters()])
    (la, wa), (lb, wb) = runs["default"], runs["per_tensor"]
    assert la[0] == lb[0]  # the first loss is before any update
    assert la == pytest.approx(lb, rel=1e-3)
    for x, y in zip(wa, wb):
        torch.testing.assert_close(x, y, atol=1e-3, rtol=1e-3)
