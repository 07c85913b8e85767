"""QThink/CODI: the thought loop equals the card's, the losses, LoRA, and safe checkpoints."""

import os
import pickle

import pytest
import torch

from latentlib import artifacts, teacher
from latentlib.batching import encode_record
from latentlib.injection import ProjectionHead
from latentlib.methods.qthink import (HEAD_FILE, HeadShapeError, UnsafeCheckpointError, load_head, load_qthink,
                                      make_projection, qthink_segments, save_head, save_qthink, think)
from latentlib.recurrence import latent_forward
from latentlib.methods.qthink import (DistillConfig, distill_distance, distill_examples, distill_loss,
                                      make_distill_batch, train_qthink)
from latentlib.tasks import Format, Record
from latentlib.training.lora import apply_lora
from latentlib.training.loop import TrainConfig, train

FMT = Format(" ")

RECORDS = [Record("1 +2 *3 =", ("3", "9"), "9"), Record("4 +1 +1 =", ("5", "6"), "6"),
           Record("2 *7 +3 =", ("4", "7"), "7"), Record("0 +3 *3 =", ("3", "9"), "9")]


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTLIB_RUNS", str(tmp_path / "runs"))
    return tmp_path / "runs"


def _batch(tok, ids, records, K=2, teacher_states=None):
    segs = [qthink_segments(encode_record(tok, r, FMT), K, ids["<latent>"]) for r in records]
    examples = [{"segments": s, "teacher": None if teacher_states is None else teacher_states[i]}
                for i, s in enumerate(segs)]
    return make_distill_batch(tok.pad_token_id)(examples)


# ---------------------------------------------------------------------------- inference


def test_think_equals_the_cards_reference_loop(tiny):
    """The card's loop: prompt forward, K x (head on the last hidden state, one cached
    forward of that vector), then greedy tokens."""
    model, tok, ids = tiny
    torch.manual_seed(0)
    projection = make_projection(model)
    K, new = 3, 5
    prompt = list(encode_record(tok, RECORDS[0], FMT).question)
    trace = think(model, tok, projection, [prompt], num_latent=K, max_new_tokens=new)

    with torch.no_grad():
        inputs = torch.tensor([prompt])
        mask = torch.ones_like(inputs)
        out = model(input_ids=inputs, attention_mask=mask, output_hidden_states=True, use_cache=True)
        past, latent = out.cache, out.hidden_states[-1][:, -1, :]
        for _ in range(K):
            latent = projection.head(latent)
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
            out = model(inputs_embeds=latent.unsqueeze(1), attention_mask=mask, cache=past,
                        output_hidden_states=True, use_cache=True)
            past, latent = out.cache, out.hidden_states[-1][:, -1, :]
        token = out.logits[:, -1].argmax(-1)
        reference = [token.item()]
        for _ in range(new - 1):
            if token.item() == tok.eos_token_id:
                break
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
            out = model(input_ids=token[:, None], attention_mask=mask, cache=past, use_cache=True)
            past, token = out.cache, out.logits[:, -1].argmax(-1)
            reference.append(token.item())
    assert trace.latent_steps.tolist() == [K]
    assert trace.text_ids(0) == reference


def test_new_head_starts_at_the_embedding_scale(tiny):
    model, _, _ = tiny
    projection = make_projection(model)
    x = torch.randn(8, model.config.hidden_size)
    rms = projection.head(x).pow(2).mean(-1).sqrt()
    emb = model.get_input_embeddings().weight.pow(2).mean().sqrt()
    torch.testing.assert_close(rms, emb.expand(8), rtol=0.05, atol=0)


# ---------------------------------------------------------------------------- checkpoints


