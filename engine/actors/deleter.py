"""Deleter: delete_thread, delete_for_runs, prune, copy_thread, and compaction.

A deletion is a tombstone record. It travels the same road as every write
(batcher, then the query cache's overlay), so it masks reads the moment the
caller's call returns, and it becomes durable once ingested: reads honour the
Tombstones table across restarts and processes. Later, compaction removes the
covered rows physically with ``.delete table T records <| ...``: rarely, one process
per database at a time (a lease in the Compactions table), one table at a time (Kusto
forbids parallel soft deletes on one table), in batches, resuming from the Tombstones
table after any restart (see the compaction section below).

Operations that must read first (prune, copy_thread) run in child tasks, so
the loop keeps serving.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import anyio

from ...telemetry import names
from .. import kql
from ..actor import Actor
from ..errors import KustoCheckpointError, PermanentBackendError
from ..messages import (
    Compact,
    CopyThread,
    DeleteRuns,
    DeleterState,
    DeleteThreads,
    Expire,
    Forget,
    Prune,
    Put,
    Read,
    ReadSpec,
    Ticket,
    Touch,
)
from . import expiry
from ..records import (
    BlobRec,
    CheckpointRec,
    Record,
    TombstoneRec,
    WriteRec,
    chunk_bytes,
    next_seq,
    now_us,
    to_micros,
    us_to_datetime,
)
from ..retry import retrying
from ..spool import encode_records
from ..schema import (
    BLOBS,
    CHECKPOINTS,
    COMPACTION_DONE,
    COMPACTION_LEASE,
    COMPACTIONS,
    EXPIRY_LEASE,
    SCOPE_CHECKPOINT,
    SCOPE_EXPIRE,
    SCOPE_RUN,
    SCOPE_THREAD,
    TOUCHES,
    WRITES,
)

log = logging.getLogger("langgraph.checkpoint.kusto.compaction")


#: what one buffered row costs besides its payload bytes, counted against the memory
#: bound. sys.getsizeof of the row's own objects (its record 104-128 bytes, its
#: (record, part, size) reference in the batcher 64, the record's strings 400-840, the
#: row dict built while its batch is ingested 272-464) says about 1 KiB, but a stalled
#: raw run (200 agents, 32 MiB bound) grew the process by 2.5 KiB per accepted row more
#: than payload + 1 KiB (the put's messages, overlay and cache entries, the blocked
#: caller's own state, the allocator): counted at 3.5 KiB, RSS growth stays within
#: 1.05-1.06x of the bound once the bound is reached (1.32-1.51x at 1 KiB)
ROW_OVERHEAD = 3584


def make_put(
    runtime: Any, records: list[Record], reply: Any, *, ticket_reply: Any = None,
    update_views: bool = True, spooled: bool = True,
) -> Put:
    """Build a batcher ``Put`` from records (runs in the sender's task).

    A row is a ``(record, part, size)`` reference; its dict is built only when its
    batch is ingested (``Batch.materialize``), so buffered rows hold no copies.
    ``spooled=False``: records replayed from the spool (they are on disk already)."""
    cell = runtime.config.cell_limit
    rows: list[tuple[Record, int, int]] = []
    nbytes = 0
    for rec in records:
        if not rec.seq:
            rec.seq = next_seq()
        payload = getattr(rec, "payload", b"")
        n = rec.parts(cell)
        if n == 1:
            size = len(payload) + ROW_OVERHEAD
            rows.append((rec, 0, size))
            nbytes += size
        else:
            step = chunk_bytes(cell)
            for part in range(n):
                size = min(step, len(payload) - part * step) + ROW_OVERHEAD
                rows.append((rec, part, size))
                nbytes += size
    ticket = Ticket(len(rows), ticket_reply) if ticket_reply is not None else None
    spool = runtime.spool  # durability="spool": encode here, in the sender's task
    payload = encode_records(records) if spool is not None and spooled else None
    return Put(records, rows, nbytes, reply, ticket, update_views, payload)


class Deleter(Actor):
    name = "deleter"
    state: DeleterState

    _compacting = False
    _expiring = False

    async def on_start(self) -> None:
        assert self.tg is not None
        cfg = self.runtime.config
        if cfg.compaction_interval > 0:
            self.tg.start_soon(self._ticker, Compact, cfg.compaction_interval)
        if cfg.expiry_every is not None:
            self.tg.start_soon(self._ticker, Expire, cfg.expiry_every)
        # requests whose child task died with the previous incarnation: run them again
        # (both are idempotent: a second tombstone or copy of a row reads as one)
        for msg in list(self.state.running.values()):
            self._start_op(msg)

    def _start_op(self, msg: DeleteThreads | DeleteRuns | Prune | CopyThread) -> None:
        assert self.tg is not None
        self.state.running[id(msg)] = msg
        self.tg.start_soon(self._run_op, msg)

    async def _run_op(self, msg: DeleteThreads | DeleteRuns | Prune | CopyThread) -> None:
        """One operation in its own task; its outcome goes back to the caller."""
        op, what = {
            DeleteThreads: (self._delete, "delete_thread"),
            DeleteRuns: (self._delete_runs, "delete_for_runs"),
            Prune: (self._prune, "prune"),
            CopyThread: (self._copy, "copy_thread"),
        }[type(msg)]
        try:
            await op(msg)  # type: ignore[operator]
        except Exception as exc:  # noqa: BLE001 - failed back to the caller
            msg.reply.fail(exc if isinstance(exc, KustoCheckpointError) else KustoCheckpointError(f"{what} failed: {exc!r}"))  # type: ignore[union-attr]
        self.state.running.pop(id(msg), None)

    async def handle(self, msg: Any) -> None:
        assert self.tg is not None
        if isinstance(msg, (DeleteThreads, DeleteRuns, Prune, CopyThread)):
            self._start_op(msg)
        elif isinstance(msg, Compact):  # the ticker's: leased
            if not self._compacting:
                self._compacting = True
                self.tg.start_soon(self._compact, True)
        elif isinstance(msg, Expire):  # the ticker's: leased
            if not self._expiring:
                self._expiring = True
                self.tg.start_soon(self._expire, True)
        elif isinstance(msg, Touch):
            rec = expiry.touch(self.runtime, self.state, msg.thread_id, msg.checkpoint_ns, msg.checkpoint_id)
            if rec is not None:  # fire and forget: a lost touch only shortens a life by ttl / 10
                self.tg.start_soon(self._write, [rec], self.runtime.reply())
        else:  # pragma: no cover - programming error
            raise TypeError(f"deleter got {msg!r}")

    async def _write_tombstones(self, tombs: list[TombstoneRec], reply: Any) -> None:
        """Hand the tombstones to the batcher (the overlay masks at once), and answer
        once they are accepted, or, with durability="ingested" (the default under
        consistency="shared"), once the backend holds them: every replica's next read
        then honours them."""
        await self._write(list(tombs), reply, tombstones=True)

    async def _write(
        self, records: list[Record], reply: Any, *, tombstones: bool = False, update_views: bool = True,
        ingested: bool = False,
    ) -> None:
        """Hand records to the batcher. ``reply`` is answered once they are accepted, or
        with durability="ingested" once the backend acknowledged them (or failed), by
        the batcher and the ingestor: nothing here waits, so a crash of this actor after
        the hand-over leaves the answer on its way."""
        rt = self.runtime
        if not records:
            reply.set(None)
            return
        if ingested or rt.config.durability == "ingested":
            done = reply
            put = make_put(rt, records, None, ticket_reply=reply, update_views=update_views)
        else:
            done = rt.reply()
            put = make_put(rt, records, reply, ticket_reply=done, update_views=update_views)
        await rt.mailbox("batcher").send(put)
        if tombstones:
            self.state.pending.append((records, done))

    async def _stamps_above(self, thread_ids: list[str]) -> dict[str, int]:
        """For each thread, a stamp above every row it has in the backend (and every
        stamp this process observed or issued for it): what a tombstone covering all of
        it carries. Asks the backend, whatever this host's clock says (engine/clock.py)."""
        rt = self.runtime
        rows = await retrying(rt.config, lambda: rt.backend.query(kql.STAMPS_QUERY, {"tids": list(thread_ids)}))
        for row in rows:
            if row.get("t") is not None:
                rt.clock.observe(row["thread_id"], to_micros(row["t"]))
        return {t: rt.clock.stamp(t) for t in thread_ids}

    async def _thread_tombstones(self, thread_ids: list[str]) -> list[TombstoneRec]:
        """Tombstones that cover every row the threads have, on any replica."""
        at = await self._stamps_above(thread_ids)
        return [TombstoneRec(SCOPE_THREAD, thread_id=t, deleted_at=at[t]) for t in thread_ids]

    async def _delete(self, msg: DeleteThreads) -> None:
        await self._write_tombstones(await self._thread_tombstones(msg.thread_ids), msg.reply)

    async def _delete_runs(self, msg: DeleteRuns) -> None:
        # a run tombstone covers the run's checkpoints whenever written: no stamp decides
        at = now_us()
        await self._write_tombstones([TombstoneRec(SCOPE_RUN, run_id=r, deleted_at=at) for r in msg.run_ids], msg.reply)

    async def _read(self, spec: ReadSpec) -> list[Any]:
        reply = self.runtime.reply()
        await self.runtime.mailbox("cache").send(Read(spec, reply))
        return await reply.wait()  # type: ignore[no-any-return]

    async def _prune(self, msg: Prune) -> None:
        if msg.strategy == "delete":
            tombs = await self._thread_tombstones(msg.thread_ids)
        else:
            # the read's rows are newest first (written_at, then id), and it taught
            # the clock their stamps: a checkpoint tombstone is stamped above them
            heads = await self._read(ReadSpec(tuple(msg.thread_ids), None, with_values=False))
            latest: dict[tuple[str, str], str] = {}
            for b in heads:
                c = b.checkpoint
                latest.setdefault((c.thread_id, c.checkpoint_ns), c.checkpoint_id)
            clock = self.runtime.clock
            tombs = [
                TombstoneRec(
                    SCOPE_CHECKPOINT, thread_id=b.checkpoint.thread_id,
                    checkpoint_ns=b.checkpoint.checkpoint_ns,
                    checkpoint_id=b.checkpoint.checkpoint_id, deleted_at=clock.stamp(b.checkpoint.thread_id),
                )
                for b in heads
                if b.checkpoint.checkpoint_id != latest[(b.checkpoint.thread_id, b.checkpoint.checkpoint_ns)]
                and b.checkpoint.key not in msg.keep
            ]
        await self._write_tombstones(tombs, msg.reply)

    async def _copy(self, msg: CopyThread) -> None:
        bundles = await self._read(ReadSpec((msg.source,), None))
        # the copies keep the source's order: each checkpoint stamped above the one
        # before it, and above whatever the target thread held (a deleted thread)
        await self._stamps_above([msg.target])
        clock = self.runtime.clock
        records: list[Record] = []
        seen_blobs: set[tuple[str, str, str]] = set()
        for b in reversed(bundles):  # oldest first
            c = b.checkpoint
            at = clock.stamp(msg.target)
            for (ch, ver), blob in b.blobs.items():
                if (c.checkpoint_ns, ch, ver) in seen_blobs:
                    continue
                seen_blobs.add((c.checkpoint_ns, ch, ver))
                records.append(BlobRec(msg.target, c.checkpoint_ns, ch, ver, blob.payload_type, blob.payload, at))
            records.append(CheckpointRec(
                msg.target, c.checkpoint_ns, c.checkpoint_id, c.parent_checkpoint_id, c.run_id,
                dict(c.channel_versions), dict(c.new_versions), c.metadata_json,
                c.payload_type, c.payload, at,
            ))
            for w in b.writes:
                records.append(WriteRec(
                    msg.target, w.checkpoint_ns, w.checkpoint_id, w.task_id, w.task_path, w.idx,
                    w.channel, w.payload_type, w.payload, at,
                ))
        await self._write(records, msg.reply, update_views=False)

    # -- compaction --------------------------------------------------------
    #
    # Kusto's soft delete is "for the unplanned deletion of individual records", and
    # "don't run multiple parallel soft delete operations on the same table"
    # (https://learn.microsoft.com/kusto/concepts/data-soft-delete). So compaction runs
    # rarely (compaction_interval, default 1 h), one process per database at a time (a
    # lease: claims in the Compactions table, the smallest owner among one term's claims
    # wins), one table and one batch at a time, and it works from the Tombstones table
    # (pending = tombstones without a 'done' row in Compactions), so what any process
    # deleted is compacted, also after restarts. A soft delete is idempotent: a pass cut
    # short is simply repeated. Tombstones keep reads correct meanwhile.

    async def _ticker(self, message: type, interval: float) -> None:
        # replicas start together: spread their ticks over the interval
        await anyio.sleep(random.uniform(0.5, 1.0) * interval)
        while self.state.compaction_off is None or message is Expire:
            try:
                self.mailbox.send_nowait(message())
            except anyio.WouldBlock:
                pass
            except Exception:  # noqa: BLE001 - closed: stopping
                return
            await anyio.sleep(interval)

    async def _expire(self, leased: bool = False) -> int:
        """One expiry pass (engine/actors/expiry.py); leased when the ticker asks."""
        rt = self.runtime
        try:
            # a store one process owns (the embedded one) needs no lease
            if leased and not getattr(rt.backend, "exclusive", False):
                every = rt.config.expiry_every
                assert every is not None
                if await expiry.take_lease(rt, self.state.owner, EXPIRY_LEASE, every) is None:
                    return 0
            return await expiry.expire_pass(rt, self.state, self._expire_write)
        except Exception as exc:  # noqa: BLE001 - the next tick tries again
            log.warning("expiry pass failed (retried in %ss): %r", rt.config.expiry_every, exc)
            if not leased:
                raise
            return 0
        finally:
            self._expiring = False

    async def _expire_write(self, tombs: list[TombstoneRec]) -> None:
        """Write expiries and return once the backend holds them; then the query cache
        forgets what it kept of those threads (a read between the hand-over and the
        ingestion may have cached the thread as it was: an expiry is the backend's to
        decide, engine/kql.py)."""
        rt = self.runtime
        reply = rt.reply()
        await self._write(list(tombs), reply, tombstones=True, ingested=True)
        await reply.wait()
        await rt.mailbox("cache").send(Forget([t.thread_id for t in tombs]))

    async def _compact(self, leased: bool = False) -> None:
        rt = self.runtime
        try:
            if self.state.compaction_off is not None:
                return
            term = None
            # a store one process owns (the embedded one) needs no lease, nor its settle wait
            if leased and not getattr(rt.backend, "exclusive", False):
                term = await self._take_lease()
                if term is None:
                    return
            await self._compact_pass(term)
        except CompactionUnsupported as exc:
            self.state.compaction_off = str(exc)
            log.error("%s", exc)
        except Exception as exc:  # noqa: BLE001 - tombstones keep reads right; retried next pass
            rt.compaction_failures += 1
            rt.last_compaction_error = exc
            inst = rt.instruments
            inst.compaction_failures.add(1, inst.bound(names.ERROR_TYPE, type(exc).__qualname__))
            log.warning("compaction pass failed (retried in %ss; reads stay correct): %r",
                        rt.config.compaction_interval, exc)
        finally:
            self._compacting = False

    async def _take_lease(self) -> int | None:
        """This term's compaction lease (:func:`.expiry.take_lease`), or None."""
        rt = self.runtime
        return await expiry.take_lease(rt, self.state.owner, COMPACTION_LEASE, rt.config.compaction_interval)

    async def _compact_pass(self, term: int | None = None) -> None:
        """Compact every pending tombstone, a batch at a time. ``term``: the lease this
        pass holds; it is renewed before a soft delete once a quarter interval has passed
        since the last claim, so a pass longer than half the interval keeps other
        processes out (as long as one soft delete takes under a quarter interval)."""
        rt = self.runtime
        st = self.state
        backend = rt.backend
        batch_size = rt.config.compaction_batch
        done_here: set[tuple[Any, ...]] = set()
        claimed = time.monotonic()

        async def renew() -> None:
            nonlocal claimed
            if term is not None and time.monotonic() - claimed > rt.config.compaction_interval / 4:
                await backend.ingest(COMPACTIONS.name, [_compaction_row(COMPACTION_LEASE, st.owner, term, None, now_us())])
                claimed = time.monotonic()

        while True:
            # 'done' rows written in this pass may not be queryable yet (queued ingestion):
            # ask for as many more as were done here, and skip those
            # an expiry waits a compaction interval past the ttl: a turn racing it has had
            # that long to revive the thread (then its rows stay: REVIVED_QUERY)
            grace = int(((rt.config.ttl or 0.0) + rt.config.compaction_interval) * 1_000_000)
            params = {"expire_cutoff": us_to_datetime(now_us() - grace)}
            rows = await backend.query(kql.pending_tombstones_query(batch_size + len(done_here)), params)
            batch = [t for t in map(_tombstone, rows) if _key(t) not in done_here][:batch_size]
            if not batch:
                break
            expiries = [t for t in batch if t.scope == SCOPE_EXPIRE]
            revived: set[tuple[str, int]] = set()
            if expiries:
                tids = sorted({t.thread_id for t in expiries})
                revived = {(r["thread_id"], to_micros(r["expired_at"])) for r in await backend.query(kql.REVIVED_QUERY, {"tids": tids})}
            removable = [t for t in batch if t.scope != SCOPE_EXPIRE or (t.thread_id, t.deleted_at) not in revived]
            for table in (CHECKPOINTS.name, WRITES.name, BLOBS.name, TOUCHES.name):
                text, params = kql.compaction_command(table, removable)
                if not text:
                    continue
                await renew()
                try:
                    result = await backend.command(text, params)
                except PermanentBackendError as exc:
                    if getattr(backend, "fabric", False):
                        raise CompactionUnsupported(
                            f"Microsoft Fabric refused the soft delete on {table} ({exc}); compaction "
                            "is off in this process. Tombstones keep reads correct; rows stay stored "
                            "until the tables' retention policy removes them (docs/kusto.md)"
                        ) from exc
                    raise
                removed = sum(int(r.get("RecordsMatchPredicate") or 0) for r in result or ())
                st.rows_removed += removed
                if removed:
                    inst = rt.instruments
                    inst.rows_removed.add(removed, inst.bound(names.TABLE, table))
            # the Tombstones rows themselves stay (their table's retention ages them
            # out): they keep hiding late duplicates of what was compacted
            at = now_us()
            await backend.ingest(
                COMPACTIONS.name, [_compaction_row(COMPACTION_DONE, st.owner, 0, t, at) for t in batch]
            )
            done_here.update(_key(t) for t in batch)
            st.compacted += len(batch)
        # this engine's own tombstones: compacted once ingested, by whichever process
        st.pending = [(tombs, ingested) for tombs, ingested in st.pending if not ingested.done]


class CompactionUnsupported(KustoCheckpointError):
    """The service refuses soft delete for good (e.g. where it is not offered)."""


def _key(t: TombstoneRec) -> tuple[Any, ...]:
    return (t.scope, t.thread_id, t.checkpoint_ns, t.checkpoint_id, t.run_id, t.deleted_at)


def _tombstone(row: dict[str, Any]) -> TombstoneRec:
    return TombstoneRec(
        row["scope"], thread_id=row["thread_id"] or "", checkpoint_ns=row["checkpoint_ns"] or "",
        checkpoint_id=row["checkpoint_id"] or "", run_id=row["run_id"] or "",
        deleted_at=to_micros(row["deleted_at"]),
    )


def _compaction_row(entry: str, owner: str, term: int, t: TombstoneRec | None, at: int) -> dict[str, Any]:
    if t is None:
        return expiry.lease_row(entry, owner, term, at)
    return {
        "entry": entry, "term": term, "owner": owner,
        "scope": t.scope, "thread_id": t.thread_id, "checkpoint_ns": t.checkpoint_ns,
        "checkpoint_id": t.checkpoint_id, "run_id": t.run_id, "deleted_at": t.deleted_at, "written_at": at,
    }
