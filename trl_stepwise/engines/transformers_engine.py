"""The transformers engine: a batched eager decoding loop, one model call per token, that needs nothing extra.

It is the fallback when vLLM is absent, and fast enough on CPU for small models because:

* the prompt prefix all requests of a chunk share (the few-shot examples) is encoded once and its key/value cache is
  repeated over the chunk;
* each sequence keeps its own cache while it is continued, so a continuation (a tool result, the next step) never
  re-encodes what came before: its appended tokens are fed one per model call, like sampled ones;
* the cache grows in place (``kv_cache.growing_cache``) and finished sequences leave the batch in bulk.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from trl_stepwise.engines.base import (
    Continuation,
    Deferred,
    GenerationOutput,
    GenerationRequest,
    OnStop,
    SamplingConfig,
    StopPolicy,
    eos_token_ids,
    filter_logits,
)
from trl_stepwise.kv_cache import grouped_query_attention, growing_cache, shared_prefix_length

PRUNE_AT = 0.75  # shrink the batch once a quarter of its rows have finished


@dataclass
class _Row:
    """Decoding state of one sequence inside the loop."""

    request: GenerationRequest
    forced: list[int] = field(default_factory=list)
    sampled: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    last_token: int = 0
    parked: Deferred | None = None  # the loop's answer waits on background work: the row idles, unfed, until then


class TransformersEngine:
    """Generate with the policy model itself; stops are cheap (each sequence keeps its cache between requests)."""

    stop_policy = StopPolicy.EVERY_STEP
    accepts_deferred = True  # answers may be ``Deferred`` (see engines.base)

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.stop_token_ids = eos_token_ids(tokenizer, getattr(model, "generation_config", None))
        self.model_calls = 0
        self._generator: torch.Generator | None = None
        self._generator_seed: int | None = None

    def sync_weights(self, named_parameters: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Nothing to do: this engine decodes with the policy model itself."""

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingConfig, on_stop: OnStop) -> None:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self._autocast(sampling), grouped_query_attention():
                for start in range(0, len(requests), sampling.batch_size):
                    self._decode_chunk(list(requests[start : start + sampling.batch_size]), sampling, on_stop)
        finally:
            if was_training:
                self.model.train()

    # ------------------------------------------------------------------ decoding loop
    def _decode_chunk(self, requests: list[GenerationRequest], sampling: SamplingConfig, on_stop: OnStop) -> None:
        device = self.model.device
        rows = [_Row(request=r) for r in requests]
        prefix_len = shared_prefix_length([r.prompt_ids for r in requests])
        cache = self._prefix_cache(requests[0].prompt_ids[:prefix_len], len(rows))
        suffixes = [r.prompt_ids[prefix_len:] for r in requests]
        width = max(len(s) for s in suffixes)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), prefix_len + width), dtype=torch.long)
        mask[:, :prefix_len] = 1
        for b, ids in enumerate(suffixes):
            input_ids[b, width - len(ids) :] = torch.tensor(ids)
            mask[b, prefix_len + width - len(ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        input_ids, mask = input_ids.to(device), mask.to(device)
        logits = self._forward(input_ids, mask, positions[:, prefix_len:].to(device), cache)
        next_position = positions[:, -1].to(device) + 1

        finished = [False] * len(rows)
        while True:
            tokens, logprobs = self._sample(logits, sampling)
            for b, row in enumerate(rows):
                if finished[b] or row.parked is not None:
                    continue
                if row.forced:
                    row.last_token = row.forced.pop(0)
                    continue
                row.last_token = int(tokens[b])
                row.sampled.append(row.last_token)
                row.logprobs.append(float(logprobs[b]))
                reason = self._finish_reason(row)
                if reason is not None and not self._continue(row, reason, on_stop):
                    finished[b] = True
            self._unpark(rows, finished)
            alive = [b for b in range(len(rows)) if not finished[b]]
            if not alive:
                break
            if len(alive) <= PRUNE_AT * len(rows):  # drop finished rows, in bulk: each prune copies the cache
                index = torch.tensor(alive, device=device)
                cache.batch_select_indices(index)
                mask, next_position = mask[index], next_position[index]
                rows = [rows[b] for b in alive]
                finished = [False] * len(rows)
            # a parked row is fed a padding token that nothing attends to, at the position its next real token takes
            fed = torch.tensor([[row.parked is None] for row in rows], dtype=mask.dtype, device=device)
            feed = torch.tensor([[row.last_token if row.parked is None else pad] for row in rows], device=device)
            mask = torch.cat([mask, fed], dim=1)
            logits = self._forward(feed, mask, next_position[:, None], cache)
            next_position = next_position + fed[:, 0]

    def _finish_reason(self, row: _Row) -> str | None:
        if row.last_token in self.stop_token_ids:
            return "stop"
        if row.request.stop_strings:
            text = self.tokenizer.decode(row.sampled, skip_special_tokens=False)
            if any(stop in text for stop in row.request.stop_strings):
                return "stop"
        if len(row.sampled) >= row.request.max_tokens:
            return "length"
        return None

    @staticmethod
    def _unpark(rows: list[_Row], finished: list[bool]) -> None:
        """Take the answers that are ready (waiting for one when every live row is parked); their rows go on."""
        parked = [b for b, row in enumerate(rows) if not finished[b] and row.parked is not None]
        if parked and all(finished[b] or rows[b].parked is not None for b in range(len(rows))):
            Deferred.wait_any([rows[b].parked for b in parked])  # type: ignore[misc]
        for b in parked:
            row = rows[b]
            if row.parked is not None and row.parked.ready():
                deferred, row.parked = row.parked, None
                finished[b] = not TransformersEngine._apply(row, deferred.resolve())

    @staticmethod
    def _continue(row: _Row, reason: str, on_stop: OnStop) -> bool:
        """Report the finished request; take its continuation in place (or park the row until the answer is ready).
        Returns whether the row goes on."""
        output = GenerationOutput(row.request.request_id, row.sampled, row.logprobs, reason)
        continuation = on_stop(output)
        if isinstance(continuation, Deferred):
            row.parked = continuation
            return True
        return TransformersEngine._apply(row, continuation)

    @staticmethod
    def _apply(row: _Row, continuation: Continuation | None) -> bool:
        """Restart the row with the continuation: its forced tokens first (the last sampled one is fed before them)."""
        if continuation is None:
            return False
        if continuation.keep is not None and continuation.keep != len(row.sampled):
            raise RuntimeError(
                "the transformers engine feeds every sampled token as it goes; it cannot drop sampled tokens "
                f"(asked to keep {continuation.keep} of {len(row.sampled)}): stop at the token that needs it instead"
            )
        row.forced = list(continuation.forced_ids)
        row.sampled, row.logprobs = [], []
        row.request = GenerationRequest(
            row.request.request_id, [], continuation.max_tokens, tuple(continuation.stop_strings)
        )
        return True

    # ------------------------------------------------------------------ model helpers
    def _prefix_cache(self, prefix_ids: list[int], batch: int) -> DynamicCache:
        """Encode the shared prefix once and repeat its key/value cache over the batch."""
        cache = growing_cache(self.model.config)
        if not prefix_ids:
            return cache
        ids = torch.tensor([prefix_ids], dtype=torch.long, device=self.model.device)
        self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        self.model_calls += 1
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
        self.model_calls += 1
        return out.logits[:, -1, :].float()

    def _sample(self, logits: torch.Tensor, sampling: SamplingConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """Next tokens and their log-probabilities under the distribution they were drawn from."""
        if sampling.greedy:
            tokens = logits.argmax(-1)
        else:
            logits = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
            generator = self._rng(sampling.seed, logits.device)
            tokens = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
        logprobs = logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
        return tokens.cpu(), logprobs.cpu()

    def _rng(self, seed: int | None, device: torch.device) -> torch.Generator | None:
        """One generator per seed: a new seed (the next training step's) starts a new stream, the same seed goes on
        with its own."""
        if seed is None:
            return None
        if self._generator is None or self._generator_seed != seed:
            self._generator = torch.Generator(device=device).manual_seed(seed)
            self._generator_seed = seed
        return self._generator

    def _autocast(self, sampling: SamplingConfig) -> contextlib.AbstractContextManager:
        if not sampling.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.model.device.type, dtype=torch.bfloat16)
