"""Wall-clock guard for CPU-bound pure-Python work (sympy, math-verify), usable from any thread.

``signal.alarm`` (what math-verify uses) only works in the main thread, and process pools cost a fork per call. Instead
one shared watchdog thread raises :class:`Timeout` *inside* the guarded thread via ``PyThreadState_SetAsyncExc``
(CPython). Like a signal, it is delivered between bytecodes, so it cannot interrupt one long C call (e.g. a huge
``int.__pow__``): callers must still refuse obviously huge inputs before computing.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["Timeout", "time_limit"]

_RETRY_S = 0.1  # re-raise if a Timeout was swallowed by a bare ``except:`` somewhere in the guarded code
_MAX_RAISES = 20


class Timeout(BaseException):
    """Raised in the guarded thread when its time is up.

    A BaseException so that the ``except Exception`` blocks of sympy and math-verify don't swallow it.
    """


def _set_async_exc(thread_id: int, exc: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc else None)


@dataclass
class _Entry:
    thread_id: int
    deadline: float
    raises: int = 0


class _Watchdog:
    """One daemon thread for all guards: a thread per call would cost ~0.5 ms."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._entries: dict[int, _Entry] = {}
        self._ids = itertools.count()
        self._pid: int | None = None

    def add(self, seconds: float) -> int:
        with self._cond:
            if self._pid != os.getpid():  # first use, or we are a forked child whose watchdog thread did not survive
                self._pid = os.getpid()
                self._entries.clear()
                threading.Thread(target=self._run, name="trl_stepwise-watchdog", daemon=True).start()
            key = next(self._ids)
            self._entries[key] = _Entry(threading.get_ident(), time.monotonic() + seconds)
            self._cond.notify()
            return key

    def remove(self, key: int) -> None:
        with self._cond:
            entry = self._entries.pop(key, None)
            if entry is None or entry.raises:
                _set_async_exc(threading.get_ident(), None)  # drop a Timeout scheduled but not yet delivered

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for key, entry in list(self._entries.items()):
                    if entry.deadline <= now:
                        _set_async_exc(entry.thread_id, Timeout)
                        entry.raises += 1
                        entry.deadline = now + _RETRY_S
                        if entry.raises >= _MAX_RAISES:
                            del self._entries[key]
                wake = min((e.deadline for e in self._entries.values()), default=None)
                self._cond.wait(None if wake is None else max(wake - now, 0.001))


_WATCHDOG = _Watchdog()


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`Timeout` in the calling thread if the block runs longer than ``seconds`` (None/<=0: no limit)."""
    if seconds is None or seconds <= 0:
        yield
        return
    key = _WATCHDOG.add(seconds)
    try:
        yield
    finally:
        _WATCHDOG.remove(key)
