"""CT-native input: DICOM slices in Hounsfield units, clinical windows, series and their order.

Pixels become HU through the modality LUT (RescaleSlope/RescaleIntercept, via pydicom), then the
windows radiologists read hemorrhage with. Studies and series are named by a short hash of their
UIDs: patient-identifying header fields (name, ID, birth date) are never read into anything that
is printed, logged or written.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pydicom.uid import AllTransferSyntaxes as ALL_TRANSFER_SYNTAXES

from ichedge.data import DataError

logging.getLogger("pydicom").setLevel(logging.ERROR)  # its warnings quote header values

# (level, width) in HU.
WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (80.0, 200.0),
    "bone": (600.0, 2800.0),
}
CT_IMAGE_STORAGE = {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1"}  # CT, enhanced CT


class DicomError(DataError):
    """A DICOM file that cannot be used as a CT slice; the message names the file and why."""


def window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """HU to [0, 1]: level - width/2 and below is 0, level + width/2 and above is 1."""
    low = level - width / 2
    return np.clip((np.asarray(hu, np.float32) - low) / width, 0.0, 1.0).astype(np.float32)


def windowed(hu: np.ndarray, names: tuple[str, ...] | list[str]) -> dict[str, np.ndarray]:
    """The named windows of one HU slice."""
    unknown = [n for n in names if n not in WINDOWS]
    if unknown:
        raise DataError(f"no HU window named {'/'.join(unknown)}; known: {', '.join(WINDOWS)}")
    return {n: window(hu, *WINDOWS[n]) for n in names}


def pseudonym(uid: str | None, prefix: str) -> str:
    """A stable, non-identifying name for a study or series UID."""
    if not uid:
        return f"{prefix}-unknown"
    return f"{prefix}-{hashlib.sha256(str(uid).encode()).hexdigest()[:10]}"


def is_dicom(head: bytes) -> bool:
    """Decided by content: the 'DICM' marker after the 128-byte preamble (``head``: first bytes)."""
    return len(head) >= 132 and head[128:132] == b"DICM"


@dataclass
class CTSlice:
    """One CT slice in HU, with where it belongs and where it lies (no identifying fields)."""

    path: Path
    study: str
    series: str
    position: float | None  # along the slice normal, in mm
    instance: int | None
    hu: np.ndarray


def _position(ds) -> float | None:
    """Distance along the slice normal: robust to gantry tilt and to any slice numbering."""
    ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    try:
        if ipp is not None and iop is not None and len(ipp) == 3 and len(iop) == 6:
            normal = np.cross(np.array(iop[:3], float), np.array(iop[3:], float))
            return float(np.dot(normal, np.array(ipp, float)))
        if ds.get("SliceLocation") is not None:
            return float(ds.SliceLocation)
    except (TypeError, ValueError):
        pass
    return None


def read_ct_slice(path: str | Path, data: bytes | None = None) -> CTSlice:
    """Read one single-frame CT DICOM file as HU; DicomError says precisely why one cannot be used.

    ``data``, if given, holds the file's bytes (an upload) and ``path`` only names it. pydicom's
    warnings about malformed values quote those values (UIDs among them), so they are silenced
    here, and any other failure on a malformed header becomes a DicomError naming only the file.
    """
    import pydicom

    path = Path(path)
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return _read_ct_slice(path, data)
        except DicomError:
            raise
        except Exception as exc:
            raise DicomError(f"{path}: malformed DICOM header or pixel data ({type(exc).__name__})") from None


def _read_ct_slice(path: Path, data: bytes | None) -> CTSlice:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, get_decoder

    try:
        ds = pydicom.dcmread(io.BytesIO(data) if data is not None else path)
    except InvalidDicomError:
        raise DicomError(f"{path}: not a DICOM file") from None
    except FileNotFoundError:
        raise DicomError(f"{path}: file not found") from None
    except Exception as exc:  # truncated or garbled files raise many types inside pydicom
        raise DicomError(f"{path}: unreadable DICOM ({type(exc).__name__})") from None
    modality = str(ds.get("Modality", "") or "")
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if modality != "CT" if modality else sop_class not in CT_IMAGE_STORAGE:
        raise DicomError(f"{path}: modality {modality or 'not given'}, not CT; ichedge reads head CT only")
    if "PixelData" not in ds:
        raise DicomError(f"{path}: no pixel data (a report, structured or directory object?)")
    syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    if syntax is not None and syntax not in ALL_TRANSFER_SYNTAXES:
        raise DicomError(f"{path}: transfer syntax not recognised")
    if syntax is not None and syntax.is_compressed:
        try:
            available = get_decoder(syntax).is_available
        except (NotImplementedError, ValueError):  # a syntax pydicom has no decoder for at all
            available = False
        if not available:
            raise DicomError(f"{path}: compressed as {syntax.name}, and no decoder for it is installed "
                             "(pydicom codec plugins such as pylibjpeg or pyjpegls add one)")
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        raise DicomError(f"{path}: pixel data unreadable ({type(exc).__name__})") from None
    if pixels.ndim != 2:
        raise DicomError(f"{path}: pixel array of shape {pixels.shape}; ichedge reads single-frame grayscale CT")
    hu = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
    return CTSlice(
        path=path,
        study=pseudonym(ds.get("StudyInstanceUID"), "study"),
        series=pseudonym(ds.get("SeriesInstanceUID"), "series"),
        position=_position(ds),
        instance=_instance(ds),
        hu=hu,
    )


def _instance(ds) -> int | None:
    """InstanceNumber, or None where it is missing or malformed (ordering then falls back)."""
    try:
        return int(ds.get("InstanceNumber"))
    except (TypeError, ValueError):
        return None


def order_series(slices: list[CTSlice]) -> dict[tuple[str, str], list[CTSlice]]:
    """Group slices by (study, series) and order each series along the patient axis.

    Position along the slice normal where every slice has one, else InstanceNumber, else the
    file name: file order and names say nothing reliable about anatomy.
    """
    groups: dict[tuple[str, str], list[CTSlice]] = {}
    for s in slices:
        groups.setdefault((s.study, s.series), []).append(s)
    for members in groups.values():
        if all(s.position is not None for s in members):
            members.sort(key=lambda s: (s.position, str(s.path)))
        elif all(s.instance is not None for s in members):
            members.sort(key=lambda s: (s.instance, str(s.path)))
        else:
            members.sort(key=lambda s: str(s.path))
    return groups


# Fields that identify a patient directly (DICOM PS3.15 basic profile, the ones a CT header holds).
IDENTIFYING_FIELDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "OtherPatientIDs",
    "OtherPatientNames", "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName",
    "MedicalRecordLocator", "ReferringPhysicianName", "InstitutionName", "InstitutionAddress",
    "AccessionNumber", "StudyID", "IssuerOfPatientID",
)


def deidentify(data: bytes) -> bytes:
    """A copy of a DICOM file without what identifies the patient.

    Person names and dates are emptied everywhere (nested sequences too), so are the fields in
    :data:`IDENTIFYING_FIELDS`; private tags are removed; instance UIDs are replaced by UIDs
    derived from them, so the slices of one series still group together. Class and transfer
    syntax UIDs stay: they describe the data, not the patient.
    """
    import pydicom
    from pydicom.multival import MultiValue
    from pydicom.uid import generate_uid

    def new_uid(value: object) -> str:
        return generate_uid(entropy_srcs=[str(value)])

    def clean(_, elem) -> None:
        if elem.VR in ("PN", "DA", "DT") or elem.keyword in IDENTIFYING_FIELDS:
            elem.value = ""
        elif elem.VR == "UI" and elem.value and not elem.keyword.endswith(("ClassUID", "TransferSyntaxUID")):
            elem.value = [new_uid(v) for v in elem.value] if isinstance(elem.value, MultiValue) else new_uid(elem.value)

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.remove_private_tags()
        ds.walk(clean)
        if "SOPInstanceUID" in ds:
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientIdentityRemoved = "YES"
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
