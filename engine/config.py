"""Engine settings: one validated dataclass, documented field by field.

Every saver entry point takes these as keyword arguments; an invalid value raises
:class:`ConfigError` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import datetime as dt
import math
import os
from dataclasses import dataclass, fields, replace
from typing import Any

from .errors import ConfigError

SUPERVISION_STRATEGIES = ("one_for_one", "rest_for_one")
DURABILITY_MODES = ("memory", "spool", "ingested")
#: "shared": any replica may serve any turn; "sticky": each thread is served by one process
CONSISTENCY_MODES = ("shared", "sticky")

#: ``ingest_concurrency`` never defaults to fewer slots than this when the caller sets
#: the memory bound, the batch cap or the queue (see :meth:`EngineConfig.from_options`)
MIN_DEFAULT_INGEST_CONCURRENCY = 4


@dataclass(frozen=True)
class EngineConfig:
    #: rows per table that trigger a batch
    batch_size: int = 500
    #: bytes per batch (payload text) that trigger a batch; also caps one ingest request
    max_batch_bytes: int = 4 * 1024 * 1024
    #: seconds a row may wait in the batcher before its batch is sent
    flush_interval: float = 0.05
    #: the memory bound: bytes accepted by the engine and not yet ingested
    #: (batcher buffer + ingest queue + in-flight batches) never exceed this,
    #: except that one value larger than the bound is admitted alone. Queued and
    #: in-flight batches count at max_batch_bytes each: (4 + 16 + 1) x 4 MiB = 84 MiB
    #: at the defaults, which leaves the batcher 44 MiB.
    max_buffered_bytes: int = 128 * 1024 * 1024
    #: messages each actor mailbox holds before senders block
    mailbox_size: int = 1024
    #: batches sent to the backend at once. Each ingest call holds its slot for the whole
    #: call however small the batch: a network round trip on Kusto (streaming ingestion:
    #: ~100 ms to 1 s), and on the embedded store the wait for a busy event loop to run
    #: the call's worker thread and take its answer. With 4 slots a busy host outran that,
    #: the batcher blocked and puts waited (backpressure); 16 keep the calls overlapped
    #: (Little's law: rate x latency batches in flight)
    ingest_concurrency: int = 16
    #: batches queued for the ingestor before the batcher blocks
    ingest_queue_size: int = 4
    #: seconds: the interpreter's thread switch interval (``sys.setswitchinterval``) while
    #: this engine is open, restored when it closes; None leaves it alone. The backend's
    #: worker threads (DuckDB, the Kusto SDK) wait this long beside a busy event loop each
    #: time they take the GIL again (engine/interpreter.py); CPython's default is 0.005
    switch_interval: float | None = None
    #: the cyclic garbage collector's thresholds (``gc.set_threshold``), three positive
    #: integers, while this engine is open, restored when it closes; None leaves them
    #: alone. CPython's (700, 10, 10) make a host with thousands of live threads walk all
    #: their objects again and again (engine/interpreter.py)
    gc_threshold: tuple[int, int, int] | None = None
    #: retries of a transient backend failure (throttling, 5xx, timeouts)
    max_retries: int = 5
    #: first backoff in seconds; doubles per retry, with full jitter
    retry_backoff: float = 0.2
    #: upper bound of one backoff sleep, seconds
    retry_backoff_max: float = 10.0
    #: queries run against the backend at once
    query_concurrency: int = 8
    #: what other processes may do to the same threads (docs/consistency.md).
    #: "shared": several replicas share the database and any of them may serve a
    #: thread's next turn: every read of a thread's latest state asks the backend
    #: (no cached "latest" or "no such thread" answer outlives the call), and the
    #: savers' default durability is "ingested", so a turn that returned is visible
    #: to every replica. "sticky": this process alone writes and deletes the threads it
    #: serves (sticky sessions, or one process): reads are answered from the cache for
    #: up to cache_ttl. None (default): "sticky" on a backend one process owns (the
    #: embedded store), else "shared"
    consistency: str | None = None
    #: threads (per namespace) whose latest state the query cache keeps (sticky)
    cache_max_threads: int = 10_000
    #: seconds a cached backend answer is trusted before it is read again, under
    #: consistency="sticky" (unused under "shared": every latest read asks the backend)
    cache_ttl: float = 300.0
    #: seconds ingested rows stay in the read overlay after the backend acknowledged
    #: them (0 when the backend shows an acknowledged row at once, as the embedded
    #: store and streaming ingestion do; raise it for queued ingestion)
    visibility_delay: float = 0.0
    #: largest payload cell, in characters of base64 text (Kusto's unit); larger
    #: values are split into chunks of ``cell_limit // 4 * 3`` bytes
    cell_limit: int = 1_000_000
    #: "memory": a put returns once the engine accepted it; "spool": once it is also
    #: in the local spool file, fsync'd (replayed on the next start); "ingested":
    #: once the backend acknowledged its batch
    durability: str = "memory"
    #: directory of the spool (durability="spool"); default: next to the embedded
    #: store's DuckDB file ("<file>.spool"); required for Kusto or ":memory:"
    spool_dir: str | os.PathLike[str] | None = None
    #: the spool's active segment file is sealed at this size; a sealed segment is
    #: deleted once all its records are ingested
    spool_segment_bytes: int = 16 * 1024 * 1024
    #: seconds a put may wait for the engine (backpressure) before TimeoutError; None waits
    put_timeout: float | None = None
    #: supervision: restart strategy, and at most max_restarts in restart_window seconds
    supervision: str = "one_for_one"
    max_restarts: int = 5
    restart_window: float = 10.0
    #: tombstoned rows are compacted physically in batches of this many deletions (one
    #: soft delete per table per batch)
    compaction_batch: int = 100
    #: seconds between compaction passes, per database (0 disables physical compaction).
    #: Kusto's soft delete is for occasional use and never in parallel on one table
    #: (https://learn.microsoft.com/kusto/concepts/data-soft-delete): every process ticks
    #: this often, and a lease in the Compactions table lets one of them compact per
    #: interval; tombstones keep reads correct meanwhile (docs/kusto.md)
    compaction_interval: float = 3600.0
    #: seconds a process waits after claiming the compaction lease before reading the
    #: claims back; longer than a claim takes to become queryable (streaming ingestion:
    #: about a second; raise it with queued ingestion)
    compaction_lease_settle: float = 15.0
    #: time to live of a thread, a ``timedelta`` or seconds; None (default): threads live
    #: until deleted. A thread whose last activity (a checkpoint, a pending write, or with
    #: ttl_refresh_on_read a read) is older is deleted as delete_thread deletes it, by one
    #: process per database at a time, within expiry_interval (docs/retention.md)
    ttl: float | dt.timedelta | None = None
    #: with ttl: a read of a thread's state counts as activity (written at most once per
    #: ttl / 10 per thread and process, so a thread read steadily lives on)
    ttl_refresh_on_read: bool = False
    #: seconds between expiry passes (with ttl); None: ttl / 10, at most 300 s
    expiry_interval: float | None = None
    #: threads expired per query and tombstone batch of an expiry pass
    expiry_batch: int = 1000

    def __post_init__(self) -> None:
        def positive_int(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")

        def non_negative_int(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {v!r}")

        def positive_number(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            ok = (
                not isinstance(v, bool)
                and isinstance(v, (int, float))
                and math.isfinite(v)
                and (v >= 0 if allow_zero else v > 0)
            )
            if not ok:
                what = "a non-negative" if allow_zero else "a positive"
                raise ConfigError(f"{name} must be {what} finite number, got {v!r}")

        for name in (
            "batch_size",
            "max_batch_bytes",
            "max_buffered_bytes",
            "mailbox_size",
            "ingest_concurrency",
            "ingest_queue_size",
            "query_concurrency",
            "cache_max_threads",
            "cell_limit",
            "max_restarts",
            "compaction_batch",
            "spool_segment_bytes",
            "expiry_batch",
        ):
            positive_int(name)
        non_negative_int("max_retries")
        for name in ("flush_interval", "retry_backoff", "retry_backoff_max", "restart_window"):
            positive_number(name)
        for name in ("cache_ttl", "visibility_delay", "compaction_interval", "compaction_lease_settle"):
            positive_number(name, allow_zero=True)
        if self.put_timeout is not None:
            positive_number("put_timeout")
        if isinstance(self.ttl, dt.timedelta):
            object.__setattr__(self, "ttl", self.ttl.total_seconds())
        if self.ttl is not None:
            positive_number("ttl")
            object.__setattr__(self, "ttl", float(self.ttl))
        if not isinstance(self.ttl_refresh_on_read, bool):
            raise ConfigError(f"ttl_refresh_on_read must be True or False, got {self.ttl_refresh_on_read!r}")
        if self.ttl_refresh_on_read and self.ttl is None:
            raise ConfigError("ttl_refresh_on_read needs a ttl (a timedelta or seconds)")
        if self.expiry_interval is not None:
            positive_number("expiry_interval")
        if self.switch_interval is not None:
            positive_number("switch_interval")
        if self.gc_threshold is not None:
            t = self.gc_threshold
            if (
                isinstance(t, (str, bytes))
                or not isinstance(t, (tuple, list))
                or len(t) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in t)
            ):
                raise ConfigError(
                    f"gc_threshold must be three positive integers (threshold0, threshold1, threshold2) "
                    f"as gc.set_threshold takes them, got {t!r}; to turn the collector off, call gc.disable() yourself"
                )
            object.__setattr__(self, "gc_threshold", tuple(t))  # a list (JSON, a CLI) is kept as a tuple
        if self.consistency is not None and self.consistency not in CONSISTENCY_MODES:
            raise ConfigError(
                f"consistency must be one of {CONSISTENCY_MODES} (or None: chosen by the backend), "
                f"got {self.consistency!r}"
            )
        if self.durability not in DURABILITY_MODES:
            raise ConfigError(
                f"durability must be one of {DURABILITY_MODES}, got {self.durability!r}"
            )
        if self.spool_dir is not None and (
            not isinstance(self.spool_dir, (str, os.PathLike)) or not os.fspath(self.spool_dir)
        ):
            raise ConfigError(f"spool_dir must be a directory path (str or os.PathLike), got {self.spool_dir!r}")
        if self.supervision not in SUPERVISION_STRATEGIES:
            raise ConfigError(
                f"supervision must be one of {SUPERVISION_STRATEGIES}, got {self.supervision!r}"
            )
        if self.cell_limit < 4:
            raise ConfigError(f"cell_limit must be at least 4 (one base64 group), got {self.cell_limit}")
        if self.cell_limit > self.max_batch_bytes:
            raise ConfigError(
                f"cell_limit ({self.cell_limit}) must not exceed max_batch_bytes "
                f"({self.max_batch_bytes}): one chunk must fit in one ingest request"
            )
        if self.batcher_buffer_bytes < self.max_batch_bytes:
            need = (self.ingest_queue_size + self.ingest_concurrency + 2) * self.max_batch_bytes
            raise ConfigError(
                f"max_buffered_bytes ({self.max_buffered_bytes}) must be at least "
                f"(ingest_queue_size + ingest_concurrency + 2) * max_batch_bytes = {need}: "
                "queued and in-flight batches count against the bound; lower "
                "max_batch_bytes or raise max_buffered_bytes"
            )

    @property
    def batcher_buffer_bytes(self) -> int:
        """What the batcher may hold: the bound less the batches past it: those queued in
        the ingestor's mailbox, the one the ingestor holds while it waits for a free slot,
        and those in flight."""
        in_flight = (self.ingest_queue_size + 1 + self.ingest_concurrency) * self.max_batch_bytes
        return self.max_buffered_bytes - in_flight

    @property
    def expiry_every(self) -> float | None:
        """Seconds between expiry passes; None without a ttl."""
        if self.ttl is None:
            return None
        if self.expiry_interval is not None:
            return float(self.expiry_interval)
        return min(self.ttl / 10, 300.0)

    @property
    def touch_every(self) -> float | None:
        """Seconds between two touches of one thread by this process (ttl_refresh_on_read)."""
        return self.ttl / 10 if self.ttl is not None and self.ttl_refresh_on_read else None

    @property
    def shared(self) -> bool:
        """Whether other processes may write or delete this engine's threads."""
        return self.consistency != "sticky"

    def for_backend(self, backend: Any) -> EngineConfig:
        """These settings with ``consistency`` chosen for ``backend`` when left to it:
        "sticky" where one process owns the store (``backend.exclusive``), else "shared"."""
        if self.consistency is not None:
            return self
        mode = "sticky" if getattr(backend, "exclusive", False) else "shared"
        return replace(self, consistency=mode)

    @classmethod
    def from_options(cls, backend: Any = None, **options: Any) -> EngineConfig:
        """The settings from keyword options, every one validated.

        With ``backend``, ``ingest_concurrency`` left unset is at most the backend's
        ``default_ingest_concurrency``, ``consistency`` left unset is chosen for it
        (:meth:`for_backend`), and under "shared" consistency ``durability`` left
        unset is "ingested": a put returns once the backend holds it, so a turn that
        returned is what any replica's next read shows.

        A caller who sets the memory bound, the batch cap or the queue but not
        ``ingest_concurrency`` gets as many ingest slots as three quarters of that bound
        hold (at most the default, at least :data:`MIN_DEFAULT_INGEST_CONCURRENCY`), so a
        smaller bound stays valid without also naming the slots.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                f"unknown engine option(s) {unknown}; known options: {sorted(known)}"
            )
        if "ingest_concurrency" not in options:
            slots = cls.ingest_concurrency
            if {"max_buffered_bytes", "max_batch_bytes", "ingest_queue_size"} & set(options):
                slots = _fitting_concurrency(options)
            # a backend whose service limits concurrent ingestion (Kusto's streaming
            # ingestion) lowers the default; a smaller memory bound may lower it further
            limit = getattr(backend, "default_ingest_concurrency", None)
            if isinstance(limit, int) and not isinstance(limit, bool):
                slots = min(slots, limit)
            if slots != cls.ingest_concurrency:
                options = {**options, "ingest_concurrency": slots}
        config = cls(**options)
        if backend is None:
            return config
        config = config.for_backend(backend)
        if config.shared and "durability" not in options:
            config = replace(config, durability="ingested")
        return config


def _fitting_concurrency(options: dict[str, Any]) -> int:
    """Ingest slots that leave the batcher a quarter of the memory bound in ``options``."""
    default = EngineConfig.ingest_concurrency
    try:
        bound = int(options.get("max_buffered_bytes", EngineConfig.max_buffered_bytes))
        batch = int(options.get("max_batch_bytes", EngineConfig.max_batch_bytes))
        queue = int(options.get("ingest_queue_size", EngineConfig.ingest_queue_size))
        fits = bound * 3 // 4 // batch - queue - 1
    except (TypeError, ValueError, ZeroDivisionError):
        return default  # invalid values: validation names them
    return max(MIN_DEFAULT_INGEST_CONCURRENCY, min(default, fits))
