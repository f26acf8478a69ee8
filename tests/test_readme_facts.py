"""The README's figures, counts and tables against the files they come from, so the docs cannot drift.

- Figures about the main job come from its config (``recipes/configs/reinforce_gsm8k_cpu.yaml``) or from a results
  file under ``benchmarks/results/``, formatted the way the README writes them.
- Counts of cases and the combination matrix come from the test modules that define them (``tests/bad_inputs.py``,
  ``tests/matrix_cells.py``).
- The architecture table names every module of the package.

Text, YAML and JSON only: no model loads. A failure names the README line and the file that disagree.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from bad_inputs import CASES
from matrix_cells import CELLS, GAP_TOLERANCE

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
MAIN_CONFIG = REPO / "recipes" / "configs" / "reinforce_gsm8k_cpu.yaml"
RESULTS = REPO / "benchmarks" / "results"
PACKAGE = REPO / "trl_stepwise"
GIB = 2**30


# ---------------------------------------------------------------------------------------------- README text
def _line(offset: int) -> int:
    return README.count("\n", 0, offset) + 1


def _loose(pattern: str) -> re.Pattern:
    """A pattern whose spaces match any run of whitespace: README sentences wrap anywhere."""
    return re.compile(pattern.replace(" ", r"\s+"))


@cache
def _section(heading: str) -> tuple[int, int]:
    """Offsets of the README section under the heading line ``heading``, up to the next heading of its level or
    higher (headings inside code blocks do not count)."""
    level = len(heading) - len(heading.lstrip("#"))
    start = end = None
    offset, fenced = 0, False
    for line in README.splitlines(keepends=True):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and start is None and line.rstrip() == heading:
            start = offset + len(line)
        elif not fenced and start is not None and re.match(rf"#{{1,{level}}} ", line):
            end = offset
            break
        offset += len(line)
    assert start is not None, f"README.md has no heading {heading!r}"
    return start, end if end is not None else len(README)


def _matches(pattern: str, heading: str | None = None) -> list[re.Match]:
    start, end = _section(heading) if heading else (0, len(README))
    return list(_loose(pattern).finditer(README, start, end))


def _one(pattern: str, heading: str | None = None) -> re.Match:
    found = _matches(pattern, heading)
    where = f"section {heading!r} of README.md" if heading else "README.md"
    assert len(found) == 1, f"{where}: expected one sentence matching {pattern!r}, found {len(found)}"
    return found[0]


def _paragraph(starts_with: str) -> tuple[int, int]:
    """Offsets of the README paragraph (and the table right after it) that starts with ``starts_with``."""
    start = README.index(starts_with)
    end = README.find("\n\n", start)
    if README.startswith("| ", end + 2):  # the paragraph introduces a table: include it
        end = README.find("\n\n", end + 2)
    return start, end


def _table(header_starts_with: str) -> list[tuple[int, list[str]]]:
    """Rows of the README table whose header row starts with ``header_starts_with``: (line number, cells)."""
    start = README.index(header_starts_with)
    rows = []
    offset = start
    for line in README[start:].splitlines(keepends=True):
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not all(set(cell) <= set("-:") for cell in cells):  # skip the |---| row
            rows.append((_line(offset), cells))
        offset += len(line)
    return rows


# ---------------------------------------------------------------------------------------------- sources
@cache
def _config() -> dict[str, Any]:
    return yaml.safe_load(MAIN_CONFIG.read_text())


@cache
def _results(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / name).read_text())


def _yaml_minutes() -> str:
    found = re.findall(r"within (\d+) minutes including both evaluations", MAIN_CONFIG.read_text())
    assert len(found) == 1, f"{MAIN_CONFIG.name}: expected one 'within N minutes including both evaluations' comment"
    return found[0]


def _problems_per_step() -> int:
    c = _config()
    return c["per_device_train_batch_size"] * c["gradient_accumulation_steps"] // c["num_generations"]


def _pct(result: dict, digits: int = 1) -> str:
    return f"{100 * result['accuracy']:.{digits}f}"


def _ci(result: dict) -> tuple[str, str]:
    return f"{100 * result['accuracy_ci_low']:.1f}", f"{100 * result['accuracy_ci_high']:.1f}"


def _transfer(file: str, model: str, key: str) -> dict:
    return _results(file)["results"][model][key]


def _change(file: str, model: str, source: str, proxy: str = "arith_L1-3") -> str:
    before = _transfer(file, "untrained", f"{proxy}/{source}")
    after = _transfer(file, model, f"{proxy}/{source}")
    return f"{100 * (after['accuracy'] - before['accuracy']):+.1f}"


def _mcnemar(before: list, after: list) -> float:
    """Exact two-sided McNemar p (as ``benchmarks/common.py`` computes it) on paired per-problem outcomes."""
    gained = sum(1 for b, a in zip(before, after, strict=True) if a and not b)
    lost = sum(1 for b, a in zip(before, after, strict=True) if b and not a)
    n = gained + lost
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(gained, lost) + 1)) / 2**n)


def _p_value(file: str, model: str, source: str, proxy: str = "arith_L1-3") -> float:
    before = _transfer(file, "untrained", f"{proxy}/{source}")["correct_by_problem"]
    return _mcnemar(before, _transfer(file, model, f"{proxy}/{source}")["correct_by_problem"])


def _same_p(written: str, value: float) -> bool:
    """``written`` is ``value`` rounded to as many significant digits as ``written`` shows."""
    digits = len(written.lower().split("e")[0].replace(".", "").lstrip("0")) or 1
    return float(f"{value:.{digits}g}") == float(written)


def _memory_gib(file: str, processes: int = 1) -> str:
    rows = [row for row in _results(file)["rows"] if row["processes"] == processes]
    assert rows, f"benchmarks/results/{file}: no row with {processes} process(es)"
    return f"{max(row['peak_rss_bytes'] for row in rows) / GIB:.2f}"


# ---------------------------------------------------------------------------------------------- the facts
@dataclass(frozen=True)
class Fact:
    """A README sentence (a regex; its groups are the figures) and what the figures must be, from ``source``."""

    name: str
    pattern: str
    expected: Callable[[], tuple]
    source: str
    heading: str | None = None


YAML = "recipes/configs/reinforce_gsm8k_cpu.yaml"
GUIDED = "few_shot_transfer_guided.json"
TRANSFER = "few_shot_transfer.json"
FALLBACK = "few_shot_transfer_fallback.json"
ALTERNATING = "few_shot_transfer_alternating.json"
MAIN_JOB = "few_shot_transfer_main_job.json"
LEARNING = "learning_per_cpu_hour.json"
L1 = "arithmetic:level=1"


def _step_time(job: str, field: str) -> Any:
    return json.loads((RESULTS / "step_time.json").read_text())["jobs"][job][field]


def _sharded_memory(key: str, mode: str) -> float:
    rows = json.loads((RESULTS / "sharded_memory.json").read_text())["mib"][mode][0]
    return rows[key] if key in rows else sum(rows[k] for k in ("weights", "gradients", "optimizer_state"))


def _memory_ratio(key: str) -> str:
    """The results file's own FSDP2/DDP ratio (over both processes); the state's from its three rows."""
    ratios = json.loads((RESULTS / "sharded_memory.json").read_text())["fsdp2_over_ddp"]
    value = ratios[key] if key in ratios else _sharded_memory(key, "fsdp2") / _sharded_memory(key, "ddp")
    return f"{value:.2f}"


def _forcing_ratios(forcing: bool) -> str:
    """The stepwise/plain ratio of each run, as the README lists them."""
    results = _results("vllm_forced_tokens.json")["results"]
    runs = next(r["runs"] for r in results if r["forcing"] is forcing)
    return ", ".join(f"{run['ratio']:.2f}" for run in runs)


def _dtype_figures() -> tuple:
    """Median stepwise and plain tokens/s of the bfloat16 and float32 engines, their ratios and the per-run ratios."""
    results = {r["dtype"]: r["runs"] for r in _results("vllm_dtype.json")["results"]}

    def tokens(dtype: str, kind: str) -> float:
        return statistics.median(run[f"{kind}_tokens_per_second"] for run in results[dtype])

    def ratios(dtype: str) -> str:
        return ", ".join(f"{run['ratio']:.2f}" for run in results[dtype])

    return (
        round(tokens("bfloat16", "stepwise")),
        round(tokens("float32", "stepwise")),
        f"{tokens('bfloat16', 'stepwise') / tokens('float32', 'stepwise'):.2f}",
        round(tokens("bfloat16", "plain")),
        round(tokens("float32", "plain")),
        f"{tokens('bfloat16', 'plain') / tokens('float32', 'plain'):.2f}",
        ratios("bfloat16"),
        ratios("float32"),
    )


def _study_accuracy(file: str, *configs: str, proxy: str = "arith_L1-3") -> tuple[str, ...]:
    """A study's accuracy on ``proxy`` before training, then after each of ``configs``, as the README writes it."""
    study = _results(file)
    return (_pct(study["before"][proxy]), *(_pct(study["runs"][name]["after"][proxy]) for name in configs))


