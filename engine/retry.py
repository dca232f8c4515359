"""Retrying transient backend failures: exponential backoff with full jitter (tenacity)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from .config import EngineConfig
from .errors import TransientBackendError

T = TypeVar("T")


async def retrying(
    config: EngineConfig,
    call: Callable[[], Awaitable[T]],
    on_retry: Callable[[RetryCallState], Any] | None = None,
) -> T:
    """Run ``call``; retry TransientBackendError up to ``config.max_retries`` times."""
    async for attempt in AsyncRetrying(
        sleep=anyio.sleep,
        stop=stop_after_attempt(config.max_retries + 1),
        wait=wait_random_exponential(multiplier=config.retry_backoff, max=config.retry_backoff_max),
        retry=retry_if_exception_type(TransientBackendError),
        before_sleep=on_retry,
        reraise=True,
    ):
        with attempt:
            return await call()
    raise AssertionError("unreachable")  # pragma: no cover
