"""Read the tool calls a model writes, in its own chat template's format, from the text of one assistant turn.

A model calls tools the way its chat template renders ``tool_calls``: Hermes / Qwen write
``<tool_call>{json}</tool_call>`` blocks, Llama 3.1 / 3.2 a bare ``{"name": ..., "parameters": ...}`` JSON message.
Parsing in that same format keeps the multi-turn text the model sees identical to what its template would render. A
call that cannot be read is never raised: it becomes a :class:`ToolCall` with ``error`` set, which the environment
shows to the model as the tool's result, so the model learns from its mistake instead of the rollout crashing (TRL
silently falls back to plain text there).
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FORMATS",
    "CallableFormat",
    "HermesFormat",
    "Llama3JsonFormat",
    "ResponseSchemaFormat",
    "ToolCall",
    "ToolCallFormat",
    "detect_format",
    "resolve_tool_call_format",
]

# End-of-turn tokens a decoded turn may still carry when special tokens were not skipped: removed from the content so
# it matches what a template would render back (transformers' response templates drop them too).
_TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>")
_JSON = json.JSONDecoder()
# The name of a call whose JSON is broken, so the error can still say which tool it was meant for.
_NAME_RE = re.compile(r'"name"\s*:\s*"([^"\\]*)"')


@dataclass(frozen=True)
class ToolCall:
    """One call the model wrote: ``name`` and ``arguments`` (a dict), or ``error`` (why it could not be read: shown to
    the model as the tool's result, never raised)."""

    name: str
    arguments: dict[str, Any]
    error: str | None = None


class ToolCallFormat:
    """How one chat-template family writes tool calls; subclasses implement :meth:`parse`."""

    name: str = "base"
    # Text at which a call is complete (a generation stop string), or None when a call ends only with the turn.
    end_marker: str | None = None

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content: the turn's text without the calls, stripped; the calls in order). No calls -> (text, [])."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, end_marker={self.end_marker!r})"


def _strip_turn_end(text: str) -> str:
    """The text without trailing end-of-turn tokens (a turn decoded with its special tokens still has them)."""
    text = text.rstrip()
    while True:
        for token in _TURN_END_TOKENS:
            if text.endswith(token):
                text = text[: -len(token)].rstrip()
                break
        else:
            return text


def _json_type(value: Any) -> str:
    """JSON's name for a decoded value's type, for error messages the model can act on."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object" if isinstance(value, dict) else type(value).__name__


def _guess_name(text: str) -> str:
    """The ``"name"`` a broken call was meant for, or "" (so the error still points at a tool)."""
    match = _NAME_RE.search(text)
    return match.group(1) if match else ""


def _call_from_object(obj: Any, where: str) -> ToolCall:
    """Validate one decoded call ``{"name": str, "arguments"|"parameters": object}`` into a ToolCall or an error."""
    if isinstance(obj, dict) and "name" not in obj and "function" in obj:
        obj = obj["function"]  # OpenAI-style {"type": "function", "function": {...}}, as response templates give
    if not isinstance(obj, dict):
        return ToolCall("", {}, f'{where} must hold a JSON object with "name" and "arguments", not {_json_type(obj)}.')
    name = obj.get("name")
    if name is None:
        return ToolCall("", {}, f'missing "name" in {where}.')
    if not isinstance(name, str) or not name.strip():
        return ToolCall("", {}, f'"name" in {where} must be a non-empty string, not {_json_type(name)}.')
    key = "arguments" if "arguments" in obj or "parameters" not in obj else "parameters"
    arguments = obj.get(key)
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        return ToolCall(name, {})  # a call without arguments (TRL normalises these to {} too)
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as err:
            return ToolCall(name, {}, f'"{key}" in {where} is a string but not JSON: {err.msg} at char {err.pos}.')
    if not isinstance(arguments, dict):
        return ToolCall(name, {}, f'"{key}" in {where} must be a JSON object, not {_json_type(arguments)}.')
    return ToolCall(name, arguments)


class HermesFormat(ToolCallFormat):
    """Hermes / Qwen2.5 / Qwen3 / SmolLM3: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``."""

    name = "hermes"
    end_marker = "</tool_call>"
    open_tag = "<tool_call>"

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content without the blocks, the calls in order); a broken block gives an error call, never an exception."""
        text = _strip_turn_end(text)
        if self.open_tag not in text:
            return text.strip(), []
        close_tag = self.end_marker
        pieces: list[str] = []
        calls: list[ToolCall] = []
        pos = 0
        while (start := text.find(self.open_tag, pos)) >= 0:
            pieces.append(text[pos:start])
            body_start = start + len(self.open_tag)
            # Decode the JSON first so a "</tool_call>" inside a string value does not cut the call short.
            json_start = len(text) - len(text[body_start:].lstrip())
            try:
                obj, json_end = _JSON.raw_decode(text, json_start)
            except json.JSONDecodeError:
                obj, json_end = None, -1
            if json_end >= 0:
                after = len(text) - len(text[json_end:].lstrip())
                if text.startswith(close_tag, after):
                    calls.append(_call_from_object(obj, "<tool_call>"))
                    pos = after + len(close_tag)
                    continue
            close = text.find(close_tag, body_start)
            next_open = text.find(self.open_tag, body_start)
            if close < 0 or 0 <= next_open < close:
                # Unclosed: the turn ended (e.g. max tokens) or a new call began before this one was finished.
                body = text[body_start : next_open if next_open >= 0 else len(text)]
                calls.append(ToolCall(_guess_name(body), {}, "unclosed <tool_call>: it has no </tool_call>."))
                pos = next_open if next_open >= 0 else len(text)
                continue
            body = text[body_start:close].strip()
            try:
                calls.append(_call_from_object(json.loads(body), "<tool_call>"))
            except json.JSONDecodeError as err:
                message = f"malformed JSON in <tool_call>: {err.msg} at char {err.pos}."
                calls.append(ToolCall(_guess_name(body), {}, message))
            pos = close + len(close_tag)
        pieces.append(text[pos:])
        content = "\n".join(piece.strip() for piece in pieces if piece.strip())
        return content, calls


class Llama3JsonFormat(ToolCallFormat):
    """Llama 3.1 / 3.2: the whole message is ``{"name": ..., "parameters": {...}}``, optionally after
    ``<|python_tag|>``; several calls may be separated by ``;`` or newlines. Anything else is plain content."""

    name = "llama3"
    end_marker = None
    python_tag = "<|python_tag|>"
    # A turn starting like this is an attempt at a call, so broken JSON is an error rather than plain content.
    _CALL_START = re.compile(r'\{\s*"(?:name|parameters|arguments)"\s*:')

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content, calls): a turn that does not look like a call is content with no calls and no error."""
        body = _strip_turn_end(text).strip()
        tagged = body.startswith(self.python_tag)
        if tagged:
            body = body[len(self.python_tag) :].strip()
        elif not body.startswith("{"):
            return body, []
        calls: list[ToolCall] = []
        pos = 0
        while pos < len(body):
            try:
                obj, end = _JSON.raw_decode(body, pos)
            except json.JSONDecodeError as err:
                rest = body[pos:]
                if not calls and not tagged and not self._CALL_START.match(rest):
                    return body, []  # e.g. "{x | x > 0} is a set": prose that happens to start with a brace
                if calls and not self._CALL_START.match(rest):
                    return rest.strip(), calls  # prose after the calls
                if tagged and not calls and not rest.startswith("{"):
                    message = f'expected a JSON call {{"name": ..., "parameters": {{...}}}} after {self.python_tag}.'
                else:
                    message = f"malformed JSON in the tool call: {err.msg} at char {err.pos - pos}."
                calls.append(ToolCall(_guess_name(rest), {}, message))
                return "", calls
            is_call_shaped = isinstance(obj, dict) and any(k in obj for k in ("name", "parameters", "arguments"))
            if not calls and not tagged and not is_call_shaped:
                return body, []  # a JSON answer such as {"answer": 12}: content, not a call
            calls.append(_call_from_object(obj, "the tool call"))
            pos = end
            while pos < len(body) and (body[pos].isspace() or body[pos] == ";"):
                pos += 1
        return "", calls


def _short_reason(err: BaseException) -> str:
    """One line from an exception: transformers' parse errors span lines ("...\\nContent: ...\\nError: ...")."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("Error:"):
            return line[len("Error:") :].strip()
    return lines[0] if lines else type(err).__name__


