"""``umiq eval``: measure the agent. ``static`` scores models by teacher forcing on gold trajectories (DESIGN §4);
``bfcl`` runs BFCL multi-turn entries end to end through the serving path.

A Typer sub-app registered by :mod:`orchestrator.cli`; like the rest of the CLI it may import the orchestrator, the
workers and training together. Each command writes its report as JSON (and optionally Markdown) and prints a table.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.logs import setup_logging
from orchestrator.protocol import MODEL_ROLES
from orchestrator.settings import Settings, get_settings
from orchestrator.store import get_engine, migrate

if TYPE_CHECKING:  # the commands import their modules when they run, so `umiq worker` never loads them
    from training.bfcl_eval import BfclEvaluation

__all__ = ["eval_app"]

eval_app = typer.Typer(
    help="Evaluate the agent: static metrics by teacher forcing, executable BFCL runs through the pools.",
    no_args_is_help=True,
)
console = Console()



def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    console.print(f"wrote {path}")


def _chosen(model: str | None, per_role: dict[str, str | None]) -> dict[str, str]:
    """The models asked for, by role: ``--model`` for every role, a role's own flag first; unnamed roles are absent."""
    return {role: chosen for role in MODEL_ROLES if (chosen := per_role[role] or model)}


def _role_models(model: str | None, per_role: dict[str, str | None]) -> dict[str, str]:
    """``UMIQ_<ROLE>__MODEL`` for the pools this command starts."""
    return {f"UMIQ_{role.upper()}__MODEL": chosen for role, chosen in _chosen(model, per_role).items()}


def _print_bfcl(evaluation: BfclEvaluation) -> None:
    cut = f", first {evaluation.turns} turn(s)" if evaluation.turns else ""
    table = Table(title=f"BFCL {evaluation.category} ({evaluation.split} split{cut})")
    for column in ("entry", "valid", "error type", "status", "steps", "seconds"):
        table.add_column(column, no_wrap=column == "entry")
    for r in evaluation.results:
        valid = "[green]yes[/green]" if r.valid else "[red]no[/red]"
        table.add_row(r.bfcl_id, valid, r.error_type or "-", r.status, str(r.steps), f"{r.seconds:.1f}")
    console.print(table)
    for role, models in sorted(evaluation.models.items()):
        console.print(f"{role}: {models}")
    console.print(f"[bold]accuracy {evaluation.accuracy:.1f}%[/bold] ({evaluation.passed} of {len(evaluation.results)} valid) "
                  f"in {evaluation.seconds:.0f} s")


@eval_app.command("bfcl")
def bfcl(
    category: Annotated[str, typer.Option(help="multi_turn_base | multi_turn_miss_func | multi_turn_miss_param | multi_turn_long_context")] = "multi_turn_base",
    split: Annotated[str, typer.Option(help="train | dev | test (training/splits).")] = "test",
    limit: Annotated[int | None, typer.Option(help="Only the first N entries of the split (by scenario number).", min=1)] = None,
    ids: Annotated[list[str] | None, typer.Option("--ids", help="These entries only (each must be in the category and split); repeat.")] = None,
    out: Annotated[Path | None, typer.Option(help="JSON report; default <UMIQ_HOME>/eval/bfcl-<category>-<split>.json.")] = None,
    markdown: Annotated[Path | None, typer.Option(help="Also write the report as Markdown here.")] = None,
    start_pools: Annotated[bool, typer.Option(help="Start the five pools here, as the demo does; --no-start-pools uses running ones (compose).")] = True,
    model: Annotated[str | None, typer.Option(help="Serve this model in all three roles (pools started here only).")] = None,
    planner: Annotated[str | None, typer.Option(help="The planner's model (pools started here only).")] = None,
    caller: Annotated[str | None, typer.Option(help="The caller's model (pools started here only).")] = None,
    summarizer: Annotated[str | None, typer.Option(help="The summarizer's model (pools started here only).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per model step, unless UMIQ_<ROLE>__MAX_NEW_TOKENS is set (pools started here).")] = 96,
    turns: Annotated[int | None, typer.Option(help="Only each entry's first N user turns (a CPU-sized run; not comparable with a full one).", min=1)] = None,
    steps_per_turn: Annotated[int | None, typer.Option(help="Planner steps per turn; default UMIQ_MAX_STEPS_PER_TURN.", min=1, max=100)] = None,
    timeout: Annotated[float, typer.Option(help="Seconds each entry may take from its submission; then it fails as 'timeout'.")] = 1800.0,
) -> None:
    """Run a BFCL multi-turn category's entries of a split through the orchestrator and role pools; judge each with
    BFCL's checker (the verdict is stored with its trajectory); print the table and the accuracy."""
    from orchestrator.bfcl_tasks import entry
    from orchestrator.client import Client
    from orchestrator.demo import pools, wait_for_catalog
    from training.bfcl_eval import evaluate_bfcl, select_ids

    settings = get_settings()
    setup_logging(settings)
    models = _role_models(model, {"planner": planner, "caller": caller, "summarizer": summarizer})
    if models and not start_pools:
        raise typer.BadParameter("--model/--planner/--caller/--summarizer choose what pools started here serve; "
                                 "with --no-start-pools set UMIQ_<ROLE>__MODEL on the running pools instead")
    try:
        chosen = select_ids(category, split, ids=ids, limit=limit)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    migrate(settings.resolved_database_url)
    console.print(f"[bold]umiq eval bfcl[/bold]: {len(chosen)} {category} entries of the {split} split")
    with ExitStack() as running:
        if start_pools:
            console.print(f"starting the pools; worker logs in {settings.home / 'logs'}")
            procs = running.enter_context(pools(settings, settings.home / "logs", max_new_tokens, env=models))
            toolsets = sorted({name for bfcl_id in chosen for name in entry(bfcl_id)["involved_classes"]})
            wait_for_catalog(get_engine(settings.resolved_database_url), toolsets, procs, timeout=180)
        evaluation = evaluate_bfcl(settings, Client(settings), category=category, split=split, ids=chosen,
                                   turns=turns, steps_per_turn=steps_per_turn, timeout_s=timeout)
    _print_bfcl(evaluation)
    _write(out or _default_out(settings, category, split), json.dumps(evaluation.to_dict(), indent=2))
    if markdown is not None:
        _write(markdown, evaluation.to_markdown())


