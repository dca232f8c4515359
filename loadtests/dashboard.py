"""Draw the shipped Grafana dashboard's panels from a real load run, without Grafana.

    python -m langgraph.checkpoint.kusto.loadtests.dashboard [--out docs/dashboard.png] [--seconds 60]

What it does, so the picture means something:

1. Runs a load on the embedded store for ``--seconds``: agents doing the raw workload
   (``get_tuple`` -> ``put`` -> ``put_writes``, see :mod:`.workloads`) in waves of new
   threads, behind the fault-injecting backend (ingest latency, 2% transient ingest
   failures), with three scripted events: the backend stalls for a few seconds (a
   third of the way in), the ingestor is crashed once (half way), and a batch of
   threads is deleted (two thirds of the way; compaction follows).
2. Every half second, scrapes the metrics through the real OpenTelemetry Prometheus
   exporter (``PrometheusMetricReader`` into a ``prometheus_client`` registry,
   rendered in the Prometheus text format and parsed back), so the series carry
   exactly the names and labels Prometheus would store.
3. Evaluates each panel's PromQL from ``telemetry/dashboards/grafana-dashboard.json``
   over those series with a small evaluator of the PromQL the dashboard uses
   (selectors with matchers, ``rate``, ``increase``, ``sum``/``max`` ``by``,
   ``histogram_quantile``, ``/``), and draws every panel (same titles, same layout,
   same legends) with matplotlib.

It is this renderer's drawing of the dashboard's panels, not a Grafana screenshot.
Needs the ``telemetry`` and ``loadtest`` extras (Prometheus exporter, matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import io
import json
import math
import re
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

SCRAPE_INTERVAL = 0.5
RATE_INTERVAL = "5s"
LOOKBACK = 2.0

Labels = frozenset[tuple[str, str]]


def load_dashboard() -> dict[str, Any]:
    ref = resources.files("langgraph.checkpoint.kusto.telemetry").joinpath("dashboards/grafana-dashboard.json")
    return json.loads(ref.read_text())  # type: ignore[no-any-return]


# -- scraped series -------------------------------------------------------------------


@dataclass
class Series:
    times: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


class Store:
    """Samples scraped from the Prometheus exposition, by series (name + labels)."""

    def __init__(self) -> None:
        self.series: dict[Labels, Series] = {}
        self.by_name: dict[str, list[Labels]] = defaultdict(list)

    def add_exposition(self, t: float, text: str) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(text):
            for s in family.samples:
                # as Prometheus stores them: a label with an empty value is no label
                labels = {k: v for k, v in s.labels.items() if v != ""}
                key: Labels = frozenset({**labels, "__name__": s.name}.items())
                series = self.series.get(key)
                if series is None:
                    series = self.series[key] = Series()
                    self.by_name[s.name].append(key)
                series.times.append(t)
                series.values.append(float(s.value))


# -- a small PromQL evaluator (the subset the dashboard uses) ----------------------------

_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+(?:\.\d+)?)(?P<unit>[smh])?(?![\w.])|(?P<str>\"(?:[^\"\\]|\\.)*\")"
    r"|(?P<op>=~|!~|!=|=|/|,|\(|\)|\{|\}|\[|\])|(?P<id>[A-Za-z_:][\w:]*))"
)


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"cannot read PromQL at {text[pos:]!r}")
        pos = m.end()
        if m.group("num") is not None:
            unit = m.group("unit")
            out.append(("dur" if unit else "num", m.group("num") + (unit or "")))
        elif m.group("str") is not None:
            out.append(("str", json.loads(m.group("str"))))
        elif m.group("op") is not None:
            out.append(("op", m.group("op")))
        else:
            out.append(("id", m.group("id")))
    return out


def _seconds(d: str) -> float:
    return float(d[:-1]) * {"s": 1, "m": 60, "h": 3600}[d[-1]]


class _Parser:
    AGGS = ("sum", "max", "min", "avg")

    def __init__(self, text: str) -> None:
        self.toks = _tokens(text)
        self.i = 0

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, value: str | None = None) -> tuple[str, str]:
        tok = self.peek()
        if tok is None or (value is not None and tok[1] != value):
            raise ValueError(f"expected {value!r}, got {tok!r}")
        self.i += 1
        return tok

    def parse(self) -> Any:
        node = self.expr()
        if self.peek() is not None:
            raise ValueError(f"unexpected {self.peek()!r}")
        return node

    def expr(self) -> Any:
        node = self.term()
        while self.peek() == ("op", "/"):
            self.take("/")
            node = ("div", node, self.term())
        return node

    def labels(self) -> list[str]:
        self.take("(")
        names = []
        while self.peek() != ("op", ")"):
            names.append(self.take()[1])
            if self.peek() == ("op", ","):
                self.take(",")
        self.take(")")
        return names

    def term(self) -> Any:
        kind, value = self.take()
        if kind == "num":
            return ("num", float(value))
        if kind == "op" and value == "(":
            node = self.expr()
            self.take(")")
            return node
        if kind != "id":
            raise ValueError(f"unexpected {value!r}")
        if value in self.AGGS:
            by = None
            if self.peek() == ("id", "by"):
                self.take()
                by = self.labels()
            self.take("(")
            inner = self.expr()
            self.take(")")
            if by is None and self.peek() == ("id", "by"):
                self.take()
                by = self.labels()
            return ("agg", value, by, inner)
        if value in ("rate", "increase"):
            self.take("(")
            sel = self.selector(self.take()[1])
            self.take(")")
            return (value, sel)
        if value == "histogram_quantile":
            self.take("(")
            q = float(self.take()[1])
            self.take(",")
            inner = self.expr()
            self.take(")")
            return ("hq", q, inner)
        return self.selector(value)

    def selector(self, name: str) -> Any:
        matchers = []
        if self.peek() == ("op", "{"):
            self.take("{")
            while self.peek() != ("op", "}"):
                label = self.take()[1]
                op = self.take()[1]
                matchers.append((label, op, self.take()[1]))
                if self.peek() == ("op", ","):
                    self.take(",")
            self.take("}")
        window = None
        if self.peek() == ("op", "["):
            self.take("[")
            window = _seconds(self.take()[1])
            self.take("]")
        return ("sel", name, matchers, window)


def _matches(labels: dict[str, str], matchers: list[tuple[str, str, str]]) -> bool:
    for label, op, value in matchers:
        got = labels.get(label, "")
        ok = {
            "=": got == value,
            "!=": got != value,
            "=~": re.fullmatch(value, got) is not None,
            "!~": re.fullmatch(value, got) is None,
        }[op]
        if not ok:
            return False
    return True


Vector = dict[Labels, float]


def _strip_name(labels: Labels) -> Labels:
    return frozenset(kv for kv in labels if kv[0] != "__name__")


class Evaluator:
    def __init__(self, store: Store) -> None:
        self.store = store

    def query(self, text: str, t: float) -> Vector:
        return self.eval(_Parser(text).parse(), t)

    def _select(self, name: str, matchers: list[tuple[str, str, str]]) -> list[tuple[Labels, Series]]:
        out = []
        for key in self.store.by_name.get(name, ()):
            if _matches(dict(key), matchers):
                out.append((key, self.store.series[key]))
        return out

    def eval(self, node: Any, t: float) -> Vector:
        kind = node[0]
        if kind == "num":
            return {frozenset(): node[1]}
        if kind == "sel":
            _, name, matchers, _window = node
            out: Vector = {}
            for key, s in self._select(name, matchers):
                i = bisect.bisect_right(s.times, t) - 1
                if i >= 0 and t - s.times[i] <= LOOKBACK:
                    out[key] = s.values[i]
            return out
        if kind in ("rate", "increase"):
            _, name, matchers, window = node[1]
            out = {}
            for key, s in self._select(name, matchers):
                lo = bisect.bisect_right(s.times, t - window)
                hi = bisect.bisect_right(s.times, t)
                if hi - lo < 2:
                    continue
                inc, prev = 0.0, s.values[lo]
                for v in s.values[lo + 1 : hi]:
                    inc += v - prev if v >= prev else v  # a counter reset starts again from 0
                    prev = v
                span = s.times[hi - 1] - s.times[lo]
                rate = inc / span if span > 0 else 0.0
                out[_strip_name(key)] = rate if kind == "rate" else rate * window
            return out
        if kind == "agg":
            _, op, by, inner = node
            groups: dict[Labels, list[float]] = defaultdict(list)
            for key, v in self.eval(inner, t).items():
                g = frozenset(kv for kv in key if by is not None and kv[0] in by)
                groups[g].append(v)
            fn = {"sum": sum, "max": max, "min": min, "avg": lambda xs: sum(xs) / len(xs)}[op]
            return {g: fn(vs) for g, vs in groups.items()}
        if kind == "hq":
            _, q, inner = node
            buckets: dict[Labels, list[tuple[float, float]]] = defaultdict(list)
            for key, v in self.eval(inner, t).items():
                d = dict(key)
                le = d.pop("le", None)
                if le is None:
                    continue
                buckets[frozenset(d.items())].append((float(le), v))
            out = {}
            for g, bs in buckets.items():
                val = _quantile(q, sorted(bs))
                if val is not None:
                    out[g] = val
            return out
        if kind == "div":
            left, right = self.eval(node[1], t), self.eval(node[2], t)
            out = {}
            for key, v in left.items():
                d = right.get(key)
                if d is None and len(right) == 1 and not next(iter(right)):
                    d = next(iter(right.values()))
                if d:
                    out[key] = v / d
            return out
        raise ValueError(f"cannot evaluate {node!r}")


def _quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    if not buckets or buckets[-1][0] != math.inf:
        return None
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == math.inf:
                return lower
            width = count - below
            return lower + (le - lower) * ((rank - below) / width if width > 0 else 1.0)
        lower, below = le, count
    return lower


# -- the load ---------------------------------------------------------------------------


async def run_load(seconds: float, agents: int, steps: int) -> tuple[Store, dict[str, float]]:
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import CollectorRegistry, generate_latest

    from ..aio import AsyncKustoSaver
    from ..engine.backends.embedded import EmbeddedBackend
    from ..engine.backends.faulty import FaultPlan, FaultyBackend, Latency
    from . import workloads as wl

    registry = CollectorRegistry()
    meter_provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    backend = FaultyBackend(
        EmbeddedBackend(":memory:"),
        FaultPlan(ingest_latency=Latency(0.01, 0.01), ingest_error_rate=0.02),
        seed=7,
    )
    saver = AsyncKustoSaver(
        backend,
        meter_provider=meter_provider,
        flush_interval=0.25,
        mailbox_size=16,  # below the agent count: a stall shows as blocked callers
        max_batch_bytes=1024 * 1024,
        cell_limit=512 * 1024,
        max_buffered_bytes=12 * 1024 * 1024,  # a stall fills it within seconds
        retry_backoff=0.02,
        retry_backoff_max=0.2,
        compaction_interval=5.0,
        compaction_lease_settle=0.5,  # one process: the lease is settled at once
    )
    store = Store()
    events: dict[str, float] = {}
    started = time.monotonic()
    deadline = started + seconds
    finished: list[str] = []

    def now() -> float:
        return time.monotonic() - started

    async def scraper() -> None:
        while True:
            store.add_exposition(now(), generate_latest(registry).decode())
            await asyncio.sleep(SCRAPE_INTERVAL)

    async def agent(slot: int) -> None:
        wave = 0
        while time.monotonic() < deadline:
            tid = f"a{slot}-w{wave}"
            await wl.raw_agent(saver, tid, steps)
            finished.append(tid)
            wave += 1

    async def script() -> None:
        await asyncio.sleep(seconds / 3)
        events["backend stalled"] = now()
        backend.stall()
        await asyncio.sleep(min(4.0, seconds / 10))
        backend.resume()
        events["backend resumed"] = now()
        await asyncio.sleep(seconds / 2 - now())
        events["ingestor crashed"] = now()
        await saver.engine.crash("ingestor")
        await asyncio.sleep(2 * seconds / 3 - now())
        events["threads deleted"] = now()
        for tid in list(finished)[: 4 * agents]:
            await saver.adelete_thread(tid)

    async with saver:
        scrape = asyncio.create_task(scraper())
        scripted = asyncio.create_task(script())
        await asyncio.gather(*(agent(i) for i in range(agents)))
        await scripted
        await saver.flush()
        await asyncio.sleep(2 * SCRAPE_INTERVAL)
        scrape.cancel()
        await asyncio.gather(scrape, return_exceptions=True)
    meter_provider.shutdown()
    return store, events


# -- drawing ----------------------------------------------------------------------------

_BG, _PANEL, _TEXT, _GRID = "#111217", "#181b1f", "#ccccdc", "#2c3038"
_COLORS = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#705da0", "#37872d"]


def _unit_formatter(unit: str) -> Any:
    from matplotlib.ticker import FuncFormatter

    def fmt(v: float, _pos: Any = None) -> str:
        a = abs(v)
        if unit == "s":
            if a == 0:
                return "0"
            if a < 1e-3:
                return f"{v * 1e6:.0f} µs"
            if a < 1:
                return f"{v * 1e3:.3g} ms"
            return f"{v:.3g} s"
        if unit in ("bytes", "Bps"):
            suffix = "/s" if unit == "Bps" else ""
            for div, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
                if a >= div:
                    return f"{v / div:.3g} {name}{suffix}"
            return f"{v:.0f} B{suffix}"
        if unit == "percentunit":
            return f"{v * 100:.0f}%"
        suffix = {"ops": " ops/s", "rows/s": " rows/s"}.get(unit, "")
        if a >= 1000:
            return f"{v / 1000:.3g}k{suffix}"
        return f"{v:.3g}{suffix}"

    return FuncFormatter(fmt)


def _legend(fmt: str, labels: Labels) -> str:
    d = dict(labels)
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: d.get(m.group(1), ""), fmt).strip()


def _expand(expr: str) -> str:
    return expr.replace("$__rate_interval", RATE_INTERVAL).replace("$namespace", ".*")


def render(dashboard: dict[str, Any], store: Store, events: dict[str, float], out: str, note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = Evaluator(store)
    end = max((s.times[-1] for s in store.series.values()), default=1.0)
    first = min((s.times[0] for s in store.series.values()), default=0.0)
    start = first + _seconds(RATE_INTERVAL)  # the first full rate window
    if start >= end:
        start = first
    points = 120
    times = [start + (end - start) * i / (points - 1) for i in range(points)]
    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    unit_h, unit_w = 0.42, 0.95
    fig = plt.figure(figsize=(24 * unit_w, rows * unit_h + 1.0), facecolor=_BG, dpi=72)
    top = 1 - 0.9 / (rows * unit_h + 1.0)
    fig.text(0.01, top + 0.35 / (rows * unit_h + 1.0), dashboard["title"], color=_TEXT, fontsize=17, weight="bold")
    fig.text(0.99, top + 0.35 / (rows * unit_h + 1.0), note, color="#8e8e99", fontsize=10, ha="right")

    def box(gp: dict[str, int]) -> list[float]:
        x0 = gp["x"] / 24
        w = gp["w"] / 24
        y0 = top * (1 - (gp["y"] + gp["h"]) / rows)
        h = top * gp["h"] / rows
        return [x0 + 0.006, y0 + 0.006, w - 0.012, h - 0.012]

    for p in panels:
        gp = p["gridPos"]
        if p["type"] == "row":
            fig.text(0.008, top * (1 - (gp["y"] + 0.5) / rows), p["title"], color=_TEXT, fontsize=13,
                     weight="bold", va="center")
            continue
        x0, y0, w, h = box(gp)
        frame = fig.add_axes((x0, y0, w, h))
        frame.set_facecolor(_PANEL)
        frame.set_xticks([])
        frame.set_yticks([])
        for spine in frame.spines.values():
            spine.set_color(_GRID)
        frame.text(0.012, 0.95, p["title"], transform=frame.transAxes, color=_TEXT, fontsize=11, va="top",
                   weight="bold")
        ax = fig.add_axes((x0 + w * 0.085, y0 + h * 0.27, w * 0.895, h * 0.56))
        ax.set_facecolor(_PANEL)
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        ax.yaxis.set_major_formatter(_unit_formatter(unit))
        ax.tick_params(colors="#9fa0a8", labelsize=8)
        ax.grid(color=_GRID, linewidth=0.6)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ci = 0
        stack = p["fieldConfig"]["defaults"]["custom"].get("stacking", {}).get("mode") == "normal"
        base: list[float] | None = None
        for target in p["targets"]:
            results: dict[Labels, list[float]] = defaultdict(lambda: [math.nan] * len(times))
            for i, t in enumerate(times):
                for labels, v in ev.query(_expand(target["expr"]), t).items():
                    results[labels][i] = v
            for labels in sorted(results, key=lambda k: _legend(target["legendFormat"], k)):
                ys = results[labels]
                color = _COLORS[ci % len(_COLORS)]
                ci += 1
                name = _legend(target["legendFormat"], labels)
                if stack:
                    lower = base or [0.0] * len(times)
                    upper = [b + (0.0 if math.isnan(y) else y) for b, y in zip(lower, ys)]
                    ax.fill_between(times, lower, upper, color=color, alpha=0.25, linewidth=0)
                    ax.plot(times, upper, color=color, linewidth=1.2, label=name)
                    base = upper
                else:
                    ax.plot(times, ys, color=color, linewidth=1.4, label=name)
        defaults = p["fieldConfig"]["defaults"]
        lo, hi = ax.get_ylim()
        ax.set_ylim(defaults.get("min", lo), defaults.get("max", max(hi, 1e-9)))
        ax.set_xlim(times[0], times[-1])
        ticks = [x for x in range(0, int(times[-1]) + 1, 10 if times[-1] > 20 else 1) if x >= times[0]]
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{x}s" for x in ticks])
        for name, at in events.items():
            ax.axvline(at, color="#6e7079", linewidth=0.8, linestyle=":")
        handles, names = ax.get_legend_handles_labels()
        if handles:
            leg = frame.legend(handles, names, loc="lower left", ncol=min(4, len(names)), fontsize=8.5,
                               frameon=False, labelcolor=_TEXT, bbox_to_anchor=(0.01, 0.0), handlelength=1.2,
                               columnspacing=1.0)
            leg.set_in_layout(False)
        else:
            ax.text(0.5, 0.5, "No data", transform=ax.transAxes, color="#8e8e99", ha="center", va="center")
    buf = io.BytesIO()
    fig.savefig(buf, facecolor=_BG, dpi=72)
    plt.close(fig)
    from PIL import Image  # matplotlib's own dependency

    # a palette image: the same picture at a third of the bytes
    Image.open(buf).convert("RGB").quantize(colors=256).save(out, optimize=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Draw the Grafana dashboard's panels from a load run (no Grafana).")
    ap.add_argument("--out", default="docs/dashboard.png")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--agents", type=int, default=24)
    ap.add_argument("--steps", type=int, default=10, help="steps per thread before an agent starts a new one")
    args = ap.parse_args(argv)
    dashboard = load_dashboard()
    store, events = asyncio.run(run_load(args.seconds, args.agents, args.steps))
    marks = ", ".join(f"{name} at {at:.0f}s" for name, at in events.items())
    note = (f"drawn by loadtests/dashboard.py from a {args.seconds:.0f} s load on the embedded store, "
            f"{args.agents} agents; dotted lines: {marks}. Not a Grafana screenshot.")
    render(dashboard, store, events, args.out, note)
    print(f"wrote {args.out}; {len(store.series)} series scraped; events: {marks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
