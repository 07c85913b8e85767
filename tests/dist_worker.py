"""A few training steps of the real SmolLM2-135M with LoRA, run as one process or under
torchrun, for the distributed tests and benchmarks.

    python tests/dist_worker.py MODE OUT.json [--steps 5] [--batch 4]
    torchrun --nproc_per_node 2 tests/dist_worker.py MODE OUT.json ...
    ACCELERATE_USE_FSDP=true FSDP_VERSION=2 torchrun --nproc_per_node 2 tests/dist_worker.py MODE OUT.json ...

MODE ``coconut``: a Coconut curriculum stage (stage 2 of the plain format, c=1: two
thoughts replace the first two steps of the embedded chain task), LoRA (the preset's
r=16 on every projection). MODE ``grpo``: Switch-GRPO steps from SWITCH's trainable
model (LoRA plus the trained embedding and head), G=2, the reference scored with the
adapter disabled (``--reference copy``: a frozen copy of the model, for the memory
benchmark); the ``<swi>`` row is set to the model's likeliest first token's, so
rollouts do enter latent blocks. The main process writes OUT.json: the loss of every
step, the time of every step, how training was run, and every process's parameter bytes
and peak resident memory.

Sampled rollouts cannot be compared across runs for more than a step or two: after an
update the weights of 2 processes and of 1 differ at float rounding, and a sampled token
flips as soon as one uniform draw lands within that rounding of a boundary of the
cumulative distribution (measured: FSDP2 matched 4 steps to 3e-9 and then a completion
changed). So ``--record FILE`` (one process) saves every step's rollouts, and
``--replay FILE`` (several) still generates its own rollouts every step, records which
of them are token for token the recorded ones, and then scores and trains on the
recorded rows: the losses compare the distributed scoring, reduction and update over
all the steps, and the first step's comparison checks the sharded generation itself.
"""

import argparse
import copy
import json
import resource
import sys
import time

import torch

