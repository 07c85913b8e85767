"""A task: where the records come from, how they are split, and how they are written and graded.

Every stage and notebook gets its problems through one :class:`Task`, built from a
:class:`TaskConfig` (the task's name, sizes, its file and its generator's knobs) for a
model preset:

- ``task.splits``: the train/valid/test records (:class:`~latentlib.tasks.schema.Splits`);
- ``task.format``: how a record becomes text and how an answer is read back
  (:class:`Format`: the question, each step and ``#### answer``, separated by the
  preset's step separator, ``" "`` for the word-level from-scratch tokenizer and ``"\\n"``
  for real tokenizers; and the grading mode of the task's answers);
- ``task.words``: the words of a word-level vocabulary for from-scratch models, built from
  whatever records the task has;
- ``task.digest``: a hash of every record, the task's identity in a stage's reuse key.

``task`` and ``model`` are independent parameters: a preset names a default task, and any
task runs with any model (a from-scratch model needs a vocabulary that fits it, checked
before any training). Tasks (:data:`TASKS`):

- ``chain``: the embedded chained modular arithmetic (:mod:`~latentlib.tasks.synthetic`);
- ``graph``: an embedded ProsQA-style graph search (:mod:`~latentlib.tasks.graph`), in its
  symbolic style for from-scratch models and ProsQA's sentences for pretrained ones;
- ``prosqa``, ``prontoqa``: Coconut's JSON files from ``path`` (a directory holding
  ``<name>_train.json`` / ``_valid.json`` / ``_test.json``, or one file that is split here);
- ``gsm8k``, ``gsm8k-aug``, ``math500``: the hub (its local cache, offline) or ``path``;
- ``gsm_symbolic``: reasoning-gym's GSM8K-like templates.

The format lives here so that no function takes a defaulted separator: whoever encodes a
record is handed the :class:`Format` that owns it.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from latentlib.tasks.graph import GraphConfig, annotate_graph_record, graph_vocabulary, make_graph_splits
from latentlib.tasks.gym import make_gsm_symbolic, split_records
from latentlib.tasks.loaders import load_coconut_json, load_gsm8k, load_gsm8k_aug, load_math500
from latentlib.tasks.schema import ANSWER_MARKER, Record, RecordError, Splits
from latentlib.tasks.synthetic import ChainConfig, chain_vocabulary, make_chain_splits

__all__ = ["Format", "TaskConfig", "Task", "TASKS", "load_task", "records_digest", "record_words"]

GRADES = ("strict", "flexible", "math", "exact")


@dataclass(frozen=True)
class Format:
    """How a record is written: ``question``, then each step, then ``#### answer``; the
    question and every step end with ``separator`` (what the model writes between steps).
    ``grade``: how an answer written after ``####`` is compared with the gold one
    (:func:`latentlib.tasks.grade`'s modes: numbers, LaTeX, or exact text)."""

    separator: str  # text between reasoning steps, and after the question
    grade: str = "strict"  # "strict" (the number after ####), "flexible", "math" or "exact" (the text)

    def __post_init__(self):
        if not isinstance(self.separator, str) or self.separator == "":
            raise ValueError(f"separator={self.separator!r}: give the text between steps, e.g. '\\n' or ' '")
        if self.grade not in GRADES:
            raise ValueError(f"grade={self.grade!r}: use one of {GRADES}")

    def question(self, record: Record) -> str:
        return record.question + self.separator

    def steps(self, record: Record) -> list[str]:
        return [step + self.separator for step in record.steps]

    def answer(self, record: Record) -> str:
        return f"{ANSWER_MARKER} {record.answer}"


def records_digest(records) -> str:
    """A short hash of records (question, steps and answer, in order)."""
    h = hashlib.sha256()
    for r in records:
        h.update("\x00".join((r.question, *r.steps, r.answer)).encode())
        h.update(b"\x01")
    return h.hexdigest()[:16]


def record_words(records) -> list[str]:
    """Every whitespace-separated word of the records, in order of first appearance: the
    vocabulary a word-level from-scratch model of these records needs."""
    return list(dict.fromkeys(w for r in records for text in (r.question, *r.steps, r.answer) for w in text.split()))


# ---------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class _Built:
    splits: Splits
    words: tuple[str, ...]  # the word-level vocabulary
    grade: str  # how answers are graded


def _cut(splits: Splits, cfg: TaskConfig) -> Splits:
    return Splits(train=list(splits.train[:cfg.n_train]), valid=list(splits.valid), test=list(splits.test[:cfg.n_test]))


def _files(cfg: TaskConfig, load: Callable[[Path], list[Record]], stems: dict[str, tuple[str, ...]],
           suffixes: tuple[str, ...]) -> Splits:
    """A file task's splits: a directory holding one file per split (named by ``stems``),
    or one file whose records are split here (``n_test`` for test, the rest train)."""
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"task {cfg.name!r}: {path} does not exist; pass task_path=<the {cfg.name} file, or "
                                f"the directory holding its {', '.join(stems)} files>")
    if path.is_file():
        return split_records(load(path), 0, cfg.n_test, cfg.seed)
    found = {}
    for split, names in stems.items():
        hits = [path / f"{n}{s}" for n in names for s in suffixes if (path / f"{n}{s}").is_file()]
        found[split] = load(hits[0]) if hits else []
    if not found.get("train") or not found.get("test"):
        wanted = ", ".join(f"{names[0]}{suffixes[0]}" for names in stems.values())
        raise FileNotFoundError(f"task {cfg.name!r}: {path} holds no train and test files ({wanted}); pass "
                                f"task_path=<one file of records> to split it here instead")
    return Splits(train=found["train"], valid=found.get("valid", []), test=found["test"])


