"""GLPFT on the tiny model: loss on targets only, prompts cut from the front, stages that chain, serve and resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from orchestrator.protocol import (
    Decision,
    Message,
    Speaker,
    ToolSpec,
    format_backbone_target,
    format_call,
    format_planner,
    render_backbone,
    render_caller,
    render_planner,
    render_summarizer,
)
from training.glpft import IGNORE_INDEX, StageResult, TargetCollator, encode_sample, run_glpft, run_stage
from training.glpft_config import STAGES, GLPFTConfig, StageConfig
from training.split import HeldOutError, load_split
from workers.backends.base import GenerationRequest
from workers.backends.local import LocalBackend
from workers.backends.models import TINY_SMOLLM2, model_version, resolve_model
from workers.backends.prompting import encode_prompt

TOOLS = [
    ToolSpec(
        "add", "Add two numbers.", {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}
    ),
    ToolSpec("echo", "Return the text.", {"type": "object", "properties": {"text": {"type": "string"}}}),
]
CALL = format_call("add", {"a": 2, "b": 3})
THOUGHT = "I should add the two numbers."


@pytest.fixture(scope="module")
def cache(model_cache: Path) -> Path:
    return model_cache


@pytest.fixture(scope="module")
def tiny(cache: Path) -> Path:
    return resolve_model(TINY_SMOLLM2, cache)


@pytest.fixture(scope="module")
def tokenizer(tiny: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny)


def samples_by_role(compat: bool) -> dict[str, list[dict[str, Any]]]:
    """One trajectory's steps in each role's layout: ask, plan a call, call, observe, conclude."""
    asked = [Message(Speaker.USER, "What is 2 + 3?")]
    planned = [*asked, Message(Speaker.PLANNER, format_planner(THOUGHT, Decision.CALL))]
    observed = [*planned, Message(Speaker.CALLER, CALL), Message(Speaker.OBSERVATION, '{"result": 5}')]
    done = [*observed, Message(Speaker.PLANNER, format_planner("The sum is known.", Decision.CONCLUSION))]
    return {
        "backbone": [
            {
                "prompt": render_backbone(TOOLS, asked, compat=compat),
                "target": format_backbone_target(THOUGHT, call=CALL),
            },
            {
                "prompt": render_backbone(TOOLS, observed, compat=compat),
                "target": format_backbone_target("Done.", answer="5"),
            },
        ],
        "planner": [
            {"prompt": render_planner(TOOLS, asked, compat=compat), "target": format_planner(THOUGHT, Decision.CALL)},
            {
                "prompt": render_planner(TOOLS, observed, compat=compat),
                "target": format_planner("Done.", Decision.CONCLUSION),
            },
        ],
        "caller": [{"prompt": render_caller(TOOLS, planned, THOUGHT, compat=compat), "target": CALL}],
        "summarizer": [{"prompt": render_summarizer(done, compat=compat), "target": "2 + 3 is 5."}],
    }


def small_config(tiny: Path, **changes: Any) -> GLPFTConfig:
    """Two rows a step, two steps a stage, no warm-up: seconds per stage on the tiny model."""
    stage = StageConfig(per_device_batch_size=2, grad_accumulation=1, max_length=512, warmup_ratio=0.0)
    base = GLPFTConfig(
        base_model=str(tiny),
        global_stage=stage,
        planner=stage,
        caller=stage,
        summarizer=replace(stage, learning_rate=0.0),
        max_steps=2,
        logging_steps=1,
    )
    return replace(base, **changes)


def weights(folder: str | Path) -> dict[str, torch.Tensor]:
    return load_file(Path(folder) / "model.safetensors")


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ tokenization


@pytest.mark.parametrize("compat", [False, True], ids=["chat", "compat"])
def test_labels_are_exactly_the_target_and_eos(tokenizer: PreTrainedTokenizerBase, compat: bool) -> None:
    sample = samples_by_role(compat)["caller"][0]
    encoded = encode_sample(tokenizer, sample["prompt"], sample["target"], 4096)
    assert encoded is not None
    ids, labels = encoded["input_ids"], encoded["labels"]
    masked = [i for i, label in zip(ids, labels) if label == IGNORE_INDEX]
    learned = [label for label in labels if label != IGNORE_INDEX]
    assert masked == encode_prompt(tokenizer, sample["prompt"]), "the prompt is tokenized as LocalBackend serves it"
    assert labels == [IGNORE_INDEX] * len(masked) + ids[len(masked) :], "labels are the inputs after the prompt"
    assert tokenizer.decode(learned) == sample["target"] + tokenizer.eos_token
    if not compat:
        assert tokenizer.decode(masked).endswith("<|im_start|>assistant\n")


def test_collator_masks_padding_but_not_eos(tokenizer: PreTrainedTokenizerBase) -> None:
    """SmolLM2 pads with its EOS id: padding must be masked by position, never by token id."""
    role = samples_by_role(False)
    long, short = (
        encode_sample(tokenizer, s["prompt"], s["target"], 4096) for s in (role["planner"][1], role["summarizer"][0])
    )
    assert long is not None and short is not None and len(long["input_ids"]) != len(short["input_ids"])
    batch = TargetCollator(pad_id=tokenizer.eos_token_id, pad_to_multiple_of=8)([long, short])
    width = batch["input_ids"].shape[1]
    assert width % 8 == 0 and width >= len(long["input_ids"])
    for row, feature in enumerate([long, short]):
        n = len(feature["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == feature["input_ids"]
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert batch["labels"][row].tolist() == feature["labels"] + [IGNORE_INDEX] * (width - n)
        assert feature["labels"][-1] == tokenizer.eos_token_id


def test_overlong_input_keeps_its_end(tokenizer: PreTrainedTokenizerBase) -> None:
    sample = samples_by_role(True)["planner"][1]
    prompt_ids = encode_prompt(tokenizer, sample["prompt"])
    target_ids = tokenizer(sample["target"], add_special_tokens=False)["input_ids"]
    max_length = len(target_ids) + 1 + 20
    encoded = encode_sample(tokenizer, sample["prompt"], sample["target"], max_length)
    assert encoded is not None and len(encoded["input_ids"]) == max_length
    assert encoded["input_ids"][:20] == prompt_ids[-20:], "the prompt's last 20 tokens survive, right before the target"
    assert tokenizer.decode(encoded["input_ids"][20:]) == sample["target"] + tokenizer.eos_token
    assert encode_sample(tokenizer, sample["prompt"], sample["target"], len(target_ids) + 1) is None, "no room, dropped"


# ---------------------------------------------------------------------------------------------- the four stages


@pytest.fixture(scope="module")
def cycle(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[GLPFTConfig, Path, dict[str, StageResult]]:
    """Global then three local stages, chat layout; the summarizer's rate is 0, so it must equal its parent."""
    config, root = small_config(tiny), tmp_path_factory.mktemp("glpft")
    return config, root, run_glpft(config, samples_by_role(False), root)


