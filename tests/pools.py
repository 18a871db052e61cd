"""Start umiq's real worker pools as processes for a test, on the test session's Postgres and Redis."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import redis

from orchestrator import queues
from orchestrator.settings import Settings

REPO = Path(__file__).resolve().parents[1]
POOLS = ("tools", "orchestrator", "planner", "caller", "summarizer")


def scripted_roles() -> dict[str, str]:
    """Environment that makes the three role pools answer from tests/scripted_roles.py."""
    env = {}
    for role in ("planner", "caller", "summarizer"):
        env[f"UMIQ_{role.upper()}__BACKEND"] = "scripted"
        env[f"UMIQ_{role.upper()}__MODEL"] = f"tests.scripted_roles:{role}"
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
