"""Runs a workload on each saver and builds the results dict.

:func:`run_loadtest` returns a plain dict (JSON-serializable) with the settings,
the environment, one entry per saver (timings, throughput, memory, engine
counters, verification) and the comparison of ours with each baseline. The CLI
only formats that dict; a live display or a JSON/plot output can consume the
same dict, and ``on_event`` callbacks, without touching the measurement.

Per saver, the phases are:

1. **write**: open the saver, run every agent concurrently, then wait until the
   saver holds everything (``flush()`` for ours; the baselines are synchronous).
   Throughput is measured over run + flush, so it counts only stored work.
2. **close** the saver (for ours: the engine stops; every accepted row is in the file).
3. **verify**: open a *fresh* saver on the same store (InMemorySaver: the same
   instance, it has no store) and read every thread back.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from . import agent_state
from . import workloads as wl
from .inject import InjectSpec, parse_inject
from .metrics import Latencies, RecordingBackend, time_saver_calls

#: baselines, in the order they run after ours
BASELINES = ("memory", "memory-yield", "sqlite", "postgres")
LABELS = {
    "kusto": "AsyncKustoSaver (embedded DuckDB)",
    "memory": "InMemorySaver",
    "memory-yield": "InMemorySaver, reads yield once",
    "sqlite": "AsyncSqliteSaver",
    "postgres": "AsyncPostgresSaver",
}

Event = dict[str, Any]


@dataclass
class LoadTestConfig:
    agents: int = 100
    steps: int = 10
    workload: str = "graph"
    #: DuckDB file for our saver; None: a temporary file, removed unless ``keep``
    store: str | None = None
    keep: bool = False
    #: also run the baselines (InMemorySaver, AsyncSqliteSaver; AsyncPostgresSaver with ``postgres_url``)
    compare: bool = True
    #: engine options passed to our saver (batch_size, flush_interval...)
    engine_options: dict[str, Any] = field(default_factory=dict)
    #: seconds between memory samples
    sample_interval: float = 0.05
    #: the workload's shape (see :class:`.workloads.Shape`)
    payload_bytes: int = wl.PAYLOAD_SIZE
    fanout: int = 1
    growth: bool = True
    #: a PostgreSQL URL: AsyncPostgresSaver joins the baselines
    postgres_url: str | None = None
    #: an Azure Data Explorer cluster instead of the embedded store
    cluster_uri: str | None = None
    database: str | None = None
    ingest_mode: str = "streaming"
    #: ``--inject`` spec text: latency / errors injected into our saver's backend calls
    inject: str | None = None
    #: read every thread back and check it (off: throughput only)
    verify: bool = True
    #: verify only this many threads, spread evenly over all of them (None: every thread)
    verify_sample: int | None = None
    #: before the first measured run in this process, run a small unmeasured one (imports,
    #: lazy initialisation, first KQL translations) so the first saver measured is not penalised
    warmup: bool = True

    @property
    def shape(self) -> wl.Shape:
        return wl.Shape(payload_bytes=self.payload_bytes, fanout=self.fanout, growth=self.growth)

    def inject_spec(self) -> InjectSpec | None:
        return parse_inject(self.inject) if self.inject else None

    def validate(self) -> None:
        if self.agents < 1 or self.steps < 1:
            raise ValueError("agents and steps must be at least 1")
        if self.workload not in wl.WORKLOADS:
            raise ValueError(f"workload must be one of {wl.WORKLOADS}, got {self.workload!r}")
        self.shape.validate()
        if self.cluster_uri and not self.database:
            raise ValueError("--cluster-uri needs --database")
        if self.cluster_uri and self.store:
            raise ValueError("--store is for the embedded store; it cannot be combined with --cluster-uri")
        self.inject_spec()
        from langgraph.checkpoint.kusto import EngineConfig

        EngineConfig.from_options(**self.engine_options)  # raises ConfigError naming the field


# -- memory ------------------------------------------------------------------------


def current_rss() -> int | None:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is in the loadtest extra
        return None
    return int(psutil.Process().memory_info().rss)


def process_peak_rss() -> int:
    """The process's peak RSS so far, in bytes (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class RssSampler:
    """Samples RSS while a phase runs; ``peak`` is the largest sample (or ru_maxrss without psutil)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.start = current_rss()
        self.peak = self.start or 0
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval)

    def sample(self) -> None:
        rss = current_rss()
        if rss is not None and rss > self.peak:
            self.peak = rss

    async def __aenter__(self) -> RssSampler:
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.sample()
        if self.start is None:
            self.peak = process_peak_rss()


# -- the savers ----------------------------------------------------------------------


class Target:
    """One saver under test: how to open it for writing, finish, and reopen for reading."""

    key = ""
    label = ""
    fresh_reader = True

    def __init__(self, cfg: LoadTestConfig, workdir: str) -> None:
        self.cfg = cfg
        self.workdir = workdir

    def writer(self) -> contextlib.AbstractAsyncContextManager[Any]:
        raise NotImplementedError

    def reader(self) -> contextlib.AbstractAsyncContextManager[Any]:
        raise NotImplementedError

    async def finish(self, saver: Any) -> None:
        """Return once everything the agents wrote is stored."""

    def stats(self, saver: Any) -> dict[str, Any]:
        return {}

    def extra(self) -> dict[str, Any]:
        """Figures gathered while writing (backend calls, telemetry), after the writer closed."""
        return {}

    async def store_info(self, saver: Any) -> dict[str, Any]:
        return {}

    async def cleanup_threads(self, saver: Any, thread_ids: list[str]) -> None:
        """Remove what the run wrote from a store that outlives it (Postgres)."""

    def cleanup(self) -> None:
        pass


@dataclass
class Variant:
    """Our saver with settings of its own: a report runs several side by side."""

    key: str = "kusto"
    #: shown after the saver's name, e.g. "durability=memory"
    label: str = ""
    #: merged over the run's engine options
    engine_options: dict[str, Any] = field(default_factory=dict)
    #: latency / errors injected into the backend calls; None: the run's --inject (if any)
    inject: InjectSpec | None = None
    #: always put a FaultyBackend in front of the store (zero plan unless inject says otherwise),
    #: so a run with and one without injected latency have the same layers
    faulty: bool = False
    #: OpenTelemetry SDK on: "metrics" (MeterProvider + InMemoryMetricReader, no tracing),
    #: "traces" (that plus TracerProvider + in-memory exporter, every span recorded) or
    #: "traces@R" (spans sampled at ratio R, parent-based); None: no SDK
    telemetry: str | None = None


class GcClock:
    """Time the cyclic garbage collector takes while a run writes (``gc.callbacks``):
    it grows with the live heap (suspended agents' state), not with the saver's work."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = [0, 0, 0]
        self._started = 0.0

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started
            self.collections[info["generation"]] += 1

    def start(self) -> GcClock:
        gc.callbacks.append(self._on_gc)
        return self

    def stop(self) -> None:
        """Idempotent: also called on the way out of a failed run."""
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def __enter__(self) -> GcClock:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class TelemetryProbe:
    """The SDK providers of a telemetry-on run, and what they collected.

    ``mode``: "metrics" (a MeterProvider with an InMemoryMetricReader; tracing is the
    API's no-op), "traces" (also a TracerProvider exporting every span to memory), or
    "traces@R" (spans sampled at ratio R, parent-based)."""

    def __init__(self, mode: str = "traces") -> None:
        from opentelemetry import trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        kind, _, ratio_text = mode.partition("@")
        if kind not in ("metrics", "traces") or (ratio_text and kind != "traces"):
            raise ValueError(f"telemetry mode must be 'metrics', 'traces' or 'traces@RATIO', got {mode!r}")
        self.mode = mode
        self.tracing = kind == "traces"
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.exporter = InMemorySpanExporter()
        self.tracer_provider: Any
        if not self.tracing:
            self.tracer_provider = trace.NoOpTracerProvider()
        else:
            sampler = ParentBased(TraceIdRatioBased(float(ratio_text))) if ratio_text else None
            self.tracer_provider = TracerProvider(sampler=sampler)
            self.tracer_provider.add_span_processor(BatchSpanProcessor(self.exporter))
        self.result: dict[str, Any] = {}

    def saver_options(self) -> dict[str, Any]:
        """The saver's own telemetry arguments: report to these providers."""
        return {"meter_provider": self.meter_provider, "tracer_provider": self.tracer_provider}

    def collect(self) -> dict[str, Any]:
        data = self.reader.get_metrics_data()
        metrics_seen: set[str] = set()
        points = 0
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    metrics_seen.add(m.name)
                    points += len(m.data.data_points)
        spans = 0
        if self.tracing:
            self.tracer_provider.force_flush()
            spans = len(self.exporter.get_finished_spans())
            self.tracer_provider.shutdown()
        self.meter_provider.shutdown()
        self.exporter.clear()
        self.result = {"mode": self.mode, "metrics": sorted(metrics_seen), "metric_points": points, "spans": spans}
        return self.result


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text) or "kusto"


