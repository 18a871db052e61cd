"""The remote backend against a real server on real sockets: LocalBackend's text, retries, timeouts, routing, secrets.

The server is ``workers.backends.openai_server`` serving the tiny model through uvicorn in a thread. Faults are
injected by :class:`Faults`, a test-only ASGI wrapper in front of it: requests whose body holds a marker can be
answered with a 500, slowed past the client's timeout, or cut off mid-response. Nothing on the HTTP path is mocked.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import structlog
import torch
import uvicorn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from orchestrator.logs import setup_logging
from orchestrator.settings import Settings, get_settings
from workers.backends.base import Backend, GenerationRequest, GenerationResult
from workers.backends.factory import load_backend
from workers.backends.local import LocalBackend
from workers.backends.models import TINY_SMOLLM2, resolve_model
from workers.backends.openai_server import create_app, load_models
from workers.backends.remote import RemoteBackend

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
SECRET = "sk-umiq-test-7f3a9c"
SLOW_S = 2.0
"""How long a slowed request sleeps: well past the clients' timeouts in these tests."""

Remote = Callable[..., RemoteBackend]
"""Makes a RemoteBackend for a URL, with keyword options on top of the tests' defaults."""

Rule = Callable[[int], str | None]
"""Given how many times a marker has been seen (1 for the first), the fault to inject: '500', 'slow', 'drop' or None."""


class Faults:
    """Test-only ASGI wrapper: a request whose body holds a marker gets the fault its rule names, else goes through."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.rules: dict[str, Rule] = {}
        self.calls: Counter[str] = Counter()
        self.authorization: dict[str, str | None] = {}

    def reset(self) -> None:
        self.rules.clear()
        self.calls.clear()
        self.authorization.clear()

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        fault = self._fault(body, dict(scope["headers"]))
        if fault == "500":
            await _send_json(send, 500, {"error": "injected failure"})
            return
        if fault == "drop":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"1000")]})
            await send({"type": "http.response.body", "body": b'{"choices": [', "more_body": True})
            raise ConnectionResetError("injected: connection dropped mid-response")
        if fault == "slow":
            await asyncio.sleep(SLOW_S)
        delivered = False

        async def replay() -> dict[str, Any]:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _fault(self, body: bytes, headers: dict[bytes, bytes]) -> str | None:
        marker = next((m for m in self.rules if m.encode() in body), None)
        if marker is None:
            return None
        self.calls[marker] += 1
        self.authorization[marker] = headers.get(b"authorization", b"").decode() or None
        return self.rules[marker](self.calls[marker])


async def _send_json(send: Callable, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _serve(app: Any) -> Iterator[str]:
    """uvicorn on a socket bound to a free port before it starts, so there is no race for the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=SLOW_S + 10)
        sock.close()


def _variant(tiny: Path, target: Path) -> Path:
    """The tiny model's layout and tokenizer with other random weights: a second "adapter" that writes other text."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny))
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def cache_dir(model_cache: Path) -> Path:
    return model_cache


@pytest.fixture(scope="module")
def variant_path(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _variant(resolve_model(TINY_SMOLLM2, cache_dir), tmp_path_factory.mktemp("variant"))


@pytest.fixture(scope="module")
def served(cache_dir: Path, variant_path: Path) -> dict[str, Backend]:
    """One base model under two role names, and another model under a third: adapter routing has something to pick."""
    served_models = {"planner": TINY_SMOLLM2, "summarizer": TINY_SMOLLM2, "caller": str(variant_path)}
    return load_models(served_models, cache_dir=cache_dir, device="cpu")


@pytest.fixture(scope="module")
def tiny(cache_dir: Path) -> LocalBackend:
    """The reference: the same model generating in this process, with no server in between."""
    return LocalBackend(TINY_SMOLLM2, cache_dir=cache_dir, device="cpu")


@pytest.fixture(scope="module")
def variant(variant_path: Path, cache_dir: Path) -> LocalBackend:
    return LocalBackend(str(variant_path), cache_dir=cache_dir, device="cpu")


@pytest.fixture(scope="module")
def faults(served: dict[str, Backend]) -> Faults:
    return Faults(create_app(served))


@pytest.fixture(scope="module")
def url(faults: Faults) -> Iterator[str]:
    yield from _serve(faults)


@pytest.fixture(scope="module")
def locked_url(served: dict[str, Backend]) -> Iterator[str]:
    """The same models behind a server that wants a bearer token, wrapped so each request's header is on record."""
    yield from _serve(Faults(create_app(served, api_key=SECRET)))


