"""The service as a hospital's security review attacks it: unusable input is never reassurance,
tokens, Host and Origin checks, headers, the audit log, admission, and nothing identifying kept."""

import io
import json
import threading

import httpx
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin

from ichedge.access import TokenStore
from ichedge.cli import main
from ichedge.connections import serve_in_thread
from ichedge.service import Access, Limits, create_app
from ichedge.store import Store
from tests.conftest import PHI, ct_phantom, synthetic_slice, write_ct_dicom
from tests.test_deid import MARKER, marked_exif, write_slice

LOCAL = "http://localhost"


def png(array: np.ndarray, **info) -> bytes:
    buf = io.BytesIO()
    meta = PngImagePlugin.PngInfo()
    for k, v in info.items():
        meta.add_text(k, v)
    Image.fromarray(array).save(buf, format="PNG", pnginfo=meta)
    return buf.getvalue()


def files(*items):
    return [("files", (name, data, "application/octet-stream")) for name, data in items]


@pytest.fixture(scope="module")
def client(served_run):
    return TestClient(create_app(served_run, explain=False), base_url=LOCAL)


def junk(tmp_path) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    with np.errstate(invalid="ignore"):  # storing pixels through a NaN slope is the point
        nan = write_ct_dicom(tmp_path / "nan.dcm", ct_phantom(rng, False), slope=float("nan")).read_bytes()
    return {
        "blank.png": png(np.zeros((512, 512), np.uint8)),
        "one.png": png(np.full((1, 1), 128, np.uint8)),
        "line.png": png(np.full((1, 5000), 128, np.uint8)),
        "bomb.png": png(np.zeros((3000, 3000), np.uint8)),  # over 2048 a side: refused from the header
        "nan.dcm": nan,
        "huge.dcm": write_ct_dicom(tmp_path / "huge.dcm", ct_phantom(rng, False), slope=1e308).read_bytes(),
    }


def test_unusable_input_is_refused_never_scored_as_negative(client, tmp_path):
    for name, data in junk(tmp_path).items():
        r = client.post("/api/predict", files=files((name, data)))
        assert r.status_code == 422, (name, r.text)
        (error,) = r.json()["detail"]["errors"]
        assert error["file"] == name
        assert "not a usable head-CT slice" in error["error"] or "over the limit" in error["error"], error
        assert "no hemorrhage" not in r.text


def test_every_result_carries_an_ood_score(client):
    head = png(synthetic_slice(np.random.default_rng(5), False))
    (result,) = client.post("/api/predict", files=files(("head.png", head))).json()["results"]
    assert result["ood_score"] is not None and result["outside"] == (result["ood_score"] >= 1)
    photo = np.random.default_rng(1).integers(0, 256, (256, 256), dtype=np.uint8)  # passes no head-CT reference
    r = client.post("/api/predict", files=files(("noise.png", png(photo))))
    if r.status_code == 200:
        (result,) = r.json()["results"]
        assert result["outside"] and "outside what this model was validated on" in result["decision"]
    else:
        assert r.status_code == 422 and "not a usable head-CT slice" in r.text


def test_head_is_allowed_on_health_and_security_headers_are_sent(client):
    r = client.head("/api/health")
    assert r.status_code == 200
    for page in ("/", "/api/health"):
        headers = client.get(page).headers
        assert "default-src 'self'" in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY"
        assert headers["referrer-policy"] == "no-referrer" and "server" not in headers
    assert client.get("/api/health").headers["cache-control"] == "no-store"


def test_dns_rebinding_and_cross_site_posts_are_refused(client):
    head = png(synthetic_slice(np.random.default_rng(5), False))
    assert client.get("/api/health", headers={"host": "evil.example"}).status_code == 400
    r = client.post("/api/predict", files=files(("a.png", head)), headers={"origin": "https://evil.example"})
    assert r.status_code == 403
    r = client.post("/api/predict", files=files(("a.png", head)), headers={"origin": LOCAL})
    assert r.status_code == 200


