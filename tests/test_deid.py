"""De-identification of kept uploads: DICOM to the PS3.15 Basic Profile, PNG/JPEG down to pixels."""

import hashlib
import io
import logging
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicomanonymizer import simpledicomanonymizer
from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
from PIL import Image, ImageFile, PngImagePlugin
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from ichedge.deid import TABLE_EDITION, DeidentificationError, deidentify_dicom, strip_image_metadata
from ichedge.dicom import read_ct_slice
from tests.conftest import PHI, ct_phantom, write_ct_dicom

MARKER = "QZXPHI"  # put in every identifying value; must occur nowhere in what is kept
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
STUDY, SERIES = "1.2.826.0.1.3680043.8.498.77.1", "1.2.826.0.1.3680043.8.498.77.1.1"
TEXT_VRS = {"LO", "SH", "LT", "ST", "UT", "UC", "CS", "AE"}  # all hold the marker (CS in upper case)
# VRs that cannot hold text: a value of the VR, checked to be changed or removed
NON_TEXT = {"DA": "19470312", "TM": "081523.25", "DT": "19470312081523.25", "AS": "095Y", "DS": "71.5",
            "IS": "7", "US": 7}
DUMMIES = {"", "ANONYMIZED", "000000.00", "00010101"}  # what dicom-anonymizer empties or replaces with
NAMED = {  # the fields the security review found kept, one by one
    "StudyDescription": f"CT HEAD {MARKER} DOE JANE", "ImageComments": f"{MARKER} PID-8841-XYZ",
    "AdditionalPatientHistory": f"fall at home, {MARKER}", "PatientComments": f"{MARKER} daughter's phone",
    "RequestedProcedureDescription": f"CT head for {MARKER}", "PatientAge": "095Y", "PatientSex": "F",
    "PatientWeight": "71.5", "StudyTime": "081523", "StationName": f"{MARKER}CT1",
    "InstitutionalDepartmentName": f"{MARKER} neuroradiology",
}


def table_tags() -> list[tuple]:
    return dicom_anonymization_database_selector(f"dicomfields_{TABLE_EDITION}")["ALL_TAGS"]


def fill_table(ds: Dataset, referenced: str) -> dict[int, object]:
    """Every attribute of Table E.1-1 that a file can hold, with a value of its VR; the values set.

    Skipped: group 0000 (command elements, never in a stored file) and 0002 (the file meta, whose
    Media Storage SOP Instance UID write_ct_dicom sets). The repeating-group masks are represented by
    one element each in group 5000/6000 (below). Tags newer than pydicom's dictionary (all X in the
    table) are written as UT, the explicit VR carrying it. A sequence gets one item holding the
    marker in a code, except the X/Z/U* ones (image references), which get a reference to
    ``referenced``. UI values are unique UIDs, checked to be replaced.
    """
    u_star = set(dicom_anonymization_database_selector(f"dicomfields_{TABLE_EDITION}")["X_Z_U_STAR_TAGS"])
    values: dict[int, object] = {}
    for n, entry in enumerate(table_tags()):
        if len(entry) > 2 or entry[0] in (0x0000, 0x0002):
            continue
        tag = (entry[0] << 16) | entry[1]
        vr = dictionary_VR(tag) if keyword_for_tag(tag) else "UT"
        text = f"{MARKER}{n:04d}"
        if vr in TEXT_VRS:
            value = text
        elif vr == "PN":
            value = f"{text}^JANE"
        elif vr == "UR":
            value = f"http://example.org/{text}"
        elif vr in ("OB", "UN"):
            value = text.encode()
        elif vr == "UI":
            value = f"1.2.826.0.1.3680043.8.498.99.{n}"
        elif vr == "SQ":
            item = Dataset()
            if entry in u_star:
                item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = CT_CLASS, referenced
            else:
                item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = text, "99QZX", text
            value = [item]
        else:
            value = NON_TEXT[vr]
        ds.add_new(tag, vr, value)
        values[tag] = value
    for tag, vr, value in [(0x50002500, "LO", f"{MARKER}C"),  # Curve Label, for the 50xx mask
                           (0x60004000, "LT", f"{MARKER}O"),  # Overlay Comments, 60xx,4000
                           (0x60003000, "OW", f"{MARKER}OD".encode())]:  # Overlay Data, 60xx,3000
        ds.add_new(tag, vr, value)
        values[tag] = value
    return values


