"""Deferred weight gradients of the thought passes: same gradients, hooks fire once,
nothing routed where it does not pay, and the routing ends with the forward."""

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

import latentlib.deferred_grads as deferred_grads
from latentlib.deferred_grads import DeferredWeightGrads, worth_deferring
from latentlib.recurrence import latent_forward


@pytest.fixture(scope="module")
def wide():
    """A 2-layer Qwen3 whose MLP weights (128 x 1024) are large enough to be deferred."""
    cfg = Qwen3Config(vocab_size=40, hidden_size=128, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    return Qwen3ForCausalLM(cfg).float()


def thought_batch(B=4, T=14, first=5, n=4, seed=0):
    """Left-padded rows with ``n`` aligned thoughts from column ``first``; row 0 is padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    latent = torch.zeros(B, T, dtype=torch.bool)
    latent[:, first:first + n] = True
    return ids, mask, latent


def grads_of(model, defer, **kw):
    model.zero_grad(set_to_none=True)
    ids, mask, latent = thought_batch()
    out = latent_forward(model, ids, mask, latent, defer_weight_grads=defer, **kw)
    loss = out.logits[:, -4:].logsumexp(-1).mean() + out.thoughts.pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_only_large_weights_with_few_rows_are_deferred(wide):
    mlp = wide.model.layers[0].mlp
    assert worth_deferring(4, mlp.up_proj.weight) and worth_deferring(32, mlp.up_proj.weight)
    assert not worth_deferring(33, mlp.up_proj.weight)  # 33 x 4 rows > the 128-wide side
    assert not worth_deferring(4, wide.model.layers[0].self_attn.q_proj.weight)  # 16k elements
    table = DeferredWeightGrads(wide.model, rows=4)
    # gate, up, down of both layers: each holds its (rows, out_features) float32 output gradient
    assert table.held_bytes(10) == 10 * 4 * 2 * (1024 + 1024 + 128)
    assert not DeferredWeightGrads(wide.model, rows=128)


@pytest.mark.parametrize("kw", [{}, {"tbptt": 2}, {"capture_layers": (1,)}])
def test_deferred_gradients_equal_the_ordinary_ones(wide, kw, monkeypatch):
    calls = []
    backward = deferred_grads._WeightSink.backward

    def counted(ctx, grad):
        calls.append(len(ctx.stash[0]))
        return backward(ctx, grad)

    loss_ref, ref = grads_of(wide, False, **kw)
    assert not calls
    monkeypatch.setattr(deferred_grads._WeightSink, "backward", staticmethod(counted))
    loss, got = grads_of(wide, True, **kw)
    # every deferred weight's sink ran once and received every chunk's rows (prefix, 3 thought
    # passes, the last thought with the suffix)
    assert calls == [5] * 6
    torch.testing.assert_close(loss, loss_ref)
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-6, rtol=1e-5, msg=name)


def test_gradient_hooks_fire_once_with_the_whole_gradient(wide):
    weight = wide.model.layers[1].mlp.down_proj.weight
    _, ref = grads_of(wide, False)
    seen = []
    handle = weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    try:
        grads_of(wide, True)
    finally:
        handle.remove()
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], ref["model.layers.1.mlp.down_proj.weight"], atol=1e-6, rtol=1e-5)


def test_routing_ends_with_the_forward_even_after_an_error(wide):
    def fail(module, args):
        raise RuntimeError("boom")

    ids, mask, latent = thought_batch()
    handle = wide.model.layers[1].register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            latent_forward(wide, ids, mask, latent)
    finally:
        handle.remove()
    assert torch._C._len_torch_function_stack() == 0
    x = torch.randn(2, 128, requires_grad=True)
    wide.model.layers[0].mlp.up_proj(x).sum().backward()  # an ordinary linear again
    assert wide.model.layers[0].mlp.up_proj.weight.grad is not None


def test_no_routing_without_grad_or_with_checkpointing(wide, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("routed")

    monkeypatch.setattr(deferred_grads._LinearInputGrad, "apply", refuse)
    ids, mask, latent = thought_batch()
    with torch.no_grad():
        latent_forward(wide, ids, mask, latent)
    latent_forward(wide, ids, mask, latent, checkpoint=True).logits.sum().backward()
