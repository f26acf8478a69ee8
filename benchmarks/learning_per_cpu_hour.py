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

import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    base_parser,
    env_factory,
    few_shot_rows,
    load_policy,
    load_problems,
    print_table,
    prompt_builder,
    ratio,
    result_path,
    setup_torch,
    write_json,
)
from datasets import Dataset
from transformers import TrainerCallback

from trl_stepwise.data import dataset_flavour
from trl_stepwise.evaluation import evaluate_problems
from trl_stepwise.prompting import PromptBuilder
from trl_stepwise.rewards import correctness_reward
from trl_stepwise.rollout import SamplingConfig
from trl_stepwise.trainer import StepwiseReinforceConfig, StepwiseReinforceTrainer

NAME = "learning_per_cpu_hour"
FEW_SHOT_SEED = 0  # StepwiseReinforceConfig.few_shot_seed's default: both trainers see the same shots


class BudgetCallback(TrainerCallback):
    """Stop training at the first step end after ``seconds`` of wall-clock time since ``on_train_begin``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = 0.0
        self.cpu_started = 0.0
        self.elapsed = 0.0
        self.cpu_seconds = 0.0
        self.steps = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.cpu_started = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        self.elapsed = time.perf_counter() - self.started
        self.cpu_seconds = time.process_time() - self.cpu_started
        self.steps = state.global_step
        if self.elapsed >= self.seconds:
            control.should_training_stop = True
        return control


class CurveCallback(TrainerCallback):
    """Record every logged reward (and accuracy, where logged) with the wall-clock minutes since training began."""

    def __init__(self, budget: BudgetCallback) -> None:
        self.budget = budget
        self.points: list[dict[str, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:
            point = {"step": state.global_step, "minutes": (time.perf_counter() - self.budget.started) / 60}
            point.update({k: float(logs[k]) for k in ("reward", "accuracy", "loss") if k in logs})
            self.points.append(point)


# ---------------------------------------------------------------------------------------------------------------------


def evaluate(model: Any, tokenizer: Any, rows: list[dict], builder: PromptBuilder, args: Any) -> dict[str, dict]:
    """Greedy accuracy with Wilson 95% CIs in each protocol of ``--eval_modes``."""
    flavour = "math" if dataset_flavour(args.eval_dataset) == "math" else "gsm8k"
    out = {}
    for mode in args.eval_modes.split(","):
        direct = mode == "direct"
        make_env = env_factory(flavour, args.eval_max_tokens, max_steps=1 if direct else None, calculator=not direct)
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
        out[mode] = {k: summary[k] for k in keys} | {"seconds": time.perf_counter() - started}
        print(f"  eval {mode}: {summary['correct']}/{summary['total']} = {summary['accuracy']:.3f}", flush=True)
    return out


def common_settings(args: Any, output_dir: str) -> dict[str, Any]:
    """Trainer arguments both configs share, under the same names."""
    return {
        "output_dir": output_dir,
        "use_cpu": True,
        "bf16": False,
        "seed": args.seed,
        "max_steps": 1_000_000,  # the budget callback stops training
        "per_device_train_batch_size": args.episodes_per_step,
        "gradient_accumulation_steps": 1,
        "num_generations": args.num_generations,
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "max_grad_norm": 1.0,
        "temperature": args.temperature,
        "top_p": 1.0,
        "top_k": 0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
    }


def train_stepwise(args: Any, tokenizer: Any, train: Dataset, shots: Dataset, callbacks: list, output_dir: str) -> Any:
    model, _ = load_policy(args.tiny, seed=args.seed)
    config = StepwiseReinforceConfig(
        **common_settings(args, output_dir),
        kl_coef=args.kl_coef,
        ref_sync_steps=0,  # GRPO's default reference is never refreshed either
        algorithm="reinforce_stable",
        n_few_shot=args.n_few_shot,
        few_shot_seed=FEW_SHOT_SEED,
        env_flavour=dataset_flavour(args.train_dataset),
        max_episode_steps=args.max_episode_steps,
        max_step_tokens=args.max_step_tokens,
        max_episode_tokens=args.max_episode_tokens,
        calculator=True,
        rollout_batch_size=args.rollout_batch_size,
        log_rollouts=False,
        num_completions_to_print=0,
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
    name = getattr(model.config, "_name_or_path", "")
    if args.kl_coef > 0 and not (name and Path(name).is_dir()):
        # GRPOTrainer loads its reference model from the policy's path: give the tiny random model one.
        saved = Path(output_dir) / "initial-model"
        model.save_pretrained(saved)
        model.config._name_or_path = str(saved)
    config = GRPOConfig(
        **common_settings(args, output_dir),
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


def plot_curves(runs: dict[str, list[dict[str, float]]], path: Path, window: int) -> None:
    """Reward against wall-clock minutes, one line per trainer (faint: per step; solid: rolling mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (label, points), color in zip(runs.items(), ("tab:blue", "tab:orange"), strict=False):
        if not points:
            continue
        minutes = [p["minutes"] for p in points]
        rewards = [p["reward"] for p in points]
        smooth = [
            sum(rewards[max(0, i - window + 1) : i + 1]) / len(rewards[max(0, i - window + 1) : i + 1])
            for i in range(len(rewards))
        ]
        ax.plot(minutes, rewards, color=color, alpha=0.25, linewidth=1)
        ax.plot(minutes, smooth, color=color, linewidth=2, label=f"{label} (mean of {window} steps)")
    ax.set_xlabel("wall-clock minutes of training")
    ax.set_ylabel("mean reward (correctness) per step")
    ax.set_title("Training reward under the same CPU budget")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def parse_args() -> Any:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--budget_minutes", type=float, default=20.0, help="Wall-clock training budget per trainer.")
    parser.add_argument("--train_dataset", default="arithmetic:level=1")
    parser.add_argument("--eval_dataset", default="gsm8k")
    parser.add_argument("--eval_split", default="test")
    parser.add_argument("--eval_problems", type=int, default=200)
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
    args = parser.parse_args()
    args.plot = args.plot or str(result_path("learning_curves", args, suffix=".png"))
    if args.quick:
        args.budget_minutes, args.eval_problems, args.eval_max_tokens, args.eval_batch_size = 0.05, 4, 16, 4
        args.episodes_per_step, args.num_generations, args.n_few_shot = 4, 2, 1
        args.max_episode_tokens, args.max_step_tokens, args.max_episode_steps = 16, 8, 2
    return args


def main() -> None:
    args = parse_args()
    setup_torch(args)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    initial, tokenizer = load_policy(args.tiny, seed=args.seed)
    train = Dataset.from_list(load_problems(args.train_dataset, "train", None))
    shots = Dataset.from_list(few_shot_rows(args.train_dataset))
    builder = prompt_builder(tokenizer, args.train_dataset, args.n_few_shot, seed=FEW_SHOT_SEED)
    eval_rows = load_problems(args.eval_dataset, args.eval_split, args.eval_problems)
    print(f"train: {args.train_dataset} ({len(train)} problems); eval: {len(eval_rows)} {args.eval_dataset} problems")

    print("evaluating the initial model (the same weights start both runs)", flush=True)
    before = evaluate(initial, tokenizer, eval_rows, builder, args)
    del initial
    runs: dict[str, dict[str, Any]] = {}
    for label, key in (("StepwiseReinforceTrainer", "stepwise"), ("TRL GRPOTrainer", "grpo")):
        if key in skip:
            continue
        budget = BudgetCallback(args.budget_minutes * 60)
        curve = CurveCallback(budget)
        print(f"training {label} for {args.budget_minutes} min", flush=True)
        with tempfile.TemporaryDirectory() as output_dir:
            if key == "stepwise":
                trainer = train_stepwise(args, tokenizer, train, shots, [budget, curve], output_dir)
            else:
                trainer = train_grpo(args, tokenizer, train, builder, [budget, curve], output_dir)
            model = trainer.accelerator.unwrap_model(trainer.model)
            print(f"evaluating {label} after {budget.steps} steps", flush=True)
            after = evaluate(model, tokenizer, eval_rows, builder, args)
        hours = budget.elapsed / 3600
        runs[key] = {
            "trainer": label,
            "steps": budget.steps,
            "episodes": budget.steps * args.episodes_per_step,
            "train_seconds": budget.elapsed,
            "train_cpu_seconds": budget.cpu_seconds,
            "before": before,
            "after": after,
            "gain_per_hour": {m: ratio(after[m]["accuracy"] - before[m]["accuracy"], hours) for m in after},
            "curve": curve.points,
        }
        del trainer, model

    rows = []
    for run in runs.values():
        for mode, result in run["after"].items():
            b = run["before"][mode]
            rows.append(
                [
                    run["trainer"],
                    mode,
                    run["steps"],
                    run["train_seconds"] / 60,
                    f"{b['accuracy']:.3f} [{b['accuracy_ci_low']:.3f}, {b['accuracy_ci_high']:.3f}]",
                    f"{result['accuracy']:.3f} [{result['accuracy_ci_low']:.3f}, {result['accuracy_ci_high']:.3f}]",
                    result["accuracy"] - b["accuracy"],
                    run["gain_per_hour"][mode],
                ]
            )
    print_table(
        [
            "trainer",
            "eval protocol",
            "steps",
            "train min",
            "before [95% CI]",
            "after [95% CI]",
            "change",
            "change/hour",
        ],
        rows,
        title=f"Learning in {args.budget_minutes:g} minutes ({len(eval_rows)} {args.eval_dataset} problems)",
    )
    plot_curves({run["trainer"]: run["curve"] for run in runs.values()}, Path(args.plot), args.smoothing)
    write_json(NAME, {"before": before, "runs": runs, "plot": args.plot}, args)


if __name__ == "__main__":
    main()
