"""What a run measures beyond throughput: per-operation latency and what the backend saw.

* :class:`Latencies` - one growing array of seconds per operation name; the
  percentiles come from numpy at the end, so recording costs an append.
* :func:`time_saver_calls` - wraps the async methods of *one saver instance*
  (ours or a baseline, the same way) so every call LangGraph or the raw
  workload makes is timed as the caller sees it.
* :class:`RecordingBackend` - wraps our saver's backend (outside any
  latency-injecting :class:`~langgraph.checkpoint.kusto.engine.backends.faulty.FaultyBackend`)
  and records rows and bytes per ingest call, ingest and query call durations,
  and the visibility lag of each row (its ``written_at``, stamped when the
  saver accepted it, to the backend's acknowledgement).
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..engine.schema import TABLES_BY_NAME

#: percentiles reported for every latency distribution
PERCENTILES = (50, 95, 99)
#: saver methods timed on every saver (the ones the workloads call)
TIMED_METHODS = ("aget_tuple", "aput", "aput_writes")


class Latencies:
    """Durations (seconds) per operation name."""

    def __init__(self) -> None:
        self.samples: dict[str, array[float]] = {}

    def add(self, op: str, seconds: float) -> None:
        a = self.samples.get(op)
        if a is None:
            a = self.samples[op] = array("d")
        a.append(seconds)

    def summary(self) -> dict[str, dict[str, float]]:
        """``{op: {count, min_ms, mean_ms, p50_ms, p95_ms, p99_ms, max_ms}}``."""
        return {op: distribution(a, scale=1000.0, unit="ms") for op, a in sorted(self.samples.items())}


def distribution(values: Sequence[float] | array[float], *, scale: float = 1.0, unit: str = "") -> dict[str, float]:
    """count, min, mean, p50/p95/p99 and max of ``values`` (times ``scale``), keys suffixed ``_<unit>``."""
    suffix = f"_{unit}" if unit else ""
    a = np.frombuffer(values, dtype=np.float64) if isinstance(values, array) else np.asarray(values, dtype=np.float64)
    out: dict[str, float] = {"count": int(a.size)}
    if a.size == 0:
        return out
    pct = np.percentile(a, PERCENTILES) * scale
    out[f"min{suffix}"] = float(a.min() * scale)
    out[f"mean{suffix}"] = float(a.mean() * scale)
    for p, v in zip(PERCENTILES, pct):
        out[f"p{p}{suffix}"] = float(v)
    out[f"max{suffix}"] = float(a.max() * scale)
    return out


def time_saver_calls(saver: Any, latencies: Latencies, methods: Sequence[str] = TIMED_METHODS) -> None:
    """Replace ``methods`` on this instance by timing wrappers (the class is untouched)."""
    clock = time.perf_counter

    def wrap(name: str, fn: Any) -> Any:
        add = latencies.add

        async def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = clock()
            try:
                return await fn(*args, **kwargs)
            finally:
                add(name, clock() - t0)

        return timed

    for name in methods:
        setattr(saver, name, wrap(name, getattr(saver, name)))


class RecordingBackend:
    """A pass-through backend that records what the engine asks of it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.database = getattr(inner, "database", "")
        self.calls = Latencies()  # "ingest", "query"
        self.batch_rows: array[float] = array("d")
        self.batch_bytes: array[float] = array("d")
        self.lag: array[float] = array("d")
        self.ingest_errors = 0
        self.query_errors = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def ingest(self, table: str, rows: Sequence[Mapping[str, Any]]) -> None:
        t0 = time.perf_counter()
        try:
            await self.inner.ingest(table, rows)
        except BaseException:
            self.ingest_errors += 1
            self.calls.add("ingest", time.perf_counter() - t0)
            raise
        self.calls.add("ingest", time.perf_counter() - t0)
        now_us = time.time_ns() // 1000
        nbytes = 0
        lag = self.lag
        column = getattr(rows, "column", None)  # the engine's Rows: no dict per row
        if column is not None:
            has = TABLES_BY_NAME[table].column_names  # tombstones have neither column
            payloads = column("payload") if "payload" in has else []
            written = column("written_at") if "written_at" in has else []
        else:
            payloads = [row.get("payload") for row in rows]
            written = [row.get("written_at") for row in rows]
        for p in payloads:
            if isinstance(p, (str, bytes)):
                nbytes += len(p)
        for w in written:
            if isinstance(w, int):
                lag.append(max(0, now_us - w) / 1e6)
            elif w is not None and hasattr(w, "timestamp"):
                lag.append(max(0.0, now_us / 1e6 - w.timestamp()))
        self.batch_rows.append(len(rows))
        self.batch_bytes.append(nbytes)

    async def query(self, kql: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        try:
            return await self.inner.query(kql, params)  # type: ignore[no-any-return]
        except BaseException:
            self.query_errors += 1
            raise
        finally:
            self.calls.add("query", time.perf_counter() - t0)

    async def command(self, kql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        return await self.inner.command(kql, params)  # type: ignore[no-any-return]

    def summary(self) -> dict[str, Any]:
        return {
            "calls_ms": self.calls.summary(),
            "batch_rows": distribution(self.batch_rows),
            "batch_payload_bytes": distribution(self.batch_bytes),
            "visibility_lag_ms": distribution(self.lag, scale=1000.0, unit="ms"),
            "ingest_call_errors": self.ingest_errors,
            "query_call_errors": self.query_errors,
        }
