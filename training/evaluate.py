"""Static evaluation (DESIGN §4): a system predicts each step of gold trajectories from the gold history, and is scored.

The teacher-forced inputs are the GLPFT samples of the same trajectories (:func:`training.samples.glpft_samples`):
a model is evaluated on exactly the prompts it is trained and served with. A *step* is a planner message of the
gold trajectory that has a decision and a single-agent (backbone) sample, so the multi-LLM and the single-LLM
system are scored on the same steps with the same denominators; hallucinated gold calls are no steps (they are
no training targets either). Three systems:

- **multi-LLM, per role** (``models`` maps planner / caller / summarizer to backends, ``cascade=False``): the
  planner predicts the decision at every step; the caller predicts the call at every gold call step from the gold
  history and the *gold* planner rationale (its GLPFT sample); the summarizer predicts the answer at every gold
  finish step. Each role is measured on its own inputs, as it is trained.
- **multi-LLM, cascade** (``cascade=True``): the planner's *predicted* message goes on as served
  (:mod:`orchestrator.machine`): a call decision, or no decision, goes to the caller with that rationale; a
  conclusion to the summarizer; a give-up ends the step. A planner mistake then costs the step its call or answer,
  as in the reference's ``infer_pipeline.py``. This is the like-for-like comparison with the single-LLM system,
  which also writes its own rationale before its action.
- **single-LLM** (``models`` is one backend): the backbone writes rationale and action or conclusion at every
  step from its GLPFT sample, read by :func:`orchestrator.protocol.parse_backbone`.

Which steps each metric averages over is :mod:`training.metrics`'s docstring.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import structlog

from orchestrator.protocol import (
    Decision,
    Message,
    ModelRole,
    ParseError,
    Prompt,
    Speaker,
    ToolSpec,
    parse_backbone,
    parse_caller,
    parse_planner,
    parse_summarizer,
    render_caller,
    render_summarizer,
    stop_strings,
)
from training.alpha_umi import load_alpha_umi_trajectories
from training.metrics import StaticMetrics, StepOutput, StepScore, score_step
from training.samples import GlpftRole, Sample, Trajectory, glpft_samples
from workers.backends.base import Backend, GenerationRequest, GenerationResult

__all__ = ["BACKBONE", "GoldStep", "StepRecord", "StaticEvaluation", "gold_steps", "evaluate_static", "evaluate_file"]

log = structlog.get_logger(__name__)

BACKBONE = GlpftRole.BACKBONE.value
"""The role name of the single-LLM system in records, errors and model versions."""

_GENERATION_ERROR = "generation"
"""The error recorded for a step whose backend failed (its text is empty, so it is not parsed as well)."""


@dataclass(frozen=True)
class GoldStep:
    """One scored step: the samples that are its teacher-forced inputs, and the gold output they target.

    ``caller`` exists on gold call steps whose call is readable, ``summarizer`` on finish steps with a real answer;
    ``message`` is the index of the planner message in the trajectory.
    """

    trajectory: int
    message: int
    task_id: str | None
    tools: list[ToolSpec]
    gold: StepOutput
    planner: Sample
    backbone: Sample
    caller: Sample | None = None
    summarizer: Sample | None = None


@dataclass(frozen=True)
class StepRecord:
    """A scored step for error analysis: where it is, what was gold, what each model wrote, and what it scored."""

    trajectory: int
    message: int
    task_id: str | None
    gold: StepOutput
    predicted: StepOutput
    outputs: dict[str, str]
    score: StepScore

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StaticEvaluation:
    """The metrics of one system on one data set, which system it was, and every step behind the numbers."""

    system: str
    models: dict[str, str]
    metrics: StaticMetrics
    steps: list[StepRecord]

    def to_dict(self, *, steps: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"system": self.system, "models": self.models, "metrics": self.metrics.to_dict()}
        if steps:
            out["steps"] = [record.to_dict() for record in self.steps]
        return out


@dataclass
class _Trace:
    """What the system wrote at one step: raw text per role, what was read from it, and the errors of reading."""

    outputs: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    decision: Decision | None = None
    planner_text: str = ""
    tool: str | None = None
    arguments: dict[str, Any] | None = None
    answer: str | None = None

    def output(self) -> StepOutput:
        return StepOutput(self.decision, self.tool, self.arguments, self.answer)


@dataclass(frozen=True)
class _Generation:
    """How every request of one evaluation is made."""

    compat: bool
    batch_size: int
    max_new_tokens: int
    description_chars: int


# ------------------------------------------------------------------------------------------------------ gold steps


def _by_end(samples: Sequence[Sample]) -> dict[int, Sample]:
    """A trajectory's samples of one role keyed by the index of the message they predict."""
    return {len(sample.history): sample for sample in samples}


def _gold(decision: Decision | None, caller: Sample | None, summarizer: Sample | None) -> StepOutput:
    if caller is not None:
        call = parse_caller(caller.target)
        return StepOutput(decision, call.tool, call.arguments)
    return StepOutput(decision, answer=summarizer.target if summarizer is not None else None)


