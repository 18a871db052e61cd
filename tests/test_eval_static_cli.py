"""``umiq eval static`` as a user runs it: a file in the α-UMi layout or our test split, JSON and Markdown out."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.settings import Settings, get_settings
from tests.test_security import umiq

FIXTURE = Path(__file__).parent / "fixtures" / "alpha_umi_raw.json"


@pytest.fixture
def tiny_cache(settings: Settings, model_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("UMIQ_MODEL_CACHE", str(model_cache))
    get_settings.cache_clear()
    yield model_cache
    get_settings.cache_clear()


def test_a_reference_layout_file_is_scored_as_it_is(tiny_cache: Path, tmp_path: Path) -> None:
    out, markdown = tmp_path / "static.json", tmp_path / "static.md"
    result = umiq(
        "eval", "static", "--file", str(FIXTURE), "--model", "tiny-smollm2", "--limit", "2",
        "--max-new-tokens", "4", "--out", str(out), "--markdown", str(markdown),
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["source"] == str(FIXTURE)
    assert report["system"] == "cascade", "the multi-LLM system hands its own rationale on by default"
    assert report["metrics"]["steps"] == len(report["steps"]) == 2
    assert set(report["models"]) == {"planner", "caller", "summarizer"}
    assert markdown.read_text().startswith("| system | Plan ACC | Act. EM | Arg. F1 | Hallu. | R-L |")
    assert "Plan ACC" in result.output


def test_the_test_split_scores_one_model_as_a_single_agent(tiny_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "single.json"
    result = umiq(
        "eval", "static", "--split", "test", "--single", "--model", "tiny-smollm2", "--limit", "2",
        "--max-new-tokens", "4", "--out", str(out),
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["source"] == {"category": "multi_turn_base", "split": "test"}
    assert report["system"] == "backbone"
    assert all(set(step["outputs"]) == {"backbone"} for step in report["steps"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--single"], "--single scores one model"),
        (["--file", "/nonexistent/raw.json"], "no file"),
    ],
)
def test_bad_arguments_are_refused_before_any_model_loads(args: list[str], message: str, settings: Settings) -> None:
    result = umiq("eval", "static", *args)
    assert result.exit_code == 2
    assert message in result.output
