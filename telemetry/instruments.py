"""OpenTelemetry instruments of one engine.

Built from the host's global MeterProvider and TracerProvider (the OpenTelemetry
API's no-op ones when the host configured no SDK). Observable gauges read the
engine's live state through callbacks registered by the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation

from . import names

GaugeReader = Callable[[], Iterable[tuple[float, dict[str, Any]]]]


class Instruments:
    def __init__(
        self,
        *,
        db_system: str,
        db_namespace: str,
        meter_provider: metrics.MeterProvider | None = None,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        meter = metrics.get_meter(names.METER_NAME, meter_provider=meter_provider)
        self.tracer = trace.get_tracer(names.TRACER_NAME, tracer_provider=tracer_provider)
        self.base_attrs = {names.DB_SYSTEM_NAME: db_system, names.DB_NAMESPACE: db_namespace}
        self._gauges: dict[str, list[GaugeReader]] = {}

        self.operation_duration = meter.create_histogram(
            names.OPERATION_DURATION, unit="s",
            description="Duration of saver operations, per method (db.operation.name)",
            explicit_bucket_boundaries_advisory=[
                0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
            ],
        )
        self.batch_rows = meter.create_histogram(
            names.BATCH_ROWS, unit="{row}", description="Rows per batch sent to the backend",
            explicit_bucket_boundaries_advisory=[1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000],
        )
        self.batch_bytes = meter.create_histogram(
            names.BATCH_BYTES, unit="By", description="Payload bytes per batch sent to the backend",
        )
        self.ingest_duration = meter.create_histogram(
            names.INGEST_DURATION, unit="s",
            description="Time to ingest one batch, retries included",
        )
        self.ingest_batches = meter.create_counter(
            names.INGEST_BATCHES, unit="{batch}",
            description="Batches ingested, by outcome (ok, failed)",
        )
        self.ingest_retries = meter.create_counter(
            names.INGEST_RETRIES, unit="{retry}", description="Retries of transient backend failures",
        )
        self.actor_restarts = meter.create_counter(
            names.ACTOR_RESTARTS, unit="{restart}", description="Actor restarts by the supervisor",
        )
        self.backpressure_wait = meter.create_histogram(
            names.BACKPRESSURE_WAIT, unit="s",
            description="Time callers spent blocked on a full mailbox",
        )
        self.cache_requests = meter.create_counter(
            names.CACHE_REQUESTS, unit="{request}",
            description="Reads answered by the query cache (hit) or the backend (miss)",
        )
        self.visibility_lag = meter.create_histogram(
            names.VISIBILITY_LAG, unit="s",
            description="Time from acceptance of a record to the backend acknowledging it",
        )
        for name, unit, desc in (
            (names.MAILBOX_DEPTH, "{message}", "Messages queued in an actor's mailbox"),
            (names.MAILBOX_CAPACITY, "{message}", "Capacity of an actor's mailbox"),
            (names.BUFFERED_BYTES, "By", "Bytes accepted and not yet ingested"),
            (names.OVERLAY_ROWS, "{record}", "Records in the read overlay (not yet visible in the backend)"),
            (names.OVERLAY_BYTES, "By", "Bytes in the read overlay"),
            (names.TOMBSTONES_PENDING, "{tombstone}", "Tombstones whose rows are not yet compacted"),
        ):
            self._gauges[name] = []
            meter.create_observable_gauge(
                name, callbacks=[self._observer(name)], unit=unit, description=desc
            )

    def _observer(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            for reader in list(self._gauges.get(name, ())):
                for value, attrs in reader():
                    yield Observation(value, {**self.base_attrs, **attrs})

        return observe

    def register_gauge(self, name: str, reader: GaugeReader) -> None:
        self._gauges[name].append(reader)

    def clear_gauges(self) -> None:
        for readers in self._gauges.values():
            readers.clear()

    def attrs(self, **extra: Any) -> dict[str, Any]:
        return {**self.base_attrs, **extra}
