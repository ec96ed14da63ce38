import csv
import json

import subprocess
import sys

import pytest

import ichedge.sweep as sweep
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
    rows = list(csv.DictReader((sweep / "results.csv").open()))
    assert [(r["rho"], r["alpha"]) for r in rows] == [("96x96", "0.35"), ("32x32", "0.1")]
    assert rows[0]["weights"] == "ImageNet (bundled)" and rows[1]["weights"].startswith("RANDOM")
    assert rows[0]["paper accuracy"] == f"{PAPER_RESULTS[(96, 0.35)]['accuracy']:.1f}%"
    assert rows[1]["paper accuracy"] == "-"
    assert "±" in rows[0]["AUC"]
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert runs == [f"{config}-multilevel-context-fold{k}" for config in ("32px-a0.1-gray", "96px-a0.35-gray")
                    for k in (0, 1)]
    assert rows[0]["training"] == "frozen, logistic multilevel head" and rows[1]["training"] == "from scratch, 2 ep"
    summary = json.loads((sweep / "results.json").read_text())
    assert len(summary[0]["folds"]) == 2
    md = (sweep / "results.md").read_text()
    assert "| rho | alpha | weights |" in md and "2 folds grouped by patient" in md
    assert md in cv_sweep.out, "the command prints the table it wrote"


@pytest.mark.integration
def test_an_interrupted_sweep_keeps_its_finished_runs(tmp_path, monkeypatch):
    real_fit, calls = sweep.fit, []

    def fit_then_fail(config, *args, **kwargs):
        calls.append(config.alpha)
        if config.alpha == 0.1:
            raise KeyboardInterrupt
        return real_fit(config, *args, **kwargs)

    monkeypatch.setattr(sweep, "fit", fit_then_fail)
    data = write_manifest(tmp_path / "data", patients=12)
    with pytest.raises(KeyboardInterrupt):
        main(["sweep", "--data", str(data), "--grid", "32x0.35,32x0.1", "--epochs", "1",
              "--runs", str(tmp_path / "runs"), "--quiet"])
    (kept,) = (tmp_path / "runs").iterdir()
    assert kept.name.endswith("-incomplete")
    assert (kept / "32px-a0.35-gray" / "model.keras").is_file()
    assert "| 32x32 | 0.35 |" in (kept / "results.md").read_text()


def test_duplicate_grid_entries_are_refused():
    with pytest.raises(ValueError, match="listed twice"):
        parse_grid("96x0.35,96x0.35")


def test_sweep_profile_adds_the_edge_columns(slice_sweep):
    assert slice_sweep.code == 0
    sweep = slice_sweep.folder
    (row,) = list(csv.DictReader((sweep / "results.csv").open()))
    flash = (sweep / "32px-a0.35-gray" / "export" / "model_int8.tflite").stat().st_size
    assert row["flash KiB (int8)"] == f"{flash / 1024:.1f}"
    assert float(row["RAM KiB (TFLM arena)"]) > 0 and float(row["int8 ms"]) > 0
    assert 0 <= float(row["AUC int8"]) <= 1


def test_start_up_noise_is_silenced_unless_verbose(tmp_path):
    """TensorFlow's C++ start-up lines (absl, oneDNN) show with --verbose only."""
    bad = ["evaluate", str(tmp_path / "no-model"), "--runs", str(tmp_path)]
    quiet = subprocess.run([sys.executable, "-m", "ichedge.cli", *bad], capture_output=True, text=True, timeout=300)
    loud = subprocess.run([sys.executable, "-m", "ichedge.cli", *bad, "--verbose"], capture_output=True, text=True,
                          timeout=300)
    assert quiet.returncode == loud.returncode == 2
    assert quiet.stderr.splitlines() == [f"error: {tmp_path / 'no-model'}: not a run folder, .keras or .tflite model"]
    assert quiet.stdout == ""
    assert "absl::InitializeLog" in loud.stderr or "oneDNN" in loud.stderr
