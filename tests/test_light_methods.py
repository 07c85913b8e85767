"""The light-weight methods: random prefix, steering, pause tokens, UPFT, planning tokens."""

import dataclasses

import pandas as pd
import pytest
import torch

from latentlib.batching import IGNORE, collate, cot_segments, encode_record, prompt_batch
from latentlib.evaluate import EvalSpec, evaluate
from latentlib.methods.light import pause, planning, prefix, steering, upft
from latentlib.recurrence import position_ids_for
from latentlib.tasks import Format, make_chain_record
from latentlib.training.loop import TrainConfig
from latentlib.training.losses import lm_loss

FMT = Format(" ")

OPS = ("+1", "+2", "+3", "*3", "*7")  # the fixture tokenizer's operations


def chain_records(n, n_ops=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = int(torch.randint(10, (1,), generator=g))
        ops = [OPS[int(i)] for i in torch.randint(len(OPS), (n_ops,), generator=g)]
        out.append(make_chain_record(start, ops, 10))
    return out


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------------------- random prefix


def test_prefix_vectors_are_reproducible_from_the_seed():
    a = prefix.prefix_vectors(2, 16, 0.5, scale=2.0, seed=3, draw=1, key="1 +2 =")
    assert torch.equal(a, prefix.prefix_vectors(2, 16, 0.5, scale=2.0, seed=3, draw=1, key="1 +2 ="))
    for other in ({"seed": 4, "draw": 1, "key": "1 +2 ="}, {"seed": 3, "draw": 2, "key": "1 +2 ="},
                  {"seed": 3, "draw": 1, "key": "1 +3 ="}):
        assert not torch.allclose(a, prefix.prefix_vectors(2, 16, 0.5, scale=2.0, **other))
    torch.testing.assert_close(a.square().mean(-1).sqrt(), torch.full((2,), 1.0))  # scale * rms each


def test_prepended_prefix_sits_before_the_first_real_token(tiny):
    model, tok, _ = tiny
    prompts = [tok(p)["input_ids"] for p in ("3 +1 *7 =", "1 =", "a b c 4 5")]
    ids, mask = prompt_batch(prompts, tok.pad_token_id)
    vecs = torch.stack([prefix.prefix_vectors(2, 64, 1.0, key=i) for i in range(3)])  # (B, 2, D)
    embeds, new_mask = prefix.prepend_prefix(model, ids, mask, vecs)
    emb = model.get_input_embeddings()
    for b, p in enumerate(prompts):
        real = new_mask[b].bool()
        assert int(real.sum()) == len(p) + 2 and bool(real[-(len(p) + 2):].all())  # left padding only
        row = embeds[b, real]
        assert torch.equal(row[:2], vecs[b])
        assert torch.equal(row[2:], emb(torch.tensor(p)))
    # Batched and left-padded equals each row alone.
    logits = model(inputs_embeds=embeds, attention_mask=new_mask, position_ids=position_ids_for(new_mask)).logits
    for b in range(3):
        real = new_mask[b].bool()
        alone = model(inputs_embeds=embeds[b:b + 1, real]).logits
        torch.testing.assert_close(logits[b, -1], alone[0, -1], atol=1e-5, rtol=1e-5)


def test_prefix_evaluation_is_reproducible_and_independent_of_batching(tiny):
    model, tok, _ = tiny
    records = chain_records(12)
    cfg = prefix.PrefixConfig(n_prefix=2, scale=1.0, num_draws=1, seed=0)
    spec = prefix.prefix_spec(model, tok, cfg, 0, FMT, max_new_tokens=6)
    a = evaluate(model, tok, records, spec, FMT, batch_size=12, progress=False)
    b = evaluate(model, tok, records[::-1], spec, FMT, batch_size=5, progress=False)[::-1]
    assert list(a.prediction) == list(b.prediction)
    plain = evaluate(model, tok, records, EvalSpec("plain", max_new_tokens=6), FMT, progress=False)
    other = evaluate(model, tok, records, prefix.prefix_spec(model, tok, prefix.PrefixConfig(seed=1), 0, FMT,
                                                             max_new_tokens=6), FMT, progress=False)
    assert list(a.prediction) != list(plain.prediction)  # the prefix does something
    assert list(a.prediction) != list(other.prediction)  # and another seed does something else


def test_random_prefix_summary_invariants(tiny):
    model, tok, _ = tiny
    records = chain_records(10)
    res = prefix.evaluate_random_prefix(model, tok, records, prefix.PrefixConfig(num_draws=3), FMT, max_new_tokens=6)
    s = res.summary
    assert len(res.per_problem) == 10 * 4 and set(res.per_problem.draw) == {-1, 0, 1, 2}
    assert s["accuracy_prefix_min"] <= s["accuracy_prefix"] <= s["accuracy_prefix_max"] <= s["oracle_coverage"]
    assert s["oracle_coverage"] <= s["oracle_with_baseline"] <= 1
    assert s["oracle_with_baseline"] == pytest.approx(s["accuracy_baseline"] + s["rescued"], abs=1e-3)


@pytest.mark.parametrize("kwargs, match", [({"n_prefix": 0}, "n_prefix"), ({"scale": 0.0}, "scale"),
                                           ({"num_draws": 0}, "num_draws")])
def test_prefix_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        prefix.PrefixConfig(**kwargs)


def test_embedding_rms_table_lists_loaded_models(tiny):
    model, _, _ = tiny
    table = prefix.embedding_rms_table((), models={"fixture": model})
    w = model.get_input_embeddings().weight
    assert table.embedding_rms.iloc[0] == pytest.approx(float(w.detach().square().mean().sqrt()), rel=1e-4)


# ---------------------------------------------------------------------------- steering


def forward_logits(model, tok):
    ids, mask = prompt_batch([tok(p)["input_ids"] for p in ("3 +1 *7 =", "1 +2 =")], tok.pad_token_id)
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask)).logits


