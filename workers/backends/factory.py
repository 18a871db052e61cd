"""Build the backend a role's settings ask for; the one place that maps ``UMIQ_<ROLE>__BACKEND`` to a class."""

from __future__ import annotations

from orchestrator.settings import RoleSettings, Settings
from workers.backends.base import Backend

__all__ = ["load_backend"]


def load_backend(role: RoleSettings, settings: Settings) -> Backend:
    if role.backend == "scripted":
        from workers.backends.scripted import ScriptedBackend

        return ScriptedBackend(role.model)
    if role.backend == "local":
        from workers.backends.local import LocalBackend

        return LocalBackend(
            role.model,
            cache_dir=settings.resolved_model_cache,
            device=role.device,
            threads=role.threads,
            prefix_cache_mb=role.prefix_cache_mb,
        )
    if role.backend == "remote":
        from workers.backends.remote import RemoteBackend

        if not role.url:
            raise ValueError("the remote backend needs the server's URL: set UMIQ_<ROLE>__URL")
        return RemoteBackend(
            role.url,
            model=role.model,
            adapter=role.adapter or None,
            api=role.api,
            api_key=(role.api_key.get_secret_value() or None) if role.api_key else None,
            timeout_s=role.timeout_s,
            max_retries=role.max_retries,
            concurrency=role.concurrency,
        )
    raise ValueError(f"unknown backend {role.backend!r}; expected 'local', 'remote' or 'scripted'")
