"""`ichedge evaluate` on other data without retraining, and the HTML reports every command writes."""

import csv
import html
import json

import numpy as np
from PIL import Image

from ichedge.cli import main
from ichedge.runs import ExportFolder, RunFolder
from tests.conftest import write_manifest, write_rows


def _training_manifest(run):
    return RunFolder.open(run).meta["dataset"]["source"]


def test_evaluate_on_new_data_reports_intervals_and_no_leak(tiny_export, tmp_path, capsys):
    other = write_manifest(tmp_path / "other", patients=6, seed=11)  # not the images the model saw
    model = tiny_export.files["int8"]
    assert main(["evaluate", str(model), str(other), "--runs", str(tmp_path / "runs"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "95% CI, resampling patients" in out and "WARNING" not in out
    (folder,) = (tmp_path / "runs").iterdir()
    m = json.loads((folder / "metrics.json").read_text())
    assert m["slices_seen_in_training"] == 0 and m["kind"].startswith("tflite-int8")
    assert m["high_sensitivity"]["threshold"] == m["decision"]["slice_threshold"]  # the model's, not re-chosen
    ci = m["intervals"]["high_sensitivity"]["sensitivity"]
    assert ci["low"] <= ci["value"] <= ci["high"]
    page = (folder / "report.html").read_text()
    assert "banner" not in page.split("</style>")[1] and "data:image/png;base64," in page
    assert {p.name for p in (folder / "plots").iterdir()} >= {"roc.png", "precision_recall.png", "reliability.png"}


def test_evaluating_on_the_training_data_is_flagged_and_can_be_restricted(served_run, tmp_path, capsys):
    data = _training_manifest(served_run)
    assert main(["evaluate", str(served_run), data, "--runs", str(tmp_path / "all"), "--quiet"]) == 0
    assert "slices belong to the model's training or validation patients" in capsys.readouterr().out
    (folder,) = (tmp_path / "all").iterdir()
    assert "belong to this model's training or validation patients" in html.unescape((folder / "report.html").read_text())
    assert main(["evaluate", str(served_run), data, "--runs", str(tmp_path / "unseen"), "--unseen-only", "--quiet"]) == 0
    (folder,) = (tmp_path / "unseen").iterdir()
    m = json.loads((folder / "metrics.json").read_text())
    assert m["slices_seen_in_training"] == 0
    assert m["default"]["n"] == len(RunFolder.open(served_run).meta["split"]["test"])


def test_training_run_report_is_self_contained(served_run):
    page = (served_run / "report.html").read_text()
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert page.count("data:image/png;base64,") >= 6  # curves, confusions, ROC, PR, reliability
    assert "resampling patients" in page and "Calibration: ECE" in page


def test_slice_split_sweep_report_carries_the_leak_banner(slice_sweep):
    assert slice_sweep.code == 0
    assert any("split is by image" in w for w in slice_sweep.warnings)
    assert "SPLIT BY SLICE" in slice_sweep.out
    sweep = slice_sweep.folder
    page = (sweep / "report.html").read_text()
    assert "likely inflated" in page and "report.html" in page
    run = next(p for p in sweep.iterdir() if p.is_dir())
    assert "likely inflated" in (run / "report.html").read_text()


def test_evaluate_on_two_sources_reports_each_and_flags_only_the_seen_patients(served_run, tmp_path, capsys):
    trained_on = _training_manifest(served_run)
    other = write_manifest(tmp_path / "other-site", patients=4, seed=5)
    assert main(["evaluate", str(served_run), trained_on, str(other), "--runs", str(tmp_path / "runs"), "--quiet"]) == 0
    out = capsys.readouterr().out
    (folder,) = (tmp_path / "runs").iterdir()
    m = json.loads((folder / "metrics.json").read_text())
    split = RunFolder.open(served_run).meta["split"]
    assert m["slices_seen_in_training"] == len(split["train"]) + len(split["val"]), "the other site's patients 0-3 are not"
    by = m["by_source"]
    assert by["other-site"]["default"]["n"] == 4 * 6 and by["other-site"]["high_sensitivity"]["threshold"] == \
        m["high_sensitivity"]["threshold"]
    assert "  other-site (24 slices): AUC" in out and "Source: other-site" in (folder / "report.html").read_text()


def test_the_model_card_lists_each_training_source_with_its_licence(tiny_export):
    (source,) = tiny_export.card["training_sources"]
    assert source["licence"].startswith("not stated with the data") and source["slices"] == 72
    assert "## Training data and licences" in ExportFolder(tiny_export.folder).card_markdown.read_text()


def test_evaluate_measures_grad_cam_against_masks_where_the_data_has_them(served_run, tmp_path, capsys):
    data = write_manifest(tmp_path / "masked", patients=4, seed=3)
    rows = list(csv.DictReader(data.open()))
    yy, xx = np.mgrid[:64, :64]
    Image.fromarray(((np.hypot(yy - 32, xx - 32) < 12) * 255).astype(np.uint8)).save(data.parent / "mask.png")
    for r in rows:
        r["mask"] = "mask.png" if r["hemorrhage"] == "1" else ""
    write_rows(data, rows)
    positives = sum(r["hemorrhage"] == "1" for r in rows)
    assert main(["evaluate", str(served_run), str(data), "--runs", str(tmp_path / "runs"), "--quiet"]) == 0
    assert f"Grad-CAM on {positives} masked positive slices: pointing game" in capsys.readouterr().out
    (folder,) = (tmp_path / "runs").iterdir()
    loc = json.loads((folder / "metrics.json").read_text())["localisation"]
    assert loc["n_slices"] == positives and 0 <= loc["summary"]["pointing"]["value"] <= 1
    assert 0 < loc["summary"]["area_share"]["value"] < 1 and loc["resampled"] == "patients"
    assert "Grad-CAM against the masks" in (folder / "report.html").read_text()
    assert main(["evaluate", str(served_run), str(data), "--runs", str(tmp_path / "off"), "--quiet",
                 "--no-localisation"]) == 0
    (folder,) = (tmp_path / "off").iterdir()
    assert "localisation" not in json.loads((folder / "metrics.json").read_text())


def test_evaluate_refuses_what_the_triage_refuses_and_counts_ood_slices(tiny_export, tmp_path, capsys):
    other = write_manifest(tmp_path / "other", patients=6, seed=12)
    rows = list(csv.DictReader(other.open()))
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(other.parent / rows[0]["brain"])  # a blank slice
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    noise[:8] = 0  # not a frame-filling blob: the gate lets it through, the reference should not
    Image.fromarray(noise).save(other.parent / rows[1]["brain"])
    assert main(["evaluate", str(tiny_export.files["int8"]), str(other), "--runs", str(tmp_path / "runs"),
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "input check: 1 refused by the quality gate (constant image: 1)" in out
    (folder,) = (tmp_path / "runs").iterdir()
    m = json.loads((folder / "metrics.json").read_text())
    check = m["input_check"]
    assert check["refused"] == 1 and check["scored"] == len(rows) - 1 == m["default"]["n"]
    assert any("not a usable head-CT slice: constant image" in e for e in m["skipped_images"])
    with (folder / "predictions.csv").open() as fh:
        scores = {r["file"]: float(r["ood_score"]) for r in csv.DictReader(fh)}
    noisy = next(v for k, v in scores.items() if k.endswith(rows[1]["brain"]))
    assert noisy >= 1 and check["outside"] >= 1
    assert sorted(scores.values())[len(scores) // 2] < 1  # the typical synthetic slice is inside
