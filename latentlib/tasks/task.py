"""A task: where the records come from, how they are split, and how they are written.

Every stage and notebook gets its problems through one :class:`Task`, built from a
:class:`TaskConfig` (the task's name and sizes) for a model preset:

- ``task.splits``: the train/valid/test records (:class:`~latentlib.tasks.schema.Splits`);
- ``task.format``: how a record becomes text (:class:`Format`: the question, each step
  and ``#### answer``, separated by the preset's step separator: ``" "`` for the
  word-level from-scratch tokenizer, ``"\\n"`` for real tokenizers);
- ``task.words``: the words a from-scratch model's word-level vocabulary needs;
- ``task.digest``: a hash of every record, the task's identity in a stage's reuse key.

The format lives here so that no function takes a defaulted separator: whoever encodes a
record is handed the :class:`Format` that owns it.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from latentlib.tasks.gym import make_gsm_symbolic, split_records
from latentlib.tasks.loaders import load_gsm8k
from latentlib.tasks.schema import ANSWER_MARKER, Record, Splits
from latentlib.tasks.synthetic import ChainConfig, chain_vocabulary, make_chain_splits

__all__ = ["Format", "TaskConfig", "Task", "TASKS", "load_task", "records_digest"]


@dataclass(frozen=True)
class Format:
    """How a record is written: ``question``, then each step, then ``#### answer``; the
    question and every step end with ``separator`` (what the model writes between steps)."""

    separator: str  # text between reasoning steps, and after the question

    def __post_init__(self):
        if not isinstance(self.separator, str) or self.separator == "":
            raise ValueError(f"separator={self.separator!r}: give the text between steps, e.g. '\\n' or ' '")

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


# ---------------------------------------------------------------------------- the registry


def _chain(cfg: TaskConfig) -> tuple[Splits, list[str]]:
    chain = ChainConfig(n_train=cfg.n_train, n_test=cfg.n_test, seed=cfg.seed)
    return make_chain_splits(chain), chain_vocabulary(chain)


def _gsm_symbolic(cfg: TaskConfig) -> tuple[Splits, None]:
    return split_records(make_gsm_symbolic(cfg.n_train + cfg.n_test, cfg.seed), 0, cfg.n_test, cfg.seed), None


def _gsm8k(cfg: TaskConfig) -> tuple[Splits, None]:
    return Splits(train=load_gsm8k("train")[:cfg.n_train], valid=[], test=load_gsm8k("test")[:cfg.n_test]), None


TASKS: dict[str, Callable[[TaskConfig], tuple[Splits, list[str] | None]]] = {
    "chain": _chain,  # the embedded chained modular arithmetic (latentlib.tasks.synthetic)
    "gsm_symbolic": _gsm_symbolic,  # reasoning-gym's GSM8K-like templates
    "gsm8k": _gsm8k,  # GSM8K from the hub cache (offline: the local Hugging Face cache)
}


@dataclass(frozen=True)
class TaskConfig:
    name: str = "chain"  # a key of TASKS
    n_train: int = 20000  # training problems
    n_test: int = 500  # test problems
    seed: int = 0  # seed of the generation and of the split

    def __post_init__(self):
        if self.name not in TASKS:
            close = difflib.get_close_matches(str(self.name), TASKS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown task {self.name!r}{hint}: choose one of {', '.join(TASKS)}")
        for name in ("n_train", "n_test"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: give a positive number of problems")

    @classmethod
    def from_params(cls, params: Mapping, default: str = "chain") -> TaskConfig:
        """The task of a notebook's parameters (``task``, ``n_train``, ``n_test``, ``seed``);
        ``default``: the preset's task when the notebook names none."""
        return cls(name=params.get("task") or default, n_train=int(params.get("n_train", cls.n_train)),
                   n_test=int(params.get("n_test", cls.n_test)), seed=int(params.get("seed", cls.seed)))


@dataclass(frozen=True)
class Task:
    config: TaskConfig  # what was asked for
    format: Format  # how records are written for this preset's tokenizer
    splits: Splits  # train / valid / test records
    words: tuple[str, ...] | None = None  # vocabulary of a word-level from-scratch model (None: real tokenizers)
    digest: str = field(default="", compare=False)  # hash of every record

    @property
    def name(self) -> str:
        return self.config.name


@lru_cache(maxsize=8)
def _build(cfg: TaskConfig) -> tuple[Splits, tuple[str, ...] | None, str]:
    splits, words = TASKS[cfg.name](cfg)
    digest = records_digest([*splits.train, *splits.valid, *splits.test])
    return splits, (tuple(words) if words is not None else None), digest


def load_task(cfg: TaskConfig, separator: str) -> Task:
    """The task's records and format (``separator``: the preset's ``step_separator``).
    Built once per configuration and process."""
    splits, words, digest = _build(cfg)
    return Task(config=cfg, format=Format(separator), splits=splits, words=words, digest=digest)
