"""``benchmarks/env_trainers.py`` without training: its environment presets are the CPU recipes', and both trainers
get the same problems and prompt (the training run itself is checked by the script's ``--quick --tiny`` smoke run)."""

from __future__ import annotations

import argparse
import importlib.util
import pathlib

import pytest
import yaml

ROOT = pathlib.Path(__file__).parents[1]


@pytest.fixture(scope="module")
def env_trainers():
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))  # the script imports its neighbour `common`
    try:
        spec = importlib.util.spec_from_file_location("env_trainers", ROOT / "benchmarks" / "env_trainers.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["env_trainers"] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    yield module
    sys.modules.pop("env_trainers", None)


@pytest.mark.parametrize("env", ["countdown", "math_feedback"])
def test_presets_are_the_cpu_recipe_configs(env_trainers, env):
    config = yaml.safe_load((ROOT / "recipes" / "configs" / f"reinforce_{env}_cpu.yaml").read_text())
    preset = env_trainers.PRESETS[env]
    assert config["env_id"] == env
    assert (preset.train, [preset.eval]) == (config["dataset_name"], config["eval_dataset_name"])
    assert preset.system_prompt == config.get("system_prompt")
    limits = ("max_episode_steps", "max_episode_tokens", "eval_max_episode_tokens")
    assert tuple(getattr(preset, key) for key in limits) == tuple(config[key] for key in limits)


def test_setup_gives_distinct_problems_without_env_column(env_trainers, tokenizer):
    args = argparse.Namespace(env="countdown", train_problems=8, n_few_shot=2, seed=0, eval_problems=3)
    setup = env_trainers.build_setup(args, tokenizer)
    questions = setup.train["question"]
    assert len(questions) == len(set(questions)) == 8
    assert "env" not in setup.train.column_names and all("env" not in row for row in setup.eval_rows)
    assert len(setup.eval_rows) == 3 and len(setup.builder.shots(questions[0])) == 2
