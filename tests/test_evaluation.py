import numpy as np
import pytest

from ichedge.evaluation import binary_metrics, evaluate_split, summarise_folds, threshold_for_sensitivity


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
