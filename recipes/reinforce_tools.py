"""Stepwise REINFORCE for a tool-using model, written the way TRL's documentation writes a tool-calling GRPO run.

A TRL user's script changes one import (``GRPOTrainer`` -> ``StepwiseReinforceTrainer``, ``GRPOConfig`` ->
``StepwiseReinforceConfig``); the environment class, its tool methods, the conversational dataset and the reward
functions stay as they are. The model writes calls in its chat template's own format (``<tool_call>{json}
</tool_call>`` for Qwen / Hermes templates), the results come back as ``tool`` messages rendered by the template,
masked from the loss, and every turn is trained with per-step credit.

Launch line (CPU, embedded SmolLM2-135M-Instruct with TRL's Qwen2.5 tool-calling template, colocated vLLM):

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/reinforce_tools.py \
        --config recipes/configs/reinforce_tools_cpu.yaml

Every flag of the config, the script and TRL's ModelConfig can be given on the command line; `--help` lists them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

from trl import ModelConfig, get_peft_config

from trl_stepwise.envs.arithmetic_tools import ArithmeticTools, arithmetic_tool_dataset, correct_answer, used_a_tool
from trl_stepwise.models import load_tokenizer
from trl_stepwise.trainer import StepwiseReinforceConfig, StepwiseReinforceTrainer
from trl_stepwise.usage import UsageError, parse_recipe_args, report_usage_error


@dataclass
class ToolScriptArguments:
    """The task: generated arithmetic word problems, posed as chat messages, with exact arithmetic tools."""

    train_size: int = field(default=512, metadata={"help": "Generated training problems."})
    level: str = field(default="1-2", metadata={"help": "Arithmetic levels of the problems: N, N-M or N,M."})
    chat_template: str = field(
        default="qwen2_5",
        metadata={
            "help": "Tool-calling chat template used when the tokenizer's own cannot render tools: one of TRL's "
            "(trl/chat_templates/<name>.jinja) or the path of a .jinja file."
        },
    )


def tool_tokenizer(model_name: str | None, chat_template: str):
    """The model's tokenizer, given ``chat_template`` when its own cannot render tool calls."""
    from trl.chat_template_utils import supports_tool_calling

    tokenizer = load_tokenizer(model_name)
    if supports_tool_calling(tokenizer):
        return tokenizer
    path = Path(chat_template)
    if not path.is_file():
        path = Path(str(files("trl") / "chat_templates" / f"{chat_template}.jinja"))
    if not path.is_file():
        raise UsageError(
            f"--chat_template {chat_template}: neither a file nor one of TRL's templates; pass e.g. qwen2_5 or a path"
        )
    tokenizer.chat_template = path.read_text()
    return tokenizer


def main(argv: list[str] | None = None) -> int:
    prog = Path(sys.argv[0]).name
    try:
        script_args, training_args, model_args = parse_recipe_args(
            (ToolScriptArguments, StepwiseReinforceConfig, ModelConfig), argv, prog=prog
        )
        tokenizer = tool_tokenizer(model_args.model_name_or_path, script_args.chat_template)
        dataset = arithmetic_tool_dataset(script_args.train_size, script_args.level)
    except (UsageError, ValueError) as err:
        return report_usage_error(prog, err)
    trainer = StepwiseReinforceTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        reward_funcs=[correct_answer, used_a_tool],
        environment_factory=ArithmeticTools,
        peft_config=get_peft_config(model_args),
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