@torch.no_grad()
def test_steering_hook_is_removed_after_use_even_after_an_exception(tiny):
    model, tok, _ = tiny
    before = forward_logits(model, tok)
    v = torch.randn(64, generator=torch.Generator().manual_seed(0))
    with steering.steer(model, v, layer=1, coefficient=3.0):
        inside = forward_logits(model, tok)
    assert not torch.allclose(inside, before)
    assert torch.equal(forward_logits(model, tok), before)
    with pytest.raises(RuntimeError, match="boom"):
        with steering.steer(model, v, layer=2, coefficient=3.0):
            raise RuntimeError("boom")
    assert torch.equal(forward_logits(model, tok), before)
    assert all(len(block._forward_hooks) == 0 for block in steering.decoder_layers(model))


@torch.no_grad()
def test_prompt_only_steering_leaves_single_position_forwards_alone(tiny):
    model, tok, _ = tiny
    v = torch.randn(64, generator=torch.Generator().manual_seed(0))
    one = torch.tensor([[tok.convert_tokens_to_ids("3")]])
    plain, prompts = model(input_ids=one).logits, forward_logits(model, tok)
    with steering.steer(model, v, 0, 3.0, positions="prompt"):
        assert torch.equal(model(input_ids=one).logits, plain)
        assert not torch.allclose(forward_logits(model, tok), prompts)
    with steering.steer(model, v, 0, 3.0, positions="all"):
        assert not torch.allclose(model(input_ids=one).logits, plain)


@torch.no_grad()
def test_layer_activations_read_the_decoder_layer_outputs(tiny):
    model, tok, _ = tiny
    ids, mask = prompt_batch([tok(p)["input_ids"] for p in ("3 +1 *7 =", "1 +2 =")], tok.pad_token_id)
    acts = steering.layer_activations(model, ids, mask, [0, 2])
    hs = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask),
               output_hidden_states=True).hidden_states
    for k in (0, 2):
        torch.testing.assert_close(acts[k], hs[k + 1][:, -1])


@pytest.mark.parametrize("diffs, expected", [
    ([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]], 1.0),  # all the same way
    ([[1.0, 0.0], [0.0, 1.0]], 0.0),  # orthogonal
    ([[1.0, 1.0], [-1.0, -1.0]], -1.0),  # opposite
])
def test_cosine_consistency(diffs, expected):
    assert steering.cosine_consistency(torch.tensor(diffs)) == pytest.approx(expected, abs=1e-6)


def test_contrast_direction_is_the_difference_of_means(tiny):
    model, tok, _ = tiny
    pairs = [(tok(a)["input_ids"], tok(b)["input_ids"]) for a, b in
             (("3 +1 =", "3 +2 ="), ("5 *3 =", "5 *7 ="), ("1 +2 +3 =", "1 +3 +3 ="))]
    d = steering.contrast_directions(model, pairs, [1], pad_id=tok.pad_token_id)[1]
    pos = torch.cat([steering.layer_activations(model, *prompt_batch([p], tok.pad_token_id), [1])[1] for p, _ in pairs])
    neg = torch.cat([steering.layer_activations(model, *prompt_batch([n], tok.pad_token_id), [1])[1] for _, n in pairs])
    torch.testing.assert_close(d.vector, pos.mean(0) - neg.mean(0), atol=1e-4, rtol=1e-4)
    assert d.pair_diffs.shape == (3, 64) and -1 <= d.consistency <= 1


