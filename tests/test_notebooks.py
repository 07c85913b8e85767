"""Papermill smoke runs of every notebook, in pipeline order, with tiny budgets: one run of
the pipeline itself (``conftest.smoke_pipeline``, the same code path as `make pipeline`),
re-run by nbval; and the same notebooks on the real SmolLM2 (slow)."""

import pytest

from latentlib.pipeline import NOTEBOOKS, STAGES

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
}
PRESENT = [s for s in STAGES if (NOTEBOOKS / f"{s}.ipynb").exists()]


@pytest.fixture(scope="module")
def smoke_run(smoke_pipeline):
    """The executed notebooks of the one smoke pipeline run (``conftest.smoke_pipeline``) and
    each notebook's status."""
    report, results, _ = smoke_pipeline
    status = {r["stage"]: r["status"] + (f": {r['error']}" if "error" in r else "") for r in results}
    return report, status


@pytest.mark.parametrize("stage", PRESENT)
def test_notebook_runs_headless(stage, smoke_run):
    assert set(PRESENT) == set(STAGES), f"notebooks missing: {sorted(set(STAGES) - set(PRESENT))}"
    assert set(SMOKE) == set(STAGES), f"no smoke parameters for {sorted(set(STAGES) - set(SMOKE))}: add them here"
    report, status = smoke_run
    assert status.get(stage) == "ok", status
    assert (report / f"{stage}.ipynb").exists()


def test_nbval_reruns_give_the_same_checked_outputs(smoke_run, tmp_path):
    """nbval re-executes the smoke-run notebooks in a fresh run directory and compares the
    cells tagged ``nbval-check-output`` (configuration, key metrics) with the first run's,
    after sanitising times, paths and addresses: same seed, same numbers."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tmp, status = smoke_run
    done = [tmp / f"{s}.ipynb" for s in PRESENT if status.get(s) == "ok"]
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