def _default_out(settings: Settings, category: str, split: str) -> Path:
    return settings.home / "eval" / f"bfcl-{category}-{split}.json"


def _print_static(label: str, metrics: dict[str, Any]) -> None:
    from training.reports import METRIC_LABELS

    table = Table(title=f"static metrics: {label} ({metrics['steps']} steps, {metrics['calls']} calls, {metrics['finishes']} answers)")
    for column in ("metric", "percent"):
        table.add_column(column)
    for name in ("plan_acc", "act_em", "arg_f1", "hallu", "rouge_l"):
        value = metrics[name]
        table.add_row(METRIC_LABELS[name], "–" if value is None else f"{value:.1f}")
    console.print(table)
    if metrics["parse_errors"]:
        console.print("parse errors: " + ", ".join(f"{k} {v}" for k, v in metrics["parse_errors"].items()))


@eval_app.command("static")
def static(
    split: Annotated[str, typer.Option(help="train | dev | test: the split's BFCL seed trajectories of --category.")] = "test",
    category: Annotated[str, typer.Option(help="The BFCL multi-turn category whose seed trajectories are scored.")] = "multi_turn_base",
    file: Annotated[Path | None, typer.Option(help="Score this file in the α-UMi reference layout instead, as it is.")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N steps (trajectory order).", min=1)] = None,
    model: Annotated[str | None, typer.Option(help="This model in every role (default: what the registry serves).")] = None,
    planner: Annotated[str | None, typer.Option(help="The planner's model.")] = None,
    caller: Annotated[str | None, typer.Option(help="The caller's model.")] = None,
    summarizer: Annotated[str | None, typer.Option(help="The summarizer's model.")] = None,
    single: Annotated[bool, typer.Option(help="Score --model as one agent (the single-LLM backbone format).")] = False,
    cascade: Annotated[bool, typer.Option("--cascade/--per-role", help="--cascade: the planner's own rationale goes on to caller and summarizer; --per-role: each role from the gold history.")] = True,
    batch_size: Annotated[int, typer.Option(help="Requests per generate() call.", min=1)] = 4,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per generated step.", min=1)] = 96,
    out: Annotated[Path | None, typer.Option(help="JSON report with every step; default <UMIQ_HOME>/eval/static-<source>.json.")] = None,
    markdown: Annotated[Path | None, typer.Option(help="Also write the metrics as a Markdown table here.")] = None,
) -> None:
    """Score a system by teacher forcing on gold trajectories (DESIGN §4: Plan ACC, Act. EM, Arg. F1, Hallu., R-L):
    the test split's BFCL seed trajectories, or any file in the α-UMi reference layout."""
    from training import registry
    from training.alpha_umi import load_alpha_umi_trajectories
    from training.evaluate import evaluate_static
    from training.reports import markdown_table
    from training.seed import seed_trajectories
    from training.split import load_split
    from workers.backends.local import LocalBackend, load_shared

    settings = get_settings()
    setup_logging(settings)
    if single and not model:
        raise typer.BadParameter("--single scores one model as the whole agent: name it with --model")
    if file is not None and not file.is_file():
        raise typer.BadParameter(f"no file {file}")
    source = file.stem if file is not None else f"{category}-{split}"
    trajectories = load_alpha_umi_trajectories(file) if file is not None else seed_trajectories(category, ids=sorted(load_split(split)))
    cache = settings.resolved_model_cache
    if single:
        models: LocalBackend | dict[str, LocalBackend] = LocalBackend(model, cache_dir=cache)
    else:
        migrate(settings.resolved_database_url)
        paths = registry.serving(get_engine(settings.resolved_database_url), settings)
        paths.update(_chosen(model, {"planner": planner, "caller": caller, "summarizer": summarizer}))
        models = load_shared(paths, cache_dir=cache)
    evaluation = evaluate_static(
        trajectories, models, compat=settings.prompt_mode == "compat", limit=limit, batch_size=batch_size,
        max_new_tokens=max_new_tokens, description_chars=settings.doc_description_chars, cascade=cascade,
    )
    report = {"source": str(file) if file is not None else {"category": category, "split": split}, **evaluation.to_dict(steps=True)}
    label = f"{evaluation.system} on {source}"
    _print_static(label, report["metrics"])
    _write(out or settings.home / "eval" / f"static-{source}.json", json.dumps(report, indent=2, default=str))
    if markdown is not None:
        _write(markdown, markdown_table({label: report["metrics"]}))
