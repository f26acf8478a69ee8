"""Bad inputs to the recipes and to ``trl-stepwise evaluate``: each must end as one line on stderr, exit code 2.

Run as a script, it starts every case as its own process (as a user would) and prints a table of exit codes and last
lines; it exits 1 if any case is not a one-line error with exit code 2 or wrote anything:

    python tests/bad_inputs.py [--jobs 2] [--only reinforce]

``tests/test_recipe_errors.py`` runs the same cases in-process (fast: none of them may load a model).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "reinforce": [str(REPO / "recipes" / "reinforce_gsm8k.py")],
    "math": [str(REPO / "recipes" / "reinforce_math.py")],
    "sft": [str(REPO / "recipes" / "sft_gsm8k.py")],
    "evaluate": ["-m", "trl_stepwise.cli", "evaluate"],
}


@dataclass(frozen=True)
class Case:
    """One bad input: the command, its flags (``{tmp}`` is a scratch folder) and words the error line must hold."""

    command: str
    argv: tuple[str, ...]
    words: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.command} {' '.join(self.argv)}".replace("{tmp}/", "")

    def args(self, tmp: Path) -> list[str]:
        argv = [a.replace("{tmp}", str(tmp)) for a in self.argv]
        if self.command != "evaluate" and "--output_dir" not in argv:
            argv += ["--output_dir", str(tmp / "out")]
        return argv


def _c(command: str, argv: str, *words: str) -> Case:
    return Case(command, tuple(argv.split()), words)


CASES = [
    # the list, reinforce recipe
    _c("reinforce", "--load_in_4bit true", "--load_in_4bit", "--use_peft"),
    _c("reinforce", "--per_device_train_batch_size 3 --num_generations 4", "per_device_train_batch_size", "(4)"),
    _c("reinforce", "--kl_coef -1", "kl_coef=-1", "use 0"),
    _c("reinforce", "--algorithm nosuch", "algorithm='nosuch'", "reinforce_stable"),
    _c("reinforce", "--baseline nosuch", "baseline='nosuch'", "leave_one_out"),
    _c("reinforce", "--config nope.yaml", "--config nope.yaml", "no such file"),
    _c("reinforce", "--config {tmp}/unknown_key.yaml", "unknown key 'bogus_key'", "remove it"),
    _c("reinforce", "--dataset_name nope.jsonl", "--dataset_name nope.jsonl", "does not exist"),
    _c("reinforce", "--resume_from_checkpoint {tmp}/missing", "--resume_from_checkpoint", "no such folder"),
    _c("reinforce", "--gamma 2", "gamma=2.0", "[0, 1]"),
    _c("reinforce", "--max_steps 0 --num_train_epochs 0", "max_steps=0", "nothing to train"),
    _c("reinforce", "--curriculum nosuchset", "--curriculum nosuchset", "arithmetic:level=N"),
    # more of the config's ranges and the recipe's inputs
    _c("reinforce", "--config {tmp}/typo.yaml", "unknown key 'gama'", "did you mean gamma"),
    _c("reinforce", "--config {tmp}/list.yaml", "--config", "mapping"),
    _c("reinforce", "--config {tmp}/broken.yaml", "--config", "not valid YAML"),
    _c("reinforce", "--gama 0.9", "--gama", "did you mean --gamma"),
    _c("reinforce", "--gamma abc", "--gamma", "invalid float value"),
    _c("reinforce", "--gamma -0.5", "gamma=-0.5", "[0, 1]"),
    _c("reinforce", "--epsilon 0", "epsilon=0.0", "> 0"),
    _c("reinforce", "--loss_type gspo", "loss_type='gspo'", "dapo, grpo, bnpo, dr_grpo, cispo"),
    _c("reinforce", "--loss_normalization token --loss_type grpo", "loss_normalization=token", "only --loss_type"),
    _c("reinforce", "--importance_sampling_level word", "importance_sampling_level='word'", "token or sequence"),
    _c(
        "reinforce",
        "--dynamic_sampling true --dynamic_sampling_max_rounds -1",
        "dynamic_sampling_max_rounds=-1",
        ">= 0",
    ),
    _c("reinforce", "--top_p 0", "top_p=0.0", "(0, 1]"),
    _c("reinforce", "--format_reward_weight inf", "format_reward_weight=inf", "finite"),
    _c("reinforce", "--reward_weights 1 nan", "reward_weights=", "finite"),
    _c("reinforce", "--num_generations 0", "num_generations=0"),
    _c("reinforce", "--num_iterations 0", "num_iterations=0"),
    _c("reinforce", "--n_few_shot -1", "n_few_shot=-1"),
    _c("reinforce", "--n_few_shot 2 --few_shot_pool_size 1", "few_shot_pool_size=1"),
    _c("reinforce", "--reference_guidance true --num_generations 1 --baseline none", "num_generations >= 2", "got 1"),
    _c("reinforce", "--judge_weight -1", "judge_weight=-1.0", "non-negative"),
    _c("reinforce", "--learning_rate -1", "learning_rate=-1.0"),
    _c("reinforce", "--env_flavour nosuch", "env_flavour='nosuch'", "gsm8k"),
    _c("reinforce", "--model_dtype int8", "model_dtype='int8'", "bfloat16"),
    _c("reinforce", "--max_episode_steps 0", "max_episode_steps=0"),
    _c("reinforce", "--moving_average_decay 1.5", "moving_average_decay=1.5"),
    _c("reinforce", "--curriculum arithmetic:level=1 gsm8k --curriculum_thresholds 1.5", "curriculum_thresholds"),
    _c("reinforce", "--curriculum arithmetic:level=1 gsm8k --curriculum_replay 1", "curriculum_replay=1", "[0, 1)"),
    _c("reinforce", "--distill_coef 0.5", "--distill_coef 0.5", "--teacher_model"),
    _c("reinforce", "--resume_from_checkpoint true", "--resume_from_checkpoint true", "no complete checkpoint"),
    _c("reinforce", "--eval_dataset_name nope.jsonl", "--eval_dataset_name nope.jsonl", "does not exist"),
    _c("reinforce", "--few_shot_dataset_name nope.jsonl", "--few_shot_dataset_name nope.jsonl", "does not exist"),
    _c("reinforce", "--few_shot_dataset_name {tmp}/plain.jsonl", "--few_shot_dataset_name", "no worked solutions"),
    _c("reinforce", "--few_shot_dataset_name gsm8k {tmp}/plain.jsonl", "plain.jsonl: its rows have no worked"),
    _c("reinforce", "--run_budget_minutes 0", "--run_budget_minutes 0", "more than 0 minutes"),
    _c("reinforce", "--question_field nosuch", "--question_field 'nosuch'", "Pass --question_field"),
    _c("reinforce", "--system_prompt nofile.txt", "--system_prompt nofile.txt", "bundled prompt"),
    _c("reinforce", "--load_in_4bit true --load_in_8bit true --use_peft true", "8 bit and 4 bit"),
    # set-ups whose engine could not sample the policy being trained, and paths the run could not write at its end
    _c(
        "reinforce",
        "--use_vllm true --load_in_4bit true --use_peft true",
        "--use_vllm true",
        "4/8-bit",
        "--use_vllm false",
    ),
    _c(
        "reinforce",
        "--use_vllm true --vllm_mode server --vllm_server_base_url http://127.0.0.1:9 --vllm_server_timeout 1",
        "--vllm_mode server",
        "did not answer",
    ),
    _c("reinforce", "--output_dir /proc/nope/out", "--output_dir /proc/nope/out", "cannot write"),
    _c("reinforce", "--scale_advantages true --scale_rewards group", "scale_advantages=True", "disagree"),
    _c("reinforce", "--sampler_logprob_tolerance -1", "sampler_logprob_tolerance=-1.0", "0 = off"),
    _c("reinforce", "--sampler_logprob_patience 0", "sampler_logprob_patience=0"),
    # the MATH and SFT recipes
    _c("math", "--gamma 2", "gamma=2.0"),
    _c("math", "--dataset_name nope.jsonl", "--dataset_name nope.jsonl", "does not exist"),
    _c("sft", "--load_in_4bit true", "--load_in_4bit", "--use_peft"),
    _c("sft", "--dataset_name nope.jsonl", "--dataset_name nope.jsonl", "does not exist"),
    _c("sft", "--max_steps 0 --num_train_epochs 0", "--max_steps 0", "nothing to train"),
    _c("sft", "--config {tmp}/unknown_key.yaml", "unknown key 'bogus_key'"),
    _c("sft", "--resume_from_checkpoint {tmp}/missing", "--resume_from_checkpoint", "no such folder"),
    _c("sft", "--dataset_name {tmp}/plain.jsonl", "--dataset_name", "worked solution"),
    # the evaluate command
    _c("evaluate", "--limit 0", "--limit"),
    _c("evaluate", "--limit many", "--limit", "invalid int value"),
    _c("evaluate", "--top_p 2", "--top_p"),
    _c("evaluate", "--num_samples 0", "--num_samples"),
    _c("evaluate", "--temperature -1", "--temperature"),
    _c("evaluate", "--batch_size 0", "--batch_size"),
    _c("evaluate", "--mode sideways", "--mode", "invalid choice"),
    _c("evaluate", "--dataset nope.jsonl", "nope.jsonl", "does not exist"),
    _c("evaluate", "--dataset {tmp}/plain.jsonl --answer_field nosuch", "--answer_field 'nosuch'"),
    _c("evaluate", "--nosuch 1", "--nosuch"),
    _c("evaluate", "--output /proc/nope/x.jsonl", "--output /proc/nope/x.jsonl", "cannot write"),
    _c("evaluate", "--summary_output /proc/nope/s.json", "--summary_output /proc/nope/s.json", "cannot write"),
    _c("evaluate", "--dataset {tmp}/plain.jsonl --few_shot_dataset {tmp}/plain.jsonl", "--few_shot_dataset", "worked"),
]


def make_fixtures(tmp: Path) -> None:
    """The files some cases point at."""
    (tmp / "unknown_key.yaml").write_text("learning_rate: 1.0e-5\nbogus_key: 3\n")
    (tmp / "typo.yaml").write_text("gama: 0.9\n")
    (tmp / "list.yaml").write_text("- gamma\n- 0.9\n")
    (tmp / "broken.yaml").write_text("gamma: [0.9\n")
    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(4)]
    (tmp / "plain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_case(case: Case, tmp_root: Path) -> tuple[Case, int, str, bool]:
    """(case, exit code, stderr, whether it wrote anything) for one case in its own process."""
    tmp = Path(tempfile.mkdtemp(dir=tmp_root))
    make_fixtures(tmp)
    before = set(tmp.rglob("*"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("WANDB_MODE", None)
    result = subprocess.run(
        [sys.executable, *SCRIPTS[case.command], *case.args(tmp)],
        capture_output=True,
        text=True,
        cwd=tmp,
        env=env,
        timeout=300,
    )
    wrote = set(tmp.rglob("*")) != before
    return case, result.returncode, result.stderr, wrote


def is_one_line_error(code: int, stderr: str, wrote: bool, case: Case) -> bool:
    lines = stderr.strip().splitlines()
    return code == 2 and len(lines) == 1 and not wrote and all(w in lines[0] for w in case.words)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="Cases run at once.")
    parser.add_argument("--only", choices=sorted(SCRIPTS), default=None, help="Run one command's cases.")
    args = parser.parse_args()
    cases = [c for c in CASES if args.only in (None, c.command)]
    with tempfile.TemporaryDirectory() as root, ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda c: run_case(c, Path(root)), cases))
    good = 0
    print("| case | exit | lines | last line |\n|---|---:|---:|---|")
    for case, code, stderr, wrote in results:
        lines = stderr.strip().splitlines()
        ok = is_one_line_error(code, stderr, wrote, case)
        good += ok
        last = (lines[-1] if lines else "").replace("|", "\\|")
        flag = "" if ok else " **NOT OK**" + (" (wrote files)" if wrote else "")
        print(f"| `{case.name}` | {code} | {len(lines)} | {last}{flag} |")
    print(f"\n{good}/{len(results)} cases: one line on stderr, exit code 2, nothing written, the expected words.")
    return 0 if good == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
