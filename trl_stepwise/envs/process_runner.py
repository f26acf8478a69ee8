"""Run each tool call in its own child process, for tools that execute untrusted code: a memory limit, killed at
the timeout with everything it started, and only plain data accepted back."""

from __future__ import annotations

import ctypes
import io
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from trl_stepwise._awaitables import resolved
from trl_stepwise.envs.tool_arguments import MAX_ERROR_CHARS, ToolOutcome, ToolRequest, describe_error, prepare_call
from trl_stepwise.envs.tool_runner import ToolRunner, timeout_outcome

__all__ = ["ProcessToolRunner"]

_MIB = 1024 * 1024
_MAX_RESULT_BYTES = 256 * _MIB  # a child's pickled result larger than this is an error, not a parent's allocation


_SAFE_GLOBALS = {
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "complex"),
    ("builtins", "bytearray"),
    ("builtins", "slice"),
    ("builtins", "range"),
    ("collections", "OrderedDict"),
    ("decimal", "Decimal"),
    ("fractions", "Fraction"),
    ("datetime", "date"),
    ("datetime", "datetime"),
    ("datetime", "time"),
    ("datetime", "timedelta"),
    ("datetime", "timezone"),
}


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles plain data only: a child running untrusted code writes these bytes, and a pickle that names any
    other class or function could run code in the trainer."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"result type {module}.{name} is not plain data")


