"""What the trainer logs, from one place: values gathered over every process during a step, averaged into the next
log line (TRL's names where TRL has them), the printed sample completions and the rollout buffer file."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from trl_stepwise.algorithms import Algorithm, BehaviourLogps
from trl_stepwise.envs import EndReason
from trl_stepwise.rollout import Trajectory

SAMPLER_GAP = "sampling/sampling_logp_difference/mean"  # TRL's name: mean |log pi_trainer - log pi_engine|
IMPORTANCE_RATIO = "sampling/importance_sampling_ratio/mean"


class TrainingMetrics:
    """Values collected between two log lines; ``flush`` averages them into the line."""

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator
        self.values: dict[str, list[float]] = defaultdict(list)
        self.samples: list[dict] = []

    def add(self, name: str, value: float) -> None:
        """One value of ``name`` (TRL's ``log_metric`` for reward functions lands here too)."""
        self.values[name].append(float(value))

    def add_guidance(self, counts: list[tuple[int, int]]) -> None:
        """``reference_guidance``: how many worked solutions replaced an episode of an all-failed group, and how many
        of them were correct, over every round and process."""
        if self.accelerator.num_processes > 1:  # every process guides its own groups: log the totals
            counts = [c for part in gather_object([counts]) for c in part]
        guided, correct = sum(n for n, _ in counts), sum(c for _, c in counts)
        self.add("guidance/reference_episodes", float(guided))
        self.add("guidance/reference_correct", correct / guided if guided else 0.0)

    @torch.no_grad()
    def add_loss_metrics(
        self,
        algorithm: Algorithm,
        logps: torch.Tensor,
        old: torch.Tensor,
        ref: torch.Tensor | None,
        distill: torch.Tensor | None,
        entropy: torch.Tensor,
        mask: torch.Tensor,
        behaviour: BehaviourLogps,
    ) -> tuple[float, float]:
        """Per-token means over every process of one micro-batch: entropy, KL, clipping, distillation, the
        sampler-trainer gap (every engine, every step) and the importance weights; returns the gap's gathered
        ``(sum, count)``, which the sampler guard reads."""
        m, s = mask.float(), behaviour.mask.float()
        sums = {"entropy": (entropy * m, m)}
        if ref is not None:
            sums["kl"] = (algorithm.kl(logps, ref) * m, m)
        if distill is not None:
            sums["distill/teacher_kl"] = (distill * m, m)
        settings = algorithm.settings
        ratio = torch.exp(algorithm.log_ratio(logps.detach(), old, mask)).expand_as(logps)
        if settings.loss_type == "cispo":  # its weight is clipped above only, at epsilon_high itself
            clipped = ratio > settings.epsilon_high
        else:
            clipped = (ratio < 1.0 - settings.epsilon) | (ratio > 1.0 + settings.epsilon_high)
        sums["clip_ratio"] = (clipped.float() * m, m)
        sums[SAMPLER_GAP] = (behaviour.gap.abs() * s, s)
        weights = algorithm.importance_weights(behaviour)
        if weights is not None:
            sums[IMPORTANCE_RATIO] = (weights * s, s)
        _, gap = self.gathered_token_means(sums, SAMPLER_GAP)
        return gap

    def gathered_token_means(
        self, sums: dict[str, tuple[torch.Tensor, torch.Tensor]], keep: str
    ) -> tuple[dict[str, float], tuple[float, float]]:
        """Per-token means of ``(value * mask, mask)`` pairs over every process's micro-batch (one gather for all),
        added to the line; returns them and the gathered ``(sum, count)`` of ``keep``."""
        values = torch.stack([t for value, weight in sums.values() for t in (value.sum(), weight.sum())]).float()
        processes = self.accelerator.num_processes
        if processes > 1:
            values = self.accelerator.gather(values).reshape(processes, -1).sum(0)
        pairs = values.reshape(-1, 2).tolist()
        means = {key: total / count for key, (total, count) in zip(sums, pairs, strict=True) if count > 0}
        for key, value in means.items():
            self.add(key, value)
        return means, tuple(pairs[list(sums).index(keep)])

    def record_rollout(
        self,
        trajectories: Sequence[Trajectory],
        returns: Sequence[float],
        *,
        sampled: Sequence[Trajectory],
        judged: Sequence[Sequence[float]] | None = None,
        samples_to_print: int = 0,
    ) -> None:
        """``reward`` is the return the advantages start from (weights and judge included, before any KL);
        ``rewards/<name>/mean`` and ``/std`` the raw score of each reward function, as TRL logs them. ``accuracy``,
        the episode shapes and the printed samples describe ``sampled`` (the policy's own episodes, before any
        reference replaced one)."""
        episodes = [t.episode for t in trajectories]
        sampled_episodes = [t.episode for t in sampled]
        names = list(dict.fromkeys(name for e in episodes for name in e.reward_components))
        components = {name: [e.reward_components.get(name, math.nan) for e in episodes] for name in names}
        if judged is not None:
            components["judge"] = [sum(steps) for steps in judged]
        local = {
            "reward": list(returns),
            "accuracy": [float(e.correct) for e in sampled_episodes],
            "steps_per_episode": [float(len(e.steps)) for e in sampled_episodes],
            "tokens_per_episode": [float(t.num_policy_tokens) for t in sampled],
            "calculator_calls": [float(sum(s.calc_calls for s in e.steps)) for e in sampled_episodes],
        }
        for reason in (r.value for r in EndReason):
            local[f"end/{reason}"] = [float(end_reason(e) == reason) for e in sampled_episodes]
        tool_envs = [t.env for t in sampled if hasattr(t.env, "tool_failures")]  # tool-calling chats, as TRL logs
        if tool_envs:
            local["tools/call_frequency"] = [float(env.tool_calls) for env in tool_envs]
            # gathered beside the reward components, logged as failures per call (a ratio of sums, as TRL's)
            components["tools/failures"] = [float(env.tool_failures) for env in tool_envs]
        parts = [(local, components)]
        if self.accelerator.num_processes > 1:
            parts = gather_object(parts)
        if tool_envs:
            calls = sum(v for part, _ in parts for v in part["tools/call_frequency"])
            failures = sum(v for _, part in parts for v in part.pop("tools/failures"))
            self.add("tools/failure_frequency", failures / calls if calls else 0.0)
        for key in local:
            values = [v for part, _ in parts for v in part[key]]
            self.add(key, sum(values) / max(len(values), 1))
        for name in dict.fromkeys(name for _, part in parts for name in part):
            values = [v for _, part in parts for v in part.get(name, []) if not math.isnan(v)]
            if values:
                mean = sum(values) / len(values)
                self.add(f"rewards/{name}/mean", mean)
                self.add(f"rewards/{name}/std", population_std(values))
        self.add("reward_std", population_std([v for part, _ in parts for v in part["reward"]]))
        self.samples = [
            {"question": e.row.get("question", ""), "completion": e.completion, "reward": e.final_reward}
            for e in sampled_episodes[: max(samples_to_print, 0)]
        ]

    def flush(self, logs: dict[str, float], step: int, *, is_main: bool, wandb: bool) -> None:
        """Average the collected values into ``logs``, print the samples (rank 0) and log them as a table."""
        for key, values in self.values.items():
            if values:
                logs[key] = sum(values) / len(values)
        self.values.clear()
        if not (self.samples and is_main):
            return
        for sample in self.samples:  # tqdm.write keeps the progress bar below the text
            tqdm.write(
                f"[step {step}] sample, reward {sample['reward']:.2f}\n"
                f"  Q: {sample['question']}\n  A: {sample['completion'].strip()}"
            )
        if wandb:
            _log_samples_table(self.samples, step)


def append_rollouts(
    output_dir: str | Path, rank: int, step: int, trajectories: Sequence[Trajectory], extra: dict[str, list]
) -> None:
    """The rollout buffer cache: one JSON line per episode, for analysis (each process writes its own file)."""
    name = "rollouts.jsonl" if rank == 0 else f"rollouts-rank{rank}.jsonl"
    path = Path(output_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    episodes = [t.episode for t in trajectories]
    with path.open("a", encoding="utf-8") as handle:
        for i, e in enumerate(episodes):
            record = {
                "step": step,
                "group_id": e.group_id,
                "question": e.row.get("question"),
                "answer": e.row.get("answer"),
                "steps": [s.text for s in e.steps],
                "final_answer": e.final_answer,
                "correct": e.correct,
                "reward": e.final_reward,
                "end_reason": end_reason(e),
            }
            record.update({column: values[i] for column, values in extra.items() if len(values) == len(episodes)})
            handle.write(json.dumps(record) + "\n")


def _log_samples_table(samples: list[dict], step: int) -> None:
    import wandb

    if wandb.run is not None:
        table = wandb.Table(columns=["step", "question", "completion", "reward"])
        for s in samples:
            table.add_data(step, s["question"], s["completion"], s["reward"])
        wandb.log({"samples": table}, commit=False)


def population_std(values: Sequence[float]) -> float:
    """Population standard deviation (0 for fewer than two values): the spread of what was observed."""
    if not values:
        return 0.0
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5


def end_reason(episode: Any) -> str | None:
    reason = episode.end_reason
    return getattr(reason, "value", reason)
