"""Third-party notices that the project triggers but a user cannot act on, filtered where a run starts.

Each filter is narrow (one logger or one warning message), so every other warning still shows:

- math-verify's "Timeout is disabled...": we turn its signal-based timeouts off on purpose, ``time_limit`` guards
  every call instead (see ``grading``);
- bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community": an optional speed-up kernel, printed
  at import on every CPU run whether 4-bit is used or not;
- transformers' ``FutureWarning`` about ``past_key_values``: the generation loop (``rollout.py``) passes its own
  ``Cache`` objects; the notice concerns legacy tuple caches and would repeat at every decoding step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence

__all__ = [
    "add_log_filter",
    "native_stderr_without",
    "quiet_data_progress_bars",
    "quiet_run_logs",
    "quiet_third_party",
]

LOG_NOTICES = {
    "math_verify.parser": "Timeout is disabled",
    "math_verify.grader": "Timeout is disabled",
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
    "kernels._internals.hf_hub": "Skipping publisher trust check",  # bitsandbytes' CPU kernels, offline (kernels 0.19)
}
FUTURE_WARNINGS = (r"(?s).*past_key_values",)
# vLLM notices repeated on every CPU request or start, about how the project calls it (hidden unless third_party_logs)
VLLM_NOTICES = {
    "vllm.v1.worker.cpu_worker": "CPU backend doesn't allow to use",
    "vllm.v1.engine.input_processor": "Passing raw prompts to InputProcessor is deprecated",
}
# raised twice at every engine start by vLLM's own scan of torch's modules (triton_utils/dispatcher.py)
VLLM_FUTURE_WARNINGS = (r"`torch\.distributed\.reduce_op` is deprecated",)
# printed by vLLM's C++ CPU worker at start, past Python's logging: "NUMA binding: Using MEMBIND policy ..."
VLLM_NATIVE_NOTICES = ("NUMA binding: Using MEMBIND policy",)


class _DropNotice(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def add_log_filter(logger_name: str, prefix: str) -> None:
    """Drop the records of ``logger_name`` whose message starts with ``prefix`` (idempotent; works before the
    library is imported, since loggers are looked up by name)."""
    log = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropNotice) and f.prefix == prefix for f in log.filters):
        log.addFilter(_DropNotice(prefix))


def quiet_third_party() -> None:
    """Install every filter above; called by the recipes, the CLI and the trainer before they import the libraries."""
    for name, prefix in LOG_NOTICES.items():
        add_log_filter(name, prefix)
    for message in FUTURE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


def quiet_data_progress_bars() -> None:
    """No ``datasets`` bars ("Generating train split", "Normalising ..."): a run keeps one bar, the trainer's."""
    import datasets

    datasets.disable_progress_bars()


def quiet_run_logs(show: bool = False) -> None:
    """A run's log is the trainer's or the evaluation's own: unless ``show`` (``--third_party_logs``), vLLM logs
    warnings and errors only (``VLLM_LOGGING_LEVEL``, unless the user set it) without its repeated CPU notices, and
    transformers draws no weight-loading bars."""
    if show:
        return
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # read when vLLM is imported
    logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"].upper())  # in case it already was
    for name, prefix in VLLM_NOTICES.items():
        add_log_filter(name, prefix)
    for message in VLLM_FUTURE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


@contextlib.contextmanager
def native_stderr_without(notices: Sequence[str] = VLLM_NATIVE_NOTICES) -> Iterator[None]:
    """Hold what is written to file descriptor 2 (C++ included) inside the block, then write it back without the
    lines that contain one of ``notices``: native libraries print past Python's logging and warnings filters."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            text = held.read().decode(errors="replace")
            kept = [line for line in text.splitlines(keepends=True) if not any(n in line for n in notices)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
