"""Tokens, content hashes, and the browser-facing guards, on a tiny FastAPI app through TestClient."""

import json
import logging
import os
import stat

import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.testclient import TestClient
from starlette.middleware.trustedhost import TrustedHostMiddleware

from ichedge.access import (CSP, SameOrigin, SecurityHeaders, TokenStore, allowed_hosts, bearer_auth, check_exposure,
                            default_home, deid_key, study_hash, tokens_file)
from ichedge.store import default_url


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --- tokens ----------------------------------------------------------------------------------


def test_tokens_create_verify_revoke(tmp_path):
    store = TokenStore(tmp_path / "home" / "tokens.json")
    assert store.names() == [] and store.verify("anything") is None
    alice, bob = store.create("alice@ward-3"), store.create("bench.pi_4")
    assert len(alice) >= 43 and alice != bob
    assert store.verify(alice) == "alice@ward-3" and store.verify(bob) == "bench.pi_4"
    assert store.verify(alice[:-1]) is None and store.verify("") is None
    assert [n["name"] for n in store.names()] == ["alice@ward-3", "bench.pi_4"]
    assert all(set(n) == {"name", "created"} for n in store.names())
    assert store.revoke("alice@ward-3") and not store.revoke("alice@ward-3")
    assert store.verify(alice) is None and store.verify(bob) == "bench.pi_4"


def test_tokens_refuse_duplicate_and_bad_names(tmp_path):
    store = TokenStore(tmp_path / "tokens.json")
    token = store.create("alice")
    with pytest.raises(ValueError, match="exists"):
        store.create("alice")
    for bad in ("", "a b", "x" * 65, "../x", "alice\n"):
        with pytest.raises(ValueError, match="token name"):
            store.create(bad)
    assert store.verify(token) == "alice" and len(store.names()) == 1


def test_tokens_at_rest_only_hashed_and_private(tmp_path):
    path = tmp_path / "home" / "tokens.json"
    token = TokenStore(path).create("alice")
    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    text = path.read_text()
    assert token not in text and json.loads(text)["tokens"][0]["name"] == "alice"
    assert sorted(p.name for p in path.parent.iterdir()) == ["tokens.json", "tokens.json.lock"]  # no temporary left


def test_tokens_revoked_elsewhere_count_at_once(tmp_path):
    server, cli = TokenStore(tmp_path / "tokens.json"), TokenStore(tmp_path / "tokens.json")
    token = cli.create("alice")
    assert server.verify(token) == "alice"
    cli.revoke("alice")
    assert server.verify(token) is None


