"""The static metrics on hand-worked cases: each number below is worked out in its comment, not read off the code."""

from __future__ import annotations

import pytest

from orchestrator.protocol import Decision
from training.metrics import (
    StaticMetrics,
    StepOutput,
    StepScore,
    action_em,
    arg_f1,
    is_hallucinated,
    plan_correct,
    rouge_l_f1,
    score_step,
)

TOOLS = {"get_weather", "list_cities"}
GOLD_CALL = StepOutput(Decision.CALL, "get_weather", {"city": "Paris", "unit": "C"})
GOLD_FINISH = StepOutput(Decision.CONCLUSION, answer="Paris is 21 degrees and Rome 25 degrees.")

# ---------------------------------------------------------------------------------------------------------- Arg. F1


def test_empty_against_empty_is_one() -> None:
    assert arg_f1({}, {}) == 1.0
    assert arg_f1("{}", "{}") == 1.0


@pytest.mark.parametrize("predicted", ['{"a": 1', "[1, 2]", "null", "", None, "Action Input: {}"])
def test_an_unparsable_prediction_scores_zero(predicted: str | None) -> None:
    assert arg_f1(predicted, {"a": 1}) == 0.0
    assert arg_f1(predicted, {}) == 0.0


def test_a_wrong_value_gets_half_credit() -> None:
    # a matches (1) and b is present with another value (0.5): 1.5 / 2 predicted keys, 1.5 / 2 gold keys
    assert arg_f1({"a": 1, "b": 3}, {"a": 1, "b": 2}) == pytest.approx(0.75)


def test_an_extra_predicted_key_lowers_precision_only() -> None:
    # precision 1 / 2, recall 1 / 1: F1 = 2 * 0.5 * 1 / 1.5 = 2 / 3
    assert arg_f1({"a": 1, "extra": 2}, {"a": 1}) == pytest.approx(2 / 3)


def test_a_missing_key_lowers_recall_only() -> None:
    # precision 1 / 1, recall 1 / 2: F1 = 2 / 3
    assert arg_f1({"a": 1}, {"a": 1, "b": 2}) == pytest.approx(2 / 3)


def test_half_credit_and_extra_key_combine() -> None:
    # matched = 1 (a) + 0.5 (b) = 1.5; precision 1.5 / 3, recall 1.5 / 2: F1 = 2 * 0.5 * 0.75 / 1.25 = 0.6
    assert arg_f1('{"a": 1, "b": 0, "c": 9}', '{"a": 1, "b": 2}') == pytest.approx(0.6)


def test_no_shared_key_and_one_sided_empties_score_zero() -> None:
    assert arg_f1({"c": 1}, {"a": 1}) == 0.0
    assert arg_f1({}, {"a": 1}) == 0.0
    assert arg_f1({"a": 1}, {}) == 0.0


def test_values_compare_as_json() -> None:
    assert arg_f1({"n": 1.0}, {"n": 1}) == 1.0, "JSON has one number type"
    assert arg_f1({"n": True}, {"n": 1}) == 0.5, "true is no number, whatever Python's == says"
    assert arg_f1({"q": {"x": [1, "a"]}}, {"q": {"x": [1, "a"]}}) == 1.0
    assert arg_f1({"q": {"x": [1, True]}}, {"q": {"x": [1, 1]}}) == 0.5


def test_unparsable_gold_is_an_error_not_a_score() -> None:
    with pytest.raises(ValueError, match="gold arguments"):
        arg_f1({}, "{not json")


# ------------------------------------------------------------------------------------------- plan, action, hallu.


def test_plan_reads_planner_text_or_takes_a_decision() -> None:
    assert plan_correct("I should look it up.\n Next: caller.", Decision.CALL)
    assert plan_correct("Nothing works.\n Next: give up.", Decision.GIVE_UP)
    assert not plan_correct("I should look it up.", Decision.CALL), "no decision is wrong, never assumed a call"
    assert plan_correct(Decision.CONCLUSION, Decision.CONCLUSION)
    assert not plan_correct(None, Decision.CALL)


def test_a_hallucinated_name_counts_in_hallu_and_misses_the_action() -> None:
    assert is_hallucinated("get_forecast", TOOLS)
    assert not action_em("get_forecast", "get_weather")
    assert not is_hallucinated("list_cities", TOOLS) and not action_em("list_cities", "get_weather")
    assert not is_hallucinated(None, TOOLS) and not action_em(None, "get_weather")
    score = score_step(StepOutput(Decision.CALL, "get_forecast", GOLD_CALL.arguments), GOLD_CALL, TOOLS)
    assert score == StepScore(plan=True, hallucinated=True, named=True, action=False, arguments=0.0)


