"""Two ways to train in one of our environments: StepwiseReinforceTrainer(env=...) vs TRL's GRPOTrainer + adapter.

(1) ``StepwiseReinforceTrainer`` with ``env=`` and (2) TRL's ``GRPOTrainer`` through ``GRPOEnvAdapter``
(``rollout_func`` + ``reward_func``) train the same model (the embedded SmolLM2-135M-Instruct; ``--tiny``: a tiny
random Llama) in the same environment (``--env``: countdown or math_feedback, with the limits of its CPU recipe
config), on the same training problems, with the same few-shot chat prompt, the same sampling (temperature, step and
episode token limits, calculator tool), the same episodes per optimizer step and group size, learning rate, KL weight
to the initial model (stepwise ``kl_coef`` = GRPO ``beta``; neither reference is refreshed), and the same number of
optimizer steps (``--max_steps``) and/or wall-clock budget (``--budget_minutes``). Both play their episodes with the
same rollout loop (``StepwiseRollout``: tool results and environment replies are forced tokens, masked from the loss).

What differs is the credit. GRPO sees the whole episode's return as one reward: every policy token of an episode
gets the same advantage (the return minus its group's mean, divided by the group's std; TRL's defaults, "dapo" loss).
The stepwise trainer credits per step (``reinforce_stable``): a step's advantage is its own return-to-go minus the
leave-one-out mean of the same step in the other episodes of its group (no std scaling). With the recipes' settings
(gamma 1, the reward at the episode's last step) the steps of one episode share their return, so the two differ by
baseline and scaling only; ``--gamma`` < 1 (GRPO has no counterpart) makes the steps of an earlier, failed attempt in
math_feedback earn less than those of the attempt that fixed it.

Both start from the same weights and are evaluated before and after on the same held-out problems (the
environment's evaluation problems, e.g. ``countdown:n=50`` of the test seeds), greedily, with the environment's own
success criterion, via ``trl_stepwise.evaluation.evaluate_problems`` (as ``trl-stepwise evaluate --env`` does);
success rates carry Wilson 95% intervals.

    python benchmarks/env_trainers.py                          # countdown, 8 steps each, 50 evaluation problems
    python benchmarks/env_trainers.py --env math_feedback
    python benchmarks/env_trainers.py --max_steps 1000 --budget_minutes 20   # same wall clock instead of steps
    python benchmarks/env_trainers.py --quick --tiny           # a couple of minutes: a smoke run, not results
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

from common import (
    base_parser,
    give_model_a_path,
    load_policy,
    load_problems,
    print_table,
    setup_torch,
    shared_trainer_settings,
    stepwise_side_settings,
    write_json,
)
from datasets import Dataset
from training_budget import BudgetCallback, CurveCallback

from trl_stepwise.data import dataset_flavour
from trl_stepwise.envs import make_limited
from trl_stepwise.evaluation import evaluate_problems
from trl_stepwise.grpo_adapter import GRPOEnvAdapter
from trl_stepwise.prompting import PromptBuilder, load_system_prompt, with_worked_examples
from trl_stepwise.rollout import SamplingConfig
from trl_stepwise.trainer import StepwiseReinforceConfig, StepwiseReinforceTrainer

NAME = "env_trainers"
TRAINERS = {"stepwise": "StepwiseReinforceTrainer (env=)", "grpo": "TRL GRPOTrainer + GRPOEnvAdapter"}


@dataclass(frozen=True)
class EnvPreset:
    """An environment's problems and limits, as its CPU recipe config sets them (recipes/configs/*_cpu.yaml)."""

    train: str  # training problems (train split)
    eval: str  # held-out problems (test split: disjoint generator seeds)
    few_shot: str  # source of the few-shot examples, and its split
    few_shot_split: str
    system_prompt: str | None  # None: the flavour's own
    max_episode_steps: int
    max_episode_tokens: int
    eval_max_episode_tokens: int


PRESETS = {
    "countdown": EnvPreset("countdown:n=2000", "countdown:n=50", "countdown:n=2000", "train", "countdown", 4, 100, 80),
    "math_feedback": EnvPreset(
        "arithmetic:level=1", "arithmetic:level=1,n=50", "arithmetic:level=1", "fewshot", None, 8, 160, 120
    ),
}


