"""SWITCH: span wrapping, the parallel curriculum, the training formats, mixed-mode
inference and the published adapter layout."""

import pytest
import torch

from latentlib import artifacts
from latentlib.batching import collate, encode_record
from latentlib.methods import switch as sw
from latentlib.methods.switch import BlockPlan, Span
from latentlib.policies import SwitchPolicy
from latentlib.recurrence import generate
from latentlib.tasks import Format
from latentlib.tasks.synthetic import make_chain_record
from latentlib.training.loop import TrainConfig

FMT = Format(" ")

# ---------------------------------------------------------------------------- phase 1: spans

T, F = True, False
SPAN_CASES = [
    # (entropies, threshold, kwargs, expected spans as (start, end, wrapped))
    ([0.1, 0.9, 0.2, 0.8, 0.7, 0.1], 0.5, {}, [(0, 1, F), (1, 2, T), (2, 3, F), (3, 5, T), (5, 6, F)]),
    ([0.1, 0.9, 0.2, 0.8, 0.7, 0.1], 0.5, {"merge": False},
     [(0, 1, F), (1, 2, T), (2, 3, F), (3, 4, T), (4, 5, T), (5, 6, F)]),
    ([0.1, 0.2, 0.3], 0.5, {}, [(0, 3, F)]),
    ([0.9, 0.9, 0.9], 0.5, {}, [(0, 2, T), (2, 3, F)]),  # the last step stays text by default
    ([0.9, 0.9, 0.9], 0.5, {"wrap_last": True}, [(0, 3, T)]),
    ([0.1, 0.2, 0.9], 0.5, {}, [(0, 3, F)]),
    ([0.5, 0.6], 0.5, {}, [(0, 2, F)]),  # strictly above the threshold (and the last is excluded)
    ([0.9], 0.5, {"wrap_last": True}, [(0, 1, T)]),
    ([0.1, 0.9, 0.8, 0.7, 0.6, 0.1], 0.5, {"isolate": True}, [(0, 1, F), (1, 2, T), (2, 3, F), (3, 4, T), (4, 6, F)]),
    ([0.9, 0.9, 0.1, 0.9], 0.5, {"isolate": True, "wrap_last": True}, [(0, 1, T), (1, 3, F), (3, 4, T)]),
]


@pytest.mark.parametrize("entropies, threshold, kwargs, expected", SPAN_CASES)
def test_wrap_high_entropy_spans(entropies, threshold, kwargs, expected):
    steps = [str(i) for i in range(len(entropies))]
    spans = sw.wrap_high_entropy_spans(steps, entropies, threshold, **kwargs)
    assert [(s.start, s.end, s.wrapped) for s in spans] == expected


def test_wrapping_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match="one per step"):
        sw.wrap_high_entropy_spans(["1", "2"], [0.1], 0.5)


def test_step_entropy_and_threshold():
    assert sw.step_entropy([0.1, 0.4, 0.1], "max") == pytest.approx(0.4)
    assert sw.step_entropy([0.1, 0.4, 0.1], "mean") == pytest.approx(0.2)
    values = [float(i) for i in range(10)]
    thr = sw.entropy_threshold(values, 0.3)
    assert sum(v > thr for v in values) == 3


def test_render_switch_text():
    steps = ["7", "9", "1", "4"]
    spans = [Span(0, 1, False), Span(1, 3, True), Span(3, 4, False)]
    assert sw.render_switch_text(steps, spans, " ") == "7 <swi> 9 1 </swi> 4"
    assert sw.render_switch_text(steps, spans, " ", plans=[BlockPlan(1, 2)]) == "7 <swi> <latent> <latent> 1 </swi> 4"


def test_label_spans_pooled_by_operation():
    records = [make_chain_record(1, ["+1", "*3", "+2"], 10), make_chain_record(2, ["*3", "+1", "+2"], 10)]
    # Raw entropies disagree between problems; pooled per operation, *3 is the hardest.
    ents = [[0.1, 0.5, 0.2], [0.7, 0.3, 0.0]]
    spans, info = sw.label_spans(records, ents, sw.SpanRule(threshold=0.4, top_q=None, pool_by="op"))
    assert info["wrapped_keys"] == ["*3"]
    assert [[(s.start, s.end, s.wrapped) for s in sp] for sp in spans] == [
        [(0, 1, False), (1, 2, True), (2, 3, False)], [(0, 1, True), (1, 3, False)]]
    # Pooling also labels a record with no measurement of its own.
    spans2, _ = sw.label_spans(records, [ents[0], None], sw.SpanRule(threshold=0.4, top_q=None, pool_by="op"))
    assert spans2[1][0].wrapped
    with pytest.raises(ValueError, match="needs them"):
        sw.label_spans(records, [ents[0], None], sw.SpanRule())


