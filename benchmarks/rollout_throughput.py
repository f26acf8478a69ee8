"""Rollout throughput: this project's batched stepwise rollout against the original loop, TRL GRPO and a roofline.

In one process, on the same problems (default: 32 GSM8K test problems x 4 episodes) with the same sampling settings:

(a) ``StepwiseRollout``: batched stepwise decoding, shared few-shot prefix cache, growing cache, GQA SDPA, calculator;
(b) the original system's loop, re-implemented: one episode at a time, one ``model.generate`` per step that re-encodes
    the whole few-shot prompt plus the steps so far, generates a fixed ``max_step_tokens`` and cuts at the newline; a
    pending ``<<expr=`` in the cut step is filled by the calculator and generation goes on from there;
(c) TRL ``GRPOTrainer``'s own generation (``GRPOTrainer._generate``, which tokenises the chat prompts and calls
    ``_generate_single_turn`` -> ``model.generate``) of whole single-turn solutions for the same chat prompts;
(d) a roofline: the model's forward-pass throughput (tokens/s) on a large batch, no cache, all logits;
(e) ``StepwiseRollout`` on the colocated vLLM engine (continuous batching, pauses only for the calculator);
(f) plain vLLM ``LLM.generate`` of whole single-turn solutions for the same prompts: the ceiling of (e);
(g) TRL ``GRPOTrainer(use_vllm=True, vllm_mode="colocate")``: its generation, or the reason it cannot run here.

"Tokens" are policy tokens kept in the episodes (calculator inserts excluded): for (b) the tokens generated past the
cut are wasted work and are reported apart as "sampled". Then an ablation of (a): each optimisation switched off in
turn (by patching ``trl_stepwise.rollout`` from here, nothing else is modified), and the rollout batch size.

    python benchmarks/rollout_throughput.py            # full size (tens of minutes on a 2-core CPU)
    python benchmarks/rollout_throughput.py --quick    # seconds: a smoke run, not results
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any
from unittest import mock

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
    repeat_timed,
    setup_torch,
    write_json,
)
from transformers import DynamicCache, GenerationConfig

import trl_stepwise.engines.transformers_engine as rollout_module
from trl_stepwise import calculator, grading
from trl_stepwise.engines import eos_token_ids
from trl_stepwise.envs import EnvSession
from trl_stepwise.kv_cache import FORCE_GQA_ENV
from trl_stepwise.prompting import PromptBuilder
from trl_stepwise.rewards import correctness_reward
from trl_stepwise.rollout import SamplingConfig, StepwiseRollout

NAME = "rollout_throughput"


@dataclass
class Measurement:
    """One system's run over the same episodes."""

    system: str
    episodes: int
    seconds: float
    policy_tokens: int  # tokens the policy wrote that the episodes keep
    sampled_tokens: int  # every token the model sampled, including ones thrown away (b) or past EOS (c)
    forced_tokens: int = 0  # calculator inserts
    model_calls: int = 0
    correct: int = 0

    @property
    def tokens_per_second(self) -> float:
        return ratio(self.policy_tokens, self.seconds)

    @property
    def sampled_per_second(self) -> float:
        return ratio(self.sampled_tokens, self.seconds)

    @property
    def episodes_per_minute(self) -> float:
        return ratio(60.0 * self.episodes, self.seconds)

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "tokens_per_second": self.tokens_per_second,
            "sampled_tokens_per_second": self.sampled_per_second,
            "episodes_per_minute": self.episodes_per_minute,
            "accuracy": ratio(self.correct, self.episodes),
        }


# ---------------------------------------------------------------------------------------------------------------------
# (a) this project's rollout, and the ablation switches


class NoSharedPrefix:
    """A PromptBuilder view whose shared prefix is only the first token: every row encodes its whole prompt itself."""

    def __init__(self, builder: PromptBuilder, tokenizer: Any) -> None:
        self._builder = builder
        self._tokenizer = tokenizer

    def render_parts(self, question: str, steps: Sequence[str] = ()) -> tuple[str, str]:
        full = self._builder.render(question, steps)
        first = self._tokenizer.decode(self._tokenizer(full, add_special_tokens=False)["input_ids"][:1])
        if not full.startswith(first):
            raise RuntimeError("cannot split the prompt after its first token")
        return first, full[len(first) :]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._builder, name)


