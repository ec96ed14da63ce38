"""Datasets: readers for CT slice collections, patient-level splits and image loading.

Every reader returns a :class:`Dataset` of :class:`Record` rows. A record points at one slice
(one image per window) and carries its label (1 = hemorrhage, the positive class) and, where
the layout has them, the patient and slice number. Splits always keep a patient's slices
together; a layout without patient IDs falls back to image-level splits with a warning.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
POSITIVE_FOLDERS = {"hemorrhagic", "hemorrhage", "haemorrhagic", "ich", "positive", "bleed"}
NEGATIVE_FOLDERS = {"normal", "negative", "no_hemorrhage", "healthy"}
SPLIT_FOLDERS = {"train", "training", "test", "testing", "val", "valid", "validation"}

CT_ICH_DOI = "10.13026/w8q8-ky94"
CT_ICH_LICENCE = "CC BY 4.0"
PHE_SICH_LICENCE = "non-commercial use only"
UNKNOWN_LICENCE = "not stated with the data: check before any use beyond research"
CT_ICH_CREDIT = (
    'CT-ICH: "Computed Tomography Images for Intracranial Hemorrhage Detection and '
    'Segmentation" v1.0.0, Hssayeni M.D., Croock M.S., Al-Ani A., Al-khafaji H.F., Yahya Z.A., '
    "PhysioNet, doi:10.13026/w8q8-ky94; licence CC BY 4.0."
)


DICOM_KEY = "dicom"  # a record whose image is a DICOM file: every window is computed from its HU
IMAGE_KEY = "image"  # a manifest column of already windowed pictures (the source's window): read as the brain window
PHE_SICH_CREDIT = (
    'PHE-SICH-CT-IDS: Ma D., Li C., Qiao L., et al., "PHE-SICH-CT-IDS: A Benchmark CT Image Dataset for '
    "Evaluation Semantic Segmentation, Object Detection and Radiomic Feature Extraction of Perihematomal Edema "
    'in Spontaneous Intracerebral Hemorrhage", arXiv:2308.10521, 2023; licence: non-commercial use only.'
)


class DataError(ValueError):
    """A dataset, manifest or image that cannot be used; the message names the file."""


@dataclass(frozen=True)
class Record:
    """One CT slice: an image path per window, its label and where it comes from."""

    images: dict[str, Path]
    label: int
    patient: str | None = None
    slice: int | None = None
    group: str | None = None  # what splits keep together where patients are unknown (a look-alike cluster)
    mask: Path | None = None  # a segmentation mask of the slice, where the manifest has one
    source: str | None = None  # the hospital or collection the slice comes from, where the manifest says

    @property
    def key(self) -> str:
        return f"{self.patient}/{self.slice}" if self.patient is not None else str(self.path)

    @property
    def path(self) -> Path:
        return next(iter(self.images.values()))


@dataclass
class Dataset:
    """A list of records plus what is known of their provenance."""

    records: list[Record]
    name: str
    windows: tuple[str, ...]
    credit: str = ""
    has_patients: bool = True
    notes: list[str] = field(default_factory=list)
    source: str | list[str] = "bundled"  # what read_dataset() reopens it from: a path, "bundled", or a list of them
    licence: str = UNKNOWN_LICENCE
    tag: str = "data"  # a short name of the source: the namespace of its patients in a combined dataset
    collection: str = ""  # a known public collection ("ct-ich"), whichever copy of it was read
    parts: list[Dataset] = field(default_factory=list)  # the sources of a combined dataset (see combine)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.records], dtype=np.int64)

    @property
    def record_sources(self) -> np.ndarray:
        """Each record's source: its manifest's ``source`` column, else the tag of the data it was read from."""
        return np.array([r.source or self.tag for r in self.records])

    @property
    def strata(self) -> np.ndarray:
        """What splits stratify on: the label within each source (just the label for one source),
        so that every part of a split gets each site's bleeds and normals in proportion."""
        names, index = np.unique(self.record_sources, return_inverse=True)
        return self.labels + 2 * index.astype(np.int64) if len(names) > 1 else self.labels

    @property
    def origins(self) -> np.ndarray:
        """Where each record comes from, comparable across datasets: ``collection:patient`` for a
        known public collection (so a patient read from another copy of CT-ICH matches), else
        ``manifest path:patient``; the image file itself without patient IDs."""
        if self.parts:
            return np.concatenate([part.origins for part in self.parts])
        if not self.has_patients:
            return np.array([str(r.path.resolve()) for r in self.records])
        return np.array([f"{self.collection or self.source}:{r.patient}" for r in self.records])

    def provenance(self) -> list[dict]:
        """Each source the data comes from, with its licence, as run configs and model cards list them."""
        return [{"name": part.tag, "data": str(part.source), "slices": len(part), "licence": part.licence,
                 "credit": part.credit or "none recorded"} for part in (self.parts or [self])]

    @property
    def split_unit(self) -> str:
        """What a split keeps together: 'patient', 'near-duplicate cluster' or 'image'."""
        if self.has_patients:
            return "patient"
        if self.records and all(r.group is not None for r in self.records):
            return "near-duplicate cluster"
        return "image"

    @property
    def has_slice_order(self) -> bool:
        """Whether every slice is placed in its patient's scan (2.5D input and slice context need it)."""
        return self.has_patients and all(r.slice is not None for r in self.records)

    @property
    def groups(self) -> np.ndarray:
        """Patient IDs, else near-duplicate clusters, else one group per image."""
        if self.has_patients:
            return np.array([r.patient for r in self.records])
        if self.split_unit == "near-duplicate cluster":
            return np.array([r.group for r in self.records])
        return np.arange(len(self.records)).astype(str)

    def summary(self) -> str:
        y = self.labels
        patients = len(set(self.groups)) if self.has_patients else "unknown"
        return (
            f"{self.name}: {len(self)} slices ({int(y.sum())} hemorrhage, "
            f"{int(len(y) - y.sum())} normal), patients: {patients}"
        )