@pytest.mark.parametrize("kwargs, match", [({"top_q": 0.3, "threshold": 0.1}, "exactly one"),
                                           ({"top_q": 1.5}, "fraction"), ({"aggregate": "median"}, "aggregate"),
                                           ({"pool_by": "step"}, "pool_by")])
def test_span_rule_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sw.SpanRule(**kwargs)


def test_gold_step_entropies_match_a_plain_forward(tiny):
    model, tok, _ = tiny
    records = [make_chain_record(3, ["+1", "*3"], 10), make_chain_record(5, ["+2", "+3", "*7"], 10)]
    ents = sw.gold_step_entropies(model, tok, records, FMT)
    assert [len(e) for e in ents] == [2, 3]
    enc = encode_record(tok, records[1], FMT)
    ids = torch.tensor([list(enc.question) + [t for s in enc.steps for t in s]])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    ent = -(logp.exp() * logp).sum(-1)
    q = len(enc.question)
    torch.testing.assert_close(torch.tensor(ents[1]), ent[q - 1:q + 2], atol=1e-5, rtol=1e-5)


def test_teacher_step_entropies_use_matching_correct_rollouts():
    import pandas as pd

    records = [make_chain_record(3, ["+1", "*3"], 10)]  # steps 4, 2
    rows = pd.DataFrame([
        {"problem": 0, "correct": True, "text": "4 2 #### 2", "positions": [0, 1, 2, 3], "entropy": [0.2, 0.4, 0, 0]},
        {"problem": 0, "correct": True, "text": "4 2 #### 2", "positions": [0, 1, 2, 3], "entropy": [0.4, 0.8, 0, 0]},
        {"problem": 0, "correct": True, "text": "5 2 #### 2", "positions": [0, 1, 2, 3], "entropy": [9, 9, 9, 9]},
        {"problem": 0, "correct": False, "text": "4 3 #### 3", "positions": [0, 1, 2, 3], "entropy": [9, 9, 9, 9]},
    ])
    ents = sw.teacher_step_entropies(rows, records, FMT)
    assert ents[0] == pytest.approx([0.3, 0.6])
    assert sw.teacher_step_entropies(rows.iloc[2:], records, FMT) == [None]


# ---------------------------------------------------------------------------- phase 2: schedule

SCHEDULE = [
    # (block units, stage, c, k_min, k_max, cap) -> [(replaced, latents)]
    ([1, 2], 0, 2, 4, 8, 48, [(0, 0), (0, 0)]),  # stage 0: phase 1's format
    ([1, 2], 1, 2, 4, 8, 48, [(1, 4), (1, 2)]),  # a fully replaced block gets K_min
    ([1, 2], 2, 2, 4, 8, 48, [(1, 4), (2, 4)]),
    ([3], 1, 2, 4, 8, 48, [(1, 2)]),
    ([3], 2, 2, 4, 8, 48, [(2, 4)]),
    ([3], 3, 2, 4, 8, 48, [(3, 6)]),
    ([6], 6, 2, 4, 8, 48, [(6, 8)]),  # K_max caps a block
    ([1, 1], 1, 2, 0, 8, 48, [(1, 2), (1, 2)]),  # K_min 0: c per step
    ([1, 1, 1], 1, 2, 4, 8, 8, [(1, 4), (1, 4), (0, 0)]),  # the per-sample cap keeps the third block as text
    ([2, 1], 1, 1, 1, 8, 48, [(1, 1), (1, 1)]),
    ([], 3, 2, 4, 8, 48, []),
]


@pytest.mark.parametrize("units, stage, c, k_min, k_max, cap, expected", SCHEDULE)
def test_parallel_schedule(units, stage, c, k_min, k_max, cap, expected):
    plans = sw.parallel_schedule(units, stage, c=c, k_min=k_min, k_max=k_max, latent_cap=cap)
    assert [(p.replaced, p.latents) for p in plans] == expected


def test_parallel_schedule_refuses_bad_arguments():
    with pytest.raises(ValueError):
        sw.parallel_schedule([1], -1)
    with pytest.raises(ValueError, match="at least one step"):
        sw.parallel_schedule([0], 1)