@contextlib.contextmanager
def rollout_switches(growing_cache: bool = True, gqa: bool = True) -> Iterator[None]:
    """Switch the growing cache and the GQA SDPA flag off inside ``trl_stepwise.rollout`` for the block."""
    with contextlib.ExitStack() as stack:
        if not growing_cache:
            stack.enter_context(
                mock.patch.object(rollout_module, "growing_cache", lambda config: DynamicCache(config=config))
            )
        if not gqa:
            stack.enter_context(mock.patch.object(rollout_module, "grouped_query_attention", contextlib.nullcontext))
            stack.enter_context(mock.patch.dict("os.environ", {FORCE_GQA_ENV: "0"}))
        yield


def run_stepwise(
    system: str,
    model: Any,
    tokenizer: Any,
    builder: PromptBuilder,
    rows: list[dict],
    groups: list[int],
    make_env: Any,
    sampling: SamplingConfig,
    shared_prefix: bool = True,
    growing_cache: bool = True,
    gqa: bool = True,
    engine: Any = None,
) -> Measurement:
    """(a), or (e) with ``engine``: ``StepwiseRollout.run`` over all episodes, with the optimisations chosen."""
    view = builder if shared_prefix else NoSharedPrefix(builder, tokenizer)
    engine = StepwiseRollout(
        model, tokenizer, view, sampling=sampling, step_delimiter="\n", calculator=True, engine=engine
    )
    with rollout_switches(growing_cache=growing_cache, gqa=gqa), Timer() as timer:
        trajectories = engine.run(make_env, rows, group_ids=groups)
    stats = engine.stats
    return Measurement(
        system=system,
        episodes=len(rows),
        seconds=timer.seconds,
        policy_tokens=stats.generated_tokens,
        sampled_tokens=stats.generated_tokens,
        forced_tokens=stats.forced_tokens,
        model_calls=stats.model_calls,
        correct=sum(t.episode.correct for t in trajectories),
    )


# ---------------------------------------------------------------------------------------------------------------------
# (b) the original loop


def _cut_step(session: EnvSession, partial: str, text: str) -> tuple[str, str | None, str]:
    """Where the original loop cuts freshly generated ``text`` (continuing ``partial``).

    Returns ``(kept, kind, insert)``: kind "calc" (kept ends with a pending ``<<expr=``, ``insert`` is the calculator's
    completion), "newline" (kept ends with the newline) or None (no newline: the whole text is kept).
    """
    position = 0
    while True:
        newline = text.find("\n", position)
        end = newline + 1 if newline >= 0 else len(text)
        for j in range(position + 1, end + 1):
            if text[j - 1] in "=>" and calculator.pending_calculation(partial + text[:j]) is not None:
                insert, _ = session.tool_insert(partial + text[:j])  # the calculator tool, counted by the session
                if insert:
                    return text[:j], "calc", insert
                position = j  # the expression failed: the model's own text stands
                break
        else:
            return text[:end], ("newline" if newline >= 0 else None), ""


def _tokens_for_chars(tokenizer: Any, ids: list[int], chars: int) -> int:
    """How many of ``ids`` it takes to cover the first ``chars`` characters of their decoding."""
    for k in range(1, len(ids) + 1):
        if len(tokenizer.decode(ids[:k])) >= chars:
            return k
    return len(ids)


def run_original_loop(
    model: Any,
    tokenizer: Any,
    builder: PromptBuilder,
    rows: list[dict],
    make_env: Any,
    sampling: SamplingConfig,
) -> Measurement:
    """(b): one episode at a time, one ``generate`` of ``max_step_tokens`` per step over the re-encoded prompt."""
    eos_ids = eos_token_ids(tokenizer, model.generation_config)
    config = GenerationConfig(
        max_new_tokens=sampling.max_step_tokens,
        do_sample=not sampling.greedy,
        temperature=sampling.temperature if not sampling.greedy else None,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        eos_token_id=sorted(eos_ids),
        pad_token_id=tokenizer.pad_token_id,
    )
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    measurement = Measurement(
        system="(b) original loop", episodes=len(rows), seconds=0.0, policy_tokens=0, sampled_tokens=0
    )
    model.eval()
    with torch.no_grad(), Timer() as timer:
        for row in rows:
            session = EnvSession(make_env(), row)
            steps: list[str] = []
            while not session.done:
                partial, policy_tokens, eos = "", 0, False
                while True:
                    prompt = builder.render(row["question"], [*steps, partial] if (steps or partial) else ())
                    encoded = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(model.device)
                    output = model.generate(**encoded, generation_config=config)
                    new = output[0, encoded["input_ids"].shape[1] :].tolist()
                    measurement.model_calls += 1
                    measurement.sampled_tokens += len(new)
                    stop = next((k for k, token in enumerate(new) if token in eos_ids), None)
                    eos = stop is not None
                    ids = new if stop is None else new[:stop]
                    kept, kind, insert = _cut_step(session, partial, tokenizer.decode(ids))
                    kept_tokens = _tokens_for_chars(tokenizer, ids, len(kept)) if kind else len(ids)
                    policy_tokens += kept_tokens + (1 if eos and kind is None else 0)
                    partial += kept + insert
                    measurement.forced_tokens += len(tokenizer(insert, add_special_tokens=False)["input_ids"])
                    if kind != "calc" or policy_tokens >= sampling.max_step_tokens:
                        eos = eos and kind is None
                        break
                session.step(partial, eos=eos, num_tokens=policy_tokens)
                steps.append(partial)
                measurement.policy_tokens += policy_tokens
            measurement.correct += session.episode.correct
    measurement.seconds = timer.seconds
    return measurement


