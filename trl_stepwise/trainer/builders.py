"""What the trainer builds before training: the policy (loaded, adapters attached), the judge, the distillation
teacher, the problem sets and the prompts (its environments: ``trainer/environments.py``). Every refusal here
happens before the first rollout."""

from __future__ import annotations

import logging
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trl_stepwise.data import load_math_dataset, normalise_columns
from trl_stepwise.models import build_quantization_config, is_quantized, load_model, load_tokenizer
from trl_stepwise.prompting import AlternatingExamples, PromptBuilder, load_system_prompt, with_worked_examples
from trl_stepwise.trainer.config import StepwiseReinforceConfig

logger = logging.getLogger(__name__)


def build_policy(
    model: str | PreTrainedModel | None, args: StepwiseReinforceConfig, peft_config: Any
) -> tuple[PreTrainedModel, str | None]:
    """The model to train and its name: loaded with ``model_init_kwargs`` when given by name, adapters attached."""
    if model is None or isinstance(model, str):
        name = model
        init_kwargs = dict(args.model_init_kwargs or {})  # every from_pretrained kwarg (attn_implementation, ...)
        dtype = init_kwargs.pop("dtype", init_kwargs.pop("torch_dtype", args.model_dtype))
        if isinstance(init_kwargs.get("distributed_config"), dict):  # from a YAML file or --model_init_kwargs JSON
            from transformers.distributed import DistributedConfig

            init_kwargs["distributed_config"] = DistributedConfig(**init_kwargs["distributed_config"])
        model = load_model(name, dtype=dtype, **init_kwargs)
    else:
        name = getattr(getattr(model, "config", None), "_name_or_path", None)
        if args.model_init_kwargs:
            logger.warning(
                "model_init_kwargs (%s) are ignored: the model was passed already loaded; pass its name instead.",
                ", ".join(sorted(args.model_init_kwargs)),
            )
    if args.disable_dropout:  # TRL's setting: dropout makes the trainer's log-probs differ from the sampler's
        from trl.trainer.utils import disable_dropout_in_model

        disable_dropout_in_model(model)
    model = attach_peft(model, peft_config, seed=args.seed)
    warn_on_16bit_training(model, args.learning_rate)
    return model, name


def attach_peft(model: PreTrainedModel, peft_config: Any, seed: int = 0) -> PreTrainedModel:
    """The model with ``peft_config``'s adapters (a quantized base prepared for k-bit training first), initialised
    from ``seed`` alone: the same adapter whatever loading the base drew from the random stream (a base sharded at
    load time draws differently), on every process count."""
    quantized = is_quantized(model)
    if peft_config is None:
        if quantized and not is_peft_model(model):
            raise ValueError(
                "The model is loaded in 4/8-bit but no peft_config was given: quantized weights cannot be trained. "
                "Pass peft_config (e.g. --use_peft with LoRA) or load the model in full precision."
            )
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_4bit_layers_differentiable(model)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return get_peft_model(model, peft_config)


