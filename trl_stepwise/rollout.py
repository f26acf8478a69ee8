"""Batched stepwise generation over an ``EnvBatch``: the hot path of training and evaluation.

One decoding loop advances every active episode by one token per model call:

* the shared few-shot prefix is encoded once and its key/value cache is shared by all episodes of a chunk;
* each episode keeps its own cache for the steps already written, so a new step never re-encodes the prompt;
* a step ends at the step delimiter (or EOS, or ``max_step_tokens``) and is handed to the environment at once;
  with ``step_delimiter=None`` ("direct" mode) nothing is split: the whole solution is one step that ends at EOS,
  ``max_step_tokens``, or the end of the line that gives the final answer;
  the episode then goes on writing its next step in the same loop, or leaves the batch when it is done, so
  finished episodes cost nothing;
* when a step opens a calculation (``<<expr=``), the environment's calculator result is fed as forced tokens,
  marked ``from_policy=False`` so the trainer excludes them from the loss.

The engine knows nothing about grading; it returns one ``Trajectory`` (token ids, policy mask, step index per
token, and the environment's ``Episode`` record) per episode.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from trl_stepwise import grading
from trl_stepwise.envs import EnvBatch, Episode, Segment, StepAction, StepwiseMathEnv
from trl_stepwise.kv_cache import grouped_query_attention, growing_cache
from trl_stepwise.prompting import PromptBuilder

PRUNE_AT = 0.75  # shrink the batch once a quarter of its rows have finished


@dataclass
class SamplingConfig:
    """How steps are sampled; the same settings serve training rollouts and evaluation."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_step_tokens: int = 96
    batch_size: int = 64
    bf16: bool = False
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class Trajectory:
    """One episode as tokens: what the policy saw (prompt) and wrote (completion), with the loss mask."""

    episode: Episode
    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    policy_mask: list[bool] = field(default_factory=list)
    step_index: list[int] = field(default_factory=list)

    @property
    def num_policy_tokens(self) -> int:
        return sum(self.policy_mask)


@dataclass
class RolloutStats:
    """Counts for throughput figures: one definition used by logs, evaluation and benchmarks."""

    generated_tokens: int = 0
    forced_tokens: int = 0
    prompt_tokens: int = 0
    model_calls: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Row:
    """Decoding state of one episode inside the loop."""

    index: int
    trajectory: Trajectory
    step_ids: list[int] = field(default_factory=list)
    step_policy: list[bool] = field(default_factory=list)
    forced: list[int] = field(default_factory=list)
    step_number: int = 0
    last_token: int = 0


