"""What gets injected: maps the hidden states of one position to the next input embedding.

An injector receives the hidden states of the position *before* a latent slot, one
tensor per layer as Hugging Face returns them (``hidden_states[0]`` is the embedding
output, ``hidden_states[-1]`` the last layer after the final norm), each ``(B, D)``,
and returns the vector ``(B, D)`` that becomes the latent slot's input embedding.

Variants (the table of a public Coconut replication):

- ``hs[-k]``: the hidden state of layer ``-k`` (``hs[-1]`` is Coconut's choice).
- ``suppressed[f:]``: the "suppressed activations" of the last fraction ``f`` of layers.
  The reference recipe maps each layer's hidden state through the unembedding ``W``,
  takes the layer-to-layer logit change, maps it back with ``pinv(W)`` and keeps the
  coordinates whose change is below ``-eps``; it then sums the masked hidden states over
  the chosen layers (always at least the last one, so shallow models get a thought). Because the vocabulary is larger than the width, ``W`` has full
  column rank and ``pinv(W) @ W`` is the identity, so the back-projected change is just
  the residual update ``hs[l] - hs[l-1]``. We use that identity directly: no
  pseudo-inverse, no cached inverse that goes stale while ``W`` trains.
- ``projection``: a learned head Linear(D, D) -> GELU -> Linear(D, D) -> LayerNorm(D)
  on ``hs[-1]`` (QThink's head; its state dict keys match the published
  ``projection_head.pt`` layout, ``mlp.0`` ... ``mlp.3``).

Any injector can be norm-matched: rescaled so that each injected vector has the RMS of
the input embedding matrix. Real models' final hidden states are far larger than their
embeddings (SmolLM2: a final-hidden norm of about 54 against about 3 for embeddings),
which the tiny from-scratch model does not show.
"""

from __future__ import annotations

import re

import torch
from torch import nn

__all__ = [
    "Injector",
    "HiddenLayer",
    "Suppressed",
    "ProjectionHead",
    "Projection",
    "NormMatched",
    "make_injector",
    "embedding_rms",
    "INJECTION_SPECS",
]

# Names accepted by `make_injector`, for help messages and parameter validation.
INJECTION_SPECS = ("hs[-1]", "hs[-2]", "hs[-3]", "hs[-4]", "suppressed[0.5:]", "suppressed[0.75:]",
                   "suppressed[0.9:]", "projection")


def embedding_rms(model: nn.Module) -> float:
    """RMS of the input embedding matrix: the scale of an ordinary token's input."""
    weight = model.get_input_embeddings().weight
    return weight.detach().float().square().mean().sqrt().item()


