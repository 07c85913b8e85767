"""Coconut's examples, labels, loss, evaluation script and one training step, on the seeded tiny model."""

import pytest
import torch

from latentlib.batching import IGNORE, collate, encode_record
from latentlib.evaluate import evaluate
from latentlib.injection import make_injector
from latentlib.methods.coconut import (CoconutConfig, SeqVCR, coconut_segments, eval_spec, load_coconut, make_loss,
                                       plan_for, save_coconut, stage_examples, thought_script, train_coconut,
                                       without_curriculum)
from latentlib.policies import FREE, LATENT
from latentlib.recurrence import generate, latent_forward
from latentlib.tasks import Format, make_chain_record
from latentlib.tokens import token_ids
from latentlib.training.curriculum import CurriculumConfig
from latentlib.training.loop import TrainConfig
from latentlib.training.memory import saved_tensor_bytes

OPS = [("+1", "*3", "+2"), ("*7", "+3", "+1"), ("+2", "+2", "*3"), ("*3", "*7", "+1")]
RECORDS = [make_chain_record(s, ops, 10) for s, ops in zip((3, 1, 4, 7), OPS)]
FMT = Format(" ")
CUR = CurriculumConfig(end_stage=3)
C3 = CoconutConfig(max_latent_stage=3)


def _encoded(tok):
    return [encode_record(tok, r, FMT) for r in RECORDS]


@pytest.mark.parametrize("fmt", ["markers", "plain"])
@pytest.mark.parametrize("method", ["coconut", "pause", "icot", "cot"])
@pytest.mark.parametrize("stage,c", [(0, 1), (1, 1), (2, 2), (3, 1), (4, 2)])
def test_labels_masked_on_question_markers_and_thoughts(tiny, fmt, method, stage, c):
    model, tok, ids = tiny
    cfg = CoconutConfig(method=method, format=fmt, c_thought=c, max_latent_stage=3)
    enc = _encoded(tok)[0]
    plan = plan_for(stage, len(enc.steps), cfg)
    batch = collate([coconut_segments(enc, plan, cfg, token_ids(tok))], tok.pad_token_id)
    row, labels, latent = batch["input_ids"][0], batch["labels"][0], batch["latent_mask"][0]
    written = enc.steps if method == "cot" else enc.steps[plan.removed:]  # cot writes the removed steps in the slots
    kept = [t for s in written for t in s] + list(enc.answer)
    assert labels[labels != IGNORE].tolist() == kept  # loss on the written steps and the answer, nothing else
    nq = len(enc.question)
    assert (labels[:nq] == IGNORE).all()  # the question
    assert (labels[latent] == IGNORE).all()
    n_slots = plan.thoughts
    assert int(latent.sum()) == (n_slots if method == "coconut" else 0)
    if method == "pause":
        assert int((row == ids["<pause>"]).sum()) == n_slots and (labels[row == ids["<pause>"]] == IGNORE).all()
    if fmt == "markers":
        for marker in ("<bot>", "<eot>"):  # forced at inference: fed, never predicted
            where = row == ids[marker]
            assert int(where.sum()) == 1 and (labels[where] == IGNORE).all()
        between = (row == ids["<bot>"]).long().cumsum(0) - (row == ids["<eot>"]).long().cumsum(0) == 1
        inside = row[between][1:]  # what stands between the markers
        expected = {"coconut": [ids["<latent>"]] * plan.thoughts, "pause": [ids["<pause>"]] * plan.thoughts,
                    "icot": [], "cot": [t for s in enc.steps[:plan.removed] for t in s]}[method]
        assert inside.tolist() == expected
    else:
        assert not torch.isin(row, torch.tensor([ids["<bot>"], ids["<eot>"]])).any()


