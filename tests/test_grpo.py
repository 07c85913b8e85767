"""Switch-GRPO: advantages, the clipped loss against hand-computed numbers, rewards, the
one-call rollouts, scoring that reproduces them, and one step that moves every weight."""

import math

import pytest
import torch

from latentlib.methods import switch as sw
from latentlib.methods.switch import grpo
from latentlib.methods.switch.grpo import Completions, SwitchGRPOConfig
from latentlib.tasks import Format
from latentlib.tasks.synthetic import make_chain_record

FMT = Format(" ")

# ---------------------------------------------------------------------------- advantages


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 3.0, 1.0, 2.0, 0.0])  # groups of G=3: [1, 0, 3], [1, 2, 0]
    adv = grpo.group_advantages(rewards, 3)
    # Group 1: mean 4/3, unbiased std sqrt(((-1/3)^2 + (-4/3)^2 + (5/3)^2) / 2) = sqrt(7/3).
    s1 = math.sqrt(7 / 3) + 1e-4
    # Group 2: mean 1, unbiased std sqrt((0 + 1 + 1) / 2) = 1.
    s2 = 1.0 + 1e-4
    want = [-1 / 3 / s1, -4 / 3 / s1, 5 / 3 / s1, 0.0, 1 / s2, -1 / s2]
    torch.testing.assert_close(adv, torch.tensor(want), atol=1e-6, rtol=1e-6)
    assert grpo.group_advantages(rewards, 3, "none").tolist() == pytest.approx([-1 / 3, -4 / 3, 5 / 3, 0, 1, -1])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_equal_rewards_give_zero_advantage_and_no_nan(scale):
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 0.7])  # 0.1 * 4 / 4 is not exactly 0.1 in float
    adv = grpo.group_advantages(rewards, 4, scale)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv, torch.zeros(8))
    both = grpo.group_advantages(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2, scale)
    assert both[:2].tolist() == [0.0, 0.0] and both[2] < 0 < both[3]


def test_group_advantages_refuse_ragged_groups():
    with pytest.raises(ValueError, match="groups"):
        grpo.group_advantages(torch.ones(5), 2)


# ---------------------------------------------------------------------------- the loss by hand


def test_grpo_loss_matches_hand_computation():
    ln = math.log
    # Two completions, three positions; the third position of the second is masked (padding or a latent).
    logps = torch.tensor([[ln(0.5), ln(0.25), ln(0.4)], [ln(0.3), ln(0.6), ln(0.9)]], requires_grad=True)
    old = torch.tensor([[ln(0.5), ln(0.5), ln(0.2)], [ln(0.6), ln(0.4), ln(0.1)]])
    ref = torch.tensor([[ln(0.5), ln(0.5), ln(0.4)], [ln(0.3), ln(0.3), ln(0.9)]])
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    eps, beta = 0.2, 0.1
    # ratios: [1, 0.5, 2] and [0.5, 1.5, -]
    # A = +1: -min(r, clip(r)) = [-1, -0.5 (min(0.5, 0.8)), -1.2 (min(2, 1.2))]
    # A = -2: -min(-2r, -2 clip(r)) = [2 * max(0.5, 0.8) = 1.6, 2 * max(1.5, 1.2) = 3.0]
    pg = [[-1.0, -0.5, -1.2], [1.6, 3.0]]
    # k3 = exp(ref - logp) - (ref - logp) - 1: ratio ref/p = [1, 2, 1] and [1, 0.5]
    k3 = [[0.0, 2 - ln(2) - 1, 0.0], [0.0, 0.5 + ln(2) - 1]]
    tok = [[p + beta * k for p, k in zip(rp, rk)] for rp, rk in zip(pg, k3)]
    bnpo = (sum(tok[0]) + sum(tok[1])) / 5
    per_seq = (sum(tok[0]) / 3 + sum(tok[1]) / 2) / 2
    loss, metrics = grpo.grpo_loss(logps, old, adv, mask, epsilon=eps, beta=beta, ref_logps=ref, loss_type="bnpo")
    assert loss.item() == pytest.approx(bnpo, abs=1e-6)
    loss2, _ = grpo.grpo_loss(logps, old, adv, mask, epsilon=eps, beta=beta, ref_logps=ref, loss_type="grpo")
    assert loss2.item() == pytest.approx(per_seq, abs=1e-6)
    assert metrics["kl"] == pytest.approx((k3[0][1] + k3[1][1]) / 5, abs=1e-6)
    assert metrics["clip_ratio"] == pytest.approx(2 / 5)  # (r=2, A>0) and (r=0.5, A<0) are clipped
    # Gradient: clipped tokens and masked tokens give no policy-gradient term.
    loss.backward()
    g = logps.grad
    assert g[1, 2] == 0
    # d/dlogp of -A r at r=1 (unclipped) is -A; plus beta * d k3 = beta * (1 - exp(ref - logp)) = 0 there.
    assert g[0, 0].item() == pytest.approx(-1.0 / 5, abs=1e-6)
    # r = 2 clipped with A > 0: only the KL term (k3' = 1 - 1 = 0 at ref = logp) -> 0.
    assert g[0, 2].item() == pytest.approx(0.0, abs=1e-6)


