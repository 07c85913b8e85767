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

__all__ = ["AblatedInjector", "ABLATIONS", "token_ranks", "position_table", "boundary_features", "linear_probe",
           "logit_lens", "lens_matches_steps", "lens_step_matrix", "latent_thoughts", "collect_traces"]

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


@torch.no_grad()
def collect_traces(model: nn.Module, tokenizer, records, spec, *, encode, capture_layers: tuple[int, ...] = (-1,),
                   temperature: float = 0.0, seed: int = 0, batch_size: int = 250, progress: bool = True) -> list:
    """Runs a method the way :func:`latentlib.evaluate.evaluate` does (``spec``: an
    :class:`~latentlib.evaluate.EvalSpec`) and keeps the :class:`~latentlib.recurrence.Trace`
    of every batch, with the hidden states of ``capture_layers``. ``temperature > 0``
    samples with one seed per problem (``seed`` + its index), so a problem's rollout does
    not depend on the batch it falls in."""
    from tqdm.auto import tqdm

    from latentlib.evaluate import generate_batch

    model.eval()
    prompt_of = spec.prompt or (lambda r: encode(r).question)
    out = []
    for s in tqdm(range(0, len(records), batch_size), desc=f"traces {spec.name}", disable=not progress):
        chunk = list(records[s:s + batch_size])
        seeds = [seed + s + i for i in range(len(chunk))] if temperature > 0 else None
        trace, _ = generate_batch(model, tokenizer, chunk, spec, prompt_of, temperature=temperature, seeds=seeds,
                                  capture_layers=capture_layers)
        out.append(trace)
    return out


@torch.no_grad()
def position_table(model: nn.Module, trace, tokens: dict[str, int], *, chunk: int = 64):
    """One row per generated position ``j`` of a :class:`~latentlib.recurrence.Trace`
    captured with ``capture_layers`` containing ``-1`` (the final, normed hidden state).

    Columns: ``seq``, ``pos``, ``token``, ``latent``, ``block_step`` (1, 2, ... for the
    latent steps of a block, 0 at text), ``after_block_step`` (``block_step`` of the
    previous position) and, per named token, ``p_<name>`` and ``rank_<name>``: its
    probability and rank (1 = most likely) in the distribution position ``j`` was decoded
    from (temperature 1). At a latent position that distribution is the one the policy
    read to decide to stay latent; after the ``i``-th latent step it is the row whose
    ``after_block_step`` is ``i``.
    """
    import pandas as pd

    if -1 not in trace.hidden or -1 not in trace.prompt_hidden:
        raise ValueError("the trace has no final hidden states: generate with capture_layers=(-1, ...)")
    head = model.get_output_embeddings()
    B, S = trace.tokens.shape
    before = torch.cat([trace.prompt_hidden[-1][:, None], trace.hidden[-1][:, :S - 1]], dim=1)  # (B, S, D)
    cols: dict[str, list] = {f"{p}_{n}": [] for n in tokens for p in ("p", "rank")}
    for s in range(0, B, chunk):
        logits = head(before[s:s + chunk].to(head.weight.dtype)).float()  # (b, S, V)
        probs = logits.softmax(-1)
        for n, tid in tokens.items():
            cols[f"p_{n}"].append(probs[..., tid])
            cols[f"rank_{n}"].append(token_ranks(logits, tid))
    lat = trace.is_latent
    block_step = torch.zeros(B, S, dtype=torch.long)
    for j in range(S):
        block_step[:, j] = torch.where(lat[:, j], (block_step[:, j - 1] if j else 0) + 1, 0)
    after = torch.cat([torch.zeros(B, 1, dtype=torch.long), block_step[:, :-1]], dim=1)
    keep = trace.valid
    seq = torch.arange(B)[:, None].expand(B, S)
    pos = torch.arange(S)[None].expand(B, S)
    data = {"seq": seq[keep], "pos": pos[keep], "token": trace.tokens[keep], "latent": lat[keep],
            "block_step": block_step[keep], "after_block_step": after[keep]}
    data.update({k: torch.cat(v)[keep] for k, v in cols.items()})
    return pd.DataFrame({k: v.numpy() for k, v in data.items()})