def bundled_path() -> Path:
    """Folder of the CT-ICH copy shipped inside the package (160x160 JPEG)."""
    return Path(str(resources.files("ichedge") / "datasets" / "ct_ich_160"))


def load_bundled(windows: Sequence[str] = ("brain",)) -> Dataset:
    """The bundled CT-ICH dataset: 2,501 slices from 82 patients, CC BY 4.0."""
    ds = read_manifest(bundled_path() / "labels.csv", windows=windows)
    ds.name = "CT-ICH (bundled, 160x160)"
    ds.credit, ds.licence, ds.source, ds.tag, ds.collection = CT_ICH_CREDIT, CT_ICH_LICENCE, "bundled", "ct-ich", "ct-ich"
    return ds


def _parse_row(row: dict, windows: Sequence[str], root: Path) -> Record:
    """One manifest row as a record; ValueError says what is wrong with it."""
    if None in row.values() or None in row:
        raise ValueError("wrong number of fields")
    label = row["hemorrhage"].strip()
    if label not in ("0", "1"):
        raise ValueError(f"hemorrhage must be 0 or 1, got {label!r}")
    patient = row["patient"].strip()
    if not patient:
        raise ValueError("no patient ID")
    empty = [w for w in windows if not row[w].strip()]
    if empty:
        raise ValueError(f"no {'/'.join(empty)} image")
    slice_no = (row.get("slice") or "").strip()
    try:
        number = int(slice_no) if slice_no else None
    except ValueError:
        raise ValueError(f"slice must be a whole number, got {slice_no!r}") from None
    images = {"brain" if w == IMAGE_KEY else w: root / row[w].strip() for w in windows}
    mask = (row.get("mask") or "").strip()
    return Record(images, int(label), patient, number, mask=root / mask if mask else None,
                  source=(row.get("source") or "").strip() or None)


