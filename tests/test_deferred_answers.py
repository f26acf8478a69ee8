"""A ``Deferred`` answer (an episode's tool calls still running) parks that sequence while the engine decodes the
others, and the parked sequence goes on exactly as if the answer had come at once."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from types import SimpleNamespace

import pytest

from trl_stepwise.engines import (
    Continuation,
    Deferred,
    GenerationOutput,
    GenerationRequest,
    SamplingConfig,
    TransformersEngine,
)

GREEDY = SamplingConfig(temperature=0.0)


def play_two(engine, tokenizer, defer: bool) -> tuple[dict[int, list[list[int]]], list[str]]:
    """Two requests; the first's answer to its first stop waits until the second has finished (``defer``), or
    comes at once. Returns the tokens each stop reported, and who released the waiting answer."""
    prompts = [tokenizer("Hello there")["input_ids"], tokenizer("Good morning to you")["input_ids"]]
    forced = tokenizer(" and then", add_special_tokens=False)["input_ids"]
    outputs: dict[int, list[list[int]]] = {0: [], 1: []}
    released: list[str] = []
    work: Future = Future()
    fallback = threading.Timer(30.0, lambda: work.done() or (released.append("timer"), work.set_result(None)))
    fallback.start()

    def on_stop(output: GenerationOutput):
        request = output.request_id
        outputs[request].append(list(output.token_ids))
        if len(outputs[request]) == 1:
            answer = Continuation(list(forced), max_tokens=5)
            return Deferred(work, lambda _: answer) if request == 0 and defer else answer
        if request == 1 and not work.done():
            released.append("second request")
            work.set_result(None)
        return None

    try:
        engine.generate([GenerationRequest(0, prompts[0], 3), GenerationRequest(1, prompts[1], 6)], GREEDY, on_stop)
    finally:
        fallback.cancel()
    return outputs, released


def test_the_transformers_engine_decodes_the_others_while_an_answer_waits(tiny_model, tokenizer):
    engine = TransformersEngine(tiny_model, tokenizer)
    waited, released = play_two(engine, tokenizer, defer=True)
    assert released == ["second request"]  # the second sequence ran to its end while the first was parked
    at_once, _ = play_two(engine, tokenizer, defer=False)
    assert waited == at_once  # the parked sequence went on token for token as if answered at once
    assert [len(stops) for stops in waited.values()] == [2, 2]


def test_the_server_engine_waits_on_deferred_answers_beside_its_requests(monkeypatch):
    from trl_stepwise.engines import vllm_server

    monkeypatch.setattr(vllm_server, "wait_for_server", lambda session, url, timeout: "model")
    engine = vllm_server.VLLMServerEngine("http://server:1", SimpleNamespace(eos_token_id=0), timeout=5)
    choice = {"token_ids": [5, 6], "logprobs": {"token_logprobs": [-0.5, -0.5]}, "finish_reason": "stop"}
    answer = {"choices": [choice]}
    contexts = []

    def post(url, json, timeout):
        contexts.append((len(contexts), json["prompt"][0]))
        return SimpleNamespace(status_code=200, json=lambda: answer, text="")

    monkeypatch.setattr(engine.session, "post", post)
    work: Future = Future()
    stops = {0: 0, 1: 0}

    def on_stop(output):
        stops[output.request_id] += 1
        if output.request_id == 0 and stops[0] == 1:
            return Deferred(work, lambda _: Continuation([9], max_tokens=2))
        if output.request_id == 1 and stops[1] == 1:
            work.set_result(None)
        return None

    engine.generate([GenerationRequest(0, [1, 2], 2), GenerationRequest(1, [3], 2)], SamplingConfig(), on_stop)
    assert stops == {0: 2, 1: 1}
    assert [1, 2, 5, 6, 9] in [context for _, context in contexts]  # the parked sequence went on after its answer


@pytest.mark.slow
def test_the_vllm_engine_decodes_the_others_while_an_answer_waits(vllm_engine, tokenizer):
    waited, released = play_two(vllm_engine, tokenizer, defer=True)
    assert released == ["second request"]
    at_once, _ = play_two(vllm_engine, tokenizer, defer=False)
    assert waited == at_once
