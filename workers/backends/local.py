"""The local backend: a transformers causal LM inside the role worker, generating each batch in one padded call."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from workers.backends.base import GenerationRequest, GenerationResult
from workers.backends.models import model_version, resolve_model
from workers.backends.prompting import encode_prompt

__all__ = ["LocalBackend", "load_shared"]

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
    """Serves one model from this process; loading happens once, here, because it is the slow part (seconds)."""

    def __init__(
        self, model: str, *, cache_dir: Path, device: str = "auto", dtype: str = "auto", threads: int | None = None
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
        log.info(
            "model.loaded",
            seconds=round(time.perf_counter() - started, 2),
            path=str(path),
            device=str(self.device),
            model_version=self.model_version,
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
        stops = _RowStops(self._tokenizer, width, jobs, self._eos_ids)
        output = self._model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
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
