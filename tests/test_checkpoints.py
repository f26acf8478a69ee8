"""Crash-safe checkpoints: a save interrupted at any moment never leaves a ``checkpoint-N`` a resume would pick."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_training import length_reward, make_config
from transformers import TrainerCallback

from trl_stepwise.trainer import StepwiseReinforceTrainer
from trl_stepwise.trainer.checkpoints import (
    CheckpointError,
    newest_complete_checkpoint,
    resolve_resume_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "checkpoint_kill_script.py"


def fake_checkpoint(folder: Path, complete: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_text("weights")
    if complete:
        (folder / "trainer_state.json").write_text("{}")
    return folder


def test_resume_true_picks_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path / "checkpoint-2")
    fake_checkpoint(tmp_path / "checkpoint-10")
    fake_checkpoint(tmp_path / "checkpoint-12", complete=False)  # a save killed half-way
    fake_checkpoint(tmp_path / ".partial-checkpoint-13" / "checkpoint-13")
    assert newest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    for value in (True, "true", "True", "latest"):
        assert resolve_resume_checkpoint(value, tmp_path) == str(tmp_path / "checkpoint-10")
    for value in (None, False, "false", ""):
        assert resolve_resume_checkpoint(value, tmp_path) is None
    assert resolve_resume_checkpoint(str(tmp_path / "checkpoint-2"), tmp_path) == str(tmp_path / "checkpoint-2")


@pytest.mark.parametrize(
    ("target", "words"),
    [
        ("checkpoint-12", ["incomplete", "checkpoint-10", "true"]),
        ("nowhere", ["no such folder", "true"]),
        ("true-in-empty-dir", ["no complete checkpoint-N", "drop the flag"]),
    ],
)
def test_bad_resume_targets_name_the_flag_and_the_fix(tmp_path: Path, target: str, words: list[str]) -> None:
    fake_checkpoint(tmp_path / "run" / "checkpoint-10")
    fake_checkpoint(tmp_path / "run" / "checkpoint-12", complete=False)
    if target == "true-in-empty-dir":
        value, output_dir = "true", tmp_path / "empty"
    else:
        value, output_dir = str(tmp_path / "run" / target), tmp_path / "run"
    with pytest.raises(CheckpointError) as info:
        resolve_resume_checkpoint(value, output_dir)
    message = str(info.value)
    assert message.startswith(f"--resume_from_checkpoint {value}") and "\n" not in message
    assert all(word in message for word in words), message


def test_a_save_that_fails_half_way_leaves_no_checkpoint_folder(
    make_tiny_model, tokenizer, arithmetic_problems, tmp_path: Path
) -> None:
    def trainer(max_steps: int) -> StepwiseReinforceTrainer:
        config = make_config(tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=1, log_rollouts=False)
        return StepwiseReinforceTrainer(
            model=make_tiny_model(),
            args=config,
            train_dataset=arithmetic_problems,
            processing_class=tokenizer,
            reward_funcs=[length_reward],
        )

    first = trainer(3)
    save_rng_state = first._save_rng_state

    def crash_at_step_2(output_dir: str) -> None:
        save_rng_state(output_dir)
        if first.state.global_step == 2:
            raise KeyboardInterrupt("killed inside the save of checkpoint-2")

    first._save_rng_state = crash_at_step_2
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert (tmp_path / "checkpoint-1" / "trainer_state.json").is_file()
    assert not (tmp_path / "checkpoint-2").exists()  # was: a folder without trainer_state.json
    assert newest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-1"

    second = trainer(3)
    steps_trained: list[int] = []
    second.add_callback(
        type(
            "Spy",
            (TrainerCallback,),
            {"on_step_end": lambda self, a, state, c, **k: steps_trained.append(state.global_step)},
        )
    )
    second.train(resume_from_checkpoint="true")
    assert steps_trained == [2, 3]  # resumed after step 1
    assert second.state.global_step == 3
    assert sorted(p.name for p in tmp_path.iterdir() if "checkpoint" in p.name) == [
        "checkpoint-1",
        "checkpoint-2",
        "checkpoint-3",
    ]  # the stale staging folder of the crashed save is gone


def _run(args: list[str], kill_when: Path | None = None, timeout: float = 300) -> tuple[int, str]:
    """Run the script; with ``kill_when``, SIGKILL it as soon as that path exists."""
    env = {**os.environ, "TRL_STEPWISE_TEST_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    deadline = time.monotonic() + timeout
    if kill_when is not None:
        while not kill_when.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
    output, _ = process.communicate(timeout=max(deadline - time.monotonic(), 1))
    return process.returncode, output


@pytest.mark.slow
def test_kill_9_at_any_moment_then_resume_finishes_with_the_right_step(tiny_model_dir, tmp_path: Path) -> None:
    """SIGKILL inside saves (after the weights, before trainer_state.json) and between them; every resume works."""
    out = tmp_path / "run"
    base = [str(out), str(tiny_model_dir), "6"]
    code, log = _run([*base, "--kill_in", "rng:2"])  # inside the save of checkpoint-2
    assert code == -signal.SIGKILL, log
    assert newest_complete_checkpoint(out) == out / "checkpoint-1" and not (out / "checkpoint-2").exists()
    code, log = _run([*base, "--kill_in", "model:3"])  # resumes from 1, dies inside the save of checkpoint-3
    assert code == -signal.SIGKILL, log
    assert newest_complete_checkpoint(out) == out / "checkpoint-2" and not (out / "checkpoint-3").exists()
    code, log = _run(base, kill_when=out / "checkpoint-4")  # killed by the parent right as checkpoint-4 appears
    assert code == -signal.SIGKILL, log
    assert newest_complete_checkpoint(out) in (out / "checkpoint-4", out / "checkpoint-5")
    code, log = _run(base)
    assert code == 0, log[-3000:]
    assert "finished global_step=6" in log
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert not list(out.glob(".partial-*"))
    for checkpoint in out.glob("checkpoint-*"):
        assert (checkpoint / "trainer_state.json").is_file(), checkpoint
