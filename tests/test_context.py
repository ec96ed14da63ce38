"""Slice context: features from ordered studies, fitting, persistence, and training with it."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ichedge.context import FEATURES, STAGES, SliceContext, context_features
from ichedge.data import DataError, read_manifest, train_val_test_split
from ichedge.evaluation import binary_metrics, evaluate_split
from ichedge.runs import RunFolder
from ichedge.sweep import ConfigResult, write_tables
from ichedge.training import TrainConfig, train


def _logit(p):
    return np.log(p / (1 - p))


def test_features_follow_slice_order_not_input_order():
    probs = np.array([0.5, 0.9, 0.1, 0.2, 0.3])
    order = np.array([3, 1, 2, 5, 4])  # slice numbers, shuffled
    z = context_features(probs, ["a"] * 5, order)
    col = {name: z[:, i] for i, name in enumerate(FEATURES)}
    # along the scan: slice 1 (0.9), 2 (0.1), 3 (0.5), 4 (0.3), 5 (0.2)
    assert col["logit_below"][0] == pytest.approx(_logit(0.1))   # slice 3's slice 2
    assert col["logit_above"][0] == pytest.approx(_logit(0.3))   # slice 3's slice 4
    assert col["logit_below2"][0] == pytest.approx(_logit(0.9))
    assert col["logit_above2"][0] == pytest.approx(_logit(0.2))
    assert col["logit_adjacent_max"][0] == pytest.approx(_logit(0.3))
    assert col["logit_below"][1] == pytest.approx(_logit(0.9)), "the first slice repeats itself below"
    assert col["logit_above"][3] == pytest.approx(_logit(0.2)), "the last slice repeats itself above"
    assert col["position"].tolist() == pytest.approx([0.5, 0.0, 0.25, 1.0, 0.75])
    assert col["study_top3"][0] == pytest.approx(_logit(np.array([0.9, 0.5, 0.3])).mean())
    assert np.allclose(col["study_mean"], _logit(probs).mean())


def test_studies_do_not_see_each_other():
    probs = np.array([0.9, 0.9, 0.1, 0.1])
    z = context_features(probs, ["a", "a", "b", "b"], [1, 2, 1, 2])
    col = dict(zip(FEATURES, z.T))
    assert col["study_mean"][2:] == pytest.approx([_logit(0.1)] * 2)
    assert col["logit_below"][2] == pytest.approx(_logit(0.1))
    lone = dict(zip(FEATURES, context_features(np.array([0.7]), ["c"], [4]).T))
    assert lone["position"][0] == 0.5


def test_mismatched_lengths_and_nan_are_refused():
    with pytest.raises(ValueError, match="differ in length"):
        context_features(np.array([0.5, 0.5]), ["a"], [1, 2])
    with pytest.raises(ValueError, match="finite"):
        context_features(np.array([0.5, np.nan]), ["a", "a"], [1, 2])


def _studies(rng, n_studies=60, slices=20):
    """Bleeds span 3-6 adjacent slices; slice scores are noisy, so neighbours carry evidence.

    Studies arrive in shuffled order: the context must follow slice positions, not input order.
    """
    probs, y, groups, order = [], [], [], []
    for s in range(n_studies):
        position = rng.permutation(slices)
        labels = np.zeros(slices, int)
        if s % 2 == 0:
            start = rng.integers(2, slices - 8)
            labels = ((position >= start) & (position < start + rng.integers(3, 7))).astype(int)
        logits = 1.5 * labels - 1.5 + rng.normal(0, 1.3, slices)
        probs += list(1 / (1 + np.exp(-logits)))
        y += list(labels)
        groups += [f"s{s}"] * slices
        order += list(position)
    return np.array(probs), np.array(y), np.array(groups), np.array(order, float)


def test_context_beats_lone_slices_when_bleeds_span_slices():
    probs, y, groups, order = _studies(np.random.default_rng(0))
    train = np.isin(groups, [f"s{i}" for i in range(40)])
    ctx = SliceContext.fit(probs[train], y[train], groups[train], order[train])
    test = ~train
    slice_auc = roc_auc_score(y[test], probs[test])
    context_auc = roc_auc_score(y[test], ctx.apply(probs[test], groups[test], order[test]))
    assert context_auc > slice_auc + 0.03, (slice_auc, context_auc)
    shuffled = SliceContext.fit(probs[train], y[train], groups[train], np.random.default_rng(1).permutation(order[train]))
    wrong = roc_auc_score(y[test], shuffled.apply(probs[test], groups[test], order[test]))
    assert wrong < context_auc - 0.02, "neighbours by input order instead of slice position would lose the gain"


def test_context_model_round_trips_through_json():
    rng = np.random.default_rng(1)
    probs, y, groups, order = _studies(rng, 20)
    ctx = SliceContext.fit(probs, y, groups, order)
    again = SliceContext.from_json(json.loads(json.dumps(ctx.to_json())))
    assert np.allclose(again.apply(probs, groups, order), ctx.apply(probs, groups, order))
    stale = {**ctx.to_json(), "features": ["logit"]}
    with pytest.raises(ValueError, match="not this version"):
        SliceContext.from_json(stale)
    with pytest.raises(ValueError, match="incomplete or malformed"):
        SliceContext.from_json({k: v for k, v in ctx.to_json().items() if k != "coef"})
    with pytest.raises(ValueError, match="needs 10 means, scales and weights"):
        SliceContext.from_json({**ctx.to_json(), "coef": [1.0, 2.0]})


def test_context_needs_a_frozen_backbone_and_patients(tmp_path, synthetic_manifest):
    with pytest.raises(ValueError, match="context needs the frozen-backbone training only"):
        TrainConfig(context=True, fine_tune_epochs=1)
    ds = read_manifest(synthetic_manifest)
    no_patients = replace(ds, has_patients=False)
    split = train_val_test_split(no_patients, seed=0)
    with pytest.raises(DataError, match="needs patient IDs and slice numbers"):
        train(TrainConfig(size=32, context=True, epochs=1), no_patients, split, tmp_path, progress=False)


def test_random_weights_skip_context_loudly(interrupted_sweep):
    run = interrupted_sweep.folder / "32px-a0.1-gray-context"  # alpha 0.1 has no ImageNet weights
    metrics = json.loads((run / "metrics.json").read_text())
    assert "random weights" in metrics["context_skipped"]["reason"]
    assert "NO SLICE CONTEXT" in interrupted_sweep.log and not (run / "context.json").exists()
    assert "Slice context was asked for and skipped" in (run / "report.html").read_text()


def test_sweep_table_with_and_without_context_columns(tmp_path, synthetic_manifest):
    """A random-weights row has no context figures: the table keeps every column, "-" where missing."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    p = np.clip(y * 0.3 + rng.uniform(0, 0.7, 60), 0, 1)
    plain = {**evaluate_split(y, p, y, p, 0.95), "study_high_sensitivity": binary_metrics(y, p, 0.5)}
    with_context = {**plain, **{f"context_{k}": v for k, v in plain.items()}}
    pretrained = ConfigResult(TrainConfig(size=32, context=True), "ImageNet (bundled)", "frozen 10 ep",
                              [with_context] * 2, ["a0", "a1"], 1.0, [{}, {}])
    random = ConfigResult(TrainConfig(size=32, alpha=0.1, context=True), "RANDOM", "from scratch, 10 ep",
                          [plain] * 2, ["b0", "b1"], 1.0, [{}, {}])
    ds = read_manifest(synthetic_manifest)
    for k, results in enumerate(([pretrained, random], [random, pretrained])):
        out = tmp_path / str(k)
        out.mkdir()
        write_tables(out, results, ds, 2)
        rows = list(csv.DictReader((out / "results.csv").open()))
        by_alpha = {r["alpha"]: r for r in rows}
        assert by_alpha["0.1"]["context AUC"] == "-" and by_alpha["0.35"]["context AUC"].startswith("0.")
        table = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("|")]
        assert len({line.count("|") for line in table}) == 1, "every Markdown row has every column"


