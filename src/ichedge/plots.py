"""The plots a run, a sweep and an evaluation write: curves, confusion matrices, ROC, PR, reliability.

Each takes numbers the pure core (:mod:`ichedge.evaluation`) computed and writes one PNG. Figures
are made without pyplot, so nothing here touches the caller's matplotlib backend or windows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

from ichedge.evaluation import apply_temperature, expected_calibration_error


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_history(history: Mapping[str, Sequence[float]], path: Path) -> None:
    fig = Figure(figsize=(9, 3.5))
    axes = fig.subplots(1, 2)
    epochs = np.arange(1, len(history["loss"]) + 1)
    for ax, metric in zip(axes, ("loss", "auc")):
        for prefix, style in (("", "-"), ("val_", "--")):
            key = prefix + metric
            if key in history:
                ax.plot(epochs, history[key], style, label="validation" if prefix else "training")
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
    if "phase" in history and len(set(history["phase"])) > 1:
        first_ft = list(history["phase"]).index("fine-tune") + 0.5
        for ax in axes:
            ax.axvline(first_ft, color="grey", lw=0.8)
    _save(fig, path)


def plot_confusion(m: Mapping[str, float], path: Path, title: str) -> None:
    cm = np.array([[m["tn"], m["fp"]], [m["fn"], m["tp"]]])
    fig = Figure(figsize=(3.8, 3.4))
    ax = fig.subplots()
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="black")
    ax.set_xticks([0, 1], ["normal", "hemorrhage"])
    ax.set_yticks([0, 1], ["normal", "hemorrhage"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def plot_pr(y: np.ndarray, p: np.ndarray, points: Mapping[str, Mapping[str, float]], path: Path) -> None:
    """Precision-recall curve with the operating points marked (the 1:7 imbalance shows here)."""
    precision, recall, _ = precision_recall_curve(y, p)
    fig = Figure(figsize=(4, 4))
    ax = fig.subplots()
    ax.plot(recall, precision, label="precision-recall")
    ax.axhline(np.mean(y), ls=":", color="grey", label=f"prevalence {np.mean(y):.2f}")
    for name, m in points.items():
        if not np.isnan(m["ppv"]):
            ax.plot(m["sensitivity"], m["ppv"], "o", label=f"{name} (t={m['threshold']:.2f})")
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision (PPV)")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="upper right", fontsize=8)
    _save(fig, path)


def plot_reliability(y: np.ndarray, p: np.ndarray, path: Path, temperature: float | None = None, bins: int = 10) -> None:
    """Observed hemorrhage rate against mean probability per bin, raw and temperature-scaled."""
    fig = Figure(figsize=(4, 4))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ":", color="grey")
    curves = [("raw", p)] + ([(f"T = {temperature:.2f}", apply_temperature(p, temperature))] if temperature else [])
    for name, q in curves:
        which = np.minimum((np.asarray(q) * bins).astype(int), bins - 1)
        xs = [q[which == b].mean() for b in range(bins) if (which == b).any()]
        ys = [np.mean(y[which == b]) for b in range(bins) if (which == b).any()]
        ax.plot(xs, ys, "o-", label=f"{name}: ECE {expected_calibration_error(y, q, bins):.3f}")
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed hemorrhage rate")
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)


def plot_roc(y: np.ndarray, p: np.ndarray, points: Mapping[str, Mapping[str, float]], path: Path) -> None:
    fpr, tpr, _ = roc_curve(y, p)
    fig = Figure(figsize=(4, 4))
    ax = fig.subplots()
    ax.plot(fpr, tpr, label=f"AUC {roc_auc_score(y, p):.3f}")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    for name, m in points.items():
        ax.plot(m["fp_rate"], m["tp_rate"], "o", label=f"{name} (t={m['threshold']:.2f})")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def plot_pareto(rows: Sequence[Mapping], budget, paper: Mapping[tuple[int, float], Mapping[str, float]],
                path: Path) -> None:
    """A search's trials: int8 AUC against TFLM arena and against flash, the Pareto front joined,
    the budget as lines, and the paper's configurations as ichedge measured them."""
    fig = Figure(figsize=(11, 4.2))
    done = [r for r in rows if r["outcome"] in ("complete", "pruned") and r.get("auc_int8") is not None]
    front = sorted((r for r in done if r.get("pareto")), key=lambda r: r["arena_kib"])
    for ax, key, limit, label in zip(fig.subplots(1, 2), ("arena_kib", "flash_kib"), (budget.ram, budget.flash),
                                     ("RAM: TFLM arena (KiB)", "flash: int8 model (KiB)")):
        for outcome, style in (("complete", dict(color="tab:blue", alpha=0.6)),
                               ("pruned", dict(color="grey", alpha=0.5, marker="x"))):
            pts = [r for r in done if r["outcome"] == outcome]
            ax.scatter([r[key] for r in pts], [r["auc_int8"] for r in pts], s=22,
                       label="trial" if outcome == "complete" else "pruned (mean of its folds)", **style)
        line = sorted(front, key=lambda r: r[key])
        ax.plot([r[key] for r in line], [r["auc_int8"] for r in line], "o-", color="tab:green", ms=6,
                label="Pareto front")
        for (size, alpha), m in paper.items():
            ax.scatter(m[key], m["auc"], marker="*", s=120, color="tab:red",
                       label="paper's configurations (ichedge, float AUC)" if (size, alpha) == next(iter(paper)) else None)
            ax.annotate(f"{size}x{alpha:g}", (m[key], m["auc"]), textcoords="offset points", xytext=(4, -10),
                        fontsize=7, color="tab:red")
        ax.axvline(limit / 1024, color="black", ls="--", lw=1, label="budget")
        ax.set_xlabel(label)
        ax.set_ylabel("AUC (int8, mean of patient folds)")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=7, loc="lower right")
    _save(fig, path)
