"""Leakage audit: exact and near-duplicate images within a dataset and across its splits.

Exact duplicates share decoded pixels (sha256); near duplicates have perceptual hashes (pHash,
256 bits, imagehash) within a Hamming distance. A test image with a near twin in training is how
a slice-level split inflates metrics; for layouts without patient IDs, grouping by
near-duplicate clusters keeps look-alike slices on one side of a split.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ichedge.data import DataError, Dataset, Split, train_val_test_split
from ichedge.preprocess import record_windows
from ichedge.report import write_audit_report
from ichedge.runs import AUDIT, NEAR_DUPLICATES, new_folder, write_json

HASH_SIZE = 16  # a 256-bit pHash: 64 bits cannot tell a neighbouring slice from another patient's
DEFAULT_MAX_DISTANCE = 25  # of 256 bits; chosen on CT-ICH (docs/accuracy.md, "Leakage, intervals and calibration")


@dataclass
class Hashes:
    """Per readable record: pHash bits and a pixel digest; unreadable records are listed."""

    indices: np.ndarray  # record indices that could be read
    bits: np.ndarray  # (n, HASH_SIZE**2) bool
    digests: list[str]
    errors: list[str] = field(default_factory=list)


def hash_dataset(ds: Dataset, window: str = "brain") -> Hashes:
    indices, bits, digests, errors = [], [], [], []
    for i, r in enumerate(ds.records):
        try:
            pixels = np.round(record_windows(r, (window,))[window] * 255).astype(np.uint8)
        except DataError as exc:
            errors.append(str(exc))
            continue
        indices.append(i)
        digests.append(hashlib.sha256(pixels.tobytes() + str(pixels.shape).encode()).hexdigest())
        bits.append(imagehash.phash(Image.fromarray(pixels), hash_size=HASH_SIZE).hash.reshape(-1))
    return Hashes(np.array(indices, dtype=np.int64), np.array(bits, dtype=bool).reshape(-1, HASH_SIZE**2), digests, errors)


_POPCOUNT = np.array([bin(v).count("1") for v in range(256)], dtype=np.uint16)


def near_pairs(bits: np.ndarray, max_distance: int, chunk: int = 256) -> np.ndarray:
    """All pairs (i, j, distance), i < j, whose hashes differ in at most ``max_distance`` bits."""
    packed = np.packbits(bits, axis=1)
    out = []
    for start in range(0, len(packed), chunk):
        dist = _POPCOUNT[packed[start:start + chunk, None, :] ^ packed[None, :, :]].sum(-1)
        i, j = np.nonzero(dist <= max_distance)
        keep = i + start < j
        i, j = i[keep], j[keep]
        out.append(np.stack([i + start, j, dist[i, j].astype(np.int64)], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 3), np.int64)


@dataclass
class Audit:
    """What the audit found, in record indices of the dataset."""

    dataset: str
    images: int
    max_distance: int
    exact_groups: list[list[int]]
    pairs: np.ndarray  # (i, j, distance) near-duplicate pairs, record indices
    clusters: np.ndarray  # cluster id per record (-1: unreadable)
    split_leaks: dict[str, int] | None
    errors: list[str]

    def summary(self) -> str:
        dup_images = sum(len(g) for g in self.exact_groups)
        lines = [
            f"{self.dataset}: {self.images} images hashed; {len(self.exact_groups)} groups of exact duplicates "
            f"({dup_images} images); {len(self.pairs)} near-duplicate pairs (pHash distance <= {self.max_distance} of "
            f"{HASH_SIZE ** 2} bits); "
            f"{len(set(self.clusters[self.clusters >= 0]))} look-alike clusters",
        ]
        if self.split_leaks:
            s = self.split_leaks
            lines.append(f"split: {s['test_with_train_twin']} of {s['test']} test images "
                         f"({s['test_with_train_twin'] / max(s['test'], 1):.1%}) have a near twin in training; "
                         f"{s['val_with_train_twin']} of {s['val']} validation images do")
        return "\n".join(lines)


def audit(ds: Dataset, split: Split | None = None, max_distance: int = DEFAULT_MAX_DISTANCE) -> Audit:
    """Exact and near duplicates, their clusters, and (with ``split``) twins across its parts."""
    h = hash_dataset(ds)
    by_digest: dict[str, list[int]] = {}
    for i, d in zip(h.indices, h.digests):
        by_digest.setdefault(d, []).append(int(i))
    exact = [g for g in by_digest.values() if len(g) > 1]
    local = near_pairs(h.bits, max_distance)
    pairs = np.stack([h.indices[local[:, 0]], h.indices[local[:, 1]], local[:, 2]], axis=1) if len(local) else local
    clusters = np.full(len(ds), -1, dtype=np.int64)
    n = len(h.indices)
    graph = coo_matrix((np.ones(len(local)), (local[:, 0], local[:, 1])), shape=(n, n))
    clusters[h.indices] = connected_components(graph, directed=False)[1]
    leaks = None
    if split is not None:
        part = np.full(len(ds), "", dtype=object)
        for name in ("train", "val", "test"):
            part[getattr(split, name)] = name
        twin = {name: set() for name in ("val", "test")}
        for i, j, _ in pairs:
            for a, b in ((i, j), (j, i)):
                if part[b] == "train" and part[a] in twin:
                    twin[part[a]].add(int(a))
        leaks = {"test": int(len(split.test)), "val": int(len(split.val)),
                 "test_with_train_twin": len(twin["test"]), "val_with_train_twin": len(twin["val"])}
    return Audit(ds.name, n, max_distance, exact, pairs, clusters, leaks, h.errors)


def group_by_clusters(ds: Dataset, clusters: np.ndarray) -> Dataset:
    """The dataset with near-duplicate clusters standing in for patients, for splitting only."""
    if ds.has_patients:
        raise DataError(f"{ds.name}: has patient IDs; split by patient instead")
    records = [replace(r, group=f"cluster-{c}") for r, c in zip(ds.records, clusters)]
    return replace(ds, records=records,
                   notes=[*ds.notes, "groups are near-duplicate clusters, not patients: leakage across patients is still possible"])


def write_pairs(path: Path, ds: Dataset, result: Audit) -> None:
    """One row per near-duplicate pair: both files, the distance, same patient, exact copy."""
    digest_group = {i: k for k, g in enumerate(result.exact_groups) for i in g}
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file_a", "file_b", "distance", "same_patient", "exact_duplicate"])
        for i, j, d in result.pairs:
            a, b = ds.records[i], ds.records[j]
            same = (a.patient == b.patient) if ds.has_patients else ""
            exact = i in digest_group and digest_group.get(i) == digest_group.get(j)
            w.writerow([a.path, b.path, int(d), same, exact])


def run_audit(ds: Dataset, runs_root: Path, max_distance: int = DEFAULT_MAX_DISTANCE, seed: int = 0) -> tuple[Path, Audit]:
    """Audit ``ds`` and the split ichedge makes of it; write a new folder with pairs, JSON and report."""
    result = audit(ds, train_val_test_split(ds, seed=seed), max_distance)
    with new_folder(runs_root, "audit") as folder:
        write_pairs(folder.tmp / NEAR_DUPLICATES, ds, result)
        write_json(folder.tmp / AUDIT, {
            "dataset": ds.summary(), "split_by": ds.split_unit,
            "max_distance": result.max_distance, "images": result.images,
            "exact_duplicate_groups": [[str(ds.records[i].path) for i in g] for g in result.exact_groups],
            "near_duplicate_pairs": int(len(result.pairs)), "split_leaks": result.split_leaks,
            "errors": result.errors})
        write_audit_report(folder.tmp, ds, result)
    return folder.path, result
