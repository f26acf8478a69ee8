"""Tool calls of many episodes: one at a time (as TRL 1.16 runs them) against ``ToolRunner``, side by side in one run.

In an RL rollout 16-64 episodes write tool calls at once. TRL 1.16's ``GRPOTrainer._tool_call_loop`` calls sync tools
inline and awaits async ones one completion at a time (``run_coroutine_threadsafe(...).result()`` per completion), so
a round of calls costs the sum of their latencies; ``ToolRunner`` runs them together. Three parts:

- **(a)** ``--num_calls`` calls of a tool that sleeps ``--sleep_s`` (a stand-in for a network or sandbox call), sync
  and async: wall time one at a time vs ``ToolRunner.run`` on the whole batch, and the speed-up (median of
  ``--repeats``).
- **(b)** the cost of the machinery on a trivial function (``x + 1``), one call per ``run``: median milliseconds over
  ``--overhead_calls`` calls of a direct call, ``ToolRunner`` (sync and async function) and ``ProcessToolRunner``
  (a fork, a pipe and a pickle per call; this process has torch imported, as a trainer has).
- **(c)** a tool blocked in one C call (``time.sleep(--hang_s)``) with ``--timeout_s``: seconds until the caller gets
  its error back with the old guard (``trl_stepwise._timeout.time_limit``, an async exception that waits for the C
  call to return), ``ToolRunner`` (the waiter abandons the thread) and ``ProcessToolRunner`` (the child is killed).

Sleep-bound except (b), so it needs little CPU; (b) is a latency and moves with the machine's load (recorded).

    python benchmarks/tool_runner.py                 # ~45 s
    python benchmarks/tool_runner.py --num_calls 64
    python benchmarks/tool_runner.py --quick         # seconds: a smoke run, not results
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

from common import print_table, ratio, write_json

from trl_stepwise._timeout import Timeout, time_limit
from trl_stepwise.envs.process_runner import ProcessToolRunner
from trl_stepwise.envs.tool_runner import ToolRequest, ToolRunner

NAME = "tool_runner"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="Seconds-long smoke run: tiny sizes, not results.")
    parser.add_argument("--output", default=None, help="JSON path (default: benchmarks/results/tool_runner.json).")
    parser.add_argument("--num_calls", type=int, default=16, help="Calls per round in (a): the episodes at once.")
    parser.add_argument("--sleep_s", type=float, default=0.2, help="How long the tool of (a) sleeps per call.")
    parser.add_argument("--repeats", type=int, default=3, help="Rounds timed per variant in (a); the median is kept.")
    parser.add_argument(
        "--overhead_calls", type=int, default=50, help="Calls of the trivial function timed per runner in (b)."
    )
    parser.add_argument("--timeout_s", type=float, default=1.0, help="The tool's timeout in (c).")
    parser.add_argument("--hang_s", type=float, default=6.0, help="How long the tool of (c) is blocked in C.")
    parser.add_argument("--max_workers", type=int, default=32, help="ToolRunner's thread pool size.")
    parser.add_argument("--process_workers", type=int, default=8, help="ProcessToolRunner's children at once.")
    args = parser.parse_args()
    if args.quick:
        args.num_calls, args.sleep_s, args.repeats = 4, 0.05, 1
        args.overhead_calls, args.timeout_s, args.hang_s = 10, 0.2, 1.0
    return args


# -- the tools --------------------------------------------------------------------------------------------------------


def make_tools(sleep_s: float) -> tuple[Callable[[int], int], Callable[[int], Any]]:
    def sync_tool(x: int) -> int:
        time.sleep(sleep_s)
        return x

    async def async_tool(x: int) -> int:
        await asyncio.sleep(sleep_s)
        return x

    return sync_tool, async_tool


def trivial(x: int) -> int:
    return x + 1


async def trivial_async(x: int) -> int:
    return x + 1


# -- TRL 1.16's way: sync inline, async awaited one completion at a time on a daemon loop -----------------------------


class DaemonLoop:
    """An event loop in a daemon thread, as GRPOTrainer starts one for async tools."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run_one_completion(self, coros: list[Any]) -> list[Any]:
        async def gather() -> list[Any]:
            return await asyncio.gather(*coros, return_exceptions=True)

        return asyncio.run_coroutine_threadsafe(gather(), self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=1)


def one_at_a_time(fn: Callable[..., Any], n: int, loop: DaemonLoop) -> list[Any]:
    """One call per completion, completions in turn (TRL's ``_tool_call_loop``)."""
    results = []
    for i in range(n):
        if asyncio.iscoroutinefunction(fn):
            results.extend(loop.run_one_completion([fn(x=i)]))
        else:
            results.append(fn(x=i))
    return results


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


# -- (a) --------------------------------------------------------------------------------------------------------------


