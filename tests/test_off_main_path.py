"""One step off the main path: flags that do nothing say so, batch sizes train what they say, seeds move on, missing
log-probs and plain vLLM servers are errors, replies after a cut step, context-limit endings, strict resumes."""

from __future__ import annotations

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import SimpleNamespace

import pytest
import torch
from scripted_engine import ScriptedEngine
from tiny_training import length_reward, make_config

from trl_stepwise import cli
from trl_stepwise.engines import (
    Continuation,
    GenerationOutput,
    GenerationRequest,
    SamplingConfig,
    StopPolicy,
    TransformersEngine,
)
from trl_stepwise.engines.base import MissingLogprobsError
from trl_stepwise.engines.config import GenerationEngineArguments
from trl_stepwise.envs import EndReason, MathEnv, MathFeedbackEnv
from trl_stepwise.prompting import PromptBuilder
from trl_stepwise.rollout import StepwiseRollout
from trl_stepwise.trainer import StepwiseReinforceTrainer

# ---------------------------------------------------------------------------------------------- flags with no effect
INERT = [
    ({"vllm_gpu_memory_utilization": 0.5}, "vllm_gpu_memory_utilization", "--use_vllm false"),
    ({"vllm_server_port": 9000}, "vllm_server_port", "--use_vllm false"),
    ({"vllm_importance_sampling_clip_max": 5.0}, "vllm_importance_sampling_clip_max", "--use_vllm false"),
    ({"use_vllm": True, "vllm_server_base_url": "http://host:1"}, "vllm_server_base_url", "colocate"),
    ({"use_vllm": True, "vllm_server_timeout": 10.0}, "vllm_server_timeout", "colocate"),
    ({"use_vllm": True, "vllm_mode": "server", "vllm_max_model_length": 1024}, "vllm_max_model_length", "server"),
    ({"use_vllm": True, "vllm_mode": "server", "vllm_kv_cache_space_gb": 4}, "vllm_kv_cache_space_gb", "server"),
    ({"use_vllm": True, "vllm_enable_sleep_mode": True}, "vllm_enable_sleep_mode", "CPU"),
    ({"use_vllm": True, "vllm_gpu_memory_utilization": 0.5}, "vllm_gpu_memory_utilization", "CPU"),
    (
        {
            "use_vllm": True,
            "vllm_importance_sampling_correction": False,
            "vllm_importance_sampling_mode": "token_mask",
        },
        "vllm_importance_sampling_mode",
        "correction false",
    ),
    ({"use_vllm": True, "rollout_batch_size": 8}, "rollout_batch_size", "--use_vllm true"),
    ({"use_vllm": True, "rollout_bf16": True}, "rollout_bf16", "--use_vllm true"),
    ({"kl_coef": 0.0, "ref_sync_steps": 4}, "ref_sync_steps", "--kl_coef 0"),
    ({"kl_coef": 0.0, "ref_model_mixup_alpha": 0.5}, "ref_model_mixup_alpha", "--kl_coef 0"),
    ({"moving_average_decay": 0.5}, "moving_average_decay", "--baseline leave_one_out"),
    ({"epsilon": 0.3}, "epsilon", "--num_iterations 1"),
    ({"judge_weight": 0.5}, "judge_weight", "--judge_model"),
    ({"judge_mode": "yes_no"}, "judge_mode", "--judge_model"),
    ({"curriculum_window": 10}, "curriculum_window", "--curriculum"),
    ({"curriculum_replay": 0.5}, "curriculum_replay", "--curriculum"),
    ({"sampler_logprob_tolerance": 0.0, "sampler_logprob_patience": 5}, "sampler_logprob_patience", "tolerance 0"),
]


@pytest.mark.parametrize(("settings", "flag", "where"), INERT, ids=[case[1] + "-" + case[2] for case in INERT])
def test_a_flag_with_no_effect_warns_in_one_line(settings, flag, where, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="trl_stepwise.trainer.config"):
        config = make_config(tmp_path, **settings)
    lines = [line for line in config.inert_flags() if f"--{flag} " in line]
    assert len(lines) == 1 and where in lines[0] and "has no effect" in lines[0], config.inert_flags()
    assert any(lines[0] == record.getMessage() for record in caplog.records)


