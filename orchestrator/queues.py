"""The Celery app of umiq: its queues, task routes and the reliability settings long model steps need (task_routes).

Tasks are sent by name (``app.send_task``), so the orchestrator never imports worker code and a worker never
imports the orchestrator's state machine. Results travel back as messages on the ``orchestrator`` queue; the
result backend is off.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

from orchestrator import embedded_broker
from orchestrator.settings import Settings, get_settings

__all__ = [
    "QUEUES",
    "GENERATE",
    "EXECUTE_TOOL",
    "STEP_RESULT",
    "SWEEP",
    "TRAIN_CYCLE",
    "generate_task_name",
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


def _routes() -> dict[str, dict[str, str]]:
    routes = {generate_task_name(role): {"queue": role} for role in ("planner", "caller", "summarizer")}
    routes[EXECUTE_TOOL] = {"queue": "tools"}
    routes[STEP_RESULT] = {"queue": "orchestrator"}
    routes[SWEEP] = {"queue": "orchestrator"}
    routes[TRAIN_CYCLE] = {"queue": "training"}
    return routes


def _broker(settings: Settings) -> tuple[str, dict[str, Any]]:
    if not settings.embedded:
        # Redis must not hand a message to a second worker while the first is still generating.
        return settings.broker_url, {"visibility_timeout": int(settings.step_timeout_s * 2 + 60)}
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
