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
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from . import workloads as wl

#: savers, in the order they run (ours first: its memory figures are the least disturbed)
TARGETS = ("kusto", "memory", "sqlite")
LABELS = {
    "kusto": "AsyncKustoSaver (embedded DuckDB)",
    "memory": "InMemorySaver",
    "sqlite": "AsyncSqliteSaver",
}
BASELINES = ("memory", "sqlite")

Event = dict[str, Any]


@dataclass
class LoadTestConfig:
    agents: int = 100
    steps: int = 10
    workload: str = "graph"
    #: DuckDB file for our saver; None: a temporary file, removed unless ``keep``
    store: str | None = None
    keep: bool = False
    compare: bool = True
    #: engine options passed to ``AsyncKustoSaver.embedded`` (batch_size, flush_interval...)
    engine_options: dict[str, Any] = field(default_factory=dict)
    #: seconds between memory samples
    sample_interval: float = 0.05

    def validate(self) -> None:
        if self.agents < 1 or self.steps < 1:
            raise ValueError("agents and steps must be at least 1")
        if self.workload not in wl.WORKLOADS:
            raise ValueError(f"workload must be one of {wl.WORKLOADS}, got {self.workload!r}")
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

    async def store_info(self, saver: Any) -> dict[str, Any]:
        return {}

    def cleanup(self) -> None:
        pass


class KustoTarget(Target):
    key = "kusto"

    def __init__(self, cfg: LoadTestConfig, workdir: str) -> None:
        super().__init__(cfg, workdir)
        self.path = cfg.store or os.path.join(workdir, "loadtest.duckdb")
        self.existed = os.path.exists(self.path)

    def writer(self) -> contextlib.AbstractAsyncContextManager[Any]:
        from langgraph.checkpoint.kusto import AsyncKustoSaver

        return AsyncKustoSaver.embedded(self.path, **self.cfg.engine_options)

    def reader(self) -> contextlib.AbstractAsyncContextManager[Any]:
        from langgraph.checkpoint.kusto import AsyncKustoSaver

        return AsyncKustoSaver.embedded(self.path, **self.cfg.engine_options)

    async def finish(self, saver: Any) -> None:
        await saver.flush()

    def stats(self, saver: Any) -> dict[str, Any]:
        s = saver.engine.stats()
        s.pop("mailbox_depth", None)
        return s

    async def store_info(self, saver: Any) -> dict[str, Any]:
        from langgraph.checkpoint.kusto.engine.schema import BLOBS, CHECKPOINTS, WRITES

        rows = {t.name: await saver.backend.count_rows(t.name) for t in (CHECKPOINTS, BLOBS, WRITES)}
        return {
            "path": self.path,
            "temporary": self.cfg.store is None,
            "existed": self.existed,
            "file_bytes": _file_bytes(self.path),
            "rows": rows,
        }


class MemoryTarget(Target):
    key = "memory"
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


class SqliteTarget(Target):
    key = "sqlite"

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


TARGET_CLASSES: dict[str, type[Target]] = {"kusto": KustoTarget, "memory": MemoryTarget, "sqlite": SqliteTarget}


def _file_bytes(path: str) -> int:
    total = 0
    for p in (path, path + ".wal", path + "-wal", path + "-shm"):
        with contextlib.suppress(OSError):
            total += os.path.getsize(p)
    return total


# -- one saver -------------------------------------------------------------------------


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else 0.0


async def run_target(
    target: Target,
    cfg: LoadTestConfig,
    thread_ids: list[str],
    expected_per_thread: int,
    emit: Callable[[Event], None],
) -> dict[str, Any]:
    key = target.key
    out: dict[str, Any] = {"key": key, "label": LABELS[key], "fresh_reader": target.fresh_reader, "error": None}
    steps = cfg.steps
    progress = {"done": 0}

    def on_step() -> None:
        progress["done"] += 1

    gc.collect()
    emit({"event": "start", "target": key, "label": LABELS[key], "ops": len(thread_ids) * steps})
    try:
        async with RssSampler(cfg.sample_interval) as rss:
            t_open = time.perf_counter()
            async with target.writer() as saver:
                t0 = time.perf_counter()
                if cfg.workload == "graph":
                    graph = wl.build_graph().compile(checkpointer=saver)

                    async def agent(tid: str) -> None:
                        await wl.graph_agent(graph, tid, steps, on_step)
                else:

                    async def agent(tid: str) -> None:
                        await wl.raw_agent(saver, tid, steps, on_step)

                ticker = asyncio.create_task(_report_progress(emit, key, progress, len(thread_ids) * steps))
                try:
                    run = await wl.run_agents(thread_ids, agent)
                finally:
                    ticker.cancel()
                t_run = time.perf_counter()
                await target.finish(saver)
                t_stored = time.perf_counter()
                out["engine"] = target.stats(saver)
                t_close = time.perf_counter()
            t_closed = time.perf_counter()
            rss_after_write = current_rss()
        ops = progress["done"]
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
        )
        emit({"event": "written", "target": key, "ops": ops, "elapsed_s": stored})

        t_v = time.perf_counter()
        async with target.reader() as reader:
            if cfg.workload == "graph":
                graph = wl.build_graph().compile(checkpointer=reader)

                async def check(tid: str) -> tuple[list[str], int, int]:
                    return await wl.verify_graph_thread(graph, reader, tid, steps, expected_per_thread)
            else:

                async def check(tid: str) -> tuple[list[str], int, int]:
                    return await wl.verify_raw_thread(reader, tid, steps, expected_per_thread)

            ver = await wl.verify_threads(thread_ids, check, expected_per_thread)
            out["store"] = await target.store_info(reader)
        out["verify_s"] = time.perf_counter() - t_v
        out["verification"] = ver.as_dict()
        out["checkpoints"] = ver.checkpoints
        out["checkpoints_per_s"] = _rate(ver.checkpoints, stored)
        _check_store(out, ver)
        emit({"event": "verified", "target": key, "verification": out["verification"]})
    except Exception as exc:  # noqa: BLE001 - one saver failing must not hide the others
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()
        emit({"event": "error", "target": key, "error": out["error"]})
    finally:
        target.cleanup()
    out["passed"] = (
        out["error"] is None
        and out.get("run_errors", 1) == 0
        and out.get("verification", {}).get("passed", False)
    )
    return out