class KustoTarget(Target):
    """Our saver: embedded store (a DuckDB file) or a cluster, with the layers a variant asks for.

    Backend layers while writing: RecordingBackend -> [FaultyBackend] -> store. The
    reader opens the store without injection (verification is not measured).
    """

    def __init__(self, cfg: LoadTestConfig, workdir: str, variant: Variant | None = None) -> None:
        super().__init__(cfg, workdir)
        v = variant or Variant()
        self.variant = v
        self.key = v.key
        where = f"cluster {cfg.database}" if cfg.cluster_uri else "embedded DuckDB"
        self.label = f"AsyncKustoSaver ({where})" + (f" [{v.label}]" if v.label else "")
        self.options = {**cfg.engine_options, **v.engine_options}
        _fill_spool_options(self.options, workdir, self.key)
        self.inject = v.inject if v.inject is not None else cfg.inject_spec()
        if cfg.cluster_uri:
            self.path = None
            self.existed = True
        else:
            own = cfg.store if (cfg.store and v.key == "kusto") else None
            self.path = own or os.path.join(workdir, _safe_name(v.key) + ".duckdb")
            self.existed = os.path.exists(self.path)
        self.recording: RecordingBackend | None = None
        self.faulty: Any = None
        self.probe: TelemetryProbe | None = None
        self.telemetry_hook = ""

    def _store_backend(self) -> Any:
        if self.cfg.cluster_uri:
            from langgraph.checkpoint.kusto.engine.backends.kusto import KustoBackend

            return KustoBackend(self.cfg.cluster_uri, self.cfg.database, ingest_mode=self.cfg.ingest_mode)
        from langgraph.checkpoint.kusto.engine.backends.embedded import EmbeddedBackend

        assert self.path is not None
        return EmbeddedBackend(self.path)

    def _saver(self, backend: Any, **extra: Any) -> Any:
        from langgraph.checkpoint.kusto import AsyncKustoSaver

        opts = {**self.options, **extra}
        if self.cfg.cluster_uri and self.cfg.ingest_mode != "streaming":
            opts.setdefault("visibility_delay", 120.0)
        return AsyncKustoSaver(backend, **opts)

    def writer(self) -> contextlib.AbstractAsyncContextManager[Any]:
        backend = self._store_backend()
        if self.inject is not None or self.variant.faulty:
            self.faulty = (self.inject or InjectSpec()).wrap(backend)
            backend = self.faulty
        self.recording = backend = RecordingBackend(backend)
        if self.variant.telemetry:
            self.probe = TelemetryProbe(self.variant.telemetry)
            self.telemetry_hook = "meter_provider= / tracer_provider= saver arguments"
            return self._saver(backend, **self.probe.saver_options())  # type: ignore[no-any-return]
        return self._saver(backend)  # type: ignore[no-any-return]

    def reader(self) -> contextlib.AbstractAsyncContextManager[Any]:
        return self._saver(self._store_backend())  # type: ignore[no-any-return]

    async def finish(self, saver: Any) -> None:
        await saver.flush()

    def stats(self, saver: Any) -> dict[str, Any]:
        s = saver.engine.stats()
        s.pop("mailbox_depth", None)
        return s

    def extra(self) -> dict[str, Any]:
        out: dict[str, Any] = {"engine_options": self.options}
        if self.recording is not None:
            out["backend"] = self.recording.summary()
        if self.inject is not None:
            out["inject"] = self.inject.as_dict()
            if self.faulty is not None:
                out["inject"]["injected_failures"] = self.faulty.injected_failures
        if self.probe is not None:
            out["telemetry"] = {**self.probe.collect(), "hook": self.telemetry_hook}
        return out

    async def store_info(self, saver: Any) -> dict[str, Any]:
        from langgraph.checkpoint.kusto.engine.schema import BLOBS, CHECKPOINTS, WRITES

        if self.path is None:
            return {
                "cluster": self.cfg.cluster_uri, "database": self.cfg.database, "existed": True,
                "agent_state": await agent_state.summarize(saver),
            }
        rows = {t.name: await saver.backend.count_rows(t.name) for t in (CHECKPOINTS, BLOBS, WRITES)}
        return {
            "agent_state": await agent_state.summarize(saver),
            "path": self.path,
            "temporary": self.path != self.cfg.store,
            "existed": self.existed,
            "file_bytes": _file_bytes(self.path),
            "rows": rows,
        }


