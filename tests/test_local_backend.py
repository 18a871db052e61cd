"""The local backend on real models: batching must never change what a request gets, and failures stay per request."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from workers.backends.base import GenerationRequest, GenerationResult
from workers.backends.local import LocalBackend
from workers.backends.models import SMOLLM2, TINY_SMOLLM2, VERSION_FILE, _cached, model_version, resolve_model

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
PROMPTS = ["Hello", "The weather in Paris is " * 12, CHAT, "x"]


@pytest.fixture(scope="module")
def tiny(model_cache: Path) -> LocalBackend:
    return LocalBackend(TINY_SMOLLM2, cache_dir=model_cache, device="cpu")


def alone(backend: LocalBackend, request: GenerationRequest) -> GenerationResult:
    [result] = backend.generate([request])
    return result


def test_batch_returns_what_each_request_gets_alone(tiny: LocalBackend) -> None:
    requests = [GenerationRequest(p, max_new_tokens=n) for p, n in zip(PROMPTS, [12, 20, 16, 5])]
    batch = tiny.generate(requests)
    assert batch == [alone(tiny, r) for r in requests]
    assert all(r.error is None and r.text for r in batch)


def test_each_request_is_cut_at_its_own_stop_string(tiny: LocalBackend) -> None:
    free = [alone(tiny, GenerationRequest(p, max_new_tokens=20)) for p in PROMPTS[:3]]
    stops = [[text[8:12]] for text in (r.text for r in free[:2])] + [["no such stop"]]
    requests = [GenerationRequest(p, max_new_tokens=20, stop=s) for p, s in zip(PROMPTS[:3], stops)]
    batch = tiny.generate(requests)
    assert batch == [alone(tiny, r) for r in requests]
    for result, full, [stop] in zip(batch[:2], free[:2], stops[:2]):
        assert result.text == full.text[: full.text.index(stop) + len(stop)]
        assert result.text.endswith(stop) and result.tokens_out < 20
    assert batch[2] == free[2]


def test_each_request_gets_its_own_token_limit(tiny: LocalBackend) -> None:
    limits = [3, 9, 1, 14]
    results = tiny.generate([GenerationRequest(p, max_new_tokens=n) for p, n in zip(PROMPTS, limits)])
    assert [r.tokens_out for r in results] == limits


def test_token_counts_match_the_tokenizer(tiny: LocalBackend, model_cache: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(TINY_SMOLLM2, model_cache))
    chat_text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    requests = [GenerationRequest("Hello", max_new_tokens=4), GenerationRequest(CHAT, max_new_tokens=4)]
    text, chat = tiny.generate(requests)
    assert text.tokens_in == 1, "SmolLM2's tokenizer adds no BOS to plain text"
    assert chat.tokens_in == len(tokenizer(chat_text, add_special_tokens=False)["input_ids"])
    assert chat_text.endswith("<|im_start|>assistant\n")
    assert (text.tokens_out, chat.tokens_out) == (4, 4)


def test_overlong_prompt_keeps_its_end(tiny: LocalBackend) -> None:
    room = 8
    reference = alone(tiny, GenerationRequest(" hello" * room, max_new_tokens=6))
    context = 8192
    request = GenerationRequest(" hello" * 50, max_new_tokens=context - room, stop=[reference.text])
    result = alone(tiny, request)
    assert (result.text, result.tokens_in, result.tokens_out) == (reference.text, room, 6)


def test_failing_requests_fail_alone(tiny: LocalBackend) -> None:
    """A malformed chat prompt and an impossible limit fail before batching; a bad stop fails inside generate()."""
    good = [GenerationRequest(p, max_new_tokens=6, stop=["zz"]) for p in PROMPTS[:2]]
    no_content = GenerationRequest([{"role": "user"}], max_new_tokens=6)
    # A non-string stop raises in the stopping criteria mid-batch, which is what sends the batch to the fallback.
    bad_stop = GenerationRequest("Hello", max_new_tokens=6, stop=[3])  # type: ignore[list-item]
    no_room = GenerationRequest("Hello", max_new_tokens=9000)
    results = tiny.generate([good[0], no_content, bad_stop, good[1], no_room])
    assert [results[0], results[3]] == [alone(tiny, r) for r in good]
    assert results[1].error is not None and results[1].error.startswith("UndefinedError:")
    assert results[2].error is not None and results[2].error.startswith("TypeError:") and results[2].tokens_in == 1
    assert results[4].error is not None and results[4].error.startswith("ValueError:")
    assert all(r.text == "" and r.tokens_out == 0 for r in (results[1], results[2], results[4]))


def test_sampled_and_greedy_requests_share_a_call(tiny: LocalBackend) -> None:
    greedy = GenerationRequest("Hello", max_new_tokens=8)
    sampled = GenerationRequest("Hello", max_new_tokens=8, temperature=0.9)
    results = tiny.generate([sampled, greedy, sampled])
    assert results[1] == alone(tiny, greedy)
    assert all(r.error is None and r.tokens_in == 1 and 1 <= r.tokens_out <= 8 for r in results)


def test_conversion_is_cached(tiny: LocalBackend, model_cache: Path) -> None:
    started = time.perf_counter()
    path = resolve_model(TINY_SMOLLM2, model_cache)
    assert time.perf_counter() - started < 0.5
    assert LocalBackend(str(path), cache_dir=model_cache).model_version == tiny.model_version == model_version(path)


def test_concurrent_builds_build_once(tmp_path: Path) -> None:
    (tmp_path / ".demo.crashed").mkdir()
    builds: list[int] = []

    def build(target: Path) -> None:
        builds.append(1)
        time.sleep(0.2)
        (target / "config.json").write_text("{}")

    paths: list[Path] = []
    threads = [threading.Thread(target=lambda: paths.append(_cached(tmp_path, "demo", build))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert builds == [1] and paths == [tmp_path / "demo"] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [".demo.lock", "demo"]


def test_version_file_wins(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    hashed = model_version(tmp_path)
    assert hashed.startswith(f"{tmp_path.name}-")
    (tmp_path / VERSION_FILE).write_text("planner-v3\n")
    assert model_version(tmp_path) == "planner-v3"


def test_smollm2_answers_a_chat_prompt(model_cache: Path) -> None:
    backend = LocalBackend(SMOLLM2, cache_dir=model_cache, device="cpu")
    question = [{"role": "user", "content": "What is the capital of France?"}]
    [result] = backend.generate([GenerationRequest(question, max_new_tokens=16)])
    assert result.error is None and result.text.strip()
    assert "Paris" in result.text
    assert 0 < result.tokens_out <= 16
