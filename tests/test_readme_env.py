"""The README's "Write your own environment" example is a complete file that trains, run as written.

Run as a script, it trains with vLLM on CPU; here the session's shared engine stands in for a new one (the trainer's
own factory and checks still run) and one step of 4 short episodes stands in for 6 of 16, so the test costs seconds.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from trl_stepwise.envs import make, play_scripted, registry

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    text = README.read_text(encoding="utf-8")
    return re.search(r"<!-- env-example[^>]*-->\n```python\n(.*?)```", text, re.DOTALL).group(1)


def test_readme_environment_plays_a_scripted_episode():
    code = _example()
    assert len(code.strip().splitlines()) < 60
    try:
        exec(compile(code, "README.md", "exec"), {"__name__": "reverse_word"})  # defines and registers only
        steps = ["The answer is: enost\n", "The answer is: enots\n"]
        episode = play_scripted(lambda: make("reverse-word"), {"word": "stone"}, steps).episode
    finally:
        registry.pop("reverse-word", None)
    assert episode.verdict.correct and episode.final_reward == 0.5
    assert "No. It starts with 'e'." in episode.completion


@pytest.mark.slow
def test_readme_environment_trains_with_vllm_without_a_warning(tmp_path, monkeypatch, caplog, vllm_engine):
    import trl_stepwise.engines.vllm_engine as vllm_engine_module
    from trl_stepwise.trainer import StepwiseReinforceTrainer

    monkeypatch.setattr(vllm_engine_module, "VLLMEngine", lambda *args, **kwargs: vllm_engine)
    monkeypatch.chdir(tmp_path)
    code = _example()
    assert "max_steps=6," in code
    for written, cheap in (("max_steps=6,", "max_steps=1, report_to=[], save_strategy='no',"),
                           ("per_device_train_batch_size=16,", "per_device_train_batch_size=4,"),
                           ("max_step_tokens=32,", "max_step_tokens=8, max_episode_tokens=16,")):  # fmt: skip
        assert written in code
        code = code.replace(written, cheap)
    trainers = []
    monkeypatch.setattr(StepwiseReinforceTrainer, "train", _recording(StepwiseReinforceTrainer.train, trainers))
    caplog.set_level(logging.WARNING)
    try:
        exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
    finally:
        registry.pop("reverse-word", None)
    (trainer,) = trainers
    assert trainer.state.global_step == 1
    assert trainer.prompt_builder.k == 0  # the environment asked for no worked examples
    assert [r.getMessage() for r in caplog.records if r.name.startswith("trl_stepwise")] == []


def _recording(train, trainers):
    def run(self, *args, **kwargs):
        trainers.append(self)
        return train(self, *args, **kwargs)

    return run