def _engine_study() -> tuple[str, ...]:
    """Levels 1-3 after 6.5 min: the bfloat16 engine's three runs, then the float32 engine's two."""
    first, second = _results("main_job_study_engine.json")["runs"], _results("main_job_study_engine_gqa.json")["runs"]
    bf16 = (first["bf16_engine"], first["bf16_engine_seed43"], second["bf16_engine"])
    return tuple(_pct(run["after"]["arith_L1-3"]) for run in (*bf16, first["base"], second["base"]))


FACTS = [
    Fact(
        "loss types: the main job's levers side by side",
        r"levels 1-3 went from (\d+\.\d)% to (\d+\.\d)% with `dapo`, (\d+\.\d)% with `grpo`,"
        r" (\d+\.\d)% with `dr_grpo`, (\d+\.\d)% with two iterations per batch"
        r" \((\d+\.\d)% with `epsilon_high` 0.28, (\d+\.\d)% with `cispo`\) and"
        r" (\d+\.\d)% with `dynamic_sampling`",
        lambda: _study_accuracy(
            "main_job_study_losses.json",
            "base",
            "loss_grpo",
            "loss_dr_grpo",
            "two_iterations",
            "two_iterations_clip_higher",
            "two_iterations_cispo",
            "dynamic_sampling",
        ),
        "main_job_study_losses.json",
    ),
    Fact(
        "vLLM: the bfloat16 engine under the study's budget",
        r"levels 1-3 reached (\d+\.\d)%, (\d+\.\d)% and (\d+\.\d)% with it"
        r" against (\d+\.\d)% and (\d+\.\d)% with float32",
        _engine_study,
        "main_job_study_engine.json, main_job_study_engine_gqa.json",
    ),
    Fact(
        "vLLM: the engine's weights in bfloat16 against float32",
        r"stepwise (\d+) tokens/s against (\d+) in float32 \((\d\.\d\d)x\), plain (\d+) against (\d+) \((\d\.\d\d)x\),"
        r" stepwise/plain per run (\d\.\d\d, \d\.\d\d, \d\.\d\d) against (\d\.\d\d, \d\.\d\d, \d\.\d\d)",
        _dtype_figures,
        "vllm_dtype.json",
    ),
    Fact(
        "vLLM: tokens appended in place against resent requests",
        r"stepwise/plain per run (\d\.\d\d, \d\.\d\d, \d\.\d\d) against (\d\.\d\d, \d\.\d\d, \d\.\d\d)\.",
        lambda: (_forcing_ratios(True), _forcing_ratios(False)),
        "vllm_forced_tokens.json",
    ),
    Fact(
        "sharded memory: FSDP2 against DDP per process",
        r"weights, gradients and AdamW state (\d+) MiB under\nFSDP2 against (\d+) MiB under DDP \(ratio (\d\.\d\d)\),"
        r" the reference (\d+) against (\d+) MiB \((\d\.\d\d)[^)]*\), (\d+) against (\d+) MiB in all"
        r" \((\d\.\d\d)\); live memory at the end (\d\.\d\d) of DDP's, but peak\nRSS (\d\.\d\d) of it",
        lambda: (
            round(_sharded_memory("state", "fsdp2")),
            round(_sharded_memory("state", "ddp")),
            _memory_ratio("state"),
            round(_sharded_memory("reference", "fsdp2")),
            round(_sharded_memory("reference", "ddp")),
            _memory_ratio("reference"),
            round(_sharded_memory("total", "fsdp2")),
            round(_sharded_memory("total", "ddp")),
            _memory_ratio("total"),
            _memory_ratio("rss_at_end_trimmed"),
            _memory_ratio("peak_rss"),
        ),
        "sharded_memory.json",
        "### Several processes, models too big for one device, several machines",
    ),
    Fact(
        "the README environment's step time against the main job's",
        r"median (\d+\.\d) s \((\d+\.\d) tokens per episode\) against (\d+\.\d) s \((\d+\.\d)\) for the main job",
        lambda: (
            round(_step_time("readme_env", "median_step_s"), 1),
            round(_step_time("readme_env", "tokens_per_episode"), 1),
            round(_step_time("main_job", "median_step_s"), 1),
            round(_step_time("main_job", "tokens_per_episode"), 1),
        ),
        "step_time.json",
        "### Write your own environment",
    ),
    # "Two commands": what `make train` runs
    Fact(
        "make train: steps and episodes",
        r"(\d+) steps of stepwise REINFORCE on the embedded SmolLM2-135M-Instruct \((\d+) problems x (\d+) episodes"
        r" per step, generation on colocated vLLM, bf16 autocast for training, reference guidance\)",
        lambda: (_config()["max_steps"], _problems_per_step(), _config()["num_generations"]),
        YAML,
        "## Two commands",
    ),
    Fact(
        "make train: the first curriculum threshold holds level 1",
        r"its first threshold, (\d\.\d+), holds it on level 1 for these (\d+) steps",
        lambda: (_config()["curriculum_thresholds"][0], _config()["max_steps"]),
        YAML,
        "## Two commands",
    ),
    Fact(
        "make train: the evaluation sets",
        r"evaluated before and after on (\d+) GSM8K test problems with <= 2 calculations, (\d+) generated problems"
        r" of levels 1-3 and (\d+) GSM8K test problems",
        lambda: (_config()["eval_limit"],) * 3,
        YAML,
        "## Two commands",
    ),
    Fact(
        "make train: the time budget",
        r"within (\d+) minutes on 2 cores including both evaluations",
        lambda: (_yaml_minutes(),),
        YAML + " (its 'within N minutes' comment)",
        "## Two commands",
    ),
    Fact(
        "make train: peak memory of the main job study",
        r"the (\d+)-minute runs of the main job's configurations in `benchmarks/results/main_job_study.json` peaked"
        r" at (\d+\.\d)-(\d+\.\d) GiB RSS",
        lambda: (
            f"{_results('main_job_study.json')['arguments']['budget_minutes']:g}",
            f"{min(r['peak_rss_bytes'] for r in _results('main_job_study.json')['runs'].values()) / GIB:.1f}",
            f"{max(r['peak_rss_bytes'] for r in _results('main_job_study.json')['runs'].values()) / GIB:.1f}",
        ),
        "benchmarks/results/main_job_study.json",
        "## Two commands",
    ),
    Fact(
        "recipes table: the main job's time budget",
        r"\| embedded model, CPU, curriculum, within (\d+) min including both evaluations \(the main job\) \|",
        lambda: (_yaml_minutes(),),
        YAML + " (its 'within N minutes' comment)",
        "## Recipes",
    ),
    # "Results on this machine": the main job's configuration
    Fact(
        "results: the main job's steps, seed, episodes, temperature",
        r"\*\*The main job\*\* \(`recipes/configs/reinforce_gsm8k_cpu.yaml`, seed (\d+)\): (\d+) optimizer steps of"
        r" stepwise REINFORCE \((\d+) problems x (\d+) episodes per step, temperature (\d\.\d+), calculator on\)",
        lambda: (
            _config()["seed"],
            _config()["max_steps"],
            _problems_per_step(),
            _config()["num_generations"],
            _config()["temperature"],
        ),
        YAML,
        "## Results on this machine",
    ),
    Fact(
        "results: reference guidance replaces one of a failed group",
        r"\*\*reference guidance\*\* \(a group whose (\d+) episodes all fail",
        lambda: (_config()["num_generations"] if _config()["reference_guidance"] else "off",),
        YAML,
        "## Results on this machine",
    ),
    Fact(
        "results: micro-batches, threshold, steps, worked examples",
        r"one micro-batch of\s+(\d+) episodes, generated level 1 held for the whole run"
        r" \(curriculum threshold (\d\.\d+),"
        r" which the rolling training accuracy does not reach in (\d+) steps\), and (\d+) worked examples in every"
        r" prompt: a short (GSM8K) train solution, then a generated one-step one \(`max_example_chars: (\d+)`\)",
        lambda: (
            _config()["per_device_train_batch_size"],
            _config()["curriculum_thresholds"][0],
            _config()["max_steps"],
            _config()["n_few_shot"],
            "GSM8K" if _config()["few_shot_dataset_name"] == ["gsm8k", "arithmetic:level=1"] else "not",
            _config()["max_example_chars"],
        ),
        YAML,
        "## Results on this machine",
    ),
    Fact(
        "results: the main job's table header",
        r"\| before \| after (\d+) steps \|",
        lambda: (_config()["max_steps"],),
        YAML,
        "## Results on this machine",
    ),
    Fact(
        "results: the trained model in the results file",
        r"models `untrained` and `(main_job_(\d+)_steps)`, few-shot\s+source `evaluate_default`",
        lambda: (
            next(m for m in _results(MAIN_JOB)["results"] if m.startswith("main_job_")),
            _config()["max_steps"],
        ),
        f"benchmarks/results/{MAIN_JOB} and {YAML}",
        "## Results on this machine",
    ),
    Fact(
        "evaluate: the fallback worked examples against 2 generated ones and the former fallback",
        r"untrained model scores (\d+\.\d)% under them \((\d+\.\d)% under 2 generated examples, (\d+\.\d)% under the"
        r" GSM8K examples of any length shown before\) and a model trained with 2 short GSM8K examples (\d+\.\d)%"
        r" \((\d+\.\d)% and (\d+\.\d)%;",
        lambda: tuple(
            _pct(_transfer(FALLBACK, model, f"arith_L1-3/{source}"))
            for model in ("untrained", "main_job_30_steps")
            for source in ("evaluate_default", "level1", "gsm8k_any_length")
        ),
        f"benchmarks/results/{FALLBACK}",
        "## Evaluation",
    ),
    Fact(
        "results: the main job's model under 2 generated and 2 short GSM8K examples",
        r"the same model goes from (\d+\.\d)% to\s+(\d+\.\d)% on levels 1-3 \(([+-]\d+\.\d) points\),"
        r" and under 2 short GSM8K examples from (\d+\.\d)% to (\d+\.\d)%\.",
        lambda: (
            _pct(_transfer(MAIN_JOB, "untrained", "arith_L1-3/level1")),
            _pct(_transfer(MAIN_JOB, "main_job_30_steps", "arith_L1-3/level1")),
            _change(MAIN_JOB, "main_job_30_steps", "level1"),
            _pct(_transfer(MAIN_JOB, "untrained", "arith_L1-3/gsm8k_short")),
            _pct(_transfer(MAIN_JOB, "main_job_30_steps", "arith_L1-3/gsm8k_short")),
        ),
        f"benchmarks/results/{MAIN_JOB}",
        "## Results on this machine",
    ),
    Fact(
        "results: trained with short GSM8K examples against the alternating pair",
        r"the model reached (\d+\.\d)% and (\d+\.\d)% on levels 1-3 under those two prompts; trained with the pair,"
        r" (\d+\.\d)% and (\d+\.\d)% \(untrained: (\d+\.\d)% and (\d+\.\d)%\)\. That run held less under GSM8K-only"
        r" prompts \((\d+\.\d)% against (\d+\.\d)% under short GSM8K examples;",
        lambda: tuple(
            _pct(_transfer(ALTERNATING, model, f"arith_L1-3/{source}"))
            for model, source in (
                ("main_job_30_steps", "level1"),
                ("main_job_30_steps", "evaluate_default"),
                ("alternating_30_steps", "level1"),
                ("alternating_30_steps", "evaluate_default"),
                ("untrained", "level1"),
                ("untrained", "evaluate_default"),
                ("alternating_30_steps", "main_job"),
                ("main_job_30_steps", "main_job"),
            )
        ),
        f"benchmarks/results/{ALTERNATING}",
        "## Results on this machine",
    ),
    Fact(
        "results: the previous main job on levels 1-3",
        r"`main_job_30_steps` in `benchmarks/results/few_shot_transfer.json`\) reached (\d+\.\d)% \((\d+)/(\d+)\)",
        lambda: (
            _pct(_transfer(TRANSFER, "main_job_30_steps", "arith_L1-3/main_job")),
            _transfer(TRANSFER, "main_job_30_steps", "arith_L1-3/main_job")["correct"],
            _transfer(TRANSFER, "main_job_30_steps", "arith_L1-3/main_job")["total"],
        ),
        f"benchmarks/results/{TRANSFER}",
        "## Results on this machine",
    ),
    Fact(
        "results: the previous main job's changes under three sources",
        r"\(levels 1-3, 198 problems: ([+-]\d+\.\d), ([+-]\d+\.\d) and ([+-]\d+\.\d) points, McNemar p",
        lambda: tuple(_change(TRANSFER, "main_job_30_steps", s) for s in ("level1", "main_job", "evaluate_default")),
        f"benchmarks/results/{TRANSFER}",
        "## Results on this machine",
    ),
    Fact(
        "results: the guided main job's changes and counts under three sources",
        r"gains more under each: ([+-]\d+\.\d), ([+-]\d+\.\d) and ([+-]\d+\.\d) points \(p [^;]*; (\d+), (\d+) and"
        r" (\d+) of 198 correct",
        lambda: (
            tuple(_change(GUIDED, "guided_main_job_30_steps", s) for s in ("level1", "main_job", "evaluate_default"))
            + tuple(
                _transfer(GUIDED, "guided_main_job_30_steps", f"arith_L1-3/{s}")["correct"]
                for s in ("level1", "main_job", "evaluate_default")
            )
        ),
        f"benchmarks/results/{GUIDED}",
        "## Results on this machine",
    ),
    Fact(
        "results: GSM8K proxy range for the main job's models",
        r"GSM8K test problems with <= 2 calculations stay at (\d+\.\d)-(\d+\.\d)% for the untrained and the guided"
        r" model under every source",
        lambda: (
            f"{min(100 * r['accuracy'] for r in _gsm8k_2step_results()):.1f}",
            f"{max(100 * r['accuracy'] for r in _gsm8k_2step_results()):.1f}",
        ),
        f"benchmarks/results/{GUIDED}",
        "## Results on this machine",
    ),
    # benchmarks quoted in the README
    Fact(
        "benchmarks: memory of a training step",
        r"A training step of (\d+) episodes x (\d+) tokens in micro-batches of (\d+) peaks at (\d+\.\d\d) GiB with"
        r" LoRA, (\d+\.\d\d) GiB with 4-bit LoRA, (\d+\.\d\d) GiB with full weights \((\d+\.\d\d) GiB per process"
        r" with two DDP processes\)",
        lambda: (
            _results("memory_full_micro_batch2.json")["batch"]["episodes"],
            _results("memory_full_micro_batch2.json")["batch"]["completion_tokens"],
            _results("memory_full_micro_batch2.json")["batch"]["micro_batch"],
            _memory_gib("memory_lora_micro_batch2.json"),
            _memory_gib("memory_lora_4bit_micro_batch2.json"),
            _memory_gib("memory_full_micro_batch2.json"),
            _memory_gib("memory_full_micro_batch2.json", processes=2),
        ),
        "benchmarks/results/memory_{lora,lora_4bit,full}_micro_batch2.json",
        "## Results on this machine",
    ),
    Fact(
        "benchmarks: learning per CPU hour",
        r"Learning per CPU hour, side by side, (\d+) minutes on one core each, same problems and reward: the stepwise"
        r" trainer makes (\d+) optimizer steps to GRPO's (\d+) and lifts accuracy on (\d+) held-out generated"
        r" problems from (\d+\.\d)% to (\d+\.\d)% \(95% CI (\d+\.\d)-(\d+\.\d)\); GRPO ends at (\d+\.\d)% \(stepwise"
        r" protocol\) / (\d+\.\d)% \(its own single-turn protocol, from (\d+\.\d)%\)",
        lambda: (
            f"{_results(LEARNING)['arguments']['budget_minutes']:g}",
            _results(LEARNING)["runs"]["stepwise"]["steps"],
            _results(LEARNING)["runs"]["grpo"]["steps"],
            _results(LEARNING)["eval_problems"][L1],
            _pct(_results(LEARNING)["before"][L1]["stepwise"]),
            _pct(_results(LEARNING)["runs"]["stepwise"]["after"][L1]["stepwise"]),
            *_ci(_results(LEARNING)["runs"]["stepwise"]["after"][L1]["stepwise"]),
            _pct(_results(LEARNING)["runs"]["grpo"]["after"][L1]["stepwise"]),
            _pct(_results(LEARNING)["runs"]["grpo"]["after"][L1]["direct"]),
            _pct(_results(LEARNING)["before"][L1]["direct"]),
        ),
        f"benchmarks/results/{LEARNING}",
        "## Results on this machine",
    ),
    Fact(
        "benchmarks: rollout throughput",
        r"batched stepwise rollout (\d+\.\d) policy tokens/s on (\d+) GSM8K episodes \(4-shot\), (\d+\.\d)x the"
        r" original one-episode loop and (\d+\.\d)x TRL `GRPOTrainer`'s",
        lambda: (
            f"{_results('rollout_throughput.json')['systems']['a']['tokens_per_second']:.1f}",
            _results("rollout_throughput.json")["systems"]["a"]["episodes"],
            f"{_results('rollout_throughput.json')['ratios']['a_over_b_tokens_per_second']:.1f}",
            f"{_results('rollout_throughput.json')['ratios']['a_over_c_tokens_per_second']:.1f}",
        ),
        "benchmarks/results/rollout_throughput.json",
        "## Results on this machine",
    ),
    Fact(
        "benchmarks: bf16 autocast speed",
        r"bfloat16 autocast makes the CPU training step (\d+\.\d\d)x faster for a [\d.]+% change of the loss, but"
        r" slows the transformers engine's decoding \((\d+\.\d\d)x\)",
        lambda: (
            f"{_results('precision.json')['comparison']['train_step_speedup']:.2f}",
            f"{_results('precision.json')['comparison']['rollout_speedup']:.2f}",
        ),
        "benchmarks/results/precision.json",
        "## Results on this machine",
    ),
    Fact(
        "engines: throughput of the transformers and vLLM engines",
        r"transformers engine (\d+\.\d) tokens/s \((\d+) s\), vLLM stepwise \*\*(\d+) tokens/s\*\* \((\d+) s,"
        r" (\d+\.\d)x\), plain vLLM `LLM.generate` of whole solutions without the calculator (\d+) tokens/s"
        r" \((\d+) s\): stepwise reaches \*\*(\d\.\d\d)x\*\* of it",
        lambda: (
            f"{_engines()['a']['tokens_per_second']:.1f}",
            f"{_engines()['a']['seconds']:.0f}",
            f"{_engines()['e']['tokens_per_second']:.0f}",
            f"{_engines()['e']['seconds']:.0f}",
            f"{_results('rollout_throughput_engines.json')['ratios']['e_over_a_tokens_per_second']:.1f}",
            f"{_engines()['f']['tokens_per_second']:.0f}",
            f"{_engines()['f']['seconds']:.0f}",
            f"{_results('rollout_throughput_engines.json')['ratios']['e_over_f_tokens_per_second']:.2f}",
        ),
        "benchmarks/results/rollout_throughput_engines.json",
        "### Generation engines: transformers or vLLM",
    ),
    Fact(
        "evaluation: grader acceptance",
        r"in (\d+) such forms \(([\d,]+)/([\d,]+) accepted\) and that wrong answers are rejected"
        r" \(([\d,]+)/([\d,]+)\)",
        lambda: _grader_counts(),
        "benchmarks/results/grader_acceptance.json",
        "## Evaluation",
    ),
]


