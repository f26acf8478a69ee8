"""TRL's GRPOTrainer vs StepwiseReinforceTrainer on the same tool-calling task, for the same number of optimizer steps.

Measured for each trainer, each in its own subprocess (so that peak memory is its own): training reward per
optimizer step (first, last, mean), seconds per optimizer step (median, from ``on_step_end`` timestamps; the first
step includes each trainer's warm-up), peak resident memory of the process (``ru_maxrss``: model, trainer, rollouts),
tool calls per episode as each trainer logs them (``tools/call_frequency``: calls the model wrote, failed ones
included) and tool runs per episode counted the same way on both sides (calls that reached an ``ArithmeticTools``
method, read from the environments handed to the reward functions), and whether both saw the same problems at each
step.

The same on both sides: the task of ``trl_stepwise.envs.arithmetic_tools`` as a TRL user writes it (the
``ArithmeticTools`` ``environment_factory`` class, the first ``--train_size`` rows of ``arithmetic_tool_dataset``,
the reward functions ``correct_answer`` and ``used_a_tool``, weight 1 each), the model (the embedded
SmolLM2-135M-Instruct; ``--tiny``: a tiny random Llama) with the tool recipe's tokenizer (``tool_tokenizer``: TRL's
qwen2_5 tool-calling chat template), transformers generation on the CPU in float32, and the settings
``num_generations``, ``per_device_train_batch_size``, ``gradient_accumulation_steps`` (``--episodes_per_step``
episodes per optimizer step, one generation batch), ``learning_rate`` (constant), ``max_completion_length``,
``temperature`` (top-p 1, no top-k), ``max_tool_calling_iterations``, KL weight (GRPO ``beta`` = stepwise ``kl_coef``,
0 by default: no reference model), ``max_steps`` and ``seed``. ``correct_answer`` is wrapped by a recorder that passes
its arguments and scores through unchanged.

What differs is the credit. GRPO gives every completion token of an episode one advantage (its reward minus the
group mean, over the group std; TRL's defaults, "dapo" loss). The stepwise trainer splits each assistant turn into
steps (lines, at most ``--max_step_tokens`` tokens each) and credits per step (``reinforce_stable``: a step's
return-to-go minus the leave-one-out mean of the same step in its group). Both mask the tool results (``tool``
messages rendered by the template) from the loss. With the default settings (gamma 1, rewards at the episode's end)
the steps of one episode share their return, so the two differ by baseline and scaling. Both cut an episode at
``max_completion_length`` tokens. Each side's full logs go to the JSON too.

    python benchmarks/tool_trainers.py                         # 4 steps of 8 episodes each
    python benchmarks/tool_trainers.py --max_steps 20 --kl_coef 0.02
    python benchmarks/tool_trainers.py --stepwise_use_vllm     # ours on colocated vLLM (CPU start-up ~80 s)
    python benchmarks/tool_trainers.py --quick                 # 1 step of 4 episodes each: a smoke run, not results
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import (
    GIB,
    base_parser,
    give_model_a_path,
    load_policy,
    median,
    peak_rss_bytes,
    print_table,
    setup_torch,
    shared_trainer_settings,
    write_json,
)
from transformers import TrainerCallback

from recipes.reinforce_tools import tool_tokenizer
from trl_stepwise.envs.arithmetic_tools import ArithmeticTools, arithmetic_tool_dataset, correct_answer, used_a_tool

NAME = "tool_trainers"
SIDES = {"grpo": "TRL GRPOTrainer", "stepwise": "StepwiseReinforceTrainer"}


# ---------------------------------------------------------------------------------------------------------------------
# Recording (inside one side's process)


class Recorder(TrainerCallback):
    """Step-end timestamps, every log that carries ``reward``, and what the reward functions saw per call."""

    def __init__(self) -> None:
        self.started = 0.0
        self.step_ends: list[float] = []
        self.logs: list[dict[str, float]] = []
        self.questions: list[list[str]] = []  # per reward call: the problems of the rollout, sorted, distinct
        self.tool_runs: list[float] = []  # per reward call: mean ArithmeticTools method runs per episode

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_ends.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:
            numbers = {k: float(v) for k, v in logs.items() if isinstance(v, int | float)}
            self.logs.append({"step": state.global_step, **numbers})

    def saw(self, prompts: Any = None, environments: Any = None) -> None:
        self.questions.append(sorted({first_user_message(p) for p in prompts or []}))
        runs = [len(getattr(env, "calls", None) or []) for env in environments or [] if env is not None]
        self.tool_runs.append(sum(runs) / len(runs) if runs else float("nan"))

    def recording(self, func: Callable[..., Any]) -> Callable[..., Any]:
        """``func`` unchanged (name, signature, scores), noting the rollout's problems and tool runs first."""

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.saw(kwargs.get("prompts"), kwargs.get("environments"))
            return func(*args, **kwargs)

        return wrapper

    def step_seconds(self) -> list[float]:
        marks = [self.started, *self.step_ends]
        return [b - a for a, b in zip(marks, marks[1:], strict=False)]


