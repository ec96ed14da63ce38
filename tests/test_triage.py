"""Study scores, the worklist, Grad-CAM and `ichedge predict` over images and DICOM series."""

import json

import numpy as np
import pytest

from ichedge.cli import main
from ichedge.data import read_manifest, train_val_test_split
from ichedge.evaluation import evaluate_studies
from ichedge.explain import GradCAM, intracranial_mask, mass_inside
from ichedge.intake import Source, gather_sources, prepare_sources
from ichedge.preprocess import Preprocessing
from ichedge.runtimes import Predictor
from ichedge.studies import group_labels, group_scores, study_score
from ichedge.thresholds import Decision
from ichedge.training import TrainConfig, train
from ichedge.triage import SliceResult, build_worklist, triage
from tests.conftest import PHI, ct_phantom, write_ct_dicom, write_dicom_manifest


def test_study_scores():
    p = [0.1, 0.9, 0.5, 0.3]
    assert study_score(p, "max") == 0.9
    assert study_score(p, "top2") == pytest.approx(0.7)
    assert study_score(p, "top3") == pytest.approx(0.5666666)
    assert study_score(p, "top5") == pytest.approx(0.45)  # fewer slices than k: all of them
    assert study_score(p, "mean") == pytest.approx(0.45)
    for bad in ("median", "top0", "topx"):
        with pytest.raises(ValueError, match="unknown study aggregate"):
            study_score(p, bad)
    with pytest.raises(ValueError, match="at least one slice"):
        study_score([], "max")
    assert group_scores(["a", "b", "a"], [0.2, 0.4, 0.6], "max") == {"a": 0.6, "b": 0.4}
    assert group_labels(["a", "b", "a"], [0, 0, 1]) == {"a": 1, "b": 0}


def test_study_metrics_count_patients_and_use_a_validation_threshold():
    g_val, y_val, p_val = ["v1", "v1", "v2", "v2"], np.array([0, 1, 0, 0]), np.array([0.1, 0.6, 0.2, 0.3])
    g_te = ["t1", "t1", "t2", "t3", "t3"]
    y_te, p_te = np.array([1, 0, 0, 0, 0]), np.array([0.7, 0.2, 0.65, 0.1, 0.5])
    m = evaluate_studies(g_val, y_val, p_val, g_te, y_te, p_te, "max", 0.95)
    assert m["n"] == 3 and m["threshold"] == pytest.approx(0.6)  # v1's score: the lowest positive
    assert (m["tp"], m["fp"], m["tn"]) == (1, 1, 1) and m["auc"] == 1.0


def test_worklist_puts_flagged_studies_first_by_score():
    s = [SliceResult("a1", "A", 0, 0.2, False), SliceResult("a2", "A", 1, 0.9, True),
         SliceResult("b1", "B", 0, 0.4, False), SliceResult("c1", "C", 0, 0.95, True),
         SliceResult("d1", "D", 0, 0.1, False)]
    studies = build_worklist(s, slice_threshold=0.5, method="max")
    assert [x.study for x in studies] == ["C", "A", "B", "D"]
    assert [x.flagged for x in studies] == [True, True, False, False]
    assert studies[1].top_slices == [1, 0]
    # top2 with its own study threshold: A scores 0.55, B 0.4
    studies = build_worklist(s, slice_threshold=0.5, method="top2", study_threshold=0.5)
    assert [(x.study, x.flagged) for x in studies][:2] == [("C", True), ("A", True)]


def test_decision_of_a_model_card_without_study_fields_falls_back_to_any_slice():
    d = Decision.from_thresholds({"default": 0.5, "high_sensitivity": 0.07, "high_sensitivity_target": 0.95})
    assert (d.study_aggregate, d.study_threshold) == ("max", 0.07)


def test_intracranial_mask_and_mass_inside():
    yy, xx = np.mgrid[:40, :40]
    r = np.hypot(yy - 20, xx - 20)
    bone = np.where((r > 12) & (r < 15), 0.7, 0.3)  # a closed skull ring, brain at 0.3
    mask = intracranial_mask(bone)
    assert mask[20, 20] and not mask[20, 2] and not mask[20, 33]  # inside, outside, on the bone
    heat = np.zeros((40, 40))
    heat[18:22, 18:22] = 1.0
    heat[0:2, 0:2] = 1.0
    assert mass_inside(heat, mask) == pytest.approx(0.8)
    assert np.isnan(mass_inside(np.zeros((40, 40)), mask))


@pytest.fixture(scope="module")
def dicom_run(tmp_path_factory):  # a training fixture: conftest marks its tests integration
    """A three-window model trained on synthetic DICOM: the mode works from a DICOM manifest."""
    root = tmp_path_factory.mktemp("dicom")
    ds = read_manifest(write_dicom_manifest(root / "data", patients=12), windows=("brain", "subdural", "bone"))
    config = TrainConfig(size=32, alpha=0.35, channels="three-window", epochs=3)
    run, result = train(config, ds, train_val_test_split(ds, test=0.25, val=0.25), root / "runs", progress=False)
    return run, result


