"""Stepwise REINFORCE in any registered environment (``--env``, or a dataset whose rows name theirs).

Launch lines (CPU, embedded SmolLM2-135M-Instruct):

    # Countdown: reach a target with the given numbers and + - * / (generated problems, exact verifier)
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/reinforce_env.py \
        --config recipes/configs/reinforce_countdown_cpu.yaml

    # math with feedback: a wrong final answer gets a reply and another attempt, at a discounted reward
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/reinforce_env.py \
        --config recipes/configs/reinforce_math_feedback_cpu.yaml

Every flag of the config, the script and TRL's ModelConfig can be given on the command line; `--help` lists them.
"""

import sys

from trl_stepwise.recipe import main

if __name__ == "__main__":
    sys.exit(main())
