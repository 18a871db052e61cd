"""Training data: the α-UMi converter against the reference's own output, seed trajectories, the split, the store."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from orchestrator import store
from orchestrator.protocol import (
    Decision,
    Message,
    Speaker,
    backbone_history,
    format_call,
    format_planner,
    parse_caller,
    parse_planner,
    render_backbone,
)
from tests.conftest import TOY_SPECS
from tests.fixtures import FIXTURES, reference, reference_path
from training.alpha_umi import (
    export_alpha_umi,
    export_samples,
    load_alpha_umi_trajectories,
    messages_from_alpha_umi,
    tools_from_toolbench,
    tools_to_toolbench,
)
from training.live import trajectories_from_store
from training.samples import GlpftRole, Trajectory, glpft_dataset, glpft_samples
from training.seed import UnseedableEntry, seed_trajectories, seed_trajectory
from training.split import SPLITS, HeldOutError, assert_trainable, compute_splits, is_trainable, load_split, scenario
from workers.tools import bfcl
from workers.tools.registry import StateCache, execute, specs_for

FIXTURE = FIXTURES / "alpha_umi_raw.json"
GIVE_UP = "\nconclusion: give up."

# ----------------------------------------------------------------------------- the reference's own GLPFT output


@pytest.fixture(scope="module")
def converted() -> dict[GlpftRole, list]:
    return glpft_dataset(load_alpha_umi_trajectories(reference_path("raw_data_stage_2.json")), compat=True)


@pytest.mark.parametrize("role", list(GlpftRole))
def test_converter_reproduces_the_reference_samples(converted: dict[GlpftRole, list], role: GlpftRole) -> None:
    ours, theirs = converted[role], reference(f"train_{role}.json")
    assert len(ours) == len(theirs)
    assert [s.target for s in ours] == [r["target"] for r in theirs]
    assert [[m.to_dict() for m in s.history] for s in ours] == [r["history"] for r in theirs]
    assert [tools_to_toolbench(s.tools) for s in ours] == [r["tools"] for r in theirs]
    mismatched = [k for k, (s, r) in enumerate(zip(ours, theirs, strict=True)) if s.input != r["input"]]
    if role is not GlpftRole.BACKBONE:
        assert mismatched == []
        return
    # The reference's backbone script reuses the previous step's input for give-up steps (a stale variable);
    # those six are the only differences, and theirs is exactly the input before.
    assert [ours[k].target.endswith(GIVE_UP) for k in mismatched] == [True] * 6
    assert len(mismatched) == sum(s.target.endswith(GIVE_UP) for s in ours)
    assert all(theirs[k]["input"] == theirs[k - 1]["input"] for k in mismatched)


def test_reference_backbone_inputs_render_from_their_own_history() -> None:
    for s in reference("train_backbone.json"):
        if not s["target"].endswith(GIVE_UP):
            tools, history = tools_from_toolbench(s["tools"]), messages_from_alpha_umi(s["history"])
            assert render_backbone(tools, history, compat=True) == s["input"]


def test_reference_round_trips_through_export(tmp_path: Path) -> None:
    original = load_alpha_umi_trajectories(reference_path("raw_data_stage_2.json"))
    export_alpha_umi(original, tmp_path / "raw.json")
    assert load_alpha_umi_trajectories(tmp_path / "raw.json") == original
    raw = json.loads(reference_path("raw_data_stage_2.json").read_text())
    assert [
        {k: r[k] for k in ("tools", "instruction", "conversations")}
        for r in json.loads((tmp_path / "raw.json").read_text())
    ] == raw


def test_exported_samples_are_the_reference_files(converted: dict[GlpftRole, list], tmp_path: Path) -> None:
    for role, samples in converted.items():
        if role is not GlpftRole.BACKBONE:
            export_samples(samples, tmp_path / f"train_{role}.json")
            assert json.loads((tmp_path / f"train_{role}.json").read_text()) == reference(f"train_{role}.json")


# --------------------------------------------------------------------------------- our own reference-layout data


@pytest.fixture(scope="module")
def fixture_trajectories() -> list[Trajectory]:
    return load_alpha_umi_trajectories(FIXTURE)


def test_fixture_reads_lists_and_python_reprs(fixture_trajectories: list[Trajectory]) -> None:
    weather, hotel = fixture_trajectories
    assert [t.name for t in hotel.tools] == ["search_hotels_for_hotelapi"]
    assert hotel.tools[0].parameters["properties"]["max_price"] == {"type": "number", "description": ""}
    assert hotel.messages[0] == Message(Speaker.USER, "Find me a hotel in Atlantis under 100 dollars.")
    assert (weather.hallucinated, hotel.hallucinated) == (frozenset({5}), frozenset())
    assert weather.source == "alpha_umi" and weather.task_id is None


def test_fixture_samples_drop_hallucinated_steps(fixture_trajectories: list[Trajectory]) -> None:
    weather, hotel = (glpft_samples(t, compat=True) for t in fixture_trajectories)
    counts = {role: (len(weather[role]), len(hotel[role])) for role in GlpftRole}
    # weather: 4 planner steps, the second asks for a hallucinated call; hotel: a "none" conclusion and a give-up
    assert counts == {"backbone": (3, 3), "planner": (3, 3), "caller": (2, 1), "summarizer": (1, 0)}
    assert all("invalid_hallucination" not in s.target for role in GlpftRole for s in weather[role])
    assert [s.target for s in hotel[GlpftRole.BACKBONE]][1:] == [
        "No hotel was found.\nconclusion: none",
        "Atlantis is no real city, so no API can help.\nconclusion: give up.",
    ]


def test_fixture_backbone_input_merges_each_step_with_its_action(fixture_trajectories: list[Trajectory]) -> None:
    give_up = glpft_samples(fixture_trajectories[1], compat=True)[GlpftRole.BACKBONE][-1]
    history = (
        "\n\nThe conversation history is:\nuser: Find me a hotel in Atlantis under 100 dollars.</s>"
        "assistant: Let me search the hotels of Atlantis.\nAction: search_hotels_for_hotelapi\nAction Input: {\n"
        '  "city": "Atlantis",\n  "max_price": 100\n}</s>'
        "observation: {'results': []}assistant: No hotel was found.\nconclusion: none</s>"
        "user: This is not the first time you try this task, all previous trails failed.</s>\nYou should answer"
    )
    assert history in give_up.input
    assert give_up.input.endswith("cannot answer this question.\n assistant: ")


def test_backbone_history_is_idempotent(fixture_trajectories: list[Trajectory]) -> None:
    for trajectory in fixture_trajectories:
        merged = backbone_history(trajectory.messages)
        assert backbone_history(merged) == merged
        assert {m.speaker for m in merged} == {Speaker.USER, Speaker.PLANNER, Speaker.OBSERVATION}


def test_caller_sample_sees_the_planner_message_as_rationale(fixture_trajectories: list[Trajectory]) -> None:
    first = glpft_samples(fixture_trajectories[0], compat=True)[GlpftRole.CALLER][0]
    assert first.history[-1].speaker is Speaker.PLANNER
    assert f"The thought of this step is:\n{first.history[-1].content}\nBase on" in first.input


def test_chat_mode_samples_have_the_same_targets(fixture_trajectories: list[Trajectory]) -> None:
    for trajectory in fixture_trajectories:
        chat, compat = glpft_samples(trajectory, compat=False), glpft_samples(trajectory, compat=True)
        for role in GlpftRole:
            assert [s.target for s in chat[role]] == [s.target for s in compat[role]]
            assert [s.input for s in chat[role]] == [s.prompt for s in compat[role]]
            assert all(isinstance(s.prompt, list) and s.prompt[0]["role"] == "system" for s in chat[role])


def test_fixture_round_trips(fixture_trajectories: list[Trajectory], tmp_path: Path) -> None:
    tagged = [
        Trajectory(t.tools, t.messages, f"task-{i}", t.source, t.hallucinated)
        for i, t in enumerate(fixture_trajectories)
    ]
    export_alpha_umi(tagged, tmp_path / "raw.json")
    again = load_alpha_umi_trajectories(tmp_path / "raw.json")
    assert again == tagged
    assert (
        json.loads((tmp_path / "raw.json").read_text())[1]["instruction"]
        == "Find me a hotel in Atlantis under 100 dollars."
    )


# ------------------------------------------------------------------------------------------ BFCL seed trajectories

SEED_IDS = ["multi_turn_base_0", "multi_turn_base_57", "multi_turn_base_180"]


@pytest.fixture(scope="module")
def entries() -> dict[str, dict[str, Any]]:
    return {e["id"]: e for e in bfcl.load_entries("multi_turn_base")}


def _turns(trajectory: Trajectory) -> list[list[Message]]:
    turns: list[list[Message]] = []
    for message in trajectory.messages:
        if message.speaker is Speaker.USER:
            turns.append([])
        turns[-1].append(message)
    return turns


def test_seed_observations_are_the_ground_truth_executed(entries: dict[str, dict[str, Any]]) -> None:
    for trajectory in seed_trajectories("multi_turn_base", SEED_IDS):
        entry = entries[trajectory.task_id]
        task = bfcl.entry_task(entry)
        past: list[tuple[str, dict[str, Any]]] = []
        for turn, calls in zip(_turns(trajectory), bfcl.ground_truth_calls(entry), strict=True):
            observations = [m.content for m in turn if m.speaker is Speaker.OBSERVATION]
            expected = []
            for name, arguments in calls:  # replayed from scratch for every call: another path through the registry
                observation = execute(
                    task["toolsets"], task["initial_config"], past, name, arguments, max_chars=1024, cache=StateCache(0)
                )
                expected.append(observation.content)
                past.append((name, arguments))
            assert observations == expected


def test_seed_targets_parse_back_to_the_ground_truth(entries: dict[str, dict[str, Any]]) -> None:
    for trajectory in seed_trajectories("multi_turn_base", SEED_IDS):
        assert trajectory.tools == specs_for(entries[trajectory.task_id]["involved_classes"])
        for turn, calls in zip(_turns(trajectory), bfcl.ground_truth_calls(entries[trajectory.task_id]), strict=True):
            decisions = [parse_planner(m.content).decision for m in turn if m.speaker is Speaker.PLANNER]
            assert decisions == [Decision.CALL] * len(calls) + [Decision.CONCLUSION]
            parsed = [parse_caller(m.content) for m in turn if m.speaker is Speaker.CALLER]
            assert [(c.tool, c.arguments, c.error) for c in parsed] == [(n, a, None) for n, a in calls]
            assert turn[-1].speaker is Speaker.SUMMARIZER and turn[-1].content
        samples = glpft_samples(trajectory, compat=False)
        n_calls, n_turns = sum(m.speaker is Speaker.CALLER for m in trajectory.messages), len(_turns(trajectory))
        assert {r: len(s) for r, s in samples.items()} == {
            "backbone": n_calls + n_turns,
            "planner": n_calls + n_turns,
            "caller": n_calls,
            "summarizer": n_turns,
        }


def test_seed_is_deterministic() -> None:
    assert seed_trajectories("multi_turn_base", SEED_IDS[:1]) == seed_trajectories("multi_turn_base", SEED_IDS[:1])


def test_seed_empty_ground_truth_turn_concludes_with_what_is_missing(entries: dict[str, dict[str, Any]]) -> None:
    turn = _turns(seed_trajectory(entries["multi_turn_base_180"]))[3]  # BFCL's ground truth for this turn is empty
    assert [m.speaker for m in turn] == [Speaker.USER, Speaker.PLANNER, Speaker.SUMMARIZER]
    assert parse_planner(turn[1].content).decision is Decision.CONCLUSION
    assert turn[2].content.startswith("I cannot do this")


def test_seed_miss_func_stops_before_the_withheld_functions_appear() -> None:
    entries = {e["id"]: e for e in bfcl.load_entries("multi_turn_miss_func")}
    trajectory = seed_trajectory(entries["multi_turn_miss_func_0"])  # 'sort' is withheld until turn 3
    assert trajectory.meta["turns"] == len(_turns(trajectory)) == 3
    assert "sort" not in {t.name for t in trajectory.tools}
    assert _turns(trajectory)[2][-1].content.startswith("I cannot do this: none of the tools I have")
    with pytest.raises(UnseedableEntry):
        seed_trajectory(entries["multi_turn_miss_func_49"])  # BFCL calls 'tail' before revealing it


# ------------------------------------------------------------------------------------------------------ the split


def test_split_files_are_disjoint_cover_every_task_and_keep_scenarios_together() -> None:
    splits = {name: load_split(name) for name in SPLITS}
    everything = {e["id"] for c in bfcl.MULTI_TURN_CATEGORIES for e in bfcl.load_entries(c)}
    assert {name: len(ids) for name, ids in splits.items()} == {"train": 560, "dev": 120, "test": 120}
    assert set().union(*splits.values()) == everything
    assert sum(len(ids) for ids in splits.values()) == len(everything)
    scenarios = {name: {scenario(i) for i in ids} for name, ids in splits.items()}
    assert not (
        scenarios["train"] & scenarios["dev"]
        or scenarios["train"] & scenarios["test"]
        or scenarios["dev"] & scenarios["test"]
    )


def test_split_files_are_what_the_rule_computes() -> None:
    assert {name: set(ids) for name, ids in compute_splits().items()} == {name: load_split(name) for name in SPLITS}


def test_trainer_guard_refuses_held_out_ids() -> None:
    train, dev, test = (sorted(load_split(name)) for name in SPLITS)
    assert_trainable([*train, None, "3f2a9c0d1e", "toolbench_42"])
    for held_out in (dev[0], test[0], f"multi_turn_composite_{scenario(test[0])}"):
        assert not is_trainable(held_out)
        with pytest.raises(HeldOutError, match=held_out):
            assert_trainable([train[0], held_out])


# ------------------------------------------------------------------------------------------- live trajectories


STEP_KINDS = {
    Speaker.PLANNER: store.StepKind.PLANNER,
    Speaker.CALLER: store.StepKind.CALLER,
    Speaker.OBSERVATION: store.StepKind.TOOL,
    Speaker.SUMMARIZER: store.StepKind.SUMMARIZER,
}


def _insert(
    engine: sa.Engine,
    conversation: list[tuple[Speaker, str]],
    *,
    status: str = store.TrajectoryStatus.COMPLETED,
    verdict: dict[str, Any] | None = None,
    outcomes: list[dict[str, Any]] | None = None,
    hallucinated_at: int | None = None,
    bfcl_id: str | None = None,
) -> str:
    """A finished trajectory as the engine writes it: task, trajectory, one step per model/tool message, tool calls."""
    finished = store.utcnow() if status != store.TrajectoryStatus.RUNNING else None
    with store.session_scope(engine) as session:
        task = store.Task(
            turns=[conversation[0][1]], toolsets=["toy_math"], meta={"bfcl_id": bfcl_id} if bfcl_id else {}
        )
        session.add(task)
        session.flush()
        row = store.Trajectory(
            task_id=task.id,
            status=status,
            tool_specs=TOY_SPECS,
            verdict=verdict,
            outcomes=outcomes or [],
            finished_at=finished,
        )
        session.add(row)
        session.flush()
        for seq, (speaker, content) in enumerate(conversation):
            step = None
            if speaker is not Speaker.USER:
                step = store.Step(
                    trajectory_id=row.id,
                    seq=seq,
                    turn=0,
                    kind=STEP_KINDS[speaker],
                    idempotency_key=f"{row.id}/{seq}",
                    status="done",
                )
                session.add(step)
                session.flush()
            session.add(
                store.Message(
                    trajectory_id=row.id,
                    seq=seq,
                    turn=0,
                    speaker=speaker.value,
                    content=content,
                    step_id=step and step.id,
                )
            )
            if speaker is Speaker.CALLER:
                out = parse_caller(content)
                session.add(
                    store.ToolCall(
                        trajectory_id=row.id,
                        turn=0,
                        caller_step_id=step.id,
                        tool=out.tool,
                        arguments=out.arguments,
                        hallucinated=seq == hallucinated_at,
                    )
                )
        return row.id


def _call_step(rationale: str, tool: str, arguments: dict[str, Any], observation: str) -> list[tuple[Speaker, str]]:
    return [
        (Speaker.PLANNER, format_planner(rationale, Decision.CALL)),
        (Speaker.CALLER, format_call(tool, arguments)),
        (Speaker.OBSERVATION, observation),
    ]


LIVE = [
    (Speaker.USER, "Add 2 and 3, then echo the result."),
    *_call_step("Add them.", "add", {"a": 2, "b": 3}, "5"),
    *_call_step("Echo it with the shout tool.", "shout", {"text": "5"}, '{"error": "no tool named \'shout\' exists"}'),
    *_call_step("Echo it.", "echo", {"text": "5"}, '"5"'),
    (Speaker.PLANNER, format_planner("Done.", Decision.CONCLUSION)),
    (Speaker.SUMMARIZER, "2 + 3 = 5."),
]
GAVE_UP_LIVE = [
    (Speaker.USER, "Divide by zero."),
    (Speaker.PLANNER, format_planner("That cannot be done.", Decision.GIVE_UP)),
]


def _mine(trajectories: list[Trajectory], ids: dict[str, str]) -> dict[str, Trajectory]:
    """The test's own trajectories by name: the database is shared with the other tests of the session."""
    names = {v: k for k, v in ids.items()}
    return {names[t.meta["trajectory_id"]]: t for t in trajectories if t.meta["trajectory_id"] in names}