# ---------------------------------------------------------------------------------------------------------------------
# What both trainers share


@dataclass
class Setup:
    """Problems, prompt and environments, built once and handed to both trainers and every evaluation."""

    preset: EnvPreset
    flavour: str
    train: Dataset
    shots: Dataset
    builder: PromptBuilder
    eval_rows: list[dict]


def build_setup(args: argparse.Namespace, tokenizer: Any) -> Setup:
    preset = PRESETS[args.env]
    flavour = dataset_flavour(preset.train)
    train = Dataset.from_list(distinct(load_problems(preset.train, "train", None))[: args.train_problems])
    shots = Dataset.from_list(load_problems(preset.few_shot, preset.few_shot_split, None))
    examples, _ = with_worked_examples(list(shots), flavour)
    builder = PromptBuilder(  # exactly the trainer's own (checked against it in train_stepwise)
        tokenizer,
        examples,
        k=args.n_few_shot,
        system_prompt=load_system_prompt(preset.system_prompt, flavour),
        flavour=flavour,
        seed=args.seed,
    )
    eval_rows = [without_env(row) for row in load_problems(preset.eval, "test", args.eval_problems)]
    return Setup(preset, flavour, train, shots, builder, eval_rows)


def without_env(row: dict) -> dict:
    """The row without its ``env`` column: every episode then runs in ``env_factory``'s environment, with the same
    limits in both trainers (a row naming its environment would get each trainer's own defaults for it)."""
    return {k: v for k, v in row.items() if k not in ("env", "environment")}


def distinct(rows: list[dict]) -> list[dict]:
    """Rows with distinct questions, first kept (the adapter finds a row again from its question)."""
    seen: dict[str, dict] = {}
    for row in rows:
        seen.setdefault(str(row["question"]), without_env(row))
    return list(seen.values())


def env_factory(args: argparse.Namespace, max_episode_tokens: int) -> Any:
    """Fresh environments of ``--env`` with the recipe's step limit, a token budget and the calculator tool."""
    return partial(
        make_limited, args.env, max_steps=args.max_episode_steps, max_episode_tokens=max_episode_tokens, tools=True
    )


def sampling_config(args: argparse.Namespace) -> SamplingConfig:
    """Training rollouts, for both (the stepwise trainer builds the same from its config)."""
    return SamplingConfig(
        temperature=args.temperature,
        top_p=1.0,
        top_k=0,
        max_step_tokens=args.max_step_tokens,
        batch_size=args.rollout_batch_size,
    )


def evaluate(model: Any, tokenizer: Any, setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    """Greedy success rate on the held-out problems by the environment's own criterion (Wilson 95% interval)."""
    sampling = SamplingConfig(temperature=0.0, max_step_tokens=args.max_step_tokens, batch_size=args.eval_batch_size)
    started = time.perf_counter()
    summary, _ = evaluate_problems(
        model,
        tokenizer,
        setup.eval_rows,
        setup.builder,
        env_factory(args, args.eval_max_episode_tokens),
        sampling,
        progress=False,
        step_delimiter="\n",
        calculator=True,
    )
    keys = ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "correct", "total", "unparsable", "mean_tokens")
    result = {k: summary.get(k) for k in keys} | {"seconds": time.perf_counter() - started}
    print(f"  eval: {result['correct']}/{result['total']} = {result['accuracy']:.3f}", flush=True)
    return result


# ---------------------------------------------------------------------------------------------------------------------
# The two trainers


class _RecordingStepwiseTrainer(StepwiseReinforceTrainer):
    """Records the problems of every rollout (to check both trainers saw the same ones)."""

    seen: list[list[str]] = []

    def _generate_and_score(self, problems: list[dict], num_micro_batches: int) -> list[dict]:
        self.seen.append(sorted(str(p["question"]) for p in problems))
        return super()._generate_and_score(problems, num_micro_batches)


