"""Papermill smoke runs of every notebook, in pipeline order, with tiny budgets: one run of
the pipeline itself (``conftest.smoke_pipeline``, the same code path as `make pipeline`),
re-run by nbval; and the same notebooks on the real SmolLM2 (slow)."""

import pytest

from latentlib.pipeline import ALL_STAGES, NOTEBOOKS, STAGES, TASK_STAGES

# Per notebook, the parameters of a smoke run (seconds, not minutes). Every notebook must
# have an entry: a notebook without one fails here rather than going untested.
SMOKE = {
    "00_teacher_extraction": {"base_steps": 30, "n_train": 2000, "n_test": 50, "teacher_problems": 40,
                              "teacher_rollouts": 4, "teacher_speed_problems": 1},
    "01_sft": {"n_train": 2000, "n_test": 50, "teacher_problems": 40, "qthink_steps": 3, "qthink_batch_size": 4,
               "switch_sft_steps": 3, "switch_batch_size": 8},
    "02_curriculum": {"n_train": 2000, "n_test": 50, "steps_per_stage": 2, "final_stage_steps": 2,
                      "bracketed_steps": 2, "second_c": 0, "switch_steps_per_stage": 2, "switch_final_steps": 2,
                      "switch_batch_size": 8},
    "03_grpo": {"n_train": 2000, "n_test": 50, "max_steps": 2, "num_generations": 2, "prompts_per_step": 2,
                "logging_steps": 1},
    "04_evaluation": {"n_train": 2000, "n_test": 50, "prefix_draws": 1, "steer_pairs": 16},
    "05_probes": {"n_train": 2000, "n_test": 50},
    "06_latent_search": {},  # in the graph run below
}
# The notebooks only a task run executes (TASK_STAGES) run on the graph task, after 00 and 02 on it, in a run of
# their own: the pipeline's graph task run with smoke budgets.
GRAPH = {"task": "graph", "graph_nodes": 10, "graph_min_path": 2, "graph_max_path": 4, "n_train": 2000, "n_test": 40}
SMOKE_GRAPH = {
    "00_teacher_extraction": {**GRAPH, "base_steps": 30, "base_kinds": "cot,nocot", "teacher_problems": 20,
                              "teacher_rollouts": 2, "teacher_steps": 4, "teacher_speed_problems": 1},
    "02_curriculum": {**GRAPH, "steps_per_stage": 2, "final_stage_steps": 2, "max_latent_stage": 4, "formats": "plain",
                      "second_c": 0, "run_switch": False},
    "06_latent_search": GRAPH,
}
PRESENT = [s for s in ALL_STAGES if (NOTEBOOKS / f"{s}.ipynb").exists()]


@pytest.fixture(scope="module")
def smoke_run(smoke_pipeline):
    """Each notebook's executed copy in the smoke runs (``conftest.smoke_pipeline``: the main
    run, then the graph run for 06) and each notebook's status."""
    report, results, _ = smoke_pipeline
    status = {r["stage"]: r["status"] + (f": {r['error']}" if "error" in r else "") for r in results
              if r.get("run", "smoke") == "smoke" or r["stage"] in TASK_STAGES}
    return report, status


@pytest.mark.parametrize("stage", PRESENT)
def test_notebook_runs_headless(stage, smoke_run):
    assert set(PRESENT) == set(ALL_STAGES), f"notebooks missing: {sorted(set(ALL_STAGES) - set(PRESENT))}"
    assert set(SMOKE) == set(ALL_STAGES), f"no smoke parameters for {sorted(set(ALL_STAGES) - set(SMOKE))}: add them"
    report, status = smoke_run
    assert status.get(stage) == "ok", status
    run = report.parent / ("smoke-graph" if stage in TASK_STAGES else "smoke")
    assert (run / f"{stage}.ipynb").exists()


