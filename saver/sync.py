"""KustoSaver: the engine runs in a background thread behind an anyio blocking portal."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
from langgraph.checkpoint.serde.base import SerializerProtocol

from .base import KustoSaverBase
from .engine.backends.base import Backend
from .telemetry.instruments import carry_context


class KustoSaver(KustoSaverBase):
    """LangGraph checkpointer on Kusto (or the embedded store), for sync code.

    Use it as a context manager: entering starts a background thread with an
    event loop (``portal_backend``: "asyncio" or "trio") that runs the engine;
    leaving flushes every accepted row and stops it::

        with KustoSaver.embedded("checkpoints.duckdb") as saver:
            graph = builder.compile(checkpointer=saver)
            graph.invoke(inputs, {"configurable": {"thread_id": "t1"}})

    The async methods work too (each waits in a worker thread for the portal).
    """

    def __init__(
        self,
        backend: Backend,
        *,
        serde: SerializerProtocol | None = None,
        portal_backend: str = "asyncio",
        **options: Any,
    ) -> None:
        if portal_backend not in ("asyncio", "trio"):
            raise ValueError(f"portal_backend must be 'asyncio' or 'trio', got {portal_backend!r}")
        super().__init__(backend, serde=serde, **options)
        self.portal_backend = portal_backend
        self._portal_cm: Any = None
        self._portal: Any = None
        self._engine_cm: Any = None

    # -- schema setup (KustoBackend) -----------------------------------------

    def setup(self, create: bool = False) -> Any:
        """Check the database schema (``create=True``: run provision.kql first); raises a
        clear error listing what is missing. A no-op on the embedded store. Works with the
        saver open or not."""
        setup = getattr(self.backend, "setup", None)
        if setup is None:
            return None
        if self._portal is not None:
            return self._blocking(setup, create)
        return anyio.run(setup, create, backend=self.portal_backend)

    async def asetup(self, create: bool = False) -> Any:
        """:meth:`setup` from async code (waits in a worker thread)."""
        return await anyio.to_thread.run_sync(self.setup, create)

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> KustoSaver:
        if self._portal is not None:
            raise RuntimeError("KustoSaver is already open")
        self._portal_cm = anyio.from_thread.start_blocking_portal(self.portal_backend)
        self._portal = self._portal_cm.__enter__()
        try:
            self._engine_cm = self._portal.wrap_async_context_manager(self.engine)
            self._engine_cm.__enter__()
        except BaseException:
            portal_cm, self._portal, self._portal_cm = self._portal_cm, None, None
            portal_cm.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        engine_cm, self._engine_cm = self._engine_cm, None
        portal_cm, self._portal_cm = self._portal_cm, None
        self._portal = None
        try:
            if engine_cm is not None:
                engine_cm.__exit__(None, None, None)
        finally:
            if portal_cm is not None:
                portal_cm.__exit__(None, None, None)

    def close(self) -> None:
        self.__exit__(None, None, None)

    def flush(self) -> None:
        """Return once every row accepted so far is in the backend."""
        self._blocking(self._flush)

    # -- reaching the engine's loop (the portal's thread) ---------------------

    def _blocking(self, fn: Any, *args: Any) -> Any:
        portal = self._portal
        if portal is None:
            raise RuntimeError("KustoSaver is not open: enter it with `with` first")
        fn, args = carry_context(fn, args)
        return portal.call(fn, *args)

    async def _in_loop(self, fn: Any, *args: Any) -> Any:
        return await anyio.to_thread.run_sync(self._blocking, fn, *args)