def test_arguments_count_only_where_names_match() -> None:
    right_name = score_step(StepOutput(Decision.CALL, "get_weather", {"city": "Paris", "unit": "F"}), GOLD_CALL, TOOLS)
    wrong_name = score_step(StepOutput(Decision.CALL, "list_cities", GOLD_CALL.arguments), GOLD_CALL, TOOLS)
    assert (right_name.action, right_name.arguments) == (True, pytest.approx(0.75))
    assert (wrong_name.action, wrong_name.arguments) == (False, 0.0), "a name mismatch scores 0 and is averaged in"


def test_a_step_is_scored_only_by_the_metrics_its_gold_decision_has() -> None:
    gave_up = score_step(StepOutput(Decision.GIVE_UP), GOLD_CALL, TOOLS)
    assert (gave_up.plan, gave_up.action, gave_up.arguments, gave_up.rouge_l) == (False, False, 0.0, None)
    unanswered = score_step(StepOutput(Decision.CONCLUSION), GOLD_FINISH, TOOLS)
    assert (unanswered.plan, unanswered.action, unanswered.rouge_l) == (True, None, 0.0)
    no_gold_answer = score_step(StepOutput(Decision.CONCLUSION, answer="x"), StepOutput(Decision.CONCLUSION), TOOLS)
    assert no_gold_answer.rouge_l is None, "ToolBench's 'none' conclusion is no gold answer"
    with pytest.raises(ValueError):
        score_step(StepOutput(Decision.CALL), StepOutput(None), TOOLS)


# ---------------------------------------------------------------------------------------------------------- ROUGE-L


def test_rouge_l_worked_examples() -> None:
    # LCS "the cat on the mat" = 5 of 6 tokens on both sides: P = R = F1 = 5 / 6
    assert rouge_l_f1("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(5 / 6)
    # all 4 predicted tokens are in order in the 8 gold ones: P = 1, R = 0.5, F1 = 2 / 3
    assert rouge_l_f1("Paris is 21 degrees", GOLD_FINISH.answer or "") == pytest.approx(2 / 3)
    # a subsequence, not a bag: "b a" against "a b" shares one token in order
    assert rouge_l_f1("b a", "a b") == pytest.approx(0.5)


def test_rouge_l_ignores_case_and_punctuation_and_scores_nothing_as_zero() -> None:
    assert rouge_l_f1("Paris, IS 21!", "paris is 21") == 1.0
    assert rouge_l_f1("Zürich ist kalt", "zürich ist kalt") == 1.0
    assert rouge_l_f1("", "paris") == 0.0
    assert rouge_l_f1("...", "paris") == 0.0


# ------------------------------------------------------------------------------------------------------ aggregation


def test_aggregation_in_percent_over_each_denominator() -> None:
    scores = [
        StepScore(plan=True, named=True, action=True, arguments=0.75),
        StepScore(plan=False, hallucinated=True, named=True, action=False, arguments=0.0),
        StepScore(plan=True, rouge_l=0.5),
        StepScore(plan=True, errors=("caller.bad_json",)),
        StepScore(plan=False, errors=("planner.no_decision", "caller.bad_json")),
    ]
    out = StaticMetrics.of(scores).to_dict()
    assert out == {
        "plan_acc": pytest.approx(60.0),  # 3 of 5 steps
        "act_em": pytest.approx(50.0),  # 1 of 2 gold calls
        "hallu": pytest.approx(20.0),  # 1 of 5 steps
        "arg_f1": pytest.approx(37.5),  # (0.75 + 0) / 2 gold calls
        "rouge_l": pytest.approx(50.0),  # 0.5 / 1 finish
        "arg_f1_matched": pytest.approx(75.0),  # 0.75 / 1 name-matched call
        "steps": 5,
        "calls": 2,
        "finishes": 1,
        "named": 2,
        "hallucinated": 1,
        "parse_errors": {"caller.bad_json": 2, "planner.no_decision": 1},
    }


def test_an_empty_denominator_is_no_number_rather_than_zero() -> None:
    out = StaticMetrics.of([StepScore(plan=True)]).to_dict()
    assert out["plan_acc"] == 100.0 and out["hallu"] == 0.0
    assert out["act_em"] is None and out["arg_f1"] is None and out["rouge_l"] is None and out["arg_f1_matched"] is None
    assert StaticMetrics().to_dict()["plan_acc"] is None
