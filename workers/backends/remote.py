"""The remote backend: a role's model runs on an inference server (vLLM, SGLang, TGI), so a worker only ships prompts.

``UMIQ_<ROLE>__BACKEND=remote`` with ``UMIQ_<ROLE>__URL``. Chat prompts go to the OpenAI-compatible
``/v1/chat/completions`` through ``huggingface_hub.InferenceClient``; plain-text prompts go to ``/v1/completions``
(``api=openai``) or to TGI's ``/generate`` (``api=tgi``). One base model with a LoRA adapter per role is served by
naming the role's adapter (``UMIQ_<ROLE>__ADAPTER``) in each request's ``model`` field, which is how vLLM and SGLang
pick an adapter. A batch's requests are in flight together; each is retried with exponential backoff on connection
errors, timeouts, 429 and 5xx answers, and one that still fails becomes its own error result.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import httpx2
import structlog
from huggingface_hub import InferenceClient, is_offline_mode
from huggingface_hub.errors import (
    HfHubHTTPError,
    InferenceTimeoutError,
    OverloadedError,
)
from huggingface_hub.utils import get_session, hf_raise_for_status
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from workers.backends.base import GenerationRequest, GenerationResult

__all__ = ["TGI_BASE_MODEL", "TGI_MAX_STOP_SEQUENCES", "Api", "RemoteBackend"]

Api = Literal["openai", "tgi"]
"""How plain-text prompts are sent: OpenAI's ``/v1/completions`` or TGI's ``/generate``. Chat prompts use chat
completions either way (TGI serves them too)."""

TGI_MAX_STOP_SEQUENCES = 4
"""TGI refuses more stop strings than this (its ``--max-stop-sequences`` default); further ones are cut here."""

TGI_BASE_MODEL = "tgi"
"""The ``model`` that asks TGI's chat route for its base model: TGI reads any other name as a LoRA adapter id."""

_RETRY_STATUS = frozenset({408, 429})
_BACKOFF_MAX_S = 30.0
_ERROR_CHARS = 500

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class _Reply:
    """A server's answer before normalising: its text may or may not hold the stop string that ended it."""

    text: str
    tokens_in: int
    tokens_out: int
    matched_stop: str | None = None


