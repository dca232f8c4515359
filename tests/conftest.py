"""Engine tests run on both anyio backends; LangGraph-facing tests pin asyncio."""

from __future__ import annotations

import anyio
import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


class Turns:
    """Counts the turns of the event loop another task gets: start :meth:`run` in a task
    group, then read :attr:`count` (does the code under test ever yield?)."""

    def __init__(self) -> None:
        self.count = 0

    async def run(self) -> None:
        while True:
            self.count += 1
            await anyio.sleep(0)


@pytest.fixture
def turns() -> Turns:
    return Turns()
