"""The README's results and benchmark tables, written from a run's files so that they
cannot drift from what was measured.

    python -m latentlib.readme --run tiny     # `make readme`: collect, save, rewrite README.md
    python -m latentlib.readme --render       # README.md from docs/results/tiny.json alone
    python -m latentlib.readme --check        # exit 1 when README.md differs from that rendering

*Collect* reads ``reports/<run>/tables/main.csv`` and ``probes_summary.csv`` (notebooks 04
and 05), ``table1_tasks.csv`` (Coconut's Table 1 across the task runs),
``reports/<run>/pipeline.json``, ``pipeline_runs.json`` and ``run_info.json`` (stage and
run times, commit, threads), and ``benchmarks/results/*.json`` (``make bench``), and keeps the numbers the
tables show in ``docs/results/<run>.json``, a small committed file with the date, the
commit and the thread count of each source. *Render* turns that file into the Markdown
between the markers ``<!-- readme:NAME -->`` and ``<!-- /readme:NAME -->`` in README.md;
``tests/test_readme.py`` fails when README.md differs from it. The main run (``tiny``)
fills the sections ``results``, ``table1`` and ``benchmarks``; any other run R (a
pretrained preset's pipeline, ``PRESET=smollm2-135m make readme``) fills ``results-R``
with its own results table, beside the main one.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["collect", "collect_results", "collect_benchmarks", "render", "update_readme", "sections", "section_name",
           "main", "SECTIONS", "MAIN_RUN"]

SECTIONS = ("results", "table1", "benchmarks")  # the main run's sections
MAIN_RUN = "tiny"  # the run whose results, Table 1 and benchmarks fill SECTIONS; any other run R fills "results-R"
MAIN_COLUMNS = ("method", "evaluated_in", "accuracy", "visible_tokens", "latent_steps", "n")


def _marker(name: str) -> tuple[str, str]:
    return f"<!-- readme:{name} -->", f"<!-- /readme:{name} -->"


def _git_commit(cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _num(v):
    """A CSV cell as JSON: ints stay ints, floats are rounded to 6 digits, NaN is None."""
    if v is None:
        return None
    if isinstance(v, float):
        if v != v:  # NaN
            return None
        return int(v) if v.is_integer() and abs(v) < 2**53 else round(v, 6)
    if hasattr(v, "item"):
        return _num(v.item())
    return v


# ------------------------------------------------------------------------------------------------------ collect


def collect_results(report: Path) -> dict:
    """The numbers of the README's results section, from one run's report directory."""
    import pandas as pd

    report = Path(report)
    main_csv = report / "tables" / "main.csv"
    if not main_csv.exists():
        raise FileNotFoundError(f"{main_csv} does not exist: run the pipeline (notebook 04 writes it) first")
    main = pd.read_csv(main_csv)
    missing = [c for c in MAIN_COLUMNS if c not in main.columns]
    if missing:
        raise ValueError(f"{main_csv} has no column {', '.join(missing)}")
    out = {"main": [{c: _num(r[c]) for c in MAIN_COLUMNS} for r in main.to_dict("records")]}
    probes_csv = report / "tables" / "probes_summary.csv"
    if probes_csv.exists():
        out["probes"] = [{k: _num(v) for k, v in r.items()} for r in pd.read_csv(probes_csv).to_dict("records")]
    info = json.loads((report / "run_info.json").read_text()) if (report / "run_info.json").exists() else {}
    pipe = json.loads((report / "pipeline.json").read_text()) if (report / "pipeline.json").exists() else {}
    stages = [{"stage": s["stage"], "seconds": round(s["seconds"])} for s in pipe.get("stages", []) if "seconds" in s]
    runs_file = report / "pipeline_runs.json"  # the main run and the task runs after it
    if runs_file.exists():
        out["runs"] = {r: round(t) for r, t in json.loads(runs_file.read_text())["runs"].items()}
    table1 = report / "tables" / "table1_tasks.csv"
    if table1.exists():
        frame = pd.read_csv(table1)
        out["table1"] = {"columns": list(frame.columns),
                         "rows": [[_num(v) for v in r] for r in frame.itertuples(index=False)]}
    written = info.get("written_at") or time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(main_csv.stat().st_mtime))
    return {"date": written[:10], "commit": info.get("commit"), "threads": info.get("threads"),
            "cpu_count": info.get("cpu_count"), "source": f"reports/{report.name}", "total_seconds": round(pipe["total_seconds"]) if pipe else None,
            "stages": stages, **out}


def _by_model(rows, key):
    out: dict[str, list] = {}
    for r in sorted(rows, key=lambda r: r.get("batch", 0)):
        out.setdefault(r["model"], []).append(r)
    return out


def _x(v: float) -> str:
    return f"{v:.2f}x"


def collect_benchmarks(results: Path) -> dict | None:
    """The rows of the README's benchmark table, from ``benchmarks/results/*.json``; None
    when there are none. Each row keeps its cells as shown and the numbers they come from."""
    results = Path(results)
    files = {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}
    if not files:
        return None
    rows = []

    source = {"date": None, "threads": None}

    def use(name: str) -> dict | None:
        """The file ``name``; the rows made next carry its date and thread count."""
        d = files.get(name) or {}
        source["date"] = d.get("written_at", "")[:10] or None
        source["threads"] = (d.get("machine") or {}).get("threads")
        return files.get(name)

    def row(measurement, target, cells: dict, numbers: dict):
        rows.append({"measurement": measurement, "target": target, "tiny": cells.get("tiny", ""),
                     "smollm2-135m": cells.get("smollm2-135m", ""), "numbers": numbers, **source})

    d = use("engine_decode")
    if d:
        models = _by_model(d["rows"], "batch")
        batches = " / ".join(str(r["batch"]) for r in next(iter(models.values())))
        for key, label, target in (("latent_ratio", f"K=6 latent steps + T text tokens vs `model.generate`, batch "
                                    f"{batches}", f">= {d.get('targets', {}).get('latent_ratio', 0.9):g}"),
                                   ("mixed_ratio", f"mixed-mode SWITCH batch vs `model.generate`, batch {batches}",
                                    f">= {d.get('targets', {}).get('mixed_ratio', 0.85):g}")):
            nums = {m: [round(r[key], 4) for r in rs] for m, rs in models.items()}
            row(label, target, {m: " / ".join(f"{v:.2f}" for v in vs) for m, vs in nums.items()}, nums)
    d = use("coconut_reference")
    if d:
        e = d["evaluation"]
        row(f"batched evaluation vs the published one-at-a-time, no-cache decoding ({e['problems']} problems)",
            ">= 20x", {"tiny": f"{e['speedup']:.1f}x, identical answers {e['identical_answers']}/{e['problems']}"},
            {"speedup": round(e["speedup"], 3), "identical_answers": e["identical_answers"],
             "problems": e["problems"]})
        tr = sorted(d["training"], key=lambda t: t["batch"])
        diff = max(t["loss_abs_diff"] for t in tr)
        row(f"training forward vs the published n+1-pass forward (batch {' / '.join(str(t['batch']) for t in tr)})",
            "same loss, not slower",
            {"tiny": f"loss diff {diff:.0e}, {' / '.join(_x(t['engine_over_reference']) for t in tr)} the time"
             if diff else f"loss diff 0, {' / '.join(_x(t['engine_over_reference']) for t in tr)} the time"},
            {"loss_abs_diff": diff, "engine_over_reference": [round(t["engine_over_reference"], 4) for t in tr]})
    d = use("coconut_training_cost")
    if d:
        by = {r["variant"]: r for r in d["rows"]}
        real = {r["variant"]: r for r in d.get("real_model", [])}
        cells, nums = {}, {}
        if "coconut" in by:
            cells["tiny"] = f"{_x(by['coconut']['time_vs_cot'])} at batch {d['batch']}"
            nums["tiny"] = round(by["coconut"]["time_vs_cot"], 4)
        if "coconut" in real:
            r = real["coconut"]
            cells["smollm2-135m"] = (f"{_x(r['time_vs_cot'])} at batch {r['batch']}, {r['length']} tokens, "
                                     f"{r['thoughts']} thoughts")
            nums["smollm2-135m"] = round(r["time_vs_cot"], 4)
        if cells:
            row("Coconut last-stage step vs CoT step", "<= 1.3x", cells, nums)
        sweep = _by_model(d.get("sweep", []), "batch")
        if sweep:
            nums = {m: {str(r["batch"]): round(r["time_vs_cot"], 4) for r in rs} for m, rs in sweep.items()}
            row("the same across batch sizes (`coconut_cost_vs_batch.png`)", "<= 1.3x",
                {m: " / ".join(f"{r['time_vs_cot']:.2f}" for r in rs) + " at batch "
                 + " / ".join(str(r["batch"]) for r in rs) for m, rs in sweep.items()}, nums)
        cells, nums = {}, {}
        if "coconut" in by and "coconut_checkpoint" in by:
            cells["tiny"] = f"{_x(by['coconut']['memory_vs_cot'])} ({_x(by['coconut_checkpoint']['memory_vs_cot'])})"
            nums["tiny"] = [round(by["coconut"]["memory_vs_cot"], 4), round(by["coconut_checkpoint"]["memory_vs_cot"], 4)]
        if "coconut" in real:
            cells["smollm2-135m"] = _x(real["coconut"]["memory_vs_cot"])
            nums["smollm2-135m"] = round(real["coconut"]["memory_vs_cot"], 4)
        if cells:
            row("memory saved for backward vs CoT (activation checkpointing)", "<= 1.5x", cells, nums)
    d = use("grpo_step")
    if d and d.get("rows"):
        r = d["rows"][0]
        row(f"Switch-GRPO step, G={r['G']} x {r['prompts']} prompts", "",
            {"tiny": f"rollout {r['rollout_fraction']:.0%} of the step; one engine call {r['batched_speedup']:.1f}x "
                     "faster than one per group"},
            {"rollout_fraction": round(r["rollout_fraction"], 4), "batched_speedup": round(r["batched_speedup"], 3)})
    d = use("engine_scaling")
    if d and d.get("linear_fits"):
        fits = d["linear_fits"]
        cells = {m: " / ".join(f"{fits[f'{m}/{k}']['r2']:.3f}" for k in ("K", "T") if f"{m}/{k}" in fits)
                 for m in dict.fromkeys(k.split("/")[0] for k in fits)}
        row("training step vs thoughts K / written length T", "linear",
            {m: f"R^2 {c}" for m, c in cells.items()}, {k: round(v["r2"], 4) for k, v in fits.items()})
    d = use("coconut_cost_curve")
    if d and d.get("crossover"):
        cells, nums = {}, {}
        for m, c in d["crossover"].items():
            meas = c.get("measured_crossover_batch")
            fit = c.get("fitted_crossover_batch")
            cells[m] = (f"batch {meas:.0f} measured" if meas is not None else "not reached in the batches measured") \
                + (f", {fit:.0f} fitted" if fit is not None else ", never by the fit") \
                + f" (ratio's limit {c['limit_ratio']:.2f})"
            nums[m] = {"measured": meas, "fitted": fit, "limit": round(c["limit_ratio"], 4)}
        row("Coconut/CoT step ratio as a curve: the batch from which it is within 1.3x (`coconut_cost_curve.png`)",
            "a batch", cells, nums)
    d = use("trl_comparison")
    if d:
        def cell(r: dict) -> str:
            if r.get("skipped"):
                return "not comparable: " + r["skipped"].split(": ", 1)[-1]
            return f"{_x(r['ours_vs_trl']['median'])}, {_parity_text(r)}"

        def nums(r: dict):
            return None if r.get("skipped") else {"ratio": round(r["ours_vs_trl"]["median"], 4),
                                                  "loss_rel_diff": _parity(r)}

        for label, rs in (
                ("Switch-GRPO step (text only) vs TRL `GRPOTrainer` step", d.get("grpo", [])),
                ("SFT step (SWITCH phase 1) vs TRL `SFTTrainer` step",
                 [r for r in d.get("sft", []) if r.get("phase", "").startswith("SWITCH")]),
                ("SFT step (Coconut stage 0) vs TRL `SFTTrainer` step",
                 [r for r in d.get("sft", []) if r.get("phase", "").startswith("Coconut")])):
            if rs:
                row(label, "<= 1.0x; same loss", {r["model"]: cell(r) for r in rs}, {r["model"]: nums(r) for r in rs})
        rs = d.get("grpo", [])
        if rs:
            row("Switch-GRPO step with SWITCH blocks (latent steps) vs the same step text only", "",
                {r["model"]: f"{_x(r['blocks_vs_text']['median'])} "
                             f"({r['last']['ours_blocks']['latent_steps']:.1f} latent steps per completion)" for r in rs},
                {r["model"]: round(r["blocks_vs_text"]["median"], 4) for r in rs})
    d = use("distributed")
    if d:
        configs = (d.get("scaling") or {}).get("configs", {})
        one = configs.get("1 process x 1 thread")
        ddp = next((r for r in configs.values() if r.get("parallel") == "ddp"), None)
        fsdp = next((r for r in configs.values() if r.get("parallel") == "fsdp"), None)
        if one and ddp and fsdp:
            half = max(fsdp["parameter_bytes_per_process"]) / one["parameter_bytes_per_process"][0]
            row(f"{ddp['processes']} processes x 1 thread vs 1 process x 1 thread, a Coconut stage step "
                "(CPU, gloo): speed-up DDP / FSDP2; FSDP2 parameter bytes per process", "",
                {"smollm2-135m": f"{_x(ddp['speedup_vs_1x1'])} (efficiency {ddp['efficiency_vs_1x1']:.2f}) / "
                                 f"{_x(fsdp['speedup_vs_1x1'])}; {_x(half)}"},
                {"ddp_speedup": round(ddp["speedup_vs_1x1"], 4), "fsdp_speedup": round(fsdp["speedup_vs_1x1"], 4),
                 "fsdp_parameter_bytes_vs_one": round(half, 4)})
        ck = {r["run"].split()[0]: r for r in (d.get("checkpoint") or {}).get("rows", [])}
        if ck:
            row("LoRA checkpoint bytes vs the full state, " + " / ".join(ck), "",
                {"smollm2-135m": " / ".join(_x(r["checkpoint_vs_full"]) for r in ck.values())},
                {k: round(r["checkpoint_vs_full"], 4) for k, r in ck.items()})
        g = d.get("grpo_memory")
        if g:
            mb = 2 ** 20
            a, c = g["adapter-disabled"]["peak_rss_bytes"], g["copy"]["peak_rss_bytes"]
            row("Switch-GRPO peak memory, reference with the adapter disabled vs a frozen copy", "",
                {"smollm2-135m": f"{a / mb:.0f} vs {c / mb:.0f} MB ({_x(a / c)})"},
                {"adapter_disabled_mb": round(a / mb), "copy_mb": round(c / mb)})
    machine = next((f["machine"] for f in files.values() if "machine" in f), {})
    written = sorted(f.get("written_at", "") for f in files.values() if f.get("written_at"))
    return {"date": written[-1][:10] if written else None, "threads": machine.get("threads"),
            "cpu_count": machine.get("cpu_count"), "torch": machine.get("torch"), "source": "benchmarks/results",
            "rows": rows}


def _parities(r: dict) -> list[dict]:
    lp = r["loss_parity"]
    return [lp] if "rel_diff" in lp else list(lp.values())


def _parity(r: dict) -> float:
    """The largest relative loss difference of a TRL comparison row (ours vs TRL on the same batch)."""
    return max(p["rel_diff"] for p in _parities(r))


def _parity_text(r: dict) -> str:
    """The largest loss difference of a row, and whether every loss type was within the
    benchmark's tolerance (absolute plus relative, as ``torch.allclose``)."""
    ps = _parities(r)
    within = all(p.get("within_tolerance", p["rel_diff"] < p.get("tolerance_rel", 1e-5)) for p in ps)
    return (f"loss diff {max(p['abs_diff'] for p in ps):.0e} (rel. {_parity(r):.0e}, "
            f"{'within' if within else 'outside'} tolerance)")


