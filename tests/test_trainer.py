"""StepwiseReinforceTrainer on tiny random Llama models: config errors, training, reference, LoRA, resume, DDP."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from tiny_training import length_reward, make_config

from trl_stepwise.data import DatasetFieldError
from trl_stepwise.trainer import StepwiseReinforceTrainer
from trl_stepwise.trainer.builders import as_problems as _as_problems
from trl_stepwise.trainer.reference import REFERENCE_FILE
from trl_stepwise.trainer.saving import STATE_FILE

REPO = Path(__file__).resolve().parents[1]


def make_trainer(model, tokenizer, dataset, output_dir, reward_funcs=(length_reward,), **overrides):
    return StepwiseReinforceTrainer(
        model=model,
        args=make_config(output_dir, **overrides),
        train_dataset=dataset,
        processing_class=tokenizer,
        reward_funcs=list(reward_funcs),
    )


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def logged(trainer, key: str) -> dict[int, float]:
    return {entry["step"]: entry[key] for entry in trainer.state.log_history if key in entry}


# ---------------------------------------------------------------------------------------------- configuration errors
def test_leave_one_out_needs_two_generations(tmp_path):
    with pytest.raises(ValueError, match="leave_one_out baseline needs num_generations >= 2"):
        make_config(tmp_path, num_generations=1, per_device_train_batch_size=4, baseline="leave_one_out")
    # another baseline makes single-episode groups legal
    assert make_config(tmp_path, num_generations=1, baseline="batch_mean").problems_per_batch == 4


def test_batch_size_must_be_a_multiple_of_num_generations(tmp_path):
    with pytest.raises(ValueError, match=r"generation batch \(6 x 1 = 6 episodes.*divisible by num_generations \(4\)"):
        make_config(tmp_path, per_device_train_batch_size=6, num_generations=4)


def test_unknown_algorithm(tmp_path):
    with pytest.raises(ValueError, match="algorithm='ppo_typo' is not registered.*reinforce_stable.*rloo"):
        make_config(tmp_path, algorithm="ppo_typo")


def test_4bit_model_without_peft_names_peft(tiny_model, tokenizer, arithmetic_problems, tmp_path):
    tiny_model.is_loaded_in_4bit = True
    with pytest.raises(ValueError, match="peft_config"):
        make_trainer(tiny_model, tokenizer, arithmetic_problems, tmp_path)


def test_unknown_dataset_fields_are_named(tiny_model, tokenizer, tmp_path):
    bad = Dataset.from_dict({"text": ["1+1?"], "gold": ["2"]})
    with pytest.raises(DatasetFieldError, match=r"no question field.*found text, gold"):
        _as_problems(bad, "train")
    with pytest.raises(DatasetFieldError, match="found text, gold"):
        make_trainer(tiny_model, tokenizer, bad, tmp_path)
    # recognised alternative names are mapped to question/answer
    mapped = _as_problems(Dataset.from_dict({"problem": ["1+1?"], "target": ["2"]}), "train")
    assert (mapped[0]["question"], mapped[0]["answer"]) == ("1+1?", "2")


# ---------------------------------------------------------------------------------------------- a 3-step run
@pytest.fixture(scope="module")
def trained(make_tiny_model, tokenizer, arithmetic_problems, tmp_path_factory):
    """3 optimizer steps, 2 micro-batches of 4 episodes each (gradient accumulation 2), varying reward, KL 0.1."""
    output_dir = tmp_path_factory.mktemp("trained")
    model = make_tiny_model()
    before = snapshot(model)
    trainer = make_trainer(model, tokenizer, arithmetic_problems, output_dir, gradient_accumulation_steps=2)
    trainer.train()
    return trainer, before, output_dir


def test_training_changes_weights(trained):
    trainer, before, _ = trained
    assert trainer.state.global_step == 3
    after = snapshot(trainer.model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, f"only {changed} changed"
    # the gradient comes from the rewards: at step 1 policy == reference, so the KL term alone gives ~0 gradient
    # (Adam would still turn float noise into full-size updates, so "weights changed" alone proves little)
    assert logged(trainer, "grad_norm")[1] > 1e-2
    rewards = logged(trainer, "reward")
    assert set(rewards) == {1, 2, 3} and all(r > 0 for r in rewards.values())
    assert all(torch.isfinite(torch.tensor(v)) for v in logged(trainer, "loss").values())


def test_reference_stays_at_initial_weights_and_kl_starts_at_zero(trained):
    trainer, before, _ = trained
    assert trainer.ref_model is not None and not any(p.requires_grad for p in trainer.ref_model.parameters())
    reference = snapshot(trainer.ref_model)
    assert all(torch.equal(before[k], reference[k]) for k in before)
    kl = logged(trainer, "kl")
    assert kl[1] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the first update
    assert kl[3] > 1e-6  # after two updates at lr 1e-2 the policy has moved away from the reference


def test_rollouts_jsonl_has_one_line_per_episode(trained):
    _, _, output_dir = trained
    records = [json.loads(line) for line in (output_dir / "rollouts.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 2 * 4  # steps x accumulation x episodes per micro-batch
    assert sorted({r["step"] for r in records}) == [0, 1, 2]  # written at rollout time, before the step's update
    for step in (0, 1, 2):
        groups = [r["group_id"] for r in records if r["step"] == step]
        assert len(set(groups)) == 4 and all(groups.count(g) == 2 for g in groups)  # 4 problems x 2 episodes
    assert all(r["question"] and r["answer"] and r["steps"] and r["end_reason"] for r in records)
    assert {r["end_reason"] for r in records} <= {"answer", "eos", "max_steps", "token_budget"}


def test_training_curves_png_is_written(trained):
    _, _, output_dir = trained
    data = (output_dir / "training_curves.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


# ---------------------------------------------------------------------------------------------- reference refresh
def test_reference_refresh_every_ref_sync_steps(tiny_model, tokenizer, arithmetic_problems, tmp_path, monkeypatch):
    trainer = make_trainer(
        tiny_model, tokenizer, arithmetic_problems, tmp_path, max_steps=5, ref_sync_steps=2, log_rollouts=False
    )
    synced_at: list[int] = []
    original = trainer.sync_reference

    def spy():
        synced_at.append(trainer.state.global_step)
        original()
        model = trainer.accelerator.unwrap_model(trainer.model)
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), trainer.ref_model.parameters(), strict=True))

    monkeypatch.setattr(trainer, "sync_reference", spy)
    trainer.train()
    assert trainer.state.global_step == 5
    assert synced_at == [2, 4]
    kl = logged(trainer, "kl")
    # the rollout of step 3 (and 5) happens right after a refresh: policy == reference again, so its KL is 0
    assert kl[1] == pytest.approx(0.0, abs=1e-6)
    assert kl[3] == pytest.approx(0.0, abs=1e-6) and kl[5] == pytest.approx(0.0, abs=1e-6)
    assert kl[2] > 1e-6 and kl[4] > 1e-6


# ---------------------------------------------------------------------------------------------- LoRA
def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def make_lora_trainer(model, tokenizer, dataset, output_dir, **overrides):
    return StepwiseReinforceTrainer(
        model=model,
        args=make_config(output_dir, log_rollouts=False, **overrides),
        train_dataset=dataset,
        processing_class=tokenizer,
        reward_funcs=[length_reward],
        peft_config=lora_config(),
    )


def adapter_weights(model, adapter: str) -> dict[str, torch.Tensor]:
    """LoRA weights of one adapter, keyed by the module path without the adapter name."""
    marker = f".{adapter}."
    return {k.replace(marker, "."): v.detach().clone() for k, v in model.named_parameters() if marker in k}


def test_lora_trains_only_adapters_and_reference_is_the_base_model(
    make_tiny_model, tokenizer, arithmetic_problems, tmp_path
):
    model = make_tiny_model()
    base_copy = copy.deepcopy(model)  # get_peft_model injects the adapters into `model` in place
    base_before = snapshot(model)
    trainer = make_lora_trainer(model, tokenizer, arithmetic_problems, tmp_path, max_steps=2)
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    lora_before = {k: v.detach().clone() for k, v in peft_model.named_parameters() if "lora_" in k}
    assert lora_before and trainer.ref_model is None  # no full copy of the weights for the reference
    trainer.train()

    lora_after = {k: v.detach() for k, v in peft_model.named_parameters() if "lora_" in k}
    assert any(not torch.equal(lora_before[k], lora_after[k]) for k in lora_before)
    base_after = peft_model.get_base_model().state_dict()
    for key, value in base_before.items():  # every base weight, read through the peft wrapping
        peft_key = key.replace("q_proj.weight", "q_proj.base_layer.weight").replace(
            "v_proj.weight", "v_proj.base_layer.weight"
        )
        assert torch.equal(value, base_after[peft_key]), key

    # reference log-probs before any sync = the adapter-disabled model = the original base model
    trajectories = trainer.rollout_engine().run(
        trainer.make_env, [dict(r) for r in arithmetic_problems.select(range(3))]
    )
    policy, _, reference = trainer._rollout_logps(trajectories)
    assert policy is None and reference is not None
    expected = trainer._logps(base_copy, trajectories)
    with_adapter = trainer._logps(peft_model, trajectories)
    flat = lambda rows: torch.tensor([x for row in rows for x in row])  # noqa: E731
    assert torch.allclose(flat(reference), flat(expected), atol=1e-5)
    assert not torch.allclose(flat(with_adapter), flat(expected), atol=1e-4)  # the adapter did learn something


def test_lora_reference_adapter_sync(make_tiny_model, tokenizer, arithmetic_problems, tmp_path, monkeypatch):
    trainer = make_lora_trainer(
        make_tiny_model(), tokenizer, arithmetic_problems, tmp_path, max_steps=3, ref_sync_steps=2
    )
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    at_sync: dict[str, dict[str, torch.Tensor]] = {}
    original = trainer.sync_reference

    def spy():
        original()
        at_sync["default"] = adapter_weights(peft_model, "default")
        at_sync["reference"] = adapter_weights(peft_model, "reference")
        at_sync["step"] = trainer.state.global_step

    monkeypatch.setattr(trainer, "sync_reference", spy)
    trainer.train()
    assert at_sync["step"] == 2
    assert at_sync["reference"].keys() == at_sync["default"].keys() and at_sync["reference"]
    for key, value in at_sync["default"].items():  # right after the sync: reference adapter == default adapter
        assert torch.equal(at_sync["reference"][key], value), key
    reference_now = adapter_weights(peft_model, "reference")
    default_now = adapter_weights(peft_model, "default")
    assert all(torch.equal(reference_now[k], v) for k, v in at_sync["reference"].items())  # frozen since
    assert any(not torch.equal(default_now[k], v) for k, v in at_sync["default"].items())  # the policy kept training
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if ".reference." in n)
    assert peft_model.active_adapter == "default"


# ---------------------------------------------------------------------------------------------- checkpoints
def test_resume_restores_step_optimizer_and_reference(make_tiny_model, tokenizer, arithmetic_problems, tmp_path):
    settings = dict(save_strategy="steps", save_steps=2, ref_sync_steps=1, log_rollouts=False)
    first = make_trainer(make_tiny_model(), tokenizer, arithmetic_problems, tmp_path, max_steps=2, **settings)
    first.train()
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / STATE_FILE).is_file() and (checkpoint / REFERENCE_FILE).is_file()
    saved_state = json.loads((checkpoint / STATE_FILE).read_text())
    assert saved_state["ref_syncs"] == 2  # refreshed after the updates of steps 1 and 2 (before the checkpoint)
    saved_optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    saved_reference = torch.load(checkpoint / REFERENCE_FILE, weights_only=True)

    fresh = make_tiny_model()
    initial = snapshot(fresh)
    # the saved reference is the policy after step 2, not the initial weights: restoring it is observable
    assert any(not torch.equal(initial[k], saved_reference[k]) for k in initial)
    second = make_trainer(fresh, tokenizer, arithmetic_problems, tmp_path, max_steps=4, **settings)
    loaded: dict = {}
    load_optimizer, load_checkpoint = second._load_optimizer_and_scheduler, second._load_from_checkpoint

    def spy_optimizer(path):
        load_optimizer(path)
        loaded["optimizer"] = copy.deepcopy(second.optimizer.state_dict())
        loaded["reference"] = snapshot(second.ref_model)
        loaded["ref_syncs"] = second.reference.last_sync

    def spy_checkpoint(path, model=None):
        load_checkpoint(path, model)
        loaded["model_loaded"] = True

    second._load_optimizer_and_scheduler = spy_optimizer
    second._load_from_checkpoint = spy_checkpoint
    second.train(resume_from_checkpoint=str(checkpoint))

    assert second.state.global_step == 4
    assert loaded["model_loaded"] and loaded["ref_syncs"] == 2
    for key, value in saved_reference.items():
        assert torch.equal(loaded["reference"][key], value), key
    saved, restored = saved_optimizer["state"], loaded["optimizer"]["state"]
    assert saved and saved.keys() == restored.keys()
    for index in saved:
        for name, tensor in saved[index].items():
            assert torch.equal(torch.as_tensor(restored[index][name]), torch.as_tensor(tensor)), (index, name)
    assert [entry["step"] for entry in second.state.log_history if "loss" in entry][-2:] == [3, 4]


def test_lora_resume_after_reference_sync(make_tiny_model, tokenizer, arithmetic_problems, tmp_path):
    """The checkpoint holds the policy adapter only; the reference adapter comes back from the trainer's own file."""
    settings = dict(save_strategy="steps", save_steps=2, ref_sync_steps=1)
    first = make_lora_trainer(make_tiny_model(), tokenizer, arithmetic_problems, tmp_path, max_steps=2, **settings)
    first.train()
    saved = adapter_weights(first.accelerator.unwrap_model(first.model), "reference")
    assert not (tmp_path / "checkpoint-2" / "reference").exists()

    second = make_lora_trainer(make_tiny_model(), tokenizer, arithmetic_problems, tmp_path, max_steps=4, **settings)
    loaded = {}
    load_state = second._load_optimizer_and_scheduler

    def spy(path):
        load_state(path)
        peft_model = second.accelerator.unwrap_model(second.model)
        loaded["reference"] = adapter_weights(peft_model, "reference")
        loaded["trainable"] = [n for n, p in peft_model.named_parameters() if p.requires_grad]

    second._load_optimizer_and_scheduler = spy
    second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert second.state.global_step == 4 and second.reference.has_adapter
    assert saved and all(torch.equal(loaded["reference"][k], v) for k, v in saved.items())
    assert loaded["trainable"] and all(".default." in n for n in loaded["trainable"])


