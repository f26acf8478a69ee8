"""Tool calls read back in the chat template's own format: round trips through real renders, and every way a model's
call can be broken coming back as an error call (never an exception). Tokenizer only: no model weights."""

from __future__ import annotations

import copy
from importlib.resources import files
from typing import Any

import pytest

from trl_stepwise.envs.tool_calls import (
    FORMATS,
    CallableFormat,
    HermesFormat,
    Llama3JsonFormat,
    ResponseSchemaFormat,
    ToolCall,
    ToolCallFormat,
    detect_format,
    resolve_tool_call_format,
)

MULTIPLY = {"name": "multiply", "arguments": {"a": 3, "b": 4}}
# Values JSON must carry exactly: nesting, escapes, unicode, floats, booleans, null.
RICH = {
    "name": "search",
    "arguments": {"query": 'say "hi" — naïve\nline', "limit": 2.5, "tags": ["a", None, True], "opts": {"deep": {}}},
}
# A template that renders tool calls in a format neither TRL nor detect_format knows.
UNKNOWN_TOOL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}[CALL]{{ c.function.name }}({{ c.function.arguments | tojson }}){% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def trl_template(name: str) -> str:
    """One of TRL's shipped chat templates (the text TRL's add_response_schema recognises)."""
    return (files("trl") / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")


def with_template(tokenizer: Any, template: str) -> Any:
    """A copy of the shared embedded tokenizer with another chat template (the session fixture must stay intact)."""
    copied = copy.deepcopy(tokenizer)
    copied.chat_template = template
    return copied


def rendered_assistant_turn(tokenizer: Any, calls: list[dict[str, Any]], **kwargs: Any) -> str:
    """The text the template renders for an assistant turn holding ``calls``: the full render minus the prompt."""
    user = [{"role": "user", "content": "What is 3 * 4?"}]
    assistant = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": call} for call in calls],
    }
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True, **kwargs)
    full = tokenizer.apply_chat_template([*user, assistant], tokenize=False, **kwargs)
    assert full.startswith(prompt), "the template is not prefix-preserving here: cannot cut out the assistant turn"
    return full[len(prompt) :]


def as_calls(*calls: dict[str, Any]) -> list[ToolCall]:
    return [ToolCall(call["name"], call["arguments"]) for call in calls]


# Round trips through real renders


@pytest.mark.parametrize("call", [MULTIPLY, RICH], ids=["multiply", "rich-arguments"])
def test_hermes_round_trip_qwen2_5_render(tokenizer, call):
    turn = rendered_assistant_turn(with_template(tokenizer, trl_template("qwen2_5")), [call])
    assert "<tool_call>" in turn and turn.rstrip().endswith("<|im_end|>")
    assert HermesFormat().parse(turn) == ("", as_calls(call))


@pytest.mark.parametrize("call", [MULTIPLY, RICH], ids=["multiply", "rich-arguments"])
def test_llama3_round_trip_llama3_2_render(tokenizer, call):
    templated = with_template(tokenizer, trl_template("llama3_2"))
    turn = rendered_assistant_turn(templated, [call], date_string="26 Jul 2024")
    assert turn.startswith('{"name": "') and '"parameters": ' in turn and turn.endswith("<|eot_id|>")
    assert Llama3JsonFormat().parse(turn) == ("", as_calls(call))
    # Without the end-of-turn token (a turn decoded with special tokens skipped): the same call.
    assert Llama3JsonFormat().parse(turn.removesuffix("<|eot_id|>")) == ("", as_calls(call))


def test_hermes_round_trip_two_calls_rendered_in_one_turn(tokenizer):
    second = {"name": "add", "arguments": {"x": 1}}
    turn = rendered_assistant_turn(with_template(tokenizer, trl_template("qwen2_5")), [MULTIPLY, second])
    assert turn.count("<tool_call>") == 2
    assert HermesFormat().parse(turn) == ("", as_calls(MULTIPLY, second))


# Hermes


def test_hermes_text_before_and_after_calls_is_content():
    text = (
        'Let me compute.\n<tool_call>\n{"name": "multiply", "arguments": {"a": 3, "b": 4}}\n</tool_call>\n'
        '<tool_call>\n{"name": "add", "arguments": {"x": 1}}\n</tool_call>\nDone.<|im_end|>'
    )
    content, calls = HermesFormat().parse(text)
    assert content == "Let me compute.\nDone."
    assert calls == as_calls(MULTIPLY, {"name": "add", "arguments": {"x": 1}})


def test_hermes_no_calls_gives_the_text_back():
    assert HermesFormat().parse("  The answer is 12.  ") == ("The answer is 12.", [])
    assert HermesFormat().parse("The answer is 12.<|im_end|>") == ("The answer is 12.", [])