def _gsm8k_2step_results() -> list[dict]:
    results = _results(GUIDED)["results"]
    return [
        result
        for model in ("untrained", "guided_main_job_30_steps")
        for key, result in results[model].items()
        if key.startswith("gsm8k_2step/")
    ]


def _engines() -> dict:
    return _results("rollout_throughput_engines.json")["systems"]


def _grader_counts() -> tuple:
    results = _results("grader_acceptance.json")["results"]
    forms = {form for dataset in results for form in dataset["accepted"]}
    accepted = [sum(v[i] for d in results for v in d["accepted"].values()) for i in (0, 1)]
    rejected = [sum(v[i] for d in results for v in d["rejected"].values()) for i in (0, 1)]
    return len(forms), *(f"{n:,}" for n in accepted + rejected)


@pytest.mark.parametrize("fact", FACTS, ids=[f.name for f in FACTS])
def test_readme_figure_matches_its_source(fact: Fact):
    match = _one(fact.pattern, fact.heading)
    written = match.groups()
    expected = tuple(str(v) for v in fact.expected())
    assert written == expected, (
        f"README.md line {_line(match.start())} ({fact.name}) says {written}, {fact.source} says {expected}"
    )


# ---------------------------------------------------------------------------------------------- the main job
def test_main_job_step_and_minute_figures_have_one_value():
    """No stale count survives elsewhere in the main job's paragraphs: every 'N steps' is the config's max_steps,
    every 'N min' the config's time budget, and every memory figure the main job study's."""
    steps, minutes = str(_config()["max_steps"]), _yaml_minutes()
    study = _results("main_job_study.json")["runs"].values()
    memory = {
        f"{min(r['peak_rss_bytes'] for r in study) / GIB:.1f}",
        f"{max(r['peak_rss_bytes'] for r in study) / GIB:.1f}",
    }
    spans = {
        "## Two commands": _section("## Two commands"),
        "the main job's paragraph": _paragraph("**The main job**"),
    }
    for where, (start, end) in spans.items():
        for m in _loose(r"(\d+) (?:optimizer )?steps\b").finditer(README, start, end):
            assert m.group(1) == steps, f"README.md line {_line(m.start())} ({where}): {m.group(0)!r}, {YAML}: {steps}"
        for m in _loose(r"(\d+) min(?:utes)?\b").finditer(README, start, end):
            assert m.group(1) == minutes, (
                f"README.md line {_line(m.start())} ({where}): {m.group(0)!r}, {YAML}: {minutes}"
            )
        for m in re.finditer(r"(\d+(?:\.\d+)?) ?(?:GB|GiB)\b", README[start:end]):
            assert m.group(1) in memory, (
                f"README.md line {_line(start + m.start())} ({where}): {m.group(0)!r}, not a figure of"
                f" benchmarks/results/main_job_study.json ({sorted(memory)})"
            )


