"""The reader feedback loop end to end, on SQLite and on a real PostgreSQL server:
serve and record, feedback through the API, export a dataset, retrain a challenger, compare, decide."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ichedge.cli import main
from ichedge.data import read_manifest
from ichedge.feedback import export_feedback
from ichedge.retrain import retrain
from ichedge.runs import RunFolder
from ichedge.service import create_app
from ichedge.store import Store
from tests.conftest import synthetic_slice

LOCAL = "http://127.0.0.1"


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_serve_feedback_export_retrain_compare(database, served_run, tmp_path, request, capsys):
    url = tmp_path / "store.db" if database == "sqlite" else request.getfixturevalue("postgres_url")
    store, uploads = Store(url), tmp_path / "uploads"
    client = TestClient(create_app(served_run, explain=False, store=store, keep_uploads=uploads), base_url=LOCAL)
    rng = np.random.default_rng(11)
    for k in range(6):  # six local studies, three with a bleed on their middle slices
        bleeding = k % 2 == 0
        truth = [bleeding and s in (1, 2) for s in range(4)]
        files = [("files", (f"s{s}.png", png(synthetic_slice(rng, t)), "image/png")) for s, t in enumerate(truth)]
        r = client.post("/api/studies", files=files, data={"study": f"local {k}"})
        assert r.status_code == 200, r.text
        (st,) = r.json()["studies"]
        assert st["prediction"] is not None and len(st["id"]) == 16
        if bleeding:  # a reader judges each slice
            for s in st["ranking"]:
                t = truth[int(s["file"][1])]
                body = {"prediction": st["prediction"], "slice": s["slice_hash"],
                        "verdict": "confirm" if s["flagged"] == t else "reject"}
                assert client.post("/api/feedback", json=body).status_code == 200
        else:  # a reader says the study has no bleed
            verdict = "reject" if st["flagged"] else "confirm"
            assert client.post("/api/feedback", json={"prediction": st["prediction"], "verdict": verdict}
                               ).json()["feedback"]["hemorrhage"] is False
    assert len(store.table("requests")) == 6 and len(list(uploads.iterdir())) == 24
    # the monitor's baseline: the served int8 model's own outputs on its run's validation slices
    assert len(store.model()["reference"]) == len(RunFolder.open(served_run).meta["split"]["val"])
    assert client.post("/api/feedback", json={"prediction": 999, "verdict": "confirm"}).status_code == 422

    exported = export_feedback(store, uploads, tmp_path / "exports")
    assert exported.rows == 24 and exported.studies == 6 and exported.positives == 6
    assert sum(r.label for r in read_manifest(exported.path / "labels.csv").records) == 6

    done = retrain(served_run, [exported.path / "labels.csv"], tmp_path / "runs", store=store, n_boot=200)
    champion, challenger = RunFolder.open(served_run), RunFolder.open(done.challenger)
    assert challenger.config == champion.config  # the champion's own recipe
    learned = done.comparison["feedback"]
    assert learned["learned_from"] + learned["held_out"] == 6 and learned["slices_learned"] == 4 * learned["learned_from"]
    assert challenger.meta["dataset"]["sizes"]["train"] == champion.meta["dataset"]["sizes"]["train"] + learned[
        "slices_learned"]
    assert [k.split(":", 1)[1] for k in challenger.meta["split"]["test"]] == champion.meta["split"]["test"]
    held = done.comparison["sets"]["held-out patients"]
    assert held["slices"] == len(champion.meta["split"]["test"]) and 0 <= held["auc"]["a"] <= 1
    assert held["sensitivity"]["low"] <= held["sensitivity"]["difference"] <= held["sensitivity"]["high"]
    assert "feedback studies" in done.comparison["sets"]
    (decision,) = store.table("retrains")
    assert decision["promoted"] == done.promoted and decision["figures"]["sets"].keys() == done.comparison["sets"].keys()
    assert (done.folder / "comparison.md").read_text().count("|") > 10
    assert done.promoted == (not done.reasons)

    # the monitor reads the same store from the command line
    assert main(["monitor", "--db", str(url)]) == 0
    out = capsys.readouterr().out
    assert "sensitivity / specificity" in out and out.count("-W") >= 1


def test_predict_records_its_batch_by_content_hash(served_run, tmp_path, capsys):
    rng = np.random.default_rng(3)
    folder = tmp_path / "patient-0042"
    folder.mkdir()
    for s in range(3):
        (folder / f"slice{s}.png").write_bytes(png(synthetic_slice(rng, s == 1)))
    (folder / "notes.txt").write_text("not an image")
    db = tmp_path / "store.db"
    assert main(["predict", str(folder), "--model", str(served_run), "--db", str(db), "--out", str(tmp_path)]) == 0
    assert "recorded in sqlite:///" in capsys.readouterr().out
    store = Store(db)
    (req,) = store.table("requests")
    (study,) = store.table("predictions")
    assert req["channel"] == "predict" and req["n_files"] == 4 and study["slices"] == 3
    val_p = RunFolder.open(served_run).predictions()["val_p"]  # a run folder serves its Keras model
    assert store.model(req["model"])["reference"] == pytest.approx(val_p.tolist(), abs=1e-6)
    text = db.read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("store.db-*"))
    assert b"patient-0042" not in text and b"slice1" not in text  # names never reach the store
    assert main(["predict", str(folder), "--model", str(served_run), "--db", str(db), "--no-record",
                 "--out", str(tmp_path)]) == 0
    assert len(store.table("requests")) == 1
