"""Shared fixtures: tiny synthetic CT-like slices, a small real subset of bundled CT-ICH, and the
few tiny models the suite trains once per session and shares.

A test that uses a trained model is marked ``integration`` here (``make test-fast`` leaves them out).
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ichedge.sweep as sweep
from ichedge.cli import main
from ichedge.data import bundled_path, read_manifest, train_val_test_split
from ichedge.export import ExportResult, export_run
from ichedge.training import TrainConfig, TrainResult, train

pytest_plugins = ["tests.postgres"]


@pytest.fixture(autouse=True, scope="session")
def ichedge_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Commands that record by default (predict, serve) write to a throwaway home, never the user's."""
    home = tmp_path_factory.mktemp("ichedge-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ICHEDGE_HOME", str(home))
        yield home


def synthetic_slice(rng: np.random.Generator, bleed: bool, size: int = 64) -> np.ndarray:
    """A bright skull ring around gray brain, plus a scanner-table line; a bleed is a bright blob."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx = size / 2 + rng.uniform(-3, 3), size / 2 + rng.uniform(-3, 3)
    r = np.hypot(yy - cy, xx - cx)
    img = np.zeros((size, size), np.float32)
    img[r < size * 0.35] = 0.45
    img[(r >= size * 0.30) & (r < size * 0.35)] = 1.0
    img[int(size * 0.93), 5:-5] = 0.6  # table
    if bleed:
        by, bx = cy + rng.uniform(-8, 8), cx + rng.uniform(-8, 8)
        img[np.hypot(yy - by, xx - bx) < size * 0.08] = 0.8
    img += rng.normal(0, 0.02, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_rows(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def write_manifest(root: Path, patients: int = 8, slices: int = 6, seed: int = 0) -> Path:
    """A CT-ICH style labels.csv with synthetic brain and bone images; half the patients bleed."""
    rng = np.random.default_rng(seed)
    (root / "brain").mkdir(parents=True, exist_ok=True)
    (root / "bone").mkdir(exist_ok=True)
    rows = []
    for p in range(patients):
        for s in range(1, slices + 1):
            bleed = p % 2 == 0 and s in (3, 4)
            name = f"{p:03d}_{s:03d}.png"
            img = synthetic_slice(rng, bleed)
            Image.fromarray(img).save(root / "brain" / name)
            Image.fromarray(255 - img).save(root / "bone" / name)
            rows.append({"patient": p, "slice": s, "hemorrhage": int(bleed),
                         "brain": f"brain/{name}", "bone": f"bone/{name}"})
    return write_rows(root / "labels.csv", rows)


@pytest.fixture
def synthetic_manifest(tmp_path: Path) -> Path:
    return write_manifest(tmp_path / "synthetic")


@pytest.fixture(scope="session")
def real_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manifest of 16 CT-ICH patients (8 with hemorrhage) pointing at the bundled images."""
    root = bundled_path()
    rows = list(csv.DictReader((root / "labels.csv").open(newline="")))
    by_patient: dict[str, list[dict]] = {}
    for row in rows:
        by_patient.setdefault(row["patient"], []).append(row)
    positive = sorted(p for p, rs in by_patient.items() if any(r["hemorrhage"] == "1" for r in rs))
    negative = sorted(p for p in by_patient if p not in positive)
    chosen = positive[:8] + negative[:8]
    out = tmp_path_factory.mktemp("real") / "labels.csv"
    with out.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for p in chosen:
            for r in by_patient[p]:
                w.writerow({**r, "brain": str(root / r["brain"]), "bone": str(root / r["bone"]) if r["bone"] else ""})
    return out


# --- synthetic DICOM ----------------------------------------------------------------------------

PHI = {"PatientName": "DOE^JANE", "PatientID": "PID-8841-XYZ", "PatientBirthDate": "19470312"}


def ct_phantom(rng: np.random.Generator, bleed: bool, size: int = 64) -> np.ndarray:
    """A head in HU: air -1000, skull 1000, brain 35, and a 70 HU blob where it bleeds."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    hu = np.full((size, size), -1000.0)
    hu[r < size * 0.35] = 1000.0
    hu[r < size * 0.30] = 35.0
    if bleed:
        by, bx = size / 2 + rng.uniform(-6, 6), size / 2 + rng.uniform(-6, 6)
        hu[np.hypot(yy - by, xx - bx) < size * 0.09] = 70.0
    return hu + rng.normal(0, 3, hu.shape)


def write_ct_dicom(path: Path, hu: np.ndarray, *, z: float | None = 0.0, instance: int | None = 1,
                   study: str = "1.2.826.0.1.3680043.8.498.1", series: str = "1.2.826.0.1.3680043.8.498.1.1",
                   modality: str = "CT", slope: float = 1.0, intercept: float = -1024.0, pixels: bool = True) -> Path:
    """One single-frame DICOM slice holding ``hu`` (stored as (HU - intercept) / slope), with PHI fields."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
    ds.Modality = modality
    for k, v in PHI.items():
        setattr(ds, k, v)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    if z is not None:
        ds.ImagePositionPatient = [0.0, 0.0, z]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    if instance is not None:
        ds.InstanceNumber = instance
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if pixels:
        ds.Rows, ds.Columns = hu.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.round((hu - intercept) / slope).astype(np.int16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_dicom_manifest(root: Path, patients: int = 12, slices: int = 6, seed: int = 0) -> Path:
    """A labels.csv with a ``dicom`` column: one synthetic CT series per patient, half of them bleed."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        for s in range(1, slices + 1):
            bleed = p % 2 == 0 and s in (3, 4)
            name = f"p{p:02d}/s{s:02d}.dcm"
            write_ct_dicom(root / name, ct_phantom(rng, bleed), z=5.0 * s, instance=s,
                           study=f"1.2.826.0.1.3680043.8.498.{p + 10}", series=f"1.2.826.0.1.3680043.8.498.{p + 10}.1")
            rows.append({"patient": p, "slice": s, "hemorrhage": int(bleed), "dicom": name})
    return write_rows(root / "labels.csv", rows)


# --- trained once per session, shared ------------------------------------------------------------

TRAINED_FIXTURES = {"tiny_run", "tiny_export", "served_run", "multilevel_run", "cv_sweep", "slice_sweep",
                    "interrupted_sweep", "dicom_run"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if TRAINED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def synthetic12(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12-patient synthetic manifest (6 bleed), shared read-only."""
    return write_manifest(tmp_path_factory.mktemp("synthetic12"), patients=12)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, synthetic12: Path) -> Path:
    """32x32, alpha 0.35, the paper head, 3 epochs, with slice context, on the 12 synthetic patients."""
    ds = read_manifest(synthetic12)
    run, _ = train(TrainConfig(size=32, alpha=0.35, epochs=3, context=True), ds,
                   train_val_test_split(ds, test=0.25, val=0.25), tmp_path_factory.mktemp("tiny"), progress=False)
    return run