def test_plain_format_keeps_cot_positions_with_one_token_steps(tiny):
    """c = 1 and one-token steps: the thoughts sit exactly in the removed steps' columns."""
    _, tok, _ = tiny
    enc = _encoded(tok)[0]
    plain = CoconutConfig(format="plain", max_latent_stage=3)
    cot = collate([coconut_segments(enc, plan_for(0, 3, plain), plain, token_ids(tok))], 0)
    for k in range(1, 4):
        b = collate([coconut_segments(enc, plan_for(k, 3, plain), plain, token_ids(tok))], 0)
        assert b["input_ids"].shape == cot["input_ids"].shape
        assert torch.equal(b["labels"][~b["latent_mask"]], cot["labels"][~b["latent_mask"]])


def test_uniform_prob_builds_examples_at_other_stages(tiny):
    _, tok, _ = tiny
    enc = _encoded(tok) * 25
    ids = token_ids(tok)
    fixed = stage_examples(enc, 2, C3, ids)
    assert {sum(len(s) for r, s in ex if r == "latent") for ex in fixed} == {2}
    mixed = stage_examples(enc, 2, CoconutConfig(max_latent_stage=3, uniform_prob=1.0), ids)
    assert {sum(len(s) for r, s in ex if r == "latent") for ex in mixed} == {0, 1, 2, 3}


