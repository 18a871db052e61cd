"""compose.yaml stays in step with the CLI: every umiq service runs a real command, every pool has a service."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
import typer.main
import yaml

from orchestrator.cli import POOLS, app

COMPOSE = yaml.safe_load((Path(__file__).resolve().parents[1] / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
UMIQ_SERVICES = {name: s for name, s in SERVICES.items() if s.get("image") == "umiq:latest"}


def _parse(argv: list[str]) -> click.Context:
    """Resolve argv against the real CLI without running it; click raises on unknown commands or options."""
    group = typer.main.get_command(app)
    ctx = click.Context(group, info_name="umiq")
    name, command, rest = group.resolve_command(ctx, list(argv))
    return command.make_context(name, rest, parent=ctx)


@pytest.mark.parametrize("name", sorted(UMIQ_SERVICES))
def test_every_umiq_service_command_parses_against_the_cli(name: str) -> None:
    _parse(UMIQ_SERVICES[name]["command"])


def test_there_is_one_service_per_pool_and_the_infrastructure() -> None:
    for pool in POOLS:
        assert SERVICES[pool]["command"][:2] == ["worker", pool]
    assert {"redis", "postgres", "api", "flower", "sweeper", "beat"} <= set(SERVICES)


@pytest.mark.parametrize("pool", ["planner", "caller", "summarizer", "training"])
def test_model_pools_reserve_a_gpu(pool: str) -> None:
    (device,) = SERVICES[pool]["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]


@pytest.mark.parametrize("role", ["planner", "caller", "summarizer"])
def test_each_role_scales_on_its_own(role: str) -> None:
    assert f"UMIQ_{role.upper()}_REPLICAS" in str(SERVICES[role]["deploy"]["replicas"])


def test_services_reach_redis_and_postgres() -> None:
    for service in UMIQ_SERVICES.values():
        env = service["environment"]
        assert env["UMIQ_BROKER_URL"].startswith("redis://redis:")
        assert env["UMIQ_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["UMIQ_LOG_FORMAT"] == "json"