def collect(project: Path, run: str, previous: dict | None = None, *, main_run: str = MAIN_RUN) -> dict:
    """Everything the README's tables show, for one run: its results, and for ``main_run``
    also the benchmarks (one table for all models, collected with the main run). A part
    whose files are missing (no ``make bench`` yet, say) is kept from ``previous`` (the
    committed file)."""
    project = Path(project)
    previous = previous or {}
    commit = _git_commit(project)
    data = {"run": run}
    report = project / "reports" / run
    if (report / "tables" / "main.csv").exists():
        data["results"] = collect_results(report)
        if not data["results"].get("commit"):
            data["results"]["commit"] = commit
    elif "results" in previous:
        data["results"] = previous["results"]
    if run != main_run:
        return data
    bench = collect_benchmarks(project / "benchmarks" / "results")
    if bench is not None:
        bench["commit"] = commit  # benchmarks/results record no commit: the checkout's when collected
        data["benchmarks"] = _merge_benchmarks(bench, previous.get("benchmarks"))
    elif "benchmarks" in previous:
        data["benchmarks"] = previous["benchmarks"]
    return data


def _merge_benchmarks(bench: dict, previous: dict | None) -> dict:
    """This collection's rows (dated by their files), then the rows of ``previous`` that no file
    collected now measures (a benchmark not re-run), each with the date it was measured."""
    if previous:
        now = {r["measurement"] for r in bench["rows"]}
        kept = [{**r, "date": r.get("date") or previous.get("date"), "threads": r.get("threads") or previous.get("threads")}
                for r in previous.get("rows", []) if r["measurement"] not in now]
        bench = {**bench, "rows": bench["rows"] + kept}
        if kept:
            bench["note"] = ("each row says when it was measured and with how many torch threads; rows of benchmarks "
                             "not re-run since are kept")
    return bench


