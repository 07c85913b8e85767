"""Exact grading of answers that are words or sentences (graph-search tasks such as ProsQA)."""

from __future__ import annotations

import pytest

from latentlib.tasks.grading import GRADE_MODES, extract_exact, grade

# --- exact grading ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        ("n3 n9 n12 #### n12", "n12", True),
        ("n3 n9 n1 #### n1", "n12", False),  # a prefix of the gold is not the gold
        ("n3 n9 n12 #### n12 n5", "n12", False),
        ("n3 #### n12\nn5 n6", "n12", True),  # the answer ends with its line
        ("####\n  n12  ", "n12", True),
        ("#### n5 and then #### n12", "n12", True),  # the last marker counts
        ("n12", "n12", False),  # no marker, no answer
        ("Tom is a wumpus. #### Tom  is a\tyumpus.", "Tom is a yumpus.", True),
        ("#### Tom is a yumpus", "Tom is a yumpus.", False),
        ("#### tom is a yumpus.", "Tom is a yumpus.", False),
        ("#### True", "True", True),
        ("#### False", "True", False),
    ],
)
def test_exact_grading(prediction: str, gold: str, expected: bool) -> None:
    assert grade(prediction, gold, mode="exact") is expected


def test_exact_mode_leaves_the_numeric_modes_alone() -> None:
    assert GRADE_MODES[:3] == ("strict", "flexible", "math") and "exact" in GRADE_MODES
    assert extract_exact("#### 1,000") == "1,000" and extract_exact("no marker") is None
    assert grade("#### 1,000", "1000") is True and grade("#### 1,000", "1000", mode="exact") is False
    with pytest.raises(ValueError, match="'n12' is not a number.*mode='exact' for answers that are words"):
        grade("#### n12", "n12")
    with pytest.raises(ValueError, match="gold answer ' ' is empty"):
        grade("#### n12", " ", mode="exact")
