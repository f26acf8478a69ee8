"""Stepwise REINFORCE on MATH (train split), evaluated on MATH-500.

Launch lines:

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/reinforce_math.py \
        --config recipes/configs/reinforce_math_cpu.yaml

    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/reinforce_math.py \
        --config recipes/configs/reinforce_math_llama1b_lora.yaml

`--help` lists every flag.
"""

import sys

from trl_stepwise.recipe import main

if __name__ == "__main__":
    sys.exit(main(default_dataset="math", default_eval_dataset="math500"))
