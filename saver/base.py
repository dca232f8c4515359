"""What both savers share: option handling, and the saver methods as coroutines
that run in the event loop hosting the engine."""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

from langgraph.checkpoint.base import (
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    get_checkpoint_id,
)
from langgraph.checkpoint.serde.base import SerializerProtocol

from .engine import Engine, EngineConfig
from .engine.backends.base import Backend
from .engine.errors import ConfigError
from .rows import (
    decode_bundle,
    encode_put,
    encode_writes,
    ids_of,
    metadata_matches,
    thread_id_of,
)
from .telemetry import Instruments, names

PRUNE_STRATEGIES = ("keep_latest", "delete")


def _ids(values: Any, what: str) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise ConfigError(f"{what} must be a list of strings, got {type(values).__name__}")
    out = []
    for v in values:
        if not isinstance(v, str):
            raise ConfigError(f"{what} must contain strings, got {type(v).__name__}")
        out.append(v)
    return out


class KustoSaverBase(BaseCheckpointSaver[str]):
    """Shared by :class:`AsyncKustoSaver` and :class:`KustoSaver`."""

    engine: Engine

    def __init__(
        self,
        backend: Backend,
        *,
        serde: SerializerProtocol | None = None,
        **options: Any,
    ) -> None:
        super().__init__(serde=serde)
        self.options = EngineConfig.from_options(**options)
        self.backend = backend
        self.engine = Engine(backend, self.options)
        self._inst: Instruments = self.engine.instruments

    # -- LangGraph's version scheme (the same as the Postgres saver's) ------

    def get_next_version(self, current: str | None, channel: None) -> str:
        if current is None:
            current_v = 0
        elif isinstance(current, int):
            current_v = current
        else:
            current_v = int(str(current).split(".")[0])
        return f"{current_v + 1:032}.{random.random():016}"

    # -- telemetry around every saver call ---------------------------------

    def _span(self, op: str, **attrs: Any) -> Any:
        return self._inst.tracer.start_as_current_span(
            op, attributes=self._inst.attrs(**{names.DB_OPERATION_NAME: op}, **attrs)
        )

    def _done(self, op: str, started: float, error: BaseException | None = None) -> None:
        attrs = {names.DB_OPERATION_NAME: op}
        if error is not None:
            attrs[names.ERROR_TYPE] = type(error).__name__
        self._inst.operation_duration.record(time.perf_counter() - started, self._inst.attrs(**attrs))

    # -- the operations, as coroutines in the engine's loop ------------------

    async def _get_tuple(self, config: Any) -> CheckpointTuple | None:
        started = time.perf_counter()
        with self._span("get_tuple"):
            try:
                tid, ns, cid = ids_of(config)
                assert tid is not None
                bundle = await self.engine.get(tid, ns, cid)
                result = decode_bundle(self.serde, bundle) if bundle is not None else None
            except BaseException as exc:
                self._done("get_tuple", started, exc)
                raise
        self._done("get_tuple", started)
        return result

    async def _list(
        self,
        config: Any,
        filter: Mapping[str, Any] | None,
        before: Any,
        limit: int | None,
    ) -> list[CheckpointTuple]:
        started = time.perf_counter()
        with self._span("list"):
            try:
                result = await self._list_inner(config, filter, before, limit)
            except BaseException as exc:
                self._done("list", started, exc)
                raise
        self._done("list", started)
        return result

    async def _list_inner(
        self, config: Any, filter: Mapping[str, Any] | None, before: Any, limit: int | None
    ) -> list[CheckpointTuple]:
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ConfigError(f"limit must be a non-negative integer or None, got {limit!r}")
        if filter is not None and not isinstance(filter, Mapping):
            raise ConfigError(f"filter must be a dict of metadata keys to values, got {type(filter).__name__}")
        if limit == 0:
            return []
        if config is not None:
            tid, _, cid = ids_of(config, thread_required=False)
            raw_ns = config["configurable"].get("checkpoint_ns")
            ns = raw_ns if isinstance(raw_ns, str) else None
        else:
            tid, ns, cid = None, None, None
        before_id = get_checkpoint_id(before) if before else None
        bundles = await self.engine.list(
            tid, ns, checkpoint_id=cid, before=before_id, limit=None if filter else limit
        )
        if filter:
            bundles = [b for b in bundles if metadata_matches(b, filter)]
            if limit is not None:
                bundles = bundles[:limit]
        return [decode_bundle(self.serde, b) for b in bundles]

    async def _put(
        self,
        config: Any,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> dict[str, Any]:
        started = time.perf_counter()
        with self._span("put"):
            try:
                records, next_config = encode_put(
                    self.serde, config, checkpoint, metadata, new_versions, self.options.cell_limit
                )
                await self.engine.put(records, operation="put")  # type: ignore[arg-type]
            except BaseException as exc:
                self._done("put", started, exc)
                raise
        self._done("put", started)
        return next_config

    async def _put_writes(
        self, config: Any, writes: Sequence[tuple[str, Any]], task_id: str, task_path: str = ""
    ) -> None:
        started = time.perf_counter()
        with self._span("put_writes"):
            try:
                records = encode_writes(self.serde, config, writes, task_id, task_path)
                if records:
                    await self.engine.put(records, operation="put_writes")  # type: ignore[arg-type]
            except BaseException as exc:
                self._done("put_writes", started, exc)
                raise
        self._done("put_writes", started)

    async def _delete_thread(self, thread_id: str) -> None:
        await self._timed("delete_thread", self.engine.delete_threads(_ids([thread_id], "thread_id")))

    async def _delete_for_runs(self, run_ids: Sequence[str]) -> None:
        ids = _ids(run_ids, "run_ids")
        if ids:
            await self._timed("delete_for_runs", self.engine.delete_runs(ids))

    async def _copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        src, dst = _ids([source_thread_id, target_thread_id], "thread ids")
        if src == dst:
            raise ConfigError("copy_thread needs two different thread ids")
        await self._timed("copy_thread", self.engine.copy_thread(src, dst))

    async def _prune(self, thread_ids: Sequence[str], strategy: str) -> None:
        if strategy not in PRUNE_STRATEGIES:
            raise ConfigError(f"strategy must be one of {PRUNE_STRATEGIES}, got {strategy!r}")
        ids = _ids(thread_ids, "thread_ids")
        if ids:
            await self._timed("prune", self.engine.prune(ids, strategy))

    async def _timed(self, op: str, coro: Any) -> Any:
        started = time.perf_counter()
        with self._span(op):
            try:
                result = await coro
            except BaseException as exc:
                self._done(op, started, exc)
                raise
        self._done(op, started)
        return result

    async def _flush(self) -> None:
        await self.engine.flush()


def thread_of(config: Any) -> str:
    return thread_id_of(config)
