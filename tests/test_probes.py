"""The probes measure what they claim on hand-made cases."""

import pytest
import torch

from latentlib.injection import make_injector
from latentlib.probes import (AblatedInjector, boundary_features, latent_thoughts, lens_step_matrix, linear_probe,
                              logit_lens, position_table, token_ranks)


def _states(B=4, D=8, L=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, D, generator=g) for _ in range(L))


def test_ablations_zero_keep_norm_and_shuffle():
    hs = _states()
    base = make_injector("hs[-1]")
    x = base(hs)
    assert torch.equal(AblatedInjector(base, "zero")(hs), torch.zeros_like(x))
    r = AblatedInjector(base, "random", seed=1)(hs)
    torch.testing.assert_close(r.norm(dim=-1), x.norm(dim=-1))
    assert (torch.nn.functional.cosine_similarity(r, x, dim=-1).abs() < 0.99).all()
    s = AblatedInjector(base, "shuffle")(hs)
    assert all(not torch.equal(s[i], x[i]) for i in range(4))
    assert sorted(map(tuple, s.tolist())) == sorted(map(tuple, x.tolist()))
    assert torch.equal(AblatedInjector(base, "none")(hs), x)
    with pytest.raises(ValueError, match="ablation 'noise'"):
        AblatedInjector(base, "noise")


def test_token_ranks():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0], [5.0, 0.0, 1.0, 2.0]])
    assert token_ranks(logits, 2).tolist() == [2, 3]
    assert token_ranks(logits, 1).tolist() == [1, 4]


def test_linear_probe_finds_a_linear_signal_and_not_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=g)
    y = (x[:, 3] + 0.5 * x[:, 7] > 0).long()
    assert linear_probe(x, y)["accuracy"] > 0.9
    noise = torch.randint(0, 2, (400,), generator=g)
    res = linear_probe(x, noise)
    assert res["accuracy"] < 0.7


def test_logit_lens_reads_the_token_a_vector_points_to(tiny):
    model, tok, _ = tiny
    emb = model.get_output_embeddings().weight
    target = tok.convert_tokens_to_ids(["7", "3"])
    vectors = emb[target] * 50  # tied embeddings: a scaled row decodes to its own token
    idx, p = logit_lens(model, vectors, top_k=1)
    assert idx[:, 0].tolist() == target
    hits = lens_step_matrix(model, tok, vectors.reshape(1, 2, -1), [["7", "4"]])
    assert hits.tolist() == [[1.0, 0.0], [0.0, 0.0]]  # thought 1 is step 1's value; thought 2 ("3") no step's


def _scripted_trace(model, tok, ids, temperature=1.0):
    from latentlib.policies import LATENT, ScriptedPolicy
    from latentlib.recurrence import generate

    enc = tok(["1 +2 *3 =", "4 *7 =", "9 +1 +3 *3 ="], return_tensors="pt", padding=True)
    policy = ScriptedPolicy([ids["<bot>"], LATENT, LATENT, LATENT, ids["<eot>"]])
    trace = generate(model, enc.input_ids, enc.attention_mask, policy=policy, max_new_tokens=10,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, latent_token_id=ids["<latent>"],
                     temperature=temperature, seeds=[1, 2, 3], capture_layers=(-1, 2))
    return trace


def test_position_table_reads_the_distributions_generation_sampled_from(tiny):
    model, tok, ids = tiny
    trace = _scripted_trace(model, tok, ids)
    seven = tok.convert_tokens_to_ids("7")
    table = position_table(model, trace, {"seven": seven, "eot": ids["<eot>"]})
    assert len(table) == int(trace.valid.sum())
    # the sampled text tokens' own probabilities are the trace's log-probabilities (temperature 1)
    text = ~trace.is_latent & trace.valid
    logits = model.get_output_embeddings()(torch.cat([trace.prompt_hidden[-1][:, None], trace.hidden[-1][:, :-1]], 1))
    own = torch.log_softmax(logits, -1).gather(-1, trace.tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(own[text], trace.logprob[text], atol=1e-4, rtol=1e-4)
    row = table[(table.seq == 0) & (table.pos == 4)].iloc[0]  # the <eot> after three thoughts
    assert row.token == ids["<eot>"] and row.after_block_step == 3 and row.block_step == 0
    assert table[table.seq == 0].block_step.tolist()[:5] == [0, 1, 2, 3, 0]
    assert row.p_eot == pytest.approx(logits[0, 4].softmax(-1)[ids["<eot>"]].item(), abs=1e-6)
    assert row.rank_eot == int((logits[0, 4] > logits[0, 4, ids["<eot>"]]).sum()) + 1
    trace.hidden.pop(-1)
    with pytest.raises(ValueError, match="capture_layers"):
        position_table(model, trace, {"seven": seven})


def test_boundary_features_label_the_state_before_the_boundary(tiny):
    model, tok, ids = tiny
    trace = _scripted_trace(model, tok, ids)
    x, y = boundary_features(trace, 2, ids["<bot>"])  # <bot> is position 0 of every sequence
    assert y.tolist() == [1, 1, 1, 0, 0, 0]
    torch.testing.assert_close(x[:3], trace.prompt_hidden[2].float())  # the prompt's last state decodes position 0
    x2, y2 = boundary_features(trace, 2, ids["<eot>"], ahead=2)  # <eot> at 4: the state decoding 3 is latent
    assert int(y2.sum()) == 0
    x3, y3 = boundary_features(trace, 2, ids["<eot>"], ahead=1)
    torch.testing.assert_close(x3[:3], trace.hidden[2][:, 3].float())  # after the third thought
    with pytest.raises(ValueError, match="layer 1"):
        boundary_features(trace, 1, ids["<bot>"])


def test_latent_thoughts_and_the_lens_step_matrix(tiny):
    model, tok, ids = tiny
    trace = _scripted_trace(model, tok, ids, temperature=0.0)
    th = latent_thoughts(trace)
    assert [t.shape[0] for t in th] == [3, 3, 3]
    torch.testing.assert_close(th[1], trace.thoughts[1, 1:4])
    emb = model.get_output_embeddings().weight
    vectors = (emb[tok.convert_tokens_to_ids(["7", "3", "5"])] * 50)[None]  # thought i decodes to these
    m = lens_step_matrix(model, tok, vectors, [["3", "7", "5"]])
    assert m.tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 1]]
