"""Our losses against TRL's on the same batch and weights (the benchmark's parity checks,
``benchmarks/trl_compare.py``, at a size that runs in seconds): Switch-GRPO against
``GRPOTrainer.compute_loss`` (loss and gradients, both loss types), SWITCH phase 1 and
Coconut stage 0 against ``SFTTrainer.compute_loss``. Needs the ``bench`` extra (TRL)."""

import pytest

pytest.importorskip("trl")

from benchmarks import trl_compare as tc  # noqa: E402

SMALL = {"prompts": 2, "G": 3, "length": 12, "sft_batch": 8}


@pytest.mark.slow
def test_switch_grpo_loss_and_gradients_match_trl():
    s = {**tc.SETTINGS["tiny"], **SMALL}
    preset, task, base, tok, ours, trl = tc.grpo_pair("tiny", s)
    for lt, p in tc.grpo_parities("tiny", s, ours, trl, task.splits.train).items():
        assert p["within_tolerance"], (lt, p)
        assert p["grad_rel_diff"] < 1e-5, (lt, p)
        assert p["kl"] > 0 and p["max_logp_diff"] < 1e-5, (lt, p)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["switch", "coconut"])
def test_sft_step_zero_loss_matches_trl(kind):
    s = {**tc.SETTINGS["tiny"], **SMALL}
    preset, ours, trl, batches = tc.sft_pair("tiny", kind, s)
    p = tc.sft_loss_parity(ours, trl, batches[0], s["sft_batch"])
    assert p["within_tolerance"], p
