"""A running vLLM server (``vllm_mode="server"``, started with ``trl vllm-serve``) as a generation engine.

Each sequence is one ``/v1/completions`` request with token ids in and out (``return_token_ids``); requests run
concurrently, so the server batches them continuously, and a continuation is sent as soon as its request returns.
Weights are pushed with TRL's ``VLLMClient`` (its NCCL weight-transfer engine: GPU machines only).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import requests
import torch

from trl_stepwise.engines.base import (
    Deferred,
    GenerationOutput,
    GenerationRequest,
    OnStop,
    SamplingConfig,
    StopPolicy,
    checked_logprob,
    derive_seed,
    eos_token_ids,
)

SERVE_HINT = (
    "start it with `trl vllm-serve --model <model>` (or `VLLM_SERVER_DEV_MODE=1 vllm serve <model> "
    """--weight-transfer-config '{"backend": "nccl"}' --logprobs-mode processed_logprobs`)"""
)

CONCURRENCY = 64  # sequences in flight at once


class VLLMServerError(RuntimeError):
    """The server cannot be reached or refused a request; the message names the URL."""


class VLLMServerEngine:
    """Generation on a vLLM server; ``sync_weights`` pushes the policy through TRL's client."""

    stop_policy = StopPolicy.ENVIRONMENT
    accepts_deferred = True  # answers may be ``Deferred`` (see engines.base)

    def __init__(self, base_url: str, tokenizer: Any, *, timeout: float = 240.0, generation_config: Any = None):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.tokenizer = tokenizer
        self.stop_token_ids = eos_token_ids(tokenizer, generation_config)
        self.session = requests.Session()
        self.model = wait_for_server(self.session, self.base_url, timeout)
        self._client = None
        self.weight_syncs = 0

    def generate(self, requests_: Sequence[GenerationRequest], sampling: SamplingConfig, on_stop: OnStop) -> None:
        with ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:
            running: dict[Future, tuple[GenerationRequest, list[int], int]] = {}
            parked: dict[Future, tuple[Deferred, GenerationRequest, list[int], int, GenerationOutput]] = {}
            for request in requests_:
                running[pool.submit(self._complete, request, sampling, 0)] = (request, list(request.prompt_ids), 0)
            while running or parked:
                done, _ = wait([*running, *parked], return_when=FIRST_COMPLETED)
                for future in done:
                    if future in parked:  # background work (tool calls) the loop's answer waited on is done
                        deferred, request, context, part, output = parked.pop(future)
                        continuation = deferred.resolve()
                    else:
                        request, context, part = running.pop(future)
                        output = future.result()
                        continuation = on_stop(output)
                    if isinstance(continuation, Deferred):
                        parked[continuation.future] = (continuation, request, context, part, output)
                        continue
                    if continuation is None:
                        continue
                    keep = len(output.token_ids) if continuation.keep is None else continuation.keep
                    context = context + output.token_ids[:keep] + list(continuation.forced_ids)
                    follow_up = GenerationRequest(
                        request.request_id, context, continuation.max_tokens, continuation.stop_strings
                    )
                    future = pool.submit(self._complete, follow_up, sampling, part + 1)
                    running[future] = (follow_up, context, part + 1)

    def _complete(self, request: GenerationRequest, sampling: SamplingConfig, part: int) -> GenerationOutput:
        """One request (``part``: how many continuations of the same sequence came before, so each draws anew)."""
        payload = {
            "model": self.model,
            "prompt": [list(request.prompt_ids)],
            "max_tokens": request.max_tokens,
            "temperature": max(sampling.temperature, 0.0),
            "top_p": sampling.top_p,
            "top_k": sampling.top_k if sampling.top_k > 0 else -1,
            "stop": list(request.stop_strings),
            "include_stop_str_in_output": True,
            "stop_token_ids": sorted(self.stop_token_ids),
            "skip_special_tokens": False,
            "logprobs": 0,
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,
        }
        if sampling.seed is not None:
            payload["seed"] = derive_seed(sampling.seed, request.request_id, part)
        response = self._post_completion(payload)
        if response.status_code != 200:
            raise VLLMServerError(f"The vLLM server at {self.base_url} refused a request: {response.text[:300]}")
        choice = response.json()["choices"][0]
        token_ids = [int(t) for t in choice["token_ids"]]
        logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
        if logprobs is None or len(logprobs) != len(token_ids):
            raise VLLMServerError(
                f"The vLLM server at {self.base_url} returned {0 if logprobs is None else len(logprobs)} log-probs "
                f"for the {len(token_ids)} tokens of request {request.request_id}; the trainer needs one per token."
            )
        logprobs = [checked_logprob(value, request.request_id, i) for i, value in enumerate(logprobs)]
        reason = "length" if choice.get("finish_reason") == "length" else "stop"
        return GenerationOutput(request.request_id, token_ids, logprobs, reason)

    def _post_completion(self, payload: dict) -> requests.Response:
        """POST a completion; a connection reset before any answer is sent once more: the server closes keep-alive
        connections left idle for a few seconds (while the trainer scores and steps), and reusing one meets a reset."""
        for attempt in (1, 2):
            try:
                return self.session.post(f"{self.base_url}/v1/completions", json=payload, timeout=self.timeout)
            except requests.RequestException as err:
                reset = isinstance(err, requests.ConnectionError) and not isinstance(err, requests.ConnectTimeout)
                if attempt == 2 or not reset:
                    raise VLLMServerError(f"The vLLM server at {self.base_url} stopped answering: {err}") from err
        raise AssertionError("unreachable: the second attempt returns or raises")

    def sync_weights(self, named_parameters: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push the policy to the server with TRL's weight-transfer client (NCCL: the trainer needs a GPU), one tensor
        at a time inside one weight update, so no second copy of the model is ever held.

        With several processes only the main one pushes (the server takes one weight-update client, as in TRL); the
        others walk the pairs too (a sharded model's tensors are gathered by every process) and all wait until the
        push is done, so no process samples the old weights."""
        from accelerate import PartialState

        if not torch.cuda.is_available():
            raise VLLMServerError(
                "vllm_mode=server pushes weights over NCCL, which needs a GPU in the trainer's process; on a CPU "
                "machine use vllm_mode=colocate."
            )
        state = PartialState()
        if not state.is_main_process:
            for _ in named_parameters:  # take part in the gathering
                pass
            state.wait_for_everyone()
            return
        if self._client is None:
            from trl.generation.vllm_client import VLLMClient

            self._client = VLLMClient(base_url=self.base_url, connection_timeout=self.timeout)
            self._client.init_communicator(device=torch.cuda.current_device())
        with self._client.weight_update():
            for name, tensor in named_parameters:
                self._client.update_named_param(name, tensor.detach())
        self._client.reset_prefix_cache()
        self.weight_syncs += 1
        state.wait_for_everyone()


def wait_for_server(session: requests.Session, base_url: str, timeout: float) -> str:
    """The served model's id, once ``/health`` answers; a clear error after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if session.get(f"{base_url}/health", timeout=5).status_code == 200:
                return session.get(f"{base_url}/v1/models", timeout=30).json()["data"][0]["id"]
        except (requests.RequestException, KeyError, IndexError, ValueError):
            pass
        if time.monotonic() >= deadline:
            raise VLLMServerError(
                f"The vLLM server at {base_url} did not answer within {timeout:g} s. Start it with "
                "`trl vllm-serve --model <model>` (or check --vllm_server_base_url / --vllm_server_host / "
                "--vllm_server_port), or raise --vllm_server_timeout."
            )
        time.sleep(min(2.0, max(deadline - time.monotonic(), 0.0)))


def check_trainable_server(base_url: str, timeout: float) -> None:
    """Refuse, before training starts, a server that cannot serve a policy being trained: one without the
    weight-transfer engine (a plain ``vllm serve``: it would keep sampling the initial weights) or that returns raw
    log-probs instead of those of the distribution it samples from."""
    session = requests.Session()
    wait_for_server(session, base_url, timeout)
    try:
        response = session.get(f"{base_url}/server_info", params={"config_format": "json"}, timeout=timeout)
    except requests.RequestException as err:
        raise VLLMServerError(f"The vLLM server at {base_url} stopped answering: {err}") from err
    if response.status_code != 200:
        raise VLLMServerError(
            f"The vLLM server at {base_url} cannot take weight updates (no /server_info: a plain `vllm serve`); "
            f"{SERVE_HINT}."
        )
    config = response.json().get("vllm_config", {})
    if config.get("weight_transfer_config") is None:
        raise VLLMServerError(
            f"The vLLM server at {base_url} has no weight-transfer engine, so it would keep sampling the initial "
            f"weights; {SERVE_HINT}."
        )
    mode = (config.get("model_config") or {}).get("logprobs_mode", "raw_logprobs")
    if mode != "processed_logprobs":
        raise VLLMServerError(
            f"The vLLM server at {base_url} returns {mode}, not the log-probs of the distribution it samples from "
            f"(processed_logprobs); {SERVE_HINT}."
        )
