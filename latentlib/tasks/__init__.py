"""Tasks for latent chain-of-thought research: one record schema, generators, loaders and grading.

Every dataset becomes a list of :class:`Record` (question, reasoning steps,
answer). A :class:`~latentlib.tasks.task.Task` bundles one source's splits with the
:class:`~latentlib.tasks.task.Format` its records are written in. Sources: the embedded
chained modular arithmetic task (:mod:`~latentlib.tasks.synthetic`), the embedded
ProsQA-style graph search (:mod:`~latentlib.tasks.graph`), reasoning-gym generators
(:mod:`~latentlib.tasks.gym`) and the public datasets GSM8K, GSM8K-Aug,
Coconut's JSON files and MATH-500 (:mod:`~latentlib.tasks.loaders`).
:mod:`~latentlib.tasks.grading` extracts and grades final answers.
"""

from latentlib.tasks.grading import (
    GRADE_MODES,
    extract_exact,
    extract_flexible,
    extract_strict,
    grade,
    normalize_number,
    parse_gold_answer,
)
from latentlib.tasks.gym import make_gsm_symbolic, make_path_star, split_records
from latentlib.tasks.loaders import (
    DataFileNotFoundError,
    HubUnavailableError,
    load_coconut_json,
    load_gsm8k,
    load_gsm8k_aug,
    load_math500,
    split_solution,
)
from latentlib.tasks.schema import (
    ANSWER_MARKER,
    Record,
    RecordError,
    Splits,
    validate_record,
    validate_records,
)
from latentlib.tasks.graph import (
    GraphConfig,
    NoPathError,
    annotate_graph_record,
    check_graph_record,
    graph_vocabulary,
    make_graph_record,
    make_graph_splits,
)
from latentlib.tasks.task import TASKS, Format, Task, TaskConfig, load_task, record_words, records_digest
from latentlib.tasks.synthetic import (
    ChainConfig,
    apply_op,
    chain_capacity,
    chain_vocabulary,
    make_chain_record,
    make_chain_splits,
)

__all__ = [
    "ANSWER_MARKER",
    "Format",
    "TASKS",
    "Task",
    "TaskConfig",
    "load_task",
    "record_words",
    "records_digest",
    "GraphConfig",
    "NoPathError",
    "annotate_graph_record",
    "check_graph_record",
    "graph_vocabulary",
    "make_graph_record",
    "make_graph_splits",
    "extract_exact",
    "GRADE_MODES",
    "ChainConfig",
    "DataFileNotFoundError",
    "HubUnavailableError",
    "Record",
    "RecordError",
    "Splits",
    "apply_op",
    "chain_capacity",
    "chain_vocabulary",
    "extract_flexible",
    "extract_strict",
    "grade",
    "load_coconut_json",
    "load_gsm8k",
    "load_gsm8k_aug",
    "load_math500",
    "make_chain_record",
    "make_chain_splits",
    "make_gsm_symbolic",
    "make_path_star",
    "normalize_number",
    "parse_gold_answer",
    "split_records",
    "split_solution",
    "validate_record",
    "validate_records",
]