@pytest.mark.parametrize("kwargs, match", [({"k_min": 9}, "k_min"), ({"c_thought": 0}, "c_thought"),
                                           ({"latent_cap": 4}, "latent_cap"),
                                           ({"positions": "skip"}, "positions"),
                                           ({"positions": "block", "k_min": 0}, "k_min")])
def test_switch_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sw.SwitchConfig(**kwargs)


def test_segments_of_both_phases(tiny):
    _, tok, ids_ = tiny
    ids = sw.switch_ids(tok)
    record = make_chain_record(3, ["+1", "*3", "+2"], 10)  # steps 4 2 4
    enc = encode_record(tok, record, FMT)
    spans = [Span(0, 1, False), Span(1, 2, True), Span(2, 3, False)]
    four, two = enc.steps[0][0], enc.steps[1][0]
    p1 = collate([sw.switch_segments(enc, spans, ids)], tok.pad_token_id)
    q = len(enc.question)
    assert p1["input_ids"][0, q:q + 4].tolist() == [four, ids.swi, two, ids.swi_end]
    assert not p1["latent_mask"].any()
    assert (p1["labels"][0, q:] != -100).all()  # every token after the question is predicted, markers included
    p2 = collate([sw.switch_segments(enc, spans, ids, [BlockPlan(1, 4)])], tok.pad_token_id)
    row = p2["input_ids"][0, q:q + 7].tolist()
    assert row == [four, ids.swi, *[ids.latent] * 4, ids.swi_end]
    assert p2["latent_mask"][0, q + 2:q + 6].all() and p2["latent_mask"].sum() == 4
    assert (p2["labels"][0, q + 2:q + 6] == -100).all()  # no loss at slots
    assert p2["labels"][0, q + 6] == ids.swi_end  # the last slot predicts </swi>


def test_block_positions_keep_text_at_its_cot_positions(tiny):
    _, tok, _ = tiny
    ids = sw.switch_ids(tok)
    s, e, L = ids.swi, ids.swi_end, ids.latent
    # the CoT is [5, 6, 7, 8, 9]: a question token, then the steps s1 .. s4 at positions 1 .. 4
    rows = {  # each: the sequence, and the CoT position every written step must keep
        "phase 1": ([5, 6, s, 7, e, 8, 9], {1: 1, 3: 2, 5: 3, 6: 4}),
        "phase 2": ([5, 6, s, L, L, e, 8, 9], {1: 1, 6: 3, 7: 4}),
        "partial": ([5, s, L, L, 7, e, 8, 9], {4: 1, 6: 3, 7: 4}),  # the written rest of a block moves back
    }
    block = sw.SwitchConfig(positions="block")
    for name, (seq, keep) in rows.items():
        x = torch.tensor([seq])
        pos = block.position_ids(x, torch.ones_like(x), x == L, ids)[0].tolist()
        assert {col: pos[col] for col in keep} == keep, (name, pos)
    x = torch.tensor([[5, 6, s, L, L, e, 8]])
    cont = sw.SwitchConfig().position_ids(x, torch.ones_like(x), x == L, ids)
    assert cont.tolist() == [list(range(7))]
    assert block.position_ids(x, torch.ones_like(x), x == L, ids).tolist() == [[0, 1, 2, 2, 2, 2, 3]]
    stray = torch.tensor([[5, e, 6]])  # a </swi> outside any block is ordinary text
    assert block.position_ids(stray, torch.ones_like(stray), stray == L, ids).tolist() == [[0, 1, 2]]


# ---------------------------------------------------------------------------- inference


def test_latent_blocks():
    swi, eos, lat_id = 30, 1, 29
    latent = [F, T, T, T, F, F, F, T, T, F, F]
    tokens = [swi, lat_id, lat_id, lat_id, 31, 5, swi, lat_id, lat_id, 31, eos]
    assert sw.latent_blocks(latent, tokens, swi, eos) == [3, 2]
    assert sw.latent_blocks([F, F, F], [swi, 31, eos], swi, eos) == [0]
    assert sw.latent_blocks([F, F, F], [eos, swi, 5], swi, eos) == []
    assert sw.latent_blocks([F, F, T, T], [5, swi, lat_id, lat_id], swi, eos) == []  # cut while open


