"""The embedded graph-search task: ProsQA-style questions over random DAGs, generated.

ProsQA (Coconut, Hao et al. 2024, arXiv 2412.06769) asks "Is Tom a wumpus or a
yumpus?" over a few dozen "Every X is a Y" facts that form a random directed
acyclic graph; exactly one of the two candidate concepts can be reached from the
entity. It is the task where Coconut's continuous thoughts beat written chains of
thought, because answering needs search: a thought can hold several frontier
nodes at once, a written step commits to one. This module regrows such problems
locally, so the task needs no download and its size and difficulty are knobs::

    symbolic:   question "n4 n9 | n1 n4 | ... | n2 n7 [Q] n7 n12 [R] n1"
                steps    ("n4", "n9", "n12"),  answer "n12"
    sentences:  question "Every glimpus is a drorpus. ... Is Alex a vumpus or trorpus?"
                steps    ("Alex is a glimpus.", "Every glimpus is a drorpus.", "Every drorpus is a trorpus.")
                answer   "Alex is a trorpus."

``symbolic`` is for word-level models trained from scratch (every word is a whole
token of :func:`graph_vocabulary`; the layout follows the symbolic ProsQA of Zhu
et al. 2025, arXiv 2505.12514: edge pairs, ``[Q]`` and the two candidates,
``[R]`` and the root); ``sentences`` is ProsQA's English, in the shape of
Coconut's data files. Each step adds one node of the gold path, so a record has
as many steps as its path has edges, in both styles.

How a graph grows (Coconut's appendix): nodes 0 and 1 are two entities; every
later node draws its number of parents from Poisson(``parent_rate``) and picks
them among earlier nodes: with probability ``one_side_prob`` only among nodes
that entity 0 reaches and entity 1 does not, with the same probability the other
way round, and otherwise among all earlier nodes. A deeper candidate parent is
likelier (weight ``1 + depth_weight * depth``, depth counted from the nearest
parentless node), which lengthens the chains. A node that draws no parent is one
more entity. The question asks about one of the two first entities; the answer
is a leaf only that entity reaches (of the two), the distractor a leaf only the
other one reaches, so both candidates are leaves with parents and neither is
given away by its degree. The gold chain of thought is a shortest path from the
entity to the answer.

The appendix does not say how the entity and the two leaves are picked; the
rules here are those Coconut's released ProsQA files obey. With
``target_choice="farthest"`` (the default) the answer is the asked entity's
farthest such leaf, kept when it is ``min_path_len`` to ``max_path_len`` edges
away, and the question asks about whichever entity has the farther answer (ties
at random); the distractor is any leaf of the other side. A side effect, present
in ProsQA too: the answer is usually the deeper of the two candidates, a cue a
model can use without searching from the entity. ``"uniform"`` picks the answer
among all leaves in range and the entity at random, which weakens that cue and
shortens the paths.

Where this departs from the paper or its files:

* The one-sided draws offer only nodes on that side. The appendix's
  pseudo-code, as public re-implementations reproduce it, also offers the nodes
  neither entity reaches; the released files fit the version without them much
  better (few extra entities, almost no node that neither entity reaches).
* Parentless nodes that no later node chose as a parent (entities stated in no
  fact) are dropped, as they are absent from Coconut's files.
* A graph without a usable question is drawn again, and so is, in the
  ``sentences`` style, one with more entities than ``entity_names`` has names.
  Otherwise the two styles of one seed draw the same graphs.
* When several shortest paths lead to the answer, the gold one is drawn
  uniformly among them; which one Coconut kept is not documented.
* ``shuffle_nodes=True`` (the default) numbers the nodes in random order. In
  Coconut's files the numbering is the growth order, so every edge goes from a
  smaller to a larger index and the two entities are nodes 0 and 1: in the
  symbolic style those numbers are the tokens, and a model could read the order
  off them. ``False`` keeps the growth order.
* Concept and entity names are invented here (ProntoQA-like ``-pus`` words),
  not ProsQA's list.

Each record's ``meta`` has Coconut's graph fields (``idx_to_symbol``, ``edges``
as ``[parent, child]`` index pairs, ``root``, ``target``, ``neg_target``), the
same as :func:`~latentlib.tasks.loaders.load_coconut_json` keeps from the real
files, plus what probes need: ``path`` (the gold path as node indices, root
first), ``depth`` (each node's shortest distance from the root, -1 when the root
cannot reach it) and ``height`` (each node's shortest distance to a leaf, 0 for
leaves, the quantity Coconut's analysis ranks frontier nodes by).
:func:`annotate_graph_record` adds the last three to a loaded record.
:func:`check_graph_record` validates a record from either source.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from latentlib.tasks.schema import Record, RecordError, Splits

GRAPH_STYLES: tuple[str, ...] = ("symbolic", "sentences")
TARGET_CHOICES: tuple[str, ...] = ("farthest", "uniform")
COCONUT_GRAPH_FIELDS: tuple[str, ...] = ("idx_to_symbol", "edges", "root", "target", "neg_target")
"""The graph fields of Coconut's ProsQA files, kept in ``Record.meta`` by the loader and the generator."""
PROBE_FIELDS: tuple[str, ...] = ("path", "depth", "height")
"""What the generator (and :func:`annotate_graph_record`) adds to the graph fields."""