def test_training_records_study_level_metrics_and_the_mode(dicom_run):
    run, result = dicom_run
    st = result.metrics["study_high_sensitivity"]
    assert st["n"] == 3 and st["tp"] + st["fn"] >= 1  # 3 test patients of 12, one bleeds at least
    meta = json.loads((run / "config.json").read_text())
    assert meta["preprocessing"]["channels"] == "three-window" and meta["config"]["study_aggregate"] == "top3"


def _series(folder, rng, bleed_slices=(2, 3), order=(4, 0, 3, 1, 2), uid="7"):
    """Five slices written in shuffled order (file names disagree with anatomy)."""
    for name, s in zip("abcde", order):
        write_ct_dicom(folder / f"{name}.dcm", ct_phantom(rng, s in bleed_slices), z=5.0 * s, instance=s + 1,
                       study=f"1.2.826.0.1.3680043.8.498.{uid}", series=f"1.2.826.0.1.3680043.8.498.{uid}.2")


def test_predict_cli_on_dicom_series_with_bad_files_and_no_identifying_output(dicom_run, tmp_path, capsys, caplog):
    run, _ = dicom_run
    rng = np.random.default_rng(5)
    data = tmp_path / "incoming"
    _series(data / "study1", rng, uid="71")
    _series(data / "study2", rng, bleed_slices=(), uid="72")
    write_ct_dicom(data / "study2" / "mr.dcm", np.zeros((64, 64)), modality="MR")
    (data / "study2" / "broken.dcm").write_bytes((data / "study1" / "a.dcm").read_bytes()[:400])
    (data / "readme.txt").write_text("hello")
    out = tmp_path / "out"
    code = main(["predict", str(data), "--model", str(run), "--explain", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0
    (folder,) = out.iterdir()
    doc = json.loads((folder / "worklist.json").read_text())
    assert len(doc["worklist"]) == 2 and sum(s["slices"] for s in doc["worklist"]) == 10
    errors = " ".join(doc["errors"])
    assert "mr.dcm: modality MR, not CT" in errors and "broken.dcm" in errors and "readme.txt: not a PNG" in errors
    for study in doc["worklist"]:  # each series' slices in anatomical order, named without UIDs
        members = [s for s in doc["slices"] if s["study"] == study["study"]]
        assert sorted(m["index"] for m in members) == list(range(5))
        assert [m["file"][-5] for m in sorted(members, key=lambda m: m["index"])] == ["b", "d", "e", "c", "a"]
    flagged = [s for s in doc["slices"] if s["flagged"]]
    assert all((folder / s["heatmap"]).is_file() for s in flagged)
    assert all(s["heatmap"] is None for s in doc["slices"] if not s["flagged"])
    # nothing identifying, and no raw UID, anywhere: files written, stdout, stderr, logs
    texts = [printed.out, printed.err, caplog.text] + [p.read_text(errors="ignore") for p in folder.rglob("*") if p.is_file() and p.suffix != ".png"]
    for secret in [*PHI.values(), "DOE", "1.2.826.0.1.3680043.8.498.71"]:
        assert not any(secret in t for t in texts), secret


def test_images_are_read_in_gray_mode_and_refused_by_name_where_hu_is_needed(synthetic_manifest):
    """PNG slices form one study per folder; a three-window model refuses them by name."""
    pngs = sorted((synthetic_manifest.parent / "brain").glob("00[01]_*.png"))
    sources = [Source(str(p), p.read_bytes()) for p in pngs] + [Source("upload.png", b"\x89PNG\r\n\x1a\n broken")]
    refused = prepare_sources(sources, Preprocessing(32, "three-window", crop=False))
    assert len(refused.x) == 0 and all("needs DICOM input" in e for e in refused.errors[:len(pngs)])
    gray = prepare_sources(sources, Preprocessing(32, "gray"))
    assert len(gray.x) == len(pngs) and len(set(gray.studies)) == 1
    assert any("upload.png: not a readable image" in e for e in gray.errors)


def test_gradcam_shapes_and_explain_requires_an_explainer(dicom_run, tmp_path):
    run, result = dicom_run
    predictor = Predictor.load(run)
    rng = np.random.default_rng(1)
    _series(tmp_path / "s", rng, uid="9")
    sources, missing = gather_sources([tmp_path / "s", tmp_path / "absent"])
    assert missing == [f"{tmp_path / 'absent'}: not found"]
    prepared = prepare_sources(sources, predictor.preprocessing)
    heat, prob = GradCAM(result.model)(prepared.x)
    assert heat.shape == (5, 32, 32) and (heat >= 0).all()
    assert np.allclose(prob, predictor.predict(prepared.x), atol=1e-4)  # the explained model is the served one
    with pytest.raises(ValueError, match="need a GradCAM"):
        triage(prepared, predictor, "all")
    everything = triage(prepared, predictor, "all", GradCAM(result.model))
    assert list(everything.explained) == list(range(5))
