"""What the fault tests and the soak share: a private cluster to break, a mixed workload, and an audit of the store.

The audit is the proof the fault scenarios ask for: every trajectory finished (completed, or failed with a reason),
none stuck, no step or message stored twice, and every completed trajectory has exactly the steps and messages its
scripted turns call for.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import kombu.pools
import sqlalchemy as sa
import sqlalchemy.exc
from sqlmodel import Session, func, select

from orchestrator import queues, store
from orchestrator.client import Client
from orchestrator.schemas import TaskSpec
from orchestrator.settings import Settings, get_settings
from orchestrator.store import (
    Message,
    Step,
    StepStatus,
    ToolCall,
    Trajectory,
    TrajectoryStatus,
)
from tests.pools import Supervisor, pool_env
from tests.servers import PostgresServer, RedisServer

__all__ = [
    "FS",
    "FS_CONFIG",
    "Shape",
    "SHAPES",
    "POISON_ERROR",
    "POISON_CRASH",
    "workload",
    "Cluster",
    "cluster",
    "use_broker",
    "retry_db",
    "submit_all",
    "wait_finished",
    "Run",
    "drive",
    "Audit",
    "audit",
    "percentile",
]

FS = "GorillaFileSystem"
FS_CONFIG = {FS: {"root": {"alex": {"type": "directory", "contents": {"notes.txt": {"type": "file", "content": "hi"}}}}}}
DB_ERRORS = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)
T = TypeVar("T")


def _call(tool: str, **arguments: object) -> str:
    return "CALL " + json.dumps({"tool": tool, "arguments": arguments})


@dataclass(frozen=True)
class Shape:
    """A scripted task and exactly what a completed run of it stores: step kinds and message speakers, in order."""

    name: str
    turns: tuple[str, ...]
    kinds: tuple[str, ...]
    speakers: tuple[str, ...]

    def spec(self) -> TaskSpec:
        return TaskSpec(turns=list(self.turns), tools=[FS], initial_config=FS_CONFIG, meta={"shape": self.name})


_ONE_CALL = ("user", "assistant", "caller", "observation", "assistant", "conclusion")
SHAPES = (
    Shape("one_call", (f"Where am I? {_call('pwd')}",), ("planner", "caller", "tools", "planner", "summarizer"), _ONE_CALL),
    Shape("hallucinated", (f"Fly. {_call('teleport', to='mars')}",), ("planner", "caller", "planner", "summarizer"), _ONE_CALL),
    Shape(
        "two_turns",
        (f"Make a folder. {_call('mkdir', dir_name='reports')}", f"What is here? {_call('ls')}"),
        ("planner", "caller", "tools", "planner", "summarizer") * 2,
        _ONE_CALL * 2,
    ),
)


POISON_ERROR = Shape("poison_model_error", ("FAIL every time",), ("planner", "caller"), ("user", "assistant"))
"""A caller step whose model raises on every attempt: the pool reports the error, the orchestrator retries it."""
POISON_CRASH = Shape("poison_worker_killer", ("CRASH the caller every time",), ("planner", "caller"), ("user", "assistant"))
"""A caller step that SIGKILLs its worker on every attempt (tests/slow_roles.py): only the sweeper can tell."""


def workload(count: int, seed: int = 0) -> list[Shape]:
    """``count`` tasks cycling through the shapes, shuffled so every queue sees work throughout."""
    shapes = [SHAPES[i % len(SHAPES)] for i in range(count)]
    random.Random(seed).shuffle(shapes)
    return shapes


def use_broker(settings: Settings) -> None:
    """Point this process's Celery app at ``settings``' broker with fresh connection and producer pools.

    Celery's connection pool is kombu's process-wide pool for that URL, which kombu hands out again once closed; a
    test process that reconfigures the app (every ``Client`` does) and then meets a broker restart would otherwise
    publish through a closed pool ("Acquire on closed pool") for the rest of its life.
    """
    queues.configure(settings)
    kombu.pools.reset()
    queues.app._after_fork()


def retry_db(action: Callable[[], T], *, timeout: float = 60.0) -> T:
    """Run ``action``, retrying while the database is unreachable (a client riding out an outage)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return action()
        except DB_ERRORS:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@dataclass
class Cluster:
    """Private Redis and Postgres, the five pools and the sweeper under a supervisor, and settings to reach them."""

    redis: RedisServer
    postgres: PostgresServer
    pools: Supervisor
    settings: Settings
    env: dict[str, str]

    @property
    def engine(self) -> sa.Engine:
        return store.get_engine(self.settings.resolved_database_url)

    def client(self) -> Client:
        client = Client(self.settings)
        use_broker(self.settings)
        return client


