"""Logical records the engine moves around, and the rows they become.

A *record* is one logical value (a checkpoint, a channel blob, a pending write, a
tombstone). It is built and encoded by the caller (the saver facade), so actors
only move strings and bytes. A record becomes one or more physical *rows* of the
tables in :mod:`.schema` (payloads over ``cell_limit`` are split into chunks).

Times are integers: microseconds since the Unix epoch, UTC.

Payloads (serialized values) are ``bytes`` in records: the saver hands the
serializer's bytes over as they are and reads decode them as they are. Kusto
has no binary type, so the Kusto backend sends them as base64 text; the
embedded store keeps them as BLOBs. A payload is split into chunks of
:func:`chunk_bytes` bytes, a multiple of 3, so each chunk's base64 text fits
``cell_limit`` characters and the chunks' texts concatenate to the whole
value's text.
"""

from __future__ import annotations

import binascii
import datetime as dt
import itertools
import operator
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import orjson
import pybase64

from . import schema

_seq = itertools.count(1)
_last_us = 0


def next_seq() -> int:
    """Process-wide acceptance order of records (tombstones compare against it)."""
    return next(_seq)


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def us_to_datetime(us: int) -> dt.datetime:
    """Exact conversion of epoch microseconds to an aware UTC datetime."""
    return _EPOCH + dt.timedelta(microseconds=us)


def to_micros(value: Any) -> int:
    """Epoch microseconds of a datetime (naive means UTC) or of an int already."""
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    delta = value - _EPOCH.replace(tzinfo=None)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def now_us() -> int:
    """Strictly increasing wall-clock microseconds within this process."""
    global _last_us
    t = time.time_ns() // 1000
    if t <= _last_us:
        t = _last_us + 1
    _last_us = t
    return t


def json_bytes(value: Any) -> bytes:
    """``orjson.dumps`` for a value a record keeps (metadata).

    orjson hands its output back in a buffer much larger than the document (orjson
    3.13: 4 KB for 53 bytes, 32 KB for 3 KB, 1 MB for 100 KB); a record held in the
    overlay or the cache would keep that whole buffer, so this copies it into an
    object of its own size."""
    return bytes(memoryview(orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)))


def b64encode(data: bytes) -> str:
    """Base64 text of a payload (pybase64: SIMD, ~30x binascii on 10-100 KB values)."""
    return pybase64.b64encode_as_string(data)


def b64decode(text: str) -> bytes:
    """A payload from its base64 text; tolerates what strict base64 refuses (line breaks)."""
    if not text:
        return b""
    try:
        return pybase64.b64decode(text, validate=True)
    except binascii.Error:  # not strict base64 (e.g. a line break): binascii's lenient decoder
        return binascii.a2b_base64(text)


def payload_bytes(value: Any) -> bytes:
    """A payload cell as a backend returns it: bytes (a BLOB) or base64 text (Kusto)."""
    if value is None:
        return b""
    if isinstance(value, str):
        return b64decode(value)
    return bytes(value)


def chunk_bytes(cell_limit: int) -> int:
    """Bytes of payload per row: a multiple of 3 whose base64 text fits ``cell_limit``."""
    return cell_limit // 4 * 3  # EngineConfig keeps cell_limit >= 4


def encoded_len(nbytes: int) -> int:
    """Characters of the base64 text of ``nbytes`` bytes."""
    return 4 * ((nbytes + 2) // 3)


class JsonText(bytes):
    """An already-encoded JSON value bound for a ``dynamic`` column."""

    __slots__ = ()


@dataclass(slots=True)
class CheckpointRec:
    thread_id: str
    checkpoint_ns: str
    checkpoint_id: str
    parent_checkpoint_id: str
    run_id: str
    channel_versions: dict[str, str]
    new_versions: dict[str, str]
    metadata_json: bytes
    payload_type: str
    payload: bytes
    written_at: int
    seq: int = 0

    table = schema.CHECKPOINTS.name

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.thread_id, self.checkpoint_ns, self.checkpoint_id)

    @property
    def nbytes(self) -> int:
        return len(self.payload) + len(self.metadata_json) + 256

    def parts(self, cell_limit: int) -> int:
        return 1  # the saver refuses a checkpoint body over cell_limit

    def row(self, part: int, cell_limit: int) -> dict[str, Any]:
        return {
            "thread_id": self.thread_id,
            "checkpoint_ns": self.checkpoint_ns,
            "checkpoint_id": self.checkpoint_id,
            "parent_checkpoint_id": self.parent_checkpoint_id,
            "run_id": self.run_id,
            "channel_versions": self.channel_versions,
            "new_versions": self.new_versions,
            "metadata": JsonText(self.metadata_json),
            "payload_type": self.payload_type,
            "payload": self.payload,
            "written_at": self.written_at,
        }


