"""AsyncKustoSaver: the engine runs in the caller's event loop (``async with``)."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel

from .base import KustoSaverBase
from .engine.errors import KustoCheckpointError, UsageError
from .telemetry.instruments import carry_context


class AsyncKustoSaver(KustoSaverBase):
    """LangGraph checkpointer on Kusto (or the embedded store), for async code.

    Use it as an async context manager: entering starts the engine in the
    current event loop (asyncio or trio), leaving flushes every accepted row to
    the backend and stops it::

        async with AsyncKustoSaver.embedded("checkpoints.duckdb") as saver:
            graph = builder.compile(checkpointer=saver)
            await graph.ainvoke(inputs, {"configurable": {"thread_id": "t1"}})

    The sync methods work from *other* threads while the loop runs (LangGraph
    calls them from its sync API); called from the loop's own thread they raise.
    """

    _token: Any = None

    # -- schema setup (KustoBackend) -----------------------------------------

    async def setup(self, create: bool = False) -> Any:
        """Check the database schema (``create=True``: run provision.kql first); raises a
        clear error listing what is missing. A no-op on the embedded store. A coroutine,
        as on LangGraph's own async savers: ``await saver.setup()``, with the saver open
        or closed."""
        setup = getattr(self.backend, "setup", None)
        if setup is None:
            return None
        return await setup(create=create)

    async def asetup(self, create: bool = False) -> Any:
        """The same as :meth:`setup` (the name :class:`KustoSaver` also has)."""
        return await self.setup(create)

    # -- lifecycle ---------------------------------------------------------

    async def __aenter__(self) -> AsyncKustoSaver:
        if self._closed:
            raise self._not_open("async with")
        await self.engine.__aenter__()
        self._token = anyio.lowlevel.current_token()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self._token = None
        self._closed = True
        await self.engine.aclose()

    async def flush(self) -> None:
        """Return once every row accepted so far is in the backend."""
        await self._flush()

    # -- reaching the engine's loop ------------------------------------------

    def _in_loop(self, fn: Any, *args: Any) -> Any:
        return fn(*args)  # the engine runs in this very loop: the call's own coroutine, no extra frame

    def _blocking(self, fn: Any, *args: Any) -> Any:
        token = self._token
        if token is None:
            raise self._not_open("async with")
        try:
            anyio.lowlevel.current_token()
        except Exception:  # noqa: BLE001 - no loop in this thread: the expected case
            fn, args = carry_context(fn, args)
            try:
                return anyio.from_thread.run(fn, *args, token=token)
            except RuntimeError as exc:
                if isinstance(exc, KustoCheckpointError) or self._token is token:
                    raise
                raise self._not_open("async with") from exc  # its loop closed meanwhile
        raise UsageError(
            "synchronous calls on AsyncKustoSaver are only allowed from a thread other than "
            "the event loop's; in async code use the a-methods (aget_tuple, aput...), "
            "or use KustoSaver"
        )
