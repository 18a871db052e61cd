"""Prefix KV caching: the radix tree on its own, then the local backend on the real tiny model, where serving from the
cache must give token for token what the uncached path gives (same batch composition), while prefilling less."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from orchestrator.protocol import (
    Message,
    Prompt,
    Speaker,
    ToolSpec,
    render_caller,
    render_planner,
)
from orchestrator.settings import Settings
from workers.backends.base import GenerationRequest, GenerationResult
from workers.backends.factory import load_backend
from workers.backends.local import LocalBackend
from workers.backends.models import TINY_SMOLLM2
from workers.backends.prefix_cache import PrefixCache
from workers.backends.prompting import encode_prompt

LAYERS, HEADS, DIM = 3, 2, 4


def states(ids: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fake per-layer keys and values of ``ids`` that depend on the token and its position, as real ones do."""
    values = torch.tensor([float(t * 1000 + i) for i, t in enumerate(ids)])
    return [
        (values.view(1, -1, 1).expand(HEADS, -1, DIM) + layer, -values.view(1, -1, 1).expand(HEADS, -1, DIM) - layer)
        for layer in range(LAYERS)
    ]


TOKEN_BYTES = LAYERS * 2 * HEADS * DIM * 4


# ----------------------------------------------------------------------------------------------------- the tree


def test_match_finds_the_longest_cached_prefix_and_its_states() -> None:
    cache = PrefixCache(10**6)
    assert cache.match([1, 2, 3]).length == 0 and cache.match([1, 2, 3]).states() == []
    cache.insert([1, 2, 3, 4, 5], states([1, 2, 3, 4, 5]))
    cache.insert([1, 2, 3, 9], states([1, 2, 3, 9]))  # splits the first prompt's node after [1, 2, 3]
    assert sorted(cache.cached_prefixes()) == [(1, 2, 3, 4, 5), (1, 2, 3, 9)]
    assert len(cache) == 3 and cache.nbytes == 6 * TOKEN_BYTES
    expected = [([1, 2, 3, 4, 5, 6], 5), ([1, 2, 3, 9, 9], 4), ([1, 2, 3, 4], 4), ([1, 2], 2), ([1, 7], 1), ([7], 0)]
    for ids, hit in expected:
        found = cache.match(ids)
        assert found.length == hit
        wanted = states(ids[:hit]) if hit else []
        for (keys, values), (want_keys, want_values) in zip(found.states(), wanted, strict=True):
            assert torch.equal(keys, want_keys) and torch.equal(values, want_values)


def test_inserting_a_cached_prompt_again_adds_nothing() -> None:
    cache = PrefixCache(10**6)
    cache.insert([1, 2, 3], states([1, 2, 3]))
    cache.insert([1, 2, 3], states([1, 2, 3]))
    cache.insert([1, 2], states([1, 2]))
    assert cache.cached_prefixes() == [(1, 2, 3)] and cache.nbytes == 3 * TOKEN_BYTES


def test_least_recently_used_leaves_go_first_and_the_bound_holds() -> None:
    cache = PrefixCache(10 * TOKEN_BYTES)
    shared = [1, 2, 3, 4]
    cache.insert([*shared, 10, 11], states([*shared, 10, 11]))
    cache.insert([*shared, 20, 21], states([*shared, 20, 21]))
    assert cache.nbytes == 8 * TOKEN_BYTES
    cache.match([*shared, 10, 11, 12])  # the first history is used again: the second is now the oldest
    cache.insert([*shared, 30, 31, 32], states([*shared, 30, 31, 32]))
    assert sorted(cache.cached_prefixes()) == [(*shared, 10, 11), (*shared, 30, 31, 32)]
    assert cache.nbytes == 9 * TOKEN_BYTES and cache.stats.evicted_nodes == 1
    # The shared node is touched by every hit under it, so it outlives the leaves; a fully evicted branch goes whole.
    cache.insert([5, 6, 7, 8, 9, 10, 11, 12], states([5, 6, 7, 8, 9, 10, 11, 12]))
    assert cache.cached_prefixes() == [(5, 6, 7, 8, 9, 10, 11, 12)] and cache.nbytes == 8 * TOKEN_BYTES
    assert cache.match([1, 2, 3]).length == 0


def test_a_prompt_larger_than_the_bound_is_not_cached() -> None:
    cache = PrefixCache(4 * TOKEN_BYTES)
    cache.insert([1, 2, 3], states([1, 2, 3]))
    cache.insert([7, 8, 9, 10, 11], states([7, 8, 9, 10, 11]))
    assert cache.cached_prefixes() == [(1, 2, 3)]


