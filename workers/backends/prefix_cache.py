"""Prefix KV caching for the local backend: prompts that start alike are prefilled once up to where they part.

On a CPU a role step is almost all prefill (prompts of thousands of tokens, outputs under a hundred), and a role's
prompts share long prefixes: every planner prompt of a tool set starts with the same system text and tool
documentation, and a trajectory's next prompt repeats its previous one up to the end of the history. The
:class:`PrefixCache` keeps the key/value states of prompts already prefilled in a radix tree keyed by token ids (as
SGLang's RadixAttention does), so a new prompt is prefilled only from the first token where it leaves every cached
prompt. No protocol knowledge is needed: the tree splits where prompts diverge, so the shared system and tool-doc
part becomes one node that every trajectory's history hangs under, stored once.

Keys and values of a token depend only on the tokens before it (causal attention; positions start at 0 with the
prompt), so the states of any prefix of a cached prompt are a slice of its states: a prompt shorter than a cached
one, or one that parts from it half way, uses what it shares. The tree is bounded in bytes; when an insertion
passes the bound, the least recently used leaves go first (a node used by a hit is touched with its whole path, so
the shared tool-doc nodes outlive the histories under them).

A node holds, per layer, the keys and values of its tokens (``[kv_heads, tokens, head_dim]`` each), on the model's
device and in its dtype. Stored tensors are never written into: splits and evictions replace or drop them. That
lets :meth:`PrefixCache.insert` keep a prompt's own tensors, without a copy, when all of them are new. Thread-safe:
one lock guards the tree.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

__all__ = ["LayerStates", "Match", "PrefixCache", "PrefixStats"]

LayerStates = Sequence[tuple[torch.Tensor, torch.Tensor]]
"""Per layer, the keys and values of one sequence, each ``[kv_heads, tokens, head_dim]``."""


@dataclass
class PrefixStats:
    """What the cache saved: prompt tokens found in it against tokens that had to be prefilled, and evictions."""

    hit_tokens: int = 0
    missed_tokens: int = 0
    lookups: int = 0
    evicted_nodes: int = 0


@dataclass(frozen=True)
class Match:
    """A cached prefix: its length in tokens and its states, as the tree's pieces along the path (no copy).

    Read-only: the pieces are the tree's own tensors or views of them. They stay valid after the lock is released,
    since the tree replaces tensors and never writes into them.
    """

    length: int
    pieces: list[LayerStates]

    def layers(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the prefix's keys and values as a batch of one, ``[1, kv_heads, tokens, head_dim]``, joined only
        when asked for: a consumer that copies them layer by layer holds one layer extra at most."""
        for layer in range(len(self.pieces[0]) if self.pieces else 0):
            yield tuple(  # type: ignore[misc]
                _join([piece[layer][kind] for piece in self.pieces]).unsqueeze(0) for kind in (0, 1)
            )

    def write_into(self, layers: LayerStates) -> None:
        """Copy the prefix's states into the first ``length`` tokens of ``layers`` (per layer, keys and values
        ``[kv_heads, tokens, head_dim]`` at least ``length`` long): no intermediate copy."""
        for layer, (keys, values) in enumerate(layers):
            start = 0
            for piece in self.pieces:
                piece_keys, piece_values = piece[layer]
                end = start + piece_keys.shape[1]
                keys[:, start:end] = piece_keys
                values[:, start:end] = piece_values
                start = end

    def states(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the prefix's keys and values ``[kv_heads, tokens, head_dim]`` (tests, debugging)."""
        return [(keys[0], values[0]) for keys, values in self.layers()]


class _Node:
    """An edge of the radix tree: the tokens it adds to its parent's prefix and their states."""

    __slots__ = ("children", "parent", "states", "tokens", "used")

    def __init__(self, tokens: tuple[int, ...], states: LayerStates, parent: _Node | None) -> None:
        self.tokens = tokens
        self.states = states
        self.children: dict[int, _Node] = {}
        self.parent = parent
        self.used = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.states for t in pair)


