"""Keep analysis files out of hub uploads unless asked: transformers uploads the whole output folder."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import transformers.trainer

ROLLOUT_FILES = ("rollouts.jsonl", "rollouts-rank*.jsonl")


class _IgnoringApi:
    """An ``HfApi`` whose ``upload_folder`` also ignores ``patterns``; every other call goes to the real one."""

    def __init__(self, api: Any, patterns: Sequence[str]) -> None:
        self._api, self._patterns = api, list(patterns)

    def upload_folder(self, *args: Any, ignore_patterns: Any = None, **kwargs: Any) -> Any:
        if isinstance(ignore_patterns, str):
            ignore_patterns = [ignore_patterns]
        return self._api.upload_folder(*args, ignore_patterns=[*(ignore_patterns or []), *self._patterns], **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._api, name)


@contextlib.contextmanager
def uploads_ignoring(patterns: Sequence[str]) -> Iterator[None]:
    """Within the block, the Trainer's hub uploads skip files matching ``patterns`` (no-op when empty)."""
    if not patterns:
        yield
        return
    original = transformers.trainer.hf_api
    transformers.trainer.hf_api = lambda: _IgnoringApi(original(), patterns)
    try:
        yield
    finally:
        transformers.trainer.hf_api = original
