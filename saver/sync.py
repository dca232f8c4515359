"""KustoSaver: the engine runs in a background thread behind an anyio blocking portal."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
from langgraph.checkpoint.base import (
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
)
from langgraph.checkpoint.serde.base import SerializerProtocol

from .base import KustoSaverBase
from .engine.backends.base import Backend
from .engine.backends.embedded import EmbeddedBackend


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

    @classmethod
    def embedded(
        cls, path: str = ":memory:", *, serde: SerializerProtocol | None = None, **options: Any
    ) -> KustoSaver:
        """A saver on the embedded DuckDB store at ``path`` (a file, or ``":memory:"``)."""
        return cls(EmbeddedBackend(path), serde=serde, **options)

    # -- Kusto: construction and schema setup (KustoBackend) ----------------

    @classmethod
    def from_connection_string(
        cls,
        cluster_uri: str | None = None,
        database: str | None = None,
        *,
        credential: Any = None,
        ingest_mode: str = "streaming",
        query_timeout: float = 60.0,
        ingest_uri: str | None = None,
        serde: SerializerProtocol | None = None,
        **engine_options: Any,
    ) -> KustoSaver:
        """A saver on an Azure Data Explorer database (use it with ``with``).

        ``credential``: an azure-identity TokenCredential (default DefaultAzureCredential),
        a KustoConnectionStringBuilder or a connection string; an ``http://`` cluster URI
        (a local endpoint) connects without authentication. See :class:`KustoBackend`.
        ``portal_backend`` ("asyncio" or "trio") may be passed with the engine options.
        """
        from .engine.backends.kusto import KustoBackend

        backend = KustoBackend(
            cluster_uri, database, credential=credential, ingest_mode=ingest_mode,
            query_timeout=query_timeout, ingest_uri=ingest_uri,
        )
        if ingest_mode != "streaming":
            # queued rows become queryable only when their batch seals (provision.kql: 30 s)
            engine_options.setdefault("visibility_delay", 120.0)
        return cls(backend, serde=serde, **engine_options)

    def setup(self, create: bool = False) -> Any:
        """Check the database schema (``create=True``: run provision.kql first); raises a
        clear error listing what is missing. A no-op on the embedded store. Works with the
        saver open or not."""
        setup = getattr(self.backend, "setup", None)
        if setup is None:
            return None
        if self._portal is not None:
            return self._call(setup, create)
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

    def _call(self, fn: Any, *args: Any) -> Any:
        portal = self._portal
        if portal is None:
            raise RuntimeError("KustoSaver is not open: enter it with `with` first")
        return portal.call(fn, *args)

    def flush(self) -> None:
        """Return once every row accepted so far is in the backend."""
        self._call(self._flush)

    # -- sync API ----------------------------------------------------------

    def get_tuple(self, config: Any) -> CheckpointTuple | None:
        return self._call(self._get_tuple, config)  # type: ignore[no-any-return]

    def list(
        self,
        config: Any,
        *,
        filter: dict[str, Any] | None = None,
        before: Any = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        yield from self._call(self._list, config, filter, before, limit)

    def put(
        self,
        config: Any,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> dict[str, Any]:
        return self._call(self._put, config, checkpoint, metadata, new_versions)  # type: ignore[no-any-return]

    def put_writes(
        self, config: Any, writes: Sequence[tuple[str, Any]], task_id: str, task_path: str = ""
    ) -> None:
        self._call(self._put_writes, config, writes, task_id, task_path)

    def delete_thread(self, thread_id: str) -> None:
        self._call(self._delete_thread, thread_id)

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        self._call(self._delete_for_runs, run_ids)

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        self._call(self._copy_thread, source_thread_id, target_thread_id)

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        self._call(self._prune, thread_ids, strategy)

    # -- async API, from any event loop --------------------------------------

    async def _acall(self, fn: Any, *args: Any) -> Any:
        return await anyio.to_thread.run_sync(self._call, fn, *args)

    async def aget_tuple(self, config: Any) -> CheckpointTuple | None:
        return await self._acall(self._get_tuple, config)  # type: ignore[no-any-return]

    async def alist(
        self,
        config: Any,
        *,
        filter: dict[str, Any] | None = None,
        before: Any = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        for tup in await self._acall(self._list, config, filter, before, limit):
            yield tup

    async def aput(
        self,
        config: Any,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> dict[str, Any]:
        return await self._acall(self._put, config, checkpoint, metadata, new_versions)  # type: ignore[no-any-return]

    async def aput_writes(
        self, config: Any, writes: Sequence[tuple[str, Any]], task_id: str, task_path: str = ""
    ) -> None:
        await self._acall(self._put_writes, config, writes, task_id, task_path)

    async def adelete_thread(self, thread_id: str) -> None:
        await self._acall(self._delete_thread, thread_id)

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        await self._acall(self._delete_for_runs, run_ids)

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        await self._acall(self._copy_thread, source_thread_id, target_thread_id)

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        await self._acall(self._prune, thread_ids, strategy)
