"""Stepwise REINFORCE on MATH (train split), evaluated on MATH-500.

Launch lines:

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/reinforce_math.py \
        --config recipes/configs/reinforce_math_cpu.yaml

    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/reinforce_math.py \
        --config recipes/configs/reinforce_math_llama1b_lora.yaml

`--help` lists every flag.
"""

from trl import ModelConfig, TrlParser

from trl_stepwise.recipe import ReinforceScriptArguments, run_reinforce
from trl_stepwise.trainer import StepwiseReinforceConfig

if __name__ == "__main__":
    parser = TrlParser((ReinforceScriptArguments, StepwiseReinforceConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config()
    if script_args.dataset_name == "gsm8k":  # this recipe's defaults, unless the config names other data
        script_args.dataset_name = "math"
        script_args.eval_dataset_name = script_args.eval_dataset_name or "math500"
    run_reinforce(script_args, training_args, model_args)
