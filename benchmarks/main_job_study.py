"""Main-job study: configurations of the main job trained for the same wall-clock budget, each evaluated on proxies of
real word problems it never saw.

Every configuration is the main job (``recipes/configs/reinforce_gsm8k_cpu.yaml`` through the recipe's own
``parse_recipe_args`` -> ``prepare_reinforce`` -> ``StepwiseReinforceTrainer``) with a few flags changed
(``VARIANTS``). Each run trains in its own subprocess (fresh memory, its own generation engine) until the first step
end past ``--budget_minutes``, then evaluates greedily on the same proxies as the untrained model was: GSM8K test
problems whose reference solution has at most 2 calculations, generated levels 1-3 on the evaluation seeds, and the
first GSM8K test problems, each 2-shot (the main job's few-shot source), calculator on. One table (accuracy with
Wilson 95% intervals, change in points with an exact paired test, steps, episodes, seconds per step, peak RSS), the
JSON and the reward curves go to ``benchmarks/results/``.

    python benchmarks/main_job_study.py                                  # every configuration, 6 min each
    python benchmarks/main_job_study.py --configs base,fp32,lora --budget_minutes 10
    python benchmarks/main_job_study.py --quick --tiny --use_vllm false --configs base,fp32   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    GIB,
    ROOT,
    base_parser,
    env_factory,
    load_policy,
    mcnemar_p_value,
    peak_rss_bytes,
    print_table,
    result_path,
    setup_torch,
    tiny_model,
    with_interval,
    write_json,
)
from main_job_variants import VARIANTS
from training_budget import BudgetCallback, CurveCallback, episodes_played, plot_reward_curves, run_on_cores
from trl import ModelConfig, get_peft_config

from trl_stepwise.arithmetic import SPLIT_SEED_RANGES, split_of_question
from trl_stepwise.data import EASY_GSM8K_MAX_CALCULATIONS, load_math_dataset
from trl_stepwise.engines.factory import build_engine
from trl_stepwise.evaluation import evaluate_problems
from trl_stepwise.models import load_tokenizer
from trl_stepwise.prompting import AlternatingExamples, PromptBuilder, load_system_prompt
from trl_stepwise.recipe import PreparedRun, ReinforceScriptArguments, build_reinforce_trainer, prepare_reinforce
from trl_stepwise.rollout import SamplingConfig
from trl_stepwise.trainer import StepwiseReinforceConfig
from trl_stepwise.usage import UsageError, one_line, parse_recipe_args

NAME = "main_job_study"
MAIN_CONFIG = ROOT / "recipes" / "configs" / "reinforce_gsm8k_cpu.yaml"
EVAL_SHOTS = 2  # every model, trained with any n_few_shot, is evaluated with the main job's 2 worked examples
UNBOUNDED_STEPS = 1_000_000  # the budget callback stops training


# ---------------------------------------------------------------------------------------------------------------------
# Configurations


# Whatever the configuration: the study's budget, no checkpoints, no evaluations inside the trainer, quiet logs.
STUDY_SETTINGS: dict[str, Any] = {
    "save_strategy": "no",
    "eval_on_start": False,
    "eval_strategy": "no",
    "eval_at_end": False,
    "report_to": "none",
    "log_rollouts": False,
    "num_completions_to_print": 0,
    "logging_steps": 1,
    "disable_tqdm": True,
}
QUICK_TRAINING: dict[str, Any] = {"max_step_tokens": 8, "max_episode_tokens": 16, "max_episode_steps": 2}


def _flag_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def recipe_argv(overrides: dict[str, Any]) -> list[str]:
    """The recipe's command line for the main-job YAML with ``overrides`` (lists become several values)."""
    argv = ["--config", str(MAIN_CONFIG)]
    for key, value in overrides.items():
        values = value if isinstance(value, list | tuple) else [value]
        argv += [f"--{key}", *(_flag_value(v) for v in values)]
    return argv


def run_overrides(name: str, args: argparse.Namespace, output_dir: str) -> dict[str, Any]:
    """Flags of run ``name``: no step limit (the budget stops it), the variant's flags, the study's fixed settings,
    then ``--max_steps`` and the ``--quick`` sizes, which win."""
    overrides: dict[str, Any] = {"max_steps": UNBOUNDED_STEPS, **VARIANTS[name].overrides}
    overrides.update(STUDY_SETTINGS, output_dir=output_dir, use_vllm=args.use_vllm)
    if args.max_steps:
        overrides["max_steps"] = args.max_steps
    if args.quick:
        overrides.update(QUICK_TRAINING)
    return overrides