def test_nbval_reruns_give_the_same_checked_outputs(smoke_run, tmp_path):
    """nbval re-executes the smoke-run notebooks in a fresh run directory and compares the
    cells tagged ``nbval-check-output`` (configuration, key metrics) with the first run's,
    after sanitising times, paths and addresses: same seed, same numbers."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    report, status = smoke_run
    tmp = report.parent
    done = [report / f"{s}.ipynb" for s in PRESENT if status.get(s) == "ok" and s not in TASK_STAGES]
    if any(status.get(s) == "ok" for s in TASK_STAGES):  # the graph run, in its order
        done += [tmp / "smoke-graph" / f"{s}.ipynb" for s in ALL_STAGES if s in SMOKE_GRAPH]
    assert done, "no notebook ran"
    sanitize = Path(__file__).with_name("nbval_sanitize.cfg")
    env = {**os.environ, "LATENTLIB_RUNS": str(tmp_path / "runs"), "LATENTLIB_REPORTS": str(tmp_path / "reports")}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-c", os.devnull, "--rootdir", str(tmp),
                          "-p", "no:cacheprovider", "--nbval-lax", "--nbval-sanitize-with", str(sanitize),
                          *map(str, done)], capture_output=True, text=True, env=env, timeout=1800)
    assert res.returncode == 0, res.stdout[-4000:]


# The same notebooks on the real SmolLM2-135M (LoRA adapters, the chain task), budgets of a step or two; the
# base models get enough steps to write the answer format, so that the teacher has correct rollouts.
SMOKE_SMOLLM2 = {
    "00_teacher_extraction": {"task": "chain", "n_train": 64, "n_test": 8, "base_steps": 40, "batch_size": 4,
                              "lr": 2e-3, "teacher_problems": 12, "teacher_rollouts": 4, "teacher_max_tokens": 24,
                              "teacher_layers": "0,-1", "teacher_speed_problems": 1},
    "01_sft": {"task": "chain", "n_train": 64, "n_test": 8, "teacher_problems": 12, "qthink_steps": 2,
               "qthink_batch_size": 1, "switch_sft_steps": 2, "switch_batch_size": 4, "eval_batch_size": 8},
    "02_curriculum": {"task": "chain", "n_train": 64, "n_test": 8, "steps_per_stage": 1, "final_stage_steps": 1,
                      "bracketed_steps": 1, "batch_size": 4, "lr": 1e-4, "second_c": 0,
                      "switch_steps_per_stage": 1, "switch_final_steps": 1, "switch_batch_size": 4},
    "03_grpo": {"task": "chain", "n_train": 64, "n_test": 8, "max_steps": 1, "num_generations": 2,
                "prompts_per_step": 2, "logging_steps": 1, "max_completion_length": 24},
    "04_evaluation": {"task": "chain", "n_train": 64, "n_test": 8, "prefix_draws": 1, "steer_pairs": 8},
    "05_probes": {"task": "chain", "n_train": 64, "n_test": 8, "batch_size": 8},
}


@pytest.mark.slow
def test_every_notebook_runs_headless_on_smollm2(tmp_path, monkeypatch):
    """Every notebook, in order, on the real 135M model: LoRA adapters saved and loaded back
    onto what they started from, through the same stages as the tiny run."""
    import papermill as pm

    monkeypatch.setenv("LATENTLIB_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("LATENTLIB_REPORTS", str(tmp_path / "reports"))
    for stage in STAGES:
        pm.execute_notebook(str(NOTEBOOKS / f"{stage}.ipynb"), str(tmp_path / f"{stage}.ipynb"),
                            parameters={"model": "smollm2-135m", "run": "smollm2", **SMOKE_SMOLLM2[stage]},
                            cwd=str(NOTEBOOKS), kernel_name="python3", progress_bar=False)
    sizes = {a.parent.name: a.stat().st_size for a in (tmp_path / "runs" / "smollm2").rglob("adapter_model.safetensors")}
    assert {"cot", "coconut_plain", "switch_phase3"} <= set(sizes)
    # only what was trained: LoRA and the new tokens' rows (SWITCH, as its card, trains the whole embedding and head)
    assert all(size < 60e6 for name, size in sizes.items() if not name.startswith("switch")), sizes
