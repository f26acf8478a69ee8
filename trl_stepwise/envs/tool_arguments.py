"""Tool calls as data, checked before they run: a bad call costs nothing and says in one line what was wrong.

``ToolRequest`` is one call as the model wrote it (the function, its keyword arguments, or why it cannot run);
``prepare_call`` binds the arguments to the function's signature and converts JSON values to the annotated simple
types (a model writes ``"3"`` for an ``int`` as often as ``3``); ``ToolOutcome`` is what any runner returns: a
result or a short error the model can read.
"""

from __future__ import annotations

import inspect
import json
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ToolOutcome", "ToolRequest", "describe_error", "prepare_call", "tool_request"]

MAX_ERROR_CHARS = 300  # an error is one short line: the model reads it


@dataclass(frozen=True)
class ToolOutcome:
    """One finished call: ``result`` (the function's return value, None on error), ``error`` (one short line the model
    can read, e.g. "TypeError: multiply() missing a required argument: 'b'", "timeout: multiply took longer than 1s",
    "unknown tool 'foo'; tools: multiply, add"), ``seconds`` (wall time of the call) and ``error_type`` (what kind of
    failure, for metrics: the exception's type name, "timeout", "invalid_call", "unknown_tool", "died",
    "unpicklable"; None on success)."""

    result: Any
    error: str | None
    seconds: float
    error_type: str | None = None


@dataclass(frozen=True)
class ToolRequest:
    """One call to make: ``fn`` with keyword ``arguments`` (as the model wrote them), ``name`` for messages. ``error``
    is an error known before calling (bad JSON, unknown tool): it is returned as is and ``fn`` is not called; ``fn``
    None means the tool name was unknown."""

    fn: Callable[..., Any] | None
    arguments: dict[str, Any]
    name: str
    error: str | None = None


def describe_error(exc: BaseException) -> str:
    """``<Type>: <message>`` on one line, cut to a length the model can use."""
    message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            number = float(text)  # "3.0" -> 3; "3.5", "abc" raise
            if number.is_integer():
                return int(number)
    raise ValueError


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, float):
        return value
    if isinstance(value, int):
        number = float(value)
        if int(number) != value:  # beyond 2**53: not lossless
            raise ValueError
        return number
    if isinstance(value, str):
        return float(value.strip())
    raise ValueError


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise ValueError


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError


_CONVERTERS: dict[Any, Callable[[Any], Any]] = {int: _to_int, float: _to_float, bool: _to_bool, str: _to_str}
_NAMED = {"int": int, "float": float, "bool": bool, "str": str}


def _simple_types(annotation: Any) -> tuple[list[type], bool] | None:
    """The convertible types an annotation allows and whether None is allowed; None when it is not (only) made of
    int/float/bool/str (then values pass unchecked)."""
    if isinstance(annotation, str):
        names = [n.strip() for n in annotation.replace("Optional[", "").rstrip("]").split("|")]
        if not names or any(n not in _NAMED and n != "None" for n in names):
            return None
        return [_NAMED[n] for n in names if n != "None"], "None" in names or annotation.startswith("Optional[")
    if annotation in _CONVERTERS:
        return [annotation], False
    if typing.get_origin(annotation) in (typing.Union, getattr(types, "UnionType", typing.Union)):
        args = typing.get_args(annotation)
        kinds = [a for a in args if a is not type(None)]
        if kinds and all(a in _CONVERTERS for a in kinds):
            return kinds, len(kinds) < len(args)
    return None


def _annotations(fn: Callable[..., Any], signature: inspect.Signature) -> dict[str, Any]:
    """Parameter annotations, resolved when they are strings (``from __future__ import annotations``)."""
    found = {n: p.annotation for n, p in signature.parameters.items() if p.annotation is not inspect.Parameter.empty}
    if any(isinstance(a, str) for a in found.values()):
        try:
            hints = typing.get_type_hints(fn)
        except Exception:  # unresolvable names, partials, ...: fall back to reading the strings
            hints = {}
        found = {n: hints.get(n, a) for n, a in found.items()}
    return found


def _convert(name: str, parameter: str, value: Any, annotation: Any) -> Any:
    allowed = _simple_types(annotation)
    if allowed is None:
        return value
    kinds, optional = allowed
    if value is None and optional:
        return None
    if any(type(value) is kind for kind in kinds):
        return value
    for kind in kinds:
        try:
            return _CONVERTERS[kind](value)
        except (ValueError, OverflowError):
            continue
    expected = " or ".join(k.__name__ for k in kinds)
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    raise TypeError(f"{name}() argument {parameter!r} must be {expected}, not {type(value).__name__} ({shown})")


def prepare_call(request: ToolRequest) -> dict[str, Any] | ToolOutcome:
    """The keyword arguments to call ``request.fn`` with, or the outcome when the call must not be made."""
    if request.error is not None:
        return ToolOutcome(None, request.error, 0.0, "invalid_call")
    if request.fn is None:
        return ToolOutcome(None, f"unknown tool {request.name!r}", 0.0, "unknown_tool")
    arguments = dict(request.arguments or {})
    try:
        signature = inspect.signature(request.fn)
    except (TypeError, ValueError):  # no signature (some builtins): the call itself will say what is wrong
        return arguments
    parameters = signature.parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    unexpected = [k for k in arguments if k not in parameters and not takes_any]
    try:
        if unexpected:  # said first: ``bind`` would complain about a missing one, the likely misspelling of this one
            raise TypeError(f"got an unexpected keyword argument {unexpected[0]!r}")
        bound = signature.bind(**arguments)
    except TypeError as exc:
        listed = ", ".join(parameters) or "none"
        error = f"TypeError: {request.name}() {exc}; parameters: {listed}"
        return ToolOutcome(None, error[:MAX_ERROR_CHARS], 0.0, "TypeError")
    annotations = _annotations(request.fn, signature)
    for key, value in list(bound.arguments.items()):
        parameter = parameters[key]
        if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        try:
            arguments[key] = _convert(request.name, key, value, annotations.get(key, inspect.Parameter.empty))
        except TypeError as exc:
            return ToolOutcome(None, describe_error(exc), 0.0, "TypeError")
    return arguments


def tool_request(tools: Mapping[str, Callable[..., Any]], name: str, arguments: Any) -> ToolRequest:
    """A request from a call as written: ``arguments`` a dict or a JSON object string; unknown tools and bad JSON
    become the request's error."""
    fn = tools.get(name)
    if fn is None:
        return ToolRequest(None, {}, name, f"unknown tool {name!r}; tools: {', '.join(tools) or 'none'}")
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        arguments = {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            return ToolRequest(fn, {}, name, f"invalid JSON arguments for {name}: {exc.msg} at column {exc.colno}")
    if not isinstance(arguments, Mapping):
        return ToolRequest(fn, {}, name, f"arguments for {name} must be a JSON object, not {type(arguments).__name__}")
    return ToolRequest(fn, dict(arguments), name)
