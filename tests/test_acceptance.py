"""On-site acceptance (`ichedge calibrate`): the bounds on synthetic scores, and the command end to end."""

import csv
import json
import logging
import shutil

import numpy as np
import pytest
from scipy.stats import binomtest

from conftest import write_manifest, write_rows
from ichedge.acceptance import (InsufficientSample, calibrate, clopper_pearson_lower, positives_needed,
                                slice_sensitivity_lower)
from ichedge.cli import main
from ichedge.export import model_card_markdown, site_thresholds
from ichedge.runs import SITE_PROFILES, WORKLIST, RunFolder
from ichedge.runtimes import Predictor
from ichedge.service import TriageService
from ichedge.thresholds import Decision


def sample(patients: int, slices: int = 10, positive_share: float = 0.5, seed: int = 0):
    """Slice labels, scores and patients: the first ``positive_share`` of patients bleed on 4
    slices; scores are noisy, higher on bleeds."""
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"p{i:03d}" for i in range(patients)], slices)
    y = np.zeros(patients * slices, int)
    for i in range(int(patients * positive_share)):
        y[i * slices + 3:i * slices + 7] = 1
    return y, np.clip(rng.normal(0.3 + 0.4 * y, 0.15), 0, 1), groups


# --- the bounds -----------------------------------------------------------------------------------


def test_clopper_pearson_lower_bound_matches_known_values():
    # 8 of 10: the one-sided 95% bound is the two-sided 90% exact interval's lower end, 0.4931
    assert clopper_pearson_lower(8, 10, 0.95) == pytest.approx(0.4931, abs=1e-4)
    for k, n in ((1, 5), (17, 20), (40, 41), (99, 120)):
        assert clopper_pearson_lower(k, n, 0.95) == pytest.approx(
            binomtest(k, n).proportion_ci(0.90, method="exact").low, abs=1e-9)
    assert clopper_pearson_lower(0, 30, 0.95) == 0.0
    assert clopper_pearson_lower(12, 12, 0.95) == pytest.approx(0.05 ** (1 / 12))


def test_sensitivity_090_at_95_percent_needs_29_positive_patients():
    assert positives_needed(0.90, 0.95) == 29
    assert clopper_pearson_lower(28, 28, 0.95) < 0.90 <= clopper_pearson_lower(29, 29, 0.95)
    assert positives_needed(0.80, 0.90) == 11


def test_too_few_positive_patients_are_refused_with_the_number_needed():
    y, p, groups = sample(56)  # 28 bleeding patients
    p = y.astype(float)  # a perfect model: the sample, not the scores, is what falls short
    with pytest.raises(InsufficientSample, match=r"at least 29 positive patients are needed \(the sample has 28\)") \
            as refused:
        calibrate(y, p, groups, "top3")
    assert (refused.value.needed, refused.value.have) == (29, 28)
    calibrate(*sample(58), "top3")  # 29 are enough


def test_the_patient_bootstrap_bound_is_below_the_estimate_and_sees_correlated_misses():
    # 30 bleeding patients of 10 positive slices each, 30 of the 300 slices missed (score 0):
    # spread one per patient, or all of three patients. Slice sensitivity is 0.9 either way.
    groups = np.repeat([f"p{i:02d}" for i in range(30)], 10)
    y = np.ones(300, int)
    spread, clustered = np.ones(300), np.ones(300)
    spread[::10] = 0
    clustered[:30] = 0
    t = np.array([0.5])
    low_spread = slice_sensitivity_lower(y, spread, groups, t, 0.95)[0]
    low_clustered = slice_sensitivity_lower(y, clustered, groups, t, 0.95)[0]
    assert low_spread == pytest.approx(0.9)  # no patient differs from another: nothing to resample
    assert low_clustered < 0.85  # whole patients missed: the bound must widen
    y, p, groups = sample(60, seed=3)
    point = (p[y == 1] >= 0.6).mean()
    assert 0.5 < slice_sensitivity_lower(y, p, groups, np.array([0.6]), 0.95)[0] < point < 1


def test_the_highest_threshold_whose_bound_reaches_the_target_is_chosen():
    y, p, groups = sample(120, seed=1)  # 60 bleeding patients
    cal = calibrate(y, p, groups, "top3", 0.90, 0.95, seed=7)
    assert cal == calibrate(y, p, groups, "top3", 0.90, 0.95, seed=7)  # seeded
    # slices: the bound reaches 0.90 at the chosen threshold, not at the next positive score above it
    above = np.unique(p[y == 1])
    above = above[above > cal.slice.threshold].min()
    low = slice_sensitivity_lower(y, p, groups, np.array([cal.slice.threshold, above]), 0.95, seed=7)
    assert low[0] >= 0.90 > low[1]
    assert cal.slice.lower_bound == pytest.approx(low[0]) and cal.slice.lower_bound <= cal.slice.sensitivity
    # studies: the k-th highest positive study score, k the fewest flagged positives that reach 0.90
    assert 0.90 <= cal.study.lower_bound == pytest.approx(clopper_pearson_lower(59, 60, 0.95))
    assert clopper_pearson_lower(58, 60, 0.95) < 0.90
    assert cal.study.sensitivity == 59 / 60
    assert cal.slice.specificity is not None and 0 < cal.study.specificity <= 1
    assert cal.counts == {"slices": 1200, "positive_slices": 240, "negative_slices": 960, "patients": 120,
                          "positive_patients": 60, "negative_patients": 60}


