"""The triage web service: every endpoint and every kind of bad input, through FastAPI's TestClient."""

import base64
import io
import tempfile

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ichedge.commands import build_parser
from ichedge.intake import Source, prepare_sources
from ichedge.runtimes import Predictor
from ichedge.service import Limits, create_app
from tests.conftest import PHI, ct_phantom, synthetic_slice, write_ct_dicom

LOCAL = "http://localhost"  # the Host the service accepts on loopback (TestClient says "testserver")


def png_bytes(bleed: bool = False, seed: int = 0, size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic_slice(np.random.default_rng(seed), bleed, size)).save(buf, format="PNG")
    return buf.getvalue()


def dicom_bytes(tmp_path, name="a.dcm", **kw) -> bytes:
    return write_ct_dicom(tmp_path / name, ct_phantom(np.random.default_rng(0), False), **kw).read_bytes()


@pytest.fixture(scope="module")
def client(served_run):
    return TestClient(create_app(served_run), base_url=LOCAL)


def files(*items):
    return [("files", (name, data, "application/octet-stream")) for name, data in items]


def test_health_model_and_openapi(client):
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["model"]["kind"].startswith("tflite-int8")
    assert len(health["model"]["id"]) == 12 and health["model"]["heatmaps"] is True
    model = client.get("/api/model").json()
    assert model["decision"]["study_aggregate"] == "top3" and "quantization" in model["card"]
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/predict", "/api/studies", "/api/health", "/api/model"} <= set(paths)


def test_page_model_card_and_credit_are_served_offline(client):
    page = client.get("/")
    assert page.status_code == 200 and "Drop CT slices" in page.text
    assert "cdn" not in page.text.lower() and "http" not in page.text.replace("http-equiv", "")
    assert client.get("/static/app.js").status_code == 200
    card = client.get("/model-card")
    assert card.status_code == 200 and "Model card" in card.text and "sha256" in card.text
    assert client.get("/api/credit").json()["data"]


def test_predict_one_slice_matches_the_int8_model_and_has_a_heatmap(client):
    data = png_bytes(bleed=True, seed=3)
    r = client.post("/api/predict", files=files(("slice.png", data)))
    assert r.status_code == 200
    body = r.json()
    (result,) = body["results"]
    served = client.app.state.service.source  # the run's latest export
    assert served.name == "model_int8.tflite"
    int8 = Predictor.load(served)
    expected = int8.predict(prepare_sources([Source("slice.png", data)], int8.preprocessing).x)[0]
    assert result["probability"] == pytest.approx(float(expected), abs=1e-6)
    assert result["flagged"] == (result["probability"] >= body["slice_threshold"])
    assert result["decision"] == ("hemorrhage suspected" if result["flagged"] else "no hemorrhage flagged")
    png = base64.b64decode(result["heatmap"].split(",", 1)[1])
    assert Image.open(io.BytesIO(png)).size == (64, 64)  # 32x32 input, shown at twice the size


def test_one_bad_file_does_not_stop_the_batch(client):
    r = client.post("/api/predict?heatmap=false", files=files(("a.png", png_bytes()), ("notes.png", b"hello there"),
                                                             ("b.png", png_bytes(seed=1))))
    assert r.status_code == 200
    body = r.json()
    assert [x["file"] for x in body["results"]] == ["a.png", "b.png"]
    assert all(x["heatmap"] is None for x in body["results"])
    assert body["errors"] == [{"file": "notes.png", "error": "notes.png: not a PNG, JPEG or DICOM file (judged by its content)"}]


def test_studies_groups_and_ranks_a_dicom_series_without_identifying_fields(client, tmp_path):
    rng = np.random.default_rng(2)
    uploads = []
    for i, z in enumerate([10.0, 0.0, 5.0]):
        path = write_ct_dicom(tmp_path / f"s{i}.dcm", ct_phantom(rng, i == 0), z=z, instance=i + 1)
        uploads.append((f"s{i}.dcm", path.read_bytes()))
    uploads.append(("extra.png", png_bytes()))
    r = client.post("/api/studies", files=files(*uploads))
    assert r.status_code == 200
    studies = r.json()["studies"]
    assert sorted(s["slices"] for s in studies) == [1, 3]
    series = next(s for s in studies if s["slices"] == 3)
    assert series["study"].startswith("study-") and "/series-" in series["study"]
    probs = [x["probability"] for x in series["ranking"]]
    assert probs == sorted(probs, reverse=True)
    assert {x["file"]: x["index"] for x in series["ranking"]} == {"s1.dcm": 0, "s2.dcm": 1, "s0.dcm": 2}
    assert [s["flagged"] for s in studies] == sorted((s["flagged"] for s in studies), reverse=True)
    for secret in PHI.values():
        assert secret not in r.text


