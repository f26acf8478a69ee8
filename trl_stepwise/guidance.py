"""Reference guidance: a group whose sampled episodes all fail gets the problem's worked solution as one episode.

A group of episodes that all fail gives group-relative REINFORCE nothing to learn from (every advantage is zero), and
a small model fails every episode of most problems at first: whether a short run takes off then depends on when its
first correct episodes happen to come (the main job's levels 1-3 ended between 6% and 23% over four sampling seeds).
Replacing one failed episode of such a group with the reference solution (off-policy guidance, as LUFFY, Yan et al.
2025, mixes demonstrations into GRPO groups) gives the group a signal from the first step: the reference episode
gets a positive advantage, the failures a negative one. Groups with a correct episode are left alone, so guidance
fades as the policy learns.

The reference is played through the same rollout loop, prompt and environment as the sampled episodes
(:class:`trl_stepwise.engines.reference.ReferenceEngine`), so its ids, loss mask, calculator results and rewards are
exactly those of a sampled episode that wrote the same text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from trl_stepwise.engines.reference import ReferenceEngine
from trl_stepwise.flavours import FLAVOURS
from trl_stepwise.prompting import _is_answer_step, solution_to_steps
from trl_stepwise.rollout import StepwiseRollout, Trajectory

__all__ = ["failed_groups", "guide_failed_groups", "play_references", "reference_text"]


def reference_text(row: Mapping[str, Any], flavour: str) -> str | None:
    """The row's worked solution as the policy would write it (one step per line, answer line last), or None."""
    if not str(row.get("solution") or "").strip():
        return None
    try:
        steps = solution_to_steps(row, flavour)
    except (KeyError, ValueError):
        return None
    if len(steps) < 2 or not _is_answer_step(steps[-1]):  # a bare answer teaches no steps
        return None
    return "".join(steps)


def failed_groups(trajectories: Sequence[Trajectory]) -> list[int]:
    """One index per group none of whose episodes is correct (its last episode): the ones to replace."""
    last: dict[Any, int] = {}
    solved: set[Any] = set()
    for index, trajectory in enumerate(trajectories):
        episode = trajectory.episode
        last[episode.group_id] = index
        if episode.correct:
            solved.add(episode.group_id)
    return [index for group, index in last.items() if group not in solved and group is not None]


def play_references(
    rollout: StepwiseRollout,
    make_env,
    rows: Sequence[dict],
    group_ids: Sequence[int],
    texts: Sequence[str],
) -> list[Trajectory]:
    """Play each text as an episode of its row, with ``rollout``'s prompts, limits and tools."""
    engine = ReferenceEngine(rollout.tokenizer, dict(enumerate(texts)), rollout.eos_ids)
    return rollout.with_engine(engine).run(make_env, rows, group_ids=group_ids)


def guide_failed_groups(
    rollout: StepwiseRollout,
    make_env,
    trajectories: list[Trajectory],
    rows: Sequence[dict],
    group_ids: Sequence[int],
    flavour: str,
) -> tuple[int, int]:
    """Replace, in place, one episode of every all-failed group by its row's worked solution, where it has one;
    ``(episodes replaced, of which correct)``.

    A reference episode was not sampled by the engine (``engine_sampled`` False): its tokens get importance weight 1
    and stay out of the sampler-trainer comparison; its gradient is the policy's own. A row's ``env`` column, when it
    names a math flavour, decides how its solution is split into steps (else ``flavour``)."""
    chosen, texts = [], []
    for index in failed_groups(trajectories):
        row = rows[index]
        text = reference_text(row, row.get("env") if row.get("env") in FLAVOURS else flavour)
        if text is not None:
            chosen.append(index)
            texts.append(text)
    if chosen:
        played = play_references(rollout, make_env, [rows[i] for i in chosen], [group_ids[i] for i in chosen], texts)
        for index, reference in zip(chosen, played, strict=True):
            reference.engine_sampled = False
            trajectories[index] = reference
    return len(chosen), sum(trajectories[i].episode.correct for i in chosen)