@pytest.fixture(autouse=True)
def no_faults(faults: Faults) -> Iterator[None]:
    faults.reset()
    yield
    faults.reset()


@pytest.fixture
def remote() -> Iterator[Remote]:
    """Backends with test-sized retries and backoff; their request threads are shut down after the test."""
    made: list[RemoteBackend] = []

    def make(url: str, **options: Any) -> RemoteBackend:
        defaults: dict[str, Any] = {"model": "planner", "timeout_s": 30.0, "max_retries": 2, "backoff_s": 0.01}
        made.append(RemoteBackend(url, **{**defaults, **options}))
        return made[-1]

    yield make
    for backend in made:
        backend.close()


def alone(backend: Backend, request: GenerationRequest) -> GenerationResult:
    [result] = backend.generate([request])
    return result


def stops_from(backend: Backend, prompts: list[Any]) -> list[list[str]]:
    """A stop string from the middle of what each prompt generates freely, so each request really stops early."""
    free = backend.generate([GenerationRequest(p, max_new_tokens=20) for p in prompts])
    return [[r.text[8:12]] for r in free]


def test_text_and_chat_prompts_get_what_local_backend_gives(url: str, tiny: LocalBackend, remote: Remote) -> None:
    requests = [GenerationRequest("Hello", max_new_tokens=12), GenerationRequest(CHAT, max_new_tokens=16)]
    expected = tiny.generate(requests)
    assert all(r.error is None and r.text and r.tokens_in > 0 for r in expected)
    assert remote(url).generate(requests) == expected
    tgi = remote(url, api="tgi").generate(requests)
    assert tgi[1] == expected[1]
    # TGI's /generate reports prompt tokens only with prefill details, which this backend does not ask for.
    assert (tgi[0].text, tgi[0].tokens_out, tgi[0].tokens_in) == (expected[0].text, expected[0].tokens_out, 0)


@pytest.mark.parametrize("api", ["openai", "tgi"])
def test_stop_strings_are_cut_and_kept_like_local_backend(
    url: str, tiny: LocalBackend, api: str, remote: Remote
) -> None:
    prompts: list[Any] = ["Hello", CHAT]
    requests = [GenerationRequest(p, max_new_tokens=20, stop=s) for p, s in zip(prompts, stops_from(tiny, prompts))]
    expected = tiny.generate(requests)
    got = remote(url, api=api).generate(requests)
    assert [r.text for r in got] == [r.text for r in expected]
    assert [r.tokens_out for r in got] == [r.tokens_out for r in expected]
    for result, request in zip(got, requests):
        assert result.text.endswith(request.stop[0]) and result.tokens_out < 20


def test_stops_beyond_tgis_limit_are_cut_by_the_client(url: str, tiny: LocalBackend, remote: Remote) -> None:
    """TGI takes at most four stop strings; a later one that matches still ends the text where LocalBackend ends it."""
    [[stop]] = stops_from(tiny, ["Hello"])
    request = GenerationRequest("Hello", max_new_tokens=20, stop=[*(f"no such {i}" for i in range(4)), stop])
    [result] = remote(url, api="tgi").generate([request])
    assert result.text == alone(tiny, request).text and result.text.endswith(stop)


def test_each_request_gets_its_own_token_limit(url: str, remote: Remote) -> None:
    limits = [1, 7, 3, 11]
    prompts: list[Any] = ["Hello", CHAT, "The weather in Paris is", CHAT]
    results = remote(url).generate([GenerationRequest(p, max_new_tokens=n) for p, n in zip(prompts, limits)])
    assert [r.tokens_out for r in results] == limits


def test_a_mixed_batch_comes_back_in_request_order(url: str, tiny: LocalBackend, remote: Remote) -> None:
    prompts: list[Any] = ["Hello", CHAT, "x", "The weather in Paris is " * 6, CHAT, "Once upon a time"]
    stops = stops_from(tiny, prompts)
    requests = [
        GenerationRequest(p, max_new_tokens=4 + 3 * i, stop=stops[i] if i % 2 else ()) for i, p in enumerate(prompts)
    ]
    backend = remote(url, concurrency=3)
    assert backend.generate(requests) == [alone(tiny, r) for r in requests]


