"""Steering vectors (ActAdd, Turner et al. 2023): a direction read from contrasting prompts,
added to the residual stream during the forward.

The direction at decoder layer ``L`` is the difference of the mean activations (layer
``L``'s output) on the positive and the negative prompts of contrast pairs; each pair's
own difference is kept too, and their *cosine consistency* (the mean pairwise cosine of
the per-pair differences; 1 = every pair points the same way) says whether the contrast
is one direction or noise. :func:`steer` adds ``coefficient * direction`` to layer
``L``'s output through a forward hook, and removes the hook on exit, exception or not.

Where this departs from ActAdd:

- ActAdd uses a single pair and adds its per-position difference ``h(A) - h(B)`` to the
  first few positions of the prompt only. We average over many pairs (the
  mean-difference / contrastive-activation-addition variant), read each prompt at its
  last position (``reduce="last"``, or the mean over its positions) and add the one
  vector at *every* position, prompt and generated tokens alike, so prompts of any
  length can be steered.
- The coefficient multiplies the raw mean difference (ActAdd's convention), not a unit
  vector; :class:`Direction` reports the difference's norm and the layer's typical
  activation norm so coefficients can be compared across layers and models.

Task helpers: :func:`first_step_parity_pairs` for the embedded chain task (pairs that
differ only in the first operation, so that the first written step is even in one and
odd in the other) and :func:`first_step_even_rate` to read the effect.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from latentlib.batching import prompt_batch
from latentlib.evaluate import EvalSpec, evaluate, summarize
from latentlib.recurrence import position_ids_for
from latentlib.tasks import Format, apply_op, make_chain_record

__all__ = ["Direction", "decoder_layers", "steer", "layer_activations", "contrast_directions",
           "cosine_consistency", "steering_sweep", "first_step_parity_pairs", "first_step_even_rate", "chat_prompt",
           "instruction_pairs"]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Hugging Face causal LM (Llama/Qwen/Mistral style or GPT-2)."""
    base = getattr(model, "base_model", model)
    for path in ("layers", "h", "model.layers", "model.model.layers", "transformer.h", "model.transformer.h"):
        obj = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}: expected model.model.layers "
                     "(Llama/Qwen) or model.transformer.h (GPT-2)")


def _check_layer(layers: nn.ModuleList, layer: int) -> None:
    if not -len(layers) <= layer < len(layers):
        raise ValueError(f"layer={layer}: the model has {len(layers)} decoder layers (0 .. {len(layers) - 1})")


STEER_POSITIONS = ("all", "prompt")


@contextmanager
def steer(model: nn.Module, vector: torch.Tensor, layer: int, coefficient: float = 1.0, *,
          positions: str = "all"):
    """Adds ``coefficient * vector`` (``(D,)``) to decoder layer ``layer``'s output while
    the block runs; the hook is removed on exit, also after an exception.

    ``positions="all"``: every position, prompt and generated; ``"prompt"``: only in
    forwards over more than one position, i.e. the prompt pass of cached generation
    (ActAdd's choice: generated tokens then only see the steered prompt through the cache).
    """
    if positions not in STEER_POSITIONS:
        raise ValueError(f"positions={positions!r}: use one of {STEER_POSITIONS}")
    layers = decoder_layers(model)
    _check_layer(layers, layer)
    delta = (coefficient * vector.detach()).to(next(model.parameters()).device)  # (D,)

    def add(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output  # older blocks return (hidden, attn, ...)
        if positions == "prompt" and hidden.shape[1] == 1:
            return output
        hidden = hidden + delta.to(hidden.dtype)
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    handle = layers[layer].register_forward_hook(add)
    try:
        yield handle
    finally:
        handle.remove()


@torch.no_grad()
def layer_activations(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      layers: Sequence[int], *, reduce: str = "last") -> dict[int, torch.Tensor]:
    """``{layer: (B, D)}``: each decoder layer's output at the last position of each
    left-padded prompt (``reduce="last"``) or averaged over its real positions (``"mean"``).

    Read through forward hooks at the same place :func:`steer` writes, so reading and
    writing agree for any architecture.
    """
    if reduce not in ("last", "mean"):
        raise ValueError(f"reduce={reduce!r}: use 'last' or 'mean'")
    blocks = decoder_layers(model)
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for k in layers:
        _check_layer(blocks, k)

        def grab(module, args, output, k=k):
            seen[k] = output[0] if isinstance(output, tuple) else output  # (B, T, D)

        handles.append(blocks[k].register_forward_hook(grab))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_for(attention_mask),
              use_cache=False)
    finally:
        for h in handles:
            h.remove()
    mask = attention_mask[..., None].to(next(iter(seen.values())).dtype)  # (B, T, 1)
    if reduce == "last":
        return {k: v[:, -1].float() for k, v in seen.items()}
    return {k: ((v * mask).sum(1) / mask.sum(1)).float() for k, v in seen.items()}


