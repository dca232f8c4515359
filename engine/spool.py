"""The spool: durable acceptance (``durability="spool"``).

A put returns once its records are in a local append-only file, fsync'd. Many
concurrent puts share one fsync (group commit): the batcher *admits* each put
(appends its pre-encoded payload to a shared in-memory list, which costs no
I/O), and one writer task takes the whole list, writes it and fsyncs it in a
worker thread, then completes every put in the group at once. The put's reply
is held until both the query cache's overlay has the records and the writer
has committed them (:class:`JoinReply`), so ``aput`` returning means "readable
here, and on disk".

Files. A directory of *segments* ``spool-<number>.log``, each a header
(:data:`SEGMENT_HEADER`) then records framed as::

    magic (4 bytes) | length (u32 LE) | crc32(length bytes + payload) (u32 LE) | payload

where the payload is the orjson encoding of the put's records
(:func:`encode_records`; their payload bytes as base64 text). The active segment is sealed once it reaches
``spool_segment_bytes``; a sealed segment is deleted once every record in it is
confirmed ingested (each spooled put carries a :class:`SpoolTicket` that the
ingestor resolves row by row, like a ``durability="ingested"`` ticket). On a
clean close, after the final flush, every segment is deleted.

Replay. On start, before the engine accepts new puts, the segments left by a
previous run are read in order, each record's checksum verified, and the
records fed back through the normal put path (batcher and overlay). A torn or
corrupt record (power loss mid-write) fails its checksum: it is skipped with a
warning, never replayed as garbage; reading resumes at the next valid record
(the magic marks record starts), so one bad record costs only itself. A
replayed record stays in its old segment, which is deleted once all of them
are ingested. Replaying a record the backend already has is harmless (reads
deduplicate), and replayed tombstones keep their ``deleted_at``, so they hide
exactly the rows they hid before (coverage is by timestamp, not arrival).

Blocking file I/O (open, write, fsync, unlink) runs in one worker thread at a
time (``anyio.to_thread`` with a limiter of 1), never on the event loop.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import orjson

from .errors import ConfigError, SpoolError
from .records import BlobRec, CheckpointRec, Record, TombstoneRec, TouchRec, WriteRec, b64decode, b64encode, json_bytes

try:  # pragma: no cover - platform
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory lock
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("langgraph.checkpoint.kusto.spool")

SEGMENT_HEADER = b"LGKSPL01"
RECORD_MAGIC = b"\xd5\x8aSR"
_FRAME = struct.Struct("<4sII")
_LEN = struct.Struct("<I")
#: a record longer than this is taken as corruption of its length field
MAX_RECORD_BYTES = 1 << 30
_SEGMENT_RE = re.compile(r"^spool-(\d{12})\.log$")
LOCK_NAME = "LOCK"


# -- encoding records --------------------------------------------------------------


def encode_records(records: list[Record]) -> bytes:
    """One put's records as bytes (runs in the sender's task, like all encoding)."""
    out: list[Any] = []
    for r in records:
        if isinstance(r, CheckpointRec):
            out.append([
                "c", r.thread_id, r.checkpoint_ns, r.checkpoint_id, r.parent_checkpoint_id, r.run_id,
                r.channel_versions, r.new_versions, orjson.Fragment(r.metadata_json), r.payload_type,
                b64encode(r.payload), r.written_at,
            ])
        elif isinstance(r, BlobRec):
            out.append([
                "b", r.thread_id, r.checkpoint_ns, r.channel, r.version, r.payload_type, b64encode(r.payload),
                r.written_at,
            ])
        elif isinstance(r, WriteRec):
            out.append([
                "w", r.thread_id, r.checkpoint_ns, r.checkpoint_id, r.task_id, r.task_path, r.idx,
                r.channel, r.payload_type, b64encode(r.payload), r.written_at,
            ])
        elif isinstance(r, TouchRec):
            out.append(["r", r.thread_id, r.checkpoint_ns, r.checkpoint_id, r.written_at])
        else:
            out.append(["t", r.scope, r.thread_id, r.checkpoint_ns, r.checkpoint_id, r.run_id, r.deleted_at])
    return orjson.dumps(out)


def decode_records(payload: bytes) -> list[Record]:
    """The inverse of :func:`encode_records` (fresh records, ``seq`` unset)."""
    out: list[Record] = []
    for item in orjson.loads(payload):
        kind = item[0]
        if kind == "c":
            out.append(CheckpointRec(
                item[1], item[2], item[3], item[4], item[5], item[6], item[7],
                json_bytes(item[8]), item[9], b64decode(item[10]), item[11],
            ))
        elif kind == "b":
            out.append(BlobRec(*item[1:6], b64decode(item[6]), item[7]))
        elif kind == "w":
            out.append(WriteRec(*item[1:9], b64decode(item[9]), item[10]))
        elif kind == "t":
            out.append(TombstoneRec(*item[1:7]))
        elif kind == "r":
            out.append(TouchRec(*item[1:5]))
        else:
            raise ValueError(f"unknown spool record kind {kind!r}")
    return out


def frame(payload: bytes) -> bytes:
    n = _LEN.pack(len(payload))
    return RECORD_MAGIC + n + _LEN.pack(zlib.crc32(payload, zlib.crc32(n))) + payload


@dataclass
class ReadResult:
    payloads: list[bytes]
    #: bytes skipped as torn or corrupt
    dropped: int
    #: description of each bad region (offset, length, why)
    problems: list[str]


def read_segment(data: bytes) -> ReadResult:
    """Every record of a segment file whose checksum holds; what does not is skipped."""
    payloads: list[bytes] = []
    problems: list[str] = []
    dropped = 0
    if len(data) < len(SEGMENT_HEADER) or data[: len(SEGMENT_HEADER)] != SEGMENT_HEADER:
        if data:
            problems.append(f"bad or torn segment header ({len(data)} bytes)")
        return ReadResult([], len(data), problems)
    pos = len(SEGMENT_HEADER)
    end = len(data)
    bad_from: int | None = None
    first_why = ""
    while pos < end:
        why = _check_record(data, pos)
        if why is None:
            if bad_from is not None:
                problems.append(f"{pos - bad_from} corrupt bytes at offset {bad_from}")
                dropped += pos - bad_from
                bad_from = None
            length = _LEN.unpack_from(data, pos + 4)[0]
            start = pos + _FRAME.size
            payloads.append(data[start : start + length])
            pos = start + length
            continue
        if bad_from is None:
            bad_from = pos
            first_why = why
        nxt = data.find(RECORD_MAGIC, pos + 1)
        pos = end if nxt < 0 else nxt
    if bad_from is not None:
        problems.append(f"torn or corrupt tail: {end - bad_from} bytes at offset {bad_from} ({first_why})")
        dropped += end - bad_from
    return ReadResult(payloads, dropped, problems)


def _check_record(data: bytes, pos: int) -> str | None:
    if len(data) - pos < _FRAME.size:
        return "truncated frame header"
    magic, length, crc = _FRAME.unpack_from(data, pos)
    if magic != RECORD_MAGIC:
        return "no record marker"
    if length > MAX_RECORD_BYTES:
        return "impossible length"
    start = pos + _FRAME.size
    if start + length > len(data):
        return "truncated payload"
    if zlib.crc32(memoryview(data)[start : start + length], zlib.crc32(data[pos + 4 : pos + 8])) != crc:
        return "checksum mismatch"
    return None


# -- the put's side: tickets and replies --------------------------------------------


class JoinReply:
    """The reply the query cache sees for a spooled put: the caller's reply is set
    once the overlay has the records (``set``) *and* the spool committed them
    (``commit``); a failure of either fails it at once. Idempotent on both sides,
    so a redelivered put does not complete it early."""

    __slots__ = ("target", "accepted", "committed")

    def __init__(self, target: Any) -> None:
        self.target = target
        self.accepted = False
        self.committed = False

    @property
    def done(self) -> bool:
        return self.target is None or self.target.done

    def set(self, value: Any = None) -> None:
        self.accepted = True
        if self.committed and self.target is not None:
            self.target.set(None)

    def commit(self) -> None:
        self.committed = True
        if self.accepted and self.target is not None:
            self.target.set(None)

    def fail(self, error: BaseException) -> None:
        if self.target is not None:
            self.target.fail(error)


class SpoolTicket:
    """Rides the put's rows through batcher and ingestor like an "ingested" ticket
    (``done_rows`` on success, ``reply.fail`` on failure); when every row is
    ingested the record is confirmed and its segment may go. Wraps the put's own
    ticket, if any (a tombstone's, which compaction waits for)."""

    __slots__ = ("spool", "remaining", "inner", "segment", "confirmed", "failed")

    def __init__(self, spool: Spool, rows: int, inner: Any) -> None:
        self.spool = spool
        self.remaining = rows
        self.inner = inner
        #: the segment holding the record, once written (None: pending or not on disk)
        self.segment: Segment | None = None
        self.confirmed = False
        self.failed = False

    @property
    def reply(self) -> SpoolTicket:
        return self

    def done_rows(self, n: int) -> None:
        if self.inner is not None:
            self.inner.done_rows(n)
        self.remaining -= n
        if self.remaining <= 0 and not self.confirmed:
            self.confirmed = True
            self.spool._confirmed(self)

    def fail(self, error: BaseException) -> None:
        if self.inner is not None:
            self.inner.reply.fail(error)
        if not self.failed:
            # the record stays in its segment: the next start replays it
            self.failed = True
            self.spool.failed_records += 1


class SpoolEntry:
    """One admitted put waiting for (or past) the writer."""

    __slots__ = ("payload", "ticket", "join")

    def __init__(self, payload: bytes, ticket: SpoolTicket, join: JoinReply) -> None:
        self.payload = payload
        self.ticket = ticket
        self.join = join


@dataclass(eq=False)
class Segment:
    number: int
    path: str
    size: int = 0
    #: records written here and not yet confirmed ingested
    live: int = 0
    sealed: bool = False
    fd: int | None = None


# -- where -----------------------------------------------------------------------------


def spool_dir_for(config: Any, backend: Any) -> str | None:
    """The spool directory of this engine, or None.

    ``spool_dir`` when set; otherwise the backend's default (the embedded store:
    next to its DuckDB file). ``durability="spool"`` without either is a
    ConfigError: a remote backend or an in-memory store has no place for it.
    """
    if config.spool_dir is not None:
        return os.fspath(config.spool_dir)
    default = getattr(backend, "default_spool_dir", None)
    if isinstance(default, str) and default:
        return default
    if config.durability == "spool":
        raise ConfigError(
            "durability='spool' needs spool_dir: this backend has no default place for the spool "
            "(the embedded store defaults to '<file>.spool' next to its DuckDB file; an in-memory "
            "store or a Kusto cluster needs spool_dir set to a local directory)"
        )
    return None


# -- the spool ---------------------------------------------------------------------------


class Spool:
    def __init__(self, directory: str, *, segment_bytes: int, writing: bool) -> None:
        self.dir = directory
        self.segment_bytes = segment_bytes
        #: False: only replay what a previous run left (durability is not "spool")
        self.writing = writing
        self.segments: dict[int, Segment] = {}
        self.active = False
        self._current: Segment | None = None
        self._next_number = 1
        self._pending: list[SpoolEntry] = []
        self._pending_bytes = 0
        self._doomed: list[Segment] = []
        self._wake: anyio.Event | None = None
        self._stopped: anyio.Event | None = None
        self._stopping = False
        self._limiter = anyio.CapacityLimiter(1)
        self._lock_fd: int | None = None
        self._to_replay: list[Segment] = []
        # counters (Engine.stats)
        self.fsyncs = 0
        self.bytes_written = 0
        self.records_written = 0
        #: admitted puts ingested before their group was written (not written at all)
        self.skipped_records = 0
        self.replayed_records = 0
        self.dropped_bytes = 0
        self.write_errors = 0
        self.failed_records = 0

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> bool:
        """Lock the directory and find what a previous run left; False if there is
        nothing to do (replay-only and no directory)."""
        self.segments = {}
        self._current = None
        self._limiter = anyio.CapacityLimiter(1)  # of this event loop
        self._pending = []
        self._doomed = []
        self._stopping = False
        try:
            found = await anyio.to_thread.run_sync(self._open_sync, limiter=self._limiter)
        except OSError as exc:
            raise SpoolError(f"cannot open the spool directory {self.dir!r}: {exc}") from exc
        if found is None:
            return False
        for number, path, size in found:
            self.segments[number] = Segment(number, path, size, sealed=True)
            self._next_number = max(self._next_number, number + 1)
        self._to_replay = list(self.segments.values())
        self._wake = anyio.Event()
        self._stopped = anyio.Event()
        self.active = True
        return True

    def _open_sync(self) -> list[tuple[int, str, int]] | None:
        if not self.writing and not os.path.isdir(self.dir):
            return None
        os.makedirs(self.dir, exist_ok=True)
        if fcntl is not None:
            fd = os.open(os.path.join(self.dir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise SpoolError(
                    f"the spool directory {self.dir!r} is in use by another engine "
                    "(each engine, in this process or another, needs its own spool_dir)"
                ) from None
            self._lock_fd = fd
        found = []
        for name in os.listdir(self.dir):
            m = _SEGMENT_RE.match(name)
            if m:
                path = os.path.join(self.dir, name)
                found.append((int(m.group(1)), path, os.path.getsize(path)))
        found.sort()
        return found

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """The writer: commits admitted puts in groups and deletes finished segments."""
        assert self._wake is not None and self._stopped is not None
        task_status.started()
        try:
            while True:
                while not self._pending and not self._doomed:
                    if self._stopping:
                        return
                    await self._wake.wait()
                    self._wake = anyio.Event()
                if self._doomed:
                    doomed, self._doomed = self._doomed, []
                    await anyio.to_thread.run_sync(_unlink_all, doomed, limiter=self._limiter)
                if self._pending:
                    await self._commit_group()
        finally:
            self._stopped.set()

    async def close(self, *, trim: bool) -> None:
        """Stop the writer (after it committed what is pending) and release the files.

        ``trim``: the engine flushed; delete every segment whose records are all
        ingested (after a clean run: all of them, and the directory if empty).
        """
        if not self.active:
            return
        self.active = False
        with anyio.CancelScope(shield=True):
            self._stopping = True
            if self._wake is not None:
                self._wake.set()
            if trim and self._stopped is not None:
                await self._stopped.wait()
            keep_all = not trim or bool(self._pending)
            await anyio.to_thread.run_sync(self._close_sync, keep_all, limiter=self._limiter)

    def _close_sync(self, keep_all: bool) -> None:
        for seg in list(self.segments.values()):
            _close_fd(seg)
            if not keep_all and seg.live == 0:
                _unlink(seg.path)
                del self.segments[seg.number]
        for seg in self._doomed:
            _unlink(seg.path)
        self._doomed = []
        self._current = None
        if self._lock_fd is not None:
            if not self.segments:
                _unlink(os.path.join(self.dir, LOCK_NAME))
            os.close(self._lock_fd)
            self._lock_fd = None
            if not self.segments:
                try:
                    os.rmdir(self.dir)
                except OSError:
                    pass  # not empty: someone else's files

    # -- replay ---------------------------------------------------------------------

    async def replay(self, runtime: Any) -> int:
        """Feed what a previous run left through the normal put path (batcher, then
        overlay), segment by segment, oldest first, and wait until the overlay has
        it all. Returns the records replayed."""
        from .actors.deleter import make_put  # the deleter imports this module

        batcher = runtime.mailbox("batcher")
        replies: list[Any] = []

        async def send(records: list[Record], ticket: SpoolTicket) -> None:
            put = make_put(runtime, records, runtime.reply(), spooled=False)
            ticket.remaining = len(put.rows)
            put.ticket = ticket
            await batcher.send(put)
            replies.append(put.reply)

        total = 0
        for seg in self._to_replay:
            res, loaded = await anyio.to_thread.run_sync(_load_segment, seg.path, limiter=self._limiter)
            self.dropped_bytes += res.dropped
            for p in res.problems:
                log.warning("spool %s: %s; dropped, not replayed", seg.path, p)
            # pinned while its records are sent, so that the first ones being ingested
            # never make it look finished before the last ones are on their way
            seg.live += 1
            for records in loaded:
                ticket = SpoolTicket(self, 0, None)
                ticket.segment = seg
                seg.live += 1
                await send(records, ticket)
                total += 1
                self.replayed_records += 1
            seg.live -= 1
            if seg.live == 0:
                self._doom(seg)
        self._to_replay = []
        for reply in replies:
            await reply.wait()
        if total:
            log.info("spool %s: replayed %d record(s) left by the previous run", self.dir, total)
        return total

    # -- admission (the batcher) -------------------------------------------------------

    def admit(self, msg: Any) -> JoinReply:
        """Queue the put's payload for the next group commit; returns the reply the
        query cache must answer (it completes the caller's once committed too)."""
        state = msg.spool
        if isinstance(state, SpoolEntry):  # redelivered after a crash: admitted already
            return state.join
        ticket = SpoolTicket(self, len(msg.rows), msg.ticket)
        msg.ticket = ticket
        entry = SpoolEntry(state, ticket, JoinReply(msg.reply))
        msg.spool = entry
        if not self.active or self._stopping:
            entry.join.fail(SpoolError("the spool is closed"))
            return entry.join
        self._pending.append(entry)
        self._pending_bytes += len(state)
        assert self._wake is not None
        self._wake.set()
        return entry.join

    # -- the writer ------------------------------------------------------------------

    async def _commit_group(self) -> None:
        group, self._pending = self._pending, []
        self._pending_bytes = 0
        seg = self._current
        todo: list[SpoolEntry] = []
        try:
            if seg is None and any(not e.ticket.confirmed for e in group):
                number = self._next_number
                self._next_number += 1
                seg = await anyio.to_thread.run_sync(self._new_segment_sync, number, limiter=self._limiter)
                self.segments[number] = seg
                self._current = seg
            # after the last await before the write: a put ingested by now is durable
            # in the backend and is not written (nor counted in the segment)
            todo = [e for e in group if not e.ticket.confirmed]
            self.skipped_records += len(group) - len(todo)
            if not todo:
                for e in group:
                    e.join.commit()
                return
            assert seg is not None
            for e in todo:
                e.ticket.segment = seg
                seg.live += 1
            payloads = [e.payload for e in todo]
            written, sealed = await anyio.to_thread.run_sync(
                self._append_sync, seg, payloads, limiter=self._limiter
            )
        except Exception as exc:  # noqa: BLE001 - failed back to every put of the group
            self._write_failed(seg, todo, exc)
            error = SpoolError(f"could not write the spool in {self.dir!r}: {exc}")
            error.__cause__ = exc
            for e in group:
                e.join.fail(error)
            return
        # no await from here on: the group's accounting is atomic for the loop
        seg.size += written
        self.fsyncs += 1
        self.bytes_written += written
        self.records_written += len(todo)
        for e in todo:
            e.payload = b""
        if sealed:
            seg.sealed = True
            self._current = None
            if seg.live == 0:
                self._doom(seg)
        for e in group:
            e.join.commit()

    def _write_failed(self, seg: Segment | None, todo: list[SpoolEntry], exc: BaseException) -> None:
        self.write_errors += 1
        log.error("spool %s: write failed, %d put(s) not made durable: %r", self.dir, len(todo), exc)
        if seg is None:
            return
        for e in todo:
            if e.ticket.segment is seg:
                e.ticket.segment = None
                if not e.ticket.confirmed:
                    seg.live -= 1
        if seg.fd is None:  # _append_sync could not cut the tail off: append no more here
            seg.sealed = True
            self._current = None
            if seg.live == 0:
                self._doom(seg)

    def _new_segment_sync(self, number: int) -> Segment:
        path = os.path.join(self.dir, f"spool-{number:012d}.log")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        try:
            _write_all(fd, SEGMENT_HEADER)
            os.fsync(fd)
            _fsync_dir(self.dir)
        except BaseException:
            os.close(fd)
            _unlink(path)
            raise
        return Segment(number, path, len(SEGMENT_HEADER), fd=fd)

    def _append_sync(self, seg: Segment, payloads: list[bytes]) -> tuple[int, bool]:
        assert seg.fd is not None
        data = b"".join(frame(p) for p in payloads)
        try:
            _write_all(seg.fd, data)
            _datasync(seg.fd)
        except BaseException:
            # whatever reached the file past seg.size is no committed record: cut it
            # off, or (if even that fails) close the segment for appends
            try:
                os.ftruncate(seg.fd, seg.size)
            except OSError:
                _close_fd(seg)
            raise
        sealed = seg.size + len(data) >= self.segment_bytes
        if sealed:
            _close_fd(seg)
        return len(data), sealed

    # -- confirmation (the ingestor, through SpoolTicket) ------------------------------

    def _confirmed(self, ticket: SpoolTicket) -> None:
        seg = ticket.segment
        if seg is None:
            return  # not written yet (the writer skips it) or never made durable
        seg.live -= 1
        if seg.live == 0 and seg.sealed:
            self._doom(seg)

    def _doom(self, seg: Segment) -> None:
        if self.segments.pop(seg.number, None) is None:
            return
        self._doomed.append(seg)
        if self._wake is not None:
            self._wake.set()

    # -- introspection ----------------------------------------------------------------

    def live_records(self) -> int:
        return sum(s.live for s in self.segments.values())

    def stats(self) -> dict[str, Any]:
        return {
            "spool_fsyncs": self.fsyncs,
            "spool_records": self.live_records(),
            "spool_bytes": sum(s.size for s in self.segments.values()),
            "spool_segments": len(self.segments),
            "spool_pending_bytes": self._pending_bytes,
            "spool_bytes_written": self.bytes_written,
            "spool_records_written": self.records_written,
            "spool_records_skipped": self.skipped_records,
            "spool_replayed": self.replayed_records,
            "spool_dropped_bytes": self.dropped_bytes,
            "spool_write_errors": self.write_errors,
        }


EMPTY_STATS = {
    "spool_fsyncs": 0,
    "spool_records": 0,
    "spool_bytes": 0,
    "spool_segments": 0,
    "spool_pending_bytes": 0,
    "spool_bytes_written": 0,
    "spool_records_written": 0,
    "spool_records_skipped": 0,
    "spool_replayed": 0,
    "spool_dropped_bytes": 0,
    "spool_write_errors": 0,
}


# -- blocking helpers (worker thread only) ---------------------------------------------


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _datasync(fd: int) -> None:
    sync = getattr(os, "fdatasync", os.fsync)
    sync(fd)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _close_fd(seg: Segment) -> None:
    fd, seg.fd = seg.fd, None
    if fd is not None:
        try:
            os.close(fd)
        except OSError:  # pragma: no cover
            pass


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _unlink_all(segments: list[Segment]) -> None:
    for seg in segments:
        _close_fd(seg)
        _unlink(seg.path)


def _load_segment(path: str) -> tuple[ReadResult, list[list[Record]]]:
    """Read, check and decode one segment file (worker thread)."""
    with open(path, "rb") as f:
        data = f.read()
    res = read_segment(data)
    del data
    loaded = []
    for payload in res.payloads:
        try:
            loaded.append(decode_records(payload))
        except Exception as exc:  # noqa: BLE001 - a valid checksum over bad content
            res.problems.append(f"undecodable record ({len(payload)} bytes): {exc!r}")
            res.dropped += len(payload)
    res.payloads = []
    return res, loaded


def iter_segment_files(directory: str) -> Iterator[str]:
    """Segment files in ``directory`` (tests, tools)."""
    if not os.path.isdir(directory):
        return
    for name in sorted(os.listdir(directory)):
        if _SEGMENT_RE.match(name):
            yield os.path.join(directory, name)
