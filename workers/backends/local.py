"""The local backend: a transformers causal LM inside the role worker, generating each batch in one padded call.

With a prefix cache (``prefix_cache_mb`` > 0, ``UMIQ_<ROLE>__PREFIX_CACHE_MB``; the default) a batch runs in two
phases. Prefill, row by row, into the batch's states allocated once and laid out exactly as a padded prefill leaves
them (``[pads][prompt but its last token]`` per row, attention mask 0 on the pads): each prompt's longest prefix
already in the :class:`~workers.backends.prefix_cache.PrefixCache` (the system text and tool documentation every
prompt of a tool set shares, a trajectory's previous prompt) is copied into its row, only the rest of the prompt but
its last token is run through the model (alone, unpadded, written straight into the row), and what was computed is
cached for the next prompts. Decode, for the whole batch in one ``generate()`` call given the full padded prompts
and those states: it feeds only each row's last token (positions come from the attention mask's cumulative sum, so
every row continues at its own length) and decodes as without the cache. Prefill then costs only the tokens no
earlier prompt had, with no padding; greedy outputs are those of the uncached path. With ``prefix_cache_mb=0`` the
batch is prefilled in one padded call instead.
"""

from __future__ import annotations

import ctypes
import inspect
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.cache_utils import DynamicLayer

from workers.backends.base import GenerationRequest, GenerationResult
from workers.backends.models import model_version, resolve_model
from workers.backends.prefix_cache import PrefixCache
from workers.backends.prompting import encode_prompt

__all__ = ["DEFAULT_PREFIX_CACHE_MB", "LocalBackend", "load_shared"]

DEFAULT_PREFIX_CACHE_MB = 256
"""Prefix KV cache bound of a local model. SmolLM2-135M in float32 holds 45 KiB of keys and values per token, so 256 MB
keep about 5,800 prompt tokens: the tool documentation of a tool set or two and the latest histories under them."""

log = structlog.get_logger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class _Job:
    """A request ready to batch: where its result goes, and its prompt tokens already fitted to the context."""

    index: int
    request: GenerationRequest
    ids: list[int]