def _fill_spool_options(options: dict[str, Any], workdir: str, key: str) -> None:
    """A durability mode with a local file (spool) gets a place in the run's work dir,
    for whichever path/dir option the engine config has for it and the user did not set."""
    from dataclasses import fields

    from langgraph.checkpoint.kusto import EngineConfig

    if options.get("durability") in (None, "memory", "ingested"):
        return
    for f in fields(EngineConfig):
        name = f.name
        if name.startswith("spool") and (name.endswith("dir") or name.endswith("path")) and name not in options:
            options[name] = os.path.join(workdir, _safe_name(key) + ".spool")


class MemoryTarget(Target):
    key = "memory"
    label = LABELS["memory"]
    fresh_reader = False

    def __init__(self, cfg: LoadTestConfig, workdir: str) -> None:
        super().__init__(cfg, workdir)
        self.saver: Any = None

    @contextlib.asynccontextmanager
    async def writer(self) -> AsyncIterator[Any]:
        from langgraph.checkpoint.memory import InMemorySaver

        self.saver = InMemorySaver()
        yield self.saver

    @contextlib.asynccontextmanager
    async def reader(self) -> AsyncIterator[Any]:
        yield self.saver  # nothing to reopen: the same instance

    def cleanup(self) -> None:
        self.saver = None


