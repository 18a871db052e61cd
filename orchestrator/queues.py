"""The Celery app of umiq: its queues, task routes and the reliability settings long model steps need (task_routes).

Tasks are sent by name (``app.send_task``), so the orchestrator never imports worker code and a worker never
imports the orchestrator's state machine. Results travel back as messages on the ``orchestrator`` queue; the
result backend is off.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, signals
from celery.app.trace import LOG_SUCCESS
from kombu import Queue

from orchestrator import embedded_broker, redis_broker
from orchestrator.settings import Settings, get_settings

__all__ = [
    "QUEUES",
    "GENERATE",
    "EXECUTE_TOOL",
    "STEP_RESULT",
    "step_expiry_s",
    "SWEEP",
    "TRAIN_CYCLE",
    "generate_task_name",
    "send",
    "celery_config",
    "app",
    "configure",
]

QUEUES = ("planner", "caller", "summarizer", "tools", "orchestrator", "training")
GENERATE = "umiq.generate.{role}"
EXECUTE_TOOL = "umiq.tools.execute"
STEP_RESULT = "umiq.orchestrator.step_result"
SWEEP = "umiq.orchestrator.sweep"
TRAIN_CYCLE = "umiq.training.cycle"


def generate_task_name(role: str) -> str:
    return GENERATE.format(role=role)


_REPR_KEYS = ("step_id", "trajectory_id", "seq", "attempt")


def send(name: str, kwargs: dict[str, Any], *, expires: float | None = None) -> None:
    """Publish one of umiq's messages by task name: ``app.send_task`` without two costs it pays per message.

    - ``declare=[]``: Celery otherwise re-declares the target queue with every publish, and kombu binds (copies) the
      queue and its exchange to the channel each time before its cache says it was declared already. umiq publishes to
      the default exchange, which on Redis (and the embedded broker) is a push onto the list named by the routing key,
      so there is nothing to declare; the workers declare their own queues when they start consuming.
    - ``kwargsrepr``: Celery otherwise renders ``saferepr(kwargs)`` into the message headers (shown by Flower and in
      worker logs), walking the whole prompt or result text; the step's ids say which step a message is.

    Together about 40 % of a publish's CPU (0.59 -> 0.34 ms per message on the 2-core benchmark machine).
    """
    app.send_task(
        name,
        kwargs=kwargs,
        expires=expires,
        declare=[],
        argsrepr="()",
        kwargsrepr=repr({key: kwargs[key] for key in _REPR_KEYS if key in kwargs}),
    )


def _routes() -> dict[str, dict[str, str]]:
    routes = {generate_task_name(role): {"queue": role} for role in ("planner", "caller", "summarizer")}
    routes[EXECUTE_TOOL] = {"queue": "tools"}
    routes[STEP_RESULT] = {"queue": "orchestrator"}
    routes[SWEEP] = {"queue": "orchestrator"}
    routes[TRAIN_CYCLE] = {"queue": "training"}
    return routes


def step_expiry_s(settings: Settings) -> float | None:
    """How long a step message stays worth running. The sweeper re-sends a step that has no result
    ``UMIQ_SWEEP_AFTER_S`` after its message went out (by default the step timeout, under half of this), so a copy that waited
    longer in its queue has a newer copy beside it: a worker drops it instead of running the step twice. Dropping one
    early is safe too, since the step stays queued in the store until the sweeper re-sends it. The embedded broker's
    messages never expire."""
    return None if settings.embedded else settings.step_timeout_s * 2 + 60


def _broker(settings: Settings) -> tuple[str, dict[str, Any]]:
    if not settings.embedded:
        # kombu's emulated acks cost two Redis transactions per message consumed (record a copy of the message in an
        # "unacked" hash on receipt, delete it on ack; see bench/results/overhead-ack-emulation.json), so that a dead
        # worker's messages can be handed out again after a visibility timeout. umiq needs none of it: Postgres is the
        # truth and the sweeper re-sends every step whose result has not come (orchestrator.engine.sweep), sooner
        # than any visibility timeout a long generation allows, and the copy Redis would restore had expired by then
        # (step_expiry_s). Off, a worker's unacknowledged messages are held in its memory: the prefetch limit still
        # holds, and a warm shutdown still puts the messages it had not started back on their queue.
        return settings.broker_url, {"ack_emulation": False}
    folder = settings.home / "broker"
    (folder / "processed").mkdir(parents=True, exist_ok=True)
    return f"{embedded_broker.SCHEME}://", {
        "data_folder_in": str(folder),
        "data_folder_out": str(folder),
        "processed_folder": str(folder / "processed"),
        "control_folder": str(folder / "control"),
        "store_processed": False,
        # kombu's default of 1 s gives about one hop a second; 10 ms gives about 80.
        "polling_interval": 0.01,
    }


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings derived from umiq's settings; one function so tests and workers configure alike."""
    url, transport = _broker(settings)
    return {
        "broker_url": url,
        # redis:// gets kombu's Redis transport with one client per channel (orchestrator.redis_broker: kombu builds a
        # new client per publish and per ack otherwise); other schemes (the embedded umiqfs://, rediss://, sentinel://)
        # keep the transport their scheme names.
        "broker_transport": redis_broker.TRANSPORT if url.startswith("redis://") else None,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "task_queues": [Queue(name) for name in QUEUES],
        "task_routes": _routes(),
        "task_default_queue": "orchestrator",
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        "worker_proc_alive_timeout": 300.0,
        "task_serializer": "json",
        "accept_content": ["json"],
        "enable_utc": True,
        "broker_channel_error_retry": True,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # Exactly one scheduler: RedBeat keeps the schedule in Redis under a lock, so a second beat just waits.
        "beat_scheduler": "redbeat.RedBeatScheduler",
        "redbeat_redis_url": settings.broker_url or None,
        "redbeat_lock_timeout": 300,
        "beat_schedule": {
            "umiq-retrain": {"task": TRAIN_CYCLE, "schedule": settings.train_every_s, "options": {"queue": "training"}}
        },
    }


app = Celery("umiq")


class _DropSuccessLines(logging.Filter):
    """Drops Celery's "Task ... succeeded in ... s: None" line (one per task); its retry and failure lines stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg is not LOG_SUCCESS


@signals.worker_init.connect
def _quiet_per_task_lines(**_: Any) -> None:
    """A worker logs umiq's own event per step (``step.applied``, ``step.generated``, ``tool.executed``, with the
    step's ids bound); Celery's "Received task" and "Task succeeded" lines added two more per message, each rendered
    as JSON, for about a tenth of a pool's CPU per step at a few hundred steps a second. Both are off: the first by
    level (Celery decides once, as the worker starts, whether to build it), the second by a filter, because its
    logger also reports retries ("retry: Retry in ...", a database outage being ridden out) and failures.
    """
    logging.getLogger("celery.worker.strategy").setLevel(logging.WARNING)
    trace_logger = logging.getLogger("celery.app.trace")
    if not any(isinstance(f, _DropSuccessLines) for f in trace_logger.filters):
        trace_logger.addFilter(_DropSuccessLines())


def configure(settings: Settings | None = None) -> Celery:
    """(Re)apply settings to the process-wide app; called at import and by tests that change the environment.

    Celery keeps the connection pool of its first publish, so a changed broker needs that pool dropped too.
    """
    app.conf.update(celery_config(settings or get_settings()))
    app._pool = None
    if "amqp" in app.__dict__:
        app.amqp._producer_pool = None
    return app


configure()
