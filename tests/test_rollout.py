"""The rollout engine against plain greedy decoding, and the token bookkeeping the trainer relies on."""

from __future__ import annotations

import pytest
import torch
from scripted_engine import ScriptedEngine, forced_text
from transformers import DynamicCache

from trl_stepwise.engines import StopPolicy
from trl_stepwise.envs import MathEnv
from trl_stepwise.kv_cache import growing_cache
from trl_stepwise.prompting import FewShotExample, PromptBuilder
from trl_stepwise.rollout import SamplingConfig, StepwiseRollout

EXAMPLE = FewShotExample("Tom has 2 apples and buys 3 more. How many?", ["2+3 = <<2+3=5>>5\n", "The answer is: 5\n"])
ROWS = [
    {"question": "Ann has 4 pens and buys 5 more. How many pens?", "answer": "9"},
    {"question": "A box holds 6 eggs. How many eggs are in 7 boxes?", "answer": "42"},
    {"question": "Sam had 30 stickers and gave away 12. How many are left?", "answer": "18"},
]


def _greedy_reference(model, tokenizer, prompt_ids: list[int], steps: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=steps,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    return out[0, len(prompt_ids) :].tolist()


def test_batched_direct_rollout_matches_one_sequence_greedy_decoding(make_tiny_model, tokenizer):
    """Shared-prefix cache, middle padding, in-place cache growth and batch pruning change nothing in the tokens."""
    model = make_tiny_model(seed=3).eval()
    builder = PromptBuilder(tokenizer, [EXAMPLE], k=1)
    engine = StepwiseRollout(
        model,
        tokenizer,
        builder,
        SamplingConfig(temperature=0.0, max_step_tokens=12, batch_size=3),
        step_delimiter=None,
        calculator=False,
    )
    engine.eos_ids = engine.engine.stop_token_ids = set()  # a random model may emit EOS: compare fixed lengths

    def make_env():
        return MathEnv("gsm8k", max_steps=1, calculator=False)

    trajectories = engine.run(make_env, ROWS)
    for trajectory in trajectories:
        assert len(trajectory.completion_ids) == 12
        assert trajectory.completion_ids == _greedy_reference(model, tokenizer, trajectory.prompt_ids, 12)
        assert trajectory.prompt_ids[: len(engine._encode(builder.shared_prefix))] == engine._encode(
            builder.shared_prefix
        )


def test_growing_cache_gives_the_same_logits_as_dynamic_cache(make_tiny_model):
    model = make_tiny_model(seed=1).eval()
    ids = torch.randint(0, 100, (2, 20))
    with torch.no_grad():
        results = []
        for cache in (DynamicCache(config=model.config), growing_cache(model.config)):
            model(input_ids=ids[:, :10], past_key_values=cache, use_cache=True)
            steps = [
                model(input_ids=ids[:, i : i + 1], past_key_values=cache, use_cache=True).logits for i in range(10, 20)
            ]
            cache.batch_select_indices(torch.tensor([1]))
            steps.append(model(input_ids=ids[1:, :1], past_key_values=cache, use_cache=True).logits)
            results.append(steps)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


def _calculator_script(tokenizer) -> list[int]:
    return (
        tokenizer("4+5 = <<4+5=", add_special_tokens=False)["input_ids"]
        + tokenizer(" pens\nThe answer is: 9\n", add_special_tokens=False)["input_ids"]
    )


@pytest.mark.parametrize("stop_policy", [StopPolicy.EVERY_STEP, StopPolicy.ENVIRONMENT])
def test_calculator_tokens_are_forced_and_masked_out(tokenizer, stop_policy):
    """A step that opens `<<4+5=` gets `9>>9` from the calculator; those tokens are excluded from the policy mask."""
    builder = PromptBuilder(tokenizer, [EXAMPLE], k=1)
    engine = ScriptedEngine(tokenizer, _calculator_script(tokenizer), stop_policy)
    rollout = StepwiseRollout(None, tokenizer, builder, SamplingConfig(max_step_tokens=40), engine=engine)
    (trajectory,) = rollout.run(lambda: MathEnv("gsm8k", max_steps=3), ROWS[:1])
    episode = trajectory.episode
    assert episode.completion.startswith("4+5 = <<4+5=9>>9 pens\n")
    assert episode.final_answer == "9" and episode.verdict.correct
    forced = [
        tokenizer.decode([t]) for t, p in zip(trajectory.completion_ids, trajectory.policy_mask, strict=True) if not p
    ]
    assert "".join(forced) == "9>>9"
    assert episode.steps[0].calc_calls == 1
    assert [s.from_policy for s in episode.steps[0].segments] == [True, False, True]
    assert trajectory.step_index[-1] == 1 and trajectory.step_index[0] == 0
    assert all(lp == 0.0 for lp, p in zip(trajectory.sampling_logps, trajectory.policy_mask, strict=True) if not p)
    assert all(lp == -0.5 for lp, p in zip(trajectory.sampling_logps, trajectory.policy_mask, strict=True) if p)


def test_rollout_needs_a_fresh_environment_per_row_and_one_group_id_per_row(tokenizer):
    builder = PromptBuilder(tokenizer, [EXAMPLE], k=1)
    engine = ScriptedEngine(tokenizer, tokenizer("The answer is: 9\n", add_special_tokens=False)["input_ids"])
    rollout = StepwiseRollout(None, tokenizer, builder, SamplingConfig(max_step_tokens=40), engine=engine)
    env = MathEnv("gsm8k")
    with pytest.raises(ValueError, match="new environment"):
        rollout.run(lambda: env, ROWS[:2])
    with pytest.raises(ValueError, match="group_ids"):
        rollout.run(MathEnv, ROWS[:2], group_ids=[0])
    assert engine.requests == []  # refused before anything was generated


def test_an_engine_stopping_at_environment_stops_pauses_only_for_the_calculator(tokenizer):
    """vLLM-style: one request runs across step boundaries; the loop splits the steps from the returned ids."""
    builder = PromptBuilder(tokenizer, [EXAMPLE], k=1)
    script = tokenizer("Ann has 4.\nShe buys 5.\nThe answer is: 9\nextra words\n", add_special_tokens=False)
    engine = ScriptedEngine(tokenizer, script["input_ids"], StopPolicy.ENVIRONMENT)
    rollout = StepwiseRollout(None, tokenizer, builder, SamplingConfig(max_step_tokens=40), engine=engine)
    (trajectory,) = rollout.run(lambda: MathEnv("gsm8k", max_steps=5), ROWS[:1])
    assert [s.text for s in trajectory.episode.steps] == ["Ann has 4.\n", "She buys 5.\n", "The answer is: 9\n"]
    assert len(engine.requests) == 1  # no stop at step boundaries
    assert "\n" not in engine.requests[0].stop_strings and "<<" in engine.requests[0].stop_strings
    # tokens written after the answer are not part of the trajectory
    assert tokenizer.decode(trajectory.completion_ids) == "Ann has 4.\nShe buys 5.\nThe answer is: 9\n"


def _streamed_rollout(tokenizer, text: str, max_steps: int = 5) -> tuple[object, ScriptedEngine]:
    builder = PromptBuilder(tokenizer, [EXAMPLE], k=1)
    engine = ScriptedEngine(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"], StopPolicy.STREAMING)
    rollout = StepwiseRollout(None, tokenizer, builder, SamplingConfig(max_step_tokens=40), engine=engine)
    (trajectory,) = rollout.run(lambda: MathEnv("gsm8k", max_steps=max_steps), ROWS[:1])
    return trajectory, engine


def test_streaming_engine_runs_through_a_calculation_the_policy_gets_right(tokenizer):
    """vLLM-style streaming: the policy writes `9>>9` itself; it is kept (masked as the calculator's) with no stop."""
    trajectory, engine = _streamed_rollout(tokenizer, "4+5 = <<4+5=9>>9 pens\nThe answer is: 9\nQuestion: more\n")
    assert len(engine.requests) == 1 and engine.requests[0].stop_strings == ()  # no stop strings, no restart
    assert tokenizer.decode(trajectory.completion_ids) == "4+5 = <<4+5=9>>9 pens\nThe answer is: 9\n"
    assert forced_text(tokenizer, trajectory) == "9>>9"
    assert trajectory.episode.steps[0].calc_calls == 1
    assert [s.from_policy for s in trajectory.episode.steps[0].segments] == [True, False, True]
    # the episode ended at its answer line: the engine was cut there, nothing sampled beyond the next token
    assert engine.sampled == len(trajectory.completion_ids)


def test_streaming_engine_cuts_a_wrong_calculation_and_inserts_the_result(tokenizer):
    """The policy writes `8>>8`: the request is cut after `=`, `9>>9` inserted, and sampling restarts after it."""
    trajectory, engine = _streamed_rollout(tokenizer, "4+5 = <<4+5=8>>8 pens\nThe answer is: 8\n")
    assert len(engine.requests) == 2
    assert tokenizer.decode(trajectory.completion_ids).startswith("4+5 = <<4+5=9>>9")
    assert forced_text(tokenizer, trajectory) == "9>>9"
    assert trajectory.episode.steps[0].calc_calls == 1


def test_streaming_engine_matches_a_stopping_engine_token_for_token(tokenizer):
    """Same script, same trajectory (ids, masks, steps) whether the engine streams or stops at the calculator."""
    text = "4+5 = <<4+5=9>>9 pens\nThen 9*2 = <<9*2=18>>18\nThe answer is: 18\nQuestion: more\n"
    streamed, _ = _streamed_rollout(tokenizer, text)
    builder = PromptBuilder(tokenizer, [EXAMPLE], k=1)
    engine = ScriptedEngine(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"])
    rollout = StepwiseRollout(None, tokenizer, builder, SamplingConfig(max_step_tokens=40), engine=engine)
    (stopped,) = rollout.run(lambda: MathEnv("gsm8k", max_steps=5), ROWS[:1])
    assert streamed.completion_ids == stopped.completion_ids
    assert streamed.policy_mask == stopped.policy_mask and streamed.step_index == stopped.step_index
    assert [s.text for s in streamed.episode.steps] == [s.text for s in stopped.episode.steps]


def test_forced_tokens_count_towards_the_step_and_episode_budgets(tokenizer):
    """A calculator insert fills the step's token limit: the step closes there and the episode budget counts it."""
    builder = PromptBuilder(tokenizer, [EXAMPLE], k=1)
    prefix = tokenizer("<<123456*654321=", add_special_tokens=False)["input_ids"]
    engine = ScriptedEngine(tokenizer, prefix + tokenizer(" more text\n", add_special_tokens=False)["input_ids"])
    limit = len(prefix) + 2
    rollout = StepwiseRollout(None, tokenizer, builder, SamplingConfig(max_step_tokens=limit), engine=engine)
    (trajectory,) = rollout.run(lambda: MathEnv("gsm8k", max_steps=1), ROWS[:1])
    first = trajectory.episode.steps[0]
    assert first.calc_calls == 1
    assert first.num_tokens == limit + (len(trajectory.completion_ids) - limit)  # every token, forced ones too
    assert trajectory.episode.num_tokens == len(trajectory.completion_ids) > trajectory.num_policy_tokens


def test_segments_join_to_the_step_text_with_a_sentencepiece_tokenizer():
    """SentencePiece drops a piece's leading space when decoded alone; segments decoded in context still join."""
    from sentencepiece_tokenizer import sentencepiece_tokenizer

    spm = sentencepiece_tokenizer()
    builder = PromptBuilder(spm, [EXAMPLE], k=1)
    script = spm("Ann has 4 and buys 5 so 4+5 = <<4+5=", add_special_tokens=False)["input_ids"]
    script += spm(" pens in all\nThe answer is: 9\n", add_special_tokens=False)["input_ids"]
    engine = ScriptedEngine(spm, script)
    rollout = StepwiseRollout(None, spm, builder, SamplingConfig(max_step_tokens=60), engine=engine)
    (trajectory,) = rollout.run(lambda: MathEnv("gsm8k", max_steps=3), ROWS[:1])
    step = trajectory.episode.steps[0]
    assert [s.from_policy for s in step.segments] == [True, False, True]
    assert "".join(s.text for s in step.segments) == step.text
    assert step.text.startswith("Ann has 4 and buys 5 so 4+5 = <<4+5=9>>9 pens in all")
    assert trajectory.episode.verdict.correct


@pytest.mark.parametrize("stop_policy", [StopPolicy.ENVIRONMENT, StopPolicy.STREAMING, StopPolicy.EVERY_STEP])
def test_the_episode_budget_is_a_hard_cap_like_max_completion_length(tokenizer, stop_policy):
    """A step that would cross ``max_episode_tokens`` is cut at the budget (TRL's ``max_completion_length`` is a hard
    cap), not allowed to finish its ``max_step_tokens``."""
    builder = PromptBuilder(tokenizer, [EXAMPLE], k=1)
    words = tokenizer(" one two three four five six seven eight nine ten" * 4, add_special_tokens=False)["input_ids"]
    engine = ScriptedEngine(tokenizer, words, stop_policy=stop_policy)
    rollout = StepwiseRollout(None, tokenizer, builder, SamplingConfig(max_step_tokens=16), engine=engine)
    (trajectory,) = rollout.run(lambda: MathEnv("gsm8k", max_steps=10, max_episode_tokens=20), ROWS[:1])
    assert trajectory.num_policy_tokens == 20 == trajectory.episode.num_tokens
    assert trajectory.episode.end_reason.value == "token_budget"
