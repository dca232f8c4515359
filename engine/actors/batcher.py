"""Batcher: groups rows per table by count, bytes and age, and hands batches on.

Every put passes through here. Unless the caller already handed the put's
records to the query cache itself (the fast path, see ``Engine.put``), the
batcher does (``Accept``; the cache answers the caller, so a read that follows
the put always sees it). It buffers the rows, and sends full batches to
the ingestor. Sending blocks while the ingestor is busy; while it blocks the
batcher reads no more puts, its mailbox fills, and callers block: that is the
backpressure. Bytes held by the batcher are capped at
``config.batcher_buffer_bytes``, so everything accepted and not yet ingested
stays within ``config.max_buffered_bytes``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import anyio

from ...telemetry.instruments import add_link
from ..actor import Actor
from ..messages import Accept, Batch, Drain, Flush, IngestBatch, Put, Tick, Ticket


@dataclass
class TableBuffer:
    #: ``(record, part, size)`` per row, the very tuples the puts brought
    rows: list[tuple[Any, int, int]] = field(default_factory=list)
    tickets: list[Ticket] = field(default_factory=list)
    nbytes: int = 0
    oldest: float = 0.0
    links: Any = None


@dataclass
class BatcherState:
    buffers: dict[str, TableBuffer] = field(default_factory=dict)
    buffered_bytes: int = 0
    #: a batch taken from the buffers whose hand-over to the ingestor is not done
    outgoing: Batch | None = None
    next_batch_id: int = 1
    peak_buffered_bytes: int = 0
    rows_in: int = 0
    #: total bytes handed to the ingestor (minus what it received = queued)
    handed_bytes: int = 0
    #: bytes of fast-path puts sent to the batcher's mailbox and not yet buffered
    #: (the engine admits a fast-path put only while this plus ``buffered_bytes``
    #: stays within ``batcher_buffer_bytes``: the memory bound counts them)
    queued_bytes: int = 0


class Batcher(Actor):
    name = "batcher"
    state: BatcherState

    async def on_start(self) -> None:
        if self.state.outgoing is not None:
            await self._hand_over(self.state.outgoing)

    async def handle(self, msg: Any) -> None:
        if isinstance(msg, Put):
            await self._put(msg)
        elif isinstance(msg, Tick):
            await self._flush_aged()
        elif isinstance(msg, Flush):
            await self._flush_all()
            await self.runtime.mailbox("ingestor").send(Drain(msg.reply))
        else:  # pragma: no cover - programming error
            raise TypeError(f"batcher got {msg!r}")

    async def _put(self, msg: Put) -> None:
        st = self.state
        cfg = self.runtime.config
        if msg.waited:  # taken from the mailbox: from now on its bytes count as queued
            msg.waited = False
            msg.queued = True
            st.queued_bytes += msg.nbytes
        if st.buffered_bytes and st.buffered_bytes + msg.nbytes > cfg.batcher_buffer_bytes:
            await self._flush_all()
        if not msg.accepted:  # else the caller handed the records to the cache (fast path)
            reply = msg.reply
            if msg.spool is not None:  # durability="spool" (engine/spool.py): group commit,
                reply = self.runtime.spool.admit(msg)  # the caller's reply also waits for the fsync
            await self.runtime.mailbox("cache").send(Accept(msg.records, reply, msg.update_views))
        now = time.monotonic()
        full: set[str] = set()
        for row in msg.rows:
            table = row[0].table
            nbytes = row[2]
            buf = st.buffers.get(table)
            if buf is None:
                buf = st.buffers[table] = TableBuffer()
            if not buf.rows:
                buf.oldest = now
            elif buf.nbytes + nbytes > cfg.max_batch_bytes:
                await self._send(table, buf)
                buf = st.buffers[table]
                buf.oldest = now
            buf.rows.append(row)
            if msg.trace is not None:
                buf.links = add_link(buf.links, msg.trace)
            if msg.ticket is not None:
                buf.tickets.append(msg.ticket)
            buf.nbytes += nbytes
            st.buffered_bytes += nbytes
            if msg.queued:  # moved from queued to buffered, row by row: a _send above
                st.queued_bytes -= nbytes  # may block mid-put, and nothing may count twice
            st.rows_in += 1
            if len(buf.rows) >= cfg.batch_size or buf.nbytes >= cfg.max_batch_bytes:
                full.add(table)
        msg.queued = False
        if st.buffered_bytes > st.peak_buffered_bytes:
            st.peak_buffered_bytes = st.buffered_bytes
        for table in full:
            buf = st.buffers[table]
            if buf.rows:
                await self._send(table, buf)

    async def _flush_aged(self) -> None:
        limit = time.monotonic() - self.runtime.config.flush_interval
        for table, buf in list(self.state.buffers.items()):
            if buf.rows and buf.oldest <= limit:
                await self._send(table, buf)

    async def _flush_all(self) -> None:
        for table in list(self.state.buffers):
            buf = self.state.buffers[table]
            if buf.rows:
                await self._send(table, buf)

    async def _send(self, table: str, buf: TableBuffer) -> None:
        st = self.state
        batch = Batch(
            batch_id=st.next_batch_id,
            table=table,
            refs=buf.rows,
            tickets=buf.tickets,
            nbytes=buf.nbytes,
            links=buf.links,
        )
        st.next_batch_id += 1
        st.buffers[table] = TableBuffer()
        st.outgoing = batch
        await self._hand_over(batch)

    async def _hand_over(self, batch: Batch) -> None:
        await self.runtime.mailbox("ingestor").send(IngestBatch(batch))
        self.state.outgoing = None
        self.state.buffered_bytes -= batch.nbytes
        self.state.handed_bytes += batch.nbytes
        self.runtime.admission.poke()  # room in the batcher's share of the bound


async def ticker(runtime: Any, interval: float) -> None:
    """Wakes the batcher so rows older than ``flush_interval`` leave on time."""
    mailbox = runtime.mailbox("batcher")
    while not mailbox.closed:
        await anyio.sleep(interval)
        try:
            mailbox.send_nowait(Tick())
        except anyio.WouldBlock:
            pass  # the batcher is busy; full batches leave anyway
        except Exception:  # noqa: BLE001 - closed: the engine is stopping
            return
