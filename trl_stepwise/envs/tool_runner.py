"""Run the tool calls of many episodes together, each bounded by wall time, errors returned as text.

During RL rollouts 16-64 episodes write tool calls at once. Awaiting them one completion at a time (as TRL's
GRPOTrainer does) costs the sum of their latencies, and one network call that never returns hangs training.
``ToolRunner`` runs a batch of calls concurrently (coroutine functions on one event loop, plain functions in a thread
pool) and returns each call's result or error after at most ``timeout_s``, even when the function is blocked in I/O
or in C: the waiting side gives up on it (the thread is abandoned, its late result ignored) instead of waiting for the
function to notice. ``ProcessToolRunner`` runs each call in a child process with a memory limit and kills it at the
timeout, for tools that execute untrusted code.

Nothing a tool does is raised to the caller: arguments are checked against the signature before calling, and every
failure (bad arguments, an exception, a timeout, a dead child) becomes a one-line ``error`` the model can read.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from trl_stepwise._timeout import Timeout, time_limit
from trl_stepwise.envs.tool_arguments import ToolOutcome, ToolRequest, describe_error, prepare_call, tool_request

__all__ = ["ToolOutcome", "ToolRequest", "ToolRunner", "run_tool_calls", "shared_runner", "timeout_outcome"]

_GRACE_S = 0.1  # the waiter gives a pure-Python call this long to stop by itself (time_limit) before abandoning it
_IDLE_EXIT_S = 30.0  # an idle worker thread exits after this long


def _is_async(fn: Callable[..., Any]) -> bool:
    call = type(fn).__call__ if not inspect.isroutine(fn) else None  # an object with ``async def __call__``
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)


def timeout_outcome(name: str, timeout_s: float, seconds: float) -> ToolOutcome:
    return ToolOutcome(None, f"timeout: {name} took longer than {timeout_s:g}s", seconds, "timeout")


# ---------------------------------------------------------------------------------------------------------------------
# Threads and an event loop


class _Job:
    """One call in flight; its fields are read and written under the runner's lock."""

    def __init__(self, index: int, name: str, fn: Callable[..., Any], kwargs: dict[str, Any], timeout: float) -> None:
        self.index, self.name, self.fn, self.kwargs, self.timeout = index, name, fn, kwargs, timeout
        self.is_async = _is_async(fn)
        self.context = contextvars.copy_context()
        self.submitted = time.monotonic()
        self.started: float | None = None
        self.outcome: ToolOutcome | None = None
        self.abandoned = False
        self.future: Any = None


