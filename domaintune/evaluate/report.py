"""Rendering for the evaluate stage: PNG plots (matplotlib, Agg) and Markdown tables.

Kept apart from the stage so the stage stays about numbers; nothing here
computes a metric. matplotlib is imported inside the functions (Agg backend,
no display needed) so importing this module is cheap.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd


def _texts(fig) -> list[str]:
    """Every text a reader sees on the figure: titles, labels, legend entries, annotations, tick labels."""
    from matplotlib.text import Text

    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(cm: np.ndarray, labels: Sequence[str], path: Path) -> None:
    plt = _plt()
    k = len(labels)
    size = min(4 + 0.35 * k, 30)
    fig, ax = plt.subplots(figsize=(size, size))
    # Row-normalised so a rare class's errors are as visible as a common one's.
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), labels, rotation=90, fontsize=max(4, 10 - k // 10))
    ax.set_yticks(range(k), labels, fontsize=max(4, 10 - k // 10))
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    if k <= 20:  # counts are unreadable beyond ~20 classes
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                            color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of actual class")
    ax.set_title("Confusion matrix (test)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reliability(bins_by_variant: dict[str, list[dict]], path: Path,
                     ece: dict[str, float] | None = None) -> list[str]:
    """Accuracy against confidence per bin, one colour per variant; the legend carries each ECE
    and every point its bin's row count (a bin of 2 rows says little). Returns the texts drawn."""
    plt = _plt()
    ece = ece or {}
    fig, ax = plt.subplots(figsize=(6, 7))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfectly calibrated")
    for (name, bins), marker, color in zip(bins_by_variant.items(), "os^v", ("tab:orange", "tab:blue",
                                                                           "tab:green", "tab:red")):
        pts = [(b["confidence"], b["accuracy"], b["count"]) for b in bins if b["count"]]
        if not pts:
            continue
        x, y, n = zip(*pts)
        label = f"{name} (ECE {ece[name]:.3f})" if name in ece else name
        ax.plot(x, y, marker=marker, color=color, label=label)
        for xi, yi, ni in pts:
            ax.annotate(f"n={ni}", (xi, yi), textcoords="offset points", xytext=(4, -10), fontsize=7, color=color)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("mean confidence in bin")
    ax.set_ylabel("accuracy in bin")
    ax.set_title("Reliability diagram (test; n = rows per bin)")
    # Below the axes: points can sit anywhere inside them (under- or over-confident models).
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    texts = _texts(fig)
    plt.close(fig)
    return texts


def plot_confidence_hist(conf_by_variant: dict[str, np.ndarray], bins: int, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    edges = np.linspace(0, 1, bins + 1)
    for name, conf in conf_by_variant.items():
        ax.hist(conf, bins=edges, alpha=0.5, label=name)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("test rows")
    ax.set_title("Confidence histogram (test)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_per_class_f1(per_class: pd.DataFrame, path: Path) -> list[str]:
    """Horizontal bars, worst class at the bottom, each with its F1 written at its end. Returns the texts drawn."""
    plt = _plt()
    df = per_class.sort_values("f1")
    fig, ax = plt.subplots(figsize=(6, min(2 + 0.25 * len(df), 30)))
    bars = ax.barh(df["class"].astype(str), df["f1"])
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in df["f1"]], padding=2, fontsize=max(4, 9 - len(df) // 10))
    ax.set_xlim(0, 1.08)  # room for the value after a bar at 1.0
    ax.set_xlabel("F1 (test)")
    ax.set_title("Per-class F1")
    ax.tick_params(axis="y", labelsize=max(4, 10 - len(df) // 10))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    texts = _texts(fig)
    plt.close(fig)
    return texts


def plot_risk_coverage(curve: list[dict], abstain: dict, path: Path) -> list[str]:
    """Selective risk (errors among the answered in-scope test rows) against coverage, with the fitted threshold's
    operating point marked. Returns the texts drawn."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot([c["coverage"] for c in curve], [c["risk"] for c in curve], color="tab:blue",
            label=f"{abstain['method']} score")
    cov = 1.0 - abstain["abstain_rate"]
    risk = 1.0 - (abstain["accuracy_answered"] or 0.0)
    ax.plot([cov], [risk], "o", color="tab:red", label=f"fitted threshold: coverage {cov:.3f}, risk {risk:.3f}")
    ax.set_xlim(0, 1.01)
    ax.set_xlabel("coverage (share of in-scope test rows answered)")
    ax.set_ylabel("risk (error rate of the answered rows)")
    ax.set_title("Risk-coverage of the abstention score (test)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    texts = _texts(fig)
    plt.close(fig)
    return texts


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    s = str(v).replace("\n", " ").replace("|", "\\|")
    return s if len(s) <= 120 else s[:117] + "..."


def md_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no tabulate dependency)."""
    if df.empty:
        return "_(none)_\n"
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def metrics_table(before: dict, after: dict) -> pd.DataFrame:
    keys = [k for k in before if k in after]
    return pd.DataFrame({"metric": keys, "before calibration": [before[k] for k in keys],
                         "after calibration": [after[k] for k in keys]})
