import numpy as np
import pytest

from ichedge.context import SliceContext
from ichedge.evaluation import (
    binary_metrics, evaluate, evaluate_split, per_source, summarise_folds, threshold_for_sensitivity,
)
from ichedge.thresholds import ContextDecision, Decision


def test_binary_metrics_match_a_hand_count():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.6, 0.2, 0.7, 0.3, 0.2, 0.1, 0.1, 0.05])
    m = binary_metrics(y, p, 0.5)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 1, 5)
    assert m["tp_rate"] == pytest.approx(0.75) and m["fn_rate"] == pytest.approx(0.25)
    assert m["fp_rate"] == pytest.approx(1 / 6) and m["tn_rate"] == pytest.approx(5 / 6)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["ppv"] == pytest.approx(0.75) and m["npv"] == pytest.approx(5 / 6)
    # 24 pairs: 0.9 and 0.8 beat all 6 negatives, 0.6 beats 5, 0.2 beats 3 and ties 1
    assert m["auc"] == pytest.approx(20.5 / 24)
    assert m["loss"] == pytest.approx(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


@pytest.mark.parametrize("seed", range(40))
def test_threshold_reaches_target_sensitivity_with_best_specificity(seed):
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(40), np.zeros(200)]
    p = np.r_[rng.uniform(0.3, 1, 40), rng.uniform(0, 0.7, 200)]
    t = threshold_for_sensitivity(y, p, 0.95)
    assert binary_metrics(y, p, t)["sensitivity"] >= 0.95
    higher = np.unique(p[p > t])[0]  # the next threshold up already misses the target
    assert binary_metrics(y, p, higher)["sensitivity"] < 0.95


def test_saturated_probabilities_still_count_as_positive():
    y = np.array([0, 1, 1])
    p = np.array([0.2, 1.0, 1.0])  # float32 sigmoids saturate to exactly 1
    t = threshold_for_sensitivity(y, p, 1.0)
    m = binary_metrics(y, p, t)
    assert t == 1.0 and m["sensitivity"] == 1.0 and m["specificity"] == 1.0
    assert np.isfinite(m["loss"])


def test_threshold_needs_positives():
    with pytest.raises(ValueError, match="no positive"):
        threshold_for_sensitivity(np.zeros(5), np.linspace(0, 1, 5))


def test_evaluate_split_applies_the_validation_threshold_to_test():
    y = np.array([0, 0, 1, 1])
    out = evaluate_split(y, np.array([0.1, 0.3, 0.35, 0.9]), y, np.array([0.2, 0.4, 0.3, 0.8]), 1.0)
    assert out["high_sensitivity"]["threshold"] == pytest.approx(0.35)
    assert out["high_sensitivity"]["tp"] == 1  # 0.3 < 0.35 on test: missed
    assert out["default"]["threshold"] == 0.5


def test_summarise_folds_mean_and_sd():
    folds = [{"default": {"auc": 0.8}}, {"default": {"auc": 0.9}}, {"default": {"auc": 1.0}}]
    s = summarise_folds(folds)["default"]["auc"]
    assert s["mean"] == pytest.approx(0.9) and s["sd"] == pytest.approx(0.1) and s["n"] == 3


def test_summarise_folds_counts_undefined_values():
    folds = [{"d": {"ppv": float("nan")}}, {"d": {"ppv": 0.5}}, {"d": {"ppv": float("nan")}}]
    s = summarise_folds(folds)["d"]["ppv"]
    assert s["mean"] == 0.5 and s["n"] == 1 and np.isnan(s["sd"])


def test_bootstrap_resamples_patients_not_slices():
    from ichedge.evaluation import bootstrap_ci

    rng = np.random.default_rng(0)
    patients = np.repeat([f"p{i}" for i in range(12)], 20)  # 12 patients x 20 identical slices
    y = np.repeat(rng.integers(0, 2, 12), 20)
    y[:20], y[20:40] = 1, 0  # both classes present
    p = np.repeat(rng.uniform(0, 1, 12), 20)
    by_patient = bootstrap_ci(y, p, patients, 0.5, n_boot=500, seed=1)
    by_image = bootstrap_ci(y, p, None, 0.5, n_boot=500, seed=1)
    for m in ("auc", "sensitivity", "specificity"):
        assert by_patient[m]["low"] <= by_patient[m]["value"] <= by_patient[m]["high"]
        width_patient = by_patient[m]["high"] - by_patient[m]["low"]
        width_image = by_image[m]["high"] - by_image[m]["low"]
        assert width_patient > 2 * width_image, m  # 12 independent units, not 240
    assert bootstrap_ci(y, p, patients, 0.5, n_boot=200, seed=3) == bootstrap_ci(y, p, patients, 0.5, n_boot=200, seed=3)


