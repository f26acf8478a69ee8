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

__all__ = ["add_log_filter", "quiet_data_progress_bars", "quiet_third_party"]

LOG_NOTICES = {
    "math_verify.parser": "Timeout is disabled",
    "math_verify.grader": "Timeout is disabled",
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
    "kernels._internals.hf_hub": "Skipping publisher trust check",  # bitsandbytes' CPU kernels, offline (kernels 0.19)
}
FUTURE_WARNINGS = (r"(?s).*past_key_values",)


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
