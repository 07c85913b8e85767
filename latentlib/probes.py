"""Mechanistic measurements on latent-reasoning models (the SWITCH card's three findings,
and the same questions for Coconut):

- where the boundary tokens sit in the next-token distribution (:func:`token_ranks`);
- whether an upcoming boundary is linearly decodable from hidden states
  (:func:`linear_probe`, a logistic regression trained with torch on a held-out split);
- what the injected states do: ablations that zero them, replace them by random vectors
  of the same norm, or shuffle them across the batch (:class:`AblatedInjector`);
- what each thought "says": the logit lens (:func:`logit_lens`) and, for the embedded
  task, whether thought k decodes to the k-th intermediate value (:func:`lens_matches_steps`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentlib.injection import Injector

__all__ = ["AblatedInjector", "ABLATIONS", "token_ranks", "linear_probe", "logit_lens", "lens_matches_steps"]

ABLATIONS = ("none", "zero", "random", "shuffle")


class AblatedInjector(Injector):
    """Wraps an injector and ablates what it injects.

    - ``zero``: the thought becomes the zero vector;
    - ``random``: a random direction with the same norm as the real thought (seeded);
    - ``shuffle``: each sequence gets another sequence's thought (a fixed derangement of
      the batch), so scale and distribution are real but the content is not its own.
    """

    def __init__(self, inner: Injector, mode: str, seed: int = 0):
        super().__init__()
        if mode not in ABLATIONS:
            raise ValueError(f"ablation {mode!r}: use one of {ABLATIONS}")
        self.inner, self.mode = inner, mode
        self.generator = torch.Generator().manual_seed(seed)
        self.spec = f"{inner.spec}|{mode}"

    def forward(self, hidden_states):
        x = self.inner(hidden_states)  # (B, D)
        if self.mode == "zero":
            return torch.zeros_like(x)
        if self.mode == "random":
            r = torch.randn(x.shape, generator=self.generator).to(x)
            return r * (x.norm(dim=-1, keepdim=True) / r.norm(dim=-1, keepdim=True).clamp_min(1e-6))
        if self.mode == "shuffle" and x.shape[0] > 1:
            return x.roll(1, dims=0)  # a derangement: no sequence keeps its own thought
        return x


@torch.no_grad()
def token_ranks(logits: torch.Tensor, token_id: int) -> torch.Tensor:
    """Rank (1 = most likely) of ``token_id`` in each next-token distribution ``(..., V)``."""
    target = logits[..., token_id : token_id + 1]
    return (logits > target).sum(-1) + 1


def linear_probe(features: torch.Tensor, labels: torch.Tensor, *, test_fraction: float = 0.3, seed: int = 0,
                 steps: int = 300, weight_decay: float = 1e-3) -> dict:
    """Logistic regression from ``features (N, D)`` to binary ``labels (N,)``; returns the
    held-out accuracy and the majority-class baseline on the same split."""
    if features.shape[0] != labels.shape[0] or features.shape[0] < 10:
        raise ValueError(f"{features.shape[0]} examples for {labels.shape[0]} labels: need matching counts, >= 10")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(features.shape[0], generator=g)
    n_test = max(1, int(test_fraction * len(perm)))
    test, train = perm[:n_test], perm[n_test:]
    x = features.float()
    mu, sd = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
    x = (x - mu) / sd
    y = labels.float()
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(x[train] @ w + b, y[train]).backward()
        opt.step()
    with torch.no_grad():
        pred = (x[test] @ w + b) > 0
        acc = (pred == y[test].bool()).float().mean().item()
    majority = max(y[test].mean().item(), 1 - y[test].mean().item())
    return {"accuracy": acc, "majority_baseline": majority, "n_train": len(train), "n_test": n_test}


@torch.no_grad()
def logit_lens(model: nn.Module, vectors: torch.Tensor, *, top_k: int = 5, apply_norm: bool = False):
    """Top tokens each vector ``(N, D)`` decodes to through the LM head.

    Thoughts taken from ``hs[-1]`` are already after the final norm; vectors from other
    layers need ``apply_norm=True`` (the model's final norm first).
    """
    x = vectors
    if apply_norm:
        x = model.get_decoder().norm(x) if hasattr(model, "get_decoder") else x
    logits = model.get_output_embeddings()(x.to(model.get_output_embeddings().weight.dtype))
    probs = logits.float().softmax(-1)
    p, idx = probs.topk(top_k, dim=-1)
    return idx, p


def lens_matches_steps(model: nn.Module, tokenizer, thoughts: torch.Tensor, steps: list[list[str]]) -> torch.Tensor:
    """For the embedded task: ``(K,)`` fraction of problems whose thought k decodes (top-1)
    to the k-th intermediate value. ``thoughts`` is ``(N, K, D)``; ``steps[n][k]`` the value."""
    N, K, _ = thoughts.shape
    idx, _ = logit_lens(model, thoughts.reshape(N * K, -1), top_k=1)
    words = tokenizer.convert_ids_to_tokens(idx[:, 0].tolist())
    hit = torch.tensor([words[n * K + k] == steps[n][k] if k < len(steps[n]) else False
                        for n in range(N) for k in range(K)]).reshape(N, K)
    return hit.float().mean(0)
