"""Tool-calling chats (TRL's ``tools=`` and ``environment_factory=``): prompts and turns rendered by the template,
token-exact; calls read in the template's format; bad calls answered as tool errors; per-turn limits; the trainer."""

from __future__ import annotations

import json
import threading

import pytest
from conftest import trl_chat_template
from scripted_engine import ScriptedEngine
from tool_tasks import DoublingTask, multiply

from trl_stepwise.chat_turns import ChatTurns
from trl_stepwise.engines import SamplingConfig, StopPolicy
from trl_stepwise.envs import EndReason, ToolChatEnv
from trl_stepwise.prompting import PromptBuilder
from trl_stepwise.rollout import StepwiseRollout


def broken(text: str) -> str:
    """Always fails.

    Args:
        text: Anything.
    """
    raise RuntimeError("the service is down")


PROMPT = [{"role": "user", "content": "What is 21 doubled?"}]


def call_text(name: str, arguments: dict) -> str:
    """An assistant turn that calls one tool, as the Qwen2.5 template renders it."""
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def script(tokenizer, *turns: str) -> list[int]:
    """The token ids of assistant turns, each closed by the end-of-turn token."""
    ids: list[int] = []
    for turn in turns:
        ids += tokenizer(turn, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids


def play(tokenizer, env_factory, turns, stop_policy=StopPolicy.ENVIRONMENT, row=None, max_step_tokens=40):
    engine = ScriptedEngine(tokenizer, script(tokenizer, *turns), stop_policy=stop_policy)
    rollout = StepwiseRollout(
        None,
        tokenizer,
        PromptBuilder(tokenizer, [], k=0),
        SamplingConfig(max_step_tokens=max_step_tokens),
        engine=engine,
        chat=ChatTurns(tokenizer),
    )
    (trajectory,) = rollout.run(env_factory, [row or {"prompt": PROMPT}])
    return trajectory


def chat_env(**kwargs):
    return lambda: ToolChatEnv(DoublingTask(), **kwargs)


# ---------------------------------------------------------------------------------------------- token-exact turns
@pytest.mark.parametrize("stop_policy", [StopPolicy.ENVIRONMENT, StopPolicy.STREAMING, StopPolicy.EVERY_STEP])
def test_a_tool_turn_is_the_templates_conversation_token_for_token(tool_tokenizer, stop_policy):
    tok = tool_tokenizer
    call = call_text("double", {"x": 21})
    trajectory = play(tok, chat_env(), [call, "The answer is 42."], stop_policy)
    env = trajectory.env
    # the whole sequence is what the template renders for the conversation the episode had
    conversation = [
        {"role": "user", "content": PROMPT[0]["content"] + " You may call double."},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "double", "arguments": {"x": 21}}}],
        },
        {"role": "tool", "name": "double", "content": "42"},
        {"role": "assistant", "content": "The answer is 42."},
    ]
    rendered = tok.apply_chat_template(conversation, tools=[DoublingTask().double], tokenize=False)
    played = tok.decode(trajectory.prompt_ids + trajectory.completion_ids)
    assert rendered.startswith(played) and rendered[len(played) :].strip() == ""
    # only the tool turn's tokens are forced (masked); everything the policy wrote is trained on
    forced = [t for t, p in zip(trajectory.completion_ids, trajectory.policy_mask, strict=True) if not p]
    assert forced == ChatTurns(tok).reply_ids([{"role": "tool", "name": "double", "content": "42"}])
    assert "<tool_response>\n42\n</tool_response>" in tok.decode(forced)
    assert sum(trajectory.policy_mask) == len(script(tok, call, "The answer is 42."))
    # the environment ran the call; its get_reward is the final reward, logged under its class name
    assert env.env.calls == [21]
    episode = trajectory.episode
    assert episode.end_reason is EndReason.ANSWER and episode.final_reward == 1.0
    assert episode.reward_components == {"DoublingTask": 1.0}
    assert [m["role"] for m in env.messages] == ["assistant", "tool", "assistant"]
    assert env.messages[0]["tool_calls"][0]["function"] == {"name": "double", "arguments": {"x": 21}}


def test_the_first_prompt_carries_the_tool_schemas_and_the_reset_observation(tool_tokenizer):
    trajectory = play(tool_tokenizer, chat_env(), ["I do not know."])
    prompt = tool_tokenizer.decode(trajectory.prompt_ids)
    assert '"name": "double"' in prompt and "The number to double." in prompt
    assert "What is 21 doubled? You may call double.<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert trajectory.episode.final_reward == 0.0 and len(trajectory.env.messages) == 1


def test_steps_inside_a_turn_stay_steps(tool_tokenizer):
    """Lines are steps (per-step credit inside a turn); the tool turn follows the step that ended the turn."""
    trajectory = play(tool_tokenizer, chat_env(), ["First I double.\n" + call_text("double", {"x": 21}), "42"])
    texts = [step.text for step in trajectory.episode.steps]
    assert texts[0] == "First I double.\n"
    assert any("<tool_response>" in text for text in texts)
    assert texts[-1] == "42"


