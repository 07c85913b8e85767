"""Papermill smoke runs of every notebook, in pipeline order, with tiny budgets (the same
code path as `make pipeline`)."""

import pytest

from latentlib.pipeline import NOTEBOOKS, STAGES

# Per notebook, the parameters of a smoke run (seconds, not minutes). Every notebook must
# have an entry: a notebook without one fails here rather than going untested.
SMOKE = {
    "00_teacher_extraction": {"base_steps": 30, "n_train": 2000, "n_test": 50},
}
PRESENT = [s for s in STAGES if (NOTEBOOKS / f"{s}.ipynb").exists()]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """Runs the notebooks in order once; later stages read the earlier ones' artifacts."""
    import papermill as pm

    tmp = tmp_path_factory.mktemp("smoke")
    mp = pytest.MonkeyPatch()
    mp.setenv("LATENTLIB_RUNS", str(tmp / "runs"))
    mp.setenv("LATENTLIB_REPORTS", str(tmp / "reports"))
    status = {}
    try:
        for stage in PRESENT:
            if stage not in SMOKE:
                status[stage] = f"no smoke parameters for {stage}: add them to tests/test_notebooks.py"
                continue
            try:
                pm.execute_notebook(str(NOTEBOOKS / f"{stage}.ipynb"), str(tmp / f"{stage}.ipynb"),
                                    parameters={"run": "smoke", **SMOKE[stage]}, cwd=str(NOTEBOOKS),
                                    kernel_name="python3", progress_bar=False)
                status[stage] = "ok"
            except pm.PapermillExecutionError as e:
                status[stage] = f"{e.ename}: {e.evalue}"
    finally:
        mp.undo()
    return tmp, status


@pytest.mark.parametrize("stage", PRESENT)
def test_notebook_runs_headless(stage, smoke_run):
    tmp, status = smoke_run
    assert status[stage] == "ok", status[stage]
    assert (tmp / f"{stage}.ipynb").exists()
