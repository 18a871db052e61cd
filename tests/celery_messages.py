"""Celery messages as kombu's Redis transport stores them on a queue, decoded for tests that inspect what was sent."""

from __future__ import annotations

import base64
import json
from typing import Any

__all__ = ["decode"]


def decode(raw: bytes | str) -> tuple[dict[str, Any], dict[str, Any]]:
    """One queued message's headers (task name, expiry, ...) and the kwargs its worker would get."""
    envelope = json.loads(raw)
    _args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
    return envelope["headers"], kwargs