def train_stepwise(args: argparse.Namespace, tokenizer: Any, setup: Setup, callbacks: list, output_dir: str) -> Any:
    model, _ = load_policy(args.tiny, seed=args.seed)
    config = StepwiseReinforceConfig(
        **stepwise_side_settings(
            args, output_dir, args.seed, setup.flavour, max_steps=args.max_steps, micro_batch=args.micro_batch
        ),
        gamma=args.gamma,
        system_prompt=setup.preset.system_prompt,
    )
    trainer = _RecordingStepwiseTrainer(
        model=model,
        args=config,
        train_dataset=setup.train,
        processing_class=tokenizer,
        few_shot_dataset=setup.shots,
        callbacks=callbacks,
        env=env_factory(args, args.max_episode_tokens),
    )
    question = setup.eval_rows[0]["question"]
    if trainer.prompt_builder.messages(question) != setup.builder.messages(question):
        raise RuntimeError("the stepwise trainer's prompt differs from the one GRPO and the evaluation use")
    trainer.seen = []
    trainer.train()
    trainer.problems_seen = trainer.seen
    return trainer


def train_grpo(args: argparse.Namespace, tokenizer: Any, setup: Setup, callbacks: list, output_dir: str) -> Any:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is marked experimental in TRL 1.x
    from trl import GRPOConfig, GRPOTrainer

    model, _ = load_policy(args.tiny, seed=args.seed)
    if args.kl_coef > 0:
        give_model_a_path(model, output_dir)
    adapter = GRPOEnvAdapter(
        env_factory(args, args.max_episode_tokens), list(setup.train), tokenizer, setup.builder, sampling_config(args)
    )
    seen: list[list[str]] = []

    def rollout_func(prompts: list, trainer: Any) -> dict[str, list]:
        seen.append(sorted({str(p) for p in prompts}))
        return adapter.rollout_func(prompts, trainer)

    config = GRPOConfig(
        **shared_trainer_settings(args, output_dir, max_steps=args.max_steps, micro_batch=args.micro_batch),
        beta=args.kl_coef,
        max_completion_length=args.max_episode_tokens,
        log_completions=False,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[adapter.reward_func],
        args=config,
        train_dataset=adapter.dataset(),
        processing_class=tokenizer,
        callbacks=callbacks,
        rollout_func=rollout_func,
    )
    trainer.train()
    trainer.problems_seen = seen
    return trainer


def train_and_evaluate(args: argparse.Namespace, key: str, tokenizer: Any, setup: Setup) -> dict[str, Any]:
    """Train one trainer until ``--max_steps`` or the budget, then evaluate it."""
    label = TRAINERS[key]
    budget = BudgetCallback(args.budget_minutes * 60 if args.budget_minutes else float("inf"))
    curve = CurveCallback(budget)
    limit = f" or {args.budget_minutes:g} min" if args.budget_minutes else ""
    print(f"training {label}: {args.max_steps} steps{limit}", flush=True)
    with tempfile.TemporaryDirectory() as output_dir:
        train = train_stepwise if key == "stepwise" else train_grpo
        trainer = train(args, tokenizer, setup, [budget, curve], output_dir)
        model = trainer.accelerator.unwrap_model(trainer.model).eval()
        print(f"evaluating {label} after {budget.steps} steps", flush=True)
        after = evaluate(model, tokenizer, setup, args)
    rewards = [p["reward"] for p in curve.points]
    return {
        "trainer": label,
        "steps": budget.steps,
        "episodes": budget.steps * args.episodes_per_step,
        "train_seconds": budget.elapsed,
        "train_cpu_seconds": budget.cpu_seconds,
        "seconds_per_step": budget.elapsed / budget.steps if budget.steps else float("nan"),
        "mean_train_return": sum(rewards) / len(rewards) if rewards else float("nan"),
        "after": after,
        "curve": curve.points,
        "problems_per_rollout": trainer.problems_seen,
    }


