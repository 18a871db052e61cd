"""What the pool benchmarks run on: a fresh Postgres database, real Redis, settings pointing at both, and psutil probes.

Shared by ``bench.overhead`` and ``bench.throughput`` so both measure the same deployment: a Redis server of the
run's own, one process per pool,
started as ``tests.pools`` starts them (same environment, same readiness check), with a chosen thread count for the
orchestrator pool (``umiq worker orchestrator --concurrency N``).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import psycopg
import sqlalchemy as sa
from psycopg import sql
from sqlmodel import Session, func, select

from orchestrator import queues, store
from orchestrator.logs import setup_logging
from orchestrator.settings import Settings, get_settings
from orchestrator.store import Trajectory, TrajectoryStatus
from tests.pools import POOLS, REPO, _wait_ready, pool_env
from tests.servers import RedisServer

__all__ = [
    "PG_URL",
    "fresh_database",
    "private_redis",
    "private_redis_server",
    "postgres_cpu_seconds",
    "bench_settings",
    "pools",
    "wait_finished",
    "write_result",
    "machine",
    "cpu_seconds",
    "rss_mb",
]

PG_URL = os.environ.get("UMIQ_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
RESULTS = Path(__file__).parent / "results"


def _libpq(url: str) -> str:
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextmanager
def fresh_database(prefix: str) -> Iterator[str]:
    """A new, empty, migrated database for one run, dropped afterwards: runs never see each other's rows."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(_libpq(PG_URL), autocommit=True, connect_timeout=5) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = sa.make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    try:
        store.migrate(url)
        yield url
    finally:
        store.get_engine(url).dispose()
        with psycopg.connect(_libpq(PG_URL), autocommit=True, connect_timeout=5) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextmanager
def private_redis_server() -> Iterator[RedisServer]:
    """A redis-server of this run's own (``tests.servers.RedisServer``), stopped afterwards.

    Test sessions take databases of the shared Redis by process id, so a benchmark there could take their messages
    and they its: a broker of its own is the only queue nobody else consumes (and its CPU time is the run's alone).
    """
    with tempfile.TemporaryDirectory(prefix="umiq-bench-redis-") as folder:
        server = RedisServer(Path(folder))
        server.start()
        try:
            yield server
        finally:
            server.stop()


@contextmanager
def private_redis() -> Iterator[str]:
    """:func:`private_redis_server`'s URL."""
    with private_redis_server() as server:
        yield server.url


def postgres_cpu_seconds() -> float:
    """User plus system CPU time of every Postgres server process (backends, WAL writer, checkpointer) alive now.

    The server is shared: other clients' work on the machine (other test sessions) counts too, and a backend that
    exits between two readings takes its time with it. A rough figure, beside the pools' exact ones.
    """
    return _cpu_of(p for p in psutil.process_iter(["name"]) if (p.info["name"] or "").startswith("postgres"))


def bench_settings(database_url: str, broker_url: str, home: Path, env: Mapping[str, str] | None = None) -> Settings:
    """Point this process (its settings and Celery app) at the run's database and broker, as a deployment would.

    ``env`` holds the ``UMIQ_*`` settings the pools get too: a task's first step is rendered here, at submit. The
    benchmark's own process logs warnings only (a line per submitted task would flood the table); the pools log as
    deployed.
    """
    os.environ.update(
        {"UMIQ_DATABASE_URL": database_url, "UMIQ_BROKER_URL": broker_url, "UMIQ_HOME": str(home), **(env or {})}
    )
    os.environ["UMIQ_LOG_LEVEL"] = "WARNING"
    get_settings.cache_clear()
    queues.configure()
    settings = get_settings()
    setup_logging(settings)
    return settings


@contextmanager
def pools(
    settings: Settings, log_dir: Path, extra: Mapping[str, str], *, orchestrator_threads: int, orchestrator_processes: int = 1
) -> Iterator[dict[str, subprocess.Popen]]:
    """One process per pool, ready to consume; each is stopped (warm shutdown, then killed) on exit.

    ``orchestrator_processes`` above 1 starts that many orchestrator pools on the one queue (``orchestrator``,
    ``orchestrator-2``, ...), as ``docker compose up --scale orchestrator=N`` does: the orchestrator's Python runs
    under one GIL per process, and the trajectory row lock keeps the processes from applying one trajectory's results
    at once.
    """
    env = pool_env(settings, extra)
    names = [*POOLS, *(f"orchestrator-{i}" for i in range(2, orchestrator_processes + 1))]
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name in names:
            pool = pool_of(name)
            threads = orchestrator_threads if pool == "orchestrator" else 2
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.cli", "worker", pool, "--concurrency", str(threads)],
                cwd=REPO,
                env=env,
                stdout=(log_dir / f"{name}.log").open("w"),
                stderr=subprocess.STDOUT,
            )
        _wait_ready(procs, log_dir, timeout=300)
        yield procs
    finally:
        for proc in procs.values():
            proc.terminate()
        _, alive = psutil.wait_procs([psutil.Process(proc.pid) for proc in procs.values()], timeout=30)
        for straggler in alive:
            straggler.kill()


def pool_of(name: str) -> str:
    """The pool a process of :func:`pools` serves: ``orchestrator-2`` is one more ``orchestrator``."""
    return name.split("-")[0]


def wait_finished(db: sa.Engine, task_ids: list[str], *, timeout: float, poll_s: float) -> None:
    """Poll the store (the truth) until none of these tasks' trajectories runs any more."""
    deadline = time.monotonic() + timeout
    while True:
        with Session(db) as session:
            running = session.exec(
                select(func.count())
                .select_from(Trajectory)
                .where(Trajectory.task_id.in_(task_ids), Trajectory.status == TrajectoryStatus.RUNNING)
            ).one()
        if running == 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{running} trajectories still running after {timeout} s")
        time.sleep(poll_s)


def write_result(name: str, report: dict[str, Any]) -> Path:
    """``bench/results/<name>.json``, the file the README's figures come from."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return path


def machine() -> dict[str, Any]:
    """Where the figures come from; the load average says how much other work shared the cores."""
    return {
        "cpu_count": psutil.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, all its threads and its live children (a prefork pool's processes)."""
    root = psutil.Process(pid)
    return _cpu_of([root, *root.children(recursive=True)])


def _cpu_of(processes: Iterable[psutil.Process]) -> float:
    """User plus system CPU seconds of these processes; one that exited meanwhile counts nothing."""
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20
