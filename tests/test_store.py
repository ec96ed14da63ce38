"""The feedback store on SQLite and on a real PostgreSQL server; drift, monitoring and export rules."""

from __future__ import annotations

import csv
from datetime import timedelta

import numpy as np
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from PIL import Image

from ichedge.data import read_manifest
from ichedge.feedback import export_feedback, labelled_slices
from ichedge.monitoring import DRIFT_WARNING, MIN_DRIFT_SLICES, format_monitor, monitor, psi
from ichedge.store import FeedbackError, SliceRecord, Store, StudyRecord, metadata, predictions
from tests.conftest import ct_phantom, write_ct_dicom

MODEL = "0123456789ab"


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path) -> Store:
    url = tmp_path / "store.db" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    s = Store(url)
    yield s
    s.close()


def study(name: str, flags: list[bool], score: float = 0.5, kept: list[str | None] | None = None) -> StudyRecord:
    kept = kept or [None] * len(flags)
    return StudyRecord(name, score, any(flags), 0, [
        SliceRecord(f"{name}{k:04x}", k, 0.9 if f else 0.1, f, 0.2, False, kept[k]) for k, f in enumerate(flags)])


def record(store: Store, *studies: StudyRecord) -> dict[str, int]:
    return store.record(channel="serve", status=200, model=MODEL, reader="reader-1", n_files=3, latency_ms=12.345,
                        studies=studies, slice_threshold=0.5, study_threshold=0.4)


def test_migrations_leave_the_schema_the_code_queries(store):
    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    Store(store.url)  # opening again migrates nothing and keeps the rows
    assert store.table("requests") == []


def test_a_request_its_studies_and_slices_are_recorded_by_hash_only(store):
    store.register_model(MODEL, "tiny", "int8", "/runs/x", 0.5, 0.4, [0.1, 0.2, 0.3])
    store.register_model(MODEL, "again", "int8", None, 0.9, 0.9, None)  # the first registration stands
    ids = record(store, study("aaaa1111aaaa1111", [False, True, True]))
    (req,) = store.table("requests")
    assert req["reader"] == "reader-1" and req["latency_ms"] == 12.35 and req["channel"] == "serve"
    (pred,) = store.table("predictions")
    assert ids == {"aaaa1111aaaa1111": pred["id"]} and pred["flagged"] and pred["slices"] == 3
    assert [s["position"] for s in store.table("slices")] == [0, 1, 2]
    assert store.model()["name"] == "tiny" and store.model()["reference"] == [0.1, 0.2, 0.3]
    with pytest.raises(ValueError, match="content hash"):
        record(store, study("Jane Doe", [True]))
    assert len(store.table("requests")) == 1  # nothing of the refused record was written


def test_feedback_verdicts_marks_and_refusals(store):
    pid = record(store, study("bbbb2222bbbb2222", [False, True]))["bbbb2222bbbb2222"]
    negative, positive = "bbbb2222bbbb22220000", "bbbb2222bbbb22220001"
    assert store.add_feedback(pid, verdict="reject")["hemorrhage"] is False  # the study was flagged
    assert store.add_feedback(pid, verdict="confirm", slice_hash=negative)["hemorrhage"] is False
    mark = store.add_feedback(pid, slice_hash=negative, point=(0.25, 0.75), subtype="SDH", reader="r2")
    assert mark["verdict"] == "reject" and mark["hemorrhage"] and mark["point"] == {"x": 0.25, "y": 0.75}
    assert store.add_feedback(pid, slice_hash=positive, subtype="IVH")["verdict"] == "confirm"
    refused = {"unknown prediction": dict(prediction=pid + 99, verdict="confirm"),
               "unknown slice": dict(prediction=pid, verdict="confirm", slice_hash="ffff0000ffff0000ffff"),
               "point without slice": dict(prediction=pid, point=(0.5, 0.5)),
               "point outside": dict(prediction=pid, slice_hash=positive, point=(1.5, 0.5)),
               "bleed contradicts": dict(prediction=pid, slice_hash=positive, verdict="reject", subtype="IPH"),
               "no verdict": dict(prediction=pid, slice_hash=positive),
               "bad subtype": dict(prediction=pid, verdict="confirm", subtype="XYZ"),
               "bad verdict": dict(prediction=pid, verdict="maybe")}
    for why, kw in refused.items():
        with pytest.raises(FeedbackError):
            store.add_feedback(kw.pop("prediction"), **kw)
            pytest.fail(why)
    history = store.history("bbbb2222bbbb2222")
    assert [f["id"] for f in history["feedback"]] == [4, 3, 2, 1] and len(history["predictions"]) == 1


def test_a_store_from_a_newer_ichedge_is_refused(tmp_path):
    store = Store(tmp_path / "s.db")
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(ValueError, match="newer"):
        Store(tmp_path / "s.db")


def test_psi_is_near_zero_for_the_same_distribution_and_large_for_a_shift():
    rng = np.random.default_rng(0)
    ref = rng.beta(2, 5, 2000)
    assert psi(ref, rng.beta(2, 5, 2000)) < 0.02
    assert psi(ref, np.clip(rng.beta(2, 5, 2000) + 0.15, 0, 1)) > DRIFT_WARNING
    assert psi(ref, np.full(100, 0.99)) > 5  # every score in the top bin: far over, and finite
    with pytest.raises(ValueError):
        psi(ref, [])


