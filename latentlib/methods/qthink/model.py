"""QThink (the QThink card) and CODI: K continuous thoughts through a learned projection head,
then greedy text.

What is injected where. After the question, K latent slots; the input of slot k is the
projection head (Linear(D, D) -> GELU -> Linear(D, D) -> LayerNorm(D)) applied to the
last-layer hidden state of the position before it (the last question token for k = 1).
Then the model writes text greedily (for the embedded task: ``#### <answer>``). At
inference this is the engine's :func:`~latentlib.recurrence.generate` with
``ScriptedPolicy([LATENT] * K)`` and the :class:`~latentlib.injection.Projection`
injector: one forward per thought through the KV cache, as in the card's reference loop
(a test pins the equality). Training and the teacher signal are in
:mod:`latentlib.methods.qthink.distill`, checkpoints in :mod:`latentlib.methods.qthink.io`.

Departures from the card: the card's chat-template prompt becomes the task's prompt
(the encoded question); the card evaluates GSM8K with 2,048 new tokens of verbose text
after the thoughts, while the embedded task's target after the thoughts is the answer
line only (``target="cot"`` in the distillation config keeps the steps as text); a new
head's LayerNorm gain starts at the embeddings' RMS instead of 1 (see
:func:`make_projection`).
"""

from __future__ import annotations

import torch

from latentlib.batching import Encoded, Segment, prompt_batch
from latentlib.evaluate import EvalSpec
from latentlib.injection import Projection, ProjectionHead, embedding_rms
from latentlib.policies import ScriptedPolicy, latent_script
from latentlib.recurrence import generate

__all__ = ["qthink_segments", "qthink_policy", "make_projection", "think", "qthink_spec"]


def qthink_segments(enc: Encoded, num_latent: int, latent_id: int, *, target: str = "answer",
                    max_answer_length: int | None = None) -> list[Segment]:
    """``[question, K latent slots, target]``: the target is the answer line (``"answer"``)
    or the written steps and the answer (``"cot"``), cut to ``max_answer_length`` tokens
    (eos is kept as the last token when the cut removes it)."""
    if target not in ("answer", "cot"):
        raise ValueError(f"target={target!r}: use 'answer' or 'cot'")
    text = list(enc.answer) if target == "answer" else [t for s in enc.steps for t in s] + list(enc.answer)
    if max_answer_length is not None and len(text) > max_answer_length:
        text = text[:max_answer_length - 1] + [enc.answer[-1]]
    return [("prompt", enc.question), ("latent", (latent_id,) * num_latent), ("target", tuple(text))]


def qthink_policy(num_latent: int) -> ScriptedPolicy:
    """K latent steps, then free (greedy) decoding."""
    return ScriptedPolicy(latent_script(num_latent))


def make_projection(model, head: ProjectionHead | None = None) -> Projection:
    """The projection injector on the last layer, sized and placed for ``model``.

    A new head starts with its LayerNorm gain at the RMS of the model's input embeddings,
    so its first thoughts have the scale of ordinary token embeddings (with the gain of 1
    they would be about 12 times larger than the tiny model's embeddings). The layout
    stays the release's.
    """
    weight = model.get_input_embeddings().weight
    if head is None:
        head = ProjectionHead(weight.shape[1])
        with torch.no_grad():
            head.mlp[3].weight.fill_(embedding_rms(model))
    return Projection(weight.shape[1], layer=-1, head=head).to(weight.device)


@torch.no_grad()
def think(model, tokenizer, projection: Projection, prompts: list, *, num_latent: int,
          max_new_tokens: int = 32, latent_positions: str = "continue"):
    """K thoughts, then greedy text, for a batch of prompts (token id lists): a ``Trace``."""
    input_ids, mask = prompt_batch(prompts, tokenizer.pad_token_id)
    dev = model.get_input_embeddings().weight.device
    return generate(model, input_ids.to(dev), mask.to(dev), policy=qthink_policy(num_latent),
                    max_new_tokens=num_latent + max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id, injector=projection,
                    latent_token_id=tokenizer.get_vocab().get("<latent>"), latent_positions=latent_positions)


def qthink_spec(name: str, projection: Projection, num_latent: int, *, max_new_tokens: int = 16,
                latent_positions: str = "continue") -> EvalSpec:
    """How :func:`latentlib.evaluate.evaluate` runs a QThink model (the budget counts the thoughts)."""
    return EvalSpec(name, policy=lambda records: qthink_policy(num_latent), injector=projection,
                    latent_positions=latent_positions, max_new_tokens=num_latent + max_new_tokens)
