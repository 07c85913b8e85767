"""7. Against TRL, what a researcher would pick instead for the training phases: the
Switch-GRPO step against ``trl.GRPOTrainer``'s, and the supervised steps (SWITCH phase 1,
Coconut stage 0) against ``trl.SFTTrainer``'s, on the same model, data and settings.

Both sides run in one process, interleaved round by round (A B A B ...), and the ratios
are medians. What each timed region contains (the same work on both sides):

- **GRPO step** (``grpo_text``): from the step's prompts (a list of records) to updated
  weights. Ours: :func:`latentlib.methods.switch.grpo.rollout` (one engine call for the
  ``G x prompts`` completions, rewards, advantages), the frozen reference's log-probs,
  the policy's scoring forward, :func:`~latentlib.methods.switch.grpo.grpo_loss`,
  backward, gradient clipping, AdamW and scheduler step: the body of
  :func:`latentlib.training.loop.train` with the batch and loss functions of
  :func:`~latentlib.methods.switch.grpo.train_switch_grpo`. TRL: the body of
  ``Trainer``'s loop for one optimizer step: ``trainer.training_step`` (which runs
  ``_generate_and_score_completions``: tokenising, ``model.generate``, rewards,
  advantages, the reference's log-probs; then ``compute_loss`` and backward), gradient
  clipping, optimizer and scheduler step, ``zero_grad``. Left out on both sides: the
  data loader (TRL's repeat sampler; our index draw), logging callbacks and checkpoints.
  Same model weights (separate copies), float32 on both (``bf16=False``; TRL's default
  would run under bf16 autocast), no gradient checkpointing (TRL's default is on),
  one process, the same thread count (printed), temperature, ``top_p=1``, ``top_k=0``,
  the same eos (``tokenizer.eos_token_id``, which is all the model's generation config
  declares), ``max_completion_length``, G, prompts per step, ``beta``, ``epsilon``,
  ``loss_type``, ``scale_rewards``, reward functions and weights, learning rate and
  schedule. TRL's ``use_bias_correction_kl`` is turned off because our objective has
  no such factor (it multiplies the k3 term by the ratio, which is exactly 1 at its
  value and only changes the gradient).

  So that both do the same work, the completions are text only: the SWITCH tokens are in
  the tokenizer but past the model's vocabulary, so no ``<swi>`` can be sampled and our
  policy never enters a block. Both loops decode until every completion has ended or
  ``max_completion_length`` is reached; with tens of sampled completions per step
  nearly every step runs the full length on both sides (the output prints the decode
  lengths seen).
- **GRPO step with SWITCH blocks** (``grpo_blocks``, ours only: TRL has no latent step):
  the same step on the same model with the SWITCH rows added and ``<swi>`` made likely,
  so completions enter blocks (K_min..K_max latent steps each); the ratio to the
  text-only step is the cost of the latent steps (the output gives the latent steps per
  completion and the thought columns the scoring forward had to split at).
- **SFT step** (``sft_switch_phase1``, ``sft_coconut_stage0``): from a collated batch to
  updated weights. Ours: the method's loss function (:func:`~latentlib.methods.switch.train.switch_loss`,
  Coconut's :func:`~latentlib.methods.coconut.train.make_loss`), backward, clipping,
  AdamW and scheduler: the body of :func:`latentlib.training.loop.train`. TRL:
  ``trainer.training_step`` (``compute_loss`` with its fused LM head, and backward),
  clipping, optimizer and scheduler step, ``zero_grad``. The batch is the same examples
  (TRL gets our token ids and completion mask as a pre-tokenised prompt-completion
  dataset, collated by its own collator); collation is left out on both sides. The
  trainable parameters are the library's for that phase (all weights on tiny; on
  SmolLM2 LoRA with the embedding and head for SWITCH, LoRA with the new token rows for
  Coconut).

**Losses**: on a fixed batch (completions from one of our rollouts; the first SFT batch)
both score the same weights, and the losses must agree within ``LOSS_ATOL + LOSS_RTOL * |TRL's|``: float32
rounding only (TRL sums log-probs from a chunked LM head and right-pads; we take a full
log-softmax and left-pad; positions differ by a constant offset on left-padded rows,
which rotary embeddings make a rounding difference).

**Peak memory**: each candidate runs in its own fresh process (the parent starts one per
candidate), one warm-up step allocates the optimizer state, then the peak resident set
over the next step is read after resetting the kernel's high-water mark
(``/proc/self/clear_refs``); reported as the peak and as the peak above the resident set
before the steps (what a step needs on top of model, optimizer state and libraries).

    python -m benchmarks.trl_compare [--models tiny,smollm2-135m] [--parts grpo,sft,memory] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from benchmarks.common import save, set_threads
from latentlib.batching import collate, encode_record
from latentlib.injection import make_injector
from latentlib.methods import switch as sw
from latentlib.methods.switch import grpo
from latentlib.presets import get_preset, load_model
from latentlib.tasks import TaskConfig, load_task
from latentlib.tokens import SPECIAL_TOKENS, add_special_tokens
from latentlib.training.loop import TrainConfig, _lr_factor, adamw, trainable_parameters

LOSS_RTOL = 1e-5  # relative difference allowed between the two losses on the same batch (float32 rounding)
# ... plus this absolute one, as torch.allclose: a GRPO loss is a sum of per-token terms of size
# about 1 (normalised advantages) that cancel to a small number, so its rounding error scales
# with the terms (float32 eps 1.2e-7 over a few hundred tokens), not with the small total
LOSS_ATOL = 1e-6
SFT_PHASES = {"switch": "SWITCH phase 1", "coconut": "Coconut stage 0"}
RESULT = "trl_comparison"
# what TRL raises on a pair it cannot run (see main): its fused LM head reads lm_head.bias, which a tied head
# with peft's trainable token rows (a TrainableTokensWrapper) lacks
TRL_CANNOT_RUN = "'TrainableTokensWrapper' object has no attribute"


def _cannot_run(message: str) -> str | None:
    """The line of ``message`` (an error or a child's stderr) saying TRL cannot run the pair, else None."""
    return next((ln.strip() for ln in reversed(message.splitlines()) if TRL_CANNOT_RUN in ln), None)


def loss_parity(our_loss: float, trl_loss: float) -> dict:
    """The two losses' difference and whether it is within ``LOSS_ATOL + LOSS_RTOL * |TRL's|``."""
    diff = abs(our_loss - trl_loss)
    return {"loss_ours": our_loss, "loss_trl": trl_loss, "abs_diff": diff,
            "rel_diff": diff / max(abs(trl_loss), 1e-12), "tolerance_rel": LOSS_RTOL, "tolerance_abs": LOSS_ATOL,
            "within_tolerance": diff <= LOSS_ATOL + LOSS_RTOL * abs(trl_loss)}


def _tolerance_text(p: dict) -> str:
    return (f"|diff| {p['abs_diff']:.2e} (rel {p['rel_diff']:.1e}; tolerance {LOSS_ATOL:g} + {LOSS_RTOL:g} x |TRL|: "
            f"{'within' if p['within_tolerance'] else 'OUTSIDE'})")


# per model: prompts per step, G, completion length (the SWITCH card's G = 5; SmolLM2's pipeline uses 4 prompts and
# 48 tokens per completion), SFT batch, the boost that makes <swi> likely in the blocks-on model
SETTINGS = {
    "tiny": {"prompts": 8, "G": 5, "length": 40, "sft_batch": 32, "lr": 1e-4, "swi_boost": 5.0},
    "smollm2-135m": {"prompts": 4, "G": 5, "length": 48, "sft_batch": 16, "lr": 1e-4, "swi_boost": 2.5},
}


def require_trl():
    try:
        import trl  # noqa: F401
    except ImportError as e:
        raise SystemExit("this benchmark compares against TRL: install it with "
                         "`.venv/bin/pip install -e '.[bench]'` (TRL is not a runtime dependency)") from e
    import trl

    return trl


# ---------------------------------------------------------------------------- models and data


def _task_and_base(name: str):
    """(preset, task, base model, tokenizer): the tiny random model over the chain task's words,
    or SmolLM2-135M with its task (gsm_symbolic)."""
    preset = get_preset(name)
    if name == "tiny":
        task = load_task(TaskConfig(n_train=200, n_test=64), preset.step_separator)
        model, tok = load_model("tiny", words=list(task.words), seed=0)
    else:
        task = load_task(TaskConfig(name=preset.task, n_train=200, n_test=64), preset.step_separator)
        model, tok = load_model(name)
    return preset, task, model, tok


def text_only(model, tok):
    """The SWITCH (and Coconut) tokens in the tokenizer, their ids past the model's vocabulary:
    generation cannot sample them, so completions are text only on both sides."""
    vocab = model.get_output_embeddings().weight.shape[0]
    tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)}, replace_extra_special_tokens=False)
    ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert min(ids) >= vocab, f"special token ids {ids} fall inside the model's vocabulary ({vocab})"
    return model, tok


