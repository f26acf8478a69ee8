"""Helper of ``tests/test_global_normalisation.py``: 2 steps on fixed episodes, one process or several.

``python ddp_loss_script.py OUT MODEL EPISODES [MODE[,MODE...]]`` in one process, or the same under ``accelerate
launch --multi_gpu --num_processes 2``: every process replays its share of the pickled episodes (whole groups) instead
of generating, so one and two processes see exactly the same batch. Each mode is one run in the same processes; rank 0
writes OUT/result-{world_size}-{mode}.pt with the whole gradients before each optimizer step, the logged metrics, the
weights pushed to an engine after training and the weights gathered from the model.

Modes: ``ddp`` (whole weights on every process), ``fsdp2`` and ``fsdp2-peft`` (a LoRA adapter): in several processes
the model is sharded at load time with torch's ``fully_shard`` (transformers' ``distributed_config``) and generation
is left to an engine on gathered weights; the run then also trains 4 steps with a checkpoint at every step and
resumes from the second, recording both runs' final weights and logs. In one process ``fsdp2`` is ``ddp``.
"""

from __future__ import annotations

import copy
import pickle
import sys
from pathlib import Path

import torch
from peft import LoraConfig
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
        return copy.deepcopy(self.trajectories)  # fresh episodes: scoring adds the rewards to them


class RecordingEngine:
    """Stands in for an engine on gathered weights: keeps what the trainer pushes."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}

    def sync_weights(self, named_parameters) -> None:
        self.weights = {name: tensor.detach().clone() for name, tensor in named_parameters}


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (every process calls this in the same order), other tensors as they are."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


class GradientRecorder(TrainerCallback):
    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.gradients: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        grads = {n: whole(p.grad.detach()).clone() for n, p in model.named_parameters() if p.grad is not None}
        self.gradients.append(grads)


def build(output_dir: Path, model_dir: str, episodes: list, mode: str, **overrides) -> StepwiseReinforceTrainer:
    probe = make_config(output_dir)  # the world size is known once the arguments exist
    world = probe.world_size
    settings = dict(
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
    if mode.startswith("fsdp2"):
        from transformers.distributed import DistributedConfig

        settings.update(use_vllm=True)  # generation on gathered weights (replayed here)
        if world > 1:
            settings.update(model_init_kwargs={"distributed_config": DistributedConfig(fsdp_size=world)})
    trainer = StepwiseReinforceTrainer(
        model=model_dir,
        args=make_config(output_dir, **{**settings, **overrides}),
        train_dataset=load_math_dataset("arithmetic:level=1,n=32"),
        processing_class=load_tokenizer(model_dir),
        reward_funcs=[length_reward],
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if "peft" in mode else None,
    )
    rank = trainer.accelerator.process_index
    share = NUM_EPISODES // world
    mine = episodes[rank * share : (rank + 1) * share]
    trainer.rollout_engine = lambda sampling=None: ReplayEngine(mine)
    return trainer


def gathered_state(trainer: StepwiseReinforceTrainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {name: whole(tensor).clone() for name, tensor in model.state_dict().items()}


def pushed_weights(trainer: StepwiseReinforceTrainer) -> dict[str, torch.Tensor]:
    engine = RecordingEngine()
    trainer._engine, trainer._engine_step = engine, None
    trainer.generation_engine()
    return engine.weights


def run(output_dir: Path, model_dir: str, episodes: list, mode: str) -> None:
    trainer = build(output_dir / f"run-{mode}", model_dir, episodes, mode)
    recorder = GradientRecorder(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    result = {
        "gradients": recorder.gradients,
        "log_history": trainer.state.log_history,
        "world_size": trainer.accelerator.num_processes,
        "sharded": trainer.sharded,
        "pushed": pushed_weights(trainer),
        "gathered": gathered_state(trainer),
    }
    if mode.startswith("fsdp2") and trainer.accelerator.num_processes > 1:
        # checkpoints every step; a run resumed from the second ends where the straight run does
        resume = dict(max_steps=4, num_iterations=1, ref_sync_steps=2, save_strategy="steps", save_steps=1)
        resume.update(optim="adamw_torch", learning_rate=1e-2)  # an optimizer with state to save and restore
        straight = build(output_dir / f"straight-{mode}", model_dir, episodes, mode, **resume)
        straight.train()
        resumed = build(output_dir / f"resumed-{mode}", model_dir, episodes, mode, **resume)
        resumed.train(resume_from_checkpoint=str(output_dir / f"straight-{mode}" / "checkpoint-2"))
        result.update(
            straight=gathered_state(straight),
            straight_logs=straight.state.log_history,
            resumed=gathered_state(resumed),
            resumed_logs=resumed.state.log_history,
        )
    if trainer.accelerator.process_index == 0:
        torch.save(result, output_dir / f"result-{result['world_size']}-{mode}.pt")


def main() -> None:
    output_dir, model_dir, episodes_file = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    episodes = pickle.loads(episodes_file.read_bytes())
    for mode in (sys.argv[4] if len(sys.argv) > 4 else "ddp").split(","):  # one launch, several runs
        run(output_dir, model_dir, episodes, mode)


if __name__ == "__main__":
    main()
