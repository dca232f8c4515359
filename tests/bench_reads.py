"""What a read costs as history grows, and a cold read against SQLite (not a test).

    .venv/bin/python tests/bench_reads.py [--threads 100] [--long 2000] [--repeat 30]

One embedded DuckDB file holds ``--threads`` threads of 10 checkpoints, one thread of 10
and one of ``--long`` checkpoints (the same small state at every step, so only the history
grows); an AsyncSqliteSaver file holds the same. Reports, median over ``--repeat`` reads:

* ``get_tuple`` (latest) of the long thread over the short one, every read asking the
  store (``consistency="shared"``), on the embedded store;
* cold reads: a fresh saver reads every thread's latest checkpoint once, one after the
  other, ours (``consistency="sticky"``: the first read of a thread asks the store)
  against AsyncSqliteSaver's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from typing import Any

from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.base.id import uuid6
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

from langgraph.checkpoint.kusto import AsyncKustoSaver


def _cfg(thread: str, checkpoint_id: str | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {"thread_id": thread, "checkpoint_ns": ""}
    if checkpoint_id:
        c["checkpoint_id"] = checkpoint_id
    return {"configurable": c}


async def fill(saver: Any, thread: str, steps: int) -> None:
    parent: str | None = None
    version: Any = None
    for step in range(steps):
        c = empty_checkpoint()
        c["id"] = str(uuid6(clock_seq=step))
        version = saver.get_next_version(version, None)
        c["channel_values"] = {"messages": [f"{thread} message {step - i}" * 4 for i in range(5)]}
        c["channel_versions"] = {"messages": version}
        await saver.aput(_cfg(thread, parent), c, {"source": "loop", "step": step}, {"messages": version})
        await saver.aput_writes(_cfg(thread, c["id"]), [("messages", f"w{step}")], f"task-{step}")
        parent = c["id"]


async def timed(read: Any, repeat: int) -> float:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        assert await read() is not None
        out.append(time.perf_counter() - t)
    return statistics.median(out) * 1000


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=100)
    ap.add_argument("--long", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bench-reads-")
    ours, sqlite = os.path.join(work, "ours.duckdb"), os.path.join(work, "sqlite.db")
    threads = [f"t{i}" for i in range(args.threads)]
    async with AsyncKustoSaver.embedded(ours) as saver, AsyncSqliteSaver.from_conn_string(sqlite) as lite:
        for s in (saver, lite):
            await asyncio.gather(*(fill(s, t, 10) for t in threads))
            await fill(s, "short", 10)
            await fill(s, "long", args.long)
    async with AsyncKustoSaver.embedded(ours, consistency="shared") as saver:
        short = await timed(lambda: saver.aget_tuple(_cfg("short")), args.repeat)
        long = await timed(lambda: saver.aget_tuple(_cfg("long")), args.repeat)
    print(f"get_tuple latest, every read asks the store: {args.long} checkpoints {long:.2f} ms, "
          f"10 checkpoints {short:.2f} ms: {long / short:.2f}x")
    cold_ours, cold_lite = [], []
    for _ in range(3):
        async with AsyncKustoSaver.embedded(ours) as saver:
            t = time.perf_counter()
            for th in threads:
                assert await saver.aget_tuple(_cfg(th)) is not None
            cold_ours.append(time.perf_counter() - t)
        async with AsyncSqliteSaver.from_conn_string(sqlite) as lite:
            t = time.perf_counter()
            for th in threads:
                assert await lite.aget_tuple(_cfg(th)) is not None
            cold_lite.append(time.perf_counter() - t)
    o, s = statistics.median(cold_ours), statistics.median(cold_lite)
    print(f"cold read-back of {args.threads} threads, one after the other: ours {o:.2f} s, "
          f"AsyncSqliteSaver {s:.2f} s: ours is {s / o:.2f}x SQLite's speed")


if __name__ == "__main__":
    asyncio.run(main())
