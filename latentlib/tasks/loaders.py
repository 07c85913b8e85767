"""Loaders for the public reasoning datasets, from the Hugging Face Hub or local copies.

Each loader reads its dataset with ``datasets.load_dataset`` from the hub
(``path=None``) or from a local file in exactly the hub's format (``path=``),
and returns validated :class:`~latentlib.tasks.schema.Record` objects:

=========================  ===========================  ====================================
loader                     hub id                       local formats
=========================  ===========================  ====================================
:func:`load_gsm8k`         ``openai/gsm8k`` (``main``)  .jsonl / .json / .parquet
:func:`load_gsm8k_aug`     ``whynlp/gsm8k-aug``         .jsonl / .json / .parquet, iCoT .txt
:func:`load_math500`       ``HuggingFaceH4/MATH-500``   .jsonl / .json / .parquet
:func:`load_coconut_json`  (local files only)           Coconut's JSON list
=========================  ===========================  ====================================

Record indices in error messages count from 0, as in the file's list of records.
When the hub cannot be reached the loaders raise :class:`HubUnavailableError`
at once (in offline mode) telling the caller to pass ``path=``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import datasets
import huggingface_hub.constants
import pyarrow
from datasets.exceptions import DatasetGenerationError
from huggingface_hub.errors import LocalEntryNotFoundError

from latentlib.tasks.grading import parse_gold_answer
from latentlib.tasks.schema import (
    ANSWER_MARKER,
    REQUIRED_SHAPE,
    Record,
    RecordError,
    describe_location,
    validate_record,
    validate_records,
)

GSM8K_HUB = ("openai/gsm8k", "main", ("train", "test"))
GSM8K_AUG_HUB = ("whynlp/gsm8k-aug", None, ("train", "validation", "test"))
MATH500_HUB = ("HuggingFaceH4/MATH-500", None, ("test",))

_CALC_ANNOTATION = re.compile(r"<<[^>]*>>")
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


class DataFileNotFoundError(FileNotFoundError, ValueError):
    """A local data file passed as ``path=`` does not exist."""


class HubUnavailableError(ConnectionError, ValueError):
    """A dataset could not be fetched from the Hugging Face Hub (offline, or the hub is unreachable)."""


# --- reading rows ----------------------------------------------------------------------------


def _check_file(path: str | os.PathLike, formats: str) -> Path:
    file = Path(path)
    if not file.is_file():
        raise DataFileNotFoundError(
            f"data file {str(file)!r} does not exist: pass path= an existing local copy of the dataset ({formats})"
        )
    # datasets reports an empty file as a bare StopIteration, so catch it here with a useful message.
    if _is_blank(file):
        raise RecordError(
            f"{file} is empty: it must hold the dataset's records ({formats}); re-export or re-download it"
        )
    return file


def _is_blank(file: Path) -> bool:
    with open(file, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 16), b""):
            if chunk.strip():
                return False
    return True


def _read_local_rows(path: str | os.PathLike, fields: str, cache_dir: str | None) -> tuple[list[dict], str]:
    """Read a .jsonl/.json/.parquet file through ``datasets`` and return its rows and a display name."""
    formats = f".jsonl/.json/.parquet with fields {fields}"
    file = _check_file(path, formats)
    builder = _BUILDERS.get(file.suffix.lower())
    if builder is None:
        raise ValueError(
            f"{file} has extension {file.suffix!r}, which this loader cannot read: convert it to {formats}"
        )
    try:
        table = datasets.load_dataset(builder, data_files=str(file), split="train", cache_dir=cache_dir)
    except (DatasetGenerationError, pyarrow.ArrowException) as exc:
        cause = exc.__cause__ or exc
        raise RecordError(
            f"{file} could not be read as {builder.upper()} ({cause}): a .jsonl file needs one JSON object per "
            f"line and a .json file one JSON list of objects, each with fields {fields}; fix or re-export the file"
        ) from exc
    return table.to_list(), str(file)


def _offline_requested() -> bool:
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(name, "").upper() in _TRUE_VALUES for name in names)


@contextlib.contextmanager
def _honour_offline_env() -> Iterator[None]:
    # datasets and huggingface_hub read HF_HUB_OFFLINE once, at import. If it was set
    # later (a notebook cell, a test), they would still try the network and retry for
    # ~20 s; switching their flags on for this call makes them use the local cache or
    # fail at once, as offline mode promises.
    if not _offline_requested() or datasets.config.HF_HUB_OFFLINE:
        yield
        return
    saved = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _read_hub_rows(
    hub: tuple[str, str | None, tuple[str, ...]], split: str, cache_dir: str | None, local_hint: str
) -> tuple[list[dict], str]:
    hub_id, config, splits = hub
    if split not in splits:
        raise ValueError(f"split {split!r} is not a split of {hub_id}: use one of {', '.join(splits)}")
    try:
        with _honour_offline_env():
            table = datasets.load_dataset(hub_id, config, split=split, cache_dir=cache_dir)
    except (ConnectionError, TimeoutError, LocalEntryNotFoundError) as exc:
        raise HubUnavailableError(
            f"the dataset {hub_id!r} (split {split!r}) could not be loaded from the Hugging Face Hub ({exc}): "
            f"pass path= a local copy of the data in the hub's format ({local_hint}), "
            "or run where the hub is reachable (with HF_HUB_OFFLINE unset)"
        ) from exc
    return table.to_list(), f"{hub_id} split {split}"


def _require_fields(row: Any, fields: tuple[str, ...], where: str, shape: str) -> None:
    if not isinstance(row, Mapping):
        raise RecordError(f"{where} is {type(row).__name__}, not a JSON object: store each record as {shape}")
    for name in fields:
        if row.get(name) is None:
            raise RecordError(f"{where} has no {name!r}: every record needs {shape}; add the field or fix the file")
        if not isinstance(row[name], str):
            raise RecordError(
                f"{where} has {name!r} of type {type(row[name]).__name__}, expected str: every record needs {shape}"
            )


# --- GSM8K -----------------------------------------------------------------------------------

_GSM8K_SHAPE = "{question: str, answer: str ending in '#### <number>'}"


def _gsm8k_record(row: Any, source: str, index: int, keep_calc: bool) -> Record:
    where = describe_location(source, index)
    _require_fields(row, ("question", "answer"), where, _GSM8K_SHAPE)
    solution = row["answer"]
    if ANSWER_MARKER not in solution:
        raise RecordError(
            f"{where} has an answer without a '#### <number>' line: GSM8K answers end with the final "
            "number after '####'; fix the record or use load_coconut_json for {question, steps, answer} data"
        )
    reasoning, final = solution.rsplit(ANSWER_MARKER, 1)
    steps = []
    for line in reasoning.splitlines():
        # <<48/2=24>> is GSM8K's calculator annotation; the visible text already states the result.
        text = line if keep_calc else _CALC_ANNOTATION.sub("", line)
        if text.strip():
            steps.append(text.strip())
    extra = {key: value for key, value in row.items() if key not in ("question", "answer")}
    answer = parse_gold_answer(final, source=source, index=index)
    raw = {**extra, "question": row["question"], "steps": steps, "answer": answer}
    return validate_record(raw, source=source, index=index)


def load_gsm8k(
    split: str = "train",
    path: str | os.PathLike | None = None,
    *,
    keep_calc: bool = False,
    cache_dir: str | None = None,
) -> list[Record]:
    """Load GSM8K (hub ``openai/gsm8k``, config ``main``) as records.

    Steps are the non-blank reasoning lines before ``#### N``, with the
    ``<<48/2=24>>`` calculator annotations removed unless ``keep_calc``; the
    answer is the number after ``####``, normalised (``1,234`` -> ``1234``).
    With ``path`` (the hub's ``train.jsonl``/``test.jsonl``, or a parquet
    shard) ``split`` is ignored: the file is the split.
    """
    if path is not None:
        rows, source = _read_local_rows(path, _GSM8K_SHAPE, cache_dir)
    else:
        rows, source = _read_hub_rows(GSM8K_HUB, split, cache_dir, "e.g. GSM8K's train.jsonl / test.jsonl")
    records = [_gsm8k_record(row, source, index, keep_calc) for index, row in enumerate(rows)]
    if not records:
        raise RecordError(f"{source} contains no records: check that it is the GSM8K file or split you meant")
    return records


# --- GSM8K-Aug (iCoT / Coconut) --------------------------------------------------------------

_ICOT_SHAPE = "'question||<<step>> <<step>> #### answer'"


def _read_icot_lines(path: str | os.PathLike) -> list[Record]:
    # iCoT's text format has no hub or datasets builder; reading lines directly keeps line numbers exact.
    file = _check_file(path, f"iCoT .txt lines {_ICOT_SHAPE}")
    records = []
    for line_number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {line_number} of {file}"
        if "||" not in line:
            raise RecordError(
                f"{where} has no '||' between question and steps: iCoT lines read {_ICOT_SHAPE}; fix the line"
            )
        question, rest = line.split("||", 1)
        if ANSWER_MARKER not in rest:
            raise RecordError(
                f"{where} has no '#### answer' after its steps: iCoT lines read {_ICOT_SHAPE}; fix the line"
            )
        chain, final = rest.rsplit(ANSWER_MARKER, 1)
        answer = parse_gold_answer(final, source=where)
        raw = {"question": question, "steps": chain.split(), "answer": answer}
        records.append(validate_record(raw, source=where))
    if not records:
        raise RecordError(f"{file} contains no records: it must hold lines {_ICOT_SHAPE}")
    return records


def load_gsm8k_aug(
    split: str = "train",
    path: str | os.PathLike | None = None,
    *,
    cache_dir: str | None = None,
) -> list[Record]:
    """Load GSM8K-Aug, the augmented GSM8K used by iCoT and Coconut, as records.

    From the hub (``whynlp/gsm8k-aug``: ``question``, ``steps`` as a list of
    ``<<600*30/100=180>>`` expressions, ``answer``) or from a local file in
    that format; a ``.txt`` path is read as iCoT's original line format
    ``question||<<step>> <<step>> #### answer``. Answers are normalised numbers.
    """
    if path is not None and Path(path).suffix.lower() == ".txt":
        return _read_icot_lines(path)
    if path is not None:
        rows, source = _read_local_rows(path, REQUIRED_SHAPE, cache_dir)
    else:
        hint = "e.g. a .jsonl of {question, steps, answer} or iCoT's train.txt"
        rows, source = _read_hub_rows(GSM8K_AUG_HUB, split, cache_dir, hint)
    records = validate_records(rows, source)
    return [
        dataclasses.replace(record, answer=parse_gold_answer(record.answer, source=source, index=index))
        for index, record in enumerate(records)
    ]


# --- Coconut JSON ----------------------------------------------------------------------------


def load_coconut_json(path: str | os.PathLike, *, allow_empty_steps: bool = False) -> list[Record]:
    """Load a Coconut data file (ProsQA, ProntoQA or GSM): one JSON list of records.

    Records are ``{question, steps, answer}`` plus optional graph fields
    (``idx_to_symbol``, ``edges``, ``root``, ``target``, ``neg_target``),
    which are kept in ``meta``. Answers are kept verbatim (ProsQA's are sentences).

    Read with ``json`` rather than ``datasets``: Arrow unifies one schema over
    the whole list, turning a key missing from one record into ``None`` and a
    type clash between records into a file-level error that cannot say which
    record is wrong; these files are small, so per-record checks win.
    """
    file = _check_file(path, f"one JSON list of {REQUIRED_SHAPE} objects")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RecordError(
            f"{file} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}): Coconut data files "
            f"are one JSON list of {REQUIRED_SHAPE} objects; fix or re-export the file"
        ) from exc
    if not isinstance(data, list):
        raise RecordError(
            f"{file} holds a JSON {type(data).__name__}, not a list: Coconut data files are one JSON list of "
            f"{REQUIRED_SHAPE} objects; wrap the records in [...]"
        )
    return validate_records(data, str(file), allow_empty_steps=allow_empty_steps)


# --- MATH-500 --------------------------------------------------------------------------------

_MATH500_SHAPE = "{problem: str, solution: str, answer: str} (plus subject, level, unique_id)"
# Math spans are never split: $$..$$, $..$ (not the escaped \$ of prices), \[..\], \(..\),
# \begin{env}..\end{env}.
_MATH_SPAN = re.compile(
    r"(?<!\\)\$\$(?:\\.|[^\\$])+\$\$"
    r"|(?<!\\)\$(?:\\.|[^\\$])+\$"
    r"|\\\[.*?\\\]"
    r"|\\\(.*?\\\)"
    r"|\\begin\{([^}]*)\}.*?\\end\{\1\}",
    re.DOTALL,
)
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
# A sentence ends at . ! ? or at a display equation (masked as \x01i\x01), before a capital letter.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=\x01))\s+(?=[A-Z])")
_DISPLAY_OPENERS = ("$$", "\\[", "\\begin")


def split_solution(solution: str) -> list[str]:
    """Split a MATH solution into reasoning steps.

    The rule: first at blank lines (paragraphs), then within a paragraph
    wherever ``.``, ``!``, ``?`` or a display equation is followed by
    whitespace and a capital letter. Math spans (``$..$``, ``$$..$$``,
    ``\\[..\\]``, ``\\(..\\)``, ``\\begin{..}..\\end{..}``) are never cut, so
    decimals and multi-line equations stay whole. Whitespace inside a step
    is collapsed to one space.
    """
    spans: list[str] = []

    def hide(match: re.Match) -> str:
        spans.append(match.group(0))
        mark = "\x01" if match.group(0).startswith(_DISPLAY_OPENERS) else "\x00"
        return f"{mark}{len(spans) - 1}{mark}"

    masked = _MATH_SPAN.sub(hide, solution)
    steps = []
    for paragraph in _PARAGRAPH_BREAK.split(masked):
        for sentence in _SENTENCE_END.split(paragraph):
            text = re.sub(r"[\x00\x01](\d+)[\x00\x01]", lambda m: spans[int(m.group(1))], sentence)
            text = " ".join(text.split())
            if text:
                steps.append(text)
    return steps


def _math500_record(row: Any, source: str, index: int) -> Record:
    where = describe_location(source, index)
    _require_fields(row, ("problem", "solution", "answer"), where, _MATH500_SHAPE)
    extra = {key: value for key, value in row.items() if key not in ("problem", "answer")}
    raw = {**extra, "question": row["problem"], "steps": split_solution(row["solution"]), "answer": row["answer"]}
    return validate_record(raw, source=source, index=index)


def load_math500(
    split: str = "test",
    path: str | os.PathLike | None = None,
    *,
    cache_dir: str | None = None,
) -> list[Record]:
    """Load MATH-500 (hub ``HuggingFaceH4/MATH-500``) as records.

    The question is ``problem``; the steps are ``solution`` cut by
    :func:`split_solution`; the answer is the ``answer`` field, a LaTeX
    string to grade with ``grade(..., mode="math")``. ``solution``,
    ``subject``, ``level`` and ``unique_id`` are kept in ``meta``.
    """
    if path is not None:
        rows, source = _read_local_rows(path, _MATH500_SHAPE, cache_dir)
    else:
        rows, source = _read_hub_rows(MATH500_HUB, split, cache_dir, "e.g. MATH-500's test.jsonl")
    records = [_math500_record(row, source, index) for index, row in enumerate(rows)]
    if not records:
        raise RecordError(f"{source} contains no records: check that it is the MATH-500 file you meant")
    return records
