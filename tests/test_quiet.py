"""Third-party log noise is off by default and one flag (``third_party_logs``) shows it."""

from __future__ import annotations

import logging

import pytest

from trl_stepwise.quiet import VLLM_NOTICES, quiet_run_logs


@pytest.fixture
def clean_logging(monkeypatch):
    from transformers.utils import logging as transformers_logging

    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    vllm = logging.getLogger("vllm")
    level, bars = vllm.level, transformers_logging.is_progress_bar_enabled()
    yield vllm
    vllm.setLevel(level)
    for name in VLLM_NOTICES:
        logging.getLogger(name).filters.clear()
    (transformers_logging.enable_progress_bar if bars else transformers_logging.disable_progress_bar)()


def _record(name: str, level: int, message: str) -> logging.LogRecord:
    return logging.getLogger(name).makeRecord(name, level, __file__, 1, message, (), None)


def test_by_default_vllm_logs_warnings_only_without_its_repeated_cpu_notices(clean_logging, monkeypatch):
    import os

    from transformers.utils import logging as transformers_logging

    quiet_run_logs(show=False)
    assert os.environ["VLLM_LOGGING_LEVEL"] == "WARNING" and clean_logging.level == logging.WARNING
    assert not transformers_logging.is_progress_bar_enabled()
    notice = _record("vllm.v1.worker.cpu_worker", logging.WARNING, "CPU backend doesn't allow to use x")
    other = _record("vllm.v1.worker.cpu_worker", logging.WARNING, "out of KV cache")
    worker = logging.getLogger("vllm.v1.worker.cpu_worker")
    assert not worker.filter(notice) and worker.filter(other)  # a real warning still shows


def test_the_flag_shows_everything_and_a_users_level_wins(clean_logging, monkeypatch):
    import os

    before = clean_logging.level
    quiet_run_logs(show=True)
    assert "VLLM_LOGGING_LEVEL" not in os.environ and clean_logging.level == before
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    quiet_run_logs(show=False)
    assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG" and clean_logging.level == logging.DEBUG


def test_vllm_module_scan_warning_is_hidden_and_other_future_warnings_show(clean_logging):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_run_logs(show=False)  # installs its filters in front of "always"
        warnings.warn("`torch.distributed.reduce_op` is deprecated, please use ReduceOp", FutureWarning, stacklevel=1)
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]


def test_native_notices_are_dropped_from_file_descriptor_2_and_everything_else_written_back(capfd):
    import os

    from trl_stepwise.quiet import native_stderr_without

    with native_stderr_without(("NUMA binding: Using MEMBIND policy",)):
        os.write(2, b"[W utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy for memory allocation\n")
        os.write(2, b"a real error from C++\n")
    assert capfd.readouterr().err == "a real error from C++\n"

    with pytest.raises(RuntimeError), native_stderr_without(("NUMA",)):  # written back when the block fails too
        os.write(2, b"why it failed\n")
        raise RuntimeError
    assert capfd.readouterr().err == "why it failed\n"
