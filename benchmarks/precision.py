"""float32 against bfloat16 autocast on CPU: rollout throughput and one training step.

Rollout: ``StepwiseRollout`` on the same episodes (default 16 GSM8K test problems x 4) with ``SamplingConfig.bf16``
off and on (bfloat16 autocast around the decoding loop), and on a bfloat16 copy of the weights (autocast re-casts
every weight at every call; a bfloat16 copy casts once); tokens/s and accuracy.

Training step: the first episodes of the float32 rollout (default 4: one micro-batch) padded as the trainer pads
them, then ``completion_logprobs`` -> ``reinforce_stable`` token loss (advantages fixed at +1/-1 per episode so the
loss is not zero, old log-probs = the float32 ones) -> backward -> AdamW step, from the same weights, in float32 and
under ``torch.autocast("cpu", torch.bfloat16)`` (what the Trainer does with ``bf16=True`` on CPU). Reported: seconds
per step (median), and on the same batch the change of the mean token NLL, of the policy loss, of the per-token
log-probabilities, and the cosine between the two gradients.

    python benchmarks/precision.py            # full size
    python benchmarks/precision.py --quick    # seconds: a smoke run, not results
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict
from typing import Any

import torch
from common import (
    Timer,
    base_parser,
    env_factory,
    load_policy,
    load_problems,
    median,
    print_table,
    prompt_builder,
    ratio,
    repeat_rows,
    setup_torch,
    write_json,
)

from trl_stepwise.algorithms import AlgorithmSettings, build_algorithm
from trl_stepwise.rollout import SamplingConfig, StepwiseRollout, Trajectory
from trl_stepwise.trainer.batching import completion_logprobs, pad_trajectories

NAME = "precision"


def rollout(
    model: Any,
    tokenizer: Any,
    builder: Any,
    rows: list[dict],
    groups: list[int],
    make_env: Any,
    sampling: SamplingConfig,
) -> tuple[dict[str, Any], list[Trajectory]]:
    """One timed ``StepwiseRollout.run``."""
    engine = StepwiseRollout(model, tokenizer, builder, sampling=sampling, step_delimiter="\n", calculator=True)
    with Timer() as timer:
        trajectories = engine.run(make_env, rows, group_ids=groups)
    correct = sum(t.episode.correct for t in trajectories)
    figures = {
        "seconds": timer.seconds,
        "generated_tokens": engine.stats.generated_tokens,
        "tokens_per_second": ratio(engine.stats.generated_tokens, timer.seconds),
        "accuracy": ratio(correct, len(trajectories)),
    }
    return figures, trajectories


def autocast(bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def training_steps(base: Any, batch: dict[str, Any], bf16: bool, steps: int) -> dict[str, Any]:
    """``steps`` training steps from ``base``'s weights; the first one's loss, log-probs and gradient are kept."""
    model = copy.deepcopy(base).train()
    algorithm = build_algorithm("reinforce_stable", AlgorithmSettings(kl_coef=0.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    mask = batch["completion_mask"]
    num_tokens = float(mask.sum())
    first: dict[str, Any] = {}
    times = []
    for step in range(steps):
        with Timer() as timer:
            with autocast(bf16):
                logps, _ = completion_logprobs(model, batch, with_entropy=True)
            logps = logps.float()
            old = batch.get("old_logps")
            old = logps.detach() if old is None else old
            token_losses = algorithm.token_loss(logps, old, None, batch["advantages"])
            loss = algorithm.reduce(token_losses, mask, num_tokens, float(mask.shape[0]))
            loss.backward()
            if step == 0:
                first = {
                    "loss": float(loss.detach()),
                    "nll": float(-(logps.detach() * mask).sum() / num_tokens),
                    "logps": logps.detach().clone(),
                    "grad": torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).clone(),
                }
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        times.append(timer.seconds)
    return {"times": times, **first}


def parse_args() -> Any:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="gsm8k")
    parser.add_argument("--num_problems", type=int, default=16)
    parser.add_argument("--episodes_per_problem", type=int, default=4)
    parser.add_argument("--n_few_shot", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max_step_tokens", type=int, default=64)
    parser.add_argument("--max_episode_tokens", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="Rollout runs per precision (alternating; median).")
    parser.add_argument(
        "--train_episodes",
        type=int,
        default=4,
        help="Episodes in the training batch: one micro-batch, as the CPU recipe's per_device_train_batch_size (16 "
        "episodes of 4-shot GSM8K prompts in one pass took 16 GB and over 15 minutes here).",
    )
    parser.add_argument("--train_steps", type=int, default=3, help="Timed training steps per precision.")
    args = parser.parse_args()
    if args.quick:
        args.num_problems, args.episodes_per_problem, args.n_few_shot = 2, 2, 1
        args.max_step_tokens, args.max_episode_tokens, args.batch_size = 8, 16, 4
        args.train_episodes, args.train_steps = 4, 2
    return args


def main() -> None:
    args = parse_args()
    setup_torch(args)
    model, tokenizer = load_policy(args.tiny, seed=args.seed)
    problems = load_problems(args.dataset, "test", args.num_problems)
    builder = prompt_builder(tokenizer, args.dataset, args.n_few_shot, seed=args.seed)
    rows, groups = repeat_rows(problems, args.episodes_per_problem)
    make_env = env_factory("gsm8k", args.max_episode_tokens)
    fp32 = SamplingConfig(
        args.temperature, max_step_tokens=args.max_step_tokens, batch_size=args.batch_size, seed=args.seed
    )
    variants = {  # name -> (model, sampling): autocast on the float32 model, or float32 sampling on a bfloat16 copy
        "fp32": (model, fp32),
        "bf16": (model, SamplingConfig(**{**asdict(fp32), "bf16": True})),
        "bf16_weights": (copy.deepcopy(model).to(torch.bfloat16), fp32),
    }

    for policy, sampling in variants.values():  # warm-up of every path, untimed
        rollout(policy, tokenizer, builder, rows[:2], groups[:2], make_env, sampling)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    trajectories: list[Trajectory] = []
    for _ in range(args.repeats):
        for name, (policy, sampling) in variants.items():
            figures, result = rollout(policy, tokenizer, builder, rows, groups, make_env, sampling)
            runs[name].append(figures)
            if name == "fp32" and not trajectories:
                trajectories = result
            print(f"rollout {name}: {figures['tokens_per_second']:.1f} tok/s", flush=True)
    del variants  # the bfloat16 copy is for rollouts only; free it before the training steps
    rollout_summary = {
        name: {
            "tokens_per_second": median([r["tokens_per_second"] for r in results]),
            "accuracy": median([r["accuracy"] for r in results]),
            "runs": results,
        }
        for name, results in runs.items()
    }

    chosen = trajectories[: args.train_episodes]
    advantages = [[1.0 if i % 2 == 0 else -1.0] * len(t.completion_ids) for i, t in enumerate(chosen)]
    batch = pad_trajectories(chosen, tokenizer.pad_token_id, advantages=advantages)
    with torch.no_grad():
        batch["old_logps"] = completion_logprobs(model.eval(), batch).float()
    steps = {name: training_steps(model, batch, name == "bf16", args.train_steps) for name in ("fp32", "bf16")}
    mask = batch["completion_mask"]
    delta = (steps["bf16"]["logps"] - steps["fp32"]["logps"]).abs()[mask]
    grad_cos = torch.nn.functional.cosine_similarity(steps["fp32"]["grad"], steps["bf16"]["grad"], dim=0)
    grad_norm_ratio = ratio(float(steps["bf16"]["grad"].norm()), float(steps["fp32"]["grad"].norm()))
    train_summary = {
        name: {
            "step_seconds": median(s["times"][1:] if len(s["times"]) > 1 else s["times"]),
            "times": s["times"],
            "loss": s["loss"],
            "nll": s["nll"],
        }
        for name, s in steps.items()
    }
    comparison = {
        "loss_change": train_summary["bf16"]["loss"] - train_summary["fp32"]["loss"],
        "nll_change": train_summary["bf16"]["nll"] - train_summary["fp32"]["nll"],
        "nll_relative_change": ratio(
            train_summary["bf16"]["nll"] - train_summary["fp32"]["nll"], abs(train_summary["fp32"]["nll"])
        ),
        "logp_abs_change_mean": float(delta.mean()) if delta.numel() else float("nan"),
        "logp_abs_change_max": float(delta.max()) if delta.numel() else float("nan"),
        "grad_cosine": float(grad_cos),
        "grad_norm_ratio": grad_norm_ratio,
        "rollout_speedup": ratio(
            rollout_summary["bf16"]["tokens_per_second"], rollout_summary["fp32"]["tokens_per_second"]
        ),
        "rollout_speedup_bf16_weights": ratio(
            rollout_summary["bf16_weights"]["tokens_per_second"], rollout_summary["fp32"]["tokens_per_second"]
        ),
        "train_step_speedup": ratio(train_summary["fp32"]["step_seconds"], train_summary["bf16"]["step_seconds"]),
    }

    labels = {"fp32": "float32", "bf16": "bfloat16 autocast", "bf16_weights": "bfloat16 weights (rollout only)"}
    print_table(
        ["precision", "rollout tok/s", "rollout accuracy", "train step s", "NLL", "policy loss"],
        [
            [
                labels[name],
                rollout_summary[name]["tokens_per_second"],
                rollout_summary[name]["accuracy"],
                *(
                    [train_summary[name]["step_seconds"], train_summary[name]["nll"], train_summary[name]["loss"]]
                    if name in train_summary
                    else ["-", "-", "-"]
                ),
            ]
            for name in runs
        ],
        title=f"float32 vs bfloat16 autocast on CPU ({len(rows)} rollout episodes, {len(chosen)}-episode train batch)",
    )
    print_table(["comparison", "value"], [[k, f"{v:.6g}"] for k, v in comparison.items()], title="bf16 vs fp32")
    write_json(
        NAME,
        {
            "settings": {
                "sampling": asdict(fp32),
                "episodes": len(rows),
                "train_episodes": len(chosen),
                "train_tokens": int(mask.sum()),
            },
            "rollout": rollout_summary,
            "train_step": train_summary,
            "comparison": comparison,
        },
        args,
    )


if __name__ == "__main__":
    main()
