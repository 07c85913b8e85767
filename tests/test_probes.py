"""The probes measure what they claim on hand-made cases."""

import pytest
import torch

from latentlib.injection import make_injector
from latentlib.probes import AblatedInjector, lens_matches_steps, linear_probe, logit_lens, token_ranks


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
    hits = lens_matches_steps(model, tok, vectors.reshape(1, 2, -1), [["7", "4"]])
    assert hits.tolist() == [1.0, 0.0]
