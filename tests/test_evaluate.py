"""Static evaluation end to end: scripted systems with known scores, the three system shapes, and a tiny real model.

The data is :func:`tests.scripted_eval.trajectories`: 9 scored steps (5 gold calls, 2 gold answers, one finish
with ToolBench's ``none`` answer, one give-up); the fixture's hallucinated gold call is no step.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from orchestrator.protocol import (
    Decision,
    ParseError,
    format_backbone_target,
    format_call,
    parse_backbone,
)
from tests import scripted_eval
from tests.fixtures import reference_path
from training.alpha_umi import load_alpha_umi_trajectories
from training.evaluate import StaticEvaluation, evaluate_file, evaluate_static, gold_steps
from workers.backends.base import Backend, GenerationRequest, GenerationResult
from workers.backends.local import LocalBackend
from workers.backends.models import TINY_SMOLLM2
from workers.backends.scripted import ScriptedBackend

STEPS, CALLS, FINISHES = 9, 5, 2


def scripted(function: str) -> ScriptedBackend:
    return ScriptedBackend(f"tests.scripted_eval:{function}")


def roles(backend: Backend) -> dict[str, Backend]:
    return {"planner": backend, "caller": backend, "summarizer": backend}


def table(evaluation: StaticEvaluation) -> tuple[float | None, ...]:
    """The paper's row: Plan ACC, Act. EM, Hallu., Arg. F1, R-L (percent)."""
    out = evaluation.metrics.to_dict()
    return tuple(out[k] for k in ("plan_acc", "act_em", "hallu", "arg_f1", "rouge_l"))


def multi(function: str, *, cascade: bool = False, compat: bool = True) -> StaticEvaluation:
    return evaluate_static(scripted_eval.trajectories(), roles(scripted(function)), compat=compat, cascade=cascade)


# ---------------------------------------------------------------------------------------------------- gold steps


def test_gold_steps_are_the_planner_decisions_with_their_call_or_answer() -> None:
    steps = gold_steps(scripted_eval.trajectories(), compat=True)
    assert [(s.trajectory, s.message) for s in steps] == [
        (0, 1),
        (0, 7),
        (0, 10),
        (1, 1),
        (1, 4),
        (1, 7),
        (2, 1),
        (2, 4),
        (2, 7),
    ]
    assert [s.gold.decision for s in steps].count(Decision.CALL) == CALLS
    assert steps[3].gold.tool == "search_hotels_for_hotelapi" and steps[3].gold.arguments == {
        "city": "Atlantis",
        "max_price": 100,
    }
    assert steps[4].gold.decision is Decision.CONCLUSION and steps[4].gold.answer is None, "'none' is no gold answer"
    assert steps[5].gold.decision is Decision.GIVE_UP
    assert all(s.planner.history == s.backbone.history for s in steps)
    assert all(s.caller is None or s.caller.history[:-1] == s.planner.history for s in steps)
    assert len(gold_steps(scripted_eval.trajectories(), compat=False, limit=4)) == 4


# ------------------------------------------------------------------------------------------------ scripted systems


@pytest.mark.parametrize("compat", [True, False])
def test_replaying_gold_scores_full_marks_in_every_shape(compat: bool) -> None:
    full = (100.0, 100.0, 0.0, 100.0, 100.0)
    per_role = multi("gold", compat=compat)
    assert table(per_role) == full and per_role.metrics.parse_errors == {}
    backbone = evaluate_static(scripted_eval.trajectories(), scripted("gold"), compat=compat)
    assert table(backbone) == full and backbone.metrics.parse_errors == {}
    assert (backbone.system, per_role.system) == ("backbone", "multi")
    cascade = multi("gold", cascade=True, compat=compat)
    assert table(cascade) == full
    # the cascade also summarizes where gold concluded with 'none': no sample has that prompt, so the script fails
    assert cascade.metrics.parse_errors == {"summarizer.generation": 1}
    counts = {k: per_role.metrics.to_dict()[k] for k in ("steps", "calls", "finishes", "named")}
    assert counts == {"steps": STEPS, "calls": CALLS, "finishes": FINISHES, "named": CALLS}