def test_store_trajectories_map_messages_and_hallucinated_calls(engine: sa.Engine) -> None:
    since = store.utcnow() - timedelta(seconds=1)
    ids = {
        "good": _insert(engine, LIVE, verdict={"valid": True}, hallucinated_at=5, bfcl_id="multi_turn_base_7"),
        "invalid": _insert(engine, LIVE, verdict={"valid": False}),
        "gave_up": _insert(
            engine, GAVE_UP_LIVE, outcomes=[{"turn": 0, "outcome": "gave_up", "answer": None}], status="failed"
        ),
        "running": _insert(engine, LIVE[:4], status=store.TrajectoryStatus.RUNNING),
    }
    found = _mine(trajectories_from_store(engine, since=since), ids)
    assert sorted(found) == ["good", "invalid"]
    good = found["good"]
    assert good.messages == [Message(speaker, content) for speaker, content in LIVE]
    assert [t.name for t in good.tools] == ["add", "echo"]
    assert (good.hallucinated, good.task_id, good.source) == (frozenset({5}), "multi_turn_base_7", "store")
    assert found["invalid"].task_id != "multi_turn_base_7" and found["invalid"].hallucinated == frozenset()
    samples = glpft_samples(good, compat=True)
    assert {r: len(s) for r, s in samples.items()} == {"backbone": 3, "planner": 3, "caller": 2, "summarizer": 1}
    assert all("shout" not in s.target for role in GlpftRole for s in samples[role])


