"""Peak memory of one training step: full weights, LoRA and 4-bit (NF4) LoRA, against a naive log-softmax.

A step is what ``StepwiseReinforceTrainer`` does with one batch of synthetic trajectories (default 32 episodes x 256
completion tokens after a shared 192-token prefix and a 32-token per-row prompt), micro-batch by micro-batch
(``--micro_batch`` episodes each, default 4: the trainer's ``per_device_train_batch_size`` with gradient accumulation):
``trainer.batching.completion_logprobs`` (shared-prefix cache, ``logits_to_keep`` completion columns, float32
``logit - logsumexp``, per-row entropy) -> REINFORCE loss -> backward; then an AdamW step; twice (the second step is
the steady state: optimizer states, gradients and activations together). The naive variant computes the full logits of
every position and ``.log_softmax`` over the whole vocabulary and sequence, as a plain implementation would.

Each configuration runs in a fresh subprocess; its peak resident set size comes from ``os.wait4`` (the child's own
``ru_maxrss``), so nothing one configuration allocates can hide another's figure. ``--two_processes`` also runs pairs
of workers as a real 2-process DDP (gloo) job and reports the per-process peak. On a GPU, the same step runs for a
Llama-3.2-1B-shaped model built from its config (random weights) with LoRA and 4-bit LoRA, reporting
``torch.cuda.max_memory_allocated``.

    python benchmarks/memory.py                       # full size, CPU configurations (+ GPU ones if a GPU is visible)
    python benchmarks/memory.py --two_processes
    python benchmarks/memory.py --quick               # seconds: a smoke run, not results
    python benchmarks/memory.py --large_vocab --configs full --episodes 8 --completion_tokens 128   # 128k vocabulary
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import GIB, MIB, base_parser, print_table, setup_torch, write_json
from shapes import LLAMA_3_2_1B

NAME = "memory"
# name -> (LoRA, 4-bit base, naive log-softmax, target GiB)
CONFIGS: dict[str, tuple[bool, bool, bool, float]] = {
    "full": (False, False, False, 6.0),
    "full_naive": (False, False, True, 6.0),
    "lora": (True, False, False, 4.0),
    "lora_naive": (True, False, True, 4.0),
    "lora_4bit": (True, True, False, 4.0),
}
TINY_SHAPE = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "tie_word_embeddings": True,
}
# Vocabulary of each model source; tiny_vocab128k is the tiny shape with Llama-3's vocabulary, where the completion
# logits dominate the step's memory (the case chunked log-probs are for).
SOURCE_VOCAB = {"embedded": 49152, "tiny": 49152, "tiny_vocab128k": 128256, "llama1b": 128256}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # as the LoRA recipes


# ---------------------------------------------------------------------------------------------------------------------
# Worker: one configuration in this (fresh) process


def build_model(source: str, lora: bool, four_bit: bool, device: str, workdir: str) -> tuple[Any, int]:
    """The policy for ``source`` (see SOURCE_VOCAB), maybe 4-bit and with LoRA, as the trainer sets it up."""
    from trl_stepwise.models import build_quantization_config, load_model

    quantization = build_quantization_config(load_in_4bit=four_bit, use_peft=lora) if four_bit else None
    dtype = torch.bfloat16 if device == "cuda" and lora else torch.float32  # the GPU LoRA recipes load bfloat16
    extra = {"device_map": {"": 0}} if quantization is not None and device == "cuda" else {}
    if source == "embedded":
        model = load_model(None, dtype=dtype, quantization_config=quantization, **extra)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        shape = LLAMA_3_2_1B if source == "llama1b" else {**TINY_SHAPE, "vocab_size": SOURCE_VOCAB[source]}
        config = LlamaConfig(**shape)
        torch.manual_seed(0)
        if quantization is None:
            model = LlamaForCausalLM(config).to(dtype)
        else:  # bitsandbytes quantizes while loading: save the random weights, then load them quantized
            path = Path(workdir) / "random-model"
            LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
            model = load_model(str(path), dtype=dtype, quantization_config=quantization, **extra)
    if quantization is None:
        model = model.to(device)
    if lora:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if four_bit:  # what StepwiseReinforceTrainer's _attach_peft does for quantized models
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = get_peft_model(
            model,
            LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"),
        )
    return model, model.config.vocab_size


def synthetic_batch(args: argparse.Namespace, vocab: int, device: str) -> dict[str, Any]:
    """``args.episodes`` trajectories sharing a prefix, padded exactly as the trainer pads them, with advantages."""
    from trl_stepwise.envs import Episode
    from trl_stepwise.rollout import Trajectory
    from trl_stepwise.trainer.batching import pad_trajectories

    generator = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=generator).tolist()

    prefix = ids(args.prefix_tokens)
    trajectories = []
    for i in range(args.episodes):
        completion = ids(args.completion_tokens)
        trajectories.append(
            Trajectory(
                episode=Episode(episode_id=i, group_id=i // 4, row={"question": "", "answer": ""}),
                prompt_ids=prefix + ids(args.suffix_tokens),
                completion_ids=completion,
                policy_mask=[True] * len(completion),
                step_index=[0] * len(completion),
            )
        )
    advantages = [[1.0 if i % 2 else -1.0] * args.completion_tokens for i in range(args.episodes)]
    return pad_trajectories(trajectories, pad_id=0, device=device, advantages=advantages)


def naive_logprobs(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """The plain way: full logits of every position, ``.log_softmax`` over the vocabulary, then gather."""
    width = int(batch["completion_width"])
    prefix = batch["prefix_ids"]
    rows = batch["input_ids"].shape[0]
    input_ids = torch.cat([prefix.expand(rows, -1), batch["input_ids"]], dim=1)
    mask = torch.cat([torch.ones_like(prefix).expand(rows, -1), batch["attention_mask"]], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    logps = logits.float().log_softmax(-1)[:, :-1]
    return logps.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)[:, -width:]


def split_batch(batch: dict[str, Any], size: int) -> list[dict[str, Any]]:
    """Row slices of a padded batch (what ``gradient_accumulation_steps`` micro-batches of ``size`` episodes get)."""
    rows = int(batch["input_ids"].shape[0])
    parts = []
    for start in range(0, rows, size):
        parts.append(
            {
                k: v[start : start + size] if isinstance(v, torch.Tensor) and k != "prefix_ids" else v
                for k, v in batch.items()
            }
        )
    return parts


def run_worker(args: argparse.Namespace) -> None:
    """Load, build the batch, take ``args.steps`` training steps; write figures to ``args.result``."""
    from trl_stepwise.trainer.batching import completion_logprobs

    lora, four_bit, naive, _ = CONFIGS[args.worker]
    device = args.device
    started = time.perf_counter()
    rank = 0
    if args.world_size > 1:
        import torch.distributed as dist

        rank = args.rank
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank, world_size=args.world_size
        )
    with tempfile.TemporaryDirectory() as workdir:
        model, vocab = build_model(args.source, lora, four_bit, device, workdir)
    after_load = _peak_rss()
    trainable = [p for p in model.parameters() if p.requires_grad]
    figures: dict[str, Any] = {
        "config": args.worker,
        "source": args.source,
        "device": device,
        "rank": rank,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "peak_rss_after_load_bytes": after_load,
    }
    if device == "cuda":
        torch.cuda.synchronize()
        figures["cuda_allocated_after_load_bytes"] = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    batch = synthetic_batch(args, vocab, device if device == "cpu" else "cuda")
    figures["sequence_shape"] = [
        int(batch["input_ids"].shape[0]),
        int(batch["prefix_ids"].shape[1] + batch["input_ids"].shape[1]),
    ]
    model.train()
    wrapped = model
    if args.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    total_tokens = batch["completion_mask"].float().sum()
    parts = split_batch(batch, args.micro_batch or args.episodes)
    figures["micro_batches"] = len(parts)
    step_seconds = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        # gradient accumulation, as the trainer's micro-batches (loss normalised over the whole batch's tokens)
        for part in parts:
            if naive:
                logps = naive_logprobs(wrapped, part)
            else:
                logps, _ = completion_logprobs(wrapped, part, with_entropy=True, prefix_model=model)
            mask = part["completion_mask"].float()
            loss = -(logps * part["advantages"] * mask).sum() / total_tokens
            loss.backward()
            del logps, loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        step_seconds.append(time.perf_counter() - t0)
    figures.update(
        step_seconds=step_seconds,
        peak_rss_self_bytes=_peak_rss(),
        total_seconds=time.perf_counter() - started,
    )
    if device == "cuda":
        figures["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        figures["cuda_peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
    Path(args.result).write_text(json.dumps(figures))


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------------------------------------
# Parent: one subprocess per configuration


def _available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def naive_estimate_bytes(args: argparse.Namespace, vocab: int) -> int:
    """About four float32 (episodes x sequence x vocabulary) tensors live at once in the naive backward."""
    length = args.prefix_tokens + args.suffix_tokens + args.completion_tokens
    return 4 * 4 * args.episodes * length * vocab


def worker_command(args: argparse.Namespace, config: str, source: str, device: str, result: str) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", config, "--source", source]
    command += ["--device", device, "--result", result, "--steps", str(args.steps), "--episodes", str(args.episodes)]
    command += ["--prefix_tokens", str(args.prefix_tokens), "--suffix_tokens", str(args.suffix_tokens)]
    command += ["--completion_tokens", str(args.completion_tokens), "--micro_batch", str(args.micro_batch)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    return command


def launch(commands: list[list[str]], results: list[str], timeout: float) -> list[dict[str, Any]]:
    """Start the commands together; wait for each with ``os.wait4`` to read its own peak RSS."""
    processes = [subprocess.Popen(command) for command in commands]
    out = []
    deadline = time.monotonic() + timeout
    for process, result in zip(processes, results, strict=True):
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.2)
        process.returncode = os.waitstatus_to_exitcode(status)
        figures: dict[str, Any] = {"exit_code": process.returncode, "peak_rss_bytes": usage.ru_maxrss * 1024}
        if process.returncode == 0 and Path(result).is_file():
            figures.update(json.loads(Path(result).read_text()))
        else:
            figures["error"] = f"worker exited with {process.returncode}"
        out.append(figures)
    return out


def measure(
    args: argparse.Namespace, configs: list[str], source: str, device: str, processes: int = 1
) -> list[dict[str, Any]]:
    vocab = SOURCE_VOCAB[source]
    rows = []
    for config in configs:
        lora, four_bit, naive, target = CONFIGS[config]
        available = _available_bytes()
        if device == "cpu" and naive and available and naive_estimate_bytes(args, vocab) > 0.8 * available:
            rows.append({"config": config, "source": source, "device": device, "skipped": "not enough free memory"})
            print(
                f"skip {config}: the naive logits need ~{naive_estimate_bytes(args, vocab) / GIB:.1f} GiB", flush=True
            )
            continue
        with tempfile.TemporaryDirectory() as tmp:
            results = [str(Path(tmp) / f"rank{r}.json") for r in range(processes)]
            commands = [worker_command(args, config, source, device, result) for result in results]
            if processes > 1:
                port = _free_port()
                for rank, command in enumerate(commands):
                    command += ["--rank", str(rank), "--world_size", str(processes), "--port", str(port)]
            print(f"measuring {config} on {source}/{device} x{processes}", flush=True)
            for figures in launch(commands, results, args.timeout):
                figures.update(config=config, source=source, device=device, processes=processes, target_gib=target)
                rows.append(figures)
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def table_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
    out = []
    for r in rows:
        if "skipped" in r or "error" in r:
            out.append(
                [
                    r["config"],
                    r["source"],
                    r.get("processes", 1),
                    r.get("rank", "-"),
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    r.get("skipped") or r.get("error"),
                ]
            )
            continue
        if r["device"] == "cuda":
            peak = r["cuda_peak_allocated_bytes"] / GIB
            loaded = r["cuda_allocated_after_load_bytes"] / GIB
        else:
            peak, loaded = r["peak_rss_bytes"] / GIB, r["peak_rss_after_load_bytes"] / GIB
        ok = "yes" if peak <= r["target_gib"] else "NO"
        out.append(
            [
                r["config"],
                r["source"],
                r["processes"],
                r["rank"],
                r["trainable_parameters"] / 1e6,
                loaded,
                peak,
                f"<= {r['target_gib']:g}",
                ok,
                f"{min(r['step_seconds']):.2f} s/step",
            ]
        )
    return out


HEADERS = ["config", "model", "procs", "rank", "trainable M", "after load GiB", "peak GiB", "target", "met", "note"]


def parse_args() -> argparse.Namespace:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"Comma list of {', '.join(CONFIGS)}.")
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--prefix_tokens", type=int, default=192, help="Shared few-shot prefix length.")
    parser.add_argument("--suffix_tokens", type=int, default=32, help="Per-row prompt length (the question).")
    parser.add_argument("--completion_tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument(
        "--micro_batch",
        type=int,
        default=4,
        help="Episodes per forward/backward (the trainer's per_device_train_batch_size; the step accumulates "
        "episodes/micro_batch of them). 0 = all episodes in one pass.",
    )
    parser.add_argument("--two_processes", action="store_true", help="Also run 2-process DDP pairs.")
    parser.add_argument("--two_process_configs", default="full,lora")
    parser.add_argument("--gpu_configs", default="lora,lora_4bit", help="Configs for the Llama-1B shape on a GPU.")
    parser.add_argument(
        "--large_vocab",
        action="store_true",
        help="CPU configurations on a tiny Llama with a 128,256-token vocabulary (Llama-3's): the completion logits "
        "dominate memory, so this isolates the log-prob computation.",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="Seconds per worker before it is killed.")
    # worker-only arguments
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--source", default="embedded", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--world_size", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.episodes, args.prefix_tokens, args.suffix_tokens, args.completion_tokens, args.steps = 4, 16, 4, 16, 1
        args.micro_batch = 2
    return args


def main() -> None:
    args = parse_args()
    setup_torch(args)
    if args.worker:
        run_worker(args)
        return
    source = "tiny_vocab128k" if args.large_vocab else "tiny" if args.tiny else "embedded"
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    rows = measure(args, configs, source, "cpu")
    if args.two_processes:
        pair_configs = [c.strip() for c in args.two_process_configs.split(",") if c.strip()]
        rows += measure(args, pair_configs, source, "cpu", processes=2)
    if torch.cuda.is_available():
        gpu_source = "tiny" if args.tiny else "llama1b"
        rows += measure(args, [c.strip() for c in args.gpu_configs.split(",") if c.strip()], gpu_source, "cuda")
    print_table(
        HEADERS,
        table_rows(rows),
        title=f"Peak memory of one training step ({args.episodes} episodes x {args.completion_tokens} tokens in "
        f"micro-batches of {args.micro_batch or args.episodes}; "
        "CPU: peak RSS, GPU: peak CUDA allocated)",
    )
    write_json(
        NAME,
        {
            "units": "bytes",
            "targets_gib": {"lora": 4.0, "full": 6.0},
            "batch": {
                "episodes": args.episodes,
                "prefix_tokens": args.prefix_tokens,
                "suffix_tokens": args.suffix_tokens,
                "completion_tokens": args.completion_tokens,
                "steps": args.steps,
                "micro_batch": args.micro_batch or args.episodes,
            },
            "rows": rows,
            "mib": {
                f"{r['config']}/{r['source']}/x{r.get('processes', 1)}/r{r.get('rank', 0)}": (
                    r.get("cuda_peak_allocated_bytes") or r.get("peak_rss_bytes", 0)
                )
                / MIB
                for r in rows
                if "error" not in r and "skipped" not in r
            },
        },
        args,
    )


if __name__ == "__main__":
    main()
