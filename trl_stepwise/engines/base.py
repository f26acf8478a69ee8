"""What every generation engine takes and returns: token ids in, sampled token ids (and their log-probs) out.

An engine knows nothing about environments, steps or grading. The rollout loop hands it requests; when a request
stops (a stop string, an end-of-turn token, its token limit) the engine calls ``on_stop`` with what was sampled,
and the loop answers with a ``Continuation`` (tokens to append without sampling them, e.g. a tool result, and new
stop settings) or None when the sequence is finished. An engine with continuous batching queues the continuation at
once while the other sequences keep decoding.

A streaming engine (``StopPolicy.STREAMING``, vLLM in process) also reports every request's tokens as they are sampled
(``finish_reason`` None); the loop answers ``KEEP_SAMPLING`` to let it run on, or cuts it there (a ``Continuation``
or None) and the engine aborts it. Such an engine needs no stop strings: the loop sees each token as it comes.

The loop may also answer ``Deferred``: the answer waits on work that runs in the background (an episode's tool
calls). The engine parks that sequence, goes on with the others, and asks for the answer (``resolve()``) once it is
``ready()``; so the tool calls of many episodes run while the rest keep decoding, instead of one after another.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch


@dataclass
class SamplingConfig:
    """How tokens are sampled; the same settings serve training rollouts and evaluation, on every engine."""

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
class GenerationRequest:
    """One sequence to extend: ``prompt_ids`` is everything so far (prompt, earlier output, appended tokens)."""

    request_id: int
    prompt_ids: list[int]
    max_tokens: int
    stop_strings: tuple[str, ...] = ()


@dataclass
class GenerationOutput:
    """What was sampled for one request since it was (re)started; ``logprobs`` of the sampling distribution."""

    request_id: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None  # "stop" (a stop string or end-of-turn token), "length", or None: more tokens follow

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Continuation:
    """Go on with the same sequence: keep the first ``keep`` sampled tokens (None: all), append ``forced_ids`` (not
    sampled, e.g. a tool result) and sample again under these limits."""

    forced_ids: list[int] = field(default_factory=list)
    max_tokens: int = 1
    stop_strings: tuple[str, ...] = ()
    keep: int | None = None


class _KeepSampling:
    """The answer to a partial output that needs nothing yet: the engine keeps sampling that request."""

    def __repr__(self) -> str:
        return "KEEP_SAMPLING"


KEEP_SAMPLING = _KeepSampling()


class Deferred:
    """An answer that waits on background work (``future``): ``resolve()`` turns its result into the answer, on the
    engine's own thread, once ``ready()``."""

    def __init__(self, future: Future, resolve: Callable[[object], Continuation | None]) -> None:
        self.future = future
        self._resolve = resolve

    def ready(self) -> bool:
        return self.future.done()

    def resolve(self) -> Continuation | None:
        """The answer (waits for the work if it is still running; its exception is raised here)."""
        return self._resolve(self.future.result())

    @staticmethod
    def wait_any(deferred: Collection[Deferred], timeout: float | None = None) -> None:
        """Block until one of ``deferred`` is ready (or ``timeout`` seconds pass)."""
        if deferred:
            wait([d.future for d in deferred], timeout=timeout, return_when=FIRST_COMPLETED)


def answer_now(answer: Continuation | None | _KeepSampling | Deferred) -> Continuation | None | _KeepSampling:
    """The answer itself, waiting for a ``Deferred`` one: for engines that serve one sequence at a time."""
    return answer.resolve() if isinstance(answer, Deferred) else answer


OnStop = Callable[[GenerationOutput], "Continuation | None | _KeepSampling | Deferred"]


class StopPolicy(enum.Enum):
    """Where the rollout loop asks an engine to stop: it depends on what a stop costs the engine."""

    EVERY_STEP = "every_step"
    """Stops are free (the transformers loop keeps each sequence's cache): stop at every step delimiter and at the
    step's token limit, so finished episodes leave the batch at once and no token is sampled past a step."""
    ENVIRONMENT = "environment"
    """A stop costs a new request (a vLLM server): stop only where the environment must act (its stop strings); step
    boundaries are found in the returned ids."""
    STREAMING = "streaming"
    """The engine reports tokens as they are sampled (vLLM in process): no stop strings, the loop cuts each sequence
    at the right token and lets it run on through a tool call it can check."""


@runtime_checkable
class GenerationEngine(Protocol):
    """A generator of token ids; ``stop_policy`` says where the rollout loop asks it to stop. An engine that sets
    ``accepts_deferred = True`` takes ``Deferred`` answers (the loop then runs tool calls in the background)."""

    stop_policy: StopPolicy
    stop_token_ids: set[int]

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingConfig, on_stop: OnStop) -> None:
        """Run every request (and its continuations) to the end."""

    def sync_weights(self, named_parameters: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take new policy weights (checkpoint names, full precision) before the next generation."""


class MissingLogprobsError(RuntimeError):
    """An engine returned no (or a NaN) log-prob for a sampled token."""


def checked_logprob(value: float | None, request_id: int, position: int) -> float:
    """``value`` as a float; None or NaN raise ``MissingLogprobsError`` naming the request and the token."""
    if value is None or math.isnan(float(value)):
        raise MissingLogprobsError(
            f"the engine returned {'no' if value is None else 'a NaN'} log-prob for token {position} of request "
            f"{request_id}; the trainer needs the log-prob of every sampled token (a vLLM server must not drop them)."
        )
    return float(value)


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from several integers (run seed, step, process, request, ...): different parts give unrelated
    seeds, the same parts the same seed."""
    value = 0x9E3779B1
    for part in parts:
        value = (value * 1_000_003 ^ (int(part) & 0xFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
    value ^= value >> 29
    value = (value * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return int(value >> 33)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits (already divided by the temperature) with every token outside top-k / the top-p nucleus set to -inf.

    The one definition of the truncated sampling distribution: the transformers engine samples from it, and the
    trainer scores sampled tokens under it to compare with any engine's log-probs (vLLM applies the same rule)."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def eos_token_ids(tokenizer, generation_config=None) -> set[int]:
    """Every id that ends a turn: the tokenizer's EOS and the generation config's (chat models often have several)."""
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(int(i) for i in source)
    return ids
