"""Time per training step: the README's own environment against the main job, side by side in one run.

A newcomer's environment should train at about the main job's speed for the same number of episodes and tokens.
This runs, one after the other on an otherwise idle machine, each in its own process:

- ``readme_env``: the "Write your own environment" example of README.md exactly as printed (reverse_word.py: 4 words x
  4 episodes per step, colocated vLLM on CPU), for its 6 steps;
- ``main_job``: ``recipes/configs/reinforce_gsm8k_cpu.yaml`` (16 episodes per step, colocated vLLM, bf16 autocast)
  for ``--main_steps`` steps, without its evaluations.

and prints, per job, the median over steps 2.. (step 1 holds the engine's warm-up and has no optimisation before it)
of generation, scoring (rewards, reference log-probs, advantages) and optimisation (loss, backward, optimizer step,
weight push to the engine) seconds, and the tokens per episode, from the trainer's own logs.

    python benchmarks/step_time.py                  # both jobs, ~8 minutes on 2 cores
    python benchmarks/step_time.py --main_steps 4   # shorter
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "step_time.json"
MAIN_CONFIG = ROOT / "recipes" / "configs" / "reinforce_gsm8k_cpu.yaml"
FIELDS = ("time/generation_s", "time/scoring_s", "time/optimisation_s", "tokens_per_episode")


def readme_example() -> str:
    """The README's environment example, as printed."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- env-example.*?```python\n(.*?)```", text, re.S)
    if match is None:
        raise SystemExit("README.md has no env-example block")
    return match.group(1)


def run_job(job: str, log_path: Path, main_steps: int, workdir: Path) -> None:
    """In this process: train one job and write its ``log_history`` to ``log_path``."""
    from trl_stepwise import StepwiseReinforceTrainer

    original_train = StepwiseReinforceTrainer.train

    def train_and_record(self, *args, **kwargs):
        out = original_train(self, *args, **kwargs)
        log_path.write_text(json.dumps(self.state.log_history))
        return out

    StepwiseReinforceTrainer.train = train_and_record
    if job == "readme_env":
        import os

        os.chdir(workdir)  # the example writes to outputs/reverse-word
        exec(compile(readme_example(), "reverse_word.py", "exec"), {"__name__": "__main__"})
        return
    from trl_stepwise.recipe import main

    output_dir = workdir / "main_job"
    main(
        [
            "--config", str(MAIN_CONFIG), "--max_steps", str(main_steps), "--output_dir", str(output_dir),
            "--eval_on_start", "false", "--eval_at_end", "false", "--save_strategy", "no",
        ]
    )  # fmt: skip


def summarise(history: list[dict]) -> dict:
    """Medians over steps 2.. of the per-step timings; every step's values kept."""
    steps = [h for h in history if "time/generation_s" in h]
    later = steps[1:] or steps
    summary: dict = {"steps": len(steps)}
    for field in FIELDS:
        values = [h[field] for h in later if field in h]
        summary[field.replace("time/", "median_")] = round(statistics.median(values), 2) if values else None
    timed = [h for h in later if all(f in h for f in FIELDS[:3])]
    totals = [sum(h[f] for f in FIELDS[:3]) for h in timed]
    summary["median_step_s"] = round(statistics.median(totals), 2) if totals else None
    summary["per_step"] = [{k: round(h[k], 2) for k in (*FIELDS, "step") if k in h} for h in steps]
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--main_steps", type=int, default=8, help="Training steps of the main job.")
    parser.add_argument("--output", type=Path, default=RESULTS, help="Where the JSON results go.")
    parser.add_argument("--job", choices=("readme_env", "main_job"), help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--log", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        run_job(args.job, args.log, args.main_steps, args.workdir)
        return 0
    results: dict = {"benchmark": "step_time", "command": " ".join(sys.argv), "jobs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for job in ("readme_env", "main_job"):
            log = Path(tmp) / f"{job}.json"
            started = time.perf_counter()
            command = [sys.executable, __file__, "--job", job, "--log", str(log), "--workdir", tmp]
            command += ["--main_steps", str(args.main_steps)]
            subprocess.run(command, check=True, cwd=ROOT)
            summary = summarise(json.loads(log.read_text()))
            summary["process_seconds"] = round(time.perf_counter() - started, 1)
            results["jobs"][job] = summary
    print(f"{'job':<12} {'steps':>5} {'gen s':>6} {'score s':>7} {'opt s':>6} {'step s':>6} {'tokens/ep':>9}")
    for job, s in results["jobs"].items():
        print(
            f"{job:<12} {s['steps']:>5} {s['median_generation_s']:>6} {s['median_scoring_s']:>7} "
            f"{s['median_optimisation_s']:>6} {s['median_step_s']:>6} {s['tokens_per_episode']:>9}"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
