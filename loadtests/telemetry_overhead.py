"""What telemetry costs: one workload, run with and without an OpenTelemetry SDK.

    python -m langgraph.checkpoint.kusto.loadtests.telemetry_overhead [--workload raw|graph]
        [--agents 100 --steps 15 --rounds 3 --modes stripped,off,metrics,traced,exported,sampled]

Modes, each on a fresh embedded store in the same process:

* ``stripped``: the saver's telemetry calls replaced by plain calls (the floor);
* ``off``: no SDK: the OpenTelemetry API's no-op providers (what a host without an
  SDK gets);
* ``metrics``: an SDK MeterProvider with an ``InMemoryMetricReader``, no tracing;
* ``traced``: that, plus a TracerProvider that samples every span and keeps it in an
  ``InMemorySpanExporter``;
* ``exported``: metrics, every span sampled, handed to a ``BatchSpanProcessor`` whose
  exporter lets them go (as one shipping them out would, minus the encoding and I/O);
* ``sampled``: as ``traced``, sampling 10% of the traces (``ParentBased(TraceIdRatioBased(0.1))``).

Each round runs every mode once, the order rotating between rounds; every run first
warms up (one agent, three steps: the store's query translations), then times the
workload and a final flush. Reported: median throughput (agent steps per second),
CPU time per step of the whole process and of the event loop's thread, time spent
in Python's cyclic garbage collector per step, and throughput and CPU relative to
``off``. :func:`measure` returns the same as a dict.
The machine's other load moves single runs by tens of percent: read the medians of
several rounds, and the CPU columns.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from ..aio import AsyncKustoSaver
from ..engine import messages as _messages
from ..telemetry.instruments import Instruments
from . import workloads as wl
from .runner import GcClock

MODES = ("stripped", "off", "metrics", "traced", "exported", "sampled")


def _providers(mode: str) -> tuple[dict[str, Any], list[Any]]:
    if mode in ("stripped", "off"):
        return {}, []
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    keep: list[Any] = [InMemoryMetricReader()]
    providers: dict[str, Any] = {"meter_provider": MeterProvider(metric_readers=[keep[0]])}
    if mode in ("traced", "exported", "sampled"):
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        sampler = ParentBased(TraceIdRatioBased(0.1)) if mode == "sampled" else None
        tracer_provider = TracerProvider(sampler=sampler) if sampler else TracerProvider()
        if mode == "exported":
            exporter: Any = _Discard()
            tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
        else:
            exporter = InMemorySpanExporter()
            tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
        providers["tracer_provider"] = tracer_provider
        keep.append(exporter)
    return providers, keep


class _Discard:
    """A span exporter that counts spans and lets them go (as one shipping them out would)."""

    def __init__(self) -> None:
        self.count = 0

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        self.count += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True

    def get_finished_spans(self) -> list[Any]:
        return [None] * self.count


@contextlib.contextmanager
def _stripped() -> Iterator[None]:
    """The saver's telemetry calls as plain calls: no span, no timing, no capture."""

    async def timed(self: Any, op: str, fn: Any, *args: Any) -> Any:
        return await fn(*args)

    async def query(self: Any, parent: Any, stage: str, call: Any) -> Any:
        return await call

    saved = Instruments.timed, Instruments.query, _messages.capture
    Instruments.timed, Instruments.query = timed, query  # type: ignore[method-assign]
    _messages.capture = lambda: None  # type: ignore[assignment]
    try:
        yield
    finally:
        Instruments.timed, Instruments.query, _messages.capture = saved  # type: ignore[method-assign]


