"""Loss normalisation and metrics over every process: two processes train exactly like one on the same episodes."""

from __future__ import annotations

import functools
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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


def run_one_and_two_processes(tmp_path, model_dir, episodes, mode: str) -> tuple[dict, dict]:
    """``ddp_loss_script.py`` in one process, then in two (``mode``: ddp, fsdp2, fsdp2-peft); both results."""
    (tmp_path / "episodes.pkl").write_bytes(pickle.dumps(episodes))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = str(REPO)
    script = [str(SCRIPT), str(tmp_path), str(model_dir), str(tmp_path / "episodes.pkl"), mode]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    for command in ([sys.executable, *script], [*launch, *script]):
        result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    one = torch.load(tmp_path / f"result-1-{mode}.pt", weights_only=False)
    two = torch.load(tmp_path / f"result-2-{mode}.pt", weights_only=False)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    return one, two


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
def test_two_processes_give_the_loss_and_gradient_of_one(tiny_model_dir, tokenizer, tmp_path):
    episodes = fixed_episodes(tiny_model_dir, tokenizer, tmp_path / "gen")
    tokens = [t.num_policy_tokens for t in episodes]
    assert sum(tokens[:4]) != sum(tokens[4:])  # the halves differ: per-rank means would not match the global mean
    one, two = run_one_and_two_processes(tmp_path, tiny_model_dir, episodes, "ddp")
    assert_same_training(one, two)
    logs_one = {e["step"]: e for e in one["log_history"] if "loss" in e}
    assert logs_one[2]["clip_ratio"] > 0