def test_defaults_and_the_main_job_warn_about_nothing(tmp_path):
    import yaml

    from trl_stepwise.trainer import StepwiseReinforceConfig

    assert make_config(tmp_path).inert_flags() == []
    main_job = yaml.safe_load(open("recipes/configs/reinforce_gsm8k_cpu.yaml"))
    keys = {f for f in StepwiseReinforceConfig.__dataclass_fields__}
    settings = {k: v for k, v in main_job.items() if k in keys}
    config = StepwiseReinforceConfig(**{**settings, "output_dir": str(tmp_path)})
    assert config.inert_flags() == []


def test_evaluate_warns_about_training_only_and_greedy_flags(capsys):
    args = GenerationEngineArguments(use_vllm=False, vllm_importance_sampling_clip_max=5.0)
    assert any("--vllm_importance_sampling_clip_max 5.0" in line for line in args.inert_engine_flags(training=False))
    code = cli.main(["evaluate", "--gold", "--dataset", "arithmetic:level=1,n=2", "--split", "test", "--top_p", "0.5"])
    err = capsys.readouterr().err
    assert code == 0 and "warning: --top_p 0.5 has no effect with --temperature 0 (greedy decoding)" in err


def test_scale_advantages_next_to_another_scale_rewards_is_refused(tmp_path):
    with pytest.raises(ValueError, match="scale_advantages=True and scale_rewards='group' disagree"):
        make_config(tmp_path, scale_advantages=True, scale_rewards="group")
    assert make_config(tmp_path, scale_advantages=True).scale_rewards == "batch"


# ---------------------------------------------------------------------------------------------- batch sizes
def test_micro_batches_that_split_groups_train_on_the_generation_batch(
    tiny_model, tokenizer, arithmetic_problems, tmp_path
):
    """5 episodes per micro-batch, 2 per problem, 2 accumulation steps: 10 episodes per step (it trained on 12)."""
    args = make_config(
        tmp_path, per_device_train_batch_size=5, num_generations=2, gradient_accumulation_steps=2, max_steps=2
    )
    trainer = StepwiseReinforceTrainer(
        model=tiny_model, args=args, train_dataset=arithmetic_problems, processing_class=tokenizer,
        reward_funcs=[length_reward],
    )  # fmt: skip
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    per_step = [sum(r["step"] == step for r in records) for step in (0, 1)]
    assert per_step == [10, 10]


# ---------------------------------------------------------------------------------------------- seeds
def test_the_trainer_draws_a_new_sampling_seed_every_step(tiny_model, tokenizer, arithmetic_problems, tmp_path):
    trainer = StepwiseReinforceTrainer(
        model=tiny_model, args=make_config(tmp_path), train_dataset=arithmetic_problems, processing_class=tokenizer
    )
    seeds = []
    for step in (0, 0, 1, 2):
        trainer.state.global_step = step
        seeds.append(trainer.rollout_engine().sampling.seed)
    assert seeds[0] == seeds[1] and len(set(seeds)) == 3 and None not in seeds


def test_the_transformers_engine_follows_a_new_seed(tiny_model, tokenizer):
    engine = TransformersEngine(tiny_model, tokenizer)
    request = [GenerationRequest(0, tokenizer("Hello there")["input_ids"], 12)]

    def sample(seed: int) -> list[int]:
        outputs: list[GenerationOutput] = []
        engine.generate(request, SamplingConfig(temperature=1.0, seed=seed), outputs.append)
        return outputs[-1].token_ids

    first, other, again = sample(1), sample(2), sample(1)
    assert first == again and first != other


def _server_engine(monkeypatch, responses):
    """A VLLMServerEngine whose HTTP calls are answered by ``responses(payload) -> (status, json)``."""
    from trl_stepwise.engines import vllm_server

    monkeypatch.setattr(vllm_server, "wait_for_server", lambda session, url, timeout: "model")
    engine = vllm_server.VLLMServerEngine("http://server:1", SimpleNamespace(eos_token_id=0), timeout=5)
    payloads = []

    def post(url, json, timeout):
        payloads.append(json)
        status, body = responses(json)
        return SimpleNamespace(status_code=status, json=lambda: body, text=str(body))

    monkeypatch.setattr(engine.session, "post", post)
    return engine, payloads


