"""The ``umiq`` command: start any pool, the API, the demo; submit a task and show its trajectory.

The CLI is the one place that imports the orchestrator, the workers and training together, to start them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from orchestrator.logs import setup_logging
from orchestrator.settings import get_settings
from orchestrator.store import get_engine, migrate

__all__ = ["app"]

app = typer.Typer(help="umiq: the α-UMi multi-LLM agent on Celery, Redis and Postgres.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")
models_app = typer.Typer(help="The model registry: versions, promotion, rollback.", no_args_is_help=True)
app.add_typer(models_app, name="models")
console = Console()

POOLS = ("planner", "caller", "summarizer", "tools", "orchestrator")


def _celery_argv(pool: str, concurrency: int, loglevel: str) -> list[str]:
    if pool in ("planner", "caller", "summarizer"):
        execution = ["--pool", "solo"]
    elif pool == "orchestrator":
        execution = ["--pool", "threads", "--concurrency", str(concurrency)]
    else:
        execution = ["--pool", "prefork", "--concurrency", str(concurrency)]
    return [
        "worker",
        "--queues",
        pool,
        "--hostname",
        f"{pool}@%h",
        "--loglevel",
        loglevel,
        "--without-gossip",
        "--without-mingle",
        *execution,
    ]


@app.command()
def worker(
    pool: Annotated[str, typer.Argument(help="planner | caller | summarizer | tools | orchestrator")],
    concurrency: Annotated[int, typer.Option(help="Processes (tools) or threads (orchestrator); model pools run one model per process.")] = 2,
    loglevel: Annotated[str, typer.Option(help="Celery's log level.")] = "INFO",
) -> None:
    """Run one worker pool on its own queue."""
    if pool not in POOLS:
        raise typer.BadParameter(f"pool must be one of {', '.join(POOLS)}")
    settings = get_settings()
    setup_logging(settings)
    from orchestrator.queues import app as celery_app

    if pool in ("planner", "caller", "summarizer"):
        from orchestrator.protocol import ModelRole
        from workers import roles

        roles.serve_role(ModelRole(pool))
    elif pool == "tools":
        from workers.tools import tasks as tool_tasks

        tool_tasks.load_tool_modules(settings)
        migrate(settings.resolved_database_url)
        tool_tasks.publish_catalog(get_engine(settings.resolved_database_url))
    else:
        import orchestrator.tasks  # noqa: F401  (registers the orchestrator's tasks)

        migrate(settings.resolved_database_url)
    celery_app.worker_main(_celery_argv(pool, concurrency, loglevel))


@app.command()
def api(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
) -> None:
    """Serve the HTTP API (OpenAPI at /docs)."""
    import uvicorn

    from orchestrator.api import create_app

    settings = get_settings()
    setup_logging(settings)
    uvicorn.run(create_app(settings), host=host, port=port, log_config=None)


@app.command()
def sweeper(
    interval: Annotated[float | None, typer.Option(help="Seconds between sweeps; default UMIQ_SWEEP_INTERVAL_S.")] = None,
) -> None:
    """Re-send steps whose queue message was lost (run exactly one per deployment)."""
    import time

    import structlog

    from orchestrator.engine import sweep

    settings = get_settings()
    setup_logging(settings)
    migrate(settings.resolved_database_url)
    engine = get_engine(settings.resolved_database_url)
    log = structlog.get_logger("umiq.sweeper")
    while True:
        try:
            resent = sweep(engine, settings)
        except Exception as exc:  # a database outage must not end the sweeper; it retries next round
            log.warning("sweep.failed", error=repr(exc))
        else:
            log.info("sweep.done", resent=resent)
        time.sleep(interval or settings.sweep_interval_s)


@app.command()
def flower(port: Annotated[int, typer.Option(help="Port of Flower's web UI.")] = 5555) -> None:
    """Flower, Celery's monitoring UI, on umiq's broker."""
    from orchestrator.queues import app as celery_app

    celery_app.start(["flower", f"--port={port}"])


@models_app.command("list")
def models_list(role: Annotated[str | None, typer.Option(help="Only this role.")] = None) -> None:
    """Every registered version, newest first, with its status, reason and key metrics."""
    from rich.table import Table

    from training import registry

    settings = get_settings()
    table = Table(title="model versions")
    for column in ("version", "role", "status", "parent", "metrics", "reason", "created"):
        table.add_column(column)
    for v in registry.versions(get_engine(settings.resolved_database_url), role):
        metrics = ", ".join(f"{k} {v.metrics[k]:.1f}" for k in registry.ROLE_METRICS.get(v.role, ()) if k in v.metrics)
        table.add_row(v.id, v.role, v.status, v.parent or "-", metrics or "-", v.reason or "-", f"{v.created_at:%Y-%m-%d %H:%M}")
    console.print(table)


@models_app.command("promote")
def models_promote(
    version: Annotated[str, typer.Argument(help="The version id to serve.")],
    reason: Annotated[str, typer.Option(help="Why, for the record.")] = "promoted by hand",
) -> None:
    """Make a version its role's active one; registry-served workers switch to it between steps."""
    from training import registry

    settings = get_settings()
    promoted = registry.promote(get_engine(settings.resolved_database_url), version, reason=reason)
    console.print(f"{promoted.id} now serves the {promoted.role} role")