class _Recording(torch.nn.Module):
    """An injector that keeps every thought it makes, with its gradient."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.made = inner, []

    def forward(self, hidden_states):
        t = self.inner(hidden_states)
        t.retain_grad()
        self.made.append(t)
        return t


@pytest.mark.parametrize("fmt", ["markers", "plain"])
def test_batch_runs_through_latent_forward_with_gradients_on_thoughts(tiny, fmt):
    model, tok, ids = tiny
    cfg = CoconutConfig(format=fmt, max_latent_stage=3)
    batch = collate(stage_examples(_encoded(tok), 2, cfg, token_ids(tok)), tok.pad_token_id,
                    align="first_latent")
    assert int(batch["latent_mask"].sum()) == 2 * len(RECORDS)
    injector = _Recording(make_injector("hs[-1]"))
    loss, _ = make_loss(cfg, injector)(model, batch)
    loss.backward()
    assert len(injector.made) == 2  # one injection per thought column
    for t in injector.made:  # every thought receives gradient from the tokens after it
        assert t.grad is not None and (t.grad.abs().sum(-1) > 0).all()
    # ... and the first thought also through the second one (the recurrence)
    out = latent_forward(model, batch["input_ids"], batch["attention_mask"], batch["latent_mask"])
    first = batch["latent_mask"].float().argmax(1)
    assert out.thoughts.requires_grad and out.thoughts[torch.arange(len(first)), first].abs().sum() > 0


@pytest.mark.parametrize("fmt,method,expected", [
    ("markers", "coconut", ["bot", "L", "L", "L", "L", "eot"]),
    ("plain", "coconut", ["L", "L", "L", "L"]),
    ("markers", "pause", ["bot", "p", "p", "p", "p", "eot"]),
    ("plain", "pause", ["p", "p", "p", "p"]),
    ("markers", "icot", ["bot", "eot"]),
    ("plain", "icot", []),
    ("markers", "cot", ["bot", "w", "w", "eot"]),  # cot: the removed steps written freely between the markers
])
def test_thought_script(tiny, fmt, method, expected):
    _, tok, ids = tiny
    names = {ids["<bot>"]: "bot", ids["<eot>"]: "eot", ids["<pause>"]: "p", LATENT: "L", FREE: "w"}
    script = thought_script(4, CoconutConfig(method=method, format=fmt), token_ids(tok), written=2)
    assert [names[e] for e in script] == expected


@pytest.mark.parametrize("fmt", ["markers", "plain"])
def test_evaluation_takes_k_times_c_latent_steps(tiny, fmt):
    model, tok, _ = tiny
    spec = eval_spec(2, CoconutConfig(format=fmt, max_new_tokens=4, c_thought=2, max_latent_stage=3), tok, FMT)
    df = evaluate(model, tok, RECORDS, spec, FMT, progress=False)
    assert (df.latent_steps == 4).all()
    assert (df.visible_tokens <= 4).all()  # the forced markers are not visible tokens


def test_one_curriculum_step_changes_every_trainable_parameter(tiny):
    model, tok, _ = tiny
    injector = make_injector("projection", model)
    before = {n: p.detach().clone() for n, p in [*model.named_parameters(), *injector.named_parameters(prefix="inj")]}
    cur = CurriculumConfig(start_stage=2, end_stage=2, steps_per_stage=1,
                           train=TrainConfig(steps=0, batch_size=4, lr=1e-2, warmup_steps=0))
    run = train_coconut(model, tok, RECORDS, CoconutConfig(injection="projection", max_latent_stage=3), cur, FMT,
                        injector=injector, progress=False)
    assert [s.stage for s in run.stages] == [2] and run.stages[0].result.steps == 1
    after = dict([*model.named_parameters(), *injector.named_parameters(prefix="inj")])
    unchanged = [n for n, p in after.items() if torch.equal(before[n], p.detach())]
    assert not unchanged, f"parameters not updated: {unchanged}"
    assert any(n.startswith("inj") for n in after)  # the projection head is among them


def test_seq_vcr_terms():
    torch.manual_seed(0)
    vcr = SeqVCR(16, dim=8, var_weight=1.0, cov_weight=1.0)
    mask = torch.zeros(64, 5, dtype=torch.bool)
    mask[:, 1:3] = True  # two thoughts per row
    collapsed = torch.ones(64, 5, 16)  # every row's thought is the same vector
    loss, m = vcr(collapsed, mask)
    assert m["vcr_var"] == pytest.approx(1 - 1e-2, abs=1e-3) and m["vcr_cov"] == pytest.approx(0.0)
    spread = torch.randn(64, 5, 16) * 3  # wide and nearly uncorrelated
    _, m2 = vcr(spread, mask)
    assert m2["vcr_var"] < 0.05
    rank1 = torch.randn(64, 5, 1) * 3 * torch.ones(1, 1, 16)  # one direction: perfectly correlated coordinates
    _, m3 = vcr(rank1, mask)
    assert m3["vcr_cov"] > 10 * m2["vcr_cov"]
    spread.requires_grad_(True)
    vcr(spread, mask)[0].backward()
    assert spread.grad[mask].abs().sum() > 0 and spread.grad[~mask].abs().sum() == 0


def test_seq_vcr_costs_little_memory_and_is_measured(tiny):
    """SEQ-VCR keeps at least its projected thoughts for the backward (one float per thought
    and projected coordinate), and that is a small fraction of what the forward keeps."""
    model, tok, _ = tiny
    model.train()
    cfg = CoconutConfig(vcr_var=1.0, vcr_cov=0.04, max_latent_stage=3)
    batch = collate(stage_examples(_encoded(tok), 3, cfg, token_ids(tok)), tok.pad_token_id)
    vcr = SeqVCR(model.config.hidden_size)
    plain, _ = saved_tensor_bytes(lambda: make_loss(cfg, None)(model, batch))
    with_vcr, (loss, metrics) = saved_tensor_bytes(lambda: make_loss(cfg, None, vcr)(model, batch))
    projected = int(batch["latent_mask"].sum()) * vcr.projection.shape[0] * 4  # (thoughts, P) float32
    assert projected <= with_vcr - plain < 0.1 * plain
    assert {"ce", "vcr_var", "vcr_cov"} <= set(metrics)


def test_saved_tensor_bytes_counts_each_storage_once():
    x = torch.randn(100, 30, requires_grad=True)
    w = torch.randn(30, 20, requires_grad=True)
    saved, y = saved_tensor_bytes(lambda: (x @ w) @ w.T)  # the first product saves x and w, the second x@w and w
    assert saved == (100 * 30 + 30 * 20 + 100 * 20) * 4 and y.shape == (100, 30)
    with torch.no_grad():
        assert saved_tensor_bytes(lambda: x @ w)[0] == 0


@pytest.mark.parametrize("bad,match", [
    ({"method": "cocnut"}, "method='cocnut'"),
    ({"format": "paper"}, "format='paper'"),
    ({"injection": "hs[last]"}, "hs\\[last\\]"),
    ({"latent_positions": "none"}, "latent_positions='none'"),
    ({"vcr_var": -1.0}, "vcr_var=-1.0"),
])
def test_config_errors_name_the_value(bad, match):
    with pytest.raises(ValueError, match=match):
        CoconutConfig(**bad)


def test_without_curriculum_trains_the_last_stage_with_the_whole_budget():
    cur = CurriculumConfig(end_stage=4, steps_per_stage=10, final_stage_steps=30)
    cfg, flat = without_curriculum(CoconutConfig(uniform_prob=0.3), cur)
    assert (flat.start_stage, flat.end_stage, flat.final_stage_steps) == (4, 4, 60) and cfg.uniform_prob == 0.0
    assert flat.total_steps == cur.total_steps


def test_save_and_load_coconut_round_trip(tiny, tmp_path):
    """What save_coconut writes, load_coconut reads back: the same weights (so the same
    thoughts and tokens), both configurations, and a trained injector's weights."""
    model, tok, _ = tiny
    cfg = CoconutConfig(format="plain", injection="projection", c_thought=2, max_latent_stage=3)
    cur = CurriculumConfig(end_stage=3, steps_per_stage=7)
    injector = make_injector("projection", model)
    with torch.no_grad():
        for p in injector.parameters():
            p.add_(torch.randn_like(p) * 0.1, alpha=1.0)
    save_coconut(tmp_path / "m", model, tok, cfg, cur, injector=injector, meta={"seed": 0})
    saved = load_coconut(tmp_path / "m")
    assert saved.config == cfg and saved.curriculum == cur
    for (n, a), b in zip(injector.state_dict().items(), saved.injector.state_dict().values()):
        assert torch.equal(a, b), n
    spec_a = eval_spec(3, cfg, tok, FMT, injector=injector)
    spec_b = eval_spec(3, saved.config, saved.tokenizer, FMT, injector=saved.injector)
    a = evaluate(model, tok, RECORDS, spec_a, FMT, progress=False)
    b = evaluate(saved.model, saved.tokenizer, RECORDS, spec_b, FMT, progress=False)
    assert a.prediction.tolist() == b.prediction.tolist() and (b.latent_steps == 6).all()
    ids = torch.tensor([list(encode_record(tok, RECORDS[0], FMT).question)])
    out_a = generate(model, ids, torch.ones_like(ids), policy=spec_a.policy(RECORDS[:1]), max_new_tokens=8,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, injector=injector)
    out_b = generate(saved.model, ids, torch.ones_like(ids), policy=spec_b.policy(RECORDS[:1]), max_new_tokens=8,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, injector=saved.injector)
    assert torch.allclose(out_a.thoughts, out_b.thoughts, atol=1e-6)


def test_load_coconut_refuses_a_plain_model_directory(tiny, tmp_path):
    from latentlib import artifacts

    model, tok, _ = tiny
    artifacts.save_model(model, tok, tmp_path / "plain", {"seed": 0})
    with pytest.raises(ValueError, match="records no Coconut configuration"):
        load_coconut(tmp_path / "plain")


def test_saving_a_model_and_reading_it_back_draw_no_bar(tiny, tmp_path, capsys):
    """A run's own model saved to or read back from disk takes well under a second and a
    notebook does it many times: transformers' "Writing model shards" and "Loading weights"
    bars are hidden there (and only there)."""
    from transformers.utils import logging as hf_logging

    from latentlib import artifacts

    model, tok, _ = tiny
    capsys.readouterr()
    artifacts.save_model(model, tok, tmp_path / "plain", {"seed": 0})
    assert "Writing model shards" not in capsys.readouterr().err
    assert hf_logging.is_progress_bar_enabled()
    loaded, _ = artifacts.load_model_dir(tmp_path / "plain")
    assert "Loading weights" not in capsys.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # turned back on for every other load
    assert torch.equal(loaded.get_input_embeddings().weight, model.get_input_embeddings().weight)