def test_schedule_stage_ends_fully_latent():
    cfg = sw.SwitchConfig(c_thought=2, k_max=8)
    assert [sw.schedule_stage(s, 3, cfg) for s in (1, 2, 3)] == [1, 2, 4]


def test_mixed_mode_batch_equals_sequences_alone(eager):
    model, tok, ids = eager
    prompts = ["1 +1 =", "2 *3 +2 =", "3 =", "4 +3 *7 =", "5 +1 =", "6 *7 =", "7 +2 +2 =", "8 *3 ="]
    enc = tok(prompts, return_tensors="pt", padding=True)
    policy = SwitchPolicy(ids["<swi>"], ids["</swi>"], k_min=2, k_max=4)
    kw = dict(policy=policy, max_new_tokens=14, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
              latent_token_id=ids["<latent>"], temperature=1.0)
    seeds = list(range(100, 100 + len(prompts)))
    batch = generate(model, enc.input_ids, enc.attention_mask, seeds=seeds, **kw)
    # Sequences really were in different modes in the same forwards.
    mixed = (batch.is_latent & batch.valid).any(0) & (~batch.is_latent & batch.valid).any(0)
    assert mixed.any() and batch.latent_steps.gt(0).any() and batch.latent_steps.eq(0).any()
    for b, p in enumerate(prompts):
        one = tok([p], return_tensors="pt")
        alone = generate(model, one.input_ids, one.attention_mask, seeds=[seeds[b]], **kw)
        n = int(alone.valid[0].sum())
        assert torch.equal(alone.tokens[0, :n], batch.tokens[b, :n])
        assert torch.equal(alone.is_latent[0, :n], batch.is_latent[b, :n])
        torch.testing.assert_close(alone.logprob[0, :n], batch.logprob[b, :n], atol=1e-4, rtol=1e-4)
    for b in range(len(prompts)):
        blocks = sw.latent_blocks(batch.is_latent[b], batch.tokens[b], ids["<swi>"], tok.eos_token_id)
        assert all(2 <= n <= 4 for n in blocks), blocks


def test_evaluate_switch_counts_blocks_and_never_violates_k_min(eager):
    model, tok, _ = eager
    records = [make_chain_record(s, ["+1", "*3"], 10) for s in range(8)]
    cfg = sw.SwitchConfig(k_min=3, k_max=5, max_new_tokens=16, positions="block")
    df = sw.evaluate_switch(model, tok, records, cfg, FMT, batch_size=4)
    assert len(df) == 8 and {"blocks", "block_steps", "kmin_violations"} <= set(df.columns)
    assert df.blocks.sum() > 0
    assert all(3 <= n <= 5 for steps in df.block_steps for n in steps) and df.kmin_violations.sum() == 0
    table = sw.summarize_switch(df)
    assert 0 <= table.with_block.iloc[0] <= 1
    text = sw.evaluate_switch(model, tok, records, cfg, FMT, mode="text", batch_size=8)
    assert text.latent_steps.sum() == 0


# ---------------------------------------------------------------------------- training paths


def _records(n=8):
    return [make_chain_record(s % 10, ["+1", "*3", "+2"], 10) for s in range(n)]


def test_phase1_lora_path_trains_adapters_embeddings_and_head(tiny):
    from latentlib.presets import Preset

    model, tok, _ = tiny
    preset = Preset("lora-test", "hub", use_lora=True, lora_r=4, lora_alpha=8)
    peft_model = sw.make_trainable(model, tok, preset)
    trainable = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("embed_tokens" in n for n in trainable)
    assert any("lm_head" in n or "embed_tokens.modules_to_save" in n for n in trainable)
    records = _records()
    spans = [[Span(0, 1, False), Span(1, 2, True), Span(2, 3, False)]] * len(records)
    sw.train_phase1(peft_model, tok, records, spans, TrainConfig(steps=1, batch_size=4, lr=1e-2, warmup_steps=0),
                    sw.SwitchConfig(), FMT, progress=False)
    for n, p in peft_model.named_parameters():
        if n in trainable and "lora_A" not in n:  # lora_A has no gradient while lora_B is still 0
            assert not torch.equal(p, trainable[n]), f"{n} did not change"
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"


