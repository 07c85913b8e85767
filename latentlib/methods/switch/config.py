"""SWITCH's configuration: its token ids, the span rule of phase 1, and the block settings (c,
K_min, K_max, the per-sample cap, positions) every phase and inference share."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from latentlib.recurrence import position_ids_for
from latentlib.tokens import require_tokens

__all__ = ["SWITCH_TOKENS", "SwitchIds", "switch_ids", "SpanRule", "SwitchConfig", "default_positions"]

SWITCH_TOKENS = ("<swi>", "</swi>", "<latent>")
AGGREGATES = ("max", "mean")
POOLS = (None, "op")
POSITIONS = ("continue", "block")


@dataclass(frozen=True)
class SwitchIds:
    swi: int  # <swi>: enter latent mode
    swi_end: int  # </swi>: leave latent mode
    latent: int  # <latent>: placeholder of a slot (never embedded)
    eos: int
    pad: int


def switch_ids(tokenizer) -> SwitchIds:
    """The ids SWITCH needs; :class:`~latentlib.tokens.MissingTokensError` when the tokenizer lacks them."""
    ids = require_tokens(tokenizer, "switch")
    return SwitchIds(ids["<swi>"], ids["</swi>"], ids["<latent>"], tokenizer.eos_token_id, tokenizer.pad_token_id)


@dataclass(frozen=True)
class SpanRule:
    aggregate: str = "max"  # token entropies -> step entropy: "max" or "mean" over the step's tokens
    top_q: float | None = 0.3  # wrap about this fraction of candidate steps (threshold = the 1 - top_q quantile)
    threshold: float | None = None  # or a fixed entropy threshold in nats (then top_q must be None)
    pool_by: str | None = None  # None (each step its own entropy) or "op" (chain task: mean entropy per operation)
    wrap_last: bool = False  # may the last step (the one that carries the answer) be wrapped
    merge: bool = True  # merge adjacent wrapped steps into one block
    isolate: bool = False  # never wrap a step right after a wrapped one: one-step blocks between written values

    def __post_init__(self):
        checks = [
            (self.aggregate in AGGREGATES, f"aggregate={self.aggregate!r}: use one of {AGGREGATES}"),
            ((self.top_q is None) != (self.threshold is None),
             f"top_q={self.top_q}, threshold={self.threshold}: give exactly one of them (the other None)"),
            (self.top_q is None or 0 < self.top_q < 1, f"top_q={self.top_q} must be a fraction in (0, 1)"),
            (self.threshold is None or self.threshold >= 0, f"threshold={self.threshold} must be >= 0 nats"),
            (self.pool_by in POOLS, f"pool_by={self.pool_by!r}: use None or 'op' (the chain task's operations)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


@dataclass(frozen=True)
class SwitchConfig:
    c_thought: int = 2  # c: latent slots per replaced step (card: 2)
    k_min: int = 4  # K_min: latent steps a block takes at least (card: 4, at inference)
    k_max: int = 8  # K_max: latent steps a block takes at most (card: 8)
    latent_cap: int = 48  # latent slots per sample at most (card: 48)
    injection: str = "hs[-1]"  # what a slot's input is (the card: last-layer hidden state)
    positions: str = "continue"  # position ids: "continue" (every token and slot advances) or "block" (see below)
    max_new_tokens: int = 64  # generation budget at evaluation (latent steps included)

    def __post_init__(self):
        checks = [
            (self.c_thought >= 1, f"c_thought={self.c_thought} must be >= 1"),
            (0 <= self.k_min <= self.k_max, f"k_min={self.k_min}, k_max={self.k_max}: need 0 <= k_min <= k_max"),
            (self.k_max >= 1, f"k_max={self.k_max} must be >= 1"),
            (self.latent_cap >= self.k_max,
             f"latent_cap={self.latent_cap} < k_max={self.k_max}: a sample could not hold one full block"),
            (self.positions in POSITIONS, f"positions={self.positions!r}: use one of {POSITIONS}"),
            (self.positions != "block" or self.k_min >= 1,
             f"positions='block' with k_min={self.k_min}: a latent block must hold a slot; use k_min >= 1"),
            (self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens} must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def latent_positions(self) -> str:
        """The engine's mode for slots: "skip" (position-neutral) under "block" positions."""
        return "skip" if self.positions == "block" else "continue"

    def neutral_ids(self, ids: SwitchIds, mode: str = "latent") -> tuple[int, ...]:
        """The generated text tokens that do not advance the position counter: under
        "block" positions ``<swi>``, and ``</swi>`` too when blocks hold text (``mode="text"``,
        phase 1); a ``</swi>`` that closes slots stands for the step they replace."""
        if self.positions != "block":
            return ()
        return (ids.swi, ids.swi_end) if mode == "text" else (ids.swi,)

    def position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, latent_mask: torch.Tensor,
                     ids: SwitchIds) -> torch.Tensor:
        """Position ids ``(B, T)`` of SWITCH sequences, as generation assigns them."""
        if self.positions != "block":
            return position_ids_for(attention_mask)
        latent = latent_mask.bool()
        enter = (input_ids == ids.swi) & ~latent
        leave = (input_ids == ids.swi_end) & ~latent
        skipped = latent | enter
        open_ = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        has_slot = torch.zeros_like(open_)
        for t in range(input_ids.shape[1]):  # a </swi> is neutral when it closes a block that held no slot
            skipped[:, t] |= leave[:, t] & open_ & ~has_slot
            has_slot = (has_slot | latent[:, t]) & ~enter[:, t]
            open_ = (open_ | enter[:, t]) & ~leave[:, t]
        return position_ids_for(attention_mask, skipped, "skip")

    @property
    def max_stage(self) -> int:
        """The stage after which no block changes any more: ceil(K_max / c)."""
        return math.ceil(self.k_max / self.c_thought)


def default_positions(preset) -> str:
    """``"block"`` for a from-scratch model (it locates operations by position, see
    :mod:`latentlib.methods.switch`), ``"continue"`` (the paper's) for pretrained models."""
    return "block" if preset.source == "scratch" else "continue"