def _chain(cfg: TaskConfig, scratch: bool) -> _Built:
    chain = ChainConfig(n_ops=cfg.chain_ops, n_train=cfg.n_train, n_test=cfg.n_test, seed=cfg.seed)
    return _Built(make_chain_splits(chain), tuple(chain_vocabulary(chain)), "strict")


def _graph(cfg: TaskConfig, scratch: bool) -> _Built:
    graph = GraphConfig(n_train=cfg.n_train, n_valid=min(300, cfg.n_test), n_test=cfg.n_test, seed=cfg.seed,
                        n_nodes=cfg.graph_nodes, min_path_len=cfg.graph_min_path, max_path_len=cfg.graph_max_path,
                        style="symbolic" if scratch else "sentences")
    return _Built(make_graph_splits(graph), tuple(graph_vocabulary(graph)), "exact")


def _coconut_files(name: str):
    def build(cfg: TaskConfig, scratch: bool) -> _Built:
        def load(path):
            records = load_coconut_json(path)
            if name == "prosqa":  # the probes read the graph: paths, depths, heights
                records = [annotate_graph_record(r, source=str(path), index=i) for i, r in enumerate(records)]
            return records

        splits = _cut(_files(cfg, load, {"train": (f"{name}_train", "train"), "valid": (f"{name}_valid", "valid"),
                                         "test": (f"{name}_test", "test")}, (".json",)), cfg)
        return _Built(splits, tuple(record_words([*splits.train, *splits.valid, *splits.test])), "exact")
    return build


def _gsm8k(cfg: TaskConfig, scratch: bool) -> _Built:
    if cfg.path:
        splits = _files(cfg, lambda p: load_gsm8k(path=p), {"train": ("train",), "test": ("test",)},
                        (".jsonl", ".json", ".parquet"))
    else:
        splits = Splits(train=load_gsm8k("train"), valid=[], test=load_gsm8k("test"))
    splits = _cut(splits, cfg)
    return _Built(splits, tuple(record_words([*splits.train, *splits.test])), "strict")


def _gsm8k_aug(cfg: TaskConfig, scratch: bool) -> _Built:
    if cfg.path:
        splits = _files(cfg, lambda p: load_gsm8k_aug(path=p), {"train": ("train",), "test": ("test",)},
                        (".json", ".jsonl", ".txt"))
    else:
        splits = Splits(train=load_gsm8k_aug("train"), valid=[], test=load_gsm8k_aug("test"))
    splits = _cut(splits, cfg)
    return _Built(splits, tuple(record_words([*splits.train, *splits.test])), "strict")


