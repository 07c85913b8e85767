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

What the embedded task taught us (4-layer tiny model, K = 6; measured, see the report of
notebook 01). Three choices decide whether the thoughts learn at all:

- ``gamma``: at the card's 1.0 the answer cross-entropy dominates the clipped gradient
  (the answer cannot be predicted until the thoughts work, so its gradient is noise) and
  the thoughts stay at chance (8%); ``gamma = 30`` lets the distance lead.
- the layer: distilling layer 0 (at a thought, the thought itself; at the teacher's step,
  that step token's embedding) learns thought by thought, thought 1 first; distilling the
  last layer, or every layer, left the student at 20% or less in the same budget.
- LoRA rather than full fine-tuning, and enough steps: with every weight trained, the
  base drifts before the head has learned (per-step runs ended between 18% and 100%
  by seed and lr); LoRA (r=32, alpha=16, as the card) with 300 steps of 64 still ended
  between 22% and 100% by initialisation; 600 steps of 32 reached 100% for both teachers
  and two seeds. Final-step distillation stays at chance: supervising the last thought
  alone does not teach the five before it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from latentlib import artifacts
from latentlib.batching import collate, encode_record
from latentlib.methods.qthink import load_qthink, make_projection, qthink_segments, save_qthink
from latentlib.presets import LORA_TARGETS
from latentlib.recurrence import latent_forward
from latentlib.teacher import TeacherStates, load_teacher, normalize_layers
from latentlib.tokens import require_tokens
from latentlib.training.base import cot_segments, lm_loss, token_loss
from latentlib.training.loop import TrainConfig, TrainResult, train

__all__ = ["DistillConfig", "MODES", "distill_distance", "apply_lora", "distill_examples", "make_distill_batch",
           "distill_loss", "train_qthink"]

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


def distill_examples(tokenizer, records, cfg: DistillConfig, *, separator: str = "\n",
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
        enc = encode_record(tokenizer, records[i], separator)
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


def apply_lora(model, cfg: DistillConfig):
    """Wraps ``model`` with LoRA adapters (``peft``); only the adapters stay trainable."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in cfg.lora_targets if t not in present]
    if missing:
        raise ValueError(f"lora_targets {missing} are not modules of this model; it has e.g. "
                         f"{sorted(n for n in present if 'proj' in n or 'attn' in n)[:8]}: use the preset's targets")
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_targets),
                        lora_dropout=cfg.lora_dropout, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


# ---------------------------------------------------------------------------- the stage


def train_qthink(run: str, cfg: DistillConfig, records, model, tokenizer, *, name: str, separator: str = "\n",
                 teacher: str = "teacher", base_info: str = "", progress: bool = True,
                 resume: bool = True):
    """Trains one row of the comparison from ``model`` (the base; trained in place, or
    wrapped with LoRA) and saves it under ``runs/<run>/qthink/<name>``.

    Returns ``(model, tokenizer, projection or None, TrainResult)``. A complete saved
    checkpoint of the same configuration (config, teacher, ``base_info``, number of
    records) is reused; another configuration retrains and replaces it. An interrupted
    run resumes from its training checkpoint (``.<name>-<key>.ckpt``).
    """
    out = artifacts.artifact_dir(run, "qthink", name)
    config = json.loads(json.dumps(asdict(cfg)))
    fingerprint = json.dumps([config, teacher, base_info, len(records)], sort_keys=True)
    key = hashlib.sha256(fingerprint.encode()).hexdigest()[:12]
    if artifacts.is_complete(out):
        info = artifacts.load_json(out / artifacts.COMPLETE)
        if info.get("key") == key:  # the same configuration: reuse; otherwise retrain and replace
            loaded, tok, projection = load_qthink(out)
            return loaded, tok, projection, TrainResult(history=info.get("history", []),
                                                        seconds=info.get("seconds", 0.0), steps=cfg.train.steps)
    states, layers = None, []
    if cfg.uses_teacher:
        chosen = None if cfg.layers is None else normalize_layers(cfg.layers, model.config.num_hidden_layers)
        states = load_teacher(run, teacher, weighting=cfg.mode, layers=chosen)
        layers = list(states.states)
    examples = distill_examples(tokenizer, records, cfg, separator=separator, teacher=states, layers=layers)
    torch.manual_seed(cfg.train.seed)  # the adapters' and the head's initialisation
    if cfg.use_lora:
        model = apply_lora(model, cfg)
    projection = None if cfg.mode == "sft" else make_projection(model)
    result = train(model, examples, make_distill_batch(tokenizer.pad_token_id),
                   lambda m, b: distill_loss(m, b, projection, cfg, layers), cfg.train,
                   checkpoint_dir=out.with_name(f".{name}-{key}.ckpt") if resume else None,
                   extra_modules={"head": projection} if projection is not None else None,
                   desc=f"qthink {name}", progress=progress)
    if projection is not None:
        projection.eval()
    save_qthink(out, model, tokenizer, projection, {
        "key": key, "config": config, "teacher": teacher if cfg.uses_teacher else None, "layers": layers,
        "examples": len(examples), "history": result.history, "seconds": result.seconds, "base": base_info})
    return model, tokenizer, projection, result
