"""Concurrency helper shared by the stages that fan requests out (discovery, metadata)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


async def run_all(coroutines: Iterable) -> None:
    """Run concurrently; on the first error cancel the rest and raise that error itself (not an
    ExceptionGroup), so callers see e.g. an AuthError as such."""
    try:
        async with asyncio.TaskGroup() as group:
            for coroutine in coroutines:
                group.create_task(coroutine)
    except BaseExceptionGroup as errors:
        error: BaseException = errors
        while isinstance(error, BaseExceptionGroup):
            error = error.exceptions[0]
        raise error from None