def test_hermes_malformed_json_is_an_error_call_and_later_calls_still_parse():
    text = (
        "<tool_call>\nnot json\n</tool_call>\n"
        '<tool_call>\n{"name": "multiply", "arguments": {"a": 3, }}\n</tool_call>\n'
        '<tool_call>{"name": "add", "arguments": {"x": 1}}</tool_call>'
    )
    content, calls = HermesFormat().parse(text)
    assert content == ""
    assert calls[0] == ToolCall("", {}, "malformed JSON in <tool_call>: Expecting value at char 0.")
    assert calls[1].name == "multiply" and calls[1].arguments == {}  # the name is still read, for the error's sake
    assert calls[1].error.startswith("malformed JSON in <tool_call>: Expecting property name")
    assert calls[2] == ToolCall("add", {"x": 1})


@pytest.mark.parametrize(
    ("body", "name", "error"),
    [
        ('["multiply", {"a": 3}]', "", '<tool_call> must hold a JSON object with "name"'),
        ('{"tool": "multiply", "arguments": {}}', "", 'missing "name" in <tool_call>.'),
        ('{"name": 7, "arguments": {}}', "", '"name" in <tool_call> must be a non-empty string, not a number.'),
        ('{"name": "multiply", "arguments": [3, 4]}', "multiply", '"arguments" in <tool_call> must be a JSON object'),
        ('{"name": "multiply", "arguments": "3, 4"}', "multiply", '"arguments" in <tool_call> is a string but'),
        ('{"name": "multiply", "arguments": "[3, 4]"}', "multiply", '"arguments" in <tool_call> must be a JSON'),
    ],
    ids=["not-an-object", "no-name", "non-string-name", "array-arguments", "non-json-string", "string-of-array"],
)  # fmt: skip
def test_hermes_unknown_structure_is_an_error_call(body, name, error):
    content, calls = HermesFormat().parse(f"Sure.\n<tool_call>\n{body}\n</tool_call>")
    assert content == "Sure."
    assert len(calls) == 1
    assert calls[0].name == name and calls[0].arguments == {}
    assert calls[0].error is not None and calls[0].error.startswith(error)


def test_hermes_arguments_as_json_string_are_decoded():
    text = '<tool_call>\n{"name": "multiply", "arguments": "{\\"a\\": 3, \\"b\\": 4}"}\n</tool_call>'
    assert HermesFormat().parse(text) == ("", as_calls(MULTIPLY))


def test_hermes_missing_or_null_arguments_mean_no_arguments():
    text = '<tool_call>{"name": "now"}</tool_call><tool_call>{"name": "now", "arguments": null}</tool_call>'
    assert HermesFormat().parse(text)[1] == [ToolCall("now", {}), ToolCall("now", {})]


def test_hermes_unclosed_call_at_the_end_is_an_error():
    text = 'Computing.\n<tool_call>\n{"name": "multiply", "arguments": {"a": 3, "b": 4}}\n'
    content, calls = HermesFormat().parse(text)
    assert content == "Computing."
    assert calls == [ToolCall("multiply", {}, "unclosed <tool_call>: it has no </tool_call>.")]


def test_hermes_unclosed_call_followed_by_a_new_call_keeps_the_new_one():
    text = '<tool_call>{"name": "multiply", "arguments": {"a": 3}\n<tool_call>{"name": "add"}</tool_call>'
    calls = HermesFormat().parse(text)[1]
    assert [c.error is None for c in calls] == [False, True]
    assert calls[0].error.startswith("unclosed <tool_call>") and calls[1] == ToolCall("add", {})


def test_hermes_closing_tag_inside_a_string_argument_does_not_cut_the_call():
    text = '<tool_call>\n{"name": "echo", "arguments": {"text": "a </tool_call> b"}}\n</tool_call>'
    assert HermesFormat().parse(text) == ("", [ToolCall("echo", {"text": "a </tool_call> b"})])


# Llama 3


def test_llama3_plain_text_answer_is_content_without_calls():
    fmt = Llama3JsonFormat()
    assert fmt.parse("The answer is 12.<|eot_id|>") == ("The answer is 12.", [])
    assert fmt.parse('{"answer": 12}') == ('{"answer": 12}', [])  # JSON without a name is an answer, not a call
    assert fmt.parse("{x | x > 0} is the set of positives.") == ("{x | x > 0} is the set of positives.", [])