def _parts(payload: bytes, cell_limit: int) -> int:
    """How many rows (chunks of base64 text of at most ``cell_limit`` characters) a payload takes."""
    return max(1, -(-len(payload) // chunk_bytes(cell_limit)))


def _part(payload: bytes, part: int, cell_limit: int) -> bytes:
    step = chunk_bytes(cell_limit)
    if len(payload) <= step:
        return payload
    return payload[part * step : (part + 1) * step]


@dataclass(slots=True)
class BlobRec:
    thread_id: str
    checkpoint_ns: str
    channel: str
    version: str
    payload_type: str
    payload: bytes
    written_at: int
    seq: int = 0
    #: False when read from a backend with chunks missing: not yet visible
    complete: bool = True

    table = schema.BLOBS.name

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.thread_id, self.checkpoint_ns, self.channel, self.version)

    @property
    def nbytes(self) -> int:
        return len(self.payload) + 160

    def parts(self, cell_limit: int) -> int:
        return _parts(self.payload, cell_limit)

    def row(self, part: int, cell_limit: int) -> dict[str, Any]:
        return {
            "thread_id": self.thread_id,
            "checkpoint_ns": self.checkpoint_ns,
            "channel": self.channel,
            "version": self.version,
            "payload_type": self.payload_type,
            "payload": _part(self.payload, part, cell_limit),
            "chunk": part,
            "chunks": _parts(self.payload, cell_limit),
            "written_at": self.written_at,
        }


@dataclass(slots=True)
class WriteRec:
    thread_id: str
    checkpoint_ns: str
    checkpoint_id: str
    task_id: str
    task_path: str
    idx: int
    channel: str
    payload_type: str
    payload: bytes
    written_at: int
    seq: int = 0
    complete: bool = True

    table = schema.WRITES.name

    @property
    def key(self) -> tuple[str, str, str, str, int]:
        return (self.thread_id, self.checkpoint_ns, self.checkpoint_id, self.task_id, self.idx)

    @property
    def nbytes(self) -> int:
        return len(self.payload) + 200

    def parts(self, cell_limit: int) -> int:
        return _parts(self.payload, cell_limit)

    def row(self, part: int, cell_limit: int) -> dict[str, Any]:
        return {
            "thread_id": self.thread_id,
            "checkpoint_ns": self.checkpoint_ns,
            "checkpoint_id": self.checkpoint_id,
            "task_id": self.task_id,
            "task_path": self.task_path,
            "idx": self.idx,
            "channel": self.channel,
            "payload_type": self.payload_type,
            "payload": _part(self.payload, part, cell_limit),
            "chunk": part,
            "chunks": _parts(self.payload, cell_limit),
            "written_at": self.written_at,
        }


def newer_write(old: WriteRec, new: WriteRec) -> WriteRec:
    """Which of two writes with the same key stands.

    LangGraph's savers keep the first write of a regular channel (idx >= 0) and
    the last of a special one (errors, interrupts, resumes: idx < 0).
    """
    if old.idx >= 0:
        return old if old.written_at <= new.written_at else new
    return new if new.written_at >= old.written_at else old


@dataclass(slots=True)
class TombstoneRec:
    scope: str
    thread_id: str = ""
    checkpoint_ns: str = ""
    checkpoint_id: str = ""
    run_id: str = ""
    deleted_at: int = 0
    seq: int = 0

    table = schema.TOMBSTONES.name

    @property
    def key(self) -> tuple[str, ...]:
        return (self.scope, self.thread_id, self.checkpoint_ns, self.checkpoint_id, self.run_id)

    @property
    def nbytes(self) -> int:
        return 200

    def parts(self, cell_limit: int) -> int:
        return 1

    def row(self, part: int, cell_limit: int) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "thread_id": self.thread_id,
            "checkpoint_ns": self.checkpoint_ns,
            "checkpoint_id": self.checkpoint_id,
            "run_id": self.run_id,
            "deleted_at": self.deleted_at,
        }

    def covers_checkpoint(self, rec: CheckpointRec) -> bool:
        # an expiry ("expire") is conditional on rows only the backend holds (a racing
        # write revives the thread): reads ask the backend, never the overlay, about it
        if self.scope == schema.SCOPE_THREAD:
            return rec.thread_id == self.thread_id and rec.written_at < self.deleted_at
        if self.scope == schema.SCOPE_RUN:
            return rec.run_id == self.run_id
        if self.scope == schema.SCOPE_CHECKPOINT:
            return (
                rec.checkpoint_id == self.checkpoint_id
                and rec.thread_id == self.thread_id
                and rec.checkpoint_ns == self.checkpoint_ns
                and rec.written_at < self.deleted_at
            )
        return False

    def covers_thread_row(self, thread_id: str, written_at: int) -> bool:
        """For blobs and writes: only a thread deletion hides them directly."""
        return (
            self.scope == schema.SCOPE_THREAD
            and thread_id == self.thread_id
            and written_at < self.deleted_at
        )