def test_monitor_weekly_figures_drift_and_reader_agreement(tmp_path):
    rng = np.random.default_rng(1)
    store = Store(tmp_path / "s.db")
    store.register_model(MODEL, "tiny", "int8", None, 0.5, 0.4, rng.beta(2, 5, 500).tolist())
    ids = record(store, study("cccc3333cccc3333", [True, False]), study("dddd4444dddd4444", [False, False]))
    store.add_feedback(ids["cccc3333cccc3333"], verdict="confirm")  # a true positive
    store.add_feedback(ids["dddd4444dddd4444"], verdict="confirm")
    store.add_feedback(ids["dddd4444dddd4444"], verdict="reject")  # changed mind: a missed bleed
    (week,) = monitor(store)["weeks"]
    assert week["requests"] == 1 and week["studies"] == 2 and week["slices"] == 4 and week["feedback"] == 2
    assert week["flag_rate_slices"] == 0.25 and week["flag_rate_studies"] == 0.5 and week["agreement"] == 0.5
    assert week["sensitivity"]["value"] == 0.5 and week["sensitivity"]["n"] == 2 and week["specificity"] is None
    assert 0 < week["sensitivity"]["low"] < 0.5 < week["sensitivity"]["high"] < 1
    assert not week["drift"]  # 4 slices: too few to judge, however far off
    assert any("too few" in w for w in monitor(store)["warnings"])
    # a later week of shifted scores drifts; its rows are moved a week on
    shifted = StudyRecord("eeee5555eeee5555", 0.9, True, 0, [
        SliceRecord(f"eeee5555eeee5555{k:04x}", k, float(p), bool(p > 0.5), None, False)
        for k, p in enumerate(np.clip(rng.beta(2, 5, MIN_DRIFT_SLICES) + 0.3, 0, 1))])
    record(store, shifted)
    with store.engine.begin() as conn:
        last = conn.execute(sa.select(sa.func.max(predictions.c.id))).scalar()
        t = conn.execute(sa.select(predictions.c.time).where(predictions.c.id == last)).scalar()
        conn.execute(predictions.update().where(predictions.c.id == last).values(time=t + timedelta(days=7)))
    report = monitor(store)
    assert [w["drift"] for w in report["weeks"]] == [False, True] and report["weeks"][1]["psi"] > DRIFT_WARNING
    assert "DRIFT" in format_monitor(report)[-2] + format_monitor(report)[-3]
    assert not any("refused" in w or "outside" in w for w in report["warnings"])


def test_monitor_warns_of_refused_files_and_slices_outside_the_validated_inputs(tmp_path):
    store = Store(tmp_path / "s.db")
    store.register_model(MODEL, "tiny", "int8", None, 0.5, 0.4, None)
    outside = StudyRecord("ffff6666ffff6666", 0.2, False, 40, [
        SliceRecord(f"ffff6666ffff6666{k:04x}", k, 0.2, False, 1.5 if k < 40 else 0.5, k < 40) for k in range(60)])
    store.record(channel="predict", status=200, model=MODEL, n_files=300, studies=[outside], slice_threshold=0.5,
                 study_threshold=0.4)
    report = monitor(store)
    (week,) = report["weeks"]
    assert week["refused_rate"] == 0.8 and week["ood_rate"] == pytest.approx(40 / 60) and week["psi"] is None
    assert [("refused 240 of 300" in w, "40 of 60 slices" in w) for w in report["warnings"][:2]] == [
        (True, False), (False, True)]
    assert any("no validation scores" in w for w in report["warnings"])


def test_labels_follow_the_latest_verdicts_and_export_as_a_manifest(tmp_path):
    store, uploads = Store(tmp_path / "s.db"), tmp_path / "uploads"
    uploads.mkdir()
    rng = np.random.default_rng(2)
    write_ct_dicom(uploads / "k0.dcm", ct_phantom(rng, False))
    Image.fromarray(np.full((32, 32), 90, np.uint8)).save(uploads / "k1.png")
    ids = record(store, study("aaaa0000aaaa0000", [False, False], kept=["k0.dcm", "k1.png"]),
                 study("bbbb0000bbbb0000", [True, False, False], kept=[None, "k0.dcm", "k1.png"]),
                 study("cccc0000cccc0000", [True]))
    store.add_feedback(ids["aaaa0000aaaa0000"], verdict="confirm")  # no bleed: every slice negative
    store.add_feedback(ids["bbbb0000bbbb0000"], verdict="confirm")  # a bleed: only judged slices count
    store.add_feedback(ids["bbbb0000bbbb0000"], verdict="reject", slice_hash="bbbb0000bbbb00000002")
    store.add_feedback(ids["bbbb0000bbbb0000"], verdict="confirm", slice_hash="bbbb0000bbbb00000001")
    store.add_feedback(ids["bbbb0000bbbb0000"], verdict="confirm", slice_hash="bbbb0000bbbb00000000")  # not kept
    labels = {(item.study[:4], item.position): item.hemorrhage for item in labelled_slices(store)}
    assert labels == {("aaaa", 0): False, ("aaaa", 1): False, ("bbbb", 0): True, ("bbbb", 1): False,
                      ("bbbb", 2): True}
    done = export_feedback(store, uploads, tmp_path / "out")
    assert done.rows == 4 and done.studies == 2 and done.positives == 1 and len(done.skipped) == 1
    ds = read_manifest(done.path / "labels.csv")
    assert len(ds) == 4 and sorted(r.label for r in ds.records) == [0, 0, 0, 1]
    rows = list(csv.DictReader((done.path / "labels.csv").open()))
    assert {r["source"] for r in rows} == {"feedback"} and {bool(r["bone"]) for r in rows} == {True, False}
    assert all((done.path / r["brain"]).is_file() for r in rows)
    assert "de-identified" in (done.path / "README.md").read_text()