def _trajectory_steps(index: int, trajectory: Trajectory, compat: bool, chars: int) -> Iterator[GoldStep]:
    samples = glpft_samples(trajectory, compat=compat, description_chars=chars)
    backbones = _by_end(samples[GlpftRole.BACKBONE])
    callers, summaries = _by_end(samples[GlpftRole.CALLER]), _by_end(samples[GlpftRole.SUMMARIZER])
    for at, planner in _by_end(samples[GlpftRole.PLANNER]).items():
        if at not in backbones:
            continue
        decision = parse_planner(planner.target).decision
        caller = callers.get(at + 1) if decision is Decision.CALL else None
        summarizer = summaries.get(at + 1) if decision is Decision.CONCLUSION else None
        gold = _gold(decision, caller, summarizer)
        yield GoldStep(
            index, at, trajectory.task_id, trajectory.tools, gold, planner, backbones[at], caller, summarizer
        )


def gold_steps(
    trajectories: Iterable[Trajectory], *, compat: bool, description_chars: int = 256, limit: int | None = None
) -> list[GoldStep]:
    """The scored steps of ``trajectories`` in order, the first ``limit`` of them where a limit is given.

    ``compat`` and ``description_chars`` must be the serving settings (``UMIQ_PROMPT_MODE``,
    ``UMIQ_DOC_DESCRIPTION_CHARS``), as for training: the prompts are the GLPFT samples' own.
    """
    steps = (
        step
        for index, trajectory in enumerate(trajectories)
        for step in _trajectory_steps(index, trajectory, compat, description_chars)
    )
    return list(islice(steps, limit))


# ------------------------------------------------------------------------------------------------------ generation


def _prompt_chars(prompt: Prompt) -> int:
    return len(prompt) if isinstance(prompt, str) else sum(len(m.get("content", "")) for m in prompt)


def _generate(
    backend: Backend, role: str, prompts: Mapping[int, Prompt], stop: list[str], run: _Generation
) -> dict[int, GenerationResult]:
    """Every prompt in batches, longest first: a batch's rows then have similar lengths, so little padding is
    computed, and a batch too large for memory fails at the start of a run rather than at its end."""
    order = sorted(prompts, key=lambda key: _prompt_chars(prompts[key]), reverse=True)
    results: dict[int, GenerationResult] = {}
    started = time.perf_counter()
    for start in range(0, len(order), run.batch_size):
        keys = order[start : start + run.batch_size]
        requests = [GenerationRequest(prompts[k], max_new_tokens=run.max_new_tokens, stop=stop) for k in keys]
        results.update(zip(keys, backend.generate(requests), strict=True))
        log.info(
            "eval.batch",
            role=role,
            done=len(results),
            total=len(order),
            seconds=round(time.perf_counter() - started, 1),
        )
    return results


def _take_planner(trace: _Trace, text: str) -> ParseError | None:
    out = parse_planner(text)
    trace.decision, trace.planner_text = out.decision, out.text
    return out.error


def _take_caller(trace: _Trace, text: str) -> ParseError | None:
    out = parse_caller(text)
    trace.tool, trace.arguments = out.tool, out.arguments
    return out.error


def _take_summarizer(trace: _Trace, text: str) -> ParseError | None:
    out = parse_summarizer(text)
    trace.answer = out.answer
    return out.error


def _take_backbone(trace: _Trace, text: str) -> ParseError | None:
    out = parse_backbone(text)
    trace.decision, trace.answer = out.decision, out.answer
    if out.call is not None:
        trace.tool, trace.arguments = out.call.tool, out.call.arguments
    return out.error


_TAKE: dict[str, Callable[[_Trace, str], ParseError | None]] = {
    ModelRole.PLANNER.value: _take_planner,
    ModelRole.CALLER.value: _take_caller,
    ModelRole.SUMMARIZER.value: _take_summarizer,
    BACKBONE: _take_backbone,
}
"""What each role's output contributes to its step's prediction; each returns the error of reading it."""


def _run_role(
    backend: Backend, role: str, prompts: Mapping[int, Prompt], stop: list[str], traces: list[_Trace], run: _Generation
) -> None:
    """Generate ``role``'s prompts and read each output into its step's trace. A failed generation is counted as
    such, not parsed as the empty text it leaves."""
    for i, result in _generate(backend, role, prompts, stop, run).items():
        trace = traces[i]
        trace.outputs[role] = result.text
        error = _GENERATION_ERROR if result.error is not None else _TAKE[role](trace, result.text)
        if error is not None:
            trace.errors.append(f"{role}.{error}")


# --------------------------------------------------------------------------------------------------------- systems


def _served(step: GoldStep, trace: _Trace) -> list[Message]:
    """The gold history with the planner's predicted message appended, as the serving path appends it."""
    return [*step.planner.history, Message(Speaker.PLANNER, trace.planner_text)]