@pytest.fixture(scope="session")
def tiny_export(tiny_run: Path) -> ExportResult:
    return export_run(tiny_run, calibration_images=20)


@pytest.fixture(scope="session")
def served_run(tiny_run: Path, tiny_export: ExportResult) -> Path:
    """The tiny run, exported: what the service serves."""
    return tiny_run


@dataclass
class Trained:
    run: Path
    result: TrainResult
    split: object
    dataset: object


@pytest.fixture(scope="session")
def multilevel_run(tmp_path_factory: pytest.TempPathFactory, synthetic12: Path) -> Trained:
    """64x64, alpha 0.35, the multilevel head with slice context, on the 12 synthetic patients."""
    ds = read_manifest(synthetic12)
    split = train_val_test_split(ds, test=0.25, val=0.25, seed=0)
    run, result = train(TrainConfig(size=64, alpha=0.35, head="multilevel", context=True), ds, split,
                        tmp_path_factory.mktemp("multilevel"), progress=False)
    return Trained(run, result, split, ds)


@dataclass
class CommandRun:
    """What one `ichedge` command left: its exit code (None: stopped by Ctrl-C), output folder,
    stdout, log and warnings."""

    code: int | None
    folder: Path
    out: str
    log: str
    warnings: list[str]


def run_command(args: list[str], runs: Path) -> CommandRun:
    """Run the CLI in-process, capturing what a session fixture cannot get from capsys or caplog."""
    out, log = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(log)
    logging.getLogger("ichedge").addHandler(handler)
    try:
        with contextlib.redirect_stdout(out), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code = main([*args, "--runs", str(runs), "--quiet"])
    except KeyboardInterrupt:
        code = None
    finally:
        logging.getLogger("ichedge").removeHandler(handler)
    (folder,) = [p for p in runs.iterdir() if not p.name.startswith(".")]
    return CommandRun(code, folder, out.getvalue(), log.getvalue(), [str(w.message) for w in caught])


@pytest.fixture(scope="session")
def cv_sweep(tmp_path_factory: pytest.TempPathFactory) -> CommandRun:
    """`ichedge sweep --cv 2 --context` of 96x96, alpha 0.35 (the paper head, 2 epochs) on two synthetic
    sources of 8 patients each (`--data` twice, patient numbers shared by both)."""
    root = tmp_path_factory.mktemp("cv_sweep")
    a, b = write_manifest(root / "site-a", patients=8), write_manifest(root / "site-b", patients=8, seed=1)
    return run_command(["sweep", "--data", str(a), "--data", str(b), "--grid", "96x0.35", "--cv", "2", "--epochs", "2",
                        "--context"], root / "runs")


@pytest.fixture(scope="session")
def interrupted_sweep(tmp_path_factory: pytest.TempPathFactory, synthetic12: Path) -> CommandRun:
    """`ichedge sweep --context` of 32x32, alpha 0.1 (no ImageNet weights: the paper head and backbone
    trained from scratch for 2 epochs, slice context skipped), then alpha 0.35, stopped by Ctrl-C as
    that one starts."""
    real_fit = sweep.fit

    def fit_then_stop(config: TrainConfig, *args, **kwargs) -> TrainResult:
        if config.alpha == 0.35:
            raise KeyboardInterrupt
        return real_fit(config, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sweep, "fit", fit_then_stop)
        return run_command(["sweep", "--data", str(synthetic12), "--grid", "32x0.1,32x0.35", "--epochs", "2",
                            "--context"], tmp_path_factory.mktemp("interrupted") / "runs")


@pytest.fixture(scope="session")
def slice_sweep(tmp_path_factory: pytest.TempPathFactory, synthetic12: Path) -> CommandRun:
    """`ichedge sweep --head multilevel --split-by slice --profile` of 32x32, alpha 0.1 (the multilevel head
    trained from scratch, 2 epochs): leak banners and edge columns."""
    return run_command(["sweep", "--data", str(synthetic12), "--grid", "32x0.1", "--epochs", "2", "--head", "multilevel",
                        "--split-by", "slice", "--profile"], tmp_path_factory.mktemp("slice_sweep") / "runs")
