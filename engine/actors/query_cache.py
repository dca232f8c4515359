"""QueryCache: answers reads by merging the backend with what it does not show yet.

Two structures:

* the **overlay** (engine-owned, survives restarts): every record this process
  accepted that the backend may not show yet. The batcher hands each put's
  records here (``Accept``) before the put returns, so read-your-writes holds
  at every moment; a record leaves when the ingestor reports its batch
  ingested, after ``visibility_delay``, and only once no query that started
  before the acknowledgement is still running (it might have missed it).
  Tombstones in the overlay mask rows at once: deletes take effect immediately.
* the **views** (per incarnation, a bounded LRU): for recently read
  ``(thread_id, checkpoint_ns)``, the latest checkpoint with its blobs and
  pending writes, kept current by this process's own writes (write-through)
  and dropped by its deletes. ``get_tuple`` of the latest checkpoint is
  answered from a view without touching the backend.

Backend queries run in child tasks and come back as ``QueryDone`` messages, so
the loop never waits on I/O. Rows become records in those tasks; the loop only
merges dictionaries.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ...telemetry import names
from .. import kql
from ..actor import Actor
from ..clock import ThreadClock
from ..errors import BackendError
from ..messages import Accept, Forget, Ingested, QueryDone, Read, ReadSpec
from ..reads import ask, checkpoint_from_row, values_from_rows
from ..records import BlobRec, Bundle, CheckpointRec, Record, TombstoneRec, TouchRec, WriteRec, newer_write, to_micros
from ..schema import SCOPE_RUN


_NO_BLOBS: Mapping[Any, BlobRec] = MappingProxyType({})


def _per_thread(index: dict[str, dict[Any, Any]], thread_id: str) -> dict[Any, Any]:
    """``index.setdefault(thread_id, {})`` without building (and dropping) a dict per call."""
    per = index.get(thread_id)
    if per is None:
        per = index[thread_id] = {}
    return per


@dataclass
class Overlay:
    by_seq: dict[int, Record] = field(default_factory=dict)
    pending_rows: dict[int, int] = field(default_factory=dict)
    ck: dict[str, dict[tuple[str, str], CheckpointRec]] = field(default_factory=dict)
    blobs: dict[str, dict[tuple[str, str, str], BlobRec]] = field(default_factory=dict)
    writes: dict[str, dict[tuple[str, str, str, int], WriteRec]] = field(default_factory=dict)
    tombs: dict[int, TombstoneRec] = field(default_factory=dict)
    #: (seq, ack epoch, release time) of records the backend acknowledged
    released: deque[tuple[int, int, float]] = field(default_factory=deque)
    nbytes: int = 0
    epoch: int = 0
    #: start epochs of backend queries in flight
    inflight: Counter[int] = field(default_factory=Counter)
    #: reads waiting on a backend query, by id (re-run after a restart)
    reads: dict[int, Read] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0
    #: forks seen (a checkpoint that became its parent's second child)
    forks: int = 0

    # -- add / remove ------------------------------------------------------

    def add(self, rec: Record, nrows: int) -> None:
        seq = rec.seq
        self.by_seq[seq] = rec
        self.pending_rows[seq] = self.pending_rows.get(seq, 0) + nrows
        self.nbytes += rec.nbytes
        if isinstance(rec, CheckpointRec):
            _per_thread(self.ck, rec.thread_id)[(rec.checkpoint_ns, rec.checkpoint_id)] = rec
        elif isinstance(rec, BlobRec):
            _per_thread(self.blobs, rec.thread_id)[(rec.checkpoint_ns, rec.channel, rec.version)] = rec
        elif isinstance(rec, WriteRec):
            per = _per_thread(self.writes, rec.thread_id)
            k = (rec.checkpoint_ns, rec.checkpoint_id, rec.task_id, rec.idx)
            old = per.get(k)
            per[k] = rec if old is None else newer_write(old, rec)
        elif isinstance(rec, TombstoneRec):
            self.tombs[seq] = rec

    def remove(self, seq: int) -> None:
        rec = self.by_seq.pop(seq, None)
        self.pending_rows.pop(seq, None)
        if rec is None:
            return
        self.nbytes -= rec.nbytes
        if isinstance(rec, TombstoneRec):
            self.tombs.pop(seq, None)
            return
        if isinstance(rec, TouchRec):
            return
        if isinstance(rec, CheckpointRec):
            index: dict[Any, Any] | None = self.ck.get(rec.thread_id)
            k: Any = (rec.checkpoint_ns, rec.checkpoint_id)
            top = self.ck
        elif isinstance(rec, BlobRec):
            index = self.blobs.get(rec.thread_id)
            k = (rec.checkpoint_ns, rec.channel, rec.version)
            top = self.blobs
        else:
            index = self.writes.get(rec.thread_id)
            k = (rec.checkpoint_ns, rec.checkpoint_id, rec.task_id, rec.idx)
            top = self.writes
        if index is not None and index.get(k) is rec:
            del index[k]
            if not index:
                del top[rec.thread_id]

    # -- reads -------------------------------------------------------------

    def covered(self, rec: CheckpointRec) -> bool:
        return any(t.covers_checkpoint(rec) for t in self.tombs.values())

    def row_covered(self, thread_id: str, written_at: int) -> bool:
        return any(t.covers_thread_row(thread_id, written_at) for t in self.tombs.values())

    def checkpoints(self, spec: ReadSpec, before_at: int | None = None) -> list[CheckpointRec]:
        """This process's checkpoints the backend may not show yet that ``spec`` selects.
        ``before``: older than that checkpoint's stamp when known (``before_at``),
        else, for a checkpoint this overlay does not hold, a lower id."""
        threads = spec.thread_ids if spec.thread_ids is not None else list(self.ck)
        out = []
        for tid in threads:
            for (ns, cid), rec in self.ck.get(tid, {}).items():
                if spec.checkpoint_ns is not None and ns != spec.checkpoint_ns:
                    continue
                if spec.checkpoint_id and cid != spec.checkpoint_id:
                    continue
                if spec.before and not (rec.written_at < before_at if before_at is not None else cid < spec.before):
                    continue
                out.append(rec)
        return out

    def stamp_of(self, spec: ReadSpec, checkpoint_id: str) -> int | None:
        """The stamp of a checkpoint this overlay holds (``before`` cursors), else None."""
        threads = spec.thread_ids if spec.thread_ids is not None else list(self.ck)
        for tid in threads:
            for (ns, cid), rec in self.ck.get(tid, {}).items():
                if cid == checkpoint_id and (spec.checkpoint_ns is None or ns == spec.checkpoint_ns):
                    return rec.written_at
        return None

    def relevant_tombs(self, spec: ReadSpec) -> bool:
        for t in self.tombs.values():
            if t.scope == SCOPE_RUN or spec.thread_ids is None or t.thread_id in spec.thread_ids:
                return True
        return False


@dataclass
class View:
    latest: CheckpointRec | None
    blobs: dict[tuple[str, str], BlobRec]
    writes: dict[tuple[str, int], WriteRec]
    loaded_at: float
    #: writes for checkpoints newer than ``latest`` that arrived before their
    #: checkpoint (LangGraph's default durability sends them first)
    early: dict[str, dict[tuple[str, int], WriteRec]] = field(default_factory=dict)


class LatestBatch:
    """Concurrent first reads of threads' latest checkpoints, answered by one query."""

    __slots__ = ("reads", "items")

    def __init__(self) -> None:
        self.reads: list[Read] = []
        #: stage 2: (read, its candidate checkpoints, fall back if none is complete)
        self.items: list[tuple[Read, list[CheckpointRec], bool]] = []


