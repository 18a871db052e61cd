"""An OpenAI-compatible server around LocalBackend: the remote backend's real peer in tests, and a stand-in for vLLM.

``umiq serve-model --model tiny-smollm2`` serves ``POST /v1/chat/completions``, ``POST /v1/completions`` and
``GET /v1/models`` (a subset of OpenAI's schema, with vLLM's ``stop_reason``), and TGI's ``POST /generate``. Each
served name maps to a model (``--model planner=tiny-smollm2``); a request's ``model`` field (TGI: ``adapter_id``)
picks one the way vLLM picks a LoRA adapter, so one server can play "one base model, one adapter per role"; no name,
or TGI's ``tgi``, means the first. Requests that wait for the same
model are generated together in one batch, as a serving engine batches them.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import structlog
from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from orchestrator.protocol import Prompt
from workers.backends.base import Backend, GenerationRequest, GenerationResult
from workers.backends.remote import TGI_BASE_MODEL
from workers.batching import Batcher

__all__ = ["create_app", "load_models", "parse_served"]

DEFAULT_MAX_TOKENS = 16
"""OpenAI's documented default for completions; used for chat too, since a model's whole context is rarely meant."""

log = structlog.get_logger(__name__)


def parse_served(specs: Sequence[str]) -> dict[str, str]:
    """``NAME=MODEL`` serves MODEL under NAME; a bare ``MODEL`` is served under its own name. Order is kept: the
    first name answers requests that name no model."""
    served: dict[str, str] = {}
    for spec in specs:
        name, sep, model = spec.partition("=")
        name, model = (name, model) if sep else (spec, spec)
        if not name or not model:
            raise ValueError(f"expected NAME=MODEL or MODEL, got {spec!r}")
        if name in served:
            raise ValueError(f"the name {name!r} is served twice")
        served[name] = model
    return served


def load_models(served: Mapping[str, str], *, cache_dir: Path, device: str = "auto") -> dict[str, Backend]:
    """Names that map to the same model share one loaded copy."""
    from workers.backends.local import LocalBackend

    loaded: dict[str, Backend] = {}
    backends: dict[str, Backend] = {}
    for name, model in served.items():
        if model not in loaded:
            loaded[model] = LocalBackend(model, cache_dir=cache_dir, device=device)
        backends[name] = loaded[model]
    return backends


class _Sampling(BaseModel):
    """The request fields every route reads; others (``n``, ``top_p``, ``user``...) are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    stop: str | list[str] | None = None
    stream: bool = False


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: str


class TgiParameters(BaseModel):
    """TGI's generate parameters that LocalBackend can honour; ``adapter_id`` picks a served name."""

    model_config = ConfigDict(extra="ignore")

    max_new_tokens: int = Field(100, ge=1)
    temperature: float | None = Field(None, gt=0.0)
    do_sample: bool = False
    stop: list[str] = Field(default_factory=list)
    details: bool = False
    adapter_id: str | None = None


class TgiRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: str
    parameters: TgiParameters = Field(default_factory=TgiParameters)


