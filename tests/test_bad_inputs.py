"""Bad input gets a clear error naming the problem and the fix: one row per class.

Each case is (name, callable, exception type, a pattern the message must match). The
pattern asks for both halves: what is wrong and what to do.
"""

import json

import pytest
import torch

from latentlib import artifacts
from latentlib.policies import SwitchPolicy, latent_script
from latentlib.presets import UnknownPresetError, build_tiny_tokenizer, get_preset
from latentlib.recurrence import generate, latent_forward
from latentlib.tasks import RecordError, validate_record
from latentlib.tokens import MissingTokensError, require_tokens
from latentlib.training.loop import TrainConfig


CASES = [
    ("record without steps", lambda: validate_record({"question": "q", "answer": "1"}, source="train.json", index=3),
     RecordError, r"record 3 .*train\.json.*steps"),
    ("record without answer", lambda: validate_record({"question": "q", "steps": ["a"]}, source="train.json", index=0),
     RecordError, r"answer"),
    ("steps of the wrong type", lambda: validate_record({"question": "q", "steps": "a b", "answer": "1"}),
     RecordError, r"steps"),
    ("unknown preset", lambda: get_preset("qwen3-8"), UnknownPresetError, r"unknown preset 'qwen3-8'.*did you mean"),
    ("tokenizer without the method's tokens", lambda: require_tokens(build_tiny_tokenizer(["a"]), "switch"),
     MissingTokensError, r"lacks <swi>, </swi>, <latent>.*add_special_tokens"),
    ("K_min > K_max", lambda: SwitchPolicy(1, 2, k_min=6, k_max=4), ValueError, r"K_min=6 > K_max=4.*lower K_min"),
    ("negative latent count", lambda: latent_script(-2), ValueError, r"-2 latent steps.*>= 0"),
    ("impossible training config", lambda: TrainConfig(batch_size=0), ValueError, r"batch_size=0 must be >= 1"),
    ("stage run before its inputs exist",
     lambda: artifacts.require_artifact("nope", "base", "cot", made_by="00_teacher_extraction.ipynb"),
     artifacts.MissingArtifactError, r"does not exist.*run 00_teacher_extraction\.ipynb first"),
]


@pytest.mark.parametrize("name, fn, exc, pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_error(name, fn, exc, pattern, tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTLIB_RUNS", str(tmp_path))
    with pytest.raises(exc, match=pattern):
        fn()


def test_empty_and_malformed_dataset_files(tmp_path):
    from latentlib.tasks import load_coconut_json

    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.json"):
        load_coconut_json(empty)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "q", "steps": [1, 2], "answer": "3"}]))
    with pytest.raises(RecordError, match="bad.json"):
        load_coconut_json(bad)


def test_unparseable_gold_answer():
    from latentlib.tasks import parse_gold_answer

    with pytest.raises(ValueError, match="cannot be parsed"):
        parse_gold_answer("twelve", source="test.jsonl", index=4)


def test_engine_refuses_mismatched_shapes_and_bad_sampling(tiny):
    model, tok, _ = tiny
    ids = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="same \\(B, T\\) shape"):
        latent_forward(model, ids, torch.ones(2, 4, dtype=torch.long), torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="top_p"):
        generate(model, ids, torch.ones_like(ids), policy=None, max_new_tokens=2, eos_token_id=1, pad_token_id=0,
                 top_p=0.0)
    with pytest.raises(ValueError, match="one seed per sequence"):
        generate(model, ids, torch.ones_like(ids), policy=None, max_new_tokens=2, eos_token_id=1, pad_token_id=0,
                 temperature=1.0, seeds=[1])
