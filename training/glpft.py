"""GLPFT runs here: one backbone fine-tuned on every agent step, then a copy of it per role, each ready to serve.

Built on transformers' ``Trainer`` rather than TRL's ``SFTTrainer``: training must tokenize prompts exactly as
``LocalBackend`` does at serving time (chat template rendered to text, then tokenized without special tokens) and
cut over-long inputs at the prompt's beginning, never the target's. SFTTrainer applies chat templates and truncates
its own way, so it would need the same custom tokenization and collator anyway, plus one more dependency.

A stage folder holds ``stage.json`` (what it trains on), ``checkpoints/`` (Trainer's, resumed after a kill),
``model/`` (merged safetensors + tokenizer + ``umiq-version.txt``, what LocalBackend loads), ``adapter/`` (LoRA
only) and ``result.json``, written last: a stage with one is finished and is skipped when run again, and its
checkpoints (three times the model's size each, optimizer state included) are deleted then.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import platform
import resource
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from orchestrator.protocol import Prompt
from orchestrator.settings import get_settings
from training.glpft_config import STAGES, GLPFTConfig
from training.split import assert_trainable
from workers.backends.models import VERSION_FILE, model_version, resolve_model
from workers.backends.prompting import encode_prompt

__all__ = ["IGNORE_INDEX", "STAGE_DATA", "StageResult", "TargetCollator", "encode_sample", "run_glpft", "run_stage"]

STAGE_DATA = {"global": "backbone", "planner": "planner", "caller": "caller", "summarizer": "summarizer"}
"""Which sample list each stage trains on: the global stage on single-agent (backbone) samples, each role on its own."""

IGNORE_INDEX = -100
"""The label the loss skips (PyTorch's cross-entropy default): prompt and padding positions."""

_STAGE_FILE = "stage.json"
_RESULT_FILE = "result.json"

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class StageResult:
    """What a finished stage produced and cost; stored as ``result.json`` in the stage folder."""

    stage: str
    model_path: str
    """Merged safetensors + tokenizer + version file: ``LocalBackend(model_path)`` serves it as a plain model."""
    adapter_path: str | None
    """The LoRA adapter alone (LoRA runs only), for inspection or re-merging onto the parent."""
    parent: str
    """The folder this stage started from: the base model for the global stage, the global model for the others."""
    version: str
    global_step: int
    resumed_from: str | None
    """The checkpoint this run continued from, when it did."""
    loss_history: list[dict[str, float]]
    samples: int
    dropped: int
    """Samples left out because the target alone did not fit in ``max_length``."""
    tokens_seen: int
    """Non-padding tokens (prompt and target) through the model over the whole stage, resumed parts included."""
    train_s: float
    """Seconds in the training loop of this run."""
    cpu_s: float
    """CPU seconds (all threads) of this process in that loop: steadier than ``train_s`` on a shared machine."""
    wall_s: float
    """Seconds of this run, loading and saving included."""
    tokens_per_s: float
    """Tokens this run trained on over ``train_s``."""
    peak_memory_mb: float
    memory_kind: str
    """``cuda`` (torch's peak allocation on the GPU) or ``rss`` (the process's peak resident memory on CPU)."""
    device: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageResult:
        return cls(**data)


def encode_sample(
    tokenizer: PreTrainedTokenizerBase, prompt: Prompt, target: str, max_length: int
) -> dict[str, list[int]] | None:
    """Prompt ids as served, then target ids + EOS; labels are the target's ids, the prompt's are ignored.

    An input over ``max_length`` loses the prompt's beginning, as LocalBackend cuts a long prompt. A target that
    alone leaves no room for a prompt token returns None: cutting it would teach answers that stop mid-way, and
    the role could not produce it at serving time anyway.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer defines no EOS token; targets must end with one")
    target_ids = [*tokenizer(target, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    room = max_length - len(target_ids)
    if room < 1:
        return None
    prompt_ids = encode_prompt(tokenizer, prompt)[-room:]
    return {"input_ids": prompt_ids + target_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids}


@dataclass(frozen=True)
class TargetCollator:
    """Right-pads a batch of encoded samples; padding is masked from attention and from the loss."""

    pad_id: int
    pad_to_multiple_of: int = 1
    """8 on GPUs, where tensor cores want aligned shapes; 1 on CPU, where padding is pure waste."""

    def __call__(self, features: Sequence[Mapping[str, list[int]]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        rows = [(f["input_ids"], f["labels"], width - len(f["input_ids"])) for f in features]
        return {
            "input_ids": torch.tensor([ids + [self.pad_id] * pad for ids, _, pad in rows]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * pad for ids, _, pad in rows]),
            "labels": torch.tensor([labels + [IGNORE_INDEX] * pad for _, labels, pad in rows]),
        }


def run_glpft(
    config: GLPFTConfig, samples_by_role: Mapping[str, Sequence[Any]], output_dir: Path | None = None
) -> dict[str, StageResult]:
    """The global stage from the base model, then planner, caller and summarizer each from the global checkpoint."""
    root = Path(output_dir or config.output_dir or get_settings().home / "glpft")
    base = resolve_model(config.base_model, get_settings().resolved_model_cache)
    results = {"global": run_stage(config, "global", base, samples_by_role[STAGE_DATA["global"]], root / "global")}
    parent = Path(results["global"].model_path)
    for stage in STAGES[1:]:
        results[stage] = run_stage(config, stage, parent, samples_by_role[STAGE_DATA[stage]], root / stage)
    return results


def run_stage(
    config: GLPFTConfig,
    stage_name: str,
    base_model_path: Path,
    samples: Sequence[Any],
    output_dir: Path,
    *,
    resume: bool = True,
) -> StageResult:
    """Train one stage into ``output_dir``: skipped when already finished, continued from its latest checkpoint.

    ``resume=False`` deletes the stage folder first. Samples are dicts or objects with ``prompt`` and ``target``
    (``training.samples.Sample``); one whose ``task_id`` belongs to the dev or test split is refused.
    A folder that holds a run of another config, parent or data is refused rather than mixed with this one.
    """
    started = time.perf_counter()
    assert_trainable(_field(s, "task_id") for s in samples)
    stage_dir, base = Path(output_dir), Path(base_model_path)
    fingerprint = _fingerprint(config, stage_name, base, samples)
    if not resume:
        shutil.rmtree(stage_dir, ignore_errors=True)
    _claim(stage_dir, config, stage_name, base, fingerprint)
    if (stage_dir / _RESULT_FILE).is_file():
        log.info("stage.skipped", stage=stage_name, reason="finished", path=str(stage_dir))
        return StageResult.from_dict(json.loads((stage_dir / _RESULT_FILE).read_text(encoding="utf-8")))
    memory = _PeakMemory()
    tokenizer = AutoTokenizer.from_pretrained(base)
    features, dropped = _encode_all(tokenizer, samples, config.stage(stage_name).max_length)
    set_seed(config.stage(stage_name).seed)
    meter = _Meter()
    trainer = _trainer(config, stage_name, base, tokenizer, features, stage_dir, meter)
    checkpoint = _latest_checkpoint(stage_dir / "checkpoints")
    log.info("stage.started", stage=stage_name, samples=len(features), dropped=dropped, resume_from=checkpoint)
    trainer.train(resume_from_checkpoint=checkpoint)
    version = f"{stage_name}-{fingerprint[:10]}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    model_path, adapter_path = _save(trainer.model, tokenizer, stage_dir, version)
    result = StageResult(
        stage=stage_name,
        model_path=str(model_path),
        adapter_path=None if adapter_path is None else str(adapter_path),
        parent=str(base),
        version=version,
        global_step=trainer.state.global_step,
        resumed_from=checkpoint,
        loss_history=[{"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e],
        samples=len(features),
        dropped=dropped,
        tokens_seen=int(trainer.state.num_input_tokens_seen),
        train_s=round(meter.seconds, 3),
        cpu_s=round(meter.cpu_seconds, 3),
        wall_s=round(time.perf_counter() - started, 3),
        tokens_per_s=round(meter.tokens / meter.seconds, 1) if meter.seconds else 0.0,
        peak_memory_mb=round(memory.peak_mb(), 1),
        memory_kind=memory.kind,
        device=_device_name(),
    )
    (stage_dir / _RESULT_FILE).write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
    shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)
    log.info("stage.finished", stage=stage_name, version=version, steps=result.global_step, seconds=result.wall_s)
    return result


def _fingerprint(config: GLPFTConfig, stage_name: str, base: Path, samples: Sequence[Any]) -> str:
    """Everything that changes what a stage learns: its recipe, the method, the parent's version and the data."""
    data = [[_field(s, "prompt"), _field(s, "target")] for s in samples]
    record = {"stage": stage_name, "recipe": config.identity(stage_name), "parent": model_version(base), "data": data}
    return hashlib.sha256(json.dumps(record, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _claim(stage_dir: Path, config: GLPFTConfig, stage_name: str, base: Path, fingerprint: str) -> None:
    """Marks the folder as this run's, or refuses it when an earlier run there trained something else."""
    marker = stage_dir / _STAGE_FILE
    if marker.is_file():
        recorded = json.loads(marker.read_text(encoding="utf-8"))["fingerprint"]
        if recorded != fingerprint:
            raise ValueError(
                f"{stage_dir} holds a {stage_name} stage of another config, parent or data; "
                "pass resume=False to start it over or choose another folder"
            )
        return
    stage_dir.mkdir(parents=True, exist_ok=True)
    record = {"stage": stage_name, "fingerprint": fingerprint, "parent": str(base), "config": config.to_dict()}
    marker.write_text(json.dumps(record, indent=2), encoding="utf-8")


def _field(sample: Any, name: str) -> Any:
    """Samples are dicts or objects (``training.samples.Sample``); ``prompt`` and ``target`` are required."""
    found = sample.get(name) if isinstance(sample, Mapping) else getattr(sample, name, None)
    if found is None and name in ("prompt", "target"):
        raise ValueError(f"a training sample has no {name!r}")
    return found


def _encode_all(
    tokenizer: PreTrainedTokenizerBase, samples: Sequence[Any], max_length: int
) -> tuple[list[dict[str, list[int]]], int]:
    encoded = [encode_sample(tokenizer, _field(s, "prompt"), _field(s, "target"), max_length) for s in samples]
    features = [e for e in encoded if e is not None]
    if not features:
        raise ValueError(f"no trainable samples: {len(samples)} given, every target longer than {max_length} tokens")
    dropped = len(encoded) - len(features)
    if dropped:
        log.warning("samples.dropped", dropped=dropped, reason="target alone exceeds max_length", max_length=max_length)
    return features, dropped


def _load_model(config: GLPFTConfig, path: Path) -> PreTrainedModel | PeftModel:
    """fp32 master weights (bf16 runs as autocast on top); LoRA wraps every linear layer but the output head."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if config.method == "full":
        return model
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def _trainer(
    config: GLPFTConfig,
    stage_name: str,
    base: Path,
    tokenizer: PreTrainedTokenizerBase,
    features: list[dict[str, list[int]]],
    stage_dir: Path,
    meter: _Meter,
) -> Trainer:
    return Trainer(
        model=_load_model(config, base),
        args=_training_args(config, stage_name, stage_dir / "checkpoints"),
        train_dataset=features,
        data_collator=TargetCollator(_pad_id(tokenizer), 8 if torch.cuda.is_available() else 1),
        processing_class=tokenizer,
        callbacks=[meter],
    )


def _training_args(config: GLPFTConfig, stage_name: str, checkpoints: Path) -> TrainingArguments:
    stage = config.stage(stage_name)
    return TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=stage.per_device_batch_size,
        gradient_accumulation_steps=stage.grad_accumulation,
        num_train_epochs=stage.epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.learning_rate(stage_name),
        lr_scheduler_type=stage.scheduler,
        warmup_steps=stage.warmup_ratio,
        weight_decay=stage.weight_decay,
        seed=stage.seed,
        data_seed=stage.seed,
        bf16=config.use_bf16(),
        activation_checkpointing=config.gradient_checkpointing,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        report_to="none",
    )


def _latest_checkpoint(checkpoints: Path) -> str | None:
    """The newest complete checkpoint. Trainer writes its state file last, so a folder without one (or with a
    half-written one) was cut off by the kill and the one before it is used."""
    found = sorted(checkpoints.glob(f"{PREFIX_CHECKPOINT_DIR}-*"), key=_step_of, reverse=True)
    return next((str(folder) for folder in found if _complete(folder)), None)


def _step_of(folder: Path) -> int:
    suffix = folder.name.rpartition("-")[2]
    return int(suffix) if suffix.isdigit() else -1


def _complete(folder: Path) -> bool:
    try:
        json.loads((folder / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _save(
    model: PreTrainedModel | PeftModel, tokenizer: PreTrainedTokenizerBase, stage_dir: Path, version: str
) -> tuple[Path, Path | None]:
    """LoRA keeps its adapter and serves the merged model: LocalBackend loads plain checkpoints only."""
    adapter_path = None
    if isinstance(model, PeftModel):
        adapter_path = stage_dir / "adapter"
        model.save_pretrained(adapter_path)
        model = model.merge_and_unload()
    model_path = stage_dir / "model"
    shutil.rmtree(model_path, ignore_errors=True)
    model.save_pretrained(model_path)
    tokenizer.save_pretrained(model_path)
    (model_path / VERSION_FILE).write_text(version + "\n", encoding="utf-8")
    return model_path, adapter_path


class _Meter(TrainerCallback):
    """Time and tokens of this run's training loop; on resume, Trainer restores the state before train begins."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.tokens = 0
        self._start = (0.0, 0.0, 0)

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self._start = (time.perf_counter(), time.process_time(), state.num_input_tokens_seen)

    def on_train_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.seconds = time.perf_counter() - self._start[0]
        self.cpu_seconds = time.process_time() - self._start[1]
        self.tokens = int(state.num_input_tokens_seen - self._start[2])


class _PeakMemory:
    """A stage's peak memory: torch's peak allocation on a GPU, the process's peak RSS on CPU.

    Linux lets a process reset its own peak RSS (``clear_refs`` 5), so each stage of a run gets its own figure
    once the previous stage's memory is handed back (its trainer sits in reference cycles, and glibc keeps freed
    heap until trimmed); elsewhere the figure is the process's peak so far.
    """

    def __init__(self) -> None:
        gc.collect()
        self.kind = "cuda" if torch.cuda.is_available() else "rss"
        if self.kind == "cuda":
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            ctypes.CDLL(None).malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
        except (OSError, AttributeError):
            log.debug("memory.peak_not_reset", reason="not Linux with glibc")

    def peak_mb(self) -> float:
        if self.kind == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        status = Path("/proc/self/status")
        if status.is_file():
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
