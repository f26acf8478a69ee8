"""An engine that writes given texts instead of sampling: reference solutions played through the rollout loop.

Reference-guided training (``reference_guidance``) turns a problem's worked solution into an episode with exactly the
ids, loss mask, calculator results and step rewards a sampled episode would have. Rather than rebuild what the rollout
loop does (steps, tool calls, replies, limits), the loop plays the solution as if a policy wrote it: this engine
streams the solution's tokens one by one, and the loop cuts, inserts tool results and ends the episode as usual.

After every cut the engine re-reads what the sequence holds and goes on from the matching point of the text, so
tool results inserted by the loop (the calculator's ``76>>``) join the solution whichever way they were tokenized. If
the sequence stops matching the solution (a tool wrote something else), the engine ends it with an end-of-turn token.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence

import torch

from trl_stepwise.engines.base import (
    KEEP_SAMPLING,
    GenerationOutput,
    GenerationRequest,
    OnStop,
    SamplingConfig,
    StopPolicy,
    answer_now,
)


class ReferenceEngine:
    """A streaming engine whose request ``i`` writes ``texts[i]`` and then an end-of-turn token."""

    stop_policy = StopPolicy.STREAMING
    accepts_deferred = True  # answers may be ``Deferred`` (see engines.base)

    def __init__(self, tokenizer, texts: Mapping[int, str], stop_token_ids: Iterable[int]) -> None:
        self.tokenizer = tokenizer
        self.texts = dict(texts)
        self.stop_token_ids = set(stop_token_ids)
        if not self.stop_token_ids:
            raise ValueError("ReferenceEngine needs an end-of-turn token id to end each text with")
        self._eos = min(self.stop_token_ids)
        self.diverged: list[int] = []  # request ids whose sequence stopped matching their text

    def sync_weights(self, named_parameters: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Nothing to sync: the texts do not depend on the policy."""

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingConfig, on_stop: OnStop) -> None:
        """Write each request's text token by token, answering the loop's cuts as a streaming engine does."""
        prompt_length = {r.request_id: len(r.prompt_ids) for r in requests}
        queue = deque((r.request_id, list(r.prompt_ids), r.max_tokens) for r in requests)
        while queue:
            request_id, sequence, max_tokens = queue.popleft()
            script = self._rest(request_id, sequence[prompt_length[request_id] :])
            out: list[int] = []
            answer = KEEP_SAMPLING
            reason = "length"
            while len(out) < max_tokens:
                token = script[len(out)]
                out.append(token)
                if token in self.stop_token_ids:
                    reason = "stop"
                    break
                if len(out) < max_tokens:
                    answer = answer_now(on_stop(GenerationOutput(request_id, list(out), [0.0] * len(out), None)))
                    if answer is not KEEP_SAMPLING:
                        break
            if answer is KEEP_SAMPLING:
                answer = answer_now(on_stop(GenerationOutput(request_id, list(out), [0.0] * len(out), reason)))
            if answer is None or answer is KEEP_SAMPLING:
                continue
            keep = len(out) if answer.keep is None else answer.keep
            queue.append((request_id, sequence + out[:keep] + list(answer.forced_ids), answer.max_tokens))

    def _rest(self, request_id: int, written_ids: list[int]) -> list[int]:
        """Token ids of what remains of the text after what the sequence already holds, then end-of-turn."""
        text = self.texts[request_id]
        written = self.tokenizer.decode(written_ids, skip_special_tokens=False)
        if not text.startswith(written):
            self.diverged.append(request_id)
            return [self._eos]
        rest = text[len(written) :]
        return (self.tokenizer(rest, add_special_tokens=False)["input_ids"] if rest else []) + [self._eos]