def test_llama3_several_calls_separated_by_semicolons_or_newlines():
    add = {"name": "add", "arguments": {"x": 1}}
    semicolons = '{"name": "multiply", "parameters": {"a": 3, "b": 4}}; {"name": "add", "parameters": {"x": 1}}'
    newlines = '{"name": "multiply", "parameters": {"a": 3, "b": 4}}\n{"name": "add", "arguments": {"x": 1}}'
    assert Llama3JsonFormat().parse(semicolons) == ("", as_calls(MULTIPLY, add))
    assert Llama3JsonFormat().parse(newlines) == ("", as_calls(MULTIPLY, add))


def test_llama3_python_tag_and_eom():
    text = '<|python_tag|>{"name": "multiply", "parameters": {"a": 3, "b": 4}}<|eom_id|>'
    assert Llama3JsonFormat().parse(text) == ("", as_calls(MULTIPLY))
    content, calls = Llama3JsonFormat().parse('<|python_tag|>brave_search.call(query="x")')
    assert content == "" and len(calls) == 1 and "after <|python_tag|>" in calls[0].error


def test_llama3_malformed_and_unknown_structure_are_errors():
    content, calls = Llama3JsonFormat().parse('{"name": "multiply", "parameters": {"a": 3, "b": }}')
    assert content == "" and calls[0].name == "multiply"
    assert calls[0].error.startswith("malformed JSON in the tool call: Expecting value")
    calls = Llama3JsonFormat().parse('{"name": "multiply", "parameters": [3, 4]}')[1]
    assert calls == [ToolCall("multiply", {}, '"parameters" in the tool call must be a JSON object, not an array.')]
    calls = Llama3JsonFormat().parse('{"parameters": {"a": 3}}')[1]
    assert calls == [ToolCall("", {}, 'missing "name" in the tool call.')]


def test_llama3_parameters_as_json_string_are_decoded():
    text = '{"name": "multiply", "parameters": "{\\"a\\": 3, \\"b\\": 4}"}'
    assert Llama3JsonFormat().parse(text) == ("", as_calls(MULTIPLY))


def test_end_markers():
    assert HermesFormat().end_marker == "</tool_call>"
    assert Llama3JsonFormat().end_marker is None
    assert FORMATS == {"hermes": HermesFormat, "llama3": Llama3JsonFormat}


# detect_format


@pytest.mark.parametrize(
    ("name", "family"),
    [("qwen2_5", "hermes"), ("qwen3", "hermes"), ("llama3_1", "llama3"), ("llama3_2", "llama3"), ("llama3", None)],
)
def test_detect_format_on_trl_templates(name, family):
    assert detect_format(trl_template(name)) == family


def test_detect_format_none_without_tools_or_for_xml_calls(tokenizer):
    assert detect_format(tokenizer.chat_template) is None  # the embedded SmolLM2 template renders no tools
    assert detect_format(None) is None
    assert detect_format(trl_template("qwen3_5_think")) is None  # <tool_call><function=...> XML, not Hermes JSON
    assert detect_format("{{- '<|python_tag|>' + tool_call.name + '.call(' }}") == "llama3"  # the tag alone
    assert '"parameters"' in trl_template("muse_glimmer")
    assert detect_format(trl_template("muse_glimmer")) is None  # "parameters" in a tool schema, no ipython role


# resolve_tool_call_format


def test_resolve_qwen2_5_gives_response_schema_that_reads_what_hermes_reads(tokenizer):
    templated = with_template(tokenizer, trl_template("qwen2_5"))
    fmt = resolve_tool_call_format(None, templated)
    assert isinstance(fmt, ResponseSchemaFormat) and fmt.end_marker == "</tool_call>"
    assert templated.response_template is not None  # set on the tokenizer passed in, as TRL does
    assert getattr(tokenizer, "response_template", None) is None
    turns = [
        rendered_assistant_turn(templated, [MULTIPLY]),
        rendered_assistant_turn(templated, [MULTIPLY, RICH]),
        '<tool_call>\n{"name": "multiply", "arguments": "{\\"a\\": 3, \\"b\\": 4}"}\n</tool_call>',
        "The answer is 12.",
    ]
    for turn in turns:
        assert fmt.parse(turn)[1] == HermesFormat().parse(turn)[1]
    assert fmt.parse(turns[1])[1] == as_calls(MULTIPLY, RICH)


def test_response_schema_errors_become_error_calls(tokenizer):
    fmt = resolve_tool_call_format("auto", with_template(tokenizer, trl_template("qwen2_5")))
    content, calls = fmt.parse('<tool_call>\n{"name": "multiply", "arguments": {"a": 3, }}\n</tool_call>')
    assert content == "" and len(calls) == 1 and calls[0].name == "multiply"
    assert calls[0].error.startswith("could not read the tool call: Expecting property name")
    calls = fmt.parse('<tool_call>\n{"name": "multiply", "arguments": [3]}\n</tool_call>')[1]
    assert calls == [ToolCall("multiply", {}, '"arguments" in the tool call must be a JSON object, not an array.')]


