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

import logging
import warnings

__all__ = ["add_log_filter", "quiet_data_progress_bars", "quiet_run_logs", "quiet_third_party"]

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
    import os

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # read when vLLM is imported
    logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"].upper())  # in case it already was
    for name, prefix in VLLM_NOTICES.items():
        add_log_filter(name, prefix)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