def with_blocks(model, tok, boost: float):
    """The model given rows for the special tokens (initialised as
    :func:`latentlib.tokens.add_special_tokens` does: the mean row), with ``<swi>`` made
    likely: its tied embedding row, the mean row, scaled by ``boost`` (as the tests' ``eager``
    fixture does), until completions enter blocks at a moderate rate (printed)."""
    model, tok = copy.deepcopy(model), copy.deepcopy(tok)
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    swi = tok.convert_tokens_to_ids("<swi>")
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[old:] = emb[:old].mean(0)
        emb[swi] = emb[:old].mean(0) * boost
    return model, tok


def switch_config(preset):
    """The card's block settings (c=2, K_min=4, K_max=8) with the preset's position mode."""
    return sw.SwitchConfig(positions=sw.default_positions(preset))


def grpo_config(s: dict, loss_type: str = "bnpo") -> grpo.SwitchGRPOConfig:
    """The card's phase 3 (G=5, clip 0.2, KL 1e-3) at this model's sizes."""
    return grpo.SwitchGRPOConfig(num_generations=s["G"], generation_batch_size=s["G"] * s["prompts"],
                                 max_steps=1000, learning_rate=s["lr"], beta=1e-3, epsilon=0.2, temperature=1.0,
                                 top_p=1.0, max_completion_length=s["length"], loss_type=loss_type,
                                 scale_rewards="group", lr_scheduler_type="linear", warmup_steps=0,
                                 max_grad_norm=1.0, weight_decay=0.0, seed=0)


