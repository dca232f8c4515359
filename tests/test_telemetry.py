"""Telemetry read back for real: the SDK's in-memory metric reader and span exporter
on the engine (asyncio and trio), and the exporter setup against local endpoints."""

from __future__ import annotations

import gzip
import http.server
import io
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from langgraph.checkpoint.base import empty_checkpoint
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from langgraph.checkpoint.kusto import AsyncKustoSaver, KustoSaver
from langgraph.checkpoint.kusto.engine.backends.embedded import EmbeddedBackend
from langgraph.checkpoint.kusto.engine.backends.faulty import FaultPlan, FaultyBackend, Latency
from langgraph.checkpoint.kusto.engine.messages import Read, ReadSpec
from langgraph.checkpoint.kusto.engine.schema import TABLES
from langgraph.checkpoint.kusto.telemetry import configure_telemetry, names
from langgraph.checkpoint.kusto.telemetry.instruments import capture

FAST = {"flush_interval": 0.005, "retry_backoff": 0.001, "retry_backoff_max": 0.01}


class Otel:
    """An SDK MeterProvider and TracerProvider that keep everything in memory."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.spans_exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans_exporter))

    def providers(self) -> dict[str, Any]:
        return {"meter_provider": self.meter_provider, "tracer_provider": self.tracer_provider}

    def points(self, name: str, **attrs: Any) -> list[Any]:
        """Data points of metric ``name`` whose attributes include ``attrs``."""
        out = []
        data = self.reader.get_metrics_data()
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name != name:
                        continue
                    for p in metric.data.data_points:
                        if all(p.attributes.get(k) == v for k, v in attrs.items()):
                            out.append(p)
        return out

    def total(self, name: str, **attrs: Any) -> float:
        """Counter: sum of values; histogram: sum of recorded values."""
        return sum(p.sum if hasattr(p, "sum") else p.value for p in self.points(name, **attrs))

    def count(self, name: str, **attrs: Any) -> int:
        """Histogram: number of recorded values."""
        return sum(p.count for p in self.points(name, **attrs))

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        got = list(self.spans_exporter.get_finished_spans())
        return [s for s in got if name is None or s.name == name]

    def shutdown(self) -> None:
        self.meter_provider.shutdown()
        self.tracer_provider.shutdown()


@pytest.fixture
def otel() -> Iterator[Otel]:
    o = Otel()
    yield o
    o.shutdown()


def saver_on(otel: Otel, plan: FaultPlan | None = None, **options: Any) -> tuple[AsyncKustoSaver, FaultyBackend]:
    backend = FaultyBackend(EmbeddedBackend(":memory:"), plan)
    return AsyncKustoSaver(backend, **otel.providers(), **{**FAST, **options}), backend


def checkpoint(step: int, value: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    cp = empty_checkpoint()
    cp["channel_values"] = {"messages": value if value is not None else [f"m{i}" for i in range(step + 1)]}
    cp["channel_versions"] = {"messages": f"{step + 1:032}.0"}
    return cp, {"messages": f"{step + 1:032}.0"}  # type: ignore[return-value]


async def put_chain(saver: Any, thread: str, steps: int) -> None:
    cfg: dict[str, Any] = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
    for step in range(steps):
        cp, versions = checkpoint(step)
        cfg = await saver.aput(cfg, cp, {"source": "loop", "step": step}, versions)
        await saver.aput_writes(cfg, [("messages", f"w{step}")], f"task-{step}")


def by_id(spans: list[ReadableSpan]) -> dict[int, ReadableSpan]:
    return {s.context.span_id: s for s in spans}


# -- metrics, engine on asyncio and trio ---------------------------------------------


@pytest.mark.anyio
async def test_batch_rows_add_up_to_the_rows_written(otel: Otel) -> None:
    saver, backend = saver_on(otel, batch_size=7)
    async with saver:
        async with anyio.create_task_group() as tg:
            for i in range(12):
                tg.start_soon(put_chain, saver, f"t{i}", 6)
        await saver.adelete_thread("t0")
        await saver.adelete_thread("t1")
        await saver.flush()
        written = {t.name: await backend.inner.count_rows(t.name) for t in TABLES}
        stats = saver.engine.stats()
    assert sum(written.values()) > 12 * 6 * 2
    for table, rows in written.items():
        assert otel.total(names.BATCH_ROWS, **{names.DB_COLLECTION_NAME: table}) == rows, table
    assert otel.total(names.BATCH_ROWS) == stats["rows_ingested"] == sum(written.values())
    assert otel.total(names.INGEST_BATCHES, **{names.OUTCOME: names.OUTCOME_OK}) == stats["batches_ok"]
    assert otel.count(names.INGEST_DURATION) == stats["batches_ok"]
    assert otel.count(names.BATCH_BYTES) == stats["batches_ok"] and otel.total(names.BATCH_BYTES) > 0
    # one duration per saver call, by method, with the semantic-convention attributes
    puts = otel.points(names.OPERATION_DURATION, **{names.DB_OPERATION_NAME: "put"})
    assert sum(p.count for p in puts) == 12 * 6
    assert puts[0].attributes[names.DB_SYSTEM_NAME] == "duckdb"
    assert puts[0].attributes[names.DB_NAMESPACE] == "memory"
    assert otel.count(names.OPERATION_DURATION, **{names.DB_OPERATION_NAME: "put_writes"}) == 12 * 6
    assert otel.count(names.OPERATION_DURATION, **{names.DB_OPERATION_NAME: "delete_thread"}) == 2


@pytest.mark.anyio
async def test_call_durations_recorded_in_bursts_all_reach_every_collection(otel: Otel) -> None:
    """Saver call durations go to the SDK in bursts (telemetry.instruments._Deferred):
    past the burst size and with a reader collecting from another thread all along,
    every call is counted once, and a collection right after a call already has it."""
    # metrics only: a call traced by a recording span has its duration recorded at once
    saver = AsyncKustoSaver(
        EmbeddedBackend(":memory:"), meter_provider=otel.meter_provider,
        tracer_provider=trace.NoOpTracerProvider(), **FAST,
    )
    stop = threading.Event()
    collections = 0

    def collect() -> None:
        nonlocal collections
        while not stop.is_set():
            otel.reader.get_metrics_data()
            collections += 1

    cfg = {"configurable": {"thread_id": "t", "checkpoint_ns": ""}}
    async with saver:
        collector = threading.Thread(target=collect)
        collector.start()
        try:
            for _ in range(700):  # > 2 bursts of 256
                await saver.aget_tuple(cfg)
        finally:
            stop.set()
            collector.join()
        await saver.aget_tuple(cfg)
        assert otel.count(names.OPERATION_DURATION, **{names.DB_OPERATION_NAME: "get_tuple"}) == 701
    assert collections > 1


@pytest.mark.anyio
async def test_restart_after_injected_crash_increments_the_restart_counter(otel: Otel) -> None:
    saver, _ = saver_on(otel)
    async with saver:
        await put_chain(saver, "a", 2)
        assert otel.total(names.ACTOR_RESTARTS) == 0
        await saver.engine.crash("ingestor")
        await put_chain(saver, "b", 2)
        await saver.flush()
        await saver.engine.crash("cache")
        await put_chain(saver, "c", 1)
        await saver.flush()
    assert otel.total(names.ACTOR_RESTARTS, **{names.ACTOR: "ingestor"}) == 1
    assert otel.total(names.ACTOR_RESTARTS, **{names.ACTOR: "cache"}) == 1
    assert otel.total(names.ACTOR_RESTARTS) == 2
    point = otel.points(names.ACTOR_RESTARTS, **{names.ACTOR: "ingestor"})[0]
    assert point.attributes[names.ERROR_TYPE] == "InjectedCrash"


@pytest.mark.anyio
async def test_stalled_backend_raises_the_backpressure_wait(otel: Otel) -> None:
    saver, backend = saver_on(
        otel,
        max_buffered_bytes=512 * 1024, max_batch_bytes=32 * 1024, ingest_queue_size=2,
        ingest_concurrency=2, batch_size=50, mailbox_size=8, cell_limit=16 * 1024,
    )
    payload = "x" * 6000
    stall = 0.3
    async with saver:
        backend.stall()

        async def writer(i: int) -> None:
            cfg: dict[str, Any] = {"configurable": {"thread_id": f"t{i}", "checkpoint_ns": ""}}
            for step in range(3):
                cp, versions = checkpoint(step, [payload, step])
                cfg = await saver.aput(cfg, cp, {"step": step}, versions)

        async with anyio.create_task_group() as tg:
            for i in range(60):
                tg.start_soon(writer, i)
            await anyio.sleep(stall)
            try:
                # while stalled: the mailbox is full, senders are blocked, the gauges show it
                depth = otel.points(names.MAILBOX_DEPTH, **{names.ACTOR: "batcher"})
                capacity = otel.points(names.MAILBOX_CAPACITY, **{names.ACTOR: "batcher"})
                assert (depth[0].value, capacity[0].value) == (8, 8)
                assert otel.points(names.BUFFERED_BYTES)[0].value > 0
                during = otel.count(names.BACKPRESSURE_WAIT)  # a blocked put is recorded when it gets in
            finally:
                backend.resume()
        await saver.flush()
    waited = otel.points(names.BACKPRESSURE_WAIT, **{names.DB_OPERATION_NAME: "put"})
    assert sum(p.count for p in waited) > during
    assert max(p.max for p in waited) >= stall * 0.8


@pytest.mark.anyio
async def test_cache_hits_and_misses_are_counted(otel: Otel) -> None:
    saver, _ = saver_on(otel)
    cfg = {"configurable": {"thread_id": "t", "checkpoint_ns": ""}}
    async with saver:
        assert await saver.aget_tuple(cfg) is None  # miss: loads the thread's view
        await put_chain(saver, "t", 3)
        for _ in range(4):
            assert await saver.aget_tuple(cfg) is not None  # hits: the view is current
        stats = saver.engine.stats()
        assert otel.total(names.CACHE_REQUESTS, **{names.CACHE_RESULT: names.CACHE_MISS}) == stats["cache_misses"] == 1
        assert otel.total(names.CACHE_REQUESTS, **{names.CACHE_RESULT: names.CACHE_HIT}) == stats["cache_hits"] == 4
    assert otel.count(names.QUERY_DURATION, **{names.OUTCOME: names.OUTCOME_OK}) >= 1


@pytest.mark.anyio
async def test_visibility_lag_and_overlay_are_recorded(otel: Otel) -> None:
    latency = 0.05
    saver, _ = saver_on(otel, FaultPlan(ingest_latency=Latency(latency)))
    async with saver:
        await put_chain(saver, "t", 4)
        # a put hands its records to the cache's mailbox; a read queues behind them
        await saver.aget_tuple({"configurable": {"thread_id": "t", "checkpoint_ns": ""}})
        overlay = otel.points(names.OVERLAY_ROWS)[0].value
        assert overlay > 0 and otel.points(names.OVERLAY_BYTES)[0].value > 0
        await saver.flush()
        with anyio.fail_after(5):  # the cache learns of the acknowledgements right after
            while otel.points(names.OVERLAY_ROWS)[0].value:
                await anyio.sleep(0.01)
        await saver.adelete_thread("t")
        assert otel.points(names.TOMBSTONES_PENDING)[0].value == 1
        await saver.flush()
        assert await saver.engine.compact() == 1
        assert otel.points(names.TOMBSTONES_PENDING)[0].value == 0
        batches = saver.engine.stats()["batches_ok"]
    # once per acknowledged batch (its oldest record: 4 checkpoints, 4 blobs, 4 writes and
    # 1 tombstone went in these batches), no sooner than the backend acknowledged it
    lag = otel.points(names.VISIBILITY_LAG)
    assert sum(p.count for p in lag) == batches >= 4  # 3 tables and Tombstones
    assert min(p.min for p in lag) >= latency * 0.9
    # a closed engine reports no gauges
    assert otel.points(names.OVERLAY_ROWS) == []


@pytest.mark.anyio
async def test_failed_calls_carry_error_type(otel: Otel) -> None:
    saver, _ = saver_on(otel, FaultPlan(fail_next_ingests=1, fail_permanently=True))
    async with saver:
        await put_chain(saver, "t", 1)
        with pytest.raises(Exception):
            await saver.flush()
    assert otel.total(names.INGEST_BATCHES, **{names.OUTCOME: names.OUTCOME_FAILED}) == 1
    assert otel.count(names.OPERATION_DURATION, **{names.ERROR_TYPE: "IngestError"}) == 0  # flush is not timed
    with pytest.raises(Exception):
        await saver.aget_tuple({"configurable": {"thread_id": "t", "checkpoint_ns": ""}})
    failed = otel.points(names.OPERATION_DURATION, **{names.DB_OPERATION_NAME: "get_tuple"})
    assert [p.attributes.get(names.ERROR_TYPE) for p in failed] == ["EngineClosedError"]
    [span] = otel.spans("get_tuple")
    assert span.status.status_code == trace.StatusCode.ERROR
    assert span.attributes[names.ERROR_TYPE] == "EngineClosedError"


@pytest.mark.anyio
async def test_savers_sharing_a_meter_provider_both_report_their_gauges(otel: Otel, tmp_path: Any) -> None:
    # told apart by db.namespace (the database)
    a = AsyncKustoSaver(EmbeddedBackend(str(tmp_path / "a.duckdb")), **otel.providers(), **FAST)
    b = AsyncKustoSaver(EmbeddedBackend(str(tmp_path / "b.duckdb")), **otel.providers(), mailbox_size=64, **FAST)
    async with a, b:
        caps = sorted(p.value for p in otel.points(names.MAILBOX_CAPACITY, **{names.ACTOR: "cache"}))
        assert caps == [64, 1024]
    assert otel.points(names.MAILBOX_CAPACITY) == []


# -- traces --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_ingest_span_links_to_the_put_spans_it_carries(otel: Otel) -> None:
    saver, _ = saver_on(otel)
    async with saver:
        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(put_chain, saver, f"t{i}", 3)
        await saver.flush()
    puts = otel.spans("put") + otel.spans("put_writes")
    assert len(puts) == 30
    ingests = [s for s in otel.spans() if s.name.startswith("ingest ")]
    assert {s.name for s in ingests} == {"ingest Checkpoints", "ingest CheckpointBlobs", "ingest CheckpointWrites"}
    linked: dict[str, set[int]] = {}
    for s in ingests:
        assert s.parent is None  # a batch starts its own trace...
        assert s.kind == trace.SpanKind.CLIENT
        assert s.attributes[names.DB_OPERATION_NAME] == "ingest"
        table = s.attributes[names.DB_COLLECTION_NAME]
        assert s.name == f"ingest {table}"
        # ...and links to the spans of the puts whose rows it carries
        linked.setdefault(table, set()).update(link.context.span_id for link in s.links)
    put_ids = {s.context.span_id for s in otel.spans("put")}
    writes_ids = {s.context.span_id for s in otel.spans("put_writes")}
    assert linked["Checkpoints"] == put_ids
    assert linked["CheckpointBlobs"] == put_ids
    assert linked["CheckpointWrites"] == writes_ids
    # the batcher's work on each put is a child span of that put
    spans = by_id(otel.spans())
    batcher = otel.spans("batcher Put")
    assert len(batcher) == 30
    assert {spans[s.parent.span_id].name for s in batcher} == {"put", "put_writes"}
    for s in batcher:
        assert s.context.trace_id == spans[s.parent.span_id].context.trace_id


@pytest.mark.anyio
async def test_ingest_span_caps_its_links_and_counts_the_rest(otel: Otel) -> None:
    saver, _ = saver_on(otel, batch_size=1000, flush_interval=30.0)
    n = names.MAX_LINKS + 22
    async with saver:
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(put_chain, saver, f"t{i}", 1)
        await saver.flush()
    [ck] = otel.spans("ingest Checkpoints")
    assert ck.attributes[names.BATCH_ROWS_ATTR] == n
    assert len(ck.links) == names.MAX_LINKS
    assert ck.attributes[names.LINKS_DROPPED] == n - names.MAX_LINKS


@pytest.mark.anyio
async def test_backend_query_span_is_a_child_of_the_saver_span(otel: Otel) -> None:
    saver, _ = saver_on(otel)
    cfg = {"configurable": {"thread_id": "t", "checkpoint_ns": ""}}
    async with saver:
        await put_chain(saver, "t", 2)
        await saver.flush()
        otel.spans_exporter.clear()
        saver.engine._children["cache"].current.views.clear()  # type: ignore[union-attr]
        assert await saver.aget_tuple(cfg) is not None
        assert len([t async for t in saver.alist(cfg)]) == 2
    spans = by_id(otel.spans())
    [get] = otel.spans("get_tuple")
    [lst] = otel.spans("list")
    assert get.kind == trace.SpanKind.CLIENT
    assert get.attributes[names.DB_OPERATION_NAME] == "get_tuple"
    for call in (get, lst):
        children = [s for s in spans.values() if s.parent is not None and s.parent.span_id == call.context.span_id]
        assert sorted(s.name for s in children) == ["cache Read", "query Checkpoints", "query values"]
        for child in children:
            assert child.context.trace_id == call.context.trace_id
        [query] = [s for s in children if s.name == "query Checkpoints"]
        assert query.kind == trace.SpanKind.CLIENT
        assert query.attributes[names.DB_COLLECTION_NAME] == "Checkpoints"
        assert query.attributes[names.DB_OPERATION_NAME] == "query"


@pytest.mark.anyio
async def test_delete_spans_reach_the_tombstone_batch(otel: Otel) -> None:
    saver, _ = saver_on(otel)
    async with saver:
        await put_chain(saver, "t", 1)
        await saver.adelete_thread("t")
        await saver.flush()
    [delete] = otel.spans("delete_thread")
    [deleter] = otel.spans("deleter DeleteThreads")
    assert deleter.parent.span_id == delete.context.span_id
    batcher = [s for s in otel.spans("batcher Put") if s.parent.span_id == deleter.context.span_id]
    assert len(batcher) == 1
    [tomb] = otel.spans("ingest Tombstones")
    assert [link.context.span_id for link in tomb.links] == [deleter.context.span_id]


@pytest.mark.anyio
async def test_no_sdk_means_no_span_is_captured_or_created() -> None:
    # the global providers are the API's no-op ones in this test process
    assert not trace.get_current_span().is_recording()
    assert capture() is None
    assert Read(ReadSpec(("t",), ""), None).trace is None  # type: ignore[arg-type]
    async with AsyncKustoSaver.embedded(":memory:", **FAST) as saver:
        await put_chain(saver, "t", 2)
        await saver.flush()
        assert saver.engine.stats()["rows_ingested"] > 0


def test_sync_saver_span_has_the_calling_threads_span_as_parent(otel: Otel) -> None:
    tracer = otel.tracer_provider.get_tracer("host")
    with KustoSaver.embedded(":memory:", **otel.providers(), **FAST) as saver:
        with tracer.start_as_current_span("host request") as host:
            cfg = {"configurable": {"thread_id": "t", "checkpoint_ns": ""}}
            cp, versions = checkpoint(0)
            saver.put(cfg, cp, {"step": 0}, versions)  # type: ignore[arg-type]
    [put] = otel.spans("put")
    assert put.parent is not None and put.parent.span_id == host.get_span_context().span_id
    [batcher] = otel.spans("batcher Put")
    assert batcher.parent.span_id == put.context.span_id


# -- exporter setup ------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _some_traffic(handle: Any) -> None:
    async with AsyncKustoSaver.embedded(
        ":memory:", meter_provider=handle.meter_provider, tracer_provider=handle.tracer_provider, **FAST
    ) as saver:
        await put_chain(saver, "t", 2)
        assert await saver.aget_tuple({"configurable": {"thread_id": "t", "checkpoint_ns": ""}}) is not None
        await saver.flush()
        handle.force_flush()


def test_console_export_writes_spans_and_metrics_to_the_stream() -> None:
    out = io.StringIO()
    handle = configure_telemetry(console=out, set_global=False, export_interval=60)
    try:
        anyio.run(_some_traffic, handle)
    finally:
        handle.shutdown()
    text = out.getvalue()
    assert '"name": "put"' in text and '"name": "ingest Checkpoints"' in text
    assert names.OPERATION_DURATION in text and names.BATCH_ROWS in text
    assert '"service.name": "langgraph-checkpoint-kusto"' in text


def test_prometheus_endpoint_serves_the_metrics_on_loopback() -> None:
    port = _free_port()
    handle = configure_telemetry(prometheus_port=port, set_global=False)
    try:
        assert handle.prometheus_url == f"http://127.0.0.1:{port}/metrics"
        anyio.run(_some_traffic, handle)
        with urllib.request.urlopen(handle.prometheus_url, timeout=10) as resp:
            body = resp.read().decode()
    finally:
        handle.shutdown()
    # the names the shipped Grafana dashboard queries
    for metric in (
        "db_client_operation_duration_seconds_bucket",
        "kusto_checkpoint_batch_rows_sum",
        "kusto_checkpoint_ingest_batches_total",
        "kusto_checkpoint_cache_requests_total",
        "kusto_checkpoint_mailbox_depth",
        "kusto_checkpoint_visibility_lag_seconds_count",
    ):
        assert metric in body, metric
    assert 'db_operation_name="put"' in body and 'db_system_name="duckdb"' in body


class _Collector(http.server.BaseHTTPRequestHandler):
    received: list[tuple[str, str, bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        self.received.append((self.path, self.headers.get("Content-Type", ""), body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_otlp_export_posts_protobuf_to_the_endpoint() -> None:
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    _Collector.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        handle = configure_telemetry(
            otlp_endpoint=f"http://127.0.0.1:{server.server_address[1]}", set_global=False, export_interval=60
        )
        try:
            anyio.run(_some_traffic, handle)
        finally:
            handle.shutdown()
    finally:
        server.shutdown()
        server.server_close()
    span_names: set[str] = set()
    metric_names: set[str] = set()
    for path, ctype, body in _Collector.received:
        assert ctype == "application/x-protobuf"
        if path == "/v1/traces":
            req = ExportTraceServiceRequest.FromString(body)
            span_names |= {s.name for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans}
        elif path == "/v1/metrics":
            mreq = ExportMetricsServiceRequest.FromString(body)
            metric_names |= {
                m.name for rm in mreq.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
            }
    assert {"put", "put_writes", "get_tuple", "batcher Put", "ingest Checkpoints"} <= span_names
    assert {names.OPERATION_DURATION, names.BATCH_ROWS, names.INGEST_DURATION} <= metric_names


def test_trace_sample_ratio_samples_traces_not_metrics() -> None:
    out = io.StringIO()
    handle = configure_telemetry(console=out, trace_sample_ratio=0.0, set_global=False, export_interval=60)
    try:
        anyio.run(_some_traffic, handle)
    finally:
        handle.shutdown()
    text = out.getvalue()
    assert '"name": "put"' not in text  # no span recorded...
    assert names.OPERATION_DURATION in text  # ...every metric still is
    with pytest.raises(ValueError, match="trace_sample_ratio"):
        configure_telemetry(trace_sample_ratio=2.0, set_global=False)


def test_every_metric_is_in_the_docs_table_and_reported(otel: Otel) -> None:
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "telemetry.md").read_text()
    rows = re.findall(r"^\| `([\w.]+)` \| (histogram|counter|gauge) \|", readme, re.M)
    assert [name for name, _ in rows] == list(names.METRICS)
    # and each one is a real instrument of that kind (created by the saver's Instruments)
    kinds = {"Histogram": "histogram", "Sum": "counter", "Gauge": "gauge"}

    async def run() -> None:
        saver, _ = saver_on(otel)
        async with saver:
            await put_chain(saver, "t", 1)
            await saver.flush()
            data = otel.reader.get_metrics_data()
            seen = {
                m.name: kinds[type(m.data).__name__]
                for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
            }
        for name, kind in rows:
            if name in seen:  # counters appear with their first increment
                assert seen[name] == kind, name
        assert len(seen) >= 13

    anyio.run(run)
    for span in ("`ingest <Table>`", "`batcher Put`", "`cache Read`", "`query Checkpoints`", "`deleter DeleteThreads`"):
        assert span in readme, span


def test_kusto_backend_attributes_follow_the_conventions() -> None:
    from langgraph.checkpoint.kusto.telemetry import Instruments

    class Cluster:
        name = "kusto"
        database = "agents"
        cluster_uri = "https://mycluster.westeurope.kusto.windows.net"

    inst = Instruments.for_backend(Cluster())
    assert inst.base_attrs == {
        names.DB_SYSTEM_NAME: "azure.kusto",  # not in the registry: see names.py
        names.DB_NAMESPACE: "agents",
        names.SERVER_ADDRESS: "mycluster.westeurope.kusto.windows.net",
    }
    assert inst.bound(names.DB_OPERATION_NAME, "put") is inst.bound(names.DB_OPERATION_NAME, "put")


@pytest.mark.anyio
async def test_a_failed_compaction_pass_is_counted_logged_and_retried(otel: Otel, caplog: Any) -> None:
    saver, backend = saver_on(otel, FaultPlan(fail_next_commands=1))
    async with saver:
        await put_chain(saver, "doomed", 2)
        await put_chain(saver, "kept", 1)
        await saver.adelete_thread("doomed")
        with caplog.at_level("WARNING", logger="langgraph.checkpoint.kusto.compaction"):
            assert await saver.engine.compact() == 0
        assert "compaction pass failed" in caplog.text and "injected failure" in caplog.text
        stats = saver.engine.stats()
        assert stats["compaction_failures"] == 1 and "injected failure" in stats["last_compaction_error"]
        assert otel.total(names.COMPACTION_FAILURES, **{names.ERROR_TYPE: "PermanentBackendError"}) == 1
        assert await saver.aget_tuple({"configurable": {"thread_id": "doomed"}}) is None  # the tombstone holds
        assert await saver.engine.compact() == 1  # the next pass retries it
        assert saver.engine.stats()["compaction_failures"] == 1
        assert await backend.count_rows("Checkpoints") == 1  # only "kept" is left
