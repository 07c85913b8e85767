"""One function per figure; each returns a matplotlib Figure (the notebook saves it)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

__all__ = ["loss_curves", "accuracy_vs_tokens", "stage_curves", "accuracy_by_stage", "accuracy_vs_thoughts",
           "entropy_by_position", "boundary_ranks", "ablation_bars", "exit_probability", "lens_matrices",
           "table1_tasks", "graph_sweep", "graph_gaps", "output_classes", "value_spread", "value_by_height",
           "thought_inner_products"]


def loss_curves(curves: dict[str, list[dict]], *, key: str = "loss", title: str = "training loss", log: bool = True):
    """One line per run from training histories (rows with ``step`` and ``key``)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, rows in curves.items():
        if rows:
            df = pd.DataFrame(rows)
            ax.plot(df["step"], df[key], label=name)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def accuracy_vs_tokens(table: pd.DataFrame, *, x: str = "visible_tokens", y: str = "accuracy",
                       label: str = "method", title: str = "accuracy vs visible tokens"):
    """A scatter of methods: accuracy against the visible tokens they write (or any ``x``).

    Each method has its own colour and marker and is named in a legend beside the axes:
    methods often share a point (several at 100% with 2 tokens), where labels written on
    the plot would overlap."""
    import itertools

    n = len(table)
    fig, ax = plt.subplots(figsize=(8.5, max(4.0, 0.22 * n + 1.0)))
    colors = plt.get_cmap("tab20").colors
    markers = itertools.cycle("osD^vP*Xh<>p")
    for i, (_, row) in enumerate(table.iterrows()):
        ax.scatter(row[x], row[y], s=55, color=colors[i % len(colors)], marker=next(markers), alpha=0.85,
                   edgecolor="black", linewidth=0.4, label=f"{row[label]} ({row[y]:.3f})")
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(y)
    ax.set_ylim(-0.02, 1.05)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False, title=f"{label} ({y})")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------- curriculum (notebook 02)


