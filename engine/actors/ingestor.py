"""Ingestor: sends batches to the backend, with retries and bounded concurrency.

At most ``ingest_concurrency`` batches are in flight; the ingestor reads its
mailbox only when a slot is free, so a slow backend fills the mailbox and
blocks the batcher. Transient failures are retried with exponential backoff
and full jitter (tenacity), up to ``max_retries``. Each batch's outcome goes
to the query cache (which drops ingested rows from its overlay, or failed rows
altogether), to the puts waiting for it (durability="ingested"), and, for a
failure, to ``runtime.ingest_errors`` so that ``flush()`` and closing raise it.

Batches in flight live in the engine-owned state: a restarted ingestor sends
them again (reads deduplicate, so a batch ingested twice is harmless).

A backend with a ``submit`` method (Kusto's queued ingestion, and managed streaming when
it falls back to queued) hands a batch over and returns a pending confirmation instead
of waiting for it: the ingestor then frees the batch's slot while it awaits the
confirmation (minutes: Kusto's batching policy), so slow confirmations do not starve
the slots. The batch stays in flight, in the overlay and in the spool until confirmed;
batches in flight never hold more than ``ingest_concurrency * max_batch_bytes`` bytes
(their share of the memory bound), which is what bounds those waiting.
"""

from __future__ import annotations

import time
from functools import partial
from dataclasses import dataclass, field
from typing import Any

import anyio
from tenacity import RetryCallState

from ...telemetry import names
from ..actor import Actor
from ..errors import IngestError, TransientBackendError
from ..retry import retrying
from ..messages import Batch, Drain, IngestBatch, Ingested


@dataclass
class IngestorState:
    inflight: dict[int, Batch] = field(default_factory=dict)
    drains: list[tuple[int, Any]] = field(default_factory=list)
    last_batch_id: int = 0
    inflight_bytes: int = 0
    received_bytes: int = 0
    batches_ok: int = 0
    batches_failed: int = 0
    retries: int = 0
    rows_ingested: int = 0


class Ingestor(Actor):
    name = "ingestor"
    state: IngestorState

    async def run(self) -> None:
        cfg = self.runtime.config
        self._slots = anyio.Semaphore(cfg.ingest_concurrency)
        #: bytes in flight (sending or awaiting confirmation) at most: the slots' share
        self._share = cfg.ingest_concurrency * cfg.max_batch_bytes
        self._freed = anyio.Event()
        await super().run()

    async def on_start(self) -> None:
        for batch in list(self.state.inflight.values()):
            await self._slots.acquire()
            self._start(batch)

    async def on_stop(self) -> None:
        # mailbox closed: wait for the batches in flight before exiting
        while self.state.inflight:
            await anyio.sleep(0.005)

    async def handle(self, msg: Any) -> None:
        st = self.state
        if isinstance(msg, IngestBatch):
            batch = msg.batch
            while st.inflight and st.inflight_bytes + batch.nbytes > self._share:
                await self._freed.wait()  # only batches awaiting confirmation get here
            await self._slots.acquire()
            st.inflight[batch.batch_id] = batch
            st.inflight_bytes += batch.nbytes
            st.received_bytes += batch.nbytes
            st.last_batch_id = max(st.last_batch_id, batch.batch_id)
            self._start(batch)
        elif isinstance(msg, Drain):
            st.drains.append((st.last_batch_id, msg.reply))
            self._check_drains()
        else:  # pragma: no cover - programming error
            raise TypeError(f"ingestor got {msg!r}")

    def _start(self, batch: Batch) -> None:
        assert self.tg is not None
        self.tg.start_soon(self._ingest, batch, name=f"ingest:{batch.table}:{batch.batch_id}")

    async def _ingest(self, batch: Batch) -> None:
        rt = self.runtime
        cfg = rt.config
        inst = rt.instruments
        st = self.state
        started = time.perf_counter()
        error: BaseException | None = None

        nrows = len(batch.refs)
        held = [True]  # whether this batch holds its slot (see _send)
        try:
            with inst.ingest_span(batch.table, nrows, batch.links):
                rows = batch.materialize(cfg.cell_limit)
                # the retry callback must not hold the batch: tenacity's retrying object
                # is in a reference cycle (itself -> its state -> its bound methods), so
                # whatever it references is freed only by the cyclic GC, and a batch held
                # that way kept all its records and row tuples alive until a collection
                await retrying(cfg, partial(self._send, batch.table, rows, held), partial(self._count_retry, batch.table))
        except Exception as exc:  # noqa: BLE001 - reported to every waiter below
            why = f"after {cfg.max_retries} retries" if isinstance(exc, TransientBackendError) else "(not retryable)"
            error = IngestError(f"could not ingest {nrows} row(s) into {batch.table} {why}: {exc}")
            error.__cause__ = exc
        elapsed = time.perf_counter() - started
        outcome = "ok" if error is None else "failed"
        inst.ingest_duration.record(elapsed, inst.attrs(**{names.TABLE: batch.table, names.OUTCOME: outcome}))
        inst.ingest_batches.add(1, inst.attrs(**{names.TABLE: batch.table, names.OUTCOME: outcome}))
        if error is None:
            inst.batch_rows.record(nrows, inst.attrs(**{names.TABLE: batch.table}))
            inst.batch_bytes.record(batch.nbytes, inst.attrs(**{names.TABLE: batch.table}))
        # tell the cache first: its overlay must know before anyone is told "done"
        await rt.mailbox("cache").send(Ingested(batch.seqs(), error))
        # tickets: puts waiting for "ingested", and spooled puts (engine/spool.py
        # SpoolTicket: its segment is deleted once all its rows are confirmed here)
        for ticket in batch.tickets:
            if error is None:
                ticket.done_rows(1)
            else:
                ticket.reply.fail(error)
        if error is None:
            st.batches_ok += 1
            st.rows_ingested += nrows
        else:
            st.batches_failed += 1
            rt.ingest_errors.append(error)
        st.inflight.pop(batch.batch_id, None)
        st.inflight_bytes -= batch.nbytes
        if held[0]:
            self._slots.release()
        self._freed.set()
        self._freed = anyio.Event()
        self._check_drains()

    async def _send(self, table: str, rows: Any, held: list[bool]) -> None:
        """One attempt: ``backend.ingest``, or ``backend.submit`` and, with the slot
        freed, the wait for its confirmation (a retry takes a slot again)."""
        backend = self.runtime.backend
        if not held[0]:
            await self._slots.acquire()
            held[0] = True
        submit = getattr(backend, "submit", None)
        if submit is None:
            await backend.ingest(table, rows)
            return
        pending = await submit(table, rows)
        if pending is not None:
            self._slots.release()
            held[0] = False
            await pending.wait()

    def _count_retry(self, table: str, rs: RetryCallState) -> None:
        self.state.retries += 1
        inst = self.runtime.instruments
        inst.ingest_retries.add(1, inst.attrs(**{names.TABLE: table}))

    def _check_drains(self) -> None:
        st = self.state
        if not st.drains:
            return
        oldest = min(st.inflight) if st.inflight else None
        keep = []
        for upto, reply in st.drains:
            if oldest is None or oldest > upto:
                reply.set(None)
            else:
                keep.append((upto, reply))
        st.drains = keep