class _RowStops(StoppingCriteria):
    """Ends each row at its own EOS, token limit or stop string, so one request's limits never cut another's."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, width: int, jobs: Sequence[_Job], eos_ids: frozenset[int]
    ) -> None:
        self._tokenizer = tokenizer
        self._width = width
        self._jobs = jobs
        self._eos_ids = eos_ids
        # New tokens each row had when it ended: generate() keeps stepping (padding) rows that ended early.
        self.ended_at: list[int | None] = [None] * len(jobs)

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None, **kwargs: object
    ) -> torch.BoolTensor:
        for row, tokens in enumerate(input_ids[:, self._width :].tolist()):
            if self.ended_at[row] is None and self._ends(self._jobs[row].request, tokens):
                self.ended_at[row] = len(tokens)
        return torch.tensor([end is not None for end in self.ended_at], dtype=torch.bool, device=input_ids.device)

    def _ends(self, request: GenerationRequest, tokens: list[int]) -> bool:
        if tokens[-1] in self._eos_ids or len(tokens) >= request.max_new_tokens:
            return True
        return bool(request.stop) and _stop_end(_decode(self._tokenizer, tokens), request.stop) is not None


class LocalBackend:
    """Serves one model from this process; loading happens once, here, because it is the slow part (seconds).

    ``prefix_cache_mb`` bounds the prefix KV cache (see the module's docstring); 0 turns it off. Models whose cache
    is not plain full attention in every layer (sliding windows, linear attention) are served without it.
    """

    def __init__(
        self,
        model: str,
        *,
        cache_dir: Path,
        device: str = "auto",
        dtype: str = "auto",
        threads: int | None = None,
        prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB,
    ) -> None:
        started = time.perf_counter()
        if threads is not None:
            # Process-wide: several model workers sharing few cores each get a share instead of all fighting for all.
            torch.set_num_threads(threads)
        path = resolve_model(model, Path(cache_dir))
        self.device = _pick_device(device)
        self.model_version = model_version(path)
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=_pick_dtype(dtype, self.device))
        self._model = loaded.to(self.device).eval()
        self._context = int(self._model.config.max_position_embeddings)
        self._eos_ids = _eos_ids(self._model.generation_config.eos_token_id, self._tokenizer.eos_token_id)
        self._pad_id = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else min(self._eos_ids)
        self.prefix_cache: PrefixCache | None = None
        if prefix_cache_mb < 0:
            raise ValueError(f"prefix_cache_mb must not be negative, got {prefix_cache_mb}")
        self._kv_shapes = _kv_shapes(self._model, self.device) if prefix_cache_mb > 0 else None
        if self._kv_shapes is not None:
            self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20))
        elif prefix_cache_mb > 0:
            log.info("prefix_cache.unsupported", path=str(path), reason="not every layer is a full-attention KV cache")
        log.info(
            "model.loaded",
            seconds=round(time.perf_counter() - started, 2),
            path=str(path),
            device=str(self.device),
            model_version=self.model_version,
            prefix_cache_mb=prefix_cache_mb if self.prefix_cache is not None else 0,
        )

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """One padded generate() per temperature; a request that cannot be served gets an error result, alone."""
        results: dict[int, GenerationResult] = {}
        jobs: list[_Job] = []
        for index, request in enumerate(requests):
            try:
                jobs.append(self._prepare(index, request))
            except Exception as exc:
                results[index] = _failure(exc, tokens_in=0)
        for group in _by_temperature(jobs):
            for job, result in zip(group, self._generate_group(group), strict=True):
                results[job.index] = result
        _release_freed_memory()
        return [results[index] for index in range(len(requests))]

    def _prepare(self, index: int, request: GenerationRequest) -> _Job:
        """Long prompts keep their end: the latest history and the question matter more than the oldest turns."""
        room = self._context - request.max_new_tokens
        if request.max_new_tokens < 1 or room < 1:
            raise ValueError(f"max_new_tokens must be 1 to {self._context - 1} in a {self._context}-token context")
        ids = encode_prompt(self._tokenizer, request.prompt)
        if not ids:
            raise ValueError("the prompt has no tokens")
        if len(ids) > room:
            log.info("prompt.truncated", tokens=len(ids), kept=room)
            ids = ids[-room:]
        return _Job(index, request, ids)

    def _generate_group(self, jobs: list[_Job]) -> list[GenerationResult]:
        """If the batch fails (out of memory, one bad request) each request is retried alone: only the culprit fails."""
        try:
            return self._run(jobs)
        except Exception as exc:
            if len(jobs) == 1:
                log.warning("generation.failed", error=f"{type(exc).__name__}: {exc}")
                return [_failure(exc, tokens_in=len(jobs[0].ids))]
            log.warning("generation.batch_failed", rows=len(jobs), error=f"{type(exc).__name__}: {exc}")
            return [self._generate_group([job])[0] for job in jobs]

    @torch.inference_mode()
    def _run(self, jobs: list[_Job]) -> list[GenerationResult]:
        started = time.perf_counter()
        input_ids, attention_mask = _pad_left([job.ids for job in jobs], self._pad_id, self.device)
        width = input_ids.shape[1]
        prefilled = self._prefill(jobs, width) if self.prefix_cache is not None and width > 1 else None
        stops = _RowStops(self._tokenizer, width, jobs, self._eos_ids)
        output = self._model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=prefilled,
            max_new_tokens=max(job.request.max_new_tokens for job in jobs),
            stopping_criteria=StoppingCriteriaList([stops]),
            pad_token_id=self._pad_id,
            **_decoding(jobs[0].request.temperature),
        )
        new_tokens = output[:, width:].tolist()
        results = [self._result(job, new_tokens[row], stops.ended_at[row]) for row, job in enumerate(jobs)]
        log.debug(
            "batch.generated",
            rows=len(jobs),
            tokens_out=sum(r.tokens_out for r in results),
            seconds=round(time.perf_counter() - started, 3),
        )
        return results

    def _prefill(self, jobs: list[_Job], width: int) -> DynamicCache:
        """The batch's cache of every prompt but its last token, left-padded to ``width - 1`` as generate() expects.

        The batch's states are allocated once, with room for the longest request's new tokens after the prompts: the
        decoding steps then write their keys and values in place (:class:`_SlotLayer`) instead of concatenating, which
        copies every layer's whole states at every token (for a batch of 8 prompts of 1,500 tokens, about 0.5 GB per
        generated token on SmolLM2-135M). Each row's slot (its right end) is filled in place: its longest cached
        prefix copied from the tree, the rest run through the model alone (unpadded, nothing wasted on pads) and
        written straight in. What a row computed is cached for the next prompts. Rows of one token have nothing to
        prefill; pads stay zero and masked.
        """
        assert self.prefix_cache is not None and self._kv_shapes is not None
        past, rows = width - 1, len(jobs)
        capacity = past + max(job.request.max_new_tokens for job in jobs)
        batch = [
            tuple(torch.zeros((rows, heads, capacity, dim), dtype=dtype, device=self.device) for _ in range(2))
            for heads, dim, dtype in self._kv_shapes
        ]
        hits = computed = 0
        for row, job in enumerate(jobs):
            ids = job.ids[:-1]
            if not ids:
                continue
            start = past - len(ids)
            slots = [(keys[row : row + 1, :, start:past], values[row : row + 1, :, start:past]) for keys, values in batch]
            found = self.prefix_cache.match(ids)
            found.write_into([(keys[0], values[0]) for keys, values in slots])
            hits, computed = hits + found.length, computed + len(ids) - found.length
            if found.length < len(ids):
                cache = DynamicCache(config=self._model.config)
                cache.layers = [_SlotLayer(keys, values, filled=found.length) for keys, values in slots]
                # Positions default to hit, hit + 1, ...: the row is alone and unpadded. Only the last position's
                # logits are computed (generate() then recomputes them), not a vocabulary-wide row per token.
                suffix = torch.tensor([ids[found.length :]], device=self.device)
                self._model(input_ids=suffix, past_key_values=cache, use_cache=True, logits_to_keep=1)
                self.prefix_cache.insert(ids, [(keys[0], values[0]) for keys, values in slots])
            del found, slots
        log.debug("batch.prefilled", rows=rows, cached_tokens=hits, computed_tokens=computed)
        cache = DynamicCache(config=self._model.config)
        cache.layers = [_SlotLayer(keys, values, filled=past) for keys, values in batch]
        return cache

    def _result(self, job: _Job, tokens: list[int], ended_at: int | None) -> GenerationResult:
        """tokens_out counts what the request consumed: up to the token that completed its stop string or its EOS."""
        used = tokens[: ended_at or len(tokens)]
        body = used[:-1] if used and used[-1] in self._eos_ids else used
        text = _decode(self._tokenizer, body)
        end = _stop_end(text, job.request.stop)
        return GenerationResult(text=text if end is None else text[:end], tokens_in=len(job.ids), tokens_out=len(used))


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """bf16 halves memory and is fast on GPUs; CPUs are slow at it, so they keep float32."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, not {dtype!r}")
    return _DTYPES[dtype]