def test_resolve_llama3_2_response_schema_reads_a_turn_without_its_end_token(tokenizer):
    templated = with_template(tokenizer, trl_template("llama3_2"))
    fmt = resolve_tool_call_format(None, templated)
    assert isinstance(fmt, ResponseSchemaFormat) and fmt.family == "llama3" and fmt.end_marker is None
    turn = rendered_assistant_turn(templated, [MULTIPLY], date_string="26 Jul 2024")
    assert fmt.parse(turn) == ("", as_calls(MULTIPLY))
    assert fmt.parse(turn.removesuffix("<|eot_id|>")) == ("", as_calls(MULTIPLY))
    assert fmt.parse("The answer is 12.") == ("The answer is 12.", [])


def test_resolve_unknown_template_with_tools_raises_one_line_naming_the_option(tokenizer):
    templated = with_template(tokenizer, UNKNOWN_TOOL_TEMPLATE)
    assert "[CALL]multiply" in rendered_assistant_turn(templated, [MULTIPLY])  # it does render tool calls
    with pytest.raises(ValueError, match="tool_call_format") as info:
        resolve_tool_call_format(None, templated)
    assert "\n" not in str(info.value) and '"hermes"' in str(info.value) and "function" in str(info.value)
    with pytest.raises(ValueError, match="tool_call_format"):
        resolve_tool_call_format("auto", with_template(tokenizer, tokenizer.chat_template))  # no tools at all


def test_resolve_unknown_template_falls_back_to_detection(tokenizer):
    # A Hermes-style template TRL does not know byte for byte: no response schema, but detect_format reads it.
    template = trl_template("qwen2_5").replace("You are Qwen, created by Alibaba Cloud.", "You are a bot.")
    fmt = resolve_tool_call_format(None, with_template(tokenizer, template))
    assert type(fmt) is HermesFormat


def test_resolve_names_instances_classes_and_callables(tokenizer):
    assert type(resolve_tool_call_format("hermes", tokenizer)) is HermesFormat
    assert type(resolve_tool_call_format("llama3", None)) is Llama3JsonFormat
    assert type(resolve_tool_call_format(Llama3JsonFormat, None)) is Llama3JsonFormat
    instance = HermesFormat()
    assert resolve_tool_call_format(instance, None) is instance
    with pytest.raises(ValueError, match="'hermes', 'llama3'"):
        resolve_tool_call_format("mistral", tokenizer)
    with pytest.raises(TypeError):
        resolve_tool_call_format(42, tokenizer)
    fmt = resolve_tool_call_format(lambda text: [], tokenizer)
    assert isinstance(fmt, CallableFormat) and isinstance(fmt, ToolCallFormat)


# A callable format


def bracket_calls(text: str) -> list[dict[str, Any]]:
    """The UNKNOWN_TOOL_TEMPLATE's format: ``[CALL]name({json})``."""
    import json
    import re

    return [{"name": m[1], "arguments": json.loads(m[2])} for m in re.finditer(r"\[CALL\](\w+)\((\{.*?\})\)", text)]


def test_callable_format_round_trips_an_unknown_template(tokenizer):
    templated = with_template(tokenizer, UNKNOWN_TOOL_TEMPLATE)
    fmt = resolve_tool_call_format(bracket_calls, templated)
    assert fmt.name == "bracket_calls" and fmt.end_marker is None
    turn = rendered_assistant_turn(templated, [MULTIPLY])
    assert fmt.parse(turn)[1] == as_calls(MULTIPLY)


def test_callable_format_validates_dicts_and_turns_exceptions_into_error_calls():
    fmt = CallableFormat(lambda text: [{"name": "add"}, {"arguments": {}}, ToolCall("x", {"y": 1})])
    assert fmt.parse(" hi ") == (
        "hi",
        [ToolCall("add", {}), ToolCall("", {}, 'missing "name" in the tool call.'), ToolCall("x", {"y": 1})],
    )

    def strict(text: str) -> list[ToolCall]:
        raise ValueError("bad call syntax\nwith detail")

    assert CallableFormat(strict).parse("x") == (
        "x",
        [ToolCall("", {}, "could not read the tool call: bad call syntax.")],
    )
    with_content = CallableFormat(lambda text: ("before", [{"name": "add", "arguments": {}}]), end_marker="<end>")
    assert with_content.parse("before [call]") == ("before", [ToolCall("add", {})])
    assert with_content.end_marker == "<end>"
    with pytest.raises(TypeError, match="must return a list"):
        CallableFormat(lambda text: "add()").parse("x")
