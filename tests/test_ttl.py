"""Retention: the ttl option deletes threads idle too long, and never a live one.

On the embedded store (DuckDB through duckdb-kql) and on the loopback Kusto endpoint
through the real azure-kusto SDK, with two replicas running expiry at once. Expiry
passes are run by hand (``engine.expire()``) where a test needs to know when one ran;
the tickers' own passes are tested with two replicas.
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.base.id import uuid6
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_consistency import cfg, messages, turn  # noqa: E402
from test_kusto_backend import loopback, saver_for  # noqa: E402

from langgraph.checkpoint.kusto import AsyncKustoSaver  # noqa: E402
from langgraph.checkpoint.kusto.engine import kql  # noqa: E402
from langgraph.checkpoint.kusto.engine.config import EngineConfig  # noqa: E402
from langgraph.checkpoint.kusto.engine.errors import ConfigError, UsageError  # noqa: E402
from langgraph.checkpoint.kusto.engine.schema import SCOPE_EXPIRE  # noqa: E402
from langgraph.checkpoint.kusto.telemetry import names  # noqa: E402

pytestmark = pytest.mark.anyio

TTL = 1.0
#: no ticker passes, no compaction ticks: the tests run passes by hand
MANUAL = {"ttl": TTL, "expiry_interval": 3600, "compaction_interval": 0}


def embedded(path: str = ":memory:", **options: Any) -> AsyncKustoSaver:
    return AsyncKustoSaver.embedded(path, **{**MANUAL, **options})


async def history(saver: AsyncKustoSaver, thread: str) -> list[str]:
    return [t.checkpoint["id"] async for t in saver.alist(cfg(thread))]


async def racing_turn(saver: AsyncKustoSaver, thread: str, parent: Any, text: str) -> str:
    """A turn that read ``parent`` (the latest state) before the expiry was written and
    writes its child after: LangGraph's put of the next checkpoint."""
    c = empty_checkpoint()
    c["id"] = str(uuid6(clock_seq=-1))
    old = parent.checkpoint["channel_versions"]["messages"]
    version = saver.get_next_version(old, None)
    c["channel_values"] = {"messages": [*parent.checkpoint["channel_values"]["messages"], text]}
    c["channel_versions"] = {"messages": version}
    await saver.aput(cfg(thread, parent.checkpoint["id"]), c, {"source": "loop", "step": 9}, {"messages": version})
    return c["id"]


async def count(saver: AsyncKustoSaver, table: str, thread: str) -> int:
    rows = await saver.engine.backend.query(
        f"declare query_parameters(t:string); {table} | where thread_id == t | count", {"t": thread}
    )
    return int(rows[0]["Count"])


# -- settings -------------------------------------------------------------------------


def test_ttl_settings() -> None:
    c = EngineConfig(ttl=dt.timedelta(hours=2))
    assert c.ttl == 7200.0 and c.expiry_every == 300.0 and c.touch_every is None
    c = EngineConfig(ttl=30, ttl_refresh_on_read=True)
    assert c.expiry_every == 3.0 and c.touch_every == 3.0
    assert EngineConfig().expiry_every is None
    with pytest.raises(ConfigError, match="ttl must be a positive"):
        EngineConfig(ttl=0)
    with pytest.raises(ConfigError, match="ttl must be a positive"):
        EngineConfig(ttl=dt.timedelta(seconds=-1))
    with pytest.raises(ConfigError, match="ttl_refresh_on_read needs a ttl"):
        EngineConfig(ttl_refresh_on_read=True)
    with pytest.raises(ConfigError, match="expiry_interval"):
        EngineConfig(ttl=5, expiry_interval=0)


async def test_expire_needs_a_ttl(anyio_backend: str) -> None:
    async with AsyncKustoSaver.embedded(":memory:") as saver:
        with pytest.raises(UsageError, match="ttl"):
            await saver.engine.expire()


# -- expiry ------------------------------------------------------------------------------


async def test_idle_threads_expire_and_live_ones_stay(anyio_backend: str) -> None:
    async with embedded() as saver:
        await turn(saver, "idle", "a")
        await turn(saver, "idle", "b")
        await turn(saver, "busy", "a")
        await anyio.sleep(TTL + 0.2)
        await turn(saver, "busy", "b")  # written inside the ttl: alive
        await turn(saver, "new", "a")
        assert await saver.engine.expire() == 1
        assert await messages(saver, "idle") is None and await history(saver, "idle") == []
        assert await messages(saver, "busy") == ["a", "b"] and len(await history(saver, "busy")) == 2
        assert await messages(saver, "new") == ["a"]
        stats = saver.engine.stats()
        assert stats["threads_expired"] == 1 and stats["live_threads"] == 2
        assert await saver.engine.expire() == 0, "an expired thread is not expired again"
        # compaction removes the rows physically; the live threads keep every row
        await saver.engine.compact()
        assert await count(saver, "Checkpoints", "idle") == 0 and await count(saver, "CheckpointBlobs", "idle") == 0
        assert await count(saver, "Checkpoints", "busy") == 2 and await count(saver, "Checkpoints", "new") == 1
        assert saver.engine.stats()["rows_removed"] == 4  # 2 checkpoints + 2 blobs


