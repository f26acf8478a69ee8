"""Chat turns as the tokenizer's own template renders them, token-exact, for tool-calling episodes.

* The first prompt is the row's messages with the tool schemas, rendered exactly as TRL's ``GRPOTrainer`` renders
  it (``apply_chat_template(conversation=[messages], tools=..., add_generation_prompt=True)``), so a TRL setup sees
  the same prompt token ids here.
* A later turn (tool results, a user reply) is appended as only its new tokens: the template renders a short
  conversation with and without the new messages and the difference is taken after the end-of-turn token, as TRL
  does. The running sequence is never re-tokenised, so the policy is trained on exactly the ids it sampled.
* Templates that rewrite history (e.g. drop earlier turns' reasoning) are not prefix-preserving: TRL's
  training-safe version of the template replaces them, as in TRL; a template TRL has no such version of is refused.
* The calls an assistant turn wrote are read in the template's format (``envs.tool_calls``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from trl_stepwise.envs.chat_env import AssistantTurn
from trl_stepwise.envs.tool_calls import ToolCallFormat, resolve_tool_call_format

__all__ = ["ChatTurns", "check_tool_template"]


def check_tool_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse, in one line, a tokenizer whose chat template cannot render a tool-calling conversation (as TRL)."""
    from trl.chat_template_utils import supports_tool_calling

    if not supports_tool_calling(tokenizer):
        raise ValueError(
            "tools / environment_factory: the tokenizer's chat template cannot render tool calls (user -> assistant "
            "with tool_calls -> tool); set tokenizer.chat_template to a tool-calling template (e.g. TRL's "
            "trl/chat_templates/qwen2_5.jinja) or pass processing_class= with one."
        )


def training_chat_template(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """None when the tokenizer's template preserves prefixes; else TRL's prefix-preserving version of it."""
    from trl.chat_template_utils import get_training_chat_template, is_chat_template_prefix_preserving

    if is_chat_template_prefix_preserving(tokenizer):
        return None
    try:
        template = get_training_chat_template(tokenizer)
    except Exception as exc:  # TRL raises for templates it has no training version of
        template, reason = None, f" ({exc})"
    else:
        reason = ""
    if template is None:
        raise ValueError(
            "chat template: it renders earlier turns differently once later turns follow (not prefix-preserving) "
            f"and TRL has no training version of it{reason}; pass a prefix-preserving chat template."
        )
    return template


class ChatTurns:
    """Render prompts and later turns, and read tool calls, with one tokenizer's template."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        tool_call_format: str | ToolCallFormat | Callable[[str], Any] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        check_tool_template(tokenizer)
        self.tokenizer = tokenizer
        self.chat_template = training_chat_template(tokenizer)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.format = resolve_tool_call_format(tool_call_format, tokenizer)
        self.eos_token_id = tokenizer.eos_token_id

    def _render(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            list(messages),
            chat_template=self.chat_template,
            tokenize=True,
            return_dict=False,
            **kwargs,
            **self.chat_template_kwargs,
        )
        return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)

    def prompt_ids(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Callable[..., Any]]) -> list[int]:
        """The first prompt, exactly as TRL renders it (``tools or None``: some templates render tool boilerplate
        for an empty list)."""
        rendered = self.tokenizer.apply_chat_template(
            conversation=[list(messages)],
            tools=list(tools) or None,
            chat_template=self.chat_template,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            **self.chat_template_kwargs,
        )
        return list(rendered["input_ids"][0])

    def reply_ids(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Tokens that follow an assistant turn's end-of-turn token to add ``messages`` (tool results or a user
        turn) and open the next assistant turn."""
        first = messages[0]
        assistant: dict[str, Any] = {"role": "assistant", "content": ""}
        if first.get("role") == "tool":  # some templates (e.g. GPT-OSS) name the response after the call
            assistant["tool_calls"] = [{"type": "function", "function": {"name": first.get("name"), "arguments": {}}}]
        dummy = [{"role": "user", "content": "dummy"}, assistant]
        prefix = self._render(dummy, add_generation_prompt=False)
        full = self._render(dummy + [dict(m) for m in messages], add_generation_prompt=True)
        ends = [i for i, token in enumerate(prefix) if token == self.eos_token_id]
        if ends:  # some templates render "<|im_end|>\n" after a turn: the turn ends at the end-of-turn token
            prefix = prefix[: ends[-1] + 1]
        if full[: len(prefix)] != prefix:
            raise ValueError("chat template: the conversation before a new turn renders differently once it follows")
        return full[len(prefix) :]

    def parse(self, text: str) -> AssistantTurn:
        """The turn's content and tool calls, in the template's format."""
        content, calls = self.format.parse(text)
        return AssistantTurn(content, list(calls))
