"""Queued and managed ingestion through the real SDK clients, confirmed by Kusto's status
reports: the loopback endpoint (tests/kusto_loopback.py) plays the data management
service over Azurite (tests/azurite_server.py), the Azure Storage emulator.

What Kusto does, and so what the loopback does (QueuedIngestionService's docstring):
``QueuedIngestClient`` uploads a blob and enqueues its ``IngestionBlobInfo``; Kusto ingests
it when the batching policy seals its batch, and, with ``ReportLevel.FailuresAndSuccesses``
and ``ReportMethod.Queue``, posts a success or failure message per blob to the status queues
(azure-kusto-ingest: ingestion_blob_info.py, status.py; Microsoft's "Kusto.Ingest ingestion
status reporting"). ``ManagedStreamingIngestClient`` streams, and queues instead when the
data is over 4 MB or after 3 failed streaming attempts (managed_streaming_ingest_client.py).

Each test would fail on the backend as it was (report level DoNotReport, ``flush()``
returning once the blob was queued): the rows would not be in the table when ``flush()``
returns, and a rejected blob would never reach ``flush()``.

Skipped with a reason where Node.js or Azurite (``npm ci --prefix tests/azurite``) is absent.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.base.id import uuid6
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

sys.path.insert(0, str(Path(__file__).resolve().parent))

import azurite_server  # noqa: E402
from kusto_loopback import LoopbackKusto  # noqa: E402

from langgraph.checkpoint.kusto import AsyncKustoSaver, IngestError  # noqa: E402
from langgraph.checkpoint.kusto.engine.backends.kusto import KustoBackend  # noqa: E402
from langgraph.checkpoint.kusto.engine.schema import mapping_name  # noqa: E402
from langgraph.checkpoint.kusto.telemetry import names  # noqa: E402

DB = "checkpoints"
FAST = {"flush_interval": 0.01, "retry_backoff": 0.01, "retry_backoff_max": 0.05}
#: the loopback's batching delay (Kusto's MaximumBatchingTimeSpan: 5 min by default,
#: 30 s in provision.kql), kept small so the tests are quick
BATCHING = 0.5

pytestmark = pytest.mark.skipif(azurite_server.skip_reason() is not None,
                                reason=azurite_server.skip_reason() or "")


@pytest.fixture(scope="module")
def azurite() -> Iterator[azurite_server.Azurite]:
    with azurite_server.Azurite() as storage:
        yield storage


@asynccontextmanager
async def dm_loopback(storage: azurite_server.Azurite, **options: Any) -> AsyncIterator[LoopbackKusto]:
    """A provisioned loopback endpoint that also serves queued ingestion over Azurite.
    Each gets its own container and queues (names suffixed), so tests do not share them."""
    async with LoopbackKusto(database=DB) as srv:
        await KustoBackend(srv.uri, DB).setup(create=True)
        _unique_service(srv, storage, **options)
        yield srv
        assert srv.errors == [], f"loopback bugs: {srv.errors!r}"


def _unique_service(srv: LoopbackKusto, storage: azurite_server.Azurite, **options: Any) -> Any:
    from kusto_loopback import QueuedIngestionService

    suffix = os.urandom(4).hex()

    class Service(QueuedIngestionService):
        INGEST_QUEUE = f"readyforaggregation-{suffix}"
        CONTAINER = f"tempstorage-{suffix}"
        SUCCESS_QUEUE = f"successfulingestions-{suffix}"
        FAILURE_QUEUE = f"failedingestions-{suffix}"

    srv.queued = Service(srv, storage, **{"batching_delay": BATCHING, **options}).start()
    return srv.queued


def backend_for(srv: LoopbackKusto, mode: str = "queued", **options: Any) -> KustoBackend:
    return KustoBackend(srv.uri, DB, ingest_mode=mode, ingest_uri=srv.uri,
                        status_poll_interval=0.05, **options)


def config(thread_id: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}


async def put_one(saver: AsyncKustoSaver, thread_id: str, payload: Any = "hello") -> dict[str, Any]:
    c = empty_checkpoint()
    c["id"] = str(uuid6(clock_seq=-1))
    c["channel_values"] = {"messages": payload}
    c["channel_versions"] = {"messages": saver.get_next_version(None, None)}
    return await saver.aput(config(thread_id), c, {"source": "input", "step": 0}, c["channel_versions"])


def stored_threads(srv: LoopbackKusto) -> set[str]:
    return {r["thread_id"] for r in srv.rows("Checkpoints")}


async def test_queued_rows_are_acknowledged_only_once_kusto_reports_them_ingested(
    anyio_backend: str, azurite: azurite_server.Azurite
) -> None:
    async with dm_loopback(azurite, batching_delay=1.0) as srv:
        backend = backend_for(srv)
        async with AsyncKustoSaver(backend, **FAST) as saver:
            await put_one(saver, "clean")
            # queued: the blob waits for the batching delay, and the process reads its own write
            assert (await saver.aget_tuple(config("clean"))) is not None
            await saver.flush()
            # flush() returned: Kusto reported the blob ingested, so the rows are queryable
            assert "clean" in stored_threads(srv)
            assert srv.queued is not None and srv.queued.ingested and not srv.queued.failed
            assert backend._status.counts["succeeded"] >= 1
            assert backend._status.waiting == {}
            assert srv.counts["ingest"] == 0  # nothing was streamed
            assert (await saver.aget_tuple(config("clean"))) is not None


async def test_a_blob_kusto_rejects_reaches_flush_and_nothing_is_lost(
    anyio_backend: str, azurite: azurite_server.Azurite, tmp_path: Any
) -> None:
    reader = InMemoryMetricReader()
    spool = str(tmp_path / "spool")
    async with dm_loopback(azurite) as srv:
        # the mapping is dropped after setup: Kusto finds out only when it ingests the blob
        key = ("Checkpoints", mapping_name("Checkpoints"))
        mapping = srv.mappings.pop(key)
        saver = AsyncKustoSaver(backend_for(srv), durability="spool", spool_dir=spool, max_retries=1,
                                meter_provider=MeterProvider(metric_readers=[reader]), **FAST)
        async with saver:
            await put_one(saver, "doomed")
            assert (await saver.aget_tuple(config("doomed"))) is not None  # readable meanwhile
            with pytest.raises(IngestError) as flushed:
                await saver.flush()
            text = str(flushed.value)
            assert "Checkpoints" in text and "BadRequest_MappingReferenceWasNotFound" in text, text
            assert "Permanent" in text
        assert srv.queued is not None and srv.queued.failed and "doomed" not in stored_threads(srv)
        # the spool keeps the rejected rows for the next start
        assert [f for f in os.listdir(spool) if not f.startswith(".")], "the spool kept the rows"
        failed = 0
        data = reader.get_metrics_data()
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == names.INGEST_BATCHES:
                        failed += sum(p.value for p in metric.data.data_points
                                      if p.attributes.get(names.OUTCOME) == names.OUTCOME_FAILED)
        assert failed >= 1
        # the mapping back: the next start replays the spool, and Kusto confirms the rows
        srv.mappings[key] = mapping
        async with AsyncKustoSaver(backend_for(srv), durability="spool", spool_dir=spool, **FAST) as again:
            await again.flush()
        assert "doomed" in stored_threads(srv)


async def test_a_transient_rejection_is_sent_again(anyio_backend: str, azurite: azurite_server.Azurite) -> None:
    async with dm_loopback(azurite) as srv:
        assert srv.queued is not None
        srv.queued.fail_next(1, code="General_RetryableError", details="storage busy", status="Transient",
                             should_retry=True)
        async with AsyncKustoSaver(backend_for(srv), **FAST) as saver:
            await put_one(saver, "retried")
            await saver.flush()
            assert saver.engine.stats()["retries"] >= 1
        assert len(srv.queued.failed) == 1 and len(srv.queued.ingested) >= 1
        assert "retried" in stored_threads(srv)


async def test_managed_falls_back_to_queued_after_three_failed_streams_and_waits_for_the_report(
    anyio_backend: str, azurite: azurite_server.Azurite
) -> None:
    async with dm_loopback(azurite) as srv:
        # ManagedStreamingIngestClient: 3 streaming attempts (tenacity stop_after_attempt(3)),
        # then, on a non-permanent KustoApiError or throttling, queued ingestion
        srv.faults.fail_next(3, status=503, route="ingest")
        backend = backend_for(srv, "managed")
        # one batch at a time, so the first batch takes all three failures
        async with AsyncKustoSaver(backend, ingest_concurrency=1, **FAST) as saver:
            await put_one(saver, "fallback")
            await saver.flush()
            assert "fallback" in stored_threads(srv)
            assert srv.queued is not None and len(srv.queued.ingested) == 1
            assert backend._status.counts["succeeded"] == 1
            streamed = srv.counts["ingest"] - 3  # the put's other table's batch
            assert streamed >= 1
            # streaming works again: the next batches stream, no status to wait for
            await put_one(saver, "streamed")
            await saver.flush()
            assert srv.counts["ingest"] > 3 + streamed and len(srv.queued.ingested) == 1
            assert "streamed" in stored_threads(srv)


async def test_managed_queues_data_over_4_mb_and_waits_for_the_report(
    anyio_backend: str, azurite: azurite_server.Azurite
) -> None:
    async with dm_loopback(azurite) as srv:
        # one request of more than 4 MB compressed: the SDK queues it without streaming
        backend = backend_for(srv, "managed", max_request_bytes=64 * 1024 * 1024)
        big = os.urandom(6 * 1024 * 1024)
        async with AsyncKustoSaver(backend, max_batch_bytes=32 * 1024 * 1024,
                                   max_buffered_bytes=1024 * 1024 * 1024, **FAST) as saver:
            await put_one(saver, "large", big)
            await saver.flush()
            got = await saver.aget_tuple(config("large"))
            assert got is not None and got.checkpoint["channel_values"]["messages"] == big
        # the small Checkpoints row streamed; the value's chunks (over 4 MB) were queued
        streamed_to = {r.path.split("?")[0].rsplit("/", 1)[-1] for r in srv.requests if r.route == "ingest"}
        assert "CheckpointBlobs" not in streamed_to, streamed_to
        assert srv.queued is not None and len(srv.queued.ingested) >= 1
        assert {t for _, t, _ in srv.queued.sealed} == {"CheckpointBlobs"}
        assert "large" in stored_threads(srv)


async def test_a_missing_report_is_a_transient_timeout_and_the_batch_is_sent_again(
    anyio_backend: str, azurite: azurite_server.Azurite
) -> None:
    async with dm_loopback(azurite, batching_delay=0.1) as srv:
        assert srv.queued is not None
        srv.queued.lose_reports_next(1)  # ingested, but its report never comes
        backend = backend_for(srv, status_timeout=1.0)
        async with AsyncKustoSaver(backend, **FAST) as saver:
            await put_one(saver, "unreported")
            await saver.flush()
            stats = saver.engine.stats()
            assert stats["retries"] == 1
        # one blob per batch (a put writes two tables), and the unreported one once more
        assert len(srv.queued.ingested) == stats["batches_ok"] + 1, "sent again after status_timeout"
        assert "unreported" in stored_threads(srv)


async def test_two_replicas_sharing_the_status_queues_each_get_their_own_reports(
    anyio_backend: str, azurite: azurite_server.Azurite
) -> None:
    """The status queues are the cluster's, shared by every client: a replica reading a
    report of another's blob leaves it in the queue (it shows again after its visibility
    timeout) instead of deleting it, so both replicas' flushes are confirmed."""
    async with dm_loopback(azurite) as srv:
        a, b = backend_for(srv), backend_for(srv)
        async with AsyncKustoSaver(a, **FAST) as one, AsyncKustoSaver(b, **FAST) as two:
            await put_one(one, "replica-a")
            await put_one(two, "replica-b")
            async with anyio.create_task_group() as tg:
                tg.start_soon(one.flush)
                tg.start_soon(two.flush)
        assert {"replica-a", "replica-b"} <= stored_threads(srv)
        assert a._status.counts["succeeded"] >= 1 and b._status.counts["succeeded"] >= 1
        assert a._status.counts["failed"] == b._status.counts["failed"] == 0


async def test_a_batch_awaiting_its_report_does_not_hold_an_ingest_slot(
    anyio_backend: str, azurite: azurite_server.Azurite
) -> None:
    """With one ingest slot, batches are still handed to Kusto while earlier ones await
    their reports: they land in the same sealed batch of the batching policy. Holding the
    slot for the wait would send one blob per batching delay (one blob per sealed group)."""
    async with dm_loopback(azurite, batching_delay=2.0) as srv:
        # durability="memory": the puts return at once (the shared default would wait for
        # each put's report in turn, and send one blob per sealed group for that reason)
        async with AsyncKustoSaver(
            backend_for(srv), ingest_concurrency=1, batch_size=1, durability="memory", **FAST
        ) as saver:
            for i in range(4):
                await put_one(saver, f"slot-{i}")
            await saver.flush()
        assert srv.queued is not None
        assert max(n for _, _, n in srv.queued.sealed) >= 2, srv.queued.sealed
        assert {f"slot-{i}" for i in range(4)} <= stored_threads(srv)