def test_steering_sweep_rows(tiny):
    model, tok, _ = tiny
    records = chain_records(6)
    pairs = [(encode_record(tok, a, FMT).question, encode_record(tok, b, FMT).question)
             for a, b in steering.first_step_parity_pairs(chain_records(8, seed=1), 4, max_add=3)]
    dirs = steering.contrast_directions(model, pairs, [0, 3], pad_id=tok.pad_token_id)
    table, per_problem = steering.steering_sweep(model, tok, records, dirs, [-1.0, 50.0],
                                                 EvalSpec("s", max_new_tokens=5), FMT,
                                                 readout=steering.first_step_even_rate)
    assert list(zip(table.layer, table.coefficient)) == [(-1, 0.0), (0, -1.0), (0, 50.0), (3, -1.0), (3, 50.0)]
    assert table.answer_changed.iloc[0] == 0 and table.answer_changed.max() > 0
    assert all(d.norm > 0 for d in dirs.values())
    assert len(per_problem) == 5 * 6 and "first_step_even" in table


def test_first_step_parity_pairs_differ_only_in_the_first_operation():
    pairs = steering.first_step_parity_pairs(chain_records(20), 10, seed=0, max_add=3)
    assert len(pairs) == 10
    for even, odd in pairs:
        assert int(even.steps[0]) % 2 == 0 and int(odd.steps[0]) % 2 == 1
        a, b = even.question.split(), odd.question.split()
        assert a[0] == b[0] and a[2:] == b[2:] and {a[1], b[1]} <= {"+1", "+2", "+3"} and a[1] != b[1]


def test_first_step_even_rate_reads_the_written_chain():
    df = pd.DataFrame({"question": ["1 +1 *3 =", "1 +1 *3 =", "1 +1 *3 ="],
                       "prediction": ["2 6 #### 6", "3 9 #### 9", "4 7 #### 7"]})
    assert steering.first_step_even_rate(df) == {"first_step_even": pytest.approx(2 / 3, abs=1e-4),
                                                 "follows_first_step": pytest.approx(2 / 3, abs=1e-4)}


# ---------------------------------------------------------------------------- UPFT


@pytest.mark.parametrize("row, n, expected", [
    ([0, 1, 1, 1, 1, 0], 2, [0, 1, 1, 0, 0, 0]),
    ([0, 1, 1, 1, 1, 0], 8, [0, 1, 1, 1, 1, 0]),  # shorter than n: all of it
    ([1, 0, 1, 0, 1, 1], 3, [1, 0, 1, 0, 1, 0]),
    ([0, 0, 0], 4, [0, 0, 0]),
])
def test_first_n_mask(row, n, expected):
    assert upft.first_n_mask(torch.tensor([row]).bool(), n)[0].long().tolist() == expected


@pytest.mark.parametrize("n", [1, 3, 8, 40])
@pytest.mark.parametrize("truncate", [True, False])
def test_upft_labels_cover_exactly_the_first_n_reasoning_tokens(tiny, n, truncate):
    _, tok, _ = tiny
    records = [make_chain_record(3, ops, 10) for ops in (["+1", "*3", "+2", "*7", "+3"], ["+2"])]
    encs = [encode_record(tok, r, FMT) for r in records]
    batch = collate([upft.upft_segments(e, n, truncate=truncate) for e in encs], tok.pad_token_id)
    for b, e in enumerate(encs):
        reasoning = [t for s in e.steps for t in s]
        labelled = batch["labels"][b][batch["labels"][b] != IGNORE].tolist()
        assert labelled == reasoning[:n]  # exactly the first n, or all when the reasoning is shorter
        assert e.answer[0] not in labelled


