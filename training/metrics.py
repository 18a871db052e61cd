"""The paper's static metrics (DESIGN §4), as pure functions and one aggregate, so every evaluation scores alike.

α-UMi's static evaluation scores each step of a gold trajectory, predicted from the gold history up to it (teacher
forcing), with five numbers. A *step* is one planner-level decision of the gold trajectory: a planner message with
a decision (the unit of the reference's ``evaluate-multi_agent.py`` and ``evaluate-backbone.py``, one record per
assistant message). Denominators, as :class:`StaticMetrics` counts them:

- **Plan ACC** = steps whose predicted decision (call / conclusion / give up) equals the gold one / all steps.
  A prediction without a decision is wrong (and counted as a parse error where it is made).
- **Act. EM** = gold call steps whose predicted tool name equals the gold one / gold call steps. A step where no
  call was predicted, or no name could be read, is a miss.
- **Hallu.** = steps whose predicted call names a tool not in the step's tool list / all steps. "All steps", not
  "steps that named a tool": the reference's scripts divide by every record (``hallu_pred / len(data)``), so
  umiq's rates compare with the paper's. ``named`` counts the steps that named a tool, so the per-call rate is
  ``hallucinated / named`` where that question is asked.
- **Arg. F1** = the mean, over gold call steps, of :func:`arg_f1` where the predicted name equals the gold one and
  0 where it does not. "Only where names match" says when arguments are compared at all, not which steps are
  averaged: the reference appends 0 for a name mismatch and averages over every call step. Arg. F1 can then never
  exceed Act. EM, and in every row of the paper's table it does not. ``arg_f1_matched`` (the mean over
  name-matched steps only) is reported beside it to separate argument quality from name accuracy.
- **R-L** = the mean, over gold finish steps with a real answer, of :func:`rouge_l_f1` between the predicted and
  the gold answer; a step where no answer was predicted scores 0. ToolBench's ``none`` (a finish without an answer)
  is no gold answer, so such a step is outside R-L, as it is outside the summarizer's training data.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from orchestrator.protocol import Decision, parse_planner

__all__ = [
    "StepOutput",
    "StepScore",
    "StaticMetrics",
    "plan_correct",
    "action_em",
    "is_hallucinated",
    "arg_f1",
    "rouge_l_f1",
    "score_step",
]

_WORD = re.compile(r"\w+")
_HALF_CREDIT = 0.5
"""A key present in both argument objects with different values scores half (DESIGN §4, the reference's rule)."""


@dataclass(frozen=True)
class StepOutput:
    """What was written at one step, gold or predicted: the decision, the call that carries it, or the answer.

    ``arguments`` is the parsed object, or the text it came from, or None where none could be read.
    """

    decision: Decision | None
    tool: str | None = None
    arguments: Mapping[str, Any] | str | None = None
    answer: str | None = None


@dataclass(frozen=True)
class StepScore:
    """One step's share of each metric; None where the step is outside that metric's denominator."""

    plan: bool
    hallucinated: bool = False
    named: bool = False
    action: bool | None = None
    arguments: float | None = None
    rouge_l: float | None = None
    errors: tuple[str, ...] = ()


def plan_correct(predicted: str | Decision | None, gold: Decision) -> bool:
    """Whether the predicted decision is the gold one; text is read as planner output (:func:`parse_planner`)."""
    decision = predicted if isinstance(predicted, Decision) or predicted is None else parse_planner(predicted).decision
    return decision is gold


def action_em(predicted: str | None, gold: str) -> bool:
    """Exact match of tool names; no predicted name is a miss."""
    return predicted is not None and predicted == gold


def is_hallucinated(predicted: str | None, tool_names: Collection[str]) -> bool:
    """A predicted name outside the tool list; predicting no name at all is a miss, not a hallucination."""
    return predicted is not None and predicted not in tool_names


def _json_object(value: Mapping[str, Any] | str | None) -> Mapping[str, Any] | None:
    if isinstance(value, Mapping):
        return value
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _same(a: Any, b: Any) -> bool:
    """JSON equality: 1 equals 1.0 (JSON has one number type) but ``true`` is no number, as Python's == would say."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _f1(matched: float, predicted: int, gold: int) -> float:
    precision = matched / predicted if predicted else 0.0
    recall = matched / gold if gold else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def arg_f1(predicted: Mapping[str, Any] | str | None, gold: Mapping[str, Any] | str) -> float:
    """Argument F1 of one call (DESIGN §4), for a step whose names already match.

    Both sides are JSON objects (text is parsed; a prediction that does not parse to an object scores 0). A gold key
    present in the prediction scores 1 with an equal value, 0.5 with another; the sum over gold keys is divided by
    the predicted keys for precision and by the gold keys for recall. ``{}`` against ``{}`` is 1; ``{}`` against a
    non-empty object is 0 either way round. A gold object that does not parse is a caller error, not a score.
    """
    pred, truth = _json_object(predicted), _json_object(gold)
    if truth is None:
        raise ValueError(f"gold arguments are not a JSON object: {gold!r}")
    if pred is None:
        return 0.0
    if not pred and not truth:
        return 1.0
    matched = sum(1.0 if _same(pred[k], v) else _HALF_CREDIT for k, v in truth.items() if k in pred)
    return _f1(matched, len(pred), len(truth))


def _tokens(text: str) -> list[str]:
    """Lower-cased word tokens, punctuation dropped: rouge-score's tokens, except that non-ASCII letters count."""
    return _WORD.findall(text.lower())


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Longest common subsequence by dynamic programming, one row kept."""
    row = [0] * (len(b) + 1)
    for x in a:
        above_left = 0
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = above_left + 1 if x == y else max(above, row[j - 1])
            above_left = above
    return row[-1]


def rouge_l_f1(predicted: str, gold: str) -> float:
    """ROUGE-L F1 (Lin 2004, β = 1): LCS of the word tokens over the prediction's length (P) and the gold's (R).

    Sentence-level, one LCS over the whole text, as ``rouge-score``'s ``rougeL``. The reference's ``rouge``
    package (``evaluate-multi_agent.py``) differs in two ways, so its R-L is not this number to the digit: it
    weighs P and R with β = P/R and takes a union LCS over ``.``-split sentences. Either side without a word
    scores 0.
    """
    pred, truth = _tokens(predicted), _tokens(gold)
    return _f1(float(_lcs_length(pred, truth)), len(pred), len(truth))


def score_step(
    predicted: StepOutput, gold: StepOutput, tool_names: Collection[str], errors: Iterable[str] = ()
) -> StepScore:
    """One step's scores. Action and arguments where the gold step is a call that could be read, R-L where it is a
    finish with an answer (``gold.answer`` None: outside R-L), plan and hallucination on every step."""
    if gold.decision is None:
        raise ValueError("a gold step always has a decision")
    action = arguments = rouge = None
    if gold.decision is Decision.CALL and gold.tool is not None and gold.arguments is not None:
        action = action_em(predicted.tool, gold.tool)
        arguments = arg_f1(predicted.arguments, gold.arguments) if action else 0.0
    if gold.decision is Decision.CONCLUSION and gold.answer is not None:
        rouge = rouge_l_f1(predicted.answer or "", gold.answer)
    return StepScore(
        plan=plan_correct(predicted.decision, gold.decision),
        hallucinated=is_hallucinated(predicted.tool, tool_names),
        named=predicted.tool is not None,
        action=action,
        arguments=arguments,
        rouge_l=rouge,
        errors=tuple(errors),
    )


def _rate(total: float, count: int) -> float | None:
    return total / count if count else None


def _percent(rate: float | None) -> float | None:
    return None if rate is None else 100.0 * rate


@dataclass
class StaticMetrics:
    """Sums and denominators of the five metrics over scored steps; rates are fractions, :meth:`to_dict` percent.

    A rate whose denominator is 0 is None (no such step was evaluated), never 0. ``parse_errors`` counts
    ``<role>.<error>`` (``planner.no_decision``, ``caller.bad_json``, ``backbone.generation``...) over every
    model output, so a model that writes unusable text is visible even where a metric does not look at it.
    """

    steps: int = 0
    plans_correct: int = 0
    hallucinated: int = 0
    named: int = 0
    calls: int = 0
    actions_correct: int = 0
    arg_f1_sum: float = 0.0
    finishes: int = 0
    rouge_l_sum: float = 0.0
    parse_errors: Counter[str] = field(default_factory=Counter)

    @classmethod
    def of(cls, scores: Iterable[StepScore]) -> StaticMetrics:
        metrics = cls()
        for score in scores:
            metrics.add(score)
        return metrics

    def add(self, score: StepScore) -> None:
        self.steps += 1
        self.plans_correct += score.plan
        self.hallucinated += score.hallucinated
        self.named += score.named
        if score.action is not None:
            self.calls += 1
            self.actions_correct += score.action
            self.arg_f1_sum += score.arguments or 0.0
        if score.rouge_l is not None:
            self.finishes += 1
            self.rouge_l_sum += score.rouge_l
        self.parse_errors.update(score.errors)

    @property
    def plan_acc(self) -> float | None:
        return _rate(self.plans_correct, self.steps)

    @property
    def act_em(self) -> float | None:
        return _rate(self.actions_correct, self.calls)

    @property
    def hallu(self) -> float | None:
        return _rate(self.hallucinated, self.steps)

    @property
    def arg_f1(self) -> float | None:
        return _rate(self.arg_f1_sum, self.calls)

    @property
    def arg_f1_matched(self) -> float | None:
        return _rate(self.arg_f1_sum, self.actions_correct)

    @property
    def rouge_l(self) -> float | None:
        return _rate(self.rouge_l_sum, self.finishes)

    def to_dict(self) -> dict[str, Any]:
        """The paper's table row in percent, then every denominator and the parse errors."""
        return {
            "plan_acc": _percent(self.plan_acc),
            "act_em": _percent(self.act_em),
            "hallu": _percent(self.hallu),
            "arg_f1": _percent(self.arg_f1),
            "rouge_l": _percent(self.rouge_l),
            "arg_f1_matched": _percent(self.arg_f1_matched),
            "steps": self.steps,
            "calls": self.calls,
            "finishes": self.finishes,
            "named": self.named,
            "hallucinated": self.hallucinated,
            "parse_errors": dict(sorted(self.parse_errors.items())),
        }