def yielding_memory_saver() -> Any:
    """An ``InMemorySaver`` whose ``aget_tuple`` first gives the event loop one turn.

    The floor of any saver whose reads leave the calling task (a query, a message to
    an actor): ``InMemorySaver`` never yields, so each of its agents runs all its steps
    before the next one starts, with its state hot in the CPU cache and no other
    agent's objects alive; one yield per read makes the agents interleave, as they do
    on every saver that does I/O. Nothing else differs."""
    from langgraph.checkpoint.memory import InMemorySaver

    class YieldingInMemorySaver(InMemorySaver):
        async def aget_tuple(self, config: Any) -> Any:
            await asyncio.sleep(0)
            return self.get_tuple(config)

    return YieldingInMemorySaver()


class YieldingMemoryTarget(MemoryTarget):
    """``InMemorySaver`` with one yield per read (:func:`yielding_memory_saver`): the
    cost of interleaving the agents, with nothing stored anywhere else."""

    key = "memory-yield"
    label = LABELS["memory-yield"]

    @contextlib.asynccontextmanager
    async def writer(self) -> AsyncIterator[Any]:
        self.saver = yielding_memory_saver()
        yield self.saver


class SqliteTarget(Target):
    key = "sqlite"
    label = LABELS["sqlite"]

    def __init__(self, cfg: LoadTestConfig, workdir: str) -> None:
        super().__init__(cfg, workdir)
        self.path = os.path.join(workdir, "baseline.sqlite")

    def writer(self) -> contextlib.AbstractAsyncContextManager[Any]:
        from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

        return AsyncSqliteSaver.from_conn_string(self.path)

    def reader(self) -> contextlib.AbstractAsyncContextManager[Any]:
        return self.writer()

    async def store_info(self, saver: Any) -> dict[str, Any]:
        return {"path": self.path, "temporary": True, "file_bytes": _file_bytes(self.path)}


