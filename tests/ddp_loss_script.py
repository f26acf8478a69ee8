"""Helper of ``tests/test_global_normalisation.py``: train 2 steps on fixed episodes, one process or several.

``python ddp_loss_script.py OUT MODEL EPISODES`` (one process) or the same under ``accelerate launch --multi_gpu
--num_processes 2``: every process replays its share of the pickled episodes (whole groups) instead of generating,
so one and two processes see exactly the same batch. Rank 0 writes OUT/result-{world_size}.pt with the gradients
before each optimizer step and the logged metrics.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from trl_stepwise.data import load_math_dataset
from trl_stepwise.models import load_tokenizer
from trl_stepwise.rollout import RolloutStats
from trl_stepwise.trainer import StepwiseReinforceTrainer

sys.path.insert(0, str(Path(__file__).parent))
from tiny_training import length_reward, make_config  # noqa: E402

NUM_EPISODES = 8


class ReplayEngine:
    """Stands in for the rollout engine: returns this process's share of the fixed episodes."""

    def __init__(self, trajectories) -> None:
        self.trajectories = trajectories
        self.stats = RolloutStats()

    def run(self, make_env, rows, group_ids=None):
        return self.trajectories


class GradientRecorder(TrainerCallback):
    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.gradients: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        self.gradients.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def main() -> None:
    output_dir, model_dir, episodes_file = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    episodes = pickle.loads(episodes_file.read_bytes())
    probe = make_config(output_dir)  # the world size is known once the arguments exist
    world = probe.world_size
    args = make_config(
        output_dir,
        max_steps=2,
        num_iterations=2,  # step 2 reuses the batch: the policy has moved, so KL and clipping are non-zero
        per_device_train_batch_size=NUM_EPISODES // world,
        num_generations=2,
        baseline="batch_mean",  # a batch statistic: must see every process's episodes
        scale_rewards="batch",
        kl_coef=0.5,
        epsilon=0.05,
        max_grad_norm=0.0,
        optim="sgd",  # Adam's first update is ~lr * sign(grad): float noise in near-zero gradients would flip it
        learning_rate=0.5,
        log_rollouts=False,
    )
    trainer = StepwiseReinforceTrainer(
        model=model_dir,
        args=args,
        train_dataset=load_math_dataset("arithmetic:level=1,n=32"),
        processing_class=load_tokenizer(model_dir),
        reward_funcs=[length_reward],
    )
    rank = trainer.accelerator.process_index
    share = NUM_EPISODES // world
    mine = episodes[rank * share : (rank + 1) * share]
    trainer.rollout_engine = lambda sampling=None: ReplayEngine(mine)
    recorder = GradientRecorder(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    if rank == 0:
        torch.save(
            {"gradients": recorder.gradients, "log_history": trainer.state.log_history, "world_size": world},
            output_dir / f"result-{world}.pt",
        )


if __name__ == "__main__":
    main()
