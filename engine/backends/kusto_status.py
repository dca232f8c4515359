"""Queued ingestion's acknowledgement: Kusto's ingestion status reports, read from the
cluster's status queues, settle each queued blob (:class:`QueuedIngestion`) as ingested or
rejected. Used by :class:`~.kusto.KustoBackend` for ``ingest_mode="queued"`` and the
managed client's fallbacks.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from typing import TYPE_CHECKING, Any

import anyio

from ..errors import ConfigError, PermanentBackendError, TransientBackendError
from ..schema import TABLES_BY_NAME

if TYPE_CHECKING:
    from .kusto import KustoBackend

log = logging.getLogger("langgraph.checkpoint.kusto.engine.backends.kusto")
_UTC = dt.timezone.utc


# ---------------------------------------------------------------------------
# Queued ingestion: Kusto's status reports
# ---------------------------------------------------------------------------
#
# A queued blob is only *queued* when ingest_from_stream returns; Kusto ingests it when
# the table's batching policy seals its batch, and may still reject it then (a mapping
# or schema error, malformed data). With report_level=FailuresAndSuccesses and
# report_method=Queue (azure-kusto-ingest: ingestion_properties.py, ingestion_blob_info.py)
# the data management service posts one message per blob to the cluster's
# SuccessfulIngestionsQueue or FailedIngestionsQueue (".get ingestion resources"), JSON
# with IngestionSourceId (the SDK's source_id), Database, Table, and for a failure
# ErrorCode, Details, FailureStatus (Permanent / Transient / Exhausted) and ShouldRetry
# (azure-kusto-ingest: status.py, _status_q.py; Microsoft's "Kusto.Ingest ingestion status
# reporting", https://learn.microsoft.com/azure/data-explorer/kusto/api/netfx/kusto-ingest-client-status).
#
# Those queues are shared by every client of the cluster (other replicas, other
# applications), so a message that is not ours is left in place: received with a short
# visibility timeout, it shows again for its owner. One of ours is deleted once read.
# A message of this database's tables older than twice the timeout is deleted by
# whoever reads it: its owner gave up on it and sent the rows again long ago.


class QueuedIngestion:
    """Blobs of one batch in Kusto's ingestion queue; ``wait()`` returns once Kusto
    reported every one ingested, raises :class:`PermanentBackendError` naming the table
    and Kusto's reason if one was rejected, and :class:`TransientBackendError` if a report
    is missing after ``status_timeout`` or says the failure is transient (the ingestor
    sends the batch again: reads deduplicate)."""

    def __init__(self, watch: StatusWatch, table: str, source_ids: list[str]) -> None:
        self.watch = watch
        self.table = table
        self.source_ids = list(source_ids)
        self.remaining = set(source_ids)
        self.error: BaseException | None = None
        self.started = watch.clock()
        self.done = anyio.Event()

    def resolve(self, source_id: str, error: BaseException | None) -> None:
        self.remaining.discard(source_id)
        if error is not None and self.error is None:
            self.error = error
        if self.error is not None or not self.remaining:
            self.done.set()

    async def wait(self) -> None:
        watch = self.watch
        deadline = self.started + watch.timeout
        try:
            while True:
                if self.error is not None:
                    raise self.error
                if not self.remaining:
                    return
                now = watch.clock()
                if now >= deadline:
                    raise TransientBackendError(
                        f"Kusto reported no outcome for {len(self.remaining)} of {len(self.source_ids)} "
                        f"queued blob(s) into {self.table} within {watch.timeout:g} s (status_timeout; "
                        "the batching policy may hold them longer): sending them again"
                        + (f"; last status read failed: {watch.last_error}" if watch.last_error else "")
                    )
                await watch.poll()
                with anyio.move_on_after(min(watch.interval, deadline - watch.clock())):
                    await self.done.wait()
        finally:
            watch.forget(self)


class StatusWatch:
    """The queued blobs this backend awaits, by source id, and the reading of the
    status queues that settles them (one read at a time, by whichever waiter is due)."""

    def __init__(self, backend: KustoBackend, timeout: float, interval: float) -> None:
        for name, value in (("status_timeout", timeout), ("status_poll_interval", interval)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value <= 86_400):
                raise ConfigError(f"{name} must be a number of seconds in (0, 86400], got {value!r}")
        self.backend = backend
        self.timeout = float(timeout)
        self.interval = float(interval)
        self.waiting: dict[str, QueuedIngestion] = {}
        #: source ids given up on (timed out, cancelled): their reports are ours to delete
        self.abandoned: dict[str, float] = {}
        self.last_poll = -math.inf
        self._lock: anyio.Lock | None = None
        self.clock = _monotonic
        #: reports read (for tests and diagnostics): ours ("succeeded", "failed", "late":
        #: after we gave up), others' left in place ("foreign"), "stale" ones deleted
        self.counts: dict[str, int] = {"succeeded": 0, "failed": 0, "late": 0, "foreign": 0, "stale": 0}
        #: the last failed read of the status queues, if any (named in a timeout's error)
        self.last_error: str | None = None

    def expect(self, table: str, source_ids: list[str]) -> QueuedIngestion:
        pending = QueuedIngestion(self, table, source_ids)
        for sid in source_ids:
            self.waiting[sid] = pending
        return pending

    def forget(self, pending: QueuedIngestion) -> None:
        until = self.clock() + 2 * self.timeout
        for sid in pending.source_ids:
            if self.waiting.get(sid) is pending:
                del self.waiting[sid]
                if sid in pending.remaining:
                    self.abandoned[sid] = until

    async def poll(self) -> None:
        """Read the status queues if no read ran within ``interval``; settle what they say."""
        if self._lock is None:
            self._lock = anyio.Lock()
        if self._lock.locked() or self.clock() - self.last_poll < self.interval:
            return
        async with self._lock:
            now = self.clock()
            self.abandoned = {k: v for k, v in self.abandoned.items() if v > now}
            wanted = set(self.waiting) | set(self.abandoned)
            try:
                reports = await self.backend._run(self._read_sync, wanted)
            except PermanentBackendError:
                raise
            except Exception as exc:  # noqa: BLE001 - read again at the next poll
                # the storage account may be briefly unreachable: the reports stay in
                # their queues, and status_timeout bounds the wait
                self.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                log.warning("reading Kusto's ingestion status queues failed (%s); reading again", self.last_error)
                reports = []
            finally:
                self.last_poll = self.clock()
            for sid, error in reports:
                pending = self.waiting.get(sid)
                if pending is None:
                    self.counts["late"] += 1  # given up on already: its batch was sent again
                    continue
                self.counts["succeeded" if error is None else "failed"] += 1
                pending.resolve(sid, error)

    def _read_sync(self, wanted: set[str]) -> list[tuple[str, BaseException | None]]:
        from azure.kusto.ingest.status import FailureMessage, KustoIngestStatusQueues, SuccessMessage

        client = self.backend._ingest_client
        client = getattr(client, "queued_client", client)  # ManagedStreamingIngestClient's
        if client is None:
            raise PermanentBackendError("the Kusto backend is not open (use the saver inside `with`/`async with`)")
        status = KustoIngestStatusQueues(client)
        # StatusQueue.pop() would delete every message it reads, other clients' too: read
        # the same queues (with the SDK's base64 decoding and message classes) and delete
        # only ours
        visible_again = max(1, math.ceil(2 * self.interval))
        stale_after = dt.timedelta(seconds=2 * self.timeout)
        now = dt.datetime.now(_UTC)
        out: list[tuple[str, BaseException | None]] = []
        for squeue, cls in ((status.success, SuccessMessage), (status.failure, FailureMessage)):
            try:
                for queue in squeue._get_queues():
                    with queue:
                        for m in queue.receive_messages(
                            messages_per_page=32, max_messages=256, visibility_timeout=visible_again
                        ):
                            try:
                                report = cls(m.content)
                            except (TypeError, ValueError):
                                self.counts["foreign"] += 1  # not a status report: not ours
                                continue
                            sid = str(report.IngestionSourceId or "").lower()
                            if sid in wanted:
                                queue.delete_message(m)
                                out.append((sid, None if cls is SuccessMessage else _status_error(report)))
                            elif (
                                m.inserted_on is not None
                                and now - m.inserted_on > stale_after
                                and report.Database == self.backend.database
                                and report.Table in TABLES_BY_NAME
                            ):
                                queue.delete_message(m)
                                self.counts["stale"] += 1
                            else:
                                self.counts["foreign"] += 1
            except Exception as exc:  # noqa: BLE001 - what was read so far still counts
                self.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                log.warning("reading Kusto's ingestion status queues failed (%s); reading again", self.last_error)
        return out


def _monotonic() -> float:
    import time

    return time.monotonic()


def _status_error(report: Any) -> TransientBackendError | PermanentBackendError:
    """The error for a FailedIngestionsQueue message: permanent unless Kusto says a retry
    may succeed (ShouldRetry, or FailureStatus Transient / Exhausted)."""
    table = report.Table or "?"
    code = report.ErrorCode or "unknown error code"
    failure = str(report.FailureStatus or "Unknown")
    details = str(report.Details or "").strip() or "no details"
    text = (
        f"Kusto rejected the queued ingestion into {table}: {code}: {details} "
        f"(FailureStatus {failure}, IngestionSourceId {report.IngestionSourceId})"
    )
    retry = report.ShouldRetry is True or str(report.ShouldRetry).lower() == "true"
    if retry or failure.lower() in ("transient", "exhausted"):
        return TransientBackendError(text)
    return PermanentBackendError(text)