# ---------------------------------------------------------------------------------------------------------------------
# (c) TRL GRPOTrainer's generation


def build_grpo_trainer(
    model: Any,
    tokenizer: Any,
    prompts: list[list[dict[str, str]]],
    answers: list[str],
    num_generations: int,
    max_completion_length: int,
    batch_size: int,
    sampling: SamplingConfig,
    output_dir: str,
    use_vllm: bool = False,
) -> Any:
    """A CPU ``GRPOTrainer`` over the same chat prompts (generation only is used; beta=0 loads no reference)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    config = GRPOConfig(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        num_generations=num_generations,
        max_completion_length=max_completion_length,
        per_device_train_batch_size=batch_size,
        temperature=max(sampling.temperature, 1e-5),
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        beta=0.0,
        report_to=[],
        seed=sampling.seed or 0,
        save_strategy="no",
        logging_strategy="no",
        use_vllm=use_vllm,
        vllm_mode="colocate",
    )
    dataset = Dataset.from_dict({"prompt": prompts, "answer": answers})
    return GRPOTrainer(
        model=model, reward_funcs=[correctness_reward], args=config, train_dataset=dataset, processing_class=tokenizer
    )


def run_grpo_generation(
    trainer: Any, prompts: list[list[dict[str, str]]], answers: list[str], system: str = "(c) TRL GRPOTrainer"
) -> Measurement:
    """(c): ``GRPOTrainer._generate`` on batches of ``args.generation_batch_size`` prompts, as in training."""
    size = trainer.args.generation_batch_size
    measurement = Measurement(system=system, episodes=len(prompts), seconds=0.0, policy_tokens=0, sampled_tokens=0)
    trainer.model.train()  # as inside trainer.train(): _generate picks "train" mode from model.training
    if trainer.args.seed is not None:
        torch.manual_seed(trainer.args.seed)
    with Timer() as timer:
        for start in range(0, len(prompts), size):
            chunk = prompts[start : start + size]
            _, completion_ids, _, completions, *_ = trainer._generate(chunk)
            lengths = [len(ids) for ids in completion_ids]
            measurement.model_calls += max(lengths, default=0)
            measurement.policy_tokens += sum(lengths)
            measurement.sampled_tokens += len(chunk) * max(lengths, default=0)  # rows run until the longest ends
            for completion, answer in zip(completions, answers[start : start + size], strict=True):
                text = completion[-1]["content"] if isinstance(completion, list) else completion
                measurement.correct += bool(grading.grade_solution(text, answer).correct)
    measurement.seconds = timer.seconds
    return measurement


# ---------------------------------------------------------------------------------------------------------------------
# (d) roofline


def run_vllm_whole_solutions(vllm_engine: Any, tokenizer: Any, builder: PromptBuilder, rows, sampling, budget):
    """(f): one ``LLM.generate`` call for every episode's whole solution (no stops but EOS), prefix caching on."""
    from vllm import SamplingParams

    prompts = [
        {
            "prompt_token_ids": tokenizer("".join(builder.render_parts(row["question"])), add_special_tokens=False)[
                "input_ids"
            ]
        }
        for row in rows
    ]
    params = SamplingParams(
        temperature=sampling.temperature,
        max_tokens=budget,
        stop_token_ids=sorted(vllm_engine.stop_token_ids),
        seed=sampling.seed if vllm_engine.per_request_seeds else None,  # as the engine does: no offsets on CPU
    )
    with Timer() as timer:
        outputs = vllm_engine.llm.generate(prompts, params, use_tqdm=False)
    completions = [out.outputs[0].text for out in outputs]
    tokens = sum(len(out.outputs[0].token_ids) for out in outputs)
    correct = correctness_reward(completions, answer=[str(row["answer"]) for row in rows])
    return Measurement(
        system="(f) plain vLLM, whole solutions",
        episodes=len(rows),
        seconds=timer.seconds,
        policy_tokens=tokens,
        sampled_tokens=tokens,
        correct=int(sum(c or 0.0 for c in correct)),
    )