def _uses_response_template(tokenizer: Any) -> bool:
    """Whether this transformers parses with the new ``response_template`` (it then requires ``prefix=``)."""
    try:
        return "prefix" in inspect.signature(tokenizer.parse_response).parameters
    except (AttributeError, TypeError, ValueError):
        return False


def _has_response_parser(tokenizer: Any) -> bool:
    """Whether ``tokenizer.parse_response`` will find a template or schema it can actually use."""
    if not hasattr(tokenizer, "parse_response"):
        return False
    inner = getattr(tokenizer, "tokenizer", tokenizer)  # processors keep it on their tokenizer
    attribute = "response_template" if _uses_response_template(tokenizer) else "response_schema"
    return getattr(inner, attribute, None) is not None or getattr(tokenizer, attribute, None) is not None


def _chat_template(tokenizer: Any) -> str | None:
    """The tokenizer's chat template text (the ``tool_use`` or ``default`` variant of a named set)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default")
    return template if isinstance(template, str) else None


# What a family's turn ends with, re-appended when a response template needs it to close the last region.
_FAMILY_TURN_END = {"hermes": "<|im_end|>", "llama3": "<|eot_id|>"}


class ResponseSchemaFormat(ToolCallFormat):
    """A tokenizer with transformers' response parsing (``response_template``, set by TRL's ``add_response_schema``
    for the templates it knows, or shipped by the model): the template's own parser reads the calls."""

    name = "response_schema"

    def __init__(self, tokenizer: Any, family: str | None = None) -> None:
        if not hasattr(tokenizer, "parse_response"):
            raise TypeError(f"{type(tokenizer).__name__} has no parse_response: it cannot parse responses.")
        self.tokenizer = tokenizer
        template = _chat_template(tokenizer)
        self.family = family or detect_format(template)
        if self.family in FORMATS:
            self.end_marker = FORMATS[self.family].end_marker
        elif template and "</tool_call>" in template:
            self.end_marker = "</tool_call>"  # Qwen3.5 / Nemotron / GLM: XML inside <tool_call> blocks
        else:
            self.end_marker = None
        self._new_api = _uses_response_template(tokenizer)
        self._turn_end = _FAMILY_TURN_END.get(self.family or "") or getattr(tokenizer, "eos_token", None)

    def _parse_response(self, text: str) -> dict[str, Any]:
        """transformers' parse; ``prefix=""`` because the text is the whole turn (the new API requires a prefix)."""
        parsed = (
            self.tokenizer.parse_response(text, prefix="") if self._new_api else self.tokenizer.parse_response(text)
        )
        if not isinstance(parsed, dict):
            raise ValueError(f"parse_response returned {type(parsed).__name__}, not a message dict")
        return parsed

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content, calls) from ``parse_response``; if it raises, one error call says why (TRL would drop it)."""
        try:
            parsed = self._parse_response(text)
        except Exception as err:  # noqa: BLE001 - any parser failure is the model's malformed output
            # Some templates (Llama 3) only close a call at the end-of-turn token, which a caller may have stripped.
            turn_end = self._turn_end
            if not turn_end or text.rstrip().endswith(turn_end):
                return "", [ToolCall(_guess_name(text), {}, f"could not read the tool call: {_short_reason(err)}.")]
            try:
                parsed = self._parse_response(text.rstrip() + turn_end)
            except Exception:  # noqa: BLE001 - report the first failure: it is about the text the model wrote
                return "", [ToolCall(_guess_name(text), {}, f"could not read the tool call: {_short_reason(err)}.")]
        content = parsed.get("content")
        content = _strip_turn_end(content).strip() if isinstance(content, str) else ""
        raw_calls = parsed.get("tool_calls") or []
        if not isinstance(raw_calls, list):
            return content, [ToolCall("", {}, f"could not read the tool calls: got {_json_type(raw_calls)}.")]
        return content, [_call_from_object(raw, "the tool call") for raw in raw_calls]

    def __repr__(self) -> str:
        return f"ResponseSchemaFormat(family={self.family!r}, end_marker={self.end_marker!r})"


class CallableFormat(ToolCallFormat):
    """A user function ``text -> list[ToolCall] | list[dict]`` (dicts with ``name`` / ``arguments``): the way to
    declare a format for a template nobody knows. It may also return ``(content, calls)`` to say what the content is;
    otherwise the content is the whole stripped text. If it raises, the model gets one error call."""

    def __init__(self, function: Callable[[str], Any], name: str | None = None, end_marker: str | None = None) -> None:
        if not callable(function):
            raise TypeError(f"CallableFormat needs a function text -> list of calls, got {type(function).__name__}.")
        self.function = function
        self.name = name or getattr(function, "__name__", "callable")
        self.end_marker = end_marker

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """Run the function; dicts are validated like any other call, exceptions become one error call."""
        try:
            result = self.function(text)
        except Exception as err:  # noqa: BLE001 - a parser refusing the text means the model's call was malformed
            return text.strip(), [ToolCall("", {}, f"could not read the tool call: {_short_reason(err)}.")]
        content = text.strip()
        if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], str):
            content, result = result[0].strip(), result[1]
        if result is None:
            return content, []
        if not isinstance(result, Sequence) or isinstance(result, (str, bytes)):
            raise TypeError(
                f"tool-call parser {self.name!r} must return a list of calls, got {type(result).__name__}."
            )
        calls: list[ToolCall] = []
        for item in result:
            if isinstance(item, ToolCall):
                calls.append(item)
            elif isinstance(item, dict):
                calls.append(_call_from_object(item, "the tool call"))
            else:
                raise TypeError(
                    f"tool-call parser {self.name!r} returned a {type(item).__name__}; expected ToolCall or dict."
                )
        return content, calls

    def __repr__(self) -> str:
        return f"CallableFormat({self.name!r}, end_marker={self.end_marker!r})"


FORMATS: dict[str, type[ToolCallFormat]] = {"hermes": HermesFormat, "llama3": Llama3JsonFormat}


def detect_format(chat_template: str | dict[str, str] | None) -> str | None:
    """The family of a chat template from what it renders for tool calls: '<tool_call>' -> 'hermes'; '<|python_tag|>'
    or '"parameters"' with ipython -> 'llama3'; else None.

    ``<tool_call>`` blocks holding XML (Qwen3.5's ``<function=...>``, GLM's ``<arg_key>``) are not Hermes JSON, so they
    give None rather than a parser that would reject every call.
    """
    if isinstance(chat_template, dict):
        chat_template = chat_template.get("tool_use") or chat_template.get("default")
    if not chat_template:
        return None
    if "<tool_call>" in chat_template:
        return None if "<function=" in chat_template or "<arg_key>" in chat_template else "hermes"
    if "<|python_tag|>" in chat_template or ('"parameters"' in chat_template and "ipython" in chat_template):
        return "llama3"
    return None


def _unknown_template_error() -> ValueError:
    return ValueError(
        "tool_call_format: the chat template's tool-call format is unknown (TRL has no response schema for it and it "
        'renders neither <tool_call> blocks nor Llama 3 JSON calls); pass tool_call_format="hermes" or "llama3", '
        "or a function text -> list of calls."
    )


def resolve_tool_call_format(spec: str | ToolCallFormat | Callable | None, tokenizer: Any) -> ToolCallFormat:
    """spec None or "auto": the tokenizer's own response parser, else TRL's response schema for the templates it knows
    (``add_response_schema``: set on this tokenizer, as TRL does), else :func:`detect_format`; unknown -> ValueError.
    A string names :data:`FORMATS`; a ToolCallFormat (instance or class) is used as is; a plain callable is wrapped.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto"):
        if tokenizer is None:
            raise ValueError('tool_call_format="auto" needs the tokenizer, to read its chat template.')
        if _has_response_parser(tokenizer):
            return ResponseSchemaFormat(tokenizer)
        try:
            from trl.chat_template_utils import add_response_schema

            add_response_schema(tokenizer)  # raises ValueError on templates TRL does not know
        except Exception:  # noqa: BLE001 - unknown template (or an old TRL): fall back to detection
            pass
        else:
            if _has_response_parser(tokenizer):
                return ResponseSchemaFormat(tokenizer)
        family = detect_format(_chat_template(tokenizer))
        if family is None:
            raise _unknown_template_error()
        return FORMATS[family]()
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key not in FORMATS:
            names = ", ".join(repr(name) for name in ["auto", *FORMATS])
            raise ValueError(f"tool_call_format={spec!r} is not a known format; use one of {names}, or a function.")
        return FORMATS[key]()
    if isinstance(spec, ToolCallFormat):
        return spec
    if isinstance(spec, type) and issubclass(spec, ToolCallFormat):
        return spec()
    if callable(spec):
        return CallableFormat(spec)
    raise TypeError(
        f"tool_call_format must be None, 'auto', a format name, a ToolCallFormat or a function, "
        f"not {type(spec).__name__}."
    )