class Injector(nn.Module):
    """Base class: ``forward(hidden_states) -> (B, D)`` from a tuple of ``(B, D)`` layers.

    ``reads_layers()`` says which ``hidden_states`` indices ``forward`` reads: ``None``
    (the default, always safe) means any of them. An injector that reads only ``(-1,)``,
    the last layer, lets the engine skip collecting every layer's hidden states; it then
    receives the 1-tuple ``(last,)``.
    """

    spec: str = "?"

    def forward(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def reads_layers(self) -> tuple[int, ...] | None:
        return None

    def extra_repr(self) -> str:
        return self.spec


class HiddenLayer(Injector):
    """The hidden state of one layer, ``hs[layer]`` (negative indices count from the end)."""

    def __init__(self, layer: int = -1):
        super().__init__()
        self.layer = layer
        self.spec = f"hs[{layer}]"

    def forward(self, hidden_states):
        if not -len(hidden_states) <= self.layer < len(hidden_states):
            raise ValueError(f"{self.spec}: the model has {len(hidden_states)} hidden states (embeddings + "
                             f"{len(hidden_states) - 1} layers); choose a layer index inside that range")
        return hidden_states[self.layer]

    def reads_layers(self):
        return (self.layer,)


class Suppressed(Injector):
    """Sum over the last fraction of layers of ``hs[l]`` masked where layer l pushed it down."""

    def __init__(self, start_fraction: float = 0.5, eps: float = 0.1):
        super().__init__()
        if not 0.0 <= start_fraction < 1.0:
            raise ValueError(f"suppressed[{start_fraction}:] needs a start fraction in [0, 1), e.g. suppressed[0.75:]")
        self.start_fraction = start_fraction
        self.eps = eps
        self.spec = f"suppressed[{start_fraction}:]"

    def forward(self, hidden_states):
        hs = torch.stack(hidden_states)  # (L+1, B, D)
        updates = hs[1:] - hs[:-1]  # (L, B, D): what each layer wrote into the residual stream
        # The reference takes int(f * (L+1)) over the L+1 states, which selects no layer at all
        # for shallow models (f=0.9, L=4); we always keep at least the last layer.
        start = min(int(self.start_fraction * updates.shape[0]), updates.shape[0] - 1)
        # The mask is a selection, not a function to differentiate through (as in the reference).
        mask = (updates[start:] < -self.eps).to(hs.dtype).detach()
        return (hs[1:][start:] * mask).sum(0)  # (B, D)


class ProjectionHead(nn.Module):
    """Linear(D, D) -> GELU -> Linear(D, D) -> LayerNorm(D), QThink's projection head."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, hidden_size),
            nn.GELU(),
            nn.Linear(hidden_size, hidden_size),
            nn.LayerNorm(hidden_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class Projection(Injector):
    """A learned projection head applied to one layer's hidden state (default the last)."""

    def __init__(self, hidden_size: int, layer: int = -1, head: ProjectionHead | None = None):
        super().__init__()
        self.layer = layer
        self.head = head if head is not None else ProjectionHead(hidden_size)
        self.spec = "projection"

    def forward(self, hidden_states):
        x = hidden_states[self.layer]
        return self.head(x.to(self.head.mlp[0].weight.dtype)).to(x.dtype)

    def reads_layers(self):
        return (self.layer,)


class NormMatched(Injector):
    """Rescales another injector's output so each vector has RMS ``target_rms``."""

    def __init__(self, inner: Injector, target_rms: float):
        super().__init__()
        self.inner = inner
        self.target_rms = float(target_rms)
        self.spec = f"{inner.spec}+norm"

    def forward(self, hidden_states):
        x = self.inner(hidden_states)
        rms = x.float().square().mean(-1, keepdim=True).sqrt().clamp_min(1e-6)
        return (x * (self.target_rms / rms)).to(x.dtype)

    def reads_layers(self):
        return self.inner.reads_layers()


_HS = re.compile(r"^hs\[(-?\d+)\]$")
_SUP = re.compile(r"^suppressed\[(0?\.\d+|0):\]$")


def make_injector(spec: str, model: nn.Module | None = None, *, norm_match: bool = False,
                  hidden_size: int | None = None) -> Injector:
    """Builds an injector from its name: ``hs[-k]``, ``suppressed[f:]`` or ``projection``.

    ``norm_match`` rescales the injected vectors to the model's embedding RMS (needs ``model``).
    """
    if (m := _HS.match(spec)) is not None:
        injector: Injector = HiddenLayer(int(m.group(1)))
    elif (m := _SUP.match(spec)) is not None:
        injector = Suppressed(float(m.group(1)))
    elif spec == "projection":
        if hidden_size is None:
            if model is None:
                raise ValueError("make_injector('projection') needs the model or hidden_size to size the head")
            hidden_size = model.get_input_embeddings().weight.shape[1]
        injector = Projection(hidden_size)
        if model is not None:
            injector.to(model.get_input_embeddings().weight.device)
    else:
        raise ValueError(
            f"unknown injection {spec!r}: use one of {', '.join(INJECTION_SPECS)} "
            "(hs[-k] takes any layer index, suppressed[f:] any fraction in [0, 1))"
        )
    if norm_match:
        if model is None:
            raise ValueError("norm_match=True needs the model, to read its embedding RMS")
        injector = NormMatched(injector, embedding_rms(model))
    return injector