def read_manifest(path: str | Path, windows: Sequence[str] = ("brain",)) -> Dataset:
    """Read a CSV manifest laid out as CT-ICH's labels.csv.

    Required columns: ``hemorrhage`` (0/1), ``patient`` and one image-path column per requested
    window (``brain``, ``bone``), relative to the CSV's folder; or instead a ``dicom`` column of
    DICOM files, from whose HU every window (subdural too) is computed; or an ``image`` column of
    pictures already windowed by their source, read as the brain window. Optional: ``slice``,
    ``mask`` (a segmentation mask per slice) and ``source`` (where the slice comes from). A bad
    row is reported with its line number and left out; the rest is read.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    records, notes, seen = [], [], set()
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: spreadsheet exports
            reader = csv.DictReader(fh)
            fields = reader.fieldnames or []
            if DICOM_KEY in fields:
                columns: tuple[str, ...] = (DICOM_KEY,)
            elif IMAGE_KEY in fields and tuple(windows) == ("brain",) and "brain" not in fields:
                columns = (IMAGE_KEY,)
            else:
                columns = tuple(windows)
            missing = {"hemorrhage", "patient", *columns} - set(fields)
            if missing:
                hint = (" (the subdural window needs HU: a 'dicom' column of DICOM files)" if "subdural" in missing
                        else " (an 'image' column is one picture per slice: the gray channel mode only)"
                        if IMAGE_KEY in fields else "")
                raise DataError(f"{path}: missing column(s) {', '.join(sorted(missing))}{hint}")
            for line, row in enumerate(reader, start=2):
                try:
                    record = _parse_row(row, columns, path.parent)
                    if record.slice is not None and (record.patient, record.slice) in seen:
                        raise ValueError(f"patient {record.patient} slice {record.slice} listed twice")
                except ValueError as exc:
                    notes.append(f"{path}:{line}: {exc}; skipped")
                    continue
                seen.add((record.patient, record.slice))
                records.append(record)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable CSV manifest ({exc})") from None
    for note in notes:
        log.warning(note)
    if not records:
        raise DataError(f"{path}: no usable rows")
    ds = Dataset(records, name=path.parent.name, windows=tuple(windows), notes=notes, source=str(path.resolve()),
                 tag=_tag(path.parent.name))
    readme = path.parent / "README.md"
    text = readme.read_text(errors="ignore") if readme.is_file() else ""
    if CT_ICH_DOI in text:
        ds.credit, ds.licence, ds.tag = CT_ICH_CREDIT, CT_ICH_LICENCE, "ct-ich"
        ds.collection = ds.tag
    elif "PHE-SICH-CT-IDS" in text:
        ds.credit, ds.licence, ds.tag = PHE_SICH_CREDIT, PHE_SICH_LICENCE, "phe-sich"
        ds.collection = ds.tag
    return ds


def _tag(name: str) -> str:
    """A folder name as a short source name: lower case, no separators a patient key uses."""
    return re.sub(r"[^a-z0-9_.-]+", "-", name.lower()).strip("-") or "data"


def _class_of(folder: str) -> int | None:
    name = folder.lower().replace(" ", "_").replace("-", "_")
    if name in POSITIVE_FOLDERS:
        return 1
    if name in NEGATIVE_FOLDERS:
        return 0
    return None


def read_class_folders(root: str | Path) -> Dataset:
    """Read a folder-per-class layout as Kaggle CT sets ship it.

    Images (PNG/JPEG) sit in class folders such as ``normal``/``NORMAL`` and
    ``hemorrhagic``/``Hemorrhagic``, optionally under ``train``/``test`` folders. Such layouts
    carry no patient IDs, so splits are by image and a warning says that patients may leak.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    records = []
    for image in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        parts = image.relative_to(root).parts[:-1]
        labels = [c for c in (_class_of(p) for p in parts) if c is not None]
        if not labels:
            continue
        records.append(Record(images={"brain": image}, label=labels[-1]))
    if not records:
        raise DataError(
            f"{root}: no images in class folders (expected e.g. normal/ and hemorrhagic/)"
        )
    if len({r.label for r in records}) < 2:
        raise DataError(f"{root}: found only one class; need normal and hemorrhagic folders")
    return Dataset(records, name=root.name, windows=("brain",), has_patients=False, source=str(root.resolve()),
                   tag=_tag(root.name))