@models_app.command("rollback")
def models_rollback(role: Annotated[str, typer.Argument(help="planner | caller | summarizer")]) -> None:
    """Stop serving a role's active version and go back to the one it replaced (or the base model)."""
    from training import registry

    settings = get_settings()
    try:
        restored = registry.rollback(get_engine(settings.resolved_database_url), role)
    except registry.RegistryError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    console.print(f"{role} now serves {restored.id if restored else settings.role(role).base_model + ' (base model)'}")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the database to the newest schema."""
    settings = get_settings()
    migrate(settings.resolved_database_url)
    console.print(f"database at {settings.resolved_database_url} is up to date")


@app.command()
def submit(
    turn: Annotated[list[str], typer.Option("--turn", "-t", help="A user turn; repeat for multi-turn tasks.")] = [],  # noqa: B006
    tool: Annotated[list[str], typer.Option("--tool", help="A tool set name; repeat for several.")] = [],  # noqa: B006
    config: Annotated[Path | None, typer.Option(help="JSON file with the tools' initial state.")] = None,
    bfcl: Annotated[str | None, typer.Option(help="Submit a BFCL multi-turn entry by id, e.g. multi_turn_base_0.")] = None,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the result; 0 returns at once.")] = 0.0,
) -> None:
    """Submit a task and print its id (and its trajectory, with --wait)."""
    from orchestrator.client import Client
    from orchestrator.schemas import TaskSpec

    if bfcl:
        from orchestrator.demo import bfcl_task

        spec = bfcl_task(bfcl)
    else:
        initial = json.loads(config.read_text()) if config else {}
        spec = TaskSpec(turns=turn, tools=tool, initial_config=initial)
    client = Client(get_settings())
    task_id = client.submit(spec)
    console.print(task_id)
    if wait > 0:
        from orchestrator.showing import print_task

        print_task(console, client.wait(task_id, timeout=wait))


@app.command()
def show(task_id: Annotated[str, typer.Argument(help="The task id submit printed.")]) -> None:
    """Print a task's trajectory role by role, with timings and token counts."""
    from orchestrator.client import Client
    from orchestrator.engine import NotFound
    from orchestrator.showing import print_task

    try:
        view = Client(get_settings()).get(task_id, detail=True)
    except NotFound:
        console.print(f"[red]no task {task_id}[/red]")
        raise typer.Exit(1) from None
    print_task(console, view)


@app.command()
def feedback(
    task_id: Annotated[str, typer.Argument(help="The task to judge.")],
    score: Annotated[float, typer.Option(help="0 = useless, 1 = exactly right.", min=0.0, max=1.0)],
    comment: Annotated[str | None, typer.Option(help="Why.")] = None,
) -> None:
    """Score a task's trajectory; the learning loop can train only on well-judged trajectories."""
    from orchestrator.client import Client

    feedback_id = Client(get_settings()).feedback(task_id, score, comment)
    console.print(f"feedback {feedback_id} recorded for {task_id}")


@app.command()
def demo(
    tasks: Annotated[int, typer.Option(help="How many BFCL multi_turn_base entries to run.")] = 3,
    turns: Annotated[int, typer.Option(help="User turns per entry (BFCL entries have 1 to 8).")] = 1,
    steps_per_turn: Annotated[int, typer.Option(help="Planner steps allowed per turn.")] = 2,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per model step, unless UMIQ_<ROLE>__MAX_NEW_TOKENS is set.")] = 48,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for all tasks.")] = 900.0,
) -> None:
    """Run a few BFCL tasks end to end through the Celery pools (started here), then print each and a summary."""
    from orchestrator.demo import run_demo

    settings = get_settings()
    setup_logging(settings)
    code = run_demo(
        settings,
        console,
        n_tasks=tasks,
        n_turns=turns,
        steps_per_turn=steps_per_turn,
        max_new_tokens=max_new_tokens,
        timeout=timeout,
    )
    raise typer.Exit(code)


if __name__ == "__main__":
    app()
