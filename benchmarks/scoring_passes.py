"""The main job's two model passes per step, with each group's prompt encoded once against once per episode.

A main-job step (``recipes/configs/reinforce_gsm8k_cpu.yaml``) scores 16 episodes with the reference (no gradients)
and then trains on them (forward and backward). Every episode starts with the same ~300-token few-shot prefix, which
is encoded once per call either way, and the 4 episodes of a problem share its whole prompt. This times both passes on
the embedded model with episodes of the main job's shape (prefix, per-problem prompts and completion lengths as
logged by the job), with the group's prompt encoded once (``shared``) and, in the same run, once per row
(``per_row``, the previous behaviour), and checks that both give the same log-probabilities.

Then, under the main job's bfloat16 autocast (on a CPU with bfloat16 hardware, or with ``--quick``), it times the loss
pass as accelerate's model wrapper alone runs it (``per_call``: one autocast region per forward call, so every call
casts every weight to bfloat16 again), in one region (``one_region``: each weight cast once), with grouped-query keys
and values also handed to torch's kernel unrepeated (``one_region_gqa``: attention in bfloat16) and as the trainer
runs it (``float32_attention``: attention in float32, ``trainer/attention.py``), in the same run, alternating, with
each way's largest log-prob difference from the float32 pass. The reference pass (no gradients, autocast) is timed
with attention in bfloat16 (``one_region_gqa``) and as the trainer runs it too.

    python benchmarks/scoring_passes.py            # ~10 minutes on 2 cores
    python benchmarks/scoring_passes.py --shape 2026-12-08   # the main job's episodes of that day
    python benchmarks/scoring_passes.py --quick    # tiny model, seconds
"""

from __future__ import annotations

import contextlib
import copy

import torch
from accelerate import Accelerator
from common import base_parser, load_policy, median, print_table, ratio, repeat_timed, setup_torch, write_json

from trl_stepwise.envs import Episode
from trl_stepwise.rollout import Trajectory
from trl_stepwise.trainer import attention, batching
from trl_stepwise.trainer.config import cpu_has_native_bf16

# A main-job step as its log showed it: 4 problems x 4 episodes behind the few-shot prefix; each shape is
# (prefix tokens, the 4 prompts' tokens, the 16 completions' tokens)
SHAPES = {
    # 2026-12-03: 2 short GSM8K examples, completions of 33-100 tokens
    "2026-12-03": (299, (35, 43, 36, 39), (97, 51, 71, 34, 46, 51, 100, 43, 33, 100, 37, 35, 57, 39, 55, 64)),
    # 2026-12-08 (step 7 of a run of the main job then): the alternating pair, one-step problems of 20-74 tokens
    "2026-12-08": (248, (33, 38, 41, 36), (24, 21, 20, 29, 31, 24, 34, 32, 35, 36, 39, 35, 43, 44, 49, 74)),
}


def main_job_episodes(vocab: int, quick: bool, shape: str = "2026-12-03") -> list[Trajectory]:
    generator = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=generator).tolist()

    scale = 4 if quick else 1
    prefix_tokens, prompt_tokens, completion_tokens = SHAPES[shape]
    prefix = ids(prefix_tokens // scale)
    prompts = [ids(n // scale) for n in prompt_tokens]
    episodes = []
    for i, width in enumerate(completion_tokens):
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
    """The bfloat16 loss pass four ways (``WAYS``), alternating, and the reference pass with attention in bfloat16 and
    as the trainer runs it (``REFERENCE_WAYS``); each way's largest log-prob difference from the float32 pass."""
    with torch.no_grad():
        float32 = batching.score_completions(model.eval(), batch, temperature=0.7).logps
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    model = accelerator.prepare(model)  # wraps forward in autocast, as in training

    def loss_pass(way: str) -> torch.Tensor:
        model.train().zero_grad()
        with contextlib.ExitStack() as stack:
            if way != "per_call":
                stack.enter_context(accelerator.autocast())
            if way in ("per_call", "one_region"):
                stack.enter_context(_repeated_keys())
            if way != "float32_attention":
                stack.enter_context(_attention_in_autocast_precision())
            scores = batching.score_completions(model, batch, temperature=0.7, with_entropy=True)
        (scores.logps * batch["completion_mask"]).sum().backward()
        return scores.logps.detach()

    def reference_pass(way: str) -> torch.Tensor:
        before = _attention_in_autocast_precision() if way == "one_region_gqa" else contextlib.nullcontext()
        with torch.no_grad(), accelerator.autocast(), before:
            return batching.score_completions(reference, batch, temperature=0.7).logps

    mask = batch["completion_mask"]
    gaps = {way: (loss_pass(way) - float32)[mask].abs().max().item() for way in WAYS}
    gaps |= {f"reference_{way}": (reference_pass(way) - float32)[mask].abs().max().item() for way in REFERENCE_WAYS}
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    reference_times: dict[str, list[float]] = {way: [] for way in REFERENCE_WAYS}
    for _ in range(repeats):  # alternating, so that a drift of the machine's speed reaches every way alike
        for way in WAYS:
            times[way] += repeat_timed(lambda way=way: loss_pass(way), 1)
        for way in REFERENCE_WAYS:
            reference_times[way] += repeat_timed(lambda way=way: reference_pass(way), 1)
    medians = {way: median(times[way]) for way in WAYS}
    reference_medians = {way: median(reference_times[way]) for way in REFERENCE_WAYS}
    print_table(
        ["bf16 loss pass (16 episodes, median s)", *WAYS, "ratio"],
        [["loss_pass_s", *medians.values(), ratio(medians["float32_attention"], medians["per_call"])]],
    )
    print_table(
        ["bf16 reference pass (median s)", *REFERENCE_WAYS, "ratio"],
        [
            [
                "reference_pass_s",
                *reference_medians.values(),
                ratio(reference_medians["trainer"], reference_medians["one_region_gqa"]),
            ]
        ],
    )
    print("largest log-prob difference from the float32 pass: " + ", ".join(f"{k} {v:.3f}" for k, v in gaps.items()))
    return {
        "runs": times,
        "median_s": medians,
        "reference_runs": reference_times,
        "reference_median_s": reference_medians,
        "max_abs_logp_difference_from_float32": gaps,
    }


WAYS = ("per_call", "one_region", "one_region_gqa", "float32_attention")
REFERENCE_WAYS = ("one_region_gqa", "trainer")


@contextlib.contextmanager
def _attention_in_autocast_precision():
    """The trainer before attention ran in float32: attention at autocast's bfloat16, keys unrepeated."""
    original = batching.cpu_scoring_attention
    batching.cpu_scoring_attention = attention.masked_gqa_on_cpu
    try:
        yield
    finally:
        batching.cpu_scoring_attention = original


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
    parser.add_argument(
        "--shape", choices=tuple(SHAPES), default="2026-12-03", help="Which logged main-job step the episodes copy."
    )
    args = parser.parse_args()
    setup_torch(args)
    model, _ = load_policy(tiny=args.quick or args.tiny)
    episodes = main_job_episodes(model.config.vocab_size, args.quick, args.shape)
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
            "shape": args.shape,
            "prefix_tokens": SHAPES[args.shape][0],
            "prompt_tokens": SHAPES[args.shape][1],
            "completion_tokens": SHAPES[args.shape][2],
            "runs": results,
            "median_s": {row[0]: {"per_row": row[1], "shared": row[2], "ratio": row[3]} for row in rows},
            "max_abs_logp_difference": gap,
            "bf16_autocast_loss_pass": bf16,
        },
        args,
    )


if __name__ == "__main__":
    main()