def test_saved_head_reloads_to_identical_outputs(tiny, tmp_path):
    model, tok, ids = tiny
    torch.manual_seed(1)
    projection = make_projection(model)
    save_qthink(tmp_path / "ckpt", model, tok, projection, {"test": True, "seed": 0})
    state = torch.load(tmp_path / "ckpt" / HEAD_FILE, weights_only=True)
    assert sorted(state) == ["mlp.0.bias", "mlp.0.weight", "mlp.2.bias", "mlp.2.weight", "mlp.3.bias",
                             "mlp.3.weight"]  # the release's layout
    model2, tok2, projection2 = load_qthink(tmp_path / "ckpt")
    prompts = [list(encode_record(tok, r, FMT).question) for r in RECORDS]
    a = think(model, tok, projection, prompts, num_latent=3, max_new_tokens=4)
    b = think(model2, tok2, projection2, prompts, num_latent=3, max_new_tokens=4)
    assert torch.equal(a.thoughts, b.thoughts) and torch.equal(a.tokens, b.tokens)


def test_head_of_the_wrong_shape_is_refused_with_the_shapes(tmp_path):
    save_head(ProjectionHead(32), tmp_path / HEAD_FILE)
    with pytest.raises(HeadShapeError) as e:
        load_head(tmp_path / HEAD_FILE, hidden_size=64)
    msg = str(e.value)
    assert "(32, 32)" in msg and "(64, 64)" in msg and "hidden size 32" in msg and "train a new head" in msg


def test_head_with_wrong_keys_is_refused(tmp_path):
    torch.save({"weight": torch.zeros(4, 4)}, tmp_path / HEAD_FILE)
    with pytest.raises(HeadShapeError, match="mlp.0.weight"):
        load_head(tmp_path / HEAD_FILE, hidden_size=4)