class PostgresTarget(Target):
    """LangGraph's AsyncPostgresSaver on ``postgres_url`` (its ``setup()`` creates the tables)."""

    key = "postgres"
    label = LABELS["postgres"]

    @contextlib.asynccontextmanager
    async def writer(self) -> AsyncIterator[Any]:
        try:
            from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
        except ImportError as exc:  # pragma: no cover - in the loadtest extra
            raise RuntimeError(
                "AsyncPostgresSaver needs langgraph-checkpoint-postgres and psycopg "
                "(pip install 'langgraph-checkpoint-kusto[loadtest]')"
            ) from exc
        assert self.cfg.postgres_url
        async with AsyncPostgresSaver.from_conn_string(self.cfg.postgres_url) as saver:
            await saver.setup()
            yield saver

    def reader(self) -> contextlib.AbstractAsyncContextManager[Any]:
        return self.writer()

    async def store_info(self, saver: Any) -> dict[str, Any]:
        return {"url": _redact_url(self.cfg.postgres_url or "")}

    async def cleanup_threads(self, saver: Any, thread_ids: list[str]) -> None:
        sem = asyncio.Semaphore(8)

        async def one(tid: str) -> None:
            async with sem:
                await saver.adelete_thread(tid)

        await asyncio.gather(*(one(t) for t in thread_ids))


