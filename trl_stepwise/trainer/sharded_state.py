"""Checkpoints of a sharded policy: every process writes and reads its own shards (torch's distributed checkpoint).

transformers saves a model sharded at load time (``from_pretrained(distributed_config=...)``, or the user's own
``fully_shard``) as a consolidated model but not its optimizer state, and so refuses to checkpoint it for resuming.
The trainer writes the model and optimizer shards beside the consolidated model (``sharded_model/``,
``sharded_optimizer/``) and reads them back on resume, so a resumed run continues exactly. Accelerate's FSDP2 and
DeepSpeed plugins save their own shards; the sharded reference is written here under every set-up
(``sharded_reference/``). Each folder is written inside the checkpoint's staging folder, so the crash-safety of
``checkpoints.py`` covers it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

MODEL_DIR = "sharded_model"
OPTIMIZER_DIR = "sharded_optimizer"
REFERENCE_DIR = "sharded_reference"


def sharded_at_load(model: Any) -> bool:
    """A model that owns its shards outside accelerate (transformers' flag for models sharded at load time)."""
    return bool(getattr(model, "is_distributed_loading_by_transformers", False))


@contextlib.contextmanager
def resumable(model: Any, args: Any) -> Iterator[None]:
    """Let ``Trainer.__init__`` accept checkpoints of a model sharded at load time: it refuses them because it would
    not save the optimizer state, which this module does. ``save_only_model`` is set only while it checks."""
    if not sharded_at_load(model) or args.save_only_model:
        yield
        return
    args.save_only_model = True
    try:
        yield
    finally:
        args.save_only_model = False


def save_model_and_optimizer(model: torch.nn.Module, optimizer: Any, output_dir: str | Path) -> None:
    """Every process writes its shards of the weights and of the optimizer state (a collective)."""
    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    save(get_model_state_dict(model), checkpoint_id=str(Path(output_dir) / MODEL_DIR))
    save(get_optimizer_state_dict(model, optimizer), checkpoint_id=str(Path(output_dir) / OPTIMIZER_DIR))


def has_model(checkpoint: str | Path) -> bool:
    return (Path(checkpoint) / MODEL_DIR).is_dir()


def load_model(model: torch.nn.Module, checkpoint: str | Path) -> None:
    """Read this process's weight shards back (a collective)."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = get_model_state_dict(model)
    load(state, checkpoint_id=str(Path(checkpoint) / MODEL_DIR))
    set_model_state_dict(model, state)


def load_optimizer(model: torch.nn.Module, optimizer: Any, checkpoint: str | Path) -> None:
    """Read this process's optimizer-state shards back (a collective)."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer)
    load(state, checkpoint_id=str(Path(checkpoint) / OPTIMIZER_DIR))
    set_optimizer_state_dict(model, optimizer, state)


def save_tensors(tensors: dict[str, torch.Tensor], output_dir: str | Path) -> None:
    """The reference's tensors (sharded or whole), each process writing its shards (a collective)."""
    from torch.distributed.checkpoint import save

    save(dict(tensors), checkpoint_id=str(Path(output_dir) / REFERENCE_DIR))


def load_tensors(tensors: dict[str, torch.Tensor], checkpoint: str | Path) -> dict[str, torch.Tensor] | None:
    """``tensors`` (shaped and sharded as they should be) filled from the checkpoint; None when it has none."""
    from torch.distributed.checkpoint import load

    folder = Path(checkpoint) / REFERENCE_DIR
    if not folder.is_dir():
        return None
    tensors = dict(tensors)
    load(tensors, checkpoint_id=str(folder))
    return tensors
