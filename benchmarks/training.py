"""Coconut training cost against a CoT step on the same batch.

4. Step time (forward + backward) at the last curriculum stage (all K steps replaced by
   K*c thoughts) against a CoT step on the same problems: target <= 1.3x. Peak memory
   against CoT: target <= 1.5x, with truncated backprop through time (``tbptt``) and
   activation checkpointing (``checkpoint``) as options that lower it.

Time ratios are measured side by side in one process. Memory is what autograd keeps for
the backward (distinct storages of the saved tensors): on a CPU there is no allocator
peak counter, and the process's peak resident set is dominated by the libraries.

Where the extra time of a Coconut step goes, measured rather than assumed:

- **Profile** (:func:`profile_split`): torch.profiler's self CPU time of one step of
  each, split into matrix products, attention and everything else, with operator calls.
- **Across batch sizes** (``--sweep``): the same two steps at several batches, with the
  extra time per thought pass. A thought pass cannot start before the previous one has
  finished (it reads its last hidden state), so each runs its layers on ``batch`` rows;
  the CoT step runs them once on ``batch x length`` rows.
- **The matrix products at those two sizes** (:func:`gemm_rows`): one MLP projection's
  forward, input-gradient and weight-gradient products, time per row at the rows of a
  thought pass against the rows of the CoT pass. That per-row slow-down is a property of
  the BLAS on this CPU, not of the engine.

    python -m benchmarks.training [--batch 128] [--c 1] [--no-sweep] [--no-real]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from benchmarks.common import RESULTS, interleaved, paired_ratio, save, set_threads
from latentlib.batching import collate, cot_segments, encode_record
from latentlib.presets import Preset, build_tiny_model, build_tiny_tokenizer
from latentlib.recurrence import latent_forward
from latentlib.tasks import ChainConfig, Format, chain_vocabulary, make_chain_splits
from latentlib.tokens import add_special_tokens
from latentlib.training.losses import token_loss


def setup(batch: int, c: int):
    cfg = ChainConfig(n_train=max(batch, 64), n_valid=0, n_test=0)
    tok = build_tiny_tokenizer(chain_vocabulary(cfg))
    model = build_tiny_model(len(tok), Preset("tiny", "scratch"))
    ids = add_special_tokens(model, tok)
    model.train()
    encoded = [encode_record(tok, r, Format(" ")) for r in make_chain_splits(cfg).train[:batch]]
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


def deferred_stash_bytes(model, batch, defer_weight_grads: bool = True, **kw) -> int:
    """Bytes of output gradients that deferred weight gradients hold during the backward
    until each weight's one product (:mod:`latentlib.deferred_grads`). Zero when no weight
    is routed (the tiny model, or ``defer_weight_grads=False``)."""
    from latentlib.deferred_grads import DeferredWeightGrads

    B, T = batch["input_ids"].shape
    if not defer_weight_grads or not batch["latent_mask"].any() or kw.get("checkpoint"):
        return 0
    return DeferredWeightGrads(model.get_decoder(), rows=B).held_bytes(B * T)


def saved_bytes(model, batch, **kw) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of one step: the
    activation memory that tbptt and checkpointing act on (weights and optimizer state are
    the same for every variant). With non-reentrant checkpointing the recomputed region
    saves under its own hooks, so only what is really kept is counted. The output
    gradients held for deferred weight gradients are added (:func:`deferred_stash_bytes`)."""
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
    return sum(seen.values()) + deferred_stash_bytes(model, batch, **kw)


def pair_cost(model, cot, last, repeats: int) -> dict:
    """CoT step against Coconut last-stage step on one model and batch, interleaved."""
    t = interleaved({"cot": step_fn(model, cot), "coconut": step_fn(model, last)}, repeats=repeats)
    return pair_row(t, cot, last)


