"""Several processes: DDP and FSDP2 against one process, checkpoints of what is trained,
the GRPO reference without a copy, main-process-only writes, and what a bad distributed
setup gets told.

The multi-process tests run ``torchrun`` with 2 CPU processes (gloo) and are marked slow
(``pytest -m slow -k distributed``); each takes a few minutes on a shared 2-core machine.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from latentlib import artifacts, distributed
from latentlib.batching import collate, cot_segments, encode_record
from latentlib.presets import Preset, build_tiny_model, build_tiny_tokenizer
from latentlib.tasks import ChainConfig, Format, chain_vocabulary, make_chain_splits
from latentlib.training.lora import apply_lora
from latentlib.training.losses import lm_loss
from latentlib.training.loop import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", **extra}


def _run(cmd, *, env=None, timeout=900, check=True):
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env or _env(), timeout=timeout,
                         cwd=ROOT)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def _torchrun(*args):
    return [TORCHRUN, "--nproc_per_node", "2", *args]


# ---------------------------------------------------------------------------- one process: what is saved


def _tiny(hidden=32):
    cfg = ChainConfig(n_train=64, n_valid=0, n_test=0, seed=3)
    tok = build_tiny_tokenizer(chain_vocabulary(cfg))
    model = build_tiny_model(len(tok), Preset("t", "scratch", hidden_size=hidden, num_layers=2, num_heads=2,
                                              num_kv_heads=1, intermediate_size=64), seed=1)
    examples = [cot_segments(encode_record(tok, r, Format(" "))) for r in make_chain_splits(cfg).train]
    return model, tok, examples


def test_save_state_dict_moves_tensors_one_at_a_time_and_copies_only_shared_ones(tmp_path, monkeypatch):
    import safetensors.torch

    seen = {}
    real = safetensors.torch.save_file

    def spy(tensors, path, metadata=None):
        seen.update(tensors)
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(artifacts, "save_file", spy)
    w, b = torch.randn(4, 3), torch.randn(3)
    artifacts.save_state_dict({"w": w, "tied": w, "b": b, "strided": w.t()}, tmp_path / "x.safetensors")
    assert seen["w"].data_ptr() == w.data_ptr() and seen["b"].data_ptr() == b.data_ptr()  # written as they are
    assert seen["tied"].data_ptr() != w.data_ptr() and seen["strided"].is_contiguous()  # copied where needed
    back = artifacts.load_state_dict_file(tmp_path / "x.safetensors")
    assert torch.equal(back["tied"], w) and torch.equal(back["strided"], w.t())


def test_a_lora_checkpoint_holds_only_what_is_trained_and_resumes_exactly(tmp_path):
    def lora_model():
        model, tok, examples = _tiny(hidden=64)
        torch.manual_seed(0)
        return apply_lora(model, r=4, alpha=8, targets=("q_proj", "v_proj")), tok, examples

    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-2, warmup_steps=0, checkpoint_every=3, log_every=1, seed=2)
    straight, tok, examples = lora_model()
    train(straight, examples, lambda b: collate(b, tok.pad_token_id), lm_loss, cfg, progress=False)
    model, tok, examples = lora_model()
    train(model, examples, lambda b: collate(b, tok.pad_token_id), lm_loss, cfg, checkpoint_dir=tmp_path,
          progress=False, stop_after=3)
    ckpt = tmp_path / "checkpoint"
    saved = artifacts.load_state_dict_file(ckpt / "model.safetensors")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(saved) == trained and all("lora_" in k for k in saved)
    full = sum(t.numel() for t in model.state_dict().values())
    assert sum(t.numel() for t in saved.values()) < full / 10
    assert set(artifacts.load_tree(ckpt, "optimizer")["state"]) == {f"model.{n}" for n in trained}  # by name
    resumed, tok, examples = lora_model()  # a fresh process: new adapters, then the checkpoint
    res = train(resumed, examples, lambda b: collate(b, tok.pad_token_id), lm_loss, cfg, checkpoint_dir=tmp_path,
                progress=False)
    assert res.resumed_from == 3
    a, b = straight.state_dict(), resumed.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resuming a LoRA run"


def test_the_switch_adapter_holds_only_what_was_trained_and_loads_back(tmp_path):
    from latentlib.methods import switch as sw
    from latentlib.tokens import add_special_tokens

    model, tok, _ = _tiny(hidden=64)
    add_special_tokens(model, tok)
    preset = Preset("t", "scratch", use_lora=True, lora_r=4, lora_alpha=8)
    peft_model = sw.make_trainable(model, tok, preset)
    with torch.no_grad():  # as if trained
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    sw.save_switch_model(peft_model, tok, tmp_path / "a", {"seed": 0, "switch_config": {}})
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if "original_module" in k]  # the frozen base embeddings are not in it
    base, _ = _tiny(hidden=64)[:2]
    loaded, _ = sw.load_switch_adapter(base, tmp_path / "a")
    ids = torch.tensor([tok.encode("3 +4 <swi> 7")])
    peft_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, peft_model(input_ids=ids).logits, rtol=0, atol=0)
        with peft_model.disable_adapter(), loaded.disable_adapter():  # the base's new rows: as at training
            torch.testing.assert_close(loaded(input_ids=ids).logits, peft_model(input_ids=ids).logits, rtol=0,
                                       atol=0)


def test_the_grpo_reference_of_a_peft_model_is_the_model_with_its_adapter_disabled(monkeypatch):
    import copy

    from latentlib.methods.switch import grpo

    model, tok, _ = _tiny(hidden=64)
    base = copy.deepcopy(model)
    peft_model = apply_lora(model, r=4, alpha=8, targets=("q_proj", "v_proj"))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    monkeypatch.setattr(grpo.copy, "deepcopy", lambda *a, **k: pytest.fail("the reference must not copy a PEFT model"))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), grpo.reference_scorer(peft_model)() as ref:
        assert ref is peft_model
        torch.testing.assert_close(ref(input_ids=ids).logits, base(input_ids=ids).logits)
    with torch.no_grad():
        assert not torch.allclose(peft_model(input_ids=ids).logits, base(input_ids=ids).logits)  # adapter back on
    monkeypatch.undo()
    with torch.no_grad(), grpo.reference_scorer(base)() as ref:  # no adapter: a frozen copy
        assert ref is not base and not any(p.requires_grad for p in ref.parameters())


def test_one_process_helpers_do_the_plain_thing():
    assert distributed.world() == 1 and distributed.is_main() and not distributed.is_distributed()
    assert distributed.map_sharded([1, 2, 3], lambda xs: [x * 10 for x in xs]) == [10, 20, 30]
    assert distributed.on_main(lambda: 7) == 7
    with pytest.raises(KeyError):
        distributed.check_all_ranks(KeyError("x"), "loading")
    model = torch.nn.Linear(2, 2)
    with distributed.gathered(model) as m:
        assert m is model
    assert distributed.whole_state_dict(model)["weight"] is model.state_dict()["weight"] or torch.equal(
        distributed.whole_state_dict(model)["weight"], model.weight)


# ---------------------------------------------------------------------------- several processes


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_distributed_engine_gradients_match_one_process(tmp_path, kind):
    """The engine's multi-pass forward with plain and checkpointed chunks under DDP and
    FSDP2, on 2 processes: the gathered gradients equal the one-process gradients of the
    whole batch (up to float reassociation, < 1e-6 on gradients of size ~1e-2); deferred
    weight gradients are used under DDP and switched off under FSDP."""
    _run(_torchrun(ROOT / "tests" / "grad_worker.py", kind, tmp_path / "g.json"))
    result = json.loads((tmp_path / "g.json").read_text())
    for checkpoint in ("checkpoint=False", "checkpoint=True"):
        r = result[checkpoint]
        assert r["parallel"] == kind
        assert r["max_abs_diff"] < 1e-6, (checkpoint, r)
        if checkpoint == "checkpoint=False":
            assert r["deferrable_weights"] > 0
            assert r["deferred_products"] > 0, r  # deferred weight gradients work under both


def _smollm2(mode, cmd, tmp_path, name, env=None, extra=()):
    out = tmp_path / f"{name}.json"
    _run([*cmd, ROOT / "tests" / "dist_worker.py", mode, out, *extra], env=env, timeout=1800)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The one-process runs the 2-process ones are compared with (computed once); a GRPO
    run also saves its rollouts, which the 2-process runs replay."""
    cache = {}

    def get(mode):
        if mode not in cache:
            where = tmp_path_factory.mktemp(mode)
            rollouts = where / "rollouts.safetensors"
            cache[mode] = _smollm2(mode, [sys.executable], where, "one",
                                   extra=("--record", rollouts) if mode == "grpo" else ())
            cache[mode]["rollouts"] = rollouts
        return cache[mode]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
