"""Values that may be awaitables: TRL accepts async reward functions, tools and ``get_reward``, and the project calls
them from synchronous code."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

__all__ = ["resolved"]


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def resolved(value: Any) -> Any:
    """``value`` itself, or, when it is awaitable (a coroutine, a future, any ``__await__``), its result, run to
    completion on a fresh event loop."""
    return asyncio.run(_awaited(value)) if inspect.isawaitable(value) else value
