"""The shipped Grafana dashboard queries metrics the Prometheus exporter really produces,
and the renderer that draws it for docs/telemetry.md evaluates its PromQL correctly."""

from __future__ import annotations

import math
from typing import Any

import anyio
import pytest
from langgraph.checkpoint.base import empty_checkpoint
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, generate_latest

from langgraph.checkpoint.kusto import AsyncKustoSaver
from langgraph.checkpoint.kusto.engine.backends.embedded import EmbeddedBackend
from langgraph.checkpoint.kusto.engine.backends.faulty import FaultPlan, FaultyBackend
from langgraph.checkpoint.kusto.loadtests import dashboard as dash

FAST = {"flush_interval": 0.005, "retry_backoff": 0.001, "retry_backoff_max": 0.01}


def selectors(node: Any) -> list[str]:
    if node[0] == "sel":
        return [node[1]]
    if node[0] in ("rate", "increase"):
        return [node[1][1]]
    return [name for child in node[1:] if isinstance(child, tuple) for name in selectors(child)]


def dashboard_queries() -> list[tuple[str, str]]:
    board = dash.load_dashboard()
    return [
        (p["title"], t["expr"]) for p in board["panels"] if p["type"] == "timeseries" for t in p["targets"]
    ]


async def _exercise_everything(registry: CollectorRegistry, store: dash.Store) -> None:
    """One saver run that makes every instrument report (retries, restarts, backpressure,
    deletes, a failed call), scraped a few times through the real exporter."""
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    backend = FaultyBackend(EmbeddedBackend(":memory:"), FaultPlan(fail_next_ingests=1))
    # every row its own batch, one batch in flight and one queued: a stall blocks callers at once
    saver = AsyncKustoSaver(
        backend, meter_provider=provider, mailbox_size=2, batch_size=1, ingest_concurrency=1,
        ingest_queue_size=1, **FAST,
    )
    t = 0.0

    def scrape() -> None:
        nonlocal t
        t += 1.0
        store.add_exposition(t, generate_latest(registry).decode())

    async def put(thread: str) -> None:
        cfg: dict[str, Any] = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
        cp = empty_checkpoint()
        cp["channel_values"] = {"m": thread}
        cp["channel_versions"] = {"m": "1"}
        await saver.aput(cfg, cp, {}, {"m": "1"})  # type: ignore[arg-type]

    async with saver:
        scrape()
        await put("a")
        await saver.aget_tuple({"configurable": {"thread_id": "a", "checkpoint_ns": ""}})
        await saver.aget_tuple({"configurable": {"thread_id": "a", "checkpoint_ns": ""}})
        backend.stall()
        async with anyio.create_task_group() as tg:
            for i in range(12):
                tg.start_soon(put, f"p{i}")
            await anyio.sleep(0.1)
            scrape()
            backend.resume()
        await saver.engine.crash("ingestor")
        await saver.aget_tuple({"configurable": {"thread_id": "p3", "checkpoint_ns": ""}})  # a miss: a query
        await saver.adelete_thread("a")
        with pytest.raises(Exception, match="strategy"):
            await saver.aprune(["a"], strategy="no such strategy")
        await saver.flush()
        scrape()
        scrape()
    provider.shutdown()


@pytest.fixture(scope="module")
def scraped() -> dash.Store:
    store = dash.Store()
    anyio.run(_exercise_everything, CollectorRegistry(), store)
    return store


def test_every_metric_the_dashboard_queries_is_exported(scraped: dash.Store) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 20
    for title, expr in queries:
        node = dash._Parser(dash._expand(expr)).parse()
        for name in selectors(node):
            assert name in scraped.by_name, f"{title!r} queries {name}, which the exporter does not produce"


def test_every_panel_has_data_after_a_run(scraped: dash.Store) -> None:
    ev = dash.Evaluator(scraped)
    empty = []
    for title, expr in dashboard_queries():
        # rates over the whole scrape history (the fixture's clock is 1 s per scrape)
        got = {}
        for t in (2.0, 3.0, 4.0):
            got.update(ev.query(expr.replace("$__rate_interval", "10s").replace("$namespace", ".*"), t))
        if not got:
            empty.append((title, expr))
    assert empty == [], empty


def test_the_evaluator_follows_promql() -> None:
    store = dash.Store()
    for t, (a, b, inf, s, c) in enumerate([(0, 0, 0, 0.0, 0), (2, 4, 4, 0.4, 4), (3, 8, 10, 2.0, 10)]):
        store.add_exposition(
            float(t),
            "# TYPE x_seconds histogram\n"
            f'x_seconds_bucket{{op="get",le="0.1"}} {a}\n'
            f'x_seconds_bucket{{op="get",le="1.0"}} {b}\n'
            f'x_seconds_bucket{{op="get",le="+Inf"}} {inf}\n'
            f'x_seconds_sum{{op="get"}} {s}\n'
            f'x_seconds_count{{op="get"}} {c}\n'
            "# TYPE g gauge\n"
            f'g{{actor="a"}} {t}\ng{{actor="b"}} {2 * t}\n'
            "# TYPE cap gauge\n"
            'cap{actor="a"} 4\ncap{actor="b"} 8\n',
        )
    ev = dash.Evaluator(store)
    # rate over the window: (10 - 0) / 2 s
    [(labels, v)] = ev.query('sum by (op) (rate(x_seconds_count{op=~"g.*"}[5s]))', 2.0).items()
    assert dict(labels) == {"op": "get"} and v == pytest.approx(5.0)
    # a counter reset (4 -> 1) counts from zero again
    reset = dash.Store()
    for t, v in enumerate([0, 4, 1, 3]):
        reset.add_exposition(float(t), f"# TYPE c counter\nc_total {v}\n")
    assert dash.Evaluator(reset).query("sum(increase(c_total[10s]))", 3.0) == {frozenset(): pytest.approx(7.0 * 10 / 3)}
    # histogram_quantile: p50 of 10 observations, 3 below 0.1, 5 more below 1.0 -> interpolated
    [(_, p50)] = ev.query("histogram_quantile(0.5, sum by (le) (rate(x_seconds_bucket[5s])))", 2.0).items()
    assert p50 == pytest.approx(0.1 + 0.9 * (5 - 3) / (8 - 3))
    [(_, p99)] = ev.query("histogram_quantile(0.99, sum by (le) (rate(x_seconds_bucket[5s])))", 2.0).items()
    assert p99 == pytest.approx(1.0)  # beyond the last finite bucket: its bound
    # division matches label sets; matchers; by-less sum
    fill = ev.query("max by (actor) (g) / max by (actor) (cap)", 2.0)
    assert {dict(k)["actor"]: v for k, v in fill.items()} == {"a": 0.5, "b": 0.5}
    assert ev.query('sum(g{actor!="a"})', 2.0) == {frozenset(): 4.0}
    assert ev.query("g", 10.0) == {}  # stale after the lookback
    assert math.isclose(dash._quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]) or 0.0, 0.0)


def test_renderer_draws_every_panel(scraped: dash.Store, tmp_path: Any) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "dashboard.png"
    dash.render(dash.load_dashboard(), scraped, {"an event": 2.0}, str(out), "test")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(data) < 400_000