def stage_curves(histories: dict[str, "pd.DataFrame"], *, key: str = "loss", title: str = "training loss per stage",
                 log: bool = True):
    """Loss against the global step of a multi-stage run (rows with ``global_step``, ``stage``
    and ``key``), one line per run, with a dotted line where each stage starts."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, df in histories.items():
        if len(df):
            ax.plot(df["global_step"], df[key], label=name)
    first = next((df for df in histories.values() if len(df)), None)
    if first is not None:
        starts = (first["global_step"] - first["step"]).groupby(first["stage"]).min()  # each stage's offset
        for stage, x in starts.items():
            ax.axvline(x, color="grey", ls=":", lw=0.8)
            ax.annotate(f"k={stage}", (x, 1), xycoords=("data", "axes fraction"), xytext=(2, -10),
                        textcoords="offset points", fontsize=7, color="grey")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step (all stages)")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def accuracy_by_stage(tables: dict[str, "pd.DataFrame"], *, title: str = "accuracy and visible tokens per stage"):
    """Two panels against the curriculum stage: accuracy, and visible tokens per answer."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, df in tables.items():
        if len(df):
            a1.plot(df["stage"], df["accuracy"], marker="o", label=name)
            a2.plot(df["stage"], df["visible_tokens"], marker="o", label=name)
    a1.set_ylim(-0.02, 1.05)
    a1.set_ylabel("test accuracy")
    a2.set_ylabel("visible tokens per answer")
    for ax in (a1, a2):
        ax.set_xlabel("stage k")
        ax.grid(alpha=0.3)
    a1.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def accuracy_vs_thoughts(table: "pd.DataFrame", *, group: str = "c", title: str = "accuracy vs number of thoughts"):
    """Accuracy against the number of continuous thoughts (``thoughts``), one line per
    ``group`` value (e.g. c), each point labelled with its stage."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for value, df in table.groupby(group, sort=True):
        df = df.sort_values("thoughts")
        ax.plot(df["thoughts"], df["accuracy"], marker="o", label=f"{group} = {value}")
        for _, row in df.iterrows():
            ax.annotate(f"k={int(row['stage'])}", (row["thoughts"], row["accuracy"]), textcoords="offset points",
                        xytext=(3, -10), fontsize=7)
    ax.set_xlabel("continuous thoughts (k x c)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------- teacher (notebook 00)


def entropy_by_position(table: pd.DataFrame, *, title: str = "Teacher rollouts: entropy by position"):
    """Mean entropy at each generated position (columns), one line per row of ``table``
    (correct and wrong rollouts: :func:`latentlib.teacher.entropy_by_position`)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, row in table.iterrows():
        ax.plot(row.index, row.values, marker="o", label=label)
    ax.set_xlabel("generated position")
    ax.set_ylabel("entropy (nats)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------- probes (notebook 05)


def boundary_ranks(text: pd.DataFrame, positions: pd.DataFrame, token_id: int, vocab: int, *,
                   name: str = "<swi>", column: str = "swi"):
    """Two panels: the distribution of ``name``'s rank where it was written and at every other
    text position (log scale), and the mean probability of ``name`` at the positions around
    the boundaries (0 is where it was written). ``text``: the text rows of
    ``positions`` (:func:`latentlib.probes.position_tables`)."""
    import numpy as np

    at = text.token == token_id
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    bins = np.arange(0, np.log10(vocab) + 0.25, 0.25)
    for df, label in [(text[~at], "other text positions"), (text[at], f"{name} written")]:
        if len(df):
            ax1.hist(np.log10(df[f"rank_{column}"]), bins=bins, density=True, alpha=0.6, label=f"{label} (n={len(df)})")
    ax1.set_xlabel(f"log10 rank of {name} (1 = most likely)")
    ax1.set_ylabel("density")
    ax1.set_title(f"rank of {name} in the next-token distribution")
    ax1.legend()
    p_at = positions.set_index(["seq", "pos"])[f"p_{column}"]
    spots = text[at]
    offsets = list(range(-4, 4))
    spike = [p_at.reindex(list(zip(spots.seq, spots.pos + d))).mean() for d in offsets]
    ax2.bar(offsets, spike)
    ax2.set_xlabel("position relative to the boundary")
    ax2.set_ylabel(f"mean p({name})")
    ax2.set_ylim(0, 1)
    ax2.set_title(f"p({name}) around the boundaries")
    fig.tight_layout()
    return fig


def ablation_bars(table: pd.DataFrame, ablations: tuple[str, ...], *, title: str = "what the injected states are worth"):
    """Accuracy on each model's diagnostic subset per ablation (grouped bars)."""
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 3.8))
    models = list(dict.fromkeys(table.model))
    width = 0.8 / len(ablations)
    for i, mode in enumerate(ablations):
        sub = table[table.ablation == mode].set_index("model").reindex(models)
        ax.bar(np.arange(len(models)) + i * width, sub.diagnostic_accuracy, width, label=mode)
    ax.set_xticks(np.arange(len(models)) + width * (len(ablations) - 1) / 2, models)
    ax.set_ylabel("accuracy (diagnostic subset)")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(title="ablation", ncol=4, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    fig.tight_layout()
    return fig


def exit_probability(table: pd.DataFrame, k_min: int, k_max: int, *, title: str = "the wish to leave the block"):
    """Mean and median p(</swi>) against the latent steps taken in the block, with K_min and K_max."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    if len(table):
        ax.plot(table.steps_taken, table.mean_p_exit, marker="o", label="mean")
        ax.plot(table.steps_taken, table.median_p_exit, marker="s", ls="--", label="median")
    ax.axvline(k_min, color="grey", ls=":", label=f"K_min = {k_min}")
    ax.axvline(k_max, color="black", ls=":", label=f"K_max = {k_max}")
    ax.set_xlabel("latent steps taken in the block")
    ax.set_ylabel("p(</swi>)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def lens_matrices(matrices: dict, *, title: str = "thought k decodes to step j"):
    """One heat map per model: entry (k, j) is the fraction of problems whose thought k decodes
    (top-1) to the value of step j (:func:`latentlib.probes.lens_step_matrix`)."""
    import numpy as np

    fig, axes = plt.subplots(1, len(matrices), figsize=(5.5 * len(matrices), 4.2))
    im = None
    for ax, (name, mat) in zip(np.atleast_1d(axes), matrices.items()):
        m = mat.numpy()
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        for (k, j), v in np.ndenumerate(m):
            ax.text(j, k, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
        ax.set_xticks(range(m.shape[1]), [str(j + 1) for j in range(m.shape[1])])
        ax.set_yticks(range(m.shape[0]), [str(k + 1) for k in range(m.shape[0])])
        ax.set_xlabel("reasoning step j (its value)")
        ax.set_ylabel("thought k")
        ax.set_title(f"{name}: {title}")
    fig.colorbar(im, ax=axes, shrink=0.8, label="fraction of problems")
    return fig


# ---------------------------------------------------------------------------- Table 1 across tasks, the graph sweep


def table1_tasks(table: pd.DataFrame, *, title: str = "Coconut's Table 1 on the embedded tasks",
                 chance: dict[str, float] | None = None):
    """Grouped bars: accuracy of each Table 1 row (``method``) on each task, with the visible
    tokens written above each bar (``table``: one row per method and task, with ``accuracy``
    in [0, 1] and ``visible_tokens``). ``chance`` (task -> accuracy of a guess) draws a
    dashed line per task in its bars' colour."""
    import numpy as np

    methods = list(dict.fromkeys(table.method))
    tasks = list(dict.fromkeys(table.task))
    width = 0.8 / len(tasks)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(methods)), 4.0))
    for i, task in enumerate(tasks):
        sub = table[table.task == task].set_index("method").reindex(methods)
        x = np.arange(len(methods)) + (i - (len(tasks) - 1) / 2) * width
        bars = ax.bar(x, 100 * sub.accuracy, width, label=task)
        if chance and task in chance:
            ax.axhline(100 * chance[task], color=bars.patches[0].get_facecolor(), ls="--", lw=1.0,
                       label=f"{task}: chance {100 * chance[task]:.0f}%")
        for bar, tokens in zip(bars, sub.visible_tokens):
            if not np.isnan(tokens):
                ax.annotate(f"{tokens:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            xytext=(0, 2), textcoords="offset points", ha="center", fontsize=6.5)
    ax.set_xticks(np.arange(len(methods)), methods, rotation=25, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xlabel("method (numbers above the bars: visible tokens per answer)")
    ax.set_ylim(0, 110)
    ax.set_title(title)
    ax.legend(title="task", fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def graph_sweep(table: pd.DataFrame, *, title: str = "Graph task: Coconut vs written CoT across sizes"):
    """Accuracy of CoT, no-CoT, Coconut and (where a point trained it) the CoT trained as
    long as the curriculum, at each sweep point (one row per point with ``model``,
    ``nodes``, ``paths``, optionally ``base_steps`` and ``coconut_steps`` (the budgets;
    ``coconut_base_steps`` when Coconut started from a CoT base of other steps),
    ``n_train`` (training problems) and ``c``, ``uniform_prob`` and ``lr`` (Coconut's
    thoughts per step, stage mixing and learning rate), and a column per method, accuracy
    in [0, 1]); a point without a method has no bar for it."""
    import numpy as np

    budgets = "base_steps" in table and "coconut_steps" in table

    def early_base(r):  # Coconut started from a shorter-trained CoT base than the point's
        return budgets and "coconut_base_steps" in table and r.coconut_base_steps != r.base_steps

    curriculum = "c" in table and "uniform_prob" in table
    labels = [f"{r.model}\n{r.nodes} nodes, paths {r.paths}"
              + (f"\n{r.base_steps} + {r.coconut_steps} steps" if budgets else "")
              + (f"\nCoconut from a\n{r.coconut_base_steps}-step CoT" if early_base(r) else "")
              + (f"\n{r.n_train:,} problems" if "n_train" in table else "")
              + (f"\nc={r.c}, uniform {r.uniform_prob:g}" if curriculum else "")
              + (f"\nlr {r.lr:g}" if curriculum and "lr" in table else "") for r in table.itertuples()]
    methods = [m for m in ("CoT", "CoT trained as long", "no-CoT", "Coconut") if m in table]
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(table)), 4.4))
    for i, m in enumerate(methods):
        ax.bar(np.arange(len(table)) + (i - (len(methods) - 1) / 2) * width, 100 * table[m].fillna(0), width,
               label=m)
    ax.set_xticks(np.arange(len(table)), labels, fontsize=7.5)
    ax.set_ylabel("test accuracy (%)")
    # two lines: one would be wider than the axes of a few points
    ax.set_xlabel("sweep point (model; nodes per graph; shortest paths; base + curriculum steps"
                  + ("; training problems" if "n_train" in table else "")
                  + (";\nthoughts per step, stage mixing" + ("; learning rate" if "lr" in table else "") + ")"
                     if curriculum else ")"))
    ax.set_ylim(0, 100)
    chance = ax.axhline(50, color="grey", ls=":", lw=0.8)
    ax.set_title(title)
    handles, names = ax.get_legend_handles_labels()
    ax.legend(handles + [chance], names + ["chance"], fontsize=8, loc="upper left",
              bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------- latent search (notebook 06)

_CLASS_COLORS = {"correct path": "#2a9d8f", "longer path": "#8ab17d", "hallucination": "#e76f51",
                 "wrong target": "#f4a261", "correct label": "#457b9d", "incorrect label": "#bcbcbc"}


def graph_gaps(table: pd.DataFrame, *, target: float | None = 10.0,
               title: str = "Coconut - CoT on fresh problems, by the length of the answer path"):
    """The paired accuracy difference Coconut - CoT with its 95% interval, in points, for
    each sweep point (rows with ``point``, ``subset`` (``all`` or a path length), ``mean``,
    ``ci95`` and ``n``; differences as fractions), one bar per subset the point has, and a
    line at ``target``. A subset of fewer than 100 problems is drawn pale and hatched: its
    interval is wide."""
    import re
    import textwrap

    import numpy as np
    from matplotlib.patches import Patch

    points = list(dict.fromkeys(table.point))
    subsets = list(dict.fromkeys(table.subset))
    width = 0.8 / len(subsets)
    colors = dict(zip(subsets, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.9 * len(points)), 4.2))
    for i, sub in enumerate(subsets):
        for j, point in enumerate(points):
            row = table[(table.subset == sub) & (table.point == point)]
            if row.empty:
                continue
            r = row.iloc[0]
            few = r.n < 100
            ax.bar(j + (i - (len(subsets) - 1) / 2) * width, 100 * r["mean"], width, yerr=100 * r.ci95, capsize=2,
                   color=colors[sub], alpha=0.5 if few else 1.0, hatch="//" if few else None, error_kw={"lw": 0.8})
    handles = [Patch(color=colors[sub], label="all" if sub == "all" else f"{sub}-edge paths") for sub in subsets]
    if target is not None:
        handles.append(ax.axhline(target, color="black", ls="--", lw=0.9, label=f"target (+{target:g})"))
    ax.axhline(0, color="grey", lw=0.8)

    def label(point):  # sweep-<model>-n<nodes>-p<min>-<max>[-<tag>]; a long tag wrapped at its hyphens
        m = re.fullmatch(r"sweep-(.+)-n(\d+)-p(\d+)-(\d+)(?:-(.+))?", point)
        return point if not m else f"{m[1]}\n{m[2]} nodes, paths {m[3]}-{m[4]}" + (
            "\n" + textwrap.fill(m[5], 18) if m[5] else "")

    ax.set_xticks(np.arange(len(points)), [label(p) for p in points], fontsize=7.5)
    ax.set_ylabel("Coconut - CoT (points, 95% interval)")
    ax.set_xlabel("sweep point (model; nodes per graph; shortest paths; run tag); pale and hatched: under 100 problems")
    ax.set_title(title)
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def output_classes(table: pd.DataFrame, *, title: str = "What the model writes after k thoughts"):
    """Stacked bars: the share of each output class per setting (``table``: one row per
    setting ``k``, a column per class and ``accuracy``, shares in [0, 1]), with the
    accuracy as a line (Coconut's Figure 3)."""
    import numpy as np

    classes = [c for c in _CLASS_COLORS if c in table]
    labels = [f"k={k}" if isinstance(k, (int, np.integer)) else str(k) for k in table.k]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(table) + 2), 4.0))
    bottom = np.zeros(len(table))
    for c in classes:
        ax.bar(labels, 100 * table[c], bottom=bottom, color=_CLASS_COLORS[c], label=c, edgecolor="white", lw=0.5)
        bottom += 100 * table[c].to_numpy()
    ax.plot(labels, 100 * table.accuracy, "k-o", ms=4, label="accuracy (answer right)")
    ax.set_ylabel("test problems (%)")
    ax.set_xlabel("model, or thoughts k before Coconut is made to write")
    ax.set_ylim(0, 102)
    ax.set_title(title)
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def value_spread(spreads: dict, *, title: str = "How the value spreads over the frontier"):
    """One panel per thought: the cumulative value of the 1, 2 and 3 most valued frontier
    nodes of each test problem, problems sorted by it (Coconut's Figure 7). ``spreads``:
    thought -> :func:`latentlib.probes.frontier_values`."""
    import numpy as np

    fig, axes = plt.subplots(1, len(spreads), figsize=(4.6 * len(spreads), 3.6), sharey=True, squeeze=False)
    for ax, (k, df) in zip(axes[0], spreads.items()):
        for col, ls in (("top1", "-"), ("top2", "--"), ("top3", ":")):
            if len(df):
                v = np.sort(df[col].to_numpy())[::-1]
                ax.plot(100 * np.arange(1, len(v) + 1) / len(v), v, ls=ls, label=col.replace("top", "top-"))
        ax.set_xlabel("test problems, ranked by value (percentile, %)")
        ax.set_title(f"thought {k} ({len(df)} problems)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("cumulative value (probability)")
    axes[0][0].set_ylim(0, 1.02)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def value_by_height(table: pd.DataFrame, *, title: str = "Frontier nodes' value against their height"):
    """Mean value of frontier nodes against their height (distance to a leaf), one line per
    thought and per kind (on a shortest path to the answer or not); ``table``:
    :func:`latentlib.probes.value_by_height`."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for (k, optimal), df in table.groupby(["thought", "optimal"]):
        ax.plot(df.height, df["mean"], marker="o" if optimal else "s", ls="-" if optimal else "--",
                label=f"thought {k}, {'on a shortest path' if optimal else 'off it'}")
        for _, row in df.iterrows():
            ax.annotate(f"{int(row['size'])}", (row.height, row["mean"]), xytext=(3, 3), textcoords="offset points",
                        fontsize=6, color="grey")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("height of the node (edges to its nearest leaf)")
    ax.set_ylabel("mean value (probability)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=7.5)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def thought_inner_products(table: pd.DataFrame, groups=("reached", "frontier", "optimal", "unreachable"), *,
                           title: str = "Thoughts against the node embeddings"):
    """Mean inner product (± one standard deviation) of thought k with the embeddings of each
    group of nodes, per thought (Zhu et al. 2025); ``table``:
    :func:`latentlib.probes.group_inner_products`."""
    import numpy as np

    thoughts = sorted(table.thought.unique())
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(thoughts) + 2), 3.8))
    for i, g in enumerate(groups):
        sub = table[table.group == g].set_index("thought").reindex(thoughts)
        ax.bar(np.arange(len(thoughts)) + (i - (len(groups) - 1) / 2) * width, sub.mean_inner, width,
               yerr=sub.sd_inner, capsize=2, label=g, error_kw={"lw": 0.6})
    ax.set_xticks(np.arange(len(thoughts)), [f"thought {k}" for k in thoughts])
    ax.set_xlabel("continuous thought")
    ax.set_ylabel("inner product with node embeddings (logit units)")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_title(title)
    ax.legend(title="node group", fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig
