from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sklearn.model_selection import StratifiedGroupKFold

from ichedge.data import (
    CT_ICH_CREDIT, CT_ICH_LICENCE, UNKNOWN_LICENCE, DataError, bundled_path, check_no_patient_overlap, kfold_splits,
    load_bundled, read_class_folders, read_dataset, read_image, read_manifest, train_val_test_split,
)
from ichedge.preprocess import Preprocessing, load_inputs
from tests.conftest import write_manifest, write_rows


def test_bundled_dataset_is_complete_and_credited():
    ds = load_bundled(("brain",))
    assert len(ds) == 2501
    assert int(ds.labels.sum()) == 318
    assert len(set(ds.groups)) == 82
    assert len(set(ds.groups[ds.labels == 1])) == 36
    assert all(r.images["brain"].is_file() for r in ds.records[:50])
    readme = (bundled_path() / "README.md").read_text()
    assert "CC BY 4.0" in readme and "10.13026/w8q8-ky94" in readme
    assert read_dataset(None).credit == CT_ICH_CREDIT
    with Image.open(ds.records[0].path) as im:
        assert im.size == (160, 160)


def test_bundled_brain_bone_skips_the_slice_without_bone_image():
    ds = load_bundled(("brain", "bone"))
    assert len(ds) == 2500
    assert any("no bone image" in n for n in ds.notes)


def test_manifest_reader(synthetic_manifest):
    ds = read_manifest(synthetic_manifest, ("brain", "bone"))
    assert len(ds) == 48 and ds.has_patients
    assert int(ds.labels.sum()) == 8
    rec = ds.records[0]
    assert rec.patient == "0" and rec.slice == 1 and rec.images["bone"].is_file()


def test_manifest_errors_name_the_file(tmp_path):
    bad = tmp_path / "labels.csv"
    bad.write_text("patient,slice,brain\n1,1,a.png\n")
    with pytest.raises(DataError, match=r"labels\.csv.*hemorrhage"):
        read_manifest(bad)
    with pytest.raises(DataError, match="not found"):
        read_manifest(tmp_path / "missing.csv")


def test_manifest_skips_bad_label_rows(tmp_path, synthetic_manifest):
    text = synthetic_manifest.read_text().splitlines()
    text.append("99,1,maybe,brain/000_001.png,bone/000_001.png")
    synthetic_manifest.write_text("\n".join(text) + "\n")
    ds = read_manifest(synthetic_manifest)
    assert len(ds) == 48
    assert any("hemorrhage must be 0 or 1" in n for n in ds.notes)


@pytest.mark.parametrize("pos,neg,nested", [("hemorrhagic", "normal", False), ("Hemorrhagic", "NORMAL", True)])
def test_class_folder_reader(tmp_path, pos, neg, nested):
    for split in ("train", "test") if nested else ("",):
        for cls, n in ((pos, 3), (neg, 5)):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("L", (20, 20), 100).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    ds = read_class_folders(tmp_path)
    copies = 2 if nested else 1
    assert len(ds) == 8 * copies and int(ds.labels.sum()) == 3 * copies
    assert not ds.has_patients


def test_class_folder_reader_needs_two_classes(tmp_path):
    (tmp_path / "normal").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "normal" / "a.png")
    with pytest.raises(DataError, match="one class"):
        read_class_folders(tmp_path)


def test_patient_split_never_shares_patients_and_keeps_both_classes():
    ds = load_bundled()
    split = train_val_test_split(ds, seed=3)
    check_no_patient_overlap(ds, split)
    for part in (split.train, split.val, split.test):
        assert 0 < ds.labels[part].mean() < 1
    assert len(split.train) + len(split.val) + len(split.test) == len(ds)


def test_overlap_check_catches_a_leak():
    ds = load_bundled()
    split = train_val_test_split(ds, seed=0)
    leaky = type(split)(np.append(split.train, split.test[0]), split.val, split.test)
    with pytest.raises(DataError, match="both train and test"):
        check_no_patient_overlap(ds, leaky)


def test_kfold_puts_every_patient_in_test_exactly_once():
    ds = load_bundled()
    splits = kfold_splits(ds, folds=5, seed=0)
    tested = np.concatenate([s.test for s in splits])
    assert sorted(tested.tolist()) == list(range(len(ds)))
    for s in splits:
        check_no_patient_overlap(ds, s)
        assert ds.labels[s.test].sum() > 0


def test_splits_are_seeded():
    ds = load_bundled()
    a, b = train_val_test_split(ds, seed=1), train_val_test_split(ds, seed=1)
    c = train_val_test_split(ds, seed=2)
    assert np.array_equal(a.test, b.test)
    assert not np.array_equal(a.test, c.test)


def test_image_level_split_warns_about_leakage(tmp_path):
    for cls, n in (("hemorrhagic", 10), ("normal", 20)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            Image.new("L", (8, 8), i).save(tmp_path / cls / f"{i}.png")
    ds = read_class_folders(tmp_path)
    with pytest.warns(UserWarning, match="may sit on both sides"):
        train_val_test_split(ds)


def test_read_image_errors_name_the_file(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    with pytest.raises(DataError, match="broken.png: not a readable image"):
        read_image(broken)
    with pytest.raises(DataError, match="nope.png: file not found"):
        read_image(tmp_path / "nope.png")


def test_manifest_reports_bad_rows_by_line_and_reads_the_rest(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        Image.new("L", (8, 8)).save(tmp_path / name)
    path = tmp_path / "labels.csv"
    path.write_text(
        "\ufeffpatient,slice,hemorrhage,brain\n"  # byte-order mark, as spreadsheets write
        "1,1,1,a.png\n"
        "1,2\n"  # short row
        ",3,0,b.png\n"  # no patient
        "2,x,0,b.png\n"  # bad slice number
        "1,1,0,c.png\n"  # duplicate slice
        "3,1,0,c.png\n",
        encoding="utf-8",
    )
    ds = read_manifest(path)
    assert [r.key for r in ds.records] == ["1/1", "3/1"]
    assert [n.split(": ", 1)[1] for n in ds.notes] == [
        "wrong number of fields; skipped",
        "no patient ID; skipped",
        "slice must be a whole number, got 'x'; skipped",
        "patient 1 slice 1 listed twice; skipped",
    ]
    assert ds.notes[0].startswith(f"{path}:3:")


def test_binary_file_as_manifest_is_a_clear_error(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes(b"\xff\xfe\x00\x81binary")
    with pytest.raises(DataError, match="labels.csv"):
        read_manifest(path)


def test_16_bit_images_are_stretched_not_clipped(tmp_path):
    a = np.linspace(0, 3000, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "ct16.png")
    img = read_image(tmp_path / "ct16.png")
    assert img.min() == 0 and img.max() == pytest.approx(1) and 0.4 < img.mean() < 0.6


def test_credit_follows_the_ct_ich_readme(tmp_path, synthetic_manifest):
    assert read_manifest(synthetic_manifest).credit == ""
    (synthetic_manifest.parent / "README.md").write_text("CT-ICH, doi:10.13026/w8q8-ky94")
    assert read_manifest(synthetic_manifest).credit == CT_ICH_CREDIT


PHE_SICH = Path(__file__).resolve().parents[2] / "shared" / "data" / "phe-sich"


def test_an_image_manifest_reads_windowed_pictures_masks_and_sources(tmp_path):
    Image.new("L", (40, 40), 90).save(tmp_path / "a.png")
    Image.new("1", (40, 40), 0).save(tmp_path / "a_mask.png")
    write_rows(tmp_path / "labels.csv", [
        {"patient": "p1", "slice": 1, "hemorrhage": 1, "image": "a.png", "mask": "a_mask.png", "source": "site-a"},
        {"patient": "p2", "slice": 1, "hemorrhage": 0, "image": "a.png", "mask": "", "source": ""},
    ])
    ds = read_manifest(tmp_path / "labels.csv")
    first, second = ds.records
    assert first.images == {"brain": tmp_path / "a.png"} and first.mask == tmp_path / "a_mask.png"
    assert first.source == "site-a" and second.mask is None and second.source is None
    with pytest.raises(DataError, match="missing column.*bone.*an 'image' column is one picture per slice"):
        read_manifest(tmp_path / "labels.csv", windows=("brain", "bone"))


@pytest.mark.skipif(not PHE_SICH.is_dir(), reason="PHE-SICH is read from ../shared (never bundled: non-commercial)")
def test_the_second_hospital_reads_as_a_manifest_with_masks_and_its_licence():
    ds = read_dataset(PHE_SICH)
    assert ds.summary() == "phe-sich: 3478 slices (676 hemorrhage, 2802 normal), patients: 119"
    assert "non-commercial" in ds.credit and ds.has_slice_order
    assert all(r.mask is not None and r.mask.is_file() for r in ds.records[:50])
    loaded = load_inputs(ds, Preprocessing(64), range(3))
    assert loaded.x.shape == (3, 64, 64, 3) and not loaded.errors


def test_several_sources_namespace_patients_and_keep_each_licence(tmp_path):
    a = write_manifest(tmp_path / "Site A", patients=8)
    b = write_manifest(tmp_path / "site-b", patients=6, seed=1)  # patients 0..5 again: another hospital's
    (b.parent / "README.md").write_text("CT-ICH, doi:10.13026/w8q8-ky94")
    ds = read_dataset([a, b])
    assert len(ds) == 14 * 6 and len(set(ds.groups)) == 14, "patient 3 of A is not patient 3 of B"
    assert ds.records[0].key == "site-a:0/1" and ds.records[-1].key == "ct-ich:5/6"
    assert set(ds.record_sources) == {"site-a", "ct-ich"}
    assert [(s["name"], s["licence"]) for s in ds.provenance()] == [("site-a", UNKNOWN_LICENCE), ("ct-ich", CT_ICH_LICENCE)]
    assert ds.source == [str(a.resolve()), str(b.resolve())]
    assert read_dataset([a]).summary() == read_manifest(a).summary(), "one --data is just that dataset"
    sources, y = ds.record_sources, ds.labels
    for split in kfold_splits(ds, folds=2, seed=0):
        check_no_patient_overlap(ds, split)
        for part in (split.train, split.test):  # each site's bleeds and normals on both sides
            assert {(s, int(label)) for s, label in zip(sources[part], y[part])} == {
                (s, c) for s in ("site-a", "ct-ich") for c in (0, 1)}


def test_one_source_splits_exactly_as_stratifying_by_label(synthetic_manifest):
    ds = read_manifest(synthetic_manifest)
    assert (ds.strata == ds.labels).all()
    expected = StratifiedGroupKFold(4, shuffle=True, random_state=3).split(ds.labels, ds.labels, ds.groups)
    got = kfold_splits(ds, folds=4, seed=3)
    assert [sorted(t) for _, t in expected] == [sorted(s.test) for s in got]


def test_patients_match_across_copies_of_a_known_collection_only(tmp_path):
    first, second = (write_manifest(tmp_path / d / "data", patients=2) for d in ("x", "y"))
    assert set(read_manifest(first).origins).isdisjoint(read_manifest(second).origins), \
        "two unknown collections in same-named folders are different patients"
    for m in (first, second):
        (m.parent / "README.md").write_text("CT-ICH, doi:10.13026/w8q8-ky94")
    assert set(read_manifest(first).origins) == set(read_manifest(second).origins) == {"ct-ich:0", "ct-ich:1"}
    assert set(load_bundled().origins) >= {"ct-ich:49"}, "the bundled copy is CT-ICH too"


def test_sources_of_one_kind_only(tmp_path, synthetic_manifest):
    folders = tmp_path / "folders"
    for c in ("normal", "hemorrhagic"):
        (folders / c).mkdir(parents=True)
        Image.new("L", (8, 8)).save(folders / c / "a.png")
    with pytest.raises(DataError, match="every source needs patient IDs, or none"):
        read_dataset([synthetic_manifest, folders])
