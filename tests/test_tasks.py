"""Task sources: the synthetic chain task, reasoning-gym generators and the dataset loaders.

Loaders run on the small files in tests/fixtures/ (exact hub formats); nothing is fetched from the hub.
"""

from __future__ import annotations

import time
from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest

from latentlib.tasks import (
    ChainConfig,
    DataFileNotFoundError,
    HubUnavailableError,
    Record,
    RecordError,
    chain_capacity,
    chain_vocabulary,
    load_coconut_json,
    load_gsm8k,
    load_gsm8k_aug,
    load_math500,
    make_chain_splits,
    make_gsm_symbolic,
    make_path_star,
    split_records,
)

FIXTURES = Path(__file__).parent / "fixtures"
MALFORMED = FIXTURES / "malformed"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    # A private datasets cache keeps the tests from reading or writing the user's ~/.cache.
    return str(tmp_path_factory.mktemp("hf_datasets_cache"))


# --- synthetic chain task --------------------------------------------------------------------

SMALL = ChainConfig(n_ops=4, n_train=300, n_valid=50, n_test=50, seed=1)


def _recompute(question: str, modulus: int) -> list[str]:
    start, *ops, equals = question.split(" ")
    assert equals == "="
    value, values = int(start), []
    for op in ops:
        value = (value + int(op[1:])) % modulus if op[0] == "+" else (value * int(op[1:])) % modulus
        values.append(str(value))
    return values


def test_chain_splits_are_deterministic_and_sized() -> None:
    first, again = make_chain_splits(SMALL), make_chain_splits(SMALL)
    assert first == again
    assert first.sizes() == {"train": 300, "valid": 50, "test": 50}
    other = make_chain_splits(ChainConfig(n_ops=4, n_train=300, n_valid=50, n_test=50, seed=2))
    assert other.train != first.train


def test_chain_splits_are_disjoint() -> None:
    splits = make_chain_splits(SMALL)
    questions = [record.question for split in (splits.train, splits.valid, splits.test) for record in split]
    assert len(questions) == len(set(questions))


@pytest.mark.parametrize("cfg", [SMALL, ChainConfig(n_ops=3, modulus=13, n_train=200, n_valid=0, n_test=20)])
def test_chain_steps_are_the_intermediate_values(cfg: ChainConfig) -> None:
    vocabulary = set(chain_vocabulary(cfg))
    for record in make_chain_splits(cfg).train:
        assert list(record.steps) == _recompute(record.question, cfg.modulus)
        assert len(record.steps) == cfg.n_ops and record.answer == record.steps[-1]
        assert set(record.question.split()) | set(record.steps) <= vocabulary


def test_chain_can_use_its_whole_problem_space() -> None:
    cfg = ChainConfig(n_ops=1, modulus=5, ops=("+1", "*2"), n_train=8, n_valid=1, n_test=1)
    assert chain_capacity(cfg) == 10
    splits = make_chain_splits(cfg)
    assert len({r.question for r in splits.train + splits.valid + splits.test}) == 10


def test_chain_rejects_more_problems_than_exist() -> None:
    with pytest.raises(ValueError, match="asks for 1200 distinct problems.*only 120.*lower the split sizes"):
        make_chain_splits(ChainConfig(n_ops=1, n_train=200))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_ops": 0}, "n_ops must be >= 1, got 0"),
        ({"modulus": 1}, "modulus must be >= 2, got 1"),
        ({"ops": ("+1", "-2")}, "'-2', which is not an operation.*'\\+k' or '\\*k'"),
        ({"ops": ()}, "non-empty tuple"),
        ({"ops": ("+1", "+1")}, "twice"),
        ({"n_valid": -1}, "n_valid must be >= 0, got -1"),
        ({"seed": "0"}, "seed must be an int"),
    ],
)
def test_chain_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ChainConfig(**kwargs)


# --- reasoning-gym generators ----------------------------------------------------------------


def test_gsm_symbolic_records() -> None:
    records = make_gsm_symbolic(5, seed=0)
    assert len(records) == 5
    for record in records:
        assert isinstance(record, Record) and record.steps and record.question
        assert record.answer.lstrip("-").replace(".", "").isdigit()
    assert make_gsm_symbolic(5, seed=0) == records


def test_path_star_records_follow_the_graph() -> None:
    records = make_path_star(5, seed=0, degree=3, compact=True)
    for record in records:
        meta = record.meta
        symbols = meta["idx_to_symbol"]
        edges = {(symbols[a], symbols[b]) for a, b in meta["edges"]}
        path = record.answer.split()
        assert path[0] == symbols[meta["root"]] and path[-1] == symbols[meta["target"]]
        assert meta["neg_target"] != meta["target"]
        assert list(record.steps) == [f"{a} {b}" for a, b in zip(path, path[1:])]
        assert all(tuple(step.split()) in edges for step in record.steps)
        assert record.question.endswith("=")


def test_gym_generators_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n >= 1.*n=0"):
        make_gsm_symbolic(0, seed=0)
    with pytest.raises(ValueError, match="unknown option.*colour.*degree"):
        make_path_star(2, seed=0, colour="red")
    with pytest.raises(ValueError, match="degree must be at least 2"):
        make_path_star(2, seed=0, degree=1)