def read_dataset(path: str | Path | Sequence[str | Path] | None, windows: Sequence[str] = ("brain",)) -> Dataset:
    """Open whatever the user points at: nothing (the bundled set), a CSV manifest or a folder,
    or a list of them (several sources, combined by :func:`combine`).

    A folder holding ``labels.csv`` is read as a manifest, any other folder as class folders.
    """
    if isinstance(path, (list, tuple)):
        parts = [read_dataset(p, windows) for p in path]
        return parts[0] if len(parts) == 1 else combine(parts)
    if path is None or str(path) == "bundled":
        return load_bundled(windows)
    path = Path(path)
    if path.is_file():
        return read_manifest(path, windows)
    if (path / "labels.csv").is_file():
        return read_manifest(path / "labels.csv", windows)
    if tuple(windows) != ("brain",):
        raise DataError(f"{path}: class-folder layouts have one image per slice; use one window")
    return read_class_folders(path)


def combine(parts: Sequence[Dataset]) -> Dataset:
    """Several sources as one dataset: patient keys become ``source:patient`` (two hospitals may
    both have a patient 49), each record keeps its source, and each part its credit and licence."""
    tags: list[str] = []
    for part in parts:
        tag = part.tag
        while tag in tags:  # two folders of the same name
            tag += "+"
        tags.append(tag)
    if len({p.has_patients for p in parts}) > 1:
        raise DataError("every source needs patient IDs, or none: "
                        + ", ".join(f"{p.name} ({'patients' if p.has_patients else 'no patient IDs'})" for p in parts))
    spaced = lambda tag, value: None if value is None else f"{tag}:{value}"  # noqa: E731
    records = [replace(r, patient=spaced(tag, r.patient), group=spaced(tag, r.group), source=r.source or tag)
               for tag, part in zip(tags, parts) for r in part.records]
    return Dataset(records, name=" + ".join(p.name for p in parts), windows=parts[0].windows,
                   credit="\n".join(p.credit for p in parts if p.credit), has_patients=parts[0].has_patients,
                   notes=[n for p in parts for n in p.notes], source=[str(p.source) for p in parts],
                   licence="; ".join(f"{t}: {p.licence}" for t, p in zip(tags, parts)), tag="+".join(tags),
                   parts=[replace(p, tag=t) for t, p in zip(tags, parts)])


# --- splits -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """Indices into one dataset; patients never cross the three parts (when patients are known)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def _leak_warning(ds: Dataset) -> None:
    warnings.warn(
        f"{ds.name}: no patient IDs, so the split is by image; slices of one patient may sit on "
        "both sides and inflate every metric",
        stacklevel=3,
    )


def _group_folds(ds: Dataset, n: int, seed: int, indices: np.ndarray | None = None):
    idx = np.arange(len(ds)) if indices is None else np.asarray(indices)
    y = ds.strata[idx]
    if ds.split_unit != "image":
        splitter = StratifiedGroupKFold(n_splits=n, shuffle=True, random_state=seed)
        parts = splitter.split(idx, y, ds.groups[idx])
    else:
        parts = StratifiedKFold(n_splits=n, shuffle=True, random_state=seed).split(idx, y)
    return [(idx[a], idx[b]) for a, b in parts]


