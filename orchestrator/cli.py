"""The ``umiq`` command: start any pool, the API, the demo; submit a task and show its trajectory.

The CLI is the one place that imports the orchestrator, the workers and training together, to start them.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import sqlalchemy.exc
import structlog
import typer
from rich.console import Console

from orchestrator.eval_cli import eval_app
from orchestrator.logs import setup_logging
from orchestrator.settings import get_settings
from orchestrator.store import get_engine, migrate

__all__ = ["app"]

app = typer.Typer(help="umiq: the α-UMi multi-LLM agent on Celery, Redis and Postgres.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")
models_app = typer.Typer(help="The model registry: versions, promotion, rollback.", no_args_is_help=True)
app.add_typer(models_app, name="models")
keys_app = typer.Typer(help="API keys of the HTTP API: create (shown once), list, revoke.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(eval_app, name="eval")
console = Console()

POOLS = ("planner", "caller", "summarizer", "tools", "orchestrator", "training")
MODEL_POOLS = ("planner", "caller", "summarizer", "training")
ROLE_POOLS = ("planner", "caller", "summarizer")


def _when_store_answers(action: Callable[[], object], doing: str) -> None:
    """Start-up work that needs the store waits out an outage with backoff, so a pool restarted during one comes up."""
    delay_s = 1.0
    while True:
        try:
            action()
            return
        except sqlalchemy.exc.OperationalError as exc:
            log = structlog.get_logger("umiq.cli")
            log.warning("store.unavailable", doing=doing, retry_in_s=delay_s, error=type(exc.orig).__name__)
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 30.0)


def _celery_argv(pool: str, concurrency: int, loglevel: str) -> list[str]:
    """Role pools take one task thread per batch slot (the threads share the process's one model and batcher)."""
    if pool in ROLE_POOLS:
        execution = ["--pool", "threads", "--concurrency", str(get_settings().role(pool).batch_size)]
    elif pool in MODEL_POOLS:
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
    pool: Annotated[str, typer.Argument(help="planner | caller | summarizer | tools | orchestrator | training")],
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
    elif pool == "training":
        import training.tasks  # noqa: F401  (registers the training cycle task)

        _when_store_answers(lambda: migrate(settings.resolved_database_url), "migrate")
    elif pool == "tools":
        from workers.tools import tasks as tool_tasks

        tool_tasks.load_tool_modules(settings)
        _when_store_answers(lambda: migrate(settings.resolved_database_url), "migrate")
        catalog = get_engine(settings.resolved_database_url)
        _when_store_answers(lambda: tool_tasks.publish_catalog(catalog), "publish the tool catalogue")
    else:
        import orchestrator.tasks  # noqa: F401  (registers the orchestrator's tasks)

        _when_store_answers(lambda: migrate(settings.resolved_database_url), "migrate")
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


@app.command("serve-model")
def serve_model(
    model: Annotated[list[str], typer.Option("--model", "-m", help="NAME=MODEL, or MODEL served under its own name; repeat for several.")],
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8001,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    api_key: Annotated[str | None, typer.Option(envvar="UMIQ_SERVE_API_KEY", help="Bearer token clients must send (set it in the environment).")] = None,
) -> None:
    """Serve local models over an OpenAI-compatible API, for the remote backend where there is no vLLM."""
    import uvicorn

    from workers.backends.openai_server import create_app, load_models, parse_served

    settings = get_settings()
    setup_logging(settings)
    try:
        served = parse_served(model)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    backends = load_models(served, cache_dir=settings.resolved_model_cache, device=device)
    uvicorn.run(create_app(backends, api_key=api_key), host=host, port=port, log_config=None)


@app.command()
def sweeper(
    interval: Annotated[float | None, typer.Option(help="Seconds between sweeps; default UMIQ_SWEEP_INTERVAL_S.")] = None,
) -> None:
    """Re-send steps whose queue message was lost (run exactly one per deployment)."""
    from orchestrator.engine import sweep

    settings = get_settings()
    setup_logging(settings)
    _when_store_answers(lambda: migrate(settings.resolved_database_url), "migrate")
    engine = get_engine(settings.resolved_database_url)
    log = structlog.get_logger("umiq.sweeper")
    after_s = settings.resolved_sweep_after_s
    down_since: float | None = None
    outage_s = outage_counts_until = 0.0
    while True:
        now = time.monotonic()
        if down_since is not None:
            # Results that came in during a database outage are still being retried into the store once it is back:
            # for a while, a step's wait through the outage does not count towards UMIQ_SWEEP_AFTER_S.
            outage_s = now - down_since
            outage_counts_until = now + after_s + outage_s
        older_than_s = after_s + (outage_s if now < outage_counts_until else 0.0)
        try:
            resent = sweep(engine, settings, older_than_s=older_than_s)
        except Exception as exc:  # a database outage must not end the sweeper; it retries next round
            down_since = down_since or now
            log.warning("sweep.failed", error=repr(exc))
        else:
            if down_since is not None:
                down_since = None
                log.info("sweep.store_back", outage_s=round(outage_s, 1))
            log.info("sweep.done", resent=resent)
        time.sleep(interval or settings.sweep_interval_s)


@app.command()
def beat() -> None:
    """The one scheduler (RedBeat, locked in Redis): sends a retraining cycle every UMIQ_TRAIN_EVERY_S."""
    settings = get_settings()
    setup_logging(settings)
    if settings.embedded:
        console.print("[red]the scheduler keeps its lock in Redis: set UMIQ_BROKER_URL, or run `umiq train` by hand[/red]")
        raise typer.Exit(2)
    from orchestrator.queues import app as celery_app

    celery_app.start(["beat", "--loglevel", "INFO"])


@app.command()
def train(
    force: Annotated[bool, typer.Option(help="Train even if too few new trajectories arrived (by hand: yes).")] = True,
    max_steps: Annotated[int | None, typer.Option(help="Cap optimizer steps per stage (CPU runs).")] = None,
    seed_limit: Annotated[int | None, typer.Option(help="Use only this many seed trajectories (CPU runs).")] = None,
    dev_limit: Annotated[int | None, typer.Option(help="Dev steps scored per system for the gate.")] = None,
    method: Annotated[str | None, typer.Option(help="full | lora")] = None,
    base_model: Annotated[str | None, typer.Option(help="What the global stage starts from.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Samples per forward pass, every stage.")] = None,
    grad_accumulation: Annotated[int | None, typer.Option(help="Forward passes per optimizer step, every stage.")] = None,
    max_length: Annotated[int | None, typer.Option(help="Tokens of prompt + target, every stage.")] = None,
    queue: Annotated[bool, typer.Option(help="Send the cycle to the training pool instead of running it here.")] = False,
    report_path: Annotated[Path | None, typer.Option("--report", help="Also write the cycle report here as JSON.")] = None,
) -> None:
    """Run one learning-loop cycle: data, GLPFT (global + three roles), dev evaluation, register, gate, promote."""
    settings = get_settings()
    setup_logging(settings)
    overrides = {"train_max_steps": max_steps, "train_seed_limit": seed_limit, "train_dev_limit": dev_limit,
                 "train_method": method, "train_base_model": base_model}
    settings = settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    if queue:
        from orchestrator.queues import TRAIN_CYCLE
        from orchestrator.queues import app as celery_app

        celery_app.send_task(TRAIN_CYCLE, kwargs={"force": force})
        console.print("cycle sent to the training pool")
        return
    from training.cycle import run_cycle
    from training.cycle_config import CycleConfig

    migrate(settings.resolved_database_url)
    config = CycleConfig.from_settings(settings)
    recipe = {"per_device_batch_size": batch_size, "grad_accumulation": grad_accumulation, "max_length": max_length}
    for stage in ("global", "planner", "caller", "summarizer"):
        for name, value in recipe.items():
            if value is not None:
                setattr(config.glpft.stage(stage), name, value)
    report = run_cycle(get_engine(settings.resolved_database_url), settings, config, force=force)
    _print_cycle(report)
    if report_path is not None:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(asdict(report), indent=2, default=str), encoding="utf-8")