def test_main_job_evaluation_sets_are_the_configs():
    """The README lists the main job's evaluation sets in the config's order: gsm8k_easy, levels 1-3, GSM8K."""
    config = _config()
    assert config["eval_dataset_name"][0] == "gsm8k_easy", f"{YAML}: eval_dataset_name {config['eval_dataset_name']}"
    assert re.fullmatch(r"arithmetic:level=1-3,n=(\d+)", config["eval_dataset_name"][1]), config["eval_dataset_name"]
    assert config["eval_dataset_name"][1].endswith(f"n={config['eval_limit']}"), config["eval_dataset_name"]
    assert config["eval_dataset_name"][2] == "gsm8k", f"{YAML}: eval_dataset_name {config['eval_dataset_name']}"
    assert config["use_vllm"] and config["bf16"] and config["reference_guidance"] and config["calculator"], (
        f"README.md ('Two commands', 'Results on this machine') says colocated vLLM, bf16 autocast, reference"
        f" guidance and the calculator; {YAML} disagrees"
    )


def test_results_file_evaluated_the_main_job_under_its_own_limits():
    """The README says the results file evaluated the main job's model under the run's prompt and limits."""
    config, arguments = _config(), _results(MAIN_JOB)["arguments"]
    pairs = {
        "shots / n_few_shot": (arguments["shots"], config["n_few_shot"]),
        "eval_max_steps / max_episode_steps": (arguments["eval_max_steps"], config["max_episode_steps"]),
        "eval_max_step_tokens / max_step_tokens": (arguments["eval_max_step_tokens"], config["max_step_tokens"]),
        "eval_max_tokens / eval_max_episode_tokens": (arguments["eval_max_tokens"], config["eval_max_episode_tokens"]),
    }
    for name, (used, configured) in pairs.items():
        assert used == configured, f"benchmarks/results/{MAIN_JOB} ({name}) used {used}, {YAML} says {configured}"


