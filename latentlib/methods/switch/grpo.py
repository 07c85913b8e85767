"""Switch-GRPO (SWITCH phase 3, as the SWITCH card describes it): on-policy GRPO whose rollouts run through the
engine with real hidden-state injection inside the model's own ``<swi>`` blocks.

One optimizer step:

1. **Rollouts.** Each of the step's prompts is repeated G times (``num_generations``)
   and all ``B * G`` sequences go through ONE call of :func:`latentlib.recurrence.generate`
   with :class:`~latentlib.policies.SwitchPolicy` (enter on ``<swi>``, at least K_min and
   at most K_max latent steps, leave on ``</swi>``), sampled at ``temperature`` with one
   seed per sequence (drawn from the global RNG, which the training loop checkpoints, so
   a resumed run draws the same rollouts).
2. **Rewards.** One function per term (:data:`REWARD_FUNCS`: correctness, format, latent
   usage), summed with ``reward_weights``; group-normalised advantages
   (:func:`group_advantages`, TRL's ``scale_rewards="group"``: ``(r - mean) / (std + 1e-4)``
   with the unbiased std; a group whose rewards are all equal gets exactly 0).
3. **Scoring.** :func:`latentlib.recurrence.latent_forward` on ``prompt + completion``
   with ``latent_mask = trace.is_latent``: the thoughts are recomputed from the current
   weights, so the gradient flows through them into the text that follows. Log-probs
   use ``logits / temperature`` as the sampler did (TRL's convention).
4. **Loss** (:func:`grpo_loss`, TRL's): per token ``-min(ratio * A, clip(ratio, 1 - eps,
   1 + eps) * A) + beta * k3`` with ``k3 = exp(ref - logp) - (ref - logp) - 1`` against a
   frozen reference (the phase-2 model). Only **text** positions of the completion carry
   it: the text before and after blocks, the boundary tokens ``<swi>``/``</swi>`` and
   eos. Latent positions contribute no policy-gradient term (nothing was sampled there),
   and neither does a ``</swi>`` forced at K_max (the policy did not choose it; its
   log-prob can be tiny and would blow up the k3 estimate).
   Normalisation: ``loss_type="bnpo"`` (default; the sum over every text token of the
   batch divided by their number, which on one process is TRL's ``"dapo"``) or
   ``"grpo"`` (mean per sequence, then over sequences).

Where this departs from TRL/the paper: one policy update per rollout batch (TRL's
default ``num_iterations=1``), with the *old* log-probs taken from the rollout itself
(``trace.logprob``: the cached generation and the scoring forward agree to about 1e-5,
pinned by ``tests/test_recurrence.py``), so the ratio starts at 1 and the clip only
matters through that difference. The learning-rate schedule is the training loop's
(linear decay by default, as TRL's). Forced exits are masked out (TRL has no forced
tokens).

The reference (what the KL term anchors to), and its memory:

- **a PEFT model** (every real preset): the same model with its adapter disabled
  (``model.disable_adapter()``, as TRL does with PEFT): the pretrained base, whose
  ``<swi>`` rows are the untrained ones its vocabulary was grown with. No memory beyond
  the scoring forward itself (no parameters); a copy would be a second base model per
  process (about 16 GB for Qwen3-8B in bf16, and not sharded by FSDP).
- **a model without adapters** (the tiny preset, trained in full): a frozen copy of the
  starting model, one more set of its parameters (about 4 MB for tiny).

With several processes each takes its share of the step's prompts (the loop's split),
rolls out and scores its own groups (a group never spans processes, so its advantages
are its own), with the seeds the one-process run would give those prompts; the
token-level loss (``bnpo``) is normalised by the whole global batch's token count. A
sharded (FSDP) model is gathered once per step for the rollouts and the reference.
"""

from __future__ import annotations

