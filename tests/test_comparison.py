"""The headline comparison's machinery on the tiny model: four systems wired as the issue defines them, one budget,
each scored in its own shape; and the table and chart its report is made of."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from tests.test_glpft import samples_by_role, small_config
from training.comparison import SYSTEMS, TrainedSystems, direct_steps, evaluate_system, train_systems
from training.reports import bar_chart, markdown_table
from training.seed import seed_trajectories
from training.split import load_split
from workers.backends.models import TINY_SMOLLM2, resolve_model


@pytest.fixture(scope="module")
def trained(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedSystems:
    tiny = resolve_model(TINY_SMOLLM2, model_cache)
    config = replace(small_config(tiny), summarizer=small_config(tiny).planner)
    root = tmp_path_factory.mktemp("comparison")
    return train_systems(config, samples_by_role(False), root, global_steps=2, local_steps=1, model_cache=model_cache)


def test_the_direct_role_models_share_glpfts_whole_budget() -> None:
    assert direct_steps(6, 3) == 5, "(6 + 3 x 3) / 3"
    assert direct_steps(2, 1) == 2, "rounded up: never less than GLPFT spends"


def test_four_systems_are_wired_as_defined(trained: TrainedSystems, model_cache: Path) -> None:
    systems, stages = trained.systems, trained.stages
    base = str(resolve_model(TINY_SMOLLM2, model_cache))
    global_model = stages["global"].model_path
    assert list(systems) == list(SYSTEMS)
    assert set(systems["base"].roles.values()) == {base}
    assert systems["single_llm"].single == global_model, "the single-LLM agent is GLPFT's own global stage"
    assert set(systems["single_llm"].roles.values()) == {global_model}
    for role in ("planner", "caller", "summarizer"):
        assert stages[f"glpft_{role}"].parent == global_model
        assert stages[f"direct_{role}"].parent == base, "direct role models skip the global stage"
        assert systems["glpft"].roles[role] == stages[f"glpft_{role}"].model_path
        assert systems["multi_direct"].roles[role] == stages[f"direct_{role}"].model_path
        assert stages[f"glpft_{role}"].global_step == 1
        assert stages[f"direct_{role}"].global_step == direct_steps(2, 1)
    assert stages["global"].global_step == 2
    assert trained.training_seconds("base") == 0
    assert trained.training_seconds("glpft") > trained.training_seconds("single_llm") > 0


def test_each_system_is_scored_in_its_own_shape(trained: TrainedSystems, model_cache: Path) -> None:
    base_ids = [i for i in load_split("train") if i.startswith("multi_turn_base_")]
    entry = min(base_ids, key=lambda i: int(i.rsplit("_", 1)[1]))
    trajectory = seed_trajectories("multi_turn_base", ids=[entry])
    options = {"compat": False, "limit": 2, "batch_size": 2, "max_new_tokens": 4}
    single = evaluate_system(trained.systems["single_llm"], trajectory, model_cache=model_cache, **options)
    multi = evaluate_system(trained.systems["glpft"], trajectory, model_cache=model_cache, **options)
    assert single.system == "backbone" and multi.system == "cascade"
    assert single.metrics.steps == multi.metrics.steps == 2
    assert all(set(record.outputs) == {"backbone"} for record in single.steps)
    assert all("planner" in record.outputs for record in multi.steps)


def test_the_table_shows_missing_values_as_missing_not_zero(tmp_path: Path) -> None:
    rows = {"glpft": {"plan_acc": 62.5, "act_em": None, "bfcl_accuracy": 0.0}, "base": {"plan_acc": 0.0}}
    table = markdown_table(rows)
    assert table.splitlines()[0] == "| system | Plan ACC | Act. EM | BFCL acc. |"
    assert "| glpft | 62.5 | – | 0.0 |" in table
    assert "| base | 0.0 | – | – |" in table
    chart = bar_chart(rows, tmp_path / "chart.png", title="t")
    assert chart.read_bytes()[:4] == b"\x89PNG"