def boundary_features(trace, layer: int, token_id: int, *, ahead: int = 1, seed: int = 0):
    """Hidden states of ``layer`` at text positions, labelled 1 where the token
    ``ahead`` positions later is ``token_id`` (an upcoming boundary), with as many
    negatives drawn at random from the other text positions: ``(features, labels)`` for
    :func:`linear_probe`, whose majority baseline is then about one half.

    The state at position ``j`` (after input ``j``) is the one that decodes ``j + 1``; the
    prompt's last state decodes position 0."""
    if layer not in trace.hidden or layer not in trace.prompt_hidden:
        raise ValueError(f"the trace has no layer {layer}: generate with capture_layers containing {layer}")
    if ahead < 1:
        raise ValueError(f"ahead={ahead}: the probe predicts a token at least one position ahead")
    B, S = trace.tokens.shape
    states = torch.cat([trace.prompt_hidden[layer][:, None], trace.hidden[layer][:, :S - 1]], dim=1)  # decodes j
    text = trace.valid & ~trace.is_latent
    target = text & (trace.tokens == token_id)  # position j holds the boundary
    # the state that decodes position j - ahead + 1 sees the boundary `ahead` positions later
    pos_label = torch.zeros_like(target)
    pos_label[:, : S - ahead + 1] = target[:, ahead - 1:]
    candidates = text.clone()
    candidates[:, : S - ahead + 1] &= text[:, ahead - 1:]  # the state's own position is a text position too
    pos = pos_label & candidates
    neg = candidates & ~pos
    g = torch.Generator().manual_seed(seed)
    neg_idx = neg.nonzero()
    pick = neg_idx[torch.randperm(len(neg_idx), generator=g)[: int(pos.sum())]]
    pos_idx = pos.nonzero()
    idx = torch.cat([pos_idx, pick])
    labels = torch.cat([torch.ones(len(pos_idx), dtype=torch.long), torch.zeros(len(pick), dtype=torch.long)])
    return states[idx[:, 0], idx[:, 1]].float(), labels


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


def latent_thoughts(trace) -> list[torch.Tensor]:
    """Per sequence, the injected vectors of its latent steps in order: ``(K_b, D)``."""
    return [trace.thoughts[b][trace.valid[b] & trace.is_latent[b]] for b in range(trace.tokens.shape[0])]


@torch.no_grad()
def lens_step_matrix(model: nn.Module, tokenizer, thoughts: torch.Tensor, steps: list[list[str]]) -> torch.Tensor:
    """``(K, S)``: the fraction of problems whose thought ``i`` decodes (top-1) to the
    value of step ``j`` (problems shorter than ``j + 1`` steps count as misses). The
    diagonal is :func:`lens_matches_steps`; a thought that runs one step ahead or behind
    shows up off the diagonal."""
    N, K, _ = thoughts.shape
    S = max(map(len, steps))
    idx, _ = logit_lens(model, thoughts.reshape(N * K, -1), top_k=1)
    words = tokenizer.convert_ids_to_tokens(idx[:, 0].tolist())
    hit = torch.tensor([[words[n * K + i] == steps[n][j] if j < len(steps[n]) else False for j in range(S)]
                        for n in range(N) for i in range(K)], dtype=torch.float).reshape(N, K, S)
    return hit.mean(0)


def lens_matches_steps(model: nn.Module, tokenizer, thoughts: torch.Tensor, steps: list[list[str]]) -> torch.Tensor:
    """For the embedded task: ``(K,)`` fraction of problems whose thought k decodes (top-1)
    to the k-th intermediate value. ``thoughts`` is ``(N, K, D)``; ``steps[n][k]`` the value."""
    N, K, _ = thoughts.shape
    idx, _ = logit_lens(model, thoughts.reshape(N * K, -1), top_k=1)
    words = tokenizer.convert_ids_to_tokens(idx[:, 0].tolist())
    hit = torch.tensor([words[n * K + k] == steps[n][k] if k < len(steps[n]) else False
                        for n in range(N) for k in range(K)]).reshape(N, K)
    return hit.float().mean(0)