# -------------------------------------------------------------------------------------------- on the tiny model

TOOLSETS = {
    "files": [
        ToolSpec(
            f"{verb}_file",
            f"{verb.capitalize()} a file of the working directory; paths are relative, names are case sensitive.",
            {
                "type": "object",
                "properties": {"name": {"type": "string", "description": "the file's name"}},
                "required": ["name"],
            },
        )
        for verb in ("open", "read", "write", "delete", "copy", "move", "touch", "stat")
    ],
    "math": [
        ToolSpec(
            op,
            f"Return the {op} of two numbers.",
            {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}},
        )
        for op in ("sum", "difference", "product", "quotient", "power", "modulo")
    ],
}
STEPS = [
    Message(Speaker.USER, "Copy report.txt to backup.txt, then tell me how large it is."),
    Message(Speaker.PLANNER, "I should copy the file first. Next: caller."),
    Message(Speaker.CALLER, 'Action: copy_file\nAction Input: {"name": "report.txt"}'),
    Message(Speaker.OBSERVATION, '{"copied": "backup.txt"}'),
    Message(Speaker.PLANNER, "Now its size. Next: caller."),
    Message(Speaker.CALLER, 'Action: stat_file\nAction Input: {"name": "backup.txt"}'),
    Message(Speaker.OBSERVATION, '{"size": 2048}'),
]


def planner_prompts(toolset: str, question: str, *, compat: bool = False) -> list[Prompt]:
    """The planner prompts of one trajectory, step by step: each repeats the previous one up to its history's end."""
    history = [Message(Speaker.USER, question), *STEPS[1:]]
    return [render_planner(TOOLSETS[toolset], history[:end], compat=compat) for end in (1, 4, 7)]


@pytest.fixture(scope="module")
def plain(model_cache: Path) -> LocalBackend:
    """The uncached path: every batch prefilled in one padded call."""
    backend = LocalBackend(TINY_SMOLLM2, cache_dir=model_cache, device="cpu", prefix_cache_mb=0)
    assert backend.prefix_cache is None
    return backend


@pytest.fixture
def cached(model_cache: Path) -> LocalBackend:
    """A fresh cache for every test."""
    backend = LocalBackend(TINY_SMOLLM2, cache_dir=model_cache, device="cpu")
    assert backend.prefix_cache is not None and len(backend.prefix_cache) == 0
    return backend


def alone(backend: LocalBackend, request: GenerationRequest) -> GenerationResult:
    [result] = backend.generate([request])
    return result


def computed(backend: LocalBackend) -> int:
    assert backend.prefix_cache is not None
    return backend.prefix_cache.stats.missed_tokens


def test_trajectory_steps_one_at_a_time_match_the_uncached_path(cached: LocalBackend, plain: LocalBackend) -> None:
    prompts = [
        *planner_prompts("files", "Copy report.txt to backup.txt, then tell me how large it is."),
        *planner_prompts("files", "Delete every file called tmp."),
        *planner_prompts("files", "Move a.txt to b.txt.", compat=True),
        render_caller(TOOLSETS["files"], STEPS[:2], "I should copy the file first."),
    ]
    fresh = []
    for prompt in prompts:
        request = GenerationRequest(prompt, max_new_tokens=12)
        before = computed(cached)
        result = alone(cached, request)
        fresh.append((computed(cached) - before) / len(encode_prompt(cached._tokenizer, prompt)))
        assert result == alone(plain, request)
        assert result.error is None and result.tokens_out == 12
    # Cold: the first prompt of each layout (chat planner, compat planner, chat caller) is prefilled whole. Warm: the
    # second trajectory prefills only its question and history, later steps only what their step added.
    cold = [0, 6, 9]
    assert all(fresh[i] > 0.95 for i in cold), fresh
    assert all(share < 0.25 for i, share in enumerate(fresh) if i not in cold), fresh


def test_a_batch_with_mixed_suffixes_stops_and_limits_matches_the_uncached_path(
    cached: LocalBackend, plain: LocalBackend
) -> None:
    prompts: list[Prompt] = [
        *planner_prompts("files", "Copy report.txt to backup.txt, then tell me how large it is."),
        *planner_prompts("math", "What is 2 to the power 10, minus 24?")[:2],
        "The weather in Paris is " * 12,
        "x",
    ]
    free = plain.generate([GenerationRequest(p, max_new_tokens=16) for p in prompts])
    stops = [[r.text[6:10]] if i % 2 else ["no such stop"] for i, r in enumerate(free)]
    limits = [16, 9, 1, 14, 5, 16, 3]
    requests = [GenerationRequest(p, max_new_tokens=n, stop=s) for p, n, s in zip(prompts, limits, stops, strict=True)]

    first = cached.generate(requests)  # an empty cache: both tool sets' documentation is prefilled once, in the batch
    assert first == plain.generate(requests)
    before = computed(cached)
    again = cached.generate(requests)  # all cached now: nothing but each row's last token is run
    assert again == first and computed(cached) == before
    assert first == [alone(plain, r) for r in requests]
    assert [r.tokens_out <= n for r, n in zip(first, limits)] == [True] * len(limits)
    assert any(r.text.endswith(stop[0]) for r, stop in zip(first[1::2], stops[1::2]))


