"""Start umiq's real worker pools as processes for a test, on the test session's Postgres and Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import redis

from orchestrator import queues
from orchestrator.settings import Settings

REPO = Path(__file__).resolve().parents[1]
POOLS = ("tools", "orchestrator", "planner", "caller", "summarizer")


def scripted_roles(module: str = "tests.scripted_roles") -> dict[str, str]:
    """Environment that makes the three role pools answer from ``module``'s planner, caller and summarizer."""
    env = {}
    for role in ("planner", "caller", "summarizer"):
        env[f"UMIQ_{role.upper()}__BACKEND"] = "scripted"
        env[f"UMIQ_{role.upper()}__MODEL"] = f"{module}:{role}"
    return env


def pool_env(settings: Settings, extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UMIQ_")}
    env.update(
        {
            "UMIQ_DATABASE_URL": settings.resolved_database_url,
            "UMIQ_BROKER_URL": settings.broker_url,
            "UMIQ_HOME": str(settings.home),
            "UMIQ_LOG_FORMAT": "json",
            "PYTHONPATH": str(REPO),
            **extra,
        }
    )
    if "UMIQ_MODEL_CACHE" in os.environ:
        env.setdefault("UMIQ_MODEL_CACHE", os.environ["UMIQ_MODEL_CACHE"])
    return env


@contextmanager
def running_pools(settings: Settings, log_dir: Path, extra: Mapping[str, str]) -> Iterator[dict[str, subprocess.Popen]]:
    """One process per pool, queues emptied first; on exit they are stopped and a failing test can read their logs."""
    client = redis.Redis.from_url(settings.broker_url) if settings.broker_url else None
    if client is not None:
        client.delete(*queues.QUEUES)
    env = pool_env(settings, extra)
    procs: dict[str, subprocess.Popen] = {}
    for name in POOLS:
        log = (log_dir / f"{name}.log").open("w")
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "worker", name, "--concurrency", "2"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_ready(procs, log_dir, timeout=120)
        yield procs
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if client is not None:
            client.delete(*queues.QUEUES)
            client.close()


def _wait_ready(procs: dict[str, subprocess.Popen], log_dir: Path, timeout: float) -> None:
    """Celery prints '<pool>@host ready.' once it consumes; a pool that exits early fails with its log."""
    deadline = time.monotonic() + timeout
    waiting = set(procs)
    while waiting and time.monotonic() < deadline:
        for name in list(waiting):
            log = (log_dir / f"{name}.log").read_text(errors="replace")
            if procs[name].poll() is not None:
                raise RuntimeError(f"pool {name} exited with {procs[name].returncode}:\n{log[-3000:]}")
            if " ready." in log:
                waiting.discard(name)
        time.sleep(0.2)
    if waiting:
        raise TimeoutError(f"pools not ready after {timeout} s: {sorted(waiting)}")


class Supervisor:
    """Pools (and the sweeper) as separate process groups, restarted when they die, as compose's restart policy does.

    A fault test kills any of them with SIGKILL (the whole group, like a container dying, or one prefork child) and the
    supervisor starts a fresh one a moment later; each process appends to ``<log_dir>/<name>.log``.
    """

    def __init__(self, env: Mapping[str, str], log_dir: Path, names: Sequence[str] = (*POOLS, "sweeper"),
                 concurrency: int = 2, restart_delay_s: float = 0.5) -> None:
        self.env = dict(env)
        self.log_dir = log_dir
        self.names = tuple(names)
        self.concurrency = concurrency
        self.restart_delay_s = restart_delay_s
        self.procs: dict[str, subprocess.Popen] = {}
        self.restarts: dict[str, int] = dict.fromkeys(self.names, 0)
        self._offsets: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)

    def _argv(self, name: str) -> list[str]:
        if name == "sweeper":
            return [sys.executable, "-m", "orchestrator.cli", "sweeper"]
        return [sys.executable, "-m", "orchestrator.cli", "worker", name, "--concurrency", str(self.concurrency)]

    def _spawn(self, name: str) -> None:
        path = self.log_dir / f"{name}.log"
        self._offsets[name] = path.stat().st_size if path.exists() else 0
        with path.open("a") as log:
            self.procs[name] = subprocess.Popen(self._argv(name), cwd=REPO, env=self.env, stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True)

    def start(self, timeout: float = 120.0) -> None:
        with self._lock:
            for name in self.names:
                self._spawn(name)
        self.wait_ready(self.names, timeout)
        self._thread.start()

    def log_text(self, name: str, *, since_start: bool = False) -> str:
        text = (self.log_dir / f"{name}.log").read_bytes()
        return text[self._offsets.get(name, 0) if since_start else 0 :].decode(errors="replace")

    def wait_ready(self, names: Sequence[str], timeout: float = 120.0) -> None:
        """Celery prints ' ready.' once a worker consumes; the sweeper logs its first sweep."""
        deadline = time.monotonic() + timeout
        waiting = set(names)
        while waiting and time.monotonic() < deadline:
            for name in list(waiting):
                text = self.log_text(name, since_start=True)
                if (" ready." if name != "sweeper" else "sweep.") in text:
                    waiting.discard(name)
            time.sleep(0.2)
        if waiting:
            raise TimeoutError(f"not ready after {timeout} s: {sorted(waiting)}:\n"
                               + "\n".join(self.log_text(name)[-2000:] for name in waiting))

    def kill(self, name: str) -> None:
        """SIGKILL the pool's whole process group (a prefork pool's children die with it); the watcher restarts it."""
        with self._lock:
            proc = self.procs[name]
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()

    def kill_child(self, name: str) -> bool:
        """SIGKILL one child process of a prefork pool (a task process dying under its parent); False if it has none."""
        children = _children(self.procs[name].pid)
        if not children:
            return False
        try:
            os.kill(children[0], signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True

    def _watch(self) -> None:
        while not self._stopping.wait(0.1):
            with self._lock:
                dead = [name for name, proc in self.procs.items() if proc.poll() is not None]
            for name in dead:
                time.sleep(self.restart_delay_s)
                with self._lock:
                    if self._stopping.is_set():
                        return
                    self.restarts[name] += 1
                    self._spawn(name)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        with self._lock:
            for proc in self.procs.values():
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            for proc in self.procs.values():
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def _children(pid: int) -> list[int]:
    """Direct children of ``pid``, read from /proc (Linux)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return sorted(found)