EDGE_SEPARATOR = "|"
QUESTION_MARK = "[Q]"
ROOT_MARK = "[R]"
_TEMPLATE_WORDS = ("Every", "is", "a", "Is", "or")

DEFAULT_ENTITY_NAMES: tuple[str, ...] = (
    "Alex", "Ben", "Cleo", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "June", "Kai", "Lena",
)
_ONSETS = ("b", "br", "d", "dr", "f", "fl", "g", "gl", "gr", "h", "j", "k", "kr", "l", "m", "n", "p", "pl",
           "qu", "r", "s", "sk", "sl", "sn", "st", "sw", "t", "tr", "v", "w", "y", "z", "zh", "sh", "ch", "th")
DEFAULT_CONCEPT_NAMES: tuple[str, ...] = tuple(
    onset + rime for rime in ("umpus", "orpus", "ilpus", "empus") for onset in _ONSETS
)

# A usable problem is usually found within a few draws; this many failures in a row means the
# configuration cannot produce (more) problems, and looping on would hang.
_MAX_FAILED_DRAWS = 2000


class NoPathError(RecordError):
    """A graph record whose root reaches neither candidate: the question has no answer."""


@dataclass(frozen=True)
class GraphConfig:
    """Shape and size of a generated ProsQA-style dataset (defaults near ProsQA's)."""

    n_train: int = 17886  # ProsQA's official split sizes
    n_valid: int = 300
    n_test: int = 500
    seed: int = 0
    n_nodes: int = 28  # nodes grown per graph, before entities that appear in no fact are dropped
    parent_rate: float = 1.5  # mean of the Poisson number of parents of each new node
    one_side_prob: float = 0.35  # chance, for each entity, that a node picks parents only on its side
    depth_weight: float = 1.5  # a candidate parent at depth d has weight 1 + depth_weight * d
    min_path_len: int = 3  # shortest root-to-answer distance, in edges (= reasoning steps)
    max_path_len: int = 6
    target_choice: str = "farthest"  # answer: the asked entity's farthest eligible leaf, or "uniform" among them
    style: str = "symbolic"  # "symbolic" (node tokens n0..) or "sentences" (ProsQA's English)
    shuffle_nodes: bool = True  # number nodes in random order instead of growth order
    entity_names: tuple[str, ...] = DEFAULT_ENTITY_NAMES  # names of parentless nodes ("sentences" style)
    concept_names: tuple[str, ...] = DEFAULT_CONCEPT_NAMES  # names of the other nodes ("sentences" style)

    def __post_init__(self) -> None:
        for name in ("entity_names", "concept_names"):
            if isinstance(getattr(self, name), list):
                # Accept a list for convenience; store a tuple so the config stays hashable.
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("n_train", "n_valid", "n_test"):
            _check_int(getattr(self, name), name, minimum=0, fix="use a non-negative number of records")
        _check_int(self.seed, "seed", minimum=None, fix="pass an integer seed")
        _check_int(self.min_path_len, "min_path_len", minimum=1, fix="the answer must be at least one edge away")
        _check_int(self.max_path_len, "max_path_len", minimum=1, fix="use e.g. max_path_len=6")
        if self.max_path_len < self.min_path_len:
            raise ValueError(
                f"GraphConfig.max_path_len={self.max_path_len} is below min_path_len={self.min_path_len}: "
                "pass max_path_len >= min_path_len"
            )
        needed = self.min_path_len + 3
        _check_int(
            self.n_nodes, "n_nodes", minimum=needed,
            fix=f"two entities, a path of min_path_len={self.min_path_len} edges and a distractor need "
                f"{needed} nodes; raise n_nodes or lower min_path_len",
        )
        _check_number(self.parent_rate, "parent_rate")
        if not 0 < self.parent_rate <= self.n_nodes:
            raise ValueError(
                f"GraphConfig.parent_rate must be in (0, n_nodes={self.n_nodes}], got {self.parent_rate}: "
                "it is the mean number of parents of a node, e.g. 1.5 as in ProsQA"
            )
        _check_number(self.one_side_prob, "one_side_prob")
        if not 0 <= self.one_side_prob <= 0.5:
            raise ValueError(
                f"GraphConfig.one_side_prob must be in [0, 0.5], got {self.one_side_prob}: it is the chance of "
                "each of two exclusive cases (parents only on entity 0's side, only on entity 1's), "
                "e.g. 0.35 as in ProsQA"
            )
        _check_number(self.depth_weight, "depth_weight")
        if self.depth_weight < 0:
            raise ValueError(
                f"GraphConfig.depth_weight must be >= 0, got {self.depth_weight}: "
                "0 picks parents uniformly, larger values favour deeper parents (ProsQA: 1.5)"
            )
        if self.target_choice not in TARGET_CHOICES:
            raise ValueError(
                f"GraphConfig.target_choice={self.target_choice!r} is not a rule: use one of "
                f"{', '.join(TARGET_CHOICES)} ('farthest' as in ProsQA's files)"
            )
        if self.style not in GRAPH_STYLES:
            raise ValueError(f"GraphConfig.style={self.style!r} is not a style: use one of {', '.join(GRAPH_STYLES)}")
        if not isinstance(self.shuffle_nodes, bool):
            raise ValueError(f"GraphConfig.shuffle_nodes must be True or False, got {self.shuffle_nodes!r}")
        _check_names(self.entity_names, "entity_names", minimum=2, why="a question needs two entities")
        _check_names(
            self.concept_names, "concept_names", minimum=self.n_nodes - 2 if self.style == "sentences" else 0,
            why=f"a graph of n_nodes={self.n_nodes} can have up to {self.n_nodes - 2} concepts to name",
        )
        shared = sorted(set(self.entity_names) & set(self.concept_names))
        if shared:
            raise ValueError(
                f"GraphConfig names {shared} are both entity and concept names: "
                "a name must say which kind of node it is, so keep the two lists disjoint"
            )


