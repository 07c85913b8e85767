"""The special tokens of the methods: adding them, resizing and initialising embeddings,
checking a tokenizer has them, and making them trainable under LoRA.

| token      | method              | role                                                 |
|------------|---------------------|------------------------------------------------------|
| `<bot>`    | Coconut             | begin of thoughts (paper format)                     |
| `<eot>`    | Coconut             | end of thoughts                                      |
| `<latent>` | Coconut, SWITCH     | placeholder of a latent slot (never embedded)        |
| `<swi>`    | SWITCH              | the model enters latent mode after emitting it       |
| `</swi>`   | SWITCH              | the model leaves latent mode                         |
| `<pause>`  | pause tokens        | a learnable delay token                              |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["SPECIAL_TOKENS", "METHOD_TOKENS", "MissingTokensError", "TokenIds", "add_special_tokens",
           "require_tokens", "token_ids", "trainable_token_config", "grow_embeddings"]

SPECIAL_TOKENS = ("<bot>", "<eot>", "<latent>", "<swi>", "</swi>", "<pause>")
METHOD_TOKENS = {
    "coconut": ("<bot>", "<eot>", "<latent>"),
    "switch": ("<swi>", "</swi>", "<latent>"),
    "pause": ("<pause>",),
    "qthink": (),
    "cot": (),
}


class MissingTokensError(ValueError):
    """The tokenizer lacks special tokens a method needs."""


@dataclass(frozen=True)
class TokenIds:
    bot: int
    eot: int
    latent: int
    swi: int
    swi_end: int
    pause: int
    eos: int
    pad: int


def _id(tokenizer, token: str) -> int | None:
    vocab = tokenizer.get_vocab()
    return vocab.get(token)


def add_special_tokens(model: nn.Module, tokenizer, tokens: tuple[str, ...] = SPECIAL_TOKENS) -> dict[str, int]:
    """Adds the tokens the tokenizer lacks, resizes the model's embeddings and sets each
    new row (input, and output when untied) to the mean of the existing rows, so a new
    token starts as an "average" token rather than noise at the wrong scale.
    Returns ``{token: id}`` for all requested tokens.
    """
    missing = [t for t in tokens if _id(tokenizer, t) is None]
    if missing:
        old = model.get_input_embeddings().weight.shape[0]
        # Keep the tokenizer's own extra special tokens (chat markers etc.) beside ours.
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
        new_ids = [_id(tokenizer, t) for t in missing]
        size = max(len(tokenizer), max(new_ids) + 1)
        if size > old:
            model.resize_token_embeddings(size, mean_resizing=False)
        _mean_rows(model, new_ids, old)
    return {t: _id(tokenizer, t) for t in tokens}


def _mean_rows(model: nn.Module, rows: list[int], old: int) -> None:
    """Sets embedding ``rows`` (input, and output when untied) to the mean of the first ``old`` rows."""
    with torch.no_grad():
        emb_in = model.get_input_embeddings().weight
        mean_in = emb_in[:old].mean(0)
        emb_in[rows] = mean_in
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != emb_in.data_ptr():
            out.weight[rows] = out.weight[:old].mean(0)


def grow_embeddings(model: nn.Module, size: int) -> None:
    """Resizes a pretrained model's embeddings to ``size`` rows the way
    :func:`add_special_tokens` does (new rows at the mean of the existing ones), e.g. a
    base model an adapter trained with added tokens is loaded onto: its frozen new rows
    are then the ones training started from (what the model scores with its adapter
    disabled), not a random initialisation."""
    old = model.get_input_embeddings().weight.shape[0]
    if size <= old:
        return
    model.resize_token_embeddings(size, mean_resizing=False)
    _mean_rows(model, list(range(old, size)), old)


def require_tokens(tokenizer, method: str) -> dict[str, int]:
    """The ids of the tokens ``method`` needs; a clear error when some are missing."""
    if method not in METHOD_TOKENS:
        raise ValueError(f"unknown method {method!r}: expected one of {sorted(METHOD_TOKENS)}")
    need = METHOD_TOKENS[method]
    missing = [t for t in need if _id(tokenizer, t) is None]
    if missing:
        raise MissingTokensError(
            f"the tokenizer lacks {', '.join(missing)} needed by {method}: call "
            "latentlib.tokens.add_special_tokens(model, tokenizer) before training, or load the tokenizer "
            "saved with the trained model/adapter (it contains them)"
        )
    return {t: _id(tokenizer, t) for t in need}


def token_ids(tokenizer) -> TokenIds:
    """All special ids at once; raises if any method token is missing."""
    ids = {t: _id(tokenizer, t) for t in SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise MissingTokensError(
            f"the tokenizer lacks {', '.join(missing)}: call latentlib.tokens.add_special_tokens(model, tokenizer)"
        )
    return TokenIds(bot=ids["<bot>"], eot=ids["<eot>"], latent=ids["<latent>"], swi=ids["<swi>"],
                    swi_end=ids["</swi>"], pause=ids["<pause>"], eos=tokenizer.eos_token_id,
                    pad=tokenizer.pad_token_id)


def trainable_token_config(tokenizer, tokens: tuple[str, ...] = SPECIAL_TOKENS, *, whole_matrices: bool = False) -> dict:
    """Keyword arguments for ``peft.LoraConfig`` that make the new tokens trainable.

    Default: ``trainable_token_indices`` trains only the new rows (cheap, and the base
    embedding stays frozen). ``whole_matrices=True`` instead trains the whole embedding
    and LM head through ``modules_to_save``, as the SWITCH card does ("resized
    embeddings + LM head").
    """
    if whole_matrices:
        return {"modules_to_save": ["embed_tokens", "lm_head"]}
    ids = [_id(tokenizer, t) for t in tokens]
    if any(i is None for i in ids):
        missing = [t for t, i in zip(tokens, ids) if i is None]
        raise MissingTokensError(f"the tokenizer lacks {', '.join(missing)}: add them before configuring LoRA")
    return {"trainable_token_indices": {"embed_tokens": ids}}