async def _run(workload: str, agents: int, steps: int, mode: str, options: dict[str, Any]) -> dict[str, Any]:
    providers, keep = _providers(mode)
    saver = AsyncKustoSaver.embedded(":memory:", **providers, **options)
    async with saver:
        if workload == "graph":
            graph = wl.build_graph().compile(checkpointer=saver)

            def agent(tid: str) -> Any:
                return wl.graph_agent(graph, tid, steps)

            await wl.graph_agent(graph, "warmup", 3)
        else:

            def agent(tid: str) -> Any:
                return wl.raw_agent(saver, tid, steps)

            await wl.raw_agent(saver, "warmup", 3)
        threads = [f"t{i}" for i in range(agents)]
        with GcClock() as gc_clock:
            wall0, cpu0, loop0 = time.perf_counter(), time.process_time(), time.thread_time()
            outcome = await wl.run_agents(threads, agent)
            await saver.flush()
            wall = time.perf_counter() - wall0
            cpu, loop = time.process_time() - cpu0, time.thread_time() - loop0
    if outcome.errors:
        raise RuntimeError(f"the workload failed: {outcome.errors[:3]}")
    n = agents * steps
    out: dict[str, Any] = {
        "mode": mode, "steps": n, "seconds": wall, "steps_per_s": n / wall,
        "cpu_us_per_step": cpu / n * 1e6, "loop_cpu_us_per_step": loop / n * 1e6,
        "gc_us_per_step": gc_clock.seconds / n * 1e6,
    }
    for p in providers.values():
        p.shutdown()  # flushes a batch processor
    if len(keep) > 1:
        out["spans"] = len(keep[1].get_finished_spans())
    return out


def measure(
    workload: str = "raw",
    agents: int = 100,
    steps: int = 15,
    rounds: int = 3,
    modes: Sequence[str] = MODES,
    **options: Any,
) -> dict[str, Any]:
    """Run every mode ``rounds`` times; per-run figures, medians and ratios to ``off``."""
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown mode(s) {sorted(unknown)}; modes: {MODES}")
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for r in range(rounds):
        shift = r % len(modes)
        for mode in list(modes[shift:]) + list(modes[:shift]):
            with _stripped() if mode == "stripped" else contextlib.nullcontext():
                runs[mode].append(asyncio.run(_run(workload, agents, steps, mode, options)))
    median = {
        mode: {
            key: statistics.median(x[key] for x in rs)
            for key in ("steps_per_s", "cpu_us_per_step", "loop_cpu_us_per_step", "gc_us_per_step")
        }
        for mode, rs in runs.items()
    }
    base = median.get("off")
    ratio = {m: med["steps_per_s"] / base["steps_per_s"] for m, med in median.items()} if base else {}
    cpu_ratio = {m: med["cpu_us_per_step"] / base["cpu_us_per_step"] for m, med in median.items()} if base else {}
    return {
        "workload": workload, "agents": agents, "steps": steps, "rounds": rounds,
        "runs": runs, "median": median, "throughput_vs_off": ratio, "cpu_vs_off": cpu_ratio,
    }


def format_report(res: dict[str, Any]) -> list[str]:
    lines = [
        f"{res['workload']} workload, {res['agents']} agents x {res['steps']} steps, embedded store, "
        f"median of {res['rounds']} rounds:",
        f"  {'mode':9} {'steps/s':>8} {'vs off':>7} {'CPU us/step':>12} {'vs off':>7} {'loop CPU':>9} "
        f"{'GC':>6}   runs (steps/s)",
    ]
    for mode, med in res["median"].items():
        ratio = res["throughput_vs_off"].get(mode)
        cpu_ratio = res["cpu_vs_off"].get(mode)
        each = ", ".join(f"{x['steps_per_s']:.0f}" for x in res["runs"][mode])
        lines.append(
            f"  {mode:9} {med['steps_per_s']:8.0f} {'' if ratio is None else f'x{ratio:.2f}':>7} "
            f"{med['cpu_us_per_step']:12.0f} {'' if cpu_ratio is None else f'x{cpu_ratio:.2f}':>7} "
            f"{med['loop_cpu_us_per_step']:9.0f} {med['gc_us_per_step']:6.0f}   {each}"
        )
    lines.append("  (CPU, loop CPU = the event loop thread's, GC = time in the cyclic collector: us per step)")
    traced = res["runs"].get("traced")
    if traced:
        lines.append(f"  traced keeps {traced[0]['spans'] / traced[0]['steps']:.1f} spans per step")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Telemetry overhead: the same workload with and without an SDK.")
    ap.add_argument("--workload", choices=("raw", "graph"), default="raw")
    ap.add_argument("--agents", type=int, default=100)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {','.join(MODES)}")
    args = ap.parse_args(argv)
    res = measure(args.workload, args.agents, args.steps, args.rounds, [m for m in args.modes.split(",") if m])
    print("\n".join(format_report(res)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
