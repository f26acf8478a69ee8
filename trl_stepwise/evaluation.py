"""Evaluate a policy on math problems: batched stepwise episodes in, per-episode records and one summary out.

The same code serves the ``trl-stepwise evaluate`` command and the trainer's periodic evaluation, so a number in a
training log means exactly what it means in an evaluation report. Records are plain JSON-ready dicts (one per problem
and sample) so a run can be re-summarised or inspected later without the model.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from tqdm.auto import tqdm

from trl_stepwise.engines import GenerationEngine
from trl_stepwise.envs import EndReason, Env, Episode, play_scripted
from trl_stepwise.prompting import PromptBuilder, solution_to_steps
from trl_stepwise.rollout import RolloutStats, SamplingConfig, StepwiseRollout, Trajectory

__all__ = [
    "evaluate_gold",
    "evaluate_problems",
    "episode_record",
    "summarize",
    "trajectory_record",
    "wilson_interval",
]

TRUNCATING_ENDS = (EndReason.MAX_STEPS.value, EndReason.TOKEN_BUDGET.value)
ROW_FIELDS = ("id", "level", "subject")  # carried into records when a row has them, for breakdowns


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion: unlike the normal approximation it stays inside [0, 1] and is
    sensible at 0 or n successes, which small evaluation sets hit often. ``total == 0`` -> (0, 1): no information."""
    if total <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= total:
        raise ValueError(f"successes must lie in [0, total={total}], got {successes}")
    p = successes / total
    z2 = z * z
    denominator = 1 + z2 / total
    centre = (p + z2 / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


# ---------------------------------------------------------------------------------------------------------------------
# Records


def episode_record(
    episode: Episode, problem_index: int, sample_index: int, num_tokens: int | None = None
) -> dict[str, Any]:
    """One finished episode as a JSON-serialisable dict; ``num_tokens`` counts every completion token if known."""
    verdict = episode.verdict
    row = episode.row
    record: dict[str, Any] = {
        "problem_index": problem_index,
        "sample_index": sample_index,
        "question": row["question"],
        "reference": str(row["answer"]),
        "completion": episode.completion,
        "steps": [step.text for step in episode.steps],
        "final_answer": episode.final_answer,
        "correct": episode.correct,
        "reason": verdict.reason if verdict is not None else "unfinished",
        "end_reason": episode.end_reason.value if episode.end_reason is not None else None,
        "num_steps": len(episode.steps),
        "num_tokens": episode.num_tokens if num_tokens is None else num_tokens,
        "num_policy_tokens": episode.num_tokens,
        "calc_calls": sum(step.calc_calls for step in episode.steps),
        "calc_errors": sum(step.calc_errors for step in episode.steps),
    }
    for name in ROW_FIELDS:
        if row.get(name) is not None and row.get(name) != "":
            record[name] = row[name]
    return record


def trajectory_record(trajectory: Trajectory, problem_index: int, sample_index: int) -> dict[str, Any]:
    """A rollout trajectory as a record; its token count includes calculator-inserted tokens."""
    return episode_record(trajectory.episode, problem_index, sample_index, num_tokens=len(trajectory.completion_ids))


# ---------------------------------------------------------------------------------------------------------------------
# Summary


def _share(count: int, total: int) -> float:
    return count / total if total else 0.0


def _majority_correct(samples: Sequence[dict]) -> bool:
    """Majority vote over parsed answers (ties: the answer seen first); no parsed answer at all counts as wrong."""
    answered = [r for r in samples if r["final_answer"] is not None]
    if not answered:
        return False
    votes = Counter(r["final_answer"] for r in answered)
    best = max(votes.values())
    winner = next(r for r in answered if votes[r["final_answer"]] == best)
    return bool(winner["correct"])


def _breakdown(firsts: Iterable[dict], key: str) -> dict[str, dict[str, float]]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for record in firsts:
        if record.get(key) is not None and record.get(key) != "":
            groups[str(record[key])].append(bool(record["correct"]))
    return {
        name: {"correct": sum(flags), "total": len(flags), "accuracy": _share(sum(flags), len(flags))}
        for name, flags in sorted(groups.items())
    }


def summarize(records: Sequence[dict], num_samples: int = 1) -> dict[str, Any]:
    """Headline numbers over records (one per problem and sample, as made by ``trajectory_record``).

    The headline (accuracy, correct, total, unparsable, truncated, per-level/subject) counts each problem's FIRST
    sample, so it does not change meaning with ``num_samples``; with several samples, ``mean_sample_accuracy``,
    ``maj@K`` and ``pass@K`` add the sampled view. End-reason shares, means and calculator counts cover all episodes.
    """
    by_problem: dict[int, list[dict]] = defaultdict(list)
    for record in records:
        by_problem[record["problem_index"]].append(record)
    groups = [sorted(group, key=lambda r: r["sample_index"]) for _, group in sorted(by_problem.items())]
    firsts = [group[0] for group in groups]
    total = len(firsts)
    correct = sum(bool(r["correct"]) for r in firsts)
    low, high = wilson_interval(correct, total)
    episodes = len(records)
    end_reasons = Counter(r["end_reason"] for r in records)
    summary: dict[str, Any] = {
        "accuracy": _share(correct, total),
        "accuracy_ci_low": low,
        "accuracy_ci_high": high,
        "correct": correct,
        "total": total,
        "unparsable": sum(r["final_answer"] is None for r in firsts),
        "truncated": sum(r["final_answer"] is None and r["end_reason"] in TRUNCATING_ENDS for r in firsts),
        "num_samples": num_samples,
        "episodes": episodes,
        "end_reasons": {str(reason): _share(n, episodes) for reason, n in sorted(end_reasons.items(), key=str)},
        "mean_steps": _share(sum(r["num_steps"] for r in records), episodes),
        "mean_tokens": _share(sum(r["num_tokens"] or 0 for r in records), episodes),
        "calc_calls": sum(r["calc_calls"] for r in records),
        "calc_errors": sum(r["calc_errors"] for r in records),
    }
    summary["unparsable_rate"] = _share(summary["unparsable"], total)
    summary["truncated_rate"] = _share(summary["truncated"], total)
    if num_samples > 1:
        summary["mean_sample_accuracy"] = _share(sum(bool(r["correct"]) for r in records), episodes)
        summary[f"maj@{num_samples}"] = _share(sum(_majority_correct(group) for group in groups), total)
        summary[f"pass@{num_samples}"] = _share(sum(any(r["correct"] for r in group) for group in groups), total)
    for key, name in (("level", "per_level"), ("subject", "per_subject")):
        breakdown = _breakdown(firsts, key)
        if breakdown:
            summary[name] = breakdown
    return summary


# ---------------------------------------------------------------------------------------------------------------------
# Running


def _is_main(accelerator: Any) -> bool:
    return accelerator is None or accelerator.is_main_process


def _num_processes(accelerator: Any) -> int:
    return 1 if accelerator is None else accelerator.num_processes


def _gather(accelerator: Any, items: list) -> list:
    """Concatenate every process's list (a no-op for one process)."""
    if _num_processes(accelerator) <= 1:
        return items
    from accelerate.utils import gather_object

    return list(gather_object(items))


def _local_problems(num_rows: int, accelerator: Any) -> list[int]:
    """Problem indices this process plays: i::n, so every process gets a similar mix of easy and hard problems."""
    if accelerator is None:
        return list(range(num_rows))
    return list(range(accelerator.process_index, num_rows, accelerator.num_processes))


def evaluate_problems(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict],
    prompt_builder: PromptBuilder,
    make_env: Callable[[], Env],
    sampling: SamplingConfig,
    num_samples: int = 1,
    accelerator: Any = None,
    progress: bool = True,
    step_delimiter: str | None = "\n",
    calculator: bool = True,
    engine: GenerationEngine | None = None,
) -> tuple[dict[str, Any], list[dict]]:
    """Play ``num_samples`` episodes per problem, all batched together, and return ``(summary, records)``.

    ``engine`` generates (default: the transformers engine around ``model``).

    With a multi-process ``accelerator`` each process plays rows ``i::n`` and the records are gathered, so every
    process returns the same summary and records (sorted by problem, then sample) as a single process would.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    problems = _local_problems(len(rows), accelerator)
    episode_rows = [dict(rows[p]) for p in problems for _ in range(num_samples)]
    keys = [(p, s) for p in problems for s in range(num_samples)]
    rollout = StepwiseRollout(
        model,
        tokenizer,
        prompt_builder,
        sampling=sampling,
        step_delimiter=step_delimiter,
        calculator=calculator,
        engine=engine,
    )
    bar = tqdm(  # the main process's own share: other processes advance at about the same pace
        total=len(episode_rows),
        desc="Evaluating",
        unit="episode",
        disable=not (progress and _is_main(accelerator)),
        dynamic_ncols=True,
    )
    started = time.perf_counter()
    try:
        trajectories = rollout.run(make_env, episode_rows, group_ids=[p for p, _ in keys], progress=bar.update)
    finally:
        bar.close()
    wall = time.perf_counter() - started
    local = [trajectory_record(t, p, s) for t, (p, s) in zip(trajectories, keys, strict=True)]
    records = sorted(_gather(accelerator, local), key=lambda r: (r["problem_index"], r["sample_index"]))
    stats = _gather(accelerator, [(wall, rollout.stats)])
    summary = summarize(records, num_samples=num_samples)
    summary.update(_throughput(stats), num_processes=_num_processes(accelerator))
    return summary, records


def _throughput(stats: Sequence[tuple[float, RolloutStats]]) -> dict[str, float]:
    """Wall time is the slowest process's; tokens/s is every generated token over that wall time."""
    wall = max(seconds for seconds, _ in stats)
    generated = sum(s.generated_tokens for _, s in stats)
    return {
        "wall_seconds": wall,
        "generated_tokens": generated,
        "forced_tokens": sum(s.forced_tokens for _, s in stats),
        "prompt_tokens": sum(s.prompt_tokens for _, s in stats),
        "tokens_per_second": generated / wall if wall > 0 else 0.0,
    }


def evaluate_gold(
    rows: Sequence[dict], make_env: Callable[[], Env], flavour: str
) -> tuple[dict[str, Any], list[dict]]:
    """Feed each reference solution, converted to steps, into an environment as if a model wrote it.

    No model runs: this checks the data -> steps -> environment -> grading path. A failure here is a problem the
    policy could never be scored correct on, however well it wrote.
    """
    started = time.perf_counter()
    episodes = []
    for row in rows:
        env = make_env.for_row(row) if hasattr(make_env, "for_row") else make_env()
        session = play_scripted(lambda env=env: env, dict(row), solution_to_steps(row, flavour))
        episodes.append(session.episode)  # a solution that ran out of steps without an answer was closed as EOS
    records = [episode_record(episode, index, 0) for index, episode in enumerate(episodes)]
    summary = summarize(records)
    summary["wall_seconds"] = time.perf_counter() - started
    return summary, records