def test_phase2_step_trains_with_thoughts(tiny):
    model, tok, _ = tiny
    records = _records()
    spans = [[Span(0, 1, False), Span(1, 2, True), Span(2, 3, False)]] * len(records)
    from latentlib.training.curriculum import CurriculumConfig

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cur = CurriculumConfig(start_stage=1, end_stage=1, steps_per_stage=1,
                           train=TrainConfig(steps=0, batch_size=4, lr=1e-3, warmup_steps=0))
    out = sw.train_phase2(model, tok, records, spans, sw.SwitchConfig(k_min=2), cur, FMT, progress=False)
    assert out[0].result.steps == 1
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)


def test_a_stage_beyond_the_schedule_is_refused(tiny):
    model, tok, _ = tiny
    from latentlib.training.curriculum import CurriculumConfig

    cur = CurriculumConfig(start_stage=1, end_stage=5, steps_per_stage=1,
                           train=TrainConfig(steps=0, batch_size=4, lr=1e-3, warmup_steps=0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"end_stage=5 is beyond the schedule.*at most 4 stages"):
        sw.train_phase2(model, tok, _records(), [[Span(0, 1, True)]] * 4, sw.SwitchConfig(c_thought=2, k_max=8), cur,
                        FMT, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing trained


def test_load_switch_adapter_in_the_published_layout(tmp_path):
    """Base without the tokens; adapter dir = adapter + tokenizer with <swi> </swi> <latent>."""
    from peft import LoraConfig, get_peft_model

    from latentlib.presets import Preset, build_tiny_model, build_tiny_tokenizer
    from latentlib.tokens import add_special_tokens, trainable_token_config

    words = [str(i) for i in range(10)] + ["+1", "*3", "="]
    tok = build_tiny_tokenizer(words)
    preset = Preset("t", "scratch", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)
    base = build_tiny_model(len(tok), preset, seed=1)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    add_special_tokens(base, tok, ("<swi>", "</swi>", "<latent>"))
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], ensure_weight_tying=True,
                     **trainable_token_config(tok, whole_matrices=True))
    with artifacts.peft_quiet():  # peft reads a renamed transformers property
        model = get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    model.eval()
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    tok.save_pretrained(adapter)
    x = torch.tensor([[3, 4, len(tok) - 3, len(tok) - 1, len(tok) - 2, 5]])
    want = model(input_ids=x).logits
    from transformers import AutoModelForCausalLM

    for source in (tmp_path / "base", AutoModelForCausalLM.from_pretrained(tmp_path / "base")):  # a path, a model
        loaded, ltok = sw.load_switch_adapter(source, adapter)
        assert ltok.convert_tokens_to_ids(["<swi>", "</swi>", "<latent>"]) == tok.convert_tokens_to_ids(
            ["<swi>", "</swi>", "<latent>"])
        torch.testing.assert_close(loaded(input_ids=x).logits, want)
    with pytest.raises(FileNotFoundError, match="adapter_config"):
        sw.load_switch_adapter(tmp_path / "base", tmp_path / "base")
    # an adapter trained on another model (width 32) onto a base of width 48: refused, with what to do
    other = build_tiny_model(len(tok) - 3, Preset("o", "scratch", hidden_size=48, num_layers=2, num_heads=2,
                                                  num_kv_heads=1, intermediate_size=64), seed=2)
    with pytest.raises(sw.AdapterMismatchError, match=r"does not fit this base model.*size mismatch.*width 48"):
        sw.load_switch_adapter(other, adapter)


def test_save_and_load_switch_model_roundtrip(tiny, tmp_path):
    model, tok, _ = tiny
    sw.save_switch_model(model, tok, tmp_path / "m", {"kind": "test", "seed": 0})
    loaded, ltok = sw.load_switch_model(tmp_path / "m")
    x = torch.tensor([[3, 4, 5]])
    torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits)
    assert sw.switch_ids(ltok) == sw.switch_ids(tok)


@pytest.mark.parametrize("k_min, stay", [(2, [2, 3]), (4, []), (0, [0, 1, 2, 3]), (3, [3]), (1, [1, 2, 3])])
def test_stay_decisions_are_marked_from_k_min(tiny, k_min, stay):
    """A 4-slot block: the outputs of slots K_min <= i < 4 decide "stay" (slot 0 is <swi>)."""
    _, tok, _ = tiny
    ids = sw.switch_ids(tok)
    enc = encode_record(tok, make_chain_record(3, ["+1", "*3", "+2"], 10), FMT)
    spans = [Span(0, 1, False), Span(1, 3, True)]
    batch = collate([sw.switch_segments(enc, spans, ids, [BlockPlan(2, 4)])], tok.pad_token_id)
    marked = sw.mark_stay_decisions(batch, k_min)["stay_mask"][0]
    slots = batch["latent_mask"][0].nonzero().flatten().tolist()  # the columns of slots 1..4
    columns = [slots[0] - 1, *slots]  # <swi>, slot 1 .. slot 4
    assert [i for i, col in enumerate(columns) if marked[col]] == stay
    assert int(marked.sum()) == len(stay)


