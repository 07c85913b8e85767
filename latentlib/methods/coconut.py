"""Coconut (Hao et al. 2024, arXiv 2412.06769): the first reasoning steps are replaced by
continuous thoughts, each the last hidden state of the position before it, learned by a
multi-stage curriculum (:mod:`latentlib.training.curriculum`).

What this module says is *what* goes *where*; the engine does the rest:

- a training example is segments (:mod:`latentlib.batching`): the question and the forced
  markers are ``prompt`` (no loss), the thought slots ``latent`` (no loss), the remaining
  steps and the answer ``target``;
- the loss is the engine's training forward (:func:`latentlib.recurrence.latent_forward`)
  and next-token cross-entropy, optionally plus SEQ-VCR on the thoughts;
- evaluation is :func:`latentlib.evaluate.evaluate` with a scripted policy: forced
  ``<bot>``, ``k*c`` latent steps, forced ``<eot>``, then free decoding.

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

Why the marker format needs that base (measured on the embedded task, 4-layer model):
started from a CoT model trained with an empty ``<bot><eot>`` pair (the paper's stage 0),
the token after ``<eot>`` stays near chance at every stage (stage 1: 15% after 40 steps,
43% after 400). In the plain format the last thought's state predicts the next step, as
the written step's state did in the CoT model; in the paper's format the forced
``<eot>`` in between has an input that carries nothing, so it must fetch the running
value from the thought before it and apply the next operation in the same column, which
the CoT model never learned. The base trained on ``question <bot> s1 … sk <eot> …`` has
that circuit and holds each value where the curriculum puts the thought that replaces
it; from it the marker format carries over like the plain one (97% at the last stage).

Where this departs from the paper: thoughts can come from other layers or transforms
than the last hidden state (``injection``, the replication's variants), can skip the position
counter (``latent_positions="skip"``), and can carry a SEQ-VCR regulariser (Arefin et al.
2024): variance and covariance terms of VICReg, per thought index across the batch, on
the thoughts after a fixed random orthogonal projection (the reference implementation
also uses a fixed projection; the SEQ-VCR paper learns it). The covariance term is
normalised by the projection width as in VICReg.
"""

from __future__ import annotations

import random
import resource
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from latentlib.batching import Encoded, Segment, collate, encode_record
from latentlib.evaluate import EvalSpec, evaluate, summarize
from latentlib.injection import INJECTION_SPECS, Injector, make_injector
from latentlib.policies import FREE, LATENT, ScriptedPolicy
from latentlib.recurrence import latent_forward
from latentlib.tokens import TokenIds, token_ids
from latentlib.training.base import token_loss
from latentlib.training.curriculum import (CurriculumConfig, StagePlan, StageResult, sample_stage, stage_plan,
                                           train_curriculum)

__all__ = ["CoconutConfig", "plan_for", "coconut_segments", "stage_examples", "thought_script", "eval_spec",
           "SeqVCR", "make_loss", "CoconutRun", "train_coconut", "saved_tensor_bytes", "measure_step_memory"]

METHODS = ("coconut", "pause", "icot", "cot")
FORMATS = ("markers", "plain")


