"""Crash-safe checkpoints: which ``checkpoint-N`` folders a resume may use, and where a save is staged.

A checkpoint is written under a hidden staging name (``.partial-checkpoint-N``) and renamed to ``checkpoint-N`` only
once ``trainer_state.json`` (the last file the Trainer writes) is in it, so a kill -9 in the middle of a save never
leaves a ``checkpoint-N`` that a resume would pick and fail on. Resuming with ``true`` (as in TRL's recipes) picks the
newest *complete* checkpoint, so folders left by older versions without the staging step are skipped too.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

__all__ = [
    "STAGING_PREFIX",
    "CheckpointError",
    "is_complete_checkpoint",
    "newest_complete_checkpoint",
    "publish_checkpoint",
    "remove_stale_staging",
    "resolve_resume_checkpoint",
    "staging_dir",
]

TRAINER_STATE_NAME = "trainer_state.json"
STAGING_PREFIX = ".partial-"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_TRUE = {"true", "yes", "1", "last", "latest"}
_FALSE = {"", "false", "no", "0", "none"}


class CheckpointError(ValueError):
    """A resume target that does not exist or is incomplete; the message names the flag and the fix."""


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """A checkpoint folder whose save finished: ``trainer_state.json`` is written last."""
    return (Path(path) / TRAINER_STATE_NAME).is_file()


def newest_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete ``checkpoint-N`` with the highest N in ``output_dir`` (None if there is none)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    found = [
        (int(match.group(1)), path)
        for path in folder.iterdir()
        if (match := _CHECKPOINT.match(path.name)) and path.is_dir() and is_complete_checkpoint(path)
    ]
    return max(found)[1] if found else None


def resolve_resume_checkpoint(value: str | bool | None, output_dir: str | os.PathLike) -> str | None:
    """``--resume_from_checkpoint`` as a folder: ``true`` = newest complete checkpoint in ``output_dir``, ``false``
    or unset = none, else a path that must hold a complete checkpoint. Raises :class:`CheckpointError`."""
    if value is None or value is False:
        return None
    text = "true" if value is True else str(value).strip()
    if text.lower() in _FALSE:
        return None
    if text.lower() in _TRUE:
        newest = newest_complete_checkpoint(output_dir)
        if newest is None:
            raise CheckpointError(
                f"--resume_from_checkpoint {text}: no complete {PREFIX_CHECKPOINT_DIR}-N folder in output_dir "
                f"{str(output_dir)!r}; drop the flag to start from scratch or pass a checkpoint folder."
            )
        return str(newest)
    path = Path(text).expanduser()
    if not path.is_dir():
        raise CheckpointError(
            f"--resume_from_checkpoint {text}: no such folder; pass a {PREFIX_CHECKPOINT_DIR}-N folder, or true for "
            "the newest complete checkpoint in output_dir."
        )
    if not is_complete_checkpoint(path):
        newest = newest_complete_checkpoint(path.parent)
        hint = f"resume from {str(newest)!r}" if newest is not None else "start from scratch"
        raise CheckpointError(
            f"--resume_from_checkpoint {text}: incomplete checkpoint (no {TRAINER_STATE_NAME}: its save was "
            f"interrupted); {hint}, or pass true for the newest complete one."
        )
    return str(path)


def staging_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """The hidden run folder a checkpoint of ``step`` is written under before it is published."""
    return Path(output_dir) / f"{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-{step}"


def publish_checkpoint(staging: Path, output_dir: str | os.PathLike) -> Path:
    """Move the finished ``staging/checkpoint-N`` to ``output_dir/checkpoint-N`` (one rename) and drop ``staging``."""
    inner = next(p for p in staging.iterdir() if _CHECKPOINT.match(p.name))
    target = Path(output_dir) / inner.name
    if target.exists():  # a save of the same step in an earlier run: the new one replaces it
        shutil.rmtree(target)
    os.replace(inner, target)
    shutil.rmtree(staging, ignore_errors=True)
    return target


def remove_stale_staging(output_dir: str | os.PathLike) -> None:
    """Delete staging folders that a killed run left behind (they never became checkpoints)."""
    folder = Path(output_dir)
    if folder.is_dir():
        for path in folder.glob(f"{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-*"):
            shutil.rmtree(path, ignore_errors=True)