def test_always_giving_up_is_right_only_on_the_give_up_step() -> None:
    give_up = (100 / STEPS, 0.0, 0.0, 0.0, 0.0)
    per_role = multi("give_up")
    assert table(per_role) == pytest.approx(give_up)
    assert per_role.metrics.parse_errors == {"caller.no_action": CALLS}, "the per-role caller still runs, and fails"
    cascade = multi("give_up", cascade=True)
    assert table(cascade) == pytest.approx(give_up)
    assert cascade.metrics.parse_errors == {}, "after a give-up nothing else runs"
    backbone = evaluate_static(scripted_eval.trajectories(), scripted("backbone_give_up"), compat=False)
    assert table(backbone) == pytest.approx(give_up)


def test_hallucinated_names_count_over_all_steps_and_miss_every_action() -> None:
    expected = (100.0, 0.0, 100 * CALLS / STEPS, 0.0, 100.0)
    assert table(multi("hallucinating")) == pytest.approx(expected)
    backbone = evaluate_static(scripted_eval.trajectories(), scripted("hallucinating"), compat=True)
    assert table(backbone) == pytest.approx(expected)
    assert backbone.metrics.hallucinated == backbone.metrics.named == CALLS


def test_a_wrong_first_value_gets_half_credit_for_that_key() -> None:
    # per gold call: Paris 1 key -> 0.5, Rome 0.5, hotel 2 keys -> 0.75, add 0.75, echo 0.5; mean 3.0 / 5
    evaluation = multi("wrong_first_value")
    assert table(evaluation) == pytest.approx((100.0, 100.0, 0.0, 60.0, 100.0))
    scores = [r.score.arguments for r in evaluation.steps if r.score.arguments is not None]
    assert scores == pytest.approx([0.5, 0.5, 0.75, 0.75, 0.5])


def test_the_cascade_hands_the_predicted_rationale_on() -> None:
    """Same decisions in other words: per role nothing changes; in a cascade the caller and summarizer see the new
    words, so their prompts are no gold sample's (the script fails on them) and the calls and answers are lost."""
    assert table(multi("reworded_planner")) == (100.0, 100.0, 0.0, 100.0, 100.0)
    cascade = multi("reworded_planner", cascade=True)
    assert table(cascade) == (100.0, 0.0, 0.0, 0.0, 0.0)
    assert cascade.metrics.parse_errors == {"caller.generation": CALLS, "summarizer.generation": FINISHES + 1}
    assert all("Thinking it over." in r.outputs["planner"] for r in cascade.steps)


def test_records_say_what_each_model_wrote_and_serialize() -> None:
    evaluation = multi("hallucinating")
    first = evaluation.steps[0]
    assert first.outputs["planner"].endswith("Next: caller.") and first.outputs["caller"].startswith("Action: no_such_")
    assert first.predicted.tool == "no_such_get_weather_for_weatherapi" and first.score.hallucinated
    assert "summarizer" not in first.outputs
    out = json.loads(json.dumps(evaluation.to_dict(steps=True)))
    assert out["system"] == "multi" and out["models"]["caller"] == "scripted:tests.scripted_eval:hallucinating"
    assert len(out["steps"]) == STEPS and out["steps"][0]["gold"]["decision"] == "call"
    assert "steps" not in evaluation.to_dict()


def test_a_file_is_scored_as_it_is() -> None:
    from_file = evaluate_file(scripted_eval.FIXTURE, roles(scripted("gold")), compat=True, limit=5)
    loaded = load_alpha_umi_trajectories(scripted_eval.FIXTURE)
    assert from_file.metrics == evaluate_static(loaded, roles(scripted("gold")), compat=True, limit=5).metrics
    assert from_file.metrics.steps == 5 and table(from_file) == (100.0, 100.0, 0.0, 100.0, 100.0)


def test_the_reference_sample_replays_to_full_marks() -> None:
    """79 steps of 20 real ToolBench trajectories, among them a give-up whose thought says ``Action:``."""
    data = load_alpha_umi_trajectories(reference_path("raw_data_stage_2.json"))
    scripted_eval.remember(data)
    for models in (roles(scripted("gold")), scripted("gold")):
        evaluation = evaluate_static(data, models, compat=True)
        assert table(evaluation) == (100.0, 100.0, 0.0, 100.0, 100.0) and evaluation.metrics.parse_errors == {}
        assert (evaluation.metrics.steps, evaluation.metrics.calls, evaluation.metrics.finishes) == (79, 59, 14)