def _print_cycle(report: object) -> None:
    from rich.table import Table

    console.print(f"[bold]{report.cycle}[/bold]: {report.reason} ({report.seconds:.0f} s)")
    if not report.trained:
        return
    stages = Table(title="GLPFT stages")
    for column in ("stage", "version", "samples", "steps", "tokens/s", "wall s", "peak MB", "final loss"):
        stages.add_column(column)
    for name, stage in report.stages.items():
        loss = f'{stage["loss_history"][-1]["loss"]:.3f}' if stage["loss_history"] else "–"  # fewer steps than logging_steps
        stages.add_row(name, stage["version"], str(stage["samples"]), str(stage["global_step"]), f"{stage['tokens_per_s']:.0f}",
                       f"{stage['wall_s']:.0f}", f"{stage['peak_memory_mb']:.0f}", loss)
    console.print(stages)
    gate = Table(title="dev metrics and gate")
    for column in ("metric", "serving", "candidate"):
        gate.add_column(column)
    for name in ("plan_acc", "act_em", "hallu", "arg_f1", "rouge_l"):
        gate.add_row(name, f"{report.baseline.get(name, float('nan')):.1f}", f"{report.candidate.get(name, float('nan')):.1f}")
    console.print(gate)
    for role, decision in report.decisions.items():
        verdict = "[green]promoted[/green]" if decision["promoted"] else "[red]rejected[/red]"
        console.print(f"{role}: {decision['version']} {verdict}: {decision['reason']}")


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


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="What the key is for, e.g. the calling service.")],
    owner: Annotated[str | None, typer.Option(help="Whose tasks the key sees; keys of one owner share them. Default: the name.")] = None,
    rate_limit: Annotated[int | None, typer.Option(help="Requests per minute; default UMIQ_API_RATE_LIMIT_PER_MIN, 0 for none.", min=0)] = None,
) -> None:
    """Create a key and print it once on stdout: only its hash is stored, so it can never be shown again."""
    from orchestrator import auth

    settings = get_settings()
    setup_logging(settings)  # logs go to stderr, so `KEY=$(umiq keys create ...)` captures the key alone
    migrate(settings.resolved_database_url)
    try:
        key, token = auth.create_key(get_engine(settings.resolved_database_url), name, owner=owner, rate_limit_per_min=rate_limit)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    Console(stderr=True).print(f"key {key.id} ({key.name}, owner {key.owner}, {key.prefix}…): store it now, it is not shown again")
    typer.echo(token)


