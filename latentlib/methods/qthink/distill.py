"""Distilling multi-rollout teachers into K latent steps (QThink card; CODI's
self-distillation is the nearest published relative), and the discrete SFT baseline.

One ``mode`` field:

- ``sft``: the discrete baseline: the CoT text (question, steps, answer) with the plain
  language-modelling loss; no thoughts, no head.
- ``latent``: ``[question, K thoughts, answer]`` with the answer cross-entropy only (the
  ``gamma = 0`` control: what the thoughts learn without a teacher).
- ``uniform`` / ``reward_weighted``: the same plus ``gamma`` times a distance between the
  student's hidden states at the thoughts and the teacher's per-step states (see
  :mod:`latentlib.teacher` for the two weightings over correct rollouts).

``distill_steps``: ``final`` compares only the last thought with the teacher's state at
the end of its last reasoning step (both predict the answer marker); ``per_step`` compares
thought k with the teacher's state at the end of step k, for every k (needs the
teacher's K equal to the student's).

Distance (``distance``): ``smooth_l1`` (default) is CODI's smooth L1, computed on states
divided by the teacher's standard deviation over the batch, per layer, so that its scale
does not depend on the layer or model (CODI divides the loss by that deviation; on
normalised states the smooth-L1 threshold is in units of the teacher's spread); ``mse``
is the mean squared error divided by the teacher's variance; ``cosine`` is
``1 - cos``. The distance is averaged over the compared thoughts and layers; the
teacher is a constant (no gradient).

Problems without a teacher (no correct rollout) are left out of ``uniform`` and
``reward_weighted`` training; ``sft`` and ``latent`` train on the same problems, so every
row of the comparison sees the same data and the same number of steps.

LoRA (``use_lora``) wraps ``lora_targets`` with rank ``lora_r`` and ``lora_alpha`` through
``peft``; the projection head is always trained in full.

Three choices decide whether the thoughts learn at all on a from-scratch model (measured
on the embedded task; ``docs/findings.md``): a ``gamma`` large enough that the distance,
not the answer's cross-entropy, leads the clipped gradient; distilling layer 0 (at a
thought, the thought itself; at the teacher's step, that step token's embedding), which
learns thought by thought; and LoRA rather than full fine-tuning, so the base does not
drift before the head has learned. Final-step distillation alone does not teach the
thoughts before the last.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from latentlib.batching import collate, cot_segments, encode_record
from latentlib.injection import Projection
from latentlib.methods.qthink.model import make_projection, qthink_segments
from latentlib.presets import LORA_TARGETS
from latentlib.recurrence import latent_forward
from latentlib.tasks import Format
from latentlib.teacher import TeacherStates
from latentlib.tokens import require_tokens
from latentlib.training.lora import apply_lora
from latentlib.training.loop import TrainConfig, TrainResult, train
from latentlib.training.losses import lm_loss, token_loss

__all__ = ["DistillConfig", "MODES", "distill_distance", "distill_examples", "make_distill_batch", "distill_loss",
           "train_qthink"]

MODES = ("sft", "latent", "uniform", "reward_weighted")
DISTANCES = ("smooth_l1", "mse", "cosine")


@dataclass(frozen=True)
class DistillConfig:
    mode: str = "reward_weighted"  # "sft", "latent" (no teacher), "uniform" or "reward_weighted"
    distill_steps: str = "final"  # "final" (last thought only) or "per_step" (thought k vs teacher step k)
    gamma: float = 1.0  # weight of the distillation distance beside the answer cross-entropy
    distance: str = "smooth_l1"  # "smooth_l1" (CODI, normalised), "mse" (normalised) or "cosine"
    num_latent: int = 6  # K: thoughts between question and answer
    layers: tuple[int, ...] | None = None  # hidden_states indices distilled (None: every layer the teacher stores)
    target: str = "answer"  # text after the thoughts: "answer" ("#### a" + eos) or "cot" (steps + answer)
    max_answer_length: int = 128  # target tokens kept at most (the card's ans_len)
    latent_positions: str = "continue"  # position ids of thoughts: "continue" or "skip"
    use_lora: bool = False  # train LoRA adapters instead of every weight
    lora_r: int = 32  # LoRA rank (the card: 32)
    lora_alpha: int = 16  # LoRA alpha (the card: 16)
    lora_targets: tuple[str, ...] = LORA_TARGETS  # modules LoRA wraps (the card: q/k/v/o/gate/up/down)
    lora_dropout: float = 0.0  # LoRA dropout
    train: TrainConfig = TrainConfig(steps=300, batch_size=64, lr=1e-3, warmup_steps=30)  # the optimisation

    def __post_init__(self):
        for name in ("layers", "lora_targets"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        checks = [
            (self.mode in MODES, f"mode={self.mode!r}: use one of {MODES}"),
            (self.distill_steps in ("final", "per_step"), f"distill_steps={self.distill_steps!r}: use 'final' or "
                                                          "'per_step'"),
            (self.gamma >= 0, f"gamma={self.gamma} must be >= 0 (0 trains on the answer alone: mode='latent')"),
            (self.distance in DISTANCES, f"distance={self.distance!r}: use one of {DISTANCES}"),
            (self.num_latent >= 1, f"num_latent={self.num_latent}: QThink needs K >= 1 thoughts"),
            (self.layers is None or len(self.layers) > 0, "layers=(): give at least one layer, or None for all"),
            (self.target in ("answer", "cot"), f"target={self.target!r}: use 'answer' or 'cot'"),
            (self.max_answer_length >= 2, f"max_answer_length={self.max_answer_length} must be >= 2"),
            (self.latent_positions in ("continue", "skip"),
             f"latent_positions={self.latent_positions!r}: use 'continue' or 'skip'"),
            (self.lora_r >= 1 and self.lora_alpha > 0, f"lora_r={self.lora_r}, lora_alpha={self.lora_alpha}: "
                                                       "use a rank >= 1 and alpha > 0"),
            (len(self.lora_targets) > 0, "lora_targets is empty: name the modules LoRA wraps, e.g. ('q_proj',)"),
            (0 <= self.lora_dropout < 1, f"lora_dropout={self.lora_dropout} must be in [0, 1)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def uses_teacher(self) -> bool:
        return self.mode in ("uniform", "reward_weighted")


# ---------------------------------------------------------------------------- loss


def distill_distance(student: torch.Tensor, teacher: torch.Tensor, kind: str = "smooth_l1") -> torch.Tensor:
    """Distance between student and teacher states ``(B, S, D)`` (one layer); teacher is detached."""
    teacher = teacher.detach().to(student.dtype)
    if kind == "cosine":
        return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
    scale = teacher.float().std().clamp_min(1e-6)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(student.float() / scale, teacher.float() / scale)
    if kind == "mse":
        return F.mse_loss(student.float(), teacher.float()) / scale**2
    raise ValueError(f"distance={kind!r}: use one of {DISTANCES}")


def distill_loss(model, batch: dict, projection, cfg: DistillConfig, layers: list[int]) -> tuple[torch.Tensor, dict]:
    """Answer cross-entropy + gamma * distance at the thoughts (the teacher's ``(B, S, L, D)``
    is ``batch["teacher"]``, S the compared slots in order)."""
    if cfg.mode == "sft":
        return lm_loss(model, batch)
    out = latent_forward(model, batch["input_ids"], batch["attention_mask"], batch["latent_mask"],
                         injector=projection, latent_positions=cfg.latent_positions,
                         capture_layers=tuple(layers) if cfg.uses_teacher else ())
    ce = token_loss(out.logits, batch["labels"])
    if not cfg.uses_teacher:
        return ce, {"ce": ce.item()}
    B, K = batch["latent_mask"].shape[0], cfg.num_latent
    compared = list(range(K)) if cfg.distill_steps == "per_step" else [K - 1]
    dist = 0.0
    for li, layer in enumerate(layers):
        student = out.layers[layer][batch["latent_mask"]].view(B, K, -1)[:, compared]  # (B, S, D)
        dist = dist + distill_distance(student, batch["teacher"][:, :, li], cfg.distance)
    dist = dist / len(layers)
    return ce + cfg.gamma * dist, {"ce": ce.item(), "distill": float(dist.detach())}


# ---------------------------------------------------------------------------- data


def distill_examples(tokenizer, records, cfg: DistillConfig, fmt: Format, *,
                     teacher: TeacherStates | None = None, layers: list[int] | None = None) -> list[dict]:
    """One example per record (``{"segments", "teacher"}``); with a teacher, only the
    records that have one (the teacher's index ``i`` is ``records[i]``)."""
    latent_id = require_tokens(tokenizer, "coconut")["<latent>"]
    keep = range(len(records))
    if teacher is not None:
        if len(teacher) != len(records):
            raise ValueError(f"the teacher covers {len(teacher)} problems but {len(records)} records were given: "
                             "pass the records the teacher was extracted from (the same list, in order)")
        keep = [int(i) for i in teacher.problem[teacher.has_teacher]]
        if cfg.num_latent != teacher.num_steps and cfg.distill_steps == "per_step":
            raise ValueError(f"per-step distillation pairs thought k with teacher step k, but the student has "
                             f"K={cfg.num_latent} thoughts and the teacher K={teacher.num_steps} steps: extract the "
                             f"teacher with num_steps={cfg.num_latent}, or use distill_steps='final'")
        K_t = teacher.num_steps
        slots = list(range(K_t)) if cfg.distill_steps == "per_step" else [K_t - 1]
        row_of = {int(p): r for r, p in enumerate(teacher.problem)}
    examples = []
    for i in keep:
        enc = encode_record(tokenizer, records[i], fmt)
        if cfg.mode == "sft":
            segments = cot_segments(enc)
        else:
            segments = qthink_segments(enc, cfg.num_latent, latent_id, target=cfg.target,
                                       max_answer_length=cfg.max_answer_length)
        t = None
        if teacher is not None:
            t = torch.stack([teacher.states[layer][row_of[i], slots] for layer in layers], 1)  # (S, L, D)
        examples.append({"segments": segments, "teacher": t})
    return examples


def make_distill_batch(pad_id: int):
    """``make_batch`` for :func:`latentlib.training.loop.train`: collate + stacked teachers."""
    def make_batch(examples: list[dict]) -> dict:
        batch = collate([e["segments"] for e in examples], pad_id, align="first_latent")
        if examples[0]["teacher"] is not None:
            batch["teacher"] = torch.stack([e["teacher"] for e in examples]).float()  # (B, S, L, D)
        return batch
    return make_batch


# ---------------------------------------------------------------------------- training


def train_qthink(model, tokenizer, records: Sequence, cfg: DistillConfig, fmt: Format, *,
                 teacher: TeacherStates | None = None, checkpoint_dir=None, desc: str = "qthink",
                 progress: bool = True) -> tuple[object, Projection | None, TrainResult]:
    """Trains one row of the comparison from ``model`` (in place, or wrapped with LoRA).

    ``teacher``: the teacher's states for ``records`` (the records it was extracted from, in
    order), needed by the ``uniform`` and ``reward_weighted`` modes. Returns ``(model,
    projection or None, TrainResult)``; ``model`` is the LoRA-wrapped one under ``use_lora``.
    """
    if cfg.uses_teacher and teacher is None:
        raise ValueError(f"mode={cfg.mode!r} distils a teacher: pass the teacher's states (latentlib.teacher."
                         "load_teacher), or use mode='sft' or 'latent'")
    layers = list(teacher.states) if cfg.uses_teacher else []
    examples = distill_examples(tokenizer, records, cfg, fmt, teacher=teacher if cfg.uses_teacher else None,
                                layers=layers)
    torch.manual_seed(cfg.train.seed)  # the adapters' and the head's initialisation
    if cfg.use_lora:
        model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, targets=cfg.lora_targets,
                           dropout=cfg.lora_dropout)
    projection = None if cfg.mode == "sft" else make_projection(model)
    result = train(model, examples, make_distill_batch(tokenizer.pad_token_id),
                   lambda m, b: distill_loss(m, b, projection, cfg, layers), cfg.train,
                   checkpoint_dir=checkpoint_dir, extra_modules={"head": projection} if projection is not None else None,
                   desc=desc, progress=progress)
    if projection is not None:
        projection.eval()
    return model, projection, result