def _check_int(value: object, name: str, *, minimum: int | None, fix: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"GraphConfig.{name} must be an int, got {value!r}: {fix}")
    if minimum is not None and value < minimum:
        raise ValueError(f"GraphConfig.{name} must be >= {minimum}, got {value}: {fix}")


def _check_number(value: object, name: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"GraphConfig.{name} must be a finite number, got {value!r}")


def _check_names(names: object, field: str, *, minimum: int, why: str) -> None:
    if not isinstance(names, tuple):
        raise ValueError(f"GraphConfig.{field} must be a tuple of names, got {names!r}: pass e.g. ('Alex', 'Ben')")
    for name in names:
        if not isinstance(name, str) or not name.isalpha():
            raise ValueError(
                f"GraphConfig.{field} contains {name!r}: every name must be one word of letters only "
                "(the sentences are parsed back by their spaces and punctuation)"
            )
        if name in _TEMPLATE_WORDS:
            raise ValueError(
                f"GraphConfig.{field} contains {name!r}, a word of the sentence template "
                f"({', '.join(_TEMPLATE_WORDS)}): choose another name"
            )
    if len(set(names)) != len(names):
        repeated = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"GraphConfig.{field} lists {repeated} more than once: remove the duplicates")
    if len(names) < minimum:
        raise ValueError(f"GraphConfig.{field} has {len(names)} names but needs at least {minimum}: {why}")


# --- growing a graph -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Problem:
    # One drawn problem, in growth order: nodes 0 .. n-1, parents[v] in the order drawn.
    parents: tuple[tuple[int, ...], ...]
    root: int
    target: int
    neg_target: int


def _poisson(rng: random.Random, rate: float) -> int:
    # Knuth's method: exact, and deterministic given the rng (rate is bounded by n_nodes).
    limit, k, product = math.exp(-rate), 0, rng.random()
    while product > limit:
        k += 1
        product *= rng.random()
    return k


def _weighted_sample(rng: random.Random, pool: list[int], weights: list[float], k: int) -> list[int]:
    # k distinct items, each draw proportional to the remaining weights.
    pool, weights, chosen = list(pool), list(weights), []
    for _ in range(k):
        point = rng.random() * sum(weights)
        index = len(pool) - 1
        for i, weight in enumerate(weights):
            point -= weight
            if point < 0:
                index = i
                break
        chosen.append(pool.pop(index))
        weights.pop(index)
    return chosen