# ---------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_embedded_model_trains_two_steps(tmp_path):
    from trl_stepwise.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer()
    trainer = StepwiseReinforceTrainer(
        model=model,
        args=make_config(tmp_path, max_steps=2, per_device_train_batch_size=2, learning_rate=1e-5, kl_coef=0.05),
        train_dataset="arithmetic:level=1",
        processing_class=tokenizer,
    )
    assert trainer.flavour == "arithmetic" and len(trainer.train_dataset) > 0
    trainer.train()
    assert trainer.state.global_step == 2
    losses = logged(trainer, "loss")
    assert set(losses) == {1, 2} and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert logged(trainer, "kl")[1] == pytest.approx(0.0, abs=1e-5)
    records = [json.loads(line) for line in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all("".join(r["steps"]).strip() for r in records)  # the real model writes text


def _launch_two_processes(output_dir, model_dir, overrides: dict | None = None) -> list[dict]:
    """Train the tiny model in 2 processes (tests/ddp_train_script.py); each rank's summary."""
    # `accelerate launch --cpu --num_processes 2` starts ONE process on a single machine (accelerate 1.15 only runs
    # several CPU processes through mpirun); `--multi_gpu` goes through torchrun, which starts both, and the trainer's
    # use_cpu=True puts them in one gloo process group on the CPU.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO / "tests" / "ddp_train_script.py"), str(output_dir), str(model_dir), json.dumps(overrides or {}),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return [json.loads((output_dir / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def two_process_ranks(tiny_model_dir, tmp_path_factory) -> list[dict]:
    """One 2-process run with reference guidance on serves both tests below (a launch costs ~13 s)."""
    overrides = {"reference_guidance": True, "max_step_tokens": 32, "max_episode_steps": 3}
    return _launch_two_processes(tmp_path_factory.mktemp("two_processes"), tiny_model_dir, overrides)


@pytest.mark.slow
def test_two_process_training_keeps_ranks_identical(two_process_ranks):
    ranks = two_process_ranks
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["global_step"] for r in ranks] == [2, 2]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    assert ranks[0]["checksum"] != ranks[0]["initial_checksum"]  # they are identical after really training
    assert ranks[0]["questions"] != ranks[1]["questions"]  # each rank rolled out its own problems


