"""An archive planned into units of work, and a unit's inputs: the light half of :mod:`ichedge.scale`.

Kept apart from the models (this module does not import TensorFlow), so the Ray tasks that read
headers and decode slices start in a couple of seconds instead of loading a deep-learning stack
they never use.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ichedge.data import DataError
from ichedge.dicom import order_series, read_ct_header
from ichedge.intake import Prepared, Source, file_kind, natural_key, prepare_sources
from ichedge.preprocess import Preprocessing

HEADER_CHUNK = 256  # files whose headers one task reads: large enough to amortise a task's cost


@dataclass(frozen=True)
class Unit:
    """A DICOM series or a folder of images: what one task prepares and one actor call scores."""

    files: tuple[str, ...]

    @cached_property
    def key(self) -> str:
        """Names its part: the files, their sizes and times, so a changed file is scored again."""
        h = hashlib.sha256()
        for f in self.files:
            st = os.stat(f)
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:24]


def read_headers(names: Sequence[str]) -> list[tuple[str, str, object]]:
    """(name, kind, header or error message) per file: 'dicom' with its :class:`CTSlice` header,
    'image', or 'error'. Pixels are not decoded."""
    out = []
    for name in names:
        src = Source(name)
        try:
            kind = file_kind(src.head())
        except OSError as exc:
            out.append((name, "error", f"{name}: unreadable ({exc.strerror or type(exc).__name__})"))
            continue
        if kind is None:
            out.append((name, "error", f"{name}: not a PNG, JPEG or DICOM file (judged by its content)"))
        elif kind == "dicom":
            try:
                out.append((name, "dicom", read_ct_header(name)))
            except DataError as exc:
                out.append((name, "error", str(exc)))
        else:
            out.append((name, "image", None))
    return out


def plan(headers: Sequence[tuple[str, str, object]]) -> tuple[list[Unit], list[str]]:
    """Units in :func:`~ichedge.intake.prepare_sources`' order (DICOM series, then image folders
    by natural name order) and the files that are none."""
    errors = [h for _, kind, h in headers if kind == "error"]
    series = order_series([h for _, kind, h in headers if kind == "dicom"])
    units = [Unit(tuple(str(s.path) for s in members)) for members in series.values()]
    folders: dict[str, list[str]] = {}
    for name in sorted((n for n, kind, _ in headers if kind == "image"), key=natural_key):
        folders.setdefault(str(Path(name).parent), []).append(name)
    return units + [Unit(tuple(files)) for files in folders.values()], errors


def prepare_unit(unit: Unit, pre: Preprocessing) -> tuple[Prepared, list[str]]:
    """A unit's model inputs, and the SHA-256 of each file they came from (what the store records)."""
    sources = [Source(f) for f in unit.files]
    prepared = prepare_sources(sources, pre)
    digest = {s.name: s.digest for s in sources if s.name in set(prepared.files)}
    return prepared, [digest[f] for f in prepared.files]
