"""Runs every benchmark and writes ``benchmarks/results/*.json`` and ``summary.md``.

    python -m benchmarks.run              # what `make bench` runs
    BENCH_THREADS=1 python -m benchmarks.run
"""

from __future__ import annotations

import json
import time

from benchmarks import coconut_reference, distributed, engine, grpo, training, trl_compare
from benchmarks.common import RESULTS, ROOT, machine, set_threads


def _ok(value, target, higher_is_better=True):
    good = value >= target if higher_is_better else value <= target
    return f"{value:.2f} ({'meets' if good else 'misses'} {'>=' if higher_is_better else '<='} {target})"


def summary() -> str:
    lines = [f"# Benchmarks\n\nWritten {time.strftime('%Y-%m-%d %H:%M')}; machine: {json.dumps(machine())}.\n"]
    p = RESULTS / "engine_decode.json"
    if p.exists():
        d = json.loads(p.read_text())
        lines.append("## Engine vs `model.generate` (throughput ratios; K=6 thoughts + T text tokens)\n")
        lines.append("| model | batch | generate tok/s | latent K+T | mixed-mode |\n|---|---|---|---|---|")
        for r in d["rows"]:
            lines.append(f"| {r['model']} | {r['batch']} | {r['generate_tok_per_s']:.0f} | "
                         f"{_ok(r['latent_ratio'], d.get('targets', {}).get('latent_ratio', 0.9))} | "
                         f"{_ok(r['mixed_ratio'], d.get('targets', {}).get('mixed_ratio', 0.85))} |")
    p = RESULTS / "engine_scaling.json"
    if p.exists():
        d = json.loads(p.read_text())
        lines.append("\n## Training step time as thoughts K and written length T grow (batch 8; `scaling.png`)\n")
        lines.append("| model | series | K | T | ms/step |\n|---|---|---|---|---|")
        lines += [f"| {r['model']} | {r.get('series', 'K')} | {r['K']} | {r.get('T', '')} | {r['step_s'] * 1000:.1f} |"
                  for r in d["rows"]]
        for name, fit in d.get("linear_fits", {}).items():
            lines.append(f"\n- {name}: {fit['slope_s'] * 1000:.2f} ms per unit, intercept "
                         f"{fit['intercept_s'] * 1000:.1f} ms, R^2 of the straight line {fit['r2']:.4f}")
    p = RESULTS / "coconut_reference.json"
    if p.exists():
        d = json.loads(p.read_text())
        e = d["evaluation"]
        lines.append("\n## Against the published Coconut algorithms\n")
        lines.append(f"- (a) evaluation of {e['problems']} problems with {e['thoughts']} thoughts: reference "
                     f"{e['reference_s']:.1f} s, engine {e['engine_s']:.2f} s, speed-up {_ok(e['speedup'], 20)}; "
                     f"identical answers {e['identical_answers']}/{e['problems']}")
        for t in d["training"]:
            lines.append(f"- (b) training step, batch {t['batch']}: |loss diff| {t['loss_abs_diff']:.1e} (<= 1e-5); "
                         f"engine time / reference time {_ok(t['engine_over_reference'], 1.0, False)}")
    p = RESULTS / "coconut_training_cost.json"
    if p.exists():
        d = json.loads(p.read_text())
        lines.append(f"\n## Coconut last stage vs CoT step (batch {d['batch']}, c={d['c']})\n")
        lines.append("| variant | ms/step | time vs CoT | saved for backward (MB) | memory vs CoT |\n|---|---|---|---|---|")
        for r in d["rows"]:
            lines.append(f"| {r['variant']} | {r['step_ms']:.1f} | {_ok(r['time_vs_cot'], 1.3, False)} | "
                         f"{r['saved_mb']:.1f} | {_ok(r['memory_vs_cot'], 1.5, False)} |")
        for r in d.get("real_model", []):
            lines.append(f"| smollm2-135m {r['variant']} (batch {r['batch']}, {r['length']} tokens, "
                         f"{r['thoughts']} thoughts) | {r['step_ms']:.0f} | {_ok(r['time_vs_cot'], 1.3, False)} | "
                         f"{r['saved_mb']:.1f} | {_ok(r['memory_vs_cot'], 1.5, False)} |")
        if d.get("profile"):
            pr = d["profile"]
            lines.append(f"\nWhere the time goes (torch.profiler, self CPU time per step, batch {d['batch']}):\n")
            lines.append("| step | matrix products ms | attention ms | everything else ms | operator calls |\n"
                         "|---|---|---|---|---|")
            lines += [f"| {k} | {v['matrix_products_ms']:.1f} | {v['attention_ms']:.1f} | {v['other_ms']:.1f} | "
                      f"{v['op_calls']} |" for k, v in pr.items()]
        if d.get("sweep"):
            lines.append("\nThe same ratio across batch sizes (`coconut_cost_vs_batch.png`). A thought pass runs the "
                         "layers on `batch` rows, the CoT pass on `batch x length` rows:\n")
            lines.append("| model | batch | CoT ms | Coconut ms | time vs CoT | median of runs | "
                         "extra ms per thought pass |\n|---|---|---|---|---|---|---|")
            lines += [f"| {r['model']} | {r['batch']} | {r['cot_ms']:.1f} | {r['coconut_ms']:.1f} | "
                      f"{_ok(r['time_vs_cot'], 1.3, False)} | {r['median_time_vs_cot']:.2f} | "
                      f"{r['extra_ms_per_thought_pass']:.1f} |" for r in d["sweep"]]
        if d.get("gemm_rows"):
            lines.append("\nOne MLP projection's three training products (forward, input and weight gradient), "
                         "time per row:\n")
            lines.append("| model | weight | rows | us per row |\n|---|---|---|---|")
            lines += [f"| {r['model']} | {r['in_features']}x{r['out_features']} | {r['rows']} | "
                      f"{r['us_per_row']:.2f} |" for r in d["gemm_rows"]]
        if d.get("attention_rows"):
            lines.append("\nAttention (SDPA forward + backward, as transformers calls it), time per query:\n")
            lines.append("| model | call | batch | keys | us per query |\n|---|---|---|---|---|")
            lines += [f"| {r['model']} | {r['call']} | {r['batch']} | {r['keys']} | {r['us_per_query']:.2f} |"
                      for r in d["attention_rows"]]
    p = RESULTS / "grpo_step.json"
    if p.exists():
        d = json.loads(p.read_text())
        lines.append(f"\n## Switch-GRPO step breakdown ({d['model']})\n")
        lines.append("| G x prompts | rollout ms | reference ms | policy loss ms | rollout share | "
                     "one call vs a call per group |\n|---|---|---|---|---|---|")
        for r in d["rows"]:
            lines.append(f"| {r['G']} x {r['prompts']} | {r['rollout_s'] * 1000:.0f} | {r['reference_s'] * 1000:.0f} | "
                         f"{r['policy_loss_s'] * 1000:.0f} | {r['rollout_fraction']:.0%} | "
                         f"{r['batched_speedup']:.1f}x faster |")
    p = RESULTS / "coconut_cost_curve.json"
    if p.exists():
        d = json.loads(p.read_text())
        lines.append("\n## Coconut/CoT step ratio as a curve of the batch (`coconut_cost_curve.png`)\n")
        lines.append("| model | batches | median ratios | within 1.3x above batch (measured / fitted) | "
                     "fixed ms per thought pass | extra us per row per pass | CoT ms per row | ratio's limit |\n"
                     "|---|---|---|---|---|---|---|---|")
        for name, c in d["crossover"].items():
            fit = f"{c['fitted_crossover_batch']:.0f}" if c["fitted_crossover_batch"] is not None else "never"
            meas = f"{c['measured_crossover_batch']:.0f}" if c["measured_crossover_batch"] is not None else "not reached"
            lines.append(f"| {name} | {' / '.join(map(str, c['batches']))} | "
                         f"{' / '.join(f'{x:.2f}' for x in c['median_ratios'])} | {meas} / {fit} | "
                         f"{c['fixed_ms_per_pass']:.1f} | {c['extra_ms_per_row_per_pass'] * 1000:.0f} | "
                         f"{c['cot_ms_per_row']:.2f} | {c['limit_ratio']:.2f} |")
    p = RESULTS / "trl_comparison.json"
    if p.exists():
        d = json.loads(p.read_text())
        lines.append(f"\n## Against TRL {d['versions']['trl']} (ratios are medians of per-round ratios, "
                     "interleaved in one process)\n")
        lines.append("| step | model | setting | threads | ours s | TRL s | ours / TRL | loss rel. diff (tol.) |"
                     "\n|---|---|---|---|---|---|---|---|")
        for r in d.get("grpo", []):
            par = max(v["rel_diff"] for v in r["loss_parity"].values())
            lines.append(f"| Switch-GRPO, text only | {r['model']} | G={r['G']} x {r['prompts']} prompts, "
                         f"{r['max_completion_length']} tokens, {r['trainable']} | {r['threads']} | "
                         f"{r['median_s']['ours']:.2f} | {r['median_s']['trl']:.2f} | "
                         f"{_ok(r['ours_vs_trl']['median'], 1.0, False)} | {par:.1e} ({d.get('loss_atol', 0):g} + {d['loss_rtol']:g}) |")
            lines.append(f"| Switch-GRPO with SWITCH blocks | {r['model']} | "
                         f"{r['last']['ours_blocks']['latent_steps']:.1f} latent steps per completion | "
                         f"{r['threads']} | {r['median_s']['ours_blocks']:.2f} | | "
                         f"{r['blocks_vs_text']['median']:.2f}x our text-only step, "
                         f"{r['blocks_vs_trl']['median']:.2f}x TRL's | |")
        for r in d.get("sft", []):
            if r.get("skipped"):
                lines.append(f"| {r['phase']} SFT | {r['model']} | {r['skipped']} | | | | | |")
                continue
            lines.append(f"| {r['phase']} SFT | {r['model']} | batch {r['batch']}, {r['length']} tokens, "
                         f"{r['trainable']} | {r['threads']} | {r['median_s']['ours']:.3f} | "
                         f"{r['median_s']['trl']:.3f} | {_ok(r['ours_vs_trl']['median'], 1.0, False)} | "
                         f"{r['loss_parity']['rel_diff']:.1e} ({d.get('loss_atol', 0):g} + {d['loss_rtol']:g}) |")
        if d.get("memory"):
            lines.append("\nPeak resident memory, one fresh process per candidate (peak over one step after a "
                         "warm-up step; above: what the step adds to the resident set before it):\n")
            lines.append("| model | candidate | peak MB | step peak above resident MB |\n|---|---|---|---|")
            lines += [f"| {r['model']} | {r['candidate']} | {r['peak_mb']:.0f} | "
                      f"{r['step_peak_above_resident_mb']:.0f} |" if "skipped" not in r else
                      f"| {r['model']} | {r['candidate']} | {r['skipped']} | |" for r in d["memory"]]
    p = RESULTS / "distributed.json"
    if p.exists():
        d = json.loads(p.read_text())
        mb = 2 ** 20
        if "scaling" in d:
            sc = d["scaling"]
            lines.append(f"\n## Several processes: {sc['task']} (CPU, gloo; best of {sc['rounds']} rounds)\n")
            lines.append("| configuration | threads per process | s per step | parameter MB per process | "
                         "speed-up vs 1x1 | efficiency vs 1x1 | speed-up vs 1x2 |\n|---|---|---|---|---|---|---|")
            for name, r in sc["configs"].items():
                per = " / ".join(f"{b / mb:.0f}" for b in r["parameter_bytes_per_process"])
                lines.append(f"| {name} | {r['threads_per_process']} | {r['step_s']:.2f} | {per} | "
                             f"{r.get('speedup_vs_1x1', 1.0):.2f} | {r.get('efficiency_vs_1x1', 1.0):.2f} | "
                             f"{r.get('speedup_vs_1x2', float('nan')):.2f} |")
        lines.append("\n## Checkpoints of LoRA runs (smollm2-135m)\n")
        lines.append("| run | trainable parameters | checkpoint MB | full-state checkpoint MB | ratio | "
                     "adapter MB | PEFT default adapter MB |\n|---|---|---|---|---|---|---|")
        for r in d["checkpoint"]["rows"]:
            lines.append(f"| {r['run']} | {r['trainable_parameters']:,} | {r['checkpoint_bytes'] / mb:.1f} | "
                         f"{r['full_checkpoint_bytes'] / mb:.1f} | {r['checkpoint_vs_full']:.3f} | "
                         f"{r.get('adapter_bytes', 0) / mb:.1f} | {r.get('peft_default_adapter_bytes', 0) / mb:.1f} |")
        g = d["grpo_memory"]
        lines.append(f"\n## Switch-GRPO peak memory (smollm2-135m, LoRA + trained embedding and head)\n\n"
                     f"- reference with the adapter disabled: {g['adapter-disabled']['peak_rss_bytes'] / mb:.0f} MB; "
                     f"a frozen copy: {g['copy']['peak_rss_bytes'] / mb:.0f} MB "
                     f"(+{g['copy_minus_adapter_disabled_bytes'] / mb:.0f} MB)")
    p = ROOT / "reports" / "tiny" / "pipeline.json"
    if p.exists():
        d = json.loads(p.read_text())
        lines.append("\n## The whole pipeline (`make pipeline`, reports/tiny/pipeline.json)\n")
        lines.append("| notebook | status | seconds |\n|---|---|---|")
        lines += [f"| {r['stage']} | {r['status']} | {r.get('seconds', 0):.0f} |" for r in d["stages"]]
        lines.append(f"| total | | {_ok(d['total_seconds'] / 60, 20, False)} min |")
    return "\n".join(lines) + "\n"


def main():
    threads = set_threads()
    print(f"benchmarks with {threads} torch threads")
    engine.main([])
    coconut_reference.main([])
    training.main([])
    grpo.main([])
    training.curve_main([])
    distributed.main([])
    try:
        import trl  # noqa: F401  (the bench extra)

        trl_compare.main([])
    except ImportError:
        print("skipped the TRL comparison: install the bench extra (`.venv/bin/pip install -e '.[bench]'`)")
    (RESULTS / "summary.md").write_text(summary())
    print(f"wrote {RESULTS / 'summary.md'}")


if __name__ == "__main__":
    main()
