"""Who may use `ichedge serve`, from which pages, and the record of each scoring request.

On loopback the service trusts the machine's users; beyond it, it needs TLS and bearer tokens
(:func:`check_exposure`). Tokens are random and shown once; only their SHA-256 is kept.
Browsers are the other way in: a page on any site can POST to a loopback port, and DNS
rebinding lets it read the answers, so state-changing requests from another origin are refused
(:class:`SameOrigin`) and Host headers not naming this service are refused (starlette's
TrustedHostMiddleware with :func:`allowed_hosts`). :class:`SecurityHeaders` keeps the page from
running injected scripts or being framed. Who scored what is recorded in the store
(:mod:`ichedge.store`), by content hash and counts only, never names, IDs or pixels.

Files live under :func:`default_home`: ``tokens.json`` and ``deid.key`` (:func:`deid_key`), mode
0600 in a 0700 folder; the store's SQLite file and kept uploads by default too.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

TOKENS_FILE = "tokens.json"
DEID_KEY_FILE = "deid.key"
TOKEN_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
STUDY_HASH = re.compile(r"[0-9a-f]{8,64}")


def default_home() -> Path:
    """``$ICHEDGE_HOME``, else ``$XDG_CONFIG_HOME/ichedge``, else ``~/.config/ichedge``."""
    if os.environ.get("ICHEDGE_HOME"):
        return Path(os.environ["ICHEDGE_HOME"]).expanduser()
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config").expanduser() / "ichedge"


def tokens_file(home: Path | None = None) -> Path:
    return (home or default_home()) / TOKENS_FILE


def deid_key_file(home: Path | None = None) -> Path:
    return (home or default_home()) / DEID_KEY_FILE


def deid_key(path: str | Path) -> bytes:
    """The secret that keys the UIDs of de-identified kept files; made once (32 random bytes, 0600).

    Kept files from before and after a restart must still group by series, so it persists; whoever
    lacks it cannot map an original UID to its replacement.
    """
    path = Path(path)
    _private_folder(path.parent)
    try:
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) < 32:
            raise ValueError(f"{path}: a de-identification key of {len(key)} bytes; 32 expected") from None
        return key
    with os.fdopen(handle, "wb") as fh:
        fh.write(secrets.token_bytes(32))
        fh.flush()
        os.fsync(fh.fileno())
    return path.read_bytes()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _private_folder(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)


# --- tokens ----------------------------------------------------------------------------------


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """Named bearer tokens, kept as SHA-256 digests in a JSON file (mode 0600).

    A fast hash is the right one: a token is 256 random bits, so its digest cannot be searched
    back to it, and a slow password hash (scrypt, argon2), made for guessable secrets, would
    only cost every request. The file is re-read when it changes, so a token created or
    revoked from the command line counts on the next request, without a restart. Changes are
    serialised by a lock file and written to a temporary file renamed into place.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._cache: tuple[tuple[int, int, int], list[dict]] | None = None

    def create(self, name: str) -> str:
        """A new token named ``name``; the only time it is shown."""
        if not TOKEN_NAME.fullmatch(name):
            raise ValueError(f"token name {name!r}: use 1 to 64 of the characters A-Z a-z 0-9 _ . @ -")
        token = secrets.token_urlsafe(32)
        with self._update() as entries:
            if any(e["name"] == name for e in entries):
                raise ValueError(f"a token named {name!r} exists: revoke it first, or choose another name")
            entries.append({"name": name, "sha256": _digest(token), "created": _now()})
        return token

    def revoke(self, name: str) -> bool:
        """Forget the token named ``name``; False when there is none."""
        with self._update() as entries:
            kept = [e for e in entries if e["name"] != name]
            found = len(kept) < len(entries)
            entries[:] = kept
        return found

    def names(self) -> list[dict]:
        """Name and creation time of each token."""
        return [{"name": e["name"], "created": e["created"]} for e in self._entries()]

    def verify(self, token: str) -> str | None:
        """The name of ``token``, or None when it is not one of ours."""
        if not token:
            return None
        digest, name = _digest(token), None
        for e in self._entries():  # every entry compared, in constant time each
            if hmac.compare_digest(e["sha256"], digest):
                name = e["name"]
        return name

    def _entries(self) -> list[dict]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return []
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._read())
        return self._cache[1]

    def _read(self) -> list[dict]:
        try:
            entries = json.loads(self.path.read_text())["tokens"]
        except FileNotFoundError:
            return []
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{self.path}: not a token file ({exc})") from None
        return entries

    @contextmanager
    def _update(self) -> Iterator[list[dict]]:
        _private_folder(self.path.parent)
        lock = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = self._read()
            yield entries
            handle, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")  # mode 0600
            try:
                with os.fdopen(handle, "w") as fh:
                    json.dump({"tokens": entries}, fh, indent=2)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
        finally:
            os.close(lock)  # releases the lock


_bearer = HTTPBearer(auto_error=False, scheme_name="token",
                     description="A token from the service's operator (`ichedge token create NAME`).")