@contextmanager
def cluster(workdir: Path, tuning: Mapping[str, str], *, concurrency: int = 2) -> Iterator[Cluster]:
    """Start everything on loopback in ``workdir``; raises :class:`tests.servers.ServerUnavailable` saying why if a server won't."""
    redis_server = RedisServer(workdir)
    postgres = PostgresServer()
    pools: Supervisor | None = None
    try:
        redis_server.start()
        postgres.init()
        postgres.start()
        store.migrate(postgres.url)
        home = Path(tempfile.mkdtemp(prefix="umiq-home-", dir=workdir))
        env = {
            "UMIQ_DATABASE_URL": postgres.url,
            "UMIQ_BROKER_URL": redis_server.url,
            "UMIQ_HOME": str(home),
            "UMIQ_LOG_FORMAT": "json",
            **{f"UMIQ_{role.upper()}__BACKEND": "scripted" for role in ("planner", "caller", "summarizer")},
            **{f"UMIQ_{role.upper()}__MODEL": f"tests.slow_roles:{role}" for role in ("planner", "caller", "summarizer")},
            **tuning,
        }
        settings = Settings(**{key[5:].lower(): value for key, value in env.items() if "__" not in key})
        log_dir = workdir / "logs"
        log_dir.mkdir(exist_ok=True)
        pools = Supervisor(pool_env(settings, env), log_dir, concurrency=concurrency)
        pools.start()
        use_broker(settings)
        yield Cluster(redis_server, postgres, pools, settings, env)
    finally:
        if pools is not None:
            pools.stop()
        redis_server.stop()
        store.get_engine(postgres.url).dispose()
        postgres.destroy()
        use_broker(get_settings())


def submit_all(client: Client, shapes: Sequence[Shape]) -> dict[str, Shape]:
    """Submit every task (retrying through a database outage, as a careful client would); task id to its shape."""
    return {retry_db(lambda shape=shape: client.submit(shape.spec())): shape for shape in shapes}


@dataclass
class Run:
    """A driven run: each task id with its shape, the faults made (seconds into the run, name), how long it took."""

    expected: dict[str, Shape]
    faults: list[tuple[float, str]]
    seconds: float
    finished: bool


def drive(
    client: Client,
    shapes: Sequence[Shape],
    *,
    submit_every_s: float,
    faults: Sequence[tuple[float, str, Callable[[], None]]] = (),
    timeout: float = 300.0,
) -> Run:
    """Submit one task every ``submit_every_s``, make each fault at its offset, and wait until every task finished.

    Submissions that meet a database outage are retried later, so no fault waits behind a blocked client.
    """
    engine = store.get_engine(client.settings.resolved_database_url)
    pending, schedule = list(shapes), sorted(faults, key=lambda fault: fault[0])
    run = Run({}, [], 0.0, False)
    started = time.monotonic()
    next_submit = started
    while time.monotonic() - started < timeout:
        now = time.monotonic()
        while schedule and now - started >= schedule[0][0]:
            _, name, make = schedule.pop(0)
            run.faults.append((round(time.monotonic() - started, 1), name))
            make()
        if pending and now >= next_submit:
            try:
                run.expected[client.submit(pending[0].spec())] = pending[0]
                pending.pop(0)
                next_submit = now + submit_every_s
            except DB_ERRORS:
                next_submit = now + 0.5
        if not pending and not schedule:
            try:
                if _running(engine, list(run.expected)) == 0:
                    run.finished = True
                    break
            except DB_ERRORS:
                pass
        time.sleep(0.05 if pending or schedule else 0.25)
    run.seconds = time.monotonic() - started
    return run


def _running(engine: sa.Engine, task_ids: Sequence[str]) -> int:
    with Session(engine) as session:
        return session.exec(
            select(func.count()).select_from(Trajectory)
            .where(Trajectory.task_id.in_(list(task_ids)), Trajectory.status == TrajectoryStatus.RUNNING)
        ).one()


def wait_finished(engine: sa.Engine, task_ids: Sequence[str], timeout: float, *, during: Callable[[], None] | None = None) -> float:
    """Poll until no trajectory of ``task_ids`` runs (``during`` is called each round, e.g. to inject faults); seconds taken."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if during is not None:
            during()
        try:
            if _running(engine, task_ids) == 0:
                return time.monotonic() - started
        except DB_ERRORS:
            pass
        time.sleep(0.5)
    return time.monotonic() - started


@dataclass
class Audit:
    """What the store holds after a run; ``problems`` lists every broken invariant, one line each."""

    submitted: int = 0
    completed: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    stuck: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    duplicated_steps: int = 0
    problems: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    resent_steps: int = 0

    @property
    def ok(self) -> bool:
        return not (self.stuck or self.lost or self.duplicated_steps or self.problems)

    def summary(self) -> dict[str, Any]:
        return {
            "submitted": self.submitted,
            "completed": self.completed,
            "failed": sum(self.failed.values()),
            "failed_by_reason": dict(self.failed),
            "stuck": len(self.stuck),
            "lost": len(self.lost),
            "duplicated_steps": self.duplicated_steps,
            "problems": self.problems[:20],
        }


_MESSAGES_PER_STEP = {"planner": (0, 1), "caller": (1, 2), "tools": (1, 1), "summarizer": (0, 1)}
"""How many messages applying one step of each kind writes (fewest, most), the next turn's user message aside."""


