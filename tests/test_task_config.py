"""Tasks as a parameter: every task by name, its format and grading, its vocabulary for a
from-scratch model, and the bad inputs refused before any training."""

import json

import pytest

from latentlib import stages
from latentlib.presets import get_preset
from latentlib.stages.base import check_scratch_fit
from latentlib.tasks import Format, RecordError, TaskConfig, grade, load_task

FIXTURES = "tests/fixtures"


def test_the_chain_task_is_the_default_and_unchanged():
    from latentlib.tasks import ChainConfig, make_chain_splits

    task = load_task(TaskConfig(n_train=50, n_test=10), " ", scratch=True)
    assert task.format == Format(" ", "strict")
    assert task.splits == make_chain_splits(ChainConfig(n_train=50, n_test=10))


def test_the_graph_task_is_symbolic_for_scratch_models_and_sentences_for_pretrained():
    cfg = TaskConfig(name="graph", n_train=40, n_test=10, graph_nodes=12, graph_min_path=2, graph_max_path=4)
    scratch = load_task(cfg, " ", scratch=True)
    pretrained = load_task(cfg, "\n", scratch=False)
    r = scratch.splits.train[0]
    assert scratch.format.grade == "exact" and r.answer.startswith("n") and "[Q]" in r.question
    assert set(w for t in (r.question, *r.steps, r.answer) for w in t.split()) <= set(scratch.words)
    assert {"idx_to_symbol", "edges", "root", "target", "neg_target", "path"} <= set(r.meta)
    assert "Every" in pretrained.splits.train[0].question and pretrained.format.separator == "\n"
    assert 2 <= len(r.steps) <= 4
    assert grade(f"{' '.join(r.steps)} #### {r.answer}", r.answer, mode=scratch.format.grade)


def test_coconut_json_files_by_path_keep_their_graph_fields():
    task = load_task(TaskConfig(name="prosqa", path=f"{FIXTURES}/prosqa_sample.json", n_test=1), " ", scratch=True)
    assert len(task.splits.train) + len(task.splits.test) == 3 and task.format.grade == "exact"
    r = task.splits.test[0]
    assert {"idx_to_symbol", "edges", "root", "target", "neg_target", "path", "depth", "height"} <= set(r.meta)
    assert "Every" in task.words
    pronto = load_task(TaskConfig(name="prontoqa", path=f"{FIXTURES}/prontoqa_sample.json", n_test=1), "\n")
    assert pronto.splits.test[0].answer in ("True", "False")


def test_a_directory_of_coconut_splits(tmp_path):
    records = json.loads(open(f"{FIXTURES}/prosqa_sample.json").read())
    (tmp_path / "prosqa_train.json").write_text(json.dumps(records[:2]))
    (tmp_path / "prosqa_test.json").write_text(json.dumps(records[2:]))
    task = load_task(TaskConfig(name="prosqa", path=str(tmp_path)), " ", scratch=True)
    assert (len(task.splits.train), len(task.splits.test)) == (2, 1)


def test_gsm8k_from_a_local_file_is_graded_by_number():
    task = load_task(TaskConfig(name="gsm8k", path=f"{FIXTURES}/gsm8k_train_sample.jsonl", n_test=2), "\n")
    assert task.format.grade == "strict" and len(task.splits.test) == 2 and len(task.splits.train) == 3


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "grpah"}, r"unknown task 'grpah' \(did you mean 'graph'\?\)"),
    ({"name": "prosqa"}, "task_path"),
    ({"name": "graph", "graph_min_path": 5, "graph_max_path": 3}, "max_path_len"),
    ({"n_train": 0}, "n_train=0"),
])
def test_bad_task_configs_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TaskConfig(**kwargs)


def test_a_file_in_the_wrong_format_is_refused(tmp_path):
    bad = tmp_path / "prosqa.json"
    bad.write_text('{"question": "not a list"}')
    with pytest.raises(RecordError, match="not a list"):
        load_task(TaskConfig(name="prosqa", path=str(bad)), " ")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_task(TaskConfig(name="prosqa", path=str(tmp_path / "missing.json")), " ")


def test_a_graph_with_no_path_to_either_candidate_is_refused(tmp_path):
    record = json.loads(open(f"{FIXTURES}/prosqa_sample.json").read())[0]
    root = record["idx_to_symbol"][record["root"]]
    record["edges"] = [e for e in record["edges"] if e[0] != record["root"]]  # the root reaches nothing
    record["question"] = ". ".join(s for s in record["question"].split(". ") if not s.startswith(f"{root} is a"))
    (tmp_path / "broken.json").write_text(json.dumps([record, record]))
    with pytest.raises(RecordError, match="no path from the root .* to either candidate"):
        load_task(TaskConfig(name="prosqa", path=str(tmp_path / "broken.json"), n_test=1), " ")


def test_a_task_a_scratch_model_cannot_hold_is_refused_before_training(monkeypatch):
    tiny = get_preset("tiny")
    big = load_task(TaskConfig(name="graph", n_train=20, n_test=5, graph_nodes=200, graph_min_path=3,
                               graph_max_path=6), " ", scratch=True)
    with pytest.raises(ValueError, match="positions"):
        check_scratch_fit(big, tiny)
    monkeypatch.setattr(stages.base, "MAX_SCRATCH_VOCAB", 10)
    small = load_task(TaskConfig(n_train=20, n_test=5), " ", scratch=True)
    with pytest.raises(ValueError, match="distinct words"):
        check_scratch_fit(small, tiny)


def test_notebook_parameters_name_the_task():
    cfg = TaskConfig.from_params({"task": "graph", "n_train": 100, "n_test": 10, "seed": 3, "graph_nodes": 14})
    assert (cfg.name, cfg.n_train, cfg.seed, cfg.graph_nodes, cfg.graph_max_path) == ("graph", 100, 3, 14, 6)
    assert TaskConfig.from_params({"task": ""}, "gsm8k").name == "gsm8k"
