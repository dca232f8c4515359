"""AsyncKustoSaver: the engine runs in the caller's event loop (``async with``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
from langgraph.checkpoint.base import (
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
)
from langgraph.checkpoint.serde.base import SerializerProtocol

from .base import KustoSaverBase
from .engine.backends.embedded import EmbeddedBackend


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

    @classmethod
    def embedded(
        cls, path: str = ":memory:", *, serde: SerializerProtocol | None = None, **options: Any
    ) -> AsyncKustoSaver:
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
    ) -> AsyncKustoSaver:
        """A saver on an Azure Data Explorer database (use it with ``async with``).

        ``credential``: an azure-identity TokenCredential (default DefaultAzureCredential),
        a KustoConnectionStringBuilder or a connection string; an ``http://`` cluster URI
        (a local endpoint) connects without authentication. See :class:`KustoBackend`.
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

    async def asetup(self, create: bool = False) -> Any:
        """Check the database schema (``create=True``: run provision.kql first); raises a
        clear error listing what is missing. A no-op on the embedded store."""
        setup = getattr(self.backend, "setup", None)
        if setup is None:
            return None
        return await setup(create=create)

    def setup(self, create: bool = False) -> Any:
        """:meth:`asetup` from sync code: from another thread while the saver is open,
        or with no event loop running when it is not."""
        if getattr(self.backend, "setup", None) is None:
            return None
        if self._token is not None:
            return self._run(self.asetup, create)
        return anyio.run(self.asetup, create)

    # -- lifecycle ---------------------------------------------------------

    async def __aenter__(self) -> AsyncKustoSaver:
        await self.engine.__aenter__()
        self._token = anyio.lowlevel.current_token()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self._token = None
        await self.engine.aclose()

    async def flush(self) -> None:
        """Return once every row accepted so far is in the backend."""
        await self._flush()

    # -- async API ---------------------------------------------------------

    async def aget_tuple(self, config: Any) -> CheckpointTuple | None:
        return await self._get_tuple(config)

    async def alist(
        self,
        config: Any,
        *,
        filter: dict[str, Any] | None = None,
        before: Any = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        for tup in await self._list(config, filter, before, limit):
            yield tup

    async def aput(
        self,
        config: Any,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> dict[str, Any]:
        return await self._put(config, checkpoint, metadata, new_versions)

    async def aput_writes(
        self, config: Any, writes: Sequence[tuple[str, Any]], task_id: str, task_path: str = ""
    ) -> None:
        await self._put_writes(config, writes, task_id, task_path)

    async def adelete_thread(self, thread_id: str) -> None:
        await self._delete_thread(thread_id)

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        await self._delete_for_runs(run_ids)

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        await self._copy_thread(source_thread_id, target_thread_id)

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        await self._prune(thread_ids, strategy)

    # -- sync API, from other threads --------------------------------------

    def _run(self, fn: Any, *args: Any) -> Any:
        if self._token is None:
            raise RuntimeError("AsyncKustoSaver is not open: enter it with `async with` first")
        try:
            anyio.lowlevel.current_token()
        except Exception:  # noqa: BLE001 - no loop in this thread: the expected case
            return anyio.from_thread.run(fn, *args, token=self._token)
        raise RuntimeError(
            "synchronous calls on AsyncKustoSaver are only allowed from a thread other than "
            "the event loop's; in async code use the a-methods (aget_tuple, aput...), "
            "or use KustoSaver"
        )

    def get_tuple(self, config: Any) -> CheckpointTuple | None:
        return self._run(self._get_tuple, config)  # type: ignore[no-any-return]

    def list(
        self,
        config: Any,
        *,
        filter: dict[str, Any] | None = None,
        before: Any = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        yield from self._run(self._list, config, filter, before, limit)

    def put(
        self,
        config: Any,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> dict[str, Any]:
        return self._run(self._put, config, checkpoint, metadata, new_versions)  # type: ignore[no-any-return]

    def put_writes(
        self, config: Any, writes: Sequence[tuple[str, Any]], task_id: str, task_path: str = ""
    ) -> None:
        self._run(self._put_writes, config, writes, task_id, task_path)

    def delete_thread(self, thread_id: str) -> None:
        self._run(self._delete_thread, thread_id)

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        self._run(self._delete_for_runs, run_ids)

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        self._run(self._copy_thread, source_thread_id, target_thread_id)

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        self._run(self._prune, thread_ids, strategy)


__all__ = ["AsyncKustoSaver"]