def test_default_home(monkeypatch, tmp_path):
    monkeypatch.delenv("ICHEDGE_HOME", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert default_home() == tmp_path / "xdg" / "ichedge"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_home() == tmp_path / ".config" / "ichedge"
    monkeypatch.setenv("ICHEDGE_HOME", str(tmp_path / "ich"))
    assert tokens_file() == tmp_path / "ich" / "tokens.json"
    assert default_url() == f"sqlite:///{tmp_path / 'ich' / 'ichedge.db'}"


def app_with_auth(store):
    app = FastAPI()

    @app.get("/api/whoami")
    def whoami(request: Request, name=Depends(bearer_auth(store))) -> dict:
        return {"name": name, "state": request.state.token_name}

    return app


def test_bearer_dependency(tmp_path):
    store = TokenStore(tmp_path / "tokens.json")
    token = store.create("alice")
    client = TestClient(app_with_auth(store))
    missing = client.get("/api/whoami")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    for header in (f"Bearer {token}x", f"Basic {token}", "Bearer"):
        wrong = client.get("/api/whoami", headers={"Authorization": header})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"].startswith("Bearer")
    ok = client.get("/api/whoami", headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 200 and ok.json() == {"name": "alice", "state": "alice"}
    schemes = client.get("/openapi.json").json()["components"]["securitySchemes"]
    assert schemes["token"]["scheme"] == "bearer"


def test_no_store_means_open_access():
    client = TestClient(app_with_auth(None))
    assert client.get("/api/whoami").json() == {"name": None, "state": None}


# --- hashes ----------------------------------------------------------------------------------


def test_study_hash_is_short_and_order_free():
    h = study_hash([b"slice-1", "slice-2"])
    assert len(h) == 16 and int(h, 16) >= 0
    assert h == study_hash(["slice-2", b"slice-1"]) and h != study_hash([b"slice-1"])


# --- browsers --------------------------------------------------------------------------------


def guarded_app(tls: bool = False, extra_hosts=("testserver",)):
    app = FastAPI()

    @app.get("/")
    def page() -> dict:
        return {"page": True}

    @app.get("/api/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/api/predict")
    async def predict(request: Request) -> dict:
        return {"n": len(await request.body())}

    app.add_middleware(SameOrigin)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts("127.0.0.1", extra_hosts))
    app.add_middleware(SecurityHeaders, tls=tls)
    return app


def test_security_headers():
    client = TestClient(guarded_app())
    api, page = client.get("/api/health"), client.get("/")
    for r in (api, page):
        assert r.headers["content-security-policy"] == CSP and "frame-ancestors 'none'" in CSP
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
        assert r.headers["referrer-policy"] == "no-referrer"
        assert "server" not in r.headers and "strict-transport-security" not in r.headers
    assert api.headers["cache-control"] == "no-store" and "cache-control" not in page.headers
    assert client.get("/nowhere").headers["x-frame-options"] == "DENY"
    tls = TestClient(guarded_app(tls=True), base_url="https://testserver").get("/")
    assert tls.headers["strict-transport-security"].startswith("max-age=")


def test_same_origin_refuses_cross_site_posts():
    client = TestClient(guarded_app())
    refused = [{"Origin": "https://evil.example"}, {"Origin": "null"}, {"Origin": "http://testserver:8000"},
               {"Sec-Fetch-Site": "cross-site"}, {"Origin": "http://testserver", "Sec-Fetch-Site": "cross-site"}]
    for headers in refused:
        r = client.post("/api/predict", content=b"x", headers=headers)
        assert r.status_code == 403 and r.json() == {"detail": "cross-origin request refused"}, headers
    allowed = [{}, {"Origin": "http://testserver"}, {"Origin": "HTTP://TestServer:80"}, {"Sec-Fetch-Site": "same-origin"}]
    for headers in allowed:
        assert client.post("/api/predict", content=b"xy", headers=headers).json() == {"n": 2}, headers
    assert client.get("/api/health", headers={"Origin": "https://evil.example"}).status_code == 200


def test_trusted_host_refuses_rebinding():
    client = TestClient(guarded_app())
    assert client.get("/api/health", headers={"Host": "evil.example"}).status_code == 400
    assert client.get("/api/health", headers={"Host": "evil.example:8000"}).status_code == 400
    for host in ("127.0.0.1:8000", "localhost", "[::1]:8000", "testserver"):
        assert client.get("/api/health", headers={"Host": host}).status_code == 200, host


def test_allowed_hosts():
    assert allowed_hosts("127.0.0.1", []) == ["127.0.0.1", "localhost", "[::1]"]
    assert allowed_hosts("::1", ["Triage.Local"]) == ["127.0.0.1", "localhost", "[::1]", "triage.local"]
    assert allowed_hosts("127.0.0.2", []) == ["127.0.0.1", "localhost", "[::1]", "127.0.0.2"]
    assert allowed_hosts("10.1.2.3", ["triage.hospital.org"]) == ["10.1.2.3", "triage.hospital.org"]
    assert allowed_hosts("0.0.0.0", ["triage.hospital.org", "fd00::5"]) == ["triage.hospital.org", "[fd00::5]"]
    for host in ("0.0.0.0", "::", ""):
        with pytest.raises(ValueError, match="allowed-host"):
            allowed_hosts(host, [])
    with pytest.raises(ValueError, match="any Host"):
        allowed_hosts("0.0.0.0", ["*"])
    with pytest.raises(ValueError, match="without a port"):
        allowed_hosts("127.0.0.1", ["triage.local:8000"])


def test_check_exposure(caplog):
    for host in ("127.0.0.1", "::1", "localhost"):
        check_exposure(host, tls=False, auth=False, force=False)
    check_exposure("0.0.0.0", tls=True, auth=True, force=False)
    for tls, auth, gap in ((False, True, "no TLS"), (True, False, "no tokens"), (False, False, "no TLS")):
        with pytest.raises(ValueError, match=f"{gap}.*--insecure-expose"):
            check_exposure("0.0.0.0", tls=tls, auth=auth, force=False)
    with caplog.at_level(logging.WARNING, logger="ichedge.access"):
        check_exposure("10.1.2.3", tls=False, auth=False, force=True)
    assert "no TLS" in caplog.text and "no tokens" in caplog.text


def test_the_deidentification_key_is_made_once_private_and_kept(tmp_path):
    path = tmp_path / "home" / "deid.key"
    key = deid_key(path)
    assert len(key) == 32 and deid_key(path) == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    path.write_bytes(b"short")
    with pytest.raises(ValueError, match="5 bytes"):
        deid_key(path)