def cosine_consistency(diffs: torch.Tensor) -> float:
    """Mean pairwise cosine between the rows of ``diffs`` ``(P, D)`` (off-diagonal)."""
    if diffs.shape[0] < 2:
        raise ValueError("cosine consistency needs at least 2 contrast pairs")
    unit = torch.nn.functional.normalize(diffs.float(), dim=-1)
    cos = unit @ unit.T  # (P, P)
    P = cos.shape[0]
    return float((cos.sum() - cos.diagonal().sum()) / (P * (P - 1)))


@dataclass
class Direction:
    layer: int  # decoder layer whose output is read and steered
    vector: torch.Tensor  # (D,) mean(positive) - mean(negative)
    pair_diffs: torch.Tensor  # (P, D) each pair's difference
    consistency: float  # mean pairwise cosine of the per-pair differences
    cos_to_mean: float  # mean cosine of each pair's difference with the direction
    norm: float  # |vector|
    activation_norm: float  # mean |activation| at that layer over the pairs' prompts (for scale)

    def summary(self) -> dict:
        return {"layer": self.layer, "norm": round(self.norm, 4), "activation_norm": round(self.activation_norm, 4),
                "consistency": round(self.consistency, 4), "cos_to_mean": round(self.cos_to_mean, 4),
                "pairs": self.pair_diffs.shape[0]}


def contrast_directions(model: nn.Module, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                        layers: Sequence[int], *, pad_id: int, reduce: str = "last",
                        batch_size: int = 64) -> dict[int, Direction]:
    """One :class:`Direction` per layer from ``pairs`` of (positive ids, negative ids)."""
    if len(pairs) < 2:
        raise ValueError(f"{len(pairs)} contrast pairs: use at least 2 (consistency needs two differences)")
    model.eval()
    pos_acts: dict[int, list] = {k: [] for k in layers}
    neg_acts: dict[int, list] = {k: [] for k in layers}
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        for side, store in ((0, pos_acts), (1, neg_acts)):
            ids, mask = prompt_batch([p[side] for p in chunk], pad_id)
            dev = next(model.parameters()).device
            for k, v in layer_activations(model, ids.to(dev), mask.to(dev), layers, reduce=reduce).items():
                store[k].append(v.cpu())
    out = {}
    for k in layers:
        pos, neg = torch.cat(pos_acts[k]), torch.cat(neg_acts[k])  # (P, D)
        diffs = pos - neg
        vector = diffs.mean(0)  # = mean(pos) - mean(neg)
        cos_mean = torch.nn.functional.cosine_similarity(diffs, vector[None], dim=-1).mean()
        out[k] = Direction(layer=k, vector=vector, pair_diffs=diffs, consistency=cosine_consistency(diffs),
                           cos_to_mean=float(cos_mean), norm=float(vector.norm()),
                           activation_norm=float(torch.cat([pos, neg]).norm(dim=-1).mean()))
    return out