@pytest.mark.slow
def test_two_process_reference_guidance_logs_the_groups_of_both_ranks(two_process_ranks):
    """Each rank guides its own failed groups (a random model fails them all); the log counts both ranks'."""
    ranks = two_process_ranks
    assert ranks[0]["checksum"] == ranks[1]["checksum"] != ranks[0]["initial_checksum"]
    groups_per_rank = 4 // 2  # per_device_train_batch_size 4, num_generations 2
    assert ranks[0]["reference_episodes"] == [2 * groups_per_rank] * 2


def test_few_shot_source_without_solutions_falls_back_to_worked_examples(tiny_model, tokenizer, tmp_path, caplog):
    plain = Dataset.from_list([{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(8)])
    with caplog.at_level("WARNING"):
        trainer = make_trainer(tiny_model, tokenizer, plain, tmp_path)
    assert all(len(example.steps) > 1 for example in trainer.prompt_builder.pool)
    assert "no worked solutions" in caplog.text and "arithmetic fewshot" in caplog.text


def test_few_shot_pool_size_rotates_the_examples_every_step(tiny_model, tokenizer, arithmetic_problems, tmp_path):
    trainer = make_trainer(tiny_model, tokenizer, arithmetic_problems, tmp_path, few_shot_pool_size=6, max_steps=4)
    shown, make_engine = [], trainer.rollout_engine
    evaluation_shots = trainer.prompt_builder.shots("A new question?")

    def spy(sampling=None):
        engine = make_engine(sampling)
        shown.append(tuple(e.question for e in engine.prompt_builder.shots("A new question?")))
        return engine

    trainer.rollout_engine = spy
    trainer.train()
    assert len(shown) == 4 and len(set(shown)) > 1
    assert trainer.prompt_builder.shots("A new question?") == evaluation_shots  # evaluation keeps one prompt


def test_few_shot_pool_smaller_than_n_few_shot_is_refused(tmp_path):
    with pytest.raises(ValueError, match="few_shot_pool_size=1 is smaller than n_few_shot=2"):
        make_config(tmp_path, n_few_shot=2, few_shot_pool_size=1)


def test_reference_guidance_trains_on_worked_solutions_of_failed_groups(
    tiny_model, tokenizer, arithmetic_problems, tmp_path
):
    """A random model fails every group: each gets its worked solution as one episode, which the loss sees, while
    accuracy (and the curriculum) count only the sampled episodes."""
    trainer = make_trainer(
        tiny_model,
        tokenizer,
        arithmetic_problems,
        tmp_path,
        reward_funcs=(),
        reference_guidance=True,
        max_step_tokens=32,
        max_episode_steps=3,
        max_steps=2,
    )
    trained = []
    micro_batches = trainer._generate_and_score

    def spy(problems, num_micro_batches):
        batches = micro_batches(problems, num_micro_batches)
        trained.extend(batches)
        return batches

    trainer._generate_and_score = spy
    trainer.train()
    groups = trainer.args.per_device_train_batch_size // trainer.args.num_generations
    assert logged(trainer, "guidance/reference_episodes") == {1: groups, 2: groups}
    assert logged(trainer, "guidance/reference_correct") == {1: 1.0, 2: 1.0}
    assert logged(trainer, "accuracy") == {1: 0.0, 2: 0.0}
    assert all(reward > 0 for reward in logged(trainer, "reward").values())  # the references' reward is trained on
    assert all(bool((batch["advantages"] > 0).any()) for batch in trained)  # a failed group has a signal now


def test_reference_guidance_needs_a_group(tmp_path):
    with pytest.raises(ValueError, match="reference_guidance needs num_generations >= 2"):
        make_config(
            tmp_path, num_generations=1, per_device_train_batch_size=4, baseline="batch_mean", reference_guidance=True
        )


def test_dynamic_sampling_trains_a_full_batch_of_groups_with_signal(
    tiny_model, tokenizer, arithmetic_problems, tmp_path
):
    """Only problems whose answer is even get rewards that differ between episodes: groups of the others are dropped,
    more problems are played, and every optimizer step still trains on 2 groups of 2 episodes, all with signal."""
    from trl_stepwise.trainer import trainer as trainer_module
    from trl_stepwise.trainer.dynamic_sampling import groups_with_signal

    def even_answers_differ(completions, answer, completion_ids, **kwargs):
        return [
            float(sum(ids) % 97) if int(a) % 2 == 0 else 0.0 for a, ids in zip(answer, completion_ids, strict=True)
        ]

    trainer = make_trainer(
        tiny_model,
        tokenizer,
        arithmetic_problems,
        tmp_path,
        reward_funcs=(even_answers_differ,),
        kl_coef=0.0,
        max_steps=2,
        dynamic_sampling=True,
        dynamic_sampling_max_rounds=8,
    )
    batches = []
    fill = trainer_module.fill_with_signal

    def spy(first, wanted, play_more, step_returns, max_rounds):
        batch, stats = fill(first, wanted, play_more, step_returns, max_rounds)
        batches.append((batch, groups_with_signal(batch.group_ids, step_returns(batch)), stats))
        return batch, stats

    trainer_module.fill_with_signal = spy
    try:
        trainer.train()
    finally:
        trainer_module.fill_with_signal = fill
    assert len(batches) == 2
    for batch, signal, stats in batches:
        assert len(batch.trajectories) == 4 and set(batch.group_ids) == signal  # 2 groups, both with signal
        assert all(int(row["answer"]) % 2 == 0 for row in batch.rows)
        assert stats.groups_without_signal_trained == 0
    odd = sum(int(p["answer"]) % 2 for p in arithmetic_problems)
    assert 0 < odd < len(arithmetic_problems)  # the data has both kinds
    dropped = logged(trainer, "dynamic_sampling/groups_dropped")
    assert set(dropped) == {1, 2} and sum(stats.groups_dropped for _, _, stats in batches) == sum(dropped.values())
    assert all(v >= 1.0 for v in logged(trainer, "dynamic_sampling/episodes_generated_per_trained").values())
    assert sum(stats.extra_rounds for _, _, stats in batches) > 0  # (seeded) a first round drew an odd answer


def test_mask_truncated_completions_leaves_episodes_cut_by_the_token_budget_out_of_the_loss(
    tiny_model, tokenizer, arithmetic_problems, tmp_path
):
    """A 3-token budget cuts every episode of the random model: with the flag none of their tokens is trained on."""
    batches = {}
    for flag in (False, True):
        trainer = make_trainer(
            tiny_model,
            tokenizer,
            arithmetic_problems,
            tmp_path / str(flag),
            max_episode_tokens=3,
            mask_truncated_completions=flag,
            max_steps=1,
        )
        problems = [dict(p) for p in arithmetic_problems.select(range(2))]
        batches[flag] = trainer._generate_and_score(problems, 1)
        rollouts = (tmp_path / str(flag) / "rollouts.jsonl").read_text().splitlines()
        assert {json.loads(line)["end_reason"] for line in rollouts} == {"token_budget"}
    assert bool(batches[False][0]["completion_mask"].any()) and batches[False][0]["num_tokens"] > 0
    assert not bool(batches[True][0]["completion_mask"].any()) and batches[True][0]["num_tokens"] == 0
    assert batches[True][0]["num_sequences"] == batches[False][0]["num_sequences"] == 4


def test_several_eval_sets_are_logged_one_block_each(tiny_model, tokenizer, arithmetic_problems, tmp_path):
    trainer = make_trainer(
        tiny_model, tokenizer, arithmetic_problems, tmp_path, eval_num_problems=2, cache_start_evaluation=False
    )
    metrics = trainer.evaluate({"first": arithmetic_problems, "second": arithmetic_problems})
    assert {"eval_first_accuracy", "eval_second_accuracy"} <= set(metrics)
    blocks = [entry for entry in trainer.state.log_history if any(k.startswith("eval_") for k in entry)]
    assert [sorted(k for k in entry if k.endswith("_accuracy")) for entry in blocks] == [
        ["eval_first_accuracy"],
        ["eval_second_accuracy"],
    ]
