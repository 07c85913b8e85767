"""The written-reasoning baselines every latent method starts from and is compared with:
CoT (question, steps, answer) and no-CoT (question, answer), trained with the plain
language-modelling loss.

For the embedded default these are trained from scratch (the ``tiny`` model), and the CoT
model is the starting point of every latent method, as the pretrained model is for a
real preset. Its format can include an empty ``<bot><eot>`` pair between question and
steps (``markers=True``): the Coconut paper's stage 0, which lets a later curriculum put
thoughts between the markers without shifting every later position relative to what the
CoT model learned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from latentlib.batching import collate, cot_segments, encode_record, nocot_segments
from latentlib.evaluate import EvalSpec
from latentlib.policies import ScriptedPolicy
from latentlib.tasks import Format
from latentlib.tokens import token_ids
from latentlib.training.loop import TrainConfig, TrainResult, train
from latentlib.training.losses import lm_loss

__all__ = ["BaseConfig", "base_examples", "train_base", "base_eval_spec"]


@dataclass(frozen=True)
class BaseConfig:
    kind: str = "cot"  # "cot" (question, steps, answer) or "nocot" (question, answer)
    markers: bool = False  # put an empty <bot><eot> between question and steps (Coconut's stage 0)
    train: TrainConfig = TrainConfig(steps=1500, batch_size=128, lr=3e-3, warmup_steps=100)  # the optimisation
    seed: int = 0  # model initialisation

    def __post_init__(self):
        if self.kind not in ("cot", "nocot"):
            raise ValueError(f"kind={self.kind!r}: use 'cot' or 'nocot'")
        if self.markers and self.kind != "cot":
            raise ValueError("markers=True puts <bot><eot> before the written steps: use it with kind='cot'")

    @property
    def name(self) -> str:
        """The artifact name: ``cot``, ``nocot`` or ``cot_markers``."""
        return self.kind + ("_markers" if self.markers else "")


def base_examples(tokenizer, records: Sequence, cfg: BaseConfig, fmt: Format) -> list:
    """Every record in the base model's format."""
    ids = token_ids(tokenizer) if cfg.markers else None
    markers = (ids.bot, ids.eot) if ids is not None else None
    encoded = [encode_record(tokenizer, r, fmt) for r in records]
    return [cot_segments(e, markers) if cfg.kind == "cot" else nocot_segments(e) for e in encoded]


def train_base(model, tokenizer, records: Sequence, cfg: BaseConfig, fmt: Format, *, checkpoint_dir=None,
               progress: bool = True) -> TrainResult:
    """Trains ``model`` (in place) on ``records`` in the base format with the LM loss."""
    return train(model, base_examples(tokenizer, records, cfg, fmt), lambda b: collate(b, tokenizer.pad_token_id),
                 lm_loss, cfg.train, checkpoint_dir=checkpoint_dir, desc=f"base {cfg.name}", progress=progress)


def base_eval_spec(name: str, tokenizer, markers: bool = False, *, max_new_tokens: int = 16) -> EvalSpec:
    """Greedy decoding; with ``markers`` the ``<bot><eot>`` pair is forced first, as
    Coconut's evaluation does."""
    spec = EvalSpec(name, max_new_tokens=max_new_tokens)
    if markers:
        ids = token_ids(tokenizer)
        spec.policy = lambda records: ScriptedPolicy([ids.bot, ids.eot])
    return spec
