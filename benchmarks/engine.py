"""The engine against the floor: latent decoding and mixed-mode batches vs ``model.generate``.

1. K latent steps + T text tokens through the engine, against ``model.generate`` for K+T
   tokens on the same model and batch (target: throughput ratio >= 1.0 at every batch).
2. A mixed-mode batch in which sequences enter and leave latent mode at different steps
   (target: >= 1.0 of ``model.generate``).
6. Time per training step as the number of thoughts K grows (should be linear in K), and
   as the written sequence grows at a fixed K; a least-squares line through each series
   and its R^2 say how linear it is (``scaling.png`` in the results).

    python -m benchmarks.engine [--models tiny,smollm2-135m] [--batches 1,8,32]
"""

from __future__ import annotations

import argparse
import copy

import torch

from benchmarks.common import RESULTS, interleaved, save, set_threads
from latentlib.batching import prompt_batch
from latentlib.policies import FREE, LATENT, ScriptedPolicy
from latentlib.presets import Preset, build_tiny_model, build_tiny_tokenizer, load_model
from latentlib.recurrence import generate, latent_forward
from latentlib.tasks import ChainConfig, chain_vocabulary, make_chain_splits
from latentlib.tokens import add_special_tokens

NEVER = -1  # an eos id no token has: both loops run the full length


# throughput of the engine over model.generate's, at every batch (latent K+T and a mixed SWITCH batch)
TARGETS = {"latent_ratio": 1.0, "mixed_ratio": 1.0}


def load(name: str):
    """(model, tokenizer, prompts as token lists)."""
    if name == "tiny":
        cfg = ChainConfig(n_train=64, n_valid=0, n_test=0)
        tok = build_tiny_tokenizer(chain_vocabulary(cfg))
        model = build_tiny_model(len(tok), Preset("tiny", "scratch"))
        questions = [r.question for r in make_chain_splits(cfg).train]
    else:
        model, tok = load_model(name)
        questions = [f"Question: A shop sells {i} apples each day for {i + 3} days. How many apples are sold? "
                     "Answer step by step." for i in range(64)]
    add_special_tokens(model, tok)
    model.eval()
    prompts = [tok(q, add_special_tokens=False)["input_ids"] for q in questions]
    return model, tok, prompts


def generate_floor(model, input_ids, mask, n_tokens, pad):
    cfg = copy.deepcopy(model.generation_config)
    cfg.eos_token_id = None
    cfg.do_sample = False
    cfg.pad_token_id = pad
    # in the config, not as arguments beside it (which transformers deprecates)
    cfg.max_new_tokens = cfg.min_new_tokens = n_tokens
    with torch.no_grad():
        return model.generate(input_ids=input_ids, attention_mask=mask, generation_config=cfg)


def engine_run(model, input_ids, mask, policy, n_steps, pad, latent_id):
    # as evaluation runs it (no per-step scores: model.generate computes none either)
    return generate(model, input_ids, mask, policy=policy, max_new_tokens=n_steps, eos_token_id=NEVER,
                    pad_token_id=pad, latent_token_id=latent_id, scores=False)


def mixed_scripts(B: int, K: int, T: int, swi: int, swi_end: int) -> list[list[int]]:
    """Sequence b writes (b mod 5) tokens, enters with <swi>, thinks K steps, leaves with
    </swi>, then writes freely: entries and exits fall at different steps across the batch."""
    return [[FREE] * (b % 5) + [swi] + [LATENT] * K + [swi_end] for b in range(B)]


