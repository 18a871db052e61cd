"""What a GLPFT run costs: tokens/s, wall time and peak memory of each stage, full fine-tuning against LoRA.

Runs the four stages (global, planner, caller, summarizer) of SmolLM2-135M ("smollm2-135m") twice, full and LoRA,
on a small fixed subset of BFCL seed data: the chat-mode GLPFT samples (``training.samples.glpft_dataset``) of the
first ``--trajectories`` multi_turn_base trajectories of the train split (``training.split``), in id order. The
recipe is ``GLPFTConfig``'s defaults (gradient checkpointing on, bf16 on CUDA) with a bench-sized batch, length and
step count (``--batch``, ``--max-length``, ``--steps``), so a CPU run takes minutes; on a GPU raise them.

Writes ``bench/results/train.json`` and the loss curves ``bench/results/train_loss.png``; prints a table. On a
shared machine other processes slow the wall clock: the JSON records the load average before and after, and the
table adds tokens per CPU-second (all threads of this process), which contention moves much less.
Needs the ``bench`` extra (matplotlib). Usage: ``python -m bench.train [--steps 4] [--methods full lora]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
from rich.console import Console
from rich.table import Table

from training.glpft import STAGE_DATA, StageResult, run_glpft
from training.glpft_config import STAGES, GLPFTConfig, StageConfig
from training.samples import glpft_dataset
from training.seed import seed_trajectories
from training.split import load_split

__all__ = ["main"]

RESULTS = Path(__file__).parent / "results"
CATEGORY = "multi_turn_base"


def main() -> None:
    """Train, measure, write the JSON and the plot, print the table."""
    args = _arguments()
    ids, samples = _subset(args.trajectories)
    configs = {method: _config(method, args) for method in args.methods}
    runs: dict[str, dict[str, StageResult]] = {}
    load_before = os.getloadavg()
    for method, config in configs.items():
        with tempfile.TemporaryDirectory(prefix=f"umiq-bench-train-{method}-") as folder:
            runs[method] = run_glpft(config, samples, Path(folder))
    report = _report(args, ids, samples, configs, runs, load_before)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    _plot(runs, RESULTS / "train_loss.png")
    _print(report)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per stage")
    parser.add_argument("--batch", type=int, default=1, help="samples per step (no accumulation)")
    parser.add_argument(
        "--max-length", type=int, default=1024, help="tokens per sample; longer prompts lose their start"
    )
    parser.add_argument("--trajectories", type=int, default=4, help="train-split trajectories the samples come from")
    return parser.parse_args()


def _subset(count: int) -> tuple[list[str], dict[str, list[Any]]]:
    """The first ``count`` train-split trajectories of the category, by scenario number: the same data every run."""
    ids = sorted(
        (i for i in load_split("train") if i.startswith(f"{CATEGORY}_")), key=lambda i: int(i.rsplit("_", 1)[1])
    )
    chosen = ids[:count]
    return chosen, dict(glpft_dataset(seed_trajectories(CATEGORY, ids=chosen), compat=False))


def _config(method: str, args: argparse.Namespace) -> GLPFTConfig:
    """The default recipe per stage, resized: one batch of ``--batch`` a step, ``--steps`` steps, ``--max-length``."""
    defaults = GLPFTConfig()

    def sized(stage: StageConfig) -> StageConfig:
        return replace(stage, per_device_batch_size=args.batch, grad_accumulation=1, max_length=args.max_length)

    return replace(
        defaults,
        method=method,
        global_stage=sized(defaults.global_stage),
        planner=sized(defaults.planner),
        caller=sized(defaults.caller),
        summarizer=sized(defaults.summarizer),
        max_steps=args.steps,
        logging_steps=1,
    )


def _report(
    args: argparse.Namespace,
    ids: list[str],
    samples: dict[str, list[Any]],
    configs: dict[str, GLPFTConfig],
    runs: dict[str, dict[str, StageResult]],
    load_before: tuple[float, float, float],
) -> dict[str, Any]:
    """Everything needed to read the figures: machine, versions, data, recipe, and per stage what it cost."""
    first = next(iter(next(iter(runs.values())).values()))
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": first.device,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "load_average_1m": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "versions": {name: version(name) for name in ("torch", "transformers", "peft", "accelerate")},
        "data": {
            "source": f"BFCL {CATEGORY} seed trajectories (train split), chat-mode GLPFT samples",
            "task_ids": ids,
            "samples": {STAGE_DATA[stage]: len(samples[STAGE_DATA[stage]]) for stage in STAGES},
        },
        "bench": {"steps": args.steps, "batch": args.batch, "max_length": args.max_length},
        "config": {method: config.to_dict() for method, config in configs.items()},
        "runs": {method: {stage: _row(result) for stage, result in stages.items()} for method, stages in runs.items()},
    }


def _row(result: StageResult) -> dict[str, Any]:
    """A stage's figures without its temporary paths."""
    row = result.to_dict()
    for key in ("model_path", "adapter_path", "parent"):
        del row[key]
    return row


def _plot(runs: dict[str, dict[str, StageResult]], path: Path) -> None:
    figure, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), sharey=True, squeeze=False)
    for axis, (method, stages) in zip(axes[0], runs.items(), strict=True):
        for stage, result in stages.items():
            steps = [entry["step"] for entry in result.loss_history]
            axis.plot(steps, [entry["loss"] for entry in result.loss_history], marker="o", label=stage)
        axis.set(title=f"SmolLM2-135M, {method}", xlabel="optimizer step", ylabel="training loss (target tokens)")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _print(report: dict[str, Any]) -> None:
    load = report["load_average_1m"]
    table = Table(title=f"GLPFT stages on {report['device']}, 1-minute load {load['before']} -> {load['after']}")
    columns = ("method", "stage", "steps", "tokens", "train s", "wall s", "tokens/s", "tokens/cpu-s", "peak MB", "loss")
    for column in columns:
        table.add_column(column, justify="left" if column in ("method", "stage") else "right")
    for method, stages in report["runs"].items():
        for stage, row in stages.items():
            last = row["loss_history"][-1]["loss"] if row["loss_history"] else float("nan")
            table.add_row(
                method,
                stage,
                str(row["global_step"]),
                str(row["tokens_seen"]),
                f"{row['train_s']:.1f}",
                f"{row['wall_s']:.1f}",
                f"{row['tokens_per_s']:.1f}",
                f"{row['tokens_per_s'] * row['train_s'] / row['cpu_s']:.1f}",
                f"{row['peak_memory_mb']:.0f} {row['memory_kind']}",
                f"{last:.3f}",
            )
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
