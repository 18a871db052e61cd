"""Orchestration overhead: what the queue and the database cost per hop when the models answer instantly.

The three role pools run the scripted backend on ``tests.scripted_roles`` (instant, recorded-style outputs: plan,
call ``add``, conclude), the tools pool runs the real ``calculator`` tool set, and everything else is production:
one process per pool (``bench.stack.pools``), a Redis server of its own as the broker, a fresh Postgres database as
the store.
Each trajectory has ``--turns`` user turns of five hops each (planner, caller, tool, planner, summarizer).

A **hop** is one step: the orchestrator dispatches a message to a pool and applies the result that comes back.
**Hop latency** is ``step.finished_at - step.dispatched_at``, both stamped by the orchestrator: its commit and
publish, the broker, the pool's receive + work + send, the broker again, and the orchestrator picking up the
result and locking the trajectory. **Orchestrator CPU per hop** is the orchestrator process's user + system CPU
time over the phase (psutil) divided by its hops; all pools' CPU per hop is given beside it, and so are the
broker's (the run's own redis-server), Postgres's (every server process: a shared server, so a rough figure) and the
benchmark driver's (submitting and polling). Their sum is the whole machine's CPU per hop, and ``cpu_bound_hops_per_s``
is what the machine's cores could do at that cost with nothing else running: the ceiling the target is held against.

Two phases after a warm-up: ``sequential`` runs one trajectory at a time (latency with no queueing), ``concurrent``
runs ``--trajectories`` at once (throughput; its latencies include waiting behind the other trajectories).
Targets on a 2-core machine: at least 200 hops/s and a p50 of at most 5 ms.

Writes ``bench/results/overhead.json`` and prints a table. Usage: ``python -m bench.overhead [--trajectories 64]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from rich.console import Console
from rich.table import Table
from sqlmodel import Session, func, select

from bench.stack import (
    bench_settings,
    cpu_seconds,
    fresh_database,
    machine,
    pool_of,
    pools,
    postgres_cpu_seconds,
    private_redis_server,
    wait_finished,
    write_result,
)
from orchestrator import engine as engine_ops
from orchestrator.schemas import TaskSpec
from orchestrator.settings import Settings
from orchestrator.store import Step, StepStatus, Trajectory, TrajectoryStatus, get_engine, utcnow
from tests.pools import scripted_roles

__all__ = ["main", "run_phase", "percentiles", "breakdown"]

TARGET_HOPS_PER_S = 200.0
TARGET_P50_MS = 5.0
ROLES = ("PLANNER", "CALLER", "SUMMARIZER")


def main() -> None:
    """Start the pools on a fresh database, warm up, run both phases, write the JSON, print the table."""
    args = _arguments()
    before = machine()
    with (
        tempfile.TemporaryDirectory(prefix="umiq-bench-overhead-") as home,
        fresh_database("umiq_bench_overhead") as url,
        private_redis_server() as redis_server,
    ):
        settings = bench_settings(url, redis_server.url, Path(home))
        windows = {f"UMIQ_{role}__BATCH_WINDOW_MS": str(args.window_ms) for role in ROLES}
        with pools(
            settings, Path(home), {**scripted_roles(), **windows},
            orchestrator_threads=args.orchestrator_threads, orchestrator_processes=args.orchestrator_processes,
        ) as procs:
            pids = {name: proc.pid for name, proc in procs.items()}
            others = {"broker": redis_server._proc.pid}
            db = get_engine(url)
            run_phase(db, settings, pids, "warm-up", trajectories=4, turns=args.turns, at_once=4)
            phases = [
                run_phase(db, settings, pids, "sequential", trajectories=args.sequential, turns=args.turns, at_once=1,
                          others=others, log_dir=Path(home)),
                run_phase(db, settings, pids, "concurrent", trajectories=args.trajectories, turns=args.turns,
                          at_once=args.trajectories, others=others, log_dir=Path(home)),
            ]
    concurrent = phases[1]
    report = {
        "benchmark": "overhead",
        "definition": {
            "hop": "one step: a message dispatched to a pool and its result applied by the orchestrator",
            "latency_ms": "step.finished_at - step.dispatched_at (both stamped by the orchestrator)",
            "wall_s": "first submit to the last step's finished_at; hops_per_s is hops / wall_s",
            "pool_ms": "the pool's own time on the step (step.latency_ms, reported by the worker); the rest is queue + db",
            "breakdown_ms": (
                "medians of a hop's three segments, from the orchestrator's stamps and the processes' log timestamps: "
                "orchestrator_after_dispatch (dispatched_at to the previous step's step.applied line, logged after "
                "the commit and the publish), to_pool_result_sent (to the pool's step.generated or tool.executed line, "
                "logged after it sent the result), to_result_stamped (to finished_at, stamped once the orchestrator "
                "has the result and the locked step); a trajectory's first step, sent by the driver, has none"
            ),
            "orchestrator_cpu_ms_per_hop": "orchestrator process user+system CPU over the phase / hops",
            "machine_cpu_ms_per_hop": "pools + broker + postgres (shared server, rough) + benchmark driver, per hop",
            "cpu_bound_hops_per_s": "cpu_count * 1000 / machine_cpu_ms_per_hop: the ceiling on an otherwise idle machine",
        },
        "setup": {
            "broker": "redis", "store": "postgres (fresh database)", "role_backend": "scripted: tests.scripted_roles",
            "tools": "calculator", "turns_per_trajectory": args.turns, "hops_per_trajectory": 5 * args.turns,
            "batch_window_ms": args.window_ms, "pools": sorted(pids), "orchestrator_threads": args.orchestrator_threads,
            "orchestrator_processes": args.orchestrator_processes,
        },
        "machine_before": before,
        "machine_after": machine(),
        "phases": phases,
        "targets": {
            "hops_per_s": TARGET_HOPS_PER_S,
            "p50_ms": TARGET_P50_MS,
            "hops_per_s_met": concurrent["hops_per_s"] >= TARGET_HOPS_PER_S,
            "p50_met_sequential": phases[0]["latency_ms"]["p50"] <= TARGET_P50_MS,
            "p50_met_concurrent": concurrent["latency_ms"]["p50"] <= TARGET_P50_MS,
        },
    }
    write_result("overhead", report)
    _print(report)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trajectories", type=int, default=64, help="Trajectories at once in the concurrent phase.")
    parser.add_argument("--sequential", type=int, default=10, help="Trajectories one at a time in the sequential phase.")
    parser.add_argument("--turns", type=int, default=2, help="User turns per trajectory (five hops each).")
    parser.add_argument(
        "--orchestrator-threads", type=int, default=4,
        help="Threads of each orchestrator process: compose's 4; more only contend for the process's one GIL.",
    )
    parser.add_argument(
        "--orchestrator-processes", type=int, default=2,
        help="Orchestrator pools on the one queue (compose's --scale): one per core, since each runs under its own GIL.",
    )
    parser.add_argument(
        "--window-ms", type=float, default=0.0,
        help="Role batch window: 0, since an instant model has no cost to share and a window only adds latency.",
    )
    return parser.parse_args()


def _spec(index: int, turns: int) -> TaskSpec:
    calls = [{"tool": "add", "arguments": {"a": index, "b": turn}} for turn in range(turns)]
    return TaskSpec(turns=[f"Add. CALL {json.dumps(call)}" for call in calls], tools=["calculator"])


def run_phase(
    db: sa.Engine,
    settings: Settings,
    pids: dict[str, int],
    name: str,
    *,
    trajectories: int,
    turns: int,
    at_once: int,
    others: dict[str, int] | None = None,
    log_dir: Path | None = None,
) -> dict[str, Any]:
    """Run ``trajectories`` in waves of ``at_once``; measure from the first submit to the last trajectory's end.

    The end is the last step's ``finished_at`` (the orchestrator's stamp), not when this driver noticed it, so a
    concurrent phase polls the store every 0.1 s rather than every 20 ms: the polling's CPU counts in the machine's
    per-hop figure, and its interval no longer adds to the wall time. One trajectory at a time keeps 20 ms, since
    the next is submitted only once the driver has seen the last one end.
    ``others`` names more processes whose CPU per hop to report (the broker); Postgres's and this driver's own are
    always read. ``log_dir`` holds the pools' JSON logs, for :func:`breakdown`.
    """
    others = others or {}
    cpu_before = {pool: cpu_seconds(pid) for pool, pid in pids.items()}
    other_before = {key: cpu_seconds(pid) for key, pid in others.items()}
    other_before["driver"] = _own_cpu_seconds()
    postgres_before = postgres_cpu_seconds()
    started = utcnow()
    ids: list[str] = []
    for wave in range(0, trajectories, at_once):
        wave_ids = [engine_ops.submit(db, _spec(i, turns), settings).id for i in range(wave, min(wave + at_once, trajectories))]
        wait_finished(db, wave_ids, timeout=600, poll_s=0.02 if at_once == 1 else 0.1)
        ids += wave_ids
    cpu = {pool: cpu_seconds(pid) - cpu_before[pool] for pool, pid in pids.items()}
    other_cpu = {key: cpu_seconds(pid) - other_before[key] for key, pid in others.items()}
    other_cpu["driver"] = _own_cpu_seconds() - other_before.pop("driver")
    other_cpu["postgres"] = postgres_cpu_seconds() - postgres_before
    with Session(db) as session:
        rows = session.exec(
            select(Step.trajectory_id, Step.seq, Step.dispatched_at, Step.finished_at, Step.status, Step.batch_size,
                   Step.latency_ms)
            .join(Trajectory, Trajectory.id == Step.trajectory_id)
            .where(Trajectory.task_id.in_(ids))
        ).all()
        failed = session.exec(
            select(func.count()).select_from(Trajectory)
            .where(Trajectory.task_id.in_(ids), Trajectory.status != TrajectoryStatus.COMPLETED)
        ).one()
    done = [row for row in rows if row.status == StepStatus.DONE]
    latencies = [(row.finished_at - row.dispatched_at).total_seconds() * 1000 for row in done]
    batches = [row.batch_size for row in done if row.batch_size is not None]
    hops = len(done)
    wall = (max(row.finished_at for row in done) - started).total_seconds()
    machine_ms = (sum(cpu.values()) + sum(other_cpu.values())) / hops * 1000
    return {
        "phase": name,
        "trajectories": trajectories,
        "at_once": at_once,
        "failed_trajectories": failed,
        "hops": hops,
        "wall_s": round(wall, 3),
        "hops_per_s": round(hops / wall, 1),
        "latency_ms": percentiles(latencies),
        "pool_ms": percentiles([row.latency_ms for row in done]),
        "orchestrator_cpu_ms_per_hop": round(_orchestrators(cpu) / hops * 1000, 3),
        "all_pools_cpu_ms_per_hop": round(sum(cpu.values()) / hops * 1000, 3),
        "cpu_s_by_pool": {pool: round(seconds, 3) for pool, seconds in cpu.items()},
        "other_cpu_ms_per_hop": {key: round(seconds / hops * 1000, 3) for key, seconds in other_cpu.items()},
        "machine_cpu_ms_per_hop": round(machine_ms, 3),
        "cpu_bound_hops_per_s": round((os.cpu_count() or 1) * 1000 / machine_ms, 1),
        "mean_batch_size": round(statistics.fmean(batches), 2) if batches else None,
        "breakdown_ms": breakdown(done, log_dir) if log_dir is not None else None,
    }


_SEGMENT_EVENTS = ("step.applied", "step.generated", "tool.executed")


def _logged_at(log_dir: Path) -> dict[tuple[str, int, str], datetime]:
    """When each step's segment events were logged, by (trajectory id, step seq, event), from the pools' JSON lines."""
    stamps: dict[tuple[str, int, str], datetime] = {}
    for path in log_dir.glob("*.log"):
        with path.open() as lines:
            for line in lines:
                if not any(event in line for event in _SEGMENT_EVENTS):
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("event") in _SEGMENT_EVENTS and "trajectory_id" in record:
                    stamps[(record["trajectory_id"], record["step"], record["event"])] = datetime.fromisoformat(record["timestamp"])
    return stamps


def breakdown(steps: list[Any], log_dir: Path) -> dict[str, float]:
    """Where a hop's time goes: the medians of its three segments (see the report's ``definition.breakdown_ms``)."""
    stamps = _logged_at(log_dir)
    segments: dict[str, list[float]] = {"orchestrator_after_dispatch": [], "to_pool_result_sent": [], "to_result_stamped": []}
    for step in steps:
        applied = stamps.get((step.trajectory_id, step.seq - 1, "step.applied"))
        sent = stamps.get((step.trajectory_id, step.seq, "step.generated")) or stamps.get((step.trajectory_id, step.seq, "tool.executed"))
        if applied is None or sent is None:
            continue
        for name, start, end in (
            ("orchestrator_after_dispatch", step.dispatched_at, applied),
            ("to_pool_result_sent", applied, sent),
            ("to_result_stamped", sent, step.finished_at),
        ):
            segments[name].append((end - start).total_seconds() * 1000)
    return {name: round(statistics.median(values), 2) for name, values in segments.items() if values}


def _orchestrators(cpu: dict[str, float]) -> float:
    """All orchestrator processes together (``orchestrator``, ``orchestrator-2``, ...)."""
    return sum(seconds for name, seconds in cpu.items() if pool_of(name) == "orchestrator")


def _own_cpu_seconds() -> float:
    """This process alone (its pools and the broker are its children, counted apart)."""
    times = os.times()
    return times.user + times.system


def percentiles(values: list[float]) -> dict[str, float]:
    """p50, p95, p99 and the mean, in the values' unit; nearest-rank percentiles on the sorted values."""
    ordered = sorted(values)

    def rank(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))], 2)

    return {"p50": rank(50), "p95": rank(95), "p99": rank(99), "mean": round(statistics.fmean(ordered), 2)}


