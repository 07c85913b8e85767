"""Teacher extraction: G sampled CoT rollouts per problem from the base model, graded, with
token entropies and the hidden states at the positions a latent student is taught from.

For each training problem the base model writes G rollouts (``num_generations``, TRL's
name) through the engine's batched :func:`~latentlib.recurrence.generate`, each with its
own seed (so a rollout does not depend on which others share its batch). Each rollout is
graded against the gold answer, and keeps its tokens, the entropy of every sampled
position (SWITCH's phase 1 reads them) and the hidden states of the chosen layers at
``K + 2`` *slots*:

- slots ``0 .. K-1``: the last token of reasoning step ``k`` (its state predicts what
  follows the step: the next step, or the answer marker after the last one);
- slot ``K`` (``marker``): the last token of the answer marker ``####`` (its state
  predicts the answer: the position CODI distills);
- slot ``K+1`` (``answer``): the first token of the answer.

Step boundaries. The generated text (special tokens dropped) is cut at the last ``####``;
the text before it is split on the task format's step separator (``"\\n"``, or ``" "`` for the
word-level ``tiny`` task, where a step is one word) and empty pieces are dropped. A step
ends at the token whose decoded prefix first covers the step's last non-blank
character. A rollout with ``n`` steps fills the K step slots with steps
``ceil(k n / K)`` (k = 1..K): the identity when ``n == K``, evenly spaced steps (always
including the last) when ``n > K``, repeated steps when ``n < K``. A rollout with no
``####`` or no step before it is *unparsed*: it keeps its grade and entropies but gives
no teacher states.

Teacher signal. Per problem, the rollout states are averaged with weights over the
*eligible* rollouts (correct and parsed):

- ``uniform``: ``w_g = 1 / n`` for each of the ``n`` eligible rollouts;
- ``reward_weighted`` (the QThink card's ``codi_reward_weighted``): ``w_g ∝ r_g`` with
  reward ``r_g = exp(mean_t log p(x_t))``, the geometric-mean probability of the
  rollout's tokens under the sampling distribution (a confidence in ``(0, 1]``), for
  eligible rollouts, and 0 for the others. Both sum to one. (The card does not define
  its reward; correctness alone would make the two teachers identical, so we weight the
  correct rollouts by how sure the model was of them.)

A problem with no eligible rollout has no teacher: its states are zeros, ``has_teacher``
is False, every weight is 0, and :func:`load_teacher` leaves it out of distillation; the
summary counts these problems (``problems_without_teacher``).

Storage, under ``runs/<run>/teacher/<name>/``: per ``shard_size`` problems one
``shard-NNNNN.safetensors`` (the two teachers' per-problem states ``(n, K+2, D)`` per
layer, weights, grades; optionally every rollout's states) and one
``shard-NNNNN.parquet`` (one row per rollout: text, tokens, entropies, log-probs, grade,
reward, weights, slot positions). Shards are written as they are finished, so memory
does not grow with the number of problems; an interrupted run resumes from its finished
shards (kept in ``.<name>.partial/``), and the artifact appears atomically, with its
``COMPLETE`` marker, when every shard is done.
"""

from __future__ import annotations

import bisect
import resource
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from latentlib import artifacts, distributed
from latentlib.batching import encode_record, prompt_batch
from latentlib.policies import TextPolicy
from latentlib.recurrence import generate
from latentlib.tasks import Format, grade
from latentlib.tasks.schema import ANSWER_MARKER

__all__ = ["TeacherConfig", "TeacherSummary", "TeacherStates", "WEIGHTINGS", "slot_names", "rollout_seed",
           "parse_steps", "step_slots", "rollout_rewards", "teacher_weights", "normalize_layers", "parse_layers",
           "extract_teacher", "read_summary", "measure_throughput", "load_teacher", "load_rollouts",
           "entropy_by_position"]

WEIGHTINGS = ("uniform", "reward_weighted")


def slot_names(num_steps: int) -> list[str]:
    """Names of the stored positions: ``step1 .. stepK``, ``marker``, ``answer``."""
    return [f"step{k + 1}" for k in range(num_steps)] + ["marker", "answer"]


