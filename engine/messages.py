"""The messages actors exchange. Plain data: strings, bytes, records, reply slots.

A message a caller sends on behalf of a saver call (``Put``, ``Read``, the deletes)
carries ``trace``: the caller's OpenTelemetry context when its span is recording
(an SDK is configured and sampled it), else None. It is taken in the constructor,
which runs in the sender's task, so it crosses the mailbox with the message: the
receiving actor's work becomes a child span of the call (:mod:`..actor`), a backend
query a child span of the read, and a batch's ingest span links to its puts' spans.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from ..telemetry.instruments import capture
from .mailbox import Message, Reply
from .records import Record, Rows


class Ticket:
    """Tracks one put until every one of its rows is ingested (durability="ingested")."""

    __slots__ = ("remaining", "reply")

    def __init__(self, remaining: int, reply: Reply[Any]) -> None:
        self.remaining = remaining
        self.reply = reply

    def done_rows(self, n: int) -> None:
        self.remaining -= n
        if self.remaining <= 0:
            self.reply.set(None)


# -- to the batcher ---------------------------------------------------------


class Put(Message):
    __slots__ = ("records", "rows", "nbytes", "ticket", "update_views", "accepted", "waited", "queued", "trace", "spool")

    def __init__(
        self,
        records: list[Record],
        rows: list[tuple[Record, int, int]],
        nbytes: int,
        reply: Reply[Any] | None,
        ticket: Ticket | None = None,
        update_views: bool = True,
        spool: bytes | None = None,
    ) -> None:
        super().__init__(reply)
        self.records = records
        #: (record, part, bytes counted against the memory bound) per physical row
        self.rows = rows
        self.nbytes = nbytes
        self.ticket = ticket
        self.update_views = update_views
        #: the sender already handed the records to the query cache (fast path)
        self.accepted = False
        #: sent by ``Engine.put`` the slow way (durability="spool"): its bytes count as
        #: queued once the batcher takes it
        self.waited = False
        #: its bytes are in ``BatcherState.queued_bytes`` until the batcher buffers its rows
        self.queued = False
        self.trace = capture()
        #: durability="spool": the records encoded for the spool (bytes), then, once
        #: the batcher admitted the put, its spool entry; None: not spooled
        self.spool: Any = spool


class Flush(Message):
    __slots__ = ()


class Tick(Message):
    __slots__ = ()
    redeliverable = False


# -- to the ingestor --------------------------------------------------------


@dataclass(slots=True)
class Batch:
    batch_id: int
    table: str
    #: the rows as the puts brought them, ``(record, part, size)``; their dicts are
    #: built by :meth:`materialize` only when the batch is ingested
    refs: list[tuple[Record, int, int]]
    tickets: list[Ticket]
    nbytes: int
    attempts: int = 0
    #: the traced puts whose rows this batch carries (telemetry.Links), for span links
    links: Any = None

    def materialize(self, cell_limit: int) -> Rows:
        """The backend's rows (dicts, see ``engine.backends.base``), built as they are read."""
        return Rows(self.refs, cell_limit)

    def seqs(self) -> list[int]:
        """The acceptance sequence number of each row's record (the cache counts rows per record)."""
        return [ref[0].seq for ref in self.refs]


class IngestBatch(Message):
    __slots__ = ("batch",)

    def __init__(self, batch: Batch) -> None:
        super().__init__(None)
        self.batch = batch


class Drain(Message):
    """Replies once every batch sent before it is done."""

    __slots__ = ()


# -- to the query cache -----------------------------------------------------


class Accept(Message):
    __slots__ = ("records", "update_views")

    def __init__(self, records: list[Record], reply: Reply[Any] | None, update_views: bool) -> None:
        super().__init__(reply)
        self.records = records
        self.update_views = update_views


class Ingested(Message):
    __slots__ = ("seqs", "error")

    def __init__(self, seqs: list[int], error: BaseException | None = None) -> None:
        super().__init__(None)
        self.seqs = seqs
        self.error = error


@dataclass(slots=True)
class ReadSpec:
    """A read: one thread (or all), one namespace (or all), filters, limit."""

    thread_ids: tuple[str, ...] | None
    checkpoint_ns: str | None
    checkpoint_id: str | None = None
    before: str | None = None
    limit: int | None = None
    with_values: bool = True
    #: get_tuple without checkpoint_id: the latest visible checkpoint, cached
    latest: bool = False
    #: metadata (key, text) pairs every checkpoint must have, evaluated by the backend
    #: (``tostring(metadata[key]) == text``: a superset of an exact match, which the
    #: caller applies to what comes back)
    metadata: tuple[tuple[str, str], ...] = ()