def _check_store(out: dict[str, Any], ver: wl.Verification) -> None:
    """For a store this run created, the Checkpoints table must hold at least what was verified."""
    store = out.get("store") or {}
    rows = store.get("rows")
    out["store_warnings"] = []
    if not rows or store.get("existed"):
        return
    n = rows.get("Checkpoints", 0)
    if n < ver.expected_checkpoints:
        out["store_warnings"].append(f"Checkpoints table holds {n} rows, fewer than {ver.expected_checkpoints} written")
        out["verification"]["passed"] = False
    elif n > ver.expected_checkpoints:
        out["store_warnings"].append(f"Checkpoints table holds {n} rows for {ver.expected_checkpoints} checkpoints (duplicates)")


async def _report_progress(emit: Callable[[Event], None], key: str, progress: dict[str, int], total: int) -> None:
    started = time.perf_counter()
    while True:
        await asyncio.sleep(1.0)
        done = progress["done"]
        emit({"event": "progress", "target": key, "done": done, "total": total, "elapsed_s": time.perf_counter() - started})


# -- the whole run -----------------------------------------------------------------------


def environment() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for dist in ("langgraph-checkpoint-kusto", "langgraph", "langgraph-checkpoint", "langgraph-checkpoint-sqlite", "duckdb", "aiosqlite"):
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


def compare(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ours divided by each baseline (throughput: > 1 means ours is faster)."""
    ours = results.get("kusto")
    out: dict[str, Any] = {}
    if not ours or ours.get("error"):
        return out
    for key in BASELINES:
        base = results.get(key)
        if not base or base.get("error"):
            continue
        out[key] = {
            "ops_per_s_ratio": _ratio(ours.get("ops_per_s"), base.get("ops_per_s")),
            "checkpoints_per_s_ratio": _ratio(ours.get("checkpoints_per_s"), base.get("checkpoints_per_s")),
            "peak_rss_ratio": _ratio(ours.get("peak_rss_bytes"), base.get("peak_rss_bytes")),
        }
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    if not a or not b:
        return None
    return a / b


async def run_loadtest(cfg: LoadTestConfig, on_event: Callable[[Event], None] | None = None) -> dict[str, Any]:
    """Run the workload on our saver (and the baselines with ``cfg.compare``); return the results dict."""
    cfg.validate()

    def emit(event: Event) -> None:
        if on_event is not None:
            on_event(event)

    started = time.perf_counter()
    run_id = uuid.uuid4().hex[:8]
    thread_ids = [f"lt-{run_id}-{i:05d}" for i in range(cfg.agents)]
    expected_per_thread = await wl.reference_checkpoints_per_thread(cfg.workload, cfg.steps)
    workdir = tempfile.mkdtemp(prefix="kusto-loadtest-")
    keys = TARGETS if cfg.compare else ("kusto",)
    results: dict[str, dict[str, Any]] = {}
    try:
        for key in keys:
            target = TARGET_CLASSES[key](cfg, workdir)
            results[key] = await run_target(target, cfg, thread_ids, expected_per_thread, emit)
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
        "expected_checkpoints_per_thread": expected_per_thread,
        "workdir": kept,
        "results": results,
        "comparison": compare(results),
        "total_s": time.perf_counter() - started,
        "process_peak_rss_bytes": process_peak_rss(),
        "passed": passed,
    }


def run(cfg: LoadTestConfig, on_event: Callable[[Event], None] | None = None) -> dict[str, Any]:
    """Synchronous entry: a fresh asyncio loop (LangGraph is asyncio code)."""
    return asyncio.run(run_loadtest(cfg, on_event))