def _grow(cfg: GraphConfig, rng: random.Random) -> tuple[list[list[int]], list[int]]:
    """Grow one DAG; return each node's parents and its label (bit 1: entity 0 reaches it, bit 2: entity 1)."""
    parents: list[list[int]] = [[], []]
    label = [1, 2]
    depth = [0, 0]
    only = {1: [0], 2: [1]}  # nodes that exactly one of the two entities reaches, by label
    for node in range(2, cfg.n_nodes):
        count = _poisson(rng, cfg.parent_rate)
        draw = rng.random()
        if draw < cfg.one_side_prob:
            pool = only[1]
        elif draw < 2 * cfg.one_side_prob:
            pool = only[2]
        else:
            pool = list(range(node))
        count = min(count, len(pool))
        chosen = _weighted_sample(rng, pool, [1 + cfg.depth_weight * depth[c] for c in pool], count)
        parents.append(chosen)
        node_label = 0
        for parent in chosen:
            node_label |= label[parent]
        label.append(node_label)
        depth.append(1 + min(depth[p] for p in chosen) if chosen else 0)
        if node_label in only:
            only[node_label].append(node)
    return parents, label


def _bfs(children: Sequence[Sequence[int]], source: int) -> list[int]:
    dist = [-1] * len(children)
    dist[source] = 0
    queue = deque([source])
    while queue:
        node = queue.popleft()
        for child in children[node]:
            if dist[child] < 0:
                dist[child] = dist[node] + 1
                queue.append(child)
    return dist


def _draw_problem(cfg: GraphConfig, rng: random.Random) -> _Problem | None:
    """One graph and question, or None when the graph has no usable question."""
    parents, label = _grow(cfg, rng)
    has_child = [False] * cfg.n_nodes
    for node_parents in parents:
        for parent in node_parents:
            has_child[parent] = True
    kept = [v for v in range(cfg.n_nodes) if parents[v] or has_child[v]]
    if 0 not in kept or 1 not in kept:
        return None  # an entity that no node chose as a parent: it would appear in no fact
    if cfg.style == "sentences" and sum(1 for v in kept if not parents[v]) > len(cfg.entity_names):
        return None  # more entities than names
    index = {v: i for i, v in enumerate(kept)}
    new_parents = tuple(tuple(index[p] for p in parents[v]) for v in kept)
    children: list[list[int]] = [[] for _ in kept]
    for child, node_parents in enumerate(new_parents):
        for parent in node_parents:
            children[parent].append(child)
    options = []  # (answer distance, entity, answers, distractors) for each entity a question can ask about
    for asked in (0, 1):
        dist = _bfs(children, index[asked])
        leaves = [i for i, v in enumerate(kept) if not children[i] and label[v] == 1 << asked]
        distractors = [i for i, v in enumerate(kept) if not children[i] and label[v] == 1 << (1 - asked)]
        if cfg.target_choice == "farthest" and leaves:
            farthest = max(dist[i] for i in leaves)
            leaves = [i for i in leaves if dist[i] == farthest]
        answers = [i for i in leaves if cfg.min_path_len <= dist[i] <= cfg.max_path_len]
        if answers and distractors:
            options.append((dist[answers[0]] if cfg.target_choice == "farthest" else 0, asked, answers, distractors))
    if not options:
        return None
    # "farthest": ask about the entity whose answer is farther (ties at random); "uniform": either entity.
    best = max(option[0] for option in options)
    _, asked, answers, distractors = rng.choice([option for option in options if option[0] == best])
    return _Problem(new_parents, index[asked], rng.choice(answers), rng.choice(distractors))


def _shortest_path(children: Sequence[Sequence[int]], root: int, target: int, rng: random.Random) -> list[int]:
    # Uniform over all shortest paths: walk back from the target, choosing each predecessor
    # in proportion to the number of shortest paths that reach it.
    dist = _bfs(children, root)
    order = sorted((v for v in range(len(children)) if dist[v] >= 0), key=lambda v: dist[v])
    ways = [0] * len(children)
    ways[root] = 1
    predecessors: list[list[int]] = [[] for _ in children]
    for node in order:
        for child in children[node]:
            if dist[child] == dist[node] + 1:
                ways[child] += ways[node]
                predecessors[child].append(node)
    path = [target]
    while path[-1] != root:
        options = predecessors[path[-1]]
        path.append(rng.choices(options, weights=[ways[p] for p in options])[0])
    return path[::-1]


def _heights(children: Sequence[Sequence[int]]) -> list[int]:
    # Shortest distance to a leaf: a BFS from all leaves at once along reversed edges.
    parents: list[list[int]] = [[] for _ in children]
    for node, node_children in enumerate(children):
        for child in node_children:
            parents[child].append(node)
    height = [-1] * len(children)
    queue = deque(v for v in range(len(children)) if not children[v])
    for leaf in queue:
        height[leaf] = 0
    while queue:
        node = queue.popleft()
        for parent in parents[node]:
            if height[parent] < 0:
                height[parent] = height[node] + 1
                queue.append(parent)
    return height


