"""Mechanistic measurements on latent-reasoning models (the SWITCH card's three findings,
and the same questions for Coconut):

- where the boundary tokens sit in the next-token distribution (:func:`token_ranks`);
- whether an upcoming boundary is linearly decodable from hidden states
  (:func:`linear_probe`, a logistic regression trained with torch on a held-out split);
- what the injected states do: ablations that zero them, replace them by random vectors
  of the same norm, or shuffle them across the batch (:class:`AblatedInjector`);
- what each thought "says": the logit lens (:func:`logit_lens`) and, for the embedded
  task, which intermediate value thought k decodes to (:func:`lens_step_matrix`: a
  diagonal means thought k holds the k-th value);
- on a graph task, the latent search (Coconut's section 5, Zhu et al. 2025): the class
  of what a model writes after k thoughts (:func:`classify_output`), the value of each
  frontier node at thought k and its inner product with the node's embedding
  (:func:`thought_nodes`, with the node groups of :func:`node_groups`), and the
  generator's shortcut cue (:func:`cue_accuracy`).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from latentlib.batching import encode_record
from latentlib.evaluate import generate_batch
from latentlib.injection import Injector
from latentlib.tasks import ANSWER_MARKER, Format

__all__ = ["AblatedInjector", "ABLATIONS", "token_ranks", "position_table", "boundary_features", "linear_probe",
           "logit_lens", "lens_step_matrix", "latent_thoughts", "collect_traces", "position_tables", "rank_table",
           "probe_table", "exit_table", "stack_thoughts", "lens_table", "lens_examples", "summary_table",
           "card_comparison", "source_depths", "cue_candidate", "cue_accuracy", "OUTPUT_CLASSES", "NODE_GROUPS",
           "root_depths", "target_distances", "node_groups", "written_edges", "classify_output", "output_class_table",
           "node_token_ids", "thought_nodes", "frontier_values", "value_by_height", "group_inner_products",
           "latent_search_summary", "node_examples"]

ABLATIONS = ("none", "zero", "random", "shuffle")


class AblatedInjector(Injector):
    """Wraps an injector and ablates what it injects.

    - ``zero``: the thought becomes the zero vector;
    - ``random``: a random direction with the same norm as the real thought (seeded);
    - ``shuffle``: each sequence gets another sequence's thought (a fixed derangement of
      the batch), so scale and distribution are real but the content is not its own.
    """

    def __init__(self, inner: Injector, mode: str, seed: int = 0):
        super().__init__()
        if mode not in ABLATIONS:
            raise ValueError(f"ablation {mode!r}: use one of {ABLATIONS}")
        self.inner, self.mode = inner, mode
        self.generator = torch.Generator().manual_seed(seed)
        self.spec = f"{inner.spec}|{mode}"

    def forward(self, hidden_states):
        x = self.inner(hidden_states)  # (B, D)
        if self.mode == "zero":
            return torch.zeros_like(x)
        if self.mode == "random":
            r = torch.randn(x.shape, generator=self.generator).to(x)
            return r * (x.norm(dim=-1, keepdim=True) / r.norm(dim=-1, keepdim=True).clamp_min(1e-6))
        if self.mode == "shuffle" and x.shape[0] > 1:
            return x.roll(1, dims=0)  # a derangement: no sequence keeps its own thought
        return x


@torch.no_grad()
def token_ranks(logits: torch.Tensor, token_id: int) -> torch.Tensor:
    """Rank (1 = most likely) of ``token_id`` in each next-token distribution ``(..., V)``."""
    target = logits[..., token_id : token_id + 1]
    return (logits > target).sum(-1) + 1


@torch.no_grad()
def collect_traces(model: nn.Module, tokenizer, records, spec, fmt: Format, *, capture_layers: tuple[int, ...] = (-1,),
                   temperature: float = 0.0, seed: int = 0, batch_size: int = 250, progress: bool = True) -> list:
    """Runs a method the way :func:`latentlib.evaluate.evaluate` does (``spec``: an
    :class:`~latentlib.evaluate.EvalSpec`) and keeps the :class:`~latentlib.recurrence.Trace`
    of every batch, with the hidden states of ``capture_layers``. ``temperature > 0``
    samples with one seed per problem (``seed`` + its index), so a problem's rollout does
    not depend on the batch it falls in."""
    model.eval()
    prompt_of = spec.prompt or (lambda r: encode_record(tokenizer, r, fmt).question)
    out = []
    for s in tqdm(range(0, len(records), batch_size), desc=f"traces {spec.name}", disable=not progress):
        chunk = list(records[s:s + batch_size])
        seeds = [seed + s + i for i in range(len(chunk))] if temperature > 0 else None
        trace, _ = generate_batch(model, tokenizer, chunk, spec, prompt_of, temperature=temperature, seeds=seeds,
                                  capture_layers=capture_layers)
        out.append(trace)
    return out


@torch.no_grad()
def position_table(model: nn.Module, trace, tokens: dict[str, int], *, chunk: int = 64):
    """One row per generated position ``j`` of a :class:`~latentlib.recurrence.Trace`
    captured with ``capture_layers`` containing ``-1`` (the final, normed hidden state).

    Columns: ``seq``, ``pos``, ``token``, ``latent``, ``block_step`` (1, 2, ... for the
    latent steps of a block, 0 at text), ``after_block_step`` (``block_step`` of the
    previous position) and, per named token, ``p_<name>`` and ``rank_<name>``: its
    probability and rank (1 = most likely) in the distribution position ``j`` was decoded
    from (temperature 1). At a latent position that distribution is the one the policy
    read to decide to stay latent; after the ``i``-th latent step it is the row whose
    ``after_block_step`` is ``i``.
    """
    if -1 not in trace.hidden or -1 not in trace.prompt_hidden:
        raise ValueError("the trace has no final hidden states: generate with capture_layers=(-1, ...)")
    head = model.get_output_embeddings()
    B, S = trace.tokens.shape
    before = torch.cat([trace.prompt_hidden[-1][:, None], trace.hidden[-1][:, :S - 1]], dim=1)  # (B, S, D)
    cols: dict[str, list] = {f"{p}_{n}": [] for n in tokens for p in ("p", "rank")}
    for s in range(0, B, chunk):
        logits = head(before[s:s + chunk].to(head.weight.dtype)).float()  # (b, S, V)
        probs = logits.softmax(-1)
        for n, tid in tokens.items():
            cols[f"p_{n}"].append(probs[..., tid])
            cols[f"rank_{n}"].append(token_ranks(logits, tid))
    lat = trace.is_latent
    block_step = torch.zeros(B, S, dtype=torch.long)
    for j in range(S):
        block_step[:, j] = torch.where(lat[:, j], (block_step[:, j - 1] if j else 0) + 1, 0)
    after = torch.cat([torch.zeros(B, 1, dtype=torch.long), block_step[:, :-1]], dim=1)
    keep = trace.valid
    seq = torch.arange(B)[:, None].expand(B, S)
    pos = torch.arange(S)[None].expand(B, S)
    data = {"seq": seq[keep], "pos": pos[keep], "token": trace.tokens[keep], "latent": lat[keep],
            "block_step": block_step[keep], "after_block_step": after[keep]}
    data.update({k: torch.cat(v)[keep] for k, v in cols.items()})
    return pd.DataFrame({k: v.numpy() for k, v in data.items()})


def position_tables(model: nn.Module, traces: list, tokens: dict[str, int], batch_size: int) -> pd.DataFrame:
    """:func:`position_table` of every batch trace of :func:`collect_traces` (made with
    ``batch_size``), with ``seq`` numbering the problems across batches."""
    return pd.concat([position_table(model, t, tokens).assign(seq=lambda d, o=i * batch_size: d.seq + o)
                      for i, t in enumerate(traces)], ignore_index=True)


def boundary_features(trace, layer: int, token_id: int, *, ahead: int = 1, seed: int = 0):
    """Hidden states of ``layer`` at text positions, labelled 1 where the token
    ``ahead`` positions later is ``token_id`` (an upcoming boundary), with as many
    negatives drawn at random from the other text positions: ``(features, labels)`` for
    :func:`linear_probe`, whose majority baseline is then about one half.

    The state at position ``j`` (after input ``j``) is the one that decodes ``j + 1``; the
    prompt's last state decodes position 0."""
    if layer not in trace.hidden or layer not in trace.prompt_hidden:
        raise ValueError(f"the trace has no layer {layer}: generate with capture_layers containing {layer}")
    if ahead < 1:
        raise ValueError(f"ahead={ahead}: the probe predicts a token at least one position ahead")
    B, S = trace.tokens.shape
    states = torch.cat([trace.prompt_hidden[layer][:, None], trace.hidden[layer][:, :S - 1]], dim=1)  # decodes j
    text = trace.valid & ~trace.is_latent
    target = text & (trace.tokens == token_id)  # position j holds the boundary
    # the state that decodes position j - ahead + 1 sees the boundary `ahead` positions later
    pos_label = torch.zeros_like(target)
    pos_label[:, : S - ahead + 1] = target[:, ahead - 1:]
    candidates = text.clone()
    candidates[:, : S - ahead + 1] &= text[:, ahead - 1:]  # the state's own position is a text position too
    pos = pos_label & candidates
    neg = candidates & ~pos
    g = torch.Generator().manual_seed(seed)
    neg_idx = neg.nonzero()
    pick = neg_idx[torch.randperm(len(neg_idx), generator=g)[: int(pos.sum())]]
    pos_idx = pos.nonzero()
    idx = torch.cat([pos_idx, pick])
    labels = torch.cat([torch.ones(len(pos_idx), dtype=torch.long), torch.zeros(len(pick), dtype=torch.long)])
    return states[idx[:, 0], idx[:, 1]].float(), labels