def make_trainable(name: str, model, tok, preset, kind: str):
    """The library's trainable parameters for a phase: all weights on tiny; on SmolLM2 LoRA
    with the whole embedding and head (SWITCH, the card's) or with the new rows (Coconut)."""
    if not preset.use_lora:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if kind == "switch":
        return sw.make_trainable(model, tok, preset)
    from latentlib.training.lora import lora_for_preset

    return lora_for_preset(model, tok, preset, tokens=("<bot>", "<eot>", "<latent>"))


# ---------------------------------------------------------------------------- our side


class OurGRPO:
    """One Switch-GRPO optimizer step: the body of :func:`latentlib.training.loop.train`
    with :func:`~latentlib.methods.switch.grpo.train_switch_grpo`'s ``make_batch`` and ``loss_fn``."""

    def __init__(self, model, tok, cfg: grpo.SwitchGRPOConfig, switch_cfg, fmt):
        self.model, self.tok, self.cfg, self.switch_cfg, self.fmt = model, tok, cfg, switch_cfg, fmt
        self.ids = sw.switch_ids(tok)
        self.injector = make_injector(switch_cfg.injection, model)
        self.ref = copy.deepcopy(model).eval()
        for p in self.ref.parameters():
            p.requires_grad_(False)
        tc = cfg.train_config()
        self.params = trainable_parameters([model])
        self.opt = adamw(self.params, tc.lr, tc.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: _lr_factor(tc, s))
        self.last: dict = {}

    def make_batch(self, records):
        cfg = self.cfg
        seeds = torch.randint(0, 2**31 - 1, (len(records) * cfg.num_generations,)).tolist()
        batch = grpo.rollout(self.model, self.tok, records, cfg, self.switch_cfg, self.fmt, seeds=seeds,
                             injector=self.injector)
        with torch.no_grad():
            batch["ref_logps"] = grpo.completion_logps(self.ref, batch, self.switch_cfg, self.ids,
                                                       temperature=cfg.temperature, injector=self.injector)
        batch.pop("texts")
        return batch

    def loss(self, batch):
        cfg = self.cfg
        logps = grpo.completion_logps(self.model, batch, self.switch_cfg, self.ids, temperature=cfg.temperature,
                                      injector=self.injector)
        loss, metrics = grpo.grpo_loss(logps, batch["old_logps"], batch["advantages"], batch["completion_mask"],
                                       epsilon=cfg.epsilon, beta=cfg.beta, ref_logps=batch.get("ref_logps"),
                                       loss_type=cfg.loss_type)
        return loss, {**batch["stats"], **metrics}

    def step(self, records):
        self.model.train()
        batch = self.make_batch(records)
        loss, metrics = self.loss(batch)
        _update(self, loss)
        latent_cols = int(batch["latent_mask"].any(0).sum())
        self.last = {"loss": loss.item(), "decode_steps": int(batch["completion_mask"].shape[1]),
                     "latent_steps": metrics["latent_steps"], "thought_columns": latent_cols,
                     "completion_length": metrics["completion_length"]}
        return self.last


class OurSFT:
    """One supervised step: the body of :func:`latentlib.training.loop.train` with a method's loss."""

    def __init__(self, model, loss_fn, lr: float):
        self.model, self.loss_fn = model, loss_fn
        tc = TrainConfig(steps=1000, batch_size=1, lr=lr, warmup_steps=0, schedule="linear")
        self.params = trainable_parameters([model])
        self.opt = adamw(self.params, tc.lr, tc.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: _lr_factor(tc, s))
        self.cfg_clip = tc.grad_clip

    def step(self, batch):
        self.model.train()
        loss, _ = self.loss_fn(self.model, batch)
        _update(self, loss)
        return {"loss": loss.item()}


def _update(side, loss, clip: float = 1.0):
    """What :func:`latentlib.training.loop.train` does after the loss (one process)."""
    if not torch.isfinite(loss.detach()).all():
        raise FloatingPointError(f"non-finite loss {loss.item()}")
    side.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(side.params, clip)
    side.opt.step()
    side.sched.step()


# ---------------------------------------------------------------------------- TRL's side


def _trl_reward_funcs(tok, grade_mode: str):
    """Our three reward terms as TRL reward functions (the same grading on the same text)."""
    eos = tok.eos_token_id

    def comps(completions, completion_ids, answer):
        finished = [len(c) > 0 and c[-1] == eos for c in completion_ids]
        n = len(completions)
        return grpo.Completions(list(completions), list(answer), finished, [[] for _ in range(n)],
                                [False] * n, grade_mode)

    def wrap(fn):
        def reward(prompts, completions, completion_ids, answer, **kw):
            return fn(comps(completions, completion_ids, answer)).tolist()
        reward.__name__ = fn.__name__
        return reward

    return [wrap(f) for f in grpo.REWARD_FUNCS]


def _common_args(tmp: str, **kw) -> dict:
    return dict(output_dir=tmp, bf16=False, fp16=False, activation_checkpointing=False, use_cpu=True,
                report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=10**6, max_steps=1000,
                lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                dataloader_num_workers=0, seed=0, **kw)


def _prepare_trainer(trainer):
    """What ``Trainer.train`` sets up before its loop, without its data loader: the optimizer
    (the default, AdamW fused), the scheduler, and the accumulation state of one step."""
    trainer.create_optimizer_and_scheduler(num_training_steps=trainer.args.max_steps)
    trainer.model_wrapped = trainer.model
    trainer.current_gradient_accumulation_steps = 1
    trainer.accelerator.gradient_state._set_sync_gradients(True)
    trainer.model.train()