@pytest.mark.parametrize("mode", ["coconut", "grpo"])
def test_distributed_smollm2_two_processes_match_one(tmp_path, one_process, mode, kind):
    """Real SmolLM2-135M with LoRA, 5 steps at a global batch of 4, 2 processes against 1:
    the same losses. Tolerance 1e-4 absolute: the processes compute the same global batch
    in two halves, which changes only the order of float sums (measured at most 2e-6
    on Coconut losses near 3 and GRPO losses near 0.1); an error of substance (a missing
    gradient all-reduce, a wrong token normalisation, other rollout seeds) moves the
    losses by 1e-2 or more. FSDP holds half the parameter bytes per process.

    GRPO: the 2 processes generate their own rollouts every step, and those of the first
    step (identical weights) must be the one process's token for token; the losses are
    then taken on the one process's recorded rollouts (``dist_worker.py --replay``),
    because a later sampled token may flip on a float-rounding difference of the weights
    (seen under FSDP2 at step 5), which says nothing about the training."""
    one = one_process(mode)
    extra = ("--replay", one["rollouts"]) if mode == "grpo" else ()
    two = _smollm2(mode, _torchrun(), tmp_path, kind, env=_env(**(FSDP_ENV if kind == "fsdp" else {})), extra=extra)
    assert two["parallel"] == kind and two["processes"] == 2
    assert len(one["losses"]) == len(two["losses"]) == 5
    diffs = [abs(a - b) for a, b in zip(one["losses"], two["losses"])]
    print(f"{mode} {kind}: losses {one['losses']} vs {two['losses']}, max |diff| {max(diffs):.1e}; "
          f"own rollouts the recorded ones per step: {two.get('same_rollouts')}")
    assert max(diffs) < 1e-4, (one["losses"], two["losses"])
    if mode == "grpo":
        assert sum(one["latent_steps"]) > 0  # the rollouts did think in latent blocks
        assert len(two["same_rollouts"]) == 5 and two["same_rollouts"][0], two["same_rollouts"]
    single = one["ranks"][0]["parameter_bytes"]
    per_rank = [r["parameter_bytes"] for r in two["ranks"]]
    if kind == "fsdp":
        assert all(0.45 * single < b < 0.55 * single for b in per_rank), (single, per_rank)
    else:
        assert per_rank == [single, single]