# ------------------------------------------------------------------------------------------------------- render


def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.1f}%"


def _g(v) -> str:
    return "" if v is None else f"{round(float(v), 2):g}"


def _stage(s: str) -> str:
    return s.split("_", 1)[0] if s else ""


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    esc = [[str(c).replace("|", "\\|") for c in r] for r in rows]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in esc]


def _provenance(part: dict, what: str, threads: bool = True) -> str:
    bits = [part.get("date") or "date not recorded",
            f"commit `{part['commit']}`" if part.get("commit") else "commit not recorded"]
    if threads:
        bits.append((f"{part['threads']} thread{'' if part['threads'] == 1 else 's'}" if part.get("threads")
                     else "thread count not recorded")
                    + (f" on a {part['cpu_count']}-core machine" if part.get("cpu_count") else ""))
    line = f"{what}: {', '.join(bits)}"
    if part.get("note"):
        line += f" ({part['note']})"
    return line + "."


def _when(r: dict, bench: dict) -> str:
    """A benchmark row's date and the torch threads it ran with."""
    n = r.get("threads")
    return (r.get("date") or bench.get("date") or "") + (f", {n} thread{'' if n == 1 else 's'}" if n else "")


def section_name(run: str, *, main_run: str = MAIN_RUN) -> str:
    """The README marker name of a run's results section: ``results`` for the main run, else ``results-<run>``."""
    return "results" if run == main_run else f"results-{run}"