def _eos_ids(configured: int | list[int] | None, tokenizer_eos: int | None) -> frozenset[int]:
    """Both the generation config's EOS ids and the tokenizer's end a row: they differ on some checkpoints."""
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer_eos)
    ids.discard(None)
    if not ids:
        raise ValueError("the model defines no EOS token")
    return frozenset(ids)


def _pad_left(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding keeps every prompt's last token in the last column, where generation continues from."""
    width = max(len(ids) for ids in rows)
    input_ids = [[pad_id] * (width - len(ids)) + ids for ids in rows]
    attention_mask = [[0] * (width - len(ids)) + [1] * len(ids) for ids in rows]
    return torch.tensor(input_ids, device=device), torch.tensor(attention_mask, device=device)


class _SlotLayer(DynamicLayer):
    """A full-attention cache layer over preallocated states: new keys and values are written into the free end of
    ``keys``/``values`` (``[batch, heads, tokens, head_dim]``, the first ``filled`` tokens already set) in place;
    once that is full it grows as a :class:`DynamicLayer` does (by concatenation, leaving the old tensors as they
    were). So a row's prefill writes straight into its slot of the batch, and the batch's states are handed to
    generate() without a copy."""

    _layer_type = None  # never registered as transformers' layer of any attention type

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, *, filled: int) -> None:
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._slots: tuple[torch.Tensor, torch.Tensor] | None = (keys, values)
        self._filled = filled
        self.keys, self.values = keys[:, :, :filled], values[:, :, :filled]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self._filled + key_states.shape[-2]
        if self._slots is None or end > self._slots[0].shape[-2]:
            self._slots = None
            return super().update(key_states, value_states, *args, **kwargs)
        keys, values = self._slots
        keys[:, :, self._filled : end] = key_states
        values[:, :, self._filled : end] = value_states
        self._filled = end
        self.keys, self.values = keys[:, :, :end], values[:, :, :end]
        return self.keys, self.values