# ---------------------------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--env", choices=sorted(PRESETS), default="countdown")
    parser.add_argument("--max_steps", type=int, default=8, help="Optimizer steps per trainer.")
    parser.add_argument(
        "--budget_minutes", type=float, default=None, help="Also stop each trainer at the first step end after this."
    )
    parser.add_argument(
        "--train_problems",
        type=int,
        default=None,
        help="First N training problems (default: max_steps x problems per step, so each is used once).",
    )
    parser.add_argument("--eval_problems", type=int, default=50, help="First N held-out problems.")
    parser.add_argument("--eval_batch_size", type=int, default=50)
    parser.add_argument("--n_few_shot", type=int, default=2)
    parser.add_argument("--num_generations", type=int, default=4, help="Episodes per problem (the GRPO group).")
    parser.add_argument("--episodes_per_step", type=int, default=16, help="Episodes per optimizer step (both).")
    parser.add_argument("--micro_batch", type=int, default=4, help="Episodes per forward/backward pass.")
    parser.add_argument("--learning_rate", type=float, default=3e-5)
    parser.add_argument("--kl_coef", type=float, default=0.02, help="Stepwise kl_coef = GRPO beta.")
    parser.add_argument("--gamma", type=float, default=1.0, help="Stepwise discount of per-step returns (GRPO: none).")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max_step_tokens", type=int, default=40)
    parser.add_argument("--max_episode_steps", type=int, default=None, help="Default: the environment's recipe.")
    parser.add_argument("--max_episode_tokens", type=int, default=None, help="Default: the environment's recipe.")
    parser.add_argument("--eval_max_episode_tokens", type=int, default=None, help="Default: the environment's recipe.")
    parser.add_argument("--rollout_batch_size", type=int, default=64)
    parser.add_argument("--skip", default="", help="Comma list: stepwise, grpo.")
    args = parser.parse_args()
    preset = PRESETS[args.env]
    args.max_episode_steps = args.max_episode_steps or preset.max_episode_steps
    args.max_episode_tokens = args.max_episode_tokens or preset.max_episode_tokens
    args.eval_max_episode_tokens = args.eval_max_episode_tokens or preset.eval_max_episode_tokens
    if args.quick:
        args.max_steps, args.eval_problems, args.eval_batch_size = 2, 4, 4
        args.episodes_per_step, args.num_generations, args.micro_batch, args.n_few_shot = 4, 2, 2, 1
        args.max_episode_tokens, args.eval_max_episode_tokens, args.max_step_tokens = 16, 16, 8
        args.max_episode_steps = 2
    if args.train_problems is None:
        args.train_problems = args.max_steps * args.episodes_per_step // args.num_generations
    return args


def interval(result: dict[str, Any]) -> str:
    """``12/50 24.0% [14.3, 37.4]``: count, rate and Wilson 95% interval in percent."""
    low, high = 100 * result["accuracy_ci_low"], 100 * result["accuracy_ci_high"]
    return f"{result['correct']}/{result['total']} {100 * result['accuracy']:.1f}% [{low:.1f}, {high:.1f}]"


def report(args: argparse.Namespace, setup: Setup, before: dict, runs: dict[str, dict]) -> None:
    rows = [
        [
            run["trainer"],
            f"{interval(before)} -> {interval(run['after'])}",
            f"{100 * (run['after']['accuracy'] - before['accuracy']):+.1f} pts",
            run["steps"],
            run["seconds_per_step"],
            run["train_seconds"] / 60,
            run["mean_train_return"],
        ]
        for run in runs.values()
    ]
    print_table(
        ["trainer", "success before -> after [95% CI]", "change", "steps", "s/step", "train wall min", "mean return"],
        rows,
        title=f"{args.env}: {len(setup.eval_rows)} held-out problems ({setup.preset.eval}), greedy",
    )
    seen = [run["problems_per_rollout"] for run in runs.values()]
    same = len(seen) == 2 and sorted(map(sorted, seen[0])) == sorted(map(sorted, seen[1]))
    print(f"same training problems in both runs: {same}", flush=True)
    write_json(
        NAME,
        {
            "env": args.env,
            "preset": vars(setup.preset),
            "train_problems": len(setup.train),
            "eval_problems": len(setup.eval_rows),
            "before": before,
            "runs": runs,
            "same_training_problems": same,
        },
        args,
    )


def main() -> None:
    args = parse_args()
    setup_torch(args)
    initial, tokenizer = load_policy(args.tiny, seed=args.seed)
    setup = build_setup(args, tokenizer)
    print(
        f"env {args.env}: train {setup.preset.train} ({len(setup.train)} problems), "
        f"eval {setup.preset.eval} ({len(setup.eval_rows)} problems)",
        flush=True,
    )
    print("evaluating the initial model (the same weights start both runs)", flush=True)
    before = evaluate(initial.eval(), tokenizer, setup, args)
    del initial
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    runs = {key: train_and_evaluate(args, key, tokenizer, setup) for key in TRAINERS if key not in skip}
    report(args, setup, before, runs)


if __name__ == "__main__":
    main()