def test_the_server_engine_gives_each_continuation_its_own_seed(monkeypatch):
    answer = {"choices": [{"token_ids": [5], "logprobs": {"token_logprobs": [-0.5]}, "finish_reason": "stop"}]}
    engine, payloads = _server_engine(monkeypatch, lambda payload: (200, answer))
    turns = iter([Continuation([7], max_tokens=3), Continuation([8], max_tokens=3), None])
    engine.generate([GenerationRequest(4, [1, 2], 3)], SamplingConfig(seed=11), lambda output: next(turns))
    seeds = [p["seed"] for p in payloads]
    assert len(seeds) == 3 and len(set(seeds)) == 3


def test_a_request_on_a_connection_the_server_closed_while_idle_is_sent_again(monkeypatch):
    """uvicorn closes an idle keep-alive connection after a few seconds: a completion sent on it meets a reset
    before any answer (a fresh-clone test run saw this between two rollouts). It is sent once more; a server that
    resets twice in a row is reported as not answering."""
    import requests

    from trl_stepwise.engines.vllm_server import VLLMServerError

    answer = {"choices": [{"token_ids": [5], "logprobs": {"token_logprobs": [-0.5]}, "finish_reason": "stop"}]}
    resets = iter([True, False, True, True])

    def responses(payload):
        if next(resets):
            raise requests.ConnectionError(ConnectionResetError(104, "Connection reset by peer"))
        return 200, answer

    engine, payloads = _server_engine(monkeypatch, responses)
    outputs = []
    engine.generate([GenerationRequest(4, [1, 2], 3)], SamplingConfig(), outputs.append)
    assert [o.token_ids for o in outputs] == [[5]] and len(payloads) == 2
    with pytest.raises(VLLMServerError, match="stopped answering"):
        engine.generate([GenerationRequest(5, [1, 2], 3)], SamplingConfig(), outputs.append)


# ---------------------------------------------------------------------------------------------- missing log-probs
def test_missing_or_nan_logprobs_from_the_colocated_engine_name_the_request():
    from trl_stepwise.engines.vllm_engine import _sampled_logprobs

    logprob = SimpleNamespace(logprob=-0.25)
    assert _sampled_logprobs(SimpleNamespace(logprobs=[{5: logprob}]), [5], 3) == [-0.25]
    with pytest.raises(MissingLogprobsError, match="tokens sampled for request 3"):
        _sampled_logprobs(SimpleNamespace(logprobs=None), [5, 6], 3)
    with pytest.raises(MissingLogprobsError, match="no log-prob for token 1 of request 3"):
        _sampled_logprobs(SimpleNamespace(logprobs=[{5: logprob}, {9: logprob}]), [5, 6], 3)
    with pytest.raises(MissingLogprobsError, match="a NaN log-prob for token 0 of request 3"):
        _sampled_logprobs(SimpleNamespace(logprobs=[{5: SimpleNamespace(logprob=float("nan"))}]), [5], 3)


@pytest.mark.parametrize(
    ("logprobs", "error"),
    [(None, "returned 0 log-probs for the 2 tokens of request 4"), ([-0.1, None], "no log-prob for token 1")],
)
def test_missing_logprobs_from_a_server_are_errors_not_zeros(monkeypatch, logprobs, error):
    from trl_stepwise.engines.vllm_server import VLLMServerError

    choice = {"token_ids": [5, 6], "finish_reason": "stop"}
    if logprobs is not None:
        choice["logprobs"] = {"token_logprobs": logprobs}
    engine, _ = _server_engine(monkeypatch, lambda payload: (200, {"choices": [choice]}))
    with pytest.raises((VLLMServerError, MissingLogprobsError), match=error):
        engine.generate([GenerationRequest(4, [1, 2], 3)], SamplingConfig(), lambda output: None)