class RemoteBackend:
    """Sends each request to an inference server; ``concurrency`` requests of a batch are in flight at once.

    ``model`` names the served model and ``adapter`` a LoRA adapter on it; the adapter, when set, is what requests
    ask for. ``api_key`` goes out as a bearer token and nowhere else: without one no ``authorization`` header is
    sent, not even the Hugging Face token that ``InferenceClient`` would otherwise add from the machine.
    """

    def __init__(
        self,
        url: str,
        *,
        model: str,
        adapter: str | None = None,
        api: Api = "openai",
        api_key: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        concurrency: int = 8,
        backoff_s: float = 0.5,
    ) -> None:
        if api not in ("openai", "tgi"):
            raise ValueError(f"api must be 'openai' or 'tgi', not {api!r}")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"the remote backend needs an http(s) URL, not {url!r}")
        if is_offline_mode():
            raise RuntimeError(
                "HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) makes huggingface_hub refuse every request, to a local "
                "inference server too: unset it for workers with a remote backend"
            )
        self._root = url.rstrip("/").removesuffix("/v1")
        self._api = api
        self._name = adapter or model
        self._adapter = adapter
        self._timeout_s = timeout_s
        self._max_retries = max_retries
        self._backoff_s = backoff_s
        self._headers = {"authorization": f"Bearer {api_key}" if api_key else None}
        # A None header is dropped by InferenceClient after its own headers are merged in: that is what keeps a
        # machine's Hugging Face token from being sent to a server that was given no key.
        self._chat = InferenceClient(base_url=self._root, timeout=timeout_s, headers=self._headers)
        self._tgi = InferenceClient(model=f"{self._root}/generate", timeout=timeout_s, headers=self._headers)
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="umiq-remote")
        self.model_version = f"remote:{self._root}:{self._name}"
        log.info(
            "remote.ready",
            url=self._root,
            api=api,
            model=self._name,
            concurrency=concurrency,
            timeout_s=timeout_s,
            max_retries=max_retries,
            authenticated=bool(api_key),
        )

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """All requests are sent at once (up to ``concurrency``); results come back in request order."""
        futures = [self._pool.submit(self._serve, request) for request in requests]
        return [future.result() for future in futures]

    def close(self) -> None:
        """Stop the request threads; requests already sent finish first."""
        self._pool.shutdown(wait=True)

    def _serve(self, request: GenerationRequest) -> GenerationResult:
        started = time.perf_counter()
        retrying = Retrying(
            stop=stop_after_attempt(self._max_retries + 1),
            # Doubling waits with jitter, so workers that lost the same server do not all come back at once.
            wait=wait_exponential(multiplier=self._backoff_s, max=_BACKOFF_MAX_S) + wait_random(0, self._backoff_s),
            retry=retry_if_exception(_transient),
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            reply = retrying(self._call, request)
        except Exception as exc:
            error = _describe(exc)
            seconds = round(time.perf_counter() - started, 3)
            log.warning("remote.failed", url=self._root, model=self._name, error=error, seconds=seconds)
            return GenerationResult(text="", tokens_in=0, tokens_out=0, error=error)
        return GenerationResult(
            text=_normalise(reply, request.stop), tokens_in=reply.tokens_in, tokens_out=reply.tokens_out
        )

    def _call(self, request: GenerationRequest) -> _Reply:
        stop = [s for s in request.stop if s]
        if self._api == "tgi":
            stop = stop[:TGI_MAX_STOP_SEQUENCES]
        if not isinstance(request.prompt, str):
            return self._chat_completion(request, stop)
        if self._api == "tgi":
            return self._tgi_generate(request, stop)
        return self._completion(request, stop)

    def _chat_completion(self, request: GenerationRequest, stop: list[str]) -> _Reply:
        name = self._name if self._api == "openai" else self._adapter or TGI_BASE_MODEL
        output = self._chat.chat_completion(
            list(request.prompt),
            model=name,
            max_tokens=request.max_new_tokens,
            temperature=request.temperature,
            stop=stop or None,
        )
        choice = output.choices[0]
        usage = output.usage
        return _Reply(
            text=choice.message.content or "",
            tokens_in=usage.prompt_tokens if usage else 0,
            tokens_out=usage.completion_tokens if usage else 0,
            matched_stop=_reported_stop(choice),
        )

    def _completion(self, request: GenerationRequest, stop: list[str]) -> _Reply:
        """InferenceClient has no OpenAI completions call for a custom URL, so this posts through its HTTP session."""
        payload = {
            "model": self._name,
            "prompt": request.prompt,
            "max_tokens": request.max_new_tokens,
            "temperature": request.temperature,
        }
        if stop:
            payload["stop"] = stop
        data = self._post("/v1/completions", payload)
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        return _Reply(
            text=choice.get("text") or "",
            tokens_in=int(usage.get("prompt_tokens", 0)),
            tokens_out=int(usage.get("completion_tokens", 0)),
            matched_stop=_reported_stop(choice),
        )

    def _tgi_generate(self, request: GenerationRequest, stop: list[str]) -> _Reply:
        """TGI reports generated tokens in its details; prompt tokens only with prefill details, which it may refuse."""
        sampling: dict[str, Any] = {"do_sample": False}
        if request.temperature > 0:
            sampling = {"do_sample": True, "temperature": request.temperature}
        output = self._tgi.text_generation(
            request.prompt,
            details=True,
            max_new_tokens=request.max_new_tokens,
            stop=stop or None,
            adapter_id=self._adapter,
            **sampling,
        )
        details = output.details
        return _Reply(
            text=output.generated_text,
            tokens_in=len(details.prefill or []) if details else 0,
            tokens_out=details.generated_tokens if details else 0,
        )

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Same session, errors and timeout type as InferenceClient's own calls, so retries treat both alike."""
        url = f"{self._root}{path}"
        headers = {key: value for key, value in self._headers.items() if value is not None}
        try:
            response = get_session().post(url, json=payload, headers=headers, timeout=self._timeout_s)
        except httpx2.TimeoutException as exc:
            raise InferenceTimeoutError(f"Inference call timed out: {url}") from exc
        hf_raise_for_status(response)
        return response.json()

    def _log_retry(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning(
            "remote.retry",
            url=self._root,
            model=self._name,
            attempt=state.attempt_number,
            wait_s=round(state.next_action.sleep, 3) if state.next_action else None,
            error=_describe(error) if error else None,
        )


def _transient(exc: BaseException) -> bool:
    """Worth another try: the server was unreachable, slow, overloaded or failed inside; a 4xx will not change."""
    if isinstance(exc, (InferenceTimeoutError, httpx2.TransportError, OverloadedError)):
        return True
    status = _status(exc)
    return status is not None and (status >= 500 or status in _RETRY_STATUS)


def _status(exc: BaseException) -> int | None:
    """TGI's typed errors (raised by ``text_generation``) wrap the HTTP error they came from."""
    for candidate in (exc, exc.__cause__):
        if isinstance(candidate, HfHubHTTPError) and candidate.response is not None:
            return candidate.response.status_code
    return None


def _reported_stop(choice: dict[str, Any]) -> str | None:
    """The stop string a server says it ended at: vLLM's ``stop_reason``, SGLang's ``matched_stop``."""
    for key in ("stop_reason", "matched_stop"):
        value = choice.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def _normalise(reply: _Reply, stops: Sequence[str]) -> str:
    """LocalBackend's convention: the text ends right after the first stop string, which is kept.

    OpenAI-style servers drop the stop string (vLLM and SGLang say which one matched, so it is put back); TGI keeps
    it and may run past it inside the last token; a stop this backend did not send (TGI's cap) is cut here.
    """
    text = reply.text
    if reply.matched_stop in stops and not text.endswith(reply.matched_stop):
        text += reply.matched_stop
    ends = [found + len(stop) for stop in stops if stop and (found := text.find(stop)) >= 0]
    return text[: min(ends)] if ends else text


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:_ERROR_CHARS]