def test_a_prompt_equal_to_or_shorter_than_a_cached_one(cached: LocalBackend, plain: LocalBackend) -> None:
    words = " ".join(f"item{i}" for i in range(300))
    long, short = f"Inventory: {words}. Count them.", f"Inventory: {words[: len(words) // 2]}"
    tokenizer = cached._tokenizer
    long_ids, short_ids = tokenizer(long)["input_ids"], tokenizer(short)["input_ids"]
    assert long_ids[: len(short_ids)] == short_ids, "the test needs the short prompt's tokens to start the long one's"

    first = alone(cached, GenerationRequest(long, max_new_tokens=10))
    misses = computed(cached)
    assert misses == len(long_ids) - 1  # every token but the last, which generate() runs
    for prompt in (long, short):  # the same prompt again; one that ends inside the cached one
        request = GenerationRequest(prompt, max_new_tokens=10)
        assert alone(cached, request) == alone(plain, request)
        assert computed(cached) == misses, "served entirely from the cache"
    assert alone(cached, GenerationRequest(long, max_new_tokens=10)) == first


def test_eviction_keeps_the_bound_and_the_results(model_cache: Path, plain: LocalBackend) -> None:
    prompts = [
        *planner_prompts("files", "Copy report.txt to backup.txt, then tell me how large it is."),
        *planner_prompts("math", "What is 2 to the power 10, minus 24?"),
        *planner_prompts("files", "Delete every file called tmp."),
    ]
    tokens = len(encode_prompt(plain._tokenizer, prompts[-1]))
    token_bytes = 2 * 2 * 2 * 16 * 4  # the tiny model: 2 layers, keys and values, 2 KV heads of 16 floats
    budget_mb = 1.5 * tokens * token_bytes / 2**20  # about one and a half prompts
    small = LocalBackend(TINY_SMOLLM2, cache_dir=model_cache, device="cpu", prefix_cache_mb=budget_mb)
    assert small.prefix_cache is not None
    requests = [GenerationRequest(p, max_new_tokens=8) for p in prompts]
    for _round in range(2):
        for request in requests:
            assert alone(small, request) == alone(plain, request)
            assert small.prefix_cache.nbytes <= small.prefix_cache.max_bytes
        assert small.generate(requests[::2]) == plain.generate(requests[::2])
    assert small.prefix_cache.stats.evicted_nodes > 0
    assert small.prefix_cache.stats.hit_tokens > 0


def test_sampled_requests_share_the_cache(cached: LocalBackend) -> None:
    prompts = planner_prompts("math", "What is 3 times 7?")
    results = cached.generate([GenerationRequest(p, max_new_tokens=6, temperature=0.8) for p in prompts])
    assert all(r.error is None and 1 <= r.tokens_out <= 6 for r in results)
    assert cached.prefix_cache.stats.hit_tokens > 0  # type: ignore[union-attr]


def test_the_setting_turns_it_off(monkeypatch: pytest.MonkeyPatch, model_cache: Path) -> None:
    monkeypatch.setenv("UMIQ_MODEL_CACHE", str(model_cache))
    monkeypatch.setenv("UMIQ_PLANNER__MODEL", TINY_SMOLLM2)
    monkeypatch.setenv("UMIQ_PLANNER__DEVICE", "cpu")
    monkeypatch.setenv("UMIQ_PLANNER__PREFIX_CACHE_MB", "0")
    settings = Settings()
    assert settings.planner.prefix_cache_mb == 0 and settings.caller.prefix_cache_mb == 256
    backend = load_backend(settings.planner, settings)
    assert isinstance(backend, LocalBackend) and backend.prefix_cache is None
    monkeypatch.setenv("UMIQ_PLANNER__PREFIX_CACHE_MB", "64")
    settings = Settings()
    backend = load_backend(settings.planner, settings)
    assert isinstance(backend, LocalBackend) and backend.prefix_cache is not None
    assert backend.prefix_cache.max_bytes == 64 * 2**20
