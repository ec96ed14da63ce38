"""Files and uploads to model inputs: PNG/JPEG slices and DICOM series, judged by content.

:func:`gather_sources` finds the files of the paths given; :func:`prepare_sources` reads,
windows, groups into studies, orders and preprocesses them. What a file decodes to is bounded
(:class:`~ichedge.data.DecodeLimits`, checked from headers), DICOM pixels are decoded one slice
at a time after the series is ordered, and every slice passes the quality gate
(:mod:`ichedge.quality`) before it can be scored. An unusable file is reported by name and
left out; the others go on.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from ichedge.channels import NEXT, PREVIOUS
from ichedge.data import DataError, DecodeLimits, read_image
from ichedge.dicom import WINDOWS, CTSlice, is_dicom, order_series, read_ct_header, window, windowed
from ichedge.preprocess import Preprocessing, prepare_slice
from ichedge.quality import UnusableSlice, gate

PNG_MAGIC, JPEG_MAGIC = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"


@dataclass
class Source:
    """One input file: its name (path or upload name) and, for uploads, its bytes."""

    name: str
    data: bytes | None = None

    @cached_property
    def digest(self) -> str:
        """SHA-256 of the file's bytes: its name when kept, and what the store records it by."""
        if self.data is not None:
            return hashlib.sha256(self.data).hexdigest()
        with open(self.name, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()

    def head(self) -> bytes:
        if self.data is not None:
            return self.data[:132]
        with open(self.name, "rb") as fh:
            return fh.read(132)


def file_kind(head: bytes) -> str | None:
    """'dicom', 'image' or None, decided by content, never by the file name."""
    if is_dicom(head):
        return "dicom"
    if head.startswith(PNG_MAGIC) or head.startswith(JPEG_MAGIC):
        return "image"
    return None


def gather_sources(paths: Sequence[str | Path]) -> tuple[list[Source], list[str]]:
    """Files given, and files in folders given (recursively, hidden ones left out)."""
    sources, errors = [], []
    for p in map(Path, paths):
        if p.is_dir():
            sources += [Source(str(f)) for f in sorted(p.rglob("*"))
                        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)]
        elif p.is_file():
            sources.append(Source(str(p)))
        else:
            errors.append(f"{p}: not found")
    return sources, errors


@dataclass
class Prepared:
    """Model inputs of the readable slices, grouped into studies and ordered within them."""

    files: list[str]
    studies: list[str]
    indices: list[int]
    x: np.ndarray
    errors: list[str]
    views: list[dict[str, np.ndarray]] = field(default_factory=list)  # per slice, when asked: window -> uint8


VIEW_SIDE = 256  # what a viewer shows; a 512x512 CT slice is halved


def prepare_sources(sources: Sequence[Source], pre: Preprocessing, image_study: str | None = None,
                    limits: DecodeLimits = DecodeLimits(), views: Sequence[str] = ()) -> Prepared:
    """Read, window, group, order, gate and preprocess files; each unusable file is reported, not fatal.

    DICOM slices are grouped into series by their UIDs (named by hashes, never by patient
    fields) and ordered along the patient axis. PNG/JPEG images are taken as brain-window
    slices, one study per folder (or all in ``image_study``), in file-name order. ``views``
    names HU windows (:data:`ichedge.dicom.WINDOWS`) to keep per slice for a viewer, as 8-bit
    pictures at most :data:`VIEW_SIDE` pixels wide; a PNG/JPEG slice has its one picture as "brain".
    """
    errors: list[str] = []
    ct: list[CTSlice] = []
    images: list[Source] = []
    for src in sources:
        try:
            kind = file_kind(src.head())
        except OSError as exc:
            errors.append(f"{src.name}: unreadable ({exc.strerror or type(exc).__name__})")
            continue
        if kind is None:
            errors.append(f"{src.name}: not a PNG, JPEG or DICOM file (judged by its content)")
        elif kind == "dicom":
            try:
                ct.append(read_ct_header(src.name, src.data, limits))
            except DataError as exc:
                errors.append(str(exc))
        else:
            images.append(src)

    files, studies, indices, xs, shown = [], [], [], [], []

    def add(name: str, study: str, index: int, windows: dict[str, np.ndarray], hu: np.ndarray | None = None) -> None:
        try:
            gate(name, windows, hu)
            xs.append(prepare_slice(windows, pre))
        except UnusableSlice as exc:
            errors.append(str(exc))
            return
        except DataError as exc:
            errors.append(f"{name}: {exc}")
            return
        files.append(name)
        studies.append(study)
        indices.append(index)
        if views:
            pictures = windowed(hu, views) if hu is not None else {"brain": windows["brain"]}
            shown.append({k: _view(v) for k, v in pictures.items()})

    for (study, series), members in order_series(ct).items():
        for i, (s, hu, around) in enumerate(_decoded(members, "neighbours" in pre.mode.needs)):
            if isinstance(hu, DataError):
                errors.append(str(hu))
                continue
            windows = windowed(hu, pre.windows)
            for key, other in zip((PREVIOUS, NEXT), around):  # the series order gives the neighbours
                usable = isinstance(other, np.ndarray) and other.shape == hu.shape
                windows[key] = window(other if usable else hu, *WINDOWS["brain"])
            add(str(s.path), f"{study}/{series}", i, windows, hu)

    if images and not pre.mode.single_image:
        errors += [f"{src.name}: channel mode {pre.channels} needs DICOM input (HU or slice order); "
                   "a PNG/JPEG is one brain-window image" for src in images]
        images = []
    counters: dict[str, int] = {}
    for src in sorted(images, key=lambda s: natural_key(s.name)):
        folder = image_study or str(Path(src.name).parent)
        try:
            image = read_image(Path(src.name), src.data, limits)
        except DataError as exc:
            errors.append(str(exc))
            continue
        add(src.name, folder, counters.setdefault(folder, 0), {"brain": image})
        counters[folder] += 1
    x = np.stack(xs) if xs else np.zeros((0, pre.size, pre.size, 3), np.uint8)
    return Prepared(files, studies, indices, x, errors, shown)


def _view(picture: np.ndarray) -> np.ndarray:
    """A window in [0, 1] as an 8-bit picture of at most VIEW_SIDE pixels a side."""
    image = Image.fromarray(np.round(np.clip(picture, 0, 1) * 255).astype(np.uint8))
    image.thumbnail((VIEW_SIDE, VIEW_SIDE), Image.Resampling.LANCZOS)
    return np.asarray(image)


def _decoded(members: list[CTSlice], neighbours: bool) -> Iterator[tuple[CTSlice, np.ndarray | DataError, tuple]]:
    """Each slice of an ordered series with its HU (or why not) and, if asked, its neighbours' HU.

    Pixels are decoded in series order and at most three slices are held at once, so a long
    series costs the memory of its model inputs, not of its full-resolution HU.
    """
    cache: dict[int, np.ndarray | DataError] = {}

    def pixels(j: int) -> np.ndarray | DataError:
        if j not in cache:
            try:
                cache[j] = members[j].pixels()
            except DataError as exc:
                cache[j] = exc
        return cache[j]

    last = len(members) - 1
    for i, s in enumerate(members):
        for old in [k for k in cache if k < i - 1]:
            del cache[old]
        around = (pixels(max(i - 1, 0)), pixels(min(i + 1, last))) if neighbours else ()
        yield s, pixels(i), around


def natural_key(name: str) -> list:
    """Sort key that puts ``slice2.png`` before ``slice10.png``: image studies are ordered by name."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