def test_every_stage_serves_from_its_folder(
    cycle: tuple[GLPFTConfig, Path, dict[str, StageResult]], cache: Path
) -> None:
    _, _, results = cycle
    assert list(results) == list(STAGES)
    prompt = samples_by_role(False)["planner"][0]["prompt"]
    for result in results.values():
        backend = LocalBackend(result.model_path, cache_dir=cache, device="cpu")
        [generated] = backend.generate([GenerationRequest(prompt, max_new_tokens=4)])
        assert generated.error is None and generated.tokens_out >= 1
        assert backend.model_version == model_version(Path(result.model_path)) == result.version
        assert result.global_step == 2 and result.tokens_seen > 0 and result.tokens_per_s > 0
        assert result.peak_memory_mb > 0 and len(result.loss_history) == 2
    assert len({r.version for r in results.values()}) == 4


def test_local_stages_start_from_the_global_checkpoint(
    cycle: tuple[GLPFTConfig, Path, dict[str, StageResult]], tiny: Path
) -> None:
    _, _, results = cycle
    assert results["global"].parent == str(tiny)
    assert all(results[s].parent == results["global"].model_path for s in STAGES[1:])
    trained = weights(results["global"].model_path)
    assert not same_weights(trained, weights(tiny))
    assert same_weights(weights(results["summarizer"].model_path), trained), "a zero learning rate changes nothing"
    assert not same_weights(weights(results["planner"].model_path), trained)


