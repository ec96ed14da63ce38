"""DICOM to HU, clinical windows, series grouping and ordering, and clear errors for bad files."""

import numpy as np
import pytest

from ichedge.data import read_manifest
from ichedge.dicom import DicomError, order_series, read_ct_slice, window, windowed
from ichedge.preprocess import Preprocessing, load_inputs
from tests.conftest import ct_phantom, write_ct_dicom, write_dicom_manifest


def test_window_maps_level_and_width_to_unit_range():
    hu = np.array([-1000.0, 0.0, 40.0, 60.0, 80.0, 1000.0])
    assert np.allclose(window(hu, 40, 80), [0, 0, 0.5, 0.75, 1, 1])
    w = windowed(np.array([80.0, 600.0, -20.0]), ("brain", "subdural", "bone"))
    assert np.allclose(w["brain"], [1.0, 1.0, 0.0])
    assert np.allclose(w["subdural"], [0.5, 1.0, 0.0])  # level 80, width 200: -20..180
    assert np.allclose(w["bone"], [(80 + 800) / 2800, 0.5, (-20 + 800) / 2800])
    with pytest.raises(ValueError, match="no HU window named lung"):
        windowed(hu, ("lung",))


@pytest.mark.parametrize("slope,intercept", [(1.0, -1024.0), (2.0, -2048.0)])
def test_pixels_become_hounsfield_units_through_rescale(tmp_path, slope, intercept):
    hu = np.array([[-1000.0, 0.0], [40.0, 1000.0]])
    s = read_ct_slice(write_ct_dicom(tmp_path / "a.dcm", hu, slope=slope, intercept=intercept))
    assert np.allclose(s.hu, hu)
    assert s.position == 0.0 and s.instance == 1


def test_series_are_grouped_by_uid_and_ordered_by_position_not_by_name(tmp_path):
    rng = np.random.default_rng(0)
    zs = [20.0, -5.0, 10.0, 0.0, 15.0]
    instances = [3, 1, 5, 2, 4]  # deliberately disagreeing with position
    for name, z, inst in zip("abcde", zs, instances):
        hu = np.full((8, 8), z)
        write_ct_dicom(tmp_path / f"{name}.dcm", hu, z=z, instance=inst)
    write_ct_dicom(tmp_path / "other.dcm", ct_phantom(rng, False, 8), series="1.2.3.4.999")
    slices = [read_ct_slice(p) for p in sorted(tmp_path.glob("*.dcm"))]
    groups = order_series(slices)
    assert sorted(len(g) for g in groups.values()) == [1, 5]
    main = max(groups.values(), key=len)
    assert [s.position for s in main] == sorted(zs)
    assert [float(s.hu[0, 0]) for s in main] == sorted(zs)
    assert all(k[0].startswith("study-") and k[1].startswith("series-") for k in groups)


def test_without_positions_instance_number_orders(tmp_path):
    for name, inst in zip("xyz", [3, 1, 2]):
        write_ct_dicom(tmp_path / f"{name}.dcm", np.full((4, 4), float(inst)), z=None, instance=inst)
    (series,) = order_series([read_ct_slice(p) for p in tmp_path.glob("*.dcm")]).values()
    assert [s.instance for s in series] == [1, 2, 3]


def test_unusable_files_get_specific_messages(tmp_path):
    hu = np.zeros((4, 4))
    mr = write_ct_dicom(tmp_path / "mr.dcm", hu, modality="MR")
    with pytest.raises(DicomError, match=r"mr\.dcm: modality MR, not CT"):
        read_ct_slice(mr)
    empty = write_ct_dicom(tmp_path / "nopix.dcm", hu, pixels=False)
    with pytest.raises(DicomError, match=r"nopix\.dcm: no pixel data"):
        read_ct_slice(empty)
    good = write_ct_dicom(tmp_path / "good.dcm", np.zeros((64, 64)))
    cut = tmp_path / "truncated.dcm"
    cut.write_bytes(good.read_bytes()[:-3000])
    with pytest.raises(DicomError, match=r"truncated\.dcm: (unreadable DICOM|pixel data unreadable)"):
        read_ct_slice(cut)
    text = tmp_path / "notes.dcm"
    text.write_text("not a dicom file at all")
    with pytest.raises(DicomError, match=r"notes\.dcm: not a DICOM file"):
        read_ct_slice(text)


def test_compressed_without_a_decoder_says_which_codec(tmp_path):
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless

    path = write_ct_dicom(tmp_path / "jls.dcm", np.zeros((4, 4)))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(16)])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DicomError, match="compressed as JPEG-LS Lossless.*no decoder"):
        read_ct_slice(path)


def test_dicom_manifest_feeds_the_three_window_mode(tmp_path):
    ds = read_manifest(write_dicom_manifest(tmp_path / "ct", patients=2, slices=2), windows=("brain", "subdural", "bone"))
    loaded = load_inputs(ds, Preprocessing(size=32, channels="three-window", crop=False))
    assert loaded.x.shape == (4, 32, 32, 3) and not loaded.errors
    centre = loaded.x[0, 16, 16]  # brain at 35 HU (+ noise) in each window
    expected = [window(35.0, *w) for w in ((40, 80), (80, 200), (600, 2800))]
    assert np.allclose(centre / 255.0, expected, atol=0.05)  # noise is 3 HU: 0.04 of the brain window


def test_three_window_on_a_jpeg_dataset_names_what_is_missing(synthetic_manifest):
    from ichedge.data import DataError

    with pytest.raises(DataError, match="missing column.*subdural.*needs HU"):
        read_manifest(synthetic_manifest, windows=("brain", "subdural", "bone"))


def test_malformed_headers_become_named_errors_and_never_echo_values(tmp_path, recwarn, caplog):
    import pydicom

    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        odd = write_ct_dicom(tmp_path / "odd.dcm", np.zeros((4, 4)), study="1.2.3.SECRETSTUDY", instance=7)
        element = b"\x20\x00\x13\x00IS\x02\x007 "  # InstanceNumber "7", explicit VR little endian
        assert element in odd.read_bytes()
        odd.write_bytes(odd.read_bytes().replace(element, element[:-2] + b"ab"))  # not a number
        bad_syntax = write_ct_dicom(tmp_path / "syntax.dcm", np.zeros((4, 4)))
        ds = pydicom.dcmread(bad_syntax)
        ds.file_meta.TransferSyntaxUID = "1.2.3.4.5"
        ds.save_as(bad_syntax, enforce_file_format=True)
    finally:
        pydicom.config.settings.writing_validation_mode = pydicom.config.RAISE
    recwarn.clear()
    caplog.clear()
    s = read_ct_slice(odd)
    assert s.instance is None and s.study.startswith("study-")
    with pytest.raises(DicomError, match=r"syntax\.dcm: transfer syntax not recognised"):
        read_ct_slice(bad_syntax)
    said = [str(w.message) for w in recwarn] + [caplog.text]
    assert not any("SECRETSTUDY" in text for text in said)