def bearer_auth(store: TokenStore | None) -> Callable[..., Awaitable[str | None]]:
    """A FastAPI dependency: the caller's token name, also set as ``request.state.token_name``.

    Without a store (loopback, no tokens) everyone passes, as None; with one, a missing or
    unknown token is a 401 with ``WWW-Authenticate: Bearer``.
    """
    if store is None:
        async def open_access(request: Request) -> None:
            request.state.token_name = None

        return open_access

    async def token_name(request: Request,
                         credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> str:
        name = store.verify(credentials.credentials) if credentials else None
        if name is None:
            challenge = 'Bearer error="invalid_token"' if credentials else "Bearer"
            raise HTTPException(401, "a valid bearer token is required (Authorization: Bearer TOKEN)",
                                headers={"WWW-Authenticate": challenge})
        request.state.token_name = name
        return name

    return token_name


# --- hashes ----------------------------------------------------------------------------------


def study_hash(parts: Sequence[bytes | str]) -> str:
    """A short (16 hex) SHA-256 naming a study by its files' content hashes, in any order."""
    digests = sorted(hashlib.sha256(p.encode() if isinstance(p, str) else p).digest() for p in parts)
    return hashlib.sha256(b"".join(digests)).hexdigest()[:16]


# --- browsers --------------------------------------------------------------------------------


CSP = ("default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; object-src 'none'; "
       "base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


class SecurityHeaders:
    """ASGI middleware: CSP and friends on every response, ``no-store`` on /api/, HSTS under TLS,
    and no ``server`` header. The app's own values of these headers are replaced."""

    def __init__(self, app: ASGIApp, tls: bool = False) -> None:
        self.app = app
        self.headers = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                        (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer"),
                        (b"cross-origin-resource-policy", b"same-origin")]
        if tls:
            self.headers.append((b"strict-transport-security", b"max-age=31536000"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = self.headers + ([(b"cache-control", b"no-store")] if scope["path"].startswith("/api/") else [])
        replaced = {name for name, _ in extra} | {b"server"}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in replaced]
                message = {**message, "headers": kept + extra}
            await send(message)

        await self.app(scope, receive, send_with_headers)


UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _origin(value: str) -> str:
    value = value.lower()
    for scheme, port in (("http://", ":80"), ("https://", ":443")):
        if value.startswith(scheme) and value.endswith(port):
            return value[: -len(port)]
    return value


class SameOrigin:
    """ASGI middleware: a POST, PUT, PATCH or DELETE sent by a page of another origin gets a 403.

    Refused: an ``Origin`` other than this request's own scheme://Host (``null`` included), or
    ``Sec-Fetch-Site: cross-site``. A request with neither (curl, scripts) passes: browsers
    always send Origin on these methods, and the token guards the rest.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in UNSAFE_METHODS and not self.same_origin(scope):
            await JSONResponse({"detail": "cross-origin request refused"}, 403)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    @staticmethod
    def same_origin(scope: Scope) -> bool:
        headers = Headers(scope=scope)
        if headers.get("sec-fetch-site") == "cross-site":
            return False
        origins = headers.getlist("origin")
        if not origins:
            return True
        host = headers.get("host")
        return len(origins) == 1 and host is not None and _origin(origins[0]) == _origin(f"{scope['scheme']}://{host}")


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _is_loopback(host: str) -> bool:
    ip = _ip(host)
    return host.lower() == "localhost" or (ip is not None and ip.is_loopback)


def _host_pattern(host: str) -> str:
    """As starlette compares it: lower case, IPv6 literals in brackets (as in Host headers)."""
    host = host.strip().lower()
    ip = _ip(host)
    if ip is None and ":" in host:
        raise ValueError(f"allowed host {host!r}: give the name without a port")
    return f"[{ip}]" if ip is not None and ip.version == 6 else host


def allowed_hosts(host: str, extra: Sequence[str] = ()) -> list[str]:
    """The Host names TrustedHostMiddleware should accept for a server bound to ``host``.

    Loopback: the loopback names, plus ``extra``. Otherwise the bind address (unless it is a
    wildcard such as 0.0.0.0 or ::) plus ``extra``, the names clients use, which a wildcard
    bind must give. Starlette drops the port before comparing and keeps IPv6 brackets, so IPv6
    addresses are returned bracketed; ``*.example.org`` patterns pass through.
    """
    names = [_host_pattern(h) for h in extra]
    if "*" in names:
        raise ValueError("an allowed host of '*' accepts any Host header, DNS rebinding included: name the hosts")
    ip = _ip(host)
    if _is_loopback(host):
        base = [*LOOPBACK_HOSTS, _host_pattern(host)]
    elif not host or (ip is not None and ip.is_unspecified):
        base = []
    else:
        base = [_host_pattern(host)]
    hosts = list(dict.fromkeys(base + names))
    if not hosts:
        raise ValueError(f"bound to {host or 'every address'}, the service needs the host names clients use "
                         f"(--allowed-host triage.hospital.org): other Host headers are refused")
    return hosts


def check_exposure(host: str, tls: bool, auth: bool, force: bool = False) -> None:
    """Refuse to serve beyond loopback without both TLS and tokens, unless ``force``
    (--insecure-expose), which logs a warning saying what is unprotected."""
    if _is_loopback(host) or (tls and auth):
        return
    gaps = []
    if not tls:
        gaps.append("no TLS: tokens, images and results cross the network readable and alterable")
    if not auth:
        gaps.append("no tokens: anyone who can reach the port can score images")
    message = f"serving on {host or 'every address'}, beyond this machine, with " + "; ".join(gaps)
    if not force:
        raise ValueError(f"{message}. Give a certificate and create a token (ichedge token create NAME), "
                         f"or accept this with --insecure-expose")
    log.warning(message)
