"""umiq's Redis transport on the real broker: a message is handed out once, and what a consumer held but did not
finish goes back on its queue when the consumer stops (orchestrator.queues, orchestrator.redis_broker)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from kombu import Connection, Message, Queue

from orchestrator import queues
from orchestrator.settings import Settings


def _connect() -> Connection:
    """A connection of umiq's Celery app, which the ``settings`` fixture pointed at the test broker: the transport
    and options its workers consume with."""
    return queues.app.connection_for_read()


@pytest.fixture
def broker(settings: Settings, redis_queues: redis.Redis) -> Iterator[Connection]:
    with _connect() as connection:
        yield connection


def _publish(connection: Connection, count: int) -> None:
    with connection.Producer() as producer:
        for index in range(count):
            producer.publish({"index": index}, routing_key="planner", serializer="json")


def test_a_consumer_holds_at_most_its_prefetch_and_redis_keeps_no_copy(broker: Connection, redis_queues: redis.Redis) -> None:
    _publish(broker, 5)
    held: list[Message] = []
    with broker.Consumer([Queue("planner")], callbacks=[lambda _body, message: held.append(message)], prefetch_count=3):
        for _ in range(5):
            try:
                broker.drain_events(timeout=0.5)
            except TimeoutError:
                break
        assert len(held) == 3
        assert redis_queues.llen("planner") == 2
        assert not redis_queues.exists("unacked", "unacked_index")
        for message in held:
            message.ack()


def test_messages_held_but_not_acknowledged_go_back_when_the_consumer_stops(
    settings: Settings, redis_queues: redis.Redis
) -> None:
    """A warm shutdown: the worker finished (acknowledged) one message and had not started the other two."""
    held: list[Message] = []
    with _connect() as worker:
        _publish(worker, 3)
        with worker.Consumer([Queue("planner")], callbacks=[lambda _body, message: held.append(message)], prefetch_count=3):
            for _ in range(3):
                worker.drain_events(timeout=2)
            held[0].ack()
            assert redis_queues.llen("planner") == 0
    assert redis_queues.llen("planner") == 2
    with _connect() as other, other.SimpleQueue("planner") as queue:
        indices = sorted(queue.get(timeout=2).payload["index"] for _ in range(2))
    assert indices == sorted(message.payload["index"] for message in held[1:]) == [1, 2]