def test_finished_stages_are_skipped_and_foreign_folders_refused(
    cycle: tuple[GLPFTConfig, Path, dict[str, StageResult]], tiny: Path
) -> None:
    config, root, results = cycle
    started = time.perf_counter()
    assert run_glpft(config, samples_by_role(False), root) == results
    assert time.perf_counter() - started < 5
    assert not any((root / stage / "checkpoints").exists() for stage in STAGES), "finished stages drop checkpoints"
    with pytest.raises(ValueError, match="another config, parent or data"):
        run_stage(config, "global", tiny, samples_by_role(True)["backbone"], root / "global")


def test_lora_serves_a_merged_model_and_keeps_its_adapter(tiny: Path, cache: Path, tmp_path: Path) -> None:
    config = small_config(tiny, method="lora")
    result = run_stage(config, "planner", tiny, samples_by_role(True)["planner"], tmp_path / "planner")
    assert result.adapter_path is not None and (Path(result.adapter_path) / "adapter_config.json").is_file()
    merged = weights(result.model_path)
    assert not any("lora" in key for key in merged) and merged.keys() == weights(tiny).keys()
    assert not same_weights(merged, weights(tiny))
    backend = LocalBackend(result.model_path, cache_dir=cache, device="cpu")
    [generated] = backend.generate([GenerationRequest("Hello", max_new_tokens=3)])
    assert generated.error is None and generated.tokens_out >= 1


def test_config_round_trips_and_held_out_tasks_are_refused(tiny: Path, tmp_path: Path) -> None:
    """The registry stores ``to_dict()``; a stage refuses dev/test tasks before it loads anything."""
    config = small_config(tiny, method="lora")
    assert GLPFTConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    sample = {**samples_by_role(False)["planner"][0], "task_id": min(load_split("test"))}
    with pytest.raises(HeldOutError):
        run_stage(config, "planner", tiny, [sample], tmp_path / "planner")
    assert not (tmp_path / "planner").exists()


def test_training_a_tiny_set_lowers_its_loss(tiny: Path, tmp_path: Path) -> None:
    fast = StageConfig(
        learning_rate=1e-2, warmup_ratio=0.0, scheduler="constant", per_device_batch_size=2, grad_accumulation=1
    )
    config = small_config(tiny, global_stage=fast, max_steps=12)
    result = run_stage(config, "global", tiny, samples_by_role(False)["backbone"], tmp_path / "global")
    losses = [entry["loss"] for entry in result.loss_history]
    assert len(losses) == 12 and losses[-1] < 0.5 * losses[0]


# ------------------------------------------------------------------------------------------------ kill and resume

_WORKER = """
import json, sys
from pathlib import Path
from training.glpft import run_stage
from training.glpft_config import GLPFTConfig
job = json.loads(sys.argv[1])
run_stage(GLPFTConfig.from_dict(job["config"]), "global", Path(job["base"]), job["samples"], Path(job["out"]))
"""


def test_a_killed_stage_resumes_from_its_last_checkpoint(tiny: Path, tmp_path: Path) -> None:
    steps, out = 12, tmp_path / "global"
    config = small_config(tiny, max_steps=steps, save_steps=1)
    samples = samples_by_role(False)["backbone"]
    job = {"config": config.to_dict(), "base": str(tiny), "samples": samples, "out": str(out)}
    worker = subprocess.Popen(
        [sys.executable, "-c", _WORKER, json.dumps(job)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 90
        while not list(out.glob("checkpoints/checkpoint-*/trainer_state.json")) and worker.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        assert worker.poll() is None, "the stage finished before it could be killed"
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        worker.kill()
    assert not (out / "result.json").exists()
    result = run_stage(config, "global", tiny, samples, out)
    assert result.resumed_from is not None
    resumed_at = int(result.resumed_from.rpartition("-")[2])
    assert 1 <= resumed_at < steps and result.global_step == steps
    assert [entry["step"] for entry in result.loss_history] == list(range(1, steps + 1)), "the killed run's steps kept"
    assert (Path(result.model_path) / "model.safetensors").is_file()
