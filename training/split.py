"""The fixed train / dev / test split of BFCL's multi-turn tasks, so nothing held out is ever trained on (DESIGN §5).

The unit of the split is the *scenario*: the number at the end of a BFCL multi-turn id. The four categories are
variants of the same 200 scenarios: ``multi_turn_base_12``, ``multi_turn_miss_func_12``,
``multi_turn_miss_param_12`` and ``multi_turn_long_context_12`` have the same tool classes (200 of 200 in each
category), the same initial configuration (193 / 191 / 194 of 200 for miss_func / miss_param / long_context; the
rest differ in a few values) and mostly the same first request (189 / 117 / 195; miss_param drops a detail from a
request). Splitting by id alone would put one scenario's variants on both sides, so all four land together.

Scenarios are ranked by ``sha256(f"{SEED}:{number}")`` (stable across Python versions, unlike ``random``) and the
first 70 % go to train, the next 15 % to dev, the rest to test: 140 / 30 / 30 scenarios, 560 / 120 / 120 ids. The
committed files ``training/splits/{train,dev,test}.txt`` (one id a line) are the split; :func:`compute_splits`
only regenerates them (``python -m training.split``), and a test checks the two agree.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from functools import cache
from pathlib import Path

from workers.tools import bfcl

__all__ = [
    "SPLITS",
    "SEED",
    "FRACTIONS",
    "SPLIT_DIR",
    "HeldOutError",
    "scenario",
    "compute_splits",
    "write_splits",
    "load_split",
    "is_trainable",
    "assert_trainable",
]

SPLITS = ("train", "dev", "test")
SEED = "umiq-bfcl-multi-turn-split-v1"
FRACTIONS = {"train": 0.70, "dev": 0.15, "test": 0.15}
SPLIT_DIR = Path(__file__).parent / "splits"

_SCENARIO = re.compile(r"^multi_turn_[a-z_]+_(\d+)$")


class HeldOutError(ValueError):
    """Training was asked to use tasks of the dev or test split."""


def scenario(task_id: str) -> int | None:
    """The scenario number of a BFCL multi-turn id (any category, future ones included); None for other ids."""
    match = _SCENARIO.match(task_id)
    return int(match.group(1)) if match else None


def _rank(number: int, seed: str) -> str:
    return hashlib.sha256(f"{seed}:{number}".encode()).hexdigest()


def _order(task_id: str) -> tuple[str, int]:
    return task_id.rsplit("_", 1)[0], scenario(task_id) or 0


def compute_splits(seed: str = SEED) -> dict[str, list[str]]:
    """The split recomputed from BFCL's data: every multi-turn id, by scenario, 70 / 15 / 15."""
    ids = [entry["id"] for category in bfcl.MULTI_TURN_CATEGORIES for entry in bfcl.load_entries(category)]
    numbers = sorted({scenario(i) for i in ids if scenario(i) is not None}, key=lambda n: _rank(n, seed))
    n_train = round(FRACTIONS["train"] * len(numbers))
    n_dev = round(FRACTIONS["dev"] * len(numbers))
    parts = {"train": numbers[:n_train], "dev": numbers[n_train : n_train + n_dev], "test": numbers[n_train + n_dev :]}
    split_of = {number: name for name, part in parts.items() for number in part}
    return {name: sorted((i for i in ids if split_of.get(scenario(i)) == name), key=_order) for name in SPLITS}


def write_splits(directory: Path = SPLIT_DIR, seed: str = SEED) -> None:
    """Write the split files; run once when the split is defined, then commit them and never regenerate silently."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, ids in compute_splits(seed).items():
        (directory / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")


@cache
def _committed(name: str) -> frozenset[str]:
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
    lines = (SPLIT_DIR / f"{name}.txt").read_text(encoding="utf-8").splitlines()
    return frozenset(line.strip() for line in lines if line.strip())


def load_split(name: str) -> set[str]:
    """The task ids of one committed split (``train``, ``dev`` or ``test``)."""
    return set(_committed(name))


@cache
def _held_out() -> tuple[frozenset[str], frozenset[int]]:
    """The dev and test ids, and their scenario numbers."""
    ids = _committed("dev") | _committed("test")
    return ids, frozenset(n for i in ids if (n := scenario(i)) is not None)


def is_trainable(task_id: str | None) -> bool:
    """False for an id of dev or test, or one sharing a scenario with them (a BFCL category added later included).

    Ids that are not BFCL multi-turn ids (live tasks without a BFCL entry, the reference sample's ``None``) are
    trainable. Live traffic holds evaluation runs on held-out tasks: filter it with this before training.
    """
    if task_id is None:
        return True
    ids, scenarios = _held_out()
    return task_id not in ids and scenario(task_id) not in scenarios


def assert_trainable(ids: Iterable[str | None]) -> None:
    """Raise :class:`HeldOutError` if any id is not :func:`is_trainable`: the trainer's last check on its data."""
    bad = sorted({i for i in ids if i is not None and not is_trainable(i)})
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise HeldOutError(f"{len(bad)} held-out (dev/test) task ids in training data: {shown}")


if __name__ == "__main__":
    write_splits()
