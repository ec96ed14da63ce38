"""Readers' feedback as a dataset: the store's confirmed labels and the de-identified kept uploads.

:func:`export_feedback` writes a new folder holding ``labels.csv`` in the manifest format
(docs/data-formats.md: ``patient``, ``slice``, ``hemorrhage``, ``brain``, ``bone``, ``source``,
plus ``subtype``) and the images, usable with ``--data`` beside CT-ICH. A slice's label is its
latest slice-level verdict; without one, a study whose latest verdict says "no bleed" makes
every slice of it negative, while a study with a bleed labels only the slices a reader judged
(which slice shows the bleed is the reader's to say). Kept DICOM is windowed from its HU to
brain and bone PNGs, as CT-ICH ships them; a kept PNG/JPEG is the brain window only. A study
stands in for the patient (uploads carry no patient identity), so two studies of one patient
may land on both sides of a later split: the export's README says so.
"""

from __future__ import annotations

import csv
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from PIL import Image

from ichedge.data import DataError
from ichedge.dicom import WINDOWS, read_ct_header, window
from ichedge.runs import FEEDBACK_LABELS, FEEDBACK_README, new_folder
from ichedge.store import Store, feedback, predictions, slices

log = logging.getLogger(__name__)

SOURCE = "feedback"
COLUMNS = ("patient", "slice", "hemorrhage", "brain", "bone", "source", "subtype")


@dataclass
class Labelled:
    """A slice with a reader's label, and where its kept copy is."""

    study: str
    position: int
    slice_hash: str
    hemorrhage: bool
    subtype: str | None
    kept: str | None


@dataclass
class Exported:
    path: Path
    rows: int
    studies: int
    positives: int
    skipped: list[str] = field(default_factory=list)


def labelled_slices(store: Store) -> list[Labelled]:
    """Every slice a reader's feedback labels, by the rules of the module docstring."""
    with store.engine.connect() as conn:
        notes = conn.execute(sa.select(feedback).order_by(feedback.c.id)).mappings().all()
        latest_study, latest_slice = {}, {}
        for f in notes:  # ordered by id: later verdicts replace earlier ones
            if f["slice_hash"] is None:
                latest_study[f["study"]] = f
            else:
                latest_slice[(f["study"], f["slice_hash"])] = f
        judged_predictions = {f["prediction_id"] for f in latest_study.values()} | {
            f["prediction_id"] for f in latest_slice.values()}
        rows = conn.execute(sa.select(predictions.c.id, predictions.c.study, slices.c.slice_hash, slices.c.position,
                                      slices.c.kept)
                            .join(slices, slices.c.prediction_id == predictions.c.id)
                            .where(predictions.c.id.in_(judged_predictions))
                            .order_by(predictions.c.id)).all()
    members: dict[str, dict[str, tuple[int, str | None]]] = {}
    for _, study, slice_hash, position, kept in rows:
        known = members.setdefault(study, {})
        if kept or slice_hash not in known:  # a later upload of the same file may have been kept
            known[slice_hash] = (position, kept)
    out = []
    for study, known in sorted(members.items()):
        verdict = latest_study.get(study)
        for slice_hash, (position, kept) in sorted(known.items(), key=lambda kv: kv[1][0]):
            f = latest_slice.get((study, slice_hash))
            if f is not None:
                out.append(Labelled(study, position, slice_hash, f["hemorrhage"], f["subtype"], kept))
            elif verdict is not None and not verdict["hemorrhage"]:
                out.append(Labelled(study, position, slice_hash, False, None, kept))
    return out


def _png(picture: np.ndarray, path: Path) -> None:
    Image.fromarray(np.round(np.clip(picture, 0, 1) * 255).astype(np.uint8)).save(path)


def export_feedback(store: Store, uploads: Path, out_root: Path) -> Exported:
    """A new ``<time>-feedback`` folder under ``out_root``: labels.csv, images/, README.md."""
    labelled = labelled_slices(store)
    skipped, rows = [], []
    with new_folder(out_root, "feedback") as folder:
        images = folder.tmp / "images"
        images.mkdir()
        for item in labelled:
            name = f"{item.study}_{item.position:04d}"
            if item.kept is None or not (uploads / item.kept).is_file():
                skipped.append(f"study {item.study} slice {item.position}: no kept copy in {uploads} "
                               "(serve keeps uploads unless --no-keep-uploads)")
                continue
            source = uploads / item.kept
            try:
                if source.suffix == ".dcm":
                    hu = read_ct_header(str(source)).pixels()
                    _png(window(hu, *WINDOWS["brain"]), images / f"{name}_brain.png")
                    _png(window(hu, *WINDOWS["bone"]), images / f"{name}_bone.png")
                    brain, bone = f"images/{name}_brain.png", f"images/{name}_bone.png"
                else:
                    shutil.copyfile(source, images / f"{name}_brain.png")
                    brain, bone = f"images/{name}_brain.png", ""
            except (DataError, OSError) as exc:
                skipped.append(f"study {item.study} slice {item.position}: kept copy unreadable ({exc})")
                continue
            rows.append({"patient": item.study, "slice": item.position, "hemorrhage": int(item.hemorrhage),
                         "brain": brain, "bone": bone, "source": SOURCE, "subtype": item.subtype or ""})
        if not rows:
            raise DataError(f"{store.safe_url()}: no feedback-labelled slice with a kept image to export"
                            + (f" ({len(skipped)} without one)" if skipped else ""))
        with (folder.tmp / FEEDBACK_LABELS).open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows)
        (folder.tmp / FEEDBACK_README).write_text(
            "# Readers' feedback, exported by `ichedge feedback export`\n\n"
            f"{len(rows)} slices of {len({r['patient'] for r in rows})} studies, "
            f"{sum(r['hemorrhage'] for r in rows)} with a bleed, labelled by readers' verdicts on ichedge's "
            "decisions. Images are the service's de-identified copies (DICOM: PS3.15 Basic Profile; "
            "PNG/JPEG: pixels only). `patient` is a study's content hash: uploads carry no patient identity, "
            "so one patient's studies may appear as several. Labels are readers' judgements, not "
            "adjudicated ground truth. Use and share them under your site's rules for clinical data.\n")
    for s in skipped:
        log.warning("%s", s)
    return Exported(folder.path, len(rows), len({r["patient"] for r in rows}),
                    sum(r["hemorrhage"] for r in rows), skipped)