def test_truncated_prefix_gives_the_masked_loss_and_gradients(tiny):
    model, tok, _ = tiny
    encs = [encode_record(tok, r, FMT) for r in chain_records(4, n_ops=5)]
    grads, losses = [], []
    for truncate in (True, False):
        model.zero_grad()
        batch = collate([upft.upft_segments(e, 3, truncate=truncate) for e in encs], tok.pad_token_id)
        loss, _ = lm_loss(model, batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    model.zero_grad()


def test_bucketed_loss_equals_the_one_padded_batch(tiny):
    model, tok, _ = tiny
    encs = [encode_record(tok, r, FMT) for r in chain_records(8, n_ops=5)]
    examples = upft.upft_examples(encs, upft.UPFTConfig(prefix_tokens=2, structure_ratio=0.3), seed=1)
    assert 0 < sum(len(ex) == 3 for ex in examples) < len(examples)  # a mix of whole and prefix examples
    buckets = upft.collate_buckets(examples, tok.pad_token_id)
    assert {k.split(":")[0] for k in buckets} == {"0", "1"}
    with torch.no_grad():
        a, _ = upft.bucketed_lm_loss(model, buckets)
        b, _ = lm_loss(model, collate(examples, tok.pad_token_id))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ratio, expected", [(0.0, 0), (1.0, 50)])
def test_upft_structure_ratio_extremes(tiny, ratio, expected):
    _, tok, _ = tiny
    encs = [encode_record(tok, r, FMT) for r in chain_records(50)]
    examples = upft.upft_examples(encs, upft.UPFTConfig(prefix_tokens=2, structure_ratio=ratio))
    assert sum(ex == cot_segments(e) for ex, e in zip(examples, encs)) == expected


def test_sample_prefixes_are_the_models_own_tokens(tiny):
    model, tok, _ = tiny
    encs = upft.sample_prefixes(model, tok, chain_records(3), 4, FMT, temperature=1.0, seed=0)
    again = upft.sample_prefixes(model, tok, chain_records(3), 4, FMT, temperature=1.0, seed=0)
    assert encs == again and all(1 <= len(e.steps[0]) <= 4 for e in encs)


def test_upft_training_step_changes_every_parameter(tiny):
    model, tok, _ = tiny
    before = snapshot(model)
    cfg = upft.UPFTConfig(prefix_tokens=2, train=TrainConfig(steps=1, batch_size=8, lr=1e-2, warmup_steps=0))
    upft.train_upft(model, tok, chain_records(16), cfg, FMT, progress=False)
    changed = {n: not torch.equal(p, before[n]) for n, p in model.named_parameters()}
    assert all(changed.values()), [n for n, c in changed.items() if not c]


# ---------------------------------------------------------------------------- pause tokens


@pytest.mark.parametrize("placement", ["append", "prepend"])
@pytest.mark.parametrize("kind", ["nocot", "cot"])
def test_pause_segments_put_no_loss_on_pauses(tiny, placement, kind):
    _, tok, ids = tiny
    enc = encode_record(tok, make_chain_record(3, ["+1", "*3"], 10), FMT)
    batch = collate([pause.pause_segments(enc, ids["<pause>"], 3, placement=placement, kind=kind)], tok.pad_token_id)
    row, labels = batch["input_ids"][0], batch["labels"][0]
    at = (row == ids["<pause>"]).nonzero().flatten().tolist()
    q = len(enc.question)
    assert at == ([q, q + 1, q + 2] if placement == "append" else [0, 1, 2])
    assert (labels[row == ids["<pause>"]] == IGNORE).all()
    target = [t for s in enc.steps for t in s] * (kind == "cot") + list(enc.answer)
    assert labels[labels != IGNORE].tolist() == target


def test_pause_row_training_changes_only_the_pause_row(tiny):
    model, tok, ids = tiny
    before = snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    cfg = pause.PauseConfig(n_pause=2, trainable="pause_row",
                            train=TrainConfig(steps=2, batch_size=8, lr=1e-2, warmup_steps=0))
    pause.train_pause(model, tok, chain_records(16), cfg, FMT, progress=False)
    for name, p in model.named_parameters():
        if p is model.get_input_embeddings().weight:
            changed = (p != before[name]).any(-1).nonzero().flatten().tolist()
            assert changed == [ids["<pause>"]]
        else:
            assert torch.equal(p, before[name]), name
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_pause_training_changes_every_parameter(tiny):
    model, tok, ids = tiny
    before = snapshot(model)
    cfg = pause.PauseConfig(n_pause=2, train=TrainConfig(steps=1, batch_size=8, lr=1e-2, warmup_steps=0))
    pause.train_pause(model, tok, chain_records(16), cfg, FMT, progress=False)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not torch.equal(model.get_input_embeddings().weight[ids["<pause>"]],
                           before["model.embed_tokens.weight"][ids["<pause>"]])


def test_pause_spec_prompts_end_with_the_pauses(tiny):
    model, tok, ids = tiny
    spec = pause.pause_spec(tok, 3, Format("\n"))
    prompt = spec.prompt(make_chain_record(3, ["+1"], 10))
    assert list(prompt[-3:]) == [ids["<pause>"]] * 3 and ids["<pause>"] not in prompt[:-3]


@pytest.mark.parametrize("kwargs, match", [
    ({"n_pause": 0}, "n_pause"), ({"placement": "middle"}, "placement"), ({"kind": "x"}, "kind"),
    ({"trainable": "lora"}, "trainable"),
    ({"trainable": "pause_row", "train": TrainConfig(weight_decay=0.1)}, "weight_decay"),
])
def test_pause_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pause.PauseConfig(**kwargs)


# ---------------------------------------------------------------------------- planning tokens


def test_planning_token_before_every_step_and_invisible(tiny):
    model, tok, _ = tiny
    n_before = model.get_input_embeddings().weight.shape[0]
    plan = planning.add_plan_token(model, tok)
    assert model.get_input_embeddings().weight.shape[0] == n_before + 1 and plan in tok.all_special_ids
    enc = encode_record(tok, make_chain_record(3, ["+1", "*3", "+2"], 10), FMT)
    batch = collate([planning.planning_segments(enc, plan)], tok.pad_token_id)
    labelled = batch["labels"][0][batch["labels"][0] != IGNORE].tolist()
    steps = [list(s) for s in enc.steps]
    assert labelled == [plan] + steps[0] + [plan] + steps[1] + [plan] + steps[2] + list(enc.answer)
    # Planning tokens are special, so evaluation does not count them as visible.
    df = evaluate(model, tok, [make_chain_record(3, ["+1"], 10)], EvalSpec("p", max_new_tokens=4), FMT, progress=False)
    assert df.visible_tokens.iloc[0] <= 4


def test_planning_training_changes_every_parameter(tiny):
    model, tok, _ = tiny
    cfg = planning.PlanningConfig(train=TrainConfig(steps=1, batch_size=8, lr=1e-2, warmup_steps=0))
    plan = planning.add_plan_token(model, tok)
    before = snapshot(model)
    planning.train_planning(model, tok, chain_records(16), cfg, FMT, progress=False)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not torch.equal(model.get_input_embeddings().weight[plan], before["model.embed_tokens.weight"][plan])


# ---------------------------------------------------------------------------- orchestration


def test_light_methods_table_smoke(tmp_path, monkeypatch):
    from latentlib.stages import LightConfig, light_methods_table
    from latentlib.tasks import TaskConfig

    monkeypatch.setenv("LATENTLIB_RUNS", str(tmp_path))
    cfg = LightConfig(task=TaskConfig(n_train=64, n_test=8), steps=2, batch_size=16, warmup_steps=0, prefix_draws=2,
                      steer_pairs=4, steer_layers=(0,), steer_coefficients=(1.0,), steer_row=(0, 1.0),
                      upft_tokens=(2,), eval_batch=8)
    res = light_methods_table("smoke", cfg)
    t = res.table.set_index("method")
    assert t.loc["baseline (CoT)", "train_time_x"] == 1.0 and t.accuracy.between(0, 1).all()
    assert {"random prefix (CoT)", "pause x4 untrained (no-CoT)", "pause x4 trained (no-CoT)", "UPFT n=2",
            "planning tokens", "steering (layer 0, x1)"} <= set(t.index)
    assert t.loc["UPFT n=2", "train_tokens_x"] < 1 < t.loc["planning tokens", "train_tokens_x"]
    assert t.step_time_x.gt(0).all() and t.loc["baseline (CoT)", "step_time_x"] == 1.0
    assert (tmp_path / "smoke" / "light" / "cot").is_dir()  # no base model of this budget in base/: trained here
    again = light_methods_table("smoke", cfg)  # every model is reused from the run directory
    timing = ["step_time_x"]  # measured anew each call
    pd.testing.assert_frame_equal(again.table.drop(columns=timing), res.table.drop(columns=timing))
    longer = light_methods_table("smoke", dataclasses.replace(cfg, steps=3))  # another budget: every row retrained
    assert [len(longer.details[k]) for k in ("history upft2", "history planning")] == [3, 3]
    assert len(res.details["history upft2"]) == 2


def test_training_free_table_on_a_chat_free_model(tiny):
    from latentlib.stages import training_free_table

    model, tok, _ = tiny
    records = chain_records(6)
    pairs = [(encode_record(tok, a, FMT).question, encode_record(tok, b, FMT).question)
             for a, b in steering.first_step_parity_pairs(chain_records(8, seed=1), 4, max_add=3)]
    res = training_free_table(model, tok, records, FMT, prompt=lambda r: encode_record(tok, r, FMT).question,
                              pairs=pairs,
                              layers=[1], coefficients=[2.0], prefix=prefix.PrefixConfig(num_draws=2),
                              max_new_tokens=5)
    assert list(res.table.method) == ["baseline", "random prefix (n=2, x1 RMS)", "steering (layer 1, x2)"]
    assert res.details["steering sweep"].accuracy.iloc[0] == res.table.accuracy.iloc[0]
