import numpy as np
import pytest

from ichedge.data import DataError, Record, read_manifest
from ichedge.preprocess import Preprocessing, head_box, load_inputs, prepare_slice
from tests.conftest import synthetic_slice


def test_head_box_frames_the_head_and_ignores_the_table():
    img = synthetic_slice(np.random.default_rng(0), bleed=False, size=128).astype(np.float32) / 255
    top, left, bottom, right = head_box(img)
    assert bottom - top == right - left  # square
    # the skull ring has radius 0.35 * 128 ~ 45 px: the box is about 90-100 px, not the frame
    assert 88 <= bottom - top <= 104
    assert bottom < int(128 * 0.93)  # the table line at row 119 is left out


def test_head_box_of_blank_image_is_whole_frame():
    assert head_box(np.zeros((50, 40), np.float32)) == (0, 0, 50, 40)


@pytest.mark.parametrize("channels", ["gray", "brain-bone"])
def test_prepare_slice_shapes_and_modes(channels):
    rng = np.random.default_rng(1)
    brain = synthetic_slice(rng, True).astype(np.float32) / 255
    bone = 1 - brain
    out = prepare_slice({"brain": brain, "bone": bone}, Preprocessing(48, channels, crop=True))
    assert out.shape == (48, 48, 3) and out.dtype == np.uint8
    if channels == "gray":
        assert np.array_equal(out[..., 0], out[..., 2])
    else:
        mean = (out[..., 0].astype(int) + out[..., 1]) / 2
        assert np.abs(out[..., 2] - mean).max() <= 1
        assert not np.array_equal(out[..., 0], out[..., 1])


def test_crop_enlarges_the_head():
    brain = synthetic_slice(np.random.default_rng(2), False, 128).astype(np.float32) / 255
    full = prepare_slice({"brain": brain}, Preprocessing(64, "gray", crop=False))
    crop = prepare_slice({"brain": brain}, Preprocessing(64, "gray", crop=True))
    assert (crop[..., 0] > 20).mean() > (full[..., 0] > 20).mean() + 0.15


def test_preprocessing_rejects_bad_settings():
    with pytest.raises(ValueError, match="channel mode"):
        Preprocessing(96, "rgb")
    with pytest.raises(ValueError, match="at least 32"):
        Preprocessing(8)


def test_load_inputs_skips_bad_images_and_names_them(synthetic_manifest):
    ds = read_manifest(synthetic_manifest)
    victim = ds.records[5].images["brain"]
    victim.write_bytes(b"not an image")
    ds.records.append(Record({"brain": victim.parent / "ghost.png"}, 0, "99", 1))
    loaded = load_inputs(ds, Preprocessing(32))
    assert loaded.x.shape == (len(ds) - 2, 32, 32, 3)
    assert 5 not in loaded.indices.tolist()
    assert any(victim.name in e for e in loaded.errors) and any("ghost.png" in e for e in loaded.errors)
    assert np.array_equal(loaded.y, ds.labels[loaded.indices])


def test_load_inputs_needs_every_window_of_the_mode(synthetic_manifest):
    ds = read_manifest(synthetic_manifest, ("brain",))
    loaded = load_inputs(ds, Preprocessing(32, "brain-bone"))
    assert len(loaded.indices) == 0
    assert "no bone image" in loaded.errors[0]


def test_window_sizes_must_agree():
    with pytest.raises(DataError, match="differ in size"):
        prepare_slice({"brain": np.zeros((10, 10)), "bone": np.zeros((12, 12))}, Preprocessing(32, "brain-bone"))


def test_2_5d_stacks_the_neighbouring_slices(synthetic_manifest):
    ds = read_manifest(synthetic_manifest)
    pre = Preprocessing(32, "2.5d", crop=False)
    loaded = load_inputs(ds, pre)
    gray = load_inputs(ds, Preprocessing(32, "gray", crop=False)).x
    keys = [r.key for r in ds.records]
    i = keys.index("0/3")  # slice 3 of patient 0 bleeds; slices 2 and 4 are its neighbours
    assert np.array_equal(loaded.x[i, ..., 1], gray[i, ..., 0])
    assert np.array_equal(loaded.x[i, ..., 0], gray[keys.index("0/2"), ..., 0])
    assert np.array_equal(loaded.x[i, ..., 2], gray[keys.index("0/4"), ..., 0])
    first = keys.index("0/1")  # no slice 0: the slice stands in for its missing neighbour
    assert np.array_equal(loaded.x[first, ..., 0], loaded.x[first, ..., 1])


def test_2_5d_needs_patients_and_slices(tmp_path):
    from ichedge.data import read_class_folders
    from PIL import Image

    for cls in ("normal", "hemorrhagic"):
        (tmp_path / cls).mkdir()
        Image.new("L", (40, 40), 80).save(tmp_path / cls / "a.png")
    with pytest.raises(DataError, match="2.5d needs patient IDs"):
        load_inputs(read_class_folders(tmp_path), Preprocessing(32, "2.5d"))