def decode_benchmarks(name: str, batches: list[int], K: int, T: int, repeats: int) -> list[dict]:
    model, tok, prompts = load(name)
    ids = tok.get_vocab()
    rows = []
    for B in batches:
        input_ids, mask = prompt_batch((prompts * (B // len(prompts) + 1))[:B], tok.pad_token_id)
        n = K + T
        latent = ScriptedPolicy([LATENT] * K)
        mixed = ScriptedPolicy(mixed_scripts(B, K, T, ids["<swi>"], ids["</swi>"]))
        t = interleaved({
            "generate": lambda: generate_floor(model, input_ids, mask, n, tok.pad_token_id),
            "engine_latent": lambda: engine_run(model, input_ids, mask, latent, n, tok.pad_token_id, ids["<latent>"]),
            "engine_mixed": lambda: engine_run(model, input_ids, mask, mixed, n, tok.pad_token_id, ids["<latent>"]),
        }, repeats=repeats)
        floor = t["generate"]["min_s"]
        row = {"model": name, "batch": B, "K": K, "T": T, "prompt_len": input_ids.shape[1],
               "generate_tok_per_s": B * n / floor,
               "latent_ratio": floor / t["engine_latent"]["min_s"],
               "mixed_ratio": floor / t["engine_mixed"]["min_s"], "times": t}
        print(f"[{name} B={B:>2}] generate {row['generate_tok_per_s']:8.0f} tok/s | latent K={K}+T={T}: "
              f"{row['latent_ratio']:.3f}x (target >= {TARGETS['latent_ratio']:g}) | mixed: {row['mixed_ratio']:.3f}x "
              f"(target >= {TARGETS['mixed_ratio']:g})",
              flush=True)
        rows.append(row)
    return rows


def scaling_in_k(name: str, ks: list[int], batch: int, repeats: int) -> list[dict]:
    """Training step (forward + backward) time as the number of thoughts grows."""
    model, tok, prompts = load(name)
    model.train()
    lat = tok.get_vocab()["<latent>"]
    rows = []
    for K in ks:
        seqs = [p + [lat] * K + p[:8] for p in (prompts * (batch // len(prompts) + 1))[:batch]]
        input_ids, mask = prompt_batch(seqs, tok.pad_token_id)
        latent = input_ids == lat

        def step():
            model.zero_grad(set_to_none=True)
            out = latent_forward(model, input_ids, mask, latent)
            out.logits[:, -8:].float().logsumexp(-1).mean().backward()

        t = interleaved({"step": step}, repeats=repeats)["step"]
        rows.append({"model": name, "K": K, "batch": batch, "step_s": t["min_s"]})
        print(f"[{name} scaling] K={K:>2}: {t['min_s'] * 1000:.1f} ms/step", flush=True)
    model.eval()
    return rows


def scaling_in_length(name: str, lengths: list[int], K: int, batch: int, repeats: int) -> list[dict]:
    """Training step time at ``K`` thoughts as the written part after them grows."""
    model, tok, prompts = load(name)
    model.train()
    lat = tok.get_vocab()["<latent>"]
    rows = []
    for T in lengths:
        seqs = [(p * (T // len(p) + 2))[:T] for p in (prompts * (batch // len(prompts) + 1))[:batch]]
        seqs = [p[:8] + [lat] * K + s for p, s in zip(prompts, seqs)]
        input_ids, mask = prompt_batch(seqs, tok.pad_token_id)
        latent = input_ids == lat

        def step():
            model.zero_grad(set_to_none=True)
            out = latent_forward(model, input_ids, mask, latent)
            out.logits[:, -T:].float().logsumexp(-1).mean().backward()

        t = interleaved({"step": step}, repeats=repeats)["step"]
        rows.append({"model": name, "K": K, "T": T, "batch": batch, "step_s": t["min_s"]})
        print(f"[{name} scaling] K={K} T={T:>3}: {t['min_s'] * 1000:.1f} ms/step", flush=True)
    model.eval()
    return rows


def linear_fit(x, y) -> dict:
    """Least-squares line ``y = a + b x`` and its R^2."""
    import numpy as np

    x, y = np.asarray(x, float), np.asarray(y, float)
    b, a = np.polyfit(x, y, 1)
    resid = y - (a + b * x)
    r2 = 1 - (resid ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-30)
    return {"intercept_s": float(a), "slope_s": float(b), "r2": float(r2)}


def scaling_figure(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in [(axes[0], "K", "thoughts K (written part fixed)"), (axes[1], "T", "written tokens T (K = 8)")]:
        for name in dict.fromkeys(r["model"] for r in rows):
            pts = sorted((r[key], r["step_s"] * 1000) for r in rows if r["model"] == name and r.get("series") == key)
            if not pts:
                continue
            x, y = zip(*pts)
            fit = linear_fit(x, y)
            # relative to the series' first point, so that models of any size share the axes
            ax.plot(x, [v / y[0] for v in y], marker="o", label=f"{name}: {y[0]:.0f} ms at {key}={x[0]} "
                    f"(R^2 of a line {fit['r2']:.3f})")
            ax.plot(x, [(fit["intercept_s"] + fit["slope_s"] * v) / y[0] for v in x], ls=":", color="grey")
        ax.set_xlabel(label)
        ax.set_ylabel("time per training step / first point")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("time per step vs thoughts")
    axes[1].set_title("time per step vs sequence length")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny,smollm2-135m")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode-only", action="store_true", help="only the engine-vs-generate ratios (no scaling runs)")
    args = ap.parse_args(argv)
    threads = set_threads()
    print(f"threads: {threads}")
    decode, scaling = [], []
    for name in args.models.split(","):
        T = 10 if name == "tiny" else 26
        decode += decode_benchmarks(name, [int(b) for b in args.batches.split(",")], K=6, T=T, repeats=args.repeats)
        if args.decode_only:
            continue
        reps = max(2, args.repeats // 2)
        ks = [0, 2, 4, 8, 12, 16, 24, 32] if name == "tiny" else [0, 4, 8, 16]
        scaling += [{**r, "series": "K"} for r in scaling_in_k(name, ks, batch=8, repeats=reps)]
        lengths = [16, 32, 64, 128] if name == "tiny" else [16, 32, 64]
        scaling += [{**r, "series": "T"} for r in scaling_in_length(name, lengths, K=8, batch=8, repeats=reps)]
    save("engine_decode", {"rows": decode, "targets": TARGETS})
    if args.decode_only:
        return decode, scaling
    fits = {f"{m}/{key}": linear_fit(*zip(*[(r[key], r["step_s"]) for r in scaling if r["model"] == m
                                            and r["series"] == key]))
            for m in dict.fromkeys(r["model"] for r in scaling) for key in ("K", "T")}
    save("engine_scaling", {"rows": scaling, "linear_fits": fits})
    scaling_figure(scaling, RESULTS / "scaling.png")
    return decode, scaling


if __name__ == "__main__":
    main()
