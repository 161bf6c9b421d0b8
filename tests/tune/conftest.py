"""`postgres_url`: a real PostgreSQL server for the tuning tests, started from Debian's server binaries.

`hybrimoe tune --storage URL` promises that processes on several machines share one study in a
PostgreSQL database, and only a real server shows it: SQLite neither locks nor parses URLs the same
way. The server runs from a fresh data directory in /tmp, listens on a free port of 127.0.0.1 (its
unix socket stays inside that directory) with trust authentication, holds one database `hybrimoe`,
and is stopped and removed when the session ends. PostgreSQL refuses to run as root, so under root
it runs as the `postgres` system user. Tests that use it are skipped only when no server binaries
(`initdb`, `pg_ctl`) or no psycopg are installed; a server that is installed but fails to start
fails them, with its log.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

START_TIMEOUT_S = 60
DATABASE = "hybrimoe"


def _server_bin() -> Path | None:
    """The directory of `initdb` and `pg_ctl`: from PATH, else Debian's /usr/lib/postgresql/*/bin."""
    on_path = shutil.which("initdb")
    found = [on_path] if on_path else sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).resolve().parent if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """The test server: its URL (the README's `postgresql://` form), and `stop()` / `start()` for the
    tests of a storage that goes away."""

    def __init__(self, bin_dir: Path, root: Path, as_server_user: list[str]):
        self.bin_dir, self.root, self.as_server_user = bin_dir, root, as_server_user
        self.data, self.log, self.port = root / "data", root / "server.log", _free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/{DATABASE}"

    def pg(self, *args: str, timeout: float = START_TIMEOUT_S) -> subprocess.CompletedProcess:
        command = [*self.as_server_user, str(self.bin_dir / args[0]), *args[1:]]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)

    def failure(self, what: str, detail: str) -> str:
        tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else "(no server log)"
        return f"PostgreSQL {what} failed: {detail.strip()}\n--- server log tail ---\n{tail}"

    def start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root} -c fsync=off"
        try:
            done = self.pg("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w", "-t",
                           str(START_TIMEOUT_S), "-o", options, timeout=START_TIMEOUT_S + 10)
        except subprocess.TimeoutExpired:
            pytest.fail(self.failure("server start", f"pg_ctl start took over {START_TIMEOUT_S} s"))
        if done.returncode != 0:
            pytest.fail(self.failure("server start", done.stdout + done.stderr))

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.pg("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w")


@pytest.fixture(scope="session")
def postgres_server():
    psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'hybrimoe[postgres]')")
    bin_dir = _server_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries: initdb is neither on PATH nor in /usr/lib/postgresql/*/bin")
    as_root = os.geteuid() == 0
    root = Path(tempfile.mkdtemp(prefix="hybrimoe-pg-", dir="/tmp"))  # /tmp: the postgres user can reach it
    if as_root:
        shutil.chown(root, "postgres", "postgres")
    server = PostgresServer(bin_dir, root, ["runuser", "-u", "postgres", "--"] if as_root else [])
    try:
        done = server.pg("initdb", "-D", str(server.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                         "--locale=C", "--no-sync")
        if done.returncode != 0:
            pytest.fail(server.failure("initdb", done.stdout + done.stderr))
        server.start()
        with psycopg.connect(host="127.0.0.1", port=server.port, user="postgres", dbname="postgres",
                             connect_timeout=10, autocommit=True) as connection:  # not in a transaction
            connection.execute(f"CREATE DATABASE {DATABASE}")
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url(postgres_server):
    return postgres_server.url
