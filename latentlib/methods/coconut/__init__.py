"""Coconut (Hao et al. 2024, arXiv 2412.06769): the first reasoning steps are replaced by
continuous thoughts, each the last hidden state of the position before it, learned by a
multi-stage curriculum.

What this package says is *what* goes *where*; the engine does the rest:

- a training example is segments (:mod:`latentlib.batching`): the question and the forced
  markers are ``prompt`` (no loss), the thought slots ``latent`` (no loss), the remaining
  steps and the answer ``target`` (:mod:`.formats`);
- the loss is the engine's training forward (:func:`latentlib.recurrence.latent_forward`)
  and next-token cross-entropy, optionally plus SEQ-VCR on the thoughts (:mod:`.train`);
- the curriculum runs through :func:`latentlib.training.curriculum.train_curriculum`;
  stage ``k`` removes the first ``k`` steps and puts ``k * c`` thoughts in their place
  (:func:`.formats.stage_plan`);
- evaluation is :func:`latentlib.evaluate.evaluate` with a scripted policy: forced
  ``<bot>``, ``k*c`` latent steps, forced ``<eot>``, then free decoding;
- a trained model is saved and loaded with its configuration by :mod:`.io`.

Formats (``CoconutConfig.format``):

- ``"markers"``: ``question <bot> thoughts <eot> rest answer`` (the paper's);
- ``"plain"``: ``question thoughts rest answer``, the thoughts in the slots of the removed
  steps (with one-token steps and c = 1 every later position keeps its CoT position).

Methods (``CoconutConfig.method``), all through the same code:

- ``"coconut"``: continuous thoughts;
- ``"pause"``: pause-as-thought, ``<pause>`` tokens forced in the thought slots (ordinary
  prompt tokens: nothing is injected, so the model gets the same extra positions but no
  recurrence);
- ``"icot"``: stepwise internalisation in the style of iCoT (Deng et al. 2024): the
  curriculum removes the steps and puts nothing in their place;
- ``"cot"``: the removed steps are *written* in the thought slots (with loss). With
  ``format="markers"`` and ``uniform_prob=1`` this trains the marker format's base model:
  CoT with ``<bot> … <eot>`` around a random number of leading steps.

Why the marker format needs that base. Started from a CoT model trained with an empty
``<bot><eot>`` pair (the paper's stage 0), a from-scratch model's token after ``<eot>``
stays near chance stage after stage. In the plain format the last thought's state
predicts the next step, as the written step's state did in the CoT model; in the paper's
format the forced ``<eot>`` in between has an input that carries nothing, so it must fetch
the running value from the thought before it and apply the next operation in the same
column, which the CoT model never learned. The base trained on
``question <bot> s1 … sk <eot> …`` has that circuit and holds each value where the
curriculum puts the thought that replaces it. (Measurements: ``docs/findings.md``.)

Where this departs from the paper: stage lengths are optimizer steps; thoughts can come
from other layers or transforms than the last hidden state (``injection``, the
replication's variants), can skip the position counter (``latent_positions="skip"``), and
can carry a SEQ-VCR regulariser (Arefin et al. 2024): variance and covariance terms of
VICReg, per thought index across the batch, on the thoughts after a fixed random
orthogonal projection (the reference implementation also uses a fixed projection; the
SEQ-VCR paper learns it). The covariance term is normalised by the projection width as
in VICReg. With probability ``uniform_prob`` an example is built at a stage drawn from
``0 .. n_steps`` (the paper's mixing of earlier stages), drawn once per example and stage
from a seeded generator (the reference draws it when it rebuilds the dataset each epoch).
"""

from latentlib.methods.coconut.config import FORMATS, METHODS, CoconutConfig, without_curriculum
from latentlib.methods.coconut.formats import (StagePlan, coconut_segments, eval_spec, plan_for, sample_stage,
                                               smoothed_stage, stage_examples, stage_plan, thought_script)
from latentlib.methods.coconut.io import SavedCoconut, load_coconut, save_coconut
from latentlib.methods.coconut.train import CoconutRun, SeqVCR, make_loss, make_vcr, train_coconut

__all__ = ["FORMATS", "METHODS", "CoconutConfig", "without_curriculum", "StagePlan", "stage_plan", "sample_stage",
           "smoothed_stage",
           "plan_for", "coconut_segments", "stage_examples", "thought_script", "eval_spec", "SeqVCR", "make_vcr",
           "make_loss", "CoconutRun", "train_coconut", "SavedCoconut", "save_coconut", "load_coconut"]
