"""Coconut training cost against a CoT step on the same batch.

4. Step time (forward + backward) at the last curriculum stage (all K steps replaced by
   K*c thoughts) against a CoT step on the same problems: target <= 1.3x. Peak memory
   against CoT: target <= 1.5x, with truncated backprop through time (``tbptt``) and
   activation checkpointing (``checkpoint``) as options that lower it.

Time ratios are measured side by side in one process. Memory is what autograd keeps for
the backward (distinct storages of the saved tensors): on a CPU there is no allocator
peak counter, and the process's peak resident set is dominated by the libraries.

    python -m benchmarks.training [--batch 128] [--c 1]
"""

from __future__ import annotations

import argparse
import torch

from benchmarks.common import interleaved, save, set_threads
from latentlib.batching import collate, encode_record
from latentlib.presets import Preset, build_tiny_model, build_tiny_tokenizer
from latentlib.recurrence import latent_forward
from latentlib.tasks import ChainConfig, chain_vocabulary, make_chain_splits
from latentlib.tokens import add_special_tokens
from latentlib.training.base import cot_segments, token_loss


def setup(batch: int, c: int):
    cfg = ChainConfig(n_train=max(batch, 64), n_valid=0, n_test=0)
    tok = build_tiny_tokenizer(chain_vocabulary(cfg))
    model = build_tiny_model(len(tok), Preset("tiny", "scratch"))
    ids = add_special_tokens(model, tok)
    model.train()
    encoded = [encode_record(tok, r, " ") for r in make_chain_splits(cfg).train[:batch]]
    bot, eot = ids["<bot>"], ids["<eot>"]
    cot = collate([cot_segments(e, (bot, eot)) for e in encoded], tok.pad_token_id)
    last = collate([[("prompt", e.question), ("prompt", (bot,)), ("latent", (ids["<latent>"],) * (len(e.steps) * c)),
                     ("prompt", (eot,)), ("target", e.answer)] for e in encoded], tok.pad_token_id)
    return model, cot, last


def step_fn(model, batch, **kw):
    def step():
        model.zero_grad(set_to_none=True)
        out = latent_forward(model, batch["input_ids"], batch["attention_mask"], batch["latent_mask"], **kw)
        token_loss(out.logits, batch["labels"]).backward()
    return step


VARIANTS = {
    "cot": ("cot", {}),
    "coconut": ("last", {}),
    "coconut_tbptt1": ("last", {"tbptt": 1}),
    "coconut_checkpoint": ("last", {"checkpoint": True}),
    "coconut_tbptt1_checkpoint": ("last", {"tbptt": 1, "checkpoint": True}),
}


def saved_bytes(model, batch, **kw) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of one step: the
    activation memory that tbptt and checkpointing act on (weights and optimizer state are
    the same for every variant). With non-reentrant checkpointing the recomputed region
    saves under its own hooks, so only what is really kept is counted."""
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = latent_forward(model, batch["input_ids"], batch["attention_mask"], batch["latent_mask"], **kw)
        loss = token_loss(out.logits, batch["labels"])
    loss.backward()
    return sum(seen.values())


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--c", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--real", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure SmolLM2-135M (batch 8, 48 tokens, 6 thoughts)")
    args = ap.parse_args(argv)
    threads = set_threads()
    model, cot, last = setup(args.batch, args.c)
    fns = {v: step_fn(model, cot if w == "cot" else last, **kw) for v, (w, kw) in VARIANTS.items()}
    t = interleaved(fns, repeats=args.repeats)
    mem = {v: saved_bytes(model, cot if w == "cot" else last, **kw) for v, (w, kw) in VARIANTS.items()}
    base_t, base_m = t["cot"]["min_s"], mem["cot"]
    rows = [{"variant": v, "step_ms": t[v]["min_s"] * 1000, "time_vs_cot": t[v]["min_s"] / base_t,
             "saved_mb": mem[v] / 2**20, "memory_vs_cot": mem[v] / base_m} for v in VARIANTS]
    print(f"threads: {threads}; batch {args.batch}; thoughts at the last stage: 6 x c={args.c}")
    for r in rows:
        print(f"  {r['variant']:<26} {r['step_ms']:7.1f} ms  {r['time_vs_cot']:.2f}x CoT (target <= 1.3)   "
              f"saved for backward {r['saved_mb']:6.1f} MB  {r['memory_vs_cot']:.2f}x CoT (target <= 1.5)", flush=True)
    real = real_model_cost(args.repeats) if args.real else []
    save("coconut_training_cost", {"batch": args.batch, "c": args.c, "rows": rows, "real_model": real,
                                   "targets": {"time_vs_cot": 1.3, "memory_vs_cot": 1.5}})


def real_model_cost(repeats: int, batch: int = 8, length: int = 48, thoughts: int = 6) -> list[dict]:
    """The same ratio on SmolLM2-135M: ``thoughts`` consecutive thought columns in the
    middle of a ``length``-token sequence against the same sequence written out."""
    from latentlib.presets import load_model

    model, tok = load_model("smollm2-135m")
    add_special_tokens(model, tok)
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 10000, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    latent = torch.zeros(batch, length, dtype=torch.bool)
    latent[:, length // 2 - thoughts // 2: length // 2 - thoughts // 2 + thoughts] = True
    labels = ids.masked_fill(latent, -100)
    batches = {"cot": {"input_ids": ids, "attention_mask": mask, "latent_mask": torch.zeros_like(latent),
                       "labels": labels},
               "coconut": {"input_ids": ids, "attention_mask": mask, "latent_mask": latent, "labels": labels}}
    t = interleaved({k: step_fn(model, b) for k, b in batches.items()}, repeats=max(2, repeats // 2))
    mem = {k: saved_bytes(model, b) for k, b in batches.items()}
    rows = [{"variant": k, "batch": batch, "length": length, "thoughts": thoughts if k == "coconut" else 0,
             "step_ms": t[k]["min_s"] * 1000, "time_vs_cot": t[k]["min_s"] / t["cot"]["min_s"],
             "saved_mb": mem[k] / 2**20, "memory_vs_cot": mem[k] / mem["cot"]} for k in batches]
    for r in rows:
        print(f"  smollm2-135m {r['variant']:<8} {r['step_ms']:7.0f} ms  {r['time_vs_cot']:.2f}x CoT   "
              f"saved for backward {r['saved_mb']:6.1f} MB  {r['memory_vs_cot']:.2f}x CoT", flush=True)
    return rows


if __name__ == "__main__":
    main()
