"""What the agent-state questions and the ttl option's expiry cost on the embedded store
(not a test).

    .venv/bin/python tests/bench_agent_state.py [--threads 5000] [--steps 2] [--repeat 5]

Fills a DuckDB file with ``--threads`` threads of the load tool's graph workload (each
invocation a run), then reports:

* each agent-state question (engine/agent_state.py): its first call in the process
  (translation included) and the median of ``--repeat`` more;
* expiry: a saver with ``ttl=1`` s on a copy of the file expires every thread (passes of
  ``expiry_batch`` threads): backend queries, ingestions and seconds, per 1,000 threads;
  then the compaction that removes the expired rows (commands, seconds, rows removed).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

from langgraph.checkpoint.kusto import AsyncKustoSaver
from langgraph.checkpoint.kusto.engine.backends.embedded import EmbeddedBackend
from langgraph.checkpoint.kusto.loadtests import workloads as wl


class Counting:
    """A pass-through backend counting the engine's calls by kind."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: collections.Counter[str] = collections.Counter()
        self.seconds: collections.Counter[str] = collections.Counter()

    async def _timed(self, kind: str, call: Any) -> Any:
        self.calls[kind] += 1
        t0 = time.perf_counter()
        try:
            return await call
        finally:
            self.seconds[kind] += time.perf_counter() - t0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def query(self, kql: str, params: Any) -> Any:
        return await self._timed("query", self.inner.query(kql, params))

    async def command(self, kql: str, params: Any = None) -> Any:
        return await self._timed("command", self.inner.command(kql, params))

    async def ingest(self, table: str, rows: Any) -> Any:
        return await self._timed(f"ingest {table}", self.inner.ingest(table, rows))


async def fill(path: str, threads: int, steps: int) -> float:
    t0 = time.perf_counter()
    async with AsyncKustoSaver.embedded(path, flush_interval=0.05) as saver:
        graph = wl.build_graph(wl.DEFAULT_SHAPE).compile(checkpointer=saver)
        sem = asyncio.Semaphore(200)

        async def agent(i: int) -> None:
            async with sem:
                await wl.graph_agent(graph, f"thread-{i:05d}", steps)

        await asyncio.gather(*(agent(i) for i in range(threads)))
        await saver.flush()
    return time.perf_counter() - t0


async def questions(path: str, repeat: int) -> None:
    async with AsyncKustoSaver.embedded(path) as saver:
        first = (await saver.athreads())[0]["thread_id"]
        calls = {
            "LangGraphThreads": saver.athreads,
            "LangGraphThreadHistory": lambda: saver.athread_history(first),
            "LangGraphRuns": saver.aruns,
            "LangGraphForks": saver.aforks,
            "LangGraphStorage": saver.astorage,
            "LangGraphExpiring": lambda: saver.aexpiring(dt.timedelta(days=30)),
        }
        print(f"{'function':24} {'rows':>7} {'first s':>8} {'median s':>9}")
        for name, call in calls.items():
            times = []
            for _ in range(repeat + 1):
                t0 = time.perf_counter()
                rows = await call()
                times.append(time.perf_counter() - t0)
            print(f"{name:24} {len(rows):7d} {times[0]:8.3f} {statistics.median(times[1:]):9.3f}")


async def expiry(path: str, threads: int, batch: int) -> None:
    backend = Counting(EmbeddedBackend(path))
    options = dict(ttl=1.0, expiry_interval=3600, expiry_batch=batch, compaction_interval=0.2, flush_interval=0.01)
    async with AsyncKustoSaver(backend, **options) as saver:
        await asyncio.sleep(1.1)  # every thread is idle longer than the ttl
        backend.calls.clear()
        t0 = time.perf_counter()
        expired = passes = 0
        while True:
            n = await saver.engine.expire()
            passes += 1
            expired += n
            if n == 0:
                break
        await saver.flush()
        took = time.perf_counter() - t0
        calls = dict(backend.calls)
        assert await saver.athreads() == []
        per_k = 1000 / max(expired, 1)
        print(f"expiry: {expired} threads in {passes} passes, {took:.2f} s ({took * per_k:.3f} s per 1,000 threads); "
              f"backend calls {calls} ({calls.get('query', 0) * per_k:.1f} queries per 1,000 threads)")
        await asyncio.sleep(1.3)  # expiries are compacted after ttl + compaction_interval
        backend.calls.clear()
        backend.seconds.clear()
        t0 = time.perf_counter()
        await saver.engine.compact()
        took = time.perf_counter() - t0
        stats = saver.engine.stats()
        print(f"compaction of the expired rows: {took:.2f} s ({took * per_k:.3f} s per 1,000 threads), "
              f"rows removed {stats['rows_removed']}, backend calls {dict(backend.calls)}, "
              f"their seconds {({k: round(v, 2) for k, v in backend.seconds.items()})}")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=5000)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1000, help="expiry_batch")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "agents.duckdb")
        took = await fill(path, args.threads, args.steps)
        size = os.path.getsize(path)
        print(f"filled {args.threads} threads x {args.steps} runs in {took:.1f} s ({size / 2**20:.1f} MiB)")
        await questions(path, args.repeat)
        copy = os.path.join(tmp, "expiry.duckdb")
        shutil.copy(path, copy)
        await expiry(copy, args.threads, args.batch)


if __name__ == "__main__":
    asyncio.run(main())