async def test_a_new_turn_after_expiry_starts_afresh(anyio_backend: str) -> None:
    async with embedded() as saver:
        await turn(saver, "t", "old")
        await anyio.sleep(TTL + 0.2)
        assert await saver.engine.expire() == 1
        await turn(saver, "t", "new")  # finds no checkpoint: a new life
        assert await messages(saver, "t") == ["new"]
        assert len(await history(saver, "t")) == 1, "the expired history stays hidden"
        await saver.engine.compact()
        assert await count(saver, "Checkpoints", "t") == 1


async def test_a_write_racing_the_expiry_wins(anyio_backend: str) -> None:
    """A turn that read the thread before the expiry was written, and writes after it,
    continues the history: the thread lives on whole, and compaction leaves it."""
    async with embedded() as saver:
        await turn(saver, "t", "a")
        await turn(saver, "t", "b")
        read_before = await saver.aget_tuple(cfg("t"))
        await anyio.sleep(TTL + 0.2)
        assert await saver.engine.expire() == 1
        assert await messages(saver, "t") is None  # the expiry holds...
        await racing_turn(saver, "t", read_before, "c")
        # the backend decides an expiry: the racing turn revives the thread once it is
        # ingested (at once under consistency="shared", whose puts wait for ingestion)
        await saver.flush()
        assert await messages(saver, "t") == ["a", "b", "c"]
        assert len(await history(saver, "t")) == 3
        await saver.engine.compact()
        assert await count(saver, "Checkpoints", "t") == 3 and await count(saver, "CheckpointBlobs", "t") == 3
        assert await saver.engine.expire() == 0  # alive: its last write is recent


async def test_pending_writes_racing_the_expiry_win(anyio_backend: str) -> None:
    async with embedded() as saver:
        await turn(saver, "t", "a")
        read_before = await saver.aget_tuple(cfg("t"))
        await anyio.sleep(TTL + 0.2)
        assert await saver.engine.expire() == 1
        await saver.aput_writes(cfg("t", read_before.checkpoint["id"]), [("messages", "w")], "task-1")
        await saver.flush()
        got = await saver.aget_tuple(cfg("t"))
        assert got is not None and got.checkpoint["id"] == read_before.checkpoint["id"]
        assert [w[1:] for w in got.pending_writes] == [("messages", "w")]


async def test_reads_refresh_the_ttl(anyio_backend: str) -> None:
    async with embedded(ttl_refresh_on_read=True) as saver:
        await turn(saver, "read", "a")
        await turn(saver, "unread", "a")
        deadline = anyio.current_time() + TTL + 0.4
        while anyio.current_time() < deadline:  # read steadily, past the ttl
            assert await messages(saver, "read") == ["a"]
            await anyio.sleep(TTL / 8)
        assert await saver.engine.expire() == 1
        assert await messages(saver, "read") == ["a"] and await messages(saver, "unread") is None
        assert await count(saver, "Touches", "read") >= 3  # at most one per ttl / 10
        assert await count(saver, "Touches", "unread") == 0


async def test_without_refresh_reads_do_not_keep_a_thread(anyio_backend: str) -> None:
    async with embedded() as saver:
        await turn(saver, "t", "a")
        deadline = anyio.current_time() + TTL + 0.3
        while anyio.current_time() < deadline:
            await messages(saver, "t")
            await anyio.sleep(TTL / 8)
        assert await count(saver, "Touches", "t") == 0
        assert await saver.engine.expire() == 1


async def test_expiry_resumes_after_a_restart(anyio_backend: str, tmp_path: Path) -> None:
    path = str(tmp_path / "store.duckdb")
    async with embedded(path) as saver:
        for t in ("x", "y"):
            await turn(saver, t, "a")
        await anyio.sleep(TTL + 0.2)
        assert await saver.engine.expire() == 2
        await turn(saver, "z", "a")
    await anyio.sleep(TTL + 0.2)
    async with embedded(path) as saver:  # a new process: nothing kept but the store
        assert await saver.engine.expire() == 1  # z alone; x and y stay expired once
        assert [await messages(saver, t) for t in ("x", "y", "z")] == [None, None, None]
        rows = await saver.engine.backend.query(
            f'Tombstones | where scope == "{SCOPE_EXPIRE}" | summarize n = count() by thread_id', {}
        )
        assert sorted((r["thread_id"], r["n"]) for r in rows) == [("x", 1), ("y", 1), ("z", 1)]