def _trl_update(trainer, inputs, num_items_in_batch=None):
    """The body of ``Trainer``'s loop for one optimizer step (one micro-batch)."""
    model = trainer.model
    loss = trainer.training_step(model, inputs, num_items_in_batch)
    if trainer.args.max_grad_norm > 0:
        trainer._clip_grad_norm(model)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    model.zero_grad()
    trainer.state.global_step += 1
    return loss


class TRLGRPO:
    def __init__(self, model, tok, cfg: grpo.SwitchGRPOConfig, fmt, records, tmp: str):
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer

        self.G = cfg.num_generations
        self.tok = tok
        self.rows = [{"prompt": fmt.question(r), "answer": r.answer} for r in records]
        args = GRPOConfig(**_common_args(
            tmp, per_device_train_batch_size=cfg.generation_batch_size, num_generations=cfg.num_generations,
            max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
            beta=cfg.beta, epsilon=cfg.epsilon, loss_type=cfg.loss_type, scale_rewards=cfg.scale_rewards,
            learning_rate=cfg.learning_rate, reward_weights=list(cfg.reward_weights), shuffle_dataset=False,
            use_bias_correction_kl=False, log_completions=False))
        self.trainer = GRPOTrainer(model=model, reward_funcs=_trl_reward_funcs(tok, cfg.grade_mode or fmt.grade),
                                   args=args, train_dataset=Dataset.from_list(self.rows), processing_class=tok)
        _prepare_trainer(self.trainer)
        self.last: dict = {}

    def inputs(self, idx):
        return [dict(self.rows[i]) for i in idx for _ in range(self.G)]  # TRL's sampler repeats each prompt G times

    def step(self, idx):
        loss = _trl_update(self.trainer, self.inputs(idx))
        m = self.trainer._metrics["train"]
        self.last = {"loss": float(loss), "decode_steps": int(m["completions/max_length"][-1]),
                     "completion_length": m["completions/mean_length"][-1]}
        return self.last


class TRLSFT:
    def __init__(self, model, tok, examples: list[dict], batch_size: int, lr: float, tmp: str):
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**_common_args(tmp, per_device_train_batch_size=batch_size, learning_rate=lr,
                                        max_length=None, completion_only_loss=True, packing=False,
                                        shuffle_dataset=False))
        self.trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples),
                                  processing_class=tok)
        _prepare_trainer(self.trainer)
        self.dataset = self.trainer.train_dataset

    def batch(self, idx):
        b = self.trainer.data_collator([self.dataset[i] for i in idx])
        n = self.trainer._get_num_items_in_batch([b], torch.device("cpu"))
        return b, n

    def step(self, batch_and_n):
        b, n = batch_and_n
        return {"loss": float(_trl_update(self.trainer, dict(b), n))}


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def _save_for_trl(model, tok, tmp: str) -> str:
    """TRL builds its reference model with ``from_pretrained(model.config._name_or_path)``:
    save the exact weights there so its reference is our reference."""
    d = Path(tmp) / "model"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    model.config._name_or_path = str(d)
    return str(d)


def sft_rows(batch: dict) -> list[dict]:
    """Our collated examples as TRL's pre-tokenised prompt-completion rows (padding removed)."""
    rows = []
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        keep = mask.bool()
        rows.append({"input_ids": ids[keep].tolist(), "completion_mask": (labels[keep] != -100).long().tolist()})
    return rows


# ---------------------------------------------------------------------------- loss equality


def perturb_(model, seed: int = 0, scale: float = 0.05) -> dict:
    """Moves every trainable weight by ``scale`` of its spread (0.01 where it is constant, e.g.
    LoRA's zero B), the same on any copy; returns the state to restore. So that the policy
    differs from the reference (non-zero KL) and from the rollout (ratios away from 1)."""
    g = torch.Generator().manual_seed(seed)
    saved = {}
    with torch.no_grad():
        for k, p in sorted(model.named_parameters()):
            if p.requires_grad:
                saved[k] = p.detach().clone()
                spread = float(p.std()) if p.numel() > 1 else 0.0
                p.add_(torch.randn(p.shape, generator=g) * (scale * spread if spread > 0 else 0.01))
    return saved


def restore_(model, saved: dict) -> None:
    with torch.no_grad():
        for k, p in model.named_parameters():
            if k in saved:
                p.copy_(saved[k])