def test_a_sample_without_negative_patients_gets_thresholds_and_no_study_specificity():
    y, p, groups = sample(35, positive_share=1.0)  # every patient bleeds, as at PHE-SICH
    cal = calibrate(y, p, groups, "top3", shipped=(0.5, 0.5))
    assert cal.study.specificity is None and cal.shipped_study.specificity is None
    assert cal.slice.specificity is not None  # their slices without a bleed still count
    assert any("study specificity not measurable" in n for n in cal.notes)
    only_bleeds = y == 1
    cal = calibrate(y[only_bleeds], p[only_bleeds], groups[only_bleeds], "top3")
    assert cal.slice.specificity is None and any("slice specificity not measurable" in n for n in cal.notes)


# --- the command ----------------------------------------------------------------------------------


def site_sample(root, patients: int, seed: int):
    """A synthetic site sample whose patient IDs are easy to find in any file (``SITEPID...``)."""
    manifest = write_manifest(root, patients=patients, seed=seed)
    rows = list(csv.DictReader(manifest.open(newline="")))
    for row in rows:
        row["patient"] = f"SITEPID{int(row['patient']):04d}"
    return write_rows(manifest, rows)


def test_calibrate_writes_a_profile_that_predict_uses_and_refuses_a_small_sample(tiny_run, tiny_export, tmp_path,
                                                                                 capsys, caplog):
    run = shutil.copytree(tiny_run, tmp_path / "run")  # the shared run stays without site profiles
    data = site_sample(tmp_path / "site", patients=60, seed=5)  # 30 bleeding patients: enough for 0.90 at 95%
    assert main(["calibrate", str(run), str(data), "--site", "st-elsewhere", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "30 with a bleed" in out and "lower bound" in out
    (first,) = (run / SITE_PROFILES).glob("st-elsewhere-*.json")
    text = first.read_text()
    profile = json.loads(text)
    assert "SITEPID" not in text  # never a patient ID
    assert profile["model"]["runtime"].startswith("int8") and profile["model"]["file"].endswith(".tflite")
    assert profile["sample"]["positive_patients"] == 30 and profile["sample"]["patients"] == 60
    assert profile["slice"]["lower_bound"] >= 0.90 and profile["study"]["lower_bound"] >= 0.90
    assert profile["thresholds"]["slice"] == profile["slice"]["threshold"]

    # recalibrating keeps the first profile; the newest is used
    assert main(["calibrate", str(run), str(data), "--site", "st-elsewhere", "--seed", "1", "--quiet"]) == 0
    (second,) = set((run / SITE_PROFILES).glob("st-elsewhere-*.json")) - {first}
    assert first.read_text() == text
    newest = RunFolder.open(run).site_profile("st-elsewhere")
    assert newest == json.loads(second.read_text()) != profile  # the seed is recorded, so the two differ

    # predict at the site's thresholds, on the runtime it was calibrated with
    images = sorted((tmp_path / "site" / "brain").glob("000_*.png"))
    model = RunFolder.open(run).latest_export().model_file("int8")
    capsys.readouterr()
    assert main(["predict", *map(str, images), "--model", str(model), "--site", "st-elsewhere",
                 "--out", str(tmp_path / "out")]) == 0
    assert f"slice threshold {newest['thresholds']['slice']:.3f}" in capsys.readouterr().out
    (worklist,) = (tmp_path / "out").glob(f"*/{WORKLIST}.json")
    written = json.loads(worklist.read_text())
    assert (written["slice_threshold"], written["study_threshold"], written["site"]) == (
        newest["thresholds"]["slice"], newest["thresholds"]["study"], "st-elsewhere")

    # a card written by `export --site` (its conversion is left out: a minute) states the site's
    # thresholds and bounds, and ichedge applies them; serve takes the site too
    card = RunFolder.open(run).latest_export().card()
    with caplog.at_level(logging.WARNING, logger="ichedge"):
        thresholds = {**card["thresholds"], "site": site_thresholds(newest, card["files"])}
        assert "calibrated on" not in caplog.text  # the export holds the model file it was calibrated on
        site_thresholds(newest, {})
        assert "which this export does not hold" in caplog.text
    caplog.clear()
    markdown = model_card_markdown({**card, "thresholds": thresholds})
    assert "## Site thresholds: st-elsewhere" in markdown
    assert f"lower bound {newest['slice']['lower_bound']:.3f}" in markdown
    decision = Decision.from_thresholds(thresholds, newest["model"]["runtime"])
    assert (decision.site, decision.slice_threshold) == ("st-elsewhere", newest["thresholds"]["slice"])
    served = TriageService(run, site="st-elsewhere", explain=False).predictor.decision
    assert (served.site, served.study_threshold) == ("st-elsewhere", newest["thresholds"]["study"])

    # another runtime is warned about; an unknown site names the known ones
    with caplog.at_level(logging.WARNING, logger="ichedge"):
        decision = Predictor.load(run, site="st-elsewhere").decision
    assert decision.slice_threshold == newest["thresholds"]["slice"] and decision.context is None
    assert "calibrated on int8" in caplog.text
    assert main(["predict", *map(str, images), "--model", str(model), "--site", "nowhere",
                 "--out", str(tmp_path / "out")]) == 2
    assert "no site profile 'nowhere'; known sites: st-elsewhere" in capsys.readouterr().err

    # 4 bleeding patients cannot support 0.90 at 95%: exit 2, with the number needed
    small = site_sample(tmp_path / "small", patients=8, seed=6)
    assert main(["calibrate", str(run), str(small), "--site", "tiny", "--quiet"]) == 2
    assert "at least 29 positive patients are needed (the sample has 4)" in capsys.readouterr().err
    assert not list((run / SITE_PROFILES).glob("tiny-*"))