def test_store_filters(engine: sa.Engine) -> None:
    since = store.utcnow() - timedelta(seconds=1)
    ids = {
        "valid": _insert(engine, LIVE, verdict={"valid": True}),
        "invalid": _insert(engine, LIVE, verdict={"valid": False}),
        "unjudged": _insert(engine, LIVE),
        "gave_up": _insert(
            engine, GAVE_UP_LIVE, outcomes=[{"turn": 0, "outcome": "gave_up", "answer": None}], status="failed"
        ),
    }
    assert sorted(_mine(trajectories_from_store(engine, since=since, only_valid=True), ids)) == ["valid"]
    feedback = {ids["valid"]: 0.9, ids["invalid"]: 0.2}
    scored = _mine(trajectories_from_store(engine, since=since, min_score=0.5, feedback=feedback), ids)
    assert sorted(scored) == ["valid"] and scored["valid"].meta["score"] == 0.9
    negative = _mine(trajectories_from_store(engine, since=since, give_ups="negative"), ids)
    assert sorted(negative) == ["gave_up", "invalid", "unjudged", "valid"]
    backbone = glpft_samples(negative["gave_up"], compat=True)[GlpftRole.BACKBONE]
    assert [s.target for s in backbone] == ["That cannot be done.\nconclusion: give up."]
    assert _mine(trajectories_from_store(engine, since=store.utcnow() + timedelta(hours=1)), ids) == {}
    with pytest.raises(ValueError, match="feedback"):
        trajectories_from_store(engine, min_score=0.5)
