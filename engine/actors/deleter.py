"""Deleter: delete_thread, delete_for_runs, prune, copy_thread, and compaction.

A deletion is a tombstone record. It travels the same road as every write
(batcher, then the query cache's overlay), so it masks reads the moment the
caller's call returns, and it becomes durable once ingested: reads honour the
Tombstones table across restarts and processes. Later, compaction removes the
covered rows physically with ``.delete table T records <| ...``, one table at a
time (Kusto forbids parallel soft deletes on one table), in batches.

Operations that must read first (prune, copy_thread) run in child tasks, so
the loop keeps serving.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio

from ...telemetry import names
from .. import kql
from ..actor import Actor
from ..errors import KustoCheckpointError
from ..messages import (
    Compact,
    CopyThread,
    DeleteRuns,
    DeleterState,
    DeleteThreads,
    Prune,
    Put,
    Read,
    ReadSpec,
    Ticket,
)
from ..records import BlobRec, CheckpointRec, Record, TombstoneRec, WriteRec, chunk_bytes, next_seq, now_us, to_micros
from ..retry import retrying
from ..spool import encode_records
from ..schema import BLOBS, CHECKPOINTS, SCOPE_CHECKPOINT, SCOPE_RUN, SCOPE_THREAD, WRITES

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

    async def on_start(self) -> None:
        assert self.tg is not None
        if self.runtime.config.compaction_interval > 0:
            self.tg.start_soon(self._compaction_ticker)
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
        elif isinstance(msg, Compact):
            if not self._compacting:
                self._compacting = True
                self.tg.start_soon(self._compact)
        else:  # pragma: no cover - programming error
            raise TypeError(f"deleter got {msg!r}")

    async def _write_tombstones(self, tombs: list[TombstoneRec], reply: Any) -> None:
        """Hand the tombstones to the batcher (the overlay masks at once), and answer
        once they are accepted, or, with durability="ingested" (the default under
        consistency="shared"), once the backend holds them: every replica's next read
        then honours them."""
        await self._write(list(tombs), reply, tombstones=True)

    async def _write(self, records: list[Record], reply: Any, *, tombstones: bool = False, update_views: bool = True) -> None:
        """Hand records to the batcher. ``reply`` is answered once they are accepted, or
        with durability="ingested" once the backend acknowledged them (or failed), by
        the batcher and the ingestor: nothing here waits, so a crash of this actor after
        the hand-over leaves the answer on its way."""
        rt = self.runtime
        if not records:
            reply.set(None)
            return
        if rt.config.durability == "ingested":
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

    async def _delete(self, msg: DeleteThreads) -> None:
        at = await self._stamps_above(msg.thread_ids)
        tombs = [TombstoneRec(SCOPE_THREAD, thread_id=t, deleted_at=at[t]) for t in msg.thread_ids]
        await self._write_tombstones(tombs, msg.reply)

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
            at = await self._stamps_above(msg.thread_ids)
            tombs = [TombstoneRec(SCOPE_THREAD, thread_id=t, deleted_at=at[t]) for t in msg.thread_ids]
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

    async def _compaction_ticker(self) -> None:
        while True:
            await anyio.sleep(self.runtime.config.compaction_interval)
            try:
                self.mailbox.send_nowait(Compact())
            except anyio.WouldBlock:
                continue
            except Exception:  # noqa: BLE001 - closed: stopping
                return

    async def _compact(self) -> None:
        try:
            await self._compact_pass()
        except Exception as exc:  # noqa: BLE001 - tombstones keep reads right; retried next pass
            rt = self.runtime
            rt.compaction_failures += 1
            rt.last_compaction_error = exc
            inst = rt.instruments
            inst.compaction_failures.add(1, inst.bound(names.ERROR_TYPE, type(exc).__qualname__))
            log.warning("compaction pass failed (retried in %ss; reads stay correct): %r",
                        rt.config.compaction_interval, exc)
        finally:
            self._compacting = False

    async def _compact_pass(self) -> None:
        st = self.state
        still: list[Any] = []
        for tombs, ingested in st.pending:
            if ingested.done:
                try:
                    await ingested.wait()
                    st.ready.extend(tombs)
                except Exception:  # noqa: BLE001 - not stored, nothing to compact
                    pass
            else:
                still.append((tombs, ingested))
        st.pending = still
        batch_size = self.runtime.config.compaction_batch
        while st.ready:
            batch = st.ready[:batch_size]
            for table in (CHECKPOINTS.name, WRITES.name, BLOBS.name):
                text, params = kql.compaction_command(table, batch)
                if text:
                    await self.runtime.backend.command(text, params)
            # the Tombstones rows themselves stay (their table's retention ages them
            # out): they keep hiding late duplicates of what was compacted
            del st.ready[: len(batch)]
            st.compacted += len(batch)
