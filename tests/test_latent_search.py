"""Notebook 06's analyses on hand-made graphs: the class of what a model writes after k
thoughts, the node groups at thought k, node values and inner products, the shortcut cue;
and the shape of Table 1 across tasks."""

import pandas as pd
import pytest
import torch

from latentlib.probes import (NODE_GROUPS, OUTPUT_CLASSES, classify_output, cue_accuracy, cue_candidate,
                              frontier_values, group_inner_products, node_groups, output_class_table, root_depths,
                              target_distances, thought_nodes, value_by_height, written_edges)
from latentlib.stages.coconut import TABLE1_ROWS, table1_across_tasks
from latentlib.tasks import Record

#   root n0 -> n2 -> n4 -> n6 (the answer, 3 edges)      n0 -> n3 -> n5 -> n7 (a dead end)
#   n2 -> n9 -> n10 -> n6 (a longer way)                  n1 -> n8 (the other entity and its leaf, the distractor)
EDGES = [[0, 2], [0, 3], [2, 4], [3, 5], [4, 6], [5, 7], [1, 8], [2, 9], [9, 10], [10, 6]]
META = {"idx_to_symbol": [f"n{i}" for i in range(11)], "edges": EDGES, "root": 0, "target": 6, "neg_target": 8,
        "path": [0, 2, 4, 6], "height": [2, 1, 1, 2, 1, 1, 0, 0, 0, 2, 1]}


@pytest.mark.parametrize("k, written, expected", [
    (0, "n2 n4 n6 #### n6", "correct path"),
    (0, "n2 n4 #### n6", "correct path"),  # the answer closes the walk: n4 -> n6 is an edge
    (0, "n2 n9 n10 n6 #### n6", "longer path"),
    (0, "n3 n5 n7 #### n7", "wrong target"),
    (0, "n2 n5 n6 #### n6", "hallucination"),  # n2 -> n5 is no edge
    (0, "n2 n4 n6 #### n7", "hallucination"),  # the answer does not follow from the path
    (0, "n2 nX n6 #### n6", "hallucination"),  # not a node
    (0, "n4 n6 #### n6", "hallucination"),  # n4 is two edges from the root: no thought walked the first
    (1, "n4 n6 #### n6", "correct path"),  # the thought walked n0 -> n2
    (1, "n2 n4 n6 #### n6", "longer path"),  # starts behind where the thought got
    (1, "n6 #### n6", "hallucination"),  # three edges away after one thought and one step
    (3, "#### n6", "correct label"),
    (3, "#### n8", "incorrect label"),
    (5, "n6 #### n6", "correct path"),  # more thoughts than the path: naming the answer is a shortest path
])
def test_output_classes_of_symbolic_outputs(k, written, expected):
    assert classify_output(META, k, written) == expected


def test_output_classes_of_sentences():
    meta = {**META, "idx_to_symbol": ["Alex", "Ben", "lempus", "zumpus", "rorpus", "wumpus", "yumpus", "sterpus",
                                      "gorpus", "numpus", "tumpus"]}
    assert classify_output(meta, 0, "Alex is a lempus. Every lempus is a rorpus. Every rorpus is a yumpus. "
                                    "#### Alex is a yumpus.") == "correct path"
    assert classify_output(meta, 1, "Every lempus is a rorpus. Every rorpus is a yumpus. #### Alex is a yumpus.") \
        == "correct path"
    assert classify_output(meta, 0, "Alex is a lempus. Every zumpus is a wumpus. #### Alex is a yumpus.") \
        == "hallucination"  # the second sentence does not go on from lempus
    assert classify_output(meta, 0, "Alex is a zumpus. Every zumpus is a wumpus. Every wumpus is a sterpus. "
                                    "#### Alex is a sterpus.") == "wrong target"
    edges, answer = written_edges("Every lempus is a rorpus. #### Alex is a yumpus.", meta["idx_to_symbol"])
    assert edges == [(2, 4)] and answer == 6


def test_output_class_table_shares_sum_to_one():
    frame = pd.DataFrame({"k": [0, 0, 1, 1], "output_class": ["correct path", "hallucination", "correct label",
                                                               "correct label"], "correct": [1, 0, 1, 1]})
    table = output_class_table(frame).set_index("k")
    assert list(table.columns[:len(OUTPUT_CLASSES)]) == list(OUTPUT_CLASSES)
    assert table.loc[0, "correct path"] == 0.5 and table.loc[0, "hallucination"] == 0.5
    assert table.loc[1, "correct label"] == 1.0 and table.loc[1, "accuracy"] == 1.0
    assert (table[list(OUTPUT_CLASSES)].sum(axis=1) == 1).all()


def test_depths_distances_and_groups_at_each_thought():
    assert root_depths({k: v for k, v in META.items() if k != "depth"}) == [0, -1, 1, 1, 2, 2, 3, 3, -1, 2, 3]
    assert target_distances(META) == [3, -1, 2, -1, 1, -1, 0, -1, -1, 2, 1]
    at1 = node_groups(META, 1)
    assert at1[0] == "reached" and at1[2] == "optimal" and at1[3] == "frontier"  # n3 leads to a dead end
    assert at1[1] == at1[8] == "unreachable" and at1[4] == "unreachable"  # the other entity; two edges away
    at2 = node_groups(META, 2)
    assert [at2[v] for v in (0, 2, 3)] == ["reached"] * 3
    assert at2[4] == "optimal" and at2[5] == at2[9] == "frontier"  # n9 is 2 edges away but its way is longer
    assert set(node_groups(META, 0)) == {"optimal", "unreachable"} and node_groups(META, 0)[0] == "optimal"
    with pytest.raises(ValueError, match="k=-1"):
        node_groups(META, -1)


