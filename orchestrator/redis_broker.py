"""kombu's Redis transport, with one Redis client per channel instead of one per command.

kombu 5.7's Redis channel builds a new ``redis.Redis`` object for every publish (and, with ack emulation, for every
unacked-message record and every ack; umiq turns that off, see ``orchestrator.queues``). The connections come from
the channel's pool either way, but constructing a ``redis.Redis`` (its response-callback table alone has a few
hundred entries) costs about 0.09 ms of CPU on the 2-core benchmark machine, about as much as the command it sends
(py-spy). This channel keeps one client per connection pool and hands it out instead. A ``redis.Redis`` is safe to
share between threads (each command checks a connection out of the pool), and a channel whose pools were replaced
(kombu drops them on a connection error) gets a new client for the new pool.

Used for ``redis://`` broker URLs (``orchestrator.queues``); everything else (the polling loop, BRPOP, prefetch,
message restore) is kombu's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis

__all__ = ["Channel", "Transport", "TRANSPORT"]

TRANSPORT = f"{__name__}:Transport"
"""What ``broker_transport`` names so that a ``redis://`` URL gets this transport."""


class Channel(redis.Channel):
    _umiq_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool = self.pool
        cached = self._umiq_client
        if cached is None or cached.connection_pool is not pool:
            cached = self._umiq_client = self._create_client()
        yield cached


class Transport(redis.Transport):
    Channel = Channel
