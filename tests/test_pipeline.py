"""The pipeline refuses what it cannot run before running anything."""

import pytest

from latentlib.pipeline import STAGES, UnknownParameterError, main, notebook_parameters, resolve_parameters
from latentlib.presets import UnknownPresetError


def test_every_existing_notebook_has_a_parameters_cell_with_model_and_run():
    from latentlib.pipeline import ALL_STAGES, NOTEBOOKS

    found = [s for s in ALL_STAGES if (NOTEBOOKS / f"{s}.ipynb").exists()]
    assert found, "no notebook found"
    for s in found:
        params = notebook_parameters(NOTEBOOKS / f"{s}.ipynb")
        assert params["model"] == "tiny" and params["run"] == "" and "seed" in params


def test_a_misspelt_parameter_is_refused_with_a_suggestion():
    with pytest.raises(UnknownParameterError, match=r"'modle'.*Did you mean 'model'"):
        resolve_parameters("tiny", {"modle": "tiny"})
    with pytest.raises(UnknownParameterError, match="base_step"):
        resolve_parameters("tiny", {"base_step": "10"})


def test_the_command_line_refuses_a_typo_before_running_anything(capsys):
    assert main(["tiny", "-p", "modle", "tiny"]) == 2
    assert "unknown parameter 'modle'" in capsys.readouterr().err


def test_an_unknown_preset_is_refused():
    with pytest.raises(UnknownPresetError, match="did you mean 'qwen3-8b'"):
        resolve_parameters("qwen3-8", {})


def test_parameters_are_typed_like_the_notebook_defaults():
    params = resolve_parameters("tiny", {"base_steps": "7", "lr": "0.5"})
    nb = params["00_teacher_extraction"]
    assert nb["model"] == "tiny" and nb["base_steps"] == 7 and nb["lr"] == 0.5


def test_recorded_evaluations_survive_method_names_with_slashes(tmp_path, monkeypatch):
    import pandas as pd

    from latentlib.evaluate import collect_evaluations, record_evaluation

    monkeypatch.setenv("LATENTLIB_RUNS", str(tmp_path))
    record_evaluation("r", pd.DataFrame({"method": ["Coconut w/o curriculum", "cot"], "correct": [1, 0]}), stage="02_curriculum")
    got = collect_evaluations("r")
    assert sorted(got.method) == ["Coconut w/o curriculum", "cot"] and set(got.stage) == {"02_curriculum"}


def test_papermill_reads_every_name_of_every_parameters_cell():
    """papermill's inspection (what the pipeline checks names against, and what ``setup``
    records) skips a line it cannot parse, e.g. one whose comment holds "(= ...)"; the
    notebook then ignores that parameter's injected value."""
    import ast
    import json

    from latentlib.pipeline import ALL_STAGES, NOTEBOOKS

    for s in ALL_STAGES:
        path = NOTEBOOKS / f"{s}.ipynb"
        cell = next(c for c in json.loads(path.read_text())["cells"] if "parameters" in c["metadata"].get("tags", []))
        assigned = [t.id for node in ast.parse("".join(cell["source"])).body if isinstance(node, ast.Assign)
                    for t in node.targets]
        assert list(notebook_parameters(path)) == assigned, s


def _write(tmp_path, text):
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return path


def test_a_task_run_gets_its_own_task_and_notebooks_and_the_command_line(tmp_path):
    from latentlib.pipeline import task_runs

    path = _write(tmp_path, """model: tiny
seed: 3
notebooks:
  00_teacher_extraction: {base_steps: 50, n_test: 40}
task_runs:
  graph:
    stages: [06_latent_search, 00_teacher_extraction]
    task: graph
    graph_nodes: 12
    notebooks:
      00_teacher_extraction: {base_steps: 7}
""")
    assert task_runs("tiny", path) == {"graph": ("00_teacher_extraction", "06_latent_search")}  # pipeline order
    stages = task_runs("tiny", path)["graph"]
    params = resolve_parameters("tiny", {"lr": "0.5"}, stages, params_file=path, task_run="graph")
    nb00, nb06 = params["00_teacher_extraction"], params["06_latent_search"]
    assert (nb00["task"], nb00["graph_nodes"], nb00["seed"]) == ("graph", 12, 3)
    assert (nb00["base_steps"], nb00["n_test"], nb00["lr"]) == (7, 40, 0.5)  # run's section > file's > notebook's
    assert nb06["task"] == "graph" and nb06["graph_nodes"] == 12 and "lr" not in nb06
    main = resolve_parameters("tiny", {}, ("00_teacher_extraction",), params_file=path)["00_teacher_extraction"]
    assert "task" not in main and main["base_steps"] == 50  # the main run keeps its own task


