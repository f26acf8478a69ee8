"""Helper of the 2-process tests: ``accelerate launch ... ddp_train_script.py OUT MODEL [CONFIG_JSON]``.

Trains the tiny model saved at MODEL for 2 steps (with the config overrides of CONFIG_JSON, e.g. ``{"use_vllm":
true}``) and writes OUT/rank{N}.json with a checksum of the weights, so the test can check that both processes end
with identical weights.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from trl_stepwise.data import load_math_dataset
from trl_stepwise.models import load_tokenizer
from trl_stepwise.trainer import StepwiseReinforceTrainer

sys.path.insert(0, str(Path(__file__).parent))
from tiny_training import length_reward, make_config  # noqa: E402


def checksum(model: torch.nn.Module) -> str:
    """Of the whole weights: a sharded model's DTensors are gathered (every process, in the same order)."""
    from torch.distributed.tensor import DTensor

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    output_dir, model_dir = Path(sys.argv[1]), sys.argv[2]
    overrides = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    args = make_config(output_dir, **{"max_steps": 2, **overrides})
    trainer = StepwiseReinforceTrainer(
        model=model_dir,
        args=args,
        train_dataset=load_math_dataset("arithmetic:level=1,n=32"),
        processing_class=load_tokenizer(model_dir),
        reward_funcs=[length_reward],
    )
    initial = checksum(trainer.accelerator.unwrap_model(trainer.model))
    trainer.train()
    rank = trainer.accelerator.process_index
    name = "rollouts.jsonl" if rank == 0 else f"rollouts-rank{rank}.jsonl"
    questions = sorted({json.loads(line)["question"] for line in (output_dir / name).read_text().splitlines()})
    state = {
        "rank": rank,
        "sharded": trainer.sharded,
        "world_size": trainer.accelerator.num_processes,
        "global_step": trainer.state.global_step,
        "initial_checksum": initial,
        "checksum": checksum(trainer.accelerator.unwrap_model(trainer.model)),
        "questions": questions,
        "weight_syncs": getattr(trainer._engine, "weight_syncs", None),
        "sampler_gaps": [
            e["sampling/sampling_logp_difference/mean"]
            for e in trainer.state.log_history
            if "sampling/sampling_logp_difference/mean" in e
        ],
        "reference_episodes": [
            e["guidance/reference_episodes"] for e in trainer.state.log_history if "guidance/reference_episodes" in e
        ],
    }
    (output_dir / f"rank{rank}.json").write_text(json.dumps(state))


if __name__ == "__main__":
    main()
