"""Answer extraction, grading, and the record validation that guards every loader."""

from __future__ import annotations

import concurrent.futures

import pytest

from latentlib.tasks import (
    Record,
    RecordError,
    extract_flexible,
    extract_strict,
    grade,
    normalize_number,
    parse_gold_answer,
    validate_record,
    validate_records,
)


@pytest.mark.parametrize(
    ("text", "strict", "flexible"),
    [
        ("so the total is\n#### 1,234", "1234", "1234"),
        ("#### -7", "-7", "-7"),
        ("#### 0.5", "0.5", "0.5"),
        ("#### $1,000.00", "1000", "1000"),
        ("#### 3.50", "3.5", "3.5"),
        ("#### 12%", "12", "12"),
        ("first guess #### 3\nsecond thought #### 4", "4", "4"),
        ("He has 12 apples, then 15 more.", None, "15"),
        ("The temperature fell to -12 degrees", None, "-12"),
        ("It costs 2.75 per kg", None, "2.75"),
        ("So we get \\boxed{42}.", None, "42"),
        ("So we get \\boxed{\\frac{1}{2}}", None, "\\frac{1}{2}"),
        ("The answer is 8, not 9 or 10", None, "8"),
        ("no number at all", None, None),
        ("#### ", None, None),
    ],
)
def test_extraction(text: str, strict: str | None, flexible: str | None) -> None:
    assert extract_strict(text) == strict
    assert extract_flexible(text) == flexible


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("72", "72"),
        ("72.0", "72"),
        ("+5", "5"),
        ("-0", "0"),
        ("1,234.50", "1234.5"),
        (".5", "0.5"),
        ("abc", None),
        ("1/2", None),
    ],
)
def test_normalize_number(raw: str, normalized: str | None) -> None:
    assert normalize_number(raw) == normalized


@pytest.mark.parametrize(
    ("prediction", "gold", "mode", "expected"),
    [
        ("reasoning...\n#### 72.0", "72", "strict", True),
        ("reasoning...\n#### 1,234", "1234", "strict", True),
        ("#### 71", "72", "strict", False),
        ("the result is 72", "72", "strict", False),
        ("the result is 72", "72", "flexible", True),
        ("it drops by -5 degrees", "-5", "flexible", True),
        ("it drops by 5 degrees", "-5", "flexible", False),
        ("so \\boxed{\\frac{1}{2}}", "0.5", "math", True),
        ("so \\boxed{0.5}", "\\frac{1}{2}", "math", True),
        ("so \\boxed{\\frac{1}{3}}", "\\frac{1}{2}", "math", False),
        ("no answer here", "\\frac{1}{2}", "math", False),
    ],
)
def test_grade(prediction: str, gold: str, mode: str, expected: bool) -> None:
    assert grade(prediction, gold, mode=mode) is expected


def test_grade_rejects_unknown_mode_and_non_numeric_gold() -> None:
    with pytest.raises(ValueError, match="'fuzzy'.*strict, flexible, math"):
        grade("#### 1", "1", mode="fuzzy")
    with pytest.raises(ValueError, match="'abc'.*mode='math'"):
        grade("#### 1", "abc")


def test_parse_gold_answer() -> None:
    assert parse_gold_answer(" 1,080 ") == "1080"
    with pytest.raises(RecordError, match="answer 'abc' of record 3 of train.json cannot be parsed as a number"):
        parse_gold_answer("abc", source="train.json", index=3)


GOOD = {"question": "What is 2 + 3?", "steps": ["2 + 3 = 5"], "answer": "5"}


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"question": "q", "answer": "5"}, "record 3 of train.json has no 'steps'.*add the steps"),
        ({"question": "q", "steps": ["s"]}, "record 3 of train.json has no 'answer'"),
        ({"question": "q", "steps": "2 + 3 = 5", "answer": "5"}, "'steps' of type str.*list of strings"),
        ({"question": "q", "steps": ["ok", 7], "answer": "5"}, "step 1 of record 3 of train.json is int 7, expected str"),
        ({"question": "   ", "steps": ["s"], "answer": "5"}, "empty 'question'"),
        ({"question": "q", "steps": [], "answer": "5"}, "empty 'steps' list.*allow_empty_steps=True"),
        ({"question": "q", "steps": ["s"], "answer": ""}, "empty 'answer'"),
        ({"question": "q", "steps": ["s"], "answer": ["5"]}, "'answer' of type list"),
        (["q", ["s"], "5"], "record 3 of train.json is list.*not a mapping"),
    ],
)
def test_validate_record_rejects(obj: object, message: str) -> None:
    with pytest.raises(RecordError, match=message):
        validate_record(obj, source="train.json", index=3)


def test_validate_record_accepts_and_keeps_extra_fields() -> None:
    record = validate_record({**GOOD, "answer": 5, "root": 0})
    assert record == Record("What is 2 + 3?", ("2 + 3 = 5",), "5")
    assert record.meta == {"root": 0}
    # meta stays out of equality and hashing, so records dedupe by their text.
    assert hash(record) == hash(Record("What is 2 + 3?", ("2 + 3 = 5",), "5", meta={"other": 1}))
    assert validate_record({**GOOD, "steps": []}, allow_empty_steps=True).steps == ()


def test_validate_records_rejects_an_empty_dataset() -> None:
    with pytest.raises(RecordError, match="train.json contains no records"):
        validate_records([], "train.json")
    with pytest.raises(RecordError, match="record 1 of train.json has no 'steps'"):
        validate_records([GOOD, {"question": "q", "answer": "1"}], "train.json")


def test_math_grading_works_off_the_main_thread() -> None:
    # math-verify's default timeout uses signal.alarm, which raises outside the main thread.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        assert pool.submit(grade, "\\boxed{0.5}", "\\frac{1}{2}", mode="math").result() is True
