"""The stage commands: the notebooks' parameters, refused before anything runs when wrong,
and the same artifacts the notebooks make (so each reuses what the other made)."""

import pytest
import torch

from latentlib import stages
from latentlib.train import STAGES, main, stage_parameters


def test_every_stage_names_a_notebook_and_reads_its_parameters():
    for stage, (notebook, _) in STAGES.items():
        params = stage_parameters(stage, "params/tiny.yaml")
        assert params["model"] == "tiny" and "seed" in params, stage


@pytest.mark.parametrize("argv, message", [
    (["bsae", "--params", "params/tiny.yaml"], "unknown stage 'bsae' (did you mean 'base'?)"),
    (["base", "--params", "params/tiny.yaml", "-p", "base_step", "3"], "Did you mean 'base_steps'?"),
    (["base", "--params", "params/tiny.yaml", "-p", "qthink_steps", "3"], "unknown parameter 'qthink_steps'"),
    (["base", "--params", "params/tiny.yaml", "-p", "model", "smollm2-135m"], "conflicts with the preset 'tiny'"),
    (["base", "--params", "params/none.yaml"], "no parameter file"),
])
def test_bad_commands_are_refused_with_the_fix(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTLIB_RUNS", str(tmp_path))
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing ran


def test_a_parameter_file_of_another_preset_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LATENTLIB_RUNS", str(tmp_path / "runs"))
    assert main(["base", "--params", "params/smollm2-135m.yaml", "-p", "model", "tiny"]) == 2
    assert "conflicts with the preset 'smollm2-135m'" in capsys.readouterr().err
    mislabelled = tmp_path / "tiny.yaml"
    mislabelled.write_text("model: smollm2-135m\nseed: 0\n")
    assert main(["base", "--params", str(mislabelled)]) == 2
    assert "named for preset 'tiny' but holds the parameters of 'smollm2-135m'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_the_command_makes_what_the_stage_function_reuses(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LATENTLIB_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("LATENTLIB_REPORTS", str(tmp_path / "reports"))
    argv = ["base", "--params", "params/tiny.yaml", "-p", "base_steps", "3", "-p", "n_train", "600", "-p", "n_test", "8",
            "--run", "cli"]
    assert main(argv) == 0
    assert "base/cot: trained" in capsys.readouterr().out
    params = stage_parameters("base", "params/tiny.yaml", {"base_steps": "3", "n_train": "600", "n_test": "8"})
    reused = stages.base_models("cli", stages.BaseModelsConfig.from_params(params), progress=False)
    assert {m.status for m in reused.values()} == {"reused"}


def test_a_killed_stage_resumes_from_the_checkpoint_its_checkpoint_every_parameter_wrote(tmp_path, monkeypatch):
    """``-p checkpoint_every`` reaches the training loop through the notebook's parameters; run
    again after a crash, the stage trains only the steps after the last checkpoint and ends
    with the weights of an uninterrupted run."""
    from safetensors.torch import load_file

    from latentlib.methods import cot

    monkeypatch.setenv("LATENTLIB_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("LATENTLIB_REPORTS", str(tmp_path / "reports"))
    calls, crash = [], {"at": None}

    def loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == crash["at"]:
            raise RuntimeError("the machine went away")
        return real(*args, **kwargs)

    real = cot.lm_loss
    monkeypatch.setattr(cot, "lm_loss", loss)
    argv = ["base", "--params", "params/tiny.yaml", "-p", "base_steps", "6", "-p", "base_kinds", "cot",
            "-p", "batch_size", "8", "-p", "n_train", "600", "-p", "n_test", "8", "-p", "checkpoint_every", "2"]
    assert main([*argv, "--run", "straight"]) == 0
    assert len(calls) == 6  # one loss per optimizer step

    calls.clear()
    crash["at"] = 5  # in step 5: steps 2 and 4 are checkpointed
    with pytest.raises(RuntimeError, match="went away"):
        main([*argv, "--run", "crashed"])
    base = tmp_path / "runs" / "crashed" / "base"
    assert not (base / "cot").exists() and len(list(base.glob(".cot-*.ckpt"))) == 1
    calls.clear()
    crash["at"] = None
    assert main([*argv, "--run", "crashed"]) == 0
    assert len(calls) == 2  # steps 5 and 6 only
    assert not list(base.glob(".cot-*.ckpt"))  # the artifact holds the weights now
    a, b = (load_file(tmp_path / "runs" / r / "base" / "cot" / "model.safetensors") for r in ("straight", "crashed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
