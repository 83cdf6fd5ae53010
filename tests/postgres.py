"""A real PostgreSQL server on loopback, for the tests of studies shared through PostgreSQL.

Import the fixtures into a test module (`from postgres import postgres_server,
postgres_url  # noqa: F401`). The server comes from Debian's packages
(`.ci/system-deps` installs them: /usr/lib/postgresql/<version>/bin), is
initialised in a fresh folder under /tmp, listens on 127.0.0.1 only at a free
port, and is stopped and deleted at the end of the session.

PostgreSQL refuses to run as root, and CI runs as root: the server then runs
as the `postgres` system user (or `nobody`). When the binaries are missing the
tests skip with the reason, except under CI (env CI set), where they fail:
a shared-storage check that silently skips proves nothing.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from glob import glob
from pathlib import Path

import pytest

USER = "optuna"  # the server's superuser in the test cluster
PASSWORD = "pw-for-tests"
START_TIMEOUT = 60  # seconds; initdb + start take ~2 s on an idle 2-core machine


def find_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb and postgres, else the ones on PATH."""
    def version(path: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", Path(path).parent.name))
    for folder in sorted(glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "postgres").is_file():
            return Path(folder)
    initdb, postgres = shutil.which("initdb"), shutil.which("postgres")
    if initdb and postgres and Path(initdb).parent == Path(postgres).parent:
        return Path(initdb).parent
    return None


def unavailable(reason: str):
    """Skip with the reason; under CI, fail: there the server is part of the test environment."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is an error: run .ci/system-deps, which installs postgresql)",
                    pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_account() -> pwd.struct_passwd | None:
    """None when we are not root (the server runs as us); else an unprivileged account to run it as."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    unavailable("running as root and no unprivileged 'postgres' or 'nobody' account to run PostgreSQL as")


class PostgresServer:
    """One throw-away cluster: start(), stop(), restart() (same port and data), create_database(name) -> URL."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.account = server_account()
        self.root = Path(tempfile.mkdtemp(prefix="pytest-postgres-"))  # /tmp: reachable by the server's account
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        if self.account is not None:
            os.chown(self.root, self.account.pw_uid, self.account.pw_gid)

    def _as_server_user(self) -> dict:
        if self.account is None:
            return {}
        return {"user": self.account.pw_uid, "group": self.account.pw_gid, "extra_groups": []}

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg2://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def initdb(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if self.account is not None:
            os.chown(pwfile, self.account.pw_uid, self.account.pw_gid)
        done = subprocess.run(
            [str(self.bindir / "initdb"), "-D", str(self.data), "-U", USER, f"--pwfile={pwfile}",
             "--auth=scram-sha-256", "--encoding=UTF8", "--no-sync"],
            capture_output=True, text=True, cwd=self.root, **self._as_server_user())
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")

    def start(self) -> None:
        settings = {"listen_addresses": "127.0.0.1", "port": self.port, "unix_socket_directories": self.root,
                    "fsync": "off", "max_connections": 100}  # fsync off: a test cluster, speed over durability
        command = [str(self.bindir / "postgres"), "-D", str(self.data)]
        for key, value in settings.items():
            command += ["-c", f"{key}={value}"]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                                            start_new_session=True, **self._as_server_user())
        self._wait_ready()

    def _wait_ready(self) -> None:
        import psycopg2  # noqa: PLC0415 - checked by the fixture before we get here

        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                psycopg2.connect(host="127.0.0.1", port=self.port, user=USER, password=PASSWORD,
                                 dbname="postgres", connect_timeout=2).close()
                return
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"postgres not ready after {START_TIMEOUT} s:\n{self.log_tail()}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)  # "fast shutdown": disconnect clients, write, exit
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def create_database(self, name: str) -> str:
        """A new, empty database; returns its SQLAlchemy URL."""
        import psycopg2  # noqa: PLC0415

        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"database name {name!r}: use lowercase letters, digits and _")
        connection = psycopg2.connect(host="127.0.0.1", port=self.port, user=USER, password=PASSWORD, dbname="postgres")
        try:
            connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with connection.cursor() as cursor:
                cursor.execute(f"CREATE DATABASE {name}")
        finally:
            connection.close()
        return self.url(name)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    """A running PostgreSQL server on 127.0.0.1 for the whole session (about 2 s to set up)."""
    bindir = find_bindir()
    if bindir is None:
        unavailable("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb, postgres); "
                    "install them with .ci/system-deps (Debian package postgresql)")
    try:
        import psycopg2  # noqa: F401, PLC0415
    except ImportError:
        unavailable("psycopg2 is not installed; install the dev extras: pip install -e '.[dev]'")
    server = PostgresServer(bindir)
    try:
        server.initdb()
        server.start()
    except Exception as error:
        server.remove()
        pytest.fail(f"could not start a PostgreSQL server from {bindir}: {error}", pytrace=False)
    yield server
    server.remove()


@pytest.fixture(scope="session")
def postgres_url(postgres_server) -> str:
    """`postgresql+psycopg2://...@127.0.0.1:PORT/optuna_tests`, an empty database made for this session."""
    return postgres_server.create_database("optuna_tests")