def _print(report: dict[str, Any]) -> None:
    table = Table(title=f"orchestration overhead (hop = one step; load before {report['machine_before']['load_average']})")
    for column in ("phase", "trajectories", "hops", "wall s", "hops/s", "p50 ms", "p95 ms", "p99 ms", "pool p50 ms",
                   "orch CPU ms/hop", "all CPU ms/hop", "machine CPU ms/hop", "CPU-bound hops/s", "mean batch"):
        table.add_column(column, justify="right")
    for phase in report["phases"]:
        lat = phase["latency_ms"]
        table.add_row(phase["phase"], str(phase["trajectories"]), str(phase["hops"]), f"{phase['wall_s']:.1f}",
                      f"{phase['hops_per_s']:.0f}", f"{lat['p50']:.1f}", f"{lat['p95']:.1f}", f"{lat['p99']:.1f}", f"{phase['pool_ms']['p50']:.1f}",
                      f"{phase['orchestrator_cpu_ms_per_hop']:.2f}", f"{phase['all_pools_cpu_ms_per_hop']:.2f}",
                      f"{phase['machine_cpu_ms_per_hop']:.2f}", f"{phase['cpu_bound_hops_per_s']:.0f}",
                      str(phase["mean_batch_size"]))
    console = Console(width=200)
    console.print(table)
    for phase in report["phases"]:
        if phase["breakdown_ms"]:
            parts = ", ".join(f"{name} {ms:.1f}" for name, ms in phase["breakdown_ms"].items())
            console.print(f"{phase['phase']} hop, median ms per segment: {parts}")
    targets = report["targets"]
    console.print(
        f"target ≥ {targets['hops_per_s']:.0f} hops/s: {'met' if targets['hops_per_s_met'] else 'NOT met'}; "
        f"p50 ≤ {targets['p50_ms']:.0f} ms: sequential {'met' if targets['p50_met_sequential'] else 'NOT met'}, "
        f"concurrent {'met' if targets['p50_met_concurrent'] else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
