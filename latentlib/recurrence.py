"""The latent recurrence engine: batched, left-padded, KV-cached forward and generation
over any Hugging Face causal LM, where each position's input is either a token
embedding or a vector injected from the previous position's hidden states.

Why our own loop: ``transformers``' ``generate`` picks one token per step from logits;
it has no way to feed a hidden state back as the next input, which is the whole of
latent reasoning. Everything else here is the library's: the model, its KV cache
(``DynamicCache``), its attention masks and position handling.

Training forward (:func:`latent_forward`). A thought at column ``t`` depends on the
hidden state at ``t - 1``, so the sequence cannot go through in one pass. We split the
columns at every column that holds a thought in any row: one pass per chunk, the KV
cache carrying the past, so a batch with ``n`` aligned thoughts costs one full pass plus
``n`` single-column passes (the same number of passes as Coconut, each over new columns
only, with the embeddings built by tensor ops instead of per-element Python lists).
Gradients flow through every thought and through the cache; ``tbptt`` cuts the
thought-to-thought path every ``tbptt`` thoughts. The LM head runs once over all
positions after the chunks, and large weights' gradients are one product over all
chunks' rows (:mod:`latentlib.deferred_grads`) rather than one small product per pass.

Generation (:func:`generate`). One forward of one column per step for the whole batch.
Before each step a *policy* (see :mod:`latentlib.policies`) looks at each sequence's
sampled token and says, per sequence, whether the next input is that token, a forced
token, or a latent step. Fixed-K thoughts (Coconut, QThink), SWITCH's dynamic blocks,
pause tokens and plain decoding are all policies over this one loop; the engine has no
method-specific branch. As in ``model.generate``, the LM head runs on the last position
only. Unlike it: without per-step scores the head runs only for the sequences whose
next input the policy does not force (not on a thought of a fixed-K script); a large KV
cache is written in place into room reserved after the prompt pass instead of being
concatenated every step; and the loop runs in ``torch.inference_mode`` (the trace it
returns is copied out of it). Every layer's hidden states are collected only when the
injector or a capture reads one other than the last
(:meth:`~latentlib.injection.Injector.reads_layers`).

Conventions: ``attention_mask`` is 1 on real positions (left padding is 0); positions
follow ``model.generate`` (cumulative sum of the mask, minus one). Latent positions can
instead skip the position counter (``latent_positions="skip"``): text keeps the
positions it would have had without thoughts, and each thought shares the position of
the text token after it.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import dataclass, field, fields

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

from latentlib import distributed
from latentlib.deferred_grads import DeferredWeightGrads
from latentlib.injection import HiddenLayer, Injector
from latentlib.policies import reads_sample

__all__ = ["LatentOutput", "Trace", "position_ids_for", "latent_forward", "generate", "sample_tokens"]

LATENT_POSITION_MODES = ("continue", "skip")


def position_ids_for(attention_mask: torch.Tensor, latent_mask: torch.Tensor | None = None,
                     mode: str = "continue") -> torch.Tensor:
    """Position ids ``(B, T)`` from the padding mask, as ``model.generate`` computes them.

    ``mode="skip"``: thoughts do not advance the counter; each takes the position of the
    text that follows it.
    """
    if mode not in LATENT_POSITION_MODES:
        raise ValueError(f"latent_positions={mode!r}: use one of {LATENT_POSITION_MODES}")
    mask = attention_mask.long()
    if mode == "continue" or latent_mask is None:
        pos = mask.cumsum(-1) - 1
    else:
        latent = latent_mask.long() * mask
        pos = (mask - latent).cumsum(-1) - 1 + latent
    return pos.masked_fill(mask == 0, 0)


@dataclass
class LatentOutput:
    logits: torch.Tensor  # (B, T, V); (B, logits_to_keep, V) when that is given
    hidden: torch.Tensor  # (B, T, D): last layer (after the final norm)
    thoughts: torch.Tensor  # (B, T, D): the injected vectors at latent positions, zeros elsewhere
    layers: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, T, D), when captured


def _check_batch(input_ids, attention_mask, latent_mask):
    if input_ids.shape != attention_mask.shape or input_ids.shape != latent_mask.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} and "
            f"latent_mask {tuple(latent_mask.shape)} must have the same (B, T) shape"
        )
    if latent_mask[:, 0].any():
        raise ValueError("a thought at column 0 has no previous position to take its hidden state from; "
                         "put at least one token (e.g. <bot> or the question) before the first thought")
    if (latent_mask & (attention_mask == 0)).any():
        raise ValueError("latent_mask marks padding positions; thoughts must be real (attention_mask=1) positions")
    prev_is_pad = torch.zeros_like(latent_mask)
    prev_is_pad[:, 1:] = attention_mask[:, :-1] == 0
    if (latent_mask & prev_is_pad).any():
        raise ValueError("a thought directly follows padding; left-pad the whole sequence, "
                         "so that a real token comes before the first thought")


def latent_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   latent_mask: torch.Tensor, *, injector: Injector | None = None,
                   position_ids: torch.Tensor | None = None, latent_positions: str = "continue",
                   inputs_embeds: torch.Tensor | None = None, tbptt: int | None = None,
                   checkpoint: bool = False, capture_layers: tuple[int, ...] = (),
                   defer_weight_grads: bool = True, logits_to_keep: int = 0) -> LatentOutput:
    """Training/scoring forward where ``latent_mask`` positions take injected vectors.

    ``input_ids`` holds any placeholder id at latent positions (it is not read there).
    ``inputs_embeds`` (optional, ``(B, T, D)``) overrides the token embeddings, e.g. for
    random prefixes. ``capture_layers`` returns those layers' hidden states for every
    position. ``checkpoint=True`` recomputes each chunk's activations in the backward
    instead of storing them (activation checkpointing at chunk granularity: transformers'
    own gradient checkpointing drops the KV cache, which the recurrence needs).
    ``defer_weight_grads`` computes the thought passes' weight gradients as one product
    per weight where that is faster (few rows against the weight's size; see
    :mod:`latentlib.deferred_grads`): the gradients are the same up to float rounding. With
    no latent position this is exactly one plain forward. ``logits_to_keep`` (as
    transformers' argument of that name) returns the logits of the last that many
    positions only (0: all): scoring a completion needs none over its prompt, and with a
    large vocabulary those are most of the LM head's time and memory.
    """
    injector = injector if injector is not None else HiddenLayer(-1)
    latent_mask = latent_mask.bool()
    _check_batch(input_ids, attention_mask, latent_mask)
    if tbptt is not None and tbptt < 1:
        raise ValueError(f"tbptt={tbptt}: the truncation length must be >= 1 thoughts (or None for full backprop)")
    B, T = input_ids.shape
    if not 0 <= logits_to_keep <= T:
        raise ValueError(f"logits_to_keep={logits_to_keep}: keep between 0 (every position) and the sequence "
                         f"length {T}")
    embed = model.get_input_embeddings()
    embeds = embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
    if position_ids is None:
        position_ids = position_ids_for(attention_mask, latent_mask, latent_positions)

    latent_cols = torch.nonzero(latent_mask.any(0)).flatten().tolist()
    bounds = [0, *latent_cols, T]
    cache = None
    logits, hidden, thoughts = [], [], []
    layers: dict[int, list[torch.Tensor]] = {k: [] for k in capture_layers}
    prev_states: tuple[torch.Tensor, ...] | None = None
    n_thoughts = 0
    every_row = latent_mask[:, latent_cols].all(0).tolist() if latent_cols else []
    # Several chunks: the decoder runs without its LM head, which is applied once to all
    # positions afterwards (one large product and one weight gradient instead of one per
    # chunk: on SmolLM2-135M, with its 49k vocabulary, a 6-thought step went from 1.56x to
    # 1.46x a CoT step).
    # (also for one chunk when only the last positions' logits are wanted: the head runs on those alone)
    decoder = _plain_decoder(model) if latent_cols or logits_to_keep else None
    # every layer's hidden states only when the injector or a capture reads one before the last
    all_layers = _reads_all_layers(injector, capture_layers)
    deferred = None
    # (not on FSDP-sharded layers outside a gathered step: their whole weights exist only during each pass)
    if defer_weight_grads and latent_cols and torch.is_grad_enabled() and not checkpoint \
            and not distributed.collective_forwards(model):
        # only weights worth it for a one-column pass of this batch (else no routing at all)
        deferred = DeferredWeightGrads(decoder if decoder is not None else model, rows=B) or None
    for start, end in zip(bounds[:-1], bounds[1:]):
        chunk = embeds[:, start:end]  # (B, t, D)
        if start in latent_cols:
            thought = injector(prev_states).to(chunk.dtype)  # (B, D)
            n_thoughts += 1
            if tbptt is not None and n_thoughts % tbptt == 0:
                thought = thought.detach()
            if not every_row[n_thoughts - 1]:  # rows without a thought here keep their token embedding
                rows = latent_mask[:, start, None]  # (B, 1)
                thought = torch.where(rows, thought, torch.zeros_like(thought))
                first = torch.where(rows, thought, chunk[:, 0])
            else:  # aligned thoughts (every row thinks here): no masking needed
                first = thought
            chunk = torch.cat([first[:, None], chunk[:, 1:]], dim=1) if end - start > 1 else first[:, None]
            thoughts.append(thought)
        chunk_mask = attention_mask[:, :end]
        if checkpoint and torch.is_grad_enabled():
            chunk_logits, states, cache = _checkpointed_chunk(model, chunk, chunk_mask,
                                                              position_ids[:, start:end], cache, all_layers)
            logits.append(chunk_logits)
        else:
            # every chunk routes its weight gradients to one product per weight (see deferred_grads)
            route = deferred.active() if deferred is not None else nullcontext()
            with route:
                out = (decoder if decoder is not None else model)(
                    inputs_embeds=chunk, attention_mask=chunk_mask, position_ids=position_ids[:, start:end],
                    cache=cache, use_cache=end < T, output_hidden_states=all_layers or decoder is None)
            cache = out.cache
            if decoder is None:  # the whole model: its last hidden state comes with the others
                states = out.hidden_states if all_layers else out.hidden_states[-1:]
                logits.append(out.logits)
            else:
                states = out.hidden_states if all_layers else (out.last_hidden_state,)
            # else the LM head runs once on every position after the loop
        hidden.append(states[-1])
        for k in capture_layers:
            layers[k].append(states[k])
        prev_states = tuple(h[:, -1] for h in states)  # (last,) unless all_layers
    hidden_all = torch.cat(hidden, 1)
    first = T - logits_to_keep if logits_to_keep else 0  # the first position whose logits are returned
    logits_all = torch.cat(logits, 1)[:, first:] if logits else model.get_output_embeddings()(hidden_all[:, first:])
    # the injected vectors at their columns, zeros elsewhere (built once: one op, not one per chunk)
    all_thoughts = embeds.new_zeros(embeds.shape)
    if thoughts:
        all_thoughts = _scatter_columns(all_thoughts, latent_cols, torch.stack(thoughts, 1))
    return LatentOutput(
        logits=logits_all, hidden=hidden_all, thoughts=all_thoughts,
        layers={k: torch.cat(v, 1) for k, v in layers.items()},
    )


def _reads_all_layers(injector, capture_layers) -> bool:
    """Whether a forward must collect every layer's hidden states: when the injector
    (see :meth:`Injector.reads_layers`; an injector that does not say reads any) or a
    capture needs one other than the last. Otherwise the engine works with the last
    layer only and hands the injector the 1-tuple ``(last,)``: the same tensor it would
    have read at ``[-1]``, without the per-layer collection."""
    reads = getattr(injector, "reads_layers", None)
    wanted = reads() if callable(reads) else None
    return wanted is None or any(k != -1 for k in (*wanted, *capture_layers))


def _plain_decoder(model):
    """The model's decoder stack when its logits are exactly ``lm_head(last hidden state)``
    (no logit scaling or soft-capping), else None (the whole model runs per chunk)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or decoder is model or model.get_output_embeddings() is None:
        return None
    return decoder


def _scatter_columns(base: torch.Tensor, cols: list[int], values: torch.Tensor) -> torch.Tensor:
    """``base`` (B, T, D) with ``values`` (B, len(cols), D) at columns ``cols`` (differentiable)."""
    index = torch.tensor(cols, device=base.device)[None, :, None].expand(values.shape)
    return base.scatter(1, index, values)


def _checkpointed_chunk(model, chunk, mask, pos, cache, all_layers=True):
    """One chunk under ``torch.utils.checkpoint``. The cache goes in and out as plain K/V
    tensors and is rebuilt inside, so the backward's replay cannot append to it twice.
    Returns every layer's hidden states, or with ``all_layers=False`` the last one only."""
    from torch.utils.checkpoint import checkpoint
    from transformers import DynamicCache

    past = tuple((k, v) for k, v, *_ in cache) if cache is not None else ()

    def run(chunk, *flat):
        pairs = [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
        c = DynamicCache(ddp_cache_data=pairs) if pairs else DynamicCache()
        out = model(inputs_embeds=chunk, attention_mask=mask, position_ids=pos, cache=c,
                    use_cache=True, output_hidden_states=True)
        kv = tuple(t for k, v, *_ in out.cache for t in (k, v))
        states = out.hidden_states if all_layers else out.hidden_states[-1:]
        return (out.logits, *states, *kv)

    flat = tuple(t for kv in past for t in kv)
    res = checkpoint(run, chunk, *flat, use_reentrant=False)
    n_states = len(res) - 1 - 2 * model.config.num_hidden_layers
    states = res[1:1 + n_states]
    kv = res[1 + n_states:]
    new_cache = DynamicCache(ddp_cache_data=[(kv[i], kv[i + 1]) for i in range(0, len(kv), 2)])
    return res[0], states, new_cache


# ---------------------------------------------------------------------------- generation


@dataclass
class Trace:
    """What generation did, per sequence and generated position ``j``.

    ``tokens[b, j]`` is the token fed at position ``j`` (the latent placeholder id at
    latent steps, ``pad`` after the sequence finished); ``hidden[k][b, j]`` is layer
    ``k``'s output after that input, i.e. the state that predicts position ``j + 1``.
    ``entropy[b, j]`` and ``logprob[b, j]`` describe the distribution the token at ``j``
    was drawn from (entropy at temperature 1; logprob under the sampling temperature;
    NaN when generation was asked for no ``scores``).
    """

    tokens: torch.Tensor  # (B, S) long
    is_latent: torch.Tensor  # (B, S) bool
    valid: torch.Tensor  # (B, S) bool: generated before the sequence finished (eos included)
    entropy: torch.Tensor  # (B, S) float
    logprob: torch.Tensor  # (B, S) float
    thoughts: torch.Tensor  # (B, S, D) injected vectors (zeros at text positions)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, S, D)
    prompt_hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, D), last prompt position

    def copied(self) -> "Trace":
        """The same trace with every tensor copied (made outside ``torch.inference_mode``,
        the copies are ordinary tensors that autograd accepts)."""
        def copy(value):
            return {k: v.clone() for k, v in value.items()} if isinstance(value, dict) else value.clone()

        return Trace(**{f.name: copy(getattr(self, f.name)) for f in fields(self)})

    @property
    def visible_tokens(self) -> torch.Tensor:
        """(B,) text tokens written (eos excluded is the caller's choice: this counts every text token)."""
        return (self.valid & ~self.is_latent).sum(1)

    @property
    def latent_steps(self) -> torch.Tensor:
        """(B,) latent steps taken."""
        return (self.valid & self.is_latent).sum(1)

    def text_ids(self, b: int) -> list[int]:
        """The text tokens of sequence ``b`` in order (latent steps left out)."""
        keep = self.valid[b] & ~self.is_latent[b]
        return self.tokens[b][keep].tolist()


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                  generators: list[torch.Generator] | None = None, *, uniforms: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Greedy (``temperature == 0``) or temperature/top-p sampling, one generator per row.

    Each row draws its own uniform number from its own generator, so a sequence's sample
    does not depend on which other sequences share the batch. ``uniforms`` ``(B,)``: those
    numbers drawn beforehand (:func:`generate` draws a whole generation's at once), instead
    of one draw per row from ``generators``.

    The sample is the inverse of the cumulative distribution at the row's number: over the
    vocabulary in its own order when ``top_p == 1``, and over the tokens sorted by
    probability (which the nucleus needs) otherwise. Sorting SmolLM2-135M's 49k vocabulary
    took about 45 times as long as the cumulative sum on one CPU thread (20 rows: 142 ms
    against 3 ms per decoding step).
    """
    if temperature == 0:
        # the index of the first maximum, as argmax gives it, in a third of argmax's time on CPU
        return logits.max(-1).indices
    probs = torch.softmax(logits.float() / temperature, -1)  # (B, V)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = (sorted_p.cumsum(-1) - sorted_p) < top_p  # always keeps the most likely token
        probs = sorted_p * keep
    else:
        order = None
    cdf = probs.cumsum(-1)
    if uniforms is not None:
        u = uniforms.to(logits.device)[:, None]
    elif generators is None:
        u = torch.rand(logits.shape[0], 1, device=logits.device)
    else:
        u = torch.stack([torch.rand((), generator=g) for g in generators]).to(logits.device)[:, None]
    u = u * cdf[:, -1:]
    # the first token whose cumulative probability exceeds u: never one of probability 0 ...
    idx = torch.searchsorted(cdf, u, right=True).clamp_max(cdf.shape[-1] - 1)  # (B, 1)
    # ... unless rounding put u at the very top of the cdf: then the last token of nonzero probability
    zero = probs.gather(-1, idx) == 0
    if zero.any():
        last = (probs > 0).cumsum(-1).argmax(-1, keepdim=True)  # first index reaching the final count
        idx = torch.where(zero, last, idx)
    return (idx if order is None else order.gather(-1, idx)).squeeze(-1)


ALL_ROWS = slice(None)  # every row of the batch (an index of the logits' first axis)


class _LastPosition:
    """One cached forward of generation, returning what the loop reads: the logits
    ``(B, V)`` of the batch's ``rows`` (:data:`ALL_ROWS`, a tensor of row indices, or
    ``None`` for no logits; on the decoder path the head runs on those rows only), the
    hidden states (a tuple of ``(B, D)``: every layer's, or ``(last,)`` unless
    ``all_layers``) of the last position, and the cache.

    As ``model.generate`` does, the LM head runs on the last position only (the prompt
    pass would otherwise compute ``B x T x V`` logits to read ``B x V``): the decoder
    stack, then the head on its last hidden state, when the logits are exactly that
    (:func:`_plain_decoder`), else the whole model with ``logits_to_keep=1``. Every
    layer's hidden states are collected only when asked for.
    """

    def __init__(self, model: nn.Module, all_layers: bool):
        self.model, self.all_layers = model, all_layers
        self.decoder = _plain_decoder(model)
        self.head = model.get_output_embeddings() if self.decoder is not None else None
        self.keep = {"logits_to_keep": 1} if self.decoder is None and _accepts(model, "logits_to_keep") else {}

    def __call__(self, rows=ALL_ROWS, **inputs):
        if self.decoder is not None:
            out = self.decoder(**inputs, use_cache=True, output_hidden_states=self.all_layers)
            last = out.last_hidden_state[:, -1]
            states = tuple(h[:, -1] for h in out.hidden_states) if self.all_layers else (last,)
            return None if rows is None else self.head(last[rows]), states, out.cache
        out = self.model(**inputs, use_cache=True, output_hidden_states=True, **self.keep)
        hidden = out.hidden_states if self.all_layers else out.hidden_states[-1:]
        return None if rows is None else out.logits[:, -1][rows], tuple(h[:, -1] for h in hidden), out.cache


class _ReservedLayer(DynamicLayer):
    """transformers' growing cache layer with room reserved for ``capacity`` positions.

    ``DynamicLayer`` appends each step's keys and values with ``torch.cat``: a copy of the
    whole layer's cache per step and layer (on SmolLM2-135M at batch 32, about 90 MB per
    decoding step). This one writes the new positions into a buffer reserved once, and
    ``keys``/``values`` are views of its filled part, so attention reads the same numbers.
    If something replaced the views (a crop keeps them; a batch reorder does not) or the
    room runs out, it falls back to concatenation.
    """

    def __init__(self, layer: DynamicLayer, capacity: int):
        super().__init__()
        keys, values = layer.keys, layer.values
        n = keys.shape[-2]
        self.device, self.is_initialized = keys.device, True
        self._keys = keys.new_empty((*keys.shape[:-2], max(capacity, n), keys.shape[-1]))
        self._values = values.new_empty((*values.shape[:-2], max(capacity, n), values.shape[-1]))
        self._keys.narrow(-2, 0, n).copy_(keys)
        self._values.narrow(-2, 0, n).copy_(values)
        self.keys, self.values = self._keys.narrow(-2, 0, n), self._values.narrow(-2, 0, n)

    def _in_buffer(self, x: torch.Tensor, buffer: torch.Tensor) -> bool:
        """``x`` is a prefix of ``buffer`` along the positions (as :meth:`update` and a crop leave it)."""
        return x._base is buffer and x.storage_offset() == 0 and x.stride() == buffer.stride()

    def update(self, key_states, value_states, *args, **kwargs):
        n, t = self.keys.shape[-2], key_states.shape[-2]
        if (n + t > self._keys.shape[-2] or not self._in_buffer(self.keys, self._keys)
                or not self._in_buffer(self.values, self._values)):
            return super().update(key_states, value_states, *args, **kwargs)
        self._keys.narrow(-2, n, t).copy_(key_states)
        self._values.narrow(-2, n, t).copy_(value_states)
        self.keys, self.values = self._keys.narrow(-2, 0, n + t), self._values.narrow(-2, 0, n + t)
        return self.keys, self.values


# Measured, not derived (one thread): concatenating a (1, 3, 60, 64) layer cache (SmolLM2 at
# batch 1) takes about as long as the in-place write and its checks, a (32, 3, 60, 64) one 6 to
# 20 times longer. Below this many elements per layer tensor the reserved room does not pay.
MIN_RESERVED_NUMEL = 65_536


def _reserve(cache, capacity: int):
    """Swaps the cache's plain ``DynamicLayer`` layers (filled, 4-d, at least
    :data:`MIN_RESERVED_NUMEL` elements at ``capacity`` positions) for :class:`_ReservedLayer`
    with room for ``capacity`` positions; any other kind of cache or layer stays as it is."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or getattr(cache, "offloading", False):
        return cache
    for i, layer in enumerate(layers):
        if (type(layer) is DynamicLayer and layer.is_initialized and isinstance(layer.keys, torch.Tensor)
                and layer.keys.dim() == 4 and layer.keys.numel() > 0
                and layer.keys.numel() // layer.keys.shape[-2] * capacity >= MIN_RESERVED_NUMEL):
            layers[i] = _ReservedLayer(layer, capacity)
    return cache


def _accepts(model: nn.Module, name: str) -> bool:
    """Whether the (base) model's forward takes the keyword ``name``."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return name in inspect.signature(base.forward).parameters


def _entropy_and_logprob(logits, tokens, temperature):
    logp1 = torch.log_softmax(logits.float(), -1)
    entropy = -logp1.exp().mul_(logp1).sum(-1)  # one (B, V) temporary instead of two
    logp = logp1 if temperature in (0, 1) else torch.log_softmax(logits.float() / temperature, -1)
    return entropy, logp.gather(-1, tokens[:, None]).squeeze(-1)


def _in_inference_mode(fn):
    """Runs ``fn`` (which returns a :class:`Trace`) under ``torch.inference_mode`` and hands
    back copies of the trace's tensors made outside it.

    Inference mode also skips the view and version-counter bookkeeping ``no_grad`` keeps,
    which is a sizeable part of a decoding step when the model is small or the batch is 1
    (measured: 10-20% of the engine's time on the tiny preset at batch 1 and 8, one thread).
    Its tensors cannot enter autograd later (GRPO scores rollouts with gradients), hence
    the copies: a few small ``(B, S)`` and ``(B, S, D)`` tensors per call.
    """

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.inference_mode():
            trace = fn(*args, **kwargs)
        return trace.copied()

    return run


@_in_inference_mode
def generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
             policy, max_new_tokens: int, eos_token_id: int | list[int], pad_token_id: int,
             injector: Injector | None = None, latent_token_id: int | None = None,
             temperature: float = 0.0, top_p: float = 1.0, seeds: list[int] | None = None,
             inputs_embeds: torch.Tensor | None = None, latent_positions: str = "continue",
             capture_layers: tuple[int, ...] = (), neutral_token_ids: tuple[int, ...] = (),
             scores: bool = True) -> Trace:
    """Batched generation in which each sequence independently decodes or thinks.

    ``input_ids``/``attention_mask``: the left-padded prompts ``(B, T)``. ``policy``: an
    object with ``start(batch_size, device)`` and ``step(state, sampled) -> (latent, token)``
    (see :mod:`latentlib.policies`). ``seeds``: one per sequence for sampling (default:
    the global RNG). Stops when every sequence has emitted eos or after ``max_new_tokens``
    positions (latent steps count toward it). ``neutral_token_ids``: text tokens that do
    not advance the position counter (each shares the position of the token after it, as
    thoughts do with ``latent_positions="skip"``); re-score such a trace with
    ``position_ids_for(mask, skipped, "skip")``. ``scores=False`` skips the per-step
    entropy and log-prob (a log-softmax over the vocabulary at every step, which
    ``model.generate`` does not do either; with SmolLM2's 49k vocabulary it is a sizeable
    part of a batched step): the trace's ``entropy`` and ``logprob`` are then NaN, and the
    LM head runs only for the sequences whose next input the policy does not force
    (:func:`latentlib.policies.reads_sample`: Coconut's and QThink's fixed thoughts and the
    first ``K_min`` steps of a SWITCH block need no token), which ``model.generate`` cannot
    know.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
    injector = injector if injector is not None else HiddenLayer(-1)
    B = input_ids.shape[0]
    device = input_ids.device
    if seeds is not None and len(seeds) != B:
        raise ValueError(f"{len(seeds)} seeds for a batch of {B} sequences: give one seed per sequence")
    distributed.require_gathered(model, "generate")
    uniforms = None
    if seeds is not None and temperature > 0:
        # each row's numbers for every step at once: the same numbers as one draw per step
        # (a CPU generator's sequence does not depend on how it is drawn), in B calls instead of B per step
        uniforms = torch.stack([torch.rand(max_new_tokens, generator=torch.Generator(device="cpu").manual_seed(int(s)))
                                for s in seeds], 1) if max_new_tokens else None  # (max_new_tokens, B)
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    placeholder = latent_token_id if latent_token_id is not None else pad_token_id
    embed = model.get_input_embeddings()
    forward = _LastPosition(model, all_layers=_reads_all_layers(injector, capture_layers))

    state = policy.start(B, device)

    def head_rows():
        """The rows whose next decision reads a token (:data:`ALL_ROWS`, their indices, or
        ``None``): a row the policy forces (a thought or token of a script, a SWITCH block
        before K_min) needs no logits, and the LM head runs on the others only."""
        reads = None if scores else reads_sample(policy, state)
        if reads is None:
            return ALL_ROWS
        n = int(reads.sum())
        return ALL_ROWS if n == B else None if n == 0 else reads.nonzero().squeeze(1)

    mask = attention_mask.long()
    pos = position_ids_for(mask)
    rows = head_rows()
    logits, states, cache = forward(input_ids=None if inputs_embeds is not None else input_ids,
                                    inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=pos, rows=rows)
    # room for every position generation can add (one per step), written in place
    cache = _reserve(cache, mask.shape[1] + max_new_tokens)
    prompt_hidden = {k: states[k] for k in capture_layers}
    next_pos = pos[:, -1] + 1  # (B,)

    finished = torch.zeros(B, dtype=torch.bool, device=device)
    rec_tok, rec_lat, rec_valid, rec_ent, rec_lp, rec_th = [], [], [], [], [], []
    rec_hidden: dict[int, list[torch.Tensor]] = {k: [] for k in capture_layers}

    neutral = torch.tensor(list(neutral_token_ids), dtype=torch.long, device=device)

    def advance(step_in, latent, token):
        nonlocal mask, cache, logits, states, next_pos, rows
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        rows = head_rows()
        logits, states, cache = forward(inputs_embeds=step_in[:, None], attention_mask=mask,
                                        position_ids=next_pos[:, None], cache=cache, rows=rows)
        for k in capture_layers:
            rec_hidden[k].append(states[k])
        # "skip" positions: a thought (or a neutral token) does not advance the counter for what follows it.
        if latent_positions != "skip" and not len(neutral):
            next_pos = next_pos + 1
            return
        skip = latent if latent_positions == "skip" else torch.zeros_like(latent)
        if len(neutral):
            skip = skip | (~latent & torch.isin(token, neutral))
        next_pos = next_pos + (~skip).long()

    step_in = latent = token = None
    for step in range(max_new_tokens):
        if step > 0:
            advance(step_in, latent, token)
        u = None if uniforms is None else uniforms[step]
        if rows is ALL_ROWS:
            sampled = sample_tokens(logits, temperature, top_p, uniforms=u)
        else:  # a placeholder stands for the token of a row that does not read it
            sampled = torch.full((B,), placeholder, dtype=torch.long, device=device)
            if rows is not None:
                sampled[rows] = sample_tokens(logits, temperature, top_p, uniforms=None if u is None else u[rows])
        latent, token = policy.step(state, sampled)  # (B,) bool, (B,) long
        latent = latent & ~finished
        token = token.masked_fill(finished, pad_token_id).masked_fill(latent, placeholder)
        if scores:
            entropy, logprob = _entropy_and_logprob(logits, token, temperature)
        else:
            entropy = logprob = torch.full((B,), float("nan"), device=device)
        n_latent = int(latent.sum())
        if n_latent == B:  # every row thinks (fixed-K thoughts): no token embedding, no masking
            thought = step_in = injector(states).to(embed.weight.dtype)
        elif n_latent:
            text_emb = embed(token)  # (B, D)
            thought = injector(states).to(text_emb.dtype)
            thought = torch.where(latent[:, None], thought, torch.zeros_like(thought))
            step_in = torch.where(latent[:, None], thought, text_emb)
        else:
            step_in = embed(token)  # (B, D)
            thought = torch.zeros_like(step_in)
        rec_tok.append(token)
        rec_lat.append(latent)
        rec_valid.append(~finished)
        rec_ent.append(entropy)
        rec_lp.append(logprob)
        rec_th.append(thought)
        finished = finished | (~latent & torch.isin(token, eos))
        if finished.all():
            break
    if capture_layers and step_in is not None:
        advance(step_in, latent, token)  # the hidden state after the last input, only when asked for

    def stack(xs, dtype=None, shape=(B, 0)):
        return torch.stack(xs, 1) if xs else torch.zeros(shape, dtype=dtype, device=device)

    D = embed.weight.shape[1]
    return Trace(
        tokens=stack(rec_tok, torch.long), is_latent=stack(rec_lat, torch.bool), valid=stack(rec_valid, torch.bool),
        entropy=stack(rec_ent, torch.float), logprob=stack(rec_lp, torch.float),
        thoughts=stack(rec_th, embed.weight.dtype, (B, 0, D)),
        hidden={k: stack(v, embed.weight.dtype, (B, 0, D)) for k, v in rec_hidden.items()},
        prompt_hidden=prompt_hidden,
    )
