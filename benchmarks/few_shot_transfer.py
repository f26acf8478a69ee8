"""Few-shot transfer: do a trained model's gains hold under worked examples other than those it trained with?

The embedded model's accuracy depends strongly on the worked examples in its prompt, and a policy trained with one
pair of examples is evaluated elsewhere with others: `trl-stepwise evaluate` on a problem set that has only final
answers shows the bundled GSM8K train examples of any length, while the main job trains with short GSM8K train
examples (until 2026-12-03: generated level-1 examples). This
script evaluates saved models (and the untrained one) on the main-job study's proxies under each few-shot source,
greedy, calculator on, with the same limits, and prints accuracy (Wilson 95% intervals) and the change against the
first model (exact paired McNemar test). One colocated vLLM engine serves every model (weights pushed in place).

    python benchmarks/few_shot_transfer.py --models untrained=embedded main=outputs/reinforce_gsm8k_cpu
    python benchmarks/few_shot_transfer.py --quick --tiny --use_vllm false --models a=embedded b=embedded
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from common import base_parser, load_policy, mcnemar_p_value, print_table, setup_torch, with_interval, write_json
from main_job_study import PROXIES, SUMMARY_KEYS, proxy_sets, selected

from trl_stepwise.data import load_math_dataset
from trl_stepwise.engines.factory import build_engine
from trl_stepwise.engines.weights import policy_weights
from trl_stepwise.envs import StepwiseMathEnv
from trl_stepwise.evaluation import evaluate_problems
from trl_stepwise.models import load_model
from trl_stepwise.prompting import PromptBuilder, load_system_prompt, with_worked_examples
from trl_stepwise.rollout import SamplingConfig
from trl_stepwise.trainer import StepwiseReinforceConfig

NAME = "few_shot_transfer"
FLAVOUR = "gsm8k"
MAIN_JOB_MAX_EXAMPLE_CHARS = 300  # recipes/configs/reinforce_gsm8k_cpu.yaml


def few_shot_rows(source: str) -> tuple[list[dict], int | None, str]:
    """Rows of a few-shot source, its ``max_example_chars`` and a description: ``level1`` (generated level-1
    examples, the main job's source before 2026-12-03), ``main_job`` (its source now: GSM8K train examples of at most
    300 characters) and ``evaluate_default`` (what `trl-stepwise evaluate` shows for a problem set without worked
    solutions: bundled GSM8K train examples of any length)."""
    if source == "level1":
        rows = load_math_dataset("arithmetic:level=1", split="fewshot").to_list()
        return rows, None, "arithmetic:level=1, fewshot split"
    if source == "main_job":
        rows = load_math_dataset("gsm8k", split="train").to_list()
        return rows, MAIN_JOB_MAX_EXAMPLE_CHARS, f"GSM8K train, examples of <= {MAIN_JOB_MAX_EXAMPLE_CHARS} characters"
    rows, _ = with_worked_examples([], FLAVOUR)
    return list(rows), None, "trl-stepwise evaluate's fallback: bundled GSM8K train worked examples"


def few_shot_builder(source: str, tokenizer: Any, shots: int) -> PromptBuilder:
    rows, max_chars, _ = few_shot_rows(source)
    system_prompt = load_system_prompt(None, FLAVOUR)
    return PromptBuilder(
        tokenizer, rows, k=shots, system_prompt=system_prompt, flavour=FLAVOUR, seed=0, max_example_chars=max_chars
    )


SOURCES = ("level1", "main_job", "evaluate_default")


def parse_models(values: list[str]) -> dict[str, str]:
    """``NAME=PATH`` pairs in order; PATH ``embedded`` is the untrained embedded model."""
    models = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--models {value}: expected NAME=PATH (PATH 'embedded' for the untrained model)")
        models[name] = path
    return models


def evaluate_model(model: Any, tokenizer: Any, engine: Any, args: argparse.Namespace) -> dict[str, dict]:
    """Accuracy of one model on every (proxy, few-shot source) pair."""
    sets, _ = proxy_sets(args.eval_problems)
    sampling = SamplingConfig(
        temperature=0.0, max_step_tokens=args.eval_max_step_tokens, batch_size=args.eval_batch_size
    )

    def make_env() -> StepwiseMathEnv:
        return StepwiseMathEnv(
            flavour=FLAVOUR, max_episode_tokens=args.eval_max_tokens, max_steps=args.eval_max_steps, calculator=True
        )

    out: dict[str, dict] = {}
    for source in selected(args.sources, SOURCES, "--sources"):
        builder = few_shot_builder(source, tokenizer, args.shots)
        for proxy in selected(args.proxies, PROXIES, "--proxies"):
            started = time.perf_counter()
            summary, records = evaluate_problems(
                model, tokenizer, sets[proxy], builder, make_env, sampling, progress=False, engine=engine
            )
            out[f"{proxy}/{source}"] = {k: summary[k] for k in SUMMARY_KEYS} | {
                "per_level": summary.get("per_level", {}),
                "seconds": time.perf_counter() - started,
                "correct_by_problem": [int(r["correct"]) for r in records],
            }
            print(f"  {proxy} / {source}: {summary['correct']}/{summary['total']}", flush=True)
    return out


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True, help="NAME=PATH pairs; the first is the reference.")
    parser.add_argument("--sources", default=",".join(SOURCES), help="Comma list of few-shot sources.")
    parser.add_argument("--proxies", default="gsm8k_2step,arith_L1-3", help="Comma list of proxy sets.")
    parser.add_argument("--shots", type=int, default=2, help="Worked examples per prompt (the main job's 2).")
    parser.add_argument("--eval_problems", type=int, default=200, help="Problems per proxy (levels: split evenly).")
    parser.add_argument("--eval_max_step_tokens", type=int, default=40, help="Tokens per step (the main job's).")
    parser.add_argument("--eval_max_steps", type=int, default=5, help="Steps per episode (the main job's).")
    parser.add_argument("--eval_max_tokens", type=int, default=160, help="Policy tokens per episode (the main job's).")
    parser.add_argument("--eval_batch_size", type=int, default=200)
    parser.add_argument("--use_vllm", type=lambda v: v.lower() == "true", default=True, help="true/false")
    args = parser.parse_args()
    setup_torch(args)
    models = parse_models(args.models)
    if args.quick:
        args.eval_problems, args.eval_max_tokens, args.eval_max_steps = 6, 16, 2
    engine_args = StepwiseReinforceConfig(
        output_dir="/tmp/few_shot_transfer", use_cpu=True, use_vllm=args.use_vllm, report_to="none"
    )
    policy, tokenizer = load_policy(args.tiny, seed=args.seed)
    engine = build_engine(engine_args, policy, tokenizer, seed=args.seed)
    results: dict[str, dict] = {}
    for index, (name, path) in enumerate(models.items()):
        if index > 0 or path != "embedded":  # the engine starts from the untrained model
            weights = load_policy(args.tiny, seed=args.seed)[0] if path == "embedded" else load_model(path)
            policy.load_state_dict(weights.state_dict())
            with policy_weights(policy) as named:
                engine.sync_weights(named)
        print(f"evaluating {name} ({path})", flush=True)
        results[name] = evaluate_model(policy, tokenizer, engine, args)
    report(args, models, results)


def report(args: argparse.Namespace, models: dict[str, str], results: dict[str, dict]) -> None:
    """One row per (few-shot source, model), one pair of columns per proxy; then the JSON."""
    reference = next(iter(models))
    sources = selected(args.sources, SOURCES, "--sources")
    proxies = selected(args.proxies, PROXIES, "--proxies")
    headers = ["few-shot source", "model", *(h for proxy in proxies for h in (proxy, "change pts (p)"))]
    rows = []
    for source in sources:
        for name in models:
            row: list[Any] = [source, name]
            for proxy in proxies:
                result, base = results[name][f"{proxy}/{source}"], results[reference][f"{proxy}/{source}"]
                row.append(f"{result['correct']}/{result['total']} {with_interval(result)}")
                points = 100 * (result["accuracy"] - base["accuracy"])
                p = mcnemar_p_value(base["correct_by_problem"], result["correct_by_problem"])
                row.append("" if name == reference else f"{points:+.1f} ({p:.2g})")
            rows.append(row)
    print_table(headers, rows, title="Accuracy under each few-shot source (greedy, calculator on)")
    described = {source: few_shot_rows(source)[2] for source in sources}
    write_json(NAME, {"models": models, "sources": described, "shots": args.shots, "results": results}, args)


if __name__ == "__main__":
    main()