class ToolRunner:
    """Runs the calls of many episodes together: coroutine functions awaited concurrently on one event loop (a daemon
    thread's loop, started lazily), plain functions in a thread pool; every call is bounded by ``timeout_s`` of wall
    time, which holds even when the function is blocked in I/O or in C (its thread is abandoned and its late result
    ignored; ``abandoned`` counts them). A plain function also runs under ``time_limit`` so that pure-Python work
    stops by itself at the timeout instead of burning a core in an abandoned thread.

    Arguments are bound with ``inspect.signature`` first, so wrong/missing/extra arguments give a TypeError message
    without calling; values of parameters annotated int/float/bool/str (or Optional/unions of them) are converted
    from JSON-compatible values where lossless ("3" -> 3 for int, 3 -> 3.0 for float); values that cannot be
    converted give an error. Exceptions in the tool become ``error`` ("<Type>: <message>"), never raised.

    Abandoned threads no longer count against ``max_workers``: hung calls cannot starve the pool. A coroutine that
    blocks the event loop (a sync sleep inside ``async def``) delays the other coroutines of its run to their
    timeouts; the loop is then replaced for later runs. ``run`` may be called from several threads at once.
    """

    def __init__(self, timeout_s: float = 10.0, max_workers: int = 32) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.timeout_s = timeout_s
        self.max_workers = max_workers
        self.abandoned = 0
        self._reset()

    def _reset(self) -> None:
        """Fresh state: at start, and in a forked child (whose copy of the threads did not survive the fork)."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # workers wait here for jobs
        self._done = threading.Condition(self._lock)  # run() waits here for outcomes and starts
        self._queue: deque[_Job] = deque()
        self._idle = 0  # workers waiting for a job
        self._starting = 0  # workers started that have not looked at the queue yet
        self._live = 0  # workers counted against max_workers (abandoned ones are not)
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None

    def __enter__(self) -> ToolRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, requests: Sequence[ToolRequest], timeout_s: float | None = None) -> list[ToolOutcome]:
        """Outcomes in the order of ``requests``; the wall time is about the slowest call's, not the sum.
        ``timeout_s`` overrides the runner's for this batch."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        if os.getpid() != self._pid:
            self._reset()
        outcomes: list[ToolOutcome | None] = [None] * len(requests)
        jobs: list[_Job] = []
        for index, request in enumerate(requests):
            prepared = prepare_call(request)
            if isinstance(prepared, ToolOutcome):
                outcomes[index] = prepared
                continue
            job = _Job(index, request.name, request.fn, prepared, timeout)  # type: ignore[arg-type]
            if job.is_async:
                self._submit_async(job)
            else:
                self._submit_thread(job)
            jobs.append(job)
        blocked_loop = self._wait(jobs)
        if blocked_loop is not None:
            self._check_loop(blocked_loop)
        for job in jobs:
            outcomes[job.index] = job.outcome
        return outcomes  # type: ignore[return-value]

    def close(self) -> None:
        """Let idle workers exit and stop the event loop (abandoned threads cannot be stopped). A later ``run``
        starts them again."""
        with self._lock:
            self._closed = True
            self._work.notify_all()
            loop, thread = self._loop, self._loop_thread
            self._loop = self._loop_thread = None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=1.0)

    # -- waiting ------------------------------------------------------------------------------------------------------

    def _wait(self, jobs: list[_Job]) -> asyncio.AbstractEventLoop | None:
        """Wait for every job's outcome, abandoning those past their deadline; returns the event loop when an async
        call had to be abandoned (the loop may be blocked)."""
        blocked_loop = None
        with self._lock:
            pending = jobs
            while pending:
                now = time.monotonic()
                wake: float | None = None
                still = []
                for job in pending:
                    if job.outcome is not None:
                        continue
                    start = job.submitted if job.is_async else job.started
                    if start is not None:  # a queued plain call's time starts when a worker takes it
                        deadline = start + job.timeout + _GRACE_S
                        if now >= deadline:
                            if job.is_async:
                                blocked_loop = self._loop
                            self._abandon(job, now - start)
                            continue
                        wake = deadline if wake is None else min(wake, deadline)
                    still.append(job)
                pending = still
                if pending:
                    self._done.wait(None if wake is None else max(wake - now, 0.001))
        return blocked_loop

    def _abandon(self, job: _Job, seconds: float) -> None:
        """Give up on a call still running (lock held): its outcome is the timeout, its thread no longer counts."""
        job.abandoned = True
        job.outcome = timeout_outcome(job.name, job.timeout, seconds)
        self.abandoned += 1
        if job.is_async:
            if job.future is not None:
                job.future.cancel()
            return
        self._live -= 1
        while len(self._queue) > self._idle + self._starting and self._live < self.max_workers:
            self._spawn()

    # -- plain functions: a pool of threads that replaces the ones it abandons ----------------------------------------

    def _submit_thread(self, job: _Job) -> None:
        with self._lock:
            self._closed = False
            self._queue.append(job)
            if len(self._queue) > self._idle + self._starting and self._live < self.max_workers:
                self._spawn()
            self._work.notify()

    def _spawn(self) -> None:
        self._live += 1
        self._starting += 1
        threading.Thread(target=self._worker, name="trl_stepwise-tool", daemon=True).start()

    def _worker(self) -> None:
        with self._lock:
            self._starting -= 1
        while True:
            with self._lock:
                idle_since = time.monotonic()
                while not self._queue:
                    if self._closed or time.monotonic() - idle_since > _IDLE_EXIT_S:
                        self._live -= 1
                        return
                    self._idle += 1
                    self._work.wait(_IDLE_EXIT_S)
                    self._idle -= 1
                job = self._queue.popleft()
                job.started = time.monotonic()
                self._done.notify_all()  # its deadline starts now
            outcome = self._call(job)
            with self._lock:
                if job.abandoned:  # too late: the caller has moved on and a new worker took this one's place
                    return
                job.outcome = outcome
                self._done.notify_all()

    @staticmethod
    def _call(job: _Job) -> ToolOutcome:
        started = job.started or time.monotonic()
        try:
            with time_limit(job.timeout):
                result = job.context.run(job.fn, **job.kwargs)
        except Timeout:
            return timeout_outcome(job.name, job.timeout, time.monotonic() - started)
        except BaseException as exc:  # the tool's failure is the model's to read, including SystemExit
            return ToolOutcome(None, describe_error(exc), time.monotonic() - started, type(exc).__name__)
        return ToolOutcome(result, None, time.monotonic() - started)

    # -- coroutine functions: one event loop in a daemon thread -------------------------------------------------------

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._loop_thread is None or not self._loop_thread.is_alive():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=_run_loop, args=(loop,), name="trl_stepwise-tool-loop", daemon=True)
                thread.start()
                self._loop, self._loop_thread = loop, thread
            return self._loop

    def _submit_async(self, job: _Job) -> None:
        loop = self._ensure_loop()
        job.future = asyncio.run_coroutine_threadsafe(self._await(job), loop)

    async def _await(self, job: _Job) -> None:
        started = time.monotonic()
        job.started = started
        task: asyncio.Future[Any] | None = None
        try:
            task = asyncio.ensure_future(job.fn(**job.kwargs))
            done, _ = await asyncio.wait({task}, timeout=job.timeout)
            if done:
                outcome = ToolOutcome(task.result(), None, time.monotonic() - started)
            else:
                outcome = timeout_outcome(job.name, job.timeout, time.monotonic() - started)
        except asyncio.CancelledError:  # abandoned by the waiter: nobody reads an outcome
            return
        except BaseException as exc:
            outcome = ToolOutcome(None, describe_error(exc), time.monotonic() - started, type(exc).__name__)
        finally:
            if task is not None and not task.done():
                task.cancel()
        with self._lock:
            if not job.abandoned:
                job.outcome = outcome
                self._done.notify_all()

    def _check_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """After an async call outlived its deadline: if the loop does not answer, a coroutine is blocking it, so
        later runs get a fresh loop (the old one stops when it is free)."""
        answered = threading.Event()
        try:
            loop.call_soon_threadsafe(answered.set)
        except RuntimeError:  # already closed
            return
        if not answered.wait(0.2):
            with self._lock:
                if self._loop is loop:
                    self._loop = self._loop_thread = None
                    self.abandoned += 1
            loop.call_soon_threadsafe(loop.stop)


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:  # stopped: cancel what is left and give it a moment to finish, so nothing is destroyed pending
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.wait(tasks, timeout=1.0))
        loop.close()


_shared: ToolRunner | None = None
_shared_lock = threading.Lock()


def shared_runner() -> ToolRunner:
    """One ``ToolRunner`` for the whole process (started on first use): ``FunctionTool`` calls go through it."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = ToolRunner()
        return _shared


def run_tool_calls(
    tools: Mapping[str, Callable[..., Any]] | Sequence[Callable[..., Any]],
    calls: Sequence[Mapping[str, Any]],
    runner: ToolRunner | None = None,
) -> list[ToolOutcome]:
    """Run calls written as TRL writes them (``{"name", "arguments"}``, optionally inside ``{"function": ...}``)
    with ``tools`` (a name -> function mapping, or functions named by ``__name__``) on ``runner`` (default: the
    shared one)."""
    table = dict(tools) if isinstance(tools, Mapping) else {getattr(f, "__name__", str(f)): f for f in tools}
    requests = []
    for call in calls:
        body = call.get("function", call)
        requests.append(tool_request(table, str(body.get("name", "")), body.get("arguments")))
    return (runner or shared_runner()).run(requests)