def _kv_shapes(model: torch.nn.Module, device: torch.device) -> list[tuple[int, int, torch.dtype]] | None:
    """Per layer, (KV heads, head size, dtype), read off a one-token forward; None when prefix states cannot be cut
    from this model's cache: a layer that is not plain full attention (sliding windows, linear attention), or no
    ``logits_to_keep`` (a long prefill would then compute a vocabulary-wide row of logits per token)."""
    try:
        if "logits_to_keep" not in inspect.signature(model.forward).parameters:
            return None
        cache = DynamicCache(config=model.config)
        if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
            return None
        with torch.inference_mode():
            token = torch.zeros((1, 1), dtype=torch.long, device=device)
            model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return [(layer.keys.shape[1], layer.keys.shape[3], layer.keys.dtype) for layer in cache.layers]
    except Exception as exc:  # noqa: BLE001 - any failure means: serve without the prefix cache
        log.info("prefix_cache.probe_failed", error=f"{type(exc).__name__}: {exc}")
        return None


def _find_malloc_trim() -> object | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _find_malloc_trim()


def _release_freed_memory() -> None:
    """Hand the heap pages freed by a batch back to the system. A batch frees hundreds of state tensors of a few MB
    (each layer's keys and values, regrown at every decoding step), which glibc keeps in its heap once its mmap
    threshold has risen past them: without this a worker's RSS stays hundreds of MB above what it holds. A few ms."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)  # type: ignore[operator]


def _decoding(temperature: float) -> dict[str, object]:
    """Temperature 0 is greedy; otherwise sampling, with the model's own top-k/top-p defaults."""
    if temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature}


def _by_temperature(jobs: list[_Job]) -> list[list[_Job]]:
    """One generate() call decodes every row the same way, so rows are grouped by temperature."""
    groups: dict[float, list[_Job]] = {}
    for job in jobs:
        groups.setdefault(job.request.temperature, []).append(job)
    return list(groups.values())


def _decode(tokenizer: PreTrainedTokenizerBase, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)


def _stop_end(text: str, stops: Sequence[str]) -> int | None:
    """Where the text is cut: right after the stop string that completes first. Empty stop strings are ignored."""
    ends = [found + len(stop) for stop in stops if stop and (found := text.find(stop)) >= 0]
    return min(ends, default=None)


def _failure(exc: Exception, *, tokens_in: int) -> GenerationResult:
    return GenerationResult(text="", tokens_in=tokens_in, tokens_out=0, error=f"{type(exc).__name__}: {exc}")


def load_shared(models: Mapping[str, str], *, cache_dir: Path) -> dict[str, LocalBackend]:
    """One backend per role name in ``models``, loading each distinct model once: a system that serves one model
    in several roles (the base, the single-LLM agent) holds it in memory once."""
    loaded: dict[str, LocalBackend] = {}
    for model in models.values():
        if model not in loaded:
            loaded[model] = LocalBackend(model, cache_dir=cache_dir)
    return {role: loaded[model] for role, model in models.items()}