def test_requests_of_a_batch_are_in_flight_together(url: str, faults: Faults, remote: Remote) -> None:
    faults.rules["LAGGY"] = lambda n: "slow"
    requests = [GenerationRequest(f"LAGGY {i}", max_new_tokens=2) for i in range(4)]
    started = time.perf_counter()
    results = remote(url, concurrency=4, timeout_s=SLOW_S + 10).generate(requests)
    assert all(r.error is None for r in results)
    assert time.perf_counter() - started < 2 * SLOW_S  # one after another would take 4 x SLOW_S


def test_a_slow_server_times_out_and_each_attempt_is_retried(url: str, faults: Faults, remote: Remote) -> None:
    faults.rules["SLOW-TEXT"] = faults.rules["SLOW-CHAT"] = lambda n: "slow"
    chat = [{"role": "user", "content": "SLOW-CHAT"}]
    started = time.perf_counter()
    results = remote(url, timeout_s=0.25, max_retries=2).generate(
        [GenerationRequest("SLOW-TEXT", max_new_tokens=2), GenerationRequest(chat, max_new_tokens=2)]
    )
    assert time.perf_counter() - started < SLOW_S
    assert all(r.error and r.error.startswith("InferenceTimeoutError") for r in results)
    assert faults.calls == {"SLOW-TEXT": 3, "SLOW-CHAT": 3}


@pytest.mark.parametrize("api", ["openai", "tgi"])
def test_server_errors_are_retried_until_an_answer_comes(
    url: str, faults: Faults, tiny: LocalBackend, api: str, remote: Remote
) -> None:
    faults.rules["FLAKY-TEXT"] = lambda n: "500" if n <= 2 else None
    faults.rules["FLAKY-CHAT"] = lambda n: "500" if n <= 2 else None
    requests = [
        GenerationRequest("FLAKY-TEXT", max_new_tokens=6),
        GenerationRequest([{"role": "user", "content": "FLAKY-CHAT"}], max_new_tokens=6),
    ]
    results = remote(url, api=api, max_retries=2).generate(requests)
    expected = tiny.generate(requests)
    assert [(r.text, r.tokens_out, r.error) for r in results] == [(r.text, r.tokens_out, None) for r in expected]
    assert faults.calls == {"FLAKY-TEXT": 3, "FLAKY-CHAT": 3}


@pytest.mark.parametrize("api", ["openai", "tgi"])
def test_a_dropped_connection_is_retried(
    url: str, faults: Faults, tiny: LocalBackend, api: str, remote: Remote
) -> None:
    faults.rules["CUT-TEXT"] = lambda n: "drop" if n == 1 else None
    faults.rules["CUT-CHAT"] = lambda n: "drop" if n == 1 else None
    requests = [
        GenerationRequest("CUT-TEXT", max_new_tokens=5),
        GenerationRequest([{"role": "user", "content": "CUT-CHAT"}], max_new_tokens=5),
    ]
    results = remote(url, api=api).generate(requests)
    assert [r.text for r in results] == [r.text for r in tiny.generate(requests)]
    assert all(r.error is None for r in results)
    assert faults.calls == {"CUT-TEXT": 2, "CUT-CHAT": 2}


def test_a_failing_request_fails_alone_and_client_errors_are_not_retried(
    url: str, faults: Faults, tiny: LocalBackend, remote: Remote
) -> None:
    faults.rules["DOOMED"] = lambda n: "500"
    faults.rules["TOO-LONG"] = lambda n: None
    requests = [
        GenerationRequest("Hello", max_new_tokens=5),
        GenerationRequest("DOOMED", max_new_tokens=5),
        GenerationRequest(CHAT, max_new_tokens=5),
        GenerationRequest("TOO-LONG", max_new_tokens=1_000_000),
    ]
    results = remote(url, max_retries=2).generate(requests)
    assert [results[0], results[2]] == [alone(tiny, requests[0]), alone(tiny, requests[2])]
    assert "500" in (results[1].error or "") and results[1].text == ""
    assert "400" in (results[3].error or "") and "max_new_tokens" in (results[3].error or "")
    assert faults.calls == {"DOOMED": 3, "TOO-LONG": 1}


def test_an_unreachable_server_is_retried_then_reported(remote: Remote) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    stream = io.StringIO()
    setup_logging(Settings(log_format="json", log_level="INFO"), stream=stream)
    try:
        [result] = remote(f"http://127.0.0.1:{port}", max_retries=2).generate([GenerationRequest("Hello")])
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    assert result.error and result.error.startswith("ConnectError")
    events = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    assert events.count("remote.retry") == 2 and events.count("remote.failed") == 1