def _tiny_run(cmd, tmp_path, name, env=None, check=True):
    out = _run([*cmd, ROOT / "tests" / "train_worker.py", tmp_path / name, tmp_path / f"{name}.safetensors"],
               env=env, check=check, timeout=900)
    return out, {step: loss for step, (loss, _) in _rows(out.stdout).items()}


def _rows(stdout: str) -> dict[int, tuple[float, float]]:
    """The worker's history rows: step -> (loss, the processes' mean label id)."""
    return {int(s): (float(loss), float(ids))
            for s, loss, ids in re.findall(r"step (\d+) loss (\d+\.\d{8}) ids (\d+\.\d{8})", stdout)}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_distributed_a_killed_rank_leaves_no_half_written_checkpoint_and_the_run_resumes(tmp_path, kind):
    """Rank 1 is SIGKILLed after step 10 (torchrun then stops rank 0): the checkpoint of
    step 9 is complete, nothing half-written is taken for it, and the same command
    resumes and ends with bitwise the weights of the uninterrupted 2-process run."""
    from safetensors.torch import load_file

    env = _env(**(FSDP_ENV if kind == "fsdp" else {}))
    _tiny_run(_torchrun(), tmp_path, "straight", env=env)
    out, _ = _tiny_run(_torchrun(), tmp_path, "crashed", env={**env, "KILL_RANK": "1", "KILL_AT_STEP": "10"},
                       check=False)
    assert out.returncode != 0
    ckpt = tmp_path / "crashed" / "checkpoint"
    assert artifacts.is_complete(ckpt) and artifacts.load_json(ckpt / "progress.json")["step"] == 9
    assert not (tmp_path / "crashed.safetensors").exists()
    _, resumed = _tiny_run(_torchrun(), tmp_path, "crashed", env=env)
    assert min(resumed) == 10  # it resumed from step 9
    a, b = load_file(tmp_path / "straight.safetensors"), load_file(tmp_path / "crashed.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after a rank died and the run resumed"


@pytest.mark.slow
def test_distributed_a_checkpoint_inside_a_history_row_resumes_into_the_processes_mean(tmp_path):
    """A checkpoint between two history rows (every 3 steps, a row every 4) keeps the open
    row's sums; on 2 processes a metric each one measures on its own share of the batch
    (here the mean token id of its labels) is saved as their mean, so the row the resumed
    run completes is the uninterrupted run's, not one with the main process's share for its
    first steps."""
    env = _env(LOG_EVERY="4")
    out, _ = _tiny_run(_torchrun(), tmp_path, "straight", env=env)
    straight = _rows(out.stdout)
    out, _ = _tiny_run(_torchrun(), tmp_path, "crashed", env={**env, "KILL_RANK": "1", "KILL_AT_STEP": "8"},
                       check=False)
    assert out.returncode != 0
    progress = artifacts.load_json(tmp_path / "crashed" / "checkpoint" / "progress.json")
    assert progress["step"] == 6 and set(progress["running"]) == {"loss", "label_id"}  # steps 5 and 6 of the row to 8
    out, _ = _tiny_run(_torchrun(), tmp_path, "crashed", env=env)
    resumed = _rows(out.stdout)
    assert sorted(resumed) == [8, 12, 16, 20, 24]
    for step, (loss, label_id) in resumed.items():
        assert loss == pytest.approx(straight[step][0], abs=1e-6), step
        assert label_id == pytest.approx(straight[step][1], abs=1e-6), step


@pytest.mark.slow
def test_distributed_a_run_resumed_with_another_number_of_processes_continues_the_same_curve(tmp_path):
    """Decision: checkpoints hold whole tensors by name and the global batches do not
    depend on the number of processes, so a run killed on 2 processes resumes on 1 (the
    state is re-sharded) and continues the uninterrupted curve up to float rounding
    (tolerance 1e-5, as 2 processes against 1; bitwise needs the same number), saying so."""
    _, one = _tiny_run([sys.executable], tmp_path, "one")
    out, _ = _tiny_run(_torchrun(), tmp_path, "moved", env=_env(KILL_RANK="1", KILL_AT_STEP="10"), check=False)
    assert out.returncode != 0
    out, resumed = _tiny_run([sys.executable], tmp_path, "moved")
    assert "written by 2 process(es) with 1" in out.stdout and "bitwise only with the same number" in out.stdout
    assert min(resumed) == 10 and max(resumed) == 24
    for step in resumed:
        assert abs(resumed[step] - one[step]) < 1e-5, (step, resumed[step], one[step])


@pytest.mark.slow
def test_distributed_weights_missing_on_one_rank_stop_every_rank_with_one_message(tmp_path):
    """Rank 1's machine lacks the weights: both processes stop at once (no collective
    left waiting) with one message naming rank 1, what failed and the fix."""
    script = tmp_path / "load.py"
    script.write_text(
        "import os, sys\n"
        "from latentlib import presets\n"
        "from latentlib.presets import Preset, build_tiny_model, build_tiny_tokenizer\n"
        f"d = {str(tmp_path / 'weights')!r}\n"
        "if os.environ['RANK'] == '0':\n"
        "    tok = build_tiny_tokenizer(['a', 'b']); m = build_tiny_model(len(tok))\n"
        "    m.save_pretrained(d); tok.save_pretrained(d)\n"
        "presets.PRESETS['local'] = Preset('local', 'hub', hub_id=d if os.environ['RANK'] == '0' else d + '-absent')\n"
        "presets.load_model('local')\n"
        "print('loaded', flush=True)\n")
    out = _run(_torchrun(script), env=_env(HF_HUB_OFFLINE="1"), check=False, timeout=300)
    assert out.returncode != 0 and "loaded" not in out.stdout
    assert "loading the weights of preset 'local' failed on 1 of 2 processes (1 succeeded): rank 1" in out.stderr
    assert "put the weights on every machine" in out.stderr and "nothing was trained or written" in out.stderr


@pytest.mark.slow
def test_distributed_a_batch_that_does_not_split_over_the_processes_is_refused(tmp_path):
    script = tmp_path / "odd.py"
    script.write_text(
        "from latentlib.training.loop import TrainConfig, train\n"
        "import torch\n"
        "train(torch.nn.Linear(2, 1), list(range(30)), lambda b: {}, lambda m, b: (m.weight.sum(), {}),\n"
        "      TrainConfig(steps=1, batch_size=15), progress=False)\n")
    out = _run(_torchrun(script), check=False, timeout=300)
    assert out.returncode != 0
    assert "batch_size=15 is not divisible by 2 processes; use a multiple of 2" in out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate launch --config_file configs/accelerate/fsdp2.yaml"])
def test_distributed_a_stage_command_writes_once_and_matches_one_process(tmp_path, launcher):
    """The unchanged stage command under ``torchrun`` (DDP) and under ``accelerate launch``
    with the shipped FSDP2 config (mixed precision off: this CPU compares with fp32): the
    main process alone writes the artifacts, the evaluation is split over the processes
    and gathered (every test problem once, in order), the tied head is saved once as by one
    process, and the trained weights equal the one-process run's up to float rounding
    (1e-5) but for the rare elements whose AdamW step the rounding decides (see below); a
    process training on its half alone moves most elements by far more."""
    from safetensors.torch import load_file

    args = ["-m", "latentlib.train", "base", "--params", "params/tiny.yaml", "-p", "base_steps", "4",
            "-p", "batch_size", "8", "-p", "n_train", "64", "-p", "n_test", "10", "-p", "threads", "1"]
    env1 = _env(LATENTLIB_RUNS=str(tmp_path / "one"))
    env2 = _env(LATENTLIB_RUNS=str(tmp_path / "two"))
    _run([sys.executable, *args], env=env1)
    if launcher == "torchrun":
        out = _run(_torchrun(*args), env=env2)
    else:
        accelerate = Path(sys.executable).with_name("accelerate")
        out = _run([accelerate, "launch", "--config_file", ROOT / "configs" / "accelerate" / "fsdp2.yaml",
                    "--num_processes", "2", "--mixed_precision", "no", *args], env=env2)
        assert "FSDP2: 4 Qwen3DecoderLayer layers sharded" in out.stdout
    assert out.stdout.count("[train] base") == 1 and "on 2 processes" in out.stdout
    for name in ("cot", "nocot", "cot_markers"):
        a = load_file(tmp_path / "one" / "tiny" / "base" / name / "model.safetensors")
        b = load_file(tmp_path / "two" / "tiny" / "base" / name / "model.safetensors")
        assert a.keys() == b.keys()  # tied weights saved once either way
        for k in a:
            diff = (a[k] - b[k]).abs()
            # AdamW divides each element's step by the root of its own squared gradients, so an element
            # whose gradient is at the level of float rounding moves by up to lr per step, in a direction
            # the rounding decides: rare (seen: 1 element of 65,536), bounded by steps x lr = 0.012
            assert diff.max() <= 4 * 0.003, (name, k, diff.max())
            assert (diff > 1e-5).float().mean() <= 1e-3, (name, k, int((diff > 1e-5).sum()), diff.numel())
    files1 = sorted(p.name for p in (tmp_path / "one" / "tiny" / "eval").iterdir())
    files2 = sorted(p.name for p in (tmp_path / "two" / "tiny" / "eval").iterdir())
    assert files1 == files2 and not [f for f in files2 if f.startswith(".")]
    import pandas as pd

    for f in files1:
        q1 = pd.read_csv(tmp_path / "one" / "tiny" / "eval" / f).question.tolist()
        q2 = pd.read_csv(tmp_path / "two" / "tiny" / "eval" / f).question.tolist()
        assert q1 == q2 and len(q1) == 10
    leftovers = [p for p in (tmp_path / "two" / "tiny" / "base").iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


def test_a_sharded_model_is_saved_with_its_tied_head_once(tmp_path):
    """FSDP2 (in a one-process gloo group): the gathered state gives a tied head and the
    embedding one tensor, so ``save_pretrained`` writes it once, as for an unsharded model."""
    import torch.distributed as dist
    from safetensors.torch import load_file
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = _tiny(hidden=32)[0]
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
        plain = model.state_dict()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert distributed.is_sharded(model)
        state = distributed.whole_state_dict(model)
        assert state["lm_head.weight"] is state["model.embed_tokens.weight"]
        assert set(state) == set(plain) and all(torch.equal(state[k], plain[k]) for k in plain)
        artifacts.write_pretrained(model, tmp_path / "m", state)
        assert set(load_file(tmp_path / "m" / "model.safetensors")) == set(plain) - {"lm_head.weight"}
    finally:
        dist.destroy_process_group()