# --- rendering -------------------------------------------------------------------------------


def _render(
    symbols: Sequence[str],
    edges: Sequence[tuple[int, int]],
    root: int,
    target: int,
    neg_target: int,
    path: Sequence[int],
    style: str,
    rng: random.Random,
) -> tuple[str, list[str], str]:
    order = list(edges)
    rng.shuffle(order)  # fact order must not hint at the path
    candidates = [target, neg_target]
    rng.shuffle(candidates)
    first, second = (symbols[c] for c in candidates)
    if style == "symbolic":
        facts = f" {EDGE_SEPARATOR} ".join(f"{symbols[a]} {symbols[b]}" for a, b in order)
        question = f"{facts} {QUESTION_MARK} {first} {second} {ROOT_MARK} {symbols[root]}"
        steps = [symbols[v] for v in path[1:]]
        return question, steps, symbols[target]
    has_parent = {child for _, child in edges}
    entity = [v not in has_parent for v in range(len(symbols))]

    def fact(a: int, b: int) -> str:
        return f"{symbols[a]} is a {symbols[b]}." if entity[a] else f"Every {symbols[a]} is a {symbols[b]}."

    question = " ".join(fact(a, b) for a, b in order) + f" Is {symbols[root]} a {first} or {second}?"
    steps = [fact(a, b) for a, b in zip(path, path[1:])]
    return question, steps, f"{symbols[root]} is a {symbols[target]}."


def make_graph_record(cfg: GraphConfig, rng: random.Random) -> Record:
    """Draw one problem of ``cfg`` with ``rng`` and return it as a checked :class:`Record`.

    Graphs without a usable question are drawn again (see the module docstring);
    ``cfg``'s split sizes and seed are not used, ``rng`` decides everything.
    """
    for _ in range(_MAX_FAILED_DRAWS):
        problem = _draw_problem(cfg, rng)
        if problem is not None:
            return _problem_record(cfg, problem, rng)
    raise ValueError(_no_problem_message(cfg, _MAX_FAILED_DRAWS, produced=None))


def _problem_record(cfg: GraphConfig, problem: _Problem, rng: random.Random) -> Record:
    n = len(problem.parents)
    position = list(range(n))
    if cfg.shuffle_nodes:
        rng.shuffle(position)  # growth-order node v becomes index position[v]
    edges = [(position[p], position[v]) for v in range(n) for p in problem.parents[v]]
    children: list[list[int]] = [[] for _ in range(n)]
    for parent, child in edges:
        children[parent].append(child)
    root, target, neg_target = (position[v] for v in (problem.root, problem.target, problem.neg_target))
    path = _shortest_path(children, root, target, rng)
    # Names come from their own stream, drawn in both styles, so that the two styles of one
    # seed stay in step and draw the same graphs.
    naming = random.Random(rng.getrandbits(64))
    if cfg.style == "symbolic":
        symbols = [f"n{i}" for i in range(n)]
    else:
        parentless = [v for v in range(n) if not problem.parents[v]]
        entities = iter(naming.sample(cfg.entity_names, len(parentless)))
        concepts = iter(naming.sample(cfg.concept_names, n - len(parentless)))
        by_growth = [next(entities) if not problem.parents[v] else next(concepts) for v in range(n)]
        symbols = [""] * n
        for v in range(n):
            symbols[position[v]] = by_growth[v]
    question, steps, answer = _render(symbols, edges, root, target, neg_target, path, cfg.style, rng)
    meta = {
        "idx_to_symbol": symbols,
        "edges": [[a, b] for a, b in edges],
        "root": root,
        "target": target,
        "neg_target": neg_target,
        "path": path,
        "depth": _bfs(children, root),
        "height": _heights(children),
    }
    record = Record(question=question, steps=tuple(steps), answer=answer, meta=meta)
    check_graph_record(record, source="the generator")  # a failure here is a bug in this module
    return record


def _no_problem_message(cfg: GraphConfig, draws: int, produced: int | None) -> str:
    got = "" if produced is None else f" after {produced} distinct problems"
    names = f", at most {len(cfg.entity_names)} entities" if cfg.style == "sentences" else ""
    return (
        f"GraphConfig drew {draws} graphs in a row{got} without a new usable problem (a leaf only the asked "
        f"entity reaches, {cfg.min_path_len} to {cfg.max_path_len} edges away, a leaf only the other entity "
        f"reaches{names}): raise n_nodes={cfg.n_nodes} or parent_rate={cfg.parent_rate}, widen "
        "min_path_len..max_path_len, or ask for fewer records"
    )


