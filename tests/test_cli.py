import csv
import json

import subprocess
import sys

import pytest

from ichedge.cli import main
from ichedge.commands import build_parser
from ichedge.sweep import PAPER_RESULTS, parse_grid
from tests.conftest import write_manifest


def test_parse_grid():
    assert parse_grid("96x0.35, 160X0.5") == [(96, 0.35), (160, 0.5)]
    with pytest.raises(ValueError, match="SIZExALPHA"):
        parse_grid("96-0.35")


def test_cv_defaults_to_five_folds_and_sweep_to_one_split():
    parser = build_parser()
    assert parser.parse_args(["sweep", "--cv"]).folds == 5
    assert parser.parse_args(["sweep", "--cv", "3"]).folds == 3
    assert parser.parse_args(["sweep"]).folds == 1


def test_train_reports_a_clear_error_for_a_bad_data_path(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--runs", str(tmp_path)]) == 2
    assert "nowhere: not a folder" in capsys.readouterr().err


@pytest.mark.integration
def test_cli_train_on_a_manifest(tmp_path, capsys):
    data = write_manifest(tmp_path / "data", patients=12)
    code = main(["train", "--data", str(data), "--size", "32", "--alpha", "0.35", "--epochs", "2",
                 "--runs", str(tmp_path / "runs"), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "72 slices" in out
    auc = float(out.split(" AUC ")[1].split()[0])
    (run,) = (tmp_path / "runs").iterdir()
    assert f"run folder: {run}" in out
    assert auc == pytest.approx(json.loads((run / "metrics.json").read_text())["default"]["auc"], abs=5e-4)


def test_sweep_writes_the_paper_table_with_folds(cv_sweep):
    assert cv_sweep.code == 0
    sweep = cv_sweep.folder
    (row,) = list(csv.DictReader((sweep / "results.csv").open()))
    assert (row["rho"], row["alpha"], row["weights"]) == ("96x96", "0.35", "ImageNet (bundled)")
    assert row["paper accuracy"] == f"{PAPER_RESULTS[(96, 0.35)]['accuracy']:.1f}%"
    assert "±" in row["AUC"] and "±" in row["context AUC"]
    assert row["training"] == "frozen 2 ep"
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert runs == ["96px-a0.35-gray-context-fold0", "96px-a0.35-gray-context-fold1"]
    summary = json.loads((sweep / "results.json").read_text())
    assert len(summary[0]["folds"]) == 2
    md = (sweep / "results.md").read_text()
    assert "| rho | alpha | weights |" in md and "2 folds grouped by patient" in md
    assert md in cv_sweep.out, "the command prints the table it wrote"
    for site in ("site-a", "site-b"):  # two --data: every figure per source too
        assert "±" in row[f"{site} AUC"] and row[f"{site} hs sensitivity"].endswith("%")
    config = json.loads((sweep / runs[0] / "config.json").read_text())
    assert [s["name"] for s in config["dataset"]["sources"]] == ["site-a", "site-b"]
    assert {k.split(":")[0] for k in config["split"]["test"]} == {"site-a", "site-b"}
    assert "Source: site-b" in (sweep / runs[0] / "report.html").read_text()


def test_an_interrupted_sweep_keeps_its_finished_runs(interrupted_sweep):
    kept = interrupted_sweep.folder
    assert interrupted_sweep.code is None, "stopped by Ctrl-C"
    assert kept.name.endswith("-incomplete")
    assert (kept / "32px-a0.1-gray-context" / "model.keras").is_file()
    assert not (kept / "32px-a0.35-gray-context").exists()
    (row,) = list(csv.DictReader((kept / "results.csv").open()))
    assert (row["rho"], row["alpha"]) == ("32x32", "0.1") and row["weights"].startswith("RANDOM")
    assert row["paper accuracy"] == "-" and row["training"] == "from scratch, 2 ep"
    assert "| 32x32 | 0.1 |" in (kept / "results.md").read_text()


def test_duplicate_grid_entries_are_refused():
    with pytest.raises(ValueError, match="listed twice"):
        parse_grid("96x0.35,96x0.35")


def test_sweep_profile_adds_the_edge_columns(slice_sweep):
    assert slice_sweep.code == 0
    sweep = slice_sweep.folder
    (row,) = list(csv.DictReader((sweep / "results.csv").open()))
    flash = (sweep / "32px-a0.1-gray-multilevel" / "export" / "model_int8.tflite").stat().st_size
    assert row["flash KiB (int8)"] == f"{flash / 1024:.1f}"
    assert float(row["RAM KiB (TFLM arena)"]) > 0 and float(row["int8 ms"]) > 0
    assert 0 <= float(row["AUC int8"]) <= 1


def test_start_up_noise_is_silenced_unless_verbose(tmp_path):
    """TensorFlow's C++ start-up lines (absl, oneDNN) show with --verbose only."""
    bad = [sys.executable, "-m", "ichedge.cli", "evaluate", str(tmp_path / "no-model"), "--runs", str(tmp_path)]
    runs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for args in (bad, [*bad, "--verbose"])]  # side by side: each mostly imports TensorFlow
    (quiet_out, quiet_err), (_, loud_err) = (run.communicate(timeout=300) for run in runs)
    assert [run.returncode for run in runs] == [2, 2]
    assert quiet_err.splitlines() == [f"error: {tmp_path / 'no-model'}: not a run folder, .keras or .tflite model"]
    assert quiet_out == ""
    assert "absl::InitializeLog" in loud_err or "oneDNN" in loud_err