def write_slice(path: Path, rng: np.random.Generator, z: float, instance: int, uid: str, referenced: str) -> tuple[bytes, dict]:
    """A CT slice holding every table attribute, the named fields, private tags and a marked preamble."""
    write_ct_dicom(path, ct_phantom(rng, bleed=True), z=z, instance=instance, study=STUDY, series=SERIES)
    ds = pydicom.dcmread(path)
    values = fill_table(ds, referenced)
    for keyword, value in NAMED.items():
        setattr(ds, keyword, value)
    # The slice's identity, which fill_table overwrote with unique UIDs.
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, SERIES
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.77.2"
    ds.BurnedInAnnotation = "NO"
    # Sequences the table does not list, holding a name and a reference: cleaned all the same.
    nested = Dataset()
    nested.PatientName, nested.ReferencedSOPInstanceUID = f"{MARKER}^NESTED", referenced
    nested.private_block(0x0011, f"{MARKER} NESTED", create=True).add_new(0x01, "LO", f"{MARKER}P2")
    deeper = Dataset()  # and one level further down
    deeper.PatientID, deeper.CodeValue, deeper.CodingSchemeDesignator = f"{MARKER}DEEP", "113691", "DCM"
    nested.CTDIPhantomTypeCodeSequence = [deeper]
    ds.CTExposureSequence = [nested]
    ds.private_block(0x0009, f"{MARKER} CREATOR", create=True).add_new(0x10, "LO", f"{MARKER}P1")
    ds.file_meta.SourceApplicationEntityTitle = f"{MARKER}AE"
    ds.preamble = (MARKER.encode() * 22)[:128]
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes(), values


@pytest.fixture
def series(tmp_path: Path) -> list[tuple[bytes, dict]]:
    """Two slices of one series, each referencing the other (Referenced Image Sequence)."""
    rng = np.random.default_rng(0)
    first, second = generate_uid(), generate_uid()
    return [write_slice(tmp_path / "s1.dcm", rng, 0.0, 1, first, referenced=second),
            write_slice(tmp_path / "s2.dcm", rng, 5.0, 2, second, referenced=first)]


def test_table_fixture_covers_the_table(series):
    data, values = series[0]
    assert MARKER.encode() in data[:128]
    ds = pydicom.dcmread(io.BytesIO(data))
    # Everything but commands and file meta (group 0000/0002), plus one element per mask, is in the file.
    assert len(values) == 3 + sum(1 for t in table_tags() if len(t) == 2 and t[0] not in (0, 2)) > 600
    assert all(tag in ds for tag in values) and all(keyword in ds for keyword in NAMED)


def test_dicom_keeps_nothing_identifying(series, caplog, recwarn, capsys):
    caplog.set_level(logging.DEBUG)
    data, values = series[0]
    out = deidentify_dicom(data)
    ds = pydicom.dcmread(io.BytesIO(out))

    assert MARKER.encode() not in out
    assert out[:128] == bytes(128)
    for original in (PHI["PatientName"], PHI["PatientID"], PHI["PatientBirthDate"], STUDY, SERIES):
        assert original.encode() not in out
    for tag, value in values.items():  # each table attribute: removed, or another value
        if tag in ds and ds[tag].VR != "SQ":
            assert ds[tag].value != value, keyword_for_tag(tag) or hex(tag)
            if isinstance(value, str) and ds[tag].VR == "UI":
                assert value.encode() not in out
    for keyword in NAMED:
        assert keyword not in ds or str(ds[keyword].value) in DUMMIES, keyword
    assert not any(elem.tag.is_private for elem in ds.iterall())
    assert set(ds.file_meta.keys()) <= {0x00020000, 0x00020001, 0x00020002, 0x00020003, 0x00020010,
                                        0x00020012, 0x00020013}
    assert MARKER not in caplog.text + capsys.readouterr().out + "".join(str(w.message) for w in recwarn)


def test_dicom_states_what_was_done(series):
    ds = pydicom.dcmread(io.BytesIO(deidentify_dicom(series[0][0])))
    assert ds.PatientIdentityRemoved == "YES"
    method = " ".join(ds.DeidentificationMethod)
    for words in ("Basic Application Level Confidentiality Profile", "dicom-anonymizer 2.1.0",
                  f"DICOM {TABLE_EDITION}", "hash", "pixel data not cleaned"):
        assert words in method
    (code,) = ds.DeidentificationMethodCodeSequence
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == (
        "113100", "DCM", "Basic Application Confidentiality Profile")
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_dicom_pixels_and_hu_unchanged(series):
    data = series[0][0]
    before, after = pydicom.dcmread(io.BytesIO(data)), pydicom.dcmread(io.BytesIO(deidentify_dicom(data)))
    assert after.PixelData == before.PixelData
    assert (after.RescaleSlope, after.RescaleIntercept) == (before.RescaleSlope, before.RescaleIntercept)
    np.testing.assert_array_equal(read_ct_slice("kept.dcm", deidentify_dicom(data)).hu, read_ct_slice("up.dcm", data).hu)


