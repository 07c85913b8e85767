"""The one record shape every task in latentlib is reduced to, and its validation.

A task example is a question, an ordered chain of reasoning steps, and a final
answer. Training code renders it as ``question``, the steps, then
``#### answer`` (see :data:`ANSWER_MARKER`); the rendering itself lives with the
tokenizers, not here. Everything else a source provides (graph fields of ProsQA,
MATH subjects, ...) rides along in ``Record.meta``.

Validation happens once, when data enters the library, so that a malformed file
fails with a message naming the file, the record and the fix instead of
failing later inside a training loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

ANSWER_MARKER = "####"
"""Separates the reasoning from the final answer in rendered CoT text (GSM8K's convention)."""

REQUIRED_SHAPE = "{question: str, steps: list[str], answer: str}"


class RecordError(ValueError):
    """A data record (or a whole file of them) does not have the shape latentlib needs."""


@dataclass(frozen=True)
class Record:
    """One task example: a question, its reasoning steps and the final answer.

    ``meta`` carries optional source-specific fields and is left out of
    equality and hashing, so two records with the same text compare equal
    whatever their provenance.
    """

    question: str
    steps: tuple[str, ...]
    answer: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        # A list slipped in by a caller would make the frozen record unhashable.
        if not isinstance(self.steps, tuple):
            object.__setattr__(self, "steps", tuple(self.steps))


@dataclass(frozen=True)
class Splits:
    """The train/valid/test partition of one task."""

    train: list[Record]
    valid: list[Record]
    test: list[Record]

    def sizes(self) -> dict[str, int]:
        """Return the number of records in each split, keyed by split name."""
        return {"train": len(self.train), "valid": len(self.valid), "test": len(self.test)}


def describe_location(source: str, index: int | None) -> str:
    """Return how an error message refers to a record, e.g. ``record 3 of train.json``."""
    return source if index is None else f"record {index} of {source}"


def _describe_value(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _require_text(obj: Mapping, key: str, where: str, fix: str) -> str:
    if key not in obj or obj[key] is None:
        # Arrow-backed loaders turn a key absent from one record into None, so both mean "missing".
        raise RecordError(f"{where} has no {key!r}: every record needs {REQUIRED_SHAPE}; {fix}")
    value = obj[key]
    if not isinstance(value, str):
        raise RecordError(f"{where} has {key!r} of type {_describe_value(value)}, expected str: {fix}")
    if not value.strip():
        raise RecordError(f"{where} has an empty {key!r}: {fix}")
    return value.strip()


def _require_steps(obj: Mapping, where: str, allow_empty_steps: bool) -> tuple[str, ...]:
    if "steps" not in obj or obj["steps"] is None:
        raise RecordError(
            f"{where} has no 'steps': every record needs {REQUIRED_SHAPE}; "
            "add the steps or use a loader that derives them (e.g. load_gsm8k for GSM8K answers)"
        )
    steps = obj["steps"]
    if isinstance(steps, str) or not isinstance(steps, (list, tuple)):
        raise RecordError(
            f"{where} has 'steps' of type {_describe_value(steps)}, expected a list of strings: "
            "store the steps as a JSON list with one string per reasoning step"
        )
    if not steps and not allow_empty_steps:
        raise RecordError(
            f"{where} has an empty 'steps' list: give at least one reasoning step, "
            "or pass allow_empty_steps=True if this task has no chain of thought"
        )
    cleaned = []
    for position, step in enumerate(steps):
        if not isinstance(step, str):
            raise RecordError(
                f"step {position} of {where} is {_describe_value(step)}, expected str: "
                "store every step as text, e.g. \"3 + 4 = 7\""
            )
        if not step.strip():
            raise RecordError(f"step {position} of {where} is empty: remove blank steps from the list")
        cleaned.append(step.strip())
    return tuple(cleaned)


def _require_answer(obj: Mapping, where: str) -> str:
    if "answer" not in obj or obj["answer"] is None:
        raise RecordError(f"{where} has no 'answer': every record needs {REQUIRED_SHAPE}; add the final answer")
    answer = obj["answer"]
    # bool is an int subclass, but True is never a meaningful task answer.
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        raise RecordError(
            f"{where} has 'answer' of type {_describe_value(answer)}, expected str or number: "
            "store the final answer as text"
        )
    if not answer.strip():
        raise RecordError(f"{where} has an empty 'answer': add the final answer text")
    return answer.strip()


def validate_record(
    obj: Mapping,
    *,
    source: str = "record",
    index: int | None = None,
    allow_empty_steps: bool = False,
) -> Record:
    """Check one raw mapping and turn it into a :class:`Record`.

    ``source`` and ``index`` only feed the error messages (``record 3 of
    train.json``). Surrounding whitespace is stripped from every text field;
    numeric answers are converted to text; keys other than question, steps
    and answer are kept in ``meta``.
    """
    where = describe_location(source, index)
    if not isinstance(obj, Mapping):
        raise RecordError(
            f"{where} is {_describe_value(obj)}, not a mapping: every record needs {REQUIRED_SHAPE}; "
            "store each record as a JSON object"
        )
    question = _require_text(obj, "question", where, "add the question text")
    steps = _require_steps(obj, where, allow_empty_steps)
    answer = _require_answer(obj, where)
    meta = {key: value for key, value in obj.items() if key not in ("question", "steps", "answer")}
    return Record(question=question, steps=steps, answer=answer, meta=meta)


def validate_records(
    objs: Iterable[Mapping],
    source: str,
    *,
    allow_empty_steps: bool = False,
) -> list[Record]:
    """Validate every mapping of a dataset; an empty dataset is an error too."""
    records = [
        validate_record(obj, source=source, index=index, allow_empty_steps=allow_empty_steps)
        for index, obj in enumerate(objs)
    ]
    if not records:
        raise RecordError(
            f"{source} contains no records: check that the file or split is the one you meant "
            f"and that it holds at least one {REQUIRED_SHAPE} record"
        )
    return records