def test_tokens_are_required_once_configured_and_requests_are_audited(served_run, tmp_path):
    tokens = TokenStore(tmp_path / "tokens.json")
    token = tokens.create("reader-1")
    db = tmp_path / "store.db"
    c = TestClient(create_app(served_run, explain=False, access=Access(tokens=tokens.path), store=Store(db)),
                   base_url=LOCAL)
    upload = write_ct_dicom(tmp_path / "a.dcm", ct_phantom(np.random.default_rng(0), True)).read_bytes()
    assert c.get("/api/health").status_code == 200  # uptime monitors need no token
    r = c.post("/api/predict", files=files(("a.dcm", upload)))
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert c.get("/api/model").status_code == 401
    assert c.post("/api/predict", files=files(("a.dcm", upload)),
                  headers={"authorization": "Bearer not-the-token"}).status_code == 401
    auth = {"authorization": f"Bearer {token}"}
    assert c.get("/api/model", headers=auth).status_code == 200
    assert c.post("/api/predict", files=files(("a.dcm", upload)), headers=auth).status_code == 200
    assert c.post("/api/studies", files=files(("x.txt", b"x")), headers=auth).status_code == 422
    store = Store(db)
    first, second = store.table("requests")[-2:]
    assert first["reader"] == "reader-1" and first["status"] == 200 and first["path"] == "/api/predict"
    assert first["n_files"] == 1 and first["model"] == c.app.state.service.info["id"] and first["latency_ms"] > 0
    (study,) = store.table("predictions")
    assert study["request_id"] == first["id"] and len(study["study"]) == 16 and study["slices"] == 1
    assert second["status"] == 422 and second["n_files"] == 1
    text = db.read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("store.db-*"))
    assert all(secret.encode() not in text for secret in PHI.values()) and b"a.dcm" not in text
    assert token not in (tmp_path / "tokens.json").read_text()


def test_nothing_identifying_survives_anywhere_the_service_writes(served_run, tmp_path, caplog, capsys):
    keep, db = tmp_path / "kept", tmp_path / "store.db"
    access = Access(deid_key=tmp_path / "home" / "deid.key")
    c = TestClient(create_app(served_run, keep_uploads=keep, access=access, store=Store(db)), base_url=LOCAL)
    rng = np.random.default_rng(0)
    dicom, _ = write_slice(tmp_path / "s1.dcm", rng, 0.0, 1, "1.2.826.0.1.3680043.8.498.91",
                           referenced="1.2.826.0.1.3680043.8.498.92")
    head = synthetic_slice(rng, True)
    image = io.BytesIO()
    Image.fromarray(head).save(image, format="PNG", pnginfo=_marked_png_info(), exif=marked_exif())
    jpeg = io.BytesIO()
    Image.fromarray(head).save(jpeg, format="JPEG", comment=f"{MARKER} comment".encode(), exif=marked_exif())
    r = c.post("/api/studies", files=files(("s1.dcm", dicom), ("head.png", image.getvalue()),
                                           ("head.jpg", jpeg.getvalue())))
    assert r.status_code == 200 and len(list(keep.iterdir())) == 3, r.text
    assert MARKER not in r.text and all(secret not in r.text for secret in PHI.values())
    written = [p.read_bytes() for p in [*keep.iterdir(), *tmp_path.glob("store.db*")]]
    assert all(MARKER.encode() not in data for data in written)
    (kept,) = keep.glob("*.dcm")
    assert "keyed hash (HMAC)" in " ".join(pydicom.dcmread(kept).DeidentificationMethod)
    out = capsys.readouterr()
    assert MARKER not in caplog.text + out.out + out.err


def _marked_png_info() -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", f"{MARKER} text chunk")
    info.add_itxt("Author", f"{MARKER} international text")
    info.add_text("Description", f"{MARKER} compressed text", zip=True)
    return info


def test_beyond_the_waiting_line_requests_get_503_with_retry_after(served_run):
    app = create_app(served_run, explain=False, limits=Limits(max_active=1, max_waiting=0, retry_after_s=7))
    service, release, entered = app.state.service, threading.Event(), threading.Event()
    original = service.run

    def held(*args):
        entered.set()
        release.wait(10)
        return original(*args)

    service.run = held
    head = png(synthetic_slice(np.random.default_rng(5), False))
    with serve_in_thread(app) as url:
        first: dict = {}
        worker = threading.Thread(target=lambda: first.update(r=httpx.post(f"{url}/api/predict", files=files(("a.png", head)),
                                                                           timeout=30)))
        worker.start()
        assert entered.wait(10)
        busy = httpx.post(f"{url}/api/predict", files=files(("b.png", head)), timeout=30)
        release.set()
        worker.join(30)
    assert busy.status_code == 503 and busy.headers["retry-after"] == "7"
    assert first["r"].status_code == 200
    assert json.loads(busy.text)["detail"].startswith("busy")


def test_the_cli_makes_tokens_and_refuses_to_expose_the_service_unprotected(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ICHEDGE_HOME", str(tmp_path / "home"))
    tokens = tmp_path / "tokens.json"
    assert main(["token", "create", "reader-2", "--tokens", str(tokens)]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert TokenStore(tokens).verify(token) == "reader-2" and token not in tokens.read_text()
    assert main(["token", "revoke", "--tokens", str(tokens)]) == 2
    assert "needs the token's NAME" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "no-model"), "--host", "0.0.0.0", "--tokens", str(tokens)]) == 2
    err = capsys.readouterr().err
    assert "no TLS" in err and "--insecure-expose" in err
