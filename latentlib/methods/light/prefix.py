"""Random prefix perturbation (dl1683/Latent-Space-Reasoning) and the embedding RMS.

The method: at inference only, put ``n`` random vectors at the scale of the model's own
token embeddings in front of the prompt, and decode greedily as usual. Each problem is
tried with several independent draws; *oracle coverage* is the share of problems that
at least one draw solves (an upper bound for picking the right draw, not an accuracy).

Where this departs from the reference:

- Scale. Each vector is Gaussian noise rescaled to an RMS of exactly
  ``scale * embedding_rms(model)`` (the reference draws ``randn * rms``, whose RMS only
  fluctuates around that value), so ``scale`` means the same thing at any width.
- Reproducibility. A vector is a function of ``(seed, draw, question)`` (CRC32 of the
  question text), not of a global RNG: a problem gets the same prefix whatever batch,
  order or batch size it is evaluated in, and the same seed reproduces a run exactly.
- Placement. With left padding the prefix goes right before the first real token of each
  row (attention mask 1, positions ``0 .. n-1``, the prompt shifted by ``n`` positions,
  exactly as prepending ``n`` tokens would). The prompt reserves ``n`` placeholder slots
  whose input embeddings are overwritten (:func:`place_prefix`), so the batch goes
  through the ordinary evaluation (:attr:`latentlib.evaluate.EvalSpec.inputs_embeds`);
  :func:`prepend_prefix` does the same for a batch that has no slots.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from latentlib.batching import encode_record
from latentlib.evaluate import EvalSpec, evaluate
from latentlib.hub import WeightsUnavailableError
from latentlib.injection import embedding_rms
from latentlib.presets import load_model
from latentlib.tasks import ChainConfig, Format, chain_vocabulary

__all__ = ["PrefixConfig", "PrefixResult", "embedding_rms_table", "prefix_vectors", "place_prefix",
           "prepend_prefix", "prefix_spec", "evaluate_random_prefix"]


@dataclass(frozen=True)
class PrefixConfig:
    n_prefix: int = 2  # n: random vectors put in front of the prompt (the reference's best on Qwen3-4B)
    scale: float = 1.0  # RMS of each vector, in units of the model's embedding RMS
    num_draws: int = 4  # independent draws per problem; oracle coverage = any draw correct
    seed: int = 0  # with the draw index and the question text, fixes every vector

    def __post_init__(self):
        if not isinstance(self.n_prefix, int) or self.n_prefix < 1:
            raise ValueError(f"n_prefix={self.n_prefix!r}: use at least 1 random vector (the unperturbed "
                             "model is the baseline row that evaluate_random_prefix adds itself)")
        if not self.scale > 0:
            raise ValueError(f"scale={self.scale!r}: use a positive multiple of the embedding RMS, e.g. 1.0")
        if not isinstance(self.num_draws, int) or self.num_draws < 1:
            raise ValueError(f"num_draws={self.num_draws!r}: use at least 1 draw per problem")


def embedding_rms_table(presets: Sequence[str] = ("tiny", "smollm2-135m"), *,
                        models: dict[str, nn.Module] | None = None, words: list[str] | None = None) -> pd.DataFrame:
    """Embedding RMS per preset: the scale random prefixes are drawn at.

    ``models`` maps extra labels to already-loaded models (e.g. the trained tiny base
    model); presets are loaded with :func:`latentlib.presets.load_model` (``tiny`` is a
    fresh random init over ``words``, default the embedded task's). A preset whose
    weights are unavailable offline gets a row with ``status`` saying so, not an error.
    """
    rows = []

    def row(label, model, status="ok"):
        if model is None:
            return {"model": label, "embedding_rms": float("nan"), "hidden_size": None, "vocab": None,
                    "status": status}
        weight = model.get_input_embeddings().weight
        return {"model": label, "embedding_rms": round(embedding_rms(model), 5), "hidden_size": weight.shape[1],
                "vocab": weight.shape[0], "status": status}

    for name in presets:
        try:
            model, _ = load_model(name, words=words or chain_vocabulary(ChainConfig()))
        except WeightsUnavailableError as e:
            rows.append(row(name, None, f"weights unavailable: {str(e).splitlines()[0][:80]}"))
            continue
        rows.append(row(name + (" (random init)" if name == "tiny" else ""), model))
        del model
    for label, model in (models or {}).items():
        rows.append(row(label, model))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- the vectors


def prefix_vectors(n: int, dim: int, rms: float, *, scale: float = 1.0, seed: int = 0, draw: int = 0,
                   key: str | int = 0) -> torch.Tensor:
    """``(n, dim)`` float32 Gaussian vectors, each rescaled to RMS ``scale * rms``.

    A pure function of its arguments: ``key`` is the problem (its question text, or any
    int), so the same ``(seed, draw, key)`` always gives the same vectors.
    """
    key_int = zlib.crc32(key.encode()) if isinstance(key, str) else int(key)
    g = torch.Generator().manual_seed((seed * 1_000_003 + draw * 7_919 + key_int) % (2**63 - 1))
    x = torch.randn(n, dim, generator=g)  # (n, D)
    x = x / x.square().mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
    return x * (scale * rms)


def _first_real_column(attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.long()
    if (mask[:, 1:] < mask[:, :-1]).any():
        raise ValueError("attention_mask is not left-padded (a 0 follows a 1); build the batch with "
                         "latentlib.batching.prompt_batch, which pads on the left")
    return mask.shape[1] - mask.sum(1)  # (B,)


def place_prefix(embeds: torch.Tensor, attention_mask: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """Overwrites the first ``n`` real positions of each left-padded row with ``prefix``.

    ``embeds`` ``(B, T, D)``; ``prefix`` ``(B, n, D)``. The prompt must reserve those ``n``
    slots (any token id; their embeddings are replaced).
    """
    B, T, _ = embeds.shape
    n = prefix.shape[1]
    first = _first_real_column(attention_mask)  # (B,)
    if (T - first < n + 1).any():
        raise ValueError(f"a row has fewer than n_prefix + 1 = {n + 1} real positions: reserve {n} prefix "
                         "slots in front of a non-empty prompt")
    cols = first[:, None] + torch.arange(n, device=embeds.device)  # (B, n)
    out = embeds.clone()
    out[torch.arange(B, device=embeds.device)[:, None], cols] = prefix.to(embeds.dtype)
    return out


def prepend_prefix(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs_embeds (B, T+n, D), attention_mask (B, T+n))`` of ``[prefix, prompt]`` per row.

    Left padding stays in front: row ``b`` becomes ``[pad * L_b, prefix, prompt tokens]``.
    Pass both to :func:`latentlib.recurrence.generate` (``inputs_embeds=``).
    """
    B, n = input_ids.shape[0], prefix.shape[1]
    first = _first_real_column(attention_mask)
    ids = torch.cat([input_ids.new_zeros(B, n), input_ids], 1)  # placeholder columns; their ids are not read
    mask = torch.cat([attention_mask.new_zeros(B, n), attention_mask], 1)
    cols = first[:, None] + torch.arange(n, device=ids.device)  # the n columns just before the first real token
    mask[torch.arange(B, device=ids.device)[:, None], cols] = 1
    embeds = model.get_input_embeddings()(ids)  # (B, T+n, D)
    return place_prefix(embeds, mask, prefix), mask


# ---------------------------------------------------------------------------- evaluation


def prefix_spec(model: nn.Module, tokenizer, cfg: PrefixConfig, draw: int, fmt: Format, *, prompt: Callable | None = None,
                name: str | None = None, max_new_tokens: int = 32, grade_mode: str = "strict") -> EvalSpec:
    """An :class:`EvalSpec` that decodes with draw ``draw`` of the random prefix.

    ``prompt``: record -> token ids (default: the encoded question); ``n_prefix``
    placeholder slots are put in front of it and overwritten by the vectors.
    """
    prompt = prompt or (lambda r: encode_record(tokenizer, r, fmt).question)
    rms = embedding_rms(model)
    dim = model.get_input_embeddings().weight.shape[1]
    slot = tokenizer.pad_token_id

    def inputs_embeds(input_ids, attention_mask, records):
        prefix = torch.stack([prefix_vectors(cfg.n_prefix, dim, rms, scale=cfg.scale, seed=cfg.seed, draw=draw,
                                             key=r.question) for r in records]).to(input_ids.device)  # (B, n, D)
        return place_prefix(model.get_input_embeddings()(input_ids), attention_mask, prefix)

    return EvalSpec(name or f"prefix draw {draw}", prompt=lambda r: [slot] * cfg.n_prefix + list(prompt(r)),
                    inputs_embeds=inputs_embeds, max_new_tokens=max_new_tokens, grade_mode=grade_mode)


@dataclass
class PrefixResult:
    per_problem: pd.DataFrame  # one row per (problem, draw); draw -1 is the unperturbed model
    summary: dict  # accuracy of baseline and draws, oracle coverage, rescued/broken counts


def evaluate_random_prefix(model: nn.Module, tokenizer, records: Sequence, cfg: PrefixConfig, fmt: Format, *,
                           prompt: Callable | None = None, max_new_tokens: int = 32, grade_mode: str = "strict",
                           batch_size: int = 64, progress: bool = False) -> PrefixResult:
    """The unperturbed model and ``num_draws`` prefix draws on the same problems.

    Summary (``metric`` = strict-or-``grade_mode`` correctness, ``_flexible`` = flexible):
    ``accuracy_baseline``; ``accuracy_prefix`` (mean over draws) and its ``_min``/``_max``;
    ``oracle_coverage`` (any draw correct); ``oracle_with_baseline`` (any draw or the
    baseline); ``rescued`` (baseline wrong, some draw right) and ``broken`` (baseline
    right, every draw wrong), as shares of the problems.
    """
    base = EvalSpec("baseline", prompt=prompt, max_new_tokens=max_new_tokens, grade_mode=grade_mode)
    frames = [evaluate(model, tokenizer, records, base, fmt, batch_size=batch_size, progress=progress).assign(draw=-1)]
    for d in range(cfg.num_draws):
        spec = prefix_spec(model, tokenizer, cfg, d, fmt, prompt=prompt, max_new_tokens=max_new_tokens,
                           grade_mode=grade_mode)
        df = evaluate(model, tokenizer, records, spec, fmt, batch_size=batch_size, progress=progress)
        frames.append(df.assign(draw=d))
    df = pd.concat(frames, ignore_index=True)
    df["problem"] = df.groupby("draw").cumcount()
    summary = {"n_prefix": cfg.n_prefix, "scale": cfg.scale, "num_draws": cfg.num_draws, "n": len(records)}
    for col, suffix in (("correct", ""), ("correct_flexible", "_flexible")):
        wide = df.pivot(index="problem", columns="draw", values=col).astype(bool)  # (N, 1 + draws)
        basec, draws = wide[-1], wide.drop(columns=-1)
        per_draw = draws.mean(axis=0)
        summary.update({
            f"accuracy_baseline{suffix}": round(float(basec.mean()), 4),
            f"accuracy_prefix{suffix}": round(float(per_draw.mean()), 4),
            f"accuracy_prefix_min{suffix}": round(float(per_draw.min()), 4),
            f"accuracy_prefix_max{suffix}": round(float(per_draw.max()), 4),
            f"oracle_coverage{suffix}": round(float(draws.any(axis=1).mean()), 4),
            f"oracle_with_baseline{suffix}": round(float((draws.any(axis=1) | basec).mean()), 4),
            f"rescued{suffix}": round(float((~basec & draws.any(axis=1)).mean()), 4),
            f"broken{suffix}": round(float((basec & ~draws.any(axis=1)).mean()), 4),
        })
    summary["visible_tokens_baseline"] = round(float(df[df.draw == -1].visible_tokens.mean()), 2)
    summary["visible_tokens_prefix"] = round(float(df[df.draw >= 0].visible_tokens.mean()), 2)
    summary["answer_changed"] = round(float(
        (df[df.draw >= 0].prediction.values != pd.concat([df[df.draw == -1].prediction] * cfg.num_draws).values).mean()
    ), 4)
    return PrefixResult(per_problem=df, summary=summary)
