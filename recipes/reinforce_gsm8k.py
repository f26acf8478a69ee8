"""Stepwise REINFORCE on GSM8K.

Launch lines:

    # CPU, embedded SmolLM2-135M-Instruct (the README's main job)
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/reinforce_gsm8k.py \
        --config recipes/configs/reinforce_gsm8k_cpu.yaml

    # one 24 GB GPU, Llama-3.2-1B-Instruct with LoRA (or QLoRA: reinforce_gsm8k_qlora.yaml)
    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/reinforce_gsm8k.py \
        --config recipes/configs/reinforce_gsm8k_llama1b_lora.yaml

    # several GPUs, full weights (the original run: kl 0.25, reference refresh every 2 steps, 5-shot, calculator)
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml recipes/reinforce_gsm8k.py \
        --config recipes/configs/reinforce_gsm8k_llama1b_full.yaml

Every flag of the config, the script and TRL's ModelConfig can be given on the command line; `--help` lists them.
"""

import sys

from trl_stepwise.recipe import main

if __name__ == "__main__":
    sys.exit(main())