_ROW = r"(\d+\.\d)% \((\d+)/(\d+), (?:95% )?CI (\d+\.\d)-(\d+\.\d)\)"


def _formatted(result: dict) -> tuple[str, ...]:
    return (_pct(result), str(result["correct"]), str(result["total"]), *_ci(result))


def test_main_job_table_matches_the_results_file():
    rows = _table("| evaluation (greedy, calculator on, the run's 2 worked examples")
    proxies = {}
    for line, cells in rows[1:]:
        proxy = re.search(r"`(gsm8k_2step|arith_L1-3)", cells[0])
        assert proxy, f"README.md line {line}: the row does not name its proxy (`gsm8k_2step` or `arith_L1-3`)"
        proxies[proxy.group(1)] = line
        for column, model in ((1, "untrained"), (2, "main_job_30_steps")):
            m = re.fullmatch(_ROW, cells[column].replace("**", ""))
            assert m, f"README.md line {line}: cell {cells[column]!r} is not 'P% (k/n, CI lo-hi)'"
            expected = _formatted(_transfer(MAIN_JOB, model, f"{proxy.group(1)}/evaluate_default"))
            assert m.groups() == expected, (
                f"README.md line {line} ({proxy.group(1)}, {model}) says {m.groups()},"
                f" benchmarks/results/{MAIN_JOB} says {expected}"
            )
    assert set(proxies) == {"gsm8k_2step", "arith_L1-3"}, f"README.md: the main job's table rows: {sorted(proxies)}"


