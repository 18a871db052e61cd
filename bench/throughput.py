"""Role throughput: umiq's batched pools against the reference's one-trajectory-at-a-time loop, same model, one run.

Both sides run SmolLM2-135M ("smollm2-135m", greedy) on the same BFCL ``multi_turn_base`` trajectories (the
cheapest entries, ``orchestrator.bfcl_tasks.pick_entries``), first user turn only, with the same budgets: planner steps
per turn (``--steps``), new tokens per step (``--max-new-tokens``) and tool descriptions cut to
``--description-chars`` in prompts. Prompts come from ``orchestrator.protocol`` and tools run through
``workers.tools.registry.execute`` on both sides.

- **umiq**: every pool its own process (``bench.stack.pools``) on Redis and a fresh Postgres database; the role
  pools batch up to ``UMIQ_<ROLE>__BATCH_SIZE`` steps from different trajectories; all trajectories are submitted
  at once.
- **reference**: the α-UMi reference's way: the three models loaded in this one process, one trajectory at a
  time, each step generated alone (batch 1), the state machine of ``orchestrator.machine`` driving it in memory.

Reported: trajectories per minute and generated tokens per second of each side (wall clock from the first step to
the last, model loading excluded), their ratio, RSS per worker process (psutil) and GPU memory when CUDA is there.

Budget choice for a 2-core CPU (the run must stay near ten minutes): a BFCL planner prompt is 1,300 to 1,800
tokens, so one step costs seconds of prefill; 8 trajectories, 1 planner step per turn (planner, caller, tool:
two model steps each), 32 new tokens and 64-character tool descriptions keep both sides to a few minutes. On a GPU
raise them (``--trajectories 32 --steps 3 --max-new-tokens 96``). Torch threads: the reference is one process and
gets every core (``--reference-threads``); umiq runs three model processes, and trajectories in flight keep two
of them busy at once (a planner batch beside a caller batch), so each gets half the cores (``--pool-threads``,
``UMIQ_<ROLE>__THREADS``): two processes with all cores each would oversubscribe them, and torch's thread pools
slow down badly when they do.

Writes ``bench/results/throughput.json`` and prints a table. Usage: ``python -m bench.throughput``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import sqlalchemy as sa
import torch
from rich.console import Console
from rich.table import Table
from sqlmodel import Session, select

from bench.stack import (
    bench_settings,
    fresh_database,
    machine,
    pools,
    private_redis,
    rss_mb,
    wait_finished,
    write_result,
)
from orchestrator import engine as engine_ops
from orchestrator import machine as state_machine
from orchestrator import protocol
from orchestrator.bfcl_tasks import bfcl_task, pick_entries
from orchestrator.protocol import Message, ModelRole, Speaker
from orchestrator.schemas import TaskSpec
from orchestrator.settings import DEFAULT_MODEL, get_settings
from orchestrator.store import Step, StepKind, Trajectory, get_engine
from workers.backends.base import GenerationRequest
from workers.backends.local import LocalBackend
from workers.tools.registry import execute, specs_for

__all__ = ["main", "Budget", "reference_run", "umiq_run"]

TARGET_RATIO = 4.0
ROLES = tuple(ModelRole)


@dataclass(frozen=True)
class Budget:
    """What each trajectory may spend; the same for both sides."""

    trajectories: int
    steps: int
    max_new_tokens: int
    description_chars: int
    reference_threads: int
    pool_threads: int
    batch_size: int
    prefix_cache_mb: int


@dataclass
class _Run:
    """What one side did: wall time, model steps and tokens, and what each trajectory ended as."""

    wall_s: float = 0.0
    model_steps: int = 0
    tokens_out: int = 0
    outcomes: list[str] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    rss_mb: dict[str, float] = field(default_factory=dict)
    gpu_mb: dict[str, float] | None = None

    def report(self, trajectories: int) -> dict[str, Any]:
        return {
            "wall_s": round(self.wall_s, 2),
            "trajectories_per_min": round(trajectories / self.wall_s * 60, 3),
            "tokens_per_s": round(self.tokens_out / self.wall_s, 3),
            "model_steps": self.model_steps,
            "tokens_out": self.tokens_out,
            "mean_batch_size": round(statistics.fmean(self.batch_sizes), 2) if self.batch_sizes else None,
            "max_batch_size": max(self.batch_sizes, default=None),
            "outcomes": self.outcomes,
            "rss_mb": self.rss_mb,
            "gpu_mb": self.gpu_mb,
        }


def main() -> None:
    """Run the reference loop, then umiq's pools, on the same tasks; write the JSON, print the table."""
    args = _arguments()
    budget = Budget(
        args.trajectories, args.steps, args.max_new_tokens, args.description_chars, args.reference_threads,
        args.pool_threads, args.batch_size, args.prefix_cache_mb,
    )
    model_cache = get_settings().resolved_model_cache  # the user's cache: converted weights are reused, not rebuilt
    specs = [bfcl_task(entry, n_turns=1, steps_per_turn=budget.steps) for entry in pick_entries(budget.trajectories)]
    before = machine()
    reference = reference_run(specs, budget, model_cache)
    umiq = umiq_run(specs, budget, model_cache)
    ratio = {
        "trajectories_per_min": round(reference.wall_s / umiq.wall_s, 3),
        "tokens_per_s": round((umiq.tokens_out / umiq.wall_s) / (reference.tokens_out / reference.wall_s), 3),
    }
    report = {
        "benchmark": "throughput",
        "model": DEFAULT_MODEL,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "budget": budget.__dict__,
        "entries": [spec.meta["bfcl_id"] for spec in specs],
        "machine_before": before,
        "machine_after": machine(),
        "reference": reference.report(budget.trajectories),
        "umiq": umiq.report(budget.trajectories),
        "ratio_umiq_over_reference": ratio,
        "target_ratio": TARGET_RATIO,
        "target_met": ratio["trajectories_per_min"] >= TARGET_RATIO,
    }
    write_result("throughput", report)
    _print(report)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trajectories", type=int, default=32, help="BFCL entries, cheapest first, all at once.")
    parser.add_argument("--steps", type=int, default=1, help="Planner steps per turn.")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="New tokens per model step, every role.")
    parser.add_argument("--description-chars", type=int, default=64, help="Tool descriptions are cut to this in prompts.")
    cores = psutil.cpu_count()
    parser.add_argument("--reference-threads", type=int, default=cores, help="torch threads of the reference process.")
    parser.add_argument(
        "--pool-threads", type=int, default=max(1, cores // 2), help="UMIQ_<ROLE>__THREADS of each umiq role process."
    )
    parser.add_argument("--batch-size", type=int, default=8, help="UMIQ_<ROLE>__BATCH_SIZE of the umiq pools.")
    parser.add_argument(
        "--prefix-cache-mb", type=int, default=256, help="UMIQ_<ROLE>__PREFIX_CACHE_MB of the umiq pools (0: off)."
    )
    return parser.parse_args()


# ------------------------------------------------------------------------------------------------------- reference


def reference_run(specs: list[TaskSpec], budget: Budget, model_cache: Path) -> _Run:
    """The three models in this process, one trajectory at a time, every step generated alone."""
    # The reference has no prefix cache: every step prefills its whole prompt.
    models = {
        role: LocalBackend(DEFAULT_MODEL, cache_dir=model_cache, threads=budget.reference_threads, prefix_cache_mb=0)
        for role in ROLES
    }
    run = _Run()
    started = time.perf_counter()
    for spec in specs:
        run.outcomes.append(_reference_trajectory(spec, models, budget, run))
    run.wall_s = time.perf_counter() - started
    run.rss_mb = {"reference (3 models)": round(rss_mb(os.getpid()), 1)}
    if torch.cuda.is_available():
        run.gpu_mb = {"reference (3 models)": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
    return run


def _reference_trajectory(spec: TaskSpec, models: dict[ModelRole, LocalBackend], budget: Budget, run: _Run) -> str:
    """The state machine the orchestrator runs, driven in memory: the same prompts, parses, tools and budgets."""
    tools = specs_for(spec.tools)
    history = [Message(Speaker.USER, spec.turns[0])]
    planner_steps = turn_steps = 0
    outcomes: list[dict[str, Any]] = []
    executed: list[tuple[str, dict[str, Any]]] = []
    kind, request = StepKind.PLANNER, {}
    while True:
        if kind == StepKind.PLANNER:
            planner_steps, turn_steps = planner_steps + 1, turn_steps + 1
        state = state_machine.State(
            turns=spec.turns, turn=0, planner_steps=planner_steps, turn_planner_steps=turn_steps,
            max_steps_per_turn=budget.steps, max_steps=get_settings().max_steps_per_trajectory,
            tool_names=frozenset(tool.name for tool in tools),
        )
        if kind == StepKind.TOOL:
            observation = execute(spec.tools, spec.initial_config, executed, request["tool"], request["arguments"],
                                  max_chars=get_settings().observation_chars)
            executed.append((request["tool"], request["arguments"]))
            transition = state_machine.after_tool(state, observation.content)
        else:
            text = _generate(models, ModelRole(kind), tools, history, request, budget, run)
            transition = _after_model(ModelRole(kind), state, text, outcomes)
        history.extend(transition.messages)
        if transition.outcome is not None:
            outcomes.append(transition.outcome)
        if transition.finish is not None:
            return transition.finish.value
        kind, request = transition.next_kind, transition.next_request


def _generate(
    models: dict[ModelRole, LocalBackend], role: ModelRole, tools: list, history: list[Message], request: dict[str, Any],
    budget: Budget, run: _Run,
) -> str:
    chars = budget.description_chars
    if role is ModelRole.PLANNER:
        prompt = protocol.render_planner(tools, history, description_chars=chars)
    elif role is ModelRole.CALLER:
        prompt = protocol.render_caller(tools, history, request.get("rationale", ""), description_chars=chars)
    else:
        prompt = protocol.render_summarizer(history)
    generation = GenerationRequest(prompt, max_new_tokens=budget.max_new_tokens, stop=protocol.stop_strings(role))
    [result] = models[role].generate([generation])
    run.model_steps += 1
    run.tokens_out += result.tokens_out
    run.batch_sizes.append(1)
    return result.text


def _after_model(role: ModelRole, state: state_machine.State, text: str, outcomes: list) -> state_machine.Transition:
    if role is ModelRole.PLANNER:
        return state_machine.after_planner(state, protocol.parse_planner(text), outcomes)
    if role is ModelRole.CALLER:
        return state_machine.after_caller(state, protocol.parse_caller(text))
    return state_machine.after_summarizer(state, protocol.parse_summarizer(text), outcomes)


# ------------------------------------------------------------------------------------------------------------ umiq


def umiq_run(specs: list[TaskSpec], budget: Budget, model_cache: Path) -> _Run:
    """Every pool its own process; all trajectories submitted at once; measured from submit to the last one's end."""
    roles = {
        f"UMIQ_{role.value.upper()}__{name}": value
        for role in ROLES
        for name, value in {
            "BACKEND": "local", "MODEL": DEFAULT_MODEL, "MAX_NEW_TOKENS": str(budget.max_new_tokens),
            "THREADS": str(budget.pool_threads), "BATCH_SIZE": str(budget.batch_size),
            "PREFIX_CACHE_MB": str(budget.prefix_cache_mb),
        }.items()
    }
    extra = {**roles, "UMIQ_MODEL_CACHE": str(model_cache), "UMIQ_DOC_DESCRIPTION_CHARS": str(budget.description_chars)}
    run = _Run()
    with (
        tempfile.TemporaryDirectory(prefix="umiq-bench-throughput-") as home,
        fresh_database("umiq_bench_throughput") as url,
        private_redis() as broker,
    ):
        settings = bench_settings(url, broker, Path(home), extra)
        with pools(settings, Path(home), extra, orchestrator_threads=2) as procs:
            db = get_engine(url)
            started = time.perf_counter()
            ids = [engine_ops.submit(db, spec, settings).id for spec in specs]
            wait_finished(db, ids, timeout=3600, poll_s=0.5)
            run.wall_s = time.perf_counter() - started
            run.rss_mb = {name: round(rss_mb(proc.pid), 1) for name, proc in procs.items()}
            run.gpu_mb = _gpu_mb({name: proc.pid for name, proc in procs.items()})
        _count(db, ids, run)
    return run


def _count(db: sa.Engine, task_ids: list[str], run: _Run) -> None:
    with Session(db) as session:
        trajectories = session.exec(select(Trajectory).where(Trajectory.task_id.in_(task_ids))).all()
        order = {task_id: index for index, task_id in enumerate(task_ids)}
        run.outcomes = [t.status for t in sorted(trajectories, key=lambda t: order[t.task_id])]
        steps = session.exec(
            select(Step.tokens_out, Step.batch_size)
            .where(Step.trajectory_id.in_([t.id for t in trajectories]), Step.kind != StepKind.TOOL)
        ).all()
    run.model_steps = len(steps)
    run.tokens_out = sum(tokens or 0 for tokens, _ in steps)
    run.batch_sizes = [batch for _, batch in steps if batch is not None]


def _gpu_mb(pids: dict[str, int]) -> dict[str, float] | None:
    """GPU memory each pool process holds, as nvidia-smi lists it; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    listing = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=False,
    ).stdout
    used = {int(pid): float(mb) for pid, mb in (line.split(",") for line in listing.splitlines() if line.strip())}
    return {name: used.get(pid, 0.0) for name, pid in pids.items()}


def _print(report: dict[str, Any]) -> None:
    table = Table(title=f"role throughput, {report['model']} on {report['device']} (load before {report['machine_before']['load_average']})")
    for column in ("side", "trajectories", "wall s", "traj/min", "tokens/s", "model steps", "tokens", "mean batch", "RSS MB"):
        table.add_column(column, justify="right")
    for side in ("reference", "umiq"):
        row = report[side]
        rss = ", ".join(f"{name} {mb:.0f}" for name, mb in row["rss_mb"].items())
        table.add_row(side, str(report["budget"]["trajectories"]), f"{row['wall_s']:.1f}", f"{row['trajectories_per_min']:.2f}",
                      f"{row['tokens_per_s']:.2f}", str(row["model_steps"]), str(row["tokens_out"]),
                      str(row["mean_batch_size"]), rss)
    console = Console(width=200)
    console.print(table)
    ratio = report["ratio_umiq_over_reference"]
    console.print(
        f"umiq / reference: {ratio['trajectories_per_min']:.2f}x trajectories/min, {ratio['tokens_per_s']:.2f}x tokens/s; "
        f"target ≥ {report['target_ratio']:.0f}x: {'met' if report['target_met'] else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