def render(data: dict, *, main_run: str = MAIN_RUN) -> dict[str, str]:
    """The Markdown of each README section, from the collected numbers: for the main run
    its results, Table 1 and benchmarks; for another run only its results, in the section
    ``results-<run>`` (a pretrained preset's table beside the embedded default's)."""
    run = data.get("run", main_run)
    if run != main_run:
        main = render({"run": run, "results": data["results"]}, main_run=run) if data.get("results") else {}
        return {section_name(run, main_run=main_run): main["results"]} if main else {}
    out = {}
    res = data.get("results")
    if res:
        lines = [_provenance(res, f"From `make pipeline`, run `{data.get('run', '')}`")]
        if res.get("total_seconds"):
            stages = ", ".join(f"{_stage(s['stage'])} {s['seconds']} s" for s in res.get("stages", []))
            lines[0] += (f" The pipeline took {res['total_seconds']} s ({res['total_seconds'] / 60:.1f} min)"
                         + (f": {stages}." if stages else "."))
        lines.append("")
        n = sorted({r["n"] for r in res["main"] if r.get("n")})
        head = ["method", "evaluated in", "accuracy", "visible tokens", "latent steps"]
        lines += _table(head, [[r["method"], _stage(r["evaluated_in"]), _pct(r["accuracy"]), _g(r["visible_tokens"]),
                                _g(r["latent_steps"])] for r in res["main"]])
        if n:
            lines += ["", f"Each row: {'/'.join(map(str, n))} test problems, greedy decoding, one grading function."]
        if res.get("runs") and len(res["runs"]) > 1:
            main_s = res["runs"].get(data.get("run", ""))
            lines += ["", "Runs of `make pipeline` (the main run, then the parameter file's task runs): " + ", ".join(
                f"`{r}` {t} s" for r, t in res["runs"].items())
                + (f"; in all {sum(res['runs'].values())} s, {sum(res['runs'].values()) / main_s:.2f}x the main "
                   "run alone." if main_s else ".")]
        if res.get("probes"):
            lines += ["", "The probes (05_probes, `probes_summary.csv`):", ""]
            lines += _table(["measurement", "model", "value"],
                            [[p["measurement"], p["model"], "" if p["value"] is None else f"{p['value']:.3f}"]
                             for p in res["probes"]])
        out["results"] = "\n".join(lines)
        t1 = res.get("table1")
        if not t1:
            out["table1"] = (f"No Table 1 across tasks in the collected run `{data.get('run', '')}`: `make pipeline` "
                             "writes it when the parameter file has task runs.")
        else:
            cols = t1["columns"]

            def cell(c, v):
                if v is None:
                    return ""
                return _pct(v) if c.endswith("accuracy") else (_g(v) if isinstance(v, (int, float)) else str(v))

            out["table1"] = "\n".join(
                [f"Coconut's Table 1 from the same `make pipeline` (`reports/{data.get('run', '')}/tables/"
                 "table1_tasks.csv`): one model per row and task, trained and evaluated by notebooks 00 and 02 of "
                 "each task's run; accuracy on the test split, visible tokens per answer.", ""]
                + _table(cols, [[cell(c, v) for c, v in zip(cols, r)] for r in t1["rows"]]))
    bench = data.get("benchmarks")
    if bench:
        dated = any(r.get("date") for r in bench["rows"])
        # dated rows carry their own threads; the line above them then gives the last date only
        lines = [_provenance(bench, "Measured by `make bench`", threads=not dated), ""]
        lines += _table(["measurement", "target", "tiny", "smollm2-135m"] + (["measured"] if dated else []),
                        [[r["measurement"], r["target"], r["tiny"], r["smollm2-135m"]]
                         + ([_when(r, bench)] if dated else []) for r in bench["rows"]])
        out["benchmarks"] = "\n".join(lines)
    return out