def _address_space_bytes() -> int:
    """This process's current address-space size (Linux), else 0."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _child_setup(parent_pid: int, memory_mb: int | None) -> None:
    """Own process group (so the timeout kills what the tool started too), death with the parent, memory limit."""
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die if the trainer dies
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(1)
    if memory_mb is not None:
        import resource  # POSIX only: imported here so that the module loads everywhere

        limit = _address_space_bytes() + memory_mb * _MIB
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # hard too: the tool cannot raise it back


def _child_main(
    conn: Connection, fn: Callable[..., Any], kwargs: dict[str, Any], memory_mb: int | None, parent_pid: int
) -> None:
    """Run one call and send back pickled ``(result, error, error_type)``."""
    _child_setup(parent_pid, memory_mb)
    try:
        result = resolved(fn(**kwargs))
        try:
            data = pickle.dumps((result, None, None), protocol=pickle.HIGHEST_PROTOCOL)
            if len(data) > _MAX_RESULT_BYTES:
                error = f"result too large: {len(data) // _MIB} MB pickled (limit {_MAX_RESULT_BYTES // _MIB} MB)"
                data = pickle.dumps((None, error, "too_large"))
        except Exception as exc:
            error = f"unpicklable result: {type(result).__name__} ({describe_error(exc)})"[:MAX_ERROR_CHARS]
            data = pickle.dumps((None, error, "unpicklable"))
    except MemoryError as exc:
        limit = f" (memory limit {memory_mb} MB)" if memory_mb is not None else ""
        data = pickle.dumps(
            (None, f"MemoryError: out of memory{limit}" + (f": {exc}" if str(exc) else ""), "MemoryError")
        )
    except BaseException as exc:
        data = pickle.dumps((None, describe_error(exc), type(exc).__name__))
    view, fd = memoryview(data), conn.fileno()  # raw bytes to EOF: the parent reads them as they come, never blocked
    while view:
        view = view[os.write(fd, view) :]
    conn.close()


@dataclass
class _Child:
    index: int
    name: str
    process: Any
    conn: Connection
    started: float
    data: bytearray = field(default_factory=bytearray)  # what the child has written so far
    eof: bool = False
    exitcode: int | None = None  # set once killed and reaped


class ProcessToolRunner(ToolRunner):
    """For tools that run untrusted code: each call in its own child process (multiprocessing with the 'fork' start
    method where available, else 'spawn': then the tools must be picklable), with an address-space limit of
    ``memory_mb`` MB beyond what the child starts with (``resource.RLIMIT_AS``; a forked child inherits the parent's
    mappings, many GB in a trainer) and killed (SIGKILL, its whole process group) when ``timeout_s`` passes. A child
    that dies (memory, signal) gives an error naming the cause. Results are pickled back; an unpicklable result gives
    an error, and by default only plain data is unpickled (numbers, strings, bytes, lists, tuples, dicts, sets and a
    few stdlib value types), since the child controls those bytes: ``trusted_results=True`` unpickles anything.

    Calls run concurrently, up to ``max_workers`` child processes at once per runner. ``pids`` records the children
    started (the latest 1024). This bounds time and memory only: the child can still read files, the environment
    and the network.
    """

    def __init__(
        self,
        timeout_s: float = 10.0,
        max_workers: int = 8,
        memory_mb: int | None = 1024,
        trusted_results: bool = False,
    ) -> None:
        super().__init__(timeout_s=timeout_s, max_workers=max_workers)
        if memory_mb is not None and memory_mb <= 0:
            raise ValueError(f"memory_mb must be > 0 or None, got {memory_mb}")
        self.memory_mb = memory_mb
        self.trusted_results = trusted_results
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        self._context = multiprocessing.get_context(method)
        self._slots = threading.BoundedSemaphore(max_workers)
        self.pids: deque[int] = deque(maxlen=1024)

    def run(self, requests: Sequence[ToolRequest], timeout_s: float | None = None) -> list[ToolOutcome]:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        outcomes: list[ToolOutcome | None] = [None] * len(requests)
        queue: deque[tuple[int, ToolRequest, dict[str, Any]]] = deque()
        for index, request in enumerate(requests):
            prepared = prepare_call(request)
            if isinstance(prepared, ToolOutcome):
                outcomes[index] = prepared
            else:
                queue.append((index, request, prepared))
        running: list[_Child] = []
        try:
            while queue or running:
                while queue and self._slots.acquire(blocking=False):
                    index, request, kwargs = queue.popleft()
                    child = self._start(index, request, kwargs)
                    if isinstance(child, ToolOutcome):
                        self._slots.release()
                        outcomes[index] = child
                    else:
                        running.append(child)
                if not running:
                    if queue:  # every slot is taken by another thread's run
                        time.sleep(0.005)
                    continue
                now = time.monotonic()
                wake = min(c.started for c in running) + timeout
                ready = set(
                    wait([c.conn for c in running] + [c.process.sentinel for c in running], max(wake - now, 0))
                )
                now = time.monotonic()
                for child in list(running):
                    exited = child.process.sentinel in ready
                    if child.conn in ready or exited:
                        self._drain(child)
                    if child.eof or exited or len(child.data) > _MAX_RESULT_BYTES:
                        outcomes[child.index] = self._collect(child)
                    elif now - child.started >= timeout:
                        self._kill(child)
                        outcomes[child.index] = timeout_outcome(child.name, timeout, now - child.started)
                    else:
                        continue
                    running.remove(child)
                    self._slots.release()
        finally:
            for child in running:  # interrupted (KeyboardInterrupt): leave no child behind
                self._kill(child)
                self._slots.release()
        return outcomes  # type: ignore[return-value]

    def _start(self, index: int, request: ToolRequest, kwargs: dict[str, Any]) -> _Child | ToolOutcome:
        receive, send = self._context.Pipe(duplex=False)
        args = (send, request.fn, kwargs, self.memory_mb, os.getpid())
        process = self._context.Process(target=_child_main, args=args, daemon=True)
        try:
            with warnings.catch_warnings():  # Python 3.12+ warns about fork with threads; the child runs no threads
                warnings.simplefilter("ignore", DeprecationWarning)
                process.start()
        except Exception as exc:  # e.g. an unpicklable tool under 'spawn'
            receive.close()
            send.close()
            return ToolOutcome(None, f"cannot start {request.name}: {describe_error(exc)}", 0.0, "died")
        send.close()  # the child's copy is its only one: its death closes the pipe
        os.set_blocking(receive.fileno(), False)  # a child that writes half a result cannot block the trainer
        self.pids.append(process.pid)
        return _Child(index, request.name, process, receive, time.monotonic())

    @staticmethod
    def _drain(child: _Child) -> None:
        """Read what the child has written, without blocking; note the end of its output."""
        fd = child.conn.fileno()
        while len(child.data) <= _MAX_RESULT_BYTES:
            try:
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                child.eof = True
                return
            child.data += chunk

    def _collect(self, child: _Child) -> ToolOutcome:
        """The finished child's outcome: its message, or why it died without one."""
        # It closed its output: let it exit by itself (a moment), so that its exit code is its own. Polled, not
        # join(timeout): that trusts the sentinel pipe, which the child can write to.
        deadline = time.monotonic() + 0.05
        while child.process.exitcode is None and time.monotonic() < deadline:
            time.sleep(0.001)
        still_running = child.process.exitcode is None
        exitcode = self._kill(child)  # reaps it, and whatever it left running in its process group
        seconds = time.monotonic() - child.started
        data = bytes(child.data)
        if still_running and not data:  # the signal is ours: say what it did instead
            return ToolOutcome(None, f"{child.name} died: closed its output without a result", seconds, "died")
        if len(data) > _MAX_RESULT_BYTES:
            return ToolOutcome(None, f"result too large (over {_MAX_RESULT_BYTES // _MIB} MB)", seconds, "too_large")
        if not data:
            return ToolOutcome(None, f"{child.name} died: {self._death_cause(exitcode)}", seconds, "died")
        try:
            if self.trusted_results:
                result, error, error_type = pickle.loads(data)
            else:
                result, error, error_type = _PlainDataUnpickler(io.BytesIO(data)).load()
        except Exception as exc:
            if exitcode:  # cut off while writing
                return ToolOutcome(None, f"{child.name} died: {self._death_cause(exitcode)}", seconds, "died")
            error = f"unpicklable result: {describe_error(exc)}"[:MAX_ERROR_CHARS]
            return ToolOutcome(None, error, seconds, "unpicklable")
        return ToolOutcome(result, error, seconds, error_type)

    def _death_cause(self, exitcode: int | None) -> str:
        if exitcode is not None and exitcode < 0:
            try:
                name = signal.Signals(-exitcode).name
            except ValueError:
                name = f"signal {-exitcode}"
            hint = ""
            if name == "SIGKILL":
                hint = " (out of memory?)"
            elif name in ("SIGSEGV", "SIGABRT", "SIGBUS") and self.memory_mb is not None:
                hint = f" (over the {self.memory_mb} MB memory limit?)"
            return f"killed by {name}{hint}"
        return f"exited with code {exitcode} before returning"

    @staticmethod
    def _kill(child: _Child) -> int | None:
        """SIGKILL the child's process group (the child and what it started), reap the child; its exit code."""
        if child.exitcode is not None or child.conn.closed:
            return child.exitcode
        pid = child.process.pid
        for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
            try:
                kill()
            except OSError:  # already gone, or not ours any more
                pass
        child.process.join()
        child.exitcode = child.process.exitcode
        child.conn.close()
        child.process.close()
        return child.exitcode


# ---------------------------------------------------------------------------------------------------------------------
# Convenience: calls as the model wrote them
