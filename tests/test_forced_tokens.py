"""Tokens appended to a running vLLM request (``engines/forced_tokens.py``): the logits processor on its own, and the
colocated engine's bookkeeping against a scripted stand-in for vLLM's engine (one that honours the forcing, one
that does not and must be resent). The real engine plays the same greedy episodes as the transformers engine with
it on (``test_vllm_engine.py``)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from vllm import SamplingParams  # vLLM is part of the set-up (`make setup`): these fail rather than skip without it
from vllm.v1.sample.logits_processor import BatchUpdate

from trl_stepwise.engines import Continuation, GenerationRequest, SamplingConfig
from trl_stepwise.engines.base import KEEP_SAMPLING
from trl_stepwise.engines.forced_tokens import ForcedTokens
from trl_stepwise.engines.vllm_engine import FORCED_TOKENS, REQUEST_KEY, VLLMEngine


def _params(key: str) -> SamplingParams:
    return SamplingParams(max_tokens=8, extra_args={REQUEST_KEY: key})


def test_the_processor_forces_the_planned_token_at_each_planned_position_only():
    processor = ForcedTokens(None, torch.device("cpu"), False)
    planned, plain, other = [11, 12], [5], [1, 2, 3]  # live output ids of three batch rows
    processor.update_state(
        BatchUpdate(
            batch_size=3,
            removed=[],
            added=[
                (0, _params("a"), [1], planned),
                (1, SamplingParams(max_tokens=8), [1], plain),
                (2, _params("b"), [1], other),
            ],
            moved=[],
        )
    )
    FORCED_TOKENS.clear()
    FORCED_TOKENS["a"] = (2, [7, 9])  # output positions 2 and 3 of request "a"
    FORCED_TOKENS["b"] = (0, [4])  # position 0 of "b": already past (it has 3 outputs)
    try:
        logits = processor.apply(torch.zeros(3, 10))
        assert logits[0].argmax() == 7 and torch.isinf(logits[0]).sum() == 9  # only token 7 left
        assert torch.equal(logits[1:], torch.zeros(2, 10))  # no plan, or a plan already behind the row
        planned.append(7)
        assert processor.apply(torch.zeros(3, 10))[0].argmax() == 9
        planned.append(9)
        assert torch.equal(processor.apply(torch.zeros(3, 10)), torch.zeros(3, 10))  # the plan is spent
    finally:
        FORCED_TOKENS.clear()
    assert not processor.is_argmax_invariant()  # greedy decoding must see it too


class _StandIn:
    """vLLM's engine reduced to what ``VLLMEngine.generate`` calls: each step samples one token per request, the
    planned one where a plan covers its position (``honour``), else ``100 + position``."""

    def __init__(self, honour: bool) -> None:
        self.honour = honour
        self.added: list[list[int]] = []
        self.requests: dict[str, tuple[SamplingParams, list[int]]] = {}

    def add_request(self, key, prompt, params) -> None:
        self.added.append(list(prompt["prompt_token_ids"]))
        self.requests[key] = (params, [])

    def abort_request(self, keys) -> None:
        for key in keys:
            self.requests.pop(key, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self):
        results = []
        for key, (params, output) in list(self.requests.items()):
            plan = FORCED_TOKENS.get(params.extra_args[REQUEST_KEY])
            position = len(output)
            token = 100 + position
            if self.honour and plan and 0 <= position - plan[0] < len(plan[1]):
                token = plan[1][position - plan[0]]
            output.append(token)
            finished = len(output) >= params.max_tokens
            if finished:
                del self.requests[key]
            completion = SimpleNamespace(
                token_ids=[token],
                logprobs=[{token: SimpleNamespace(logprob=-0.5)}],
                finish_reason="length" if finished else None,
            )
            results.append(SimpleNamespace(request_id=key, finished=finished, outputs=[completion]))
        return results


def _engine(stand_in: _StandIn) -> VLLMEngine:
    engine = object.__new__(VLLMEngine)
    engine.llm = SimpleNamespace(llm_engine=stand_in)
    engine.sleep_mode = False
    engine._sampling_params = SamplingParams
    engine._delta = None
    engine.stop_token_ids = {0}
    engine.max_model_len = 1000
    engine.per_request_seeds = False
    engine.forces_in_place = True
    engine._serial = 0
    engine._key_prefix = "test"
    engine.forced_restarts = 0
    engine.appended_in_place = 0
    return engine


def _play(engine: VLLMEngine) -> list[tuple[list[int], str | None]]:
    """One request: after 3 sampled tokens the loop appends [7, 8]; 2 sampled tokens later the sequence ends."""
    seen = []

    def on_stop(output):
        seen.append((list(output.token_ids), output.finish_reason))
        if len(seen) == 3:
            return Continuation(forced_ids=[7, 8], max_tokens=20)
        if len(seen) == 5:
            return None
        return KEEP_SAMPLING

    engine.generate([GenerationRequest(0, [1, 2], 20)], SamplingConfig(temperature=0.0), on_stop)
    return seen


def test_appended_tokens_continue_the_running_request_without_a_new_one():
    stand_in = _StandIn(honour=True)
    engine = _engine(stand_in)
    seen = _play(engine)
    assert stand_in.added == [[1, 2]]  # one request: nothing was resent
    assert [ids for ids, _ in seen] == [[100], [100, 101], [100, 101, 102], [105], [105, 106]]
    assert engine.appended_in_place == 1 and engine.forced_restarts == 0
    assert not FORCED_TOKENS  # the plan is gone once its tokens came back


def test_appended_tokens_the_engine_did_not_sample_are_resent_in_a_new_request():
    stand_in = _StandIn(honour=False)
    engine = _engine(stand_in)
    seen = _play(engine)
    assert stand_in.added == [[1, 2], [1, 2, 100, 101, 102, 7, 8]]  # resent with the appended tokens
    assert [ids for ids, _ in seen][3:] == [[100], [100, 101]]  # the loop sees the new request's samples only
    assert engine.forced_restarts == 1
    assert not FORCED_TOKENS
