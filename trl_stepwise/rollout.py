"""Stepwise episodes over any generation engine: the hot path of training and evaluation.

The loop asks an engine (``trl_stepwise.engines``) to extend every active episode, and reads what comes back token by
token, exactly as if it had been sampled one token at a time:

* a step ends at the step delimiter (or EOS, or ``max_step_tokens`` tokens) and is handed to the environment; with
  ``step_delimiter=None`` ("direct" mode) the whole solution is one step that ends at EOS, ``max_step_tokens``, or
  the end of the line that gives the final answer; tokens sampled after the episode ended are dropped;
* when a step ends with a complete call of one of the environment's tools (the calculator's ``<<expr=``), the
  tool's result is appended as forced tokens (``policy_mask`` False: the trainer excludes them from the loss; they
  count towards the step and episode token budgets) and the engine continues the sequence from there;
* when the environment replies to a step (a non-empty observation), the reply is appended the same way, after the
  step, and the next step starts after it;
* a chat environment (TRL's tools and ``environment_factory``) starts from its messages rendered with the tool
  schemas by the tokenizer's template; at each end of turn its calls are read in the template's format and its reply
  (tool results, a user turn) is appended as the template's new tokens only (``chat_turns.ChatTurns``);
* an engine whose stops are cheap (transformers) is asked to stop at every step delimiter so a finished episode leaves
  the batch at once; a streaming engine (vLLM in process) reports every token as it comes and the loop cuts a
  sequence at the token where the environment acts (no stop strings); other engines (a vLLM server) stop at the
  tools' own ``stop_strings``. Continuous batching queues each continuation while the other episodes keep decoding;
* a checked tool (the calculator) lets a streaming engine run on through the call: when the policy writes exactly the
  tool's result itself, those tokens are kept and masked as if inserted; otherwise the sequence is cut after the call
  and the result inserted. The trajectory is the same either way.

Masks come from token ids: the policy is trained on exactly the ids it sampled. Text is decoded from those ids with
the tokens before it as context, so the pieces join exactly (SentencePiece tokenizers drop a leading space when a
piece is decoded alone).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trl_stepwise import grading
from trl_stepwise.chat_turns import ChatTurns
from trl_stepwise.engines import (
    KEEP_SAMPLING,
    Continuation,
    Deferred,
    GenerationEngine,
    GenerationOutput,
    GenerationRequest,
    SamplingConfig,
    StopPolicy,
    TransformersEngine,
)
from trl_stepwise.engines.base import _KeepSampling
from trl_stepwise.envs import Env, EnvSession, Episode, Segment
from trl_stepwise.envs.chat_env import PendingToolMessages
from trl_stepwise.prompting import PromptBuilder

__all__ = ["RolloutStats", "SamplingConfig", "StepwiseRollout", "Trajectory"]

ENCODE_ANCHOR = "0"  # encoded before inserted text and dropped, so the text is not encoded as a new word
DECODE_CONTEXT = 4  # tokens decoded before a piece so that its first character (e.g. a leading space) is right


@dataclass
class Trajectory:
    """One episode as tokens: what the policy saw (prompt) and wrote (completion), with the loss mask."""

    episode: Episode
    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    policy_mask: list[bool] = field(default_factory=list)
    step_index: list[int] = field(default_factory=list)
    sampling_logps: list[float] = field(default_factory=list)  # the engine's log-prob of each token (0 if forced)
    engine_sampled: bool = True  # False for a reference solution played in: its log-probs are not the engine's
    env: Any = None  # the environment played (TRL's reward functions receive it as ``environments``)

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
    engine_requests: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Play:
    """Book-keeping of one episode while it is played."""

    index: int
    trajectory: Trajectory
    step_start: int = 0  # where the current step starts in completion_ids
    step_number: int = 0
    turn_start: int = 0  # where the current chat turn starts in completion_ids
    read: int = 0  # tokens of the engine's current request already read
    pending: list[int] | None = None  # a checked tool's result, being compared with what the policy samples


class StepwiseRollout:
    """Play stepwise episodes for a batch of problems with one engine (default: the model's own decoding loop)."""

    def __init__(
        self,
        model: PreTrainedModel | None,
        tokenizer: PreTrainedTokenizerBase,
        prompt_builder: PromptBuilder,
        sampling: SamplingConfig | None = None,
        step_delimiter: str | None = "\n",
        calculator: bool = True,
        engine: GenerationEngine | None = None,
        chat: ChatTurns | None = None,
    ) -> None:
        if engine is None:
            if model is None:
                raise ValueError("StepwiseRollout needs a model or an engine")
            engine = TransformersEngine(model, tokenizer)
        self.engine = engine
        self.tokenizer = tokenizer
        self.prompt_builder = prompt_builder
        self.sampling = sampling or SamplingConfig()
        self.step_delimiter = step_delimiter
        self.calculator = calculator
        self.chat = chat  # built on the first chat episode when not given
        self.eos_ids = set(engine.stop_token_ids)
        # A streaming engine is cut at the right token without stop strings, and runs on through a checked tool's call
        # (the calculator's): the loop keeps the tokens when they are exactly the result, so generation pauses only
        # where the policy gets it wrong. Other engines stop at the call (their stop strings say where).
        self.stop_policy = getattr(engine, "stop_policy", StopPolicy.ENVIRONMENT)
        self.engine_streams = self.stop_policy is StopPolicy.STREAMING
        # An engine that appends tokens to a running request (colocated vLLM) takes a tool result at once: nothing
        # is re-encoded, so there is no pause to spare by waiting for the policy to write the result itself.
        self.insert_at_once = getattr(engine, "forces_in_place", False)
        self.stats = RolloutStats()

    # ------------------------------------------------------------------ public API
    def with_engine(self, engine: GenerationEngine) -> StepwiseRollout:
        """The same prompts, limits, step delimiter and tools over another engine (e.g. a ``ReferenceEngine``)."""
        return StepwiseRollout(
            None,
            self.tokenizer,
            self.prompt_builder,
            self.sampling,
            self.step_delimiter,
            self.calculator,
            engine,
            self.chat,
        )

    def run(
        self,
        make_env: Callable[[], Env] | Sequence[Callable[[], Env]],
        rows: Sequence[dict],
        group_ids: Sequence[int] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[Trajectory]:
        """Play one episode per row to the end; ``progress(n)`` is called as episodes finish.

        ``make_env`` builds a new environment per episode: one factory for all rows, one per row, or an ``EnvRouter``
        that picks each row's own (mixed runs).
        """
        envs = self._sessions(make_env, rows, group_ids)
        if getattr(self.engine, "accepts_deferred", False):
            for session in envs:
                if hasattr(session.env, "defer_tool_calls"):
                    session.env.defer_tool_calls = True
        plays, requests = [], []
        prefix_ids: dict[str, list[int]] = {}
        for index, session in enumerate(envs):
            episode = session.episode
            if session.chat:
                prompt_ids = self.chat_turns().prompt_ids(session.prompt_messages, session.env.tool_functions)
            else:
                prefix, suffix = self.prompt_builder.render_parts(session.problem)
                if prefix not in prefix_ids:
                    prefix_ids[prefix] = self._encode(prefix)
                prompt_ids = prefix_ids[prefix] + self._encode(suffix)
            trajectory = Trajectory(episode=episode, prompt_ids=prompt_ids, env=session.env)
            play = _Play(index=index, trajectory=trajectory)
            plays.append(play)
            requests.append(GenerationRequest(index, prompt_ids, *self._limits(envs, play)))
            self.stats.prompt_tokens += len(prompt_ids)

        def on_stop(output: GenerationOutput) -> Continuation | None | _KeepSampling | Deferred:
            play = plays[output.request_id]
            answer = self._consume(envs, play, output)
            if answer is KEEP_SAMPLING:
                return answer
            self.stats.engine_requests += 1
            play.read = 0  # the engine starts a new request (or none)
            if answer is None and progress is not None:
                progress(1)
            return answer

        calls_before = getattr(self.engine, "model_calls", 0)
        started = time.perf_counter()
        try:
            self.engine.generate(requests, self.sampling, on_stop)
        finally:
            self.stats.seconds += time.perf_counter() - started
            self.stats.model_calls += getattr(self.engine, "model_calls", 0) - calls_before
        unfinished = [play.index for play in plays if not envs[play.index].done]
        if unfinished:
            raise RuntimeError(f"the engine stopped before episodes {unfinished} ended")
        return [play.trajectory for play in plays]

    def chat_turns(self) -> ChatTurns:
        """The template's renderer and tool-call reader (built once, on the first chat episode)."""
        if self.chat is None:
            self.chat = ChatTurns(self.tokenizer)
        return self.chat

    def _sessions(self, make_env, rows: Sequence[dict], group_ids: Sequence[int] | None) -> list[EnvSession]:
        if group_ids is not None and len(group_ids) != len(rows):
            raise ValueError(f"got {len(rows)} rows but {len(group_ids)} group_ids")
        if hasattr(make_env, "for_row"):  # an EnvRouter: each row picks its environment
            envs = [make_env.for_row(row) for row in rows]
        else:
            factories = list(make_env) if isinstance(make_env, Sequence) else [make_env] * len(rows)
            if len(factories) != len(rows):
                raise ValueError(f"got {len(rows)} rows but {len(factories)} environment factories")
            envs = [factory() for factory in factories]
        if len({id(env) for env in envs}) != len(envs):
            raise ValueError("make_env must return a new environment on every call")
        return [
            EnvSession(env, row, i, None if group_ids is None else group_ids[i], tools=self.calculator)
            for i, (env, row) in enumerate(zip(envs, rows, strict=True))
        ]

    # ------------------------------------------------------------------ reading the engine's output
    def _consume(
        self, envs: list[EnvSession], play: _Play, output: GenerationOutput
    ) -> Continuation | None | _KeepSampling | Deferred:
        """Read the tokens sampled since the request started (from ``play.read`` on); say how to go on.

        Returns None when the episode has ended, a ``Continuation`` when the request must be cut and restarted (a
        tool result or a reply to insert), ``KEEP_SAMPLING`` when a streaming engine's partial output needs nothing.
        """
        tokens, logprobs = output.token_ids, output.logprobs
        if len(tokens) != len(logprobs):
            raise ValueError(f"the engine returned {len(tokens)} tokens but {len(logprobs)} log-probs")
        eos = False
        while play.read < len(tokens):
            if play.pending is not None:  # the policy is writing a checked tool's result: is it exactly the result?
                got = tokens[play.read : play.read + len(play.pending)]
                if got != play.pending[: len(got)]:  # no: cut at the call and insert the result
                    return self._insert(envs, play, play.pending, play.read)
                if len(got) < len(play.pending):
                    break  # so far so good: wait for more tokens
                self._append_forced(play, play.pending)  # yes: keep what follows, the result masked
                play.read += len(play.pending)
                play.pending = None
                if not self._step_full(envs, play):
                    continue
            else:
                token = tokens[play.read]
                self._append(play, token, logprobs[play.read], from_policy=True)
                self.stats.generated_tokens += 1
                play.read += 1
                eos = token in self.eos_ids
                text = self._step_text(play)
                if not eos and not self._step_ended(text):
                    inserted, checked = envs[play.index].tool_insert(text)
                    if inserted:
                        forced = self._encode_after(play.trajectory.completion_ids, inserted)
                        if not checked or not self.engine_streams or self.insert_at_once:
                            # the rest of this output (if any) was sampled without the result: drop it
                            return self._insert(envs, play, forced, play.read)
                        play.pending = forced
                        continue
                    if not self._step_full(envs, play):
                        continue
            done, reply = self._close_step(envs, play, eos)
            if done:
                return None
            if reply:  # the environment answered the step: the rest of this output was sampled without it
                return self._reply(envs, play, reply, play.read)
        if not output.finished:
            return KEEP_SAMPLING
        if play.pending is not None:  # the output ended inside (or right at) the checked result: insert it
            return self._insert(envs, play, play.pending, play.read)
        if output.finish_reason == "length" and not tokens:
            # the engine cannot extend this sequence any further (its context is full): end the episode
            self._close_step(envs, play, eos=False, context_full=True)
            return None
        return Continuation([], *self._limits(envs, play))

    def _insert(
        self, envs: list[EnvSession], play: _Play, forced: list[int], keep: int
    ) -> Continuation | Deferred | None:
        """Append tool output as forced tokens; they count towards the step's token limit."""
        play.pending = None
        self._append_forced(play, forced)
        if self._step_full(envs, play):
            done, reply = self._close_step(envs, play, eos=False)
            if done:
                return None
            if reply:
                return self._reply(envs, play, reply, keep, forced)
        return Continuation(forced, *self._limits(envs, play), keep=keep)

    def _reply(
        self,
        envs: list[EnvSession],
        play: _Play,
        reply: str | list[dict] | PendingToolMessages,
        keep: int,
        forced_before: Sequence[int] = (),
    ) -> Continuation | Deferred:
        """Append the environment's reply as forced tokens after the step just closed; the next step follows it.
        Tool calls still running give a ``Deferred`` answer: the engine decodes the other episodes meanwhile."""
        if isinstance(reply, PendingToolMessages):  # the calls run while the engine decodes other episodes
            return Deferred(reply.future, lambda _: self._reply(envs, play, reply.messages(), keep, forced_before))
        ids = play.trajectory.completion_ids
        forced = self.chat_turns().reply_ids(reply) if isinstance(reply, list) else self._encode_after(ids, reply)
        start = len(ids)
        for token in forced:
            self._append(play, token, 0.0, from_policy=False, step=play.step_number - 1)
        self.stats.forced_tokens += len(forced)
        envs[play.index].add_reply(self._text(ids, start, len(ids)), len(forced))
        play.step_start = play.turn_start = len(ids)
        return Continuation([*forced_before, *forced], *self._limits(envs, play), keep=keep)

    def _append_forced(self, play: _Play, forced: Sequence[int]) -> None:
        for token in forced:
            self._append(play, token, 0.0, from_policy=False)
        self.stats.forced_tokens += len(forced)

    def _append(self, play: _Play, token: int, logp: float, from_policy: bool, step: int | None = None) -> None:
        trajectory = play.trajectory
        trajectory.completion_ids.append(token)
        trajectory.policy_mask.append(from_policy)
        trajectory.step_index.append(play.step_number if step is None else step)
        trajectory.sampling_logps.append(logp)

    def _close_step(
        self, envs: list[EnvSession], play: _Play, eos: bool, context_full: bool = False
    ) -> tuple[bool, str | list[dict]]:
        """Hand the current step to the environment; returns whether the episode ended and its reply."""
        segments = self._segments(play)
        text = "".join(s.text for s in segments)
        session = envs[play.index]
        turn = None
        if session.chat and (eos or context_full):  # the whole turn, read in the template's tool-call format
            ids = play.trajectory.completion_ids
            turn = self.chat_turns().parse(self._text(ids, play.turn_start, len(ids)))
        reply, done = session.step(
            text,
            eos=eos,
            num_tokens=self._step_length(play),
            segments=segments,
            context_full=context_full,
            turn=turn,
        )
        play.step_start = len(play.trajectory.completion_ids)
        play.step_number += 1
        return done, reply

    def _limits(self, envs: list[EnvSession], play: _Play) -> tuple[int, tuple[str, ...]]:
        """``(max_tokens, stop_strings)`` of the next request: stop where the environment must act."""
        session = envs[play.index]
        episode = session.episode
        in_step = self._step_length(play)
        step_limit = self.sampling.max_step_tokens
        steps_left = max(session.max_steps - len(episode.steps), 1)
        max_tokens = steps_left * step_limit - in_step
        budget = session.max_episode_tokens
        if budget is not None:
            max_tokens = min(max_tokens, budget - episode.num_tokens - in_step)
        stops: list[str] = []
        if self.stop_policy is StopPolicy.EVERY_STEP:
            # also at the step's token limit: such an engine feeds every sampled token at once and cannot take back
            # tokens sampled past a step the environment answers (a reply must follow the step, not what came after)
            max_tokens = min(max_tokens, step_limit - in_step)
            stops.append(self.step_delimiter or "\n")
        if not self.engine_streams:  # a streaming engine is cut at the right token without stop strings
            stops.extend(s for s in session.stop_strings(self._step_text(play)) if s not in stops)
        return max(max_tokens, 1), tuple(stops)

    # ------------------------------------------------------------------ text of the current step
    def _step_full(self, envs: list[EnvSession], play: _Play) -> bool:
        """The step has reached its token limit, or the episode its token budget: a hard cap, as TRL's
        ``max_completion_length`` (the step is cut there and the episode ends as truncated)."""
        length = self._step_length(play)
        session = envs[play.index]
        budget = session.max_episode_tokens
        full_budget = budget is not None and session.episode.num_tokens + length >= budget
        return length >= self.sampling.max_step_tokens or full_budget

    def _step_length(self, play: _Play) -> int:
        return len(play.trajectory.completion_ids) - play.step_start

    def _step_text(self, play: _Play) -> str:
        return self._text(play.trajectory.completion_ids, play.step_start, len(play.trajectory.completion_ids))

    def _step_ended(self, text: str) -> bool:
        if self.step_delimiter is not None:
            return self.step_delimiter in text
        # Direct mode: stop once a finished line holds the final answer, so the model cannot run on past it.
        return text.endswith("\n") and grading.extract_final_answer(text) is not None

    def _segments(self, play: _Play) -> list[Segment]:
        """The step split into runs of policy and forced tokens, decoded so that they join to the step's text."""
        ids, mask = play.trajectory.completion_ids, play.trajectory.policy_mask
        segments: list[Segment] = []
        start = play.step_start
        for end in range(start + 1, len(ids) + 1):
            if end == len(ids) or mask[end] != mask[start]:
                segments.append(Segment(text=self._text(ids, start, end), from_policy=mask[start]))
                start = end
        return segments

    def _text(self, ids: list[int], start: int, end: int) -> str:
        """Text of ``ids[start:end]`` as it reads after ``ids[:start]`` (end-of-turn tokens left out)."""
        context = max(0, start - DECODE_CONTEXT)
        before = self._decode(ids[context:start])
        full = self._decode(ids[context:end])
        if full.startswith(before):
            return full[len(before) :]
        return self._decode(ids[start:end])  # the context ends inside a character: decode the piece alone

    def _encode_after(self, ids: list[int], text: str) -> list[int]:
        """Token ids that read as ``text`` right after ``ids``: SentencePiece would otherwise add a leading space."""
        plain = self._encode(text)
        if self._text(ids + plain, len(ids), len(ids) + len(plain)) == text:
            return plain
        anchor = self._encode(ENCODE_ANCHOR)
        anchored = self._encode(ENCODE_ANCHOR + text)
        candidate = anchored[len(anchor) :]
        if (
            anchored[: len(anchor)] == anchor
            and self._text(ids + candidate, len(ids), len(ids) + len(candidate)) == text
        ):
            return candidate
        return plain

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i not in self.eos_ids], skip_special_tokens=False)