def _one_hot_model(symbols):
    """A tiny model whose embeddings are one-hot: a thought k * e_v decodes to node v."""
    from latentlib.presets import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer(list(symbols))
    model = build_tiny_model(len(tok))
    with torch.no_grad():
        w = model.get_input_embeddings().weight
        w.zero_()
        w[torch.arange(len(tok)), torch.arange(len(tok))] = 1.0  # tied: the LM head reads the same rows
    return model, tok


def test_node_values_and_inner_products_read_the_thoughts():
    record = Record("q", ("n2", "n4", "n6"), "n6", meta=META)
    model, tok = _one_hot_model(META["idx_to_symbol"])
    ids = tok.convert_tokens_to_ids(["n2", "n4"])
    emb = model.get_input_embeddings().weight
    # thought 1 puts 3/4 of its weight on n2, 1/4 on n3; thought 2 on n4 alone
    t1 = 12 * emb[ids[0]] + 12 * emb[tok.convert_tokens_to_ids("n3")] - 1.1 * emb[tok.convert_tokens_to_ids("n3")]
    thoughts = torch.stack([t1, 20 * emb[ids[1]]])[None]  # (1, K=2, D)
    nodes = thought_nodes(model, tok, [record], thoughts)
    assert len(nodes) == 2 * 11 and set(nodes.group) <= set(NODE_GROUPS)
    one = nodes[nodes.thought == 1].set_index("symbol")
    assert one.value["n2"] > one.value["n3"] > 0.2 and one.value["n2"] + one.value["n3"] > 0.99
    assert one.inner["n2"] == pytest.approx(12.0) and one.inner["n7"] == pytest.approx(0.0)
    assert one.group["n2"] == "optimal" and bool(one.on_path["n2"]) and one.height["n3"] == 2
    spread = frontier_values(nodes, 1).iloc[0]
    assert spread.frontier == 2 and bool(spread.optimal_top1)
    assert spread.top1 == pytest.approx(one.value["n2"]) and spread.top2 == pytest.approx(one.value[["n2", "n3"]].sum())
    assert spread.top3 == spread.top2  # two frontier nodes: the third adds nothing
    two = frontier_values(nodes, 2).iloc[0]
    assert two.frontier == 3 and two.top1 > 0.99  # n4, n5, n9 at two edges; n4 takes it all
    heights = value_by_height(nodes, (1,))
    assert set(heights.columns) >= {"thought", "optimal", "height", "mean"}
    inner = group_inner_products(nodes).set_index(["thought", "group"])
    assert inner.mean_inner[(2, "optimal")] == pytest.approx(20.0)
    with pytest.raises(ValueError, match="2 problems of thoughts for 1 records"):
        thought_nodes(model, tok, [record], torch.cat([thoughts, thoughts]))


def test_the_cue_picks_the_deeper_candidate():
    deep = Record("q", ("n2", "n4", "n6"), "n6", meta=META)  # the answer 3 deep, the distractor 1
    assert cue_candidate(deep) == 6
    swapped = Record("q", (), "n8", meta={**META, "target": 8, "neg_target": 6})
    assert cue_candidate(swapped) == 6  # the cue picks the distractor here
    tie = Record("q", (), "n7", meta={**META, "target": 7, "neg_target": 6})  # both 3 deep
    assert cue_candidate(tie) is None
    acc = cue_accuracy([deep, swapped, tie], [True, False, True])
    assert (acc["n_cue_right"], acc["n_cue_wrong"], acc["n_cue_tie"], acc["n_cue_not_right"]) == (1, 1, 1, 2)
    assert acc["accuracy_cue_right"] == 1.0 and acc["accuracy_cue_wrong"] == 0.0 and acc["accuracy_cue_not_right"] == 0.5
    with pytest.raises(ValueError, match="2 grades for 3 records"):
        cue_accuracy([deep, swapped, tie], [True, False])


def test_table1_has_the_papers_rows_and_one_column_pair_per_task():
    assert TABLE1_ROWS == ("CoT", "no-CoT", "iCoT-style", "pause token", "Coconut", "w/o curriculum", "w/o thought",
                           "pause as thought")

    def table(offset):
        rows = [{"method": m, "format": "plain", "accuracy": offset + i / 100, "visible_tokens": float(i),
                 "latent_steps": 0.0} for i, m in enumerate(TABLE1_ROWS)]
        rows.append({"method": "Coconut", "format": "markers", "accuracy": 0.0, "visible_tokens": 9.0,
                     "latent_steps": 6.0})
        return pd.DataFrame(rows).sample(frac=1, random_state=0)  # in any order

    long, wide = table1_across_tasks({"chain": table(0.5), "graph": table(0.2)})
    assert list(wide.method) == list(TABLE1_ROWS)
    assert list(wide.columns) == ["method", "chain accuracy", "chain visible tokens", "graph accuracy",
                                  "graph visible tokens"]
    coconut = wide.set_index("method").loc["Coconut"]
    assert coconut["chain accuracy"] == pytest.approx(0.54) and coconut["graph accuracy"] == pytest.approx(0.24)
    assert len(long) == 2 * len(TABLE1_ROWS) and set(long.task) == {"chain", "graph"}  # the plain format's rows
