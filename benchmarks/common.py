"""What the benchmark scripts share: model and problem set-up, timing, machine facts, tables, paired tests and JSON
results (training under a wall-clock budget: ``training_budget.py``).

Every script runs at full size by default and in seconds with ``--quick``; ``--tiny`` swaps the embedded model for a
tiny random Llama (same tokenizer), which only checks that the code runs: its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(ROOT))

from trl_stepwise.data import dataset_flavour, load_math_dataset  # noqa: E402
from trl_stepwise.envs import MathEnv  # noqa: E402
from trl_stepwise.models import load_model_and_tokenizer, load_tokenizer  # noqa: E402
from trl_stepwise.prompting import PromptBuilder, load_system_prompt  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 deprecation notices, once per call
datasets.disable_progress_bars()

GIB = 1024**3
MIB = 1024**2


# ---------------------------------------------------------------------------------------------------------------------
# Arguments


def base_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the flags every script has: --quick, --tiny, --threads, --seed, --output."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Seconds-long smoke run: tiny sizes, not results.")
    parser.add_argument(
        "--tiny", action="store_true", help="Use a tiny random Llama instead of the embedded model (code check only)."
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output", type=str, default=None, help="JSON path (default: benchmarks/results/<name>.json)."
    )
    return parser


def setup_torch(args: argparse.Namespace) -> None:
    """Seed and thread settings shared by all scripts."""
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)


# ---------------------------------------------------------------------------------------------------------------------
# Model and problems


def load_policy(tiny: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[Any, Any]:
    """The embedded SmolLM2-135M-Instruct and its tokenizer, or (``tiny``) a tiny random Llama with that tokenizer."""
    if not tiny:
        return load_model_and_tokenizer(dtype=dtype)
    tokenizer = load_tokenizer()
    return tiny_model(tokenizer, dtype=dtype, seed=seed), tokenizer


def tiny_model(tokenizer: Any, dtype: torch.dtype = torch.float32, seed: int = 0) -> Any:
    """A 2-layer random Llama (grouped-query attention, like the real model) on the embedded tokenizer's vocabulary."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model = LlamaForCausalLM(config).to(dtype)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return model.eval()


def load_problems(name: str, split: str, n: int | None) -> list[dict]:
    """The first ``n`` problems of a dataset as plain dicts (question, answer, solution, ...)."""
    return [dict(row) for row in load_math_dataset(name, split=split, limit=n)]


def few_shot_rows(dataset: str) -> list[dict]:
    """Few-shot source for a dataset: arithmetic's own ``fewshot`` split, else the training split."""
    split = "fewshot" if dataset.startswith("arithmetic") else "train"
    return load_problems(dataset, split, 500)


def prompt_builder(tokenizer: Any, dataset: str, k: int, seed: int = 0) -> PromptBuilder:
    """The few-shot chat prompt builder the trainer would make for ``dataset`` (same system prompt and flavour)."""
    flavour = dataset_flavour(dataset)
    return PromptBuilder(
        tokenizer,
        few_shot_rows(dataset),
        k=k,
        system_prompt=load_system_prompt(None, flavour),
        flavour=flavour,
        seed=seed,
    )


def env_factory(
    flavour: str, max_episode_tokens: int | None, max_steps: int | None = None, calculator: bool = True
) -> Callable[[], MathEnv]:
    """A zero-argument factory of fresh environments (what ``StepwiseRollout.run`` expects)."""

    def make() -> MathEnv:
        return MathEnv(flavour, max_episode_tokens=max_episode_tokens, max_steps=max_steps, calculator=calculator)

    return make


def repeat_rows(rows: Sequence[dict], episodes_per_problem: int) -> tuple[list[dict], list[int]]:
    """Each problem ``episodes_per_problem`` times in a row (GRPO's layout), with its group id."""
    out, groups = [], []
    for index, row in enumerate(rows):
        for _ in range(episodes_per_problem):
            out.append(dict(row))
            groups.append(index)
    return out, groups


def give_model_a_path(model: Any, output_dir: str | Path) -> None:
    """GRPOTrainer (beta > 0) loads its reference model from the policy's ``_name_or_path``: a model that has no
    folder there (the tiny random Llama) is saved under ``output_dir`` and pointed at it."""
    name = getattr(model.config, "_name_or_path", "")
    if name and Path(name).is_dir():
        return
    saved = Path(output_dir) / "initial-model"
    model.save_pretrained(saved)
    model.config._name_or_path = str(saved)


