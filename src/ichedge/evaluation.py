"""Metrics the paper reports and the ones a clinician needs, thresholds, and plots.

The paper's columns are loss, accuracy and the TP/FP/FN/TN rates *within each true class*
(TP rate = TP/(TP+FN), FP rate = FP/(FP+TN), ...). ichedge adds sensitivity, specificity, PPV,
NPV and ROC AUC, at the default 0.5 threshold and at a high-sensitivity threshold chosen on the
validation split (never on the test split).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix, log_loss, roc_auc_score, roc_curve

from ichedge.triage import group_labels, group_scores


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """All slice-level metrics at one threshold (hemorrhage = 1 is the positive class)."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=np.float64)
    pred = (p >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    both = len(set(y.tolist())) == 2
    return {
        "threshold": float(threshold),
        "n": int(len(y)),
        "loss": float(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7), labels=[0, 1])),
        "accuracy": _ratio(tp + tn, len(y)),
        "tp_rate": _ratio(tp, tp + fn),
        "fp_rate": _ratio(fp, fp + tn),
        "fn_rate": _ratio(fn, tp + fn),
        "tn_rate": _ratio(tn, fp + tn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, fp + tn),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "auc": float(roc_auc_score(y, p)) if both else float("nan"),
        "tp": int(tp),
        "fp": int(fp),
        "fn": int(fn),
        "tn": int(tn),
    }


def threshold_for_sensitivity(y: np.ndarray, p: np.ndarray, target: float = 0.95) -> float:
    """The highest threshold whose sensitivity on (y, p) reaches ``target``.

    Highest, so specificity is as good as it can be at that sensitivity. Choose it on the
    validation split and apply it unchanged to the test split.
    """
    y = np.asarray(y).astype(int)
    if y.sum() == 0:
        raise ValueError("no positive cases to set a sensitivity threshold on")
    _, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    ok = np.nonzero(tpr >= target)[0]
    return float(min(thresholds[ok[0]], 1.0))


def evaluate_split(
    y_val: np.ndarray, p_val: np.ndarray, y_test: np.ndarray, p_test: np.ndarray, target_sensitivity: float
) -> dict[str, dict[str, float]]:
    """Test metrics at 0.5 and at the validation-chosen high-sensitivity threshold."""
    t = threshold_for_sensitivity(y_val, p_val, target_sensitivity)
    return {
        "default": binary_metrics(y_test, p_test, 0.5),
        "high_sensitivity": binary_metrics(y_test, p_test, t),
        "validation": binary_metrics(y_val, p_val, t),
    }


def evaluate_studies(
    groups_val: Sequence[str], y_val: np.ndarray, p_val: np.ndarray,
    groups_test: Sequence[str], y_test: np.ndarray, p_test: np.ndarray,
    method: str, target_sensitivity: float,
) -> dict[str, float]:
    """Study-level (patient-level) test metrics: slices aggregated per study with ``method``.

    A study is positive when any slice is; its threshold is chosen on the validation studies
    for ``target_sensitivity``, as for slices.
    """
    def arrays(groups, y, p):
        scores, labels = group_scores(groups, p, method), group_labels(groups, y)
        keys = sorted(scores)
        return np.array([labels[k] for k in keys]), np.array([scores[k] for k in keys])

    yv, sv = arrays(groups_val, y_val, p_val)
    yt, st = arrays(groups_test, y_test, p_test)
    return binary_metrics(yt, st, threshold_for_sensitivity(yv, sv, target_sensitivity))


def summarise_folds(folds: Sequence[Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean, sample sd and count of every metric over folds, leaving out undefined (NaN) values.

    Returns {operating point: {metric: {mean, sd, n}}}; sd is NaN with fewer than two values.
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    for point in folds[0]:
        out[point] = {}
        for metric in folds[0][point]:
            values = np.array([f[point][metric] for f in folds], dtype=float)
            values = values[~np.isnan(values)]  # e.g. PPV of a fold that flagged nothing
            mean = float(values.mean()) if len(values) else float("nan")
            sd = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
            out[point][metric] = {"mean": mean, "sd": sd, "n": int(len(values))}
    return out


# --- plots ------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(history: Mapping[str, Sequence[float]], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(m: Mapping[str, float], path: Path, title: str) -> None:
    plt = _pyplot()
    cm = np.array([[m["tn"], m["fp"]], [m["fn"], m["tp"]]])
    fig, ax = plt.subplots(figsize=(3.8, 3.4))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="black")
    ax.set_xticks([0, 1], ["normal", "hemorrhage"])
    ax.set_yticks([0, 1], ["normal", "hemorrhage"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roc(y: np.ndarray, p: np.ndarray, points: Mapping[str, Mapping[str, float]], path: Path) -> None:
    plt = _pyplot()
    fpr, tpr, _ = roc_curve(y, p)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr, label=f"AUC {roc_auc_score(y, p):.3f}")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    for name, m in points.items():
        ax.plot(m["fp_rate"], m["tp_rate"], "o", label=f"{name} (t={m['threshold']:.2f})")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