def test_dicom_implicit_vr(series):
    """Implicit VR, as many PACS send: unknown and private tags arrive as UN, and still go."""
    data = series[0][0]
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=True, little_endian=True, enforce_file_format=True)
    out = deidentify_dicom(buf.getvalue())
    assert MARKER.encode() in buf.getvalue() and MARKER.encode() not in out
    assert pydicom.dcmread(io.BytesIO(out)).file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    np.testing.assert_array_equal(read_ct_slice("kept.dcm", out).hu, read_ct_slice("up.dcm", data).hu)


def test_dicom_series_still_groups(series):
    (first, _), (second, _) = series
    a, b = (pydicom.dcmread(io.BytesIO(deidentify_dicom(d))) for d in (first, second))
    assert a.SeriesInstanceUID == b.SeriesInstanceUID != SERIES
    assert a.StudyInstanceUID == b.StudyInstanceUID != STUDY
    assert a.FrameOfReferenceUID == b.FrameOfReferenceUID
    assert a.SOPInstanceUID != b.SOPInstanceUID
    # References are replaced as the instances they name are: the first slice still points at the second.
    assert a.ReferencedImageSequence[0].ReferencedSOPInstanceUID == b.SOPInstanceUID
    assert a.ReferencedImageSequence[0].ReferencedSOPClassUID == CT_CLASS
    assert a.CTExposureSequence[0].ReferencedSOPInstanceUID == b.SOPInstanceUID
    kept = [read_ct_slice(f"{n}.dcm", deidentify_dicom(d)) for n, d in (("a", first), ("b", second))]
    assert kept[0].series == kept[1].series and kept[0].study == kept[1].study


def test_dicom_uids_are_stable_without_process_state(series):
    data = series[0][0]
    out = deidentify_dicom(data)
    assert deidentify_dicom(data) == out
    # dicom-anonymizer's own UID map (random UIDs, originals kept in memory) is never used.
    assert simpledicomanonymizer.dictionary == {}
    # The same UIDs as ichedge's earlier de-identification gave, so earlier kept files still group.
    assert pydicom.dcmread(io.BytesIO(out)).SeriesInstanceUID == generate_uid(entropy_srcs=[SERIES])
    # A fresh process (a restart of the service) gives the same bytes.
    code = ("import sys, hashlib; from ichedge.deid import deidentify_dicom; "
            "print(hashlib.sha256(deidentify_dicom(sys.stdin.buffer.read())).hexdigest())")
    fresh = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, check=True)
    assert fresh.stdout.decode().strip() == hashlib.sha256(out).hexdigest()


def test_a_key_makes_uids_unlinkable_without_it_and_still_grouping(series):
    (first, _), (second, _) = series
    key, other = bytes(range(32)), bytes(range(1, 33))
    a, b = (pydicom.dcmread(io.BytesIO(deidentify_dicom(d, key))) for d in (first, second))
    assert a.SeriesInstanceUID == b.SeriesInstanceUID  # a series still groups
    unkeyed = pydicom.dcmread(io.BytesIO(deidentify_dicom(first)))
    elsewhere = pydicom.dcmread(io.BytesIO(deidentify_dicom(first, other)))
    assert len({a.SeriesInstanceUID, unkeyed.SeriesInstanceUID, elsewhere.SeriesInstanceUID}) == 3
    assert deidentify_dicom(first, key) == deidentify_dicom(first, key)
    assert "keyed hash (HMAC)" in " ".join(a.DeidentificationMethod)


def test_dicom_refuses_burned_in_annotation(series):
    ds = pydicom.dcmread(io.BytesIO(series[0][0]))
    ds.BurnedInAnnotation = "YES"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(DeidentificationError, match="Clean Pixel Data") as caught:
        deidentify_dicom(buf.getvalue())
    assert MARKER not in str(caught.value)