@dataclass(frozen=True)
class CoconutConfig:
    method: str = "coconut"  # "coconut" (thoughts), "pause" (<pause> in the slots), "icot" (no slots), "cot" (written)
    format: str = "markers"  # "markers": question <bot> thoughts <eot> rest; "plain": thoughts in the steps' slots
    injection: str = "hs[-1]"  # what a thought is (latentlib.injection.INJECTION_SPECS; hs[-1] is the paper's)
    norm_match: bool = False  # rescale thoughts to the embedding RMS
    latent_positions: str = "continue"  # "continue": thoughts take positions; "skip": they share the next text's
    tbptt: int | None = None  # cut backprop between thoughts every tbptt thoughts (None: full)
    vcr_var: float = 0.0  # SEQ-VCR variance weight (0 with vcr_cov 0: no SEQ-VCR)
    vcr_cov: float = 0.0  # SEQ-VCR covariance weight
    vcr_dim: int = 32  # width of the fixed random projection SEQ-VCR looks through
    max_new_tokens: int = 32  # evaluation budget after the scripted thoughts

    def __post_init__(self):
        checks = [
            (self.method in METHODS, f"method={self.method!r}: use one of {METHODS}"),
            (self.format in FORMATS, f"format={self.format!r}: use 'markers' (<bot> thoughts <eot> rest) or 'plain'"),
            (self.latent_positions in ("continue", "skip"),
             f"latent_positions={self.latent_positions!r}: use 'continue' or 'skip'"),
            (self.tbptt is None or self.tbptt >= 1, f"tbptt={self.tbptt} must be >= 1 or None"),
            (self.vcr_var >= 0 and self.vcr_cov >= 0,
             f"vcr_var={self.vcr_var}, vcr_cov={self.vcr_cov}: SEQ-VCR weights must be >= 0 (0 disables)"),
            (self.vcr_dim >= 2, f"vcr_dim={self.vcr_dim} must be >= 2 (a covariance needs two coordinates)"),
            (self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens} must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        try:
            make_injector(self.injection, hidden_size=8)
        except ValueError as e:
            raise ValueError(f"injection={self.injection!r}: {e} (e.g. {INJECTION_SPECS[0]!r})") from None

    @property
    def uses_vcr(self) -> bool:
        return self.method == "coconut" and (self.vcr_var > 0 or self.vcr_cov > 0)


# ---------------------------------------------------------------------------- examples


def plan_for(stage: int, n_steps: int, curriculum: CurriculumConfig, method: str = "coconut") -> StagePlan:
    """The curriculum's plan for one problem; ``icot`` and ``cot`` have no latent slot (``cot``
    writes the removed steps where the thoughts would be)."""
    plan = stage_plan(stage, n_steps, c_thought=curriculum.c_thought, max_latent_stage=curriculum.max_latent_stage,
                      pad_latent_to_max=curriculum.pad_latent_to_max)
    return StagePlan(plan.removed, 0) if method in ("icot", "cot") else plan


def _slots(n: int, cfg: CoconutConfig, ids: TokenIds, written: tuple[int, ...] = ()) -> list[Segment]:
    if cfg.method == "cot":
        return [("target", written)] if written else []  # the removed steps, written where thoughts would be
    if n == 0:
        return []
    if cfg.method == "pause":
        return [("prompt", (ids.pause,) * n)]  # forced at inference: no loss, nothing injected
    return [("latent", (ids.latent,) * n)]


def coconut_segments(enc: Encoded, plan: StagePlan, cfg: CoconutConfig, ids: TokenIds) -> list[Segment]:
    """One training example: question, (markers around) the thought slots, the steps left, the answer."""
    segs: list[Segment] = [("prompt", enc.question)]
    slots = _slots(plan.thoughts, cfg, ids, tuple(t for s in enc.steps[:plan.removed] for t in s))
    if cfg.format == "markers":
        # The markers are forced at inference, so they are fed but never predicted.
        segs += [("prompt", (ids.bot,)), *slots, ("prompt", (ids.eot,))]
    else:
        segs += slots
    rest = tuple(t for s in enc.steps[plan.removed:] for t in s)
    if rest:
        segs.append(("target", rest))
    segs.append(("target", enc.answer))
    return segs


def stage_examples(encoded: Sequence[Encoded], stage: int, cfg: CoconutConfig, curriculum: CurriculumConfig,
                   ids: TokenIds, seed: int = 0) -> list[list[Segment]]:
    """Every training problem at ``stage`` (or, with ``uniform_prob``, at a random stage)."""
    rng = random.Random(seed * 1_000_003 + stage)
    out = []
    for enc in encoded:
        k = sample_stage(stage, len(enc.steps), curriculum.uniform_prob, rng)
        out.append(coconut_segments(enc, plan_for(k, len(enc.steps), curriculum, cfg.method), cfg, ids))
    return out


# ---------------------------------------------------------------------------- evaluation


def thought_script(n_thoughts: int, cfg: CoconutConfig, ids: TokenIds, *, written: int = 0) -> list[int]:
    """The scripted start of generation: ``[<bot>] + slots + [<eot>]`` (markers) or the slots
    (plain). ``method="cot"`` writes its ``written`` tokens freely in the slots."""
    if cfg.method == "coconut":
        slots = [LATENT] * n_thoughts
    elif cfg.method == "pause":
        slots = [ids.pause] * n_thoughts
    elif cfg.method == "cot":
        slots = [FREE] * written
    else:
        slots = []
    return [ids.bot, *slots, ids.eot] if cfg.format == "markers" else slots


def eval_spec(stage: int, cfg: CoconutConfig, curriculum: CurriculumConfig, tokenizer, *,
              injector: Injector | None = None, name: str | None = None, separator: str = "\n") -> EvalSpec:
    """How to evaluate a model trained to ``stage``: the scripted thoughts per problem, then free text."""
    ids = token_ids(tokenizer)

    def script(record):
        plan = plan_for(stage, len(record.steps), curriculum, cfg.method)
        written = 0
        if cfg.method == "cot":
            written = sum(map(len, encode_record(tokenizer, record, separator).steps[:plan.removed]))
        return thought_script(plan.thoughts, cfg, ids, written=written)

    def policy(records):
        return ScriptedPolicy([script(r) for r in records])

    longest = len(thought_script(plan_for(stage, 10**6, curriculum, cfg.method).thoughts, cfg, ids))
    return EvalSpec(name or f"{cfg.method} stage {stage}", policy=policy, injector=injector,
                    latent_positions=cfg.latent_positions, max_new_tokens=longest + cfg.max_new_tokens)


# ---------------------------------------------------------------------------- loss


class SeqVCR(nn.Module):
    """SEQ-VCR on thoughts: per thought index ``j``, the batch's ``j``-th thoughts, projected to
    ``dim`` coordinates, should keep a standard deviation of at least ``gamma`` in every
    coordinate (variance term) and uncorrelated coordinates (covariance term)."""

    def __init__(self, hidden_size: int, dim: int = 32, var_weight: float = 1.0, cov_weight: float = 0.04,
                 gamma: float = 1.0, eps: float = 1e-4, seed: int = 0):
        super().__init__()
        w = torch.empty(dim, hidden_size)
        nn.init.orthogonal_(w, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("projection", w)  # (P, D), fixed: not a parameter
        self.var_weight, self.cov_weight, self.gamma, self.eps = var_weight, cov_weight, gamma, eps

    def forward(self, thoughts: torch.Tensor, latent_mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
        latent_mask = latent_mask.bool()
        index = latent_mask.long().cumsum(1) - 1  # (B, T): j of the j-th thought in its row
        z = thoughts[latent_mask].float() @ self.projection.T  # (N, P), rows in (b, t) order
        j_of = index[latent_mask]  # (N,)
        P = z.shape[1]
        var_terms, cov_terms = [], []
        for j in range(int(j_of.max()) + 1 if len(j_of) else 0):
            x = z[j_of == j]  # (b, P): one thought per row that has a j-th thought
            if x.shape[0] < 2:
                continue
            x = x - x.mean(0)
            cov = x.T @ x / (x.shape[0] - 1)  # (P, P)
            var = cov.diagonal()
            var_terms.append(F.relu(self.gamma - (var + self.eps).sqrt()).mean())
            cov_terms.append((cov.pow(2).sum() - var.pow(2).sum()) / P)
        if not var_terms:
            zero = thoughts.sum() * 0.0
            return zero, {"vcr_var": 0.0, "vcr_cov": 0.0}
        var_loss, cov_loss = torch.stack(var_terms).mean(), torch.stack(cov_terms).mean()
        loss = self.var_weight * var_loss + self.cov_weight * cov_loss
        return loss, {"vcr_var": var_loss.item(), "vcr_cov": cov_loss.item()}


def make_loss(cfg: CoconutConfig, injector: Injector | None, vcr: SeqVCR | None = None):
    """``loss_fn(model, batch) -> (loss, metrics)`` for :func:`latentlib.training.loop.train`."""

    def loss_fn(model, batch):
        out = latent_forward(model, batch["input_ids"], batch["attention_mask"], batch["latent_mask"],
                             injector=injector, latent_positions=cfg.latent_positions, tbptt=cfg.tbptt)
        ce = token_loss(out.logits, batch["labels"])
        if vcr is None:
            return ce, {}
        reg, metrics = vcr(out.thoughts, batch["latent_mask"])
        return ce + reg, {"ce": ce.item(), **metrics}

    return loss_fn


# ---------------------------------------------------------------------------- the whole run


@dataclass
class CoconutRun:
    stages: list[StageResult]  # per stage: training history and evaluation
    injector: Injector  # the injector trained with the model (a projection head has weights)
    history: pd.DataFrame = field(default_factory=pd.DataFrame)  # training rows with stage and global step
    table: pd.DataFrame = field(default_factory=pd.DataFrame)  # per stage: accuracy, visible tokens, thoughts
    per_problem: pd.DataFrame = field(default_factory=pd.DataFrame)  # the last evaluated stage, one row per problem

    @property
    def seconds(self) -> float:
        return sum(s.result.seconds for s in self.stages)


def train_coconut(model, tokenizer, train_records: Sequence, cfg: CoconutConfig, curriculum: CurriculumConfig, *,
                  eval_records: Sequence | None = None, eval_stages: str = "all", separator: str = "\n",
                  injector: Injector | None = None, checkpoint_dir=None, progress: bool = True,
                  name: str | None = None, encoded: Sequence[Encoded] | None = None) -> CoconutRun:
    """Trains ``model`` through the curriculum and evaluates it after each stage
    (``eval_stages="all"``) or after the last one (``"last"``) on ``eval_records``.
    ``encoded``: ``train_records`` already encoded with this tokenizer (saves re-tokenising
    them when several runs share one training set)."""
    if eval_stages not in ("all", "last"):
        raise ValueError(f"eval_stages={eval_stages!r}: use 'all' or 'last'")
    ids = token_ids(tokenizer)
    name = name or cfg.method
    injector = injector if injector is not None else make_injector(cfg.injection, model, norm_match=cfg.norm_match)
    vcr = None
    if cfg.uses_vcr:
        hidden = model.get_input_embeddings().weight.shape[1]
        vcr = SeqVCR(hidden, cfg.vcr_dim, cfg.vcr_var, cfg.vcr_cov, seed=curriculum.train.seed)
    extra = {"injector": injector} if any(p.requires_grad for p in injector.parameters()) else None
    if encoded is None:
        encoded = [encode_record(tokenizer, r, separator) for r in train_records]
    elif len(encoded) != len(train_records):
        raise ValueError(f"{len(encoded)} encoded records for {len(train_records)} training records: encode them all")
    pad = tokenizer.pad_token_id
    rows, last = [], {}

    def after_stage(stage):
        if eval_records is None or (eval_stages == "last" and stage != curriculum.end_stage):
            return {}
        df = evaluate(model, tokenizer, eval_records, eval_spec(stage, cfg, curriculum, tokenizer, injector=injector,
                                                                 name=name, separator=separator),
                      batch_size=250, encode=lambda r: encode_record(tokenizer, r, separator), progress=False)
        last["df"] = df
        row = summarize(df).iloc[0].to_dict()
        rows.append({"stage": stage, **row})
        return row

    stages = train_curriculum(model, lambda k: stage_examples(encoded, k, cfg, curriculum, ids, curriculum.train.seed),
                              lambda b: collate(b, pad, align="first_latent"), make_loss(cfg, injector, vcr),
                              curriculum, extra_modules=extra, checkpoint_dir=checkpoint_dir,
                              after_stage=after_stage, desc=name, progress=progress)
    hist, offset = [], 0
    for s in stages:
        hist += [{**r, "stage": s.stage, "global_step": offset + r["step"]} for r in s.result.history]
        offset += s.result.steps
    table = pd.DataFrame(rows)
    if len(table):
        table.insert(1, "thoughts", [plan_for(k, 10**6, curriculum, cfg.method).thoughts for k in table.stage])
        table["train_seconds"] = [s.result.seconds for s in stages if s.stage in set(table.stage)]
    return CoconutRun(stages, injector, pd.DataFrame(hist), table, last.get("df", pd.DataFrame()))


# ---------------------------------------------------------------------------- memory


def saved_tensor_bytes(fn) -> tuple[int, object]:
    """Bytes autograd keeps for the backward while ``fn()`` builds its graph (each storage once),
    and ``fn()``'s result. This is the activation memory a loss term adds, measured exactly."""
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


def _rss_worker(model_dir: str, cfg_dict: dict, curriculum_dict: dict, stage: int, n_records: int,
                batch_size: int, steps: int, threads: int, separator: str) -> float:
    """In a spawned process: peak RSS (MB) of loading ``model_dir`` and training ``steps`` steps."""
    from latentlib.tasks import ChainConfig
    from latentlib.training.base import chain_task, load_model_dir
    from latentlib.training.loop import TrainConfig, train

    torch.set_num_threads(threads)
    model, tok = load_model_dir(model_dir)
    cfg = CoconutConfig(**cfg_dict)
    cur = CurriculumConfig(**curriculum_dict)
    splits, _ = chain_task(ChainConfig(n_train=n_records, n_valid=0, n_test=0))
    ids = token_ids(tok)
    injector = make_injector(cfg.injection, model, norm_match=cfg.norm_match)
    vcr = SeqVCR(model.config.hidden_size, cfg.vcr_dim, cfg.vcr_var, cfg.vcr_cov) if cfg.uses_vcr else None
    examples = stage_examples([encode_record(tok, r, separator) for r in splits.train], stage, cfg, cur, ids)
    train(model, examples, lambda b: collate(b, tok.pad_token_id, align="first_latent"), make_loss(cfg, injector, vcr),
          TrainConfig(steps=steps, batch_size=batch_size, warmup_steps=0), progress=False)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_step_memory(model, tokenizer, records: Sequence, configs: dict[str, CoconutConfig],
                        curriculum: CurriculumConfig, *, stage: int, batch_size: int, separator: str = "\n",
                        model_dir: str | None = None, rss_steps: int = 3, threads: int = 1) -> pd.DataFrame:
    """Memory of one training step at ``stage`` per configuration: the bytes autograd keeps
    for the backward (exact, in this process) and, with ``model_dir`` (the saved base model),
    the peak RSS of a fresh spawned process that trains ``rss_steps`` steps (a
    ``resource.getrusage`` high-water mark, so it includes the Python and torch runtime)."""
    import multiprocessing
    import time

    ids = token_ids(tokenizer)
    encoded = [encode_record(tokenizer, r, separator) for r in records[:batch_size]]
    hidden = model.get_input_embeddings().weight.shape[1]
    rows = []
    model.train()
    for name, cfg in configs.items():
        injector = make_injector(cfg.injection, model, norm_match=cfg.norm_match)
        vcr = SeqVCR(hidden, cfg.vcr_dim, cfg.vcr_var, cfg.vcr_cov) if cfg.uses_vcr else None
        batch = collate(stage_examples(encoded, stage, cfg, replace(curriculum, uniform_prob=0.0), ids),
                        tokenizer.pad_token_id, align="first_latent")
        t0 = time.perf_counter()
        saved, (loss, _) = saved_tensor_bytes(lambda: make_loss(cfg, injector, vcr)(model, batch))
        loss.backward()
        row = {"config": name, "saved_for_backward_mb": saved / 2**20, "step_seconds": time.perf_counter() - t0}
        model.zero_grad(set_to_none=True)
        if model_dir is not None:
            cur = {k: v for k, v in asdict(curriculum).items() if k != "train"}
            cur["uniform_prob"] = 0.0
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                row["peak_rss_mb"] = pool.apply(_rss_worker, (str(model_dir), asdict(cfg), cur, stage, batch_size,
                                                              batch_size, rss_steps, threads, separator))
        rows.append(row)
    model.eval()
    return pd.DataFrame(rows).round(3)


def load_coconut(directory):
    """``(model, tokenizer, CoconutConfig, CurriculumConfig)`` of a Coconut model saved by
    notebook 02 (its metadata records both configurations)."""
    from latentlib import artifacts
    from latentlib.training.base import load_model_dir
    from latentlib.training.loop import TrainConfig

    model, tokenizer = load_model_dir(directory)
    meta = artifacts.load_json(Path(directory) / artifacts.COMPLETE)
    if "coconut" not in meta or "curriculum" not in meta:
        raise ValueError(f"{directory} records no Coconut configuration (keys 'coconut', 'curriculum'): "
                         "it was not saved as a Coconut model; re-run 02_curriculum.ipynb")
    cur = dict(meta["curriculum"])
    cur["train"] = TrainConfig(**cur["train"])
    return model, tokenizer, CoconutConfig(**meta["coconut"]), CurriculumConfig(**cur)