def _problem_key(record: Record) -> tuple:
    # Two records pose the same problem when they have the same facts, entity and candidates,
    # whatever the order of the facts and candidates in the text.
    meta = record.meta
    symbols = meta["idx_to_symbol"]
    facts = frozenset((symbols[a], symbols[b]) for a, b in meta["edges"])
    return facts, symbols[meta["root"]], frozenset((symbols[meta["target"]], symbols[meta["neg_target"]]))


def make_graph_splits(cfg: GraphConfig) -> Splits:
    """Generate the train/valid/test splits of ``cfg``, deterministically from ``cfg.seed``.

    No problem appears twice, within a split or across splits: a draw that poses
    the same facts, entity and candidates as an earlier one is discarded (so no
    question text repeats either, whatever the order of its facts).
    """
    rng = random.Random(cfg.seed)
    total = cfg.n_train + cfg.n_valid + cfg.n_test
    seen: set[tuple] = set()
    records: list[Record] = []
    failed = 0
    while len(records) < total:
        problem = _draw_problem(cfg, rng)
        record = _problem_record(cfg, problem, rng) if problem is not None else None
        key = _problem_key(record) if record is not None else None
        if record is None or key in seen:
            failed += 1
            if failed >= _MAX_FAILED_DRAWS:
                raise ValueError(_no_problem_message(cfg, failed, produced=len(records)))
            continue
        failed = 0
        seen.add(key)
        records.append(record)
    valid_end = cfg.n_train + cfg.n_valid
    return Splits(train=records[: cfg.n_train], valid=records[cfg.n_train : valid_end], test=records[valid_end:])


def graph_vocabulary(cfg: GraphConfig) -> list[str]:
    """Return every word (whitespace-split) a question, step or answer of ``cfg`` can contain.

    ``symbolic``: the node tokens ``n0 .. n{n_nodes-1}``, ``|``, ``[Q]`` and ``[R]``.
    ``sentences``: the template words, the entity names, and each concept name
    bare, with ``.`` and with ``?`` attached (the words as whitespace splits them).
    Words added when rendering CoT text, such as
    :data:`~latentlib.tasks.schema.ANSWER_MARKER`, belong to the renderer.
    """
    if cfg.style == "symbolic":
        return [f"n{i}" for i in range(cfg.n_nodes)] + [EDGE_SEPARATOR, QUESTION_MARK, ROOT_MARK]
    concepts = [form for name in cfg.concept_names for form in (name, f"{name}.", f"{name}?")]
    return list(_TEMPLATE_WORDS) + list(cfg.entity_names) + concepts


# --- checking --------------------------------------------------------------------------------


def _fail(where: str, problem: str, fix: str) -> RecordError:
    return RecordError(f"{where} {problem}: {fix}")