def test_level1_transfer_table_matches_the_results_file():
    rows = _table("| worked examples in the evaluation prompt |")
    header_line, header = rows[0]
    models = ["untrained"]
    for cell in header[2:]:
        m = re.search(r"\((\d+) steps\)", cell)
        assert m, f"README.md line {header_line}: column {cell!r} does not say its steps"
        kind = "level1_examples" if "level-1 examples" in cell else "main_job"
        models.append(f"{kind}_{m.group(1)}_steps")
    available = set(_results(TRANSFER)["results"])
    assert set(models) <= available, (
        f"README.md line {header_line}: {models}, benchmarks/results/{TRANSFER}: {available}"
    )
    sources = {"generated level-1": "level1", "short GSM8K": "main_job", "trl-stepwise evaluate": "evaluate_default"}
    seen = set()
    for line, cells in rows[1:]:
        source = next((s for key, s in sources.items() if key in cells[0]), None)
        assert source, f"README.md line {line}: which few-shot source is {cells[0]!r}?"
        seen.add(source)
        for cell, model in zip(cells[1:], models, strict=True):
            m = re.fullmatch(r"(\d+)% \((\d+)/(\d+)\)", cell.replace("**", ""))
            assert m, f"README.md line {line}: cell {cell!r} is not 'P% (k/n)'"
            level = _transfer(TRANSFER, model, f"arith_L1-3/{source}")["per_level"]["1"]
            expected = (f"{100 * level['correct'] / level['total']:.0f}", str(level["correct"]), str(level["total"]))
            assert m.groups() == expected, (
                f"README.md line {line} ({source}, {model}) says {m.groups()}, benchmarks/results/{TRANSFER} says"
                f" {expected}"
            )
    assert seen == set(sources.values()), f"README.md: the level-1 transfer table's rows: {sorted(seen)}"