def test_dicom_errors_quote_nothing(series):
    data = series[0][0]
    with pytest.raises(DeidentificationError, match="not a DICOM file"):
        deidentify_dicom(b"\0" * 128 + b"NOPE" + MARKER.encode())
    for broken in (data[:len(data) // 3], data[:132] + MARKER.encode() * 40):
        try:
            out = deidentify_dicom(broken)
        except DeidentificationError as exc:
            assert MARKER not in str(exc)
        else:
            assert MARKER.encode() not in out


# --- PNG and JPEG ---------------------------------------------------------------------------------

def png_chunks(data: bytes) -> list[bytes]:
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        chunks.append(data[at + 4:at + 8])
        at += 12 + length
    return chunks


def marked_exif() -> bytes:
    exif = Image.Exif()
    exif[0x010E] = f"{MARKER} image description"  # ImageDescription
    exif[0x013B] = f"{MARKER} artist"  # Artist
    return exif.tobytes()


def pixels(mode: str) -> Image.Image:
    gray = ct_phantom(np.random.default_rng(1), bleed=True)
    eight = np.clip((gray + 1000) / 8, 0, 255).astype(np.uint8)
    if mode == "I;16":
        return Image.fromarray(np.clip(gray + 1024, 0, 65535).astype(np.uint16))
    if mode == "RGB":
        return Image.fromarray(np.stack([eight, 255 - eight, eight // 2], axis=-1))
    return Image.fromarray(eight).convert(mode)


@pytest.mark.parametrize("mode", ["L", "RGB", "I;16", "P"])
def test_png_keeps_only_pixels(mode):
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", f"{MARKER} tEXt")
    info.add_itxt("Description", f"{MARKER} iTXt", lang="en", tkey="Description")
    info.add_text("Author", f"{MARKER} zTXt " * 20, zip=True)
    buf = io.BytesIO()
    extra = {"transparency": 0} if mode == "P" else {}
    pixels(mode).save(buf, format="PNG", pnginfo=info, exif=marked_exif(), icc_profile=MARKER.encode() * 8, **extra)
    data = buf.getvalue()
    assert {b"tEXt", b"iTXt", b"zTXt", b"eXIf", b"iCCP"} <= set(png_chunks(data))
    assert MARKER.encode() in data

    out = strip_image_metadata(data)
    assert MARKER.encode() not in out
    assert set(png_chunks(out)) <= {b"IHDR", b"IDAT", b"IEND"}
    with Image.open(io.BytesIO(data)) as before, Image.open(io.BytesIO(out)) as after:
        assert after.format == "PNG" and not after.info and not after.getexif()
        if mode == "P":  # a palette is kept as its colours, transparency as alpha
            before, mode = before.convert("RGBA"), "RGBA"
        assert after.mode == mode
        np.testing.assert_array_equal(np.asarray(after), np.asarray(before))


def test_jpeg_keeps_only_pixels():
    buf = io.BytesIO()
    pixels("RGB").save(buf, format="JPEG", quality=90, comment=f"{MARKER} COM".encode(), exif=marked_exif(),
                       icc_profile=MARKER.encode() * 8)
    data = buf.getvalue()
    assert data.count(MARKER.encode()) >= 4  # COM, two EXIF fields, ICC (APP2)

    out = strip_image_metadata(data)
    assert MARKER.encode() not in out
    assert set(png_chunks(out)) <= {b"IHDR", b"IDAT", b"IEND"}
    with Image.open(io.BytesIO(data)) as before, Image.open(io.BytesIO(out)) as after:
        assert after.format == "PNG" and not after.info
        np.testing.assert_array_equal(np.asarray(after), np.asarray(before))  # Pillow's decode, exactly


def test_images_over_the_limit_refused_before_decoding(monkeypatch):
    buf = io.BytesIO()
    pixels("L").save(buf, format="PNG")
    data = buf.getvalue()
    assert strip_image_metadata(data, max_pixels=64 * 64)

    def no_decoding(self):
        raise AssertionError("decoded an image over the limit")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(DeidentificationError, match="64x64 pixels is over the limit of 4095 pixels"):
        strip_image_metadata(data, max_pixels=64 * 64 - 1)
    monkeypatch.undo()
    # A header claiming 5000x5000 over a few bytes of data: refused by the default limit, unread.
    ihdr = struct.pack(">IIBBBBB", 5000, 5000, 8, 0, 0, 0, 0)
    forged = data[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + data[33:]
    with pytest.raises(DeidentificationError, match="5000x5000 pixels is over the limit"):
        strip_image_metadata(forged)


def test_other_images_refused():
    buf = io.BytesIO()
    pixels("L").save(buf, format="GIF")
    with pytest.raises(DeidentificationError, match="not a readable PNG or JPEG"):
        strip_image_metadata(buf.getvalue())