class Read(Message):
    __slots__ = ("spec", "trace")

    def __init__(self, spec: ReadSpec, reply: Reply[Any]) -> None:
        super().__init__(reply)
        self.spec = spec
        self.trace = capture()


class QueryDone(Message):
    __slots__ = ("request", "stage", "result", "error", "epoch", "owner")

    def __init__(
        self, request: Read, stage: int, result: Any, error: BaseException | None, epoch: int, owner: Any = None
    ) -> None:
        super().__init__(None)
        self.request = request
        self.stage = stage
        self.result = result
        self.error = error
        self.epoch = epoch
        #: the cache incarnation that ran the query; a later one ignores the answer
        #: (it ran the read again, and the overlay no longer protects a stale result)
        self.owner = owner


# -- to the deleter ---------------------------------------------------------


class DeleteThreads(Message):
    __slots__ = ("thread_ids", "trace")

    def __init__(self, thread_ids: list[str], reply: Reply[Any]) -> None:
        super().__init__(reply)
        self.trace = capture()
        self.thread_ids = thread_ids


class DeleteRuns(Message):
    __slots__ = ("run_ids", "trace")

    def __init__(self, run_ids: list[str], reply: Reply[Any]) -> None:
        super().__init__(reply)
        self.trace = capture()
        self.run_ids = run_ids


class Prune(Message):
    __slots__ = ("thread_ids", "strategy", "trace", "keep")

    def __init__(
        self, thread_ids: list[str], strategy: str, reply: Reply[Any],
        keep: frozenset[tuple[str, str, str]] = frozenset(),
    ) -> None:
        super().__init__(reply)
        self.trace = capture()
        self.thread_ids = thread_ids
        self.strategy = strategy
        #: keep_latest: (thread, namespace, checkpoint) kept besides each namespace's
        #: latest, the parent chain a DeltaChannel's value is rebuilt from
        self.keep = keep


class CopyThread(Message):
    __slots__ = ("source", "target", "trace")

    def __init__(self, source: str, target: str, reply: Reply[Any]) -> None:
        super().__init__(reply)
        self.trace = capture()
        self.source = source
        self.target = target


class Compact(Message):
    __slots__ = ()
    redeliverable = False


class Expire(Message):
    """The expiry ticker's (ttl): run a leased expiry pass."""

    __slots__ = ()
    redeliverable = False


class Forget(Message):
    """To the query cache: drop what it keeps of these threads (the expiry's, once its
    tombstones are in the backend)."""

    __slots__ = ("thread_ids",)
    redeliverable = False

    def __init__(self, thread_ids: list[str]) -> None:
        super().__init__(None)
        self.thread_ids = thread_ids


class Touch(Message):
    """A read of a thread's state (ttl_refresh_on_read): its activity, for expiry."""

    __slots__ = ("thread_id", "checkpoint_ns", "checkpoint_id")
    redeliverable = False

    def __init__(self, thread_id: str, checkpoint_ns: str, checkpoint_id: str) -> None:
        super().__init__(None)
        self.thread_id = thread_id
        self.checkpoint_ns = checkpoint_ns
        self.checkpoint_id = checkpoint_id


@dataclass
class DeleterState:
    #: this engine's tombstones not yet ingested (the pending-tombstones gauge; compaction
    #: itself reads what is pending from the Tombstones table)
    pending: list[Any] = field(default_factory=list)
    compacted: int = 0
    #: this engine's name in compaction lease claims (Compactions table)
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    #: why compaction is off for good in this engine (e.g. the service refuses soft delete)
    compaction_off: str | None = None
    #: prune / copy_thread requests being worked on in child tasks, by id: a crash
    #: cancels those tasks, and the next incarnation starts them again
    running: dict[int, Any] = field(default_factory=dict)
    #: threads expired by this engine's expiry passes (ttl)
    expired: int = 0
    #: rows compaction removed physically (as the backend counted them)
    rows_removed: int = 0
    #: the last expiry pass this engine ran: live threads, and the oldest one's last
    #: activity (epoch microseconds; None: no pass yet, or no live thread)
    live_threads: int | None = None
    oldest_live_at: int | None = None
    #: ttl_refresh_on_read: when this engine last wrote a touch per thread (monotonic s)
    touched: dict[str, float] = field(default_factory=dict)
