"""Our environments under TRL's GRPOTrainer through ``rollout_func``: masks, returns, and a tiny training step."""

from __future__ import annotations

from scripted_engine import ScriptedEngine
from tiny_training import length_reward

from trl_stepwise.envs.feedback import FEEDBACK
from trl_stepwise.grpo_adapter import GRPOEnvAdapter
from trl_stepwise.prompting import PromptBuilder
from trl_stepwise.rollout import SamplingConfig

ROWS = [
    {"question": "Ann has 4 pens and buys 5 more. How many pens?", "answer": "9", "solution": "4+5 = 9\n#### 9"},
    {"question": "A box holds 6 eggs. How many eggs are in 2 boxes?", "answer": "12", "solution": "6*2 = 12\n#### 12"},
]


class _Trainer:
    accelerator = model = None


def test_rollout_func_returns_masks_and_environment_returns(tokenizer):
    script = tokenizer("The answer is: 8\nThe answer is: 9\n", add_special_tokens=False)["input_ids"]
    builder = PromptBuilder(tokenizer, ROWS, k=1)
    adapter = GRPOEnvAdapter(
        "math_feedback",
        ROWS,
        tokenizer,
        builder,
        SamplingConfig(max_step_tokens=30),
        engine=lambda trainer: ScriptedEngine(tokenizer, script),
    )
    assert adapter.dataset()["prompt"] == [r["question"] for r in ROWS]
    output = adapter.rollout_func([ROWS[0]["question"]] * 2, _Trainer())
    assert len(output["completion_ids"]) == 2 and output["env_return"] == [0.5, 0.5]
    ids, mask = output["completion_ids"][0], output["env_mask"][0]
    assert tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m]) == FEEDBACK
    assert (
        len(output["logprobs"][0]) == len(ids) and output["prompt_ids"][0] == adapter.last_trajectories[0].prompt_ids
    )
    assert GRPOEnvAdapter.reward_func(["a", "b"], env_return=[0.5, 1.0]) == [0.5, 1.0]


def test_grpo_trainer_trains_a_step_in_an_environment(tiny_model, tokenizer, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    builder = PromptBuilder(tokenizer, ROWS, k=1)
    adapter = GRPOEnvAdapter("math_feedback", ROWS, tokenizer, builder, SamplingConfig(max_step_tokens=6))
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    config = GRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        max_steps=1,
        per_device_train_batch_size=4,
        num_generations=2,
        learning_rate=1e-2,
        beta=0.0,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=tiny_model,
        args=config,
        train_dataset=adapter.dataset(),
        processing_class=tokenizer,
        reward_funcs=[adapter.reward_func, length_reward],  # a random model earns no return: vary the reward
        rollout_func=adapter.rollout_func,
    )
    trainer.train()
    assert len(adapter.last_trajectories) == 4
    assert any(not (v == before[k]).all() for k, v in tiny_model.state_dict().items())
