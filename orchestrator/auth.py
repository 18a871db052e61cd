"""API keys and per-key rate limits: who may call the HTTP API, whose tasks it sees, and how often (UMIQ_API_AUTH).

A key is a 256-bit random token (``umiq_`` + 43 URL-safe characters) shown once, when it is created. The store keeps
only its SHA-256 digest and a short display prefix. A slow password hash (scrypt, argon2) buys nothing here: it
exists to make guessing a low-entropy password expensive, and a 256-bit random token cannot be guessed at any
speed; it would only add tens of milliseconds and a CPU-exhaustion lever to every request. A presented key is
looked up by its display prefix (not secret, indexed) and its digest compared in constant time.

Each key counts its requests in a fixed one-minute window (UMIQ_API_RATE_LIMIT_PER_MIN, or the key's own limit):
in Redis when the broker is Redis, so every API replica shares one count, with INCR and PEXPIRE in one Lua script
so no counter outlives its window; in process otherwise (the embedded mode runs one API process).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import redis
import sqlalchemy as sa
import structlog
from sqlmodel import select

from orchestrator.settings import Settings
from orchestrator.store import ApiKey, session_scope, utcnow

__all__ = [
    "TOKEN_PREFIX",
    "AuthError",
    "new_token",
    "hash_token",
    "display_prefix",
    "create_key",
    "revoke_key",
    "list_keys",
    "authenticate",
    "Verdict",
    "RateLimiter",
    "RedisRateLimiter",
    "LocalRateLimiter",
    "rate_limiter",
]

log = structlog.get_logger(__name__)

TOKEN_PREFIX = "umiq_"
"""Every key starts with this, so secret scanners and the log redaction (orchestrator.logs) can recognise one."""

_DISPLAY_CHARS = len(TOKEN_PREFIX) + 8
_MAX_TOKEN_CHARS = 128


class AuthError(Exception):
    """A request's key is missing, unknown or revoked; ``reason`` is what the 401 tells the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def new_token() -> str:
    """A fresh key: 32 bytes from the operating system's CSPRNG, URL-safe so it fits any header unquoted."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """What the store keeps of a key: its SHA-256 digest, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def display_prefix(token: str) -> str:
    """The start of a key that ``umiq keys list`` shows, so people can tell keys apart without the secret."""
    return token[:_DISPLAY_CHARS]


# ------------------------------------------------------------------------------------------------------ management


def create_key(
    engine: sa.Engine, name: str, *, owner: str | None = None, rate_limit_per_min: int | None = None
) -> tuple[ApiKey, str]:
    """Store a new key (owner defaults to its name) and return it with the token, which is never stored."""
    owner = (owner or name).strip()
    if not name.strip() or len(name.strip()) > 128:
        raise ValueError("a key needs a name of 1 to 128 characters")
    if not owner or len(owner) > 64:
        raise ValueError("an owner is 1 to 64 characters")
    if rate_limit_per_min is not None and rate_limit_per_min < 0:
        raise ValueError("a rate limit is a number of requests per minute, 0 for none")
    token = new_token()
    key = ApiKey(
        name=name.strip(),
        owner=owner,
        prefix=display_prefix(token),
        hash=hash_token(token),
        rate_limit_per_min=rate_limit_per_min,
    )
    with session_scope(engine) as session:
        session.add(key)
    log.info("api_key.created", key_id=key.id, name=key.name, owner=key.owner, prefix=key.prefix)
    return key, token


def revoke_key(engine: sa.Engine, key_id: int) -> ApiKey:
    """Refuse the key from now on; a key revoked earlier keeps its first revocation time. LookupError if unknown."""
    with session_scope(engine) as session:
        key = session.get(ApiKey, key_id)
        if key is None:
            raise LookupError(f"no API key with id {key_id}")
        if key.revoked_at is None:
            key.revoked_at = utcnow()
            session.add(key)
    log.info("api_key.revoked", key_id=key.id, name=key.name, owner=key.owner)
    return key


def list_keys(engine: sa.Engine) -> list[ApiKey]:
    """Every key, oldest first, revoked ones included."""
    with session_scope(engine) as session:
        return list(session.exec(select(ApiKey).order_by(ApiKey.id)).all())


def authenticate(engine: sa.Engine, token: str | None) -> ApiKey:
    """The live key ``token`` belongs to; :class:`AuthError` with the reason otherwise."""
    if not token:
        raise AuthError("missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    if not token.startswith(TOKEN_PREFIX) or len(token) > _MAX_TOKEN_CHARS:
        raise AuthError("invalid API key")
    digest = hash_token(token)
    with session_scope(engine) as session:
        candidates = session.exec(select(ApiKey).where(ApiKey.prefix == display_prefix(token))).all()
    key = next((k for k in candidates if hmac.compare_digest(k.hash, digest)), None)
    if key is None:
        raise AuthError("invalid API key")
    if key.revoked_at is not None:
        raise AuthError("API key revoked")
    return key


# ------------------------------------------------------------------------------------------------------ rate limits


@dataclass(frozen=True)
class Verdict:
    """Whether one more request fits the key's window; if not, how many seconds until the window reopens."""

    allowed: bool
    remaining: int
    retry_after_s: int


class RateLimiter(Protocol):
    def hit(self, bucket: str, limit: int) -> Verdict:
        """Count one request against ``bucket``'s ``limit`` per window; a key's bucket is its digest, unique anywhere."""
        ...


def _verdict(count: int, limit: int, left_s: float) -> Verdict:
    return Verdict(allowed=count <= limit, remaining=max(limit - count, 0), retry_after_s=max(1, math.ceil(left_s)))


_FIXED_WINDOW = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then
    redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return {count, redis.call('PTTL', KEYS[1])}
"""


class RedisRateLimiter:
    """Fixed windows counted in Redis, shared by every API replica; a window starts at its key's first request.

    When Redis cannot be reached the request is let through (and logged): the broker is down then as well, and
    failing closed would turn a broker outage into an outage of every read too.
    """

    def __init__(self, url: str, *, window_s: float = 60.0) -> None:
        self.window_ms = int(window_s * 1000)
        self._redis = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._script = self._redis.register_script(_FIXED_WINDOW)

    def hit(self, bucket: str, limit: int) -> Verdict:
        try:
            count, left_ms = self._script(keys=[f"umiq:ratelimit:{bucket}"], args=[self.window_ms])
        except redis.RedisError as exc:
            log.warning("api.rate_limit_unavailable", error=type(exc).__name__)
            return Verdict(allowed=True, remaining=limit, retry_after_s=0)
        return _verdict(int(count), limit, max(int(left_ms), 0) / 1000)


class LocalRateLimiter:
    """Fixed windows counted in this process: the embedded mode's single API process needs nothing more."""

    def __init__(self, *, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self._windows: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def hit(self, bucket: str, limit: int) -> Verdict:
        now = time.monotonic()
        with self._lock:
            ends, count = self._windows.get(bucket, (0.0, 0))
            if now >= ends:
                ends, count = now + self.window_s, 0
            count += 1
            self._windows[bucket] = (ends, count)
        return _verdict(count, limit, ends - now)


def rate_limiter(settings: Settings) -> RateLimiter:
    """Redis-backed when the broker is Redis (shared across replicas), in-process otherwise."""
    if settings.broker_url.split(":", 1)[0] in ("redis", "rediss"):
        return RedisRateLimiter(settings.broker_url)
    return LocalRateLimiter()
