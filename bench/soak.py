"""Soak under faults: a long mixed load while workers are SIGKILLed, Redis restarts empty and Postgres goes away.

Everything runs on a private cluster (``tests.fault_harness.cluster``): a Redis and a PostgreSQL started here on free
loopback ports (never the shared ones), the five pools and the sweeper as process groups under a supervisor that
restarts whatever dies, the role pools on the scripted backend slowed to ``--role-delay`` seconds a step
(``tests.slow_roles``), the tools pool on BFCL's real file system. ``--trajectories`` tasks (one, two and
hallucinated-call shapes) plus two poison tasks (a model that always errs, a step that kills its worker) arrive one
every ``--every`` seconds while the fault schedule below runs, interleaving every fault of the fault tests:

    kill -9 of each pool (twice for the busiest), of one tools child and of the sweeper; two Redis restarts without
    persistence (2 s down each); one 10 s Postgres outage.

Then the store is audited (``tests.fault_harness.audit``): submitted, completed, failed by reason, lost (never
stored or still running: must be 0), duplicated steps (must be 0), trajectory latency percentiles (created to
finished), and from the logs: why the sweeper re-sent steps, results dropped as duplicates, pool restarts.
Writes ``bench/results/soak.json``, prints a summary, exits 1 if anything was lost or stored twice.
Usage: ``python -m bench.soak [--trajectories 120] [--every 0.5]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.stack import RESULTS, machine
from tests.fault_harness import (
    POISON_CRASH,
    POISON_ERROR,
    Cluster,
    audit,
    cluster,
    drive,
    percentile,
    retry_db,
    workload,
)

__all__ = ["main", "fault_schedule"]

TUNING = {
    "UMIQ_STEP_TIMEOUT_S": "4",
    "UMIQ_SWEEP_AFTER_S": "8",
    "UMIQ_SWEEP_INTERVAL_S": "1",
    "UMIQ_MAX_ATTEMPTS": "3",
}


def fault_schedule(faulty: Cluster) -> list[tuple[float, str, Callable[[], None]]]:
    """Seconds into the run, what, how: every fault kind, spread over the arrival window so they overlap recoveries."""
    pools = faulty.pools

    def kill(name: str) -> Callable[[], None]:
        return lambda: pools.kill(name)

    return [
        (5.0, "kill -9 planner", kill("planner")),
        (9.0, "kill -9 one tools child", lambda: pools.kill_child("tools")),
        (12.0, "kill -9 orchestrator", kill("orchestrator")),
        (16.0, "redis restart, empty, 2 s down", lambda: faulty.redis.restart(down_s=2)),
        (22.0, "kill -9 caller", kill("caller")),
        (26.0, "kill -9 summarizer", kill("summarizer")),
        (30.0, "postgres stop", lambda: faulty.postgres.stop("fast")),
        (40.0, "postgres start (10 s outage)", faulty.postgres.start),
        (34.0, "kill -9 tools (during the outage)", kill("tools")),
        (48.0, "kill -9 sweeper", kill("sweeper")),
        (52.0, "kill -9 orchestrator", kill("orchestrator")),
        (56.0, "redis restart, empty, 2 s down", lambda: faulty.redis.restart(down_s=2)),
        (62.0, "kill -9 planner", kill("planner")),
        (66.0, "kill -9 caller", kill("caller")),
    ]


def _events(text: str, event: str, field: str | None = None) -> Counter[str]:
    """Count JSON log events named ``event``, by ``field`` when given."""
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        if f'"{event}"' not in line or not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == event:
            counts[str(record.get(field)) if field else event] += 1
    return counts


def _logs(faulty: Cluster) -> dict[str, Any]:
    text = {name: faulty.pools.log_text(name) for name in faulty.pools.names}
    every = "\n".join(text.values())
    return {
        "sweeper_resent_by_reason": dict(_events(text["sweeper"], "step.resent", "reason")),
        "results_ignored_as_duplicates": _events(text["orchestrator"], "step.duplicate_result")["step.duplicate_result"],
        "result_retries_through_db_outage": text["orchestrator"].count("retry: Retry in"),
        "publishes_refused_by_broker": _events(every, "step.publish_failed")["step.publish_failed"],
        "expired_copies_dropped_by_workers": every.count("Discarding revoked task"),
        "celery_unrecoverable_errors": every.count("Unrecoverable error"),
        "pool_restarts": dict(faulty.pools.restarts),
    }


def main() -> None:
    """Start the private cluster, drive the load through the fault schedule, audit, write the JSON, print a summary."""
    args = _arguments()
    before = machine()
    shapes = [POISON_ERROR, POISON_CRASH, *workload(args.trajectories, seed=args.seed)]
    with tempfile.TemporaryDirectory(prefix="umiq-bench-soak-") as folder:
        tuning = {**TUNING, "UMIQ_TEST_ROLE_DELAY_S": str(args.role_delay)}
        with cluster(Path(folder), tuning) as faulty:
            started = time.monotonic()
            run = drive(faulty.client(), shapes, submit_every_s=args.every, faults=fault_schedule(faulty), timeout=args.timeout)
            report = retry_db(lambda: audit(faulty.engine, run.expected))
            logs = _logs(faulty)
            wall_s = time.monotonic() - started
    latencies = report.latencies_s
    result = {
        "benchmark": "soak",
        "setup": {
            "trajectories": args.trajectories,
            "poison_tasks": [POISON_ERROR.name, POISON_CRASH.name],
            "arrival_every_s": args.every,
            "role_delay_s": args.role_delay,
            "settings": tuning,
            "broker": "private redis-server, no persistence",
            "store": "private PostgreSQL cluster",
            "pools": "planner, caller, summarizer (scripted, threads), tools (prefork 2, BFCL file system), orchestrator "
                     "(threads 2), sweeper; restarted by a supervisor when they die",
        },
        "faults": [{"at_s": at, "fault": name} for at, name in run.faults],
        "results": {
            **report.summary(),
            "lost": len(report.lost) + len(report.stuck),
            "finished_in_time": run.finished,
            "steps_re_sent_with_an_attempt_counted": report.resent_steps,
            "latency_s": {
                "p50": percentile(latencies, 50),
                "p90": percentile(latencies, 90),
                "p99": percentile(latencies, 99),
                "max": max(latencies, default=None),
            },
            "wall_s": round(wall_s, 1),
        },
        "from_logs": logs,
        "machine_before": before,
        "machine_after": machine(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    _print(result)
    if result["results"]["lost"] or result["results"]["duplicated_steps"] or result["results"]["problems"]:
        sys.exit(1)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trajectories", type=int, default=120, help="Ordinary tasks (two poison tasks come on top).")
    parser.add_argument("--every", type=float, default=0.5, help="Seconds between two submissions.")
    parser.add_argument("--role-delay", type=float, default=0.1, help="Seconds each scripted model step takes.")
    parser.add_argument("--timeout", type=float, default=600.0, help="Give up waiting for the run after this long.")
    parser.add_argument("--seed", type=int, default=11, help="Shuffles the task shapes.")
    return parser.parse_args()


def _print(result: dict[str, Any]) -> None:
    console = Console()
    results = result["results"]
    table = Table(title=f"soak under faults ({len(result['faults'])} faults, {results['wall_s']:.0f} s)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    latency = results["latency_s"]
    rows = [
        ("submitted", results["submitted"]),
        ("completed", results["completed"]),
        ("failed (with a reason)", results["failed"]),
        *((f"  {reason}", count) for reason, count in results["failed_by_reason"].items()),
        ("lost (never stored or stuck)", results["lost"]),
        ("duplicated steps", results["duplicated_steps"]),
        ("steps re-sent with an attempt counted", results["steps_re_sent_with_an_attempt_counted"]),
        ("latency p50 / p99 / max s", " / ".join("-" if v is None else f"{v:.1f}" for v in (latency["p50"], latency["p99"], latency["max"]))),
        *((f"sweeper re-sent: {reason}", count) for reason, count in result["from_logs"]["sweeper_resent_by_reason"].items()),
        ("results dropped as duplicates", result["from_logs"]["results_ignored_as_duplicates"]),
        ("pool restarts", sum(result["from_logs"]["pool_restarts"].values())),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)
    if results["problems"]:
        console.print("[red]problems:[/red]", *results["problems"], sep="\n")


if __name__ == "__main__":
    main()
