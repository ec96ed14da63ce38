"""Connection hygiene for `ichedge serve`: deadlines on slow clients, quiet disconnects.

uvicorn holds a connection for as long as the client wants: it has no deadline on the request
head (a header line a second, or nothing at all, keeps a socket forever) nor on the body (a
Content-Length larger than what is sent, or a byte a second), and every upload the client
abandons prints an "Exception in ASGI application" traceback, an easy log flood. Here:

* :class:`HeadTimeoutProtocol` (uvicorn's h11 protocol) closes a connection whose request head
  is not complete within ``header_s`` of the connection opening or of the previous response
  ending; nothing is sent, as nginx does, since a 408 on an idle keep-alive socket makes
  browsers retry.
* :class:`BodyTimeout` (ASGI middleware) gives the body a rate: the n-th byte must have
  arrived within ``body_s + n / min_rate`` seconds of the server waiting for it (time the app
  spends elsewhere does not count), so a declared size buys no time, a client at ``min_rate``
  or faster is never cut, and the longest a body can hold a connection is ``body_s + size /
  min_rate`` (30 s + 8.5 min for the 128 MiB request limit at the defaults). A late body gets
  a 408 and the connection is closed. A client that disconnects is logged in one INFO line.
* :func:`run` starts uvicorn with these, the keep-alive idle deadline, a 16 KiB head limit,
  no ``server`` header, no trust in X-Forwarded-* headers (there is no proxy in front), and
  TLS when given a certificate; :func:`serve_in_thread` does the same in a thread.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import uvicorn
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 16 * 1024  # request line and headers; h11 answers 400 beyond it


@dataclass(frozen=True)
class Timeouts:
    """Deadlines on the client, in seconds (``min_rate`` in bytes per second)."""

    header_s: float = 10.0  # the whole request head, from connect or from the end of the previous response
    body_s: float = 30.0  # grace for the body; then it must keep up min_rate on average
    min_rate: float = 256 * 1024
    idle_s: float = 5.0  # keep-alive: a connection idle this long after a response is closed


class HeadTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head (:attr:`header_s`).

    The timer starts when the connection opens and again when a response ends; it stops when
    uvicorn starts a new request cycle (``self.cycle`` changes), which it does once h11 has the
    whole head. Bytes of an earlier request's unread body count as head time: a client that
    got an early answer (401, 413) must finish sending within the deadline or be cut. Under
    TLS the timer starts after the handshake, which asyncio limits to 60 s on its own.
    """

    header_s: float = Timeouts.header_s

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_cycle: object = None

    @classmethod
    def with_timeout(cls, header_s: float) -> type[HeadTimeoutProtocol]:
        """A subclass with this deadline: uvicorn builds the protocol from ``Config(http=...)`` alone."""
        return type(cls.__name__, (cls,), {"header_s": header_s})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head_timer()

    def handle_events(self) -> None:
        super().handle_events()
        if self._head_timer is not None and self.cycle is not self._head_cycle:
            self._stop_head_timer()

    def on_response_complete(self) -> None:
        # Started before uvicorn looks at pipelined requests, which handle_events may then stop it for.
        if not self.transport.is_closing():
            self._start_head_timer()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def _start_head_timer(self) -> None:
        self._stop_head_timer()
        self._head_cycle = self.cycle
        self._head_timer = self.loop.call_later(self.header_s, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        # After a WebSocket upgrade the transport belongs to another protocol.
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            return
        log.info("%s: no complete request head within %g s; connection closed", _client(self.client), self.header_s)
        self.transport.close()


def _client(client: tuple[str, int] | None) -> str:
    return client[0] if client else "unknown client"


class BodyTimeout:
    """ASGI middleware: the request body's deadline (see the module), and quiet client disconnects.

    A late body is answered 408 with ``Connection: close`` (uvicorn then closes the socket) and
    the app is told the client disconnected; what it sends after that is dropped. Works inside
    or around a Starlette app: around it, Starlette's error middleware tries a 500 that is
    dropped, then re-raises the ClientDisconnect, which is caught here.
    """

    def __init__(self, app: ASGIApp, timeouts: Timeouts = Timeouts()) -> None:
        self.app = app
        self.timeouts = timeouts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t = self.timeouts
        loop = asyncio.get_running_loop()
        received, waited = 0, 0.0
        body_done = started = timed_out = False

        async def receive_in_time() -> Message:
            nonlocal received, waited, body_done, timed_out
            if timed_out:
                return {"type": "http.disconnect"}
            if body_done:
                return await receive()
            began = loop.time()
            try:
                async with asyncio.timeout(max(0.0, t.body_s + received / t.min_rate - waited)):
                    message = await receive()
            except TimeoutError:
                timed_out = True
                log.info("%s: request body too slow (%d bytes in %.1f s); connection closed",
                         _client(scope.get("client")), received, waited + loop.time() - began)
                if not started:
                    await _too_slow(send)
                return {"type": "http.disconnect"}
            finally:
                waited += loop.time() - began
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
            return message

        async def send_unless_timed_out(message: Message) -> None:
            nonlocal started
            if timed_out:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive_in_time, send_unless_timed_out)
        except ClientDisconnect:
            if not timed_out:
                log.info("%s: client disconnected during %s %s", _client(scope.get("client")),
                         scope["method"], scope["path"])


async def _too_slow(send: Send) -> None:
    body = b'{"detail":"request body too slow"}'
    await send({"type": "http.response.start", "status": 408,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def _config(app: ASGIApp, host: str, port: int, certfile: str | None, keyfile: str | None,
            timeouts: Timeouts, log_level: str, **extra) -> uvicorn.Config:
    return uvicorn.Config(
        BodyTimeout(app, timeouts), host=host, port=port, log_level=log_level,
        http=HeadTimeoutProtocol.with_timeout(timeouts.header_s), ws="none",
        h11_max_incomplete_event_size=MAX_HEAD_BYTES, timeout_keep_alive=timeouts.idle_s,
        server_header=False, proxy_headers=False, ssl_certfile=certfile, ssl_keyfile=keyfile, **extra)


def run(app: ASGIApp, host: str, port: int, *, certfile: str | None = None, keyfile: str | None = None,
        timeouts: Timeouts = Timeouts(), log_level: str = "warning") -> None:
    """Serve ``app`` until interrupted; HTTPS when ``certfile`` (and ``keyfile``, unless the
    certificate file holds the key) are given."""
    if keyfile and not certfile:
        raise ValueError("a TLS key needs its certificate (certfile)")
    uvicorn.Server(_config(app, host, port, certfile, keyfile, timeouts, log_level)).run()


@contextmanager
def serve_in_thread(app: ASGIApp, host: str = "127.0.0.1", port: int = 0, *, certfile: str | None = None,
                    keyfile: str | None = None, timeouts: Timeouts = Timeouts(),
                    log_level: str = "warning") -> Iterator[str]:
    """:func:`run` in a background thread, for tests and benchmarks: yields the base URL
    (``port=0`` picks a free port) and stops the server on exit. Logging is left to the caller."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family)
    server = uvicorn.Server(_config(app, host, port, certfile, keyfile, timeouts, log_level, log_config=None))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        bound = sock.getsockname()[1]
        name = f"[{host}]" if family == socket.AF_INET6 else host
        yield f"{'https' if certfile else 'http'}://{name}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