@keys_app.command("list")
def keys_list() -> None:
    """Every key with its owner, display prefix and state; never the key or its hash."""
    from rich.table import Table

    from orchestrator import auth

    settings = get_settings()
    table = Table(title="API keys")
    for column in ("id", "name", "owner", "prefix", "rate limit/min", "created", "revoked"):
        table.add_column(column, no_wrap=column in ("id", "prefix"))
    for key in auth.list_keys(get_engine(settings.resolved_database_url)):
        limit = "default" if key.rate_limit_per_min is None else str(key.rate_limit_per_min or "none")
        revoked = f"{key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "-"
        table.add_row(str(key.id), key.name, key.owner, f"{key.prefix}…", limit, f"{key.created_at:%Y-%m-%d %H:%M}", revoked)
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[int, typer.Argument(help="The key's id, as `umiq keys list` shows it.")]) -> None:
    """Refuse the key from the next request on; the tasks it created stay, visible to the owner's other keys."""
    from orchestrator import auth

    settings = get_settings()
    setup_logging(settings)
    try:
        key = auth.revoke_key(get_engine(settings.resolved_database_url), key_id)
    except LookupError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    console.print(f"key {key.id} ({key.name}, {key.prefix}…) revoked")


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
        from orchestrator.bfcl_tasks import bfcl_task

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
