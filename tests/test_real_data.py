"""Coconut's ProsQA and ProntoQA JSON files, given by path, train and evaluate through the
pipeline's own stage functions: the base models, the curriculum, Table 1 and the
latent-search analysis. The fixtures are small files in Coconut's format (README there)."""

import json
from pathlib import Path

import pytest

from latentlib import stages
from latentlib.probes import OUTPUT_CLASSES
from latentlib.stages.coconut import TABLE1_ROWS
from latentlib.tasks import TaskConfig
from latentlib.training.loop import TrainConfig

FIXTURES = Path(__file__).with_name("fixtures")
TRAIN = TrainConfig(steps=3, batch_size=8, lr=3e-3, warmup_steps=0, log_every=1)


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTLIB_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("LATENTLIB_REPORTS", str(tmp_path / "reports"))
    return tmp_path / "runs"


def _coconut_layout(tmp_path, n_test=4) -> Path:
    """The fixture as Coconut's data directory holds ProsQA: prosqa_train.json, prosqa_test.json."""
    records = json.loads((FIXTURES / "prosqa_generated.json").read_text())
    data = tmp_path / "data"
    data.mkdir()
    (data / "prosqa_train.json").write_text(json.dumps(records[n_test:]))
    (data / "prosqa_test.json").write_text(json.dumps(records[:n_test]))
    return data


def test_prosqa_files_train_and_evaluate_through_the_stages(runs, tmp_path):
    task = TaskConfig(name="prosqa", path=str(_coconut_layout(tmp_path)), n_test=4)
    base = stages.base_models("prosqa", stages.BaseModelsConfig(task=task, train=TRAIN, kinds=("cot", "nocot")),
                              progress=False)
    assert {len(m.evaluation) for m in base.values()} == {4}
    assert base["cot"].evaluation.gold.str.match(r"^\w+ is a \w+\.$").all()  # ProsQA's answers, graded exactly
    cfg = stages.CoconutStageConfig(task=task, formats="plain", max_latent_stage=4, steps_per_stage=1,
                                    final_stage_steps=1, batch_size=8, second_c=0)
    models = stages.coconut_formats("prosqa", cfg, progress=False)
    assert list(models) == ["plain"] and models["plain"].table.stage.tolist() == [1, 2, 3, 4]
    table1 = stages.coconut_table1("prosqa", cfg, models, progress=False)
    assert sorted(table1.method) == sorted(TABLE1_ROWS) and (table1.format == "plain").all()
    # the latent-search analysis reads the graph of the loaded records (sentences: written edges name both ends)
    search = stages.latent_search_models("prosqa", "tiny", task)
    frames = stages.forced_switch(search, [0, 1])
    assert len(frames) == 4 * 4 and set(frames.output_class) <= set(OUTPUT_CLASSES)
    assert list(frames.drop_duplicates("k").k) == ["CoT", "no-CoT", 0, 1]


def test_a_prontoqa_file_is_split_here_and_trains(runs):
    task = TaskConfig(name="prontoqa", path=str(FIXTURES / "prontoqa_sample.json"), n_test=1)
    train = TrainConfig(steps=3, batch_size=2, lr=3e-3, warmup_steps=0, log_every=1)  # 2 training records
    base = stages.base_models("prontoqa", stages.BaseModelsConfig(task=task, train=train, kinds=("cot",)),
                              progress=False)
    assert len(base["cot"].evaluation) == 1 and base["cot"].evaluation.gold.isin(["True", "False"]).all()
    cfg = stages.CoconutStageConfig(task=task, formats="plain", max_latent_stage=4, steps_per_stage=1,
                                    final_stage_steps=1, batch_size=2, second_c=0)
    run = stages.coconut_model("prontoqa", cfg.run("plain"), "coconut_plain", progress=False)
    assert run.table.stage.tolist() == [1, 2, 3, 4] and len(run.per_problem) == 1
    with pytest.raises(ValueError, match="no graph in its records"):
        stages.latent_search_models("prontoqa", "tiny", task)


def test_a_missing_file_names_what_to_pass(tmp_path):
    from latentlib.stages.base import task_of

    with pytest.raises(FileNotFoundError, match="task_path="):
        task_of("tiny", TaskConfig(name="prosqa", path=str(tmp_path / "nowhere")))