import copy
import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from latentlib.batching import prompt_batch
from latentlib.injection import make_injector
from latentlib.methods.switch.config import switch_ids
from latentlib.methods.switch.inference import latent_blocks, switch_policy
from latentlib import distributed
from latentlib.recurrence import generate, latent_forward
from latentlib.tasks import Format, extract_exact, extract_strict, grade
from latentlib.training.loop import TrainConfig, TrainResult, local_positions, train
from latentlib.training.losses import token_count

__all__ = ["SwitchGRPOConfig", "Completions", "correctness_reward", "format_reward", "latent_usage_reward",
           "REWARD_FUNCS", "group_advantages", "grpo_loss", "rollout", "completion_logps", "forced_exits",
           "train_switch_grpo", "GRPORun", "reference_scorer"]

LOSS_TYPES = ("bnpo", "grpo")
SCALE_REWARDS = ("group", "batch", "none")


@dataclass(frozen=True)
class SwitchGRPOConfig:
    num_generations: int = 5  # G: completions per prompt (card: 5)
    generation_batch_size: int = 40  # completions per optimizer step (= prompts per step * G)
    max_steps: int = 100  # optimizer steps
    learning_rate: float = 1e-6  # peak learning rate (card, for 8B with LoRA; tiny picks its own)
    beta: float = 1e-3  # KL coefficient to the frozen reference (card: 1e-3; 0 skips the reference)
    epsilon: float = 0.2  # clip range of the importance ratio (card: 0.2)
    temperature: float = 1.0  # sampling temperature of the rollouts (and of the scored log-probs)
    top_p: float = 1.0  # nucleus sampling of the rollouts
    max_completion_length: int = 256  # generated positions per completion (latent steps included)
    loss_type: str = "bnpo"  # "bnpo" (token-level over the batch) or "grpo" (per-sequence mean)
    scale_rewards: str = "group"  # advantages divided by the group's std ("group"), the batch's, or not ("none")
    reward_weights: tuple[float, ...] = (1.0, 0.2, 0.2)  # weights of REWARD_FUNCS: correctness, format, latent usage
    warmup_steps: int = 0  # linear warmup steps
    lr_scheduler_type: str = "linear"  # after warmup: "linear" (to 0, TRL's default), "cosine" or "constant"
    max_grad_norm: float = 1.0  # gradient clipping (0 disables)
    weight_decay: float = 0.0  # AdamW weight decay
    logging_steps: int = 5  # steps per history row
    grade_mode: str | None = None  # answer grading of the correctness reward (None: the task format's)
    seed: int = 0  # data order and rollout seeds
    save_steps: int = 0  # optimizer steps between checkpoints (TRL's name; 0: only the final one)

    def __post_init__(self):
        if isinstance(self.reward_weights, list):
            object.__setattr__(self, "reward_weights", tuple(self.reward_weights))
        checks = [
            (self.num_generations >= 2, f"num_generations={self.num_generations}: GRPO compares completions "
                                        "within a group; use at least 2 (the card uses 5)"),
            (self.generation_batch_size >= self.num_generations
             and self.generation_batch_size % self.num_generations == 0,
             f"generation_batch_size={self.generation_batch_size} must be a positive multiple of "
             f"num_generations={self.num_generations} (prompts per step * G)"),
            (self.max_steps >= 0, f"max_steps={self.max_steps} must be >= 0"),
            (self.learning_rate > 0 and math.isfinite(self.learning_rate),
             f"learning_rate={self.learning_rate} must be a positive number"),
            (self.beta >= 0, f"beta={self.beta} must be >= 0 (0: no KL term, no reference model)"),
            (0 < self.epsilon < 1, f"epsilon={self.epsilon} must be in (0, 1) (card: 0.2)"),
            (self.temperature > 0, f"temperature={self.temperature}: GRPO needs sampled rollouts; use > 0 (e.g. 1.0)"),
            (0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1]"),
            (self.max_completion_length >= 1, f"max_completion_length={self.max_completion_length} must be >= 1"),
            (self.loss_type in LOSS_TYPES, f"loss_type={self.loss_type!r}: use one of {LOSS_TYPES}"),
            (self.scale_rewards in SCALE_REWARDS, f"scale_rewards={self.scale_rewards!r}: use one of {SCALE_REWARDS}"),
            (len(self.reward_weights) >= 1 and all(math.isfinite(w) for w in self.reward_weights),
             f"reward_weights={self.reward_weights}: give one finite weight per reward function"),
            (self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0"),
            (self.lr_scheduler_type in ("linear", "cosine", "constant"),
             f"lr_scheduler_type={self.lr_scheduler_type!r}: use 'linear', 'cosine' or 'constant'"),
            (self.max_grad_norm >= 0, f"max_grad_norm={self.max_grad_norm} must be >= 0 (0 disables)"),
            (self.logging_steps >= 1, f"logging_steps={self.logging_steps} must be >= 1"),
            (self.save_steps >= 0, f"save_steps={self.save_steps} must be >= 0 (0: only the final checkpoint)"),
            (self.grade_mode in (None, "strict", "flexible", "math", "exact"),
             f"grade_mode={self.grade_mode!r}: use 'strict', 'flexible', 'math', 'exact' or None (the task's)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def prompts_per_step(self) -> int:
        return self.generation_batch_size // self.num_generations

    def train_config(self) -> TrainConfig:
        """The training loop's view of this config (one "example" is one prompt)."""
        return TrainConfig(steps=self.max_steps, batch_size=self.prompts_per_step, lr=self.learning_rate,
                           weight_decay=self.weight_decay, warmup_steps=self.warmup_steps,
                           schedule=self.lr_scheduler_type, grad_clip=self.max_grad_norm, seed=self.seed,
                           log_every=self.logging_steps, checkpoint_every=self.save_steps)


# ---------------------------------------------------------------------------- rewards


@dataclass
class Completions:
    """What the reward functions see, one entry per completion."""

    texts: list[str]  # visible text (special tokens dropped)
    answers: list[str]  # gold answers
    finished: list[bool]  # emitted eos within max_completion_length
    blocks: list[list[int]]  # latent steps of each <swi> block
    unclosed: list[bool]  # a block was still open when the completion ended
    grade_mode: str = "strict"


def correctness_reward(c: Completions) -> torch.Tensor:
    """1 when the graded answer is right, else 0."""
    return torch.tensor([float(grade(t, a, mode=c.grade_mode)) for t, a in zip(c.texts, c.answers)])


def format_reward(c: Completions) -> torch.Tensor:
    """1 when the completion ends (eos), every block is closed and an answer follows ``####``."""
    extract = extract_exact if c.grade_mode == "exact" else extract_strict
    return torch.tensor([float(f and not u and extract(t) is not None)
                         for t, f, u in zip(c.texts, c.finished, c.unclosed)])


def latent_usage_reward(c: Completions) -> torch.Tensor:
    """1 when the completion thought in latent mode at least once (a block with >= 1 latent step)."""
    return torch.tensor([float(any(n > 0 for n in b)) for b in c.blocks])


REWARD_FUNCS: tuple[Callable[[Completions], torch.Tensor], ...] = (correctness_reward, format_reward,
                                                                   latent_usage_reward)


# ---------------------------------------------------------------------------- advantages and loss


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group") -> torch.Tensor:
    """``(N,)`` advantages of ``N = groups * G`` rewards laid out group by group (TRL's):
    ``r - mean(group)``, divided by ``std + 1e-4`` (unbiased std of the group, or of the
    batch). A group whose rewards are all equal gets exactly 0 (not a rounding residue)."""
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(f"{tuple(rewards.shape)} rewards do not split into groups of "
                         f"num_generations={num_generations}")
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r}: use one of {SCALE_REWARDS}")
    grouped = rewards.view(-1, num_generations).float()  # (groups, G)
    adv = grouped - grouped.mean(1, keepdim=True)
    flat = (grouped == grouped[:, :1]).all(1, keepdim=True)  # (groups, 1)
    if scale_rewards == "group":
        adv = adv / (grouped.std(1, keepdim=True) + 1e-4)
    elif scale_rewards == "batch":
        adv = adv / (rewards.float().std() + 1e-4)
    return torch.where(flat, torch.zeros_like(adv), adv).flatten()


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              epsilon: float = 0.2, beta: float = 0.0, ref_logps: torch.Tensor | None = None,
              loss_type: str = "bnpo") -> tuple[torch.Tensor, dict]:
    """TRL's clipped GRPO loss over the ``mask`` positions.

    ``logps``, ``old_logps``, ``ref_logps``, ``mask``: ``(N, S)`` per completion token;
    ``advantages``: ``(N,)``. Returns the loss and metrics (``kl``, ``clip_ratio``).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: use one of {LOSS_TYPES}")
    if beta > 0 and ref_logps is None:
        raise ValueError(f"beta={beta} > 0 needs ref_logps (the reference model's log-probs); or set beta=0")
    mask = mask.float()
    ratio = torch.exp(logps - old_logps)  # (N, S)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    a = advantages[:, None]
    per_token = -torch.min(ratio * a, clipped * a)
    kl = torch.zeros_like(per_token)
    if beta > 0:
        d = ref_logps - logps
        kl = torch.exp(d) - d - 1  # k3: unbiased, non-negative estimate of KL(policy || reference)
        per_token = per_token + beta * kl
    if loss_type == "bnpo":
        count = token_count(mask.sum())  # several processes: the global batch's count (latentlib.training.losses)
        loss = (per_token * mask).sum() / (mask.sum() if count is None else count[0]).clamp(min=1.0)
    else:
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1.0)).mean()
    with torch.no_grad():
        n = mask.sum().clamp(min=1.0)
        is_clipped = ((ratio < 1 - epsilon) & (a < 0)) | ((ratio > 1 + epsilon) & (a > 0))
        metrics = {"kl": float((kl * mask).sum() / n), "clip_ratio": float((is_clipped.float() * mask).sum() / n)}
    return loss, metrics


# ---------------------------------------------------------------------------- rollouts and scoring


@torch.no_grad()
def rollout(model: nn.Module, tokenizer, records: Sequence, cfg: SwitchGRPOConfig, switch_cfg, fmt: Format, *,
            seeds: list[int], injector=None, reward_funcs: Sequence[Callable] = REWARD_FUNCS) -> dict:
    """G completions of every record in one engine call, their rewards and advantages.

    Returns a batch: ``input_ids``/``attention_mask``/``latent_mask`` of prompt +
    completion ``(N, P + S)``, ``completion_mask`` ``(N, S)`` (text positions: the ones
    that carry the loss), ``old_logps`` ``(N, S)``, ``rewards`` ``(N, F)`` per function,
    ``advantages`` ``(N,)``, and summary numbers.
    """
    ids = switch_ids(tokenizer)
    G = cfg.num_generations
    # each question tokenised once (as encode_record does it), repeated for its G completions
    questions = tokenizer([fmt.question(r) for r in records], add_special_tokens=False)["input_ids"]
    prompts = [tuple(q) for q in questions for _ in range(G)]
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} completions: give one per completion")
    dev = next(model.parameters()).device
    input_ids, mask = prompt_batch(prompts, tokenizer.pad_token_id)
    input_ids, mask = input_ids.to(dev), mask.to(dev)
    was_training = model.training
    model.eval()
    trace = generate(model, input_ids, mask, policy=switch_policy(tokenizer, switch_cfg),
                     max_new_tokens=cfg.max_completion_length, eos_token_id=ids.eos, pad_token_id=ids.pad,
                     injector=injector, latent_token_id=ids.latent, temperature=cfg.temperature, top_p=cfg.top_p,
                     seeds=list(seeds), latent_positions=switch_cfg.latent_positions,
                     neutral_token_ids=switch_cfg.neutral_ids(ids))
    model.train(was_training)
    forced = forced_exits(trace.tokens, trace.is_latent, ids.swi_end, switch_cfg.k_max)
    special = set(tokenizer.all_special_ids)
    # per completion, from Python lists (reading a tensor element by element costs a call each)
    tokens, is_latent, valid_l = trace.tokens.tolist(), trace.is_latent.tolist(), trace.valid.tolist()
    text_ids = [[t for t, v, lat in zip(*row) if v and not lat] for row in zip(tokens, valid_l, is_latent)]
    visible = [[t for t in row if t not in special] for row in text_ids]
    texts = tokenizer.batch_decode(visible)
    finished = [ids.eos in row for row in text_ids]
    blocks = [latent_blocks(lat, tok, ids.swi, ids.eos) for lat, tok in zip(is_latent, tokens)]
    unclosed = [row.count(ids.swi) != row.count(ids.swi_end) for row in text_ids]
    answers = [r.answer for r in records for _ in range(G)]
    comps = Completions(texts, answers, finished, blocks, unclosed, cfg.grade_mode or fmt.grade)
    if len(reward_funcs) != len(cfg.reward_weights):
        raise ValueError(f"{len(reward_funcs)} reward functions but {len(cfg.reward_weights)} reward_weights")
    per_func = torch.stack([f(comps).float() for f in reward_funcs], 1)  # (N, F)
    rewards = per_func @ torch.tensor(cfg.reward_weights, dtype=torch.float)  # (N,)
    advantages = group_advantages(rewards, G, cfg.scale_rewards)
    valid = trace.valid
    grouped = rewards.view(-1, G)
    return {
        "input_ids": torch.cat([input_ids, trace.tokens], 1),
        "attention_mask": torch.cat([mask, valid.long()], 1),
        "latent_mask": torch.cat([torch.zeros_like(input_ids, dtype=torch.bool), trace.is_latent], 1),
        "completion_mask": valid & ~trace.is_latent & ~forced,
        "old_logps": trace.logprob,
        "rewards": per_func,
        "reward": rewards,
        "advantages": advantages.to(dev),
        "texts": texts,
        "stats": {
            "reward": float(rewards.mean()),
            **{f"reward_{f.__name__.removesuffix('_reward')}": float(per_func[:, i].mean())
               for i, f in enumerate(reward_funcs)},
            "frac_reward_zero_std": float((grouped == grouped[:, :1]).all(1).float().mean()),
            "visible_tokens": float(sum(map(len, visible)) / len(prompts)),
            "latent_steps": float(trace.latent_steps.float().mean()),
            "kmin_violations": float(sum(n < switch_cfg.k_min for bl in blocks for n in bl)),
            "completion_length": float(valid.sum(1).float().mean()),
        },
    }


def forced_exits(tokens: torch.Tensor, is_latent: torch.Tensor, exit_id: int, k_max: int) -> torch.Tensor:
    """``(N, S)``: the ``</swi>`` tokens the policy forced after K_max latent steps (the
    model did not choose them, so they carry no loss; a ``</swi>`` the model sampled at
    exactly K_max is indistinguishable and is left out too)."""
    run = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
    out = torch.zeros_like(is_latent)
    for j in range(tokens.shape[1]):
        out[:, j] = ~is_latent[:, j] & (tokens[:, j] == exit_id) & (run >= k_max)
        run = torch.where(is_latent[:, j], run + 1, torch.zeros_like(run))
    return out


def completion_logps(model: nn.Module, batch: dict, switch_cfg, ids, *, temperature: float,
                     injector=None) -> torch.Tensor:
    """``(N, S)`` log-probs of the completion tokens under ``model`` (latent positions
    included but meaningless: mask them), thoughts recomputed by the engine."""
    input_ids, mask, latent = batch["input_ids"], batch["attention_mask"], batch["latent_mask"]
    S = batch["completion_mask"].shape[1]
    pos = switch_cfg.position_ids(input_ids, mask, latent, ids)
    # the logits of the S + 1 last positions only: the prompt's are not scored
    out = latent_forward(model, input_ids, mask, latent, injector=injector, position_ids=pos, logits_to_keep=S + 1)
    logits = out.logits[:, :-1].float()  # (N, S, V): column t predicts t + 1
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, -1).gather(-1, input_ids[:, -S:, None]).squeeze(-1)


# ---------------------------------------------------------------------------- training


@dataclass
class GRPORun:
    result: TrainResult  # the loop's history (reward, reward per function, kl, ...) and time
    samples: list[str] = field(default_factory=list)  # a few completions of the last step


def train_switch_grpo(model: nn.Module, tokenizer, records: Sequence, cfg: SwitchGRPOConfig, switch_cfg,
                      fmt: Format, *, ref_model: nn.Module | None = None, injector=None,
                      reward_funcs: Sequence[Callable] = REWARD_FUNCS, checkpoint_dir=None, progress: bool = True,
                      on_log: Callable | None = None) -> GRPORun:
    """Runs Switch-GRPO on ``records`` (prompts) with :func:`latentlib.training.loop.train`
    (AdamW, schedule, clipping, checkpoints with exact resume). ``ref_model``: the frozen
    reference (default, when ``beta > 0``: a PEFT model with its adapter disabled, else a
    copy of ``model`` as it is now; see the module docstring). ``reward_funcs``: the
    reward terms, one weight each in ``cfg.reward_weights``."""
    ids = switch_ids(tokenizer)
    injector = injector if injector is not None else make_injector(switch_cfg.injection, model)
    reference = reference_scorer(model, ref_model) if cfg.beta > 0 or ref_model is not None else None
    samples: list[str] = []

    def make_batch(chunk):
        # the seeds of the whole global batch (the global RNG, which checkpoints resume), this process's rows
        seeds = torch.randint(0, 2**31 - 1, (cfg.prompts_per_step, cfg.num_generations))
        seeds = seeds[local_positions(cfg.prompts_per_step)].flatten().tolist()
        with distributed.gathered(model):  # a sharded model: whole for the rollouts and the reference
            batch = rollout(model, tokenizer, chunk, cfg, switch_cfg, fmt, seeds=seeds, injector=injector,
                            reward_funcs=reward_funcs)
            if reference is not None:
                with torch.no_grad(), reference() as ref:
                    batch["ref_logps"] = completion_logps(ref, batch, switch_cfg, ids, temperature=cfg.temperature,
                                                          injector=injector)
        samples[:] = batch.pop("texts")[:cfg.num_generations]
        return batch

    def loss_fn(model, batch):
        logps = completion_logps(model, batch, switch_cfg, ids, temperature=cfg.temperature, injector=injector)
        loss, metrics = grpo_loss(logps, batch["old_logps"], batch["advantages"], batch["completion_mask"],
                                  epsilon=cfg.epsilon, beta=cfg.beta, ref_logps=batch.get("ref_logps"),
                                  loss_type=cfg.loss_type)
        return loss, {**batch["stats"], **metrics}

    result = train(model, list(records), make_batch, loss_fn, cfg.train_config(), checkpoint_dir=checkpoint_dir,
                   desc="switch-grpo", progress=progress, on_log=on_log)
    return GRPORun(result, samples)


def reference_scorer(model: nn.Module, ref_model: nn.Module | None = None) -> Callable:
    """``with scorer() as ref:`` gives the model that scores the reference log-probs:
    ``ref_model`` if given (frozen here), else ``model`` with its adapter disabled for a
    PEFT model (no extra memory), else a frozen copy of ``model`` made now (one more set
    of its parameters)."""
    if ref_model is None and hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):
        @contextlib.contextmanager
        def disabled():
            with model.disable_adapter():
                yield model

        return disabled
    if ref_model is None:
        ref_model = copy.deepcopy(model)
    ref_model.eval()
    for p in ref_model.parameters():
        p.requires_grad_(False)

    @contextlib.contextmanager
    def frozen():
        ref_model.to(next(model.parameters()).device)
        yield ref_model

    return frozen