class Recording:
    """A backend that says what batches it was given; the answers come from a script."""

    def __init__(self, function: str) -> None:
        self._inner = scripted(function)
        self.model_version = self._inner.model_version
        self.batches: list[list[GenerationRequest]] = []

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        self.batches.append(list(requests))
        return self._inner.generate(requests)


def test_requests_are_batched_longest_first_with_the_role_stops() -> None:
    backend = Recording("gold")
    evaluate_static(scripted_eval.trajectories(), backend, compat=True, batch_size=4, max_new_tokens=33)
    assert [len(b) for b in backend.batches] == [4, 4, 1]
    lengths = [len(str(r.prompt)) for b in backend.batches for r in b]
    assert lengths == sorted(lengths, reverse=True)
    assert all(r.max_new_tokens == 33 and "</s>" in r.stop for b in backend.batches for r in b)


def test_a_multi_llm_system_needs_all_three_roles() -> None:
    with pytest.raises(ValueError, match="summarizer"):
        evaluate_static(
            scripted_eval.trajectories(), {"planner": scripted("gold"), "caller": scripted("gold")}, compat=True
        )
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_static(scripted_eval.trajectories(), scripted("gold"), compat=True, batch_size=0)


# ------------------------------------------------------------------------------------------------ parse_backbone


def test_parse_backbone_reads_every_target_shape_back() -> None:
    call = parse_backbone(format_backbone_target("I add.", call=format_call("add", {"a": 2})))
    assert (call.decision, call.rationale, call.error) == (Decision.CALL, "I add.", None)
    assert call.call is not None and (call.call.tool, call.call.arguments) == ("add", {"a": 2})
    answer = parse_backbone(format_backbone_target("Known.", answer="It is 5.\nReally."))
    assert (answer.decision, answer.answer, answer.rationale) == (Decision.CONCLUSION, "It is 5.\nReally.", "Known.")
    gave_up = parse_backbone(format_backbone_target("Impossible."))
    assert (gave_up.decision, gave_up.answer, gave_up.error) == (Decision.GIVE_UP, None, None)


def test_parse_backbone_takes_the_last_marker_and_counts_errors() -> None:
    thought = "Action:\nAction: I will restart by calling Finish.\nconclusion: give up."
    assert parse_backbone(thought).decision is Decision.GIVE_UP
    late_call = parse_backbone('In conclusion: I need data.\nAction: add\nAction Input: {"a": 1}')
    assert late_call.decision is Decision.CALL and late_call.call is not None and late_call.call.tool == "add"
    bad_json = parse_backbone("Add.\nAction: add\nAction Input: {oops")
    assert (bad_json.decision, bad_json.error) == (Decision.CALL, ParseError.BAD_JSON)
    assert parse_backbone("I am thinking.").error is ParseError.NO_DECISION
    assert parse_backbone("  ").error is ParseError.EMPTY
    assert parse_backbone("Done.\nconclusion:").error is ParseError.EMPTY


# ----------------------------------------------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def tiny(model_cache: Path) -> LocalBackend:
    """The random tiny model; it writes no protocol, only errors."""
    return LocalBackend(TINY_SMOLLM2, cache_dir=model_cache, device="cpu")


@pytest.mark.parametrize("system", ["multi", "backbone"])
def test_a_real_model_is_scored_and_its_parse_errors_counted(tiny: LocalBackend, system: str) -> None:
    models = roles(tiny) if system == "multi" else tiny
    evaluation = evaluate_static(
        scripted_eval.trajectories(), models, compat=False, limit=3, max_new_tokens=8, batch_size=2
    )
    metrics = evaluation.metrics
    assert (metrics.steps, metrics.calls, metrics.finishes) == (3, 2, 1)
    assert metrics.plan_acc is not None and metrics.act_em is not None and metrics.rouge_l is not None
    first_role = "planner" if system == "multi" else "backbone"
    assert sum(n for error, n in metrics.parse_errors.items() if error.startswith(first_role)) >= 1
    assert all(r.outputs for r in evaluation.steps)
    assert evaluation.models == (
        {r: tiny.model_version for r in models} if system == "multi" else {"backbone": tiny.model_version}
    )
