"""The main job's two model passes per step, with each group's prompt encoded once against once per episode.

A main-job step (``recipes/configs/reinforce_gsm8k_cpu.yaml``) scores 16 episodes with the reference (no gradients)
and then trains on them (forward and backward). Every episode starts with the same ~300-token few-shot prefix, which
is encoded once per call either way, and the 4 episodes of a problem share its whole prompt. This times both passes on
the embedded model with episodes of the main job's shape (prefix, per-problem prompts and completion lengths as
logged by the job), with the group's prompt encoded once (``shared``) and, in the same run, once per row
(``per_row``, the previous behaviour), and checks that both give the same log-probabilities.

Then, under the main job's bfloat16 autocast (on a CPU with bfloat16 hardware, or with ``--quick``), it times the loss
pass as accelerate's model wrapper alone runs it (``per_call``: one autocast region per forward call, so every call
casts every weight to bfloat16 again), in one region (``one_region``: each weight cast once) and as the trainer runs
it (``one_region_gqa``: also grouped-query keys and values handed to torch unrepeated, ``trainer/attention.py``), in
the same run, and checks that all three give the same log-probabilities.

    python benchmarks/scoring_passes.py            # ~3 minutes on 2 cores
    python benchmarks/scoring_passes.py --quick    # tiny model, seconds
"""

from __future__ import annotations

import contextlib

import torch
from accelerate import Accelerator
from common import base_parser, load_policy, median, print_table, ratio, repeat_timed, setup_torch, write_json

from trl_stepwise.envs import Episode
from trl_stepwise.rollout import Trajectory
from trl_stepwise.trainer import attention, batching
from trl_stepwise.trainer.config import cpu_has_native_bf16

# A main-job step as its log shows it: 4 problems x 4 episodes behind a 299-token prefix, prompts of 31-46 tokens
PREFIX_TOKENS = 299
PROMPT_TOKENS = (35, 43, 36, 39)
COMPLETION_TOKENS = (97, 51, 71, 34, 46, 51, 100, 43, 33, 100, 37, 35, 57, 39, 55, 64)


def main_job_episodes(vocab: int, quick: bool) -> list[Trajectory]:
    generator = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=generator).tolist()

    scale = 4 if quick else 1
    prefix = ids(PREFIX_TOKENS // scale)
    prompts = [ids(n // scale) for n in PROMPT_TOKENS]
    episodes = []
    for i, width in enumerate(COMPLETION_TOKENS):
        width //= scale
        episodes.append(
            Trajectory(
                episode=Episode(episode_id=i, group_id=i // 4, row={"question": "", "answer": ""}),
                prompt_ids=prefix + prompts[i // 4],
                completion_ids=ids(width),
                policy_mask=[True] * width,
                step_index=[0] * width,
            )
        )
    return episodes


@contextlib.contextmanager
def prompts_per_row():
    """The previous behaviour: every row encodes its own copy of its prompt."""
    original = batching.encode_prompts
    batching.encode_prompts = lambda *args: None
    try:
        yield
    finally:
        batching.encode_prompts = original


def bf16_loss_pass(model, batch: dict, repeats: int) -> dict:
    """The bfloat16 loss pass three ways: one autocast region per forward call with grouped-query keys repeated per
    query head (before), one region for the whole pass, and one region with the keys unrepeated (the trainer)."""
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    model = accelerator.prepare(model)  # wraps forward in autocast, as in training

    def loss_pass(way: str) -> torch.Tensor:
        model.train().zero_grad()
        with contextlib.ExitStack() as stack:
            if way != "per_call":
                stack.enter_context(accelerator.autocast())
            if way != "one_region_gqa":
                stack.enter_context(_repeated_keys())
            scores = batching.score_completions(model, batch, temperature=0.7, with_entropy=True)
        (scores.logps * batch["completion_mask"]).sum().backward()
        return scores.logps.detach()

    mask = batch["completion_mask"]
    logps = {way: loss_pass(way)[mask] for way in WAYS}
    gap = max((logps[way] - logps["per_call"]).abs().max().item() for way in WAYS)
    times = {way: repeat_timed(lambda way=way: loss_pass(way), repeats) for way in WAYS}
    medians = {way: median(times[way]) for way in WAYS}
    print_table(
        ["bf16 loss pass (16 episodes, median s)", *WAYS, "ratio"],
        [["loss_pass_s", *medians.values(), ratio(medians["one_region_gqa"], medians["per_call"])]],
    )
    print(f"largest log-prob difference between the three: {gap:.2e}")
    return {"runs": times, "median_s": medians, "max_abs_logp_difference": gap}


WAYS = ("per_call", "one_region", "one_region_gqa")


@contextlib.contextmanager
def _repeated_keys():
    """transformers' own rule: masked grouped-query keys and values repeated once per query head."""
    original = attention.TORCH_HAS_GQA
    attention.TORCH_HAS_GQA = False
    try:
        yield
    finally:
        attention.TORCH_HAS_GQA = original


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="Timed repeats of each pass (after one warm-up).")
    args = parser.parse_args()
    setup_torch(args)
    model, _ = load_policy(tiny=args.quick or args.tiny)
    episodes = main_job_episodes(model.config.vocab_size, args.quick)
    batch = batching.pad_trajectories(episodes, pad_id=0)
    repeats = 1 if args.quick else args.repeats

    def reference_pass():
        with torch.no_grad():
            return batching.score_completions(model.eval(), batch, temperature=0.7).logps

    def loss_pass():
        model.train().zero_grad()
        scores = batching.score_completions(model, batch, temperature=0.7, with_entropy=True)
        (scores.logps * batch["completion_mask"]).sum().backward()
        return scores.logps.detach()

    results, logps = {}, {}
    for way in ("per_row", "shared"):
        with prompts_per_row() if way == "per_row" else contextlib.nullcontext():
            logps[way] = reference_pass()
            results[way] = {
                "reference_pass_s": repeat_timed(reference_pass, repeats),
                "loss_pass_s": repeat_timed(loss_pass, repeats),
            }
    mask = batch["completion_mask"]
    gap = (logps["shared"][mask] - logps["per_row"][mask]).abs().max().item()
    rows = []
    for name in ("reference_pass_s", "loss_pass_s"):
        per_row, shared = median(results["per_row"][name]), median(results["shared"][name])
        rows.append([name, per_row, shared, ratio(shared, per_row)])
    print_table(["pass (16 episodes, median s)", "prompt per row", "prompt per group", "ratio"], rows)
    print(f"largest log-prob difference between the two: {gap:.2e}")
    bf16 = None
    if args.quick or cpu_has_native_bf16():
        bf16 = bf16_loss_pass(model, batch, repeats)
    else:
        print("no bfloat16 hardware: the trainer runs float32 here, so the autocast comparison is skipped")
    write_json(
        "scoring_passes",
        {
            "episodes": len(episodes),
            "prefix_tokens": PREFIX_TOKENS,
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": COMPLETION_TOKENS,
            "runs": results,
            "median_s": {row[0]: {"per_row": row[1], "shared": row[2], "ratio": row[3]} for row in rows},
            "max_abs_logp_difference": gap,
            "bf16_autocast_loss_pass": bf16,
        },
        args,
    )


if __name__ == "__main__":
    main()
