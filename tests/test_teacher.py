"""Teacher extraction: weights over correct rollouts, step parsing, storage in shards, resume."""

import math

import pytest
import torch

from latentlib import artifacts, teacher
from latentlib.stages.reuse import stage_key
from latentlib.tasks import Format, Record
from latentlib.teacher import (TeacherConfig, extract_teacher, load_rollouts, load_teacher, parse_layers,
                               parse_steps, rollout_rewards, step_slots, teacher_weights)

FMT = Format(" ")

RECORDS = [Record("1 +2 *3 =", ("3", "9"), "9"), Record("4 +1 +1 =", ("5", "6"), "6"),
           Record("2 *7 +3 =", ("4", "7"), "7"), Record("0 +3 *3 =", ("3", "9"), "9"),
           Record("5 +2 +2 =", ("7", "9"), "9")]


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTLIB_RUNS", str(tmp_path / "runs"))
    return tmp_path / "runs"


# ---------------------------------------------------------------------------- weights


@pytest.mark.parametrize("correct, logprob, uniform, weighted", [
    ([1, 0, 1, 0], [-0.1, -0.01, -1.0, -0.5], [0.5, 0, 0.5, 0],
     [math.exp(-0.1) / (math.exp(-0.1) + math.exp(-1.0)), 0, math.exp(-1.0) / (math.exp(-0.1) + math.exp(-1.0)), 0]),
    ([1, 1, 1, 1], [-0.2, -0.2, -0.2, -0.2], [0.25] * 4, [0.25] * 4),
    ([0, 0, 1, 0], [-3.0, -0.0, -2.0, -0.1], [0, 0, 1, 0], [0, 0, 1, 0]),
    ([0, 0, 0, 0], [-0.1, -0.2, -0.3, -0.4], [0, 0, 0, 0], [0, 0, 0, 0]),  # no correct rollout: no teacher
])
def test_weights_use_only_correct_rollouts_and_sum_to_one(correct, logprob, uniform, weighted):
    correct = torch.tensor(correct, dtype=torch.bool)
    rewards = rollout_rewards(correct, torch.tensor(logprob))
    assert (rewards[~correct] == 0).all()
    for weighting, expected in (("uniform", uniform), ("reward_weighted", weighted)):
        w = teacher_weights(correct, rewards, weighting)
        torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float))
        assert (w[~correct] == 0).all()
        assert w.sum().item() == pytest.approx(1.0 if correct.any() else 0.0)


def test_reward_weighting_prefers_confident_correct_rollouts():
    correct = torch.tensor([True, True, False])
    w = teacher_weights(correct, rollout_rewards(correct, torch.tensor([-0.1, -2.0, 0.0])), "reward_weighted")
    assert w[0] > w[1] > 0 and w[2] == 0


def test_unknown_weighting_is_refused():
    with pytest.raises(ValueError, match="reward_weighted"):
        teacher_weights(torch.ones(2, dtype=torch.bool), torch.ones(2), "softmax")


# ---------------------------------------------------------------------------- step boundaries


def _prefix_lengths(tokens, joiner):
    return [len(joiner.join(tokens[:j + 1])) for j in range(len(tokens))]


@pytest.mark.parametrize("tokens, joiner, separator, steps, marker, answer", [
    (["7", "9", "1", "####", "1"], " ", " ", [0, 1, 2], 3, 4),  # the tiny task: one word per step
    (["7", "9", "####"], " ", " ", [0, 1], 2, -1),  # no answer after the marker
    (["7", "9", "1"], " ", " ", [], -1, -1),  # no marker: unparsed
    (["####", "4"], " ", " ", [], 0, 1),  # a marker but no step
    (["a b", "\n", "c", "d\n", "#### ", "12"], "", "\n", [0, 3], 4, 5),  # line steps over several tokens
])
def test_parse_steps(tokens, joiner, separator, steps, marker, answer):
    text = joiner.join(tokens)
    assert parse_steps(_prefix_lengths(tokens, joiner), text, separator) == (steps, marker, answer)


@pytest.mark.parametrize("ends, K, slots", [
    ([10, 11, 12], 3, [10, 11, 12]),  # n == K: the identity
    ([1, 2, 3, 4, 5, 6], 3, [2, 4, 6]),  # n > K: evenly spaced, the last step last
    ([1, 2], 4, [1, 1, 2, 2]),  # n < K: repeated
    ([], 2, [-1, -1]),  # no step
])
def test_step_slots(ends, K, slots):
    assert step_slots(ends, K) == slots


def test_parse_layers():
    assert parse_layers("all", 4) == [0, 1, 2, 3, 4]
    assert parse_layers("-1,-3", 4) == [2, 4]
    assert parse_layers("last", 4) == [4]
    with pytest.raises(ValueError, match="does not exist"):
        parse_layers("7", 4)
    with pytest.raises(ValueError, match="comma-separated"):
        parse_layers("top", 4)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_generations": 0}, "num_generations"), ({"temperature": 0.0}, "temperature"),
    ({"capture_layers": ()}, "capture_layers"), ({"dtype": "int8"}, "dtype"),
])
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TeacherConfig(**kwargs)