from latentlib import distributed
from latentlib.batching import collate, encode_record, prompt_batch
from latentlib.injection import make_injector
from latentlib.methods import switch as sw
from latentlib.methods.switch import grpo as grpo_module
from latentlib.methods.coconut import CoconutConfig, make_loss, stage_examples
from latentlib.presets import get_preset, load_model
from latentlib.tasks import TaskConfig, load_task
from latentlib.tokens import add_special_tokens, token_ids
from latentlib.training.lora import apply_lora
from latentlib.training.loop import TrainConfig, train


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["coconut", "grpo"])
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4, help="global batch (coconut: examples; grpo: completions)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--checkpoint-dir", default=None)
    ap.add_argument("--reference", choices=["adapter-disabled", "copy"], default="adapter-disabled",
                    help="grpo: the reference model (the default, or a copy of the model as before)")
    ap.add_argument("--record", default=None, help="grpo, one process: save every step's rollouts to this file")
    ap.add_argument("--replay", default=None, help="grpo: train on the rollouts --record saved (see above)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    distributed.init()
    if args.record and distributed.world() > 1:
        raise SystemExit("--record is for one process (the run the others replay)")
    preset = get_preset("smollm2-135m")
    task = load_task(TaskConfig(name="chain", n_train=64, n_test=8, seed=0), preset.step_separator)
    torch.manual_seed(0)
    model, tok = load_model(preset.name)
    add_special_tokens(model, tok)
    times: list[float] = []
    last = [time.perf_counter()]

    def on_log(row):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    t0 = time.perf_counter()
    if args.mode == "coconut":
        model = apply_lora(model, r=preset.lora_r, alpha=preset.lora_alpha, targets=preset.lora_targets)
        cfg = CoconutConfig(format="plain", c_thought=1, max_latent_stage=2)
        ids = token_ids(tok)
        encoded = [encode_record(tok, r, task.format) for r in task.splits.train]
        examples = stage_examples(encoded, 2, cfg, ids, seed=0)
        injector = make_injector(cfg.injection, model)
        tc = TrainConfig(steps=args.steps, batch_size=args.batch, lr=3e-4, warmup_steps=0, log_every=1, seed=0)
        res = train(model, examples, lambda b: collate(b, tok.pad_token_id, align="first_latent"),
                    make_loss(cfg, injector), tc, checkpoint_dir=args.checkpoint_dir, progress=False, on_log=on_log)
        history = res.history
    else:
        model = sw.make_trainable(model, tok, preset)
        swi = sw.switch_ids(tok).swi
        with torch.no_grad():  # make <swi> a little likelier than the likeliest first token, so that blocks happen
            q, m = prompt_batch([encode_record(tok, task.splits.train[0], task.format).question], tok.pad_token_id)
            first = int(model(input_ids=q, attention_mask=m).logits[0, -1].argmax())
            head = model.get_output_embeddings().weight
            # likelier than the likeliest first token, not tied with it: with two rows of the head
            # equal, the sampler's choice between them would turn on one-ulp differences between
            # batchings (2 processes generate their rows in other batches than 1 process)
            head[swi] = 1.05 * head[first]
        switch_cfg = sw.SwitchConfig(k_min=1, k_max=2)
        G = 2
        grpo = sw.SwitchGRPOConfig(num_generations=G, generation_batch_size=args.batch, max_steps=args.steps,
                                   learning_rate=1e-4, beta=1e-3, temperature=1.0, max_completion_length=12,
                                   logging_steps=1, seed=0)
        ref = copy.deepcopy(model) if args.reference == "copy" else None
        same_rollouts = _record_or_replay(args.record, args.replay)
        run = sw.train_switch_grpo(model, tok, task.splits.train, grpo, switch_cfg, task.format, progress=False,
                                   on_log=on_log, checkpoint_dir=args.checkpoint_dir, ref_model=ref)
        history = run.result.history
    seconds = time.perf_counter() - t0
    root = distributed.root_of(model)
    mine = {"rank": distributed.rank(), "parameter_bytes": distributed.local_bytes(root),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "trainable_bytes": sum(p.numel() * p.element_size() for p in root.parameters() if p.requires_grad)}
    # a collective: every process takes part
    same = _all_ranks(same_rollouts) if args.mode == "grpo" and args.replay else None
    everyone = [None] * distributed.world()
    if distributed.world() > 1:
        torch.distributed.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    if distributed.is_main():
        out = {"mode": args.mode, "processes": distributed.world(),
               "parallel": "fsdp" if distributed.is_sharded(model) else ("ddp" if distributed.world() > 1 else "single"),
               "threads": torch.get_num_threads(), "steps": args.steps, "global_batch": args.batch,
               "losses": [row["loss"] for row in history], "step_seconds": times, "seconds": seconds,
               "latent_steps": [row.get("latent_steps") for row in history], "ranks": everyone}
        if same is not None:
            out["same_rollouts"] = same  # per step: every process generated the recorded rows
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
        print(json.dumps({k: out[k] for k in ("mode", "processes", "parallel", "losses")}), flush=True)


ROLLOUT_KEYS = ("input_ids", "attention_mask", "latent_mask", "completion_mask", "old_logps", "advantages")


def _tokens(batch, row):
    """The tokens of one row of a rollout batch without its padding (batches pad to their widest row)."""
    return batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()


def _record_or_replay(record: str | None, replay: str | None) -> list[bool]:
    """Wraps ``grpo.rollout`` to save (``record``) or substitute (``replay``) every step's
    rows, matched by their per-completion seeds (unique, and the same for any number of
    processes). Returns the list that collects, per step, whether this process's own
    rollouts were the recorded ones token for token."""
    from safetensors.torch import load_file, save_file

    real, steps, same = grpo_module.rollout, [], []
    saved = load_file(replay) if replay else None

    def wrapped(*args, seeds, **kwargs):
        batch = real(*args, seeds=seeds, **kwargs)
        step = len(steps)
        steps.append({**{k: batch[k].detach().cpu().contiguous() for k in ROLLOUT_KEYS},
                      "seeds": torch.tensor(seeds)})
        if record:
            save_file({f"{i}.{k}": v for i, rec in enumerate(steps) for k, v in rec.items()}, record)
        if saved is None:
            return batch
        rec = {k: saved[f"{step}.{k}"] for k in (*ROLLOUT_KEYS, "seeds")}
        where = {int(s): i for i, s in enumerate(rec["seeds"])}
        rows = torch.tensor([where[s] for s in seeds])
        mine = {k: rec[k][rows].to(batch[k].device) for k in ROLLOUT_KEYS}
        same.append(all(_tokens(batch, i) == _tokens(mine, i) for i in range(len(seeds))))
        return {**batch, **mine}

    grpo_module.rollout = wrapped
    return same


def _all_ranks(mine: list[bool]) -> list[bool]:
    """Per step: True where every process's rollouts were the recorded ones."""
    if distributed.world() == 1:
        return mine
    t = torch.tensor(mine, dtype=torch.int64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return [bool(v) for v in t]


if __name__ == "__main__":
    sys.exit(main())