@pytest.mark.parametrize("name,data,message", [
    ("empty.png", b"", "empty.png: empty file"),
    ("cut.png", png_bytes()[:120], "cut.png: not a readable image"),
    ("report.pdf", b"%PDF-1.4 not an image", "report.pdf: not a PNG, JPEG or DICOM file"),
    ("fake.jpg", b"GIF89a" + bytes(200), "fake.jpg: not a PNG, JPEG or DICOM file"),
])
def test_unusable_uploads_get_a_422_naming_the_file(client, name, data, message):
    r = client.post("/api/predict", files=files((name, data)))
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail["message"] == "no usable slice in the upload"
    assert any(message in e["error"] for e in detail["errors"])


STUDY, SERIES = "1.3.6.1.4.1.9999.42.7", "1.3.6.1.4.1.9999.42.7.3"  # distinctive: no generated UID contains them


def test_wrong_modality_and_uid_free_errors(client, tmp_path):
    data = dicom_bytes(tmp_path, modality="MR", study=STUDY, series=SERIES)
    r = client.post("/api/predict", files=files(("mr.dcm", data)))
    assert r.status_code == 422 and "mr.dcm: modality MR, not CT" in r.text
    assert all(secret not in r.text for secret in [*PHI.values(), STUDY])


def test_request_shape_errors_are_4xx_with_a_message(client):
    r = client.post("/api/predict", files={"study": (None, "x")})  # multipart, but no file
    assert r.status_code == 400 and r.json()["detail"].startswith("no files uploaded")
    r = client.post("/api/predict", content=b"raw bytes", headers={"content-type": "image/png"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]


def test_limits_on_size_and_count(served_run):
    small = TestClient(create_app(served_run, limits=Limits(max_files=2, max_file_bytes=3000, max_request_bytes=200_000),
                                  explain=False), base_url=LOCAL)
    big = png_bytes(size=256)
    assert len(big) > 3000
    r = small.post("/api/predict", files=files(("big.png", big)))
    assert r.status_code == 422 and "big.png: larger than" in r.text
    r = small.post("/api/predict", files=files(*[(f"{i}.png", png_bytes(seed=i, size=32)) for i in range(3)]))
    assert r.status_code == 400 and "Too many files" in r.json()["detail"]
    r = small.post("/api/predict", files=files(("huge.png", bytes(300_000))))
    assert r.status_code == 413 and "over the limit" in r.json()["detail"]


def test_uploads_stay_in_memory_unless_kept_and_kept_ones_are_deidentified(served_run, tmp_path, monkeypatch):
    rolled = []
    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", lambda self: rolled.append(1))
    c = TestClient(create_app(served_run, explain=False), base_url=LOCAL)
    rng = np.random.default_rng(0)
    head = synthetic_slice(rng, False, 1200).astype(np.int16) + rng.integers(-60, 60, (1200, 1200))
    buf = io.BytesIO()
    Image.fromarray(np.clip(head, 0, 255).astype(np.uint8)).save(buf, format="PNG")  # over Starlette's 1 MiB spool
    assert len(buf.getvalue()) > 1024 * 1024
    assert c.post("/api/predict", files=files(("large.png", buf.getvalue()))).status_code == 200
    assert rolled == []
    keep = tmp_path / "kept"
    k = TestClient(create_app(served_run, keep_uploads=keep, explain=False), base_url=LOCAL)
    upload = dicom_bytes(tmp_path, study=STUDY, series=SERIES)
    assert k.post("/api/predict", files=files(("a.dcm", upload), ("x.txt", b"x"))).status_code == 200
    (saved,) = keep.iterdir()
    assert saved.suffix == ".dcm"
    raw = saved.read_bytes()
    import pydicom

    sop = str(pydicom.dcmread(io.BytesIO(upload)).SOPInstanceUID)
    assert all(secret.encode() not in raw for secret in [*PHI.values(), STUDY, SERIES, sop])
    kept = pydicom.dcmread(saved)
    assert kept.PatientIdentityRemoved == "YES" and kept.StudyInstanceUID and kept.Modality == "CT"


def test_serve_binds_to_loopback_by_default():
    args = build_parser().parse_args(["serve", "--model", "runs/x"])
    assert args.host == "127.0.0.1" and args.backend == "int8" and args.keep_uploads is None
