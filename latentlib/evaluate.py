"""One evaluation for every method: batched generation through the engine on a test
split, graded, with visible tokens, latent steps and wall time per problem.

A method is evaluated through a *policy factory*: ``policy_for(batch_of_records) ->
policy`` (plus the injector and the prompt builder), so CoT, no-CoT, Coconut, SWITCH,
pause tokens and QThink all go through the same function and the same grading.

Visible tokens: the text tokens a reader would see, i.e. generated tokens that are not
special tokens (eos, padding and the methods' markers are not counted).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm

from latentlib import artifacts, distributed
from latentlib.batching import encode_record, prompt_batch
from latentlib.policies import TextPolicy
from latentlib.recurrence import generate
from latentlib.tasks import Format, extract_flexible, extract_strict, grade

__all__ = ["EvalSpec", "generate_batch", "evaluate", "summarize", "checked_view", "record_evaluation", "collect_evaluations"]


@dataclass
class EvalSpec:
    """How to run one method at evaluation time."""

    name: str  # the method's row label
    prompt: Callable = None  # record -> prompt token ids (default: the question encoded in the task's format)
    policy: Callable = None  # list[record] -> policy (default: plain decoding)
    injector: object = None  # the injector (default hs[-1])
    latent_positions: str = "continue"  # position scheme for thoughts
    inputs_embeds: Callable = None  # (input_ids, attention_mask, records) -> embeddings, for prefix methods
    max_new_tokens: int = 32  # generation budget (latent steps included)
    grade_mode: str | None = None  # "strict", "flexible", "math", "exact" (None: the task format's)
    neutral_token_ids: tuple = ()  # generated text tokens that do not advance the position counter (see generate)


@torch.no_grad()
def generate_batch(model, tokenizer, chunk: Sequence, spec: EvalSpec, prompt_of: Callable, **generate_kwargs):
    """One batch of records through the engine as ``spec`` runs the method: left-padded
    prompts, the method's policy, injector and prompt embeddings. Returns the
    :class:`~latentlib.recurrence.Trace` and the seconds :func:`generate` took (prompt
    building excluded). ``generate_kwargs`` go to :func:`generate` (sampling, captures)."""
    input_ids, mask = prompt_batch([prompt_of(r) for r in chunk], tokenizer.pad_token_id)
    input_ids, mask = input_ids.to(model.device), mask.to(model.device)
    embeds = spec.inputs_embeds(input_ids, mask, chunk) if spec.inputs_embeds else None
    policy = spec.policy(chunk) if spec.policy else TextPolicy()
    latent_id = tokenizer.get_vocab().get("<latent>")
    t0 = time.perf_counter()
    trace = generate(model, input_ids, mask, policy=policy, max_new_tokens=spec.max_new_tokens,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                     injector=spec.injector, latent_token_id=latent_id, inputs_embeds=embeds,
                     latent_positions=spec.latent_positions, neutral_token_ids=spec.neutral_token_ids,
                     **generate_kwargs)
    return trace, time.perf_counter() - t0


@torch.no_grad()
def evaluate(model, tokenizer, records: Sequence, spec: EvalSpec, fmt: Format, *, batch_size: int = 64,
             progress: bool = True) -> pd.DataFrame:
    """One row per problem: prediction text, correctness (strict and flexible), visible
    tokens, latent steps and the batch's wall time divided among its problems. ``fmt``:
    the task's format (prompts are the questions written in it, unless ``spec.prompt``).

    In a distributed run every process calls it: each evaluates every ``world``-th
    problem, and every process returns all the rows in the order of ``records``; a
    sharded model is gathered for the evaluation (:func:`latentlib.distributed.gathered`)."""
    prompt_of = spec.prompt or (lambda r: encode_record(tokenizer, r, fmt).question)
    mode = spec.grade_mode or fmt.grade
    special = set(tokenizer.all_special_ids)
    model.eval()

    def run(share: list) -> list[dict]:
        rows = []
        bar = tqdm(total=len(share), desc=f"eval {spec.name}", disable=not progress or not distributed.is_main(),
                   dynamic_ncols=True)
        for s in range(0, len(share), batch_size):
            chunk = share[s:s + batch_size]
            # predictions only: no per-step entropy and log-prob
            trace, seconds = generate_batch(model, tokenizer, chunk, spec, prompt_of, scores=False)
            seconds /= len(chunk)
            for b, r in enumerate(chunk):
                ids = trace.text_ids(b)
                text = tokenizer.decode([i for i in ids if i not in special])
                rows.append({
                    "method": spec.name, "question": r.question, "gold": r.answer, "prediction": text,
                    "extracted_strict": extract_strict(text), "extracted_flexible": extract_flexible(text),
                    "correct": grade(text, r.answer, mode=mode),
                    "correct_flexible": grade(text, r.answer, mode="flexible" if mode == "strict" else mode),
                    "visible_tokens": sum(i not in special for i in ids),
                    "latent_steps": int(trace.latent_steps[b]),
                    "finished": bool(tokenizer.eos_token_id in ids),
                    "seconds": seconds,
                })
            bar.update(len(chunk))
        bar.close()
        return rows

    with distributed.gathered(model):
        rows = distributed.map_sharded(list(records), run)
    return pd.DataFrame(rows)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Per method: accuracy (strict, flexible), mean visible tokens, latent steps, time."""
    g = df.groupby("method", sort=False)
    return pd.DataFrame({
        "accuracy": g["correct"].mean().round(4),
        "accuracy_flexible": g["correct_flexible"].mean().round(4),
        "visible_tokens": g["visible_tokens"].mean().round(2),
        "latent_steps": g["latent_steps"].mean().round(2),
        "ms_per_problem": (g["seconds"].mean() * 1000).round(2),
        "n": g.size(),
    }).reset_index()


def checked_view(table: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """The table without wall-time columns and rounded: what nbval compares between runs."""
    keep = [c for c in table.columns if not c.startswith(("ms_", "seconds", "time"))]
    return table[keep].round(digits)


def record_evaluation(run: str, df: pd.DataFrame, *, stage: str) -> None:
    """Keeps a method's per-problem rows for the run's side-by-side table (notebook 04).

    One CSV per method under ``runs/<run>/eval/``, written atomically (by the main process
    of a distributed run; every process has the same rows); re-running a stage replaces
    its methods' rows.
    """
    distributed.on_main(_write_evaluation, run, df, stage, what=f"recording the evaluation of run {run!r}")


def _write_evaluation(run: str, df: pd.DataFrame, stage: str) -> None:
    out = artifacts.stage_dir(run, "eval")
    out.mkdir(parents=True, exist_ok=True)
    for method, rows in df.groupby("method", sort=False):
        safe = re.sub(r"[^\w.+-]+", "_", str(method)).strip("_")  # method names may hold '/', spaces
        path = out / f"{safe}.csv"
        tmp = path.with_name(f".{path.name}.tmp")
        rows.assign(stage=stage).to_csv(tmp, index=False)
        tmp.replace(path)


def collect_evaluations(run: str) -> pd.DataFrame:
    """Every method's per-problem rows recorded for the run (empty if none)."""
    files = sorted(artifacts.stage_dir(run, "eval").glob("*.csv"))
    if not files:
        return pd.DataFrame()
    return pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
