"""5. Where a Switch-GRPO step spends its time: rollouts, the reference model's
log-probabilities, and the policy's forward + backward; and what batching the rollouts
buys: the G x B completions of a step in one engine call against one call per prompt
group (G sequences), the loop a straightforward port would write.

The model is the run's SWITCH phase-2 model when ``runs/<run>/curriculum/switch_phase2``
exists (so rollouts really enter and leave latent blocks), otherwise the untrained tiny
model with the three SWITCH tokens (the output says which).

    python -m benchmarks.grpo [--run tiny] [--groups 8x16,5x16]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from benchmarks.common import interleaved, save, set_threads
from latentlib import artifacts
from latentlib.methods import switch as sw
from latentlib.methods.switch import grpo
from latentlib.presets import get_preset, load_model
from latentlib.tasks import TaskConfig, load_task
from latentlib.tokens import add_special_tokens


def load(run: str):
    preset = get_preset("tiny")
    d = artifacts.artifact_dir(run, "curriculum", "switch_phase2")
    if artifacts.is_complete(d):
        model, tok = sw.load_switch_model(d)
        return model, tok, sw.load_switch_config(d), f"{d} (trained SWITCH phase 2)", preset
    words = load_task(TaskConfig(n_train=10, n_test=10), preset.step_separator).words
    model, tok = load_model("tiny", words=list(words), seed=0)
    add_special_tokens(model, tok)
    return model, tok, sw.SwitchConfig(k_min=2, positions="block"), "untrained tiny model (no run found)", preset


def step_breakdown(model, tok, switch_cfg, records, G: int, B: int, repeats: int, fmt) -> dict:
    cfg = grpo.SwitchGRPOConfig(num_generations=G, generation_batch_size=G * B, max_completion_length=40,
                                temperature=1.0, beta=1e-3)
    ids = sw.switch_ids(tok)
    injector = None
    ref = copy.deepcopy(model).eval()
    chunk = records[:B]
    seeds = list(range(G * B))
    batch = grpo.rollout(model, tok, chunk, cfg, switch_cfg, fmt, seeds=seeds)

    def do_rollout():
        grpo.rollout(model, tok, chunk, cfg, switch_cfg, fmt, seeds=seeds)

    def do_rollout_looped():  # one engine call per prompt group
        for i, r in enumerate(chunk):
            grpo.rollout(model, tok, [r], cfg, switch_cfg, fmt, seeds=seeds[i * G:(i + 1) * G])

    def do_ref():
        with torch.no_grad():
            grpo.completion_logps(ref, batch, switch_cfg, ids, temperature=cfg.temperature, injector=injector)

    def do_loss():
        model.train()
        model.zero_grad(set_to_none=True)
        logps = grpo.completion_logps(model, batch, switch_cfg, ids, temperature=cfg.temperature, injector=injector)
        loss, _ = grpo.grpo_loss(logps, batch["old_logps"], batch["advantages"], batch["completion_mask"],
                                 epsilon=cfg.epsilon, beta=cfg.beta, ref_logps=batch["old_logps"].detach())
        loss.backward()
        model.eval()

    t = interleaved({"rollout": do_rollout, "rollout_looped": do_rollout_looped, "reference": do_ref,
                     "policy_loss": do_loss}, repeats=repeats)
    step = t["rollout"]["min_s"] + t["reference"]["min_s"] + t["policy_loss"]["min_s"]
    row = {"G": G, "prompts": B, "sequences": G * B, "rollout_s": t["rollout"]["min_s"],
           "rollout_looped_s": t["rollout_looped"]["min_s"], "reference_s": t["reference"]["min_s"],
           "policy_loss_s": t["policy_loss"]["min_s"], "step_s": step,
           "rollout_fraction": t["rollout"]["min_s"] / step,
           "batched_speedup": t["rollout_looped"]["min_s"] / t["rollout"]["min_s"],
           "latent_steps_per_completion": batch["stats"]["latent_steps"],
           "completion_length": batch["stats"]["completion_length"]}
    print(f"[grpo] G={G} x {B} prompts: rollout {row['rollout_s'] * 1000:.0f} ms "
          f"(looped per group {row['rollout_looped_s'] * 1000:.0f} ms, x{row['batched_speedup']:.1f}), "
          f"reference {row['reference_s'] * 1000:.0f} ms, policy loss {row['policy_loss_s'] * 1000:.0f} ms; "
          f"rollout {row['rollout_fraction']:.0%} of the step", flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="tiny")
    ap.add_argument("--groups", default="8x16,5x16")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    threads = set_threads()
    model, tok, switch_cfg, source, preset = load(args.run)
    print(f"threads: {threads}; model: {source}")
    task = load_task(TaskConfig(n_train=2000, n_test=500), preset.step_separator)
    t0 = time.perf_counter()
    rows = [step_breakdown(model, tok, switch_cfg, task.splits.test, *map(int, g.split("x")), args.repeats,
                           task.format) for g in args.groups.split(",")]
    save("grpo_step", {"model": source, "rows": rows, "seconds": time.perf_counter() - t0})
    return rows


if __name__ == "__main__":
    main()
