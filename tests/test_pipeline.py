"""The pipeline refuses what it cannot run before running anything."""

import pytest

from latentlib.pipeline import STAGES, UnknownParameterError, main, notebook_parameters, resolve_parameters
from latentlib.presets import UnknownPresetError


def test_every_existing_notebook_has_a_parameters_cell_with_model_and_run():
    from latentlib.pipeline import NOTEBOOKS

    found = [s for s in STAGES if (NOTEBOOKS / f"{s}.ipynb").exists()]
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

    from latentlib.pipeline import NOTEBOOKS, STAGES

    for s in STAGES:
        path = NOTEBOOKS / f"{s}.ipynb"
        cell = next(c for c in json.loads(path.read_text())["cells"] if "parameters" in c["metadata"].get("tags", []))
        assigned = [t.id for node in ast.parse("".join(cell["source"])).body if isinstance(node, ast.Assign)
                    for t in node.targets]
        assert list(notebook_parameters(path)) == assigned, s
