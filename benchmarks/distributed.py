"""6. Several processes and memory at scale, on the real SmolLM2-135M with LoRA:

- **2 processes against 1**: the time of a training step (a Coconut curriculum stage, the
  global batch the same) for one process with 1 and with 2 threads, and two processes of
  1 thread under DDP and under FSDP2; scaling efficiency = (one process's step time) /
  (2 x the two processes' step time), against one process with 1 thread (the same
  threads per process) and with 2 (the same cores). The configurations are run one after
  another, ``--rounds`` times interleaved; each keeps its fastest round. On 2 shared CPU
  cores expect little: the two processes share the cores one process with 2 threads
  would use, and every step adds collectives.
- **checkpoint bytes**: a training checkpoint of a LoRA run (what is trained, plus its
  AdamW moments) against the full ``state_dict()`` checkpoint written before, for
  Coconut-style LoRA and SWITCH's LoRA with the trained embedding and head; and the
  SWITCH adapter directory, only what was trained against PEFT's default (which adds the
  frozen base embeddings once the vocabulary has grown).
- **GRPO peak memory**: peak resident memory of a process running Switch-GRPO steps with
  the reference scored by disabling the adapter, against a frozen copy of the model (one
  process each, so each peak is its own).

The runs go through ``tests/dist_worker.py`` (the same code the distributed tests run).

    python -m benchmarks.distributed [--steps 4] [--rounds 2] [--skip-scaling]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from benchmarks.common import ROOT, save, set_threads

WORKER = ROOT / "tests" / "dist_worker.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _env(threads: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE", **extra}


def _worker(mode: str, processes: int, threads: int, steps: int, batch: int, *, fsdp: bool = False,
            extra: tuple = ()) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out.json"
        launcher = [sys.executable] if processes == 1 else [str(TORCHRUN), "--nproc_per_node", str(processes)]
        cmd = [*launcher, str(WORKER), mode, str(out), "--steps", str(steps), "--batch", str(batch),
               "--threads", str(threads), *extra]
        env = _env(threads, **({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"} if fsdp else {}))
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
        if run.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{run.stderr[-3000:]}")
        return json.loads(out.read_text())


def _step_s(result: dict) -> float:
    times = result["step_seconds"][1:] or result["step_seconds"]  # the first step warms up
    return sorted(times)[len(times) // 2]


def scaling(steps: int, rounds: int, batch: int) -> dict:
    configs = {"1 process x 1 thread": (1, 1, False), "1 process x 2 threads": (1, 2, False),
               "2 processes x 1 thread, DDP": (2, 1, False), "2 processes x 1 thread, FSDP2": (2, 1, True)}
    best: dict[str, dict] = {}
    for r in range(rounds):
        for name, (procs, threads, fsdp) in configs.items():
            res = _worker("coconut", procs, threads, steps, batch, fsdp=fsdp)
            s = _step_s(res)
            print(f"[distributed] round {r + 1}: {name}: {s:.2f} s per step (losses {res['losses']})", flush=True)
            if name not in best or s < best[name]["step_s"]:
                best[name] = {"step_s": s, "losses": res["losses"], "parallel": res["parallel"],
                              "parameter_bytes_per_process": [x["parameter_bytes"] for x in res["ranks"]],
                              "threads_per_process": threads, "processes": procs}
    one1, one2 = best["1 process x 1 thread"]["step_s"], best["1 process x 2 threads"]["step_s"]
    for name, row in best.items():
        if row["processes"] == 2:
            row["speedup_vs_1x1"] = one1 / row["step_s"]
            row["efficiency_vs_1x1"] = one1 / (2 * row["step_s"])
            row["speedup_vs_1x2"] = one2 / row["step_s"]
    return {"task": f"Coconut stage 2 (c=1), smollm2-135m LoRA r=16, global batch {batch}", "steps": steps,
            "rounds": rounds, "configs": best}


def checkpoint_bytes() -> dict:
    from latentlib import artifacts
    from latentlib.batching import collate, encode_record
    from latentlib.methods import switch as sw
    from latentlib.methods.coconut import CoconutConfig, make_loss, stage_examples
    from latentlib.presets import get_preset, load_model
    from latentlib.tasks import TaskConfig, load_task
    from latentlib.tokens import add_special_tokens, token_ids
    from latentlib.training.lora import apply_lora
    from latentlib.training.loop import TrainConfig, train

    preset = get_preset("smollm2-135m")
    task = load_task(TaskConfig(name="chain", n_train=16, n_test=4), preset.step_separator)

    def size(path: Path) -> int:
        return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())

    rows = []
    for kind in ("Coconut LoRA (r=16, every projection)", "SWITCH LoRA + trained embedding and head"):
        model, tok = load_model(preset.name)
        add_special_tokens(model, tok)
        if kind.startswith("Coconut"):
            model = apply_lora(model, r=preset.lora_r, alpha=preset.lora_alpha, targets=preset.lora_targets)
        else:
            model = sw.make_trainable(model, tok, preset)
        cfg = CoconutConfig(format="plain", c_thought=1, max_latent_stage=1)
        examples = stage_examples([encode_record(tok, r, task.format) for r in task.splits.train], 1, cfg,
                                  token_ids(tok))
        with tempfile.TemporaryDirectory() as d:
            train(model, examples, lambda b: collate(b, tok.pad_token_id, align="first_latent"),
                  make_loss(cfg, None), TrainConfig(steps=1, batch_size=2, lr=1e-4, warmup_steps=0),
                  checkpoint_dir=d, progress=False)
            ckpt = Path(d) / "checkpoint"
            lora_bytes, weights = size(ckpt), (ckpt / "model.safetensors").stat().st_size
            artifacts.save_state_dict(model.state_dict(), Path(d) / "full.safetensors")  # what was written before
            full_bytes = lora_bytes - weights + (Path(d) / "full.safetensors").stat().st_size
            row = {"run": kind, "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                   "checkpoint_bytes": lora_bytes, "full_checkpoint_bytes": full_bytes,
                   "checkpoint_vs_full": lora_bytes / full_bytes}
            if kind.startswith("SWITCH"):
                sw.save_switch_model(model, tok, Path(d) / "adapter", {"seed": 0})
                with warnings.catch_warnings():  # PEFT's default on purpose: its note that it adds the embeddings
                    warnings.filterwarnings("ignore", message="Setting `save_embedding_layers` to `True`")
                    model.save_pretrained(Path(d) / "peft_default")  # PEFT's default (what was written before)
                row["adapter_bytes"] = (Path(d) / "adapter" / "adapter_model.safetensors").stat().st_size
                row["peft_default_adapter_bytes"] = (Path(d) / "peft_default" / "adapter_model.safetensors").stat().st_size
        print(f"[distributed] {kind}: checkpoint {row['checkpoint_bytes'] / 2**20:.1f} MB against "
              f"{row['full_checkpoint_bytes'] / 2**20:.1f} MB full ({row['checkpoint_vs_full']:.3f}x)"
              + (f"; adapter {row['adapter_bytes'] / 2**20:.1f} MB against PEFT's default "
                 f"{row['peft_default_adapter_bytes'] / 2**20:.1f} MB" if "adapter_bytes" in row else ""), flush=True)
        rows.append(row)
        del model
    return {"rows": rows}


def grpo_memory(steps: int) -> dict:
    out = {}
    for variant in ("adapter-disabled", "copy"):
        res = _worker("grpo", 1, 1, steps, 4, extra=("--reference", variant))
        out[variant] = {"peak_rss_bytes": res["ranks"][0]["peak_rss_bytes"], "losses": res["losses"],
                        "step_s": _step_s(res)}
        print(f"[distributed] GRPO, reference {variant}: peak RSS {out[variant]['peak_rss_bytes'] / 2**20:.0f} MB",
              flush=True)
    out["copy_minus_adapter_disabled_bytes"] = out["copy"]["peak_rss_bytes"] - out["adapter-disabled"]["peak_rss_bytes"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--skip-scaling", action="store_true")
    args = ap.parse_args(argv)
    threads = set_threads()
    print(f"[distributed] threads: this process {threads}; the step-time runs set their own (below)", flush=True)
    t0 = time.perf_counter()
    result = {"checkpoint": checkpoint_bytes(), "grpo_memory": grpo_memory(3)}
    if not args.skip_scaling:
        result["scaling"] = scaling(args.steps, args.rounds, args.batch)
    result["seconds"] = time.perf_counter() - t0
    result["torch_threads"] = torch.get_num_threads()
    save("distributed", result)
    return result


if __name__ == "__main__":
    main()
