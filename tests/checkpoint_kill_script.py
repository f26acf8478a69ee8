"""A tiny training run that the checkpoint tests kill with SIGKILL and resume (``--resume_from_checkpoint true``).

    python tests/checkpoint_kill_script.py OUTPUT_DIR TINY_MODEL_DIR MAX_STEPS [--kill_in PART:STEP]

``--kill_in model:3`` kills the process with SIGKILL right after the model weights of checkpoint-3 are written;
``--kill_in rng:3`` after the optimizer state, just before trainer_state.json: both inside the save.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_training import length_reward, make_config  # noqa: E402

from trl_stepwise.data import load_math_dataset  # noqa: E402
from trl_stepwise.trainer import StepwiseReinforceTrainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("model_dir")
    parser.add_argument("max_steps", type=int)
    parser.add_argument("--kill_in", default=None)
    args = parser.parse_args()
    config = make_config(
        args.output_dir, max_steps=args.max_steps, save_strategy="steps", save_steps=1, save_total_limit=2
    )
    trainer = StepwiseReinforceTrainer(
        model=args.model_dir,
        args=config,
        train_dataset=load_math_dataset("arithmetic:level=1,n=32"),
        reward_funcs=[length_reward],
    )
    if args.kill_in:
        part, step = args.kill_in.split(":")
        method = {"model": "save_model", "rng": "_save_rng_state"}[part]
        original = getattr(trainer, method)

        def killing(*a, **k):
            result = original(*a, **k)
            if trainer.state.global_step == int(step):
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        setattr(trainer, method, killing)
    trainer.train(resume_from_checkpoint="true" if any(Path(args.output_dir).glob("checkpoint-*")) else None)
    print(f"finished global_step={trainer.state.global_step}", flush=True)


if __name__ == "__main__":
    main()