def _grads(model) -> dict:
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def grpo_loss_parity(ours: OurGRPO, trl: TRLGRPO, records) -> dict:
    """Both losses and gradients on one fixed batch of completions (from one of our rollouts),
    the same weights on both sides. At the starting point the loss is trivially about 0 (ratio
    1, policy = reference), so both policies are first moved by the same perturbation
    (:func:`perturb_`) and the rollout's log-probs shifted by a fixed pattern: ratios then
    spread over about [0.7, 1.4] (the clip acts) and the KL term is non-zero. The advantages
    are a fixed pattern (see below)."""
    torch.manual_seed(1234)
    ours.model.train()
    batch = ours.make_batch(records)
    trainer = trl.trainer
    S = batch["completion_mask"].shape[1]
    P = batch["input_ids"].shape[1] - S
    valid = batch["attention_mask"][:, P:]
    assert torch.equal(valid.bool(), batch["completion_mask"]), "text-only completions: every valid token has a loss"
    shift = 0.2 * torch.sin(torch.arange(valid.numel(), dtype=torch.float)).view(valid.shape)
    batch["old_logps"] = batch["old_logps"] + shift
    # fixed advantages in [-1, 1]: the policy-gradient term is exercised whatever the rewards (an untrained
    # SmolLM2 earns none, so its group advantages are all 0); both sides get the same ones
    batch["advantages"] = torch.sin(1.3 * torch.arange(valid.shape[0], dtype=torch.float))
    inputs = {"prompt_ids": batch["input_ids"][:, :P], "prompt_mask": batch["attention_mask"][:, :P],
              "completion_ids": batch["input_ids"][:, P:], "completion_mask": valid.long(),
              "advantages": batch["advantages"], "old_per_token_logps": batch["old_logps"],
              "num_items_in_batch": valid.sum()}
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():  # each side's own reference log-probs
        if trainer.ref_model is not None:
            ref_trl = trainer._get_per_token_logps_and_entropies(trainer.ref_model, ids, mask, S)[0]
        else:  # PEFT: TRL's reference is the model with the starting adapter
            from trl.trainer.utils import use_adapter

            peft_model = trainer.accelerator.unwrap_model(trainer.model)
            # TRL's own choice: a copy of the starting adapter named "ref" when the model came with one
            with use_adapter(peft_model, adapter_name="ref" if "ref" in peft_model.peft_config else None):
                ref_trl = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, S)[0]
    inputs["ref_per_token_logps"] = ref_trl
    saved_ours, saved_trl = perturb_(ours.model), perturb_(trainer.model)
    try:
        ours.model.zero_grad(set_to_none=True)
        our_loss, metrics = ours.loss(batch)
        our_loss.backward()
        trainer.model.zero_grad(set_to_none=True)
        trl_loss = trainer.compute_loss(trainer.model, inputs)
        trl_loss.backward()
        g_ours, g_trl = _grads(ours.model), _grads(trainer.model)
        assert g_ours.keys() == g_trl.keys(), "the two sides train different parameters"
        num = math.sqrt(sum(float((g_ours[k] - g_trl[k]).pow(2).sum()) for k in g_ours))
        den = math.sqrt(sum(float(g_trl[k].pow(2).sum()) for k in g_trl))
        with torch.no_grad():
            our_logps = grpo.completion_logps(ours.model, batch, ours.switch_cfg, ours.ids,
                                              temperature=ours.cfg.temperature)
            trl_logps = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, S)[0]
    finally:
        restore_(ours.model, saved_ours)
        restore_(trainer.model, saved_trl)
        ours.model.zero_grad(set_to_none=True)
        trainer.model.zero_grad(set_to_none=True)
    m = valid.bool()
    our_loss, trl_loss = float(our_loss.detach()), float(trl_loss.detach())
    return {**loss_parity(our_loss, trl_loss),
            "grad_rel_diff": num / max(den, 1e-30), "kl": metrics["kl"], "clip_ratio": metrics["clip_ratio"],
            "max_logp_diff": float((our_logps - trl_logps)[m].abs().max()),
            "max_ref_logp_diff": float((batch["ref_logps"] - ref_trl)[m].abs().max()),
            "tokens": int(m.sum())}


# ---------------------------------------------------------------------------- timing