# ---------------------------------------------------------------------------- aggregation


def test_shard_means_are_weighted_over_eligible_rollouts():
    G, P, D = 3, 4, 2
    cfg = TeacherConfig(num_generations=G, num_steps=2, capture_layers=(-1,))
    rows, states = [], []
    for i, (corr, parsed) in enumerate([([1, 0, 1], [1, 1, 1]), ([1, 1, 0], [0, 1, 1]), ([0, 0, 0], [1, 1, 1])]):
        for g in range(G):
            rows.append({"problem": i, "rollout": g, "correct": bool(corr[g]), "parsed": bool(parsed[g]),
                         "mean_logprob": -0.1 * (g + 1), "positions": [0] * P})
            states.append(torch.full((P, 1, D), float(10 * i + g)))
    tensors, frame, counts = teacher._finish_shard(rows, torch.stack(states), [0, 1, 2], cfg, [4])
    assert counts == {"rollouts": 9, "correct": 4, "parsed": 8, "without_teacher": 1}
    assert tensors["has_teacher"].tolist() == [True, True, False]
    # problem 0: rollouts 0 and 2 are eligible; problem 1: only rollout 1 (rollout 0 is correct but unparsed)
    assert tensors["uniform.layer4"][0, 0, 0].item() == pytest.approx(1.0)
    assert tensors["uniform.layer4"][1, 0, 0].item() == pytest.approx(11.0)
    w = torch.tensor([math.exp(-0.1), math.exp(-0.3)])
    expected = (w @ torch.tensor([0.0, 2.0])).item() / w.sum().item()
    assert tensors["reward_weighted.layer4"][0, 0, 0].item() == pytest.approx(expected)
    assert (tensors["uniform.layer4"][2] == 0).all() and (tensors["weights.uniform"][2] == 0).all()
    assert frame.groupby("problem")["weight_uniform"].sum().tolist() == pytest.approx([1, 1, 0])


# ---------------------------------------------------------------------------- end to end (tiny random model)


def _cfg(**kw):
    base = dict(num_generations=4, temperature=2.0, max_completion_length=6, num_steps=2,
                capture_layers=(-1, 2), shard_size=2, generation_batch_size=8)
    return TeacherConfig(**{**base, **kw})


def _extract(model, tok, records, cfg, run="r", **kw):
    """The extraction into run ``run``'s teacher directory, keyed by the configuration."""
    return extract_teacher(model, tok, records, cfg, FMT, directory=artifacts.artifact_dir(run, "teacher", "teacher"),
                           key=stage_key(cfg, {}), meta={"seed": cfg.seed}, progress=False, **kw)


def test_extraction_writes_shards_tables_and_states(tiny, runs):
    model, tok, _ = tiny
    s = _extract(model, tok, RECORDS, _cfg(keep_rollout_states=True), "r")
    assert artifacts.is_complete(s.directory) and s.shards == 3 and s.rollouts == 20
    assert sorted(p.name for p in s.directory.glob("shard-*")) == [
        f"shard-{i:05d}.{e}" for i in range(3) for e in ("parquet", "safetensors")]
    df = load_rollouts("r")
    assert len(df) == 20 and set(df.problem) == set(range(5))
    assert all(len(t) == len(e) == len(lp) == n for t, e, lp, n in zip(df.tokens, df.entropy, df.logprob, df.length))
    assert all(e >= 0 for row in df.entropy for e in row)
    assert s.fraction_correct == pytest.approx(df.correct.mean())
    assert s.layers == [2, 4]
    for weighting in ("uniform", "reward_weighted"):
        t = load_teacher("r", weighting=weighting)
        assert set(t.states) == {2, 4} and t.states[4].shape == (5, 4, model.config.hidden_size)
        assert t.has_teacher.tolist() == df.groupby("problem").apply(
            lambda g: bool((g.correct & g.parsed).any()), include_groups=False).tolist()
        # a problem without a teacher is all zeros, and counted
        assert (t.states[4][~t.has_teacher] == 0).all()
        assert s.problems_without_teacher == int((~t.has_teacher).sum())
    # the stored rollout states sit at the parsed positions of the generated sequence
    from safetensors.torch import load_file
    shard = load_file(str(s.directory / "shard-00000.safetensors"))
    assert shard["rollouts.layer4"].shape == (2, 4, 4, model.config.hidden_size)


