"""Slow and vanishing clients against a real uvicorn on loopback, through raw sockets.

Deadlines are about a second so the file runs in seconds; each test checks both that the
server gave up and that it did not give up before the deadline.
"""

import itertools
import json
import logging
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request

import pytest
from fastapi import FastAPI, Request

from ichedge.connections import Timeouts, serve_in_thread

T = Timeouts(header_s=1.0, body_s=1.0, min_rate=256 * 1024, idle_s=0.5)
MARGIN = 1.0


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def records():
    # On the loggers themselves: uvicorn's own logging config may stop propagation to the root.
    handler = Records()
    loggers = [logging.getLogger(n) for n in ("uvicorn", "uvicorn.error", "ichedge.connections")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
    logging.getLogger("ichedge.connections").setLevel(logging.INFO)
    yield handler
    for lg, level in zip(loggers, levels):
        lg.removeHandler(handler)
        lg.setLevel(level)


@pytest.fixture(scope="module")
def address(records):
    app = FastAPI()

    @app.get("/hello")
    def hello() -> dict:
        return {"hello": "world"}

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"n": len(await request.body())}

    with serve_in_thread(app, timeouts=T) as url:
        host, port = url.removeprefix("http://").split(":")
        yield host, int(port)


def connect(address) -> socket.socket:
    return socket.create_connection(address, timeout=5)


def within(elapsed: float, deadline: float) -> bool:
    # The server's clock may start a little before the client's (at the end of a response).
    return deadline * 0.8 <= elapsed <= deadline + MARGIN


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and when it closed (monotonic)."""
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic()


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """One response with a Content-Length: its head and body."""
    sock.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return head, body


def trickle(sock: socket.socket, pieces, every: float, tries: int = 20) -> bytes:
    """Send the next piece every ``every`` seconds until the server closes; what it sent."""
    sock.settimeout(every)
    data = b""
    for piece in itertools.islice(pieces, tries):
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def test_silent_connection_is_closed_after_header_s(address):
    with connect(address) as sock:
        start = time.monotonic()
        data, closed = read_until_closed(sock, T.header_s + MARGIN)
    assert data == b"" and within(closed - start, T.header_s)


def test_head_sent_a_line_at_a_time_is_cut(address):
    with connect(address) as sock:
        start = time.monotonic()
        sock.sendall(b"GET /hello HTTP/1.1\r\n")
        data = trickle(sock, (b"X-Line-%d: 1\r\n" % n for n in itertools.count()), 0.4)
    assert data == b"" and within(time.monotonic() - start, T.header_s)


def test_body_shorter_than_content_length_gets_408(address):
    with connect(address) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        start = time.monotonic()
        data, closed = read_until_closed(sock, T.body_s + MARGIN)
    assert data.startswith(b"HTTP/1.1 408 ") and b"request body too slow" in data
    assert b"connection: close" in data.lower() and within(closed - start, T.body_s)


def test_body_trickled_a_byte_at_a_time_is_dropped(address):
    with connect(address) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n")
        start = time.monotonic()
        data = trickle(sock, itertools.repeat(b"x"), 0.3)
    assert data.startswith(b"HTTP/1.1 408 ") and within(time.monotonic() - start, T.body_s)


def test_client_gone_mid_upload_leaves_no_traceback(address, records, capfd):
    before = len(records.records)
    with connect(address) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\n" + b"x" * 5000)
        time.sleep(0.1)
    deadline = time.monotonic() + 3
    while not any("disconnected" in r.getMessage() for r in records.records[before:]):
        assert time.monotonic() < deadline, "the disconnect was not noticed"
        time.sleep(0.05)
    time.sleep(0.1)
    new = records.records[before:]
    assert sum("disconnected" in r.getMessage() for r in new) == 1
    assert not any(r.exc_info or r.levelno >= logging.WARNING for r in new)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "Exception in ASGI" not in out + err


def test_normal_requests_keep_alive_then_idle_close(address):
    with connect(address) as sock:
        sock.sendall(b"GET /hello HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head, body = read_response(sock)
        assert head.startswith(b"HTTP/1.1 200 ") and body == b'{"hello":"world"}'
        assert b"\r\nserver:" not in head.lower()
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5000\r\n\r\n" + b"y" * 5000)
        head, body = read_response(sock)
        assert head.startswith(b"HTTP/1.1 200 ") and body == b'{"n":5000}'
        idle_from = time.monotonic()
        data, closed = read_until_closed(sock, T.idle_s + MARGIN)
    assert data == b"" and within(closed - idle_from, T.idle_s)


def test_pipelined_requests_are_answered(address):
    with connect(address) as sock:
        sock.sendall(b"GET /hello HTTP/1.1\r\nHost: localhost\r\n\r\n" * 2)
        for _ in range(2):
            head, body = read_response(sock)
            assert head.startswith(b"HTTP/1.1 200 ") and body == b'{"hello":"world"}'


def test_keep_alive_head_deadline_restarts_after_each_response(address):
    """A byte after a response stops the idle timer; the head deadline, restarted, still cuts."""
    with connect(address) as sock:
        time.sleep(T.header_s * 0.7)
        sock.sendall(b"GET /hello HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head, _ = read_response(sock)
        assert head.startswith(b"HTTP/1.1 200 ")
        answered = time.monotonic()
        sock.sendall(b"G")
        data, closed = read_until_closed(sock, T.header_s + MARGIN)
    assert data == b"" and within(closed - answered, T.header_s)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    app = FastAPI()

    @app.get("/hello")
    def hello() -> dict:
        return {"hello": "tls"}

    with serve_in_thread(app, certfile=str(cert), keyfile=str(key), timeouts=T) as url:
        assert url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(cert))
        with urllib.request.urlopen(url + "/hello", context=context, timeout=5) as r:
            assert r.status == 200 and json.load(r) == {"hello": "tls"} and r.headers["server"] is None
