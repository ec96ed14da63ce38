"""De-identification of the files the web service keeps (``--keep-uploads``).

DICOM follows the Basic Application Level Confidentiality Profile of DICOM PS3.15 (Annex E), using
dicom-anonymizer's copy of its Table E.1-1 from the 2026c edition of the standard. Every attribute
the table lists is removed, emptied or given a dummy value as the table says, at every level of
nesting (the table's "K: cleaned for Sequences"); private attributes are removed; UIDs are replaced
by UIDs derived from a hash of the original, so the slices of one series still group together,
whether uploaded together or a restart apart; the 128-byte preamble is zeroed and the File Meta
Information rebuilt (the sender's AE titles and private information do not survive). The file says
so: PatientIdentityRemoved, DeidentificationMethod and DeidentificationMethodCodeSequence (113100).

What the Basic Profile, and so this module, does not cover:

- the pixels: text burned into them (a file whose BurnedInAnnotation is YES is refused, as the
  profile then requires its Clean Pixel Data Option) and recognisable features: a head CT holds
  the face, which a 3D reconstruction renders recognisably (the Clean Recognizable Visual Features
  Option, defacing, is not done);
- identifying text where the standard does not expect it: attributes the table does not list are
  kept as they are;
- linkage: without a key the replacement UIDs are an unkeyed hash, so whoever holds an original UID
  can find the kept file made from it; with ``key`` (the service keeps one in its home folder, see
  :func:`ichedge.access.deid_key`) they are an HMAC of it, which only the key's holder can
  recompute. Dates become the dummy 00010101 (no longitudinal information is kept).

PNG and JPEG carry no standard identifying fields, but text chunks, comments, EXIF and ICC
profiles can hold anything: they are re-encoded as PNG from their decoded pixels alone. Their
pixels are no safer than DICOM ones.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import warnings
from collections.abc import Callable
from contextvars import ContextVar
from functools import cache
from importlib.metadata import version

logging.getLogger("pydicom").setLevel(logging.ERROR)  # its warnings quote header values

TABLE_EDITION = "2026c"  # the newest Table E.1-1 dicom-anonymizer ships
BASIC_PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")  # PS3.16 CID 7050
MAX_PIXELS = 4096 * 4096


class DeidentificationError(ValueError):
    """A file that cannot be de-identified; the message says why and never quotes its contents."""


def deidentify_dicom(data: bytes, key: bytes | None = None) -> bytes:
    """A copy of a DICOM file de-identified to the Basic Profile (see the module docstring).

    Pixel data, and everything the table does not list (RescaleSlope/Intercept among them), are
    unchanged. The same input (and ``key``) always gives the same output; ``key`` makes the
    replacement UIDs an HMAC of the originals. Raises DeidentificationError for a file that is not
    DICOM, cannot be processed, or declares burned-in annotation.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    with warnings.catch_warnings():  # pydicom's warnings quote values (UIDs, names)
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(io.BytesIO(data))
        except InvalidDicomError:
            raise DeidentificationError("not a DICOM file") from None
        except Exception as exc:  # truncated or garbled files raise many types inside pydicom
            raise DeidentificationError(f"unreadable DICOM ({type(exc).__name__})") from None
        try:
            if str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES":
                raise DeidentificationError(
                    "BurnedInAnnotation is YES: the Basic Profile then requires the Clean Pixel Data "
                    "Option, which is not done here")
            token = _KEY.set(key)
            try:
                _clean(ds)
            finally:
                _KEY.reset(token)
            _declare(ds, keyed=key is not None)
            out = io.BytesIO()
            ds.save_as(out, enforce_file_format=True)
        except DeidentificationError:
            raise
        except Exception as exc:
            raise DeidentificationError(f"DICOM header could not be de-identified ({type(exc).__name__})") from None
    return out.getvalue()


