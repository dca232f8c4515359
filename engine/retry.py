"""Retrying transient backend failures: exponential backoff with full jitter (tenacity),
never sooner than the service's Retry-After."""

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


#: the longest Retry-After honoured, seconds (a longer one is read as this)
MAX_RETRY_AFTER = 300.0


def _wait(config: EngineConfig) -> Callable[[RetryCallState], float]:
    """Exponential backoff with full jitter, and never sooner than the service's
    Retry-After (``TransientBackendError.retry_after``, when the answer carried one)."""
    expo = wait_random_exponential(multiplier=config.retry_backoff, max=config.retry_backoff_max)

    def wait(state: RetryCallState) -> float:
        delay = float(expo(state))
        exc = state.outcome.exception() if state.outcome is not None else None
        after = getattr(exc, "retry_after", None)
        if isinstance(after, (int, float)) and after > 0:
            delay = max(delay, min(float(after), MAX_RETRY_AFTER))
        return delay

    return wait


async def retrying(
    config: EngineConfig,
    call: Callable[[], Awaitable[T]],
    on_retry: Callable[[RetryCallState], Any] | None = None,
) -> T:
    """Run ``call``; retry TransientBackendError up to ``config.max_retries`` times."""
    async for attempt in AsyncRetrying(
        sleep=anyio.sleep,
        stop=stop_after_attempt(config.max_retries + 1),
        wait=_wait(config),
        retry=retry_if_exception_type(TransientBackendError),
        before_sleep=on_retry,
        reraise=True,
    ):
        with attempt:
            return await call()
    raise AssertionError("unreachable")  # pragma: no cover
