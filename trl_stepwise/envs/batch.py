"""A fixed set of episodes stepped together, so the caller can generate the next step of all of them in one call."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from trl_stepwise.envs.base import Episode, Observation, Segment
from trl_stepwise.envs.math_env import StepwiseMathEnv


@dataclass
class StepAction:
    """One episode's next step, as `StepwiseMathEnv.step` takes it."""

    text: str
    eos: bool = False
    num_tokens: int | None = None
    segments: list[Segment] | None = None


class EnvBatch:
    """N environments, one per row; episode i keeps index i (its `episode_id`) however the others finish."""

    def __init__(
        self,
        make_env: Callable[[], StepwiseMathEnv],
        rows: Sequence[Mapping[str, Any]],
        group_ids: Sequence[int] | None = None,
    ) -> None:
        if group_ids is not None and len(group_ids) != len(rows):
            raise ValueError(f"got {len(rows)} rows but {len(group_ids)} group_ids")
        self.envs = [make_env() for _ in rows]
        if len({id(env) for env in self.envs}) != len(self.envs):
            raise ValueError("make_env must return a new environment on every call")
        for index, (env, row) in enumerate(zip(self.envs, rows, strict=True)):
            env.reset(**row)
            env.episode.episode_id = index
            env.episode.group_id = None if group_ids is None else group_ids[index]

    def __len__(self) -> int:
        return len(self.envs)

    def active(self) -> list[int]:
        """Indices of unfinished episodes, ascending."""
        return [i for i, env in enumerate(self.envs) if not env.done]

    def observations(self) -> dict[int, Observation]:
        """Observations of the active episodes only, keyed by index."""
        return {i: self.envs[i].observation() for i in self.active()}

    def calculator_insert(self, index: int, partial_step: str) -> str | None:
        """See `StepwiseMathEnv.calculator_insert`; only for an active episode."""
        self._check_active([index])
        return self.envs[index].calculator_insert(partial_step)

    def step(self, actions: Mapping[int, StepAction]) -> dict[int, tuple[Observation, float, bool, dict[str, Any]]]:
        """Step the given active episodes (any subset); nothing is stepped if any index is finished or unknown."""
        self._check_active(actions)
        return {
            i: self.envs[i].step(a.text, eos=a.eos, num_tokens=a.num_tokens, segments=a.segments)
            for i, a in sorted(actions.items())
        }

    @property
    def done(self) -> bool:
        return all(env.done for env in self.envs)

    def episodes(self) -> list[Episode]:
        """All episodes in the original row order (the same objects the environments fill in)."""
        return [env.episode for env in self.envs]

    def _check_active(self, indices: Iterable[int]) -> None:
        indices = list(indices)
        unknown = [i for i in indices if not (isinstance(i, int) and 0 <= i < len(self.envs))]
        if unknown:
            raise IndexError(f"episode indices {unknown} are out of range for a batch of {len(self.envs)}")
        finished = [i for i in indices if self.envs[i].done]
        if finished:
            raise RuntimeError(f"episodes {finished} are finished; only active ones {self.active()} can be stepped")
