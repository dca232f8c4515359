"""OpenTelemetry instruments and spans of one engine.

Built from the host's global MeterProvider and TracerProvider (the OpenTelemetry
API's no-op ones when the host configured no SDK), or from providers given
explicitly. Observable gauges read the engine's live state through callbacks the
engine registers.

The instruments of one MeterProvider are created once and shared by every engine
that uses it (an SDK keeps the first observable gauge of a name and drops the
callbacks of a second one, so per-engine gauges would go silent); each engine
adds its own attributes (``db.system.name``, ``db.namespace``) to what it records.

Cost without an SDK: metric calls go to the API's no-op instruments with attribute
dicts built once and cached (:meth:`Instruments.bound`); a span is started only
to find it is not recording, and then nothing is attached, captured or linked.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from contextvars import ContextVar
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import urlparse

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from . import names

T = TypeVar("T")
GaugeReader = Callable[[], Iterable[tuple[float, dict[str, Any]]]]

_DURATION_BUCKETS = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
]
_GAUGES = (
    (names.MAILBOX_DEPTH, "{message}", "Messages queued in an actor's mailbox"),
    (names.MAILBOX_CAPACITY, "{message}", "Capacity of an actor's mailbox"),
    (names.BUFFERED_BYTES, "By", "Bytes accepted and not yet ingested (the memory bound applies to this)"),
    (names.OVERLAY_ROWS, "{record}", "Records in the read overlay (accepted, not yet visible in the backend)"),
    (names.OVERLAY_BYTES, "By", "Bytes in the read overlay"),
    (names.TOMBSTONES_PENDING, "{tombstone}", "Tombstones whose rows are not yet compacted"),
    (names.OLDEST_LIVE_AGE, "s", "Age of the oldest live thread's last activity, as this process's last expiry pass saw it (ttl)"),
)


class _Deferred:
    """A histogram's measurements recorded in bursts instead of one by one.

    ``record`` queues ``(value, attributes)``; the queue goes to the histogram when it
    holds ``limit`` of them, and at the start of every collection (the observable
    instruments' callbacks run first in a collection, :meth:`_MeterInstruments._observer`),
    so every export sees every measurement taken before it. The same values with the
    same attributes reach the SDK; only the moment they do moves. Why: an SDK
    ``Histogram.record`` with three attributes costs about 8 us in a tight loop but
    25-30 us between saver calls, its code and data cold in the CPU caches (raw
    workload: SDK metrics took the event loop from about 330 to 450 us per step).
    ``deque.append`` and ``popleft`` are atomic, so a reader's thread may flush while
    the engine's loop records.
    """

    __slots__ = ("histogram", "limit", "_pending")

    def __init__(self, histogram: Any, limit: int = 256) -> None:
        self.histogram = histogram
        self.limit = limit
        self._pending: deque[tuple[float, dict[str, Any]]] = deque()

    def record(self, value: float, attributes: dict[str, Any]) -> None:
        pending = self._pending
        pending.append((value, attributes))
        if len(pending) >= self.limit:
            self.flush()

    def flush(self) -> None:
        pop = self._pending.popleft
        record = self.histogram.record
        while True:
            try:
                value, attributes = pop()
            except IndexError:
                return
            record(value, attributes)


class _MeterInstruments:
    """The instruments of one MeterProvider, shared by every engine that records into it."""

    def __init__(self, meter_provider: metrics.MeterProvider | None) -> None:
        meter = metrics.get_meter(names.METER_NAME, meter_provider=meter_provider)
        self.lock = threading.Lock()
        #: observable instrument name -> (owner id, reader) for every engine that reports it
        self.gauges: dict[str, list[tuple[int, GaugeReader]]] = {}
        self.operation_duration = meter.create_histogram(
            names.OPERATION_DURATION, unit="s",
            description="Duration of saver operations, per method (db.operation.name)",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self.batch_rows = meter.create_histogram(
            names.BATCH_ROWS, unit="{row}", description="Rows per batch ingested into the backend",
            explicit_bucket_boundaries_advisory=[1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000],
        )
        self.batch_bytes = meter.create_histogram(
            names.BATCH_BYTES, unit="By", description="Payload bytes per batch ingested into the backend",
            explicit_bucket_boundaries_advisory=[
                1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216,
            ],
        )
        self.ingest_duration = meter.create_histogram(
            names.INGEST_DURATION, unit="s",
            description="Time to ingest one batch, retries included, by outcome",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self.ingest_batches = meter.create_counter(
            names.INGEST_BATCHES, unit="{batch}",
            description="Batches ingested, by outcome (ok, failed)",
        )
        self.ingest_retries = meter.create_counter(
            names.INGEST_RETRIES, unit="{retry}", description="Retries of transient ingest failures",
        )
        self.query_duration = meter.create_histogram(
            names.QUERY_DURATION, unit="s",
            description="Backend queries run for reads the query cache could not answer, retries included",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self.actor_restarts = meter.create_counter(
            names.ACTOR_RESTARTS, unit="{restart}", description="Actor restarts by the supervisor",
        )
        self.compaction_failures = meter.create_counter(
            names.COMPACTION_FAILURES, unit="{failure}",
            description="Compaction passes that failed (tombstones keep reads right; the next pass retries)",
        )
        self.forks = meter.create_counter(
            names.FORKS, unit="{fork}",
            description="Checkpoints seen becoming their parent's second child, by how they were seen "
            "(put: written here from an older parent; read: a sibling of the one written here)",
        )
        self.expired_threads = meter.create_counter(
            names.EXPIRED_THREADS, unit="{thread}",
            description="Threads deleted by expiry (ttl) in this process's expiry passes",
        )
        self.rows_removed = meter.create_counter(
            names.ROWS_REMOVED, unit="{row}",
            description="Rows compaction removed physically, by table (db.collection.name)",
        )
        self.backpressure_wait = meter.create_histogram(
            names.BACKPRESSURE_WAIT, unit="s",
            description="Time a put spent blocked on the batcher's full mailbox",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        #: saver calls' durations off the span path (telemetry without tracing): in bursts
        self.operation_duration_deferred = _Deferred(self.operation_duration)
        # counted by the engine anyway: observed at collection, nothing on the read path
        self.gauges[names.CACHE_REQUESTS] = []
        meter.create_observable_counter(
            names.CACHE_REQUESTS, callbacks=[self._observer(names.CACHE_REQUESTS)], unit="{request}",
            description="Reads answered by the query cache (hit) or sent to the backend (miss)",
        )
        self.visibility_lag = meter.create_histogram(
            names.VISIBILITY_LAG, unit="s",
            description="Time from acceptance of a record to the backend acknowledging it",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        for name, unit, desc in _GAUGES:
            self.gauges[name] = []
            meter.create_observable_gauge(name, callbacks=[self._observer(name)], unit=unit, description=desc)

    def _observer(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            self.operation_duration_deferred.flush()  # before the collection reads the histograms
            with self.lock:
                readers = list(self.gauges[name])
            out = []
            for _owner, reader in readers:
                for value, attrs in reader():
                    out.append(Observation(value, attrs))
            return out

        return observe


_shared_lock = threading.Lock()
_shared_global: _MeterInstruments | None = None
_shared: weakref.WeakKeyDictionary[Any, _MeterInstruments] = weakref.WeakKeyDictionary()


def _instruments_of(meter_provider: metrics.MeterProvider | None) -> _MeterInstruments:
    global _shared_global
    with _shared_lock:
        if meter_provider is None:
            if _shared_global is None:
                _shared_global = _MeterInstruments(None)
            return _shared_global
        found = _shared.get(meter_provider)
        if found is None:
            found = _shared[meter_provider] = _MeterInstruments(meter_provider)
        return found


#: the OpenTelemetry context of the recording span (a saver call's or an actor's)
#: this engine's code runs under; None when nothing of ours is being traced
_TRACED: ContextVar[otel_context.Context | None] = ContextVar("kusto_checkpoint_traced", default=None)


def capture() -> otel_context.Context | None:
    """The context of the recording span of ours that is current, else None.

    Messages carry it across mailboxes: it is the parent of the actor's span and of
    backend calls, and the source of an ingest span's links. One context-variable
    read: without an SDK (or for a call the sampler dropped) nothing else is paid.
    """
    return _TRACED.get()


class Links:
    """The traced puts one batch carries: at most MAX_LINKS, the rest counted."""

    __slots__ = ("contexts", "dropped", "_last")

    def __init__(self) -> None:
        self.contexts: list[otel_context.Context] = []
        self.dropped = 0
        self._last: otel_context.Context | None = None

    def add(self, ctx: otel_context.Context) -> None:
        if ctx is self._last:  # several rows of one put
            return
        self._last = ctx
        if len(self.contexts) < names.MAX_LINKS:
            self.contexts.append(ctx)
        else:
            self.dropped += 1

    def links(self) -> list[Link]:
        return [Link(trace.get_current_span(c).get_span_context()) for c in self.contexts]


def add_link(links: Links | None, ctx: otel_context.Context) -> Links:
    """``links`` (created on first use) with the put traced by ``ctx`` added."""
    if links is None:
        links = Links()
    links.add(ctx)
    return links


class _ActorSpan:
    """An actor's span over its work on one message, current while it runs (so the
    messages it sends carry it). A class, not a generator: it runs per message."""

    __slots__ = ("_tracer", "_name", "_parent", "_span", "_token", "_traced")

    def __init__(self, tracer: trace.Tracer, name: str, parent: otel_context.Context) -> None:
        self._tracer = tracer
        self._name = name
        self._parent = parent

    def __enter__(self) -> Any:
        span = self._span = self._tracer.start_span(self._name, context=self._parent, kind=SpanKind.INTERNAL)
        ctx = trace.set_span_in_context(span, self._parent)
        self._token = otel_context.attach(ctx)
        self._traced = _TRACED.set(ctx if span.is_recording() else None)
        return span

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        _TRACED.reset(self._traced)
        otel_context.detach(self._token)
        span = self._span
        if exc is not None:
            span.set_attribute(names.ERROR_TYPE, type(exc).__qualname__)
            span.set_status(Status(StatusCode.ERROR, str(exc) or type(exc).__qualname__))
            if isinstance(exc, Exception):
                span.record_exception(exc)
        span.end()


class Instruments:
    def __init__(
        self,
        *,
        db_system: str,
        db_namespace: str,
        server_address: str | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        shared = _instruments_of(meter_provider)
        self._shared = shared
        self.tracer = trace.get_tracer(names.TRACER_NAME, tracer_provider=tracer_provider)
        self.base_attrs: dict[str, Any] = {
            names.DB_SYSTEM_NAME: names.db_system_name(db_system),
            names.DB_NAMESPACE: db_namespace,
        }
        if server_address:
            self.base_attrs[names.SERVER_ADDRESS] = server_address
        self._bound: dict[tuple[Any, ...], dict[str, Any]] = {(): self.base_attrs}
        self._span_names: dict[tuple[str, type], str] = {}
        self.operation_duration = shared.operation_duration
        self._durations = shared.operation_duration_deferred
        self.batch_rows = shared.batch_rows
        self.batch_bytes = shared.batch_bytes
        self.ingest_duration = shared.ingest_duration
        self.ingest_batches = shared.ingest_batches
        self.ingest_retries = shared.ingest_retries
        self.query_duration = shared.query_duration
        self.actor_restarts = shared.actor_restarts
        self.backpressure_wait = shared.backpressure_wait
        self.compaction_failures = shared.compaction_failures
        self.forks = shared.forks
        self.expired_threads = shared.expired_threads
        self.rows_removed = shared.rows_removed
        self.visibility_lag = shared.visibility_lag

    @classmethod
    def for_backend(
        cls,
        backend: Any,
        *,
        meter_provider: metrics.MeterProvider | None = None,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> Instruments:
        cluster = getattr(backend, "cluster_uri", None)
        return cls(
            db_system=getattr(backend, "name", "kusto"),
            db_namespace=getattr(backend, "database", "") or "",
            server_address=urlparse(cluster).hostname if isinstance(cluster, str) else None,
            meter_provider=meter_provider,
            tracer_provider=tracer_provider,
        )

    # -- attributes ----------------------------------------------------------

    def attrs(self, **extra: Any) -> dict[str, Any]:
        """Base attributes plus ``extra`` (a new dict; prefer :meth:`bound` on hot paths)."""
        return {**self.base_attrs, **extra}

    def bound(self, *pairs: Any) -> dict[str, Any]:
        """Base attributes plus ``key, value, key, value...``: built once, then cached.

        For low-cardinality values only (operation names, tables, outcomes, actors).
        The dict is shared: do not modify it.
        """
        found = self._bound.get(pairs)
        if found is None:
            found = {**self.base_attrs, **dict(zip(pairs[::2], pairs[1::2]))}
            self._bound[pairs] = found
        return found

    # -- gauges --------------------------------------------------------------

    def register_gauge(self, name: str, reader: GaugeReader) -> None:
        base = self.base_attrs

        def read() -> Iterable[tuple[float, dict[str, Any]]]:
            return [(value, {**base, **attrs}) for value, attrs in reader()]

        with self._shared.lock:
            self._shared.gauges[name].append((id(self), read))

    def clear_gauges(self) -> None:
        """Stop reporting this engine's gauges (the engine is closing)."""
        me = id(self)
        with self._shared.lock:
            for readers in self._shared.gauges.values():
                readers[:] = [r for r in readers if r[0] != me]

    # -- spans ---------------------------------------------------------------

    async def timed(self, op: str, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run one saver operation: its span (current while it runs) and its duration."""
        started = time.perf_counter()
        attrs = self.bound(names.DB_OPERATION_NAME, op)
        span = self.tracer.start_span(op, kind=SpanKind.CLIENT, attributes=attrs)
        if not span.is_recording():
            try:
                result = await fn(*args)
            except BaseException as exc:
                self._durations.record(
                    time.perf_counter() - started,
                    self.bound(names.DB_OPERATION_NAME, op, names.ERROR_TYPE, type(exc).__qualname__),
                )
                raise
            self._durations.record(time.perf_counter() - started, attrs)
            return result
        ctx = trace.set_span_in_context(span)
        token = otel_context.attach(ctx)
        traced = _TRACED.set(ctx)
        try:
            result = await fn(*args)
        except BaseException as exc:
            error = type(exc).__qualname__
            span.set_attribute(names.ERROR_TYPE, error)
            span.set_status(Status(StatusCode.ERROR, str(exc) or error))
            if isinstance(exc, Exception):
                span.record_exception(exc)
            self.operation_duration.record(
                time.perf_counter() - started, self.bound(names.DB_OPERATION_NAME, op, names.ERROR_TYPE, error)
            )
            raise
        finally:
            _TRACED.reset(traced)
            otel_context.detach(token)
            span.end()
        self.operation_duration.record(time.perf_counter() - started, attrs)
        return result

    def actor_span(self, actor: str, message: Any, parent: otel_context.Context) -> _ActorSpan:
        """The span of an actor's work on a message sent from the context ``parent``."""
        key = (actor, type(message))
        name = self._span_names.get(key)
        if name is None:
            name = self._span_names[key] = names.actor_span_name(actor, type(message).__name__)
        return _ActorSpan(self.tracer, name, parent)

    @contextmanager
    def ingest_span(self, table: str, nrows: int, links: Links | None) -> Iterator[Any]:
        """The root span of one batch's ingestion, linked to the puts it carries."""
        attrs = {
            **self.bound(names.DB_OPERATION_NAME, names.OP_INGEST, names.DB_COLLECTION_NAME, table),
            names.BATCH_ROWS_ATTR: nrows,
        }
        span_links = None
        if links is not None:
            span_links = links.links()
            if links.dropped:
                attrs[names.LINKS_DROPPED] = links.dropped
        with self.tracer.start_as_current_span(
            names.ingest_span_name(table),
            context=otel_context.Context(),  # a root: not a child of whatever started the actor
            kind=SpanKind.CLIENT,
            attributes=attrs,
            links=span_links,
        ) as span:
            yield span

    async def query(self, parent: otel_context.Context | None, stage: str, call: Awaitable[T]) -> T:
        """Await one backend query of a read: its duration, and its span under ``parent``."""
        started = time.perf_counter()
        outcome = names.OUTCOME_OK
        try:
            if parent is None:
                return await call
            collection = "Checkpoints" if stage == names.SPAN_QUERY_CHECKPOINTS else None
            attrs = (
                self.bound(names.DB_OPERATION_NAME, names.OP_QUERY, names.DB_COLLECTION_NAME, collection)
                if collection
                else self.bound(names.DB_OPERATION_NAME, names.OP_QUERY)
            )
            with self.tracer.start_as_current_span(stage, context=parent, kind=SpanKind.CLIENT, attributes=attrs):
                return await call
        except BaseException:
            outcome = names.OUTCOME_FAILED
            raise
        finally:
            self.query_duration.record(time.perf_counter() - started, self.bound(names.OUTCOME, outcome))


def carry_context(fn: Callable[..., Awaitable[T]], args: tuple[Any, ...]) -> tuple[Callable[..., Awaitable[T]], tuple[Any, ...]]:
    """``fn, args`` to call in another thread's event loop, keeping this thread's
    OpenTelemetry context (so a sync call's span has the caller's span as parent)."""
    ctx = otel_context.get_current()
    if not ctx:
        return fn, args
    return _in_context, (ctx, fn, *args)


async def _in_context(ctx: otel_context.Context, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    token = otel_context.attach(ctx)
    try:
        return await fn(*args)
    finally:
        otel_context.detach(token)
