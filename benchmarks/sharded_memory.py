"""Per-process memory of DDP against FSDP2: the same model, the same batch, 2 processes on the CPU.

FSDP2 is there to cut what each process holds: with 2 processes each one should keep about half of the weights, the
gradients, the AdamW states and the KL reference (a full copy under DDP, a copy sharded like the policy under FSDP2).
This checks it on ``StepwiseReinforceTrainer`` itself, launched with ``accelerate launch`` twice, DDP (gloo) then
FSDP2 (the model sharded at load time by transformers' ``distributed_config``), with generation replaced by the
replay of one fixed batch of episodes (a short real rollout, made once), so both runs train on the same episodes.

Every process measures, after its last optimizer step, the bytes it holds itself (a DTensor counts its local shard):
parameters, gradients (just before the optimizer step: they may be freed after it), optimizer state, the reference
model's parameters (after training), and its peak resident set size (``ru_maxrss``), and writes them to a JSON file.
Where the peak comes from: peak RSS after the imports, after the trainer is built, after step 1; the RSS held at the
end, before and after ``malloc_trim`` (what is left after it is live memory, not freed buffers glibc kept). The parent
prints them side by side with the FSDP2/DDP ratio per row.

The model is the embedded SmolLM2-135M's shape, its output layer tied to the input embeddings as in SmolLM2
(``--untie_word_embeddings`` gives the output layer its own matrix: 163 M parameters instead of 135 M).

    python benchmarks/sharded_memory.py            # SmolLM2-135M shape (random float32 weights), 2 AdamW steps
    python benchmarks/sharded_memory.py --tiny     # 2 layers, hidden 32: a smoke run in seconds, NOT results
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import functools
import json
import os
import pickle
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import MIB, ROOT, print_table, ratio, write_json
from transformers import TrainerCallback

NAME = "sharded_memory"
MODES = ("ddp", "fsdp2")
WORLD = 2
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
SHAPES = {"smollm2_135m": (576, 1536, 30, 9, 3), "tiny": (32, 64, 2, 4, 2)}  # the embedded model's; a smoke run's
LOGGED = ("step", "loss", "kl", "reward", "entropy", "grad_norm")  # per step, to check both runs trained alike
ROWS = ("weights", "gradients", "optimizer_state", "reference", "total", "peak_rss")
RSS_ROWS = ("peak_rss_imports", "peak_rss_setup", "peak_rss_step1", "rss_at_end", "rss_at_end_trimmed")


def length_reward(completions: list[str], **kwargs: Any) -> list[float]:
    """A reward that varies between episodes (a random model never solves anything), so advantages are non-zero."""
    return [len(c) / 10 for c in completions]


def make_trainer(args: argparse.Namespace, model_dir: Path, output_dir: Path, world: int, **overrides: Any) -> Any:
    """The trainer both launches build: ``args.episodes`` episodes per optimizer step over ``world`` processes."""
    from trl_stepwise.data import load_math_dataset
    from trl_stepwise.models import load_tokenizer
    from trl_stepwise.trainer import StepwiseReinforceConfig, StepwiseReinforceTrainer

    settings = dict(
        output_dir=str(output_dir), max_steps=args.max_steps, per_device_train_batch_size=args.episodes // world,
        num_generations=2, gradient_accumulation_steps=1, max_step_tokens=args.max_step_tokens, max_episode_steps=2,
        n_few_shot=1, env_flavour="arithmetic", learning_rate=1e-5, kl_coef=args.kl_coef, optim="adamw_torch",
        use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, num_completions_to_print=0,
        log_rollouts=False, logging_steps=1, seed=0,
    )  # fmt: skip
    return StepwiseReinforceTrainer(
        model=str(model_dir),
        args=StepwiseReinforceConfig(**{**settings, **overrides}),
        train_dataset=load_math_dataset("arithmetic:level=1,n=32"),
        processing_class=load_tokenizer(str(model_dir)),
        reward_funcs=[length_reward],
    )


# ---------------------------------------------------------------------------------------------------------------------
# Parent: model, episodes, launches, table


def save_random_model(shape: str, tied: bool, folder: Path) -> int:
    """A random float32 Llama of ``shape`` with the embedded tokenizer, saved to ``folder``; its parameter count."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from trl_stepwise.models import load_tokenizer

    tokenizer = load_tokenizer()
    config = LlamaConfig(
        **dict(zip(SHAPE_KEYS, SHAPES[shape], strict=True)), vocab_size=len(tokenizer), tie_word_embeddings=tied,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def fixed_episodes(args: argparse.Namespace, model_dir: Path, workdir: Path) -> list:
    """``args.episodes`` episodes (2 per problem, in group order so that each rank replays whole groups) from a real
    rollout of the model, in this process: the batch both launches replay."""
    trainer = make_trainer(args, model_dir, workdir / "rollout", world=1, kl_coef=0.0)
    problems = args.episodes // 2
    rows = [dict(trainer.train_dataset[p]) for p in range(problems) for _ in range(2)]
    torch.manual_seed(1)
    groups = [p for p in range(problems) for _ in range(2)]
    return trainer.rollout_engine().run(functools.partial(trainer.make_env, None), rows, group_ids=groups)


def launch(args: argparse.Namespace, mode: str, model_dir: Path, episodes_file: Path, workdir: Path) -> float:
    """``accelerate launch`` 2 worker processes of ``mode``; its wall seconds (the workers write their JSONs)."""
    with socket.socket() as sock:  # a free port: another job may hold accelerate's default one
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(WORLD),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
        __file__, "--worker", mode, "--model_dir", str(model_dir), "--episodes_file", str(episodes_file),
        "--workdir", str(workdir), "--episodes", str(args.episodes), "--max_steps", str(args.max_steps),
        "--max_step_tokens", str(args.max_step_tokens), "--kl_coef", str(args.kl_coef),
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if args.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    print(f"launching {mode} ...", flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    (workdir / f"{mode}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"{mode} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    print(f"{mode}: {seconds:.0f} s", flush=True)
    return seconds


def report(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]], extra: dict[str, Any]) -> None:
    """The side-by-side table (MiB per process) and the JSON."""
    rows = ROWS + RSS_ROWS
    mib = {mode: [{row: ranks[r][row] / MIB for row in rows} for r in range(WORLD)] for mode, ranks in runs.items()}
    ratios = {}
    for row in rows:
        means = {mode: sum(rank[row] for rank in mib[mode]) / WORLD for mode in MODES}
        ratios[row] = ratio(means["fsdp2"], means["ddp"])
    headers = ["MiB per process", *(f"{m.upper()} rank{r}" for m in MODES for r in range(WORLD)), "FSDP2/DDP"]
    table = [[row, *(mib[m][r][row] for m in MODES for r in range(WORLD)), ratios[row]] for row in rows]
    print_table(headers, table, title=f"Per-process memory, {WORLD} processes ({extra['shape']})")
    for mode in MODES:
        print(f"\n{mode} rank0 logs: {runs[mode][0]['logs']}")
    print("wall seconds: " + ", ".join(f"{m} {s:.0f}" for m, s in extra["wall_seconds"].items()))
    write_json(NAME, {**extra, "mib": mib, "fsdp2_over_ddp": ratios, "bytes": runs}, args)


def run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    shape = "tiny" if args.tiny else "smollm2_135m"
    with tempfile.TemporaryDirectory(prefix="sharded-memory-") as tmp:
        workdir = Path(tmp)
        model_dir = workdir / "model"
        parameters = save_random_model(shape, not args.untie_word_embeddings, model_dir)
        episodes = fixed_episodes(args, model_dir, workdir)
        (episodes_file := workdir / "episodes.pkl").write_bytes(pickle.dumps(episodes))
        wall = {"model_and_episodes": time.perf_counter() - start}
        print(f"model and {len(episodes)} episodes in {wall['model_and_episodes']:.0f} s", flush=True)
        wall.update({mode: launch(args, mode, model_dir, episodes_file, workdir) for mode in MODES})
        runs = {m: [json.loads((workdir / f"{m}-rank{r}.json").read_text()) for r in range(WORLD)] for m in MODES}
    wall["total"] = time.perf_counter() - start
    settings = {
        "shape": shape, "model_shape": dict(zip(SHAPE_KEYS, SHAPES[shape], strict=True)),
        "tie_word_embeddings": not args.untie_word_embeddings, "parameters": parameters, "world_size": WORLD,
        "episodes": args.episodes, "policy_tokens_per_episode": [t.num_policy_tokens for t in episodes],
        "wall_seconds": wall,
    }  # fmt: skip
    report(args, runs, settings)


# ---------------------------------------------------------------------------------------------------------------------
# Worker: one process of one launch


def local_bytes(tensors: Any) -> int:
    """Bytes this process holds of ``tensors``: a DTensor's local shard, other tensors whole."""
    from torch.distributed.tensor import DTensor

    total = 0
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        total += local.numel() * local.element_size()
    return total


class Meter(TrainerCallback):
    """Gradients just before each optimizer step, weights and optimizer state just after it (the last one stays)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.figures: dict[str, int] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = (p.grad for p in self.trainer.accelerator.unwrap_model(model).parameters() if p.grad is not None)
        self.figures["gradients"] = local_bytes(grads)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        optimizer = getattr(self.trainer.optimizer, "optimizer", self.trainer.optimizer)  # accelerate's wrapper
        states = (v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
        self.figures.setdefault("peak_rss_step1", peak_rss())
        weights = self.trainer.accelerator.unwrap_model(model).parameters()
        self.figures.update(weights=local_bytes(weights), optimizer_state=local_bytes(states))


def peak_rss() -> int:
    """This process's peak resident set size so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_now() -> int:
    """This process's resident set size now, in bytes."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024


def worker(args: argparse.Namespace) -> None:
    """Train ``args.max_steps`` steps on this rank's share of the fixed episodes; write this process's figures."""
    from trl_stepwise.rollout import RolloutStats

    figures = {"peak_rss_imports": peak_rss()}
    episodes = pickle.loads(Path(args.episodes_file).read_bytes())
    # generation would run on an engine (replayed here, none is built): the same objective in both launches (the
    # engine's sampling correction); under FSDP2 the model is sharded at load time
    overrides: dict[str, Any] = {"use_vllm": True}
    if args.worker == "fsdp2":
        from transformers.distributed import DistributedConfig

        overrides["model_init_kwargs"] = {"distributed_config": DistributedConfig(fsdp_size=WORLD)}
    workdir = Path(args.workdir)
    trainer = make_trainer(args, Path(args.model_dir), workdir / f"run-{args.worker}", WORLD, **overrides)
    figures["peak_rss_setup"] = peak_rss()
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    share = len(episodes) // world
    mine = episodes[rank * share : (rank + 1) * share]

    class Replay:
        """Stands in for the rollout engine: a fresh copy of this process's share of the fixed episodes (the trainer
        writes into the episodes it scores)."""

        stats = RolloutStats()

        def run(self, make_env: Any, rows: Any, group_ids: Any = None) -> list:
            return copy.deepcopy(mine)

    trainer.rollout_engine = lambda sampling=None: Replay()
    meter = Meter(trainer)
    trainer.add_callback(meter)
    trainer.train()
    ref = trainer.ref_model
    figures.update(meter.figures, reference=local_bytes(ref.parameters()) if ref is not None else 0)
    figures["total"] = sum(figures[k] for k in ("weights", "gradients", "optimizer_state", "reference"))
    figures.update(peak_rss=peak_rss(), rss_at_end=rss_now())
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    figures["rss_at_end_trimmed"] = rss_now()
    figures.update(
        rank=rank, world_size=world, sharded=bool(trainer.sharded),
        logs=[{k: e[k] for k in LOGGED if k in e} for e in trainer.state.log_history if "loss" in e],
    )  # fmt: skip
    (workdir / f"{args.worker}-rank{rank}.json").write_text(json.dumps(figures, indent=2))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="2 layers, hidden 32: a smoke run (writes *.quick.json).")
    tie_help = "Give the output layer its own matrix (SmolLM2 ties it to the input embeddings)."
    parser.add_argument("--untie_word_embeddings", action="store_true", help=tie_help)
    parser.add_argument("--episodes", type=int, default=8, help="Episodes per optimizer step, over both processes.")
    parser.add_argument("--max_steps", type=int, default=2, help="Optimizer steps of each launch (AdamW).")
    parser.add_argument("--max_step_tokens", type=int, default=16, help="Tokens per episode step of the rollout.")
    parser.add_argument("--kl_coef", type=float, default=0.05, help="KL weight; > 0 keeps a reference copy.")
    mmap_help = (
        "Bytes: glibc serves larger allocations with mmap and gives them back on free (MALLOC_MMAP_THRESHOLD_ of the "
        "workers); 0 keeps glibc's default, whose heap keeps freed buffers, so peak RSS counts them too."
    )
    parser.add_argument("--malloc_mmap_threshold", type=int, default=0, help=mmap_help)
    output_help = "JSON path (default: benchmarks/results/sharded_memory.json; --tiny: sharded_memory.quick.json)."
    parser.add_argument("--output", default=None, help=output_help)
    internal = parser.add_argument_group("internal (set by the parent for each launched process)")
    internal.add_argument("--worker", choices=MODES, default=None, help="Run as one process of a launch of MODE.")
    internal.add_argument("--model_dir", default=None, help="The saved random model.")
    internal.add_argument("--episodes_file", default=None, help="The pickled fixed episodes.")
    internal.add_argument("--workdir", default=None, help="Where the workers write their JSON files.")
    args = parser.parse_args()
    if args.episodes % (2 * WORLD):
        parser.error(f"--episodes must be a multiple of {2 * WORLD} (whole groups of 2 on each process)")
    return args


def main() -> None:
    args = parse_args()
    worker(args) if args.worker else run(args)


if __name__ == "__main__":
    main()
