"""One function per figure; each returns a matplotlib Figure (the notebook saves it)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

__all__ = ["loss_curves", "accuracy_vs_tokens"]


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
    """A scatter of methods: accuracy against the visible tokens they write."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(table[x], table[y])
    for _, row in table.iterrows():
        ax.annotate(str(row[label]), (row[x], row[y]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(y)
    ax.set_ylim(-0.02, 1.05)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