class _RunsCode:
    """An object whose unpickling runs a shell command."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_carrying_code_is_refused_and_never_run(tmp_path, writer):
    sentinel = tmp_path / "pwned"
    path = tmp_path / HEAD_FILE
    payload = {"mlp.0.weight": _RunsCode(sentinel)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        load_head(path, hidden_size=4)
    assert not sentinel.exists()
    # the file really does carry code: an unsafe load would have run it
    with open(path, "rb") as f:
        assert b"system" in f.read()


# ---------------------------------------------------------------------------- losses


@pytest.mark.parametrize("kind", ["smooth_l1", "mse", "cosine"])
def test_distance_is_zero_on_the_teacher_and_scale_free(kind):
    torch.manual_seed(0)
    s, t = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    assert distill_distance(t.clone(), t, kind).item() == pytest.approx(0.0, abs=1e-6)
    assert distill_distance(s, t, kind).item() > 0
    assert distill_distance(10 * s, 10 * t, kind).item() == pytest.approx(distill_distance(s, t, kind).item(), rel=1e-5)


def _own_states(model, projection, batch, K):
    with torch.no_grad():
        out = latent_forward(model, batch["input_ids"], batch["attention_mask"], batch["latent_mask"],
                             injector=projection, capture_layers=(4,))
    return out.layers[4][batch["latent_mask"]].view(len(batch["input_ids"]), K, -1)  # (B, K, D)


def test_per_step_and_final_step_losses_differ_where_they_must(tiny):
    model, tok, ids = tiny
    torch.manual_seed(0)
    projection = make_projection(model)
    K = 3
    batch = _batch(tok, ids, RECORDS, K)
    own = _own_states(model, projection, batch, K)
    wrong_early = own.clone()
    wrong_early[:, :-1] += 1.0  # the teacher agrees with the student only at the last thought

    def loss(mode_steps, target):
        cfg = DistillConfig(mode="uniform", distill_steps=mode_steps, num_latent=K)
        slots = list(range(K)) if mode_steps == "per_step" else [K - 1]
        b = dict(batch, teacher=target[:, slots, None])  # (B, S, L=1, D)
        with torch.no_grad():
            return distill_loss(model, b, projection, cfg, [4])[1]["distill"]

    assert loss("final", wrong_early) == pytest.approx(0.0, abs=1e-6)
    assert loss("per_step", wrong_early) > 0.01
    assert loss("final", own) == pytest.approx(0.0, abs=1e-6) and loss("per_step", own) == pytest.approx(0.0, abs=1e-6)
    wrong_last = own.clone()
    wrong_last[:, -1] += 1.0
    assert loss("final", wrong_last) > loss("per_step", wrong_last) > 0  # per-step averages it with K-1 zeros


def test_modes_differ_as_documented(tiny):
    model, tok, ids = tiny
    projection = make_projection(model)
    K = 2
    batch = _batch(tok, ids, RECORDS, K)
    teacher_states = torch.randn(len(RECORDS), 1, 1, model.config.hidden_size)
    ce = distill_loss(model, batch, projection, DistillConfig(mode="latent", num_latent=K), [])
    assert set(ce[1]) == {"ce"}
    for gamma in (0.0, 2.0):
        cfg = DistillConfig(mode="uniform", num_latent=K, gamma=gamma)
        total, metrics = distill_loss(model, dict(batch, teacher=teacher_states), projection, cfg, [4])
        assert total.item() == pytest.approx(metrics["ce"] + gamma * metrics["distill"], rel=1e-5)
        assert metrics["ce"] == pytest.approx(ce[1]["ce"], rel=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "codi"}, "mode"), ({"distill_steps": "last"}, "distill_steps"), ({"gamma": -1}, "gamma"),
    ({"distance": "l2"}, "distance"), ({"num_latent": 0}, "num_latent"), ({"layers": ()}, "layers"),
    ({"lora_r": 0}, "lora_r"), ({"lora_targets": ()}, "lora_targets"),
])
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillConfig(**kwargs)


# ---------------------------------------------------------------------------- training


def _fake_teacher(run, model, tok, monkeypatch, K=2):
    """A teacher of the random model: rollouts that write the marker count as correct."""
    monkeypatch.setattr(teacher, "grade", lambda text, gold, mode: "####" in text)
    bias = torch.zeros(len(tok))
    bias[tok.convert_tokens_to_ids("####")] = 4.0
    handle = model.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)
    cfg = teacher.TeacherConfig(num_generations=8, temperature=3.0, max_completion_length=8, num_steps=K,
                                capture_layers=(-1, 2))
    summary = teacher.extract_teacher(model, tok, RECORDS, cfg, FMT, directory=artifacts.artifact_dir(run, "teacher",
                                                                                                      "teacher"),
                                      key="fake", meta={"seed": 0}, progress=False)
    handle.remove()
    return summary


def test_examples_leave_out_problems_without_a_teacher(tiny, runs, monkeypatch):
    model, tok, ids = tiny
    _fake_teacher("r", model, tok, monkeypatch)
    t = teacher.load_teacher("r", weighting="reward_weighted")
    assert 0 < int(t.has_teacher.sum()) < len(RECORDS), "the fixture should give some problems no teacher"
    cfg = DistillConfig(mode="reward_weighted", distill_steps="per_step", num_latent=2)
    ex = distill_examples(tok, RECORDS, cfg, FMT, teacher=t, layers=[2, 4])
    assert len(ex) == int(t.has_teacher.sum())
    assert ex[0]["teacher"].shape == (2, 2, model.config.hidden_size)  # (S=K, L, D)
    with pytest.raises(ValueError, match="num_steps=3"):
        distill_examples(tok, RECORDS, DistillConfig(mode="uniform", distill_steps="per_step", num_latent=3),
                         FMT, teacher=t, layers=[4])
    final = distill_examples(tok, RECORDS, DistillConfig(mode="uniform", num_latent=3), FMT, teacher=t,
                             layers=[4])
    assert final[0]["teacher"].shape == (1, 1, model.config.hidden_size)
    with pytest.raises(ValueError, match="same list"):
        distill_examples(tok, RECORDS[:2], cfg, FMT, teacher=t, layers=[4])


def _changed(before, module):
    return {n: not torch.equal(before[n], p.detach()) for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("use_lora", [False, True])
def test_training_changes_every_trainable_parameter(tiny, use_lora):
    model, tok, ids = tiny
    K = 2
    cfg = DistillConfig(mode="uniform", distill_steps="per_step", num_latent=K, use_lora=use_lora, lora_r=4,
                        lora_alpha=8)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    if use_lora:
        model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, targets=cfg.lora_targets)
    projection = make_projection(model)
    torch.manual_seed(0)
    examples = [{"segments": qthink_segments(encode_record(tok, r, FMT), K, ids["<latent>"]),
                 "teacher": torch.randn(K, 1, model.get_input_embeddings().weight.shape[1])} for r in RECORDS]
    before = {n: p.detach().clone() for n, p in [*model.named_parameters(), *projection.named_parameters()]}
    # two steps: LoRA's B starts at zero, so A receives its first gradient on the second step
    train(model, examples, make_distill_batch(tok.pad_token_id), lambda m, b: distill_loss(m, b, projection, cfg, [4]),
          TrainConfig(steps=2, batch_size=4, lr=1e-2, warmup_steps=0), extra_modules={"head": projection},
          progress=False)
    changed = {**_changed(before, model), **_changed(before, projection)}
    assert changed and all(changed.values()), [n for n, c in changed.items() if not c]
    if use_lora:
        assert all("lora_" in n for n in _changed(before, model))
        base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
                for n, p in model.named_parameters() if "lora_" not in n}
        assert set(base) == set(frozen)
        assert all(torch.equal(frozen[n], base[n].detach()) for n in frozen)


def test_lora_checkpoint_reloads_to_identical_outputs(tiny, tmp_path):
    model, tok, ids = tiny
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    cfg = DistillConfig(mode="latent", num_latent=2, use_lora=True, lora_r=4, lora_alpha=8,
                        lora_targets=("q_proj", "v_proj"))
    peft_model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, targets=cfg.lora_targets)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # adapters that change the outputs
    projection = make_projection(peft_model)
    save_qthink(tmp_path / "ckpt", peft_model, tok, projection, {"seed": 0})
    assert (tmp_path / "ckpt" / "adapter_config.json").is_file()
    loaded, tok2, projection2 = load_qthink(tmp_path / "ckpt", base_model=str(base_dir))
    prompts = [list(encode_record(tok, r, FMT).question) for r in RECORDS]
    a = think(peft_model, tok, projection, prompts, num_latent=2, max_new_tokens=4)
    b = think(loaded, tok2, projection2, prompts, num_latent=2, max_new_tokens=4)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.thoughts, b.thoughts)


def test_lora_targets_that_do_not_exist_are_named(tiny):
    model, _, _ = tiny
    with pytest.raises(ValueError, match="c_attn"):
        apply_lora(model, r=4, alpha=8, targets=("c_attn",))


@pytest.mark.parametrize("mode", ["sft", "latent", "uniform", "reward_weighted"])
def test_train_qthink_trains_and_its_checkpoint_reloads(tiny, runs, monkeypatch, tmp_path, mode):
    model, tok, ids = tiny
    _fake_teacher("r", model, tok, monkeypatch)
    cfg = DistillConfig(mode=mode, distill_steps="per_step", num_latent=2,
                        train=TrainConfig(steps=2, batch_size=2, lr=1e-3, warmup_steps=0))
    states = teacher.load_teacher("r", weighting=mode) if cfg.uses_teacher else None
    m, projection, result = train_qthink(model, tok, RECORDS, cfg, FMT, teacher=states, progress=False)
    assert result.steps == 2 and (projection is None) == (mode == "sft")
    save_qthink(tmp_path / mode, m, tok, projection, {"seed": 0})
    assert (tmp_path / mode / HEAD_FILE).is_file() == (mode != "sft")
    loaded, _, projection2 = load_qthink(tmp_path / mode)
    if projection is not None:
        for a, b in zip(projection.state_dict().values(), projection2.state_dict().values()):
            assert torch.equal(a, b)
    x = torch.tensor([[3, 4, 5]])
    torch.testing.assert_close(loaded(input_ids=x).logits, m(input_ids=x).logits)


def test_a_teacher_mode_without_a_teacher_is_refused(tiny):
    model, tok, _ = tiny
    with pytest.raises(ValueError, match="load_teacher"):
        train_qthink(model, tok, RECORDS, DistillConfig(mode="uniform"), FMT, progress=False)
