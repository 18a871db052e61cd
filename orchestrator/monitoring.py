"""Operator metrics for Prometheus (``GET /metrics``): queue depth per pool, and latency, tokens/s and batch size per role.

Everything is read from the broker and the store at scrape time, never from this process's memory, so the numbers
cover every worker whatever process ran it, and any API replica serves the same answer. Step figures cover the steps
finished in the last ``UMIQ_METRICS_WINDOW_S`` seconds: the histograms are of that window (apply
``histogram_quantile`` to their buckets directly, without ``rate``), and tokens/s is averaged over it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from datetime import timedelta

import sqlalchemy as sa
import structlog
from kombu import Connection
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlmodel import Session, select

from orchestrator.queues import QUEUES, celery_config
from orchestrator.settings import Settings
from orchestrator.store import Step, StepKind, StepStatus, utcnow

__all__ = ["CONTENT_TYPE", "LATENCY_BUCKETS_S", "BATCH_BUCKETS", "queue_depths", "render"]

log = structlog.get_logger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
"""Prometheus's text exposition format."""

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
"""From a replayed step (milliseconds) to a long CPU generation (minutes)."""

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Powers of two up to the largest ``UMIQ_<ROLE>__BATCH_SIZE``."""


def queue_depths(settings: Settings) -> dict[str, int]:
    """Messages waiting in each queue: Redis's list lengths, or the embedded broker's message files.

    Kombu's ``queue_declare`` answers both (LLEN on Redis, a count of files on the filesystem transport), through
    a connection of its own, so scraping never touches the process's Celery app.
    """
    config = celery_config(settings)
    # One try with a short timeout: a scrape reports the broker down rather than hang on reconnecting.
    options = {**config["broker_transport_options"], "max_retries": 0}
    with Connection(config["broker_url"], transport_options=options, connect_timeout=2) as connection:
        channel = connection.default_channel
        return {queue: channel.queue_declare(queue=queue).message_count for queue in QUEUES}


def render(engine: sa.Engine, settings: Settings) -> bytes:
    """The Prometheus text exposition of the current figures."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Figures(engine, settings))
    return generate_latest(registry)


class _Figures(Collector):
    """Reads the broker and the store once per scrape."""

    def __init__(self, engine: sa.Engine, settings: Settings) -> None:
        self._engine = engine
        self._settings = settings

    def collect(self) -> Iterator[Metric]:
        yield from self._queues()
        yield from self._steps()

    def _queues(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "umiq_queue_depth", "Messages waiting in a pool's queue: the autoscaling signal of that pool.", labels=["queue"]
        )
        up = GaugeMetricFamily("umiq_broker_up", "1 when the broker answered this scrape, else 0.")
        try:
            depths = queue_depths(self._settings)
        except Exception as exc:  # a broker outage must not take the metrics of the store down with it
            log.warning("metrics.broker_unreadable", error=repr(exc))
            up.add_metric([], 0)
        else:
            up.add_metric([], 1)
            for queue, count in depths.items():
                depth.add_metric([queue], count)
        yield up
        yield depth

    def _steps(self) -> Iterator[Metric]:
        window = self._settings.metrics_window_s
        since = utcnow() - timedelta(seconds=window)
        with Session(self._engine) as session:
            rows = session.exec(
                select(Step.kind, Step.dispatched_at, Step.finished_at, Step.tokens_out, Step.batch_size).where(
                    Step.status == StepStatus.DONE, Step.finished_at >= since
                )
            ).all()
        latency: dict[str, list[float]] = defaultdict(list)
        tokens: dict[str, int] = defaultdict(int)
        batches: dict[str, list[float]] = defaultdict(list)
        for kind, dispatched_at, finished_at, tokens_out, batch_size in rows:
            if dispatched_at is not None:
                latency[kind].append((finished_at - dispatched_at).total_seconds())
            tokens[kind] += tokens_out or 0
            if batch_size is not None:
                batches[kind].append(batch_size)
        roles = [kind.value for kind in StepKind]
        model_roles = [kind.value for kind in StepKind if kind is not StepKind.TOOL]
        yield _histogram(
            "umiq_step_latency_seconds",
            f"Dispatch to result applied (queue wait + work + return) of steps finished in the last {window:g} s.",
            {role: latency[role] for role in roles},
            LATENCY_BUCKETS_S,
        )
        rate = GaugeMetricFamily(
            "umiq_generated_tokens_per_second",
            f"Tokens generated per second by a role, averaged over the last {window:g} s.",
            labels=["role"],
        )
        for role in model_roles:
            rate.add_metric([role], tokens[role] / window)
        yield rate
        yield _histogram(
            "umiq_step_batch_size",
            f"Steps generated together in the call a step ran in, over the last {window:g} s.",
            {role: batches[role] for role in model_roles},
            BATCH_BUCKETS,
        )


def _histogram(
    name: str, documentation: str, values: dict[str, Sequence[float]], bounds: Iterable[float]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=["role"])
    bounds = list(bounds)
    for role, observed in values.items():
        buckets = [(str(float(bound)), float(sum(1 for value in observed if value <= bound))) for bound in bounds]
        family.add_metric([role], [*buckets, ("+Inf", float(len(observed)))], sum_value=float(sum(observed)))
    return family
