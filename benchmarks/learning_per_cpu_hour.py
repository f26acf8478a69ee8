"""Learning per CPU hour: StepwiseReinforceTrainer against TRL's GRPOTrainer under the same wall-clock budget.

Same model (the embedded SmolLM2-135M-Instruct), same training problems (default ``arithmetic:level=1``), same few-shot
chat prompts, same reward (final-answer correctness graded by ``trl_stepwise.grading.grade_solution``), same optimiser
settings, episodes per step, sampling temperature and token budget; each trainer is stopped by a callback once its
budget (default 20 minutes) is spent. Both models are evaluated greedily on the same problems (default: the first 200
GSM8K test problems) before and after, with ``trl_stepwise.evaluation.evaluate_problems`` and Wilson 95% intervals,
in two protocols: ``stepwise`` (one line per step, calculator on: this project's protocol) and ``direct`` (the whole
solution in one go, no calculator: GRPO's training protocol). Reward curves of both runs against wall-clock minutes
go to ``benchmarks/results/learning_curves.png``.

    python benchmarks/learning_per_cpu_hour.py                       # 2 x 20 min of training plus evaluations
    python benchmarks/learning_per_cpu_hour.py --budget_minutes 60 --eval_dataset gsm8k
    python benchmarks/learning_per_cpu_hour.py --quick               # seconds: a smoke run, not results
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import (
    base_parser,
    env_factory,
    few_shot_rows,
    give_model_a_path,
    load_policy,
    load_problems,
    print_table,
    prompt_builder,
    ratio,
    result_path,
    setup_torch,
    shared_trainer_settings,
    stepwise_side_settings,
    with_interval,
    write_json,
)
from datasets import Dataset
from training_budget import BudgetCallback, CurveCallback, plot_reward_curves, run_on_cores

from trl_stepwise.data import dataset_flavour
from trl_stepwise.evaluation import evaluate_problems
from trl_stepwise.prompting import PromptBuilder
from trl_stepwise.rewards import correctness_reward
from trl_stepwise.rollout import SamplingConfig
from trl_stepwise.trainer import StepwiseReinforceConfig, StepwiseReinforceTrainer

NAME = "learning_per_cpu_hour"
FEW_SHOT_SEED = 0  # StepwiseReinforceConfig.few_shot_seed's default: both trainers see the same shots


# ---------------------------------------------------------------------------------------------------------------------


def evaluate(model: Any, tokenizer: Any, eval_sets: dict[str, list[dict]], args: Any) -> dict[str, dict]:
    """Greedy accuracy with Wilson 95% CIs, per evaluation set and per protocol of ``--eval_modes``.

    Each set is prompted with its own few-shot examples (as ``trl-stepwise evaluate`` would), the same for every model.
    """
    out: dict[str, dict] = {}
    for name, rows in eval_sets.items():
        flavour = "math" if dataset_flavour(name) == "math" else "gsm8k"
        builder = prompt_builder(tokenizer, name, args.n_few_shot, seed=FEW_SHOT_SEED)
        out[name] = {}
        for mode in args.eval_modes.split(","):
            direct = mode == "direct"
            make_env = env_factory(
                flavour, args.eval_max_tokens, max_steps=1 if direct else None, calculator=not direct
            )
            sampling = SamplingConfig(
                temperature=0.0,
                max_step_tokens=args.eval_max_tokens if direct else args.max_step_tokens,
                batch_size=args.eval_batch_size,
            )
            started = time.perf_counter()
            summary, _ = evaluate_problems(
                model,
                tokenizer,
                rows,
                builder,
                make_env,
                sampling,
                progress=False,
                step_delimiter=None if direct else "\n",
                calculator=not direct,
            )
            keys = ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "correct", "total", "unparsable", "mean_tokens")
            out[name][mode] = {k: summary[k] for k in keys} | {"seconds": time.perf_counter() - started}
            print(
                f"  eval {name} {mode}: {summary['correct']}/{summary['total']} = {summary['accuracy']:.3f}",
                flush=True,
            )
    return out


def train_stepwise(args: Any, tokenizer: Any, train: Dataset, shots: Dataset, callbacks: list, output_dir: str) -> Any:
    model, _ = load_policy(args.tiny, seed=args.seed)
    config = StepwiseReinforceConfig(
        **stepwise_side_settings(args, output_dir, FEW_SHOT_SEED, dataset_flavour(args.train_dataset))
    )
    trainer = StepwiseReinforceTrainer(
        model=model,
        args=config,
        train_dataset=train,
        processing_class=tokenizer,
        few_shot_dataset=shots,
        callbacks=callbacks,
    )
    trainer.train()
    return trainer


def train_grpo(
    args: Any, tokenizer: Any, train: Dataset, builder: PromptBuilder, callbacks: list, output_dir: str
) -> Any:
    from trl import GRPOConfig, GRPOTrainer

    model, _ = load_policy(args.tiny, seed=args.seed)
    if args.kl_coef > 0:
        give_model_a_path(model, output_dir)
    config = GRPOConfig(
        **shared_trainer_settings(args, output_dir),
        beta=args.kl_coef,
        max_completion_length=args.max_episode_tokens,
        log_completions=False,
    )
    dataset = Dataset.from_dict(
        {"prompt": [builder.messages(q) for q in train["question"]], "answer": list(train["answer"])}
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[correctness_reward],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.train()
    return trainer


def parse_args() -> Any:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--budget_minutes", type=float, default=20.0, help="Wall-clock training budget per trainer.")
    parser.add_argument("--train_dataset", default="arithmetic:level=1")
    parser.add_argument(
        "--eval_dataset", default="gsm8k", help="Comma list of evaluation sets, e.g. gsm8k,arithmetic:level=1."
    )
    parser.add_argument("--eval_split", default="test")
    parser.add_argument("--eval_problems", type=int, default=200, help="First N problems of each evaluation set.")
    parser.add_argument("--eval_modes", default="stepwise,direct", help="Comma list of stepwise, direct.")
    parser.add_argument("--eval_max_tokens", type=int, default=128, help="Token budget of one evaluation episode.")
    parser.add_argument("--eval_batch_size", type=int, default=100)
    parser.add_argument("--n_few_shot", type=int, default=2)
    parser.add_argument("--num_generations", type=int, default=4)
    parser.add_argument("--episodes_per_step", type=int, default=16, help="Episodes per optimizer step (both).")
    parser.add_argument("--learning_rate", type=float, default=3e-5)
    parser.add_argument("--kl_coef", type=float, default=0.02, help="Stepwise kl_coef = GRPO beta.")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max_episode_tokens", type=int, default=100, help="= GRPO max_completion_length.")
    parser.add_argument("--max_step_tokens", type=int, default=40)
    parser.add_argument("--max_episode_steps", type=int, default=4)
    parser.add_argument("--rollout_batch_size", type=int, default=64)
    parser.add_argument("--smoothing", type=int, default=5, help="Steps in the rolling mean of the plot.")
    parser.add_argument("--skip", default="", help="Comma list: stepwise, grpo.")
    parser.add_argument("--plot", default=None, help="PNG path (default: benchmarks/results/learning_curves.png).")
    parser.add_argument(
        "--parallel",
        action="store_true",
        help="Train both at the same time, one process pinned to one core each (same wall-clock window, same "
        "machine load), instead of one after the other on all cores. Evaluations are split over the cores too.",
    )
    parser.add_argument("--save_models", default=None, help="Directory to keep the trained models in (<dir>/<key>).")
    parser.add_argument("--phase", choices=("before", "train"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.plot = args.plot or str(result_path("learning_curves", args, suffix=".png"))
    if args.quick:
        args.budget_minutes, args.eval_problems, args.eval_max_tokens, args.eval_batch_size = 0.05, 4, 16, 4
        args.episodes_per_step, args.num_generations, args.n_few_shot = 4, 2, 1
        args.max_episode_tokens, args.max_step_tokens, args.max_episode_steps = 16, 8, 2
    return args


TRAINERS = {"stepwise": "StepwiseReinforceTrainer", "grpo": "TRL GRPOTrainer"}


def train_and_evaluate(
    args: Any, key: str, tokenizer: Any, train: Dataset, shots: Dataset, builder: PromptBuilder, eval_sets: dict
) -> dict[str, Any]:
    """Train one trainer for the budget, then evaluate it on every evaluation set."""
    label = TRAINERS[key]
    budget = BudgetCallback(args.budget_minutes * 60)
    curve = CurveCallback(budget)
    print(f"training {label} for {args.budget_minutes} min", flush=True)
    with tempfile.TemporaryDirectory() as output_dir:
        if key == "stepwise":
            trainer = train_stepwise(args, tokenizer, train, shots, [budget, curve], output_dir)
        else:
            trainer = train_grpo(args, tokenizer, train, builder, [budget, curve], output_dir)
        if args.save_models:
            trainer.save_model(str(Path(args.save_models) / key))
        model = trainer.accelerator.unwrap_model(trainer.model)
        print(f"evaluating {label} after {budget.steps} steps", flush=True)
        after = evaluate(model, tokenizer, eval_sets, args)
    return {
        "trainer": label,
        "steps": budget.steps,
        "episodes": budget.steps * args.episodes_per_step,
        "train_seconds": budget.elapsed,
        "train_cpu_seconds": budget.cpu_seconds,
        "threads": torch.get_num_threads(),
        "after": after,
        "curve": curve.points,
    }


def run_parallel(args: Any) -> tuple[dict, dict]:
    """The initial evaluation split by protocol, then both trainers side by side; returns (before, runs)."""
    parts = Path(tempfile.mkdtemp(prefix="learning_per_cpu_hour_"))
    base = [sys.executable, str(Path(__file__).resolve()), *(a for a in sys.argv[1:] if a != "--parallel")]
    base += ["--threads", "1"]
    modes = args.eval_modes.split(",")
    run_on_cores(
        [[*base, "--phase", "before", "--eval_modes", m, "--output", str(parts / f"before-{m}.json")] for m in modes]
    )
    keys = [k for k in TRAINERS if k not in skipped(args)]
    others = {k: ",".join(o for o in TRAINERS if o != k) for k in keys}
    run_on_cores(
        [[*base, "--phase", "train", "--skip", others[k], "--output", str(parts / f"train-{k}.json")] for k in keys]
    )
    before: dict[str, dict] = {}
    for m in modes:
        for name, result in json.loads((parts / f"before-{m}.json").read_text())["before"].items():
            before.setdefault(name, {}).update(result)
    runs = {k: json.loads((parts / f"train-{k}.json").read_text())["runs"][k] for k in keys}
    return before, runs


def skipped(args: Any) -> set[str]:
    return {s.strip() for s in args.skip.split(",") if s.strip()}


def report(args: Any, before: dict, runs: dict, eval_sizes: dict[str, int]) -> None:
    """Table of before/after per trainer, set and protocol; the reward curves; the JSON."""
    rows = []
    for run in runs.values():
        hours = run["train_seconds"] / 3600
        run["before"] = before
        run["gain_per_hour"] = {
            name: {m: ratio(r["accuracy"] - before[name][m]["accuracy"], hours) for m, r in results.items()}
            for name, results in run["after"].items()
        }
        for name, results in run["after"].items():
            for mode, result in results.items():
                b = before[name][mode]
                rows.append(
                    [
                        run["trainer"],
                        name,
                        mode,
                        run["steps"],
                        run["train_seconds"] / 60,
                        with_interval(b),
                        with_interval(result),
                        result["accuracy"] - b["accuracy"],
                        run["gain_per_hour"][name][mode],
                    ]
                )
    sizes = ", ".join(f"{n} {name}" for name, n in eval_sizes.items())
    print_table(
        [
            "trainer",
            "eval set",
            "protocol",
            "steps",
            "train min",
            "before [95% CI]",
            "after [95% CI]",
            "change",
            "change/hour",
        ],
        rows,
        title=f"Learning in {args.budget_minutes:g} minutes ({sizes} problems)",
    )
    plot_reward_curves(
        {run["trainer"]: run["curve"] for run in runs.values()},
        Path(args.plot),
        args.smoothing,
        title="Training reward under the same CPU budget",
    )
    write_json(NAME, {"before": before, "runs": runs, "eval_problems": eval_sizes, "plot": args.plot}, args)


def main() -> None:
    args = parse_args()
    names = [n.strip() for n in args.eval_dataset.split(",") if n.strip()]
    if args.parallel and args.phase is None:
        before, runs = run_parallel(args)
        report(args, before, runs, {n: next(iter(before[n].values()))["total"] for n in names})
        return
    setup_torch(args)
    initial, tokenizer = load_policy(args.tiny, seed=args.seed)
    train = Dataset.from_list(load_problems(args.train_dataset, "train", None))
    shots = Dataset.from_list(few_shot_rows(args.train_dataset))
    builder = prompt_builder(tokenizer, args.train_dataset, args.n_few_shot, seed=FEW_SHOT_SEED)
    eval_sets = {n: load_problems(n, args.eval_split, args.eval_problems) for n in names}
    sizes = {n: len(rows) for n, rows in eval_sets.items()}
    print(f"train: {args.train_dataset} ({len(train)} problems); eval: {sizes}", flush=True)
    before: dict = {}
    if args.phase in (None, "before"):
        print("evaluating the initial model (the same weights start both runs)", flush=True)
        before = evaluate(initial, tokenizer, eval_sets, args)
    del initial
    if args.phase == "before":
        write_json(NAME, {"before": before}, args)
        return
    runs = {
        key: train_and_evaluate(args, key, tokenizer, train, shots, builder, eval_sets)
        for key in TRAINERS
        if key not in skipped(args)
    }
    if args.phase == "train":
        write_json(NAME, {"runs": runs}, args)
        return
    report(args, before, runs, sizes)


if __name__ == "__main__":
    main()
