"""The combination matrix: what a user can pick, as cells that train the embedded model for two steps.

Dimensions: engine {transformers, vLLM colocated, vLLM server} x weights {full, LoRA, DoRA, LoRA + modules_to_save,
4-bit QLoRA} x environment {GSM8K stepwise, math with feedback, a TRL tool environment, a user environment of a few
lines} x sampling {temperature only, top_p + top_k} x processes {1, 2 under DDP}. ``CELLS`` covers every pair of
values (pairwise); ``tests/test_combination_matrix.py`` runs them and the README's matrix table lists them.

Each cell either trains (2 optimizer steps: no error, every trainable tensor changed, nothing NaN, the sampler's and
the trainer's log-probs of the sampled tokens agree after an optimizer step) or is refused in one line before any
model loads. Run as a script under ``accelerate launch --multi_gpu --num_processes 2`` it plays a 2-process cell:
``matrix_cells.py CELL[,CELL...] OUT_DIR`` writes ``OUT_DIR/CELL/rank{N}.json``.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import tool_tasks
import torch

ENGINES = ("transformers", "colocate", "server")
WEIGHTS = ("full", "lora", "dora", "lora_modules_to_save", "qlora")
ENVS = ("gsm8k", "math_feedback", "tool", "user")
SAMPLINGS = ("temperature", "top_p_top_k")
GAP_TOLERANCE = 0.05  # mean |log-prob gap| per sampled token after an optimizer step, stricter than the guard's 0.5


@dataclass(frozen=True)
class Cell:
    engine: str
    weights: str
    env: str
    sampling: str
    processes: int = 1

    @property
    def name(self) -> str:
        return f"{self.engine}-{self.weights}-{self.env}-{self.sampling}-{self.processes}p"

    @property
    def refusal(self) -> str | None:
        """Words of the one-line refusal this cell must end with (None: it must train)."""
        if self.engine != "transformers" and self.weights == "qlora":
            return "4/8-bit base"  # checked first: no engine that loads merged weights can serve it
        if self.engine == "server":
            return "no weight-transfer engine"  # CI's CPU server is a plain `vllm serve` (NCCL sync needs CUDA)
        return None


def _c(engine, weights, env, sampling, processes=1) -> Cell:
    return Cell(engine, weights, env, sampling, processes)


CELLS = [
    _c("transformers", "full", "gsm8k", "temperature", 2),
    _c("transformers", "lora", "math_feedback", "top_p_top_k"),
    _c("transformers", "dora", "math_feedback", "top_p_top_k", 2),
    _c("transformers", "dora", "tool", "temperature"),
    _c("transformers", "lora_modules_to_save", "user", "temperature", 2),
    _c("transformers", "lora_modules_to_save", "tool", "top_p_top_k"),
    _c("transformers", "qlora", "gsm8k", "top_p_top_k"),
    _c("transformers", "qlora", "tool", "temperature", 2),
    _c("transformers", "full", "user", "top_p_top_k"),
    _c("colocate", "full", "math_feedback", "temperature"),
    _c("colocate", "lora", "tool", "top_p_top_k"),
    _c("colocate", "dora", "user", "temperature"),
    _c("colocate", "lora_modules_to_save", "gsm8k", "top_p_top_k"),
    _c("colocate", "lora", "gsm8k", "temperature"),
    _c("colocate", "qlora", "user", "temperature"),
    _c("server", "full", "tool", "top_p_top_k", 2),
    _c("server", "lora", "user", "temperature", 2),
    _c("server", "dora", "gsm8k", "top_p_top_k"),
    _c("server", "lora_modules_to_save", "math_feedback", "temperature"),
    _c("server", "qlora", "math_feedback", "top_p_top_k"),
]
BY_NAME = {cell.name: cell for cell in CELLS}
# vLLM colocated in 2 processes: tests/test_vllm_engine.py::test_two_process_training_with_vllm (tiny model)
COVERED_ELSEWHERE = {("colocate", 2)}


def uncovered_pairs(cells: list[Cell]) -> list[tuple]:
    """Pairs of values of two dimensions that no cell holds."""
    dimensions = {
        "engine": ENGINES,
        "weights": WEIGHTS,
        "env": ENVS,
        "sampling": SAMPLINGS,
        "processes": (1, 2),
    }
    names = list(dimensions)
    seen = {(a, getattr(c, a), b, getattr(c, b)) for c in cells for a in names for b in names if a < b}
    seen |= {("engine", e, "processes", p) for e, p in COVERED_ELSEWHERE}
    missing = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            first, second = (a, b) if a < b else (b, a)
            for x in dimensions[first]:
                for y in dimensions[second]:
                    if (first, x, second, y) not in seen:
                        missing.append((first, x, second, y))
    return missing


# ---------------------------------------------------------------------------------------------- environments
class DoublingTask(tool_tasks.DoublingTask):
    """Rewarded for any call: a two-step cell's episodes should get some reward."""

    def get_reward(self) -> float:
        return float(bool(self.calls))


def user_env_class():
    from trl_stepwise.envs import Env

    class ReverseWordEnv(Env):
        """Spell a word backwards; one retry after a hint."""

        max_steps = 3

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.word, self.tries = (options or {})["word"], 0
            return f"Spell '{self.word}' backwards. End with: The answer is: <word>", {}

        def step(self, action):
            if "The answer is:" not in action:
                return "", 0.0, False, False, {}
            guess = action.split("The answer is:")[1].strip()
            correct, self.tries = guess == self.word[::-1], self.tries + 1
            if correct or self.tries == 2:
                return "", float(correct), True, False, {"correct": correct, "final_answer": guess}
            return "No, try again.\n", 0.0, False, False, {}

    return ReverseWordEnv