class QueryCache(Actor):
    name = "cache"
    state: Overlay
    direct_types = frozenset((Accept, Read, QueryDone, Ingested))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.views: OrderedDict[tuple[str, str], View] = OrderedDict()
        #: consistency="shared": no "latest" or "no such thread" answer is kept
        self.shared = self.runtime.config.shared
        #: the newest checkpoint this process knows of per (thread, namespace), read or
        #: written here, as (id, parent id, written here): forks are counted against it
        self.known: OrderedDict[tuple[str, str], tuple[str, str, bool]] = OrderedDict()
        #: latest-reads that missed and wait for a query slot, by namespace
        self._waiting: dict[str, LatestBatch] = {}

    async def on_start(self) -> None:
        # reads whose backend query died with the previous incarnation: run again
        pending = list(self.state.reads.values())
        self.state.reads.clear()
        self.state.inflight.clear()
        for msg in pending:
            self._read(msg)

    async def handle(self, msg: Any) -> None:
        self.handle_now(msg)

    def handle_now(self, msg: Any) -> None:
        """Every message: nothing here awaits (backend queries run in child tasks)."""
        if isinstance(msg, Accept):
            self._accept(msg)
        elif isinstance(msg, Read):
            self._read(msg)
        elif isinstance(msg, QueryDone):
            if msg.owner is self:  # else: sent by the previous incarnation, whose reads run again
                self._query_done(msg)
        elif isinstance(msg, Ingested):
            self._ingested(msg)
        elif isinstance(msg, Forget):
            gone = set(msg.thread_ids)
            for key in [k for k in self.views if k[0] in gone]:
                del self.views[key]
        else:  # pragma: no cover - programming error
            raise TypeError(f"cache got {msg!r}")

    # -- writes ------------------------------------------------------------

    def _accept(self, msg: Accept) -> None:
        ov = self.state
        cell = self.runtime.config.cell_limit
        for rec in msg.records:
            ov.add(rec, rec.parts(cell))
        for rec in msg.records:
            if isinstance(rec, CheckpointRec):
                if msg.update_views:
                    self._know_put(rec)
                    self._view_put(rec)
                else:
                    self._drop_thread(rec.thread_id)
            elif isinstance(rec, WriteRec):
                if msg.update_views:
                    self._view_write(rec)
                else:
                    self._drop_thread(rec.thread_id)
            elif isinstance(rec, TombstoneRec):
                self._view_tombstone(rec)
        if msg.reply is not None:
            msg.reply.set(None)

    # -- forks -------------------------------------------------------------

    def _know(self, key: tuple[str, str], value: tuple[str, str, bool]) -> None:
        known = self.known
        known[key] = value
        known.move_to_end(key)
        if len(known) > self.runtime.config.cache_max_threads:
            known.popitem(last=False)

    def _know_put(self, rec: CheckpointRec) -> None:
        """A checkpoint written here from a parent that is not the newest this process
        knows of makes that parent's second child (time travel, or a stale read)."""
        key = (rec.thread_id, rec.checkpoint_ns)
        prev = self.known.get(key)
        if (
            prev is not None and rec.parent_checkpoint_id
            and rec.parent_checkpoint_id != prev[0] and rec.checkpoint_id != prev[0]
        ):
            self._fork(names.FORK_SEEN_BY_PUT)
        self._know(key, (rec.checkpoint_id, rec.parent_checkpoint_id, True))

    def _know_read(self, rec: CheckpointRec) -> None:
        """The backend's newest checkpoint beside the one this process wrote last, from
        the same parent: another process wrote the thread at the same time."""
        key = (rec.thread_id, rec.checkpoint_ns)
        prev = self.known.get(key)
        if prev is not None and prev[2] and rec.checkpoint_id != prev[0] and rec.parent_checkpoint_id == prev[1]:
            self._fork(names.FORK_SEEN_BY_READ)
        if prev is None or prev[0] != rec.checkpoint_id:
            self._know(key, (rec.checkpoint_id, rec.parent_checkpoint_id, False))

    def _fork(self, seen_by: str) -> None:
        inst = self.runtime.instruments
        self.state.forks += 1
        inst.forks.add(1, inst.bound(names.FORK_SEEN_BY, seen_by))

    def _view_put(self, rec: CheckpointRec) -> None:
        """Write-through: an existing view moves on to the new checkpoint.

        A view is only ever *created* by a read (it then knows the backend's
        state); a put without a view leaves the next read to the backend.
        """
        key = (rec.thread_id, rec.checkpoint_ns)
        view = self.views.get(key)
        if view is None:
            return
        if view.latest is None and rec.parent_checkpoint_id:
            # a child of a checkpoint this view says is not there (a turn racing an
            # expiry revives the thread: engine/kql.py): the backend decides
            del self.views[key]
            return
        if view.latest is not None and (rec.written_at, rec.checkpoint_id) <= (
            view.latest.written_at, view.latest.checkpoint_id
        ):
            return
        blobs: dict[tuple[str, str], BlobRec] = {}
        ov_blobs = self.state.blobs.get(rec.thread_id) or _NO_BLOBS
        for ch, ver in rec.channel_versions.items():
            b = ov_blobs.get((rec.checkpoint_ns, ch, ver)) or view.blobs.get((ch, ver))
            if b is None:
                # a blob we do not hold: the view cannot answer for this checkpoint
                del self.views[key]
                return
            blobs[(ch, ver)] = b
        writes: dict[tuple[str, int], WriteRec] = {}
        if view.early:  # writes that came before their checkpoint: rare, so no dicts otherwise
            writes = view.early.pop(rec.checkpoint_id, writes)
            view.early = {c: w for c, w in view.early.items() if c > rec.checkpoint_id}
        view.latest, view.blobs, view.writes = rec, blobs, writes
        self.views.move_to_end(key)

    def _view_write(self, rec: WriteRec) -> None:
        view = self.views.get((rec.thread_id, rec.checkpoint_ns))
        if view is None:
            return
        if view.latest is None:  # a write to a checkpoint this view says is not there
            del self.views[(rec.thread_id, rec.checkpoint_ns)]
            return
        if view.latest is not None and view.latest.checkpoint_id == rec.checkpoint_id:
            target = view.writes
        elif view.latest is None or rec.checkpoint_id > view.latest.checkpoint_id:
            target = view.early.setdefault(rec.checkpoint_id, {})
        else:
            return  # a write for an older checkpoint: the view does not hold it
        k = (rec.task_id, rec.idx)
        old = target.get(k)
        target[k] = rec if old is None else newer_write(old, rec)

    def _view_tombstone(self, rec: TombstoneRec) -> None:
        if rec.scope == SCOPE_RUN:
            for key, view in list(self.views.items()):
                if view.latest is not None and view.latest.run_id == rec.run_id:
                    del self.views[key]
        else:
            self._drop_thread(rec.thread_id)

    def _drop_thread(self, thread_id: str) -> None:
        for key in [k for k in self.views if k[0] == thread_id]:
            del self.views[key]

    def _trim(self) -> None:
        limit = self.runtime.config.cache_max_threads
        while len(self.views) > limit:
            self.views.popitem(last=False)

    # -- acknowledgements ----------------------------------------------------

    def _ingested(self, msg: Ingested) -> None:
        ov = self.state
        if msg.error is not None:
            threads = set()
            for seq in msg.seqs:
                rec = ov.by_seq.get(seq)
                if rec is not None:
                    threads.add(getattr(rec, "thread_id", ""))
                    ov.remove(seq)
            for tid in threads:
                self._drop_thread(tid)
            return
        ov.epoch += 1
        release_at = time.monotonic() + self.runtime.config.visibility_delay
        oldest = 0  # the earliest acceptance among the records this batch completes
        for seq in msg.seqs:
            left = ov.pending_rows.get(seq)
            if left is None:
                continue
            if left <= 1:
                del ov.pending_rows[seq]
                ov.released.append((seq, ov.epoch, release_at))
                rec = ov.by_seq.get(seq)
                t = getattr(rec, "written_at", None) or getattr(rec, "deleted_at", None)
                if t and (not oldest or t < oldest):
                    oldest = t
            else:
                ov.pending_rows[seq] = left - 1
        if oldest:  # once per batch, its worst row: a measurement per record cost ~5 us each with an SDK
            inst = self.runtime.instruments
            inst.visibility_lag.record(max(0.0, (time.time_ns() // 1000 - oldest) / 1e6), inst.base_attrs)
        self._purge()

    def _purge(self) -> None:
        ov = self.state
        oldest_query = min(ov.inflight) if ov.inflight else None
        now = time.monotonic()
        deferred: list[tuple[int, int, float]] = []
        while ov.released:
            seq, epoch, release_at = ov.released[0]
            if release_at > now or (oldest_query is not None and oldest_query < epoch):
                break
            ov.released.popleft()
            if isinstance(ov.by_seq.get(seq), TombstoneRec):
                deferred.append((seq, epoch, release_at))
            else:
                ov.remove(seq)
        if deferred or ov.tombs:
            # a tombstone stays while any older record it may cover is still here
            oldest = min((s for s, r in ov.by_seq.items() if not isinstance(r, TombstoneRec)), default=None)
            for item in deferred:
                if oldest is None or oldest > item[0]:
                    ov.remove(item[0])
                else:
                    ov.released.append(item)

    # -- reads -------------------------------------------------------------

    def _read(self, msg: Read) -> None:
        spec = msg.spec
        if spec.latest and spec.thread_ids is not None and spec.checkpoint_ns is not None:
            key = (spec.thread_ids[0], spec.checkpoint_ns)
            view = self.views.get(key) if not self.shared else None
            ttl = self.runtime.config.cache_ttl
            if view is not None and time.monotonic() - view.loaded_at <= ttl:
                if spec.checkpoint_id is None or (
                    view.latest is not None and view.latest.checkpoint_id == spec.checkpoint_id
                ):
                    self.views.move_to_end(key)
                    self.state.hits += 1
                    msg.reply.set(self._bundle_from_view(view))  # type: ignore[union-attr]
                    return
        self.state.misses += 1
        self.state.reads[id(msg)] = msg
        if (
            spec.latest and spec.checkpoint_id is None and spec.thread_ids is not None
            and len(spec.thread_ids) == 1 and spec.checkpoint_ns is not None
            and not self.state.relevant_tombs(spec)
        ):
            self._coalesce(msg)
        else:
            self._spawn(msg, 1, None)

    def _coalesce(self, msg: Read) -> None:
        """Join the batch of latest-reads waiting for a query slot, or start one.

        A batch takes every read that arrived while it waited for the query
        limiter, so N threads read for the first time cost a few queries, not N.
        """
        ns = msg.spec.checkpoint_ns or ""
        batch = self._waiting.get(ns)
        if batch is None or len(batch.reads) >= kql.READ_PAGE:  # a page of threads per query
            batch = self._waiting[ns] = LatestBatch()
            ov = self.state
            epoch = ov.epoch
            ov.inflight[epoch] += 1
            assert self.tg is not None
            self.tg.start_soon(self._run_latest, batch, ns, epoch)
        batch.reads.append(msg)

    def _bundle_from_view(self, view: View) -> Bundle | None:
        if view.latest is None:
            return None
        writes = sorted(view.writes.values(), key=lambda w: (w.task_path, w.task_id, w.idx))
        return Bundle(view.latest, dict(view.blobs), writes)

    def _spawn(self, msg: Read, stage: int, carry: Any) -> None:
        ov = self.state
        epoch = ov.epoch
        ov.inflight[epoch] += 1
        assert self.tg is not None
        self.tg.start_soon(self._run_query, msg, stage, carry, epoch)

    async def _run_query(self, msg: Read, stage: int, carry: Any, epoch: int) -> None:
        rt = self.runtime
        spec = msg.spec
        result: Any = None
        error: BaseException | None = None
        try:
            limiter = rt.query_limiter
            assert limiter is not None
            async with limiter:
                if stage == 1:
                    result = await self._checkpoint_pages(msg)
                else:
                    result = (carry[0], await self._values(msg.trace, carry[0]), carry[1])
        except Exception as exc:  # noqa: BLE001 - failed back to the reader
            error = _read_error(exc)
        await self.mailbox.send(QueryDone(msg, stage, result, error, epoch, self))

    async def _checkpoint_pages(self, msg: Read) -> tuple[list[CheckpointRec], int | None]:
        """The backend's checkpoints for ``msg``, newest first, a page
        (:data:`~..kql.READ_PAGE`) per query, until its limit or the last page."""
        rt = self.runtime
        spec = msg.spec
        limit = 5 if spec.latest else spec.limit
        if self.state.relevant_tombs(spec):
            limit = None  # a tombstone here may hide some of them: read them all
        before_at = self.state.stamp_of(spec, spec.before) if spec.before else None
        make = checkpoint_from_row if spec.with_values else _header
        out: list[CheckpointRec] = []
        page: tuple[int, list[str]] | None = None
        while True:
            want = kql.READ_PAGE if limit is None else min(kql.READ_PAGE, limit - len(out))
            params = kql.checkpoints_params(
                spec.thread_ids, spec.checkpoint_ns, spec.checkpoint_id, spec.before, before_at, page, spec.metadata
            )
            rows = await ask(
                rt, msg.trace, names.SPAN_QUERY_CHECKPOINTS,
                lambda expiries: kql.checkpoints_query(want, spec.with_values, len(spec.metadata), expiries), params,
            )
            recs = _observe_checkpoints(rt.clock, rows, make)
            out.extend(recs)
            if len(recs) < want or (limit is not None and len(out) >= limit):
                return out, before_at
            oldest = min(recs, key=_newest_first).written_at
            ids = [r.checkpoint_id for r in recs if r.written_at == oldest]
            page = (oldest, ids + (page[1] if page is not None and page[0] == oldest else []))

    async def _values(self, trace: Any, cands: list[CheckpointRec]) -> Any:
        """Blobs and writes of ``cands``, :data:`~..kql.READ_PAGE` checkpoints per query."""
        rt = self.runtime
        blobs: dict[Any, BlobRec] = {}
        writes: dict[Any, WriteRec] = {}
        for i in range(0, len(cands), kql.READ_PAGE):
            params = _values_params(cands[i : i + kql.READ_PAGE])
            rows = await ask(rt, trace, names.SPAN_QUERY_VALUES, kql.values_query, params)
            b, w = _observe_values(rt.clock, values_from_rows(rows))
            blobs.update(b)
            writes.update(w)
        return _indexed((blobs, writes))

    async def _run_latest(self, batch: LatestBatch, ns: str, epoch: int) -> None:
        rt = self.runtime
        result: Any = None
        error: BaseException | None = None
        try:
            limiter = rt.query_limiter
            assert limiter is not None
            async with limiter:
                if self._waiting.get(ns) is batch:
                    del self._waiting[ns]  # reads arriving from now on start the next batch
                tids = sorted({r.spec.thread_ids[0] for r in batch.reads})  # type: ignore[index]
                params = kql.checkpoints_params(tuple(tids), ns, None)
                rows = await ask(rt, batch.reads[0].trace, names.SPAN_QUERY_CHECKPOINTS, kql.latest_query, params)
                result = _observe_checkpoints(rt.clock, rows, checkpoint_from_row)
        except Exception as exc:  # noqa: BLE001 - failed back to the readers
            error = _read_error(exc)
        finally:
            if self._waiting.get(ns) is batch:
                del self._waiting[ns]
        await self.mailbox.send(QueryDone(batch, 1, result, error, epoch, self))  # type: ignore[arg-type]

    def _query_done(self, done: QueryDone) -> None:
        ov = self.state
        ov.inflight[done.epoch] -= 1
        if ov.inflight[done.epoch] <= 0:
            del ov.inflight[done.epoch]
        if isinstance(done.request, LatestBatch):
            if done.stage == 1:
                self._latest_done(done.request, done.result, done.error)
            else:
                self._latest_values_done(done.request, done.result, done.error)
            self._purge()
            return
        msg = done.request
        reply = msg.reply
        assert reply is not None
        if done.error is not None:
            ov.reads.pop(id(msg), None)
            reply.fail(done.error)
            self._purge()
            return
        if done.stage == 1:
            self._merge_checkpoints(msg, *done.result)
        else:
            self._merge_values(msg, *done.result)
        self._purge()

    def _latest_done(self, batch: LatestBatch, result: Any, error: BaseException | None) -> None:
        ov = self.state
        if error is not None:
            for msg in batch.reads:
                ov.reads.pop(id(msg), None)
                msg.reply.fail(error)  # type: ignore[union-attr]
            return
        latest = {(r.thread_id, r.checkpoint_ns): r for r in result}
        for r in result:
            self._know_read(r)
        items: list[tuple[Read, list[CheckpointRec], bool]] = []
        for msg in batch.reads:
            if id(msg) not in ov.reads:
                continue  # answered already (re-run after a restart)
            rec = latest.get((msg.spec.thread_ids[0], msg.spec.checkpoint_ns))  # type: ignore[index]
            if rec is not None and ov.covered(rec):
                # deleted here after the query started: older checkpoints may be visible
                self._spawn(msg, 1, None)
                continue
            cands = self._candidates(msg, [rec] if rec is not None else [])
            if cands is not None:
                items.append((msg, cands, rec is not None))
        if items:
            values = LatestBatch()
            values.items = items
            ov.inflight[ov.epoch] += 1
            assert self.tg is not None
            self.tg.start_soon(self._run_values, values, [c for _, cs, _ in items for c in cs], ov.epoch)

    async def _run_values(self, batch: LatestBatch, cands: list[CheckpointRec], epoch: int) -> None:
        rt = self.runtime
        result: Any = None
        error: BaseException | None = None
        try:
            limiter = rt.query_limiter
            assert limiter is not None
            async with limiter:
                result = await self._values(batch.items[0][0].trace, cands)
        except Exception as exc:  # noqa: BLE001 - failed back to the readers
            error = _read_error(exc)
        await self.mailbox.send(QueryDone(batch, 2, result, error, epoch, self))  # type: ignore[arg-type]

    def _latest_values_done(self, batch: LatestBatch, result: Any, error: BaseException | None) -> None:
        ov = self.state
        for msg, cands, fallback in batch.items:
            if id(msg) not in ov.reads:
                continue
            if error is not None:
                ov.reads.pop(id(msg), None)
                msg.reply.fail(error)  # type: ignore[union-attr]
            else:
                self._merge_values(msg, cands, result, fallback)

    def _candidates(
        self, msg: Read, backend: list[CheckpointRec], before_at: int | None = None
    ) -> list[CheckpointRec] | None:
        """Merge the backend's checkpoints with the overlay's; None once ``msg`` is answered.

        Newest first by ``written_at`` (engine/clock.py), then id."""
        ov = self.state
        spec = msg.spec
        merged: dict[tuple[str, str, str], CheckpointRec] = {r.key: r for r in backend}
        for rec in ov.checkpoints(spec, before_at):
            merged[rec.key] = rec
        cands = [r for r in merged.values() if not ov.covered(r)]
        cands.sort(key=_newest_first, reverse=True)
        if not spec.with_values:
            if spec.limit is not None:
                cands = cands[: spec.limit]
            ov.reads.pop(id(msg), None)
            msg.reply.set([Bundle(c) for c in cands])  # type: ignore[union-attr]
            return None
        if spec.limit is not None and not spec.latest:
            cands = cands[: spec.limit]
        if spec.latest:
            cands = cands[:5]
        if not cands:
            ov.reads.pop(id(msg), None)
            if spec.latest and spec.checkpoint_id is None and spec.thread_ids is not None and not self.shared:
                key = (spec.thread_ids[0], spec.checkpoint_ns or "")
                self.views[key] = View(None, {}, {}, time.monotonic())
                self._trim()
            msg.reply.set(None if spec.latest else [])  # type: ignore[union-attr]
            return None
        return cands

    def _merge_checkpoints(self, msg: Read, backend: list[CheckpointRec], before_at: int | None = None) -> None:
        if msg.spec.latest and msg.spec.checkpoint_id is None and backend:
            self._know_read(max(backend, key=_newest_first))
        cands = self._candidates(msg, backend, before_at)
        if cands is not None:
            self._spawn(msg, 2, (cands, False))

    def _merge_values(
        self,
        msg: Read,
        cands: list[CheckpointRec],
        values: tuple[dict[tuple[str, str, str, str], BlobRec], dict[tuple[str, str, str], dict[tuple[str, int], WriteRec]]],
        fallback: bool = False,
    ) -> None:
        ov = self.state
        spec = msg.spec
        b_blobs, b_writes = values
        bundles: list[Bundle] = []
        for c in cands:
            tid, ns = c.thread_id, c.checkpoint_ns
            o_blobs = ov.blobs.get(tid, {})
            blobs: dict[tuple[str, str], BlobRec] = {}
            hidden = False
            for ch, ver in c.channel_versions.items():
                b = o_blobs.get((ns, ch, ver)) or b_blobs.get((tid, ns, ch, ver))
                if b is None:
                    continue
                if ov.row_covered(tid, b.written_at):
                    hidden = True  # a value a deletion removed: never a state without it
                    break
                blobs[(ch, ver)] = b
            if hidden:
                continue
            writes: dict[tuple[str, int], WriteRec] = dict(b_writes.get((tid, ns, c.checkpoint_id), {}))
            for (wns, wcid, task, idx), w in ov.writes.get(tid, {}).items():
                if wns == ns and wcid == c.checkpoint_id:
                    old = writes.get((task, idx))
                    writes[(task, idx)] = w if old is None else newer_write(old, w)
            wl = [w for w in writes.values() if w.complete and not ov.row_covered(tid, w.written_at)]
            wl.sort(key=lambda w: (w.task_path, w.task_id, w.idx))
            bundle = Bundle(c, blobs, wl)
            if bundle.visible():
                bundles.append(bundle)
        if fallback and not bundles:
            # a coalesced read saw only the backend's newest checkpoint, and it is
            # not complete yet: read this thread on its own (older ones count)
            self._spawn(msg, 1, None)
            return
        ov.reads.pop(id(msg), None)
        if spec.latest:
            best = bundles[0] if bundles else None
            if best is not None and spec.checkpoint_id is None and not self.shared:
                key = (best.checkpoint.thread_id, best.checkpoint.checkpoint_ns)
                self.views[key] = View(
                    best.checkpoint,
                    dict(best.blobs),
                    {(w.task_id, w.idx): w for w in best.writes},
                    time.monotonic(),
                )
                self._trim()
            msg.reply.set(best)  # type: ignore[union-attr]
        else:
            msg.reply.set(bundles)  # type: ignore[union-attr]

    # -- introspection -----------------------------------------------------

    def stats(self) -> dict[str, Any]:
        ov = self.state
        return {
            "overlay_records": len(ov.by_seq),
            "overlay_bytes": ov.nbytes,
            "views": len(self.views),
            "hits": ov.hits,
            "misses": ov.misses,
        }


def _read_error(exc: Exception) -> BackendError:
    """What a failed backend query tells its readers (the original as the cause)."""
    if isinstance(exc, BackendError):
        return exc
    error = BackendError(f"read failed: {exc!r}")
    error.__cause__ = exc
    return error


def _values_params(cands: list[CheckpointRec]) -> dict[str, Any]:
    return {
        "tids": sorted({c.thread_id for c in cands}),
        "channels": sorted({ch for c in cands for ch in c.channel_versions}),
        "versions": sorted({v for c in cands for v in c.channel_versions.values()}),
        "cids": sorted({c.checkpoint_id for c in cands}),
    }


def _indexed(values: tuple[dict[Any, BlobRec], dict[tuple[str, str, str, str, int], WriteRec]]) -> Any:
    """Blobs as they are; writes grouped by checkpoint (built in the query task, not the loop)."""
    blobs, writes = values
    by_ck: dict[tuple[str, str, str], dict[tuple[str, int], WriteRec]] = {}
    for (tid, ns, cid, task, idx), w in writes.items():
        by_ck.setdefault((tid, ns, cid), {})[(task, idx)] = w
    return blobs, by_ck


def _newest_first(rec: CheckpointRec) -> tuple[int, str]:
    return (rec.written_at, rec.checkpoint_id)


def _observe_checkpoints(clock: ThreadClock, rows: list[dict[str, Any]], make: Any) -> list[CheckpointRec]:
    """Checkpoint records from a checkpoints query's rows; the clock learns every
    stamp they carry, the threads' deletion times (``tomb_at`` rows) included."""
    out = []
    for row in rows:
        tomb_at = row.get("tomb_at")
        if tomb_at is not None:
            clock.observe(row["thread_id"], to_micros(tomb_at))
            continue
        rec = make(row)
        clock.observe(rec.thread_id, rec.written_at)
        out.append(rec)
    return out


def _observe_values(clock: ThreadClock, values: Any) -> Any:
    blobs, writes = values
    for rec in blobs.values():
        clock.observe(rec.thread_id, rec.written_at)
    for rec in writes.values():
        clock.observe(rec.thread_id, rec.written_at)
    return values


def _header(row: dict[str, Any]) -> CheckpointRec:
    return CheckpointRec(
        thread_id=row["thread_id"],
        checkpoint_ns=row["checkpoint_ns"] or "",
        checkpoint_id=row["checkpoint_id"],
        parent_checkpoint_id=row.get("parent_checkpoint_id") or "",
        run_id=row.get("run_id") or "",
        channel_versions={},
        new_versions={},
        metadata_json=b"{}",
        payload_type="",
        payload=b"",
        written_at=to_micros(row["written_at"]),
    )
