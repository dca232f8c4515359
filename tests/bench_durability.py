"""Throughput and aput latency per durability mode, side by side (not a test).

    .venv/bin/python tests/bench_durability.py [--agents 200] [--steps 20] [--rounds 2]

The load tool's raw workload (aget_tuple + aput + aput_writes per step, every
agent at once) on a fresh embedded DuckDB file per run, once per mode and
round (each run in a fresh process), modes interleaved so that a noisy
neighbour hurts them alike. Reports,
per mode, the median over rounds of checkpoints/s (over run + flush, so only
stored work counts), p50/p99 aput latency and, for "spool", fsyncs/s and puts
per fsync.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from langgraph.checkpoint.kusto import AsyncKustoSaver
from langgraph.checkpoint.kusto.engine.config import DURABILITY_MODES
from langgraph.checkpoint.kusto.loadtests import workloads as wl


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


async def one(mode: str, agents: int, steps: int, workdir: str, options: dict[str, Any]) -> dict[str, Any]:
    path = os.path.join(workdir, f"bench-{mode}-{time.monotonic_ns()}.duckdb")
    lat: list[float] = []
    async with AsyncKustoSaver.embedded(path, durability=mode, **options) as saver:
        real_aput = saver.aput

        async def timed_aput(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return await real_aput(*args, **kwargs)
            finally:
                lat.append(time.perf_counter() - t)

        saver.aput = timed_aput  # type: ignore[method-assign]
        threads = [f"{mode}-{i}" for i in range(agents)]
        t0 = time.perf_counter()
        run = await wl.run_agents(threads, lambda tid: wl.raw_agent(saver, tid, steps))
        await saver.flush()
        elapsed = time.perf_counter() - t0
        st = saver.engine.stats()
        ok = all([len([x async for x in saver.alist({"configurable": {"thread_id": t}})]) == steps for t in threads[::37]])
    for p in (path, path + ".wal"):
        if os.path.exists(p):
            os.remove(p)
    ckpts = agents * steps
    return {
        "mode": mode,
        "errors": len(run.errors),
        "verified_sample": ok,
        "elapsed_s": elapsed,
        "ckpt_per_s": ckpts / elapsed,
        "aput_p50_ms": _pct(lat, 0.50) * 1e3,
        "aput_p99_ms": _pct(lat, 0.99) * 1e3,
        "fsyncs": st["spool_fsyncs"],
        "fsyncs_per_s": st["spool_fsyncs"] / elapsed,
        "spooled": st["spool_records_written"],
    }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=200)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--modes", default=",".join(DURABILITY_MODES))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # run one mode, print its result as JSON
    args = ap.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory(prefix="bench-durability-") as workdir:
            await one("memory", 20, 3, workdir, {})  # warm-up: imports, KQL translation, thread pools
            print(json.dumps(await one(args.one, args.agents, args.steps, workdir, {})))
        return
    modes = args.modes.split(",")
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode in modes:  # each run in a fresh process: no state carried from the previous one
            out = subprocess.run(
                [sys.executable, __file__, "--one", mode, "--agents", str(args.agents), "--steps", str(args.steps)],
                check=True, capture_output=True, text=True,
            ).stdout
            res = json.loads(out.strip().splitlines()[-1])
            results[mode].append(res)
            print(f"round {r + 1} {mode:9} {res['ckpt_per_s']:8.1f} ckpt/s  aput p50 {res['aput_p50_ms']:7.1f} ms "
                  f"p99 {res['aput_p99_ms']:7.1f} ms  fsyncs/s {res['fsyncs_per_s']:6.1f}  errors {res['errors']} "
                  f"verified {res['verified_sample']}", flush=True)
    print(f"\nraw workload, {args.agents} agents x {args.steps} steps, median of {args.rounds} round(s) on {os.cpu_count()} CPUs")
    print(f"{'durability':10} {'ckpt/s':>9} {'vs memory':>9} {'aput p50 ms':>12} {'aput p99 ms':>12} {'fsyncs/s':>9} {'puts/fsync':>10}")
    base = statistics.median(x["ckpt_per_s"] for x in results["memory"]) if "memory" in results else None
    for mode, rs in results.items():
        cps = statistics.median(x["ckpt_per_s"] for x in rs)
        p50 = statistics.median(x["aput_p50_ms"] for x in rs)
        p99 = statistics.median(x["aput_p99_ms"] for x in rs)
        fps = statistics.median(x["fsyncs_per_s"] for x in rs)
        per = statistics.median(x["spooled"] / x["fsyncs"] for x in rs) if rs[0]["fsyncs"] else 0.0
        ratio = f"{cps / base:.2f}x" if base else "-"
        print(f"{mode:10} {cps:9.1f} {ratio:>9} {p50:12.1f} {p99:12.1f} {fps:9.1f} {per:10.1f}")


if __name__ == "__main__":
    asyncio.run(main())
