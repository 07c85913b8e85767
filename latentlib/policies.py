"""Generation policies: per sequence and per step, decode a token or take a latent step.

The engine (:func:`latentlib.recurrence.generate`) samples a token for every sequence at
every step, then asks the policy what each sequence does with it. A policy has

- ``start(batch_size, device) -> state``: per-sequence state tensors;
- ``step(state, sampled) -> (latent, token)``: ``latent`` ``(B,)`` bool says which
  sequences take a latent step now; ``token`` ``(B,)`` the token the others emit (the
  sampled one, or a forced one). The policy updates ``state`` in place;
- optionally ``reads_sample(state) -> (B,) bool | None``: which sequences' next ``step``
  reads ``sampled`` (``None``: every one). A sequence whose next step is forced (a scripted
  thought or token, a SWITCH block shorter than ``K_min``) does not, and the engine runs the
  LM head only for those that do (see :func:`reads_sample`); a policy without the method is
  read in every row.

All policies are vectorised over the batch, so sequences in different modes share one
forward. Method modules compose these; nothing here knows a method's name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TextPolicy", "ScriptedPolicy", "SwitchPolicy", "latent_script", "reads_sample", "LATENT", "FREE"]

LATENT = -1  # script entry: take a latent step
FREE = -2  # script entry: decode freely (the sampled token)


def reads_sample(policy, state) -> torch.Tensor | None:
    """``(B,)`` bool: the sequences whose next ``step`` of ``policy`` reads the sampled
    token; ``None`` when every one does (and for a policy that does not say)."""
    method = getattr(policy, "reads_sample", None)
    return None if method is None else method(state)


class TextPolicy:
    """Plain decoding: every step emits the sampled token."""

    def start(self, batch_size: int, device) -> dict:
        return {}

    def step(self, state: dict, sampled: torch.Tensor):
        return torch.zeros_like(sampled, dtype=torch.bool), sampled


class ScriptedPolicy:
    """The first steps follow a per-sequence script, then decoding is free.

    A script is a list of entries: a token id (forced), :data:`LATENT` (a latent step) or
    :data:`FREE`. ``[bot, LATENT, LATENT, eot]`` is Coconut's marker format with two
    thoughts; ``[LATENT] * 6`` is QThink's K=6; ``[pause] * 4`` is four pause tokens.
    One script for the batch, or one per sequence (shorter ones are padded with FREE).
    """

    def __init__(self, script: list[int] | list[list[int]]):
        scripts = script if script and isinstance(script[0], (list, tuple)) else [script]
        for s in scripts:
            bad = [e for e in s if e < FREE]
            if bad:
                raise ValueError(f"script entry {bad[0]} is neither a token id (>= 0), LATENT (-1) nor FREE (-2)")
        self.scripts = [list(s) for s in scripts]

    def start(self, batch_size: int, device) -> dict:
        scripts = self.scripts if len(self.scripts) > 1 else self.scripts * batch_size
        if len(scripts) != batch_size:
            raise ValueError(f"{len(scripts)} scripts for a batch of {batch_size}: give one, or one per sequence")
        width = max((len(s) for s in scripts), default=0)
        table = torch.full((batch_size, max(width, 1)), FREE, dtype=torch.long)
        for i, s in enumerate(scripts):
            table[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        return {"table": table.to(device), "t": 0, "width": width}

    def reads_sample(self, state: dict) -> torch.Tensor | None:
        # a FREE entry, or past the script, leaves the token to the sample
        t = state["t"]
        return None if t >= state["width"] else state["table"][:, t] == FREE

    def step(self, state: dict, sampled: torch.Tensor):
        t = state["t"]
        state["t"] = t + 1
        if t >= state["table"].shape[1]:
            return torch.zeros_like(sampled, dtype=torch.bool), sampled
        entry = state["table"][:, t]
        latent = entry == LATENT
        token = torch.where(entry >= 0, entry, sampled)
        return latent, token


def latent_script(n_latent: int, before: tuple[int, ...] = (), after: tuple[int, ...] = ()) -> list[int]:
    """``before`` tokens, ``n_latent`` latent steps, ``after`` tokens: a fixed-K script."""
    if not isinstance(n_latent, int) or n_latent < 0:
        raise ValueError(f"{n_latent!r} latent steps: the number of thoughts must be a whole number >= 0")
    return [*before, *([LATENT] * n_latent), *after]


@dataclass
class SwitchPolicy:
    """SWITCH's dynamic blocks: enter latent mode after emitting ``enter_id`` (``<swi>``),
    take at least ``k_min`` and at most ``k_max`` latent steps, leave by emitting
    ``exit_id`` (``</swi>``) when the model predicts it (after ``k_min``) or when
    ``k_max`` is reached (then ``exit_id`` is forced).
    """

    enter_id: int
    exit_id: int
    k_min: int = 4
    k_max: int = 8

    def __post_init__(self):
        if self.k_min < 0 or self.k_max < 1:
            raise ValueError(f"K_min={self.k_min} must be >= 0 and K_max={self.k_max} >= 1")
        if self.k_min > self.k_max:
            raise ValueError(f"K_min={self.k_min} > K_max={self.k_max}: a block cannot take at least K_min "
                             "and at most K_max steps; lower K_min or raise K_max")

    def start(self, batch_size: int, device) -> dict:
        return {
            "in_latent": torch.zeros(batch_size, dtype=torch.bool, device=device),
            "count": torch.zeros(batch_size, dtype=torch.long, device=device),
        }

    def reads_sample(self, state: dict) -> torch.Tensor:
        # inside a block before K_min steps a sequence thinks whatever was sampled
        return ~(state["in_latent"] & (state["count"] < self.k_min))

    def step(self, state: dict, sampled: torch.Tensor):
        in_latent, count = state["in_latent"], state["count"]
        wants_exit = sampled == self.exit_id
        leave = in_latent & ((count >= self.k_max) | ((count >= self.k_min) & wants_exit))
        latent = in_latent & ~leave
        token = torch.where(leave, torch.full_like(sampled, self.exit_id), sampled)
        enter = ~in_latent & (sampled == self.enter_id)
        state["count"] = torch.where(latent, count + 1, torch.where(enter, torch.zeros_like(count), count))
        state["in_latent"] = (in_latent & ~leave) | enter
        return latent, token