@pytest.mark.parametrize(
    ("pattern", "file", "model"),
    [
        (r"and [+-]\d+\.\d points, McNemar p ([\d.e-]+), ([\d.e-]+), ([\d.e-]+);", TRANSFER, "main_job_30_steps"),
        (r"and [+-]\d+\.\d points \(p ([\d.e-]+), ([\d.e-]+), ([\d.e-]+);", GUIDED, "guided_main_job_30_steps"),
    ],
)
def test_transfer_p_values_match_the_results_file(pattern, file, model):
    match = _one(pattern)
    for written, source in zip(match.groups(), ("level1", "main_job", "evaluate_default"), strict=True):
        value = _p_value(file, model, source)
        assert _same_p(written, value), (
            f"README.md line {_line(match.start())}: McNemar p {written} ({model}, {source}), from"
            f" benchmarks/results/{file}: {value:.2g}"
        )


# ---------------------------------------------------------------------------------------------- counts from code
def test_bad_input_count_is_the_number_of_cases():
    match = _one(r"`python tests/bad_inputs.py` runs (\d+) such cases")
    assert int(match.group(1)) == len(CASES), (
        f"README.md line {_line(match.start())} says {match.group(1)} cases,"
        f" tests/bad_inputs.py CASES has {len(CASES)}"
    )
    for m in _loose(r"(\d+) (?:such |bad )?(?:cases|bad inputs)\b").finditer(README):
        assert int(m.group(1)) == len(CASES), (
            f"README.md line {_line(m.start())}: {m.group(0)!r}, tests/bad_inputs.py CASES has {len(CASES)}"
        )


