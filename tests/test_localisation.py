import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from ichedge.data import DataError, Record
from ichedge.localisation import filled_mask, localisation, localise, prepare_mask, prepared_mask
from ichedge.model import build_model, resolve_weights
from ichedge.preprocess import Preprocessing, prepare_slice


def disk(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return np.hypot(yy - cy, xx - cx) < r


def ring(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    return disk(shape, cy, cx, r) & ~disk(shape, cy, cx, r - 2)


def head_with_bleed(shape=(180, 260), head=(100, 150, 70), bleed=(80, 175, 12)) -> tuple[np.ndarray, np.ndarray]:
    """An off-centre gray head on a wide black frame, a bright bleed in it, and the bleed's edema
    ring as the mask (an outline, as PHE-SICH draws it)."""
    image = np.zeros(shape, np.float32)
    image[disk(shape, *head)] = 0.4
    image[disk(shape, *bleed)] = 1.0
    return image, ring(shape, bleed[0], bleed[1], bleed[2] + 2)


def test_a_closed_ring_gets_filled():
    outline = ring((40, 40), 20, 20, 10)
    for fill in ("holes", "hull"):
        solid = filled_mask(outline, fill)
        assert solid[20, 20] and solid.sum() > 2 * outline.sum()
        assert np.array_equal(solid, disk((40, 40), 20, 20, 10))


def test_only_the_hull_fills_an_open_arc():
    arc = ring((40, 40), 20, 20, 10)
    arc[:, 24:] = False  # the right side open: a C shape
    assert not filled_mask(arc, "holes")[20, 18]
    hull = filled_mask(arc, "hull")
    assert hull[20, 18] and not hull[20, 30]


def test_degenerate_outlines_and_bad_fill():
    line = np.zeros((10, 10), bool)
    line[5, 2:8] = True
    assert np.array_equal(filled_mask(line), line)
    with pytest.raises(ValueError, match="fill"):
        filled_mask(line, "blur")


def test_mask_lands_where_the_image_blob_lands():
    image, outline = head_with_bleed()
    pre = Preprocessing(64, "gray", crop=True)
    x = prepare_slice({"brain": image}, pre)[..., 0]
    mask = prepare_mask(image, outline.astype(np.float32), pre)
    blob = x > 200  # the bleed, at 1.0 among 0.4
    assert mask.shape == (64, 64) and mask.dtype == bool
    assert (blob & mask).sum() / blob.sum() > 0.95
    assert np.hypot(*np.subtract(ndimage.center_of_mass(blob), ndimage.center_of_mass(mask))) < 1
    # without the crop the mask sits elsewhere: the crop is what aligns them
    uncropped = prepare_mask(image, outline.astype(np.float32), Preprocessing(64, "gray", crop=False))
    assert (blob & uncropped).sum() / blob.sum() < 0.5


def test_prepared_mask_reads_the_record(tmp_path):
    image, outline = head_with_bleed()
    Image.fromarray((image * 255).astype(np.uint8)).save(tmp_path / "slice.png")
    Image.fromarray(outline).save(tmp_path / "mask.png")
    pre = Preprocessing(48)
    record = Record({"brain": tmp_path / "slice.png"}, 1, "p1", 1, mask=tmp_path / "mask.png")
    mask = prepared_mask(record, pre)
    expected = prepare_mask(image, outline.astype(np.float32), pre)
    assert mask.sum() > 10 and (mask != expected).mean() < 0.01  # 8-bit rounding of the image aside
    with pytest.raises(DataError, match="no mask"):
        prepared_mask(Record({"brain": tmp_path / "slice.png"}, 1), pre)
    Image.fromarray(outline[:100]).save(tmp_path / "small.png")
    with pytest.raises(DataError, match="small.png"):
        prepared_mask(Record({"brain": tmp_path / "slice.png"}, 1, mask=tmp_path / "small.png"), pre)


def peaked(shape: tuple[int, int], y: int, x: int) -> np.ndarray:
    heat = np.zeros(shape)
    heat[y, x] = 1.0
    return ndimage.gaussian_filter(heat, 2)


def test_pointing_game_peak_inside_outside_and_tolerance():
    shape = (32, 32)
    mask = np.zeros(shape, bool)
    mask[4:10, 4:10] = True  # away from the centre
    heat = np.stack([peaked(shape, 6, 6), peaked(shape, 25, 25), peaked(shape, 12, 7), np.zeros(shape),
                     peaked(shape, 6, 6)])
    masks = np.stack([mask, mask, mask, mask, np.zeros(shape, bool)])
    out = localisation(heat, masks, groups=["a", "a", "b", "c", "d"], tolerance=3)
    ps = out["per_slice"]
    assert out["n_slices"] == 4 and out["skipped_empty_mask"] == 1 and list(out["index"]) == [0, 1, 2, 3]
    assert ps["hit"].tolist() == [True, False, False, False]
    assert ps["hit_tolerance"].tolist() == [True, False, True, False]  # (12, 7) is 3 rows below the mask
    assert not ps["centre_hit"].any()
    assert out["empty_heatmaps"] == 1 and np.isnan(ps["mass_inside"][3])
    assert ps["mass_inside"][0] > 0.5 and ps["mass_inside"][1] < 0.01
    assert ps["area_share"][0] == pytest.approx(36 / 1024)
    assert ps["area_share_tolerance"][0] > ps["area_share"][0]
    s = out["summary"]
    assert s["pointing"]["value"] == pytest.approx(0.25) and s["pointing_tolerance"]["value"] == pytest.approx(0.5)
    assert s["mass_ratio"]["value"] == pytest.approx(np.nanmean(ps["mass_inside"]) / (36 / 1024))
    assert s["mass_above_area"]["value"] == pytest.approx(2 / 3)
    assert out["n_patients"] == 3 and out["resampled"] == "patients"
    assert s["pointing"]["low"] <= s["pointing"]["value"] <= s["pointing"]["high"]


def test_centre_baseline_and_an_even_heatmap():
    shape = (20, 20)
    mask = disk(shape, 10, 10, 4)
    out = localisation(np.ones((1, *shape)), mask[None], tolerance=0)
    s = out["summary"]
    assert s["centre"]["value"] == 1.0
    assert s["mass_ratio"]["value"] == pytest.approx(1.0)  # an even spread scores its area
    assert out["resampled"].startswith("slices")


def test_patient_intervals_are_seeded_and_resample_patients():
    rng = np.random.default_rng(0)
    shape = (16, 16)
    masks = np.zeros((40, *shape), bool)
    masks[:, 2:6, 2:6] = True
    heat = np.stack([peaked(shape, 3, 3) if i % 20 < 10 else peaked(shape, 12, 12) for i in range(40)])
    heat += rng.uniform(0, 1e-3, heat.shape)
    groups = np.repeat(["p1", "p2"], 20)
    one = localisation(heat, masks, groups, n_boot=200)
    assert one["summary"] == localisation(heat, masks, groups, n_boot=200)["summary"]
    # each patient scores 0.5, so resampling patients cannot move the mean; slices can
    assert one["summary"]["pointing"]["low"] == one["summary"]["pointing"]["high"] == 0.5
    by_slice = localisation(heat, masks, None, n_boot=200)["summary"]["pointing"]
    assert by_slice["high"] - by_slice["low"] > 0.1


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="must both be"):
        localisation(np.zeros((2, 8, 8)), np.zeros((2, 8, 9), bool))


def test_localise_runs_gradcam_on_masked_slices_only():
    model = build_model(0.35, 32, resolve_weights(0.35, 32, "random"))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (3, 32, 32, 3)).astype(np.uint8)
    masks = np.zeros((3, 32, 32), bool)
    masks[0, 4:12, 4:12] = masks[2, 20:30, 20:30] = True
    out = localise(model, x, masks, ["a", "b", "c"], n_boot=50)
    assert out["index"].tolist() == [0, 2] and out["skipped_empty_mask"] == 1
    assert out["per_slice"]["probability"].shape == (2,)
    assert out["n_patients"] == 2