def steering_sweep(model: nn.Module, tokenizer, records: Sequence, directions: dict[int, Direction],
                   coefficients: Sequence[float], spec: EvalSpec, fmt: Format, *, positions: str = "all",
                   readout: Callable | None = None, unsteered: pd.DataFrame | None = None, batch_size: int = 64,
                   progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Evaluates ``spec`` unsteered and at every (layer, coefficient).

    Returns ``(table, per_problem)``: one table row per setting (``layer``/``coefficient``
    are -1/0 for the unsteered model) with accuracy, visible tokens, ``answer_changed``
    (share of predictions that differ from the unsteered ones) and ``readout(df) -> dict``
    if given; ``per_problem`` holds every evaluated problem. ``unsteered``: an
    evaluation of ``spec`` on ``records`` already made (skips that run on slow models).
    """
    frames, rows = [], []

    def run(layer, coef):
        if layer < 0:
            df = unsteered.drop(columns=[c for c in ("layer", "coefficient") if c in unsteered]) \
                if unsteered is not None else evaluate(model, tokenizer, records, spec, fmt, batch_size=batch_size,
                                                       progress=progress)
        else:
            with steer(model, directions[layer].vector, layer, coef, positions=positions):
                df = evaluate(model, tokenizer, records, spec, fmt, batch_size=batch_size, progress=progress)
        df = df.assign(layer=layer, coefficient=coef)
        frames.append(df)
        row = {"layer": layer, "coefficient": coef, "positions": positions if layer >= 0 else "-",
               **summarize(df).drop(columns=["method", "latent_steps"]).iloc[0].to_dict()}
        row["answer_changed"] = round(float((df.prediction.values != frames[0].prediction.values).mean()), 4)
        if readout is not None:
            row.update(readout(df))
        rows.append(row)

    run(-1, 0.0)
    for layer in directions:
        for coef in coefficients:
            run(layer, float(coef))
    return pd.DataFrame(rows), pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------------------- the chain task


def first_step_parity_pairs(records: Sequence, n_pairs: int, *, seed: int = 0, modulus: int = 10,
                            max_add: int = 9) -> list[tuple[object, object]]:
    """Pairs of chain problems identical except for the first operation, ``+k`` against
    ``+(k+1)`` (``1 <= k < max_add``; both must be operations of the task), so that the
    first step ``(start + k) mod modulus`` is even in the first problem of the pair and
    odd in the second (modulus must be even).

    A CoT model predicts the first step at the question's last position (``=``), so the
    direction read there is "the value being written next is even".
    """
    if modulus % 2:
        raise ValueError(f"modulus={modulus}: parity of a value mod an odd modulus is not preserved; use an even one")
    if max_add < 2:
        raise ValueError(f"max_add={max_add}: the pairs need the operations +1 and +2 at least (max_add >= 2)")
    rng = random.Random(seed)
    pairs = []
    for r in rng.sample(list(records), min(n_pairs, len(records))):
        words = r.question.split()
        start, ops = int(words[0]), words[1:-1]
        k = rng.randint(1, max_add - 1)
        a = make_chain_record(start, ["+" + str(k)] + ops[1:], modulus)
        b = make_chain_record(start, ["+" + str(k + 1)] + ops[1:], modulus)
        pairs.append((a, b) if int(a.steps[0]) % 2 == 0 else (b, a))
    return pairs


def first_step_even_rate(df: pd.DataFrame, modulus: int = 10) -> dict:
    """What steering the first step did, on chain-task predictions ``"v1 v2 ... #### a"``:

    ``first_step_even``: share of predictions whose first written value is even;
    ``follows_first_step``: share whose later steps and answer are exactly what the
    question's operations give when started from the *written* first value (the model
    carried its steered state on, rather than just writing one odd token).
    """
    even = follows = 0
    for question, prediction in zip(df.question, df.prediction):
        words = prediction.split()
        if not words or not words[0].isdigit():
            continue
        value = int(words[0])
        even += value % 2 == 0
        expected = [str(value)]
        for op in question.split()[2:-1]:
            value = apply_op(value, op, modulus)
            expected.append(str(value))
        follows += words == expected + ["####", expected[-1]]
    n = max(len(df), 1)
    return {"first_step_even": round(even / n, 4), "follows_first_step": round(follows / n, 4)}


# ---------------------------------------------------------------------------- real models: chat prompts


def chat_prompt(tokenizer, instruction: str = "Solve the problem step by step. Write the final answer on the "
                                                 "last line as '#### N'.") -> Callable:
    """record -> prompt ids: the question (and ``instruction``) as a user turn of the chat template."""

    def prompt(record):
        text = tokenizer.apply_chat_template([{"role": "user", "content": f"{record.question}\n{instruction}"}],
                                             tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return prompt


def instruction_pairs(tokenizer, records: Sequence, positive: str, negative: str) -> list[tuple[list, list]]:
    """Contrast pairs: each question as a chat prompt with the positive and the negative
    instruction (e.g. "reason step by step" against "reply with only the number")."""
    pos, neg = chat_prompt(tokenizer, positive), chat_prompt(tokenizer, negative)
    return [(pos(r), neg(r)) for r in records]
