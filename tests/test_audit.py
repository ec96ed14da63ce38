"""Leakage audit: exact and near duplicates, twins across a split, grouping by look-alike clusters."""

import json
import shutil

import numpy as np
from PIL import Image

from ichedge.audit import audit, group_by_clusters
from ichedge.cli import main
from ichedge.data import check_no_patient_overlap, read_class_folders, train_val_test_split
from tests.conftest import synthetic_slice


def class_folders_with_copies(root, n=24):
    """A Kaggle-style layout without patient IDs: n distinct slices, one exact copy, one re-encoded copy."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / ("hemorrhagic" if i % 3 == 0 else "normal")
        folder.mkdir(parents=True, exist_ok=True)
        yy, xx = np.mgrid[:64, :64]
        img = synthetic_slice(rng, i % 3 == 0).astype(np.float32)
        img += 60 * np.sin(xx / (2 + i % 7) + i) * np.cos(yy / (3 + i % 5))  # make each slice distinct
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    shutil.copy(root / "normal" / "001.png", root / "normal" / "001_copy.png")
    Image.open(root / "normal" / "002.png").save(root / "normal" / "002_copy.jpg", quality=90)
    return root


def test_audit_finds_exact_and_near_duplicates_and_twins_across_the_split(tmp_path):
    ds = read_class_folders(class_folders_with_copies(tmp_path / "kaggle"))
    names = [r.path.name for r in ds.records]
    result = audit(ds, max_distance=25)
    assert [[names[i] for i in g] for g in result.exact_groups] == [["001.png", "001_copy.png"]]
    pairs = {frozenset((names[i], names[j])) for i, j, _ in result.pairs}
    assert frozenset(("002.png", "002_copy.jpg")) in pairs and frozenset(("001.png", "001_copy.png")) in pairs
    assert len(pairs) == 2, "distinct slices are not near duplicates"
    assert result.clusters[names.index("001.png")] == result.clusters[names.index("001_copy.png")]
    assert len(set(result.clusters)) == len(ds) - 2


def test_grouping_by_clusters_keeps_copies_on_one_side(tmp_path):
    ds = read_class_folders(class_folders_with_copies(tmp_path / "kaggle"))
    grouped = group_by_clusters(ds, audit(ds).clusters)
    assert grouped.split_unit == "near-duplicate cluster" and "not patients" in grouped.notes[-1]
    assert [r.key for r in grouped.records] == [r.key for r in ds.records]  # a run of it can be reloaded
    for seed in range(5):
        split = train_val_test_split(grouped, test=0.25, val=0.25, seed=seed)
        check_no_patient_overlap(grouped, split)
        leaks = audit(grouped, split).split_leaks
        assert leaks["test_with_train_twin"] == 0 and leaks["val_with_train_twin"] == 0


def test_slice_level_split_of_a_real_subset_leaks_near_twins(real_subset):
    from dataclasses import replace

    from ichedge.data import read_manifest

    ds = read_manifest(real_subset)
    by_patient = audit(ds, train_val_test_split(ds, seed=0)).split_leaks
    by_slice = replace(ds, has_patients=False)
    leaky = audit(by_slice, train_val_test_split(by_slice, seed=0)).split_leaks
    assert leaky["test_with_train_twin"] > 3 * max(by_patient["test_with_train_twin"], 1)


def test_audit_cli_writes_pairs_json_and_report(tmp_path, capsys):
    data = class_folders_with_copies(tmp_path / "kaggle")
    assert main(["audit", str(data), "--runs", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "1 groups of exact duplicates" in out and "near twin in training" in out
    (folder,) = (tmp_path / "runs").iterdir()
    summary = json.loads((folder / "audit.json").read_text())
    assert summary["split_by"] == "image" and summary["near_duplicate_pairs"] == 2
    assert main(["audit", str(data), "--group-by-near-duplicates", "--runs", str(tmp_path / "grouped")]) == 0
    (folder,) = (tmp_path / "grouped").iterdir()
    summary = json.loads((folder / "audit.json").read_text())
    assert summary["split_by"] == "near-duplicate cluster" and summary["split_leaks"]["test_with_train_twin"] == 0
    assert (folder / "near_duplicates.csv").read_text().count("\n") == 3
    assert "No patient IDs" in (folder / "report.html").read_text()