def kfold_splits(ds: Dataset, folds: int = 5, seed: int = 0, val_folds: int = 4) -> list[Split]:
    """Patient-grouped, label-stratified k-fold: each fold is the test set once.

    The validation set (for thresholds and early choices) is carved out of each fold's training
    patients the same way, holding out 1/``val_folds`` of them.
    """
    if ds.split_unit == "image":
        _leak_warning(ds)
    if len(set(ds.groups[ds.labels == 1])) < folds:
        raise DataError(f"{ds.name}: fewer positive patients than folds ({folds})")
    splits = []
    for k, (rest, test) in enumerate(_group_folds(ds, folds, seed)):
        train, val = _group_folds(ds, val_folds, seed + 1000 + k, rest)[0]
        splits.append(Split(np.sort(train), np.sort(val), np.sort(test)))
    return splits


def train_val_test_split(ds: Dataset, test: float = 0.2, val: float = 0.2, seed: int = 0) -> Split:
    """One patient-grouped, stratified split with about the given test and validation shares."""
    folds = max(2, round(1 / test))
    split = kfold_splits(ds, folds=folds, seed=seed, val_folds=max(2, round((1 - test) / val)))[0]
    return split


def check_no_patient_overlap(ds: Dataset, split: Split) -> None:
    """Raise if any patient (or near-duplicate cluster) appears in more than one part of a split."""
    if ds.split_unit == "image":
        return
    g = ds.groups
    parts = {name: set(g[getattr(split, name)]) for name in ("train", "val", "test")}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = parts[a] & parts[b]
        if shared:
            raise DataError(f"{ds.name}: {len(shared)} patient(s) in both {a} and {b}")


# --- images -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeLimits:
    """What one input may decode to, checked from its header before any pixel is decoded.

    A small file can decode to gigabytes (a PNG of zeros, a Deflated DICOM), so file size
    limits alone bound nothing. Head CT is 512x512 (1024x1024 at most) and one frame.
    """

    max_side: int = 2048
    max_pixels: int = 2048 * 2048
    max_inflated_bytes: int = 64 * 1024 * 1024  # a Deflated DICOM's dataset after inflation

    def check(self, name: str | Path, width: int, height: int, frames: int = 1) -> None:
        """DataError naming ``name`` when a ``width`` x ``height`` x ``frames`` image is over the limits."""
        if width > self.max_side or height > self.max_side or width * height * frames > self.max_pixels:
            raise DataError(f"{name}: image of {width}x{height} pixels" + (f" x {frames} frames" if frames > 1 else "")
                            + f" is over the limit of {self.max_side}x{self.max_side} ({self.max_pixels / 1e6:.1f} "
                            "megapixels); a head-CT slice is 512x512")


def read_image(path: Path, data: bytes | None = None, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """One grayscale image as float32 in [0, 1]; a clear DataError for anything unreadable.

    8-bit images map 0..255 to 0..1. 16-bit and float images (exports of raw CT values) are
    stretched from their own minimum to maximum, since their value range is not known here;
    Hounsfield-unit data belongs in DICOM, where windows are exact. ``data``, if given, holds
    the file's bytes (an upload) and ``path`` only names it. The size is checked against
    ``limits`` from the header, before decoding.
    """
    try:
        with warnings.catch_warnings():  # Pillow's own bomb warning; the limits below are tighter
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data) if data is not None else path)
        with im:
            limits.check(path, *im.size, getattr(im, "n_frames", 1) if im.format != "PNG" else 1)
            im.load()
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                a = np.asarray(im, dtype=np.float32)
                lo, hi = float(a.min()), float(a.max())
                return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
            return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Image.DecompressionBombError:
        raise DataError(f"{path}: image over Pillow's decompression-bomb limit, far over {limits.max_side}x"
                        f"{limits.max_side}") from None
    except Exception as exc:  # PIL raises many types (incl. decompression bombs): all mean unusable
        raise DataError(f"{path}: not a readable image ({type(exc).__name__})") from None
