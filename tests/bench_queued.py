"""Queued ingestion through the loopback endpoint over Azurite (not a test).

    .venv/bin/python tests/bench_queued.py [--delay 0.2] [--samples 20] [--agents 50] [--steps 6]

1. Latency, one put at a time (``--samples``): from ``aput`` returning to the row being
   queryable at the endpoint (polled every 5 ms), and from ``aput`` to ``flush()``
   returning (Kusto's success report read), with the loopback's batching delay
   ``--delay`` (Kusto's MaximumBatchingTimeSpan: 5 min by default, 30 s in provision.kql).
2. Throughput, ``--agents`` threads putting ``--steps`` checkpoints each at once, with
   ``ingest_concurrency=2``: the ingestor freeing its slot while a batch awaits its
   report (``submit``), against holding it for the whole wait (the backend behind a
   wrapper without ``submit``: what a plain ``ingest`` that waits would do).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.base.id import uuid6

sys.path.insert(0, str(Path(__file__).resolve().parent))

import azurite_server  # noqa: E402
from kusto_loopback import LoopbackKusto  # noqa: E402

from langgraph.checkpoint.kusto import AsyncKustoSaver  # noqa: E402
from langgraph.checkpoint.kusto.engine.backends.kusto import KustoBackend  # noqa: E402

DB = "checkpoints"


class HoldsSlot:
    """The Kusto backend without ``submit``: the ingestor holds its slot for the wait."""

    def __init__(self, inner: KustoBackend) -> None:
        self.inner = inner
        self.name = inner.name

    def __getattr__(self, name: str) -> Any:
        if name == "submit":
            raise AttributeError(name)
        return getattr(self.inner, name)


async def put(saver: AsyncKustoSaver, thread_id: str, previous: Any = None) -> Any:
    c = empty_checkpoint()
    c["id"] = str(uuid6(clock_seq=-1))
    c["channel_values"] = {"messages": f"step of {thread_id}"}
    c["channel_versions"] = {"messages": saver.get_next_version(previous, None)}
    cfg = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    await saver.aput(cfg, c, {"source": "loop", "step": 0}, c["channel_versions"])
    return c["channel_versions"]["messages"]


def stored(srv: LoopbackKusto, thread_id: str) -> bool:
    return bool(srv.sql("SELECT count(*) FROM Checkpoints WHERE thread_id = ?", [thread_id])[0][0])


async def latency(srv: LoopbackKusto, samples: int) -> dict[str, float]:
    visible, confirmed = [], []
    backend = KustoBackend(srv.uri, DB, ingest_mode="queued", ingest_uri=srv.uri, status_poll_interval=0.02)
    async with AsyncKustoSaver(backend, flush_interval=0.005) as saver:
        await put(saver, "warm-up")
        await saver.flush()
        for i in range(samples):
            tid = f"lat-{i}"
            t0 = time.perf_counter()
            await put(saver, tid)
            async with anyio.create_task_group() as tg:
                async def watch() -> None:
                    while not await anyio.to_thread.run_sync(stored, srv, tid):
                        await anyio.sleep(0.005)
                    visible.append(time.perf_counter() - t0)

                tg.start_soon(watch)
                await saver.flush()
                confirmed.append(time.perf_counter() - t0)
    return {
        "visible_p50": statistics.median(visible), "visible_max": max(visible),
        "confirmed_p50": statistics.median(confirmed), "confirmed_max": max(confirmed),
    }


async def throughput(srv: LoopbackKusto, agents: int, steps: int, hold: bool) -> float:
    backend: Any = KustoBackend(srv.uri, DB, ingest_mode="queued", ingest_uri=srv.uri, status_poll_interval=0.02)
    if hold:
        backend = HoldsSlot(backend)
    async with AsyncKustoSaver(backend, ingest_concurrency=2, batch_size=20, flush_interval=0.01) as saver:
        t0 = time.perf_counter()

        async def agent(a: int) -> None:
            version = None
            for _ in range(steps):
                version = await put(saver, f"{'hold' if hold else 'free'}-{a}", version)

        async with anyio.create_task_group() as tg:
            for a in range(agents):
                tg.start_soon(agent, a)
        await saver.flush()
        return agents * steps / (time.perf_counter() - t0)


async def main(args: argparse.Namespace) -> None:
    with azurite_server.Azurite() as storage:
        async with LoopbackKusto(database=DB) as srv:
            await KustoBackend(srv.uri, DB).setup(create=True)
            srv.enable_queued_ingestion(storage, batching_delay=args.delay)
            lat = await latency(srv, args.samples)
            print(f"batching delay {args.delay:g} s, {args.samples} puts one at a time:")
            print(f"  aput -> queryable at the endpoint: p50 {lat['visible_p50'] * 1000:.0f} ms, "
                  f"max {lat['visible_max'] * 1000:.0f} ms")
            print(f"  aput -> flush() returned (success report read): p50 "
                  f"{lat['confirmed_p50'] * 1000:.0f} ms, max {lat['confirmed_max'] * 1000:.0f} ms")
            for hold in (False, True):
                rate = await throughput(srv, args.agents, args.steps, hold)
                what = "slot held for the wait" if hold else "slot freed while waiting"
                print(f"  {args.agents} agents x {args.steps} puts, ingest_concurrency=2, {what}: "
                      f"{rate:.0f} checkpoints/s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay", type=float, default=0.2)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--steps", type=int, default=6)
    anyio.run(main, parser.parse_args())