def _math500(cfg: TaskConfig, scratch: bool) -> _Built:
    records = load_math500(path=cfg.path or None)  # 500 test problems: split here into train and test
    splits = _cut(split_records(records, 0, min(cfg.n_test, len(records) // 2), cfg.seed), cfg)
    return _Built(splits, tuple(record_words([*splits.train, *splits.test])), "math")


def _gsm_symbolic(cfg: TaskConfig, scratch: bool) -> _Built:
    splits = split_records(make_gsm_symbolic(cfg.n_train + cfg.n_test, cfg.seed), 0, cfg.n_test, cfg.seed)
    return _Built(splits, tuple(record_words([*splits.train, *splits.test])), "strict")


# name -> builder(config, from-scratch model?) -> splits, words, grading
TASKS: dict[str, Callable[[TaskConfig, bool], _Built]] = {
    "chain": _chain,
    "graph": _graph,
    "prosqa": _coconut_files("prosqa"),
    "prontoqa": _coconut_files("prontoqa"),
    "gsm8k": _gsm8k,
    "gsm8k-aug": _gsm8k_aug,
    "math500": _math500,
    "gsm_symbolic": _gsm_symbolic,
}
FILE_TASKS = ("prosqa", "prontoqa")  # need task_path


@dataclass(frozen=True)
class TaskConfig:
    name: str = "chain"  # a key of TASKS
    n_train: int = 20000  # training problems (at most)
    n_test: int = 500  # test problems (at most)
    seed: int = 0  # seed of the generation and of the split
    path: str = ""  # a file task's file, or the directory holding its splits ("": the hub, where there is one)
    chain_ops: int = 6  # chain: operations per problem (= reasoning steps)
    graph_nodes: int = 28  # graph: nodes grown per graph (ProsQA's size: about 23 remain)
    graph_min_path: int = 3  # graph: shortest root-to-answer path, in edges (= reasoning steps)
    graph_max_path: int = 6  # graph: longest

    def __post_init__(self):
        if self.name not in TASKS:
            close = difflib.get_close_matches(str(self.name), TASKS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown task {self.name!r}{hint}: choose one of {', '.join(TASKS)}")
        for name in ("n_train", "n_test", "chain_ops"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: give a positive number")
        if self.name in FILE_TASKS and not self.path:
            raise ValueError(f"task {self.name!r} is read from Coconut's JSON files: pass task_path=<the directory "
                             f"holding {self.name}_train.json and {self.name}_test.json, or one such file>")
        if self.name == "graph":  # the generator's own checks, before anything is generated
            GraphConfig(n_train=1, n_test=1, n_nodes=self.graph_nodes, min_path_len=self.graph_min_path,
                        max_path_len=self.graph_max_path)

    @classmethod
    def from_params(cls, params: Mapping, default: str = "chain") -> TaskConfig:
        """The task of a notebook's parameters (``task``, ``task_path``, ``n_train``, ``n_test``,
        ``seed``, ``chain_ops``, ``graph_*``); ``default``: the preset's task when the notebook
        names none."""
        def get(name, key):
            return type(getattr(cls, key))(params[name]) if name in params else getattr(cls, key)

        return cls(name=params.get("task") or default, n_train=get("n_train", "n_train"),
                   n_test=get("n_test", "n_test"), seed=get("seed", "seed"), path=get("task_path", "path"),
                   chain_ops=get("chain_ops", "chain_ops"), graph_nodes=get("graph_nodes", "graph_nodes"),
                   graph_min_path=get("graph_min_path", "graph_min_path"),
                   graph_max_path=get("graph_max_path", "graph_max_path"))


@dataclass(frozen=True)
class Task:
    config: TaskConfig  # what was asked for
    format: Format  # how records are written for this preset's tokenizer, and graded
    splits: Splits  # train / valid / test records
    words: tuple[str, ...] = ()  # vocabulary of a word-level from-scratch model
    digest: str = field(default="", compare=False)  # hash of every record

    @property
    def name(self) -> str:
        return self.config.name

    def answer_budget(self, scratch: bool) -> int:
        """Tokens to let a model write a test problem's reasoning and answer: the longest
        written solution in words (times 4 for subword tokenizers), plus room for eos."""
        words = max(sum(len(s.split()) for s in r.steps) + len(r.answer.split()) + 1 for r in self.splits.test)
        return max(16, words * (1 if scratch else 4) + 4)


@lru_cache(maxsize=8)
def _build(cfg: TaskConfig, scratch: bool) -> tuple[_Built, str]:
    built = TASKS[cfg.name](cfg, scratch)
    if not built.splits.train or not built.splits.test:
        raise RecordError(f"task {cfg.name!r} gave {len(built.splits.train)} training and {len(built.splits.test)} "
                          "test records: it needs both; check n_train, n_test and the task's files")
    return built, records_digest([*built.splits.train, *built.splits.valid, *built.splits.test])


def load_task(cfg: TaskConfig, separator: str, *, scratch: bool = False) -> Task:
    """The task's records and format (``separator``: the preset's ``step_separator``;
    ``scratch``: for a from-scratch, word-level model). Built once per configuration and
    process."""
    built, digest = _build(cfg, scratch)
    return Task(config=cfg, format=Format(separator, built.grade), splits=built.splits, words=built.words,
                digest=digest)
