"""The headline result (issue 4): α-UMi GLPFT against the single-LLM agent, direct role training and the base model.

One run trains and evaluates all four systems of :mod:`training.comparison` on the same data with the same budget:

1. **Data**: the chat-mode GLPFT samples of the first ``--train-trajectories`` BFCL ``multi_turn_base`` seed
   trajectories of the train split (``training.split``). On a CPU, samples longer than ``--max-length`` tokens are
   left out rather than cut (a cut prompt loses its tool documentation first, which serving never does).
2. **Training**: GLPFT ``--global-steps`` + ``--local-steps`` per role; the direct role models share the same total.
3. **Static** (teacher forcing, DESIGN §4): the first ``--test-steps`` steps of the test split's first turns.
4. **Executable**: the first ``--bfcl-entries`` test-split entries of ``multi_turn_base``, cut to ``--bfcl-turns``
   turns on a CPU, through the real pools (embedded SQLite and filesystem broker under the work folder), judged
   by BFCL's multi-turn checker.

Every stage and every system's evaluation is cached in the work folder (``--work``, default
``<UMIQ_HOME>/headline``), so a killed run continues where it stopped. Writes ``bench/results/headline.json`` (one
object per system: metrics, split, sizes, device, seconds), the chart ``bench/results/headline.png``, and prints the
Markdown table the README shows. Usage: ``python -m bench.headline [--global-steps 6 --local-steps 3 ...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from orchestrator.protocol import Speaker
from orchestrator.settings import Settings, get_settings
from training.comparison import ROLES, SYSTEMS, System, TrainedSystems, direct_steps, evaluate_system, train_systems
from training.glpft import encode_sample
from training.glpft_config import GLPFTConfig
from training.reports import bar_chart, markdown_table
from training.samples import Sample, Trajectory, glpft_dataset
from training.seed import seed_trajectories
from training.split import load_split
from workers.backends.models import resolve_model

__all__ = ["main"]

RESULTS = Path(__file__).parent / "results"
CATEGORY = "multi_turn_base"
STATIC_METRICS = ("plan_acc", "act_em", "arg_f1", "hallu", "rouge_l")


def main() -> None:
    args = _arguments()
    settings = get_settings()
    work = args.work or settings.home / "headline"
    work.mkdir(parents=True, exist_ok=True)
    cache = settings.resolved_model_cache
    config = _config(args)
    started = time.monotonic()
    train, kept = _training_data(args, config, cache)
    trained = train_systems(
        config, kept, work / "train", global_steps=args.global_steps, local_steps=args.local_steps, model_cache=cache
    )
    test = [_first_turn(t) for t in seed_trajectories(CATEGORY, ids=sorted(load_split("test")))]
    systems = [trained.systems[name] for name in SYSTEMS]
    static = {s.name: _cached(work / f"static-{s.name}.json", lambda s=s: _static(s, test, args, settings)) for s in systems}
    bfcl = {s.name: _cached(work / f"bfcl-{s.name}.json", lambda s=s: _bfcl(s, args, work)) for s in systems}
    rows = {s.name: _row(s, trained, static[s.name], bfcl[s.name], args, train, kept) for s in systems}
    report = _report(args, rows, time.monotonic() - started)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "headline.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    table_rows = {name: row["metrics"] for name, row in rows.items()}
    bar_chart(table_rows, RESULTS / "headline.png", title=report["title"])
    print(markdown_table(table_rows))
    print(json.dumps(report["comparison"], indent=2))


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-trajectories", type=int, default=40, help="Seed trajectories of the train split.")
    parser.add_argument("--global-steps", type=int, default=6, help="Optimizer steps of the global stage.")
    parser.add_argument("--local-steps", type=int, default=3, help="Optimizer steps of each local stage.")
    parser.add_argument("--batch-size", type=int, default=1, help="Samples per forward pass.")
    parser.add_argument("--grad-accumulation", type=int, default=2, help="Forward passes per optimizer step.")
    parser.add_argument("--max-length", type=int, default=2560, help="Longest sample trained on, in tokens.")
    parser.add_argument("--method", choices=["full", "lora"], default="full")
    parser.add_argument("--test-steps", type=int, default=8, help="Teacher-forced test steps per system.")
    parser.add_argument("--eval-batch", type=int, default=4, help="Requests per generate() call in static scoring.")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="Tokens per generated step.")
    parser.add_argument("--bfcl-entries", type=int, default=2, help="Test-split multi_turn_base entries run end to end.")
    parser.add_argument("--bfcl-turns", type=int, default=1, help="Turns of each entry run (all: 0).")
    parser.add_argument("--bfcl-steps-per-turn", type=int, default=3, help="Planner steps per turn.")
    parser.add_argument("--bfcl-timeout", type=float, default=1800.0, help="Seconds each entry may take.")
    parser.add_argument("--work", type=Path, default=None, help="Work folder (models, cached results).")
    return parser.parse_args()


def _config(args: argparse.Namespace) -> GLPFTConfig:
    """GLPFTConfig's recipe with the run's batch and length; steps are set per stage by ``train_systems``."""
    config = GLPFTConfig(method=args.method, logging_steps=1)
    sized = {"per_device_batch_size": args.batch_size, "grad_accumulation": args.grad_accumulation, "max_length": args.max_length}
    return replace(
        config,
        global_stage=replace(config.global_stage, **sized),
        **{role: replace(config.stage(role), **sized) for role in ROLES},
    )


def _training_data(
    args: argparse.Namespace, config: GLPFTConfig, cache: Path
) -> tuple[list[Trajectory], dict[str, list[Sample]]]:
    """The train-split trajectories and their samples that fit ``--max-length`` whole, per role."""
    from transformers import AutoTokenizer

    train = seed_trajectories(CATEGORY, ids=sorted(load_split("train")))[: args.train_trajectories]
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(config.base_model, cache))
    dataset = glpft_dataset(train, compat=False)

    def fits(sample: Sample) -> bool:
        encoded = encode_sample(tokenizer, sample.prompt, sample.target, 10**6)
        return encoded is not None and len(encoded["input_ids"]) <= args.max_length

    return train, {role.value: [s for s in samples if fits(s)] for role, samples in dataset.items()}


def _first_turn(trajectory: Trajectory) -> Trajectory:
    """The trajectory up to its second user message: the test steps a CPU can score, spread over many entries."""
    users = [i for i, m in enumerate(trajectory.messages) if m.speaker is Speaker.USER]
    end = users[1] if len(users) > 1 else len(trajectory.messages)
    return replace(trajectory, messages=trajectory.messages[:end])


def _cached(path: Path, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    result = compute()
    path.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def _static(system: System, test: list[Trajectory], args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    started = time.monotonic()
    evaluation = evaluate_system(
        system,
        test,
        model_cache=settings.resolved_model_cache,
        compat=False,
        limit=args.test_steps,
        batch_size=args.eval_batch,
        max_new_tokens=args.max_new_tokens,
        description_chars=settings.doc_description_chars,
    )
    return {**evaluation.to_dict(steps=True), "seconds": round(time.monotonic() - started, 1)}


def _bfcl(system: System, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The system served by freshly started pools on an embedded store of its own, BFCL entries through them."""
    from orchestrator.client import Client
    from orchestrator.demo import pools, wait_for_catalog
    from orchestrator.store import get_engine, migrate
    from training.bfcl_eval import evaluate_bfcl, select_ids

    home = work / "serve" / system.name
    settings = Settings(home=home)
    migrate(settings.resolved_database_url)
    env = {f"UMIQ_{role.upper()}__MODEL": path for role, path in system.roles.items()}
    ids = select_ids(CATEGORY, "test", limit=args.bfcl_entries)
    with pools(settings, home / "logs", args.max_new_tokens, env=env) as procs:
        wait_for_catalog(get_engine(settings.resolved_database_url), _toolsets(ids), procs, timeout=300)
        evaluation = evaluate_bfcl(
            settings,
            Client(settings),
            category=CATEGORY,
            split="test",
            ids=ids,
            turns=args.bfcl_turns or None,
            steps_per_turn=args.bfcl_steps_per_turn,
            timeout_s=args.bfcl_timeout,
        )
    return evaluation.to_dict()


