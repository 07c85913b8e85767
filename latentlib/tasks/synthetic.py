"""The embedded task: chained modular arithmetic.

A problem starts from a value ``s`` in ``[0, modulus)`` and applies K
operations in turn, each ``+k`` or ``*k`` modulo ``modulus``::

    question: "3 +4 *7 +2 *9 +1 +5 ="
    steps:    ("7", "9", "1", "9", "0", "5")
    answer:   "5"

Each step is the running value after one operation, so the chain of thought is
exactly the sequence of intermediate states a latent model must carry. The
task needs no download, scales its difficulty with ``n_ops``, and every word
is a whole token of a word-level vocabulary (see :func:`chain_vocabulary`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from latentlib.tasks.schema import Record, Splits

DEFAULT_OPS: tuple[str, ...] = tuple(f"+{k}" for k in range(1, 10)) + ("*3", "*7", "*9")
_OP_PATTERN = re.compile(r"[+*]\d+")


@dataclass(frozen=True)
class ChainConfig:
    """Shape and size of a chained modular arithmetic dataset."""

    n_ops: int = 6  # K: operations per problem, hence reasoning steps per record
    modulus: int = 10
    ops: tuple[str, ...] = DEFAULT_OPS
    n_train: int = 20000
    n_valid: int = 500
    n_test: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.ops, list):
            # Accept a list for convenience; store a tuple so the config stays hashable.
            object.__setattr__(self, "ops", tuple(self.ops))
        _check_int(self.n_ops, "n_ops", minimum=1, fix="use at least one operation per problem")
        _check_int(self.modulus, "modulus", minimum=2, fix="use a modulus of 2 or more, e.g. 10")
        for name in ("n_train", "n_valid", "n_test"):
            _check_int(getattr(self, name), name, minimum=0, fix="use a non-negative number of records")
        _check_int(self.seed, "seed", minimum=None, fix="pass an integer seed")
        if not isinstance(self.ops, tuple) or not self.ops:
            raise ValueError(
                f"ChainConfig.ops must be a non-empty tuple of operations, got {self.ops!r}: "
                "pass e.g. ops=('+1', '+2', '*3')"
            )
        for op in self.ops:
            if not isinstance(op, str) or not _OP_PATTERN.fullmatch(op):
                raise ValueError(
                    f"ChainConfig.ops contains {op!r}, which is not an operation: "
                    "write each one as '+k' or '*k' with a non-negative integer k, e.g. '+4' or '*7'"
                )
        if len(set(self.ops)) != len(self.ops):
            # A repeated op would make two different draws render as the same question.
            raise ValueError(f"ChainConfig.ops lists an operation twice in {self.ops!r}: remove the duplicates")


def _check_int(value: object, name: str, *, minimum: int | None, fix: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"ChainConfig.{name} must be an int, got {value!r}: {fix}")
    if minimum is not None and value < minimum:
        raise ValueError(f"ChainConfig.{name} must be >= {minimum}, got {value}: {fix}")


def apply_op(value: int, op: str, modulus: int) -> int:
    """Apply one ``+k`` / ``*k`` operation to ``value`` modulo ``modulus``."""
    k = int(op[1:])
    return (value + k) % modulus if op[0] == "+" else (value * k) % modulus


def make_chain_record(start: int, ops: tuple[str, ...] | list[str], modulus: int) -> Record:
    """Build the record of one problem: its question text, intermediate values and answer."""
    value = start
    steps = []
    for op in ops:
        value = apply_op(value, op, modulus)
        steps.append(str(value))
    question = " ".join([str(start), *ops, "="])
    return Record(question=question, steps=tuple(steps), answer=steps[-1])


def chain_capacity(cfg: ChainConfig) -> int:
    """Return how many distinct problems ``cfg`` can produce: ``modulus * len(ops) ** n_ops``."""
    return cfg.modulus * len(cfg.ops) ** cfg.n_ops


def _decode_problem(code: int, cfg: ChainConfig) -> tuple[int, tuple[str, ...]]:
    # Problems are numbered in mixed radix (start digit, then one digit per op),
    # so drawing distinct numbers draws distinct questions.
    start = code % cfg.modulus
    code //= cfg.modulus
    ops = []
    for _ in range(cfg.n_ops):
        ops.append(cfg.ops[code % len(cfg.ops)])
        code //= len(cfg.ops)
    return start, tuple(ops)


def _draw_distinct_codes(rng: random.Random, capacity: int, count: int) -> list[int]:
    if 2 * count >= capacity:
        # Dense request: the space is small (at most twice the request), so sample it directly.
        return rng.sample(range(capacity), count)
    # Sparse request: rejection sampling needs under two draws per problem and,
    # unlike range(), works when the space exceeds a machine integer.
    seen: set[int] = set()
    codes = []
    while len(codes) < count:
        code = rng.randrange(capacity)
        if code not in seen:
            seen.add(code)
            codes.append(code)
    return codes


def make_chain_splits(cfg: ChainConfig) -> Splits:
    """Generate the train/valid/test splits of ``cfg``, deterministically from ``cfg.seed``.

    No question appears twice, within a split or across splits.
    """
    total = cfg.n_train + cfg.n_valid + cfg.n_test
    capacity = chain_capacity(cfg)
    if total > capacity:
        raise ValueError(
            f"ChainConfig asks for {total} distinct problems (n_train + n_valid + n_test) but "
            f"modulus={cfg.modulus}, {len(cfg.ops)} ops and n_ops={cfg.n_ops} allow only {capacity}: "
            "lower the split sizes or raise n_ops / modulus / the number of ops"
        )
    rng = random.Random(cfg.seed)
    codes = _draw_distinct_codes(rng, capacity, total)
    records = [make_chain_record(*_decode_problem(code, cfg), cfg.modulus) for code in codes]
    valid_end = cfg.n_train + cfg.n_valid
    return Splits(
        train=records[: cfg.n_train],
        valid=records[cfg.n_train : valid_end],
        test=records[valid_end:],
    )


def chain_vocabulary(cfg: ChainConfig) -> list[str]:
    """Return every word that can occur in a question, step or answer of ``cfg``.

    That is the values ``0 .. modulus-1`` (a value like ``"12"`` is one word),
    each operation, and ``"="``. Words added when rendering CoT text, such as
    :data:`~latentlib.tasks.schema.ANSWER_MARKER`, belong to the renderer.
    """
    return [str(value) for value in range(cfg.modulus)] + list(cfg.ops) + ["="]
