"""One round of a training step: play every problem's group of episodes, then score them as far as the batch needs
before advantages (worked solutions in all-failed groups, reward functions, the judge); and what the curriculum
learns from a step's rounds."""

from __future__ import annotations

from typing import Any

from accelerate.utils import gather_object

from trl_stepwise.curriculum import STAGE_COLUMN, Curriculum
from trl_stepwise.guidance import guide_failed_groups
from trl_stepwise.rollout import StepwiseRollout
from trl_stepwise.trainer.dynamic_sampling import PlayedGroups
from trl_stepwise.trainer.scoring import add_reward_funcs, judge_step_rewards

GROUPS_PER_ROUND = 10_000  # group ids: process x 1,000,000 + round x 10,000 + problem


def play_round(trainer: Any, rollout: StepwiseRollout, problems: list[dict], round_number: int) -> PlayedGroups:
    """``num_generations`` episodes per problem; with ``reference_guidance`` a worked solution replaces one episode
    of every all-failed group (counted in ``guidance``); then the reward functions' and the judge's
    scores, which dynamic sampling needs to see a group's signal."""
    args = trainer.args
    group_base = trainer.accelerator.process_index * 100 * GROUPS_PER_ROUND + round_number * GROUPS_PER_ROUND
    rows = [dict(problem) for problem in problems for _ in range(args.num_generations)]
    group_ids = [group_base + p for p in range(len(problems)) for _ in range(args.num_generations)]
    trajectories = rollout.run(trainer.env_router(), rows, group_ids=group_ids)
    sampled = list(trajectories)  # the policy's own episodes: accuracy and the curriculum count these
    guidance = []
    if args.reference_guidance:
        guidance.append(
            guide_failed_groups(rollout, trainer.env_router(), trajectories, rows, group_ids, trainer.flavour)
        )
    extra = add_reward_funcs(
        trainer.reward_funcs,
        args.reward_weights,
        trajectories,
        trainer_state=trainer.state,
        log_metric=trainer.metrics.add,
    )
    judged = None
    if trainer.judge is not None:
        judged, judge_metrics = judge_step_rewards(trainer.judge, trajectories)
        for name, value in judge_metrics.items():
            trainer.metrics.add(name, value)
    return PlayedGroups(trajectories, rows, group_ids, judged, dict(extra), sampled, list(rows), guidance)


def promote_curriculum(curriculum: Curriculum, played: PlayedGroups, num_processes: int) -> bool:
    """Every process promotes at the same step, from the accuracy of all processes' own episodes (not the reference
    solutions guidance played in); True when the stage went up."""
    accuracies = [float(t.episode.correct) for t in played.sampled]
    stages = [row.get(STAGE_COLUMN) for row in played.sampled_rows]
    if num_processes > 1:
        accuracies = [a for part in gather_object([accuracies]) for a in part]
        stages = [s for part in gather_object([stages]) for s in part]
    return curriculum.update(accuracies, stages)