def part_a(args: argparse.Namespace, runner: ToolRunner) -> dict[str, Any]:
    sync_tool, async_tool = make_tools(args.sleep_s)
    loop = DaemonLoop()
    results: dict[str, Any] = {}
    try:
        for kind, fn in (("sync", sync_tool), ("async", async_tool)):
            requests = [ToolRequest(fn, {"x": i}, kind) for i in range(args.num_calls)]
            runner.run(requests[:2])  # warm-up: threads and loop started
            sequential, parallel = [], []
            for _ in range(args.repeats):
                seconds, out = timed(lambda fn=fn: one_at_a_time(fn, args.num_calls, loop))
                assert out == list(range(args.num_calls))
                sequential.append(seconds)
                seconds, outcomes = timed(lambda requests=requests: runner.run(requests))
                assert [o.result for o in outcomes] == list(range(args.num_calls)), outcomes
                parallel.append(seconds)
            results[kind] = {
                "one_at_a_time_s": statistics.median(sequential),
                "tool_runner_s": statistics.median(parallel),
                "speedup": ratio(statistics.median(sequential), statistics.median(parallel)),
                "sum_of_sleeps_s": args.num_calls * args.sleep_s,
                "one_at_a_time_runs_s": sequential,
                "tool_runner_runs_s": parallel,
            }
    finally:
        loop.close()
    print_table(
        ["tool", "calls", "one at a time (s)", "ToolRunner (s)", "speed-up"],
        [
            [f"{kind} (sleeps {args.sleep_s:g} s)", args.num_calls, r["one_at_a_time_s"], r["tool_runner_s"]]
            + [f"{r['speedup']:.1f}x"]
            for kind, r in results.items()
        ],
        title=f"(a) {args.num_calls} calls: one at a time (TRL 1.16) vs ToolRunner, median of {args.repeats}",
    )
    return results


# -- (b) --------------------------------------------------------------------------------------------------------------


def per_call_ms(call: Callable[[int], Any], n: int) -> dict[str, float]:
    call(-1)  # warm-up
    times = []
    for i in range(n):
        started = time.perf_counter()
        call(i)
        times.append((time.perf_counter() - started) * 1000)
    return {"median_ms": statistics.median(times), "p90_ms": sorted(times)[int(0.9 * (len(times) - 1))]}


def part_b(args: argparse.Namespace, runner: ToolRunner, processes: ProcessToolRunner) -> dict[str, Any]:
    def through(r: ToolRunner, fn: Callable[..., Any]) -> Callable[[int], Any]:
        def call(i: int) -> Any:
            [outcome] = r.run([ToolRequest(fn, {"x": i}, fn.__name__)])
            assert outcome.result == i + 1, outcome
            return outcome.result

        return call

    results = {
        "direct call": per_call_ms(lambda i: trivial(x=i), args.overhead_calls),
        "ToolRunner, sync function": per_call_ms(through(runner, trivial), args.overhead_calls),
        "ToolRunner, async function": per_call_ms(through(runner, trivial_async), args.overhead_calls),
        "ProcessToolRunner": per_call_ms(through(processes, trivial), args.overhead_calls),
    }
    base = results["ToolRunner, sync function"]["median_ms"]
    print_table(
        ["how", "median ms per call", "p90 ms", "vs ToolRunner (sync)"],
        [[k, v["median_ms"], v["p90_ms"], f"{ratio(v['median_ms'], base):.2g}x"] for k, v in results.items()],
        title=f"(b) per-call overhead on a trivial function, one call per run, {args.overhead_calls} calls",
    )
    return results


# -- (c) --------------------------------------------------------------------------------------------------------------


def part_c(args: argparse.Namespace, runner: ToolRunner, processes: ProcessToolRunner) -> dict[str, Any]:
    hang_s = args.hang_s

    def blocked(x: int) -> int:
        time.sleep(hang_s)  # one C call
        return x

    def old_guard() -> str:
        try:
            with time_limit(args.timeout_s):
                blocked(0)
        except Timeout:
            return "timeout"
        return "returned"

    results: dict[str, Any] = {}
    seconds, out = timed(old_guard)
    results["old guard (time_limit)"] = {"seconds": seconds, "outcome": out}
    for label, r in (("ToolRunner", runner), ("ProcessToolRunner", processes)):
        seconds, [outcome] = timed(lambda r=r: r.run([ToolRequest(blocked, {"x": 0}, "blocked")], args.timeout_s))
        results[label] = {"seconds": seconds, "outcome": outcome.error}
    print_table(
        ["guard", "seconds until the error returns", "outcome"],
        [[k, v["seconds"], v["outcome"]] for k, v in results.items()],
        title=f"(c) a tool blocked in C for {hang_s:g} s with a {args.timeout_s:g} s timeout",
    )
    return results


def main() -> None:
    args = parse_args()
    load_before = os.getloadavg()
    runner = ToolRunner(timeout_s=max(10.0, args.hang_s * 2), max_workers=args.max_workers)
    processes = ProcessToolRunner(timeout_s=max(10.0, args.hang_s * 2), max_workers=args.process_workers)
    try:
        parallel = part_a(args, runner)
        overhead = part_b(args, runner, processes)
        timeout = part_c(args, runner, processes)
    finally:
        runner.close()
        processes.close()
    write_json(
        NAME,
        {
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "parallel": parallel,
            "overhead": overhead,
            "timeout": timeout,
        },
        args,
    )


if __name__ == "__main__":
    main()