def test_expected_calibration_error_and_temperature():
    from ichedge.evaluation import apply_temperature, expected_calibration_error, fit_temperature

    y = np.array([1] * 25 + [0] * 75)
    assert expected_calibration_error(y, np.full(100, 0.25)) == pytest.approx(0.0)
    assert expected_calibration_error(np.zeros(10), np.full(10, 0.9)) == pytest.approx(0.9)
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, 20000)
    truth = rng.uniform(size=z.size) < 1 / (1 + np.exp(-z))
    overconfident = 1 / (1 + np.exp(-3 * z))
    t = fit_temperature(truth, overconfident)
    assert t == pytest.approx(3.0, abs=0.3)
    assert expected_calibration_error(truth, apply_temperature(overconfident, t)) < 0.3 * expected_calibration_error(truth, overconfident)


def test_pooled_intervals_use_each_fold_s_own_threshold():
    from ichedge.evaluation import pooled_intervals

    fold_a = (np.array([1, 0, 1, 0]), np.array([0.6, 0.5, 0.2, 0.1]), np.array(["a", "b", "c", "d"]), 0.55)
    fold_b = (np.array([1, 0]), np.array([0.3, 0.25]), np.array(["e", "f"]), 0.28)
    ci = pooled_intervals([fold_a, fold_b], n_boot=200)
    assert ci["sensitivity"]["value"] == pytest.approx(2 / 3)  # 0.6 >= 0.55 and 0.3 >= 0.28; 0.2 missed
    assert ci["specificity"]["value"] == pytest.approx(1.0)
    assert ci["auc"]["value"] == pytest.approx(6 / 9)  # pooled probabilities, one ranking


def test_evaluate_uses_the_models_own_thresholds_and_says_when_context_cannot_apply():
    rng = np.random.default_rng(0)
    y = np.tile([0, 0, 1, 1, 0], 8)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, len(y)), 0, 1)
    groups, order = np.repeat([f"p{i}" for i in range(8)], 5), np.tile(np.arange(5.0), 8)
    plain = Decision(0.4, 0.5, "max", 0.95)
    ev = evaluate(y, p, plain, groups, order, n_boot=200)
    assert list(ev.metrics) == ["default", "high_sensitivity", "intervals", "calibration", "study_high_sensitivity"]
    assert ev.metrics["high_sensitivity"] == binary_metrics(y, p, 0.4) and not ev.notes
    assert ev.metrics["study_high_sensitivity"]["threshold"] == 0.5 and ev.metrics["study_high_sensitivity"]["n"] == 8
    context = SliceContext.fit(p, y, groups, order)
    with_context = Decision(0.4, 0.5, "max", 0.95, ContextDecision(context, 0.45, 0.55))
    scored = evaluate(y, p, with_context, groups, order, n_boot=200)
    assert scored.metrics["context_high_sensitivity"] == binary_metrics(y, context.apply(p, groups, order), 0.45)
    assert scored.metrics["context_study_high_sensitivity"]["threshold"] == 0.55
    no_order = evaluate(y, p, with_context, groups, None, n_boot=200)
    assert not any(k.startswith("context_") for k in no_order.metrics)
    assert no_order.notes == ["the model's slice context not applied: the data has no patient IDs and slice numbers"]


def test_each_source_is_scored_at_the_same_thresholds():
    rng = np.random.default_rng(0)
    y = np.tile([0, 1], 20)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, 40), 0, 1)
    sources = np.array(["a"] * 24 + ["b"] * 16)
    groups = np.array([f"{s}:{i // 4}" for i, s in enumerate(sources)])
    assert per_source(np.array(["a"] * 40), y, p, 0.4, 0.6, "max", groups) == {}, "one source: nothing more"
    by = per_source(sources, y, p, 0.4, 0.6, "max", groups, n_boot=50)["by_source"]
    for name, m in by.items():
        mask = sources == name
        assert m["high_sensitivity"] == binary_metrics(y[mask], p[mask], 0.4)
        assert m["study_high_sensitivity"]["threshold"] == 0.6 and m["study_high_sensitivity"]["n"] == mask.sum() // 4
    only_bleeds = per_source(sources, np.ones(40, int), p, 0.4, 0.6, "max", groups, n_boot=20)["by_source"]["b"]
    assert np.isnan(only_bleeds["default"]["auc"]) and np.isnan(only_bleeds["high_sensitivity"]["specificity"])