def interleave(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Each function ``warmup`` times, then ``repeats`` rounds A B C A B C ...; per function
    the times and what the last call returned; per round the ratios (so a ratio is always of
    two runs made back to back)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    info = {}
    threads = set()
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            info[k] = fn()
            times[k].append(time.perf_counter() - t0)
            threads.add(torch.get_num_threads())
    return {"times": times, "median_s": {k: statistics.median(v) for k, v in times.items()},
            "min_s": {k: min(v) for k, v in times.items()}, "info": info, "threads_seen": sorted(threads)}


def round_ratio(t: dict, num: str, den: str) -> dict:
    """Median (and range) of the per-round ratios ``num / den``, and the ratio of medians."""
    r = [a / b for a, b in zip(t["times"][num], t["times"][den])]
    return {"median": statistics.median(r), "min": min(r), "max": max(r),
            "of_medians": t["median_s"][num] / t["median_s"][den]}


# ---------------------------------------------------------------------------- the benchmarks


def grpo_pair(name: str, s: dict):
    """Our Switch-GRPO side and TRL's on the same text-only model (separate copies)."""
    preset, task, base, tok = _task_and_base(name)
    base, tok = text_only(base, tok)
    cfg = grpo_config(s)
    records = task.splits.train
    tmp = tempfile.mkdtemp(prefix="trl-grpo-")
    # the same starting weights on both sides, separate copies (each side updates its own)
    if not preset.use_lora:
        _save_for_trl(base, tok, tmp)
    trainable = make_trainable(name, copy.deepcopy(base), tok, preset, "switch")  # once: LoRA's initialisation is random
    ours = OurGRPO(copy.deepcopy(trainable), tok, cfg, switch_config(preset), task.format)
    trl = TRLGRPO(copy.deepcopy(trainable), tok, cfg, task.format, records, tmp)
    del trainable
    # prompts: TRL tokenises the prompt text itself; check it gets our ids
    B = s["prompts"]
    ours_ids = [list(encode_record(tok, r, task.format).question) for r in records[:B]]
    trl_ids = trl.trainer._tokenize_prompts([r["prompt"] for r in trl.rows[:B]])[0]
    assert [list(x) for x in trl_ids] == ours_ids, "TRL tokenises the prompts differently"
    return preset, task, base, tok, ours, trl


def grpo_parities(name: str, s: dict, ours: OurGRPO, trl: TRLGRPO, records, loss_types=("bnpo", "grpo")) -> dict:
    parity = {}
    for lt in loss_types:
        ours.cfg = grpo_config(s, lt)
        trl.trainer.loss_type = lt  # the same names: "bnpo" and "grpo" are TRL's
        parity[lt] = p = grpo_loss_parity(ours, trl, records[:s["prompts"]])
        print(f"[{name} grpo] loss_type={lt}: ours {p['loss_ours']:.8f} TRL {p['loss_trl']:.8f} "
              f"{_tolerance_text(p)}, gradients rel "
              f"{p['grad_rel_diff']:.1e}; kl {p['kl']:.2e}, clipped {p['clip_ratio']:.0%}; max |logp diff| "
              f"{p['max_logp_diff']:.1e}, ref {p['max_ref_logp_diff']:.1e} over {p['tokens']} tokens", flush=True)
    ours.cfg = grpo_config(s)
    trl.trainer.loss_type = ours.cfg.loss_type
    return parity


def grpo_bench(name: str, repeats: int, s: dict) -> dict:
    preset, task, base, tok, ours, trl = grpo_pair(name, s)
    cfg, switch_cfg, records, B = ours.cfg, ours.switch_cfg, task.splits.train, s["prompts"]
    parity = grpo_parities(name, s, ours, trl, records)

    blocks_model, blocks_tok = with_blocks(base, tok, s["swi_boost"])
    blocks = OurGRPO(make_trainable(name, blocks_model, blocks_tok, preset, "switch"), blocks_tok, cfg, switch_cfg,
                     task.format)
    step = {"i": 0}

    def chunk():  # the same prompts for the three candidates within a round
        k = (step["i"] // 3) % (len(records) // B)
        step["i"] += 1
        return k * B, (k + 1) * B

    def run_ours():
        a, b = chunk()
        return ours.step(records[a:b])

    def run_trl():
        a, b = chunk()
        return trl.step(range(a, b))

    def run_blocks():
        a, b = chunk()
        return blocks.step(records[a:b])

    torch.manual_seed(0)
    t = interleave({"ours": run_ours, "trl": run_trl, "ours_blocks": run_blocks}, repeats=repeats)
    row = {"model": name, "G": s["G"], "prompts": B, "completions": s["G"] * B, "max_completion_length": s["length"],
           "loss_type": cfg.loss_type, "beta": cfg.beta, "epsilon": cfg.epsilon, "temperature": cfg.temperature,
           "trainable": "all weights" if not preset.use_lora else "LoRA + embedding and head",
           "median_s": t["median_s"], "times_s": t["times"], "threads": t["threads_seen"],
           "ours_vs_trl": round_ratio(t, "ours", "trl"), "blocks_vs_text": round_ratio(t, "ours_blocks", "ours"),
           "blocks_vs_trl": round_ratio(t, "ours_blocks", "trl"), "last": t["info"], "loss_parity": parity}
    print(f"[{name} grpo] threads {t['threads_seen']}: ours {t['median_s']['ours']:.2f} s, TRL "
          f"{t['median_s']['trl']:.2f} s per step: ours/TRL {row['ours_vs_trl']['median']:.2f} "
          f"(rounds {row['ours_vs_trl']['min']:.2f}-{row['ours_vs_trl']['max']:.2f}; target <= 1.0); "
          f"with SWITCH blocks {t['median_s']['ours_blocks']:.2f} s: {row['blocks_vs_text']['median']:.2f}x the "
          f"text-only step ({t['info']['ours_blocks']['latent_steps']:.1f} latent steps per completion, "
          f"{t['info']['ours_blocks']['thought_columns']} thought columns)", flush=True)
    print(f"    decode steps: ours {t['info']['ours']['decode_steps']}, TRL {t['info']['trl']['decode_steps']}; "
          f"mean completion: ours {t['info']['ours']['completion_length']:.1f}, TRL "
          f"{t['info']['trl']['completion_length']:.1f}", flush=True)
    return row


def sft_setup(name: str, kind: str, s: dict):
    """(model with the phase's trainable parameters, tokenizer, our loss function, batches of examples)."""
    preset, task, base, tok = _task_and_base(name)
    add_special_tokens(base, tok)
    fmt = task.format
    encoded = [encode_record(tok, r, fmt) for r in task.splits.train]
    if kind == "switch":
        # "continue" positions (the paper's; SmolLM2's default): tiny's default "block" positions let <swi> and
        # </swi> share the next token's position, which TRL cannot express, so the two would train different losses
        cfg = sw.SwitchConfig(positions="continue")
        ids = sw.switch_ids(tok)
        # phase 1's format: the CoT with <swi> ... </swi> around spans (here every second step, text inside)
        examples = [sw.switch_segments(e, [sw.Span(i, i + 1, i % 2 == 1) for i in range(len(e.steps))], ids)
                    for e in encoded]
        loss_fn = sw.switch_loss(cfg, ids)
        align = "end"
    else:
        from latentlib.methods.coconut import CoconutConfig, make_loss, stage_examples
        from latentlib.tokens import token_ids

        cfg = CoconutConfig()
        examples = stage_examples(encoded, 0, cfg, token_ids(tok))
        loss_fn = make_loss(cfg, make_injector(cfg.injection, base))
        align = "first_latent"
    B = s["sft_batch"]
    batches = [collate(examples[i:i + B], tok.pad_token_id, align=align) for i in range(0, len(examples) - B + 1, B)]
    return preset, base, tok, loss_fn, batches


def sft_pair(name: str, kind: str, s: dict):
    preset, base, tok, loss_fn, batches = sft_setup(name, kind, s)
    tmp = tempfile.mkdtemp(prefix="trl-sft-")
    trainable = make_trainable(name, copy.deepcopy(base), tok, preset, kind)  # once: LoRA's initialisation is random
    ours = OurSFT(copy.deepcopy(trainable), loss_fn, s["lr"])
    rows = [r for b in batches for r in sft_rows(b)]
    trl = TRLSFT(copy.deepcopy(trainable), tok, rows, s["sft_batch"], s["lr"], tmp)
    del trainable
    return preset, ours, trl, batches


def sft_loss_parity(ours: OurSFT, trl: TRLSFT, batch: dict, B: int) -> dict:
    """The step-0 loss of both on the same examples and weights (TRL collates them itself)."""
    with torch.no_grad():
        ours.model.train()
        our_loss = float(ours.loss_fn(ours.model, batch)[0])
        b0, n0 = trl.batch(range(B))
        trl.trainer.model.train()
        trl_loss = float(trl.trainer.compute_loss(trl.trainer.model, dict(b0), num_items_in_batch=n0))
    return {**loss_parity(our_loss, trl_loss), "tokens": int(n0)}


def sft_bench(name: str, kind: str, repeats: int, s: dict) -> dict:
    preset, ours, trl, batches = sft_pair(name, kind, s)
    B = s["sft_batch"]
    parity = sft_loss_parity(ours, trl, batches[0], B)
    print(f"[{name} sft {kind}] step-0 loss: ours {parity['loss_ours']:.8f} TRL {parity['loss_trl']:.8f} "
          f"{_tolerance_text(parity)}",
          flush=True)
    trl_batches = [trl.batch(range(i * B, (i + 1) * B)) for i in range(len(batches))]
    k = {"ours": 0, "trl": 0}

    def run(side, obj, bs):
        def f():
            i = k[side] % len(bs)
            k[side] += 1
            return obj.step(bs[i])
        return f

    t = interleave({"ours": run("ours", ours, batches), "trl": run("trl", trl, trl_batches)}, repeats=repeats)
    row = {"model": name, "phase": SFT_PHASES[kind], "batch": B,
           "length": int(batches[0]["input_ids"].shape[1]),
           "trainable": "all weights" if not preset.use_lora else
           ("LoRA + embedding and head" if kind == "switch" else "LoRA + new token rows"),
           "median_s": t["median_s"], "times_s": t["times"], "threads": t["threads_seen"],
           "ours_vs_trl": round_ratio(t, "ours", "trl"), "loss_parity": parity}
    print(f"[{name} sft {kind}] threads {t['threads_seen']}: ours {t['median_s']['ours'] * 1000:.0f} ms, TRL "
          f"{t['median_s']['trl'] * 1000:.0f} ms per step: ours/TRL {row['ours_vs_trl']['median']:.2f} "
          f"(rounds {row['ours_vs_trl']['min']:.2f}-{row['ours_vs_trl']['max']:.2f}; target <= 1.0)", flush=True)
    return row


# ---------------------------------------------------------------------------- peak memory, one process per candidate


def _rss_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def settings(name: str, overrides: str = "") -> dict:
    """The model's :data:`SETTINGS` with ``key=value,...`` overrides (e.g. ``length=24,prompts=2``)."""
    s = dict(SETTINGS[name])
    for kv in filter(None, overrides.split(",")):
        k, v = kv.split("=")
        if k not in s:
            raise SystemExit(f"--set {k}: not a setting; use one of {', '.join(s)}")
        s[k] = type(s[k])(v)
    return s


def memory_child(name: str, candidate: str, s: dict) -> dict:
    """Runs in a fresh process: builds one candidate, one warm-up step, then the peak resident
    set over the next step (high-water mark reset before it)."""
    set_threads()
    if candidate.startswith("grpo"):
        preset, task, base, tok = _task_and_base(name)
        base, tok = text_only(base, tok)
        cfg = grpo_config(s)
        records = task.splits.train
        B = s["prompts"]
        tmp = tempfile.mkdtemp(prefix="trl-mem-")
        if candidate == "grpo_trl":
            if not preset.use_lora:
                _save_for_trl(base, tok, tmp)
            side = TRLGRPO(make_trainable(name, base, tok, preset, "switch"), tok, cfg, task.format, records, tmp)
            steps = [lambda i=i: side.step(range(i * B, (i + 1) * B)) for i in range(2)]
        else:
            if candidate == "grpo_ours_blocks":
                base, tok = with_blocks(base, tok, s["swi_boost"])
            side = OurGRPO(make_trainable(name, base, tok, preset, "switch"), tok, cfg, switch_config(preset),
                           task.format)
            steps = [lambda i=i: side.step(records[i * B:(i + 1) * B]) for i in range(2)]
    else:
        kind = "switch" if "switch" in candidate else "coconut"
        preset, base, tok, loss_fn, batches = sft_setup(name, kind, s)
        model = make_trainable(name, base, tok, preset, kind)
        if candidate.endswith("_trl"):
            tmp = tempfile.mkdtemp(prefix="trl-mem-")
            side = TRLSFT(model, tok, [r for b in batches for r in sft_rows(b)], s["sft_batch"], s["lr"], tmp)
            B = s["sft_batch"]
            tb = [side.batch(range(i * B, (i + 1) * B)) for i in range(2)]
            steps = [lambda i=i: side.step(tb[i]) for i in range(2)]
        else:
            side = OurSFT(model, loss_fn, s["lr"])
            steps = [lambda i=i: side.step(batches[i]) for i in range(2)]
    torch.manual_seed(0)
    steps[0]()  # allocates the optimizer state
    before = _rss_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    for f in steps[1:]:
        f()
    peak = _rss_kb("VmHWM")
    return {"candidate": candidate, "rss_before_mb": before / 1024, "peak_mb": peak / 1024,
            "step_peak_above_resident_mb": (peak - before) / 1024, "threads": torch.get_num_threads()}


def memory_bench(name: str, candidates: list[str], overrides: str = "") -> list[dict]:
    rows = []
    for c in candidates:
        out = subprocess.run([sys.executable, "-m", "benchmarks.trl_compare", "--memory-child", c, "--models", name,
                              "--set", overrides],
                             capture_output=True, text=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("MEMORY ")]
        reason = _cannot_run(out.stderr) if out.returncode else None
        if reason:  # recorded as such, the other candidates still measured
            rows.append({"model": name, "candidate": c, "skipped": f"TRL: {reason.split(': ', 1)[-1]}"})
            print(f"[{name} memory] {c:<24} skipped: TRL cannot run this pair", flush=True)
            continue
        if out.returncode or not line:
            raise RuntimeError(f"memory child {c} on {name} failed:\n{out.stderr[-3000:]}")
        r = {"model": name, **json.loads(line[-1][len("MEMORY "):])}
        rows.append(r)
        print(f"[{name} memory] {c:<24} peak {r['peak_mb']:7.0f} MB, step peak above resident "
              f"{r['step_peak_above_resident_mb']:7.0f} MB (resident before {r['rss_before_mb']:.0f} MB)", flush=True)
    return rows


MEMORY_PAIRS = ["grpo_ours", "grpo_trl", "grpo_ours_blocks", "sft_switch_ours", "sft_switch_trl",
                "sft_coconut_ours", "sft_coconut_trl"]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny,smollm2-135m")
    ap.add_argument("--parts", default="grpo,sft,memory")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--set", default="", help="override settings of every model, e.g. length=24,prompts=2")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    require_trl()
    if args.memory_child:
        s = settings(args.models, args.set)
        print("MEMORY " + json.dumps(memory_child(args.models, args.memory_child, s)), flush=True)
        return None
    threads = set_threads()
    import trl
    import transformers

    print(f"threads: {threads} (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}); trl {trl.__version__}, "
          f"transformers {transformers.__version__}, torch {torch.__version__}", flush=True)
    t0 = time.perf_counter()
    parts = args.parts.split(",")
    path = Path(__file__).resolve().parent / "results" / f"{RESULT}.json"
    out = {"grpo": [], "sft": [], "memory": []}

    def write() -> None:
        """Saves what is measured so far (a later crash loses nothing), keeping the other
        models' and parts' rows of the file as it is now (another run may have written it)."""
        old = json.loads(path.read_text()) if path.exists() else {}
        merged = {}
        for part, rows in out.items():
            done = {r["model"] for r in rows}
            merged[part] = [r for r in old.get(part, []) if r["model"] not in done] + rows
        save(RESULT, {**merged, "versions": {"trl": trl.__version__, "transformers": transformers.__version__},
                      "default_settings": SETTINGS, "loss_rtol": LOSS_RTOL, "loss_atol": LOSS_ATOL,
                      "targets": {"ours_vs_trl": 1.0}, "seconds": time.perf_counter() - t0})

    for name in args.models.split(","):
        s = settings(name, args.set)
        # the memory children first: after the timed pairs this process holds several models and trainers
        # (on SmolLM2 about 15 GB), and a child beside it ran the machine out of memory
        if "memory" in parts:
            out["memory"] += [{**r, "settings": s} for r in memory_bench(name, MEMORY_PAIRS, args.set)]
            write()
        if "grpo" in parts:
            out["grpo"].append({**grpo_bench(name, args.repeats, s), "settings": s})
            write()
        if "sft" in parts:
            for kind in ("switch", "coconut"):
                try:
                    out["sft"].append({**sft_bench(name, kind, args.repeats, s), "settings": s})
                except AttributeError as e:
                    if not _cannot_run(str(e)):  # TRL's SFTTrainer always scores through its fused LM head
                        raise
                    print(f"[{name} sft {kind}] TRL cannot run this pair: {e}", flush=True)
                    out["sft"].append({"model": name, "phase": SFT_PHASES[kind], "skipped": f"TRL: {e}"})
                write()
    return out


if __name__ == "__main__":
    main()