def _redact_url(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


BASELINE_CLASSES: dict[str, type[Target]] = {
    "memory": MemoryTarget, "memory-yield": YieldingMemoryTarget, "sqlite": SqliteTarget, "postgres": PostgresTarget,
}


def default_targets(cfg: LoadTestConfig, workdir: str) -> list[Target]:
    """Ours, then (with ``compare``) the baselines: InMemorySaver, InMemorySaver with one
    yield per read, AsyncSqliteSaver, and AsyncPostgresSaver when a Postgres URL is given."""
    targets: list[Target] = [KustoTarget(cfg, workdir)]
    if cfg.compare:
        targets += [MemoryTarget(cfg, workdir), YieldingMemoryTarget(cfg, workdir), SqliteTarget(cfg, workdir)]
        if cfg.postgres_url:
            targets.append(PostgresTarget(cfg, workdir))
    return targets


def _file_bytes(path: str) -> int:
    total = 0
    for p in (path, path + ".wal", path + "-wal", path + "-shm"):
        with contextlib.suppress(OSError):
            total += os.path.getsize(p)
    return total


# -- one saver -------------------------------------------------------------------------


def _rate(n: int | float, seconds: float) -> float:
    return n / seconds if seconds > 0 else 0.0


@dataclass
class Progress:
    done: int = 0
    total: int = 0


class RunHooks:
    """Lets a report act while the agents run (the memory-bound report stalls the backend)."""

    async def opened(self, target: Target, saver: Any) -> None:
        """The saver is open; the agents have not started."""

    async def running(self, target: Target, saver: Any, agents: asyncio.Task[Any], progress: Progress) -> None:
        """The agents run in ``agents``; return whenever (the runner then awaits them)."""


async def run_target(
    target: Target,
    cfg: LoadTestConfig,
    thread_ids: list[str],
    expected_per_thread: int,
    emit: Callable[[Event], None],
    hooks: RunHooks | None = None,
) -> dict[str, Any]:
    key = target.key
    hooks = hooks or RunHooks()
    out: dict[str, Any] = {"key": key, "label": target.label, "fresh_reader": target.fresh_reader, "error": None}
    steps = cfg.steps
    shape = cfg.shape
    total = len(thread_ids) * steps
    progress = Progress(total=total)
    latencies = Latencies()
    add = latencies.add

    def on_step(seconds: float) -> None:
        progress.done += 1
        add("step", seconds)

    gc.collect()
    emit({"event": "start", "target": key, "label": target.label, "ops": total})
    gc_clock = GcClock()
    try:
        async with RssSampler(cfg.sample_interval) as rss:
            t_open = time.perf_counter()
            async with target.writer() as saver:
                time_saver_calls(saver, latencies)
                await hooks.opened(target, saver)
                t0 = time.perf_counter()
                cpu0 = time.process_time()
                gc_clock.start()
                if cfg.workload == "graph":
                    graph = wl.build_graph(shape).compile(checkpointer=saver)

                    async def agent(tid: str) -> None:
                        await wl.graph_agent(graph, tid, steps, on_step)
                else:

                    async def agent(tid: str) -> None:
                        await wl.raw_agent(saver, tid, steps, on_step, shape)

                ticker = asyncio.create_task(_report_progress(emit, key, progress))
                try:
                    agents = asyncio.create_task(wl.run_agents(thread_ids, agent))
                    try:
                        await hooks.running(target, saver, agents, progress)
                    finally:
                        run = await agents
                finally:
                    ticker.cancel()
                t_run = time.perf_counter()
                await target.finish(saver)
                t_stored = time.perf_counter()
                gc_clock.stop()
                out["cpu_s"] = time.process_time() - cpu0
                out["gc_s"] = gc_clock.seconds
                out["gc_collections"] = gc_clock.collections
                out["engine"] = target.stats(saver)
                t_close = time.perf_counter()
            t_closed = time.perf_counter()
            rss_after_write = current_rss()
        out.update(target.extra())
        ops = progress.done
        stored = t_stored - t0
        out.update(
            ops=ops,
            op_label="invocations" if cfg.workload == "graph" else "steps",
            run_errors=len(run.errors),
            run_error_samples=run.errors[:10],
            open_s=t0 - t_open,
            run_s=t_run - t0,
            flush_s=t_stored - t_run,
            close_s=t_closed - t_close,
            elapsed_s=stored,
            ops_per_s=_rate(ops, stored),
            peak_rss_bytes=rss.peak,
            rss_start_bytes=rss.start,
            rss_after_bytes=rss_after_write,
            latency_ms=latencies.summary(),
        )
        # checkpoints per step are fixed by the workload (measured on a reference run)
        out["checkpoints_per_s"] = _rate(ops * expected_per_thread / steps, stored)
        emit({"event": "written", "target": key, "ops": ops, "elapsed_s": stored})

        if cfg.verify:
            t_v = time.perf_counter()
            async with target.reader() as reader:
                if cfg.workload == "graph":
                    graph = wl.build_graph(shape).compile(checkpointer=reader)

                    async def check(tid: str) -> tuple[list[str], int, int]:
                        return await wl.verify_graph_thread(graph, reader, tid, steps, expected_per_thread, shape)
                else:

                    async def check(tid: str) -> tuple[list[str], int, int]:
                        return await wl.verify_raw_thread(reader, tid, steps, expected_per_thread, shape)

                ver = await wl.verify_threads(sample_threads(thread_ids, cfg.verify_sample), check, expected_per_thread)
                out["store"] = await target.store_info(reader)
                with contextlib.suppress(Exception):
                    await target.cleanup_threads(reader, thread_ids)
            out["verify_s"] = time.perf_counter() - t_v
            out["verification"] = ver.as_dict()
            out["checkpoints"] = ver.checkpoints
            if ver.threads == len(thread_ids):
                out["checkpoints_per_s"] = _rate(ver.checkpoints, stored)
            # else (a sample was verified): checkpoints/s stays the steps done x checkpoints per step
            _check_store(out, ver, expected_per_thread * len(thread_ids))
            emit({"event": "verified", "target": key, "verification": out["verification"]})
    except Exception as exc:  # noqa: BLE001 - one saver failing must not hide the others
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()
        emit({"event": "error", "target": key, "error": out["error"]})
    finally:
        gc_clock.stop()
        target.cleanup()
    out["passed"] = (
        out["error"] is None
        and out.get("run_errors", 1) == 0
        and (not cfg.verify or out.get("verification", {}).get("passed", False))
    )
    return out


def sample_threads(thread_ids: list[str], n: int | None) -> list[str]:
    """``n`` thread ids spread evenly over ``thread_ids`` (all of them when ``n`` is None or larger)."""
    if n is None or n >= len(thread_ids):
        return thread_ids
    stride = len(thread_ids) / n
    return [thread_ids[int(i * stride)] for i in range(n)]


def _check_store(out: dict[str, Any], ver: wl.Verification, expected: int) -> None:
    """For a store this run created, the Checkpoints table must hold every checkpoint written."""
    store = out.get("store") or {}
    rows = store.get("rows")
    out["store_warnings"] = []
    if not rows or store.get("existed"):
        return
    n = rows.get("Checkpoints", 0)
    if n < expected:
        out["store_warnings"].append(f"Checkpoints table holds {n} rows, fewer than {expected} written")
        out["verification"]["passed"] = False
    elif n > expected:
        out["store_warnings"].append(f"Checkpoints table holds {n} rows for {expected} checkpoints (duplicates)")


#: seconds between progress events
PROGRESS_INTERVAL = 0.25


async def _report_progress(emit: Callable[[Event], None], key: str, progress: Progress) -> None:
    started = time.perf_counter()
    while True:
        await asyncio.sleep(PROGRESS_INTERVAL)
        emit({"event": "progress", "target": key, "done": progress.done, "total": progress.total,
              "elapsed_s": time.perf_counter() - started})


# -- the whole run -----------------------------------------------------------------------


def environment() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for dist in (
        "langgraph-checkpoint-kusto", "langgraph", "langgraph-checkpoint", "langgraph-checkpoint-sqlite",
        "langgraph-checkpoint-postgres", "duckdb", "aiosqlite", "opentelemetry-sdk",
    ):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "versions": versions,
    }