class PrefixCache:
    """A radix tree of prompt token ids and their key/value states, bounded to ``max_bytes`` of states."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self.stats = PrefixStats()
        self._root = _Node((), [], None)
        self._nodes: set[_Node] = set()
        self._bytes = 0
        self._clock = itertools.count(1)
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes of states held now."""
        return self._bytes

    def __len__(self) -> int:
        """Nodes in the tree: one per stretch of tokens that cached prompts share, plus one per prompt's own end."""
        return len(self._nodes)

    def cached_prefixes(self) -> list[tuple[int, ...]]:
        """The token ids of every cached leaf's whole prefix (tests, debugging)."""
        with self._lock:
            return [self._prefix_of(node) for node in self._nodes if not node.children]

    def match(self, ids: Sequence[int]) -> Match:
        """The longest cached prefix of ``ids``, its nodes touched as just used."""
        with self._lock:
            pieces: list[LayerStates] = []
            pos = 0
            for child, start, shared in self._walk(ids, next(self._clock)):
                whole = shared == len(child.tokens)
                pieces.append(child.states if whole else [(k[:, :shared], v[:, :shared]) for k, v in child.states])
                pos = start + shared
            self.stats.lookups += 1
            self.stats.hit_tokens += pos
            self.stats.missed_tokens += len(ids) - pos
            return Match(pos, pieces)

    def insert(self, ids: Sequence[int], layers: LayerStates) -> None:
        """Cache ``ids`` with their states (``layers``: per layer, keys and values of all of ``ids``).

        Only the part the tree lacks is stored: copied out of ``layers``, or when all of ``ids`` is new and each
        tensor of ``layers`` is the whole of its memory, those tensors themselves, which the caller must then never
        write into. A node the new prompt leaves half way is
        split there. A part larger than the whole bound is not cached. Then least recently used leaves go until the
        bound holds.
        """
        with self._lock:
            tick = next(self._clock)
            node, pos = self._root, 0
            for child, start, shared in self._walk(ids, tick):
                node = child if shared == len(child.tokens) else self._split(child, shared)
                pos = start + shared
            if pos == len(ids):
                return
            keys = layers[0][0]
            new_bytes = len(layers) * 2 * keys.shape[0] * (len(ids) - pos) * keys.shape[2] * keys.element_size()
            if new_bytes > self.max_bytes:
                return
            owned = pos == 0 and all(_owns_storage(tensor) for pair in layers for tensor in pair)
            kept = list(layers) if owned else _cut(layers, pos, len(ids))
            leaf = _Node(tuple(ids[pos:]), kept, node)
            leaf.used = tick
            node.children[leaf.tokens[0]] = leaf
            self._nodes.add(leaf)
            self._bytes += leaf.nbytes
            self._evict(keep=leaf)

    def clear(self) -> None:
        with self._lock:
            self._root.children.clear()
            self._nodes.clear()
            self._bytes = 0

    def _walk(self, ids: Sequence[int], tick: int) -> Iterator[tuple[_Node, int, int]]:
        """The nodes on ``ids``'s path from the root, each with where its tokens start in ``ids`` and how many of
        them ``ids`` shares, touched as used at ``tick``; the walk ends after a node ``ids`` leaves half way (which
        the caller may split: the decision is taken before it yields)."""
        node, pos = self._root, 0
        while pos < len(ids):
            child = node.children.get(ids[pos])
            if child is None:
                return
            shared = _shared_length(child.tokens, ids, pos)
            partial = shared < len(child.tokens)
            child.used = tick
            yield child, pos, shared
            if partial:
                return
            node, pos = child, pos + shared

    def _split(self, node: _Node, at: int) -> _Node:
        """Cut ``node`` after ``at`` tokens; returns the new upper part, which keeps ``node`` as its only child."""
        assert node.parent is not None and 0 < at < len(node.tokens)
        upper = _Node(node.tokens[:at], _cut(node.states, 0, at), node.parent)
        upper.used = node.used
        node.parent.children[upper.tokens[0]] = upper
        node.tokens, node.states = node.tokens[at:], _cut(node.states, at, None)
        node.parent = upper
        upper.children[node.tokens[0]] = node
        self._nodes.add(upper)
        return upper

    def _evict(self, keep: _Node) -> None:
        """Drop least recently used leaves until the bound holds; ``keep`` (just inserted) goes last."""
        while self._bytes > self.max_bytes:
            leaves = [n for n in self._nodes if not n.children]
            leaves = [n for n in leaves if n is not keep] or leaves
            victim = min(leaves, key=lambda n: n.used)
            assert victim.parent is not None
            del victim.parent.children[victim.tokens[0]]
            self._nodes.discard(victim)
            self._bytes -= victim.nbytes
            self.stats.evicted_nodes += 1

    def _prefix_of(self, node: _Node) -> tuple[int, ...]:
        parts: list[tuple[int, ...]] = []
        while node.parent is not None:
            parts.append(node.tokens)
            node = node.parent
        return tuple(token for part in reversed(parts) for token in part)


def _cut(states: LayerStates, start: int, end: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Tokens ``start:end`` of every layer, copied: a view would keep the whole tensor's memory alive."""
    return [(keys[:, start:end].clone(), values[:, start:end].clone()) for keys, values in states]


def _owns_storage(tensor: torch.Tensor) -> bool:
    """True when the tensor is all of its memory: keeping it keeps nothing else alive (a slice of a batch would)."""
    return tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


def _join(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _shared_length(tokens: tuple[int, ...], ids: Sequence[int], start: int) -> int:
    """How many of ``tokens`` equal ``ids[start:]`` from their start on."""
    end = min(len(tokens), len(ids) - start)
    if tuple(ids[start : start + end]) == tokens[:end]:
        return end
    # Binary search on equal slices: C-speed tuple comparisons instead of a Python loop over thousands of tokens.
    low, high = 0, end
    while low < high:
        mid = (low + high + 1) // 2
        if tuple(ids[start : start + mid]) == tokens[:mid]:
            low = mid
        else:
            high = mid - 1
    return low
