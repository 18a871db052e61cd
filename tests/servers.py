"""Private Redis and PostgreSQL servers for fault tests, so a test can kill and restart them without touching the shared ones.

Other engineers' tests use the shared Redis (6379) and Postgres (5432) at the same time; a fault test starts its own
servers on free loopback ports, in a temporary folder, and may stop, kill and restart them at will. A server that
cannot start raises :class:`ServerUnavailable` with the reason and the server's log, so the test fails saying why.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from glob import glob
from pathlib import Path

import psycopg
import redis

__all__ = ["ServerUnavailable", "free_port", "RedisServer", "PostgresServer"]


class ServerUnavailable(RuntimeError):
    """A private server could not be started; the message says why and carries the end of its log."""


def free_port() -> int:
    """A loopback port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


class RedisServer:
    """A ``redis-server`` child process with no persistence: killing it loses every queued and unacked message."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = folder / "redis.log"
        self._proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServerUnavailable("redis-server is not installed (apt-get install redis-server)")
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--dir", str(self.folder)]
        with self.log.open("a") as log:
            self._proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ServerUnavailable(f"redis-server on port {self.port} exited with {self._proc.returncode}:\n{_tail(self.log)}")
            try:
                with redis.Redis.from_url(self.url, socket_connect_timeout=1) as client:
                    client.ping()
                return
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise ServerUnavailable(f"redis-server on port {self.port} not answering after {timeout} s:\n{_tail(self.log)}")

    def kill(self) -> None:
        """SIGKILL: what a crashed broker without persistence looks like to its clients."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)

    def restart(self, down_s: float = 0.0) -> None:
        self.kill()
        time.sleep(down_s)
        self.start()

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()


class PostgresServer:
    """A throw-away PostgreSQL cluster (initdb into a temporary folder) listening on a free loopback port.

    PostgreSQL refuses to run as root, so when the tests run as root the cluster belongs to the ``postgres`` system
    user and every server command runs through ``runuser``.
    """

    def __init__(self) -> None:
        bins = sorted(glob("/usr/lib/postgresql/*/bin/initdb"))
        found = bins[-1] if bins else shutil.which("initdb")
        if found is None:
            raise ServerUnavailable("no PostgreSQL server binaries (initdb) under /usr/lib/postgresql/*/bin or on PATH")
        self.bin = Path(found).parent
        self.root = Path(tempfile.mkdtemp(prefix="umiq-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self._as: list[str] = []
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                raise ServerUnavailable("running as root and no runuser to drop to the postgres user")
            shutil.chown(self.root, user="postgres", group="postgres")
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run([*self._as, *argv], capture_output=True, text=True, timeout=timeout, check=False)

    def init(self) -> None:
        done = self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync",
                         "-E", "UTF8", "--locale", "C")
        if done.returncode != 0:
            raise ServerUnavailable(f"initdb failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")

    def start(self, timeout: float = 30.0) -> None:
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        done = self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w",
                         "-t", str(int(timeout)), "start", timeout=timeout + 10)
        if done.returncode != 0:
            raise ServerUnavailable(f"pg_ctl start failed ({done.returncode}): {done.stderr.strip()}\n{_tail(self.log)}")
        try:
            psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", connect_timeout=5).close()
        except psycopg.OperationalError as exc:
            raise ServerUnavailable(f"PostgreSQL started but refuses connections: {exc}\n{_tail(self.log)}") from exc

    def stop(self, mode: str = "fast") -> None:
        """``fast`` ends sessions and shuts down cleanly; ``immediate`` is a crash (recovery on the next start)."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        self.stop("immediate")
        pid_file = self.data / "postmaster.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        shutil.rmtree(self.root, ignore_errors=True)