def compare(results: dict[str, dict[str, Any]], ours: str = "kusto") -> dict[str, Any]:
    """Ours divided by each baseline (throughput: > 1 means ours is faster)."""
    mine = results.get(ours)
    out: dict[str, Any] = {}
    if not mine or mine.get("error"):
        return out
    for key in BASELINES:
        base = results.get(key)
        if not base or base.get("error"):
            continue
        out[key] = {
            "ops_per_s_ratio": ratio(mine.get("ops_per_s"), base.get("ops_per_s")),
            "checkpoints_per_s_ratio": ratio(mine.get("checkpoints_per_s"), base.get("checkpoints_per_s")),
            "peak_rss_ratio": ratio(mine.get("peak_rss_bytes"), base.get("peak_rss_bytes")),
        }
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    if not a or not b:
        return None
    return a / b


async def run_targets(
    cfg: LoadTestConfig,
    make_targets: Callable[[str], list[Target]] | None = None,
    on_event: Callable[[Event], None] | None = None,
    hooks: RunHooks | None = None,
) -> dict[str, Any]:
    """Run the workload on each target in turn (default: ours and, with ``cfg.compare``,
    the baselines); return the results dict."""
    cfg.validate()

    def emit(event: Event) -> None:
        if on_event is not None:
            on_event(event)

    started = time.perf_counter()
    run_id = uuid.uuid4().hex[:8]
    workdir = tempfile.mkdtemp(prefix="kusto-loadtest-")
    results: dict[str, dict[str, Any]] = {}
    try:
        with interpreter_settings(cfg.engine_options) as settings:
            if cfg.warmup:
                await warm_up(cfg)
            expected_per_thread = await wl.reference_checkpoints_per_thread(cfg.workload, cfg.steps, cfg.shape)
            targets = make_targets(workdir) if make_targets else default_targets(cfg, workdir)
            for n, target in enumerate(targets):
                # each target its own thread ids: targets sharing a cluster or a database never collide
                thread_ids = [f"lt-{run_id}{n}-{i:05d}" for i in range(cfg.agents)]
                results[target.key] = await run_target(target, cfg, thread_ids, expected_per_thread, emit, hooks)
    finally:
        if cfg.keep:
            kept = workdir
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            kept = None
    passed = bool(results) and all(r["passed"] for r in results.values())
    return {
        "run_id": run_id,
        "config": asdict(cfg),
        "environment": environment(),
        "interpreter_settings": settings,
        "expected_checkpoints_per_thread": expected_per_thread,
        "workdir": kept,
        "results": results,
        "comparison": compare(results),
        "total_s": time.perf_counter() - started,
        "process_peak_rss_bytes": process_peak_rss(),
        "pid": os.getpid(),
        "passed": passed,
    }