def _read_graph(record: Record, where: str) -> tuple[list[str], list[tuple[int, int]], int, int, int]:
    meta = record.meta
    missing = [name for name in COCONUT_GRAPH_FIELDS if name not in meta]
    if missing:
        raise _fail(
            where, f"has no graph field(s) {', '.join(missing)} in meta",
            f"a graph record needs {', '.join(COCONUT_GRAPH_FIELDS)} as in Coconut's ProsQA files",
        )
    symbols = meta["idx_to_symbol"]
    if not isinstance(symbols, list) or not symbols or not all(isinstance(s, str) and s for s in symbols):
        raise _fail(where, f"has idx_to_symbol {symbols!r}", "it must be a non-empty list of node names")
    if len(set(symbols)) != len(symbols):
        repeated = sorted({s for s in symbols if symbols.count(s) > 1})
        raise _fail(where, f"names nodes {repeated} twice in idx_to_symbol", "give every node its own name")
    n = len(symbols)

    def node(value: Any, what: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
            raise _fail(where, f"has {what} {value!r}", f"it must be a node index in 0..{n - 1}")
        return value

    edges = meta["edges"]
    if not isinstance(edges, list):
        raise _fail(where, f"has edges of type {type(edges).__name__}", "store them as a list of [parent, child]")
    pairs = []
    for position, edge in enumerate(edges):
        if not isinstance(edge, (list, tuple)) or len(edge) != 2:
            raise _fail(where, f"has edge {position} = {edge!r}", "each edge must be a [parent, child] pair")
        pairs.append((node(edge[0], f"edge {position} parent"), node(edge[1], f"edge {position} child")))
    root = node(meta["root"], "root")
    target = node(meta["target"], "target")
    neg_target = node(meta["neg_target"], "neg_target")
    if target == neg_target:
        raise _fail(where, f"has target == neg_target == {target}", "the two candidates must be different nodes")
    if root in (target, neg_target):
        raise _fail(where, f"has the root {root} as a candidate", "the candidates must be other nodes than the root")
    return symbols, pairs, root, target, neg_target


def _find_cycle(children: Sequence[Sequence[int]]) -> list[int] | None:
    state = [0] * len(children)  # 0 unseen, 1 on the current DFS path, 2 done
    for start in range(len(children)):
        if state[start]:
            continue
        stack: list[tuple[int, int]] = [(start, 0)]
        trail = [start]
        state[start] = 1
        while stack:
            node, next_child = stack[-1]
            if next_child < len(children[node]):
                stack[-1] = (node, next_child + 1)
                child = children[node][next_child]
                if state[child] == 1:
                    return trail[trail.index(child):] + [child]
                if state[child] == 0:
                    state[child] = 1
                    stack.append((child, 0))
                    trail.append(child)
            else:
                state[node] = 2
                stack.pop()
                trail.pop()
    return None


def _named(symbols: Sequence[str], nodes: Sequence[int]) -> str:
    return " -> ".join(f"{symbols[v]} ({v})" for v in nodes)


def _step_symbol(text: str) -> str:
    # The node a step or answer names is its last word, without the sentence's full stop:
    # "Every glimpus is a trorpus." -> "trorpus"; symbolic "n12" -> "n12".
    words = text.split()
    return words[-1].rstrip(".") if words else ""


def _gold_path(record: Record, symbols: list[str], root: int, where: str) -> list[int]:
    index = {s: i for i, s in enumerate(symbols)}
    path = [root]
    for position, step in enumerate(record.steps):
        name = _step_symbol(step)
        if name not in index:
            raise _fail(
                where, f"has step {position} {step!r}, which names no node of idx_to_symbol",
                "each step must end with the node it reaches (\"Every X is a Y.\" or a node token)",
            )
        words = step.rstrip(".").split()
        if len(words) > 1 and words[-4:-2] != [symbols[path[-1]], "is"]:
            raise _fail(
                where, f"has step {position} {step!r}, which does not start from {symbols[path[-1]]!r}",
                "each sentence step must lead on from the node the previous step reached",
            )
        path.append(index[name])
    stored = record.meta.get("path")
    if stored is not None and list(stored) != path:
        raise _fail(
            where, f"has meta path {stored!r} but its steps walk {path!r}",
            "the steps must name the nodes of the stored path, in order",
        )
    return path


def _question_graph(record: Record, where: str) -> tuple[set, str, set] | None:
    """The facts, entity and candidates the question text states, or None for an unknown rendering."""
    question = record.question
    symbolic = re.fullmatch(
        rf"(.*?)\s*{re.escape(QUESTION_MARK)} (\S+) (\S+) {re.escape(ROOT_MARK)} (\S+)", question, re.DOTALL
    )
    if symbolic:
        facts = set()
        stated = symbolic.group(1).strip()
        for part in stated.split(EDGE_SEPARATOR) if stated else []:
            words = part.split()
            if len(words) != 2:
                raise _fail(where, f"has a symbolic fact {part.strip()!r}", "each fact must be two node tokens")
            facts.add(tuple(words))
        return facts, symbolic.group(4), {symbolic.group(2), symbolic.group(3)}
    sentences = re.fullmatch(r"(.*?)\s*Is (\S+) a (\S+) or (\S+)\?", question, re.DOTALL)
    if sentences:
        facts = set()
        stated = sentences.group(1).strip()
        for sentence in re.split(r"(?<=\.)\s+", stated) if stated else []:
            fact = re.fullmatch(r"(?:Every )?(\S+) is a (\S+)\.", sentence)
            if fact is None:
                raise _fail(
                    where, f"has the sentence {sentence!r} in its question",
                    "each fact must read \"Every X is a Y.\" or \"Name is a Y.\"",
                )
            facts.add(fact.groups())
        return facts, sentences.group(2), {sentences.group(3), sentences.group(4)}
    return None


def _analyse(record: Record, where: str) -> dict[str, Any]:
    """Check ``record`` and return its gold path, depths and heights."""
    symbols, edges, root, target, neg_target = _read_graph(record, where)
    n = len(symbols)
    children: list[list[int]] = [[] for _ in range(n)]
    for parent, child in edges:
        children[parent].append(child)
    cycle = _find_cycle(children)
    if cycle is not None:
        raise _fail(
            where, f"has a cycle {_named(symbols, cycle)}", "ProsQA graphs are acyclic; remove one of its edges"
        )
    stated = _question_graph(record, where)
    if stated is None:
        raise _fail(
            where, "has a question in neither graph rendering",
            f"end it with \"Is <root> a <X> or <Y>?\" (sentences) or \"{QUESTION_MARK} <X> <Y> {ROOT_MARK} <root>\" "
            "(symbolic)",
        )
    facts, asked, candidates = stated
    if facts != {(symbols[a], symbols[b]) for a, b in edges}:
        raise _fail(
            where, "states other facts in its question than meta['edges'] holds",
            "render the question from the same graph as the meta fields",
        )
    if asked != symbols[root] or candidates != {symbols[target], symbols[neg_target]}:
        raise _fail(
            where, f"asks about {asked!r} and {sorted(candidates)} but meta has root {symbols[root]!r} and "
                   f"candidates {symbols[target]!r}, {symbols[neg_target]!r}",
            "the question must name the root and the two candidates of the meta fields",
        )
    depth = _bfs(children, root)
    reach_target, reach_neg = depth[target] >= 0, depth[neg_target] >= 0
    if not reach_target and not reach_neg:
        raise NoPathError(
            f"{where} is a graph with no path from the root {symbols[root]!r} to either candidate "
            f"({symbols[target]!r}, {symbols[neg_target]!r}): the question has no answer; "
            "add the edges of a path to the target"
        )
    if reach_target and reach_neg:
        raise _fail(
            where, f"lets the root {symbols[root]!r} reach both candidates",
            f"exactly one must be reachable; remove every path to the distractor {symbols[neg_target]!r}",
        )
    if reach_neg:
        raise _fail(
            where, f"lets the root reach neg_target {symbols[neg_target]!r} but not target {symbols[target]!r}",
            "the two labels are swapped: target must be the reachable candidate",
        )
    path = _gold_path(record, symbols, root, where)
    if path[-1] != target:
        raise _fail(
            where, f"has a gold path ending at {symbols[path[-1]]!r}, not at the target {symbols[target]!r}",
            "the last step must reach the target",
        )
    edge_set = set(edges)
    for a, b in zip(path, path[1:]):
        if (a, b) not in edge_set:
            raise _fail(
                where, f"has a gold path stepping {symbols[a]!r} -> {symbols[b]!r}, which is not an edge",
                "each step must follow an edge of the graph",
            )
    if len(path) - 1 != depth[target]:
        raise _fail(
            where, f"has a gold path of {len(path) - 1} edges but the target is {depth[target]} edges from the root",
            "the gold chain must be a shortest path",
        )
    if _step_symbol(record.answer) != symbols[target]:
        raise _fail(
            where, f"has answer {record.answer!r}, which does not name the target {symbols[target]!r}",
            "the answer must end with the target node",
        )
    annotations = {"path": path, "depth": depth, "height": _heights(children)}
    for name, value in annotations.items():
        if name in record.meta and list(record.meta[name]) != value:
            raise _fail(where, f"has meta {name} {record.meta[name]!r}, expected {value!r}", f"recompute {name}")
    return annotations


def check_graph_record(record: Record, *, source: str = "record", index: int | None = None) -> None:
    """Raise :class:`RecordError` unless ``record`` is a well-formed graph-search problem.

    Checked: the Coconut graph fields are present and consistent; the graph is
    acyclic; the question states exactly the graph's facts, its root and its two
    candidates (in the symbolic or the sentences rendering); exactly one candidate,
    the target, is reachable from the root (a root reaching neither raises
    :class:`NoPathError`); the steps walk a path along edges from the root to the
    target, and that path is a shortest one; the answer names the target. The
    probe fields ``path``, ``depth`` and ``height``, when present, must match.
    ``source`` and ``index`` only feed the messages, as in
    :func:`~latentlib.tasks.schema.validate_record`.
    """
    where = source if index is None else f"record {index} of {source}"
    _analyse(record, where)


def annotate_graph_record(record: Record, *, source: str = "record", index: int | None = None) -> Record:
    """Check ``record`` (see :func:`check_graph_record`) and return it with ``path``, ``depth`` and
    ``height`` in ``meta``, so that a record loaded from Coconut's files has the generator's fields."""
    where = source if index is None else f"record {index} of {source}"
    annotations = _analyse(record, where)
    return dataclasses.replace(record, meta={**record.meta, **annotations})


__all__ = [
    "COCONUT_GRAPH_FIELDS",
    "DEFAULT_CONCEPT_NAMES",
    "DEFAULT_ENTITY_NAMES",
    "GRAPH_STYLES",
    "PROBE_FIELDS",
    "TARGET_CHOICES",
    "GraphConfig",
    "NoPathError",
    "annotate_graph_record",
    "check_graph_record",
    "graph_vocabulary",
    "make_graph_record",
    "make_graph_splits",
]