def test_grpo_loss_needs_reference_when_beta_positive():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="ref_logps"):
        grpo.grpo_loss(x, x, torch.zeros(1), torch.ones(1, 2), beta=0.1)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_generations": 1}, "num_generations"), ({"generation_batch_size": 12}, "multiple"),
    ({"epsilon": 0.0}, "epsilon"), ({"beta": -1.0}, "beta"), ({"temperature": 0.0}, "temperature"),
    ({"loss_type": "dapo"}, "loss_type"), ({"scale_rewards": "yes"}, "scale_rewards"),
    ({"learning_rate": 0.0}, "learning_rate"), ({"lr_scheduler_type": "step"}, "lr_scheduler_type"),
])
def test_config_validation_names_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SwitchGRPOConfig(**kwargs)


# ---------------------------------------------------------------------------- rewards


def test_reward_functions():
    c = Completions(texts=["4 2 #### 2", "4 #### 3", "4 2", "#### 2"], answers=["2"] * 4,
                    finished=[True, True, False, True], blocks=[[4], [], [4, 0], [0]],
                    unclosed=[False, False, False, True])
    assert grpo.correctness_reward(c).tolist() == [1, 0, 0, 1]
    assert grpo.format_reward(c).tolist() == [1, 1, 0, 0]
    assert grpo.latent_usage_reward(c).tolist() == [1, 0, 1, 0]


# ---------------------------------------------------------------------------- rollouts and a step


RECORDS = [make_chain_record(s, ["+1", "*3"], 10) for s in range(4)]


@pytest.mark.parametrize("positions", ["continue", "block"])
def test_rollouts_are_one_engine_call_and_scoring_reproduces_them(eager, monkeypatch, positions):
    model, tok, _ = eager
    calls = []
    real = grpo.generate

    def counting(*args, **kwargs):
        calls.append(args[1].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(grpo, "generate", counting)
    cfg = SwitchGRPOConfig(num_generations=3, generation_batch_size=12, max_completion_length=12)
    scfg = sw.SwitchConfig(k_min=2, k_max=3, positions=positions)
    batch = grpo.rollout(model, tok, RECORDS, cfg, scfg, FMT, seeds=list(range(12)))
    assert calls == [12]  # G x B sequences in one call
    assert batch["latent_mask"].any() and batch["completion_mask"].any()
    logps = grpo.completion_logps(model, batch, scfg, sw.switch_ids(tok), temperature=cfg.temperature)
    m = batch["completion_mask"]
    torch.testing.assert_close(logps[m], batch["old_logps"][m], atol=1e-4, rtol=1e-4)
    assert batch["stats"]["kmin_violations"] == 0


def test_one_grpo_step_changes_every_trainable_parameter(eager):
    model, tok, _ = eager

    def length_reward(c):  # varies within groups even for a random model
        return torch.tensor([float(len(t.split())) for t in c.texts])

    cfg = SwitchGRPOConfig(num_generations=4, generation_batch_size=8, max_steps=1, learning_rate=1e-3,
                           max_completion_length=10, reward_weights=(1.0, 0.5), beta=0.01)
    scfg = sw.SwitchConfig(k_min=2, k_max=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    run = grpo.train_switch_grpo(model, tok, RECORDS, cfg, scfg, FMT, progress=False,
                                 reward_funcs=(length_reward, grpo.latent_usage_reward))
    row = run.result.history[-1]
    assert math.isfinite(row["loss"]) and row["frac_reward_zero_std"] < 1
    for n, p in model.named_parameters():
        assert not torch.equal(p, before[n]), f"{n} did not change"


def test_reward_weights_must_match_functions(eager):
    model, tok, _ = eager
    cfg = SwitchGRPOConfig(num_generations=2, generation_batch_size=2, reward_weights=(1.0,), max_completion_length=4)
    with pytest.raises(ValueError, match="reward_weights"):
        grpo.rollout(model, tok, RECORDS[:1], cfg, sw.SwitchConfig(k_min=1, k_max=2), FMT, seeds=[0, 1])


def test_forced_exits_are_found_after_k_max_steps():
    x, L = 31, 29  # </swi>, <latent>
    tokens = torch.tensor([[30, L, L, L, x, 5], [30, L, L, x, 5, 1], [30, L, L, L, L, x]])
    latent = tokens == L
    forced = grpo.forced_exits(tokens, latent, x, k_max=3)
    assert forced.nonzero().tolist() == [[0, 4], [2, 5]]  # row 1 left after 2 steps: its own choice