def test_task_runs_refuse_unknown_names_and_stages(tmp_path):
    from latentlib.pipeline import task_runs

    bad_name = _write(tmp_path, "model: tiny\ntask_runs:\n  graph:\n    stages: [06_latent_search]\n    grpah_nodes: 3\n")
    with pytest.raises(UnknownParameterError, match=r"'grpah_nodes'.*task run graph.*Did you mean 'graph_nodes'"):
        resolve_parameters("tiny", {}, ("06_latent_search",), params_file=bad_name, task_run="graph")
    bad_stage = _write(tmp_path, "model: tiny\ntask_runs:\n  graph:\n    stages: [06_latent]\n")
    with pytest.raises(UnknownParameterError, match="unknown: 06_latent"):
        task_runs("tiny", bad_stage)
    with pytest.raises(UnknownParameterError, match="no task run 'chain'"):
        resolve_parameters("tiny", {}, ("00_teacher_extraction",), params_file=bad_stage, task_run="chain")
    # a command-line name only a task run's notebook declares is known; one no notebook declares is not
    assert resolve_parameters("tiny", {"value_thoughts": "1"})["00_teacher_extraction"]["model"] == "tiny"
    with pytest.raises(UnknownParameterError, match="'value_thought'"):
        resolve_parameters("tiny", {"value_thought": "1"})


def test_the_tiny_parameter_file_runs_the_graph_task_after_the_main_run():
    from latentlib.pipeline import TASK_STAGES, task_runs

    runs = task_runs("tiny")
    assert "graph" in runs and set(TASK_STAGES) <= set(runs["graph"])
    params = resolve_parameters("tiny", {}, runs["graph"], task_run="graph")
    assert {p["task"] for p in params.values()} == {"graph"}
    assert len({(p["graph_nodes"], p["graph_min_path"], p["graph_max_path"], p.get("n_test", 500))
                 for p in params.values()}) == 1  # every notebook of the run sees the same records
    assert params["02_curriculum"]["run_switch"] is False  # no 01 in this run


def test_the_pipeline_runs_the_task_runs_after_the_main_one_and_puts_table1_side_by_side(tmp_path, monkeypatch):
    import pandas as pd

    from latentlib import pipeline
    from latentlib.stages.coconut import TABLE1_ROWS

    monkeypatch.setenv("LATENTLIB_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("LATENTLIB_REPORTS", str(tmp_path / "reports"))
    calls = []

    def fake_run(preset, run, params, stages, kernel):  # what each notebook would leave: 02's Table 1
        calls.append((run, stages, {s: params[s].get("task", "") for s in stages}))
        acc = 0.9 if run.endswith("-graph") else 0.5
        pd.DataFrame([{"method": m, "format": "plain", "accuracy": acc, "visible_tokens": 2.0, "latent_steps": 0}
                      for m in TABLE1_ROWS]).to_csv(pipeline.project.reports_dir(run) / "tables" / "coconut_table1.csv",
                                                    index=False)
        return [{"stage": s, "status": "ok", "seconds": 1.0} for s in stages]

    monkeypatch.setattr(pipeline, "_run_notebooks", fake_run)
    rows = pipeline.run_pipeline("tiny", run="t", overrides={"n_test": "40"})
    graph_stages = pipeline.task_runs("tiny")["graph"]
    assert [c[0] for c in calls] == ["t", "t-graph"] and calls[0][1] == STAGES and calls[1][1] == graph_stages
    assert set(calls[1][2].values()) == {"graph"} and set(calls[0][2].values()) == {""}
    assert {r["run"] for r in rows} == {"t", "t-graph"}
    report = tmp_path / "reports" / "t"
    wide = pd.read_csv(report / "tables" / "table1_tasks.csv")
    assert list(wide.method) == list(TABLE1_ROWS) and set(wide["graph accuracy"]) == {0.9}
    assert (report / "figures" / "table1_tasks.png").is_file() and "table1_tasks" in (report / "index.html").read_text()
    calls.clear()
    pipeline.run_pipeline("tiny", run="u", with_task_runs=False)
    assert [c[0] for c in calls] == ["u"]
    calls.clear()
    pipeline.run_pipeline("tiny", run="p", only=("00_teacher_extraction", "06_latent_search"), with_task_runs=False,
                          overrides={"task": "prosqa", "task_path": "/data/prosqa"})
    assert [(c[0], c[1]) for c in calls] == [("p", ("00_teacher_extraction", "06_latent_search"))]
    assert set(calls[0][2].values()) == {"prosqa"}
