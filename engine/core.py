"""The engine: wires mailboxes, actors and the supervisor, and is what the saver calls.

Every public coroutine here runs in the *caller's* task: it builds messages
(records are already encoded by the saver), sends them, and awaits the reply.
Nothing else: the actors own all state. (A send to an idle query cache may run
the cache's handler right there, in the caller's task: direct dispatch, see
:meth:`.mailbox.Mailbox.send_nowait`; the cache's state still sees one message
at a time.)
"""

from __future__ import annotations

import contextlib
import time
from contextlib import AsyncExitStack
from typing import Any

import anyio
import orjson

from ..telemetry import Instruments, names
from ..telemetry.instruments import capture
from . import agent_state, interpreter, kql
from .actor import Crash
from .actors.batcher import Batcher, BatcherState, ticker
from .actors.deleter import Deleter, make_put
from .actors.ingestor import Ingestor, IngestorState
from .actors.query_cache import Overlay, QueryCache
from .agent_state import StateFunction
from .backends.base import Backend
from .clock import ThreadClock
from .config import EngineConfig
from .errors import EngineClosedError, EngineFailedError, IngestError, PutTimeoutError, UsageError
from .messages import Accept, CopyThread, DeleteRuns, DeleterState, DeleteThreads, Flush, Prune, Put, Read, ReadSpec, Touch
from .reads import ask, checkpoint_from_row, delta_walk, values_from_rows
from .records import BlobRec, Bundle, CheckpointRec, Record, WriteRec, newer_write, now_us
from .retry import retrying
from .runtime import Runtime
from .spool import EMPTY_STATS, Spool, spool_dir_for
from .supervisor import ChildSpec, Supervisor

_NO_TIMEOUT = contextlib.nullcontext()

#: start order; rest_for_one restarts an actor and every actor after it
ACTORS = ("cache", "ingestor", "batcher", "deleter")


