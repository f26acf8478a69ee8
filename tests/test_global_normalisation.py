"""Two processes train exactly like one on the same episodes: loss normalisation and metrics over every process
under DDP, and under FSDP2 (torch's ``fully_shard`` on gloo, through transformers' ``distributed_config``) also the
push of the gathered policy to the engine and the resume from each process's shards.

Two launches serve every test (module fixture ``runs``): one process (ddp, fsdp2-peft) and two processes (ddp, then
fsdp2 and fsdp2-peft); ``fsdp2`` in one process is the ``ddp`` run."""

from __future__ import annotations

import functools
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_training import length_reward, make_config

from trl_stepwise.data import load_math_dataset
from trl_stepwise.trainer import StepwiseReinforceTrainer

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "ddp_loss_script.py"


def fixed_episodes(model_dir, tokenizer, output_dir) -> list:
    """4 problems x 2 episodes from the tiny model, in group order (ranks take whole groups)."""
    trainer = StepwiseReinforceTrainer(
        model=str(model_dir),
        args=make_config(output_dir, log_rollouts=False),
        train_dataset=load_math_dataset("arithmetic:level=1,n=32"),
        processing_class=tokenizer,
        reward_funcs=[length_reward],
    )
    episodes = []
    for groups, budget in (((0, 1), None), ((2, 3), 5)):  # a shorter token budget for the second half
        rows = [dict(trainer.train_dataset[p]) for p in groups for _ in range(2)]
        torch.manual_seed(1)
        make_env = functools.partial(trainer.make_env, budget)
        episodes += trainer.rollout_engine().run(make_env, rows, group_ids=[p for p in groups for _ in range(2)])
    return episodes


LAUNCHES = {(1, "ddp,fsdp2-peft"), (2, "ddp,fsdp2,fsdp2-peft")}


@pytest.fixture(scope="module")
def runs(make_tiny_model, tokenizer, tmp_path_factory) -> tuple[Path, dict[tuple[int, str], dict]]:
    """``ddp_loss_script.py`` in its two launches; results by (process count, mode), and their folder. The model
    ties its input and output embeddings, as the embedded SmolLM2 does (two FSDP groups cannot share them)."""
    folder = tmp_path_factory.mktemp("runs")
    tiny_model_dir = folder / "tied-model"
    make_tiny_model(tie_word_embeddings=True).save_pretrained(tiny_model_dir)
    tokenizer.save_pretrained(tiny_model_dir)
    episodes = fixed_episodes(tiny_model_dir, tokenizer, folder / "gen")
    tokens = [t.num_policy_tokens for t in episodes]
    assert sum(tokens[:4]) != sum(tokens[4:])  # the halves differ: per-rank means would not match the global mean
    (folder / "episodes.pkl").write_bytes(pickle.dumps(episodes))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = str(REPO)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    results = {}
    for processes, modes in sorted(LAUNCHES):
        script = [str(SCRIPT), str(folder), str(tiny_model_dir), str(folder / "episodes.pkl"), modes]
        command = [sys.executable, *script] if processes == 1 else [*launch, *script]
        result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        for mode in modes.split(","):
            results[processes, mode] = torch.load(folder / f"result-{processes}-{mode}.pt", weights_only=False)
            assert results[processes, mode]["world_size"] == processes
    results[1, "fsdp2"] = results[1, "ddp"]
    return folder, results


def assert_same_training(one: dict, two: dict) -> None:
    """Equal whole gradients before each optimizer step and equal logged metrics, step by step."""
    assert len(one["gradients"]) == len(two["gradients"]) == 2
    for step, (g1, g2) in enumerate(zip(one["gradients"], two["gradients"], strict=True), start=1):
        assert g1.keys() == g2.keys() and g1
        for name in g1:
            assert torch.allclose(g1[name], g2[name], rtol=1e-4, atol=1e-7), (step, name)
    logs_one = {e["step"]: e for e in one["log_history"] if "loss" in e}
    logs_two = {e["step"]: e for e in two["log_history"] if "loss" in e}
    assert sorted(logs_one) == sorted(logs_two) == [1, 2]
    for step in (1, 2):
        for key in ("loss", "kl", "entropy", "clip_ratio", *(("reward",) if step == 1 else ())):
            assert logs_two[step][key] == pytest.approx(logs_one[step][key], rel=1e-4, abs=1e-7), (step, key)
    assert logs_one[2]["kl"] > 1e-7  # the second step's KL is not trivial


@pytest.mark.slow
def test_two_processes_give_the_loss_and_gradient_of_one(runs):
    _, results = runs
    one, two = results[1, "ddp"], results[2, "ddp"]
    assert not two["sharded"]
    assert_same_training(one, two)
    logs_one = {e["step"]: e for e in one["log_history"] if "loss" in e}
    assert logs_one[2]["clip_ratio"] > 0


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=atol) for k in a)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def losses_and_kl(log_history: list[dict]) -> list[tuple[int, float, float]]:
    return [(e["step"], e["loss"], e["kl"]) for e in log_history if "loss" in e]


@pytest.mark.slow
def test_fsdp2_full_weights_train_push_and_resume_like_one_process(runs):
    folder, results = runs
    one, two = results[1, "fsdp2"], results[2, "fsdp2"]
    assert two["sharded"] and not one["sharded"]
    assert_same_training(one, two)  # the sharded reference scored the KL of step 2
    # the engine receives the whole policy: exactly the gathered state, and what one process pushes
    assert two["pushed"].keys() == two["gathered"].keys()
    assert all(torch.equal(two["pushed"][k], two["gathered"][k]) for k in two["gathered"])
    assert close(two["pushed"], one["pushed"])
    # resumed from checkpoint-2 (weights, Adam state and the reference refreshed at step 2, all from shards): exact
    assert same(two["resumed"], two["straight"])
    assert not close(two["straight"], two["gathered"], atol=1e-4)  # the 4 steps moved the weights
    straight, resumed = losses_and_kl(two["straight_logs"]), losses_and_kl(two["resumed_logs"])
    assert [s for s, _, _ in resumed] == [1, 2, 3, 4]
    assert resumed == straight
    assert resumed[2][2] == 0.0 and resumed[3][2] > 0  # step 3 scored against the restored (refreshed) reference
    checkpoint = folder / "straight-fsdp2" / "checkpoint-2"
    for part in ("sharded_model", "sharded_optimizer", "sharded_reference"):
        assert (checkpoint / part / ".metadata").is_file(), part
    exported = load_file(folder / "straight-fsdp2" / "checkpoint-4" / "model.safetensors")  # consolidated
    assert same(exported, {k: v for k, v in two["straight"].items() if k in exported})


@pytest.mark.slow
def test_fsdp2_lora_trains_and_pushes_the_merged_policy_like_one_process(runs):
    _, results = runs
    one, two = results[1, "fsdp2-peft"], results[2, "fsdp2-peft"]
    assert two["sharded"]
    assert_same_training(one, two)  # the adapter-free base as reference, the adapter averaged over processes
    assert close(two["pushed"], one["pushed"])  # merged weights; one process's equal peft's merge (test_weights.py)
    assert not any("lora" in k for k in two["pushed"])
    assert same(two["resumed"], two["straight"])
    assert losses_and_kl(two["resumed_logs"]) == losses_and_kl(two["straight_logs"])
