"""Papermill smoke runs of every notebook, in pipeline order, with tiny budgets (the same
code path as `make pipeline`)."""

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
def smoke_run(tmp_path_factory):
    """Runs the notebooks in order once; later stages read the earlier ones' artifacts."""
    import papermill as pm

    tmp = tmp_path_factory.mktemp("smoke")
    mp = pytest.MonkeyPatch()
    mp.setenv("LATENTLIB_RUNS", str(tmp / "runs"))
    mp.setenv("LATENTLIB_REPORTS", str(tmp / "reports"))
    status = {}

    def execute(stage, out, run, params):
        try:
            pm.execute_notebook(str(NOTEBOOKS / f"{stage}.ipynb"), str(tmp / out), parameters={"run": run, **params},
                                cwd=str(NOTEBOOKS), kernel_name="python3", progress_bar=False)
            return "ok"
        except pm.PapermillExecutionError as e:
            return f"{out}: {e.ename}: {e.evalue}"

    try:
        for stage in PRESENT:
            if stage not in SMOKE:
                status[stage] = f"no smoke parameters for {stage}: add them to tests/test_notebooks.py"
                continue
            if stage in TASK_STAGES:  # the graph run: 00 and 02 on the graph task first
                before = [execute(s, f"graph-{s}.ipynb", "smoke-graph", SMOKE_GRAPH[s]) for s in STAGES
                          if s in SMOKE_GRAPH and not (tmp / f"graph-{s}.ipynb").exists()]
                failed = [b for b in before if b != "ok"]
                status[stage] = failed[0] if failed else execute(stage, f"{stage}.ipynb", "smoke-graph",
                                                                 {**SMOKE[stage], **SMOKE_GRAPH[stage]})
            else:
                status[stage] = execute(stage, f"{stage}.ipynb", "smoke", SMOKE[stage])
    finally:
        mp.undo()
    return tmp, status


@pytest.mark.parametrize("stage", PRESENT)
def test_notebook_runs_headless(stage, smoke_run):
    assert set(PRESENT) == set(ALL_STAGES), f"notebooks missing: {sorted(set(ALL_STAGES) - set(PRESENT))}"
    tmp, status = smoke_run
    assert status[stage] == "ok", status[stage]
    assert (tmp / f"{stage}.ipynb").exists()


def test_nbval_reruns_give_the_same_checked_outputs(smoke_run, tmp_path):
    """nbval re-executes the smoke-run notebooks in a fresh run directory and compares the
    cells tagged ``nbval-check-output`` (configuration, key metrics) with the first run's,
    after sanitising times, paths and addresses: same seed, same numbers."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tmp, status = smoke_run
    done = [tmp / f"{s}.ipynb" for s in PRESENT if status.get(s) == "ok" and s not in TASK_STAGES]
    if any(status.get(s) == "ok" for s in TASK_STAGES):  # the graph run, in its order
        done += [tmp / f"graph-{s}.ipynb" for s in STAGES if s in SMOKE_GRAPH]
        done += [tmp / f"{s}.ipynb" for s in TASK_STAGES if status.get(s) == "ok"]
    assert done, "no notebook ran"
    sanitize = Path(__file__).with_name("nbval_sanitize.cfg")
    env = {**os.environ, "LATENTLIB_RUNS": str(tmp_path / "runs"), "LATENTLIB_REPORTS": str(tmp_path / "reports")}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-c", os.devnull, "--rootdir", str(tmp),
                          "-p", "no:cacheprovider", "--nbval-lax", "--nbval-sanitize-with", str(sanitize),
                          *map(str, done)], capture_output=True, text=True, env=env, timeout=1800)
    assert res.returncode == 0, res.stdout[-4000:]
