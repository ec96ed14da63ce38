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
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pydicom.uid import AllTransferSyntaxes as ALL_TRANSFER_SYNTAXES

from ichedge.data import DataError, DecodeLimits

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


# Standard VRs: the first element of a DICOM stream without preamble names one (explicit VR).
_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"OB", b"OD", b"OF",
        b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI", b"UL", b"UN",
        b"UR", b"US", b"UT", b"UV"}


def is_dicom(head: bytes) -> bool:
    """Decided by content (``head``: the first 132 bytes or more).

    A DICOM file has the 'DICM' marker after a 128-byte preamble; a bare dataset (legal in
    DICOM media other than files, and written by some tools) starts with a little-endian
    group 0002 or 0008 element, explicit VR or implicit with a plausible length.
    """
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    if len(head) < 8 or head[:2] not in (b"\x02\x00", b"\x08\x00") or head[2:4] == b"\x00\x00":
        return False
    return head[4:6] in _VRS or int.from_bytes(head[4:8], "little") < 1024


@dataclass
class CTSlice:
    """One CT slice: where it belongs and where it lies (no identifying fields), its HU once read.

    :func:`read_ct_header` leaves ``hu`` unread so that a series can be ordered before its
    pixels are decoded one slice at a time; :meth:`pixels` decodes them then.
    """

    path: Path
    study: str
    series: str
    position: float | None  # along the slice normal, in mm
    instance: int | None
    hu: np.ndarray | None = None
    data: bytes | None = field(default=None, repr=False)  # an upload's bytes, for a deferred read
    limits: DecodeLimits = field(default=DecodeLimits(), repr=False)

    def pixels(self) -> np.ndarray:
        """The slice in HU, decoded now if it was not yet (not kept: memory stays one slice)."""
        return self.hu if self.hu is not None else read_ct_slice(self.path, self.data, self.limits).hu


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


def read_ct_slice(path: str | Path, data: bytes | None = None, limits: DecodeLimits = DecodeLimits()) -> CTSlice:
    """Read one single-frame CT DICOM file as HU; DicomError says precisely why one cannot be used.

    ``data``, if given, holds the file's bytes (an upload) and ``path`` only names it. What the
    pixels decode to is checked against ``limits`` from the header first, and a Deflated file
    is inflated within them. pydicom's warnings about malformed values quote those values (UIDs
    among them), so they are silenced here, and any other failure on a malformed header becomes
    a DicomError naming only the file.
    """
    return _guarded(Path(path), data, limits, pixels=True)


def read_ct_header(path: str | Path, data: bytes | None = None, limits: DecodeLimits = DecodeLimits()) -> CTSlice:
    """As :func:`read_ct_slice`, with every check, but the pixels left to :meth:`CTSlice.pixels`."""
    return _guarded(Path(path), data, limits, pixels=False)


def _guarded(path: Path, data: bytes | None, limits: DecodeLimits, pixels: bool) -> CTSlice:
    import pydicom

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return _read_ct_slice(path, data, limits, pixels)
        except DicomError:
            raise
        except DataError as exc:  # the decode limits' message, already naming the file
            raise DicomError(str(exc)) from None
        except Exception as exc:
            raise DicomError(f"{path}: malformed DICOM header or pixel data ({type(exc).__name__})") from None


def _check_inflation(path: Path, fp, limits: DecodeLimits) -> bool:
    """Refuse a Deflated file whose dataset inflates beyond the limit, inflating at most that much.

    pydicom inflates the whole dataset in one call before anything can be checked: a 1 MB file
    can inflate to gigabytes. ``fp`` is at the start of the file. Returns whether the file has
    the preamble and 'DICM' marker.
    """
    from pydicom.filereader import _read_file_meta_info, read_preamble  # no public bounded reader
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    if read_preamble(fp, force=True) is None:
        return False  # a bare dataset has no file meta, so no declared (Deflated) transfer syntax
    meta = _read_file_meta_info(fp)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return True
    inflater, size = zlib.decompressobj(-zlib.MAX_WBITS), 0
    while chunk := fp.read(1 << 20):
        while chunk:  # at most 1 MiB inflated at a time, counted and dropped
            size += len(inflater.decompress(chunk, 1 << 20))
            if size > limits.max_inflated_bytes:
                raise DicomError(f"{path}: Deflated data inflates beyond {limits.max_inflated_bytes // 2**20} MiB")
            chunk = inflater.unconsumed_tail
    return True


def _read_ct_slice(path: Path, data: bytes | None, limits: DecodeLimits, pixels: bool) -> CTSlice:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, get_decoder

    try:
        with io.BytesIO(data) if data is not None else open(path, "rb") as fp:
            marked = _check_inflation(path, fp, limits)
            fp.seek(0)
            if not marked and not is_dicom(fp.read(132)):
                raise InvalidDicomError
            fp.seek(0)
            ds = pydicom.dcmread(fp, force=not marked, stop_before_pixels=not pixels)
    except DicomError:
        raise
    except InvalidDicomError:
        raise DicomError(f"{path}: not a DICOM file") from None
    except FileNotFoundError:
        raise DicomError(f"{path}: file not found") from None
    except Exception as exc:  # truncated or garbled files raise many types inside pydicom
        raise DicomError(f"{path}: unreadable DICOM ({type(exc).__name__})") from None
    if len(ds) == 0:
        raise DicomError(f"{path}: not a DICOM file")
    if not marked:  # a bare dataset: its encoding, as read, is its transfer syntax
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

        implicit, little = ds.original_encoding
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                          ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    modality = str(ds.get("Modality", "") or "")
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if modality != "CT" if modality else sop_class not in CT_IMAGE_STORAGE:
        raise DicomError(f"{path}: modality {modality or 'not given'}, not CT; ichedge reads head CT only")
    if pixels and "PixelData" not in ds or not pixels and "Rows" not in ds:
        raise DicomError(f"{path}: no pixel data (a report, structured or directory object?)")
    frames, samples = _int(path, ds, "NumberOfFrames", 1), _int(path, ds, "SamplesPerPixel", 1)
    if frames != 1 or samples != 1:
        raise DicomError(f"{path}: {frames} frame(s) of {samples} sample(s) per pixel; ichedge reads single-frame "
                         "grayscale CT")
    limits.check(path, _int(path, ds, "Columns", 0), _int(path, ds, "Rows", 0))
    bits = _int(path, ds, "BitsAllocated", 16)
    if bits not in (8, 16, 32):
        raise DicomError(f"{path}: {bits} bits allocated per pixel; CT stores 8, 16 or 32")
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
    hu = None
    if pixels:
        try:
            array = ds.pixel_array
        except Exception as exc:
            raise DicomError(f"{path}: pixel data unreadable ({type(exc).__name__})") from None
        if array.ndim != 2:
            raise DicomError(f"{path}: pixel array of shape {array.shape}; ichedge reads single-frame grayscale CT")
        with np.errstate(all="ignore"):  # a NaN or huge slope is for the quality gate to name
            hu = np.asarray(apply_modality_lut(array, ds), dtype=np.float32)
    return CTSlice(
        path=path,
        study=pseudonym(ds.get("StudyInstanceUID"), "study"),
        series=pseudonym(ds.get("SeriesInstanceUID"), "series"),
        position=_position(ds),
        instance=_instance(ds),
        hu=hu,
        data=data if not pixels else None,
        limits=limits,
    )


def _int(path: Path, ds, keyword: str, default: int) -> int:
    """An integer header field, ``default`` where it is missing; a malformed one is a DicomError."""
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DicomError(f"{path}: {keyword} is not a number") from None


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
