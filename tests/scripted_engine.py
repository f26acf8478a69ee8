"""A generation engine that writes a fixed script of token ids, with a real engine's stop semantics.

It lets rollout tests drive episodes token by token without a model: stops at stop strings (checked on the text
sampled since the request started), end-of-turn ids and ``max_tokens``, honours ``Continuation.keep`` by rewinding
the script (and skipping inserted tokens the script itself holds next), and records every request it served.
With ``StopPolicy.STREAMING`` it reports every token as it is sampled, as the vLLM engine does, runs on while the loop
answers ``KEEP_SAMPLING`` and counts the tokens it sampled. A ``Deferred`` answer parks the request: the others go on.
"""

from __future__ import annotations

from collections import deque

from trl_stepwise.engines import KEEP_SAMPLING, Deferred, GenerationOutput, GenerationRequest, StopPolicy


class ScriptedEngine:
    """Each request id plays its own script (or all share one); an exhausted script writes EOS."""

    def __init__(self, tokenizer, scripts, stop_policy: StopPolicy = StopPolicy.ENVIRONMENT) -> None:
        self.tokenizer = tokenizer
        self.scripts = scripts
        self.stop_policy = stop_policy
        self.sampled = 0
        self.stop_token_ids = {tokenizer.eos_token_id}
        self.requests: list[GenerationRequest] = []
        self.synced = 0

    def sync_weights(self, named_parameters) -> None:
        self.synced += 1

    def _script(self, request_id: int) -> list[int]:
        return self.scripts[request_id] if isinstance(self.scripts, dict) else self.scripts

    accepts_deferred = True

    def generate(self, requests, sampling, on_stop) -> None:
        queue = deque(requests)
        position = {r.request_id: 0 for r in requests}
        parked: dict = {}  # Deferred -> (request, start, out): answers that wait on tool calls

        def follow(request, start, out, continuation) -> None:
            if continuation is None:
                return
            keep = len(out) if continuation.keep is None else continuation.keep
            position[request.request_id] = start + keep
            forced = list(continuation.forced_ids)
            script = self._script(request.request_id)
            if forced and script[start + keep : start + keep + len(forced)] == forced:
                position[request.request_id] += len(forced)  # the script wrote the inserted tokens itself
            queue.append(GenerationRequest(request.request_id, [], continuation.max_tokens, continuation.stop_strings))

        while queue or parked:
            if not queue:
                Deferred.wait_any(parked)
            for deferred in [d for d in parked if d.ready()]:
                follow(*parked.pop(deferred), deferred.resolve())
            if not queue:
                continue
            request = queue.popleft()
            self.requests.append(request)
            script = self._script(request.request_id)
            start = position[request.request_id]
            out: list[int] = []
            reason = "length"
            continuation = KEEP_SAMPLING
            while len(out) < request.max_tokens:
                i = start + len(out)
                token = script[i] if i < len(script) else self.tokenizer.eos_token_id
                out.append(token)
                self.sampled += 1
                text = self.tokenizer.decode(out)
                if token in self.stop_token_ids or any(s in text for s in request.stop_strings):
                    reason = "stop"
                    break
                if self.stop_policy is StopPolicy.STREAMING and len(out) < request.max_tokens:
                    continuation = on_stop(GenerationOutput(request.request_id, out, [-0.5] * len(out), None))
                    if continuation is not KEEP_SAMPLING:
                        break
            if continuation is KEEP_SAMPLING:
                continuation = on_stop(GenerationOutput(request.request_id, out, [-0.5] * len(out), reason))
                assert continuation is not KEEP_SAMPLING, "a finished output cannot be continued in place"
            if isinstance(continuation, Deferred):
                parked[continuation] = (request, start, out)
            else:
                follow(request, start, out, continuation)


def forced_text(tokenizer, trajectory) -> str:
    """The text of a trajectory's tokens the policy did not write (tool results, replies)."""
    ids = [t for t, p in zip(trajectory.completion_ids, trajectory.policy_mask, strict=True) if not p]
    return tokenizer.decode(ids)