def test_split_records_dedupes_and_partitions() -> None:
    records = make_gsm_symbolic(20, seed=3)
    splits = split_records(records + records[:5], n_valid=4, n_test=4, seed=0)
    questions = [r.question for r in splits.train + splits.valid + splits.test]
    assert len(questions) == len(set(questions)) == len({r.question for r in records})
    assert splits.sizes()["valid"] == 4 and splits.sizes()["test"] == 4
    with pytest.raises(ValueError, match="only 20 distinct questions"):
        split_records(records, n_valid=15, n_test=15, seed=0)


# --- loaders on fixtures ---------------------------------------------------------------------


def test_load_gsm8k_fixture(cache_dir: str) -> None:
    records = load_gsm8k(path=FIXTURES / "gsm8k_train_sample.jsonl", cache_dir=cache_dir)
    assert [r.answer for r in records] == ["72", "10", "5", "1080", "-47"]
    assert records[0].steps == (
        "Natalia sold 48/2 = 24 clips in May.",
        "Natalia sold 48+24 = 72 clips altogether in April and May.",
    )
    kept = load_gsm8k(path=FIXTURES / "gsm8k_train_sample.jsonl", keep_calc=True, cache_dir=cache_dir)
    assert "<<48/2=24>>" in kept[0].steps[0]


def test_load_gsm8k_aug_hub_format_and_icot_lines(cache_dir: str) -> None:
    hub = load_gsm8k_aug(path=FIXTURES / "gsm8k_aug_sample.json", cache_dir=cache_dir)
    assert hub[0] == Record(hub[0].question, ("<<12*8=96>>", "<<96-70=26>>"), "26")
    assert hub[2].answer == "1200"
    icot = load_gsm8k_aug(path=FIXTURES / "gsm8k_aug_icot_sample.txt")
    assert icot[:2] == hub[:2]
    assert icot[2].steps == ("<<2.5*6=15>>", "<<40-15=25>>") and icot[2].answer == "25"


def test_load_coconut_prosqa() -> None:
    records = load_coconut_json(FIXTURES / "prosqa_sample.json")
    assert len(records) == 3
    first = records[0]
    assert first.answer == "Ada is a vexpus." and first.steps[0] == "Ada is a glimpus."
    assert first.meta["idx_to_symbol"][first.meta["target"]] == "vexpus"
    assert set(first.meta) == {"idx_to_symbol", "edges", "root", "target", "neg_target"}


def test_load_math500_fixture(cache_dir: str) -> None:
    records = load_math500(path=FIXTURES / "math500_sample.jsonl", cache_dir=cache_dir)
    assert [r.answer for r in records] == ["\\frac{5}{4}", "12.5", "-\\frac{3}{2}"]
    assert records[0].meta["subject"] == "Prealgebra" and records[0].meta["level"] == 2
    # Decimals inside math and display equations are never cut; sentences and paragraphs are.
    assert records[1].steps == (
        "Four notebooks cost $4 \\times 2.5 = 10$ dollars.",
        "Two pens cost $2 \\times 1.25 = 2.5$ dollars.",
        "Altogether the cost is $10 + 2.5 = \\boxed{12.5}$ dollars.",
    )
    assert len(records[2].steps) == 2 and "\\end{align*}" in records[2].steps[0]


@pytest.mark.parametrize(
    ("load", "name", "message"),
    [
        (lambda p, c: load_gsm8k(path=p, cache_dir=c), "empty.jsonl", "is empty"),
        (lambda p, c: load_gsm8k(path=p, cache_dir=c), "not_json.json", "could not be read as JSON"),
        (lambda p, c: load_gsm8k_aug(path=p, cache_dir=c), "missing_steps.json", "record 1 of .* has no 'steps'"),
        (lambda p, c: load_coconut_json(p), "not_json.json", "is not valid JSON"),
        (lambda p, c: load_coconut_json(p), "missing_steps.json", "record 1 of .* has no 'steps'"),
        (lambda p, c: load_coconut_json(p), "wrong_types.json", "record 1 of .* 'steps' of type str"),
        (lambda p, c: load_math500(path=p, cache_dir=c), "missing_steps.json", "record 0 of .* has no 'problem'"),
    ],
)
def test_malformed_files_name_the_file(load, name: str, message: str, cache_dir: str) -> None:
    with pytest.raises(RecordError, match=message) as caught:
        load(MALFORMED / name, cache_dir)
    assert name in str(caught.value)


def test_missing_file_is_reported() -> None:
    with pytest.raises(DataFileNotFoundError, match="nope.jsonl' does not exist: pass path="):
        load_gsm8k(path=FIXTURES / "nope.jsonl")
    with pytest.raises(FileNotFoundError):
        load_coconut_json(FIXTURES / "nope.json")


def test_offline_hub_fails_fast_with_a_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    flags = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    started = time.monotonic()
    expected = "'openai/gsm8k'.*could not be loaded from the Hugging Face Hub.*pass path="
    with pytest.raises(HubUnavailableError, match=expected):
        load_gsm8k("test", cache_dir=str(tmp_path))
    assert time.monotonic() - started < 10, "offline mode must not wait for network retries"
    # The loader switches the libraries' offline flags on only for its own call.
    assert (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE) == flags


def test_hub_split_names_are_checked_before_any_download() -> None:
    with pytest.raises(ValueError, match="split 'valid' is not a split of openai/gsm8k: use one of train, test"):
        load_gsm8k("valid")