# ---------------------------------------------------------------------------------------------- servers unfit to train
class _FakeServer(BaseHTTPRequestHandler):
    info: dict | None = None  # None: no /server_info (a plain `vllm serve`)

    def do_GET(self):  # noqa: N802 (http.server's name)
        path = self.path.split("?")[0]
        bodies = {"/health": {}, "/v1/models": {"data": [{"id": "m"}]}}
        if self.info is not None:
            bodies["/server_info"] = {"vllm_config": self.info}
        body = bodies.get(path)
        self.send_response(200 if body is not None else 404)
        self.end_headers()
        self.wfile.write(json.dumps(body or {}).encode())

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(
    ("info", "words"),
    [
        (None, "a plain `vllm serve`"),
        (
            {"weight_transfer_config": None, "model_config": {"logprobs_mode": "processed_logprobs"}},
            "no weight-transfer",
        ),
        (
            {"weight_transfer_config": {"backend": "nccl"}, "model_config": {"logprobs_mode": "raw_logprobs"}},
            "raw_logprobs",
        ),
        (
            {"weight_transfer_config": {"backend": "nccl"}, "model_config": {"logprobs_mode": "processed_logprobs"}},
            None,
        ),
    ],
)
def test_a_server_that_cannot_serve_training_is_refused_at_start(info, words, tmp_path):
    from trl_stepwise.trainer.setup import check_engine_setup

    handler = type("Handler", (_FakeServer,), {"info": info})
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    args = make_config(tmp_path, use_vllm=True, vllm_mode="server", vllm_server_base_url=url, vllm_server_timeout=5)
    try:
        if words is None:
            check_engine_setup(args)
        else:
            with pytest.raises(ValueError, match="trl vllm-serve") as err:
                check_engine_setup(args)
            assert words in str(err.value) and "\n" not in str(err.value)
    finally:
        server.shutdown()


def test_a_4bit_base_with_vllm_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    from peft import LoraConfig

    import trl_stepwise.trainer.builders as builders
    from trl_stepwise.models import build_quantization_config

    monkeypatch.setattr(builders, "load_model", lambda *a, **k: pytest.fail("the model loaded first"))
    args = make_config(tmp_path, use_vllm=True)
    args.model_init_kwargs = {"quantization_config": build_quantization_config(load_in_4bit=True, use_peft=True)}
    with pytest.raises(ValueError, match="4/8-bit base"):
        StepwiseReinforceTrainer(model=None, args=args, train_dataset="gsm8k", peft_config=LoraConfig(r=4))


# ---------------------------------------------------------------------------------------------- the rollout loop
def test_an_engine_stopping_at_every_step_is_never_asked_past_the_step_token_limit(tokenizer):
    """The transformers engine cannot take back tokens: asked for more than the step's limit, it sampled past a step
    the environment then answered ("cannot drop sampled tokens (asked to keep 9 of 11)")."""
    words = "The answer is: 7 because I think so and more words\n"
    script = tokenizer(words * 3, add_special_tokens=False)["input_ids"]
    engine = ScriptedEngine(tokenizer, script, StopPolicy.EVERY_STEP)
    rollout = StepwiseRollout(
        None, tokenizer, PromptBuilder(tokenizer, [], k=0), SamplingConfig(max_step_tokens=9), engine=engine
    )
    (trajectory,) = rollout.run(MathFeedbackEnv, [{"question": "What is 2 + 3?", "answer": "5"}])
    assert engine.requests and all(r.max_tokens <= 9 for r in engine.requests)
    assert "That is not right" in trajectory.episode.completion  # the reply came, after the 9-token step


class _FullContextEngine:
    """An engine whose context is full at once (vLLM reports an empty, length-limited output)."""

    stop_policy, stop_token_ids = StopPolicy.ENVIRONMENT, {0}

    def generate(self, requests, sampling, on_stop):
        for request in requests:
            assert on_stop(GenerationOutput(request.request_id, [], [], "length")) is None

    def sync_weights(self, named_parameters):
        pass


def test_an_episode_cut_by_the_context_limit_is_not_logged_as_eos(tokenizer):
    rollout = StepwiseRollout(None, tokenizer, PromptBuilder(tokenizer, [], k=0), engine=_FullContextEngine())
    (trajectory,) = rollout.run(lambda: MathEnv("gsm8k"), [{"question": "What is 2 + 3?", "answer": "5"}])
    assert trajectory.episode.end_reason == EndReason.CONTEXT_LIMIT