def _failure_reason(reason: str) -> str:
    """Group failure reasons for counting: the step number and the error's details vary, the cause does not."""
    if " dead after " in reason:
        return "dead letter: " + reason.split(": ", 1)[-1].split(";")[0][:80]
    return reason[:80]


def audit(engine: sa.Engine, expected: Mapping[str, Shape]) -> Audit:
    """Check every invariant of the fault scenarios against the store (see the module docstring)."""
    report = Audit(submitted=len(expected))
    with Session(engine) as session:
        trajectories = {t.task_id: t for t in session.exec(select(Trajectory).where(Trajectory.task_id.in_(list(expected))))}
        ids = [t.id for t in trajectories.values()]
        steps: dict[str, list[Step]] = {i: [] for i in ids}
        for step in session.exec(select(Step).where(Step.trajectory_id.in_(ids)).order_by(Step.trajectory_id, Step.seq)):
            steps[step.trajectory_id].append(step)
        messages: dict[str, list[Message]] = {i: [] for i in ids}
        for message in session.exec(select(Message).where(Message.trajectory_id.in_(ids)).order_by(Message.trajectory_id, Message.seq)):
            messages[message.trajectory_id].append(message)
        calls: dict[str, list[ToolCall]] = {i: [] for i in ids}
        for call in session.exec(select(ToolCall).where(ToolCall.trajectory_id.in_(ids))):
            calls[call.trajectory_id].append(call)
    for task_id, shape in expected.items():
        trajectory = trajectories.get(task_id)
        if trajectory is None:
            report.lost.append(task_id)
            continue
        _check(report, trajectory, shape, steps[trajectory.id], messages[trajectory.id], calls[trajectory.id])
    return report


def _check(report: Audit, trajectory: Trajectory, shape: Shape, steps: list[Step], messages: list[Message], calls: list[ToolCall]) -> None:
    tid = trajectory.id
    report.resent_steps += sum(1 for s in steps if s.attempt > 0)
    # no step stored twice: one row per (trajectory, seq), keys unique and derived from them, seqs without gaps
    keys = [s.idempotency_key for s in steps]
    seqs = [s.seq for s in steps]
    report.duplicated_steps += (len(keys) - len(set(keys))) + (len(seqs) - len(set(seqs)))
    if seqs != list(range(len(steps))) or keys != [f"{tid}/{s}" for s in seqs]:
        report.problems.append(f"{tid}: step seqs/keys {seqs} are not 0..n-1 with keys trajectory/seq")
    per_step = Counter(m.step_id for m in messages if m.step_id is not None)
    for step in steps:
        low, high = _MESSAGES_PER_STEP[step.kind]
        if per_step[step.id] > high:
            report.duplicated_steps += 1
            report.problems.append(f"{tid}: step {step.seq} ({step.kind}) wrote {per_step[step.id]} messages")
        elif step.status == StepStatus.DONE and per_step[step.id] < low:
            report.problems.append(f"{tid}: done step {step.seq} ({step.kind}) wrote no message")
    callers = Counter(c.caller_step_id for c in calls)
    if any(n > 1 for n in callers.values()):
        report.duplicated_steps += sum(n - 1 for n in callers.values() if n > 1)
        report.problems.append(f"{tid}: a caller step stored more than one tool call")
    if [m.seq for m in messages] != list(range(len(messages))):
        report.problems.append(f"{tid}: message seqs are not 0..n-1")
    kinds = tuple(s.kind for s in steps)
    speakers = tuple(m.speaker for m in messages)
    if trajectory.status == TrajectoryStatus.RUNNING:
        report.stuck.append(tid)
        return
    if trajectory.finished_at is not None:
        report.latencies_s.append((trajectory.finished_at - trajectory.created_at).total_seconds())
    if trajectory.status == TrajectoryStatus.COMPLETED:
        report.completed += 1
        if kinds != shape.kinds or speakers != shape.speakers:
            report.problems.append(f"{tid} ({shape.name}) completed with steps {kinds} and messages {speakers}")
        if any(s.status != StepStatus.DONE for s in steps):
            report.problems.append(f"{tid}: completed with steps not done")
        tool_steps = {s.id for s in steps if s.kind == "tools"}
        if {c.tool_step_id for c in calls if not c.hallucinated} != tool_steps or any(c.observation is None for c in calls):
            report.problems.append(f"{tid}: tool calls do not match its tool steps one to one, with observations")
        return
    if not trajectory.failure:
        report.problems.append(f"{tid}: failed without a reason")
    report.failed[_failure_reason(trajectory.failure or "")] += 1
    if kinds != shape.kinds[: len(kinds)] or speakers != shape.speakers[: len(speakers)]:
        report.problems.append(f"{tid} ({shape.name}) failed with steps {kinds} and messages {speakers}, not a prefix of its shape")
    if any(s.status != StepStatus.DONE for s in steps[:-1]) or (steps and steps[-1].status == StepStatus.QUEUED):
        report.problems.append(f"{tid}: failed with a step still queued or a dead step before the last")


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]

