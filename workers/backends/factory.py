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

        return LocalBackend(role.model, cache_dir=settings.resolved_model_cache, device=role.device)
    raise ValueError(f"unknown backend {role.backend!r}; expected 'local' or 'scripted'")