@pytest.mark.integration
def test_training_with_context_on_real_ct_subset(real_subset, tmp_path):
    """On real CT the stage fits, re-scores and is reported (the multilevel head: fitted in one go)."""
    ds = read_manifest(real_subset)
    config = TrainConfig(size=96, head="multilevel", context=True)
    run, result = train(config, ds, train_val_test_split(ds, seed=0), tmp_path, progress=False)
    assert run.name.endswith("-context")
    m = json.loads((run / "metrics.json").read_text())
    for point in ("context_default", "context_high_sensitivity", "context_study_high_sensitivity"):
        assert m[point]["n"] > 0
    assert m["context_validation"]["sensitivity"] >= 0.95, "context threshold chosen on validation"
    assert m["context_default"]["n"] == m["default"]["n"]
    ctx = SliceContext.from_json(json.loads((run / "context.json").read_text()))
    assert ctx == result.context
    saved = RunFolder.open(run).predictions()
    assert not np.allclose(saved["test_context_p"], saved["test_p"]), "context re-scores the slices"
    assert roc_auc_score(saved["test_y"], saved["test_context_p"]) == pytest.approx(m["context_default"]["auc"])
    assert (run / "plots" / "roc_context.png").is_file()
    assert "slice context, high-sensitivity threshold" in (run / "report.html").read_text()


def test_the_context_stage_is_registered_with_what_it_needs():
    assert STAGES.get("context") is SliceContext
    assert SliceContext.needs == {"patients", "slice_order"}
    with pytest.raises(ValueError, match="unknown study stage 'sequence'; choose one of: context"):
        STAGES.get("sequence")
