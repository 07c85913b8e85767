"""One function per figure; each returns a matplotlib Figure (the notebook saves it)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

__all__ = ["loss_curves", "accuracy_vs_tokens", "stage_curves", "accuracy_by_stage", "accuracy_vs_thoughts"]


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