def pair_row(t: dict, cot: dict, last: dict) -> dict:
    """The sweep's row from :func:`~benchmarks.common.interleaved` timings with "cot" and "coconut" keys."""
    thoughts = int(last["latent_mask"].any(0).sum())
    cot_s, coc_s = t["cot"]["min_s"], t["coconut"]["min_s"]
    return {"batch": int(cot["input_ids"].shape[0]), "length": int(cot["input_ids"].shape[1]), "thoughts": thoughts,
            "cot_ms": cot_s * 1000, "coconut_ms": coc_s * 1000, "time_vs_cot": coc_s / cot_s,
            "cot_median_ms": t["cot"]["median_s"] * 1000, "coconut_median_ms": t["coconut"]["median_s"] * 1000,
            "paired_time_vs_cot": paired_ratio(t, "coconut", "cot"),
            "median_time_vs_cot": t["coconut"]["median_s"] / t["cot"]["median_s"],
            "extra_ms_per_thought_pass": (coc_s - cot_s) * 1000 / max(thoughts, 1)}


def gemm_rows(in_features: int, out_features: int, rows: list[int], repeats: int = 7, inner: int = 10) -> list[dict]:
    """Time per row of one linear layer's three training products (forward ``x W^T``,
    input gradient ``g W``, weight gradient ``g^T x``) with ``rows`` rows each. A thought
    pass has ``batch`` rows, the CoT pass ``batch x length``; their per-row ratio is how
    much less efficiently the BLAS runs the thought passes' products."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=g)
    fns = {}
    for r in rows:
        x, dy = torch.randn(r, in_features, generator=g), torch.randn(r, out_features, generator=g)

        def products(x=x, dy=dy):
            for _ in range(inner):
                x @ w.t(), dy @ w, dy.t() @ x
        fns[r] = products
    t = interleaved(fns, repeats=repeats)
    return [{"in_features": in_features, "out_features": out_features, "rows": r,
             "us_per_row": t[r]["min_s"] / inner / r * 1e6} for r in rows]


def attention_rows(batch: int, length: int, heads: int, kv_heads: int, head_dim: int, repeats: int = 7,
                   inner: int = 5) -> list[dict]:
    """Time per query row of SDPA forward + backward (as transformers calls it: grouped
    query heads, no mask): one query against ``length`` keys, as in a thought pass, and
    the causal ``length x length`` call of the CoT pass."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    fns, rows = {}, {"thought pass (1 query)": 1, "CoT pass (causal)": length}
    for name, q_len in rows.items():
        q = torch.randn(batch, heads, q_len, head_dim, generator=g, requires_grad=True)
        k, v = (torch.randn(batch, kv_heads, length, head_dim, generator=g, requires_grad=True) for _ in range(2))
        dy = torch.randn(batch, heads, q_len, head_dim, generator=g)

        def attend(q=q, k=k, v=v, dy=dy, causal=q_len > 1):
            for _ in range(inner):
                F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True).backward(dy)
        fns[name] = attend
    t = interleaved(fns, repeats=repeats)
    return [{"call": name, "batch": batch, "queries": batch * q_len, "keys": length,
             "us_per_query": t[name]["min_s"] / inner / (batch * q_len) * 1e6} for name, q_len in rows.items()]


def profile_split(model, batches: dict[str, dict], steps: int = 3) -> dict[str, dict]:
    """Where a step's time goes, by torch.profiler: self CPU time of the matrix products,
    of attention, and of everything else (elementwise ops, autograd bookkeeping), with the
    number of operator calls, per step."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for name, batch in batches.items():
        fn = step_fn(model, batch)
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                fn()
        split = {"matrix_products_ms": 0.0, "attention_ms": 0.0, "other_ms": 0.0, "op_calls": 0}
        for e in prof.key_averages():
            ms = e.self_cpu_time_total / 1000 / steps
            if e.key in ("aten::mm", "aten::addmm", "aten::bmm"):
                split["matrix_products_ms"] += ms
            elif "scaled_dot_product" in e.key.lower():
                split["attention_ms"] += ms
            else:
                split["other_ms"] += ms
            if e.key.startswith("aten::"):
                split["op_calls"] += e.count // steps
        out[name] = split
    return out


def crossover(rows: list[dict], target: float = 1.3) -> dict:
    """Where the Coconut/CoT ratio crosses ``target`` as the batch grows, per model, and what
    sets it. Two straight lines in the batch ``B`` are fitted by least squares to the sweep's
    median step times: CoT ``c0 + c1 B`` and the extra of Coconut over it, per thought pass,
    ``a + b B`` (``a``: the fixed cost of one pass, paid whatever its rows: kernel launches,
    transformers' per-call work, autograd nodes; ``b``: its cost per row beyond what the
    same rows cost in the CoT pass). With ``n`` thought passes the ratio is
    ``1 + n (a + b B) / (c0 + c1 B)``: it falls with ``B`` while the fixed cost dominates,
    towards ``1 + n b / c1``; it reaches ``target`` at ``B* = (n a - (target - 1) c0) /
    ((target - 1) c1 - n b)`` if that limit is below ``target`` (else never). Also the
    measured crossing: the batch, interpolated on a log scale between the two measured batches
    whose ratios (medians of the per-round ratios) straddle ``target``."""
    import numpy as np

    out = {}
    for name in dict.fromkeys(r["model"] for r in rows):
        pts = sorted((r for r in rows if r["model"] == name), key=lambda r: r["batch"])
        B = np.array([r["batch"] for r in pts], float)
        cot = np.array([r.get("cot_median_ms", r["cot_ms"]) for r in pts])
        coc = np.array([r.get("coconut_median_ms", r["coconut_ms"]) for r in pts])
        n = max(r["thoughts"] for r in pts)
        c1, c0 = np.polyfit(B, cot, 1)
        b, a = np.polyfit(B, (coc - cot) / n, 1)
        limit = 1 + n * b / c1
        fitted = (n * a - (target - 1) * c0) / ((target - 1) * c1 - n * b) if limit < target else float("inf")
        ratios = [r.get("paired_time_vs_cot", r["median_time_vs_cot"]) for r in pts]
        measured = None
        if ratios[0] <= target:
            measured = float(B[0])
        for i in range(1, len(pts)):
            if measured is None and ratios[i - 1] > target >= ratios[i]:
                f = (ratios[i - 1] - target) / (ratios[i - 1] - ratios[i])
                measured = float(np.exp(np.log(B[i - 1]) + f * (np.log(B[i]) - np.log(B[i - 1]))))
        out[name] = {"thought_passes": int(n), "fixed_ms_per_pass": float(a), "extra_ms_per_row_per_pass": float(b),
                     "cot_fixed_ms": float(c0), "cot_ms_per_row": float(c1), "limit_ratio": float(limit),
                     "fitted_crossover_batch": float(max(fitted, 0.0)) if math.isfinite(fitted) else None,
                     "measured_crossover_batch": measured, "target": target,
                     "batches": [int(x) for x in B], "median_ratios": ratios}
    return out


def print_crossover(cross: dict) -> None:
    for name, c in cross.items():
        fit = f"{c['fitted_crossover_batch']:.0f}" if c["fitted_crossover_batch"] is not None else "never"
        meas = f"{c['measured_crossover_batch']:.0f}" if c["measured_crossover_batch"] is not None else "not reached"
        print(f"  {name}: Coconut within {c['target']}x CoT above batch {meas} (measured), {fit} (fitted); "
              f"each of the {c['thought_passes']} thought passes costs {c['fixed_ms_per_pass']:.1f} ms fixed + "
              f"{c['extra_ms_per_row_per_pass'] * 1000:.0f} us per row over CoT, against CoT's "
              f"{c['cot_ms_per_row']:.2f} ms per row: the ratio tends to {c['limit_ratio']:.2f}", flush=True)


def sweep_figure(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name in dict.fromkeys(r["model"] for r in rows):
        pts = sorted((r["batch"], r["time_vs_cot"]) for r in rows if r["model"] == name)
        x, y = zip(*pts)
        ax.plot(x, y, marker="o", label=name)
    ax.axhline(1.3, color="grey", ls="--", label="target 1.3x")
    ax.set_xscale("log", base=2)
    batches = sorted({r["batch"] for r in rows})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch (rows of each thought pass's products)")
    ax.set_ylabel("Coconut last-stage step / CoT step")
    ax.set_title(f"Coconut step cost vs batch ({torch.get_num_threads()} threads)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--c", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--real", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure SmolLM2-135M (batch 8, 48 tokens, 6 thoughts)")
    ap.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                    help="the ratio across batch sizes, and the per-row cost of the matrix products")
    args = ap.parse_args(argv)
    threads = set_threads()
    t0 = time.perf_counter()
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
    split = profile_split(model, {"cot": cot, "coconut": last})
    for k, v in split.items():
        print(f"  profile of a {k} step: matrix products {v['matrix_products_ms']:.1f} ms, attention "
              f"{v['attention_ms']:.1f} ms, everything else {v['other_ms']:.1f} ms; {v['op_calls']} operator calls",
              flush=True)
    sweep, gemm, attention = [], [], []
    if args.sweep:
        print("Coconut last stage vs CoT across batch sizes (tiny):", flush=True)
        for b in (8, 32, 128, 512):
            if b == args.batch:  # already timed above, side by side with the other variants
                row = pair_row(t, cot, last)
            else:
                row = pair_cost(*setup(b, args.c), args.repeats)
            sweep.append({"model": "tiny", **row})
            _print_sweep(sweep[-1])
        cfg = model.config
        length = int(cot["input_ids"].shape[1])
        gemm += [{"model": "tiny", **r} for r in
                 gemm_rows(cfg.hidden_size, cfg.intermediate_size, [args.batch, args.batch * length])]
        attention = [{"model": "tiny", **r} for r in
                     attention_rows(args.batch, length, cfg.num_attention_heads, cfg.num_key_value_heads,
                                    cfg.hidden_size // cfg.num_attention_heads)]
        for r in attention:
            print(f"  tiny attention, {r['call']:<22} batch {r['batch']}, {r['keys']} keys: "
                  f"{r['us_per_query']:.2f} us per query (forward + backward)", flush=True)
    real = []
    if args.real:
        real, real_sweep, real_gemm = real_model_cost(args.repeats, sweep=args.sweep)
        sweep += real_sweep
        gemm += real_gemm
    for r in gemm:
        print(f"  {r['model']} {r['in_features']}x{r['out_features']} products with {r['rows']:5d} rows: "
              f"{r['us_per_row']:.2f} us per row", flush=True)
    cross = {}
    if sweep:
        sweep_figure(sweep, RESULTS / "coconut_cost_vs_batch.png")
        cross = crossover(sweep)
        print_crossover(cross)
    print(f"({time.perf_counter() - t0:.0f} s)")
    save("coconut_training_cost", {"batch": args.batch, "c": args.c, "rows": rows, "real_model": real,
                                   "profile": split, "sweep": sweep, "crossover": cross, "gemm_rows": gemm,
                                   "attention_rows": attention, "targets": {"time_vs_cot": 1.3, "memory_vs_cot": 1.5}})


CURVE_BATCHES = {"tiny": (8, 16, 32, 64, 128, 256, 512), "smollm2-135m": (2, 4, 8, 16, 32)}


def curve_main(argv=None):
    """Only the ratio as a curve of the batch, denser than the full run's sweep, and where it
    crosses 1.3x (:func:`crossover`): ``coconut_cost_curve.json`` and ``coconut_cost_curve.png``.

        python -m benchmarks.training --curve [--models tiny,smollm2-135m] [--repeats 5]
    """
    ap = argparse.ArgumentParser()
    ap.add_argument("--curve", action="store_true")
    ap.add_argument("--models", default="tiny,smollm2-135m")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--c", type=int, default=1)
    args = ap.parse_args(argv)
    threads = set_threads()
    t0 = time.perf_counter()
    print(f"threads: {threads}; Coconut last stage vs CoT as the batch grows", flush=True)
    sweep = []
    for name in args.models.split(","):
        if name == "tiny":
            for b in CURVE_BATCHES[name]:
                sweep.append({"model": "tiny", **pair_cost(*setup(b, args.c), args.repeats)})
                _print_sweep(sweep[-1])
        else:
            from latentlib.presets import load_model

            model, tok = load_model(name)
            add_special_tokens(model, tok)
            model.train()
            for b in CURVE_BATCHES[name]:
                sweep.append({"model": name, **pair_cost(model, *real_batches(b, 48, 6), max(2, args.repeats - 2))})
                _print_sweep(sweep[-1])
    cross = crossover(sweep)
    print_crossover(cross)
    path = RESULTS / "coconut_cost_curve.json"
    if path.exists():  # keep the other models' rows of an earlier run
        import json

        done = {r["model"] for r in sweep}
        sweep = [r for r in json.loads(path.read_text())["sweep"] if r["model"] not in done] + sweep
        cross = crossover(sweep)
    sweep_figure(sweep, RESULTS / "coconut_cost_curve.png")
    save("coconut_cost_curve", {"c": args.c, "sweep": sweep, "crossover": cross, "target": 1.3,
                                "seconds": time.perf_counter() - t0})
    return sweep, cross


def _print_sweep(r: dict) -> None:
    print(f"  {r['model']:<13} batch {r['batch']:4d}: CoT {r['cot_ms']:7.1f} ms, Coconut {r['coconut_ms']:7.1f} ms, "
          f"{r['time_vs_cot']:.2f}x (median of runs {r['median_time_vs_cot']:.2f}x, of rounds "
          f"{r.get('paired_time_vs_cot', float('nan')):.2f}x); "
          f"{r['extra_ms_per_thought_pass']:.1f} ms extra per thought pass", flush=True)


def real_batches(batch: int, length: int, thoughts: int) -> tuple[dict, dict]:
    """A CoT batch and a Coconut one on random tokens: ``thoughts`` consecutive thought
    columns in the middle of a ``length``-token sequence, against the same sequence written out."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 10000, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    latent = torch.zeros(batch, length, dtype=torch.bool)
    latent[:, length // 2 - thoughts // 2: length // 2 - thoughts // 2 + thoughts] = True
    labels = ids.masked_fill(latent, -100)
    cot = {"input_ids": ids, "attention_mask": mask, "latent_mask": torch.zeros_like(latent), "labels": labels}
    return cot, {**cot, "latent_mask": latent}


def real_model_cost(repeats: int, batch: int = 8, length: int = 48, thoughts: int = 6,
                    sweep: bool = True) -> tuple[list[dict], list[dict], list[dict]]:
    """The same ratio on SmolLM2-135M (time and memory at ``batch``), and, with ``sweep``,
    the time ratio at batch 2 and 32 and the per-row cost of its MLP products."""
    from latentlib.presets import load_model

    model, tok = load_model("smollm2-135m")
    add_special_tokens(model, tok)
    model.train()
    cot, last = real_batches(batch, length, thoughts)
    # the engine as it runs, and with the thought passes' weight gradients computed per pass
    # (defer_weight_grads=False), to show what deferring them saves
    variants = {"cot": (cot, {}), "coconut": (last, {}),
                "coconut_per_pass_weight_grads": (last, {"defer_weight_grads": False})}
    t = interleaved({k: step_fn(model, b, **kw) for k, (b, kw) in variants.items()}, repeats=max(3, repeats // 2))
    mem = {k: saved_bytes(model, b, **kw) for k, (b, kw) in variants.items()}
    rows = [{"variant": k, "batch": batch, "length": length, "thoughts": thoughts if k != "cot" else 0,
             "step_ms": t[k]["min_s"] * 1000, "time_vs_cot": t[k]["min_s"] / t["cot"]["min_s"],
             "saved_mb": mem[k] / 2**20, "memory_vs_cot": mem[k] / mem["cot"]} for k in variants]
    for r in rows:
        print(f"  smollm2-135m {r['variant']:<29} {r['step_ms']:7.0f} ms  {r['time_vs_cot']:.2f}x CoT   "
              f"saved for backward {r['saved_mb']:6.1f} MB  {r['memory_vs_cot']:.2f}x CoT", flush=True)
    if not sweep:
        return rows, [], []
    found = [{"model": "smollm2-135m", **pair_row(t, cot, last)}]
    for b in (2, 32):
        found.append({"model": "smollm2-135m", **pair_cost(model, *real_batches(b, length, thoughts), repeats=2)})
        _print_sweep(found[-1])
    found.sort(key=lambda r: r["batch"])
    cfg = model.config
    gemm = [{"model": "smollm2-135m", **r} for r in
            gemm_rows(cfg.hidden_size, cfg.intermediate_size, [batch, batch * length], repeats=5, inner=3)]
    return rows, found, gemm


if __name__ == "__main__":
    import sys

    curve_main() if "--curve" in sys.argv else main()
