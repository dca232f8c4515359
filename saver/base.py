"""What both savers share: option handling, and the saver methods as coroutines
that run in the event loop hosting the engine."""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping, Sequence
from typing import Any

from langgraph.checkpoint.base import (
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
)
from langgraph.checkpoint.serde.base import SerializerProtocol

from .engine import Engine, EngineConfig, agent_state
from .engine.agent_state import StateFunction
from .engine.backends.base import Backend
from .engine.backends.embedded import EmbeddedBackend
from .engine.errors import ConfigError, EngineClosedError
from .rows import (
    _utf8,
    decode_bundle,
    delta_history,
    encode_put,
    encode_writes,
    ids_of,
    metadata_matches,
    metadata_pushdown,
)
from .telemetry import Instruments

PRUNE_STRATEGIES = ("keep_latest", "delete")


def _ids(values: Any, what: str) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise ConfigError(f"{what} must be a list of strings, got {type(values).__name__}")
    out = []
    for v in values:
        if not isinstance(v, str):
            raise ConfigError(f"{what} must contain strings, got {type(v).__name__}")
        out.append(_utf8(v, what))
    return out


class KustoSaverBase(BaseCheckpointSaver[str]):
    """Shared by :class:`AsyncKustoSaver` and :class:`KustoSaver`."""

    engine: Engine

    def __init__(
        self,
        backend: Backend,
        *,
        serde: SerializerProtocol | None = None,
        meter_provider: Any = None,
        tracer_provider: Any = None,
        **options: Any,
    ) -> None:
        """``meter_provider`` / ``tracer_provider``: OpenTelemetry providers to report to
        (default: the global ones, i.e. the host's SDK, or no-op without one)."""
        super().__init__(serde=serde)
        self.options = EngineConfig.from_options(backend, **options)
        cap = getattr(backend, "max_value_size", None)
        if cap is not None and self.options.cell_limit > cap:
            raise ConfigError(
                f"cell_limit={self.options.cell_limit} is over the backend's largest string cell "
                f"({cap} characters: Kusto's MaxValueSize), and Kusto cuts a longer value without "
                "an error; keep cell_limit at or under it (default 1,000,000), or raise the payload "
                "columns' MaxValueSize with an encoding policy and pass KustoBackend(max_value_size=...)"
            )
        self.backend = backend
        self._inst = Instruments.for_backend(
            backend, meter_provider=meter_provider, tracer_provider=tracer_provider
        )
        self.engine = Engine(backend, self.options, instruments=self._inst)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r})"

    #: True once the saver's ``with`` / ``async with`` block has ended
    _closed = False

    def _not_open(self, block: str) -> EngineClosedError:
        """The error for a sync call made while the saver is not open (``block``: how it is entered)."""
        name = type(self).__name__
        if self._closed:
            return EngineClosedError(
                f"{name} is closed: it was used after its `{block}` block ended; "
                "create a new saver to use the store again"
            )
        return EngineClosedError(f"{name} is not open: use it inside `{block} saver:` (entering starts its engine)")

    # -- LangGraph's version scheme (the same as the Postgres saver's) ------

    def get_next_version(self, current: str | None, channel: None) -> str:
        if current is None:
            current_v = 0
        elif isinstance(current, int):
            current_v = current
        else:
            current_v = int(str(current).split(".")[0])
        return f"{current_v + 1:032}.{random.random():016}"

    # -- the operations, as coroutines in the engine's loop ------------------

    async def _get_tuple(self, config: Any) -> CheckpointTuple | None:
        tid, ns, cid = ids_of(config)
        assert tid is not None
        bundle = await self.engine.get(tid, ns, cid)
        return decode_bundle(self.serde, bundle) if bundle is not None else None

    async def _list(
        self, config: Any, filter: Mapping[str, Any] | None, before: Any, limit: int | None
    ) -> list[CheckpointTuple]:
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ConfigError(f"limit must be a non-negative integer or None, got {limit!r}")
        if filter is not None and not isinstance(filter, Mapping):
            raise ConfigError(f"filter must be a dict of metadata keys to values, got {type(filter).__name__}")
        if limit == 0:
            return []
        if config:  # None and {} both list every thread, as InMemorySaver's list does
            tid, _, cid = ids_of(config, thread_required=False)
            raw_ns = config["configurable"].get("checkpoint_ns")
            ns = raw_ns if isinstance(raw_ns, str) else None
        else:
            tid, ns, cid = None, None, None
        before_id = ids_of(before, thread_required=False)[2] if before else None
        bundles = await self.engine.list(
            tid, ns, checkpoint_id=cid, before=before_id, limit=None if filter else limit,
            metadata=metadata_pushdown(filter) if filter else (),
        )
        if filter:
            bundles = [b for b in bundles if metadata_matches(b, filter)]
            if limit is not None:
                bundles = bundles[:limit]
        return [decode_bundle(self.serde, b) for b in bundles]

    async def _delta_history(self, config: Any, channels: Sequence[str]) -> Mapping[str, Any]:
        if isinstance(channels, str) or not isinstance(channels, Sequence):
            raise ConfigError(f"channels must be a list of channel names, got {type(channels).__name__}")
        if not channels:
            return {}
        tid, ns, cid = ids_of(config)
        assert tid is not None
        chans = _ids(channels, "channels")
        heads, blobs, writes = await self.engine.delta_history(tid, ns, chans)
        return delta_history(self.serde, heads, blobs, writes, cid, chans)

    async def _put(
        self,
        config: Any,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> dict[str, Any]:
        records, next_config = encode_put(
            self.serde, config, checkpoint, metadata, new_versions, self.options.cell_limit,
            self.engine.clock.stamp,
        )
        await self.engine.put(records, operation="put")  # type: ignore[arg-type]
        return next_config

    async def _put_writes(
        self, config: Any, writes: Sequence[tuple[str, Any]], task_id: str, task_path: str = ""
    ) -> None:
        records = encode_writes(self.serde, config, writes, task_id, task_path, self.engine.clock.stamp)
        if records:
            await self.engine.put(records, operation="put_writes")  # type: ignore[arg-type]

    async def _delete_thread(self, thread_id: str) -> None:
        await self.engine.delete_threads(_ids([thread_id], "thread_id"))

    async def _delete_for_runs(self, run_ids: Sequence[str]) -> None:
        ids = _ids(run_ids, "run_ids")
        if ids:
            await self.engine.delete_runs(ids)

    async def _copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        src, dst = _ids([source_thread_id, target_thread_id], "thread ids")
        if src == dst:
            raise ConfigError("copy_thread needs two different thread ids")
        await self.engine.copy_thread(src, dst)

    async def _prune(self, thread_ids: Sequence[str], strategy: str) -> None:
        if strategy not in PRUNE_STRATEGIES:
            raise ConfigError(f"strategy must be one of {PRUNE_STRATEGIES}, got {strategy!r}")
        ids = _ids(thread_ids, "thread_ids")
        if ids:
            await self.engine.prune(ids, strategy)

    async def _flush(self) -> None:
        await self.engine.flush()

    # -- how each saver reaches the engine's loop (see the subclasses) --------

    def _blocking(self, fn: Any, *args: Any) -> Any:  # pragma: no cover - abstract
        """Run coroutine function ``fn`` in the engine's loop from sync code."""
        raise NotImplementedError

    def _in_loop(self, fn: Any, *args: Any) -> Awaitable[Any]:  # pragma: no cover - abstract
        """An awaitable that runs coroutine function ``fn`` in the engine's loop from async code
        (each saver operation runs in its span, ``Instruments.timed``)."""
        raise NotImplementedError

    # -- the BaseCheckpointSaver API, sync and async -------------------------

    def get_tuple(self, config: Any) -> CheckpointTuple | None:
        return self._blocking(self._inst.timed, "get_tuple", self._get_tuple, config)  # type: ignore[no-any-return]

    async def aget_tuple(self, config: Any) -> CheckpointTuple | None:
        return await self._in_loop(self._inst.timed, "get_tuple", self._get_tuple, config)  # type: ignore[no-any-return]

    def list(
        self,
        config: Any,
        *,
        filter: dict[str, Any] | None = None,
        before: Any = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        yield from self._blocking(self._inst.timed, "list", self._list, config, filter, before, limit)

    async def alist(
        self,
        config: Any,
        *,
        filter: dict[str, Any] | None = None,
        before: Any = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        for tup in await self._in_loop(self._inst.timed, "list", self._list, config, filter, before, limit):
            yield tup

    def get_delta_channel_history(self, *, config: Any, channels: Sequence[str]) -> Mapping[str, Any]:
        """What a ``DeltaChannel`` (LangGraph 1.2, beta) at ``config``'s checkpoint is
        rebuilt from: per channel, the writes since the nearest stored value on the
        parent chain, and that value (``seed``). One backend query, whatever the
        chain's length, instead of the base class's ``get_tuple`` per ancestor."""
        return self._blocking(self._inst.timed, "get_delta_channel_history", self._delta_history, config, channels)  # type: ignore[no-any-return]

    async def aget_delta_channel_history(self, *, config: Any, channels: Sequence[str]) -> Mapping[str, Any]:
        return await self._in_loop(self._inst.timed, "get_delta_channel_history", self._delta_history, config, channels)  # type: ignore[no-any-return]

    def put(
        self,
        config: Any,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> dict[str, Any]:
        return self._blocking(self._inst.timed, "put", self._put, config, checkpoint, metadata, new_versions)  # type: ignore[no-any-return]

    async def aput(
        self,
        config: Any,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> dict[str, Any]:
        return await self._in_loop(self._inst.timed, "put", self._put, config, checkpoint, metadata, new_versions)  # type: ignore[no-any-return]

    def put_writes(
        self, config: Any, writes: Sequence[tuple[str, Any]], task_id: str, task_path: str = ""
    ) -> None:
        self._blocking(self._inst.timed, "put_writes", self._put_writes, config, writes, task_id, task_path)

    async def aput_writes(
        self, config: Any, writes: Sequence[tuple[str, Any]], task_id: str, task_path: str = ""
    ) -> None:
        await self._in_loop(self._inst.timed, "put_writes", self._put_writes, config, writes, task_id, task_path)

    def delete_thread(self, thread_id: str) -> None:
        self._blocking(self._inst.timed, "delete_thread", self._delete_thread, thread_id)

    async def adelete_thread(self, thread_id: str) -> None:
        await self._in_loop(self._inst.timed, "delete_thread", self._delete_thread, thread_id)

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        self._blocking(self._inst.timed, "delete_for_runs", self._delete_for_runs, run_ids)

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        await self._in_loop(self._inst.timed, "delete_for_runs", self._delete_for_runs, run_ids)

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        self._blocking(self._inst.timed, "copy_thread", self._copy_thread, source_thread_id, target_thread_id)

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        await self._in_loop(self._inst.timed, "copy_thread", self._copy_thread, source_thread_id, target_thread_id)

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        self._blocking(self._inst.timed, "prune", self._prune, thread_ids, strategy)

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        await self._in_loop(self._inst.timed, "prune", self._prune, thread_ids, strategy)

    # -- agent state: the stored functions' questions (docs/agent-state.md) -----

    async def _state(self, function: StateFunction, params: dict[str, Any]) -> list[dict[str, Any]]:
        return await self.engine.agent_state(function, params)

    def threads(self) -> list[dict[str, Any]]:
        """Live threads, most recently active first: ``thread_id, first_at, last_at,
        checkpoints, namespaces, steps, runs, bytes`` (``LangGraphThreads()``)."""
        return self._blocking(self._inst.timed, "threads", self._state, agent_state.THREADS, {})  # type: ignore[no-any-return]

    async def athreads(self) -> list[dict[str, Any]]:
        return await self._in_loop(self._inst.timed, "threads", self._state, agent_state.THREADS, {})  # type: ignore[no-any-return]

    def thread_history(self, thread_id: str) -> list[dict[str, Any]]:
        """One thread's visible checkpoints, oldest first: ``checkpoint_ns, checkpoint_id,
        parent_checkpoint_id, step, source, run_id, written_at, writes, write_channels``
        (``LangGraphThreadHistory(thread)``)."""
        params = {"thread": _ids([thread_id], "thread_id")[0]}
        return self._blocking(self._inst.timed, "thread_history", self._state, agent_state.THREAD_HISTORY, params)  # type: ignore[no-any-return]

    async def athread_history(self, thread_id: str) -> list[dict[str, Any]]:
        params = {"thread": _ids([thread_id], "thread_id")[0]}
        return await self._in_loop(self._inst.timed, "thread_history", self._state, agent_state.THREAD_HISTORY, params)  # type: ignore[no-any-return]

    def runs(self) -> list[dict[str, Any]]:
        """Runs, oldest first: ``thread_id, run_id, started_at, ended_at, duration,
        checkpoints, steps, outcome`` (``"error"``, ``"interrupted"`` or ``"ok"``;
        ``LangGraphRuns()``)."""
        return self._blocking(self._inst.timed, "runs", self._state, agent_state.RUNS, {})  # type: ignore[no-any-return]

    async def aruns(self) -> list[dict[str, Any]]:
        return await self._in_loop(self._inst.timed, "runs", self._state, agent_state.RUNS, {})  # type: ignore[no-any-return]

    def forks(self) -> list[dict[str, Any]]:
        """Checkpoints with two or more visible children: ``thread_id, checkpoint_ns,
        checkpoint_id, children, child_ids`` (``LangGraphForks()``)."""
        return self._blocking(self._inst.timed, "forks", self._state, agent_state.FORKS, {})  # type: ignore[no-any-return]

    async def aforks(self) -> list[dict[str, Any]]:
        return await self._in_loop(self._inst.timed, "forks", self._state, agent_state.FORKS, {})  # type: ignore[no-any-return]

    def storage(self) -> list[dict[str, Any]]:
        """Stored rows and payload size per thread, table and channel: ``thread_id,
        table_name, channel, rows, bytes`` (``LangGraphStorage()``)."""
        return self._blocking(self._inst.timed, "storage", self._state, agent_state.STORAGE, {})  # type: ignore[no-any-return]

    async def astorage(self) -> list[dict[str, Any]]:
        return await self._in_loop(self._inst.timed, "storage", self._state, agent_state.STORAGE, {})  # type: ignore[no-any-return]

    def expiring(self, ttl: dt.timedelta | float | None = None) -> list[dict[str, Any]]:
        """Live threads by when ``ttl`` (default: the saver's ``ttl`` option) would
        expire them, soonest first: ``thread_id, last_at, expires_at``
        (``LangGraphExpiring(ttl)``)."""
        params = {"ttl": self._ttl_param(ttl)}
        return self._blocking(self._inst.timed, "expiring", self._state, agent_state.EXPIRING, params)  # type: ignore[no-any-return]

    async def aexpiring(self, ttl: dt.timedelta | float | None = None) -> list[dict[str, Any]]:
        params = {"ttl": self._ttl_param(ttl)}
        return await self._in_loop(self._inst.timed, "expiring", self._state, agent_state.EXPIRING, params)  # type: ignore[no-any-return]

    def _ttl_param(self, ttl: dt.timedelta | float | None) -> dt.timedelta:
        if ttl is None:
            if self.engine.config.ttl is None:
                raise ConfigError("expiring() needs a ttl: pass one, or open the saver with the ttl option")
            return dt.timedelta(seconds=self.engine.config.ttl)
        if isinstance(ttl, dt.timedelta):
            seconds = ttl.total_seconds()
        elif isinstance(ttl, (int, float)) and not isinstance(ttl, bool):
            seconds = float(ttl)
        else:
            raise ConfigError(f"ttl must be a timedelta or seconds, got {type(ttl).__name__}")
        if not seconds > 0 or seconds == float("inf"):
            raise ConfigError(f"ttl must be a positive duration, got {ttl!r}")
        return dt.timedelta(seconds=seconds)

    # -- construction on either store ----------------------------------------

    @classmethod
    def embedded(
        cls, path: str = ":memory:", *, serde: SerializerProtocol | None = None, **options: Any
    ) -> Any:
        """A saver on the embedded DuckDB store at ``path`` (a file, or ``":memory:"``)."""
        return cls(EmbeddedBackend(path), serde=serde, **options)

    @classmethod
    def from_connection_string(
        cls,
        cluster_uri: str | None = None,
        database: str | None = None,
        *,
        credential: Any = None,
        ingest_mode: str = "streaming",
        query_timeout: float = 60.0,
        command_timeout: float = 600.0,
        ingest_uri: str | None = None,
        serde: SerializerProtocol | None = None,
        **engine_options: Any,
    ) -> Any:
        """A saver on an Azure Data Explorer database.

        ``credential``: an azure-identity TokenCredential (default DefaultAzureCredential),
        a KustoConnectionStringBuilder or a connection string; an ``http://`` cluster URI
        (a local endpoint) connects without authentication. ``ingest_mode``: "streaming"
        (default), "managed", "queued" or "inline" (the Kusto emulator). Other keywords
        are engine options (:class:`EngineConfig`); ``ingest_concurrency`` defaults to
        6 on Kusto (streaming ingestion's per-core limit, docs/kusto.md).
        ``query_timeout`` / ``command_timeout``: seconds, at most 3600 (the service's
        longest request). See :class:`KustoBackend`.
        """
        from .engine.backends.kusto import KustoBackend

        backend = KustoBackend(
            cluster_uri, database, credential=credential, ingest_mode=ingest_mode,
            query_timeout=query_timeout, command_timeout=command_timeout, ingest_uri=ingest_uri,
        )
        if ingest_mode in ("managed", "queued"):
            # queued rows become queryable only when their batch seals (provision.kql: 30 s);
            # the managed client queues a batch when streaming it keeps failing
            engine_options.setdefault("visibility_delay", 120.0)
        return cls(backend, serde=serde, **engine_options)
