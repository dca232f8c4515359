"""KustoSaver: the engine runs in a background thread behind an anyio blocking portal."""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
from langgraph.checkpoint.serde.base import SerializerProtocol

from .base import KustoSaverBase
from .engine.backends.base import Backend
from .engine.errors import ConfigError, KustoCheckpointError, UsageError
from .telemetry.instruments import carry_context

log = logging.getLogger(__name__)

#: savers entered and not yet closed; held strongly so that a saver dropped without
#: closing is still closed at interpreter exit, while its portal thread can run
_OPEN: set[KustoSaver] = set()

#: how long closing waits for each worker thread of the portal's loop to end (they have
#: no work left by then: they only return)
_JOIN_TIMEOUT = 10.0


@atexit.register
def _close_forgotten() -> None:
    """Close the savers still open at interpreter exit. ``atexit`` runs before the
    interpreter stops its daemon threads (the portal's among them), so this closes them
    as leaving ``with`` does: every accepted row is flushed, DuckDB is closed and every
    thread ends, instead of being torn down mid-call by the interpreter's finalization."""
    for saver in list(_OPEN):
        log.warning("%r was still open at interpreter exit: closing it (use it inside `with`)", saver)
        try:
            saver.close()
        except Exception as exc:  # noqa: BLE001 - reported; exit goes on
            log.error("closing %r at interpreter exit failed: %s", saver, exc)


def _running_loop() -> Any:
    """The portal's asyncio loop (None on trio, whose worker threads are trio's own cache)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


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
            raise ConfigError(f"portal_backend must be 'asyncio' or 'trio', got {portal_backend!r}")
        super().__init__(backend, serde=serde, **options)
        self.portal_backend = portal_backend
        self._portal_cm: Any = None
        self._portal: Any = None
        self._engine_cm: Any = None
        self._portal_loop: Any = None

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
            raise UsageError("KustoSaver is already open: enter it once")
        if self._closed:
            raise self._not_open("with")
        self._portal_cm = anyio.from_thread.start_blocking_portal(self.portal_backend)
        self._portal = self._portal_cm.__enter__()
        try:
            self._portal_loop = self._portal.call(_running_loop)
            self._engine_cm = self._portal.wrap_async_context_manager(self.engine)
            self._engine_cm.__enter__()
        except BaseException:
            portal_cm, self._portal, self._portal_cm = self._portal_cm, None, None
            portal_cm.__exit__(None, None, None)
            self._join_workers()
            raise
        _OPEN.add(self)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        engine_cm, self._engine_cm = self._engine_cm, None
        portal_cm, self._portal_cm = self._portal_cm, None
        if portal_cm is not None:
            self._closed = True
        self._portal = None
        _OPEN.discard(self)
        try:
            if engine_cm is not None:
                engine_cm.__exit__(None, None, None)
        finally:
            if portal_cm is not None:
                portal_cm.__exit__(None, None, None)
                self._join_workers()

    def _join_workers(self) -> None:
        """Wait for the worker threads the portal's loop started (``anyio.to_thread``: DuckDB
        and SDK calls) to end. anyio tells them to stop when the loop's main task ends but
        does not wait, and they are daemon threads (the portal's is): one still ending when
        the interpreter finalizes is stopped wherever it is."""
        loop, self._portal_loop = self._portal_loop, None
        if loop is None:
            return
        me = threading.current_thread()
        for thread in threading.enumerate():
            if thread is not me and getattr(thread, "loop", None) is loop:  # anyio's WorkerThread
                thread.join(_JOIN_TIMEOUT)

    def close(self) -> None:
        self.__exit__(None, None, None)

    def flush(self) -> None:
        """Return once every row accepted so far is in the backend."""
        self._blocking(self._flush)

    # -- reaching the engine's loop (the portal's thread) ---------------------

    def _blocking(self, fn: Any, *args: Any) -> Any:
        portal = self._portal
        if portal is None:
            raise self._not_open("with")
        fn, args = carry_context(fn, args)
        try:
            return portal.call(fn, *args)
        except RuntimeError as exc:
            if isinstance(exc, KustoCheckpointError) or self._portal is portal:
                raise
            raise self._not_open("with") from exc  # closed by another thread meanwhile

    async def _in_loop(self, fn: Any, *args: Any) -> Any:
        return await anyio.to_thread.run_sync(self._blocking, fn, *args)