# ---------------------------------------------------------------------------------------------- resume
def test_resuming_a_reference_adapter_with_missing_keys_is_refused(tiny_model):
    from peft import LoraConfig, get_peft_model

    from trl_stepwise.trainer.reference import REFERENCE_ADAPTER, add_reference_adapter, load_reference_adapter

    model = get_peft_model(tiny_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    add_reference_adapter(model, "default")
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items() if f".{REFERENCE_ADAPTER}." in k}
    load_reference_adapter(model, state, "ckpt")  # a complete state loads
    partial = dict(list(state.items())[1:])
    with pytest.raises(ValueError, match=r"ckpt: its reference adapter does not match .*1 tensors missing"):
        load_reference_adapter(model, partial, "ckpt")


# ---------------------------------------------------------------------------------------------- bf16 on a CPU
@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_native_bfloat16_trains_in_float32_and_says_so(monkeypatch, caplog, tmp_path, native):
    """Emulated bfloat16 (a CPU with AVX2 only) made a training step ~20x slower than float32: the trainer falls back
    to float32 there, in one warning line; a CPU with native bfloat16 keeps the autocast."""
    from trl_stepwise.trainer import config as config_module

    monkeypatch.setattr(config_module, "cpu_has_native_bf16", lambda: native)
    with caplog.at_level("WARNING", logger=config_module.__name__):
        args = make_config(tmp_path, use_cpu=True, bf16=True, rollout_bf16=True, use_vllm=False)
    assert args.bf16 is native and args.rollout_bf16 is native
    warned = [r.getMessage() for r in caplog.records if "bfloat16" in r.getMessage()]
    assert (warned == []) if native else (len(warned) == 1 and "--bf16" in warned[0] and "\n" not in warned[0])


# ---------------------------------------------------------------------------------------------- step timing
def test_each_step_logs_its_own_optimisation_time(tiny_model, tokenizer, arithmetic_problems, tmp_path):
    """``time/optimisation_s`` of step N is step N's optimizer work (it was step N-1's, and 0 on the first step)."""
    trainer = StepwiseReinforceTrainer(
        model=tiny_model,
        args=make_config(tmp_path, max_steps=2, logging_steps=1),
        train_dataset=arithmetic_problems,
        processing_class=tokenizer,
    )
    trainer.train()
    logged = [h["time/optimisation_s"] for h in trainer.state.log_history if "time/optimisation_s" in h]
    assert len(logged) == 2 and all(seconds > 0 for seconds in logged), logged


@pytest.mark.parametrize("main", [True, False])
def test_the_server_push_streams_one_tensor_at_a_time_from_the_main_process(monkeypatch, main):
    """Inside one weight update, tensor by tensor (no second copy of the model); another process walks the pairs (a
    sharded model gathers on every process) without pushing, and every process waits for the push."""
    import sys
    import types

    import accelerate
    import torch

    engine, _ = _server_engine(monkeypatch, lambda payload: (200, {}))
    calls, waited = [], []

    class Client:
        def __init__(self, base_url, connection_timeout) -> None:
            calls.append("connect")

        def init_communicator(self, device) -> None:
            calls.append("communicator")

        @contextlib.contextmanager
        def weight_update(self):
            calls.append("start")
            yield
            calls.append("finish")

        def update_named_param(self, name, tensor) -> None:
            calls.append(name)

        def reset_prefix_cache(self) -> None:
            calls.append("reset")

    client_module = types.ModuleType("trl.generation.vllm_client")
    client_module.VLLMClient = Client
    monkeypatch.setitem(sys.modules, "trl.generation.vllm_client", client_module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    state = SimpleNamespace(is_main_process=main, wait_for_everyone=lambda: waited.append(True))
    monkeypatch.setattr(accelerate, "PartialState", lambda: state)
    walked = []

    def pairs():
        for name in ("a", "b"):
            walked.append(name)  # on a sharded model: gathered here, on every process
            yield name, torch.ones(2)

    engine.sync_weights(pairs())
    assert walked == ["a", "b"] and waited == [True]
    if main:
        assert calls == ["connect", "communicator", "start", "a", "b", "finish", "reset"]
        assert engine.weight_syncs == 1
    else:
        assert calls == [] and engine.weight_syncs == 0
