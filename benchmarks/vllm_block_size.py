"""Stepwise rollouts against plain whole-solution generation on vLLM's CPU backend, by key/value block size.

vLLM reuses a prompt's cached keys and values in whole blocks. A stepwise episode pauses where the calculator may act
and resumes with its result appended, so each resume re-encodes the tail of its last block; with the CPU backend's
default of 128 tokens per block that is up to 127 tokens per pause. This runs, for each block size in its own
subprocess (one engine per process), the rollout benchmark's (e) StepwiseRollout on vLLM and (f) plain vLLM
whole-solution generation on the same prompts (``rollout_throughput.py``'s settings: 16 GSM8K test problems x 4
episodes, 4-shot, temperature 0.7), ``--repeats`` times each, and prints tokens/s and the stepwise/plain ratio.

A pause can also append its tokens to the running request (the engine's forced tokens, ``forced_tokens.py``) instead
of resending it: ``--forcing off,on`` runs each block size both ways (off: every pause resends the request).

    python benchmarks/vllm_block_size.py                 # block sizes 128 (vLLM's CPU default) and 32, ~6 min
    python benchmarks/vllm_block_size.py --block_sizes 32,64 --repeats 3
    python benchmarks/vllm_block_size.py --block_sizes 32 --forcing off,on --repeats 3 \
        --output benchmarks/results/vllm_forced_tokens.json

The engine holds the policy's weights in float32 unless ``--dtypes`` says otherwise: ``--dtypes float32,bfloat16``
compares them (bfloat16 is what the trainer's engine holds under ``--bf16``).

    python benchmarks/vllm_block_size.py --block_sizes 32 --dtypes float32,bfloat16 --repeats 3 \
        --output benchmarks/results/vllm_dtype.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import (
    base_parser,
    env_factory,
    load_problems,
    median,
    print_table,
    prompt_builder,
    repeat_rows,
    write_json,
)


def measure(block_size: int, forcing: bool, args, dtype: str = "float32") -> dict:
    """Run in the child process: one engine at ``block_size`` holding its weights in ``dtype``, (e) and (f)
    ``args.repeats`` times each; ``forcing`` off makes every pause resend its request."""
    from rollout_throughput import colocated_vllm, run_stepwise, run_vllm_whole_solutions

    from trl_stepwise.engines import SamplingConfig
    from trl_stepwise.engines import vllm_engine as engine_module
    from trl_stepwise.models import load_model_and_tokenizer

    engine_module.CPU_BLOCK_SIZE = block_size
    model, tokenizer = load_model_and_tokenizer()
    problems = load_problems("gsm8k", "test", args.num_problems)
    builder = prompt_builder(tokenizer, "gsm8k", 4, seed=args.seed)
    rows, groups = repeat_rows(problems, 4)
    make_env = env_factory("gsm8k", 256)
    sampling = SamplingConfig(temperature=0.7, max_step_tokens=64, batch_size=64, seed=args.seed)
    engine = colocated_vllm(model, tokenizer, args.seed, dtype)
    assert engine.llm.llm_engine.vllm_config.cache_config.block_size == block_size
    engine.forces_in_place = engine.forces_in_place and forcing
    run_stepwise("warm-up", None, tokenizer, builder, rows[:2], groups[:2], make_env, sampling, engine=engine)
    runs = []
    for _ in range(args.repeats):
        stepwise = run_stepwise("(e)", None, tokenizer, builder, rows, groups, make_env, sampling, engine=engine)
        plain = run_vllm_whole_solutions(engine, tokenizer, builder, rows, sampling, 256)
        runs.append(
            {
                "stepwise_tokens_per_second": stepwise.tokens_per_second,
                "plain_tokens_per_second": plain.tokens_per_second,
                "ratio": stepwise.tokens_per_second / plain.tokens_per_second,
                "stepwise_seconds": stepwise.seconds,
                "plain_seconds": plain.seconds,
            }
        )
    return {"block_size": block_size, "forcing": engine.forces_in_place, "dtype": dtype, "runs": runs}


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--block_sizes", default="128,32", help="Comma list of block sizes, one subprocess each.")
    parser.add_argument("--num_problems", type=int, default=16, help="GSM8K test problems (x 4 episodes each).")
    parser.add_argument("--repeats", type=int, default=2, help="Runs of (e) and (f) per block size.")
    parser.add_argument(
        "--forcing",
        default="on",
        help="Comma list of off/on: pauses resend the request (off) or append in place (on).",
    )
    parser.add_argument(
        "--dtypes", default="float32", help="Comma list of the engine's weight dtypes (float32, bfloat16)."
    )
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child_forcing", default="on", help=argparse.SUPPRESS)
    parser.add_argument("--child_dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.num_problems, args.repeats = 2, 1
    if args.child is not None:
        result = measure(args.child, args.child_forcing == "on", args, args.child_dtype)
        print("RESULT " + json.dumps(result), flush=True)
        return
    results = []
    forcings = args.forcing.split(",")
    if not set(forcings) <= {"off", "on"}:
        parser.error(f"--forcing {args.forcing}: use off, on or off,on")
    dtypes = args.dtypes.split(",")
    if not set(dtypes) <= {"float32", "bfloat16"}:
        parser.error(f"--dtypes {args.dtypes}: use float32, bfloat16 or float32,bfloat16")
    settings = [(int(b), f, d) for b in args.block_sizes.split(",") for f in forcings for d in dtypes]
    for block_size, forcing, dtype in settings:
        argv = [sys.executable, str(Path(__file__).resolve()), "--child", str(block_size), "--child_forcing", forcing]
        argv += ["--child_dtype", dtype]
        argv += ["--num_problems", str(args.num_problems), "--repeats", str(args.repeats), "--seed", str(args.seed)]
        child = subprocess.run(argv, capture_output=True, text=True, check=True)
        line = next(line for line in child.stdout.splitlines() if line.startswith("RESULT "))
        results.append(json.loads(line.removeprefix("RESULT ")))
    rows = []
    for result in results:
        runs = result["runs"]
        rows.append(
            [
                result["block_size"],
                "on" if result.get("forcing") else "off",
                result.get("dtype", "float32"),
                median([r["stepwise_tokens_per_second"] for r in runs]),
                median([r["plain_tokens_per_second"] for r in runs]),
                ", ".join(f"{r['ratio']:.2f}" for r in runs),
            ]
        )
    print_table(
        ["block size", "forced tokens", "dtype", "stepwise tok/s (median)", "plain tok/s (median)", "per run ratio"],
        rows,
    )
    write_json(
        "vllm_block_size",
        {"num_problems": args.num_problems, "episodes": 4 * args.num_problems, "results": results},
        args,
    )


if __name__ == "__main__":
    main()