def linear_probe(features: torch.Tensor, labels: torch.Tensor, *, test_fraction: float = 0.3, seed: int = 0,
                 steps: int = 300, weight_decay: float = 1e-3) -> dict:
    """Logistic regression from ``features (N, D)`` to binary ``labels (N,)``; returns the
    held-out accuracy and the majority-class baseline on the same split."""
    if features.shape[0] != labels.shape[0] or features.shape[0] < 10:
        raise ValueError(f"{features.shape[0]} examples for {labels.shape[0]} labels: need matching counts, >= 10")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(features.shape[0], generator=g)
    n_test = max(1, int(test_fraction * len(perm)))
    test, train = perm[:n_test], perm[n_test:]
    x = features.float()
    mu, sd = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
    x = (x - mu) / sd
    y = labels.float()
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(x[train] @ w + b, y[train]).backward()
        opt.step()
    with torch.no_grad():
        pred = (x[test] @ w + b) > 0
        acc = (pred == y[test].bool()).float().mean().item()
    majority = max(y[test].mean().item(), 1 - y[test].mean().item())
    return {"accuracy": acc, "majority_baseline": majority, "n_train": len(train), "n_test": n_test}


@torch.no_grad()
def logit_lens(model: nn.Module, vectors: torch.Tensor, *, top_k: int = 5, apply_norm: bool = False):
    """Top tokens each vector ``(N, D)`` decodes to through the LM head.

    Thoughts taken from ``hs[-1]`` are already after the final norm; vectors from other
    layers need ``apply_norm=True`` (the model's final norm first).
    """
    x = vectors
    if apply_norm:
        x = model.get_decoder().norm(x) if hasattr(model, "get_decoder") else x
    logits = model.get_output_embeddings()(x.to(model.get_output_embeddings().weight.dtype))
    probs = logits.float().softmax(-1)
    p, idx = probs.topk(top_k, dim=-1)
    return idx, p


