"""The main-job study's configurations pass the recipe's input checks, and its proxies are held out from training.

No model loads: ``check_run`` parses each configuration exactly as ``recipes/reinforce_gsm8k.py`` would and runs
``prepare_reinforce`` (config ranges, data sets, curriculum stages) and the LoRA settings, so a study of hours cannot
fail on a typo in its registry.
"""

from __future__ import annotations

import functools
import importlib
import sys
from pathlib import Path

import pytest

from trl_stepwise.trainer.config import cpu_has_native_bf16

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def study():
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module("main_job_study")


@pytest.fixture(scope="module")
def prepared(study, tmp_path_factory):
    """Every registered configuration through the recipe's checks (transformers engine: no vLLM needed). The data
    sets are loaded once and shared (every configuration reads the same files), which keeps this test fast."""
    import trl_stepwise.curriculum
    import trl_stepwise.recipe

    args = study.parse_args(["--use_vllm", "false"])
    out = {}
    with pytest.MonkeyPatch.context() as patch:
        for module in (trl_stepwise.recipe, trl_stepwise.curriculum):
            patch.setattr(module, "load_math_dataset", functools.cache(module.load_math_dataset))
        for name in study.VARIANTS:
            _, training_args, model_args, run = study.check_run(name, args, str(tmp_path_factory.mktemp(name)))
            out[name] = (training_args, model_args, run)
    return out


def test_every_configuration_passes_the_recipe_checks(study, prepared) -> None:
    assert len(study.VARIANTS) >= 8
    for name, (training_args, _, _) in prepared.items():
        assert training_args.max_steps == study.VARIANTS[name].overrides.get("max_steps", study.UNBOUNDED_STEPS)
        assert training_args.save_strategy == "no" and not training_args.eval_on_start, name
        assert training_args.use_vllm is False
    training = {name: prepared[name][0] for name in prepared}
    # bf16 autocast where the CPU has bfloat16 hardware (float32 elsewhere: emulated bf16 is ~20x slower)
    assert training["base"].bf16 is cpu_has_native_bf16() and not training["fp32"].bf16
    assert prepared["lora"][1].use_peft and not prepared["base"][1].use_peft
    assert training["gen8"].num_generations == 8 and training["gen8"].generation_batch_size == 16
    assert training["more_steps_fewer_episodes"].generation_batch_size == 8
    assert training["base"].generation_batch_size == 16
    assert prepared["real_mix"][2].curriculum.stages[-1].source == "gsm8k_easy"
    # the entries on mixed real and generated problems differ from their baseline in the one setting they name
    mixed = training["gsm8k_easy_guided"]
    assert mixed.loss_type == "dapo" and not mixed.dynamic_sampling and mixed.num_generations == 4
    assert training["mixed_dynamic_sampling"].dynamic_sampling
    assert [training[f"mixed_{t}"].loss_type for t in ("grpo", "bnpo", "dr_grpo", "cispo")] == [
        "grpo",
        "bnpo",
        "dr_grpo",
        "cispo",
    ]
    assert training["mixed_two_iterations"].num_iterations == 2
    assert training["mixed_two_iterations"].epsilon_high == 0.2
    assert training["mixed_two_iterations_clip_higher"].epsilon_high == 0.28
    assert [training[f"mixed_gen{n}"].num_generations for n in (8, 16)] == [8, 16]
    assert all(prepared[name][2].curriculum.stages[-1].source == "gsm8k_easy" for name in training if "mixed" in name)


def test_proxies_are_held_out_from_every_configuration(study, prepared) -> None:
    proxies, descriptions = study.proxy_sets(30)
    assert [len(proxies[p]) for p in study.PROXIES] == [30, 30, 30]
    assert "of the 440 GSM8K test problems" in descriptions["gsm8k_2step"]
    assert all(row["solution"].count("<<") <= 2 for row in proxies["gsm8k_2step"])
    assert sorted({row["level"] for row in proxies["arith_L1-3"]}) == [1, 2, 3]
    study.check_held_out(proxies, [run for _, _, run in prepared.values()])
    leaked = [{**proxies["gsm8k"][0], "question": prepared["base"][2].train[0]["question"]}]
    with pytest.raises(RuntimeError, match="also training problems"):
        study.check_held_out({"gsm8k": leaked}, [prepared["base"][2]])


def test_unknown_configuration_is_a_usage_error(study, tmp_path) -> None:
    from trl_stepwise.usage import UsageError

    with pytest.raises(UsageError, match="not a configuration"):
        study.check_run("nope", study.parse_args([]), str(tmp_path))


def test_mcnemar_p_value() -> None:
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    from common import mcnemar_p_value

    assert mcnemar_p_value([0, 1, 1], [0, 1, 1]) == 1.0
    assert mcnemar_p_value([0] * 10, [1] * 10) == pytest.approx(2 / 2**10)
    assert mcnemar_p_value([0, 1], [1, 0]) == 1.0


def test_episodes_played_counts_batches_not_optimizer_steps(study) -> None:
    from training_budget import episodes_played

    assert episodes_played([], 29, 1, 16) == 29 * 16
    assert episodes_played([], 31, 2, 16) == 16 * 16  # 16 batches, the last one trained on once
    # dynamic sampling played 1.5x then 1x the batch (one logged ratio per batch)
    logs = [{"loss": 0.1}, {"dynamic_sampling/episodes_generated_per_trained": 1.5}]
    logs.append({"dynamic_sampling/episodes_generated_per_trained": 1.0})
    assert episodes_played(logs, 2, 1, 16) == 40