def sections(readme: str) -> dict[str, str]:
    """The text between each pair of markers in ``readme`` (every ``<!-- readme:NAME -->``)."""
    out = {}
    for name in re.findall(r"<!-- readme:([\w.-]+) -->", readme):
        begin, end = _marker(name)
        m = re.search(re.escape(begin) + r"\n(.*?)\n?" + re.escape(end), readme, flags=re.S)
        if m:
            out[name] = m.group(1).strip("\n")
    return out


def update_readme(readme: str, rendered: dict[str, str]) -> str:
    """``readme`` with each marked section replaced by its rendering (markers must exist)."""
    for name, body in rendered.items():
        begin, end = _marker(name)
        pat = re.compile(re.escape(begin) + r".*?" + re.escape(end), flags=re.S)
        if not pat.search(readme):
            raise ValueError(f"README.md has no {begin} ... {end} markers: add the pair where the section belongs "
                             "(the command fills in what is between them)")
        readme = pat.sub(lambda _: f"{begin}\n{body}\n{end}", readme, count=1)
    return readme


def main(argv: list[str] | None = None) -> int:
    from latentlib import project

    ap = argparse.ArgumentParser(prog="python -m latentlib.readme", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="tiny", help="the run whose reports/<run>/tables are collected")
    ap.add_argument("--project", default=None, help="project directory (default: the checkout)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--render", action="store_true", help="only rewrite README.md from docs/results/<run>.json")
    mode.add_argument("--check", action="store_true", help="exit 1 if README.md differs from docs/results/<run>.json")
    args = ap.parse_args(argv)
    root = Path(args.project) if args.project else project.project_dir()
    if root is None:
        print("error: no project directory (give --project)", file=sys.stderr)
        return 2
    data_file = root / "docs" / "results" / f"{args.run}.json"
    readme_file = root / "README.md"
    previous = json.loads(data_file.read_text()) if data_file.exists() else None
    if args.render or args.check:
        if previous is None:
            print(f"error: {data_file} does not exist: run `make readme` after a pipeline run", file=sys.stderr)
            return 2
        data = previous
    else:
        data = collect(root, args.run, previous)
        if "results" not in data and "benchmarks" not in data:
            print(f"error: nothing to collect: no reports/{args.run}/tables/main.csv, no benchmarks/results/*.json",
                  file=sys.stderr)
            return 2
        data_file.parent.mkdir(parents=True, exist_ok=True)
        data_file.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {data_file}")
    text = readme_file.read_text()
    try:
        new = update_readme(text, render(data))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        if new != text:
            print("README.md differs from what docs/results renders: run `python -m latentlib.readme --render`",
                  file=sys.stderr)
            return 1
        print("README.md matches", data_file)
        return 0
    readme_file.write_text(new)
    print(f"wrote {readme_file}" + (" (unchanged)" if new == text else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