def test_problems_with_correct_rollouts_get_a_teacher(tiny, runs, monkeypatch):
    """Grades forced: the rollouts that parse are 'correct', so teachers exist and are the
    mean of those rollouts' stored states."""
    model, tok, _ = tiny
    monkeypatch.setattr(teacher, "grade", lambda text, gold, mode: "####" in text)
    bias = torch.zeros(len(tok))
    bias[tok.convert_tokens_to_ids("####")] = 4.0  # make the random model write the marker now and then
    model.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)
    s = _extract(model, tok, RECORDS, _cfg(keep_rollout_states=True, temperature=3.0, max_completion_length=10))
    df = load_rollouts("r")
    t = load_teacher("r", weighting="uniform", layers=[-1])
    assert t.has_teacher.any(), "expected some rollout with a marker and a step at temperature 3"
    from safetensors.torch import load_file
    for shard in sorted(s.directory.glob("shard-*.safetensors")):
        f = load_file(str(shard))
        for row, i in enumerate(f["problem"].tolist()):
            w = torch.tensor(df[df.problem == i].sort_values("rollout").weight_uniform.to_numpy(), dtype=torch.float)
            manual = torch.einsum("g,gpd->pd", w, f["rollouts.layer4"][row].float())
            torch.testing.assert_close(t.states[4][i].float(), manual)


def test_batched_rollouts_equal_one_at_a_time(tiny, runs):
    model, tok, _ = tiny
    a = _extract(model, tok, RECORDS[:2], _cfg(generation_batch_size=8), "a")
    b = _extract(model, tok, RECORDS[:2], _cfg(generation_batch_size=1), "b")
    da, db = load_rollouts("a"), load_rollouts("b")
    assert da.tokens.map(list).tolist() == db.tokens.map(list).tolist()
    ta, tb = load_teacher("a", weighting="uniform"), load_teacher("b", weighting="uniform")
    torch.testing.assert_close(ta.states[4], tb.states[4], atol=1e-4, rtol=1e-4)
    assert a.rollouts == b.rollouts == 8


def test_interrupted_extraction_resumes_from_finished_shards(tiny, runs, monkeypatch):
    model, tok, _ = tiny
    real = teacher._finish_shard
    calls = []

    def failing(rows, states, problems, cfg, layers):
        calls.append(problems)
        if problems[0] == 2:
            raise KeyboardInterrupt
        return real(rows, states, problems, cfg, layers)

    monkeypatch.setattr(teacher, "_finish_shard", failing)
    with pytest.raises(KeyboardInterrupt):
        _extract(model, tok, RECORDS, _cfg(), "r")
    final = artifacts.artifact_dir("r", "teacher", "teacher")
    assert not final.exists()
    partial = final.with_name(".teacher.partial")
    assert (partial / "shard-00000.json").is_file()
    monkeypatch.setattr(teacher, "_finish_shard", real)
    first = (partial / "shard-00000.safetensors").stat().st_mtime_ns
    s = _extract(model, tok, RECORDS, _cfg(), "r")
    assert artifacts.is_complete(s.directory) and not partial.exists()
    assert (s.directory / "shard-00000.safetensors").stat().st_mtime_ns == first  # reused, not redone
    # an interrupted run of another configuration leaves shards that are not reused
    monkeypatch.setattr(teacher, "_finish_shard", failing)
    with pytest.raises(KeyboardInterrupt):
        _extract(model, tok, RECORDS, _cfg(temperature=1.5), "other")
    other = artifacts.artifact_dir("other", "teacher", "teacher").with_name(".teacher.partial")
    assert (other / "shard-00000.json").is_file()
    monkeypatch.setattr(teacher, "_finish_shard", real)
    kept = (other / "shard-00000.safetensors").stat().st_mtime_ns
    calls.clear()
    monkeypatch.setattr(teacher, "_finish_shard", lambda *a: calls.append(a[2]) or real(*a))
    _extract(model, tok, RECORDS, _cfg(temperature=1.7), "other")
    assert calls[0] == [0, 1]  # the first shard was made again
    assert (artifacts.artifact_dir("other", "teacher", "teacher") / "shard-00000.safetensors").stat().st_mtime_ns != kept


def test_load_teacher_names_missing_layers_and_notebook(tiny, runs):
    model, tok, _ = tiny
    with pytest.raises(artifacts.MissingArtifactError, match="00_teacher_extraction"):
        load_teacher("nothing")
    _extract(model, tok, RECORDS[:2], _cfg(capture_layers=(-1,)))
    with pytest.raises(ValueError, match="capture_layers"):
        load_teacher("r", layers=[1])


def test_throughput_is_measured_on_the_same_rollouts(tiny):
    model, tok, _ = tiny
    from latentlib.teacher import measure_throughput

    table = measure_throughput(model, tok, RECORDS[:2], _cfg(), FMT, batch_sizes=(1, 8))
    assert table.generation_batch_size.tolist() == [1, 8] and (table.rollouts == 8).all()
    assert (table.rollouts_per_second > 0).all() and table.fraction_correct.nunique() == 1