@contextlib.contextmanager
def interpreter_settings(engine_options: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Holds the process-wide settings the run's engine options ask for
    (``gc_threshold``, ``switch_interval``) for the whole run, so that every saver of
    the run, the baselines too, runs under them: an engine holds them only while it is
    open, and a baseline run after it closed would otherwise run under the
    interpreter's defaults and be compared as if it had not. Yields the settings in
    force (as the interpreter reads them back)."""
    from langgraph.checkpoint.kusto import EngineConfig
    from langgraph.checkpoint.kusto.engine import interpreter

    held = interpreter.asked_for(EngineConfig.from_options(**engine_options))
    acquired = []
    try:
        for setting, value in held:
            setting.acquire(value)
            acquired.append((setting, value))
        yield {"gc_threshold": list(gc.get_threshold()), "switch_interval": sys.getswitchinterval()}
    finally:
        for setting, value in reversed(acquired):
            setting.release(value)


_warmed: set[str] = set()


async def warm_up(cfg: LoadTestConfig) -> None:
    """Once per process and workload: a few agents on our saver and InMemorySaver, unmeasured."""
    if cfg.workload in _warmed:
        return
    _warmed.add(cfg.workload)
    small = replace(cfg, agents=min(cfg.agents, 20), steps=min(cfg.steps, 3), verify=False, warmup=False,
                    store=None, keep=False, compare=False)
    workdir = tempfile.mkdtemp(prefix="kusto-loadtest-warmup-")
    try:
        per_thread = await wl.reference_checkpoints_per_thread(small.workload, small.steps, small.shape)
        for target in (KustoTarget(small, workdir, Variant(key="warmup", faulty=small.cluster_uri is None)),
                       MemoryTarget(small, workdir)):
            ids = [f"warmup-{uuid.uuid4().hex[:8]}-{i}" for i in range(small.agents)]
            await run_target(target, small, ids, per_thread, lambda ev: None)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    gc.collect()


async def run_loadtest(cfg: LoadTestConfig, on_event: Callable[[Event], None] | None = None) -> dict[str, Any]:
    """Ours and (with ``cfg.compare``) the baselines on the configured workload."""
    return await run_targets(cfg, None, on_event)


def run(cfg: LoadTestConfig, on_event: Callable[[Event], None] | None = None) -> dict[str, Any]:
    """Synchronous entry: a fresh asyncio loop (LangGraph is asyncio code)."""
    return asyncio.run(run_loadtest(cfg, on_event))
