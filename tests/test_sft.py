"""SFT baseline: data conversion into the stepwise format, clear errors, and a tiny SFTTrainer run via run_sft."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, SFTConfig, TrlParser

import trl_stepwise.sft as sft_module
from trl_stepwise.data import load_math_dataset
from trl_stepwise.prompting import PromptBuilder, load_system_prompt
from trl_stepwise.sft import SFTDataError, SFTScriptArguments, run_sft, sft_dataset

REPO = Path(__file__).resolve().parents[1]


def tiny_sft_config(output_dir, **overrides) -> SFTConfig:
    """A seconds-long CPU SFT configuration for the tiny model."""
    base = dict(
        output_dir=str(output_dir),
        learning_rate=1e-2,
        max_length=256,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,  # the name transformers 5.19-5.2x all accept
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
    )
    return SFTConfig(**{**base, **overrides})


def test_gsm8k_rows_become_stepwise_prompt_completion():
    rows = load_math_dataset("gsm8k", split="train", limit=2)
    data = sft_dataset(rows, "gsm8k")
    assert data.column_names == ["prompt", "completion"] and len(data) == 2
    first = data[0]
    system, user = first["prompt"]
    assert system == {"role": "system", "content": load_system_prompt(None, "gsm8k")}
    assert system["content"].startswith("Solve the math word problem step by step.")
    assert user == {"role": "user", "content": rows[0]["question"]}
    assert first["completion"] == [
        {
            "role": "assistant",
            "content": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
            "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
            "The answer is: 72\n",
        }
    ]
    second = data[1]["completion"][0]["content"]
    assert "<<12/60=0.2>>" in second and "####" not in second
    assert second.splitlines()[-1] == "The answer is: 10"


def test_training_text_is_the_zero_shot_evaluation_prompt_plus_the_steps(tokenizer):
    """What SFT trains on must be what the stepwise evaluator renders (0 shots), followed by the steps."""
    rows = load_math_dataset("gsm8k", split="train", limit=3)
    example = sft_dataset(rows, "gsm8k")[2]
    steps = example["completion"][0]["content"].splitlines(keepends=True)
    builder = PromptBuilder(tokenizer, rows, k=0, flavour="gsm8k")
    prompt = tokenizer.apply_chat_template(example["prompt"], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(example["prompt"] + example["completion"], tokenize=False)
    assert prompt == builder.render(rows[2]["question"])
    assert full.startswith(builder.render(rows[2]["question"], steps))


def test_arithmetic_rows_convert():
    rows = load_math_dataset("arithmetic:level=2,n=4")
    data = sft_dataset(rows, "arithmetic")
    assert len(data) == 4
    for row, example in zip(rows, data, strict=True):
        lines = example["completion"][0]["content"].splitlines()
        assert len(lines) == 3  # two operations, then the answer line
        assert all("<<" in line for line in lines[:2])
        assert lines[-1] == f"The answer is: {row['answer']}"


def test_rows_without_steps_are_dropped_and_counted(caplog):
    rows = Dataset.from_list(
        [
            {"question": "What is 2+3?", "answer": "5", "solution": "2+3 = <<2+3=5>>5\n#### 5"},
            {"question": "What is 4+4?", "answer": "8", "solution": "   "},
        ]
    )
    with caplog.at_level(logging.WARNING, logger="trl_stepwise.sft"):
        data = sft_dataset(rows, "gsm8k")
    assert len(data) == 1 and data[0]["prompt"][1]["content"] == "What is 2+3?"
    assert "Dropped 1 of 2" in caplog.text


def test_missing_solution_column_names_problem_and_fix(tmp_path):
    with pytest.raises(SFTDataError, match=r"no 'solution' column.*--solution_field"):
        sft_dataset(Dataset.from_list([{"question": "What is 2+3?", "answer": "5"}]), "gsm8k")
    # a user's JSONL with question/answer only: the loader adds an empty solution column, which is just as unusable
    path = tmp_path / "answers_only.jsonl"
    path.write_text(json.dumps({"question": "What is 2+3?", "answer": "5"}) + "\n")
    with pytest.raises(ValueError, match=r"worked solution.*none of its 1 rows.*--solution_field"):
        sft_dataset(load_math_dataset(str(path)), "gsm8k")


def test_cpu_config_parses():
    parser = TrlParser((SFTScriptArguments, SFTConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(
        ["--config", str(REPO / "recipes/configs/sft_gsm8k_cpu.yaml")]
    )
    assert script_args.dataset_name == "gsm8k" and script_args.train_limit
    assert training_args.use_cpu and not training_args.bf16 and training_args.seed == 42
    assert training_args.output_dir == "outputs/sft_gsm8k_cpu"
    assert model_args.model_name_or_path is None  # the embedded model


def test_tiny_sft_run_trains_on_completions_only_and_saves(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    trainers = []

    class RecordingSFTTrainer(sft_module.SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    monkeypatch.setattr(sft_module, "SFTTrainer", RecordingSFTTrainer)
    output_dir = tmp_path / "sft"
    training_args = tiny_sft_config(output_dir, max_steps=2, per_device_train_batch_size=4, logging_steps=1, seed=0)
    summary = run_sft(
        SFTScriptArguments(dataset_name="gsm8k", train_limit=8),
        training_args,
        ModelConfig(model_name_or_path=str(tiny_model_dir)),
    )

    # labels: -100 over the whole rendered prompt (system + question + assistant header), the tokens elsewhere
    (trainer,) = trainers
    example = sft_dataset(load_math_dataset("gsm8k", split="train", limit=1), "gsm8k")[0]
    prompt_ids = tokenizer.apply_chat_template(example["prompt"], add_generation_prompt=True)["input_ids"]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    input_ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert input_ids[: len(prompt_ids)].tolist() == prompt_ids
    assert (labels[: len(prompt_ids)] == -100).all()
    trained = labels[labels != -100]
    assert tokenizer.decode(trained) == example["completion"][0]["content"] + "<|im_end|>\n"

    # the weights moved, the run is summarised, and the saved folder reloads as a model + tokenizer
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    after = AutoModelForCausalLM.from_pretrained(output_dir)
    changed = [
        name for name, tensor in after.state_dict().items() if not torch.equal(tensor, before.state_dict()[name])
    ]
    assert "model.layers.0.self_attn.q_proj.weight" in changed
    assert AutoTokenizer.from_pretrained(output_dir).chat_template == tokenizer.chat_template
    saved = json.loads((output_dir / "run_summary.json").read_text())
    assert saved == summary
    assert saved["train_examples"] == 8 and saved["global_steps"] == 2
    assert saved["final_train_loss"] is not None and saved["final_train_loss"] > 0
    assert saved["wall_seconds"] > 0


def test_lora_sft_saves_an_adapter_that_the_evaluator_loader_reads(tiny_model_dir, tmp_path):
    from trl_stepwise.models import load_model

    output_dir = tmp_path / "sft-lora"
    training_args = tiny_sft_config(output_dir, max_steps=1, per_device_train_batch_size=2)
    model_args = ModelConfig(
        model_name_or_path=str(tiny_model_dir),
        use_peft=True,
        lora_r=4,
        lora_alpha=8,
        lora_target_modules=["q_proj", "v_proj"],
    )
    run_sft(SFTScriptArguments(dataset_name="arithmetic:level=1,n=4"), training_args, model_args)
    assert (output_dir / "adapter_config.json").is_file() and not (output_dir / "model.safetensors").exists()
    base, tuned = load_model(str(tiny_model_dir)), load_model(str(output_dir))  # as `trl-stepwise evaluate` loads it
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, tuned(ids).logits)
