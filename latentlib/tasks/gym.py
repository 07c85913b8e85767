"""Procedural tasks from reasoning-gym, mapped onto :class:`~latentlib.tasks.schema.Record`.

* :func:`make_gsm_symbolic`: GSM8K-like word problems from templates
  (reasoning-gym's ``gsm_symbolic``), with the template's worked solution as
  the steps.
* :func:`make_path_star`: ProsQA-like graph search on path-star graphs
  (reasoning-gym's ``path_star``), with ProsQA's graph fields in ``meta``.

reasoning-gym derives entry ``i`` of a dataset from ``Random(seed + i)``, so
datasets built with neighbouring seeds share most of their entries (for
``path_star``, seed ``s + 1`` is seed ``s`` shifted by one). Build one dataset
and cut it with :func:`split_records` rather than using one seed per split.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Sequence
from typing import Any

import reasoning_gym
from reasoning_gym.factory import DATASETS

from latentlib.tasks.schema import ANSWER_MARKER, Record, RecordError, Splits, validate_record

_PATH_STAR_TASK_RE = re.compile(r"((?:\|\d+ \d+)+)/(\d+) (\d+) =")


def _check_size(n: int, seed: int, generator: str) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{generator} needs n >= 1 records, got n={n!r}: pass a positive integer")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"{generator} needs a non-negative integer seed, got seed={seed!r}: pass e.g. seed=0")


def _cot_lines(cot: str) -> list[str]:
    # The worked solution ends "#### N"; the lines before it are the reasoning.
    reasoning = cot.rsplit(ANSWER_MARKER, 1)[0]
    return [line.strip() for line in reasoning.splitlines() if line.strip()]


def make_gsm_symbolic(n: int, seed: int) -> list[Record]:
    """Generate ``n`` grade-school math problems with reasoning-gym's ``gsm_symbolic``.

    Steps are the non-blank lines of the template's worked solution
    (``metadata["answer_cot"]``) before its ``#### N`` line; the answer is the
    entry's ``answer`` (the solution's own final line sometimes reads
    ``8.0`` for ``8``). Every entry of reasoning-gym 0.1.25 has such a
    solution; an entry without one is reported as a :class:`RecordError`
    rather than silently kept with made-up or empty steps.
    """
    _check_size(n, seed, "make_gsm_symbolic")
    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=seed)
    records = []
    for index, entry in enumerate(dataset):
        source = f"reasoning-gym gsm_symbolic (seed={seed})"
        metadata = entry.get("metadata", {})
        cot = metadata.get("answer_cot")
        if not isinstance(cot, str) or not _cot_lines(cot):
            raise RecordError(
                f"record {index} of {source} has no worked solution in metadata['answer_cot'] "
                "to take steps from: install reasoning-gym 0.1.25, whose templates all provide one"
            )
        raw = {
            "question": entry["question"],
            "steps": _cot_lines(cot),
            "answer": entry["answer"],
            "source_index": metadata.get("source_index", index),
            "variables": metadata.get("variables", {}),
        }
        records.append(validate_record(raw, source=source, index=index))
    return records


def _path_star_config(options: dict[str, Any]) -> dict[str, Any]:
    # reasoning-gym reports bad options with bare asserts or TypeErrors; say which option and how to fix it.
    config_cls = DATASETS["path_star"][1]
    known = {f.name for f in dataclasses.fields(config_cls)} - {"size", "seed"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"make_path_star got unknown option(s) {', '.join(unknown)}: "
            f"use only {', '.join(sorted(known))}"
        )
    try:
        config_cls(size=1, seed=0, **options).validate()
    except AssertionError as exc:
        raise ValueError(f"make_path_star options {options!r} are invalid: {exc}; adjust that option") from exc
    return options


def _arm_leaf(first: int, children: dict[int, list[int]]) -> int:
    node = first
    while children.get(node):
        node = children[node][0]
    return node


def _path_star_record(entry: dict[str, Any], index: int, source: str, compact: bool) -> Record:
    # The prompt shows a worked example in the same notation first; the task is the last match.
    matches = list(_PATH_STAR_TASK_RE.finditer(entry["question"]))
    match = matches[-1] if matches else None
    if match is None:
        raise RecordError(
            f"record {index} of {source} has no '|u v|.../start goal =' task line in its question: "
            "this reasoning-gym version changed the path_star prompt; install reasoning-gym 0.1.25"
        )
    edge_text, start, goal = match.groups()
    edges = [tuple(int(label) for label in pair.split()) for pair in edge_text.strip("|").split("|")]
    symbols: dict[int, int] = {}
    for label in [int(start), int(goal)] + [label for edge in edges for label in edge]:
        symbols.setdefault(label, len(symbols))
    metadata = entry["metadata"]
    center, target = metadata["center"], metadata["goal"]
    children: dict[int, list[int]] = {}
    for parent, child in edges:
        children.setdefault(parent, []).append(child)
    # The leaf of another arm is the natural wrong answer, like ProsQA's neg_target.
    other_leaves = sorted(
        (_arm_leaf(first, children) for first in children.get(center, [])),
        key=lambda label: symbols[label],
    )
    neg_target = next(label for label in other_leaves if label != target)
    path = entry["answer"].split()
    raw = {
        "question": match.group(0) if compact else entry["question"],
        "steps": [f"{a} {b}" for a, b in zip(path, path[1:])],
        "answer": entry["answer"],
        "idx_to_symbol": [str(label) for label in symbols],
        "edges": [[symbols[a], symbols[b]] for a, b in edges],
        "root": symbols[center],
        "target": symbols[target],
        "neg_target": symbols[neg_target],
        "source_index": metadata.get("source_index", index),
    }
    return validate_record(raw, source=source, index=index)


def make_path_star(n: int, seed: int, *, compact: bool = False, **options: Any) -> list[Record]:
    """Generate ``n`` path-star graph search problems with reasoning-gym's ``path_star``.

    A path-star graph is a centre node with ``degree`` disjoint arms; the
    question lists the shuffled edges and asks for the path from the centre
    to one arm's leaf. Steps are the edges of that path, one ``"u v"`` string
    each; the answer is the whole path, as reasoning-gym's scorer expects.
    ``compact=True`` keeps only the ``|u v|.../start goal =`` task line of the
    question, dropping the English instructions. ``options`` go to
    reasoning-gym's ``PathStarConfig`` (``degree``, ``min_path_length``,
    ``max_path_length``, ``node_range``, ``reversed``).

    ``meta`` holds ProsQA's graph fields: ``idx_to_symbol`` (node labels: the
    question's start node, its goal node, then the rest by first appearance
    in the edge list), ``edges`` (index pairs, centre side first), ``root``
    (the centre), ``target`` (the goal leaf) and ``neg_target`` (the leaf of
    another arm, the natural wrong answer).
    """
    _check_size(n, seed, "make_path_star")
    dataset = reasoning_gym.create_dataset("path_star", size=n, seed=seed, **_path_star_config(options))
    source = f"reasoning-gym path_star (seed={seed})"
    return [_path_star_record(entry, index, source, compact) for index, entry in enumerate(dataset)]


def split_records(records: Sequence[Record], n_valid: int, n_test: int, seed: int) -> Splits:
    """Shuffle ``records`` with ``seed`` and cut them into train/valid/test.

    Records are first deduplicated by question (generators repeat a few), so
    no question lands in two splits; whatever is not valid or test is train.
    """
    for name, value in (("n_valid", n_valid), ("n_test", n_test)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"split_records needs {name} >= 0, got {value!r}: pass a non-negative integer")
    seen: set[str] = set()
    unique = []
    for record in records:
        if record.question not in seen:
            seen.add(record.question)
            unique.append(record)
    if n_valid + n_test > len(unique):
        raise ValueError(
            f"split_records was asked for {n_valid} valid + {n_test} test records but only "
            f"{len(unique)} distinct questions were given: generate more records or lower n_valid/n_test"
        )
    random.Random(seed).shuffle(unique)
    return Splits(
        valid=unique[:n_valid],
        test=unique[n_valid : n_valid + n_test],
        train=unique[n_valid + n_test :],
    )