def test_vllm_engine_problem_count_is_the_tests():
    match = _one(r"\(`tests/test_vllm_engine.py`, (\d+) GSM8K problems\)")
    source = (REPO / "tests" / "test_vllm_engine.py").read_text()
    limits = re.findall(r'load_math_dataset\("gsm8k", split="test", limit=(\d+)\)', source)
    assert limits == [match.group(1)], (
        f"README.md line {_line(match.start())} says {match.group(1)} GSM8K problems, tests/test_vllm_engine.py"
        f" loads {limits}"
    )


def test_test_files_and_functions_named_in_the_readme_exist():
    for m in re.finditer(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", README):
        path = REPO / m.group(1)
        assert path.is_file(), f"README.md line {_line(m.start())}: {m.group(1)} does not exist"
        if m.group(2):
            assert re.search(rf"^def {m.group(2)}\(", path.read_text(), re.M), (
                f"README.md line {_line(m.start())}: {m.group(1)} has no test {m.group(2)}"
            )


def _matrix_row(cell) -> list[str]:
    if cell.refusal:
        verified = f"refused in one line: {cell.refusal}"
    elif cell.processes == 2:
        verified = "CPU, 2 processes (DDP, gloo)"
    else:
        verified = "CPU"
    names = (cell.engine, cell.weights, cell.env, cell.sampling)
    return [*(name.replace("_", " ") for name in names), str(cell.processes), verified]


def test_combination_matrix_table_lists_every_cell():
    rows = _table("| engine | weights | environment | sampling | processes | verified |")
    written = [cells for _, cells in rows[1:]]
    expected = [_matrix_row(cell) for cell in CELLS]
    assert len(written) == len(expected), (
        f"README.md line {rows[0][0]}: the matrix table has {len(written)} rows, tests/matrix_cells.py CELLS has"
        f" {len(expected)}"
    )
    for (line, cells), row in zip(rows[1:], expected, strict=True):
        assert cells == row, f"README.md line {line} says {cells}, tests/matrix_cells.py CELLS says {row}"


def test_combination_matrix_figures_are_the_cells():
    source = (REPO / "tests" / "matrix_cells.py").read_text()
    steps = re.findall(r"^\s+max_steps=(\d+),", source, re.M)
    match = _one(r"A cell that trains runs (\d+) optimizer steps on the embedded model")
    assert [match.group(1)] == steps, (
        f"README.md line {_line(match.start())} says {match.group(1)} steps, tests/matrix_cells.py trains {steps}"
    )
    for pattern in (
        r"within (\d\.\d+) per token after an optimizer step",
        r"below (\d\.\d+) in every cell that trains",
    ):
        match = _one(pattern)
        assert float(match.group(1)) == GAP_TOLERANCE, (
            f"README.md line {_line(match.start())} says {match.group(1)}, tests/matrix_cells.py GAP_TOLERANCE is"
            f" {GAP_TOLERANCE}"
        )


# ---------------------------------------------------------------------------------------------- architecture
def _architecture() -> dict[str, tuple[int, str]]:
    """The architecture table: first column (``x.py`` or ``sub/``) -> (README line, the row's text)."""
    rows = _table("| module | one job |")
    table = {}
    for line, cells in rows[1:]:
        m = re.fullmatch(r"`([\w/.]+)`", cells[0])
        assert m, f"README.md line {line}: the first column {cells[0]!r} is not one `module`"
        table[m.group(1)] = (line, cells[1])
    return table


def _package_modules() -> list[Path]:
    return sorted(
        p.relative_to(PACKAGE)
        for p in PACKAGE.rglob("*.py")
        if p.name != "__init__.py" and "__pycache__" not in p.parts and p.relative_to(PACKAGE).parts[0] != "prompts"
    )


def test_architecture_table_names_every_module():
    table = _architecture()
    text = "\n".join(row for _, row in table.values())
    missing = []
    for module in _package_modules():
        if len(module.parts) == 1:
            named = module.name in table
        else:
            sub = f"{module.parts[0]}/"
            named = (sub in table and f"`{module.name}`" in table[sub][1]) or f"`{module.as_posix()}`" in text
        if not named:
            missing.append(module.as_posix())
    assert not missing, f"README.md, '## Architecture': the table does not name trl_stepwise/{missing}"


def test_architecture_table_names_only_modules_that_exist():
    for name, (line, row) in _architecture().items():
        path = PACKAGE / name
        assert path.is_file() or path.is_dir(), f"README.md line {line}: trl_stepwise/{name} does not exist"
        if name.endswith("/"):
            for file in re.findall(r"`(\w+\.py)`", row):
                assert (path / file).is_file(), f"README.md line {line}: trl_stepwise/{name}{file} does not exist"