class StepwiseRollout:
    """Generate stepwise episodes for a batch of problems with one model, as fast as this machine allows."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        prompt_builder: PromptBuilder,
        sampling: SamplingConfig | None = None,
        step_delimiter: str | None = "\n",
        calculator: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.prompt_builder = prompt_builder
        self.sampling = sampling or SamplingConfig()
        self.step_delimiter = step_delimiter
        self.calculator = calculator
        self.eos_ids = _eos_token_ids(model, tokenizer)
        self.stats = RolloutStats()
        self._generator: torch.Generator | None = None

    # ------------------------------------------------------------------ public API
    def run(
        self,
        make_env: Callable[[], StepwiseMathEnv],
        rows: Sequence[dict],
        group_ids: Sequence[int] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[Trajectory]:
        """Play one episode per row to the end; ``progress(n)`` is called as episodes finish."""
        envs = EnvBatch(make_env, rows, group_ids=group_ids)
        trajectories: list[Trajectory | None] = [None] * len(rows)
        by_prefix: dict[str, list[int]] = {}
        suffix_ids: dict[int, list[int]] = {}
        for index, row in enumerate(rows):
            prefix, suffix = self.prompt_builder.render_parts(row["question"])
            by_prefix.setdefault(prefix, []).append(index)
            suffix_ids[index] = self._encode(suffix)
        was_training = self.model.training
        self.model.eval()
        started = time.perf_counter()
        try:
            with torch.no_grad(), self._autocast(), grouped_query_attention():
                for prefix, indices in by_prefix.items():
                    prefix_ids = self._encode(prefix)
                    for start in range(0, len(indices), self.sampling.batch_size):
                        chunk = indices[start : start + self.sampling.batch_size]
                        for index in chunk:
                            trajectories[index] = Trajectory(
                                episode=envs.episodes()[index], prompt_ids=prefix_ids + suffix_ids[index]
                            )
                        self._decode_chunk(envs, prefix_ids, chunk, suffix_ids, trajectories, progress)
        finally:
            self.stats.seconds += time.perf_counter() - started
            if was_training:
                self.model.train()
        episodes = envs.episodes()
        for trajectory, episode in zip(trajectories, episodes, strict=True):
            trajectory.episode = episode
        return trajectories  # type: ignore[return-value]

    # ------------------------------------------------------------------ decoding loop
    def _decode_chunk(
        self,
        envs: EnvBatch,
        prefix_ids: list[int],
        chunk: list[int],
        suffix_ids: dict[int, list[int]],
        trajectories: list[Trajectory | None],
        progress: Callable[[int], None] | None,
    ) -> None:
        device = self.model.device
        rows = [_Row(index=i, trajectory=trajectories[i]) for i in chunk]  # type: ignore[arg-type]
        cache = self._prefix_cache(prefix_ids, len(rows))
        prefix_len = len(prefix_ids)
        width = max(len(suffix_ids[r.index]) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), prefix_len + width), dtype=torch.long)
        mask[:, :prefix_len] = 1
        for b, row in enumerate(rows):
            ids = suffix_ids[row.index]
            input_ids[b, width - len(ids) :] = torch.tensor(ids)
            mask[b, prefix_len + width - len(ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        input_ids, mask = input_ids.to(device), mask.to(device)
        logits = self._forward(input_ids, mask, positions[:, prefix_len:].to(device), cache)
        self.stats.prompt_tokens += prefix_len + sum(len(suffix_ids[r.index]) for r in rows)
        next_position = positions[:, -1].to(device) + 1

        finished = [False] * len(rows)
        while True:
            tokens = self._sample(logits)
            for b, row in enumerate(rows):
                if finished[b]:
                    continue
                if row.forced:
                    token, from_policy = row.forced.pop(0), False
                    self.stats.forced_tokens += 1
                else:
                    token, from_policy = int(tokens[b]), True
                    self.stats.generated_tokens += 1
                row.last_token = token
                if not self._advance(envs, row, token, from_policy):
                    finished[b] = True
                    if progress is not None:
                        progress(1)
            alive = [b for b in range(len(rows)) if not finished[b]]
            if not alive:
                break
            if len(alive) <= PRUNE_AT * len(rows):  # drop finished rows, in bulk: each prune copies the cache
                index = torch.tensor(alive, device=device)
                cache.batch_select_indices(index)
                mask, next_position = mask[index], next_position[index]
                rows = [rows[b] for b in alive]
                finished = [False] * len(rows)
            feed = torch.tensor([[row.last_token] for row in rows], device=device)
            mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=device)], dim=1)
            logits = self._forward(feed, mask, next_position[:, None], cache)
            next_position = next_position + 1

    def _advance(self, envs: EnvBatch, row: _Row, token: int, from_policy: bool) -> bool:
        """Record one token; close the step when it ends. Returns whether the episode goes on."""
        trajectory = row.trajectory
        trajectory.completion_ids.append(token)
        trajectory.policy_mask.append(from_policy)
        trajectory.step_index.append(row.step_number)
        row.step_ids.append(token)
        row.step_policy.append(from_policy)
        if row.forced:
            return True
        eos = from_policy and token in self.eos_ids
        text = self._decode(row.step_ids)
        if not eos and not self._step_ended(text):
            if self.calculator and from_policy:
                inserted = envs.calculator_insert(row.index, text)
                if inserted:
                    row.forced = self._encode(inserted)
                    return True
            if sum(row.step_policy) < self.sampling.max_step_tokens:
                return True
        action = StepAction(
            text=text, eos=eos, num_tokens=sum(row.step_policy), segments=self._segments(row.step_ids, row.step_policy)
        )
        _, _, done, _ = envs.step({row.index: action})[row.index]
        row.step_ids, row.step_policy = [], []
        row.step_number += 1
        return not done

    def _step_ended(self, text: str) -> bool:
        if self.step_delimiter is not None:
            return self.step_delimiter in text
        # Direct mode: stop once a finished line holds the final answer, so the model cannot run on past it.
        return text.endswith("\n") and grading.extract_final_answer(text) is not None

    def _segments(self, ids: list[int], policy: list[bool]) -> list[Segment]:
        segments: list[Segment] = []
        start = 0
        for end in range(1, len(ids) + 1):
            if end == len(ids) or policy[end] != policy[start]:
                segments.append(Segment(text=self._decode(ids[start:end]), from_policy=policy[start]))
                start = end
        return segments

    # ------------------------------------------------------------------ model helpers
    def _prefix_cache(self, prefix_ids: list[int], batch: int) -> DynamicCache:
        """Encode the shared prefix once and repeat its key/value cache over the batch."""
        cache = growing_cache(self.model.config)
        if not prefix_ids:  # nothing shared (e.g. a template that renders few-shot turns unstably): start empty
            return cache
        ids = torch.tensor([prefix_ids], dtype=torch.long, device=self.model.device)
        self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        self.stats.model_calls += 1
        cache.batch_repeat_interleave(batch)
        return cache

    def _forward(
        self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.stats.model_calls += 1
        return out.logits[:, -1, :].float()

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        if self.sampling.greedy:
            return logits.argmax(-1).cpu()
        logits = logits / self.sampling.temperature
        if self.sampling.top_k > 0:
            kth = torch.topk(logits, min(self.sampling.top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.sampling.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_logits.softmax(-1) > self.sampling.top_p
            logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
        return torch.multinomial(logits.softmax(-1), 1, generator=self._rng(logits.device)).squeeze(-1).cpu()

    def _rng(self, device: torch.device) -> torch.Generator | None:
        if self.sampling.seed is None:
            return None
        if self._generator is None:
            self._generator = torch.Generator(device=device).manual_seed(self.sampling.seed)
        return self._generator

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.sampling.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.model.device.type, dtype=torch.bfloat16)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i not in self.eos_ids], skip_special_tokens=False)


def _eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every id that ends a turn: the tokenizer's EOS and the generation config's (chat models often have several)."""
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(int(i) for i in source)
    return ids