def test_stay_term_pushes_exit_down_at_marked_slots(tiny):
    model, tok, _ = tiny
    ids = sw.switch_ids(tok)
    enc = encode_record(tok, make_chain_record(3, ["+1", "*3", "+2"], 10), FMT)
    batch = collate([sw.switch_segments(enc, [Span(0, 1, False), Span(1, 3, True)], ids, [BlockPlan(2, 4)])],
                    tok.pad_token_id)
    loss_fn = sw.switch_loss(sw.SwitchConfig(k_min=2), ids)
    plain, _ = loss_fn(model, batch)
    total, metrics = loss_fn(model, sw.mark_stay_decisions(batch, 2))
    assert metrics["stay"] > 0 and total.item() == pytest.approx(plain.item() + metrics["stay"], rel=1e-5)


def test_a_missing_real_base_fails_fast_with_the_offline_message(monkeypatch):
    from latentlib.hub import WeightsUnavailableError
    from latentlib.presets import get_preset
    from latentlib.stages import load_base

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-latentlib-test")
    with pytest.raises(WeightsUnavailableError, match="hf download Qwen/Qwen3-8B") as info:
        load_base("any", get_preset("qwen3-8b"))
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no library frames in the report


def test_phase_inputs_are_found_by_run_name(tmp_path, monkeypatch):
    from latentlib import stages
    from latentlib.artifacts import MissingArtifactError
    from latentlib.presets import get_preset
    from latentlib.tasks import TaskConfig

    monkeypatch.setenv("LATENTLIB_RUNS", str(tmp_path))
    task = TaskConfig(n_train=20, n_test=5)
    with pytest.raises(MissingArtifactError, match="02_curriculum.ipynb"):
        stages.switch_phase3("r", stages.Phase3Config(task=task))
    with pytest.raises(MissingArtifactError, match="01_sft.ipynb"):
        stages.switch_phase2("r", stages.Phase2Config(task=task))
    with pytest.raises(MissingArtifactError, match="00_teacher_extraction.ipynb"):
        stages.load_base("r", get_preset("tiny"))


@pytest.mark.slow
def test_a_smollm2_switch_adapter_loads_with_the_cards_quick_start(tmp_path, smollm2):
    """The SWITCH card's quick-start, step by step, on an adapter trained here: the tokenizer
    from the adapter directory, the pretrained base resized to it, PeftModel.from_pretrained;
    then the engine's SWITCH inference gives the outputs it gave before saving."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from latentlib.presets import get_preset, load_model

    model, tok, _ = smollm2
    records = _records(8)
    spans = [[Span(0, 1, False), Span(1, 2, True), Span(2, 3, False)]] * len(records)
    peft_model = sw.make_trainable(model, tok, get_preset("smollm2-135m"))
    sw.train_phase1(peft_model, tok, records, spans, TrainConfig(steps=2, batch_size=4, lr=1e-3, warmup_steps=0),
                    sw.SwitchConfig(), Format("\n"), progress=False)
    peft_model.eval()
    cfg = sw.SwitchConfig(k_min=2, k_max=3, max_new_tokens=12)
    before = sw.evaluate_switch(peft_model, tok, records, cfg, Format("\n"), batch_size=8)
    adapter = tmp_path / "switch_phase3"
    sw.save_switch_model(peft_model, tok, adapter, {"kind": "test", "seed": 0})
    # the card's quick-start, with the offline base in place of from_pretrained("Qwen/Qwen3-8B")
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    base, _ = load_model("smollm2-135m")
    base.resize_token_embeddings(len(tokenizer))
    with artifacts.peft_quiet():  # peft reads a renamed transformers property
        loaded = PeftModel.from_pretrained(base, adapter).eval()
    tokenizer.padding_side = "left"
    after = sw.evaluate_switch(loaded, tokenizer, records, cfg, Format("\n"), batch_size=8)
    assert after.prediction.tolist() == before.prediction.tolist()
    assert after.latent_steps.tolist() == before.latent_steps.tolist()