def first_user_message(prompt: Any) -> str:
    """The question of a conversational prompt (GRPO appends the turns of a tool chat to it; the first user message
    stays the problem)."""
    if isinstance(prompt, list):
        for message in prompt:
            if isinstance(message, dict) and message.get("role") == "user":
                return str(message.get("content", ""))
    return str(prompt)


# ---------------------------------------------------------------------------------------------------------------------
# The two trainers


def common_settings(args: argparse.Namespace, output_dir: str) -> dict[str, Any]:
    """What both configurations take under the same names."""
    return {
        **shared_trainer_settings(args, output_dir, max_steps=args.max_steps, micro_batch=args.micro_batch),
        "report_to": "none",
        "max_completion_length": args.max_completion_length,
        "max_tool_calling_iterations": args.max_tool_calling_iterations,
        "use_vllm": False,
    }


def build_grpo(args: argparse.Namespace, model: Any, tokenizer: Any, dataset: Any, recorder: Recorder, out: str):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # environment_factory is marked experimental in TRL 1.x
    from trl import GRPOConfig, GRPOTrainer

    if args.kl_coef > 0:
        give_model_a_path(model, out)  # GRPO loads its reference model from the policy's path
    config = GRPOConfig(**common_settings(args, out), beta=args.kl_coef, log_completions=False)
    return GRPOTrainer(
        model=model,
        reward_funcs=[recorder.recording(correct_answer), used_a_tool],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[recorder],
        environment_factory=ArithmeticTools,
    )


def build_stepwise(args: argparse.Namespace, model: Any, tokenizer: Any, dataset: Any, recorder: Recorder, out: str):
    from trl_stepwise.trainer import StepwiseReinforceConfig, StepwiseReinforceTrainer

    settings = common_settings(args, out) | {
        "kl_coef": args.kl_coef,
        "max_step_tokens": args.max_step_tokens,
        "log_rollouts": False,
        "num_completions_to_print": 0,
    }
    if args.stepwise_use_vllm:
        settings |= {"use_vllm": True, "vllm_kv_cache_space_gb": 2}
    return StepwiseReinforceTrainer(
        model=model,
        args=StepwiseReinforceConfig(**settings),
        train_dataset=dataset,
        processing_class=tokenizer,
        reward_funcs=[recorder.recording(correct_answer), used_a_tool],
        callbacks=[recorder],
        environment_factory=ArithmeticTools,
    )


def run_side(args: argparse.Namespace) -> dict[str, Any]:
    """Train one side in this process and return its figures."""
    setup_torch(args)
    started = time.perf_counter()
    tokenizer = tool_tokenizer(None, "qwen2_5")
    model, _ = load_policy(args.tiny, seed=args.seed)
    dataset = arithmetic_tool_dataset(args.train_size, args.level)
    recorder = Recorder()
    build = build_grpo if args.side == "grpo" else build_stepwise
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build(args, model, tokenizer, dataset, recorder, output_dir)
        setup_seconds = time.perf_counter() - started
        print(f"training {SIDES[args.side]}: {args.max_steps} steps", flush=True)
        trainer.train()
    steps = recorder.step_seconds()
    rewards = [log["reward"] for log in recorder.logs]
    calls = [log["tools/call_frequency"] for log in recorder.logs if "tools/call_frequency" in log]
    keys = sorted({key for log in recorder.logs for key in log})
    print(f"{args.side} logged keys: {', '.join(keys)}", flush=True)
    return {
        "trainer": SIDES[args.side],
        "steps": len(steps),
        "episodes": len(steps) * args.episodes_per_step,
        "setup_seconds": setup_seconds,
        "train_seconds": sum(steps),
        "step_seconds": steps,
        "seconds_per_step_median": median(steps),
        "rewards": rewards,
        "mean_reward": sum(rewards) / len(rewards) if rewards else float("nan"),
        "tool_calls_per_episode_logged": sum(calls) / len(calls) if calls else None,
        "tool_runs_per_episode": recorder.tool_runs,
        "questions_per_rollout": recorder.questions,
        "peak_rss_bytes": peak_rss_bytes(),
        "logged_keys": keys,
        "logs": recorder.logs,
    }