def check_run(name: str, args: argparse.Namespace, output_dir: str) -> tuple[Any, Any, Any, PreparedRun]:
    """Parse run ``name`` as the recipe does and run every input check it runs before a model loads (flags, YAML
    keys, config ranges, data sets, curriculum stages, LoRA settings); raises ``UsageError``/``ValueError``."""
    if name not in VARIANTS:
        raise UsageError(f"--configs {name}: not a configuration of this study; choose from {', '.join(VARIANTS)}.")
    script_args, training_args, model_args = parse_recipe_args(
        (ReinforceScriptArguments, StepwiseReinforceConfig, ModelConfig),
        recipe_argv(run_overrides(name, args, output_dir)),
        prog=f"{NAME} {name}",
    )
    prepared = prepare_reinforce(script_args, training_args, model_args)
    get_peft_config(model_args)
    return script_args, training_args, model_args, prepared


# ---------------------------------------------------------------------------------------------------------------------
# Proxies of real word problems, all held out from training

PROXIES = ("gsm8k_2step", "arith_L1-3", "gsm8k")


def proxy_sets(n: int) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """The proxy problem sets (first ``n`` of each; generated levels: ``n // 3`` per level) and a description each."""
    two_step = load_math_dataset("gsm8k_easy", split="test")
    per_level = max(1, n // 3)
    sets = {
        "gsm8k_2step": [dict(r) for r in two_step.select(range(min(n, len(two_step))))],
        "arith_L1-3": [dict(r) for r in load_math_dataset(f"arithmetic:level=1-3,n={3 * per_level}", split="test")],
        "gsm8k": [dict(r) for r in load_math_dataset("gsm8k", split="test", limit=n)],
    }
    descriptions = {
        "gsm8k_2step": f"first {len(sets['gsm8k_2step'])} of the {len(two_step)} GSM8K test problems whose reference "
        f"solution has <= {EASY_GSM8K_MAX_CALCULATIONS} calculations (<<..>>)",
        "arith_L1-3": f"{per_level} generated problems per level 1, 2, 3 (test split: evaluation seeds "
        f"{SPLIT_SEED_RANGES['test'][0]}+), interleaved",
        "gsm8k": f"first {len(sets['gsm8k'])} GSM8K test problems",
    }
    return sets, descriptions


def training_sets(prepared: PreparedRun) -> list[Any]:
    """Every problem set a run can train on or take worked examples from, except generated stages (held out by
    seed)."""
    sets = [prepared.train, *AlternatingExamples.sources_of(prepared.few_shot)]
    for stage in prepared.curriculum.stages if prepared.curriculum is not None else []:
        if not stage.source.startswith("arithmetic"):
            sets.append(prepared.curriculum.pool(stage.source))
    return sets


def check_held_out(proxies: dict[str, list[dict]], runs: list[PreparedRun]) -> None:
    """Nothing evaluated is trained on: generated proxies come from the test seeds (whose question texts hash into
    the test split, so no training draw can equal one), GSM8K proxies from GSM8K test, which no run trains on; and no
    proxy question appears among any run's training or few-shot questions."""
    lo, hi = SPLIT_SEED_RANGES["test"]
    for row in proxies.get("arith_L1-3", []):
        if not (lo <= row["seed"] < hi and split_of_question(row["question"]) == "test"):
            raise RuntimeError(f"generated proxy problem {row['id']} is not from the evaluation seeds")
    unique = {id(problems): problems for run in runs for problems in training_sets(run)}
    seen = {question for problems in unique.values() for question in problems["question"]}
    leaked = {q for rows in proxies.values() for q in (r["question"] for r in rows)} & seen
    if leaked:
        raise RuntimeError(f"{len(leaked)} proxy problems are also training problems, e.g. {next(iter(leaked))!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation

SUMMARY_KEYS = ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "correct", "total", "unparsable", "mean_tokens")


def eval_prompt_builder(tokenizer: Any, training_args: Any, prepared: PreparedRun) -> PromptBuilder:
    """The main job's evaluation prompt (its system prompt, few-shot source and seed) with ``EVAL_SHOTS`` examples."""
    flavour = training_args.env_flavour
    return PromptBuilder(
        tokenizer,
        prepared.few_shot if isinstance(prepared.few_shot, AlternatingExamples) else list(prepared.few_shot),
        k=EVAL_SHOTS,
        system_prompt=load_system_prompt(training_args.system_prompt, flavour),
        flavour=flavour,
        seed=training_args.few_shot_seed,
        max_example_chars=training_args.max_example_chars,
    )


def main_job_prompt(tokenizer: Any, args: argparse.Namespace) -> tuple[PromptBuilder, str]:
    """The main job's evaluation prompt builder and its environment flavour (the ``base`` configuration's)."""
    with tempfile.TemporaryDirectory() as scratch:
        _, training_args, _, base = check_run("base", args, scratch)
    return eval_prompt_builder(tokenizer, training_args, base), training_args.env_flavour


def evaluate_with_prompt(
    model: Any, tokenizer: Any, engine: Any, builder: PromptBuilder, flavour: str, args: argparse.Namespace
) -> dict[str, dict]:
    """Greedy accuracy (Wilson 95% CIs) and per-problem outcomes on each proxy of ``--proxies`` with ``builder``'s
    prompt, ``--eval_max_*`` limits, calculator on."""
    make_env = env_factory(flavour, args.eval_max_tokens, args.eval_max_steps, calculator=True)
    sampling = SamplingConfig(
        temperature=0.0, max_step_tokens=args.eval_max_step_tokens, batch_size=args.eval_batch_size
    )
    sets, _ = proxy_sets(args.eval_problems)
    out: dict[str, dict] = {}
    for name in selected(args.proxies, PROXIES, "--proxies"):
        started = time.perf_counter()
        summary, records = evaluate_problems(
            model, tokenizer, sets[name], builder, make_env, sampling, progress=False, engine=engine
        )
        out[name] = {k: summary[k] for k in SUMMARY_KEYS} | {
            "per_level": summary.get("per_level", {}),
            "seconds": time.perf_counter() - started,
            "correct_by_problem": [int(r["correct"]) for r in records],
        }
        print(f"  eval {name}: {summary['correct']}/{summary['total']} = {summary['accuracy']:.3f}", flush=True)
    return out


def evaluate_proxies(model: Any, tokenizer: Any, engine: Any, args: argparse.Namespace) -> dict[str, dict]:
    """The same protocol for every model of the study: the main job's prompt (``main_job_prompt``)."""
    builder, flavour = main_job_prompt(tokenizer, args)
    return evaluate_with_prompt(model, tokenizer, engine, builder, flavour, args)


# ---------------------------------------------------------------------------------------------------------------------
# Phases (each in its own process)


def before_phase(args: argparse.Namespace) -> dict[str, Any]:
    """The untrained model (the weights every run starts from) on the proxies, on the engine the runs use."""
    with tempfile.TemporaryDirectory() as scratch:
        _, training_args, _, _ = check_run("base", args, scratch)
    model, tokenizer = load_policy(args.tiny, seed=args.seed)
    engine = build_engine(training_args, model, tokenizer, seed=training_args.seed)
    print("evaluating the initial model", flush=True)
    return {"before": evaluate_proxies(model, tokenizer, engine, args), "peak_rss_bytes": peak_rss_bytes()}


def train_phase(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Train configuration ``name`` for the budget, then evaluate it with the trainer's own engine."""
    with tempfile.TemporaryDirectory() as output_dir:
        _, training_args, model_args, prepared = check_run(name, args, output_dir)
        tokenizer = load_tokenizer()
        model = tiny_model(tokenizer, seed=args.seed) if args.tiny else None
        budget = BudgetCallback(args.budget_minutes * 60)
        curve = CurveCallback(budget)
        trainer = build_reinforce_trainer(
            training_args, model_args, prepared, model=model, processing_class=tokenizer, callbacks=[budget, curve]
        )
        print(f"training {name} for {args.budget_minutes:g} min: {VARIANTS[name].why}", flush=True)
        trainer.train()
        train_peak = peak_rss_bytes()
        print(f"evaluating {name} after {budget.steps} steps", flush=True)
        policy = trainer.accelerator.unwrap_model(trainer.model)
        after = evaluate_proxies(policy, tokenizer, trainer.generation_engine(), args)
    curriculum = trainer.curriculum
    episodes_per_step = training_args.generation_batch_size * training_args.world_size
    return {
        "config": name,
        "overrides": VARIANTS[name].overrides,
        "why": VARIANTS[name].why,
        "steps": budget.steps,
        "episodes_per_step": episodes_per_step,
        "episodes": budget.steps * episodes_per_step,
        "episodes_played": episodes_played(
            trainer.state.log_history, budget.steps, training_args.num_iterations, episodes_per_step
        ),
        "train_seconds": budget.elapsed,
        "train_cpu_seconds": budget.cpu_seconds,
        "seconds_per_step": budget.elapsed / budget.steps if budget.steps else float("nan"),
        "curriculum_stage": None if curriculum is None else curriculum.stage + 1,
        "curriculum_stages": None if curriculum is None else len(curriculum.stages),
        "train_peak_rss_bytes": train_peak,
        "peak_rss_bytes": peak_rss_bytes(),
        "after": after,
        "curve": curve.points,
    }


# ---------------------------------------------------------------------------------------------------------------------
# The study: before once, then every configuration, one at a time or side by side


def selected(value: str, known: tuple[str, ...] | dict, flag: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise UsageError(f"{flag} {value}: choose from {', '.join(known)}")
    return names


def child_command(args: argparse.Namespace, *extra: str) -> list[str]:
    """This script with the parent's flags plus ``extra`` (a phase); one thread per process when pinned."""
    command = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], *extra]
    return [*command, "--threads", "1"] if args.parallel else command


def run_study(args: argparse.Namespace, names: list[str]) -> tuple[dict, dict, dict[str, int]]:
    """Run the before phase and every configuration in subprocesses; returns (before, runs, failed exit codes)."""
    parts = Path(tempfile.mkdtemp(prefix=f"{NAME}_"))
    proxies = selected(args.proxies, PROXIES, "--proxies")
    groups = {p: p for p in proxies} if args.parallel else {"all": ",".join(proxies)}
    before_commands = [
        child_command(args, "--phase", "before", "--proxies", group, "--output", str(parts / f"before-{key}.json"))
        for key, group in groups.items()
    ]
    train_commands = {
        n: child_command(args, "--phase", "train", "--config_name", n, "--output", str(parts / f"train-{n}.json"))
        for n in names
    }
    if args.parallel:
        run_on_cores(before_commands)
        cores = len(os.sched_getaffinity(0))
        codes: dict[str, int] = {}
        for start in range(0, len(names), cores):
            wave = names[start : start + cores]
            codes.update(zip(wave, run_on_cores([train_commands[n] for n in wave], check=False), strict=True))
    else:
        subprocess.run(before_commands[0], check=True)
        codes = {n: subprocess.run(command).returncode for n, command in train_commands.items()}
    before: dict[str, dict] = {}
    for path in sorted(parts.glob("before-*.json")):
        before.update(json.loads(path.read_text())["before"])
    runs = {n: json.loads((parts / f"train-{n}.json").read_text())["run"] for n in names if codes[n] == 0}
    return before, runs, {n: code for n, code in codes.items() if code != 0}


def change_cell(before: dict, after: dict) -> str:
    """Change in points with the exact paired (McNemar) p-value over the same problems."""
    points = 100 * (after["accuracy"] - before["accuracy"])
    p = mcnemar_p_value(before["correct_by_problem"], after["correct_by_problem"])
    return f"{points:+.1f} (p {p:.2g})"


def report(
    args: argparse.Namespace, names: list[str], before: dict, runs: dict, failed: dict[str, int], sizes: dict
) -> None:
    """The table, the reward curves and the JSON."""
    proxies = [p for p in PROXIES if p in before]
    headers = ["config", "steps", "episodes trained", "played", "s/step", "stage", "peak RSS GiB"]
    for proxy in proxies:
        headers += [f"{proxy} [95% CI]", "change pts (p)"]
    rows = [["before (untrained)", *["-"] * 6, *[c for p in proxies for c in (with_interval(before[p]), "")]]]
    for name in names:
        if name in failed:
            rows.append([name, f"failed (exit {failed[name]})", *["-"] * (len(headers) - 2)])
            continue
        run = runs[name]
        for proxy in proxies:
            run["after"][proxy]["change"] = run["after"][proxy]["accuracy"] - before[proxy]["accuracy"]
            run["after"][proxy]["paired_p_value"] = mcnemar_p_value(
                before[proxy]["correct_by_problem"], run["after"][proxy]["correct_by_problem"]
            )
        stage = f"{run['curriculum_stage']}/{run['curriculum_stages']}" if run["curriculum_stage"] else "-"
        rows.append(
            [
                name,
                run["steps"],
                run["episodes"],
                run.get("episodes_played", "-"),
                run["seconds_per_step"],
                stage,
                run["peak_rss_bytes"] / GIB,
                *[
                    c
                    for p in proxies
                    for c in (with_interval(run["after"][p]), change_cell(before[p], run["after"][p]))
                ],
            ]
        )
    counts = ", ".join(f"{p} {before[p]['total']}" for p in proxies)
    print_table(headers, rows, title=f"Main job, {args.budget_minutes:g} min of training per configuration ({counts})")
    for proxy in proxies:
        print(f"  {proxy}: {sizes[proxy]}")
    plot_reward_curves(
        {name: run["curve"] for name, run in runs.items()},
        Path(args.plot),
        args.smoothing,
        title=f"Main-job configurations, {args.budget_minutes:g} min each",
    )
    protocol = {
        "shots": EVAL_SHOTS,
        "few_shot_source": "the main job's (few_shot_dataset_name of the YAML)",
        "greedy": True,
        "calculator": True,
        "max_step_tokens": args.eval_max_step_tokens,
        "max_steps": args.eval_max_steps,
        "max_episode_tokens": args.eval_max_tokens,
        "engine": "vllm (colocated)" if args.use_vllm else "transformers",
    }
    data = {
        "main_config": str(MAIN_CONFIG.relative_to(ROOT)),
        "configs": {n: {"overrides": VARIANTS[n].overrides, "why": VARIANTS[n].why} for n in names},
        "proxies": sizes,
        "eval_protocol": protocol,
        "before": before,
        "runs": runs,
        "failed": failed,
        "plot": args.plot,
    }
    write_json(NAME, data, args)


# ---------------------------------------------------------------------------------------------------------------------


def parse_bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(VARIANTS), help="Comma list of configurations to train.")
    parser.add_argument("--budget_minutes", type=float, default=6.0, help="Wall-clock training budget per run.")
    parser.add_argument(
        "--max_steps", type=int, default=None, help="Also stop every run at this many steps (default: budget only)."
    )
    parser.add_argument(
        "--use_vllm", type=parse_bool, default=True, help="Generate with colocated vLLM (else transformers)."
    )
    parser.add_argument("--proxies", default=",".join(PROXIES), help="Comma list of proxy sets to evaluate.")
    parser.add_argument("--eval_problems", type=int, default=200, help="Problems per proxy (levels: split evenly).")
    parser.add_argument("--eval_max_step_tokens", type=int, default=40, help="Evaluation: tokens per step.")
    parser.add_argument("--eval_max_steps", type=int, default=8, help="Evaluation: steps per episode.")
    parser.add_argument("--eval_max_tokens", type=int, default=160, help="Evaluation: policy tokens per episode.")
    parser.add_argument("--eval_batch_size", type=int, default=64)
    parser.add_argument("--smoothing", type=int, default=3, help="Steps in the rolling mean of the plot.")
    parser.add_argument("--plot", default=None, help="PNG path (default: benchmarks/results/main_job_curves.png).")
    parser.add_argument(
        "--parallel",
        action="store_true",
        help="Run as many configurations at a time as there are cores, each pinned to one core with one thread "
        "(the initial evaluation is split by proxy the same way), instead of one at a time on all cores.",
    )
    parser.add_argument("--phase", choices=("before", "train"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--config_name", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.plot = args.plot or str(result_path("main_job_curves", args, suffix=".png"))
    if args.quick:
        args.budget_minutes, args.eval_problems, args.eval_batch_size = 0.05, 6, 8
        args.eval_max_step_tokens, args.eval_max_steps, args.eval_max_tokens = 8, 2, 16
    return args


def main() -> int:
    args = parse_args()
    setup_torch(args)
    try:
        if args.phase == "before":
            write_json(NAME, before_phase(args), args)
            return 0
        if args.phase == "train":
            write_json(NAME, {"run": train_phase(args, args.config_name)}, args)
            return 0
        names = selected(args.configs, VARIANTS, "--configs")
        with tempfile.TemporaryDirectory() as scratch:  # every input mistake now, not an hour in
            prepared = [check_run(n, args, scratch)[3] for n in dict.fromkeys(["base", *names])]
        proxies, sizes = proxy_sets(args.eval_problems)
        check_held_out(proxies, prepared)
    except (UsageError, ValueError, FileNotFoundError) as err:
        print(f"{NAME}: error: {one_line(err)}", file=sys.stderr)
        return 2
    print(
        f"{len(names)} configurations, {args.budget_minutes:g} min each; proxies held out from training:", flush=True
    )
    for name, description in sizes.items():
        print(f"  {name}: {description}", flush=True)
    before, runs, failed = run_study(args, names)
    report(args, names, before, runs, failed, sizes)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
