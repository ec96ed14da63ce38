"""A throwaway PostgreSQL cluster for the suite, started once per session in a temporary folder.

The suite tests every database feature against a real PostgreSQL server as well as SQLite, so missing
binaries fail the tests that need them (``make postgres`` installs them; ``make test`` does) rather than
skip them. The server listens on a unix socket in its own folder only (no TCP), so it clashes with no
other server, and trusts every local connection: it is private to this process and deleted at the end.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql

PORT = 5432  # only names the socket file, which lives in the cluster's own folder
USER = "postgres"  # the superuser initdb creates, whoever runs the tests


def postgres_bindir() -> Path | None:
    """The newest Debian PostgreSQL's binaries, else those on PATH; None when there are none."""
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                    key=lambda p: [int(n) for n in re.findall(r"\d+", p)])
    initdb = debian[-1] if debian else shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    """A running throwaway cluster; ``new_database`` hands out fresh databases on it."""

    def __init__(self, bindir: Path, root: Path) -> None:
        self.bindir = bindir
        self.root = root  # also the socket directory: its path must stay well under 107 characters
        self.data = root / "data"
        # PostgreSQL refuses to run as root, so root runs it as the Debian package's `postgres` user.
        self._as = ["runuser", "-u", USER, "--"] if os.geteuid() == 0 else []

    def _run(self, *args: str) -> None:
        cmd = [*self._as, str(self.bindir / args[0]), *args[1:]]
        done = subprocess.run(cmd, cwd=self.root, capture_output=True, text=True)
        if done.returncode:
            log = self.root / "log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}{tail}")

    def start(self) -> None:
        if self._as:
            try:
                owner = pwd.getpwnam(USER)
            except KeyError:
                raise RuntimeError(f"running as root needs the `{USER}` user: run `make postgres`") from None
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "--encoding=UTF8",
                  "--locale=C", "--no-sync")
        # Durability is pointless in a cluster deleted at the end; these make it start and write faster.
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"listen_addresses = ''\nunix_socket_directories = '{self.root}'\nport = {PORT}\n"
                       "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")
        self._run("pg_ctl", "start", "-w", "-D", str(self.data), "-l", str(self.root / "log"))

    def stop(self) -> None:
        self._run("pg_ctl", "stop", "-m", "immediate", "-D", str(self.data))

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of ``database`` on this server (psycopg 3 over the unix socket)."""
        return sa.URL.create("postgresql+psycopg", username=USER, database=database,
                             query={"host": str(self.root), "port": str(PORT)}).render_as_string()

    def _admin(self, statement: sql.Composed) -> None:
        # CREATE/DROP DATABASE cannot run inside a transaction, hence autocommit.
        with psycopg.connect(host=str(self.root), port=PORT, user=USER, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(statement)

    def new_database(self, name: str) -> str:
        """Create the empty database ``name`` and return its SQLAlchemy URL."""
        self._admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name``, closing any connection a test left open."""
        self._admin(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster for the whole session, stopped and deleted at its end."""
    bindir = postgres_bindir()
    if bindir is None:
        pytest.fail("PostgreSQL is not installed (no initdb under /usr/lib/postgresql/*/bin or on PATH): "
                    "run `make postgres` (make test does)", pytrace=False)
    # /tmp, not $TMPDIR: a unix socket's path must fit in 107 characters.
    server = PostgresServer(bindir, Path(tempfile.mkdtemp(prefix="ichedge-pg-", dir="/tmp")))
    try:
        server.start()
    except RuntimeError as err:
        shutil.rmtree(server.root, ignore_errors=True)
        pytest.fail(f"could not start a throwaway PostgreSQL: {err}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The SQLAlchemy URL of a fresh, empty database of its own for this test, dropped after it."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    yield postgres_server.new_database(name)
    postgres_server.drop_database(name)
