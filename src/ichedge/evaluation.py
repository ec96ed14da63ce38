"""Metrics the paper reports and the ones a clinician needs, thresholds, intervals, calibration, plots.

The paper's columns are loss, accuracy and the TP/FP/FN/TN rates *within each true class*
(TP rate = TP/(TP+FN), FP rate = FP/(FP+TN), ...). ichedge adds sensitivity, specificity, PPV,
NPV and ROC AUC, at the default 0.5 threshold and at a high-sensitivity threshold chosen on the
validation split (never on the test split).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix, log_loss, precision_recall_curve, roc_auc_score, roc_curve

from ichedge.triage import study_arrays


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


def choose_thresholds(y_val: np.ndarray, p_val: np.ndarray, groups_val: Sequence[str] | None,
                      target_sensitivity: float, aggregate: str) -> dict[str, float]:
    """The slice threshold and (with patients) the study threshold for ``target_sensitivity`` on validation."""
    out = {"high_sensitivity": threshold_for_sensitivity(y_val, p_val, target_sensitivity)}
    if groups_val is not None:
        out["study"] = threshold_for_sensitivity(*study_arrays(groups_val, y_val, p_val, aggregate), target_sensitivity)
    return out


def evaluate_studies(
    groups_val: Sequence[str], y_val: np.ndarray, p_val: np.ndarray,
    groups_test: Sequence[str], y_test: np.ndarray, p_test: np.ndarray,
    method: str, target_sensitivity: float,
) -> dict[str, float]:
    """Study-level (patient-level) test metrics: slices aggregated per study with ``method``.

    A study is positive when any slice is; its threshold is chosen on the validation studies
    for ``target_sensitivity``, as for slices.
    """
    yv, sv = study_arrays(groups_val, y_val, p_val, method)
    yt, st = study_arrays(groups_test, y_test, p_test, method)
    return binary_metrics(yt, st, threshold_for_sensitivity(yv, sv, target_sensitivity))


def summarise_folds(folds: Sequence[Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean, sample sd and count of every metric over folds, leaving out undefined (NaN) values.

    Returns {operating point: {metric: {mean, sd, n}}}; sd is NaN with fewer than two values.
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    for point in folds[0]:
        if not all(isinstance(v, (int, float)) for v in folds[0][point].values()):
            continue  # nested entries (bootstrap intervals) are not averaged over folds
        out[point] = {}
        for metric in folds[0][point]:
            values = np.array([f[point][metric] for f in folds], dtype=float)
            values = values[~np.isnan(values)]  # e.g. PPV of a fold that flagged nothing
            mean = float(values.mean()) if len(values) else float("nan")
            sd = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
            out[point][metric] = {"mean": mean, "sd": sd, "n": int(len(values))}
    return out


# --- confidence intervals and calibration -------------------------------------------------------

CI_METRICS = ("auc", "sensitivity", "specificity", "ppv", "npv", "accuracy")


def bootstrap_ci(
    y: np.ndarray, p: np.ndarray, groups: Sequence[str] | None, threshold: float,
    n_boot: int = 2000, seed: int = 0, level: float = 0.95,
) -> dict[str, dict[str, float]]:
    """Percentile bootstrap intervals, resampling *patients* (whole groups of slices) with replacement.

    Slices of one patient are correlated, so resampling slices would make intervals too narrow.
    ``groups`` None resamples images (for layouts without patient IDs: say so where it is shown).
    Returns {metric: {"value", "low", "high", "n_boot"}}; a metric undefined in a resample (AUC
    with one class, PPV with nothing flagged) is left out of that resample.
    """
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=np.float64)
    keys = np.asarray(groups) if groups is not None else np.arange(len(y)).astype(str)
    members = [np.nonzero(keys == g)[0] for g in np.unique(keys)]
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {m: [] for m in CI_METRICS}
    for _ in range(n_boot):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        m = _fast_metrics(y[idx], p[idx], threshold)
        for k in CI_METRICS:
            if not np.isnan(m[k]):
                draws[k].append(m[k])
    point = _fast_metrics(y, p, threshold)
    alpha = (1 - level) / 2
    out = {}
    for k in CI_METRICS:
        d = np.array(draws[k])
        low, high = (np.quantile(d, [alpha, 1 - alpha]) if len(d) else (np.nan, np.nan))
        out[k] = {"value": point[k], "low": float(low), "high": float(high), "n_boot": int(len(d))}
    return out


def _fast_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    pred = p >= threshold
    tp, fn = int((pred & (y == 1)).sum()), int((~pred & (y == 1)).sum())
    fp, tn = int((pred & (y == 0)).sum()), int((~pred & (y == 0)).sum())
    both = 0 < y.sum() < len(y)
    return {"auc": float(roc_auc_score(y, p)) if both else float("nan"),
            "sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp),
            "ppv": _ratio(tp, tp + fp), "npv": _ratio(tn, tn + fn), "accuracy": _ratio(tp + tn, len(y))}


def intervals(y: np.ndarray, p: np.ndarray, groups: Sequence[str] | None, thresholds: Mapping[str, float],
              n_boot: int = 1000, seed: int = 0) -> dict:
    """Bootstrap intervals at each named threshold, and what was resampled."""
    out: dict = {"resampled": "patients" if groups is not None else "images (no patient IDs: too narrow)",
                 "n_boot": n_boot, "level": 0.95}
    for name, t in thresholds.items():
        out[name] = bootstrap_ci(y, p, groups, t, n_boot, seed)
    return out


def pooled_intervals(folds: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, float]], n_boot: int = 2000,
                     seed: int = 0) -> dict[str, dict[str, float]]:
    """Intervals over cross-validation: every fold's test patients pooled, resampled by patient.

    ``folds``: (labels, probabilities, patients, that fold's high-sensitivity threshold) per
    fold. AUC comes from the pooled probabilities; the other metrics from each slice's flag at
    its own fold's threshold.
    """
    y = np.concatenate([f[0] for f in folds])
    p = np.concatenate([f[1] for f in folds])
    g = np.concatenate([np.asarray(f[2]).astype(str) for f in folds])
    flags = np.concatenate([(f[1] >= f[3]).astype(float) for f in folds])
    by_flag = bootstrap_ci(y, flags, g, 0.5, n_boot, seed)
    by_flag["auc"] = bootstrap_ci(y, p, g, 0.5, n_boot, seed)["auc"]
    return by_flag


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """ECE: the bin-size-weighted gap between mean probability and observed rate, equal-width bins."""
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    which = np.minimum((p * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            ece += inside.mean() * abs(p[inside].mean() - y[inside].mean())
    return float(ece)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def fit_temperature(y: np.ndarray, p: np.ndarray) -> float:
    """Temperature T minimising the log loss of sigmoid(logit(p) / T); fit it on validation."""
    from scipy.optimize import minimize_scalar

    z, y = _logit(p), np.asarray(y, dtype=float)

    def nll(log_t: float) -> float:
        q = np.clip(1 / (1 + np.exp(-z / np.exp(log_t))), 1e-7, 1 - 1e-7)
        return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))

    return float(np.exp(minimize_scalar(nll, bounds=(-4, 4), method="bounded").x))


def apply_temperature(p: np.ndarray, temperature: float) -> np.ndarray:
    return 1 / (1 + np.exp(-_logit(p) / temperature))


def calibration(y_val: np.ndarray, p_val: np.ndarray, y_test: np.ndarray, p_test: np.ndarray) -> dict[str, float]:
    """Test ECE as the model outputs it, and after temperature scaling fitted on validation.

    Temperature scaling keeps the ranking (AUC) and moves probabilities; ichedge reports it and
    does not apply it to served probabilities, whose thresholds were chosen on the raw outputs.
    """
    t = fit_temperature(y_val, p_val)
    return {"ece": expected_calibration_error(y_test, p_test), "temperature": t,
            "ece_after_temperature": expected_calibration_error(y_test, apply_temperature(p_test, t))}


# --- plots ------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


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
    _save(fig, path)


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
    _save(fig, path)


def plot_pr(y: np.ndarray, p: np.ndarray, points: Mapping[str, Mapping[str, float]], path: Path) -> None:
    """Precision-recall curve with the operating points marked (the 1:7 imbalance shows here)."""
    plt = _pyplot()
    precision, recall, _ = precision_recall_curve(y, p)
    fig, ax = plt.subplots(figsize=(4, 4))
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
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4, 4))
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
    _save(fig, path)


# --- a trained model on any dataset ---------------------------------------------------------------


def training_run_of(model: Path) -> Path | None:
    """The run folder a model came from (a run folder, its .keras, or a .tflite in its export)."""
    for candidate in (model, model.parent, model.parent.parent):
        if candidate.is_dir() and (candidate / "config.json").is_file() and (candidate / "model.keras").is_file():
            return candidate
    return None


def evaluate_model(model: str | Path, data: str | Path | None, out_root: Path = Path("runs"), progress: bool = False,
                   n_boot: int = 2000, unseen_only: bool = False) -> tuple[Path, dict]:
    """Evaluate a trained or exported model on any dataset the readers accept, without retraining.

    Thresholds are the model's own (0.5 and the validated high-sensitivity one), never re-chosen
    on the data evaluated. Slices the model was trained or validated on are counted, and the
    report says so in a banner; ``unseen_only`` leaves them out instead.
    """
    import csv
    import json

    from ichedge.data import read_dataset
    from ichedge.predict import Predictor, read_run_config
    from ichedge.preprocess import load_inputs, patient_groups, slice_order
    from ichedge.report import Report, metric_rows
    from ichedge.training import run_folder

    model = Path(model)
    predictor = Predictor.load(model)
    decision = predictor.decision
    if decision is None:
        raise ValueError(f"{model}: no validated thresholds recorded with this model")
    ds = read_dataset(data, predictor.preprocessing.windows)
    run = training_run_of(model)
    used: set[str] = set()
    if run is not None:
        meta = read_run_config(run)
        if str(meta["dataset"]["source"]) == str(ds.source):
            used = set(meta["split"]["train"]) | set(meta["split"]["val"])
    wanted = [i for i, r in enumerate(ds.records) if not (unseen_only and r.key in used)]
    inputs = load_inputs(ds, predictor.preprocessing, wanted, progress=progress)
    if len(inputs.y) == 0:
        raise ValueError(f"{ds.name}: no readable image" + (" the model has not seen" if unseen_only else ""))
    p = predictor.predict(inputs.x)
    y = inputs.y
    groups = patient_groups(ds, inputs)
    metrics: dict = {"default": binary_metrics(y, p, 0.5),
                     "high_sensitivity": binary_metrics(y, p, decision.slice_threshold)}
    metrics["intervals"] = intervals(y, p, groups, {"default": 0.5, "high_sensitivity": decision.slice_threshold}, n_boot)
    metrics["calibration"] = {"ece": expected_calibration_error(y, p)}
    if groups is not None:
        metrics["study_high_sensitivity"] = binary_metrics(
            *study_arrays(groups, y, p, decision.study_aggregate), decision.study_threshold)
    order = slice_order(ds, inputs)
    context_note = None
    if decision.context is not None and (groups is None or order is None):
        context_note = "the model's slice context not applied: the data has no patient IDs and slice numbers"
    elif decision.context is not None:
        c = decision.context
        pc = c.model.apply(p, groups, order)
        metrics["context_default"] = binary_metrics(y, pc, 0.5)
        metrics["context_high_sensitivity"] = binary_metrics(y, pc, c.slice_threshold)
        metrics["context_intervals"] = intervals(y, pc, groups, {"default": 0.5, "high_sensitivity": c.slice_threshold},
                                                 n_boot)
        metrics["context_study_high_sensitivity"] = binary_metrics(
            *study_arrays(groups, y, pc, decision.study_aggregate), c.study_threshold)

    banners = []
    seen = sum(ds.records[i].key in used for i in inputs.indices)
    if seen:
        banners.append(f"{seen} of {len(y)} slices were in this model's training or validation split: these numbers "
                       "are inflated; evaluate with --unseen-only (the run's test patients) or on other data.")
    if not ds.has_patients:
        banners.append("No patient IDs: intervals resample images, so they are too narrow, and any near-duplicate "
                       "slices of training patients inflate the result (run `ichedge audit`).")

    with run_folder(Path(out_root), "evaluate") as folder:
        (folder.tmp / "plots").mkdir()
        points = {"0.5": metrics["default"], "high-sensitivity": metrics["high_sensitivity"]}
        if len(set(y.tolist())) == 2:
            plot_roc(y, p, points, folder.tmp / "plots" / "roc.png")
            plot_pr(y, p, points, folder.tmp / "plots" / "precision_recall.png")
        plot_reliability(y, p, folder.tmp / "plots" / "reliability.png")
        plot_confusion(metrics["high_sensitivity"], folder.tmp / "plots" / "confusion_high_sensitivity.png",
                       f"threshold {decision.slice_threshold:.3f} (the model's validated one)")
        summary = {"model": str(model), "kind": predictor.kind, "dataset": ds.summary(), "source": str(ds.source),
                   "slices_seen_in_training": seen, "skipped_images": inputs.errors, "decision": decision.to_json()}
        if context_note:
            summary["context_note"] = context_note
        (folder.tmp / "metrics.json").write_text(json.dumps({**summary, **metrics}, indent=2, default=str))
        with (folder.tmp / "predictions.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["file", "patient", "label", "probability"])
            for i, label, prob in zip(inputs.indices, y, p):
                r = ds.records[i]
                w.writerow([r.path, r.patient or "", int(label), f"{prob:.6f}"])
        report = Report(f"Evaluation of {model.name} on {ds.name}", banners=banners)
        report.paragraph(f"{ds.summary()}. Model: {predictor.kind}, thresholds as validated at training "
                         f"(slice {decision.slice_threshold:.3f}; study: {decision.study_aggregate} of slices >= "
                         f"{decision.study_threshold:.3f}). 95% intervals resample {metrics['intervals']['resampled']}.")
        report.table(metric_rows(metrics))
        report.paragraph(f"Calibration: ECE {metrics['calibration']['ece']:.3f}.")
        report.plots(sorted((folder.tmp / "plots").glob("*.png")))
        report.code(summary)
        card = predictor.source.parent / "model_card.md"
        if card.is_file():
            report.link("model card", card.resolve().as_uri())
        report.write(folder.tmp / "report.html", ds.credit)
    return folder.path, {**summary, **metrics}