def test_the_adapter_name_picks_the_served_model(
    url: str, tiny: LocalBackend, variant: LocalBackend, faults: Faults, remote: Remote
) -> None:
    requests = [GenerationRequest("Hello", max_new_tokens=10), GenerationRequest(CHAT, max_new_tokens=10)]
    base, other = tiny.generate(requests), variant.generate(requests)
    assert [r.text for r in base] != [r.text for r in other]
    for api in ("openai", "tgi"):
        assert remote(url, adapter="caller", api=api).generate(requests)[1] == other[1]
        assert remote(url, adapter="caller", api=api).generate(requests)[0].text == other[0].text
        assert remote(url, adapter="summarizer", api=api).generate(requests)[0].text == base[0].text
    assert remote(url, model="caller").generate(requests) == other
    faults.rules["Hello"] = lambda n: None
    missing = remote(url, adapter="nobody").generate(requests)
    assert all("404" in (r.error or "") and "nobody" in (r.error or "") for r in missing)
    assert faults.calls["Hello"] == 1
    assert remote(url, adapter="caller").model_version == f"remote:{url}:caller"
    assert remote(f"{url}/v1/", model="planner").model_version == f"remote:{url}:planner"


def test_the_api_key_goes_out_as_a_bearer_token_and_never_into_logs(
    locked_url: str, monkeypatch: pytest.MonkeyPatch, remote: Remote
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_machine_token_never_sent")
    stream = io.StringIO()
    setup_logging(Settings(log_format="json", log_level="DEBUG"), stream=stream)
    try:
        requests = [GenerationRequest("Hello", max_new_tokens=3), GenerationRequest(CHAT, max_new_tokens=3)]
        keyed = remote(locked_url, api_key=SECRET).generate(requests)
        keyed_tgi = remote(locked_url, api_key=SECRET, api="tgi").generate(requests)
        anonymous = remote(locked_url).generate(requests)
        failing = remote(locked_url, api_key=SECRET, adapter="nobody").generate(requests)
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    assert all(r.error is None for r in keyed + keyed_tgi)
    assert all("401" in (r.error or "") for r in anonymous)
    assert all("404" in (r.error or "") for r in failing)
    logged = stream.getvalue()
    assert "remote.ready" in logged and "remote.failed" in logged
    assert SECRET not in logged and "hf_machine_token" not in logged
    assert all(SECRET not in (r.error or "") for r in anonymous + failing)


def test_no_authorization_header_is_sent_without_a_key(
    url: str, faults: Faults, monkeypatch: pytest.MonkeyPatch, remote: Remote
) -> None:
    """InferenceClient would send the machine's Hugging Face token to any URL; a keyless backend sends nothing."""
    monkeypatch.setenv("HF_TOKEN", "hf_machine_token_never_sent")
    faults.rules["ANON"] = faults.rules["KEYED"] = lambda n: None
    remote(url).generate([GenerationRequest("ANON", max_new_tokens=2)])
    remote(url, api_key=SECRET).generate([GenerationRequest([{"role": "user", "content": "KEYED"}], max_new_tokens=2)])
    assert faults.authorization == {"ANON": None, "KEYED": f"Bearer {SECRET}"}


def test_settings_select_and_configure_the_remote_backend(
    url: str, tiny: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in {
        "BACKEND": "remote",
        "URL": url,
        "ADAPTER": "summarizer",
        "API_KEY": SECRET,
        "TIMEOUT_S": "5",
        "MAX_RETRIES": "1",
        "CONCURRENCY": "2",
    }.items():
        monkeypatch.setenv(f"UMIQ_CALLER__{key}", value)
    get_settings.cache_clear()
    try:
        settings = get_settings()
        backend = load_backend(settings.caller, settings)
    finally:
        get_settings.cache_clear()
    assert isinstance(backend, RemoteBackend)
    assert backend.model_version == f"remote:{url}:summarizer"
    assert SECRET not in repr(settings) and SECRET not in settings.model_dump_json()
    request = GenerationRequest("Hello", max_new_tokens=4)
    try:
        assert backend.generate([request]) == [alone(tiny, request)]
    finally:
        backend.close()


def test_hugging_face_offline_mode_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub's offline mode blocks every request it makes, even to localhost: say so once, not per step."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
        RemoteBackend("http://127.0.0.1:9", model="planner")
