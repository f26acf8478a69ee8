"""Bad input ends as one line, exit code 2, before any model loads: shared by the ``trl-stepwise`` CLI and the recipes.

argparse's own errors print the whole usage (dozens of lines for a TRL config); here they print one line that points
to ``--help``. Recipes parse their YAML config and flags through :func:`parse_recipe_args`, which also refuses unknown
YAML keys and flags with a close-match suggestion, and report errors with :func:`report_usage_error`.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

__all__ = [
    "USAGE_ERROR",
    "OneLineErrorParser",
    "UsageError",
    "check_writable",
    "one_line",
    "parse_recipe_args",
    "report_usage_error",
]

USAGE_ERROR = 2


class UsageError(Exception):
    """Bad user input: reported as one line with exit code 2."""


def one_line(err: BaseException | str) -> str:
    """The message of ``err`` folded onto one line."""
    return " ".join(str(err).split())


def _is_main_process() -> bool:
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) in ("0", "")


def check_writable(path: str | os.PathLike, flag: str, is_dir: bool = False) -> None:
    """Refuse, before any work, a path the run could not write at its end (the work would be lost): a folder that
    cannot be created or written in, or a file in one. Creates nothing that was not there."""
    target = Path(path).expanduser()
    folder = target if is_dir else target.parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = None
    if target.exists() and is_dir != target.is_dir():
        problem = f"it is {'a file' if target.is_file() else 'a folder'}"
    elif not existing.is_dir():
        problem = f"{existing} is not a folder"
    else:
        try:  # a real write: permissions alone do not tell (root, read-only and virtual file systems)
            import tempfile

            os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=existing))
        except OSError as err:
            problem = f"{existing} is not writable ({err.strerror or err})"
    if problem is None and target.is_file() and not os.access(target, os.W_OK):
        problem = "the file is not writable"
    if problem is not None:
        raise UsageError(f"{flag} {path}: cannot write there: {problem}; choose a writable path.")


def report_usage_error(prog: str, err: BaseException | str) -> int:
    """Print ``prog: error: <message>`` on stderr (main process only) and return the usage exit code."""
    if _is_main_process():
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
    return USAGE_ERROR


class OneLineErrorParser(HfArgumentParser):
    """An ``HfArgumentParser`` whose usage errors are one line (``--help`` still prints the full usage)."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


class OneLineTopLevelParser(argparse.ArgumentParser):
    """A plain ``ArgumentParser`` (e.g. one with sub-commands) with one-line usage errors."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def _suggest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _config_keys(path: str, known: set[str]) -> None:
    """Refuse a missing, unreadable or non-mapping YAML config, and keys that are no flag."""
    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(
            f"--config {path}: no such file; pass the path of a YAML recipe config, e.g. "
            "recipes/configs/reinforce_gsm8k_cpu.yaml."
        )
    try:
        config = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UsageError(f"--config {path}: not valid YAML ({one_line(err)}); fix the file.") from err
    if not isinstance(config, dict):
        raise UsageError(
            f"--config {path}: must hold a YAML mapping of flag: value lines, not {type(config).__name__}."
        )
    for key in config:
        if key != "env" and key not in known:
            raise UsageError(
                f"--config {path}: unknown key {key!r}{_suggest(str(key), sorted(known))}; remove it or correct its "
                "name (--help lists every flag)."
            )


def parse_recipe_args(
    dataclass_types: Sequence[type],
    argv: Sequence[str] | None = None,
    prog: str | None = None,
    defaults: dict[str, Any] | None = None,
):
    """``TrlParser.parse_args_and_config`` with one-line errors: a bad ``--config``, an unknown YAML key or flag and
    a value refused by a dataclass's ``__post_init__`` raise :class:`UsageError`; bad types exit 2 (argparse).
    ``defaults`` replace dataclass defaults (the YAML config and the flags still override them)."""
    from trl import TrlParser

    class _Parser(OneLineErrorParser, TrlParser):
        pass

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _Parser(dataclass_types, prog=prog)
    if defaults:
        parser.set_defaults(**defaults)
    known = {action.dest for action in parser._actions}
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise UsageError("--config needs a value: the path of a YAML recipe config.")
        _config_keys(argv[index + 1], known)
    try:
        *parsed, remaining = parser.parse_args_and_config(argv, return_remaining_strings=True)
    except ValueError as err:  # a dataclass __post_init__ refused a value
        raise UsageError(one_line(err)) from err
    if remaining:
        flags = sorted(f"--{name}" for name in known)
        unknown = next((r for r in remaining if r.startswith("-")), remaining[0])
        raise UsageError(
            f"unrecognized argument {unknown}{_suggest(unknown.split('=')[0], flags)}; --help lists every flag."
        )
    return tuple(parsed)
