"""The engine's training forward under DDP and FSDP against one process, as gradients.

    torchrun --nproc_per_node 2 tests/grad_worker.py {ddp,fsdp} OUT.json

A Qwen3-architecture model large enough for deferred weight gradients (width 256), a
batch of 4 with two aligned thoughts and one thought in half of the rows. Every process
computes the one-process reference on the whole batch; then the model is prepared by
:func:`latentlib.training.parallel.setup` as the training loop does, each process runs
its half, and the gathered gradients are compared with the reference, for plain chunks
and for checkpointed chunks. Writes the largest differences and which engine features
were active.
"""

import json
import os
import sys

import torch

from latentlib import deferred_grads, distributed
from latentlib.deferred_grads import DeferredWeightGrads
from latentlib.presets import Preset, build_tiny_model
from latentlib.recurrence import latent_forward
from latentlib.training.parallel import setup

torch.set_num_threads(1)
SINKS = [0]  # deferred weight-gradient products done (one per deferred weight and backward)
_sink_backward = deferred_grads._WeightSink.backward


def _counting_backward(ctx, grad):
    SINKS[0] += bool(ctx.stash[0])
    return _sink_backward(ctx, grad)


deferred_grads._WeightSink.backward = staticmethod(_counting_backward)
PRESET = Preset("g", "scratch", hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=1024)


def loss_fn(checkpoint):
    def fn(model, batch):
        out = latent_forward(model, batch["ids"], batch["mask"], batch["latent"], checkpoint=checkpoint)
        return out.logits.float().pow(2).mean(), {}
    return fn


def main(kind: str, out: str) -> None:
    if kind == "fsdp":
        os.environ.update({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"})
    distributed.init()
    r, w = distributed.rank(), distributed.world()
    g = torch.Generator().manual_seed(0)
    B, T = 4, 12
    batch = {"ids": torch.randint(0, 60, (B, T), generator=g), "mask": torch.ones(B, T, dtype=torch.long),
             "latent": torch.zeros(B, T, dtype=torch.bool)}
    batch["mask"][0, :2] = 0  # left padding in one row
    batch["latent"][:, 5] = batch["latent"][:, 6] = True  # two aligned thoughts
    batch["latent"][::2, 9] = True  # one more in half the rows
    mine = {k: v[r::w] for k, v in batch.items()}
    result = {"kind": kind, "processes": w}
    for checkpoint in (False, True):
        ref = build_tiny_model(60, PRESET, seed=1)
        loss_fn(checkpoint)(ref, batch)[0].backward()
        model = build_tiny_model(60, PRESET, seed=1)
        deferrable = len(DeferredWeightGrads(model.get_decoder(), rows=B // w)._weights)
        SINKS[0] = 0
        par = setup({"model": model}, lambda params: torch.optim.SGD(params, lr=0.0))
        with par.scope():  # as the training loop runs a step
            loss, _ = par.forward(loss_fn(checkpoint), mine)
            par.backward(loss)
        worst, worst_name = 0.0, ""
        for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            d = (grad - q.grad).abs().max().item()
            if d > worst:
                worst, worst_name = d, name
        result[f"checkpoint={checkpoint}"] = {"max_abs_diff": worst, "where": worst_name,
                                              "parallel": par.kind, "deferrable_weights": deferrable,
                                              "deferred_products": SINKS[0],
                                              "max_abs_grad": max(q.grad.abs().max().item() for q in ref.parameters())}
    if distributed.is_main():
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