def length_reward(completions, **kwargs):
    """Varies between episodes, so every group has something to learn from."""
    return [len(c if isinstance(c, str) else c[0]["content"]) / 20 for c in completions]


def cell_dataset(cell: Cell):
    from datasets import Dataset

    from trl_stepwise.data import load_math_dataset

    if cell.env in ("gsm8k", "math_feedback"):
        return load_math_dataset("gsm8k", split="train", limit=16)
    if cell.env == "tool":  # TRL's conversational rows: the prompt as chat messages
        rows = [{"prompt": [{"role": "user", "content": f"What is {n} doubled?"}]} for n in range(3, 19)]
    else:
        words = ["stone", "river", "garden", "apple", "cloud", "paper", "green", "light"]
        rows = [{"question": f"Reverse {w}", "answer": w[::-1], "word": w} for w in words * 2]
    return Dataset.from_list(rows)


# ---------------------------------------------------------------------------------------------- the trainer
def cell_config(cell: Cell, output_dir: Path, server_url: str | None = None):
    from trl_stepwise.trainer import StepwiseReinforceConfig

    settings: dict[str, Any] = dict(
        output_dir=str(output_dir),
        max_steps=2,
        # 4 episodes per step in every cell: 2-process cells play 2 per process (one group each)
        per_device_train_batch_size=4 // cell.processes,
        num_generations=2,
        gradient_accumulation_steps=1,
        max_step_tokens=12,
        max_episode_steps=3,
        max_episode_tokens=24,
        n_few_shot=0,  # short prompts: the cells check mechanics, not accuracy
        max_example_chars=300,
        learning_rate=1e-5 if cell.weights == "full" else 1e-3,
        temperature=0.9,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        num_completions_to_print=0,
        logging_steps=1,
        seed=0,
        env_flavour="gsm8k",
    )
    if cell.sampling == "top_p_top_k":
        settings.update(top_p=0.9, top_k=50)
    if cell.env == "math_feedback":
        settings["env_id"] = "math_feedback"
    if cell.engine != "transformers":
        settings["use_vllm"] = True
    if cell.engine == "server":
        settings.update(
            vllm_mode="server", vllm_server_base_url=server_url or "http://127.0.0.1:9", vllm_server_timeout=5
        )
    return StepwiseReinforceConfig(**settings)


def peft_config(cell: Cell):
    if cell.weights == "full":
        return None
    from peft import LoraConfig

    extra: dict[str, Any] = {}
    if cell.weights == "dora":
        extra["use_dora"] = True
    if cell.weights == "lora_modules_to_save":
        extra["modules_to_save"] = ["input_layernorm", "post_attention_layernorm", "norm"]  # every norm layer
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", **extra)


def model_init_kwargs(cell: Cell) -> dict | None:
    if cell.weights != "qlora":
        return None
    from trl_stepwise.models import build_quantization_config

    return {"quantization_config": build_quantization_config(load_in_4bit=True, use_peft=True)}


def build_trainer(cell: Cell, output_dir: Path, server_url: str | None = None):
    """The cell's trainer on the embedded model (loaded by the trainer itself: name, init kwargs, peft config)."""
    from trl_stepwise.trainer import StepwiseReinforceTrainer

    args = cell_config(cell, output_dir, server_url)
    args.model_init_kwargs = model_init_kwargs(cell)
    kwargs: dict[str, Any] = {}
    if cell.env == "tool":  # TRL's tool-calling setup: a template that renders tools (Qwen2.5's fits ChatML)
        from trl_stepwise.models import load_tokenizer

        kwargs["environment_factory"] = DoublingTask
        kwargs["processing_class"] = load_tokenizer()
        kwargs["processing_class"].chat_template = _trl_template("qwen2_5")
    elif cell.env == "user":
        kwargs["env"] = user_env_class()
    return StepwiseReinforceTrainer(
        model=None,
        args=args,
        train_dataset=cell_dataset(cell),
        reward_funcs=[length_reward],
        peft_config=peft_config(cell),
        **kwargs,
    )


def run_cell(cell: Cell, output_dir: Path, server_url: str | None = None) -> dict:
    """Train the cell; a dict of what the matrix asserts (``refused`` holds the one-line message when refused)."""
    try:
        trainer = build_trainer(cell, output_dir, server_url)
    except ValueError as err:
        return {"cell": asdict(cell), "refused": str(err)}
    model = trainer.accelerator.unwrap_model(trainer.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(model.named_parameters())
    unchanged = sorted(n for n, p in before.items() if torch.equal(p, after[n].detach()))
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    finite = all(math.isfinite(v) for entry in logs for v in entry.values() if isinstance(v, float))
    finite = finite and all(torch.isfinite(p).all() for p in after.values() if p.dtype.is_floating_point)
    return {
        "cell": asdict(cell),
        "refused": None,
        "steps": trainer.state.global_step,
        "trainable": len(before),
        "unchanged": unchanged,
        "finite": bool(finite),
        "gaps": [entry.get("sampling/sampling_logp_difference/mean") for entry in logs],
        "rank": trainer.accelerator.process_index,
        "world_size": trainer.accelerator.num_processes,
    }


def _trl_template(name: str) -> str:
    from importlib.resources import files

    return (files("trl") / "chat_templates" / f"{name}.jinja").read_text()


def main() -> None:
    """``matrix_cells.py CELL[,CELL...] OUT_DIR``: play each cell in turn in this process group (one launch for all,
    so the start-up is paid once), writing ``OUT_DIR/CELL/rank{N}.json``."""
    for name in sys.argv[1].split(","):
        output_dir = Path(sys.argv[2]) / name
        output_dir.mkdir(parents=True, exist_ok=True)
        result = run_cell(BY_NAME[name], output_dir)
        (output_dir / f"rank{result.get('rank', 0)}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
