"""ToolRunner and ProcessToolRunner: many episodes' tool calls run together, each bounded by wall time (even when
blocked in I/O or C), with bad arguments, exceptions, hangs and dead children coming back as one-line errors."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import threading
import time
from typing import Optional

import pytest

from trl_stepwise.envs import FunctionTool
from trl_stepwise.envs.process_runner import ProcessToolRunner
from trl_stepwise.envs.tool_runner import (
    ToolOutcome,
    ToolRequest,
    ToolRunner,
    run_tool_calls,
    tool_request,
)


@pytest.fixture
def runner():
    with ToolRunner(timeout_s=1.0) as r:
        yield r


def call(fn, name: str | None = None, **arguments) -> ToolRequest:
    return ToolRequest(fn, arguments, name or fn.__name__)


def multiply(a: int, b: float) -> float:
    return a * b


# -- timeouts that hold for a function blocked in C or I/O ------------------------------------------------------------


def test_a_sync_tool_sleeping_6s_times_out_at_1s(runner):
    def slow() -> str:
        time.sleep(6)  # one C call: an async exception would wait for it to return
        return "late"

    started = time.monotonic()
    [outcome] = runner.run([call(slow)])
    assert time.monotonic() - started < 3
    assert outcome == ToolOutcome(None, "timeout: slow took longer than 1s", outcome.seconds, "timeout")
    assert runner.abandoned == 1


def test_a_blocking_socket_recv_times_out():
    left, right = socket.socketpair()
    try:

        def recv() -> bytes:
            return left.recv(1)  # no data ever comes

        with ToolRunner(timeout_s=0.5) as runner:
            started = time.monotonic()
            [outcome] = runner.run([call(recv)])
            assert time.monotonic() - started < 2
            assert outcome.error_type == "timeout" and outcome.result is None
    finally:
        left.shutdown(socket.SHUT_RDWR)  # wakes the abandoned thread; its late result is ignored
        left.close()
        right.close()


def test_function_tool_timeout_holds_for_a_call_blocked_in_c():
    left, right = socket.socketpair()
    try:

        def recv(arguments: str) -> str:
            return left.recv(1).decode()

        started = time.monotonic()
        result = FunctionTool(recv, timeout_s=0.5).insert("<recv>x</recv>")
        assert time.monotonic() - started < 2
        assert result.error == "timeout" and result.text == " error: recv took longer than 0.5s"
        # the messages it had before stay the same
        assert FunctionTool(lambda a: {}[a], name="lookup").insert("<lookup>tau</lookup>").text == (
            " error: KeyError: 'tau'"
        )
        assert FunctionTool(str.upper, name="up").insert("<up> pi </up>").text == " PI"
    finally:
        left.shutdown(socket.SHUT_RDWR)
        left.close()
        right.close()


def test_hung_calls_do_not_starve_the_pool():
    release = threading.Event()

    def hang() -> None:
        release.wait(30)

    with ToolRunner(timeout_s=0.3, max_workers=2) as runner:
        try:
            assert [o.error_type for o in runner.run([call(hang), call(hang)])] == ["timeout", "timeout"]
            started = time.monotonic()
            outcomes = runner.run([call(multiply, a=i, b=2) for i in range(4)])
            assert [o.result for o in outcomes] == [0.0, 2.0, 4.0, 6.0]  # abandoned threads no longer take slots
            assert time.monotonic() - started < 1 and runner.abandoned == 2
        finally:
            release.set()


def test_an_async_tool_past_its_timeout_is_cancelled(runner):
    cancelled = threading.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    [outcome] = runner.run([call(forever)], timeout_s=0.3)
    assert outcome.error == "timeout: forever took longer than 0.3s"
    assert cancelled.wait(2)


def test_a_coroutine_blocking_the_loop_times_out_and_the_next_run_gets_a_fresh_loop(runner):
    async def blocks_loop() -> None:
        time.sleep(1.5)  # a sync call inside async def: the loop cannot run anything else

    async def quick() -> int:
        return 7

    started = time.monotonic()
    [outcome] = runner.run([call(blocks_loop)], timeout_s=0.3)
    assert outcome.error_type == "timeout" and time.monotonic() - started < 1.2
    assert runner.run([call(quick)])[0].result == 7


# -- concurrency ------------------------------------------------------------------------------------------------------


def test_sync_calls_run_concurrently(runner):
    def nap(i: int) -> int:
        time.sleep(0.5)
        return i

    started = time.monotonic()
    outcomes = runner.run([call(nap, i=i) for i in range(8)])
    assert time.monotonic() - started < 2.5  # one at a time: 4 s
    assert [o.result for o in outcomes] == list(range(8))


def test_async_calls_run_concurrently(runner):
    async def nap(i: int) -> int:
        await asyncio.sleep(0.5)
        return i

    started = time.monotonic()
    outcomes = runner.run([call(nap, i=i) for i in range(8)])
    assert time.monotonic() - started < 2
    assert [o.result for o in outcomes] == list(range(8))


def test_a_mix_of_async_and_sync_keeps_the_order(runner):
    def sync_nap(i: int, s: float) -> str:
        time.sleep(s)
        return f"sync {i}"

    async def async_nap(i: int, s: float) -> str:
        await asyncio.sleep(s)
        return f"async {i}"

    requests = [call(async_nap if i % 2 else sync_nap, i=i, s=0.05 * (6 - i)) for i in range(6)]  # last ends first
    outcomes = runner.run(requests)
    assert [o.result for o in outcomes] == [f"{'async' if i % 2 else 'sync'} {i}" for i in range(6)]
    assert all(o.error is None and 0 < o.seconds < 1 for o in outcomes)


# -- arguments and errors ---------------------------------------------------------------------------------------------


def test_an_exception_becomes_an_error_line(runner):
    def parse(text: str) -> int:
        raise ValueError(f"cannot parse {text!r}\n(second line)")

    async def fails() -> None:
        raise KeyError("x")

    first, second = runner.run([call(parse, text="x"), call(fails)])
    assert first == ToolOutcome(None, "ValueError: cannot parse 'x' (second line)", first.seconds, "ValueError")
    assert second.error == "KeyError: 'x'" and second.error_type == "KeyError"


def test_bad_arguments_give_type_errors_without_calling(runner):
    calls = []

    def add(a: int, b: int) -> int:
        calls.append((a, b))
        return a + b

    outcomes = runner.run(
        [call(add, a=1, c=2), call(add, a=1), call(add, a="three", b=1), call(add, a=1.5, b=1), call(add, a=True, b=1)]
    )
    assert [o.error_type for o in outcomes] == ["TypeError"] * 5
    assert "unexpected keyword argument 'c'" in outcomes[0].error and "parameters: a, b" in outcomes[0].error
    assert outcomes[1].error.startswith("TypeError: add() missing a required argument: 'b'")
    assert outcomes[2].error == "TypeError: add() argument 'a' must be int, not str ('three')"
    assert "must be int, not float" in outcomes[3].error and "not bool" in outcomes[4].error
    assert calls == []


def test_json_values_are_converted_where_lossless(runner):
    def kinds(n: int, x: float, flag: bool, text: str, maybe: Optional[int] = None, either: int | str = 0) -> tuple:  # noqa: UP045
        return n, x, flag, text, maybe, either

    [outcome] = runner.run([call(kinds, n="3", x=3, flag="true", text=12, maybe="4", either="x")])
    assert outcome.result == (3, 3.0, True, "12", 4, "x")
    assert type(outcome.result[0]) is int and type(outcome.result[1]) is float
    [outcome] = runner.run([call(kinds, n=2.0, x="1.5", flag=0, text="t", maybe=None)])
    assert outcome.result == (2, 1.5, False, "t", None, 0)


def test_requests_with_an_error_are_returned_as_is(runner):
    calls = []
    known = ToolRequest(lambda: calls.append(1), {}, "noop", error="invalid JSON arguments for noop")
    unknown = ToolRequest(None, {}, "foo", error="unknown tool 'foo'; tools: multiply, add")
    first, second, third = runner.run([known, unknown, ToolRequest(None, {}, "bar")])
    assert (first.error, first.result, first.seconds) == ("invalid JSON arguments for noop", None, 0.0)
    assert second.error == "unknown tool 'foo'; tools: multiply, add"
    assert third.error == "unknown tool 'bar'" and calls == []


def test_run_tool_calls_reads_calls_as_trl_writes_them():
    def add(a: int, b: int) -> int:
        return a + b

    calls = [
        {"name": "multiply", "arguments": '{"a": "2", "b": 4}'},
        {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}},
        {"name": "foo", "arguments": {}},
        {"name": "add", "arguments": "{oops"},
        {"name": "add", "arguments": "[1, 2]"},
    ]
    with ToolRunner(timeout_s=1.0) as runner:
        outcomes = run_tool_calls([multiply, add], calls, runner=runner)
    assert [o.result for o in outcomes[:2]] == [8.0, 3]
    assert outcomes[2].error == "unknown tool 'foo'; tools: multiply, add"
    assert outcomes[3].error.startswith("invalid JSON arguments for add: ")
    assert outcomes[4].error == "arguments for add must be a JSON object, not list"
    assert tool_request({"add": add}, "add", "").arguments == {}


def test_the_runner_can_be_closed_and_used_again():
    runner = ToolRunner(timeout_s=1.0)

    async def one() -> int:
        return 1

    assert [o.result for o in runner.run([call(one), call(multiply, a=1, b=1)])] == [1, 1.0]
    runner.close()
    assert [o.result for o in runner.run([call(one), call(multiply, a=2, b=1)])] == [1, 2.0]
    runner.close()


# -- child processes --------------------------------------------------------------------------------------------------


def spin() -> None:
    while True:
        pass


def allocate_2gb() -> int:
    return len(bytearray(2 * 1024**3))


def crash() -> None:
    raise RuntimeError("bad code")


def killed() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def returns_a_lambda():
    return lambda: 1


class Custom:
    pass


def returns_an_object() -> Custom:
    return Custom()


async def async_square(x: int) -> int:
    await asyncio.sleep(0)
    return x * x


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and RLIMIT_AS (POSIX)")
def test_process_runner_results_timeouts_memory_and_deaths():
    runner = ProcessToolRunner(timeout_s=1.0, max_workers=8, memory_mb=256)
    requests = [
        call(multiply, a="6", b=7),
        call(spin),
        call(allocate_2gb),
        call(crash),
        call(killed),
        call(returns_a_lambda),
        call(returns_an_object),
        call(async_square, x=5),
        call(multiply, a=1),  # bad arguments: no child started
    ]
    started = time.monotonic()
    outcomes = runner.run(requests)
    assert time.monotonic() - started < 4
    result, loop, memory, error, died, unpicklable, not_plain, awaited, bad = outcomes
    assert result.result == 42.0 and result.error is None
    assert loop.error == "timeout: spin took longer than 1s"
    assert "memory" in memory.error.lower() and memory.error_type == "MemoryError"
    assert error.error == "RuntimeError: bad code" and error.error_type == "RuntimeError"
    assert died.error.startswith("killed died: killed by SIGKILL") and died.error_type == "died"
    assert unpicklable.error.startswith("unpicklable result: function") and unpicklable.result is None
    assert "is not plain data" in not_plain.error  # the child writes those bytes: no arbitrary classes
    assert awaited.result == 25
    assert bad.error_type == "TypeError"
    assert len(runner.pids) == 8
    for pid in runner.pids:  # every child is gone, the spinning one included
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_process_runner_limits_children_at_once_and_trusted_results_unpickle_anything():
    runner = ProcessToolRunner(timeout_s=5.0, max_workers=2, memory_mb=None, trusted_results=True)
    outcomes = runner.run([call(returns_an_object) for _ in range(5)])
    assert all(isinstance(o.result, Custom) for o in outcomes) and len(runner.pids) == 5
    assert runner._slots.acquire(blocking=False) and runner._slots.acquire(blocking=False)  # both slots free again


def writes_half_a_result_and_hangs() -> None:
    for fd in range(3, 64):  # its output pipe and multiprocessing's exit sentinel among them
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.write(fd, b"\x80\x05\x95")
        except OSError:
            pass
    time.sleep(30)


def starts_a_grandchild() -> int:
    import subprocess

    return subprocess.Popen(["sleep", "30"]).pid


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forging_its_output_cannot_block_the_runner_and_grandchildren_are_killed():
    runner = ProcessToolRunner(timeout_s=2.0, memory_mb=None)
    started = time.monotonic()
    forged, grandchild = runner.run([call(writes_half_a_result_and_hangs), call(starts_a_grandchild)])
    assert time.monotonic() - started < 2.5
    assert forged.result is None and forged.error_type in ("died", "timeout", "unpicklable")
    psutil = pytest.importorskip("psutil")
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:  # killed with the child's process group (a zombie until init reaps it)
        try:
            if psutil.Process(grandchild.result).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    else:
        pytest.fail("the grandchild outlived its parent's timeout")
