"""Shared fixtures: tiny synthetic CT-like slices and a small real subset of bundled CT-ICH."""

from __future__ import annotations

import csv
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
from PIL import Image

from ichedge.data import bundled_path


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
    path = root / "labels.csv"
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


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
