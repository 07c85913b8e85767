"""SWITCH inference and evaluation: the engine's :class:`~latentlib.policies.SwitchPolicy`
(enter on ``<swi>``, at least K_min and at most K_max latent steps, leave on ``</swi>``),
one batched generation whose sequences are in different modes in the same forward."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from latentlib.evaluate import EvalSpec, evaluate, summarize
from latentlib.methods.switch.config import SwitchConfig, switch_ids
from latentlib.policies import SwitchPolicy, TextPolicy, reads_sample
from latentlib.tasks import Format

__all__ = ["switch_policy", "RecordingPolicy", "latent_blocks", "switch_eval_spec", "evaluate_switch",
           "summarize_switch"]


def switch_policy(tokenizer, cfg: SwitchConfig) -> SwitchPolicy:
    ids = switch_ids(tokenizer)
    return SwitchPolicy(enter_id=ids.swi, exit_id=ids.swi_end, k_min=cfg.k_min, k_max=cfg.k_max)


class RecordingPolicy:
    """Wraps a policy and keeps what it decided per step (``latent``, ``token``), so that
    an evaluation can count blocks and their lengths afterwards."""

    def __init__(self, inner):
        self.inner = inner
        self.latent: list[torch.Tensor] = []
        self.tokens: list[torch.Tensor] = []

    def start(self, batch_size, device):
        return self.inner.start(batch_size, device)

    def reads_sample(self, state):
        return reads_sample(self.inner, state)

    def step(self, state, sampled):
        latent, token = self.inner.step(state, sampled)
        self.latent.append(latent.clone())
        self.tokens.append(token.clone())
        return latent, token


def latent_blocks(latent: Sequence[bool], tokens: Sequence[int], enter_id: int, eos_id: int) -> list[int]:
    """Latent steps of each *closed* block of one sequence, up to its eos (pure): a block
    opens at an ``enter_id`` text token, holds the latent steps that follow it and closes
    at the next text token. A block still open when the sequence stops (cut by the
    generation budget) is left out; a block with no step counts as 0."""
    blocks: list[int] = []
    count = None  # latent steps of the open block, None outside blocks
    for lat, tok in zip(latent, tokens):
        lat, tok = bool(lat), int(tok)
        if lat:
            if count is not None:
                count += 1
            continue
        if count is not None:
            blocks.append(count)
        count = 0 if tok == enter_id else None
        if tok == eos_id:
            break
    return blocks


def switch_eval_spec(tokenizer, cfg: SwitchConfig, *, mode: str = "latent", name: str | None = None,
                     injector=None) -> EvalSpec:
    """How a SWITCH model runs at evaluation: ``mode="latent"`` is SWITCH inference
    (:class:`SwitchPolicy`, K_min/K_max from ``cfg``), ``mode="text"`` plain decoding."""
    if mode not in ("latent", "text"):
        raise ValueError(f"mode={mode!r}: use 'latent' (SWITCH inference) or 'text' (plain decoding)")
    ids = switch_ids(tokenizer)

    def policy(chunk):
        return switch_policy(tokenizer, cfg) if mode == "latent" else TextPolicy()

    return EvalSpec(name or f"switch ({mode})", policy=policy, injector=injector,
                    latent_positions=cfg.latent_positions, max_new_tokens=cfg.max_new_tokens,
                    neutral_token_ids=cfg.neutral_ids(ids, mode))


def evaluate_switch(model, tokenizer, records: Sequence, cfg: SwitchConfig, fmt: Format, *, mode: str = "latent",
                    name: str | None = None, injector=None, batch_size: int = 250,
                    progress: bool = False) -> pd.DataFrame:
    """Greedy evaluation (:func:`latentlib.evaluate.evaluate`) with per-problem block counts.

    ``mode="latent"``: SWITCH inference (:class:`SwitchPolicy`). ``mode="text"``: plain
    decoding (phase 1, whose blocks hold text; ``latent_steps`` is then 0 and
    ``block_steps`` empty). Adds ``blocks`` (``<swi>`` emitted), ``block_steps`` (latent
    steps per block) and ``kmin_violations`` (blocks shorter than K_min).
    """
    ids = switch_ids(tokenizer)
    recorders: list[RecordingPolicy] = []
    spec = switch_eval_spec(tokenizer, cfg, mode=mode, name=name, injector=injector)
    inner = spec.policy

    def policy(chunk):
        recorders.append(RecordingPolicy(inner(chunk)))
        return recorders[-1]

    spec.policy = policy
    df = evaluate(model, tokenizer, records, spec, fmt, batch_size=batch_size, progress=progress)
    blocks = []
    for rec in recorders:
        lat, tok = torch.stack(rec.latent, 1), torch.stack(rec.tokens, 1)  # (B, S)
        blocks += [latent_blocks(lat[b], tok[b], ids.swi, ids.eos) for b in range(lat.shape[0])]
    df["blocks"] = [len(b) for b in blocks]
    df["block_steps"] = blocks if mode == "latent" else [[] for _ in blocks]
    df["kmin_violations"] = [sum(n < cfg.k_min for n in b) if mode == "latent" else 0 for b in blocks]
    return df


def summarize_switch(df: pd.DataFrame) -> pd.DataFrame:
    """:func:`~latentlib.evaluate.summarize` plus the fraction of problems with a block
    (``<swi>`` emitted at least once), mean blocks and K_min violations."""
    table = summarize(df)
    g = df.groupby("method", sort=False)
    extra = pd.DataFrame({"with_block": g["blocks"].apply(lambda x: (x > 0).mean()).round(4),
                          "blocks": g["blocks"].mean().round(2),
                          "kmin_violations": g["kmin_violations"].sum()}).reset_index()
    return table.merge(extra, on="method", how="left")