# ---------------------------------------------------------------------------------------------- bad calls
@pytest.mark.parametrize(
    "turn, expected",
    [
        ('<tool_call>\n{"name": "double", "arguments": {"x": 21}\n</tool_call>', "error"),  # malformed JSON
        (call_text("triple", {"x": 21}), "unknown tool 'triple'"),
        (call_text("double", {"y": 21}), "TypeError"),
        (call_text("double", {"x": "twenty"}), "error"),
        (call_text("broken", {"text": "hi"}), "RuntimeError: the service is down"),
    ],
)
def test_a_bad_call_reaches_the_model_as_a_tool_error_and_the_episode_goes_on(tool_tokenizer, turn, expected):
    factory = lambda: ToolChatEnv(DoublingTask(), tools=[broken])  # noqa: E731
    trajectory = play(tool_tokenizer, factory, [turn, "Sorry."])
    env = trajectory.env
    assert [m["role"] for m in env.messages] == ["assistant", "tool", "assistant"]
    assert expected in env.messages[1]["content"] and "error" in env.messages[1]["content"]
    assert env.tool_failures == 1 and env.env.calls == []
    assert trajectory.episode.end_reason is EndReason.ANSWER


def test_max_tool_calling_iterations_stops_running_calls(tool_tokenizer):
    call = call_text("double", {"x": 21})
    trajectory = play(tool_tokenizer, chat_env(max_tool_calling_iterations=1), [call, call, "42"])
    env = trajectory.env
    assert env.env.calls == [21]  # the second turn's call is not run: the episode ends there, as in TRL
    assert [m["role"] for m in env.messages] == ["assistant", "tool", "assistant"]
    assert trajectory.episode.end_reason is EndReason.ANSWER


def test_the_token_budget_ends_a_chat_as_truncated(tool_tokenizer):
    call = call_text("double", {"x": 21})
    trajectory = play(tool_tokenizer, chat_env(max_episode_tokens=30), [call, call, call, "42"])
    assert trajectory.episode.end_reason is EndReason.TOKEN_BUDGET and trajectory.episode.truncated


def test_standalone_tools_come_before_the_environments_methods(tool_tokenizer):
    env = ToolChatEnv(DoublingTask(), tools=[multiply])
    assert [f.__name__ for f in env.tool_functions] == ["multiply", "double"]
    trajectory = play(
        tool_tokenizer, lambda: ToolChatEnv(None, tools=[multiply]), [call_text("multiply", {"a": 6, "b": 7}), "42"]
    )
    assert trajectory.env.messages[1] == {"role": "tool", "name": "multiply", "content": "42"}


# ---------------------------------------------------------------------------------------------- templates
def test_a_template_without_tools_is_refused_in_one_line(tokenizer):
    with pytest.raises(ValueError, match="cannot render tool calls") as error:
        ChatTurns(tokenizer)
    assert "\n" not in str(error.value)


def test_a_template_that_rewrites_history_is_replaced_by_trls_training_template():
    from trl.chat_template_utils import is_chat_template_prefix_preserving

    from trl_stepwise.models import load_tokenizer

    tok = load_tokenizer()
    tok.chat_template = trl_chat_template("qwen3")
    assert not is_chat_template_prefix_preserving(tok)  # Qwen3 drops earlier turns' reasoning
    turns = ChatTurns(tok)
    assert turns.chat_template == trl_chat_template("qwen3_training")
    reply = tok.decode(turns.reply_ids([{"role": "tool", "name": "double", "content": "42"}]))
    assert reply.startswith("\n<|im_start|>user\n<tool_response>\n42\n</tool_response>")
    assert reply.endswith("<|im_start|>assistant\n")


# ---------------------------------------------------------------------------------------------- concurrency
@pytest.mark.parametrize("stop_policy", [StopPolicy.ENVIRONMENT, StopPolicy.STREAMING])
def test_the_tool_calls_of_different_episodes_run_at_the_same_time(tool_tokenizer, stop_policy):
    """Each episode's tool waits at a barrier for the other's: it passes only if both calls are in flight together
    (run one episode after the other, the first call would time out at the barrier)."""
    barrier = threading.Barrier(2, timeout=10)

    def meet(name: str) -> str:
        """Wait for the other episode's call.

        Args:
            name: Who arrives.
        """
        barrier.wait()
        return f"{name} met"

    tok = tool_tokenizer
    turns = {i: script(tok, call_text("meet", {"name": f"ep{i}"}), "Done.") for i in range(2)}
    rollout = StepwiseRollout(
        None,
        tok,
        PromptBuilder(tok, [], k=0),
        SamplingConfig(max_step_tokens=40),
        engine=ScriptedEngine(tok, turns, stop_policy=stop_policy),
        chat=ChatTurns(tok),
    )
    trajectories = rollout.run(lambda: ToolChatEnv(None, tools=[meet]), [{"prompt": PROMPT}] * 2)
    results = [t.env.messages[1]["content"] for t in trajectories]
    assert results == ["ep0 met", "ep1 met"]
    assert all(t.env.tool_failures == 0 and t.episode.end_reason is EndReason.ANSWER for t in trajectories)


def test_an_async_get_reward_is_awaited(tool_tokenizer):
    class AsyncDoublingTask(DoublingTask):
        async def get_reward(self) -> float:
            return float(self.calls == [21])

    trajectory = play(tool_tokenizer, lambda: ToolChatEnv(AsyncDoublingTask()), [call_text("double", {"x": 21}), "42"])
    assert trajectory.episode.final_reward == 1.0
    assert trajectory.episode.reward_components == {"AsyncDoublingTask": 1.0}
