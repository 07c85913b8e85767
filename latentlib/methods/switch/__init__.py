"""SWITCH (Yang et al. 2026, arXiv 2606.13106; the SWITCH card): switchable latent blocks.

The model writes ordinary text, emits ``<swi>`` to enter latent mode, thinks there by
hidden-state recurrence (each ``<latent>`` slot's input is the previous position's last
hidden state, as in Coconut), and emits ``</swi>`` to leave. The boundary tokens are
ordinary vocabulary items, so the model decides by itself where to think silently.

Three training phases, then inference, each in one module of this package:

1. **SFT** (:mod:`.spans`, :func:`.train.train_phase1`): the high-entropy steps of each CoT
   are wrapped in ``<swi> ... </swi>`` (text still inside) and the model is fine-tuned on
   that format, learning where to emit ``<swi>``.
2. **Curriculum** (:mod:`.schedule`, :func:`.train.train_phase2`): the text inside the
   blocks is replaced by ``<latent>`` slots progressively, in every block at once.
3. **Switch-GRPO** (:mod:`.grpo`): on-policy RL with real hidden-state injection in the
   rollouts.
4. **Inference** (:mod:`.inference`): the engine's :class:`~latentlib.policies.SwitchPolicy`
   (enter on ``<swi>``, at least K_min and at most K_max latent steps, leave on
   ``</swi>``), one batched generation whose sequences are in different modes in the same
   forward. Saved models follow the card's adapter layout (:mod:`.io`).

Definitions and where this departs from the paper/card:

- *Step entropy.* The entropy of the next-token distribution at each token of a step
  (the distribution the token is drawn from), aggregated over the step by ``max`` or
  ``mean``. Sources: the teacher rollouts of :mod:`latentlib.teacher` (correct rollouts
  whose steps are the gold steps, averaged over rollouts), else the base model on the
  gold CoT by teacher forcing (:func:`.spans.gold_step_entropies`).
- *Span rule* (:class:`.config.SpanRule`). A step is wrapped when its entropy exceeds a
  threshold: a fixed one, or the ``1 - top_q`` quantile of all candidate steps (so about
  a ``top_q`` fraction is wrapped). Adjacent wrapped steps merge into one block (or,
  with ``isolate``, the second stays text). The last step is not wrapped by default (it
  carries the answer, which stays checkable).
  ``pool_by="op"`` (the embedded chain task) replaces each step's entropy by the mean
  entropy of its operation over the training set. Why: a from-scratch model on that task
  is nearly certain everywhere, so per-problem entropies are dominated by noise and the
  model could not learn where to put ``<swi>``; pooled per operation, the rule wraps the
  steps of the operations the base model is least sure of, which is a learnable,
  deterministic function of the question.
  ``isolate`` (the tiny default) keeps every block to one step between written values:
  the 4-layer model does one step in latent mode well but not two in a row.
- *Curriculum units are steps.* Stage ``s`` replaces, in every block, its first ``s``
  steps by ``c * s`` latent slots (on the tiny task a step is one token, so units are
  also tokens). A block whose steps are all replaced gets at least K_min slots (the
  inference policy forces K_min steps, so training shows the same count) and at most
  K_max. The card's per-sample cap (48) is applied block by block, left to right: a
  block that would exceed it keeps its text.
- *Stages are optimizer steps* (:mod:`latentlib.training.curriculum`), not epochs, and
  the last stage always makes every block entirely latent (the inference format).
- *Positions.* ``SwitchConfig.positions="block"`` (the tiny default; the paper's is
  "continue") keeps every written token at its CoT position: ``<swi>`` and the slots are
  position-neutral (each shares the position of the token after it: the engine's
  ``neutral_token_ids`` and ``latent_positions="skip"``), and ``</swi>`` is neutral after
  text (phase 1) but takes one position after slots, the position of the step the block
  replaced. The from-scratch tiny model locates the operations by position: markers that
  shift the text cost it hundreds of steps to relearn, and one-step latent blocks that
  each shift it by one stall phase 2.

The measurements behind these choices are in ``docs/findings.md``.
"""

from latentlib.methods.switch.config import (SWITCH_TOKENS, SpanRule, SwitchConfig, SwitchIds, default_positions,
                                             switch_ids)
from latentlib.methods.switch.grpo import (REWARD_FUNCS, Completions, GRPORun, SwitchGRPOConfig, completion_logps,
                                           correctness_reward, forced_exits, format_reward, group_advantages,
                                           grpo_loss, latent_usage_reward, rollout, train_switch_grpo)
from latentlib.methods.switch.inference import (RecordingPolicy, evaluate_switch, latent_blocks, summarize_switch,
                                                switch_eval_spec, switch_policy)
from latentlib.methods.switch.io import (AdapterMismatchError, load_switch_adapter, load_switch_config,
                                         load_switch_model, save_switch_model)
from latentlib.methods.switch.schedule import (BlockPlan, mark_stay_decisions, parallel_schedule, phase2_examples,
                                               render_switch_text, schedule_stage, switch_segments)
from latentlib.methods.switch.spans import (Span, chain_step_keys, entropy_threshold, gold_step_entropies,
                                            label_spans, pool_entropies, step_entropy, teacher_step_entropies,
                                            wrap_high_entropy_spans)
from latentlib.methods.switch.train import make_trainable, switch_loss, train_phase1, train_phase2

__all__ = ["SWITCH_TOKENS", "SpanRule", "SwitchConfig", "SwitchIds", "default_positions", "switch_ids",
           "REWARD_FUNCS", "Completions", "GRPORun", "SwitchGRPOConfig", "completion_logps", "correctness_reward",
           "forced_exits", "format_reward", "group_advantages", "grpo_loss", "latent_usage_reward", "rollout",
           "train_switch_grpo", "RecordingPolicy", "evaluate_switch", "latent_blocks", "summarize_switch",
           "switch_eval_spec", "switch_policy", "AdapterMismatchError", "load_switch_adapter", "load_switch_config",
           "load_switch_model", "save_switch_model", "BlockPlan", "mark_stay_decisions", "parallel_schedule",
           "phase2_examples", "schedule_stage", "switch_segments", "Span", "chain_step_keys", "entropy_threshold",
           "gold_step_entropies", "label_spans", "pool_entropies", "render_switch_text", "step_entropy",
           "teacher_step_entropies", "wrap_high_entropy_spans", "make_trainable", "switch_loss", "train_phase1",
           "train_phase2"]
