"""SFT baseline on GSM8K with TRL's SFTTrainer: the same problems and stepwise format as the RL recipes.

Each example is [bundled system prompt, question] -> the reference solution as stepwise lines (calculator
annotations kept, a final "The answer is: N" line); the loss covers the solution only (TRL's default for
prompt-completion data). Compare the result with an RL run by evaluating both the same way (see the config's notes).

Launch lines:

    # CPU, embedded SmolLM2-135M-Instruct, 200 problems (17 minutes here on 2 cores shared with another run)
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/sft_gsm8k.py \
        --config recipes/configs/sft_gsm8k_cpu.yaml

    # one GPU, the whole GSM8K train split, Llama-3.2-1B-Instruct with LoRA (add --load_in_4bit for QLoRA)
    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/sft_gsm8k.py \
        --model_name_or_path meta-llama/Llama-3.2-1B-Instruct --use_peft --lora_r 16 --lora_alpha 32 \
        --learning_rate 1.0e-4 --per_device_train_batch_size 16 --max_length 512 --num_train_epochs 1 \
        --output_dir outputs/sft_gsm8k_llama1b_lora

    # other problem sets: --dataset_name math, arithmetic:level=2, a hub id or a local JSONL with worked solutions

Every flag of the config, the script (SFTScriptArguments), TRL's SFTConfig and ModelConfig can be given on the
command line; `--help` lists them.
"""

import sys

from trl_stepwise.sft import main

if __name__ == "__main__":
    sys.exit(main())