async def test_expiry_telemetry(anyio_backend: str) -> None:
    reader = InMemoryMetricReader()
    async with embedded(meter_provider=MeterProvider(metric_readers=[reader])) as saver:
        await turn(saver, "idle", "a")
        await anyio.sleep(TTL + 0.2)
        await turn(saver, "live", "a")
        await saver.engine.expire()
        await saver.engine.compact()
        points: dict[str, Any] = {}
        for rm in reader.get_metrics_data().resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    points[m.name] = list(m.data.data_points)
    assert sum(p.value for p in points[names.EXPIRED_THREADS]) == 1
    removed = {p.attributes[names.TABLE]: p.value for p in points[names.ROWS_REMOVED]}
    assert removed == {"Checkpoints": 1, "CheckpointBlobs": 1}
    (age,) = points[names.OLDEST_LIVE_AGE]
    assert 0 <= age.value < TTL


# -- several replicas ------------------------------------------------------------------


async def test_two_replicas_expire_once(anyio_backend: str) -> None:
    """Both replicas tick at once: one holds the lease and expires; every thread gets one
    expiry, and both replicas' next reads honour it."""
    async with loopback() as srv:
        opts = {"ttl": TTL, "expiry_interval": 60, "compaction_interval": 0, "compaction_lease_settle": 0.3}
        async with saver_for(srv, **opts) as a, saver_for(srv, **opts) as b:
            for i in range(6):
                await turn(a if i % 2 else b, f"t{i}", "x")
            await anyio.sleep(TTL + 0.2)
            await turn(a, "live", "x")
            results: list[int] = []

            async def run(s: AsyncKustoSaver) -> None:
                deleter = s.engine._children["deleter"].current
                deleter._expiring = True
                results.append(await deleter._expire(True))

            async with anyio.create_task_group() as tg:
                tg.start_soon(run, a)
                tg.start_soon(run, b)
            assert sorted(results) == [0, 6], "one replica held the lease"
            for s in (a, b):
                assert [await messages(s, f"t{i}") for i in range(6)] == [None] * 6
                assert await messages(s, "live") == ["x"]
            rows = await a.engine.backend.query(
                f'Tombstones | where scope == "{SCOPE_EXPIRE}" | summarize n = count() by thread_id', {}
            )
            assert sorted((r["thread_id"], r["n"]) for r in rows) == [(f"t{i}", 1) for i in range(6)]


async def test_a_racing_write_on_another_replica_wins(anyio_backend: str) -> None:
    async with loopback() as srv:
        async with saver_for(srv, **MANUAL) as a, saver_for(srv, **MANUAL) as b:
            await turn(a, "t", "a")
            read_before = await b.aget_tuple(cfg("t"))
            await anyio.sleep(TTL + 0.2)
            assert await a.engine.expire() == 1
            assert await messages(b, "t") is None
            await racing_turn(b, "t", read_before, "b")
            assert await messages(a, "t") == ["a", "b"]
            assert len(await history(a, "t")) == 2, "the history before the expiry lives on"
            await a.engine.compact()
            assert await messages(b, "t") == ["a", "b"]


async def test_a_replica_without_the_ttl_option_honours_expiries(anyio_backend: str) -> None:
    """A process without the ttl option reads without the expiry rule's joins until a read
    meets an expiry: that read asks again with the rule, and every read after applies it,
    whichever path (latest, list) met it first; a racing write still wins there."""
    async with loopback() as srv:
        plain = {"compaction_interval": 0}
        async with saver_for(srv, **MANUAL) as a, saver_for(srv, **plain) as b, saver_for(srv, **plain) as c:
            for t in ("t", "u"):
                await turn(a, t, "a")
            read_before = await b.aget_tuple(cfg("u"))
            assert await history(c, "t") and not b.engine.runtime.expiries and not c.engine.runtime.expiries
            await anyio.sleep(TTL + 0.2)
            assert await a.engine.expire() == 2
            assert await messages(b, "t") is None  # get_tuple met the expiry
            assert b.engine.runtime.expiries
            assert await history(c, "t") == []  # so did list
            assert c.engine.runtime.expiries
            await racing_turn(b, "u", read_before, "b")
            assert await messages(b, "u") == ["a", "b"]
            assert len(await history(c, "u")) == 2


def test_expiry_queries_are_bounded() -> None:
    text = kql.expiry_query(50)
    assert "take 50" in text
    with pytest.raises(ValueError):
        kql.expiry_query(0)