def keep_4bit_layers_differentiable(model: torch.nn.Module) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weights at its first no-grad eval call (the
    rollout's decoding) into a kernel without a backward: the adapters above it would then silently get no gradient.
    Keep the differentiable kernel on every 4-bit layer of a model that trains."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def warn_on_16bit_training(model: torch.nn.Module, learning_rate: float) -> None:
    """Warn when full weights train in 16-bit: at small learning rates most AdamW updates round away."""
    if is_peft_model(model):
        return
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    if dtypes & {torch.bfloat16, torch.float16}:
        logger.warning(
            "The trainable weights are %s: at learning_rate=%g most AdamW updates are smaller than their rounding "
            "step and are lost. Load the model in float32 (--model_dtype float32) and train with --bf16 autocast.",
            ", ".join(sorted(str(d) for d in dtypes)),
            learning_rate,
        )


def build_judge(args: StepwiseReinforceConfig, policy_device: torch.device):
    """The judge named by ``args.judge_model`` (None when unset), frozen, on ``judge_device`` or the policy's."""
    if not args.judge_model:
        return None
    from trl_stepwise.judge import StepJudge

    quantization = build_quantization_config(load_in_4bit=args.judge_load_in_4bit, frozen=True)
    return StepJudge(
        args.judge_model,
        mode=args.judge_mode,
        prompt=args.judge_prompt,
        questions=args.judge_questions,
        batch_size=args.judge_batch_size,
        device=args.judge_device or policy_device,
        quantization_config=quantization,
    )


def build_teacher(teacher, args: StepwiseReinforceConfig, tokenizer: PreTrainedTokenizerBase):
    """The frozen distillation teacher; it must share the policy's vocabulary (log-probs of the same token ids)."""
    if teacher is None:
        if args.distill_coef > 0:
            raise ValueError(
                "distill_coef > 0 needs a teacher: set --teacher_model (a hub id or a local folder), or pass "
                "teacher_model= to StepwiseReinforceTrainer."
            )
        return None
    if args.distill_coef <= 0:
        logger.warning("A teacher model was given but distill_coef is 0: the teacher is not used.")
        return None
    if isinstance(teacher, str):
        teacher_vocab = load_tokenizer(teacher).get_vocab()
        if teacher_vocab != tokenizer.get_vocab():
            raise ValueError(
                f"The teacher {teacher!r} has a different tokenizer from the policy: distillation compares "
                "log-probabilities of the same token ids, so pick a teacher of the same model family."
            )
        teacher = load_model(teacher, dtype=args.model_dtype)
    if teacher.get_output_embeddings().weight.shape[0] < len(tokenizer):
        raise ValueError("The teacher's vocabulary is smaller than the policy tokenizer's: use a same-family teacher.")
    return teacher.eval().requires_grad_(False)


def as_problems(
    dataset: Dataset | str | dict, split: str, required: tuple[str, ...] = ("question", "answer")
) -> Dataset | dict:
    """A problem set from a bundled name, a dict of sets or a Dataset. A Dataset holding the columns the environment
    reads (``required``: ``Env.required_columns``) is used as it is; one lacking them is mapped to ``question`` /
    ``answer`` (``normalise_columns``, which says which fields it looked for)."""
    if isinstance(dataset, dict):
        return {name: as_problems(subset, split, required) for name, subset in dataset.items()}
    if isinstance(dataset, str):
        return load_math_dataset(dataset, split=split)
    if set(required) <= set(dataset.column_names):
        return dataset
    return normalise_columns(dataset)


def build_prompts(
    args: StepwiseReinforceConfig,
    tokenizer: PreTrainedTokenizerBase,
    few_shot_dataset: Dataset | AlternatingExamples | None,
    train_dataset: Dataset,
    flavour: str,
    n_few_shot: int,
) -> PromptBuilder:
    """The prompts: system prompt and ``n_few_shot`` worked examples of the flavour, from the few-shot dataset or
    the training set (none looked for when ``n_few_shot`` is 0). Where the flavour's bundled examples stand in for a
    source with final answers only, they come with their own count unless the config names one, as in
    ``trl-stepwise evaluate``."""
    examples: list = []
    if n_few_shot > 0:
        examples = few_shot_dataset if few_shot_dataset is not None else train_dataset
        source = "the few-shot dataset" if few_shot_dataset is not None else "the training set"
        if not isinstance(examples, AlternatingExamples):  # several named sources: each was checked when loaded
            examples, note = with_worked_examples(list(examples), flavour, source=source)
            fallback_shots = getattr(examples, "shots", None)
            if args.n_few_shot is None and fallback_shots is not None:
                n_few_shot = fallback_shots
            if note:
                logger.warning(f"{note} It shows {n_few_shot} of them.")
    return PromptBuilder(
        tokenizer,
        examples,
        k=n_few_shot,
        system_prompt=load_system_prompt(args.system_prompt, flavour),
        flavour=flavour,
        seed=args.few_shot_seed,
        max_example_chars=args.max_example_chars,
        pool_size=args.few_shot_pool_size,
    )