def _toolsets(ids: list[str]) -> list[str]:
    from orchestrator.bfcl_tasks import bfcl_task

    return sorted({name for bfcl_id in ids for name in bfcl_task(bfcl_id).tools})


def _row(
    system: System,
    trained: TrainedSystems,
    static: dict[str, Any],
    bfcl: dict[str, Any],
    args: argparse.Namespace,
    train: list[Trajectory],
    kept: dict[str, list[Sample]],
) -> dict[str, Any]:
    metrics = {name: static["metrics"][name] for name in STATIC_METRICS}
    metrics["bfcl_accuracy"] = bfcl["accuracy"]
    device = next(iter(trained.stages.values())).device
    return {
        **system.to_dict(),
        "metrics": metrics,
        "static": {k: v for k, v in static["metrics"].items() if k not in STATIC_METRICS},
        "bfcl": {k: v for k, v in bfcl.items() if k != "results"},
        "bfcl_entries": [
            {k: r[k] for k in ("bfcl_id", "trajectory_id", "valid", "error_type", "status", "steps")} for r in bfcl["results"]
        ],
        "split": {"train": "train", "static": "test (first turn)", "bfcl": "test"},
        "sizes": {
            "train_trajectories": len(train),
            "train_samples": {role: len(samples) for role, samples in kept.items()},
            "static_steps": static["metrics"]["steps"],
            "bfcl_entries": bfcl["entries"],
        },
        "device": device,
        "seconds": {
            "train": trained.training_seconds(system.name),
            "static": static["seconds"],
            "bfcl": round(bfcl["seconds"], 1),
        },
    }


def _beats(rows: dict[str, dict[str, Any]], better: str, worse: str) -> dict[str, bool | None]:
    def compare(metric: str) -> bool | None:
        a, b = rows[better]["metrics"].get(metric), rows[worse]["metrics"].get(metric)
        return None if a is None or b is None else a > b

    return {metric: compare(metric) for metric in ("plan_acc", "act_em", "arg_f1", "bfcl_accuracy")}


def _report(args: argparse.Namespace, rows: dict[str, dict[str, Any]], seconds: float) -> dict[str, Any]:
    glpft_hallu = rows["glpft"]["metrics"]["hallu"]
    return {
        "benchmark": "headline",
        "title": f"SmolLM2-135M on BFCL {CATEGORY} (test split), {rows['glpft']['device']}",
        "setup": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "direct_steps_per_role": direct_steps(args.global_steps, args.local_steps),
            "static_mode": "cascade for multi-LLM systems, one agent for single_llm (training.comparison)",
            "prompt_mode": "chat",
            "load_average": [round(x, 2) for x in os.getloadavg()],
        },
        "systems": list(rows.values()),
        "comparison": {
            "glpft_beats_single_llm": _beats(rows, "glpft", "single_llm"),
            "glpft_hallu_under_1pct": glpft_hallu is not None and glpft_hallu < 1.0,
            "failure_causes": {
                name: {"parse_errors": rows[name]["static"]["parse_errors"], "bfcl_error_types": rows[name]["bfcl"]["error_types"]}
                for name in ("single_llm", "glpft")
            },
        },
        "seconds": round(seconds, 1),
    }


if __name__ == "__main__":
    main()
