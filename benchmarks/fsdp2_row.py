"""The GPU check's ``fsdp2_full`` row: the trainer's sharded code on one device, where nothing else can run it.

A single-process FSDP2 run still goes through the pieces the sharded trainer adds: the policy is ``fully_shard``-ed
(each decoder layer, then the root) on a one-device mesh, so its parameters are DTensors, and scored by the trainer's
``score_completions`` (shared-prefix cache, length buckets); before every rollout its weights are pushed, gathered
whole by ``engines.weights.policy_weights``, into a plain copy that generates (the stand-in of vLLM on gathered
weights), so the sampler gap checks the push; after training the frozen sharded reference copy
(``trainer.sharding.sharded_copy``) must equal the policy, and the weight and optimizer shards written by
``trainer.sharded_state`` (as a checkpoint holds them) must read back into a freshly sharded model exactly. Its peak
memory is printed like the other rows'. A process group of one is started when none exists (NCCL on CUDA, gloo on CPU).
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from typing import Any


def start_process_group(device: str) -> None:
    """A process group of one (the row's own), unless the caller runs under ``torchrun`` already."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as probe:  # a free local port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)


def shard(model: Any, device: str) -> Any:
    """FSDP2 as accelerate's plugin applies it: every decoder layer, then the root, on a mesh of the processes."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device, (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def whole_state(model: Any) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in model.state_dict().items()
    }


def row_fsdp2(
    ctx: Any,
    row: Any,
    *,
    random_model: Callable[..., Any],
    train_loop: Callable[..., None],
    tolerance: float,
    learning_rate: float,
    check_failed: type[Exception],
) -> None:
    import torch

    from trl_stepwise.engines import TransformersEngine
    from trl_stepwise.engines.weights import policy_weights
    from trl_stepwise.trainer.sharded_state import load_model, load_optimizer, save_model_and_optimizer
    from trl_stepwise.trainer.sharding import is_sharded, sharded_copy

    row.engine, row.dtype, row.tolerance = "transformers on pushed, gathered weights", "fp32, FSDP2", tolerance
    start_process_group(ctx.device)
    model = shard(random_model(ctx.args.shape, ctx.device, torch.float32, ctx.args.seed), ctx.device)
    if not is_sharded(model):
        raise check_failed("fully_shard left no DTensor parameter")
    engine_model = random_model(ctx.args.shape, ctx.device, torch.float32, ctx.args.seed + 1).eval()
    pushes = []

    def push() -> None:  # gathered whole, one tensor at a time, into the engine's plain copy
        with policy_weights(model) as weights, torch.no_grad():
            state = dict(weights)
        engine_model.load_state_dict(state)
        pushes.append(len(state))

    train_loop(ctx, row, model, TransformersEngine(engine_model, ctx.tokenizer), learning_rate, False, push)
    row.checks["pushes"] = len(pushes)
    trained = whole_state(model)
    reference = whole_state(sharded_copy(model))
    if any(not torch.equal(trained[k], reference[k]) for k in trained):
        raise check_failed("the sharded reference copy differs from the policy it copies")
    with tempfile.TemporaryDirectory() as folder:
        save_model_and_optimizer(model, torch.optim.AdamW(model.parameters()), folder)
        fresh = shard(random_model(ctx.args.shape, ctx.device, torch.float32, ctx.args.seed + 2), ctx.device)
        load_model(fresh, folder)
        load_optimizer(fresh, torch.optim.AdamW(fresh.parameters()), folder)
    restored = whole_state(fresh)
    worst = max(float((restored[k].float() - trained[k].float()).abs().max()) for k in trained)
    row.checks["checkpoint_roundtrip_max_abs_diff"] = worst
    if worst > 0.0:
        raise check_failed(f"the weight shards read back differ by up to {worst:g}")