def _cascade_prompts(
    steps: Sequence[GoldStep], traces: Sequence[_Trace], run: _Generation
) -> tuple[dict[int, Prompt], dict[int, Prompt]]:
    """Caller and summarizer prompts from the planner's own messages, routed as the state machine routes them:
    a conclusion to the summarizer, a call or an undecided text to the caller, a give-up (or nothing) nowhere."""
    callers: dict[int, Prompt] = {}
    summaries: dict[int, Prompt] = {}
    for i, (step, trace) in enumerate(zip(steps, traces, strict=True)):
        if trace.decision is Decision.CONCLUSION:
            summaries[i] = render_summarizer(_served(step, trace), compat=run.compat)
        elif trace.decision is Decision.CALL or (trace.decision is None and trace.planner_text):
            history = _served(step, trace)
            callers[i] = render_caller(
                step.tools, history, trace.planner_text, compat=run.compat, description_chars=run.description_chars
            )
    return callers, summaries


def _role_prompts(steps: Sequence[GoldStep]) -> tuple[dict[int, Prompt], dict[int, Prompt]]:
    """Caller and summarizer prompts of the gold steps: their GLPFT samples, gold rationale included."""
    callers = {i: step.caller.prompt for i, step in enumerate(steps) if step.caller is not None}
    summaries = {i: step.summarizer.prompt for i, step in enumerate(steps) if step.summarizer is not None}
    return callers, summaries


def _backend_for(models: Mapping[str, Backend], role: ModelRole) -> Backend:
    if role.value not in models:
        raise ValueError(f"a multi-LLM evaluation needs a {role.value} backend; got {sorted(models)}")
    return models[role.value]


def _stops(role: ModelRole, run: _Generation) -> list[str]:
    return stop_strings(role, compat=run.compat)


def _multi_llm(
    steps: Sequence[GoldStep], models: Mapping[str, Backend], run: _Generation, cascade: bool
) -> list[_Trace]:
    backends = {role: _backend_for(models, role) for role in ModelRole}
    traces = [_Trace() for _ in steps]
    planner_prompts = {i: step.planner.prompt for i, step in enumerate(steps)}
    planner, caller, summarizer = ModelRole.PLANNER, ModelRole.CALLER, ModelRole.SUMMARIZER
    _run_role(backends[planner], planner.value, planner_prompts, _stops(planner, run), traces, run)
    callers, summaries = _cascade_prompts(steps, traces, run) if cascade else _role_prompts(steps)
    _run_role(backends[caller], caller.value, callers, _stops(caller, run), traces, run)
    _run_role(backends[summarizer], summarizer.value, summaries, _stops(summarizer, run), traces, run)
    return traces


def _single_llm(steps: Sequence[GoldStep], backend: Backend, run: _Generation) -> list[_Trace]:
    """The backbone's output ends in a call or a conclusion, so the caller's stops (end of turn, an observation the
    model starts to invent) are its stops too; the protocol defines stops per served role only."""
    traces = [_Trace() for _ in steps]
    prompts = {i: step.backbone.prompt for i, step in enumerate(steps)}
    _run_role(backend, BACKBONE, prompts, _stops(ModelRole.CALLER, run), traces, run)
    return traces


def _record(step: GoldStep, trace: _Trace) -> StepRecord:
    predicted = trace.output()
    score = score_step(predicted, step.gold, {tool.name for tool in step.tools}, trace.errors)
    return StepRecord(step.trajectory, step.message, step.task_id, step.gold, predicted, trace.outputs, score)


def evaluate_static(
    trajectories: Iterable[Trajectory],
    models: Mapping[str, Backend] | Backend,
    *,
    compat: bool,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 96,
    description_chars: int = 256,
    cascade: bool = False,
) -> StaticEvaluation:
    """Score a system on gold trajectories by teacher forcing.

    ``models`` is one backend (the single-LLM system) or a mapping of ``planner``, ``caller`` and ``summarizer`` to
    backends (the same backend may serve several roles). ``cascade`` chooses between the two multi-LLM systems of
    the module docstring. ``limit`` caps the steps scored (the first ones, in trajectory order); ``batch_size``
    requests go to a backend at once, each with at most ``max_new_tokens`` new tokens and greedy decoding.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    run = _Generation(compat, batch_size, max_new_tokens, description_chars)
    steps = gold_steps(trajectories, compat=compat, description_chars=description_chars, limit=limit)
    if isinstance(models, Mapping):
        traces = _multi_llm(steps, models, run, cascade)
        system = "cascade" if cascade else "multi"
        versions = {role.value: _backend_for(models, role).model_version for role in ModelRole}
    else:
        traces = _single_llm(steps, models, run)
        system, versions = BACKBONE, {BACKBONE: models.model_version}
    records = [_record(step, trace) for step, trace in zip(steps, traces, strict=True)]
    metrics = StaticMetrics.of(record.score for record in records)
    log.info("eval.done", system=system, **{k: v for k, v in metrics.to_dict().items() if k != "parse_errors"})
    return StaticEvaluation(system, versions, metrics, records)


def evaluate_file(path: str | Path, models: Mapping[str, Backend] | Backend, **options: Any) -> StaticEvaluation:
    """:func:`evaluate_static` (same ``options``) on a file in the reference's raw layout (``raw_data_stage_2.json``,
    the reference's test files, umiq's exports), read as it is."""
    return evaluate_static(load_alpha_umi_trajectories(path), models, **options)