def latent_thoughts(trace) -> list[torch.Tensor]:
    """Per sequence, the injected vectors of its latent steps in order: ``(K_b, D)``."""
    return [trace.thoughts[b][trace.valid[b] & trace.is_latent[b]] for b in range(trace.tokens.shape[0])]


@torch.no_grad()
def lens_step_matrix(model: nn.Module, tokenizer, thoughts: torch.Tensor, steps: list[list[str]]) -> torch.Tensor:
    """``(K, S)``: the fraction of problems whose thought ``i`` decodes (top-1) to the
    value of step ``j`` (problems shorter than ``j + 1`` steps count as misses). The
    diagonal says how often thought k holds the k-th value; a thought that runs one step
    ahead or behind shows up off the diagonal."""
    N, K, _ = thoughts.shape
    S = max(map(len, steps))
    idx, _ = logit_lens(model, thoughts.reshape(N * K, -1), top_k=1)
    words = tokenizer.convert_ids_to_tokens(idx[:, 0].tolist())
    hit = torch.tensor([[words[n * K + i] == steps[n][j] if j < len(steps[n]) else False for j in range(S)]
                        for n in range(N) for i in range(K)], dtype=torch.float).reshape(N, K, S)
    return hit.mean(0)


# ---------------------------------------------------------------------------- tables of notebook 05


def rank_table(text: pd.DataFrame, token_id: int, vocab: int, *, column: str = "swi") -> pd.DataFrame:
    """The rank of a token (``rank_<column>``) where it was written against every other text
    position: positions, median rank, share at rank <= 2, mean probability."""
    at = text.token == token_id

    def row(df, where):
        return {"where": where, "positions": len(df), "median_rank": df[f"rank_{column}"].median(),
                "rank_at_most_2": (df[f"rank_{column}"] <= 2).mean(), "mean_p_swi": df[f"p_{column}"].mean()}

    table = pd.DataFrame([row(text[at], "where <swi> was written"), row(text[~at], "every other text position")])
    table["vocabulary"] = vocab
    return table