class Engine:
    def __init__(
        self,
        backend: Backend,
        config: EngineConfig | None = None,
        *,
        instruments: Instruments | None = None,
    ) -> None:
        self.config = (config or EngineConfig()).for_backend(backend)
        #: stamps rows so that every host orders a thread's rows the same way
        self.clock = ThreadClock()
        self.backend = backend
        self.instruments = instruments or Instruments(
            db_system=getattr(backend, "name", "kusto"),
            db_namespace=getattr(backend, "database", "") or "",
        )
        self.runtime: Runtime | None = None
        self.supervisor: Supervisor | None = None
        self._stack: AsyncExitStack | None = None
        self._closing = False
        self._states: dict[str, Any] = {}
        self._children: dict[str, ChildSpec] = {}
        self.restarts: dict[str, int] = {name: 0 for name in ACTORS}
        # durability="spool" (engine/spool.py); in the other modes a spool left by an
        # earlier run in the same place is still replayed
        spool_dir = spool_dir_for(self.config, backend)
        self.spool = (
            Spool(spool_dir, segment_bytes=self.config.spool_segment_bytes, writing=self.config.durability == "spool")
            if spool_dir is not None
            else None
        )

    # -- lifecycle ---------------------------------------------------------

    async def __aenter__(self) -> Engine:
        if self._stack is not None:
            raise UsageError("the saver is already open: enter it once (`with` / `async with`), or use a new saver")
        cfg = self.config
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            for setting, value in interpreter.asked_for(cfg):  # process-wide, held while open
                setting.acquire(value)
                stack.callback(setting.release, value)
            await self.backend.open()
            stack.push_async_callback(self.backend.close)
            rt = Runtime(cfg, self.backend, self.instruments, expiries=cfg.ttl is not None)
            rt.clock = self.clock
            rt.query_limiter = anyio.CapacityLimiter(cfg.query_concurrency)
            for name in ACTORS:
                # the ingestor's queue is part of the memory bound: ingest_queue_size batches
                size = cfg.ingest_queue_size if name == "ingestor" else cfg.mailbox_size
                rt.mailboxes[name] = _mailbox(name, size)
            for name in ("batcher", "cache"):  # room there may admit a waiting put
                rt.mailboxes[name].on_room = rt.admission.poke
            self.runtime = rt
            spool = self.spool if self.spool is not None and await self.spool.open() else None
            if spool is not None:  # spool hook: closed after the task group (its writer) ends
                stack.push_async_callback(spool.close, trim=False)
                rt.spool = spool if spool.writing else None
            self._states = {
                "cache": Overlay(),
                "ingestor": IngestorState(),
                "batcher": BatcherState(),
                "deleter": DeleterState(),
            }
            classes = {"cache": QueryCache, "ingestor": Ingestor, "batcher": Batcher, "deleter": Deleter}

            def factory(name: str) -> Any:
                return lambda: classes[name](rt, rt.mailboxes[name], self._states[name])

            self._children = {name: ChildSpec(name, factory(name)) for name in ACTORS}
            self.supervisor = Supervisor(
                [self._children[n] for n in ACTORS],
                strategy=cfg.supervision,
                max_restarts=cfg.max_restarts,
                window=cfg.restart_window,
                on_restart=self._on_restart,
                on_escalate=rt.fail,
            )
            tg = await stack.enter_async_context(anyio.create_task_group())
            await tg.start(self.supervisor.run)
            tg.start_soon(ticker, rt, max(cfg.flush_interval / 2, 0.001))
            if spool is not None:  # spool hook: the writer, then replay before any new put
                tg.start_soon(spool.run)
                try:
                    await spool.replay(rt)
                except BaseException:
                    tg.cancel_scope.cancel()
                    raise
            self._register_gauges()
        except BaseException:
            await stack.__aexit__(None, None, None)
            raise
        self._stack = stack
        self._tg = tg
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        stack, self._stack = self._stack, None
        if stack is None:
            return
        rt = self.runtime
        assert rt is not None
        self._closing = True
        try:
            if rt.failure is None:
                with anyio.CancelScope(shield=True):
                    try:
                        await self._flush()
                    except Exception:  # noqa: BLE001 - reported below through ingest_errors
                        pass
                    for group in (("deleter", "batcher"), ("ingestor",), ("cache",)):
                        for name in group:
                            rt.mailboxes[name].close()
                        for name in group:
                            await self._children[name].stopped.wait()
                    if self.spool is not None:  # spool hook: delete what is ingested
                        await self.spool.close(trim=True)
            self._tg.cancel_scope.cancel()
        finally:
            self.instruments.clear_gauges()
            await stack.__aexit__(None, None, None)
        if rt.failure is None and rt.ingest_errors:
            errors, rt.ingest_errors = rt.ingest_errors, []
            raise IngestError(
                f"{len(errors)} batch(es) could not be ingested; first error: {errors[0]}"
            ) from errors[0]

    def _on_restart(self, actor: str, error: BaseException) -> None:
        self.restarts[actor] = self.restarts.get(actor, 0) + 1
        inst = self.instruments
        inst.actor_restarts.add(1, inst.attrs(**{names.ACTOR: actor, names.ERROR_TYPE: type(error).__name__}))

    def _check(self) -> Runtime:
        rt = self.runtime
        if rt is None or self._stack is None:
            if self._closing:
                raise EngineClosedError(
                    "the saver is closed: it was used after its `with` / `async with` block ended; "
                    "create a new saver to use the store again"
                )
            raise EngineClosedError("the saver is not open: use it inside `with` / `async with`")
        if rt.failure is not None:
            raise rt.failure
        if self._closing:
            raise EngineClosedError("the saver is closing or closed")
        return rt

    async def _send(self, rt: Runtime, actor: str, msg: Any) -> None:
        try:
            await rt.mailboxes[actor].send(msg)
        except EngineClosedError:
            if rt.failure is not None:
                raise rt.failure from None
            raise

    async def _ask(self, rt: Runtime, actor: str, msg: Any) -> Any:
        await self._send(rt, actor, msg)
        return await msg.reply.wait()

    # -- writes ------------------------------------------------------------

    async def put(self, records: list[Record], *, operation: str = "put") -> None:
        """Accept a put's records.

        The fast path: when both the cache's and the batcher's mailboxes have room
        and the bytes queued for the batcher stay within its share of the memory
        bound, the records go to the query cache (overlay) and to the batcher with
        two non-blocking sends and no yield in between, so the put is applied to
        both or to neither, and no reply is awaited. A read sent afterwards reaches
        the cache's FIFO behind the ``Accept``: read-your-writes holds.
        A put that finds no room (backpressure) waits in the admission queue
        (:class:`~.mailbox.Admission`), in arrival order, until there is room; whoever
        makes the room hands it over the fast way on its behalf, then wakes it; while
        anyone waits there, later puts queue behind them. With durability="spool" a
        put instead goes through the batcher, which admits it to the spool, and waits
        for the cache's reply and the fsync (that engine takes no fast-path put:
        nothing else is queued ahead of it).
        """
        rt = self._check()
        cfg = rt.config
        ingested = rt.reply() if cfg.durability == "ingested" else None
        batcher = rt.mailboxes["batcher"]
        try:
            with anyio.fail_after(cfg.put_timeout) if cfg.put_timeout is not None else _NO_TIMEOUT:
                msg = make_put(rt, records, None, ticket_reply=ingested)
                nbytes = msg.nbytes
                if rt.spool is None:
                    if rt.admission or not self._room(nbytes):
                        started = time.perf_counter()
                        # bound methods and the message, no closure: thousands of puts may
                        # wait here at once, and each object they hold is the GC's to walk
                        if await rt.admission.wait(self._room_for, self._hand_over, msg):
                            waited = time.perf_counter() - started
                            rt.puts_waited += 1
                            rt.put_wait_s += waited
                            inst = self.instruments
                            inst.backpressure_wait.record(waited, inst.bound(names.DB_OPERATION_NAME, operation))
                    else:
                        self._hand_over(msg)
                else:
                    msg.reply = rt.reply()
                    started = time.perf_counter()
                    full = not batcher.has_room()
                    msg.waited = True
                    await self._send(rt, "batcher", msg)
                    waited = time.perf_counter() - started
                    if full:
                        rt.puts_waited += 1
                        rt.put_wait_s += waited
                    inst = self.instruments
                    inst.backpressure_wait.record(waited, inst.bound(names.DB_OPERATION_NAME, operation))
                    await msg.reply.wait()  # type: ignore[union-attr]
                if ingested is not None:
                    await ingested.wait()
        except TimeoutError:
            waited_for = {
                "memory": "accepted",
                "spool": "accepted and on the spool",
                "ingested": "acknowledged by the backend",
            }.get(cfg.durability, "accepted")
            raise PutTimeoutError(
                f"{operation} was not {waited_for} within put_timeout={cfg.put_timeout}s "
                f"(durability={cfg.durability!r}; the backend is slow or stalled, or the engine's buffers are full)"
            ) from None

    def _hand_over(self, msg: Put) -> None:
        """The fast path, once ``_room`` holds (no yield since): the put's records to the
        query cache and the put to the batcher; both sends succeed, or both raise (closed)."""
        rt = self.runtime
        assert rt is not None
        batcher = rt.mailboxes["batcher"]
        cache = rt.mailboxes["cache"]
        if batcher.closed or cache.closed:
            self._check()
            raise EngineClosedError("the saver is closing or closed")
        msg.accepted = msg.queued = True
        self._states["batcher"].queued_bytes += msg.nbytes
        cache.send_nowait(Accept(msg.records, None, msg.update_views))
        batcher.send_nowait(msg)

    def _room_for(self, msg: Put) -> bool:
        return self._room(msg.nbytes)

    def _room(self, nbytes: int) -> bool:
        """Whether a put of ``nbytes`` can take the fast path now (or the engine is
        closing, and the send raises)."""
        rt = self.runtime
        assert rt is not None
        batcher = rt.mailboxes["batcher"]
        cache = rt.mailboxes["cache"]
        b: BatcherState = self._states["batcher"]
        held = b.queued_bytes + b.buffered_bytes
        return (
            batcher.has_room() and cache.has_room()
            # one put larger than the whole share goes alone, into an empty buffer
            and (held + nbytes <= rt.config.batcher_buffer_bytes or held == 0)
        ) or batcher.closed or cache.closed

    # -- reads -------------------------------------------------------------

    async def get(self, thread_id: str, checkpoint_ns: str, checkpoint_id: str | None) -> Bundle | None:
        bundle = await self._get(thread_id, checkpoint_ns, checkpoint_id)
        if bundle is not None and self.config.touch_every is not None:
            self._touch(bundle.checkpoint)
        return bundle

    def _touch(self, c: CheckpointRec) -> None:
        """ttl_refresh_on_read: tell the deleter this thread was read (it writes a touch
        at most once per ttl / 10). Best effort: a full mailbox drops it."""
        rt = self.runtime
        if rt is None:
            return
        with contextlib.suppress(anyio.WouldBlock, EngineClosedError):
            rt.mailboxes["deleter"].send_nowait(Touch(c.thread_id, c.checkpoint_ns, c.checkpoint_id))

    async def _get(self, thread_id: str, checkpoint_ns: str, checkpoint_id: str | None) -> Bundle | None:
        rt = self._check()
        spec = ReadSpec((thread_id,), checkpoint_ns, checkpoint_id, latest=True)
        return await self._ask(rt, "cache", Read(spec, rt.reply()))  # type: ignore[no-any-return]

    async def list(
        self,
        thread_id: str | None,
        checkpoint_ns: str | None,
        *,
        checkpoint_id: str | None = None,
        before: str | None = None,
        limit: int | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> list[Bundle]:
        """``metadata``: (key, text) pairs the backend matches on the checkpoints'
        metadata (a superset of the caller's exact filter: ``tostring`` of the value)."""
        rt = self._check()
        spec = ReadSpec(
            (thread_id,) if thread_id is not None else None,
            checkpoint_ns,
            checkpoint_id,
            before,
            limit,
            metadata=metadata,
        )
        return await self._ask(rt, "cache", Read(spec, rt.reply()))  # type: ignore[no-any-return]

    async def delta_history(
        self, thread_id: str, checkpoint_ns: str, channels: list[str]
    ) -> tuple[dict[str, CheckpointRec], dict[tuple[str, str], BlobRec], dict[str, list[WriteRec]]]:
        """What the walk of ``get_delta_channel_history`` reads, in one backend query
        (``kql.DELTA_HISTORY_QUERY``), merged with this process's overlay as every
        read is: the visible checkpoints of (thread, namespace) by id (parent link,
        channel versions; no metadata, no payload), the stored values of ``channels`` by
        (channel, version) ("empty" ones left out), and the complete pending writes to
        ``channels`` by checkpoint id. Tombstones, the backend's and the overlay's, hide
        what they cover.
        """
        rt = self._check()
        # a barrier in the cache's FIFO: every put accepted before this call is in the overlay
        await self._ask(rt, "cache", Accept([], rt.reply(), False))
        ov: Overlay = self._states["cache"]
        # the query's start epoch holds back the overlay's release of anything the backend
        # acknowledges from now on, until the overlay is merged below (QueryCache._purge)
        epoch = ov.epoch
        ov.inflight[epoch] += 1
        try:
            params = {
                "tids": [thread_id], "all_threads": False, "ns": checkpoint_ns, "any_ns": False, "cid": "",
                "channels": sorted(set(channels)),
            }
            limiter = rt.query_limiter
            assert limiter is not None
            async with limiter:
                rows = await ask(rt, capture(), names.SPAN_QUERY_VALUES, kql.delta_history_query, params)
            heads: dict[str, CheckpointRec] = {}
            value_rows = []
            for r in rows:
                if r["kind_"] == "checkpoint":
                    rec = checkpoint_from_row(r)
                    heads[rec.checkpoint_id] = rec
                else:
                    value_rows.append(r)
            b_blobs, b_writes = values_from_rows(value_rows)
            wanted = set(channels)
            for (ns, cid), rec in ov.ck.get(thread_id, {}).items():
                if ns == checkpoint_ns:
                    heads[cid] = rec
            heads = {cid: rec for cid, rec in heads.items() if not ov.covered(rec)}
            blobs: dict[tuple[str, str], BlobRec] = {}
            for (_, _, ch, ver), b in b_blobs.items():
                blobs[(ch, ver)] = b
            for (ns, ch, ver), b in ov.blobs.get(thread_id, {}).items():
                if ns == checkpoint_ns and ch in wanted and b.payload_type != "empty":
                    blobs[(ch, ver)] = b
            blobs = {k: b for k, b in blobs.items() if not ov.row_covered(thread_id, b.written_at)}
            merged: dict[tuple[str, str, int], WriteRec] = {
                (w.checkpoint_id, w.task_id, w.idx): w for w in b_writes.values()
            }
            for (ns, cid, task, idx), w in ov.writes.get(thread_id, {}).items():
                if ns == checkpoint_ns and w.channel in wanted:
                    old = merged.get((cid, task, idx))
                    merged[(cid, task, idx)] = w if old is None else newer_write(old, w)
            writes: dict[str, list[WriteRec]] = {}
            for w in merged.values():
                if w.complete and w.channel in wanted and not ov.row_covered(thread_id, w.written_at):
                    writes.setdefault(w.checkpoint_id, []).append(w)
            return heads, blobs, writes
        finally:
            ov.inflight[epoch] -= 1
            if ov.inflight[epoch] <= 0:
                del ov.inflight[epoch]

    # -- agent state ---------------------------------------------------------

    async def agent_state(self, function: StateFunction, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Ask the backend one agent-state question (engine/agent_state.py), after a flush:
        the answer covers every row this process accepted before the call, and what other
        processes had ingested."""
        rt = self._check()
        await self._flush()
        limiter = rt.query_limiter
        assert limiter is not None
        text = agent_state.query(function)
        async with limiter:
            rows = await self.instruments.query(
                capture(), names.SPAN_QUERY_STATE.format(function=function.name),
                retrying(rt.config, lambda: rt.backend.query(text, params)),
            )
        return agent_state.plain_rows(function, rows)

    # -- deletes -----------------------------------------------------------

    async def delete_threads(self, thread_ids: list[str]) -> None:
        rt = self._check()
        await self._ask(rt, "deleter", DeleteThreads(thread_ids, rt.reply()))

    async def delete_runs(self, run_ids: list[str]) -> None:
        rt = self._check()
        await self._ask(rt, "deleter", DeleteRuns(run_ids, rt.reply()))

    async def prune(self, thread_ids: list[str], strategy: str) -> None:
        rt = self._check()
        keep = await self._delta_chains(thread_ids) if strategy == "keep_latest" else frozenset()
        await self._ask(rt, "deleter", Prune(thread_ids, strategy, rt.reply(), keep))

    async def _delta_chains(self, thread_ids: list[str]) -> frozenset[tuple[str, str, str]]:
        """What keep_latest must keep besides each namespace's latest checkpoint: for the
        DeltaChannels of that checkpoint (LangGraph names them, with their updates since
        their last snapshot, in its metadata's ``counters_since_delta_snapshot``) that
        hold no stored value there, the parent chain back to the nearest checkpoint that
        holds one (a ``_DeltaSnapshot``), that one included: its writes replay too.
        Namespaces without such channels cost one read of their latest checkpoint (the
        query cache may answer it) and no more. A namespace whose latest checkpoint
        is not readable yet (a value still being ingested) keeps everything."""
        rt = self._check()
        heads = await self._ask(rt, "cache", Read(ReadSpec(tuple(thread_ids), None, with_values=False), rt.reply()))
        latest: dict[tuple[str, str], str] = {}
        for b in heads:  # newest first (written_at, then id)
            c = b.checkpoint
            latest.setdefault((c.thread_id, c.checkpoint_ns), c.checkpoint_id)
        keep: set[tuple[str, str, str]] = set()
        for (tid, ns), cid in latest.items():
            bundle = await self.get(tid, ns, cid)
            if bundle is None:
                keep.update(b.checkpoint.key for b in heads if (b.checkpoint.thread_id, b.checkpoint.checkpoint_ns) == (tid, ns))
                continue
            c = bundle.checkpoint
            counters = orjson.loads(c.metadata_json).get("counters_since_delta_snapshot") or {}
            replayed = []
            for ch in counters:
                ver = c.channel_versions.get(ch)
                blob = bundle.blobs.get((ch, ver)) if ver is not None else None
                if ver is not None and (blob is None or blob.payload_type == "empty"):
                    replayed.append(ch)
            if not replayed:
                continue
            chain_heads, blobs, _ = await self.delta_history(tid, ns, replayed)
            chain, _ = delta_walk(chain_heads, blobs, cid, replayed)
            keep.update((tid, ns, x) for x in chain)
        return frozenset(keep)

    async def copy_thread(self, source: str, target: str) -> None:
        rt = self._check()
        await self._ask(rt, "deleter", CopyThread(source, target, rt.reply()))

    # -- flushing ----------------------------------------------------------

    async def flush(self) -> None:
        """Return once every row accepted so far is ingested; raise if some could not be."""
        rt = self._check()
        await self._flush()
        if rt.ingest_errors:
            errors, rt.ingest_errors = rt.ingest_errors, []
            raise IngestError(
                f"{len(errors)} batch(es) could not be ingested; first error: {errors[0]}"
            ) from errors[0]

    async def _flush(self) -> None:
        rt = self.runtime
        assert rt is not None
        await self._ask(rt, "batcher", Flush(rt.reply()))

    async def compact(self) -> int:
        """Run a compaction pass now (after a flush); returns tombstones compacted so far."""
        self._check()
        await self._deleter_pass("_compacting", lambda d: d._compact())
        return self._states["deleter"].compacted  # type: ignore[no-any-return]

    async def expire(self) -> int:
        """Run an expiry pass now (with the ttl option; no lease, after a flush); returns
        the threads it expired."""
        self._check()
        if self.config.ttl is None:
            raise UsageError("expire() needs the ttl option")
        return await self._deleter_pass("_expiring", lambda d: d._expire())  # type: ignore[no-any-return]

    async def _deleter_pass(self, busy: str, run: Any) -> Any:
        """After a flush, once the deleter's pass of this kind (its ``busy`` flag) is not
        running, run one in this task (the flag keeps its ticker's pass out meanwhile)."""
        await self._flush()
        deleter = self._children["deleter"].current
        assert isinstance(deleter, Deleter)
        while getattr(deleter, busy):
            await anyio.sleep(0.01)
        setattr(deleter, busy, True)
        return await run(deleter)

    # -- fault injection and introspection -----------------------------------

    async def crash(self, actor: str) -> None:
        """Make ``actor`` raise inside its loop (tests, chaos runs)."""
        rt = self._check()
        if actor not in rt.mailboxes:
            raise ValueError(f"no actor {actor!r}; actors: {list(rt.mailboxes)}")
        await self._send(rt, actor, Crash())

    @property
    def failed(self) -> EngineFailedError | None:
        return self.runtime.failure if self.runtime else None  # type: ignore[return-value]

    def buffered_bytes(self) -> int:
        """Bytes accepted and not yet ingested: batcher buffer + ingest queue + in flight."""
        b: BatcherState = self._states["batcher"]
        i: IngestorState = self._states["ingestor"]
        queued = b.handed_bytes - i.received_bytes
        return b.buffered_bytes + b.queued_bytes + queued + i.inflight_bytes

    def stats(self) -> dict[str, Any]:
        rt = self.runtime
        out: dict[str, Any] = {"restarts": dict(self.restarts)}
        if rt is None:
            return out
        out["mailbox_depth"] = {n: m.depth() for n, m in rt.mailboxes.items()}
        b: BatcherState = self._states["batcher"]
        i: IngestorState = self._states["ingestor"]
        ov: Overlay = self._states["cache"]
        out.update(
            buffered_bytes=self.buffered_bytes(),
            peak_batcher_bytes=b.peak_buffered_bytes,
            rows_in=b.rows_in,
            batches_ok=i.batches_ok,
            batches_failed=i.batches_failed,
            rows_ingested=i.rows_ingested,
            retries=i.retries,
            overlay_records=len(ov.by_seq),
            overlay_bytes=ov.nbytes,
            cache_hits=ov.hits,
            cache_misses=ov.misses,
            forks=ov.forks,
            tombstones_compacted=self._states["deleter"].compacted,
            rows_removed=self._states["deleter"].rows_removed,
            threads_expired=self._states["deleter"].expired,
            live_threads=self._states["deleter"].live_threads,
            puts_waited=rt.puts_waited,
            put_wait_s=rt.put_wait_s,
            compaction_failures=rt.compaction_failures,
            last_compaction_error=None if rt.last_compaction_error is None else repr(rt.last_compaction_error),
        )
        out.update(self.spool.stats() if self.spool is not None else EMPTY_STATS)
        cache = self._children.get("cache")
        if cache is not None and isinstance(cache.current, QueryCache):
            out["views"] = len(cache.current.views)
        return out

    def _register_gauges(self) -> None:
        inst = self.instruments
        rt = self.runtime
        assert rt is not None
        inst.register_gauge(
            names.MAILBOX_DEPTH, lambda: [(m.depth(), {names.ACTOR: n}) for n, m in rt.mailboxes.items()]
        )
        inst.register_gauge(
            names.MAILBOX_CAPACITY, lambda: [(m.size, {names.ACTOR: n}) for n, m in rt.mailboxes.items()]
        )
        inst.register_gauge(names.BUFFERED_BYTES, lambda: [(self.buffered_bytes(), {})])
        ov: Overlay = self._states["cache"]
        inst.register_gauge(names.OVERLAY_ROWS, lambda: [(len(ov.by_seq), {})])
        inst.register_gauge(names.OVERLAY_BYTES, lambda: [(ov.nbytes, {})])
        inst.register_gauge(names.CACHE_REQUESTS, lambda: [
            (ov.hits, {names.CACHE_RESULT: names.CACHE_HIT}), (ov.misses, {names.CACHE_RESULT: names.CACHE_MISS})
        ])
        dl: DeleterState = self._states["deleter"]
        inst.register_gauge(
            names.TOMBSTONES_PENDING, lambda: [(sum(len(t) for t, _ in dl.pending), {})]
        )
        inst.register_gauge(
            names.OLDEST_LIVE_AGE,
            lambda: [] if dl.oldest_live_at is None else [((now_us() - dl.oldest_live_at) / 1e6, {})],
        )


def _mailbox(name: str, size: int) -> Any:
    from .mailbox import Mailbox

    return Mailbox(name, size)