def run_grpo_vllm(model: Any, tokenizer: Any, prompts, answers, args, sampling, output_dir) -> Measurement | str:
    """(g): TRL's GRPOTrainer with colocated vLLM: its generation timed, or the error that stops it here."""
    try:
        trainer = build_grpo_trainer(
            model,
            tokenizer,
            prompts,
            answers,
            args.episodes_per_problem,
            args.max_episode_tokens,
            args.batch_size,
            sampling,
            output_dir,
            use_vllm=True,
        )
        trainer._generate(prompts[:2])
        return run_grpo_generation(trainer, prompts, answers, system="(g) TRL GRPOTrainer generation, vLLM")
    except Exception as err:  # noqa: BLE001 - reported as the result
        return f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"


def roofline(model: Any, batch: int, length: int, repeats: int) -> dict[str, float]:
    """Forward-pass tokens/s of a ``batch x length`` block (no cache, every position's logits), median of repeats."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator).to(model.device)
    model.eval()

    def forward() -> None:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    times = repeat_timed(forward, repeats=repeats, warmup=1)
    seconds = median(times)
    return {
        "batch": batch,
        "length": length,
        "seconds": seconds,
        "times": times,
        "tokens_per_second": batch * length / seconds,
    }


# ---------------------------------------------------------------------------------------------------------------------


def colocated_vllm(model: Any, tokenizer: Any, seed: int, dtype: str = "float32") -> Any:
    """The colocated vLLM engine (e) and (f) run on: the policy's weights in float32, as the trainer's engine holds
    them without ``--bf16`` (under it, bfloat16: ``engines.factory.engine_dtype``)."""
    from trl_stepwise.engines.factory import vllm_model_path
    from trl_stepwise.engines.vllm_engine import VLLMEngine

    return VLLMEngine(
        vllm_model_path(model, tokenizer),
        tokenizer,
        dtype=dtype,
        max_model_len=2048,
        seed=seed,
        generation_config=model.generation_config,
    )


def parse_args() -> Any:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="gsm8k")
    parser.add_argument("--split", default="test")
    parser.add_argument("--num_problems", type=int, default=32)
    parser.add_argument("--episodes_per_problem", type=int, default=4)
    parser.add_argument("--n_few_shot", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max_step_tokens", type=int, default=64, help="(a) step limit = (b) tokens per generate.")
    parser.add_argument("--max_episode_tokens", type=int, default=256, help="Episode budget = (c) completion length.")
    parser.add_argument("--batch_size", type=int, default=64, help="(a) rollout batch = (c) generation batch.")
    parser.add_argument("--baseline_problems", type=int, default=None, help="Run (b) on the first N problems only.")
    parser.add_argument("--roofline_batch", type=int, default=32)
    parser.add_argument("--roofline_length", type=int, default=128)
    parser.add_argument("--ablation_problems", type=int, default=16)
    parser.add_argument("--ablation_batch_sizes", default="8,16,32,64")
    parser.add_argument(
        "--skip", default="", help="Comma list of parts to skip: baseline,grpo,vllm,grpo_vllm,roofline,ablation."
    )
    args = parser.parse_args()
    if args.quick:
        args.num_problems, args.episodes_per_problem, args.n_few_shot = 2, 2, 1
        args.max_step_tokens, args.max_episode_tokens, args.batch_size = 12, 24, 4
        args.roofline_batch, args.roofline_length = 4, 32
        args.ablation_problems, args.ablation_batch_sizes = 1, "2,4"
    return args


def main() -> None:
    args = parse_args()
    setup_torch(args)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    model, tokenizer = load_policy(args.tiny, seed=args.seed)
    problems = load_problems(args.dataset, args.split, args.num_problems)
    builder = prompt_builder(tokenizer, args.dataset, args.n_few_shot, seed=args.seed)
    rows, groups = repeat_rows(problems, args.episodes_per_problem)
    flavour = "math" if args.dataset.startswith("math") else "gsm8k"
    make_env = env_factory(flavour, args.max_episode_tokens)
    sampling = SamplingConfig(
        temperature=args.temperature, max_step_tokens=args.max_step_tokens, batch_size=args.batch_size, seed=args.seed
    )
    prefix_tokens = len(tokenizer(builder.shared_prefix, add_special_tokens=False)["input_ids"])
    print(f"{len(problems)} problems x {args.episodes_per_problem} episodes; few-shot prefix {prefix_tokens} tokens")

    # Warm-up (first calls allocate and pick kernels), not timed.
    run_stepwise("warm-up", model, tokenizer, builder, rows[:2], groups[:2], make_env, sampling)

    results: dict[str, Measurement] = {}
    results["a"] = run_stepwise("(a) StepwiseRollout", model, tokenizer, builder, rows, groups, make_env, sampling)
    print(f"(a) done in {results['a'].seconds:.1f} s", flush=True)
    if "baseline" not in skip:
        limit = (args.baseline_problems or len(problems)) * args.episodes_per_problem
        results["b"] = run_original_loop(model, tokenizer, builder, rows[:limit], make_env, sampling)
        print(f"(b) done in {results['b'].seconds:.1f} s", flush=True)
    if "grpo" not in skip:
        grpo_model, _ = load_policy(args.tiny, seed=args.seed)  # its own copy: GRPOTrainer adjusts the model
        prompts = [builder.messages(row["question"]) for row in rows]
        answers = [str(row["answer"]) for row in rows]
        with tempfile.TemporaryDirectory() as output_dir:
            trainer = build_grpo_trainer(
                grpo_model,
                tokenizer,
                prompts,
                answers,
                args.episodes_per_problem,
                args.max_episode_tokens,
                args.batch_size,
                sampling,
                output_dir,
            )
            trainer._generate(prompts[:2])  # warm-up
            results["c"] = run_grpo_generation(trainer, prompts, answers)
        del trainer, grpo_model
        print(f"(c) done in {results['c'].seconds:.1f} s", flush=True)
    notes: dict[str, str] = {}
    if "vllm" not in skip:
        with Timer() as start_timer:
            vllm_engine = colocated_vllm(model, tokenizer, args.seed)
        notes["vllm_start_seconds"] = f"{start_timer.seconds:.1f}"
        run_stepwise("warm-up", None, tokenizer, builder, rows[:2], groups[:2], make_env, sampling, engine=vllm_engine)
        results["e"] = run_stepwise(
            "(e) StepwiseRollout, vLLM engine",
            None,
            tokenizer,
            builder,
            rows,
            groups,
            make_env,
            sampling,
            engine=vllm_engine,
        )
        print(f"(e) done in {results['e'].seconds:.1f} s", flush=True)
        results["f"] = run_vllm_whole_solutions(
            vllm_engine, tokenizer, builder, rows, sampling, args.max_episode_tokens
        )
        print(f"(f) done in {results['f'].seconds:.1f} s", flush=True)
        del vllm_engine
    if "grpo_vllm" not in skip:
        grpo_model, _ = load_policy(args.tiny, seed=args.seed)
        prompts = [builder.messages(row["question"]) for row in rows]
        answers = [str(row["answer"]) for row in rows]
        with tempfile.TemporaryDirectory() as output_dir:
            outcome = run_grpo_vllm(grpo_model, tokenizer, prompts, answers, args, sampling, output_dir)
        if isinstance(outcome, str):
            notes["g"] = f"TRL GRPOTrainer(use_vllm=True, vllm_mode='colocate') cannot run here: {outcome}"
            print(notes["g"], flush=True)
        else:
            results["g"] = outcome
        del grpo_model
    roof = None
    if "roofline" not in skip:
        roof = roofline(model, args.roofline_batch, args.roofline_length, repeats=3)

    a = results["a"]
    table_rows = [
        [
            m.system,
            m.episodes,
            m.seconds,
            m.policy_tokens,
            m.tokens_per_second,
            m.sampled_per_second,
            m.episodes_per_minute,
            ratio(m.correct, m.episodes),
            ratio(a.tokens_per_second, m.tokens_per_second),
            ratio(a.episodes_per_minute, m.episodes_per_minute),
        ]
        for m in results.values()
    ]
    if roof is not None:
        table_rows.append(
            [
                f"(d) roofline: forward {roof['batch']}x{roof['length']}",
                "-",
                roof["seconds"],
                roof["batch"] * roof["length"],
                roof["tokens_per_second"],
                "-",
                "-",
                "-",
                ratio(a.tokens_per_second, roof["tokens_per_second"]),
                "-",
            ]
        )
    headers = [
        "system",
        "episodes",
        "seconds",
        "policy tokens",
        "tokens/s",
        "sampled tok/s",
        "episodes/min",
        "accuracy",
        "(a)/x tok/s",
        "(a)/x ep/min",
    ]
    print_table(headers, table_rows, title="Rollout throughput")

    payload = {
        "settings": {
            "problems": len(problems),
            "episodes_per_problem": args.episodes_per_problem,
            "few_shot_prefix_tokens": prefix_tokens,
            "sampling": asdict(sampling),
            "max_episode_tokens": args.max_episode_tokens,
        },
        "systems": {key: m.to_json() for key, m in results.items()},
        "roofline": roof,
        "ratios": {
            f"a_over_{key}_tokens_per_second": ratio(a.tokens_per_second, m.tokens_per_second)
            for key, m in results.items()
            if key != "a"
        }
        | ({"a_over_d_tokens_per_second": ratio(a.tokens_per_second, roof["tokens_per_second"])} if roof else {}),
        "ablation": [],
        "notes": notes,
    }
    if "e" in results:
        e = results["e"]
        payload["ratios"]["e_over_f_tokens_per_second"] = ratio(e.tokens_per_second, results["f"].tokens_per_second)
        payload["ratios"]["e_over_a_tokens_per_second"] = ratio(e.tokens_per_second, a.tokens_per_second)
        print(
            f"vLLM stepwise / plain vLLM whole solutions: {payload['ratios']['e_over_f_tokens_per_second']:.2f}x; "
            f"vLLM stepwise / transformers engine: {payload['ratios']['e_over_a_tokens_per_second']:.2f}x"
        )
    write_json(NAME, payload, args)  # the main figures are kept even if the (long) ablation is stopped
    if "ablation" not in skip:
        run_ablation(args, model, tokenizer, builder, problems, make_env, sampling, payload)


def run_ablation(
    args: Any,
    model: Any,
    tokenizer: Any,
    builder: PromptBuilder,
    problems: list[dict],
    make_env: Any,
    sampling: Any,
    payload: dict[str, Any],
) -> list[dict[str, Any]]:
    """(a) with one optimisation off at a time, all off, and at several batch sizes (same episodes, same seed).

    Each variant is appended to ``payload["ablation"]`` and the JSON rewritten: a stopped run keeps what it measured.
    """
    rows, groups = repeat_rows(problems[: args.ablation_problems], args.episodes_per_problem)
    variants: list[tuple[str, dict[str, Any], int]] = [
        ("all on", {}, sampling.batch_size),
        ("shared-prefix cache off", {"shared_prefix": False}, sampling.batch_size),
        ("DynamicCache instead of growing cache", {"growing_cache": False}, sampling.batch_size),
        ("GQA SDPA flag off", {"gqa": False}, sampling.batch_size),
        ("all three off", {"shared_prefix": False, "growing_cache": False, "gqa": False}, sampling.batch_size),
    ]
    for size in (int(s) for s in args.ablation_batch_sizes.split(",") if s.strip()):
        if size != sampling.batch_size:
            variants.append((f"batch size {size}", {}, size))
    out = payload["ablation"]
    for label, switches, size in variants:
        config = SamplingConfig(**{**asdict(sampling), "batch_size": size})
        m = run_stepwise(label, model, tokenizer, builder, rows, groups, make_env, config, **switches)
        out.append({"variant": label, "batch_size": size, **switches, **m.to_json()})
        print(f"ablation: {label}: {m.tokens_per_second:.1f} tok/s", flush=True)
        write_json(NAME, payload, args)
    reference = out[0]["tokens_per_second"]
    print_table(
        ["variant", "batch", "seconds", "policy tokens", "tokens/s", "vs all on", "model calls"],
        [
            [
                r["variant"],
                r["batch_size"],
                r["seconds"],
                r["policy_tokens"],
                r["tokens_per_second"],
                ratio(r["tokens_per_second"], reference),
                r["model_calls"],
            ]
            for r in out
        ],
        title=f"Ablation of (a): {len(rows)} episodes",
    )
    return out


if __name__ == "__main__":
    main()