@dataclass(slots=True)
class TouchRec:
    """A read that refreshes its thread's time to live (``ttl_refresh_on_read``). It names
    the checkpoint read: a touch written after an expiry that names a checkpoint the
    expiry covers is a read racing the expiry, and the thread stays alive."""

    thread_id: str
    checkpoint_ns: str
    checkpoint_id: str
    written_at: int
    seq: int = 0

    table = schema.TOUCHES.name

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.thread_id, self.checkpoint_ns, self.checkpoint_id, self.written_at)

    @property
    def nbytes(self) -> int:
        return 160

    def parts(self, cell_limit: int) -> int:
        return 1

    def row(self, part: int, cell_limit: int) -> dict[str, Any]:
        return {
            "thread_id": self.thread_id,
            "checkpoint_ns": self.checkpoint_ns,
            "checkpoint_id": self.checkpoint_id,
            "written_at": self.written_at,
        }


Record = CheckpointRec | BlobRec | WriteRec | TombstoneRec | TouchRec


class Rows(Sequence[dict[str, Any]]):
    """The rows of one batch, ``(record, part, size)`` references, as a backend reads them.

    A sequence of row dicts (``record.row(part)``), built when asked for, one at a
    time; and :meth:`column`, one column's values read straight off the records, for a
    backend that appends column by column (the embedded store's Arrow tables). Building
    a dict per row first took 7-18 us of event-loop CPU per raw step (3 rows) on top of
    the columns themselves.
    """

    __slots__ = ("refs", "cell_limit")

    def __init__(self, refs: list[tuple[Record, int, int]], cell_limit: int) -> None:
        self.refs = refs
        self.cell_limit = cell_limit

    def __len__(self) -> int:
        return len(self.refs)

    @overload
    def __getitem__(self, i: int) -> dict[str, Any]: ...
    @overload
    def __getitem__(self, i: slice) -> list[dict[str, Any]]: ...
    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [rec.row(part, self.cell_limit) for rec, part, _ in self.refs[i]]
        rec, part, _ = self.refs[i]
        return rec.row(part, self.cell_limit)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        cell = self.cell_limit
        for rec, part, _ in self.refs:
            yield rec.row(part, cell)

    def column(self, name: str) -> list[Any]:
        """``[row[name] for row in self]``, without the rows."""
        refs = self.refs
        cell = self.cell_limit
        if name == "payload":
            return [_part(rec.payload, part, cell) for rec, part, _ in refs]  # type: ignore[union-attr]
        if name == "chunk":
            return [part for _, part, _ in refs]
        if name == "chunks":
            step = chunk_bytes(cell)
            return [max(1, -(-len(rec.payload) // step)) for rec, _, _ in refs]  # type: ignore[union-attr]
        if name == "metadata":
            return [JsonText(rec.metadata_json) for rec, _, _ in refs]  # type: ignore[union-attr]
        get = operator.attrgetter(name)
        return [get(rec) for rec, _, _ in refs]


@dataclass(slots=True)
class Bundle:
    """What a read returns for one checkpoint: its row, its blobs, its writes."""

    checkpoint: CheckpointRec
    blobs: dict[tuple[str, str], BlobRec] = field(default_factory=dict)
    writes: list[WriteRec] = field(default_factory=list)

    def visible(self) -> bool:
        """All blobs written with the checkpoint are there and complete, and so is every
        older blob it refers to that the read found: a value with a missing chunk (one
        still being ingested) keeps the checkpoint invisible rather than half-read."""
        for ch, ver in self.checkpoint.new_versions.items():
            b = self.blobs.get((ch, ver))
            if b is None or not b.complete:
                return False
        return all(b.complete for b in self.blobs.values())