@dataclass(frozen=True)
class TeacherConfig:
    num_generations: int = 16  # G: sampled rollouts per problem
    temperature: float = 1.0  # sampling temperature of the rollouts
    top_p: float = 1.0  # nucleus sampling
    max_completion_length: int = 256  # generated tokens per rollout at most (eos included)
    num_steps: int = 6  # K: step slots per rollout (the student's latent steps)
    capture_layers: tuple[int, ...] = (-1,)  # hidden_states indices kept (0: embeddings, -1: last layer)
    grade_mode: str | None = None  # grading of rollouts: "strict", "flexible", "math", "exact" (None: the task's)
    shard_size: int = 500  # problems per shard (memory is bounded by one shard)
    generation_batch_size: int = 256  # sequences per generate call (1: one at a time)
    keep_rollout_states: bool = False  # also store every rollout's states (n, G, K+2, D) per layer
    dtype: str = "float32"  # storage dtype of the states ("float32", "bfloat16", "float16")
    seed: int = 0  # rollout seeds derive from (seed, problem index, rollout index)

    def __post_init__(self):
        if isinstance(self.capture_layers, list):
            object.__setattr__(self, "capture_layers", tuple(self.capture_layers))
        checks = [
            (1 <= self.num_generations < 4096, f"num_generations={self.num_generations}: use 1 .. 4095 rollouts"),
            (self.temperature > 0, f"temperature={self.temperature}: teacher rollouts are sampled; use > 0 "
                                   "(e.g. 1.0; raise it for more varied, more often wrong rollouts)"),
            (0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1]"),
            (self.max_completion_length >= 1, f"max_completion_length={self.max_completion_length} must be >= 1"),
            (self.num_steps >= 1, f"num_steps={self.num_steps} must be >= 1 (the student's K)"),
            (len(self.capture_layers) >= 1, "capture_layers is empty: keep at least one layer, e.g. (-1,)"),
            (self.grade_mode in (None, "strict", "flexible", "math", "exact"),
             f"grade_mode={self.grade_mode!r}: use 'strict', 'flexible', 'math', 'exact' or None (the task's)"),
            (self.shard_size >= 1, f"shard_size={self.shard_size} must be >= 1"),
            (self.generation_batch_size >= 1, f"generation_batch_size={self.generation_batch_size} must be >= 1"),
            (self.dtype in ("float32", "bfloat16", "float16"),
             f"dtype={self.dtype!r}: use 'float32', 'bfloat16' or 'float16'"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


@dataclass
class TeacherSummary:
    directory: Path  # the artifact
    problems: int  # problems extracted
    rollouts: int  # problems * G
    fraction_correct: float  # over all rollouts
    fraction_parsed: float  # rollouts with a marker and at least one step
    problems_without_teacher: int  # no correct parsed rollout: left out of distillation
    seconds: float  # wall time of the extraction (of the run that made the artifact)
    rollouts_per_second: float
    shards: int
    layers: list[int] = field(default_factory=list)  # stored layers (non-negative hidden_states indices)
    reused: bool = False  # an existing complete artifact was returned

    def table(self) -> pd.DataFrame:
        """One row: the counts, the time, and this process's peak resident memory."""
        return pd.DataFrame([{
            "problems": self.problems, "rollouts": self.rollouts, "fraction_correct": round(self.fraction_correct, 4),
            "fraction_parsed": round(self.fraction_parsed, 4), "problems_without_teacher": self.problems_without_teacher,
            "shards": self.shards, "seconds": round(self.seconds, 1),
            "rollouts_per_second": round(self.rollouts_per_second, 1), "reused": self.reused,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}])


# ---------------------------------------------------------------------------- pure pieces


def rollout_seed(seed: int, problem: int, rollout: int) -> int:
    """The sampling seed of rollout ``g`` of problem ``i``: independent of batching."""
    return (seed * 1_000_003 + problem) * 4096 + rollout


def normalize_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    """``hidden_states`` indices as non-negative numbers (``-1`` -> ``num_layers``), checked."""
    out = []
    for layer in layers:
        idx = layer if layer >= 0 else num_layers + 1 + layer
        if not 0 <= idx <= num_layers:
            raise ValueError(f"layer {layer} does not exist: the model has {num_layers + 1} hidden states "
                             f"(0 = embeddings, 1..{num_layers} = layers; negative counts from the end)")
        out.append(idx)
    return sorted(set(out))


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """A notebook parameter to layers: ``"all"`` (0..L: the embedding output and every
    layer), ``"last"`` or ``"0,-1"``. Layer 0 at a thought is the thought itself; at a
    step's last token, that token's embedding."""
    spec = spec.strip()
    if spec == "all":
        return list(range(num_layers + 1))
    if spec == "last":
        return [num_layers]
    try:
        return normalize_layers([int(x) for x in spec.split(",") if x.strip()], num_layers)
    except ValueError as e:
        if "does not exist" in str(e):
            raise
        raise ValueError(f"layers={spec!r}: use 'all', 'last' or comma-separated indices such as '0,-1'") from None


def parse_steps(prefix_lengths: Sequence[int], text: str, separator: str) -> tuple[list[int], int, int]:
    """Token indices of each step's last token, of the marker's last token and of the
    answer's first token (``-1`` when absent), from the decoded text and the length of the
    decoded prefix ending at each token. Steps are the separator-delimited pieces of the
    text before the last ``####``."""
    def token_at(char_end: int) -> int:  # first token whose prefix covers text[:char_end]
        j = bisect.bisect_left(prefix_lengths, char_end)
        return j if j < len(prefix_lengths) else len(prefix_lengths) - 1

    m = text.rfind(ANSWER_MARKER)
    if m < 0:
        return [], -1, -1
    steps, start = [], 0
    for piece in text[:m].split(separator):
        stripped = piece.rstrip()
        if stripped.strip():
            steps.append(token_at(start + len(stripped)))
        start += len(piece) + len(separator)
    marker_end = m + len(ANSWER_MARKER)
    marker = token_at(marker_end)
    tail = text[marker_end:]
    a = marker_end + len(tail) - len(tail.lstrip())
    answer = token_at(a + 1) if a < len(text) else -1
    return steps, marker, answer


def step_slots(step_ends: Sequence[int], num_steps: int) -> list[int]:
    """K slot positions from ``n`` step ends: slot k takes step ``ceil(k n / K)`` (k = 1..K);
    all ``-1`` when there is no step."""
    n = len(step_ends)
    if n == 0:
        return [-1] * num_steps
    return [step_ends[math.ceil(k * n / num_steps) - 1] for k in range(1, num_steps + 1)]


def rollout_rewards(correct: torch.Tensor, mean_logprob: torch.Tensor) -> torch.Tensor:
    """``r_g = exp(mean token log-prob)`` for correct rollouts, 0 for the others. ``(..., G)``."""
    return torch.where(correct.bool(), mean_logprob.float().exp(), torch.zeros_like(mean_logprob, dtype=torch.float))


def teacher_weights(eligible: torch.Tensor, rewards: torch.Tensor, weighting: str) -> torch.Tensor:
    """Weights ``(..., G)`` over rollouts: nonzero only on eligible (correct, parsed)
    rollouts, summing to one; all zeros for a problem with no eligible rollout."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r}: use one of {WEIGHTINGS}")
    eligible = eligible.bool()
    raw = eligible.float() if weighting == "uniform" else torch.where(eligible, rewards.float().clamp_min(0), 0.0)
    # A reward can underflow to 0 for a very long rollout: fall back to uniform over the eligible ones.
    raw = torch.where((raw.sum(-1, keepdim=True) > 0), raw, eligible.float())
    total = raw.sum(-1, keepdim=True)
    return torch.where(total > 0, raw / total.clamp_min(1e-30), torch.zeros_like(raw))


# ---------------------------------------------------------------------------- extraction


def _rollouts_of_batch(model, tokenizer, records, pairs, prompts, cfg, layers, special, fmt):
    """Generates the rollouts ``pairs`` = [(problem, g), ...] in one call: their table rows
    and their states ``(len(pairs), P, L, D)``."""
    input_ids, mask = prompt_batch([prompts[i] for i, _ in pairs], tokenizer.pad_token_id)
    dev = next(model.parameters()).device
    trace = generate(model, input_ids.to(dev), mask.to(dev), policy=TextPolicy(),
                     max_new_tokens=cfg.max_completion_length, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, temperature=cfg.temperature, top_p=cfg.top_p,
                     seeds=[rollout_seed(cfg.seed, i, g) for i, g in pairs], capture_layers=tuple(layers))
    P = cfg.num_steps + 2
    grade_mode = cfg.grade_mode or fmt.grade
    ids = [trace.text_ids(b) for b in range(len(pairs))]
    kept = [[t for t in seq if t not in special] for seq in ids]
    where = [[j for j, t in enumerate(seq) if t not in special] for seq in ids]  # generated index of kept tokens
    prefixes = [k[:n + 1] for k in kept for n in range(len(k))]
    decoded = tokenizer.batch_decode(prefixes, skip_special_tokens=True) if prefixes else []
    rows, states, cursor = [], [], 0
    for b, (i, g) in enumerate(pairs):
        n = len(kept[b])
        lengths = [len(s) for s in decoded[cursor:cursor + n]]
        text = decoded[cursor + n - 1] if n else ""
        cursor += n
        step_ends, marker, answer = parse_steps(lengths, text, fmt.separator) if n else ([], -1, -1)
        parsed = marker >= 0 and len(step_ends) > 0
        slots = step_slots(step_ends, cfg.num_steps) + [marker, answer]
        slots = [where[b][s] if s >= 0 else -1 for s in slots]  # kept-token index -> generated index
        valid = trace.valid[b]
        length = int(valid.sum())
        logprob = trace.logprob[b, :length].float()
        correct = grade(text, records[i].answer, mode=grade_mode)
        pos = torch.tensor(slots)
        st = torch.stack([trace.hidden[layer][b, pos.clamp_min(0)] for layer in layers], 1)  # (P, L, D)
        st = st * (pos >= 0)[:, None, None]
        states.append(st)
        rows.append({
            "problem": i, "rollout": g, "seed": rollout_seed(cfg.seed, i, g), "text": text, "correct": correct,
            "parsed": parsed, "n_steps": len(step_ends), "length": length,
            "mean_logprob": float(logprob.mean()) if length else float("-inf"),
            "tokens": trace.tokens[b, :length].tolist(), "entropy": trace.entropy[b, :length].tolist(),
            "logprob": logprob.tolist(), "positions": slots,
        })
    assert len(states) == len(pairs) and all(s.shape[0] == P for s in states)
    return rows, torch.stack(states).float()


def _finish_shard(rows, states, problems, cfg, layers) -> tuple[dict, pd.DataFrame, dict]:
    """Per-problem weights and teacher states from one shard's rollouts: ``rows`` and
    ``states`` ``(n*G, P, L, D)`` in problem-major order (rollout g of problem i at i*G + g)."""
    G = cfg.num_generations
    n = len(problems)
    frame = pd.DataFrame(rows)
    expected = [(i, g) for i in problems for g in range(G)]
    if list(zip(frame["problem"], frame["rollout"])) != expected:
        raise ValueError("rollouts are not in problem-major order")
    stacked = states.view(n, G, *states.shape[1:])  # (n, G, P, L, D)
    correct = torch.tensor(frame["correct"].to_numpy(bool)).view(n, G)
    eligible = correct & torch.tensor(frame["parsed"].to_numpy(bool)).view(n, G)
    rewards = rollout_rewards(eligible, torch.tensor(frame["mean_logprob"].to_numpy(np.float32)).view(n, G))
    frame["reward"] = rewards.flatten().numpy()
    dtype = getattr(torch, cfg.dtype)
    tensors = {"problem": torch.tensor(problems, dtype=torch.long), "has_teacher": eligible.any(1),
               "n_correct": correct.sum(1), "n_eligible": eligible.sum(1)}
    for weighting in WEIGHTINGS:
        w = teacher_weights(eligible, rewards, weighting)  # (n, G)
        frame[f"weight_{weighting}"] = w.flatten().numpy()
        tensors[f"weights.{weighting}"] = w
        mean = torch.einsum("ng,ngpld->npld", w, stacked)  # (n, P, L, D)
        for li, layer in enumerate(layers):
            tensors[f"{weighting}.layer{layer}"] = mean[:, :, li].to(dtype)
    if cfg.keep_rollout_states:
        tensors["positions"] = torch.tensor(frame["positions"].tolist(), dtype=torch.long).view(n, G, -1)
        for li, layer in enumerate(layers):
            tensors[f"rollouts.layer{layer}"] = stacked[:, :, :, li].to(dtype)
    counts = {"rollouts": len(frame), "correct": int(correct.sum()), "parsed": int(frame["parsed"].sum()),
              "without_teacher": int((~eligible.any(1)).sum())}
    return tensors, frame, counts


def extract_teacher(model, tokenizer, records: Sequence, cfg: TeacherConfig, fmt: Format, *, directory: Path,
                    key: str, meta: dict | None = None, prompt: Callable | None = None,
                    progress: bool = True) -> TeacherSummary:
    """Samples, grades and stores the teacher of ``records`` in ``directory`` (written
    atomically, with ``meta`` in its ``COMPLETE`` marker).

    ``prompt(record) -> token ids`` (default: the question written in ``fmt``). ``key``
    identifies the configuration: the finished shards of an interrupted run with the same
    key are kept, those of another key are discarded. Reusing a finished artifact is the
    stage's decision (:mod:`latentlib.stages.teacher`).

    In a distributed run every process calls it: each generates every ``world``-th rollout
    of a shard, the main process gathers them, writes the shard and, at the end, the
    artifact; the others wait (a finished shard is skipped by every process on resume).
    """
    final = Path(directory)
    fingerprint = key
    if len(records) == 0:
        raise ValueError("no records to extract a teacher from")
    num_layers = model.config.num_hidden_layers
    layers = normalize_layers(cfg.capture_layers, num_layers)
    prompt = prompt or (lambda r: encode_record(tokenizer, r, fmt).question)
    special = set(tokenizer.all_special_ids)
    hidden = model.get_input_embeddings().weight.shape[1]
    partial = final.with_name(f".{final.name}.partial")

    def prepare():
        if partial.exists():
            info = partial / "fingerprint.json"
            if not info.is_file() or artifacts.load_json(info).get("fingerprint") != fingerprint:
                shutil.rmtree(partial)  # an interrupted run of another configuration: start afresh
        partial.mkdir(parents=True, exist_ok=True)
        artifacts.save_json({"fingerprint": fingerprint}, partial / "fingerprint.json")

    distributed.on_main(prepare, what=f"preparing {partial}")

    model.eval()
    G = cfg.num_generations
    n_shards = math.ceil(len(records) / cfg.shard_size)
    totals = {"rollouts": 0, "correct": 0, "parsed": 0, "without_teacher": 0, "seconds": 0.0}
    bar = tqdm(total=len(records) * G, desc="teacher rollouts", disable=not progress or not distributed.is_main(),
               dynamic_ncols=True)
    for s in range(n_shards):
        stem = partial / f"shard-{s:05d}"
        problems = list(range(s * cfg.shard_size, min(len(records), (s + 1) * cfg.shard_size)))
        done = stem.with_suffix(".json")
        if done.is_file():  # finished by an interrupted run of the same configuration
            counts = artifacts.load_json(done)
            bar.update(len(problems) * G)
        else:
            t0 = time.perf_counter()
            prompts = {i: list(prompt(records[i])) for i in problems}
            pairs = [(i, g) for i in problems for g in range(G)]

            def run(share: list) -> list:  # this process's rollouts of the shard, one (row, states) each
                out = []
                for c in range(0, len(share), cfg.generation_batch_size):
                    r, st = _rollouts_of_batch(model, tokenizer, records, share[c:c + cfg.generation_batch_size],
                                               prompts, cfg, layers, special, fmt)
                    out += [(row, st[j].cpu()) for j, row in enumerate(r)]
                    bar.update(len(r) * distributed.world())
                return out

            with distributed.gathered(model):
                results = distributed.map_sharded(pairs, run, to_main_only=True)

            def finish(results=results, stem=stem, done=done, problems=problems, t0=t0):
                rows = [row for row, _ in results]
                # one buffer for the shard: memory is bounded by shard_size, whatever the number of problems
                states = torch.zeros(len(pairs), cfg.num_steps + 2, len(layers), hidden)  # (n*G, P, L, D)
                for j, (_, st) in enumerate(results):
                    states[j] = st
                    results[j] = None  # each rollout's states freed once copied
                tensors, frame, counts = _finish_shard(rows, states, problems, cfg, layers)
                counts["seconds"] = time.perf_counter() - t0
                del rows, states
                artifacts.save_state_dict(tensors, stem.with_suffix(".safetensors.tmp"))
                stem.with_suffix(".safetensors.tmp").replace(stem.with_suffix(".safetensors"))
                frame.to_parquet(stem.with_suffix(".parquet.tmp"), index=False)
                stem.with_suffix(".parquet.tmp").replace(stem.with_suffix(".parquet"))
                artifacts.save_json(counts, done)  # last: the shard is finished
                return counts

            counts = distributed.on_main(finish, what=f"writing teacher shard {stem.name}")
            del results
        for k in totals:
            totals[k] += counts[k]
    bar.close()

    summary = {
        "problems": len(records), "rollouts": totals["rollouts"],
        "fraction_correct": totals["correct"] / totals["rollouts"],
        "fraction_parsed": totals["parsed"] / totals["rollouts"],
        "problems_without_teacher": totals["without_teacher"], "seconds": totals["seconds"],
        "rollouts_per_second": totals["rollouts"] / max(totals["seconds"], 1e-9), "shards": n_shards,
        "layers": layers,
    }
    index = {"fingerprint": fingerprint, "config": asdict(cfg), "slots": slot_names(cfg.num_steps),
             "hidden_size": model.get_input_embeddings().weight.shape[1], "num_layers": num_layers,
             "shards": [f"shard-{s:05d}" for s in range(n_shards)], "summary": summary}

    def publish():
        with artifacts.atomic_dir(final) as tmp:
            for s in range(n_shards):
                for suffix in (".safetensors", ".parquet"):
                    shutil.move(str(partial / f"shard-{s:05d}{suffix}"), str(tmp / f"shard-{s:05d}{suffix}"))
            artifacts.save_json(index, tmp / "index.json")
            artifacts.write_complete(tmp, {"kind": "teacher rollouts and states", **(meta or {}),
                                           "config": asdict(cfg), **summary})
        shutil.rmtree(partial, ignore_errors=True)

    distributed.on_main(publish, what=f"writing {final}")
    return TeacherSummary(directory=final, **summary)


def read_summary(directory: Path) -> TeacherSummary:
    """The summary of a finished teacher artifact (what :func:`extract_teacher` returned)."""
    index = artifacts.load_json(Path(directory) / "index.json")
    return TeacherSummary(directory=Path(directory), reused=True, **{k: index["summary"][k] for k in (
        "problems", "rollouts", "fraction_correct", "fraction_parsed", "problems_without_teacher", "seconds",
        "rollouts_per_second", "shards", "layers")})


def measure_throughput(model, tokenizer, records: Sequence, cfg: TeacherConfig, fmt: Format, *,
                       batch_sizes: Sequence[int] = (1, 256), prompt: Callable | None = None) -> pd.DataFrame:
    """Rollouts per second of the extraction's work (generation with hidden-state capture,
    parsing, grading; no disk) for each ``generation_batch_size``, on the same rollouts."""
    layers = normalize_layers(cfg.capture_layers, model.config.num_hidden_layers)
    prompt = prompt or (lambda r: encode_record(tokenizer, r, fmt).question)
    prompts = {i: list(prompt(r)) for i, r in enumerate(records)}
    pairs = [(i, g) for i in range(len(records)) for g in range(cfg.num_generations)]
    special = set(tokenizer.all_special_ids)
    model.eval()
    rows = []
    for bs in batch_sizes:
        t0 = time.perf_counter()
        correct = 0
        for c in range(0, len(pairs), bs):
            r, _ = _rollouts_of_batch(model, tokenizer, records, pairs[c:c + bs], prompts, cfg, layers, special,
                                      fmt)
            correct += sum(x["correct"] for x in r)
        seconds = time.perf_counter() - t0
        rows.append({"generation_batch_size": bs, "rollouts": len(pairs), "seconds": round(seconds, 3),
                     "rollouts_per_second": round(len(pairs) / seconds, 1), "fraction_correct": correct / len(pairs)})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- loading


@dataclass
class TeacherStates:
    """One teacher signal for every problem: ``states[layer]`` is ``(N, K+2, D)``."""

    states: dict[int, torch.Tensor]  # layer -> (N, K+2, D), zeros where has_teacher is False
    has_teacher: torch.Tensor  # (N,) bool: at least one correct parsed rollout
    problem: torch.Tensor  # (N,) index of the problem in the records given to extract_teacher
    weighting: str  # "uniform" or "reward_weighted"
    num_steps: int  # K
    slots: list[str]  # slot names

    def __len__(self) -> int:
        return len(self.problem)


def load_teacher(run: str, name: str = "teacher", *, weighting: str = "uniform",
                 layers: Sequence[int] | None = None) -> TeacherStates:
    """Reads one teacher signal (``weighting``) for the chosen layers (default all stored),
    shard by shard, reading only those tensors."""
    from safetensors import safe_open

    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r}: use one of {WEIGHTINGS}")
    d = artifacts.require_artifact(run, "teacher", name, made_by="00_teacher_extraction.ipynb")
    index = artifacts.load_json(d / "index.json")
    stored = index["summary"]["layers"]
    layers = stored if layers is None else normalize_layers(layers, index["num_layers"])
    missing = [layer for layer in layers if layer not in stored]
    if missing:
        raise ValueError(f"the teacher {name!r} of run {run!r} stores layers {stored}, not {missing}: distill "
                         f"from stored layers, or re-extract with capture_layers including {missing}")
    parts: dict[str, list[torch.Tensor]] = {}
    for shard in index["shards"]:
        with safe_open(str(d / f"{shard}.safetensors"), framework="pt") as f:
            for key in ["problem", "has_teacher", *(f"{weighting}.layer{layer}" for layer in layers)]:
                parts.setdefault(key, []).append(f.get_tensor(key))
    cat = {k: torch.cat(v) for k, v in parts.items()}
    return TeacherStates(states={layer: cat[f"{weighting}.layer{layer}"] for layer in layers},
                         has_teacher=cat["has_teacher"].bool(), problem=cat["problem"], weighting=weighting,
                         num_steps=index["config"]["num_steps"], slots=index["slots"])


def entropy_by_position(rollouts: pd.DataFrame, width: int) -> pd.DataFrame:
    """Mean entropy of the sampled distribution at generated positions ``1 .. width``, for
    correct and wrong rollouts (rows), from :func:`load_rollouts`' ``entropy`` and
    ``correct`` columns (a rollout shorter than ``width`` leaves the later positions out)."""
    entropy = pd.DataFrame([pd.Series(row[:width], index=range(1, min(len(row), width) + 1))
                            for row in rollouts.entropy])  # NaN past a rollout's end
    return entropy.groupby(rollouts.correct.map({True: "correct", False: "wrong"})).mean().round(3)


def load_rollouts(run: str, name: str = "teacher", columns: Sequence[str] | None = None) -> pd.DataFrame:
    """The table of rollouts (every shard), optionally only some columns."""
    d = artifacts.require_artifact(run, "teacher", name, made_by="00_teacher_extraction.ipynb")
    index = artifacts.load_json(d / "index.json")
    return pd.concat([pd.read_parquet(d / f"{s}.parquet", columns=list(columns) if columns else None)
                      for s in index["shards"]], ignore_index=True)
