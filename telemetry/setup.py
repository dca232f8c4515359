"""Exporter setup in one call, for hosts that have no OpenTelemetry setup of their own.

    from langgraph.checkpoint.kusto.telemetry import configure_telemetry

    telemetry = configure_telemetry(prometheus_port=9464, otlp_endpoint="http://localhost:4318")
    ...
    telemetry.shutdown()   # flushes spans and metrics, stops the Prometheus endpoint

A host that already configures the OpenTelemetry SDK needs none of this: the saver
reports to the global providers (or to the ones passed as ``meter_provider`` /
``tracer_provider``). Needs the ``telemetry`` extra (SDK, OTLP/HTTP and Prometheus
exporters).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from . import names


@dataclass
class TelemetryHandle:
    """What :func:`configure_telemetry` built; :meth:`shutdown` flushes and stops it all."""

    meter_provider: Any
    tracer_provider: Any
    #: (host, port) the Prometheus endpoint listens on, or None
    prometheus_address: tuple[str, int] | None = None
    _server: Any = None
    _thread: Any = None
    _closed: bool = field(default=False, repr=False)

    @property
    def prometheus_url(self) -> str | None:
        if self.prometheus_address is None:
            return None
        host, port = self.prometheus_address
        return f"http://{host}:{port}/metrics"

    def force_flush(self, timeout_millis: int = 10_000) -> None:
        self.tracer_provider.force_flush(timeout_millis)
        self.meter_provider.force_flush(timeout_millis)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.tracer_provider.shutdown()
            self.meter_provider.shutdown()
        finally:
            if self._server is not None:
                self._server.shutdown()
                self._server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)

    def __enter__(self) -> TelemetryHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def configure_telemetry(
    *,
    service_name: str = "langgraph-checkpoint-kusto",
    console: bool | TextIO = False,
    otlp_endpoint: str | None = None,
    otlp_headers: dict[str, str] | None = None,
    prometheus_port: int | None = None,
    prometheus_host: str = "127.0.0.1",
    export_interval: float = 10.0,
    trace_sample_ratio: float = 1.0,
    resource_attributes: dict[str, Any] | None = None,
    set_global: bool = True,
) -> TelemetryHandle:
    """Set up OpenTelemetry metrics and traces with the exporters asked for.

    * ``console``: ``True`` (stdout) or a text stream: spans and metrics printed as JSON.
    * ``otlp_endpoint``: base URL of an OTLP/HTTP receiver (a Collector, Grafana Alloy,
      ...), e.g. ``"http://localhost:4318"``; spans go to ``/v1/traces``, metrics to
      ``/v1/metrics``.
    * ``prometheus_port``: serve ``/metrics`` for Prometheus to scrape on
      ``prometheus_host:prometheus_port`` (``0`` picks a free port; see
      :attr:`TelemetryHandle.prometheus_address`).
    * ``export_interval``: seconds between metric pushes (console, OTLP).
    * ``trace_sample_ratio``: fraction of traces recorded (``ParentBased(TraceIdRatioBased)``:
      a call inside a sampled host span is always recorded). Every recorded span costs
      the SDK's span price (see the overhead figures in docs/telemetry.md); 0.1 keeps traces
      representative at a fraction of it. Metrics are not sampled.
    * ``set_global``: install the providers as OpenTelemetry's global ones (what the
      saver uses by default; OpenTelemetry allows this once per process). With
      ``False``, pass ``handle.meter_provider`` / ``handle.tracer_provider`` to the saver.
    """
    if not 0.0 <= trace_sample_ratio <= 1.0:
        from ..engine.errors import ConfigError  # here: the engine imports telemetry

        raise ConfigError(f"trace_sample_ratio must be within [0, 1], got {trace_sample_ratio!r}")
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "configure_telemetry needs the OpenTelemetry SDK: "
            "pip install 'langgraph-checkpoint-kusto[telemetry]'"
        ) from exc

    resource = Resource.create({"service.name": service_name, **(resource_attributes or {})})
    interval_ms = max(1, int(export_interval * 1000))
    readers: list[Any] = []
    span_processors: list[Any] = []
    server = thread = None
    address: tuple[str, int] | None = None

    if console:
        stream = sys.stdout if console is True else console
        span_processors.append(BatchSpanProcessor(ConsoleSpanExporter(out=stream)))
        readers.append(
            PeriodicExportingMetricReader(ConsoleMetricExporter(out=stream), export_interval_millis=interval_ms)
        )
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        base = otlp_endpoint.rstrip("/")
        span_processors.append(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{base}/v1/traces", headers=otlp_headers))
        )
        readers.append(
            PeriodicExportingMetricReader(
                OTLPMetricExporter(endpoint=f"{base}/v1/metrics", headers=otlp_headers),
                export_interval_millis=interval_ms,
            )
        )
    if prometheus_port is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry()
        readers.append(PrometheusMetricReader(registry=registry))
        server, thread = start_http_server(prometheus_port, addr=prometheus_host, registry=registry)
        address = (prometheus_host, server.server_address[1])

    if trace_sample_ratio < 1.0:
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        tracer_provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(trace_sample_ratio)))
    else:
        tracer_provider = TracerProvider(resource=resource)
    for processor in span_processors:
        tracer_provider.add_span_processor(processor)
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    if set_global:
        from opentelemetry import metrics, trace

        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(meter_provider)
    return TelemetryHandle(meter_provider, tracer_provider, address, server, thread)


__all__ = ["TelemetryHandle", "configure_telemetry", "names"]