def strip_image_metadata(data: bytes, max_pixels: int = MAX_PIXELS) -> bytes:
    """A PNG holding only the decoded pixels of a PNG or JPEG (``data``), losslessly.

    Nothing but pixels survives: no text chunks, comments, EXIF (orientation included: the pixels
    stay as decoded, which is what ichedge scored) or ICC profile. A palette image is stored as its
    colours (with alpha where it had transparency) and CMYK as RGB, which PNG cannot hold. The size
    is checked against ``max_pixels`` from the header, before decoding.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=["PNG", "JPEG"]) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise DeidentificationError(f"image of {width}x{height} pixels is over the limit of "
                                            f"{max_pixels} pixels")
            im.load()
            if im.mode in ("P", "PA"):
                im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
            elif im.mode == "CMYK":
                im = im.convert("RGB")
            # A new image from the raw pixels carries no info dict, cached EXIF or palette extras.
            clean = Image.frombytes(im.mode, im.size, im.tobytes())
        out = io.BytesIO()
        clean.save(out, format="PNG")
    except DeidentificationError:
        raise
    except Exception as exc:  # Pillow raises many types (decompression bombs among them)
        raise DeidentificationError(f"not a readable PNG or JPEG image ({type(exc).__name__})") from None
    return out.getvalue()


# The key of the call in progress: the table's actions are called by dicom-anonymizer with
# (dataset, tag) only, and concurrent requests each have their own context.
_KEY: ContextVar[bytes | None] = ContextVar("deid_key", default=None)


def _new_uid(uid: object) -> str:
    """The replacement of a UID: derived from it (and the key) alone, so stable across calls and restarts.

    Without a key, the same derivation as ichedge's earlier de-identification.
    """
    from pydicom.uid import generate_uid

    key = _KEY.get()
    source = str(uid) if key is None else hmac.new(key, str(uid).encode(), hashlib.sha256).hexdigest()
    return generate_uid(entropy_srcs=[source])


def _clean(ds) -> None:
    """Table E.1-1 on ``ds`` and on the items of every sequence in it, at any depth.

    dicom-anonymizer applies the table to top-level attributes only (bar the repeating groups and
    private tags, which it walks at every depth), so a name inside a sequence the table keeps would
    survive it. Items get the table's actions by a look-up per element, not another pass of its
    650 rules each: time stays linear in the header, however many items it holds.
    """
    from dicomanonymizer.simpledicomanonymizer import anonymize_dataset

    anonymize_dataset(ds, None, delete_private_tags=True, base_rules_gen=_actions)
    _clean_items(ds)


def _clean_items(ds) -> None:
    table = _table()
    for elem in list(ds):
        if elem.VR == "SQ":
            for item in elem.value:
                for sub in list(item):
                    tag = (sub.tag.group, sub.tag.element)
                    if tag in table:
                        table[tag](item, tag)
                _clean_items(item)


def _declare(ds, keyed: bool) -> None:
    """Say what was done (PS3.15 E.1.1), zero the preamble, and rebuild the File Meta Information."""
    from pydicom.dataset import Dataset, FileMetaDataset

    ds.preamble = bytes(128)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = [  # LO: 64 characters a value at most
        "DICOM PS3.15 Basic Application Level Confidentiality Profile",
        f"dicom-anonymizer {version('dicom-anonymizer')}, Table E.1-1 of DICOM {TABLE_EDITION}",
        "UIDs replaced by UIDs derived from a " + ("keyed hash (HMAC)" if keyed else "hash") + " of the original",
        "private attributes removed; pixel data not cleaned",
    ]
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = BASIC_PROFILE_CODE
    ds.DeidentificationMethodCodeSequence = [code]
    old = ds.file_meta
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID") or old.get("MediaStorageSOPClassUID")
    # Both were replaced by the same derivation; SOPInstanceUID wins where a file had them differ.
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID") or old.get("MediaStorageSOPInstanceUID")
    meta.TransferSyntaxUID = old.TransferSyntaxUID
    ds.file_meta = meta


@cache
def _table() -> dict[tuple, Callable]:
    """dicom-anonymizer's actions for the table, with every action that can reach a UID swapped.

    Its UID replacement draws random UIDs and keeps original -> new in a process-global dict: it
    grows forever, holds the originals, and gives other UIDs after a restart. Its dummy (D, X/D,
    Z/D, X/Z/D) recurses into sequences with that same replacement, and its X/Z/U* empties every
    value in a sequence, UIDs of classes included.
    """
    from dicomanonymizer import simpledicomanonymizer as lib

    ours = {lib.replace: _dummy, lib.empty_or_replace: _dummy, lib.delete_or_replace: _dummy,
            lib.delete_or_empty_or_replace: _dummy, lib.replace_UID: _replace_uid,
            lib.delete_or_empty_or_replace_UID: _replace_contained_uids}
    return {tag: ours.get(action, action) for tag, action in lib.initialize_actions(f"dicomfields_{TABLE_EDITION}").items()}


def _actions() -> dict[tuple, Callable]:
    return dict(_table())  # a copy: anonymize_dataset may add to what it is given


def _replace_uid(dataset, tag) -> None:
    """U: a hash-derived UID for each value."""
    elem = dataset.get(tag)
    if elem is not None:
        _hash_uids(elem)


def _replace_contained_uids(dataset, tag) -> None:
    """X/Z/U*: a UID is replaced; a sequence is kept for the recursive pass of :func:`_clean`,
    which replaces the instance UIDs its items reference consistently with the instances' own."""
    elem = dataset.get(tag)
    if elem is None or elem.VR == "SQ":
        return
    if elem.VR == "UI":
        _hash_uids(elem)
    else:  # not what the standard defines there (a malformed file): nothing is safer than nothing
        del dataset[elem.tag]


def _dummy(dataset, tag) -> None:
    """D: a dummy of the element's VR, as dicom-anonymizer makes one, but hash-derived for UIDs."""
    elem = dataset.get(tag)
    if elem is not None:
        _dummy_element(dataset, elem)


def _dummy_element(dataset, elem) -> None:
    from dicomanonymizer.simpledicomanonymizer import replace_element

    if elem.VR == "UI":
        _hash_uids(elem)
    elif elem.VR == "SQ":
        for item in elem.value:
            for sub in list(item):
                _dummy_element(item, sub)
    else:
        try:
            replace_element(elem)
        except NotImplementedError:  # a VR it has no dummy for (OW, AT, ...): removed instead
            del dataset[elem.tag]


def _hash_uids(elem) -> None:
    from pydicom.multival import MultiValue

    if isinstance(elem.value, MultiValue):
        elem.value = [_new_uid(v) for v in elem.value]
    elif elem.value:
        elem.value = _new_uid(elem.value)
