"""The one reuse rule: a stage's artifact is reused only when its whole configuration and the
identities of its inputs are the same; anything else retrains it, and says so."""

import dataclasses
import json
import shutil

import pytest

from latentlib import artifacts, stages
from latentlib.methods.coconut import CoconutConfig
from latentlib.methods.qthink import DistillConfig
from latentlib.methods.switch import SpanRule, SwitchConfig, SwitchGRPOConfig
from latentlib.stages.reuse import NOT_IN_KEY, build_or_reuse, stage_key
from latentlib.tasks import TaskConfig
from latentlib.teacher import TeacherConfig
from latentlib.training.curriculum import CurriculumConfig
from latentlib.training.loop import TrainConfig

TASK = TaskConfig(n_train=64, n_test=8)
TRAIN = TrainConfig(steps=3, batch_size=8, lr=3e-3, warmup_steps=0, log_every=1)


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTLIB_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("LATENTLIB_REPORTS", str(tmp_path / "reports"))
    return tmp_path / "runs"


# ---------------------------------------------------------------------------- every field is in the key


def _leaves(obj, prefix=()):
    """(path, value) of every scalar field of a nested dataclass."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, (*prefix, f.name))
        else:
            yield (*prefix, f.name), value


ALTERNATIVES = {"name": "gsm_symbolic", "kind": "nocot", "model": "smollm2-135m", "method": "pause", "format": "plain",
                "injection": "hs[-2]", "latent_positions": "skip", "schedule": "linear", "distance": "mse",
                "mode": "uniform", "distill_steps": "per_step", "target": "cot", "aggregate": "mean", "pool_by": "op",
                "dtype": "bfloat16", "grade_mode": "flexible", "loss_type": "grpo", "scale_rewards": "batch",
                "lr_scheduler_type": "cosine", "base": "cot_markers", "eval_stages": "last", "layers": "last",
                "steer_positions": "all", "kinds": ("cot",), "rows": ("discrete SFT",)}


def _changed(value, field=""):
    """Another valid value of the same kind."""
    if field in ALTERNATIVES and ALTERNATIVES[field] != value:
        return ALTERNATIVES[field]
    if field == "positions":
        return "continue" if value == "block" else "block"
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 0.5 + 0.25 if value else 0.5
    if isinstance(value, tuple):
        return value[:-1] if len(value) > 1 else value + value
    if value is None:
        return 1
    return value + "x" if isinstance(value, str) else value


def _replace(obj, path, value):
    if len(path) == 1:
        return dataclasses.replace(obj, **{path[0]: value})
    return dataclasses.replace(obj, **{path[0]: _replace(getattr(obj, path[0]), path[1:], value)})


CONFIGS = {
    "base": stages.BaseModelsConfig(task=TASK, train=TRAIN),
    "teacher": stages.TeacherStageConfig(task=TASK, problems=16, teacher=TeacherConfig(num_generations=2)),
    "qthink": stages.QThinkConfig(task=TASK, distill=DistillConfig(train=TRAIN)),
    "phase1": stages.Phase1Config(task=TASK, rule=SpanRule(), switch=SwitchConfig(positions="block"), train=TRAIN),
    "phase2": stages.Phase2Config(task=TASK, curriculum=CurriculumConfig(end_stage=1, train=TRAIN)),
    "phase3": stages.Phase3Config(task=TASK, grpo=SwitchGRPOConfig(num_generations=2, generation_batch_size=4)),
    "coconut": stages.CoconutRunConfig(task=TASK, coconut=CoconutConfig(), curriculum=CurriculumConfig(train=TRAIN)),
    "light": stages.LightConfig(task=TASK),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_changing_any_field_of_a_stage_config_changes_its_key(name):
    cfg = CONFIGS[name]
    key = stage_key(cfg, {"records": "r"})
    assert stage_key(cfg, {"records": "r"}) == key  # a pure function of the configuration
    assert stage_key(cfg, {"records": "other"}) != key  # and of the inputs
    tried = 0
    for path, value in _leaves(cfg):
        other = None
        for candidate in (_changed(value, path[-1]), _changed(_changed(value, path[-1]), path[-1])):
            try:
                other = _replace(cfg, path, candidate)
                break
            except (ValueError, TypeError):  # a value the config refuses (fields that go together): another one
                continue
        if other is None:
            continue
        if getattr(other, path[0]) == getattr(cfg, path[0]):
            continue
        tried += 1
        if path[-1] in NOT_IN_KEY:  # how the run is carried out, not what it makes
            assert stage_key(other, {"records": "r"}) == key, f"{name}: {'.'.join(path)} changes the key"
            continue
        assert stage_key(other, {"records": "r"}) != key, f"{name}: {'.'.join(path)} is not in the key"
    assert tried >= len(list(_leaves(cfg))) - 3  # (a few fields only change together with another)


def test_checkpointing_more_often_reuses_the_artifact_and_resumes_its_checkpoint(runs):
    def cfg(every, steps=TRAIN.steps):
        return stages.BaseModelsConfig(task=TASK, train=dataclasses.replace(TRAIN, checkpoint_every=every,
                                                                              steps=steps))

    key = stage_key(cfg(0), {"records": "r"})
    assert stage_key(cfg(50), {"records": "r"}) == key
    assert stage_key(cfg(50, steps=TRAIN.steps + 1), {"records": "r"}) != key  # what the run makes still is
    load = lambda directory, meta: "loaded"  # noqa: E731
    d = artifacts.artifact_dir("r", "s", "a")
    calls, checkpoints = [], []

    def build(record, checkpoint):
        checkpoints.append(checkpoint)
        return _builder(d, calls)(record, checkpoint)

    build_or_reuse(d, cfg(0), {"records": "r"}, build=build, load=load, label="s/a")
    assert build_or_reuse(d, cfg(50), {"records": "r"}, build=build, load=load, label="s/a").status == "reused"
    shutil.rmtree(d)  # as if the first run had been killed: the second trains into the same checkpoint directory
    build_or_reuse(d, cfg(50), {"records": "r"}, build=build, load=load, label="s/a")
    assert len(calls) == 2 and checkpoints[0] == checkpoints[1] and checkpoints[0].name == f".a-{key}.ckpt"


# Every training run of each notebook's stages, as the stage builds it from the notebook's parameters.
TRAINED = {
    "00_teacher_extraction": lambda p: [stages.BaseModelsConfig.from_params(p).train],
    "01_sft": lambda p: [stages.QThinkConfig.from_params(p).distill.train, stages.Phase1Config.from_params(p).train],
    "02_curriculum": lambda p: [*(c.curriculum.train for c in (stages.CoconutStageConfig.from_params(p).run("plain"),
                                                              stages.CoconutStageConfig.from_params(p).bracketed())),
                                stages.CoconutStageConfig.from_params(p).curriculum(steps=2, final=3).train,
                                stages.Phase2Config.from_params(p).curriculum.train],
    "03_grpo": lambda p: [stages.Phase3Config.from_params(p).grpo.train_config()],
    "04_evaluation": lambda p: [stages.LightConfig.from_params(p).train_config()],
}


@pytest.mark.parametrize("notebook", list(TRAINED))
def test_the_checkpoint_every_parameter_reaches_every_training_run_and_no_key(notebook):
    from latentlib.notebook import notebook_path
    from latentlib.project import notebook_parameters

    params = notebook_parameters(notebook_path(notebook))
    assert params["checkpoint_every"] == 0  # the default: a checkpoint at the end of each run or stage
    trained = TRAINED[notebook]({**params, "checkpoint_every": 7})
    assert [t.checkpoint_every for t in trained] == [7] * len(trained)
    assert [stage_key(t, {}) for t in trained] == [stage_key(t, {}) for t in TRAINED[notebook](params)]


def test_a_field_left_out_of_the_key_keeps_the_keys_written_before_it_existed():
    grpo = SwitchGRPOConfig(num_generations=2, generation_batch_size=4)
    old = {k: v for k, v in dataclasses.asdict(grpo).items() if k != "save_steps"}  # as written before save_steps
    assert stage_key(grpo, {}) == stage_key(old, {}) == stage_key(dataclasses.replace(grpo, save_steps=5), {})
    assert dataclasses.replace(grpo, save_steps=5).train_config().checkpoint_every == 5
    with pytest.raises(ValueError, match="save_steps=-1 must be >= 0"):
        SwitchGRPOConfig(save_steps=-1)


# ---------------------------------------------------------------------------- the rule itself


def _builder(directory, calls):
    def build(record, checkpoint):
        calls.append(record["key"])
        with artifacts.atomic_dir(directory) as tmp:
            artifacts.write_complete(tmp, {**record, "seed": 0})
        return len(calls)
    return build


def test_reuse_rebuild_and_what_is_said(runs, capsys):
    d = artifacts.artifact_dir("r", "s", "a")
    calls = []
    load = lambda directory, meta: "loaded"  # noqa: E731
    first = build_or_reuse(d, {"x": 1, "y": {"z": 2}}, {"up": "k1"}, build=_builder(d, calls), load=load, label="s/a")
    assert first.status == "trained" and first.value == 1 and artifacts.read_meta(d)["key"] == first.key
    again = build_or_reuse(d, {"x": 1, "y": {"z": 2}}, {"up": "k1"}, build=_builder(d, calls), load=load, label="s/a")
    assert again.status == "reused" and again.value == "loaded" and len(calls) == 1
    changed = build_or_reuse(d, {"x": 1, "y": {"z": 3}}, {"up": "k1"}, build=_builder(d, calls), load=load,
                             label="s/a")
    out = capsys.readouterr().out
    assert changed.status == "retrained" and len(calls) == 2 and "y.z 2 -> 3" in out
    upstream = build_or_reuse(d, {"x": 1, "y": {"z": 3}}, {"up": "k2"}, build=_builder(d, calls), load=load,
                              label="s/a")
    assert upstream.status == "retrained" and "up 'k1' -> 'k2'" in capsys.readouterr().out


def test_a_build_that_writes_nothing_is_an_error(runs):
    d = artifacts.artifact_dir("r", "s", "b")
    with pytest.raises(RuntimeError, match="did not write its artifact"):
        build_or_reuse(d, {}, {}, build=lambda record, ckpt: None, load=lambda *a: None, label="s/b")


def test_an_artifact_without_a_key_is_named(runs):
    d = artifacts.artifact_dir("r", "base", "cot")
    with artifacts.atomic_dir(d) as tmp:
        artifacts.write_complete(tmp, {"seed": 0})
    with pytest.raises(artifacts.CorruptArtifactError, match="records no key"):
        stages.reuse.identity(d)


# ---------------------------------------------------------------------------- end to end on the tiny model


def _history_steps(directory):
    return artifacts.read_meta(directory)["history"][-1]["step"]


def test_base_models_retrain_when_the_budget_changes_and_say_so(runs, capsys):
    """The measured bug: after a long run, asking for 30 steps returned the 600-step model."""
    cfg = stages.BaseModelsConfig(task=TASK, train=TRAIN, kinds=("cot",))
    first = stages.base_models("r", cfg, progress=False)
    d = artifacts.artifact_dir("r", "base", "cot")
    assert first["cot"].status == "trained" and _history_steps(d) == 3
    assert stages.base_models("r", cfg, progress=False)["cot"].status == "reused"
    shorter = dataclasses.replace(cfg, train=dataclasses.replace(TRAIN, steps=2))
    capsys.readouterr()
    again = stages.base_models("r", shorter, progress=False)
    assert again["cot"].status == "retrained" and _history_steps(d) == 2 and len(again["cot"].history) == 2
    assert "train.steps 3 -> 2" in capsys.readouterr().out
    other_task = dataclasses.replace(shorter, task=dataclasses.replace(TASK, n_train=48))
    assert stages.base_models("r", other_task, progress=False)["cot"].status == "retrained"


def test_an_upstream_artifact_that_changed_retrains_the_stages_after_it(runs, capsys):
    base_cfg = stages.BaseModelsConfig(task=TASK, train=TRAIN, kinds=("cot", "nocot"))
    stages.base_models("r", base_cfg, progress=False)
    teacher_cfg = stages.TeacherStageConfig(task=TASK, problems=8, layers="last",
                                            teacher=TeacherConfig(num_generations=2, max_completion_length=10,
                                                                  shard_size=4))
    assert not stages.teacher("r", teacher_cfg, progress=False).reused
    assert stages.teacher("r", teacher_cfg, progress=False).reused
    # the base model changes (another budget): the teacher made from it is made again
    stages.base_models("r", dataclasses.replace(base_cfg, train=dataclasses.replace(TRAIN, lr=1e-3)), progress=False)
    capsys.readouterr()
    assert not stages.teacher("r", teacher_cfg, progress=False).reused
    assert "inputs.base" in capsys.readouterr().out


def test_light_reuses_the_base_model_only_when_the_budget_is_the_same(runs):
    light = stages.LightConfig(task=TASK, steps=3, batch_size=8, lr=3e-3, warmup_steps=0)
    same = stages.BaseModelsConfig(task=TASK, train=light.train_config(), kinds=("cot",))
    stages.base_models("r", same, progress=False)
    assert stages.base_model("r", same, "cot", stage="light", progress=False).status == "reused"
    assert not (runs / "r" / "light" / "cot").exists()  # notebook 00's model serves
    longer = dataclasses.replace(same, train=dataclasses.replace(same.train, steps=4))
    assert stages.base_model("r", longer, "cot", stage="light", progress=False).status == "trained"
    assert (runs / "r" / "light" / "cot").is_dir() and _history_steps(runs / "r" / "base" / "cot") == 3


def test_the_key_and_configuration_are_recorded(runs):
    cfg = stages.BaseModelsConfig(task=TASK, train=TRAIN, kinds=("nocot",))
    stages.base_models("r", cfg, progress=False)
    meta = artifacts.read_meta(artifacts.artifact_dir("r", "base", "nocot"))
    assert meta["stage_config"]["base"]["train"]["steps"] == 3 and meta["inputs"]["records"]
    assert meta["key"] == stage_key(json.loads(json.dumps(meta["stage_config"])), meta["inputs"])


def test_the_table1_baselines_override_the_stage_configuration():
    """iCoT-style sets its own uniform_prob over the stage's (a TypeError before)."""
    cfg = stages.CoconutStageConfig(uniform_prob=0.3)
    icot = cfg.coconut("plain", method="icot", uniform_prob=0.0, removal_smoothing=4.0)
    assert (icot.method, icot.uniform_prob, icot.removal_smoothing) == ("icot", 0.0, 4.0)
    assert cfg.coconut("plain").uniform_prob == 0.3


def test_a_task_run_can_train_only_the_formats_and_base_models_it_needs():
    cfg = stages.CoconutStageConfig(formats="plain", baselines="plain,")
    assert cfg.formats == ("plain",) and cfg.baselines == ("plain",)
    assert stages.CoconutStageConfig().formats == ("plain", "markers")
    with pytest.raises(ValueError, match="formats=.*'plain' and 'markers'"):
        stages.CoconutStageConfig(formats="plain,bracketed")
    with pytest.raises(ValueError, match="at least one format"):
        stages.CoconutStageConfig(formats="")
    params = {"model": "tiny", "base_steps": 10, "batch_size": 8, "lr": 1e-3, "seed": 0}
    assert stages.BaseModelsConfig.from_params(params).kinds == ("cot", "nocot", "cot_markers")
    assert stages.BaseModelsConfig.from_params({**params, "base_kinds": "cot, nocot"}).kinds == ("cot", "nocot")
    with pytest.raises(ValueError, match="kinds="):
        stages.BaseModelsConfig.from_params({**params, "base_kinds": "cot,markers"})