def probe_table(traces: list, layers, token_id: int, *, aheads=(1, 2, 3), seed: int = 0,
                min_positives: int = 10) -> pd.DataFrame:
    """A :func:`linear_probe` per layer and distance ``ahead`` for an upcoming ``token_id``
    (positives: every boundary in ``traces``; as many random negatives), with its held-out
    accuracy and majority baseline; no probe where there are fewer than ``min_positives``
    boundaries to hold some out."""
    rows = []
    for layer in dict.fromkeys(layers):
        for ahead in aheads:
            parts = [boundary_features(t, layer, token_id, ahead=ahead, seed=seed + i) for i, t in enumerate(traces)]
            x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            row = {"layer": layer, "ahead": ahead, "examples": len(y)}
            if int(y.sum()) >= min_positives:
                res = linear_probe(x, y, seed=seed)
                row.update(held_out_accuracy=res["accuracy"], majority_baseline=res["majority_baseline"],
                           held_out=res["n_test"])
            rows.append(row)
    return pd.DataFrame(rows)


def exit_table(positions: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """p(</swi>) along latent blocks from a position table of greedy traces: the rows inside
    blocks with ``steps_taken`` (0: the distribution read right after ``<swi>``; s: after s
    latent steps), and per ``steps_taken`` the mean and median probability and how often
    ``</swi>`` ranks first."""
    steps = np.where(positions.after_block_step > 0, positions.after_block_step,
                     np.where(positions.block_step == 1, 0, -1))
    inside = positions.assign(steps_taken=steps)[steps >= 0]
    table = (inside.groupby("steps_taken")
             .agg(positions=("p_swi_end", "size"), mean_p_exit=("p_swi_end", "mean"),
                  median_p_exit=("p_swi_end", "median"), exit_ranked_first=("rank_swi_end", lambda r: (r == 1).mean()))
             .reset_index())
    return inside, table


def stack_thoughts(traces: list) -> torch.Tensor:
    """``(N, K, D)``: every problem's first K thoughts (K the fewest any problem took)."""
    per_problem = [th for t in traces for th in latent_thoughts(t)]
    K = min(len(th) for th in per_problem)
    return torch.stack([th[:K] for th in per_problem])


def lens_table(lens: dict[str, torch.Tensor]) -> pd.DataFrame:
    """Per model and thought k: how often it decodes to its own step k, and its best step."""
    return pd.DataFrame([{"model": name, "thought": k + 1,
                          "decodes_own_step": mat[k, k].item() if k < mat.shape[1] else float("nan"),
                          "best_step": int(mat[k].argmax()) + 1, "best_step_fraction": mat[k].max().item()}
                         for name, mat in lens.items() for k in range(mat.shape[0])])


def lens_examples(model: nn.Module, tokenizer, thoughts: torch.Tensor, records, n: int, *, top_k: int = 3):
    """For the first ``n`` problems, the ``top_k`` tokens each thought decodes to (with their
    probabilities), beside the values the chain actually writes; one column per problem."""
    examples = []
    for i in range(min(n, len(records))):
        idx, p = logit_lens(model, thoughts[i], top_k=top_k)
        words = [tokenizer.convert_ids_to_tokens(row.tolist()) for row in idx]
        examples.append({"question": records[i].question, "steps": " ".join(records[i].steps),
                         **{f"thought {k + 1}": ", ".join(f"{w} {q:.2f}" for w, q in zip(words[k], p[k].tolist()))
                            for k in range(len(words))}})
    return pd.DataFrame(examples).T


def summary_table(*, switch_name: str, boundary: pd.DataFrame, probe: pd.DataFrame, probe_layer: int,
                  exit: pd.DataFrame, ablation: pd.DataFrame, lens: dict[str, torch.Tensor]) -> pd.DataFrame:
    """The key number of each measurement (the report's front page)."""
    ab = ablation.set_index(["model", "ablation"]).diagnostic_accuracy
    first_exit = exit.set_index("steps_taken").mean_p_exit
    probe1 = probe[(probe.layer == probe_layer) & (probe.ahead == 1)]
    rows = [("<swi> median rank where written", switch_name, boundary.median_rank[0]),
            ("<swi> median rank elsewhere", switch_name, boundary.median_rank[1]),
            (f"probe accuracy, layer {probe_layer}, next token", switch_name,
             probe1.held_out_accuracy.iloc[0] if "held_out_accuracy" in probe1 else float("nan")),
            ("p(</swi>) after the first latent step", switch_name, first_exit.get(1, float("nan")))]
    for name in dict.fromkeys(ablation.model):
        for mode in ("zero", "random", "shuffle"):
            rows.append((f"accuracy change, {mode}", name, ab[(name, mode)] - ab[(name, "none")]))
    for name, mat in lens.items():
        k = min(mat.shape)
        rows.append(("thought k decodes step k (mean over k)", name, mat.diagonal()[:k].mean().item()))
    return pd.DataFrame(rows, columns=["measurement", "model", "value"])


def card_comparison(*, switch_name: str, boundary: pd.DataFrame, probe: pd.DataFrame, probe_layer: int,
                    exit: pd.DataFrame, ablation: pd.DataFrame, k_min: int) -> list[str]:
    """This run's numbers in the words of the SWITCH card's three findings."""
    diag = ablation[ablation.model == switch_name].set_index("ablation").diagnostic_accuracy
    lines = [
        f"<swi> where written: rank <= 2 in {boundary.rank_at_most_2[0]:.1%} of {boundary.positions[0]} "
        f"boundaries; elsewhere median rank {boundary.median_rank[1]:.0f} of {boundary.vocabulary[0]} tokens",
        f"linear probe, layer {probe_layer}, next token: {probe.held_out_accuracy.iloc[0]:.1%} held out "
        f"(majority baseline {probe.majority_baseline.iloc[0]:.1%})" if "held_out_accuracy" in probe else
        "linear probe: too few boundaries",
    ]
    if diag["none"] > 0:
        lines += [f"{mode} injected states: {1 - diag[mode] / diag['none']:.0%} of the diagnostic accuracy lost"
                  for mode in ("zero", "random", "shuffle")]
    after = exit.set_index("steps_taken")
    if 1 in after.index:
        lines.append(f"p(</swi>) after 1 latent step: mean {after.mean_p_exit[1]:.2f}, "
                     f"median {after.median_p_exit[1]:.2f} (K_min = {k_min})")
    return lines


# ---------------------------------------------------------------------------- graph search (notebook 06)


def _graph(meta: dict) -> tuple[list[list[int]], list[list[int]]]:
    """Children and parents of every node of a graph record's ``meta``."""
    n = len(meta["idx_to_symbol"])
    children: list[list[int]] = [[] for _ in range(n)]
    parents: list[list[int]] = [[] for _ in range(n)]
    for a, b in meta["edges"]:
        children[a].append(b)
        parents[b].append(a)
    return children, parents


def source_depths(meta: dict) -> list[int]:
    """Each node's shortest distance from a parentless node (an entity): the depth the
    generator's shortcut cue is about."""
    children, parents = _graph(meta)
    depth = [0 if not parents[v] else -1 for v in range(len(children))]
    queue = [v for v in range(len(children)) if depth[v] == 0]
    for v in queue:  # BFS from every source at once (the list grows as it is read)
        for c in children[v]:
            if depth[c] < 0:
                depth[c] = depth[v] + 1
                queue.append(c)
    return depth


def cue_candidate(record) -> int | None:
    """The candidate (node index) that the shortcut cue picks: the deeper of the two, by
    :func:`source_depths`; ``None`` when both are equally deep. The generator asks about
    the entity with the farther answer, so the answer is usually the deeper candidate, and
    a model can pick it without searching from the root."""
    meta = record.meta
    depth = source_depths(meta)
    t, n = meta["target"], meta["neg_target"]
    if depth[t] == depth[n]:
        return None
    return t if depth[t] > depth[n] else n


def cue_accuracy(records, correct) -> dict:
    """Accuracy where the cue points at the answer, where it points at the distractor, on
    ties, and on the last two together (``cue_not_right``), with the problem counts: a
    model that reads the cue instead of searching is right on the first, wrong on the
    second and right half the time on ties."""
    correct = [bool(c) for c in correct]
    if len(correct) != len(records):
        raise ValueError(f"{len(correct)} grades for {len(records)} records: grade every record")
    groups = {"cue_right": [], "cue_wrong": [], "cue_tie": []}
    for r, c in zip(records, correct):
        pick = cue_candidate(r)
        groups["cue_tie" if pick is None else "cue_right" if pick == r.meta["target"] else "cue_wrong"].append(c)
    groups["cue_not_right"] = groups["cue_wrong"] + groups["cue_tie"]
    out = {}
    for name, values in groups.items():
        out[f"accuracy_{name}"] = sum(values) / len(values) if values else float("nan")
        out[f"n_{name}"] = len(values)
    return out



OUTPUT_CLASSES = ("correct path", "longer path", "hallucination", "wrong target", "correct label", "incorrect label")
"""What a graph model writes after its thoughts (Coconut's Figure 3): a shortest path to the
answer, a longer but real one, one that uses an edge the graph does not have (or a node it
does not have), a real one that ends elsewhere than the answer; or, when it writes no path,
only a correct or an incorrect answer."""
NODE_GROUPS = ("reached", "frontier", "optimal", "unreachable")
"""Nodes at thought k (Zhu et al. 2025): ``reached`` within fewer than k edges of the root
(the root included); ``frontier`` exactly k edges away; ``optimal``, the frontier nodes on a
shortest path to the answer; ``unreachable``, not reachable in k edges (farther, or never)."""


def _bfs_distances(adjacency: list[list[int]], start: int) -> list[int]:
    """Shortest distances from ``start`` along ``adjacency`` (-1: not reached)."""
    dist = [-1] * len(adjacency)
    dist[start] = 0
    queue = [start]
    for v in queue:
        for u in adjacency[v]:
            if dist[u] < 0:
                dist[u] = dist[v] + 1
                queue.append(u)
    return dist


def root_depths(meta: dict) -> list[int]:
    """Each node's shortest distance from the root (-1: the root cannot reach it)."""
    if "depth" in meta:
        return list(meta["depth"])
    return _bfs_distances(_graph(meta)[0], meta["root"])


def target_distances(meta: dict) -> list[int]:
    """Each node's shortest distance to the answer (-1: it cannot reach it)."""
    return _bfs_distances(_graph(meta)[1], meta["target"])


def node_groups(meta: dict, k: int) -> list[str]:
    """Each node's group at thought ``k`` (:data:`NODE_GROUPS`)."""
    if k < 0:
        raise ValueError(f"thought k={k}: k counts thoughts, from 0")
    depth, to_target = root_depths(meta), target_distances(meta)
    length = depth[meta["target"]]
    groups = []
    for v, d in enumerate(depth):
        if 0 <= d < k:
            groups.append("reached")
        elif d == k:
            groups.append("optimal" if to_target[v] >= 0 and d + to_target[v] == length else "frontier")
        else:
            groups.append("unreachable")
    return groups


def _last_word(text: str) -> str:
    words = text.split()
    return words[-1].rstrip(".?") if words else ""


def written_edges(prediction: str, symbols) -> tuple[list[tuple[int | None, int | None]], int | None]:
    """The edges a graph model's output walks and the node it answers, as node indices
    (``None``: a word that names no node). Symbolic outputs (``n3 n5 n7 #### n7``) name one
    node per step, so the first edge starts from where the thoughts left off (``None``);
    sentences (``Every lempus is a zumpus.``) name both ends. A missing ``####`` is no answer."""
    index = {s: i for i, s in enumerate(symbols)}
    text, marker, after = prediction.partition(ANSWER_MARKER)
    answer = index.get(_last_word(after)) if marker else None
    edges: list[tuple[int | None, int | None]] = []
    if " is a " in f" {text} ":
        for sentence in re.findall(r"[^.]*\.", text):
            words = sentence.split()
            if len(words) >= 4 and words[-3:-1] == ["is", "a"]:
                edges.append((index.get(words[-4]), index.get(words[-1].rstrip("."))))
            else:
                edges.append((None, None))
    else:
        nodes = [index.get(w) for w in text.split()]
        edges = [(None if i == 0 else nodes[i - 1], v) for i, v in enumerate(nodes)]
    return edges, answer


def classify_output(meta: dict, k: int, prediction: str) -> str:
    """The class (:data:`OUTPUT_CLASSES`) of what a model wrote after ``k`` thoughts on a graph
    record (``meta``: its graph fields).

    The walk is the written edges, closed by the answer when the last written node is not
    the answer. It is a *hallucination* when an edge is not in the graph, a word is not a
    node, or it starts where ``k`` thoughts and one step cannot have reached (symbolic: its
    first node farther than ``k + 1`` edges from the root; sentences: its first subject
    farther than ``k``); a *wrong target* when it ends elsewhere than the answer; a
    *correct path* when every step goes one edge farther from the root on a shortest path
    and it starts no earlier than the thoughts had got (``k + 1``, at most the answer's
    depth); a *longer path* otherwise. No written step: *correct* or *incorrect label*."""
    symbols, target = meta["idx_to_symbol"], meta["target"]
    depth, length = root_depths(meta), root_depths(meta)[meta["target"]]
    edges, answer = written_edges(prediction, symbols)
    if not edges:
        return "correct label" if answer == target else "incorrect label"
    if answer is not None and edges[-1][1] is not None and answer != edges[-1][1]:
        edges.append((edges[-1][1], answer))
    graph = {(a, b) for a, b in meta["edges"]}
    (start, first) = edges[0]
    if first is None or any(b is None for _, b in edges):
        return "hallucination"
    if start is None:  # symbolic: the thoughts walked the first k edges
        if not 1 <= depth[first] <= k + 1:
            return "hallucination"
        nodes = [first]
    else:
        if not 0 <= depth[start] <= k or (start, first) not in graph:
            return "hallucination"
        nodes = [start, first]
    for a, b in edges[1:]:
        if a != nodes[-1] or (a, b) not in graph:
            return "hallucination"
        nodes.append(b)
    if nodes[-1] != target:
        return "wrong target"
    step_by_step = all(depth[b] == depth[a] + 1 for a, b in zip(nodes, nodes[1:]))
    begins = depth[nodes[0]] >= (min(k + 1, length) if start is None else min(k, length - 1))
    return "correct path" if step_by_step and begins else "longer path"


def output_class_table(frame: pd.DataFrame, *, by: str = "k") -> pd.DataFrame:
    """The share of each output class (and the accuracy) per ``by`` value, from one row per
    problem with ``output_class`` and ``correct``."""
    shares = (frame.groupby(by, sort=False).output_class.value_counts(normalize=True).unstack(fill_value=0.0)
              .reindex(columns=list(OUTPUT_CLASSES), fill_value=0.0))
    shares["accuracy"] = frame.groupby(by, sort=False).correct.mean()
    shares["n"] = frame.groupby(by, sort=False).size()
    return shares.reset_index()


def node_token_ids(tokenizer, symbols) -> list[int]:
    """The token of each node name; every name must be one token (the symbolic style on a
    word-level tokenizer), since a node's value is the probability of its token."""
    ids = []
    for s in symbols:
        tok = tokenizer(s, add_special_tokens=False)["input_ids"]
        if len(tok) != 1 or tok[0] == tokenizer.unk_token_id:
            raise ValueError(f"node {s!r} is {len(tok)} tokens {tok} for this tokenizer: node values need one token "
                             "per node (the graph task's symbolic style with a from-scratch model)")
        ids.append(tok[0])
    return ids


@torch.no_grad()
def thought_nodes(model: nn.Module, tokenizer, records, thoughts: torch.Tensor) -> pd.DataFrame:
    """One row per problem, thought ``k`` (1..K) and node of the problem's graph:
    ``group`` at thought k (:func:`node_groups`), ``depth`` from the root, ``height`` (the
    node's distance to a leaf), ``on_path`` (a node of the gold path), ``value`` (the
    probability of the node's token when the LM head reads thought k: the distribution the
    model would write the next step from if decoding were forced to start there, instead
    of taking thought k) and ``inner`` (thought k's inner product with the node's input
    embedding, as Zhu et al. 2025 measure it). ``thoughts``: ``(N, K, D)``, the final
    normed states injected as thoughts (``hs[-1]``), for the records in order."""
    if thoughts.shape[0] != len(records):
        raise ValueError(f"{thoughts.shape[0]} problems of thoughts for {len(records)} records")
    head, embed = model.get_output_embeddings(), model.get_input_embeddings().weight
    rows = []
    for i, r in enumerate(records):
        meta = r.meta
        ids = torch.tensor(node_token_ids(tokenizer, meta["idx_to_symbol"]))
        probs = head(thoughts[i].to(head.weight.dtype)).float().softmax(-1)[:, ids]  # (K, nodes)
        inner = thoughts[i].float() @ embed[ids].float().T  # (K, nodes)
        depth, height, path = root_depths(meta), meta.get("height"), set(meta.get("path", ()))
        for k in range(1, thoughts.shape[1] + 1):
            groups = node_groups(meta, k)
            for v, symbol in enumerate(meta["idx_to_symbol"]):
                rows.append({"problem": i, "thought": k, "node": v, "symbol": symbol, "group": groups[v],
                             "depth": depth[v], "height": height[v] if height is not None else -1,
                             "on_path": v in path, "value": probs[k - 1, v].item(),
                             "inner": inner[k - 1, v].item()})
    return pd.DataFrame(rows)


def frontier_values(nodes: pd.DataFrame, thought: int) -> pd.DataFrame:
    """Per problem, the values of its frontier nodes at ``thought`` (groups ``frontier`` and
    ``optimal``) sorted: ``top1``, ``top2``, ``top3`` the cumulative value of the 1, 2 and 3
    most valued (Coconut's Figure 7), ``frontier`` how many there are, ``optimal_top1``
    whether the most valued is on a shortest path. Problems with no frontier node at that
    thought are left out."""
    front = nodes[(nodes.thought == thought) & nodes.group.isin(["frontier", "optimal"])]
    rows = []
    for problem, df in front.groupby("problem", sort=True):
        df = df.sort_values("value", ascending=False)
        cum = df.value.cumsum().tolist() + [df.value.sum()] * 2
        rows.append({"problem": problem, "thought": thought, "frontier": len(df), "top1": cum[0], "top2": cum[1],
                     "top3": cum[2], "optimal_top1": df.group.iloc[0] == "optimal"})
    return pd.DataFrame(rows)


def value_by_height(nodes: pd.DataFrame, thoughts=(1, 2)) -> pd.DataFrame:
    """Mean value of the frontier nodes per thought and height (Coconut's Figure 8), split
    by whether the node is on a shortest path to the answer."""
    front = nodes[nodes.thought.isin(list(thoughts)) & nodes.group.isin(["frontier", "optimal"])]
    return (front.assign(optimal=front.group == "optimal")
            .groupby(["thought", "optimal", "height"]).value.agg(["mean", "median", "size"]).reset_index())


def group_inner_products(nodes: pd.DataFrame) -> pd.DataFrame:
    """Per thought and node group: the mean, standard deviation and count of the thought's
    inner product with the nodes' embeddings (Zhu et al. 2025), and the mean value."""
    return (nodes.groupby(["thought", "group"]).agg(mean_inner=("inner", "mean"), sd_inner=("inner", "std"),
                                                    mean_value=("value", "mean"), nodes=("inner", "size"))
            .reset_index())


def latent_search_summary(classes: pd.DataFrame, spreads: dict, inner: pd.DataFrame, *, coconut: str) -> pd.DataFrame:
    """The key numbers of notebook 06: accuracy and the share of shortest paths and of
    hallucinated edges for CoT and for Coconut made to write after 0 and 1 thoughts and at
    its own number of thoughts; the mean top-1 value of the frontier and how much the next
    two add, per thought; the inner product of each thought with frontier and optimal
    nodes against unreachable ones."""
    by = classes.set_index("k")
    last = max(k for k in by.index if not isinstance(k, str))
    rows = []
    for k, label in [("CoT", "CoT"), ("no-CoT", "no-CoT"), (0, f"{coconut}, k=0"), (1, f"{coconut}, k=1"),
                     (last, f"{coconut}, k={last}")]:
        if k in by.index:
            rows += [("accuracy", label, by.accuracy[k]), ("correct path", label, by["correct path"][k]),
                     ("hallucination", label, by["hallucination"][k])]
    for k, df in spreads.items():
        if len(df):
            rows += [(f"thought {k}: mean top-1 value", coconut, df.top1.mean()),
                     (f"thought {k}: mean value of the 2nd and 3rd", coconut, (df.top3 - df.top1).mean()),
                     (f"thought {k}: most valued node on a shortest path", coconut, df.optimal_top1.mean())]
    ip = inner.set_index(["thought", "group"]).mean_inner
    for k in sorted(inner.thought.unique()):
        for g in ("frontier", "optimal"):
            if (k, g) in ip.index and (k, "unreachable") in ip.index:
                rows.append((f"thought {k}: inner product, {g} - unreachable", coconut,
                             ip[(k, g)] - ip[(k, "unreachable")]))
    return pd.DataFrame(rows, columns=["measurement", "model", "value"])


def node_examples(nodes: pd.DataFrame, records, n: int, *, top: int = 3) -> pd.DataFrame:
    """For the first ``n`` problems, the ``top`` nodes each thought values most (with their
    value and group), beside the gold path; one column per problem."""
    out = []
    for i in range(min(n, len(records))):
        r = records[i]
        df = nodes[nodes.problem == i]
        row = {"question": r.question, "gold path": " ".join([r.meta["idx_to_symbol"][r.meta["root"]], *r.steps])}
        for k, dk in df.groupby("thought"):
            best = dk.sort_values("value", ascending=False).head(top)
            row[f"thought {k}"] = ", ".join(f"{s} {v:.2f} ({g})" for s, v, g in zip(best.symbol, best.value, best.group))
        out.append(row)
    return pd.DataFrame(out).T