class _ServerError(Exception):
    """An error answered in OpenAI's ``{"error": {...}}`` shape."""

    def __init__(self, status: int, message: str, kind: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


def create_app(backends: Mapping[str, Backend], *, api_key: str | None = None, max_batch: int = 16) -> FastAPI:
    """Serve ``backends`` by name. With ``api_key``, every route wants ``Authorization: Bearer <api_key>``."""
    if not backends:
        raise ValueError("nothing to serve")
    default = next(iter(backends))
    batchers: dict[str, Batcher] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        by_backend: dict[int, Batcher] = {}
        for name, backend in backends.items():
            if id(backend) not in by_backend:
                by_backend[id(backend)] = _batcher(name, backend, max_batch)
            batchers[name] = by_backend[id(backend)]
        log.info("serve.ready", models={name: b.model_version for name, b in backends.items()})
        yield
        for batcher in by_backend.values():
            await asyncio.to_thread(batcher.close)

    def authorize(authorization: str | None = Header(None)) -> None:
        if api_key is not None and not hmac.compare_digest(authorization or "", f"Bearer {api_key}"):
            raise _ServerError(401, "missing or wrong API key", "authentication_error")

    app = FastAPI(title="umiq model server", lifespan=lifespan, dependencies=[Depends(authorize)])

    @app.exception_handler(_ServerError)
    async def _error(_: Request, exc: _ServerError) -> JSONResponse:
        error = {"message": str(exc), "type": exc.kind, "code": exc.status}
        return JSONResponse({"error": error}, status_code=exc.status)

    async def generate(name: str | None, request: GenerationRequest) -> GenerationResult:
        if not name or (name == TGI_BASE_MODEL and name not in batchers):
            name = default
        if name not in batchers:
            raise _ServerError(404, f"The model `{name}` does not exist.", "NotFoundError")
        result = (await asyncio.wrap_future(batchers[name].submit(request))).result
        if result.error is not None:
            # LocalBackend reports a request it refuses (limits, empty prompt) as a ValueError: the client's fault.
            status = 400 if result.error.startswith("ValueError") else 500
            raise _ServerError(status, result.error, "BadRequestError" if status == 400 else "InternalServerError")
        return result

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": created, "owned_by": "umiq", "root": b.model_version}
                for name, b in backends.items()
            ],
        }

    async def answer(body: _Sampling, prompt: Prompt, *, chat: bool) -> dict[str, Any]:
        """Both OpenAI routes generate alike; the text goes under ``message.content`` for chat, ``text`` otherwise."""
        if body.stream:
            raise _ServerError(400, "streaming is not supported", "BadRequestError")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        request = GenerationRequest(prompt, max_new_tokens=body.max_tokens, temperature=body.temperature, stop=stop)
        result = await generate(body.model, request)
        text, finish, matched = _openai_ending(result, request)
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "stop_reason": matched, "logprobs": None}
        choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        return {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": body.model or default,
            "choices": [choice],
            "usage": _usage(result),
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest) -> dict[str, Any]:
        return await answer(body, [m.model_dump() for m in body.messages], chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> dict[str, Any]:
        return await answer(body, body.prompt, chat=False)

    @app.post("/generate")
    async def tgi_generate(body: TgiRequest) -> dict[str, Any]:
        """TGI keeps the stop string in ``generated_text`` and counts prompt tokens only in prefill details."""
        parameters = body.parameters
        temperature = (parameters.temperature or 1.0) if parameters.do_sample else 0.0
        request = GenerationRequest(
            body.inputs, max_new_tokens=parameters.max_new_tokens, temperature=temperature, stop=parameters.stop
        )
        result = await generate(parameters.adapter_id, request)
        reply: dict[str, Any] = {"generated_text": result.text}
        if parameters.details:
            matched = _matched_stop(result, request)
            at_limit = result.tokens_out >= request.max_new_tokens
            finish = "stop_sequence" if matched else "length" if at_limit else "eos_token"
            reply["details"] = {
                "finish_reason": finish,
                "generated_tokens": result.tokens_out,
                "seed": None,
                "prefill": [],
                "tokens": [],
            }
        return reply

    return app


def _batcher(name: str, backend: Backend, max_batch: int) -> Batcher:
    """No batch window: a request joins whatever is waiting when the model frees up, and never waits for company."""
    return Batcher(lambda: backend, max_size=max_batch, window_s=0.0, name=f"serve-{name}")


def _matched_stop(result: GenerationResult, request: GenerationRequest) -> str | None:
    """LocalBackend cuts right after the stop string that ended a generation, so the text ends with it."""
    return next((stop for stop in request.stop if stop and result.text.endswith(stop)), None)


def _openai_ending(result: GenerationResult, request: GenerationRequest) -> tuple[str, str, str | None]:
    """OpenAI leaves the stop string out of the text; vLLM's ``stop_reason`` says which one it was (None for EOS)."""
    matched = _matched_stop(result, request)
    if matched is not None:
        return result.text[: -len(matched)], "stop", matched
    return result.text, "length" if result.tokens_out >= request.max_new_tokens else "stop", None


def _usage(result: GenerationResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.tokens_in,
        "completion_tokens": result.tokens_out,
        "total_tokens": result.tokens_in + result.tokens_out,
    }
