"""Metrics the paper reports and the ones a clinician needs, thresholds, intervals, calibration.

The pure core: numbers in, numbers out, no files and no Keras. Plots are in :mod:`ichedge.plots`,
HTML reports in :mod:`ichedge.report`, and evaluating a saved model on a dataset in
:mod:`ichedge.evaluate`.

The paper's columns are loss, accuracy and the TP/FP/FN/TN rates *within each true class*
(TP rate = TP/(TP+FN), FP rate = FP/(FP+TN), ...). ichedge adds sensitivity, specificity, PPV,
NPV and ROC AUC, at the default 0.5 threshold and at a high-sensitivity threshold chosen on the
validation split (never on the test split).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.stats import rankdata
from sklearn.metrics import confusion_matrix, log_loss, roc_auc_score, roc_curve

from ichedge.studies import study_arrays

if TYPE_CHECKING:  # annotations only: the core stays free of Keras and of run folders
    from ichedge.thresholds import Decision


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def is_collapsed(probabilities: np.ndarray, min_sd: float = 1e-3, min_distinct: int = 5) -> bool:
    """Whether a model's scores on real slices are (near) constant: sd below ``min_sd``, or fewer than
    ``min_distinct`` distinct values at 4 decimals (a threshold, not a score). Such a model has not
    learnt to tell slices apart and must not be exported silently."""
    p = np.asarray(probabilities, np.float64).reshape(-1)
    return bool(len(p) == 0 or p.std() < min_sd or len(np.unique(np.round(p, 4))) < min_distinct)


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


def paired_difference(
    y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray, groups: Sequence[str] | None, t_a: float, t_b: float,
    n_boot: int = 2000, seed: int = 0, level: float = 0.95,
) -> dict[str, dict[str, float]]:
    """Model B minus model A on the same slices, each at its own threshold: AUC and sensitivity,
    with percentile intervals from resampling *patients*, the same draw for both models (paired).

    Returns {metric: {"a", "b", "difference", "low", "high"}}.
    """
    y = np.asarray(y).astype(int)
    p_a, p_b = np.asarray(p_a, np.float64), np.asarray(p_b, np.float64)
    keys = np.asarray(groups) if groups is not None else np.arange(len(y)).astype(str)
    members = [np.nonzero(keys == g)[0] for g in np.unique(keys)]
    rng = np.random.default_rng(seed)
    names = ("auc", "sensitivity")
    draws: dict[str, list[float]] = {m: [] for m in names}
    for _ in range(n_boot):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        a, b = _fast_metrics(y[idx], p_a[idx], t_a), _fast_metrics(y[idx], p_b[idx], t_b)
        for k in names:
            if not np.isnan(a[k] - b[k]):
                draws[k].append(b[k] - a[k])
    a, b = _fast_metrics(y, p_a, t_a), _fast_metrics(y, p_b, t_b)
    alpha = (1 - level) / 2
    out = {}
    for k in names:
        d = np.array(draws[k])
        low, high = np.quantile(d, [alpha, 1 - alpha]) if len(d) else (np.nan, np.nan)
        out[k] = {"a": a[k], "b": b[k], "difference": b[k] - a[k], "low": float(low), "high": float(high)}
    return out


def rank_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic on average ranks: the value ``roc_auc_score`` gives
    (ties count half), about 20 times faster, which is what thousands of bootstrap draws need.

    >>> rank_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.5, 0.5, 0.9]))
    0.875
    """
    positives = int(y.sum())
    negatives = len(y) - positives
    if not positives or not negatives:
        return float("nan")
    ranks = rankdata(p)
    return float((ranks[y == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _fast_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    pred = p >= threshold
    tp, fn = int((pred & (y == 1)).sum()), int((~pred & (y == 1)).sum())
    fp, tn = int((pred & (y == 0)).sum()), int((~pred & (y == 0)).sum())
    return {"auc": rank_auc(y, p),
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


# --- a model's figures at its own thresholds ----------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    """A model's figures on labelled slices at the thresholds it was validated with.

    ``metrics`` holds the operating points (``default`` at 0.5, ``high_sensitivity`` at the
    validated threshold), ``intervals``, ``calibration``, ``study_high_sensitivity`` where
    patients are known, and the same prefixed ``context_`` for a model with a slice-context
    stage; ``notes`` says what could not be computed and why.
    """

    y: np.ndarray
    p: np.ndarray
    metrics: dict
    notes: list[str] = field(default_factory=list)


def evaluate(y: np.ndarray, p: np.ndarray, decision: Decision, groups: np.ndarray | None = None,
             order: np.ndarray | None = None, n_boot: int = 2000, sources: np.ndarray | None = None) -> Evaluation:
    """Score probabilities ``p`` of slices labelled ``y`` at ``decision``'s thresholds, never
    re-chosen on these data. ``groups`` (patients) adds study metrics and patient-resampled
    intervals; with ``order`` (slice numbers) too, a slice-context stage is applied. ``sources``
    (each slice's hospital or collection) adds the same figures per source, under ``by_source``."""
    scored = _at_thresholds(y, p, decision.slice_threshold, decision.study_threshold, decision.study_aggregate,
                            groups, n_boot)
    metrics = {k: scored[k] for k in ("default", "high_sensitivity", "intervals")}
    metrics["calibration"] = {"ece": expected_calibration_error(y, p)}
    metrics.update(scored)  # and the study level, where patients are known
    notes = []
    if decision.context is not None and (groups is None or order is None):
        notes.append("the model's slice context not applied: the data has no patient IDs and slice numbers")
    context = None
    if decision.context is not None and groups is not None and order is not None:
        c = decision.context
        context = (c.model.apply(p, groups, order), c.slice_threshold, c.study_threshold)
        scored = _at_thresholds(y, context[0], c.slice_threshold, c.study_threshold, decision.study_aggregate, groups,
                                n_boot)
        metrics.update({f"context_{k}": v for k, v in scored.items()})
    if sources is not None:
        metrics.update(per_source(sources, y, p, decision.slice_threshold, decision.study_threshold,
                                  decision.study_aggregate, groups, n_boot, context))
    return Evaluation(np.asarray(y), np.asarray(p), metrics, notes)


def per_source(sources: np.ndarray, y: np.ndarray, p: np.ndarray, slice_threshold: float, study_threshold: float,
               aggregate: str, groups: np.ndarray | None, n_boot: int = 1000,
               context: tuple[np.ndarray, float, float] | None = None) -> dict:
    """``{"by_source": {source: figures}}`` where the slices come from more than one source, else ``{}``.

    Each source gets the figures of :func:`evaluate` at the same thresholds (never one chosen
    per source); ``context`` is (context scores, their slice and study thresholds).
    A source without normal slices or studies leaves specificity and AUC undefined (NaN).
    """
    sources = np.asarray(sources)
    if len(set(sources.tolist())) < 2:
        return {}
    out = {}
    for name in sorted(set(sources.tolist())):
        m = sources == name
        g = None if groups is None else np.asarray(groups)[m]
        entry = _at_thresholds(y[m], p[m], slice_threshold, study_threshold, aggregate, g, n_boot)
        if context is not None:
            scored = _at_thresholds(y[m], context[0][m], context[1], context[2], aggregate, g, n_boot)
            entry.update({f"context_{k}": v for k, v in scored.items()})
        out[name] = entry
    return {"by_source": out}


def _at_thresholds(y: np.ndarray, p: np.ndarray, slice_threshold: float, study_threshold: float, aggregate: str,
                   groups: np.ndarray | None, n_boot: int) -> dict:
    out: dict = {"default": binary_metrics(y, p, 0.5), "high_sensitivity": binary_metrics(y, p, slice_threshold)}
    out["intervals"] = intervals(y, p, groups, {"default": 0.5, "high_sensitivity": slice_threshold}, n_boot)
    if groups is not None:
        out["study_high_sensitivity"] = binary_metrics(*study_arrays(groups, y, p, aggregate), study_threshold)
    return out
