"""The quality gate refuses what is not a head-CT slice, and the input reference flags model
inputs unlike its training inputs: synthetic slices and phantoms only, no trained model."""

import json
import re

import matplotlib.cbook as cbook
import numpy as np
import pydicom
import pytest
from PIL import Image
from scipy import ndimage

from ichedge.data import DataError
from ichedge.dicom import read_ct_slice, windowed
from ichedge.preprocess import Preprocessing, prepare_slice
from ichedge.quality import InputReference, UnusableSlice, check_slice, gate, input_features
from tests.conftest import ct_phantom, synthetic_slice, write_ct_dicom


def brain(image: np.ndarray) -> dict[str, np.ndarray]:
    return {"brain": np.asarray(image, np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)}


def prepared(images: list[np.ndarray], size: int = 64) -> np.ndarray:
    return np.stack([prepare_slice(brain(a), Preprocessing(size=size)) for a in images])


def dicom_with_header(tmp_path, slope, intercept=-1024.0):
    """A phantom stored sanely, then given a header RescaleSlope / RescaleIntercept."""
    path = write_ct_dicom(tmp_path / "slice.dcm", ct_phantom(np.random.default_rng(0), False, 64))
    ds = pydicom.dcmread(path)
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.save_as(path)
    return read_ct_slice(path).hu


def test_each_gate_rule_names_its_reason():
    rng = np.random.default_rng(0)
    assert check_slice({"brain": np.zeros((1, 1), np.float32)}) == "too small (1x1; at least 64x64)"
    assert check_slice({"brain": np.ones((1, 5000), np.float32)}) == "too small (5000x1; at least 64x64)"
    assert check_slice({"brain": rng.random((100, 400), dtype=np.float32)}) == "not slice-shaped (400x100)"
    for value in (0.0, 1.0):  # a blank 9000x9000 PNG, at a size the suite can afford
        assert check_slice({"brain": np.full((2048, 1536), value, np.float32)}) == "constant image"
    table_only = np.zeros((256, 256), np.float32)
    table_only[230:233, 20:-20] = 0.7  # a scanner table and nothing on it
    assert check_slice({"brain": table_only}) == "no head found"
    page = np.ones((300, 300), np.float32)
    page[::12, 20:-20] = 0  # lines of print on white
    assert check_slice({"brain": page}) == "no head found (the bright region fills the frame)"
    assert check_slice({"brain": np.full((64, 64), np.nan, np.float32)}) == "non-finite pixel values"
    assert check_slice({"brain": np.zeros((64, 64)), "bone": np.zeros((64, 65))}).startswith("window images of shapes")
    four = np.block([[synthetic_slice(rng, False, 128), synthetic_slice(rng, True, 128)],
                     [synthetic_slice(rng, False, 128), synthetic_slice(rng, False, 128)]])
    assert check_slice(brain(four)) == "several heads (a mosaic or a screenshot?)"


@pytest.mark.parametrize("slope,intercept,reason", [
    (float("nan"), -1024.0, r"non-finite values"),
    (1e308, -1024.0, r"non-finite values"),
    (1.0, float("nan"), r"non-finite values"),
    (1e6, -1024.0, r"\S+e\+07 to \S+e\+09 HU"),  # beyond what any CT stores
    (1e-9, -1024.0, r"no soft tissue: -1024 to -1024 HU"),  # everything air
    (1.0, 2000.0, r"no air: \d+ to \d+ HU"),  # everything bone
])
def test_nonsense_rescale_is_an_implausible_hu_range(tmp_path, slope, intercept, reason):
    hu = dicom_with_header(tmp_path, slope, intercept)
    with pytest.raises(UnusableSlice) as caught:
        gate("upload.dcm", windowed(hu, ("brain", "bone")), hu)
    expected = rf"upload\.dcm: not a usable head-CT slice: implausible HU range \({reason}\)"
    assert re.fullmatch(expected, str(caught.value))
    assert isinstance(caught.value, DataError)


@pytest.mark.parametrize("size", [64, 128])
def test_synthetic_slices_and_phantom_dicoms_pass(tmp_path, size):
    rng = np.random.default_rng(size)
    for k in range(10):
        assert check_slice(brain(synthetic_slice(rng, k % 2 == 0, size))) is None
        hu = read_ct_slice(write_ct_dicom(tmp_path / f"{k}.dcm", ct_phantom(rng, k % 2 == 0, size))).hu
        assert check_slice(windowed(hu, ("brain", "subdural", "bone")), hu) is None
        gate("fine.dcm", windowed(hu, ("brain",)), hu)  # does not raise


def test_features_hardly_depend_on_input_size():
    rng = np.random.default_rng(1)
    images = [synthetic_slice(rng, k % 2 == 0, 128) for k in range(6)]
    small, large = input_features(prepared(images, 64)), input_features(prepared(images, 224))
    assert small.shape == large.shape == (6, 21)
    assert np.abs(small - large).max() < 0.03


def synthetic_slices(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """Head slices from sources of 96 to 192 pixels a side, a third of them bleeding."""
    return [synthetic_slice(rng, k % 3 == 0, int(rng.integers(96, 193))) for k in range(n)]


def without_table(image: np.ndarray) -> np.ndarray:
    """The slice with its scanner-table line painted over by background."""
    out = image.copy()
    row = int(len(image) * 0.93)
    out[row] = out[row - 3]
    return out


@pytest.fixture(scope="module")
def reference() -> InputReference:
    # Synthetic heads are far more alike than real ones, so the default margin (chosen on real CT)
    # would be tight for them: rotation's resampling alone moves them about as far as the boundary.
    return InputReference.fit(prepared(synthetic_slices(np.random.default_rng(2), 200)), margin=2.5)


def test_reference_flags_noise_photos_and_crops_but_not_fresh_or_turned_slices(reference):
    rng = np.random.default_rng(3)
    fresh = synthetic_slices(rng, 40)
    # quarter turns as they are; any other angle without the table line, which would then cut
    # through the square head crop's corner (pieces beside the head: something training never had)
    turned = [np.rot90(a, k) for a, k in zip(fresh, (1, 2, 3))] + [
        ndimage.rotate(without_table(a), angle, order=1) for a, angle in zip(fresh[3:], rng.uniform(0, 360, 12))]
    assert reference.score(prepared(fresh)).max() < 1 and reference.score(prepared(turned)).max() < 1
    noise = [rng.integers(0, 256, (128, 128), dtype=np.uint8) for _ in range(4)]
    with cbook.get_sample_data("grace_hopper.jpg") as fh:
        photo = np.asarray(Image.open(fh).convert("L"))
    half = [len(a) // 2 for a in fresh[:8]]
    quadrants = [a[:h, :h] for a, h in zip(fresh[:4], half)] + [a[h:, h:] for a, h in zip(fresh[4:8], half[4:])]
    for junk in (noise, [photo, 255 - photo], quadrants):
        assert reference.outside(prepared(junk)).all()
    assert np.array_equal(reference.outside(prepared(fresh + noise)), [False] * 40 + [True] * 4)


def test_json_round_trip_keeps_every_score(reference):
    rng = np.random.default_rng(4)
    x = prepared(synthetic_slices(rng, 5) + [rng.integers(0, 256, (64, 64), np.uint8)])
    again = InputReference.from_json(json.loads(json.dumps(reference.to_json())))
    assert np.array_equal(again.score(x), reference.score(x))
    d = reference.to_json()
    assert d["version"] == 2 and d["n_train"] == 200 and all(isinstance(v, float) for v in d["mean"])
    with pytest.raises(DataError, match="version"):
        InputReference.from_json({**d, "version": 99})