# ---------------------------------------------------------------------------------------------------------------------
# The parent: one subprocess per side, then the table and the JSON


def run_in_subprocess(side: str, json_path: Path) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--side", side]
    command += ["--side_json", str(json_path)]
    print(f"\n== {SIDES[side]} (subprocess)", flush=True)
    started = time.perf_counter()
    code = subprocess.run(command, check=False).returncode
    wall = time.perf_counter() - started
    if code != 0 or not json_path.is_file():
        return {"trainer": SIDES[side], "failed": f"exit code {code}", "process_seconds": wall}
    return json.loads(json_path.read_text()) | {"process_seconds": wall}


def first_last(values: list[float]) -> str:
    return f"{values[0]:.3f} -> {values[-1]:.3f}" if values else "-"


def mean_or_none(values: list[float]) -> float | None:
    finite = [v for v in values if v == v]
    return sum(finite) / len(finite) if finite else None


def report(args: argparse.Namespace, runs: dict[str, dict[str, Any]]) -> None:
    rows = []
    for run in runs.values():
        if "failed" in run:
            rows.append([run["trainer"], run["failed"], "-", "-", "-", "-", "-", "-"])
            continue
        logged = run["tool_calls_per_episode_logged"]
        rows.append(
            [
                run["trainer"],
                run["steps"],
                run["seconds_per_step_median"],
                first_last(run["rewards"]),
                run["mean_reward"],
                run["peak_rss_bytes"] / GIB,
                "n/a" if logged is None else logged,
                mean_or_none(run["tool_runs_per_episode"]),
            ]
        )
    print_table(
        [
            "side",
            "steps",
            "s/step (median)",
            "reward first -> last",
            "mean reward",
            "peak RSS GiB",
            "tool calls/episode (logged)",
            "tool runs/episode (env)",
        ],
        rows,
        title=f"arithmetic tools, level {args.level}: {args.episodes_per_step} episodes/step, "
        f"{args.num_generations} per problem, {args.max_completion_length} tokens",
    )
    seen = [run.get("questions_per_rollout") for run in runs.values() if "failed" not in run]
    same = len(seen) == 2 and seen[0] == seen[1]
    print(f"same problems at every step in both runs: {same}", flush=True)
    write_json(NAME, {"runs": runs, "same_problems_per_step": same}, args)
    failed = [run["trainer"] for run in runs.values() if "failed" in run]
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


def parse_args() -> argparse.Namespace:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--max_steps", type=int, default=4, help="Optimizer steps per trainer.")
    parser.add_argument("--train_size", type=int, default=64, help="Generated training problems.")
    parser.add_argument("--level", default="1-2", help="Arithmetic levels of the problems: N, N-M or N,M.")
    parser.add_argument("--num_generations", type=int, default=4, help="Episodes per problem (the group).")
    parser.add_argument("--episodes_per_step", type=int, default=8, help="Episodes per optimizer step (both).")
    parser.add_argument(
        "--micro_batch", type=int, default=None, help="Episodes per forward/backward pass (default: all of a step)."
    )
    parser.add_argument("--learning_rate", type=float, default=3e-5)
    parser.add_argument("--kl_coef", type=float, default=0.0, help="Stepwise kl_coef = GRPO beta (0: no reference).")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max_completion_length", type=int, default=160, help="Token budget of one episode.")
    parser.add_argument("--max_tool_calling_iterations", type=int, default=3)
    parser.add_argument("--max_step_tokens", type=int, default=64, help="Stepwise only: most tokens of one step.")
    parser.add_argument(
        "--stepwise_use_vllm", action="store_true", help="Stepwise only: colocated vLLM (GRPO: transformers)."
    )
    parser.add_argument("--sides", default="grpo,stepwise", help="Comma list of the sides to run, in order.")
    parser.add_argument("--side", choices=sorted(SIDES), default=None, help=argparse.SUPPRESS)  # a child process
    parser.add_argument("--side_json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.max_steps, args.episodes_per_step, args.num_generations, args.train_size = 1, 4, 2, 8
        args.max_completion_length, args.max_step_tokens = 64, 32
    return args


def main() -> None:
    args = parse_args()
    if args.side:
        result = run_side(args)
        text = json.dumps(result, indent=2) + "\n"
        if args.side_json:
            Path(args.side_json).write_text(text)
        else:
            print(text, flush=True)
        return
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        raise SystemExit(f"--sides: unknown {unknown}; choose from {sorted(SIDES)}")
    with tempfile.TemporaryDirectory() as folder:
        runs = {side: run_in_subprocess(side, Path(folder) / f"{side}.json") for side in sides}
    report(args, runs)


if __name__ == "__main__":
    main()
