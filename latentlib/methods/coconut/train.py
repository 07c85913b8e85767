"""Coconut's loss (cross-entropy through the engine's latent forward, optionally with
SEQ-VCR on the thoughts) and its training run: the curriculum, evaluated stage by stage."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from latentlib.batching import Encoded, collate, encode_record
from latentlib.evaluate import evaluate, summarize
from latentlib.injection import Injector, make_injector
from latentlib.methods.coconut.config import CoconutConfig
from latentlib.methods.coconut.formats import eval_spec, plan_for, stage_examples
from latentlib.recurrence import latent_forward
from latentlib.tasks import Format
from latentlib.tokens import token_ids
from latentlib.training.curriculum import CurriculumConfig, StageResult, train_curriculum
from latentlib.training.losses import token_loss

__all__ = ["SeqVCR", "make_vcr", "make_loss", "CoconutRun", "train_coconut"]


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


def make_vcr(cfg: CoconutConfig, model, seed: int = 0) -> SeqVCR | None:
    """The SEQ-VCR term for ``model``'s width, or None when ``cfg`` has none."""
    if not cfg.uses_vcr:
        return None
    return SeqVCR(model.get_input_embeddings().weight.shape[1], cfg.vcr_dim, cfg.vcr_var, cfg.vcr_cov, seed=seed)


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


def train_coconut(model, tokenizer, train_records: Sequence, cfg: CoconutConfig, curriculum: CurriculumConfig,
                  fmt: Format, *, eval_records: Sequence | None = None, eval_stages: str = "all",
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
    vcr = make_vcr(cfg, model, seed=curriculum.train.seed)
    extra = {"injector": injector} if any(p.requires_grad for p in injector.parameters()) else None
    if encoded is None:
        encoded = [encode_record(tokenizer, r, fmt) for r in train_records]
    elif len(encoded) != len(train_records):
        raise ValueError(f"{len(encoded)} encoded records for {len(train_records)} training records: encode them all")
    pad = tokenizer.pad_token_id
    rows, last = [], {}

    def after_stage(stage):
        if eval_records is None or (eval_stages == "last" and stage != curriculum.end_stage):
            return {}
        df = evaluate(model, tokenizer, eval_records, eval_spec(stage, cfg, tokenizer, fmt, injector=injector,
                                                                 name=name),
                      fmt, batch_size=250, progress=False)
        last["df"] = df
        row = summarize(df).iloc[0].to_dict()
        rows.append({"stage": stage, **row})
        return row

    stages = train_curriculum(model, lambda k: stage_examples(encoded, k, cfg, ids, curriculum.train.seed),
                              lambda b: collate(b, pad, align="first_latent"), make_loss(cfg, injector, vcr),
                              curriculum, extra_modules=extra, checkpoint_dir=checkpoint_dir,
                              after_stage=after_stage, desc=name, progress=progress)
    hist, offset = [], 0
    for s in stages:
        hist += [{**r, "stage": s.stage, "global_step": offset + r["step"]} for r in s.result.history]
        offset += s.result.steps
    table = pd.DataFrame(rows)
    if len(table):
        table.insert(1, "thoughts", [plan_for(k, 10**6, cfg).thoughts for k in table.stage])
        table["train_seconds"] = [s.result.seconds for s in stages if s.stage in set(table.stage)]
    return CoconutRun(stages, injector, pd.DataFrame(hist), table, last.get("df", pd.DataFrame()))