def shared_trainer_settings(
    args: argparse.Namespace, output_dir: str, max_steps: int = 1_000_000, micro_batch: int | None = None
) -> dict[str, Any]:
    """Arguments StepwiseReinforceConfig and GRPOConfig share under the same names, for side-by-side runs: CPU,
    float32, ``args.episodes_per_step`` episodes per optimizer step (``args.num_generations`` per problem) in
    micro-batches of ``micro_batch`` (default: one), constant learning rate, the same sampling temperature.
    The default ``max_steps`` leaves stopping to a ``BudgetCallback``."""
    micro = micro_batch or args.episodes_per_step
    if args.episodes_per_step % micro or args.episodes_per_step % args.num_generations:
        raise ValueError(
            f"episodes_per_step {args.episodes_per_step} must be a multiple of the micro-batch ({micro}) and of "
            f"num_generations ({args.num_generations})"
        )
    return {
        "output_dir": output_dir,
        "use_cpu": True,
        "bf16": False,
        "seed": args.seed,
        "max_steps": max_steps,
        "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": args.episodes_per_step // micro,
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


# ---------------------------------------------------------------------------------------------------------------------
# Timing and memory


@dataclass
class Timer:
    """Wall-clock seconds of a ``with`` block (``time.perf_counter``)."""

    seconds: float = 0.0
    _start: float = field(default=0.0, repr=False)

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start


def stepwise_side_settings(
    args: argparse.Namespace, output_dir: str, few_shot_seed: int, env_flavour: str, **shared: Any
) -> dict[str, Any]:
    """StepwiseReinforceConfig arguments of the stepwise side of a run against GRPO: the shared settings plus the
    same KL weight (GRPO's beta), a reference that is never refreshed (as GRPO's default), the calculator and the
    step limits in ``args``; no rollout logs."""
    return {
        **shared_trainer_settings(args, output_dir, **shared),
        "kl_coef": args.kl_coef,
        "ref_sync_steps": 0,  # GRPO's default reference is never refreshed either (sync_ref_model=False)
        "algorithm": "reinforce_stable",
        "n_few_shot": args.n_few_shot,
        "few_shot_seed": few_shot_seed,
        "env_flavour": env_flavour,
        "max_episode_steps": args.max_episode_steps,
        "max_step_tokens": args.max_step_tokens,
        "max_episode_tokens": args.max_episode_tokens,
        "calculator": True,
        "rollout_batch_size": args.rollout_batch_size,
        "log_rollouts": False,
        "num_completions_to_print": 0,
    }


def repeat_timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        with Timer() as timer:
            fn()
        times.append(timer.seconds)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports kilobytes, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@contextmanager
def environ(**values: str | None) -> Iterator[None]:
    """Set (or, with None, unset) environment variables for the block."""
    previous = {key: os.environ.get(key) for key in values}
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ---------------------------------------------------------------------------------------------------------------------
# Reporting


def with_interval(result: dict[str, float]) -> str:
    """``accuracy [Wilson 95% low, high]`` of an evaluation summary."""
    return f"{result['accuracy']:.3f} [{result['accuracy_ci_low']:.3f}, {result['accuracy_ci_high']:.3f}]"


def mcnemar_p_value(before: Sequence[bool], after: Sequence[bool]) -> float:
    """Exact two-sided McNemar test on paired per-problem outcomes (the same problems before and after): the
    probability of a split of the discordant pairs at least this uneven if a change were as likely either way."""
    if len(before) != len(after):
        raise ValueError(f"paired outcomes differ in length: {len(before)} vs {len(after)}")
    gained = sum(1 for b, a in zip(before, after, strict=True) if a and not b)
    lost = sum(1 for b, a in zip(before, after, strict=True) if b and not a)
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(gained, lost) + 1)) / 2**n
    return min(1.0, 2 * tail)


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: CPU, cores, threads, memory, GPU, library versions, commit."""
    import transformers
    import trl

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = None
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(memory / GIB, 1) if memory else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "git_commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def format_value(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return "-" if value is None else str(value)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    """Print (and return) a Markdown table; floats get a sensible number of digits."""
    cells = [[format_value(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(headers)]
    lines = []
    if title:
        lines.append(f"\n### {title}\n")
    lines.append("| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        lines.append("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def is_smoke(args: argparse.Namespace | None) -> bool:
    return bool(args is not None and (getattr(args, "quick", False) or getattr(args, "tiny", False)))


def result_path(name: str, args: argparse.Namespace | None = None, suffix: str = ".json") -> Path:
    """``benchmarks/results/<name>.json``; smoke runs (--quick/--tiny) write ``<name>.quick.json`` instead."""
    if args is not None and getattr(args, "output", None) and suffix == ".json":
        return Path(args.output)
    return RESULTS_DIR / f"{name}{'.quick' if is_smoke(args) else ''}{suffix}"


def write_json(name: str, data: dict[str, Any], args: argparse.Namespace | None = None) -> Path:
    """Write ``data`` plus machine facts and the command line to ``benchmarks/results/<name>.json``."""
    path = result_path(name, args)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "smoke_run": is_smoke(args),
        "arguments": vars(args) if args is not None else None,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        **data,
    }
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    print(f"\nwrote {path}", flush=True)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.dtype):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return repr(value)
