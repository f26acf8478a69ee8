"""Few-shot transfer: do a trained model's gains hold under worked examples other than those it trained with?

The embedded model's accuracy depends strongly on the worked examples in its prompt, and a policy trained with one
pair of examples is evaluated elsewhere with others: `trl-stepwise evaluate` on a problem set that has only final
answers shows short GSM8K train examples alternating with generated level-1 ones (until 2026-12-07: GSM8K train
examples of any length), and the main job trains with that same pair (until 2026-12-07: short GSM8K train examples;
until 2026-12-03: generated level-1 examples). This
script evaluates saved models (and the untrained one) on the main-job study's proxies under each few-shot source,
greedy, calculator on, with the same limits, and prints accuracy (Wilson 95% intervals) and the change against the
first model (exact paired McNemar test). One colocated vLLM engine serves every model (weights pushed in place).

    python benchmarks/few_shot_transfer.py --models untrained=embedded main=outputs/reinforce_gsm8k_cpu
    python benchmarks/few_shot_transfer.py --quick --tiny --use_vllm false --models a=embedded b=embedded
"""

from __future__ import annotations

import argparse
from typing import Any

from common import base_parser, load_policy, mcnemar_p_value, print_table, setup_torch, with_interval, write_json
from main_job_study import MAIN_CONFIG, PROXIES, evaluate_with_prompt, main_job_prompt, selected

from trl_stepwise.data import load_math_dataset
from trl_stepwise.engines.factory import build_engine
from trl_stepwise.engines.weights import policy_weights
from trl_stepwise.models import load_model
from trl_stepwise.prompting import PromptBuilder, load_system_prompt, with_worked_examples
from trl_stepwise.trainer import StepwiseReinforceConfig

NAME = "few_shot_transfer"
FLAVOUR = "gsm8k"


def few_shot_builder(source: str, tokenizer: Any, args: argparse.Namespace) -> tuple[PromptBuilder, str]:
    """The prompt builder of a few-shot source (2 examples, or ``--shots``, seed 0) and a description: ``level1``
    (generated level-1 examples, the main job's source before 2026-12-03), ``main_job`` (the main job's evaluation
    prompt, from its config: since 2026-12-07 the same pair as ``evaluate_default``), ``gsm8k_short`` (GSM8K train
    examples of at most 300 characters: the main job's from 2026-12-03 to 2026-12-07), ``gsm8k_any_length`` (bundled
    GSM8K examples of any length: `trl-stepwise evaluate`'s fallback until 2026-12-07) and ``evaluate_default`` (what
    `trl-stepwise evaluate` shows for a problem set without worked solutions now: short GSM8K examples alternating
    with generated level-1 ones)."""
    if source == "main_job":
        builder, _ = main_job_prompt(tokenizer, args)
        return builder, f"the main job's prompt ({MAIN_CONFIG.name}), max_example_chars {builder.max_example_chars}"
    if source == "level1":
        rows, described = load_math_dataset("arithmetic:level=1", split="fewshot").to_list(), "arithmetic:level=1"
    elif source == "gsm8k_short":
        rows = load_math_dataset("gsm8k", split="train").to_list()
        builder = PromptBuilder(
            tokenizer, rows, k=args.shots, system_prompt=load_system_prompt(None, FLAVOUR), max_example_chars=300
        )
        return builder, "GSM8K train examples of at most 300 characters (the main job's until 2026-12-07)"
    elif source == "gsm8k_any_length":
        rows = load_math_dataset("gsm8k", split="train", limit=256).to_list()
        described = "GSM8K train examples of any length (trl-stepwise evaluate's fallback until 2026-12-07)"
    else:
        rows, described = with_worked_examples([], FLAVOUR)[0], "trl-stepwise evaluate's fallback worked examples"
    system_prompt = load_system_prompt(None, FLAVOUR)
    return PromptBuilder(tokenizer, rows, k=args.shots, system_prompt=system_prompt, flavour=FLAVOUR), described


SOURCES = ("level1", "main_job", "gsm8k_short", "gsm8k_any_length", "evaluate_default")


def parse_models(values: list[str]) -> dict[str, str]:
    """``NAME=PATH`` pairs in order; PATH ``embedded`` is the untrained embedded model."""
    models = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--models {value}: expected NAME=PATH (PATH 'embedded' for the untrained model)")
        models[name] = path
    return models


def evaluate_model(
    model: Any, tokenizer: Any, engine: Any, prompts: dict[str, PromptBuilder], args: argparse.Namespace
) -> dict[str, dict]:
    """Accuracy of one model on every (proxy, few-shot source) pair, keyed ``proxy/source``."""
    out: dict[str, dict] = {}
    for source, builder in prompts.items():
        for proxy, result in evaluate_with_prompt(model, tokenizer, engine, builder, FLAVOUR, args).items():
            out[f"{proxy}/{source}"] = result
    return out


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True, help="NAME=PATH pairs; the first is the reference.")
    parser.add_argument("--sources", default=",".join(SOURCES), help="Comma list of few-shot sources.")
    parser.add_argument("--proxies", default="gsm8k_2step,arith_L1-3", help="Comma list of proxy sets.")
    parser.add_argument(
        "--shots", type=int, default=2, help="Worked examples per prompt (main_job: always the study's 2)."
    )
    parser.add_argument("--eval_problems", type=int, default=200, help="Problems per proxy (levels: split evenly).")
    parser.add_argument("--eval_max_step_tokens", type=int, default=40, help="Tokens per step (the main job's).")
    parser.add_argument("--eval_max_steps", type=int, default=5, help="Steps per episode (the main job's).")
    parser.add_argument("--eval_max_tokens", type=int, default=160, help="Policy tokens per episode (the main job's).")
    parser.add_argument("--eval_batch_size", type=int, default=200)
    parser.add_argument("--use_vllm", type=lambda v: v.lower() == "true", default=True, help="true/false")
    parser.set_defaults(max_steps=None)  # the main-job study's settings, read when it builds the main job's prompt
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
    built = {
        source: few_shot_builder(source, tokenizer, args) for source in selected(args.sources, SOURCES, "--sources")
    }
    prompts = {source: builder for source, (builder, _) in built.items()}
    results: dict[str, dict] = {}
    for index, (name, path) in enumerate(models.items()):
        if index > 0 or path != "embedded":  # the engine starts from the untrained model
            weights = load_policy(args.tiny, seed=args.seed)[0] if path == "embedded" else load_model(path)
            policy.load_state_dict(weights.state_dict())
            with policy_weights(policy) as named:
                engine.sync_weights(named)
        print(f"evaluating {name} ({path})", flush=True)
        results[name] = evaluate_model(policy, tokenizer, engine, prompts, args)
    report(args, models, results, {source: described for source, (_, described) in built.items()})


def report(
    args: argparse.Namespace, models: dict[str, str], results: dict[str, dict], described: dict[str, str]
) -> None:
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
    write_json(NAME, {"models": models, "sources": described, "shots": args.shots, "results": results}, args)


if __name__ == "__main__":
    main()
