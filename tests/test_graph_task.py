"""The embedded ProsQA-style graph task: generated graphs, the record check, exact grading,
and Coconut's ProsQA / ProntoQA files read with the same fields.

Graph properties are re-derived here with the test's own search code, not with the
module's, so a bug in the generator and its checker cannot cancel out.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from collections import deque
from pathlib import Path

import pytest

from latentlib.tasks.grading import GRADE_MODES, extract_exact, grade
from latentlib.tasks.graph import (
    COCONUT_GRAPH_FIELDS,
    PROBE_FIELDS,
    GraphConfig,
    NoPathError,
    annotate_graph_record,
    check_graph_record,
    graph_vocabulary,
    make_graph_record,
    make_graph_splits,
)
from latentlib.tasks.loaders import load_coconut_json
from latentlib.tasks.schema import ANSWER_MARKER, Record, RecordError

FIXTURES = Path(__file__).parent / "fixtures"
SMALL = dict(n_train=60, n_valid=10, n_test=10)


def _children(meta: dict) -> list[list[int]]:
    children: list[list[int]] = [[] for _ in meta["idx_to_symbol"]]
    for parent, child in meta["edges"]:
        children[parent].append(child)
    return children


def _distances(children: list[list[int]], source: int) -> dict[int, int]:
    dist, queue = {source: 0}, deque([source])
    while queue:
        node = queue.popleft()
        for child in children[node]:
            if child not in dist:
                dist[child] = dist[node] + 1
                queue.append(child)
    return dist


def _is_acyclic(children: list[list[int]]) -> bool:
    indegree = [0] * len(children)
    for node_children in children:
        for child in node_children:
            indegree[child] += 1
    ready = [v for v, d in enumerate(indegree) if d == 0]
    seen = 0
    while ready:
        node = ready.pop()
        seen += 1
        for child in children[node]:
            indegree[child] -= 1
            if indegree[child] == 0:
                ready.append(child)
    return seen == len(children)


def _assert_valid_problem(record: Record, cfg: GraphConfig) -> None:
    meta = record.meta
    symbols, root, target, neg = meta["idx_to_symbol"], meta["root"], meta["target"], meta["neg_target"]
    children = _children(meta)
    assert _is_acyclic(children)
    dist = _distances(children, root)
    assert target in dist and neg not in dist, "exactly the target must be reachable from the root"
    path = meta["path"]
    assert path[0] == root and path[-1] == target
    edges = {tuple(edge) for edge in meta["edges"]}
    assert all((a, b) in edges for a, b in zip(path, path[1:]))
    assert len(path) - 1 == dist[target], "the gold path must be a shortest path"
    assert cfg.min_path_len <= len(path) - 1 <= cfg.max_path_len
    assert len(record.steps) == len(path) - 1
    # ProsQA's shape: both candidates are leaves with parents, the distractor is another entity's.
    has_parent = {child for _, child in meta["edges"]}
    assert not children[target] and not children[neg] and {target, neg} <= has_parent
    entities = [v for v in range(len(symbols)) if v not in has_parent]
    assert root in entities and any(neg in _distances(children, e) for e in entities if e != root)
    assert meta["depth"] == [dist.get(v, -1) for v in range(len(symbols))]
    leaves = [v for v in range(len(symbols)) if not children[v]]
    heights = [min(_distances(children, v).get(leaf, len(symbols)) for leaf in leaves) for v in range(len(symbols))]
    assert meta["height"] == heights
    if cfg.style == "symbolic":
        assert list(record.steps) == [symbols[v] for v in path[1:]] and record.answer == symbols[target]
        assert record.question.endswith(f"[R] {symbols[root]}")
        assert {tuple(fact.split()) for fact in record.question.split(" [Q] ")[0].split(" | ")} == {
            (symbols[a], symbols[b]) for a, b in edges
        }
    else:
        assert record.steps[0] == f"{symbols[root]} is a {symbols[path[1]]}."
        assert list(record.steps[1:]) == [f"Every {symbols[a]} is a {symbols[b]}." for a, b in zip(path[1:], path[2:])]
        assert record.answer == f"{symbols[root]} is a {symbols[target]}."
        question = re.fullmatch(r"(.*) Is (\w+) a (\w+) or (\w+)\?", record.question)
        assert question and question.group(2) == symbols[root]
        assert {question.group(3), question.group(4)} == {symbols[target], symbols[neg]}
    check_graph_record(record)


# --- generated graphs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"style": "symbolic"},
        {"style": "sentences"},
        {"style": "symbolic", "target_choice": "uniform", "shuffle_nodes": False},
        {"style": "sentences", "n_nodes": 14, "min_path_len": 2, "max_path_len": 4, "parent_rate": 2.5},
    ],
)
def test_generated_problems_are_valid_over_many_seeds(options: dict) -> None:
    for seed in range(4):
        cfg = GraphConfig(**SMALL, seed=seed, **options)
        splits = make_graph_splits(cfg)
        assert splits.sizes() == {"train": 60, "valid": 10, "test": 10}
        for record in splits.train + splits.valid + splits.test:
            _assert_valid_problem(record, cfg)


def test_path_lengths_cover_the_configured_range() -> None:
    splits = make_graph_splits(GraphConfig(n_train=400, n_valid=0, n_test=0, seed=5))
    lengths = {len(r.steps) for r in splits.train}
    assert lengths == {3, 4, 5, 6}, "a ProsQA-sized sample should reach every allowed path length"


def test_splits_are_deterministic_and_seeded() -> None:
    cfg = GraphConfig(**SMALL, seed=3)
    first, again = make_graph_splits(cfg), make_graph_splits(cfg)
    assert first == again
    assert [r.meta for r in first.train] == [r.meta for r in again.train]
    assert make_graph_splits(dataclasses.replace(cfg, seed=4)).train != first.train
    one, same = make_graph_record(cfg, random.Random(11)), make_graph_record(cfg, random.Random(11))
    assert one == same and one.meta == same.meta


def test_both_styles_draw_the_same_graphs_from_one_seed() -> None:
    symbolic = make_graph_splits(GraphConfig(**SMALL, seed=2, style="symbolic"))
    sentences = make_graph_splits(GraphConfig(**SMALL, seed=2, style="sentences"))
    for a, b in zip(symbolic.train, sentences.train):
        assert {k: a.meta[k] for k in a.meta if k != "idx_to_symbol"} == {
            k: b.meta[k] for k in b.meta if k != "idx_to_symbol"
        }
        assert len(a.steps) == len(b.steps)


def test_no_problem_repeats_within_or_across_splits() -> None:
    # A small graph space makes repeats likely, so the dedup is actually exercised.
    cfg = GraphConfig(n_train=150, n_valid=25, n_test=25, seed=0, n_nodes=8, min_path_len=2, max_path_len=3,
                      shuffle_nodes=False)
    splits = make_graph_splits(cfg)
    records = splits.train + splits.valid + splits.test
    assert len({r.question for r in records}) == len(records)
    problems = {
        (frozenset(map(tuple, r.meta["edges"])), r.meta["root"], frozenset((r.meta["target"], r.meta["neg_target"])))
        for r in records
    }
    assert len(problems) == len(records), "the same problem must not come back with its facts reordered"


def test_a_config_that_cannot_yield_enough_problems_is_reported() -> None:
    tiny = GraphConfig(n_train=5000, n_valid=0, n_test=0, n_nodes=6, min_path_len=2, max_path_len=2,
                       shuffle_nodes=False)
    with pytest.raises(ValueError, match="in a row after \\d+ distinct problems.*ask for fewer records"):
        make_graph_splits(tiny)
    barren = GraphConfig(parent_rate=0.01)
    with pytest.raises(ValueError, match="drew 2000 graphs in a row without a new usable problem.*parent_rate=0.01"):
        make_graph_record(barren, random.Random(0))


@pytest.mark.parametrize("style", ["symbolic", "sentences"])
def test_vocabulary_covers_every_word(style: str) -> None:
    cfg = GraphConfig(**SMALL, seed=1, style=style)
    vocabulary = graph_vocabulary(cfg)
    assert len(vocabulary) == len(set(vocabulary))
    splits = make_graph_splits(cfg)
    used = {w for r in splits.train + splits.valid + splits.test for text in (r.question, *r.steps, r.answer)
            for w in text.split()}
    assert used <= set(vocabulary)
    assert ANSWER_MARKER not in vocabulary


def test_symbolic_records_tokenize_without_unknown_words() -> None:
    from latentlib.presets import build_tiny_tokenizer

    cfg = GraphConfig(n_train=20, n_valid=0, n_test=0, seed=0)
    tokenizer = build_tiny_tokenizer(graph_vocabulary(cfg))
    for record in make_graph_splits(cfg).train:
        text = f"{record.question} {' '.join(record.steps)} {ANSWER_MARKER} {record.answer}"
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids and len(ids) == len(text.split())


@pytest.mark.parametrize(("preset", "layers"), [("tiny-2l", 2), ("tiny", 4), ("tiny-6l", 6)])
def test_the_sweeps_from_scratch_depths_build_models_that_differ_only_in_depth(preset: str, layers: int) -> None:
    from latentlib.presets import build_tiny_model, build_tiny_tokenizer, get_preset

    tokenizer = build_tiny_tokenizer(graph_vocabulary(GraphConfig(n_nodes=12)))
    config = build_tiny_model(len(tokenizer), get_preset(preset)).config
    tiny = build_tiny_model(len(tokenizer), get_preset("tiny")).config
    assert config.num_hidden_layers == layers
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads) == (
        tiny.hidden_size, tiny.intermediate_size, tiny.num_attention_heads)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_train": -1}, "n_train must be >= 0, got -1"),
        ({"seed": 1.5}, "seed must be an int"),
        ({"n_nodes": 5}, "n_nodes must be >= 6, got 5.*two entities, a path of min_path_len=3"),
        ({"min_path_len": 0}, "min_path_len must be >= 1"),
        ({"min_path_len": 4, "max_path_len": 3}, "max_path_len=3 is below min_path_len=4"),
        ({"parent_rate": 0}, "parent_rate must be in \\(0, n_nodes=28\\], got 0"),
        ({"parent_rate": float("nan")}, "parent_rate must be a finite number"),
        ({"one_side_prob": 0.6}, "one_side_prob must be in \\[0, 0.5\\], got 0.6"),
        ({"depth_weight": -1}, "depth_weight must be >= 0"),
        ({"target_choice": "deepest"}, "target_choice='deepest' is not a rule: use one of farthest, uniform"),
        ({"style": "english"}, "style='english' is not a style: use one of symbolic, sentences"),
        ({"shuffle_nodes": 1}, "shuffle_nodes must be True or False"),
        ({"entity_names": ("Al",)}, "entity_names has 1 names but needs at least 2"),
        ({"entity_names": ("Al", "Bo Jo")}, "'Bo Jo': every name must be one word of letters only"),
        ({"entity_names": ("Al", "Al", "Cy")}, "lists \\['Al'\\] more than once"),
        ({"concept_names": ("wumpus", "is", *[f"z{'a' * i}pus" for i in range(30)])}, "'is', a word of the sentence"),
        ({"concept_names": ("wumpus", "yumpus"), "style": "sentences"}, "concept_names has 2 names but needs at least 26"),
        ({"entity_names": ("Al", "wumpus")}, "\\['wumpus'\\] are both entity and concept names"),
    ],
)
def test_bad_configs_are_rejected_with_the_fix(kwargs: dict, message: str) -> None:
    if "concept_names" not in kwargs and "wumpus" in str(kwargs):
        kwargs = {**kwargs, "concept_names": ("wumpus", *[f"z{'a' * i}pus" for i in range(30)])}
    with pytest.raises(ValueError, match=message):
        GraphConfig(**kwargs)


# --- the record check ------------------------------------------------------------------------


def _fixture_record() -> Record:
    # Record 0 of the ProsQA fixture: Ada -> glimpus -> trondus -> vexpus, Ben -> morpus -> quilpus,
    # and a dead end glimpus -> zarpus. Indices: Ada 0, Ben 1, glimpus 2, trondus 3, zarpus 4,
    # vexpus 5, morpus 6, quilpus 7.
    return load_coconut_json(FIXTURES / "prosqa_sample.json")[0]


def _with(record: Record, *, question: str | None = None, steps: tuple | None = None, **meta) -> Record:
    return dataclasses.replace(
        record,
        question=record.question if question is None else question,
        steps=record.steps if steps is None else steps,
        meta={**record.meta, **meta},
    )


def test_check_rejects_a_cycle() -> None:
    record = _fixture_record()
    bad = _with(record, edges=record.meta["edges"] + [[5, 2]],
                question=record.question.replace(" Is Ada", " Every vexpus is a glimpus. Is Ada"))
    cycle = "has a cycle glimpus \\(2\\) -> trondus \\(3\\) -> vexpus \\(5\\) -> glimpus \\(2\\)"
    with pytest.raises(RecordError, match=cycle):
        check_graph_record(bad, source="prosqa.json", index=0)


def test_check_names_a_graph_with_no_path_to_either_candidate() -> None:
    record = _fixture_record()
    edges = [e for e in record.meta["edges"] if e != [0, 2]]
    bad = _with(record, edges=edges, question=record.question.replace(" Ada is a glimpus.", ""))
    with pytest.raises(NoPathError, match="record 0 of prosqa.json is a graph with no path from the root 'Ada' to "
                                          "either candidate \\('vexpus', 'quilpus'\\)"):
        check_graph_record(bad, source="prosqa.json", index=0)


def test_check_rejects_two_reachable_candidates_and_swapped_labels() -> None:
    record = _fixture_record()
    both = _with(record, edges=record.meta["edges"] + [[4, 7]],
                 question=record.question.replace(" Is Ada", " Every zarpus is a quilpus. Is Ada"))
    with pytest.raises(RecordError, match="reach both candidates: exactly one must be reachable"):
        check_graph_record(both)
    swapped = _with(record, target=7, neg_target=5)
    with pytest.raises(RecordError, match="reach neg_target 'vexpus' but not target 'quilpus'.*swapped"):
        check_graph_record(swapped)


def test_check_rejects_a_gold_path_that_is_not_a_shortest_path_or_not_along_edges() -> None:
    record = _fixture_record()
    shortcut = _with(record, edges=record.meta["edges"] + [[0, 3]],
                     question=record.question.replace(" Is Ada", " Ada is a trondus. Is Ada"))
    with pytest.raises(RecordError, match="gold path of 3 edges but the target is 2 edges from the root.*shortest"):
        check_graph_record(shortcut)
    jump = _with(record, steps=("Ada is a glimpus.", "Every glimpus is a vexpus."))
    with pytest.raises(RecordError, match="stepping 'glimpus' -> 'vexpus', which is not an edge"):
        check_graph_record(jump)
    detour = _with(record, steps=("Ada is a glimpus.", "Every trondus is a vexpus."))
    with pytest.raises(RecordError, match="does not start from 'glimpus'"):
        check_graph_record(detour)
    short = _with(record, steps=record.steps[:2])
    with pytest.raises(RecordError, match="ending at 'trondus', not at the target 'vexpus'"):
        check_graph_record(short)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"meta": {"root": None}}, "root None: it must be a node index in 0..7"),
        ({"meta": {"neg_target": 5}}, "target == neg_target == 5"),
        ({"meta": {"edges": [[0, 2, 1]]}}, "edge 0 = \\[0, 2, 1\\]: each edge must be a \\[parent, child\\] pair"),
        ({"meta": {"idx_to_symbol": ["Ada"] * 8}}, "names nodes \\['Ada'\\] twice"),
        ({"meta": {"path": [0, 2, 4]}}, "meta path \\[0, 2, 4\\] but its steps walk \\[0, 2, 3, 5\\]"),
        ({"meta": {"depth": [0] * 8}}, "meta depth .* expected \\[0, -1, 1, 2, 2, 3, -1, -1\\]"),
        ({"answer": "Ada is a quilpus."}, "answer 'Ada is a quilpus.', which does not name the target 'vexpus'"),
        ({"question": "Is Ada a vexpus or quilpus?"}, "states other facts in its question than meta\\['edges'\\]"),
        ({"question": "Does Ada like vexpus?"}, "question in neither graph rendering"),
        ({"steps": ("Ada is a blorpus.",)}, "step 0 'Ada is a blorpus.', which names no node"),
    ],
)
def test_check_rejects_inconsistent_records(change: dict, message: str) -> None:
    record = _fixture_record()
    bad = dataclasses.replace(record, **{k: v for k, v in change.items() if k != "meta"},
                              meta={**record.meta, **change.get("meta", {})})
    with pytest.raises(RecordError, match=message):
        check_graph_record(bad)


def test_check_requires_the_coconut_graph_fields() -> None:
    record = Record("q", ("s",), "a", meta={"edges": []})
    with pytest.raises(RecordError, match="no graph field\\(s\\) idx_to_symbol, root, target, neg_target"):
        check_graph_record(record)


# --- Coconut's files: same fields as generated records ---------------------------------------


def test_prosqa_fixture_has_the_generator_fields() -> None:
    loaded = load_coconut_json(FIXTURES / "prosqa_sample.json")
    generated = make_graph_record(GraphConfig(style="sentences"), random.Random(0))
    assert set(generated.meta) == set(COCONUT_GRAPH_FIELDS) | set(PROBE_FIELDS)
    for index, record in enumerate(loaded):
        assert set(record.meta) == set(COCONUT_GRAPH_FIELDS)
        check_graph_record(record, source="prosqa_sample.json", index=index)
        annotated = annotate_graph_record(record)
        assert set(annotated.meta) == set(generated.meta)
        check_graph_record(annotated)  # the added fields agree with a second check
        assert annotated == record  # annotation only adds meta
    assert annotate_graph_record(loaded[1]).meta["path"] == [0, 2, 5, 7]  # one of its two shortest paths: the steps'
    assert annotate_graph_record(loaded[2]).meta["depth"] == [-1, 0, 1, -1, 2, 3, 4]


def test_prontoqa_fixture_loads_as_coconut_writes_it() -> None:
    records = load_coconut_json(FIXTURES / "prontoqa_sample.json")
    assert [r.answer for r in records] == ["True", "False", "True"]
    for record in records:
        assert record.meta == {}  # ProntoQA files carry no graph fields
        assert re.search(r"True or false: \w+ is (not )?\w+\.$", record.question)
        assert all(step.endswith(".") for step in record.steps)
    assert records[1].steps[-1] == "Rue is not sour."
    assert records[0].steps[0] == "Fen is a grimpus. Every grimpus is a tolvet."
    with pytest.raises(RecordError, match="no graph field"):
        check_graph_record(records[0])


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


@pytest.mark.parametrize("style", ["symbolic", "sentences"])
def test_rendered_gold_chains_grade_as_correct(style: str) -> None:
    for record in make_graph_splits(GraphConfig(n_train=30, n_valid=0, n_test=0, seed=9, style=style)).train:
        text = f"{record.question}\n" + "\n".join(record.steps) + f"\n{ANSWER_MARKER} {record.answer}"
        assert grade(text, record.answer, mode="exact")
        wrong = record.meta["idx_to_symbol"][record.meta["neg_target"]]
        assert not grade(f"{ANSWER_MARKER} {wrong}", record.answer, mode="exact")


def test_the_sweep_figure_draws_the_control_where_a_point_has_it():
    """Sweep points without the CoT-trained-as-long control keep their other bars; the
    control gets its own bar where it was trained."""
    import matplotlib
    import pandas as pd

    matplotlib.use("Agg")
    from latentlib import plots

    table = pd.DataFrame({"model": ["tiny", "tiny"], "nodes": [12, 12], "paths": ["3-5", "3-5"],
                          "base_steps": [3000, 3000], "coconut_steps": [440, 3900], "CoT": [0.845, 0.845],
                          "no-CoT": [0.55, 0.55], "Coconut": [0.72, 0.905], "CoT trained as long": [None, 0.865],
                          "c": [1, 2], "uniform_prob": [0.3, 0.0], "lr": [1e-3, 3e-4]})
    fig = plots.graph_sweep(table)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["CoT", "CoT trained as long", "no-CoT", "Coconut", "chance"]
    heights = [round(b.get_height(), 1) for b in ax.patches]
    assert heights == [84.5, 84.5, 0.0, 86.5, 55.0, 55.0, 72.0, 90.5]
    assert "3000 + 3900 steps" in ax.get_xticklabels()[1].get_text()
    assert "c=2, uniform 0" in ax.get_xticklabels()[1].get_text()
    assert "c=1, uniform 0.3\nlr 0.001" in ax.get_xticklabels()[0].get_text()
    assert "lr 0.0003" in ax.get_xticklabels()[1].get_text()  # points differing only in the learning rate
    # neighbouring points' labels do not run into each other, nor the axis label past the figure
    three = pd.concat([table, table.iloc[[0]]], ignore_index=True)
    three.loc[2, ["base_steps", "coconut_steps"]] = [12000, 6400]
    fig = plots.graph_sweep(three)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in fig.axes[0].get_xticklabels()]
    assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:]))
    assert fig.axes[0].xaxis.label.get_window_extent(renderer).width <= fig.bbox.width


def test_the_gap_figure_draws_each_points_own_path_lengths_and_the_target():
    """Coconut - CoT by path length: a bar (with its interval) only for the lengths a point
    has, pale and hatched under 100 problems, and the target line."""
    import matplotlib
    import pandas as pd

    matplotlib.use("Agg")
    from latentlib import plots

    table = pd.DataFrame([
        {"point": "sweep-tiny-n12-p3-5-long", "subset": "all", "mean": 0.04, "ci95": 0.011, "n": 5000},
        {"point": "sweep-tiny-n12-p3-5-long", "subset": 3, "mean": 0.033, "ci95": 0.012, "n": 4193},
        {"point": "sweep-tiny-n12-p3-5-long", "subset": 5, "mean": 0.114, "ci95": 0.141, "n": 70},
        {"point": "sweep-tiny-2l-n12-p4-5", "subset": "all", "mean": -0.02, "ci95": 0.01, "n": 500},
        {"point": "sweep-tiny-2l-n12-p4-5", "subset": 5, "mean": 0.08, "ci95": 0.048, "n": 436}])
    ax = plots.graph_gaps(table).axes[0]
    bars = ax.patches
    assert sorted(round(b.get_height(), 1) for b in bars) == [-2.0, 3.3, 4.0, 8.0, 11.4]  # no bar for a missing length
    assert [b.get_hatch() for b in bars if round(b.get_height(), 1) == 11.4] == ["//"]  # 70 problems
    assert [b.get_hatch() for b in bars if round(b.get_height(), 1) == 8.0] == [None]
    assert 10.0 in [line.get_ydata()[0] for line in ax.get_lines()]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["tiny\n12 nodes, paths 3-5\nlong", "tiny-2l\n12 nodes, paths 4-5"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["all", "3-edge paths", "5-edge paths",
                                                                   "target (+10)"]


def test_a_sweep_point_reuses_the_parts_trained_alone(tmp_path, monkeypatch, capsys):
    """``graph_sweep point --only`` trains one part with the point's own configuration, so
    the whole point run afterwards reuses it instead of training it again."""
    from benchmarks import graph_sweep

    monkeypatch.setenv("LATENTLIB_RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(graph_sweep, "OUT", tmp_path / "results")
    args = ["point", "--nodes", "8", "--min-path", "2", "--max-path", "3", "--n-train", "40", "--n-test", "6",
            "--base-steps", "4", "--batch-size", "8", "--steps-per-stage", "2", "--final-stage-steps", "2",
            "--threads", "1", "--cot-control"]
    for part in ("control", "coconut"):  # both start from the CoT base
        with pytest.raises(SystemExit, match=f"the {part} run starts from the CoT base.*--only cot first"):
            graph_sweep.main([*args, "--only", part])
    graph_sweep.main([*args, "--only", "nocot"])
    part = capsys.readouterr().out
    assert "base/nocot: training" in part and "base/cot" not in part
    graph_sweep.main(["status"])
    assert "sweep-tiny-n8-p2-3\n  CoT: not started\n  no-CoT: complete, 0 min of training\n" in capsys.readouterr().out
    assert not (tmp_path / "results").exists()  # a part writes no result
    graph_sweep.main([*args, "--only", "cot"])
    graph_sweep.main([*args, "--only", "control"])
    graph_sweep.main([*args, "--only", "coconut"])
    part = capsys.readouterr().out
    assert "curriculum/coconut_plain: training" in part and "coconut done in" in part
    graph_sweep.main(args)
    whole = capsys.readouterr().out
    for label in ("base/cot", "base/nocot", "curriculum/cot_as_long", "curriculum/coconut_plain"):
        assert f"{label}: reused" in whole
    result = json.loads((tmp_path / "results" / "sweep-tiny-n8-p2-3.json").read_text())
    assert [r["method"] for r in result["rows"]] == ["CoT", "no-CoT", "Coconut", graph_sweep.COT_AS_LONG]
    assert result["rows"][2]["latent_steps"] == 3.0  # one thought per step, padded to the 3 stages
    # the training times are the artifacts' own, also for the parts this call only reused
    trained = result["seconds"]["trained"]
    runs = tmp_path / "runs" / "sweep-tiny-n8-p2-3"
    recorded = {m: json.loads((runs / stage / part / "COMPLETE").read_text())["seconds"]
                for m, (stage, part) in graph_sweep.PARTS.items()}
    assert trained == recorded and all(v > 0 for v in trained.values())
    assert graph_sweep.training_minutes(result).count(" / ") == 3
    assert graph_sweep.training_minutes({"seconds": {"base": 1.0, "total": 2.0}}) == "not recorded"
    # two thoughts per step and no stage mixing: Coconut is trained again; the bases and the control
    # (which writes every step, so neither changes it) are reused
    graph_sweep.main([*args, "--c-thought", "2", "--uniform-prob", "0"])
    again = capsys.readouterr().out
    for label in ("base/cot", "base/nocot", "curriculum/cot_as_long"):
        assert f"{label}: reused" in again
    assert "curriculum/coconut_plain: retrained, its configuration or an input changed" in again
    result = json.loads((tmp_path / "results" / "sweep-tiny-n8-p2-3.json").read_text())
    assert result["rows"][2]["latent_steps"] == 6.0 and result["budget"]["c_thought"] == 2
    # how often a part checkpoints is not part of its key: every part is reused
    graph_sweep.main([*args, "--c-thought", "2", "--uniform-prob", "0", "--checkpoint-every", "1"])
    out = capsys.readouterr().out
    assert all(f"{label}: reused" in out
               for label in ("base/cot", "base/nocot", "curriculum/coconut_plain", "curriculum/cot_as_long"))
    table = graph_sweep.sweep_table([result])
    assert (table.c.tolist(), table.uniform_prob.tolist(), table.lr.tolist()) == ([2], [0.0], [1e-3])

    # heldout: the same models on problems of the point's size that no split of it holds
    with pytest.raises(SystemExit, match="run `point` with the same arguments first"):
        graph_sweep.main(["heldout", *args[1:-1], "--extra", "7"])  # the budget of the first run, since replaced
    graph_sweep.main(["heldout", *args[1:-1], "--c-thought", "2", "--uniform-prob", "0", "--extra", "7"])
    held = json.loads((tmp_path / "results" / "heldout" / "sweep-tiny-n8-p2-3.json").read_text())
    assert held["n"] == 7 and [r["method"] for r in held["rows"]] == ["CoT", "no-CoT", "Coconut",
                                                                      graph_sweep.COT_AS_LONG]
    assert all(0 <= r["accuracy"] <= 1 for r in held["rows"]) and "Coconut - CoT" in held["paired"]
    # and on the point's training problems (all 40 of them: --train-check is clamped to the split)
    assert all(r["train_n"] == 40 and 0 <= r["train_accuracy"] <= 1 for r in held["rows"])
    memorised = graph_sweep.heldout_table(graph_sweep.load_heldouts())[graph_sweep.MEMORISED].iloc[0]
    assert memorised == " / ".join(f"{100 * (r['train_accuracy'] - r['accuracy']):+.1f}" for r in held["rows"])
    with pytest.raises(SystemExit):
        graph_sweep.main(["heldout", *args[1:-1], "--extra", "7", "--train-check", "-1"])
    for r in held["rows"]:  # the split by path length covers every fresh problem once and averages to the whole
        parts = r["by_path_length"].values()
        assert {k: v["n"] for k, v in r["by_path_length"].items()} == held["path_lengths"]
        assert sum(v["accuracy"] * v["n"] for v in parts) == pytest.approx(r["accuracy"] * held["n"])
    by_length = held["paired_by_path_length"]["Coconut - CoT"]
    assert sum(v["mean"] * v["n"] for v in by_length.values()) == pytest.approx(held["paired"]["Coconut - CoT"]["mean"] * 7)
    assert "by path length" in graph_sweep.heldout_table(graph_sweep.load_heldouts()).columns[-1]
    gaps = graph_sweep.heldout_gaps(graph_sweep.load_heldouts())
    assert gaps.subset.tolist() == ["all", *held["path_lengths"]]
    assert gaps.n.tolist() == [7, *held["path_lengths"].values()]
    from latentlib.stages.base import task_of
    from latentlib.tasks import TaskConfig

    task = TaskConfig(name="graph", n_train=40, n_test=6, graph_nodes=8, graph_min_path=2, graph_max_path=3)
    fresh = graph_sweep.fresh_problems("tiny", task, 7)
    _, own = task_of("tiny", task)
    seen = {r.question for r in (*own.splits.train, *own.splits.valid, *own.splits.test)}
    assert len(fresh) == 7 and not seen & {r.question for r in fresh}
    assert all(2 <= len(r.steps) <= 3 for r in fresh)  # problems of the point's size


def test_sweep_table_and_heldouts_follow_size_then_budget(tmp_path, monkeypatch):
    """The longer run of a point (its tag extends the shorter one's name, so its file sorts
    first) comes after the shorter one in the table and in the heldout rows and gap figure."""
    from benchmarks import graph_sweep

    monkeypatch.setattr(graph_sweep, "OUT", tmp_path)
    (tmp_path / "heldout").mkdir()

    def point(name, final_stage_steps):
        rows = [{"method": m, "accuracy": a, "accuracy_cue_not_right": a} for m, a in
                (("CoT", 0.9), ("no-CoT", 0.6), ("Coconut", 0.95))]
        return {"point": name, "model": "tiny", "nodes": 12, "min_path": 3, "max_path": 5, "n_test": 200,
                "n_train": 20000, "mean_question_words": 40.0, "rows": rows, "seconds": {"base": 0.0, "total": 0.0},
                "budget": {"base_steps": 3000, "steps_per_stage": 600, "final_stage_steps": final_stage_steps,
                           "c_thought": 1, "uniform_prob": 0.3, "lr": 3e-3}}

    short, longer = point("sweep-tiny-n12-p3-5-lr", 1500), point("sweep-tiny-n12-p3-5-lr-f4000", 4000)
    for p in (short, longer):
        (tmp_path / f"{p['point']}.json").write_text(json.dumps(p))
        (tmp_path / "heldout" / f"{p['point']}.json").write_text(json.dumps({"point": p["point"]}))
    points = graph_sweep.load_points()
    assert [p["point"] for p in points] == [longer["point"], short["point"]]  # the file names' order
    assert graph_sweep.sweep_table(points).coconut_steps.tolist() == [3900, 6400]
    assert graph_sweep.sweep_table(points).n_train.tolist() == [20000, 20000]  # the figure's labels show it
    assert [h["point"] for h in graph_sweep.load_heldouts(points)] == [short["point"], longer["point"]]


def test_the_sweep_status_reads_where_an_interrupted_part_stands(tmp_path):
    """A part still training is described by its newest checkpoint: the step and the loss, for
    a curriculum its stage, and the training time so far (a curriculum's stages checkpoint
    separately: their times add up). A checkpoint of an older configuration is not the run."""
    from benchmarks import graph_sweep

    def checkpoint(directory, step, seconds, loss, written):
        directory.mkdir(parents=True)
        (directory / "progress.json").write_text(json.dumps(
            {"step": step, "seconds": seconds, "running": {}, "history": [{"step": step, "loss": loss}]}))
        os.utime(directory / "progress.json", (written, written))

    run = tmp_path / "sweep-x"
    checkpoint(run / "base" / ".cot-0123.ckpt" / "checkpoint", 400, 600.0, 0.7251, 1000)
    checkpoint(run / "curriculum" / ".coconut_plain-89ab.ckpt" / "stage4" / "checkpoint", 100, 60.0, 0.9, 1000)  # stale
    checkpoint(run / "curriculum" / ".coconut_plain-4567.ckpt" / "stage1" / "checkpoint", 600, 500.0, 0.5, 2000)
    checkpoint(run / "curriculum" / ".coconut_plain-4567.ckpt" / "stage2" / "checkpoint", 200, 660.0, 0.25, 3000)
    assert graph_sweep.part_status(run, "base", "cot") == "step 400 checkpointed, 10 min of training so far, loss 0.725"
    assert graph_sweep.part_status(run, "curriculum", "coconut_plain") == (
        "step 200 of curriculum stage 2 checkpointed, 19 min of training so far, loss 0.250")
    assert graph_sweep.part_status(run, "base", "nocot") == "not started"


def test_a_sweep_point_can_start_coconut_from_an_early_cot_base(tmp_path, monkeypatch, capsys):
    """``--early-base-steps N``: Coconut's curriculum starts from a CoT base of its own trained N
    steps (in the run ``<point>-coconut``), while the point's CoT row is its fully trained base."""
    import matplotlib.pyplot as plt

    from benchmarks import graph_sweep
    from latentlib import plots

    monkeypatch.setenv("LATENTLIB_RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(graph_sweep, "OUT", tmp_path / "results")
    args = ["point", "--nodes", "8", "--min-path", "2", "--max-path", "3", "--n-train", "40", "--n-test", "6",
            "--base-steps", "6", "--batch-size", "8", "--steps-per-stage", "2", "--final-stage-steps", "2",
            "--threads", "1", "--early-base-steps", "2"]
    for bad in ("-1", "6"):  # an early base as long as the point's is not early
        with pytest.raises(SystemExit):
            graph_sweep.main([*args[:-1], bad])
        assert "give fewer steps than --base-steps (6)" in capsys.readouterr().err
    graph_sweep.main([*args, "--only", "coconut"])  # needs no point's CoT base: it trains its own first
    out = capsys.readouterr().out
    assert "base/cot: training" in out and "curriculum/coconut_plain: training" in out
    runs = tmp_path / "runs"
    early = json.loads((runs / "sweep-tiny-n8-p2-3-early2-coconut" / "base" / "cot" / "COMPLETE").read_text())
    assert early["history"][-1]["step"] == 2
    graph_sweep.main(["status"])
    status = capsys.readouterr().out
    assert "sweep-tiny-n8-p2-3-early2-coconut (Coconut of sweep-tiny-n8-p2-3-early2)" in status
    assert "Coconut: complete" in status
    graph_sweep.main(args)
    whole = capsys.readouterr().out
    assert "curriculum/coconut_plain: reused" in whole and "base/nocot: training" in whole
    assert not (runs / "sweep-tiny-n8-p2-3-early2" / "curriculum").exists()  # Coconut is in its own run only
    full = json.loads((runs / "sweep-tiny-n8-p2-3-early2" / "base" / "cot" / "COMPLETE").read_text())
    assert full["history"][-1]["step"] == 6
    result = json.loads((tmp_path / "results" / "sweep-tiny-n8-p2-3-early2.json").read_text())
    assert result["budget"]["early_base_steps"] == 2 and result["early_base"]["steps"] == 2
    assert 0 <= result["early_base"]["accuracy"] <= 1
    assert result["seconds"]["trained"][graph_sweep.EARLY_BASE] == early["seconds"] > 0
    assert graph_sweep.training_minutes(result).split(" / ")[2] == (
        f"{early['seconds'] / 60:.0f} + {result['seconds']['trained']['Coconut'] / 60:.0f}")
    table = graph_sweep.sweep_table([result])
    assert (table.base_steps.tolist(), table.coconut_base_steps.tolist()) == ([6], [2])
    labels = [t.get_text() for t in plots.graph_sweep(table).axes[0].get_xticklabels()]
    assert "\nCoconut from a\n2-step CoT\n" in labels[0]
    graph_sweep.main(["heldout", *args[1:], "--extra", "5"])
    held = json.loads((tmp_path / "results" / "heldout" / "sweep-tiny-n8-p2-3-early2.json").read_text())
    assert [r["method"] for r in held["rows"]] == ["CoT", "no-CoT", "Coconut"]
    plt.close("all")
