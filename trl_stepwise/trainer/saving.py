"""Saving and resuming: crash-safe checkpoints, the trainer's own state beside transformers' (reference weights,
refresh counter, baseline, curriculum stage), a PEFT policy saved without its reference adapter, hub uploads and
the training-curves plot.

``CheckpointMixin`` holds the ``transformers.Trainer`` overrides; the trainer it is mixed into owns ``reference``
(a ``ReferencePolicy``), ``algorithm`` and ``curriculum``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import is_peft_model
from transformers.trainer import SCHEDULER_NAME, TRAINING_ARGS_NAME
from transformers.trainer_utils import rotate_checkpoints

from trl_stepwise.trainer.checkpoints import publish_checkpoint, remove_stale_staging, staging_dir
from trl_stepwise.trainer.hub import ROLLOUT_FILES, uploads_ignoring
from trl_stepwise.trainer.sharded_state import (
    has_model,
    load_model,
    load_optimizer,
    save_model_and_optimizer,
    sharded_at_load,
)

STATE_FILE = "stepwise_state.json"


class CheckpointMixin:
    """``transformers.Trainer`` overrides for saving and resuming (see the module docstring)."""

    def _save_checkpoint(self, model, trial) -> None:
        """Write ``checkpoint-N`` under a hidden staging folder and rename it once complete (crash-safe)."""
        if self.hp_search_backend is not None and trial is not None:
            return super()._save_checkpoint(model, trial)
        output_dir = self.args.output_dir
        staging = staging_dir(output_dir, self.state.global_step)
        if self.args.should_save:
            remove_stale_staging(output_dir)
        self.accelerator.wait_for_everyone()
        self._staging_run_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_run_dir = None
        self.accelerator.wait_for_everyone()  # every process has written its part (e.g. its RNG state)
        if self.args.should_save:
            final = publish_checkpoint(staging, output_dir)
            if self.state.best_model_checkpoint and Path(self.state.best_model_checkpoint).parent == staging:
                self.state.best_model_checkpoint = str(final)
            rotate_checkpoints(
                output_dir=output_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

    def _get_output_dir(self, trial) -> str:
        staging = getattr(self, "_staging_run_dir", None)
        return staging if staging is not None else super()._get_output_dir(trial)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """As transformers saves; a PEFT policy on a base sharded at load time also on the other processes, since
        peft gathers the sharded tensors while it saves (transformers saves it from the main process alone)."""
        model = self.accelerator.unwrap_model(self.model)
        if sharded_at_load(model) and is_peft_model(model) and not self.args.should_save:
            adapters = [self.reference.policy_adapter] if self.reference.has_adapter else None
            model.save_pretrained(
                output_dir or self.args.output_dir, is_main_process=False, selected_adapters=adapters
            )
            return
        super().save_model(output_dir, _internal_call)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save the model as transformers does, but a PEFT policy without the frozen reference adapter."""
        model = self.accelerator.unwrap_model(self.model)
        if not (self.reference.has_adapter and is_peft_model(model)):
            super()._save(output_dir, state_dict)
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        if self.args.should_save:
            model.save_pretrained(output_dir, state_dict=state_dict, selected_adapters=[self.reference.policy_adapter])
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def push_to_hub(self, *args: Any, **kwargs: Any):
        """Upload as transformers does; ``rollouts*.jsonl`` only with ``push_rollouts=True``."""
        with uploads_ignoring(() if self.args.push_rollouts else ROLLOUT_FILES):
            return super().push_to_hub(*args, **kwargs)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        with uploads_ignoring(() if self.args.push_rollouts else ROLLOUT_FILES):
            super()._push_from_checkpoint(checkpoint_folder)

    def _save_rng_state(self, output_dir: str) -> None:
        """Save the trainer's own state next to the RNG state (before trainer_state.json, the completion marker)."""
        super()._save_rng_state(output_dir)
        policy = self.accelerator.unwrap_model(self.model)
        if self.sharded:  # every process writes its shards of the reference
            self.reference.save(policy, Path(output_dir), sharded=True)
        if not self.args.should_save:
            return
        state = {
            **self.reference.state(),
            "running_baseline": self.algorithm.running_baseline,
            "curriculum": self.curriculum.state_dict() if self.curriculum is not None else None,
        }
        path = Path(output_dir) / STATE_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)
        if not self.sharded:
            self.reference.save(policy, Path(output_dir))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """A model sharded at load time: every process writes its weight and optimizer shards (``sharded_state``)."""
        if not sharded_at_load(self.model):
            return super()._save_optimizer_and_scheduler(output_dir)
        save_model_and_optimizer(self.model, self.optimizer, output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """A model sharded at load time reads its own weight shards back (the consolidated files do not fit it)."""
        target = model if model is not None else self.model
        if sharded_at_load(target) and has_model(resume_from_checkpoint):
            load_model(target, resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Also restore the trainer's own state. transformers calls this on every resume and backend, after the
        weights are loaded; ``_load_from_checkpoint`` is skipped under DeepSpeed and FSDP."""
        if checkpoint is not None and sharded_at_load(self.model) and has_model(checkpoint):
            load_optimizer(self.model, self.optimizer, checkpoint)
            self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))
        else:
            super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or not (Path(checkpoint) / STATE_FILE).is_file():
            return
        state = json.loads((Path(checkpoint) / STATE_FILE).read_text())
        self.algorithm.running_baseline = state.get("running_baseline")
        if self.curriculum is not None and state.get("curriculum") is not None:
            self.curriculum.load_state_dict(state["curriculum"])
        self.reference.restore(self.accelerator.unwrap_model(self.model), checkpoint, state)

    def plot_curves(self) -> Path | None:
        """Write ``output_dir/training_curves.png`` (reward and eval accuracy over steps) from the log history."""
        if not self.is_world_process_zero():
            return None
        from trl_stepwise.plotting import plot_training_curves

        return plot_training_curves(self.state.log_history, Path(self.args.output_dir) / "training_curves.png")
