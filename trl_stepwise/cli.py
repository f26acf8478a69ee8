"""The ``trl-stepwise`` command line: one sub-command per job (``evaluate`` now), each with its own arguments class.

Every sub-command's flags come from a dataclass through ``HfArgumentParser``, so ``--help`` documents every flag and
the same dataclass can be filled from Python. Input mistakes (a wrong field name, a missing file) end with a one-line
message and exit code 2, like argparse's own usage errors, instead of a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from trl_stepwise.engines.config import GenerationEngineArguments, inert_flags
from trl_stepwise.quiet import quiet_data_progress_bars, quiet_run_logs
from trl_stepwise.usage import USAGE_ERROR, OneLineErrorParser, OneLineTopLevelParser, UsageError, check_writable

logger = logging.getLogger(__name__)

PROG = "trl-stepwise"
DEFAULT_SHOTS = 4  # worked examples before each problem, where neither the user nor the fallback examples say


@dataclass
class EvaluateArguments(GenerationEngineArguments):
    """Flags of ``trl-stepwise evaluate`` (the generation-engine flags are the trainer's: --use_vllm, ...)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Model folder or hub id available offline; default: the embedded SmolLM2-135M-Instruct."},
    )
    dataset: str = field(
        default="gsm8k",
        metadata={
            "help": "Problems to solve: gsm8k, math, math500, arithmetic:level=N or countdown:n=N (generated), a hub "
            "id, or a local .jsonl/.json/.parquet/.csv file."
        },
    )
    env: str | None = field(
        default=None,
        metadata={
            "help": "Registered environment id the episodes run in (gsm8k, math, arithmetic, math_feedback, "
            "countdown, ...); default: the dataset's own (its `env` column, else its math flavour)."
        },
    )
    split: str = field(default="test", metadata={"help": "Split of --dataset (arithmetic: train, fewshot or test)."})
    limit: int | None = field(default=None, metadata={"help": "Evaluate only the first N problems."})
    n_few_shot: int | None = field(
        default=None,
        metadata={
            "help": f"Number of solved examples shown before each problem (0: none); default {DEFAULT_SHOTS}, or the "
            "bundled worked examples' own count (GSM8K-style: 2) where they stand in for a set of final answers only."
        },
    )
    few_shot_dataset: str | None = field(
        default=None,
        metadata={"help": "Where the examples come from; default: --dataset (math500 -> math), see --few_shot_split."},
    )
    few_shot_split: str | None = field(
        default=None,
        metadata={
            "help": "Split of the few-shot dataset; default: train (arithmetic: fewshot; a local file: the file)."
        },
    )
    mode: Literal["stepwise", "direct"] = field(
        default="stepwise",
        metadata={
            "help": "stepwise: one line per environment step; direct: the whole solution as a single step "
            "(max_steps=1, no splitting, at most --max_new_tokens tokens)."
        },
    )
    calculator: Literal["auto", "on", "off"] = field(
        default="auto",
        metadata={
            "help": "Fill in <<expr=result>> results with a calculator; auto: on for GSM8K-style, off for MATH."
        },
    )
    batch_size: int = field(default=32, metadata={"help": "Episodes decoded together in one batch."})
    num_samples: int = field(
        default=1, metadata={"help": "Samples per problem; K > 1 also reports maj@K and pass@K (use temperature > 0)."}
    )
    temperature: float = field(default=0.0, metadata={"help": "Sampling temperature; 0 decodes greedily."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold (ignored when greedy)."})
    top_k: int = field(default=0, metadata={"help": "Sample from the top k tokens only; 0 turns it off."})
    max_steps: int | None = field(
        default=None, metadata={"help": "Most steps per episode; default: the dataset flavour's (GSM8K 10, MATH 15)."}
    )
    max_step_tokens: int = field(default=96, metadata={"help": "Most generated tokens per step (stepwise mode)."})
    max_new_tokens: int = field(default=256, metadata={"help": "Most generated tokens per solution (direct mode)."})
    max_episode_tokens: int | None = field(
        default=None, metadata={"help": "Token budget of a whole episode; the episode ends when it is spent."}
    )
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "Bundled prompt name (gsm8k, math, arithmetic) or a text file; default: the dataset's."},
    )
    max_example_chars: int | None = field(
        default=None, metadata={"help": "Skip few-shot examples longer than this many characters (shorter prompts)."}
    )
    question_field: str | None = field(default=None, metadata={"help": "Dataset field holding the question."})
    answer_field: str | None = field(default=None, metadata={"help": "Dataset field holding the final answer."})
    solution_field: str | None = field(
        default=None, metadata={"help": "Dataset field holding the worked solution (for few-shot and --gold)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for choosing few-shot examples and for sampling."})
    output: str | None = field(
        default=None,
        metadata={"help": "Write one JSON line per problem and sample: transcript, steps, parsed answer, verdict."},
    )
    summary_output: str | None = field(
        default=None, metadata={"help": "Write the summary as JSON; default: next to --output as *_summary.json."}
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = field(
        default="float32", metadata={"help": "Weight dtype of the model."}
    )
    gold: bool = field(
        default=False,
        metadata={
            "help": "Score the reference solutions instead of a model (no model is loaded): checks the data, step "
            "conversion, environment and grading."
        },
    )
    no_progress: bool = field(default=False, metadata={"help": "Hide the progress bar."})


@dataclass(frozen=True)
class Command:
    """A sub-command: its arguments dataclass and the function that runs it (returns the exit code)."""

    name: str
    help: str
    arguments: type
    run: Callable[[Any], int]


# ---------------------------------------------------------------------------------------------------------------------
# evaluate


def _few_shot_source(args: EvaluateArguments) -> tuple[str, str]:
    """Default few-shot source: the training split of the same data, never the split under evaluation if avoidable."""
    name = args.few_shot_dataset or ("math" if args.dataset == "math500" else args.dataset)
    if args.few_shot_split:
        return name, args.few_shot_split
    if name.lower().startswith("arithmetic"):
        return name, "fewshot"
    if Path(name).expanduser().suffix.lower() in (".json", ".jsonl", ".parquet", ".csv"):
        return name, args.split  # a file has no splits; PromptBuilder never shows a problem its own solution
    return name, "train"


def _load_rows(args: EvaluateArguments) -> list[dict]:
    from trl_stepwise.data import load_math_dataset

    dataset = load_math_dataset(
        args.dataset, args.split, args.question_field, args.answer_field, args.solution_field, limit=args.limit
    )
    return dataset.to_list()


def _prompt_builder(args: EvaluateArguments, tokenizer: Any, flavour: str) -> Any:
    """The few-shot prompt builder; a source without worked solutions is replaced by bundled worked examples (said
    on stderr), unless --few_shot_dataset named it explicitly, which is then an error naming the flag."""
    from trl_stepwise.data import load_math_dataset
    from trl_stepwise.prompting import (
        AlternatingExamples,
        PromptBuilder,
        has_worked_solutions,
        load_system_prompt,
        with_worked_examples,
    )

    examples: Sequence[dict] | AlternatingExamples = []
    shots = DEFAULT_SHOTS if args.n_few_shot is None else args.n_few_shot
    if shots > 0:
        name, split = _few_shot_source(args)
        fields = (args.question_field, args.answer_field, args.solution_field) if name == args.dataset else ()
        examples = load_math_dataset(name, split, *fields)
        if args.few_shot_dataset is not None and not has_worked_solutions(examples, flavour):
            raise UsageError(
                f"--few_shot_dataset {args.few_shot_dataset}: its rows have no worked solutions (final answers only), "
                "so the prompt would teach the model to answer without steps; name a source with worked solutions "
                "(e.g. gsm8k, math, arithmetic:level=1), or --solution_field, or drop the flag."
            )
        examples, note = with_worked_examples(examples, flavour, source=name)
        if args.n_few_shot is None and isinstance(examples, AlternatingExamples) and examples.shots is not None:
            shots = examples.shots
        if note and _is_main_process():
            print(f"{PROG} evaluate: note: {note} It shows {shots} of them.", file=sys.stderr)
    system_prompt = load_system_prompt(args.system_prompt, flavour)
    return PromptBuilder(
        tokenizer,
        examples,
        k=shots,
        system_prompt=system_prompt,
        flavour=flavour,
        seed=args.seed,
        max_example_chars=args.max_example_chars,
    )


def _check_arguments(args: EvaluateArguments) -> None:
    checks = [
        (args.limit is None or args.limit >= 1, "--limit must be >= 1"),
        (args.n_few_shot is None or args.n_few_shot >= 0, "--n_few_shot must be >= 0"),
        (args.batch_size >= 1, "--batch_size must be >= 1"),
        (args.num_samples >= 1, "--num_samples must be >= 1"),
        (args.temperature >= 0, "--temperature must be >= 0"),
        (0 < args.top_p <= 1, "--top_p must lie in (0, 1]"),
        (args.max_steps is None or args.max_steps >= 1, "--max_steps must be >= 1"),
        (args.max_step_tokens >= 1 and args.max_new_tokens >= 1, "--max_step_tokens/--max_new_tokens must be >= 1"),
    ]
    args.check_engine_arguments()
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    if args.output:  # before the model loads: an unwritable path would lose the whole evaluation at its end
        check_writable(args.output, "--output")
    if args.summary_output:
        check_writable(args.summary_output, "--summary_output")
    greedy = [(args.temperature == 0, ("top_p", "top_k"), "with --temperature 0 (greedy decoding)")]
    for line in args.inert_engine_flags(training=False) + inert_flags(args, greedy):
        if _is_main_process():
            print(f"{PROG} evaluate: warning: {line}", file=sys.stderr)


def _summary_path(args: EvaluateArguments) -> Path | None:
    if args.summary_output:
        return Path(args.summary_output)
    if args.output:
        output = Path(args.output)
        return output.with_name(f"{output.stem}_summary.json")
    return None


def _write_outputs(args: EvaluateArguments, summary: dict, records: list[dict]) -> list[Path]:
    written = []
    if args.output:
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        written.append(path)
    summary_path = _summary_path(args)
    if summary_path is not None:
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        payload = {**summary, "arguments": dataclasses.asdict(args)}
        summary_path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        written.append(summary_path)
    return written


def format_summary(summary: dict, title: str = "Evaluation") -> str:
    """The summary as a few readable lines: headline accuracy first, breakdowns and throughput after."""
    low, high = 100 * summary["accuracy_ci_low"], 100 * summary["accuracy_ci_high"]
    lines = [
        f"{title}: accuracy {100 * summary['accuracy']:.1f}% (95% CI {low:.1f}-{high:.1f}%)",
        f"  correct {summary['correct']} / total {summary['total']} | unparsable {summary['unparsable']} | "
        f"truncated {summary['truncated']}",
    ]
    k = summary.get("num_samples", 1)
    if k > 1:
        lines.append(
            f"  {k} samples: mean sample accuracy {100 * summary['mean_sample_accuracy']:.1f}% | "
            f"maj@{k} {100 * summary[f'maj@{k}']:.1f}% | pass@{k} {100 * summary[f'pass@{k}']:.1f}%"
        )
    reasons = ", ".join(f"{name} {100 * share:.1f}%" for name, share in summary["end_reasons"].items())
    lines.append(f"  episodes end by: {reasons}")
    lines.append(
        f"  mean steps {summary['mean_steps']:.1f} | mean tokens {summary['mean_tokens']:.1f} | "
        f"calculator calls {summary['calc_calls']} (errors {summary['calc_errors']})"
    )
    for key, label in (("per_level", "level"), ("per_subject", "subject")):
        for name, row in summary.get(key, {}).items():
            lines.append(f"  {label} {name}: {100 * row['accuracy']:.1f}% ({row['correct']}/{row['total']})")
    if "tokens_per_second" in summary:
        lines.append(f"  wall time {summary['wall_seconds']:.1f} s | {summary['tokens_per_second']:.1f} tokens/s")
    elif "wall_seconds" in summary:
        lines.append(f"  wall time {summary['wall_seconds']:.1f} s")
    return "\n".join(lines)


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") in ("0", "")


def make_accelerator() -> Any:
    """An ``Accelerator``; processes started by torchrun (``accelerate launch --multi_gpu``) on a machine without CUDA
    join one gloo group on the CPU, instead of each believing it is alone and evaluating every problem."""
    import torch
    from accelerate import Accelerator

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return Accelerator(cpu=world_size > 1 and not torch.cuda.is_available())


# Gold solutions are checked for grading, not for length: the longest GSM8K/MATH solutions exceed the default limits.
GOLD_MAX_STEPS = 200


def run_evaluate(args: EvaluateArguments) -> int:
    """Load data, prompts and model, run the evaluation, print the summary and write the outputs (main process)."""
    from trl_stepwise.data import DatasetFieldError, dataset_flavour
    from trl_stepwise.engines.factory import build_engine
    from trl_stepwise.envs import FLAVOURS, EnvRouter, MathEnv, make_limited, registry
    from trl_stepwise.evaluation import evaluate_gold, evaluate_problems
    from trl_stepwise.models import ModelLoadError, load_model, load_tokenizer
    from trl_stepwise.rollout import SamplingConfig

    quiet_run_logs(args.third_party_logs)
    accelerator = make_accelerator()
    direct = args.mode == "direct"
    flavour = dataset_flavour(args.dataset)
    calculator = None if args.calculator == "auto" else args.calculator == "on"
    max_steps = 1 if direct else (args.max_steps or (GOLD_MAX_STEPS if args.gold else None))
    math = {
        name: partial(
            MathEnv,
            name,
            max_steps=max_steps,
            max_episode_tokens=args.max_episode_tokens,
            calculator=calculator,
        )
        for name in FLAVOURS
    }
    limited = partial(make_limited, max_steps=max_steps, max_episode_tokens=args.max_episode_tokens)
    limited = partial(limited, tools=calculator is not False)
    make_env = EnvRouter(math["math" if flavour == "math" else "gsm8k"], math, limited)
    try:
        _check_arguments(args)
        if args.env is not None:
            if args.env not in registry:
                raise UsageError(f"--env {args.env}: not a registered environment; choose one of {sorted(registry)}")
            # the flag overrides the environment a dataset's rows name
            make_env = math.get(args.env) or partial(limited, args.env)
        rows = _load_rows(args)
        if args.gold:
            summary, records = evaluate_gold(rows, make_env, flavour)
        else:  # the cheap parts first: a bad few-shot source or prompt fails before the model loads
            tokenizer = load_tokenizer(args.model_name_or_path)
            prompt_builder = _prompt_builder(args, tokenizer, flavour)
            model = load_model(args.model_name_or_path, dtype=args.dtype).to(accelerator.device)
            engine = build_engine(args, model, tokenizer, seed=args.seed + accelerator.process_index)
    except (UsageError, DatasetFieldError, ModelLoadError, FileNotFoundError, ValueError, RuntimeError) as err:
        if accelerator.is_main_process:
            print(f"{PROG} evaluate: error: {' '.join(str(err).split())}", file=sys.stderr)
        return USAGE_ERROR
    if not args.gold:
        sampling = SamplingConfig(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            max_step_tokens=args.max_new_tokens if direct else args.max_step_tokens,
            batch_size=args.batch_size,
            seed=args.seed + accelerator.process_index,
            bf16=args.dtype == "bfloat16",
        )
        summary, records = evaluate_problems(
            model,
            tokenizer,
            rows,
            prompt_builder,
            make_env,
            sampling,
            num_samples=args.num_samples,
            accelerator=accelerator,
            progress=not args.no_progress,
            step_delimiter=None if direct else "\n",
            calculator=calculator is not False,
            engine=engine,
        )
    if accelerator.is_main_process:
        title = f"{'Gold solutions' if args.gold else args.model_name_or_path or 'embedded model'} on {args.dataset}"
        print(format_summary(summary, title=f"{title} ({args.split}, {args.mode})"))
        for path in _write_outputs(args, summary, records):
            print(f"  wrote {path}")
    accelerator.wait_for_everyone()
    return 0


EVALUATE = Command(
    "evaluate", "Evaluate a model (or the gold solutions) on math problems.", EvaluateArguments, run_evaluate
)
COMMANDS: dict[str, Command] = {command.name: command for command in (EVALUATE,)}


# ---------------------------------------------------------------------------------------------------------------------
# entry point


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; each sub-command's parser is an ``HfArgumentParser`` over its dataclass."""
    parser = OneLineTopLevelParser(prog=PROG, description="Stepwise RL for math word problems on top of TRL.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    subparsers.required = True
    for command in COMMANDS.values():
        subparsers.add_parser(
            command.name,
            dataclass_types=[command.arguments],
            help=command.help,
            description=command.help,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
    return parser


def parse_command(argv: Sequence[str] | None = None) -> tuple[Command, Any]:
    """``(command, filled arguments dataclass)`` from the command line; argparse exits 2 on a usage error."""
    namespace = build_parser().parse_args(argv)
    command = COMMANDS[namespace.command]
    names = {f.name for f in dataclasses.fields(command.arguments) if f.init}
    return command, command.arguments(**{k: v for k, v in vars(namespace).items() if k in names})


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_data_progress_bars()
    command, args = parse_command(argv)
    return command.run(args)


if __name__ == "__main__":
    sys.exit(main())
