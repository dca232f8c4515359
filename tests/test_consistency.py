"""Several replicas on one database: what each consistency setting guarantees.

Two savers in one process stand for two replica processes: each has its own engine,
cache and clock, and they meet only in the backend, the loopback Kusto endpoint
(tests/kusto_loopback.py) reached through the real azure-kusto SDK. Real processes
with skewed clocks: tests/test_replicas.py.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
from azure.kusto.data import KustoClient
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.base.id import uuid6

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_kusto_backend import DB, FAST, loopback, saver_for  # noqa: E402

from langgraph.checkpoint.kusto import AsyncKustoSaver  # noqa: E402
from langgraph.checkpoint.kusto.engine.clock import ThreadClock  # noqa: E402
from langgraph.checkpoint.kusto.engine.config import EngineConfig  # noqa: E402
from langgraph.checkpoint.kusto.engine.errors import ConfigError  # noqa: E402
from langgraph.checkpoint.kusto.engine.records import now_us  # noqa: E402

pytestmark = pytest.mark.anyio

DOCS = Path(__file__).resolve().parent.parent / "docs" / "consistency.md"


def cfg(thread: str, checkpoint_id: str | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {"thread_id": thread, "checkpoint_ns": ""}
    if checkpoint_id is not None:
        c["checkpoint_id"] = checkpoint_id
    return {"configurable": c}


async def turn(saver: AsyncKustoSaver, thread: str, text: str) -> str:
    """One turn as LangGraph runs it: read the latest state, write its child."""
    latest = await saver.aget_tuple(cfg(thread))
    messages = list(latest.checkpoint["channel_values"].get("messages", [])) if latest else []
    old = latest.checkpoint["channel_versions"].get("messages") if latest else None
    c = empty_checkpoint()
    c["id"] = str(uuid6(clock_seq=-1))
    version = saver.get_next_version(old, None)
    c["channel_values"] = {"messages": [*messages, text]}
    c["channel_versions"] = {"messages": version}
    parent = cfg(thread, latest.checkpoint["id"]) if latest else cfg(thread)
    await saver.aput(parent, c, {"source": "loop", "step": len(messages)}, {"messages": version})
    return c["id"]


async def messages(saver: AsyncKustoSaver, thread: str) -> list[str] | None:
    latest = await saver.aget_tuple(cfg(thread))
    return None if latest is None else list(latest.checkpoint["channel_values"]["messages"])


# -- the settings ------------------------------------------------------------------


def test_defaults_follow_the_store() -> None:
    embedded = AsyncKustoSaver.embedded(":memory:")
    assert (embedded.options.consistency, embedded.options.durability) == ("sticky", "memory")
    kusto = AsyncKustoSaver.from_connection_string("http://127.0.0.1:9", "db")
    assert (kusto.options.consistency, kusto.options.durability) == ("shared", "ingested")
    sticky = AsyncKustoSaver.from_connection_string("http://127.0.0.1:9", "db", consistency="sticky")
    assert (sticky.options.consistency, sticky.options.durability) == ("sticky", "memory")
    chosen = AsyncKustoSaver.from_connection_string("http://127.0.0.1:9", "db", durability="memory")
    assert (chosen.options.consistency, chosen.options.durability) == ("shared", "memory")
    with pytest.raises(ConfigError, match="consistency must be one of"):
        EngineConfig.from_options(consistency="eventual")


def test_clock_stamps_above_what_it_observed() -> None:
    clock = ThreadClock()
    ahead = now_us() + 30_000_000  # a thread last written by a host 30 s ahead
    clock.observe("t", ahead)
    assert clock.stamp("t") == ahead + 1
    assert clock.stamp("t") == ahead + 2
    assert clock.stamp("other") < ahead  # other threads keep this host's clock
    clock.observe("t", 5)  # older news changes nothing
    assert clock.stamp("t") == ahead + 3
    small = ThreadClock(max_threads=2)
    for t in ("a", "b", "c"):
        small.observe(t, ahead)
    assert small.floor("a") is None and small.floor("c") == ahead


# -- turns hopping between replicas ------------------------------------------------


async def test_each_turn_reads_the_turn_before_it_on_another_replica(anyio_backend: str) -> None:
    async with loopback() as srv:
        async with saver_for(srv) as a, saver_for(srv) as b:
            assert await messages(a, "t") is None  # "no such thread", not kept
            await turn(b, "t", "one")
            await turn(a, "t", "two")  # reads b's turn
            await turn(b, "t", "three")  # b read the thread before: no stale answer
            await turn(a, "t", "four")
            assert await messages(b, "t") == ["one", "two", "three", "four"]
            ids = [x.checkpoint["id"] async for x in b.alist(cfg("t"))]
            parents = [x.parent_config["configurable"]["checkpoint_id"] async for x in b.alist(cfg("t")) if x.parent_config]
            assert len(ids) == 4 and len(set(parents)) == 3, "one chain, no fork"
            assert a.engine.stats()["forks"] == b.engine.stats()["forks"] == 0


async def test_sticky_replicas_serve_what_they_cached(anyio_backend: str) -> None:
    """The documented price of consistency="sticky": a replica answers from its cache
    what another replica has since changed (route each thread to one replica)."""
    async with loopback() as srv:
        async with saver_for(srv, consistency="sticky") as a, saver_for(srv) as b:
            await turn(a, "t", "one")
            await a.flush()  # (its default durability returns before ingestion)
            assert await messages(a, "t") == ["one"]
            await turn(b, "t", "two")
            assert await messages(a, "t") == ["one"]  # stale, as documented
            assert await messages(b, "t") == ["one", "two"]


async def test_a_deletion_holds_on_every_replica(anyio_backend: str) -> None:
    async with loopback() as srv:
        async with saver_for(srv) as a, saver_for(srv) as b:
            for i in range(3):
                await turn(a if i % 2 else b, "t", f"old {i}")
            assert await messages(b, "t") == ["old 0", "old 1", "old 2"]
            await a.adelete_thread("t")
            assert await messages(b, "t") is None
            await turn(b, "t", "new 0")  # the chat goes on after a reset, elsewhere
            await turn(a, "t", "new 1")
        async with saver_for(srv) as fresh:
            assert await messages(fresh, "t") == ["new 0", "new 1"]
            assert len([x async for x in fresh.alist(cfg("t"))]) == 2


@pytest.mark.parametrize("ahead", ["deleter", "writer"])
async def test_what_a_deletion_covers_does_not_follow_host_clocks(ahead: str, anyio_backend: str) -> None:
    """A replica whose clock runs 30 s ahead stamps the thread 30 s ahead (its stamps
    are its clock): raising its clock's floor for the thread is exactly that."""
    async with loopback() as srv:
        async with saver_for(srv) as a, saver_for(srv) as b:
            skewed = a if ahead == "deleter" else b
            skewed.engine.clock.observe("t", now_us() + 30_000_000)
            await turn(b, "t", "old 0")
            await turn(b, "t", "old 1")
            await a.adelete_thread("t")  # covers what b wrote, whatever the clocks
            assert await messages(b, "t") is None
            await turn(b, "t", "new 0")  # written after the deletion: visible everywhere
            assert await messages(a, "t") == ["new 0"]
        async with saver_for(srv) as fresh:
            assert await messages(fresh, "t") == ["new 0"]


# -- never a partial state ---------------------------------------------------------


async def _orphan(saver: AsyncKustoSaver) -> None:
    """A checkpoint written after a thread's deletion that still names a value the
    deletion removed (what a replica continuing from a stale state writes)."""
    first = empty_checkpoint()
    first["channel_values"] = {"messages": ["old"], "other": "kept"}
    first["channel_versions"] = {"messages": "1", "other": "1"}
    await saver.aput(cfg("t"), first, {}, {"messages": "1", "other": "1"})
    await saver.adelete_thread("t")
    second = empty_checkpoint()
    second["channel_values"] = {"other": "new"}
    second["channel_versions"] = {"messages": "1", "other": "2"}
    await saver.aput(cfg("t", first["id"]), second, {}, {"other": "2"})


async def test_a_checkpoint_missing_a_deleted_value_is_not_returned(tmp_path: Path, anyio_backend: str) -> None:
    path = str(tmp_path / "store.duckdb")
    async with AsyncKustoSaver.embedded(path, **FAST) as saver:
        await _orphan(saver)
        assert await saver.aget_tuple(cfg("t")) is None  # from the overlay
        assert [x async for x in saver.alist(cfg("t"))] == []
    async with AsyncKustoSaver.embedded(path, **FAST) as fresh:
        assert await fresh.aget_tuple(cfg("t")) is None  # from the store
        assert [x async for x in fresh.alist(cfg("t"))] == []


async def test_a_checkpoint_missing_a_deleted_value_is_not_returned_by_kusto(anyio_backend: str) -> None:
    async with loopback() as srv:
        async with saver_for(srv) as a, saver_for(srv) as b:
            await _orphan(a)
            assert await b.aget_tuple(cfg("t")) is None
            assert [x async for x in b.alist(cfg("t"))] == []


# -- forks ---------------------------------------------------------------------------


def _fork_query() -> str:
    blocks = re.findall(r"```kql\n(.*?)```", DOCS.read_text(), re.S)
    assert blocks, f"{DOCS} shows how to find forked threads"
    return blocks[0]


async def test_forks_are_counted_and_can_be_found(anyio_backend: str) -> None:
    async with loopback() as srv:
        async with saver_for(srv) as a, saver_for(srv) as b:
            first = await turn(a, "t", "one")
            # both replicas serve the same thread at once: two children of one parent
            latest_a = await a.aget_tuple(cfg("t"))
            latest_b = await b.aget_tuple(cfg("t"))
            assert latest_a and latest_b and latest_a.checkpoint["id"] == latest_b.checkpoint["id"] == first
            for saver, text in ((a, "from a"), (b, "from b")):
                c = empty_checkpoint()
                c["channel_values"] = {"messages": ["one", text]}
                c["channel_versions"] = {"messages": saver.get_next_version("1", None)}
                await saver.aput(cfg("t", first), c, {}, dict(c["channel_versions"]))
            await a.aget_tuple(cfg("t"))
            await b.aget_tuple(cfg("t"))
            # whichever wrote the older sibling sees the newer one beside it
            assert a.engine.stats()["forks"] + b.engine.stats()["forks"] == 1
            # a put from an older parent (time travel) forks too, and is counted at once
            await turn(a, "u", "one")
            second = await turn(a, "u", "two")
            assert second
            c = empty_checkpoint()
            c["channel_values"] = {"messages": ["one", "again"]}
            c["channel_versions"] = {"messages": a.get_next_version("1", None)}
            one = [x async for x in a.alist(cfg("u"))][-1].checkpoint["id"]
            before = a.engine.stats()["forks"]
            await a.aput(cfg("u", one), c, {}, dict(c["channel_versions"]))
            assert a.engine.stats()["forks"] == before + 1
        with KustoClient(srv.kcsb()) as client:
            rows = client.execute_query(DB, _fork_query()).primary_results[0].to_dict()["data"]
        forked = sorted(r["thread_id"] for r in rows)
        assert forked == ["t", "u"], rows


async def test_fork_query_on_the_embedded_store(anyio_backend: str) -> None:
    async with AsyncKustoSaver.embedded(":memory:", **FAST) as saver:
        first = await turn(saver, "t", "one")
        await turn(saver, "t", "two")
        await turn(saver, "calm", "one")
        c = empty_checkpoint()
        c["channel_values"] = {"messages": ["one", "other"]}
        c["channel_versions"] = {"messages": saver.get_next_version("1", None)}
        await saver.aput(cfg("t", first), c, {}, dict(c["channel_versions"]))
        await saver.flush()
        rows = await saver.backend.query(_fork_query(), {})
        assert sorted(r["thread_id"] for r in rows) == ["t"]
        assert saver.engine.stats()["forks"] == 1


# -- what a read costs ----------------------------------------------------------------


async def test_shared_reads_ask_the_backend_every_time(anyio_backend: str) -> None:
    async with loopback() as srv:
        async with saver_for(srv) as a:
            await turn(a, "t", "one")
            before = srv.counts.get("query", 0)
            for _ in range(5):
                assert await messages(a, "t") == ["one"]
            per_read = (srv.counts.get("query", 0) - before) / 5
            assert per_read == 2  # the latest checkpoint, then its values
        async with saver_for(srv, consistency="sticky") as s:
            assert await messages(s, "t") == ["one"]
            before = srv.counts.get("query", 0)
            for _ in range(5):
                assert await messages(s, "t") == ["one"]
            assert srv.counts.get("query", 0) == before  # answered from the cache


async def test_a_shared_turn_is_in_the_backend_when_it_returns(anyio_backend: str) -> None:
    async with loopback() as srv:
        async with saver_for(srv) as a:
            await turn(a, "t", "one")
            with KustoClient(srv.kcsb()) as client:
                rows = client.execute_query(DB, "Checkpoints | count").primary_results[0].to_dict()["data"]
            assert rows[0]["Count"] == 1  # no flush needed: another replica sees it now


# -- reads that grow ------------------------------------------------------------------


async def test_reads_stay_inside_kusto_result_limits(anyio_backend: str) -> None:
    """Kusto stops a result at 500,000 records or 64 MB with a partial-query failure
    (the loopback, with both limits lowered, does the same): a long thread with large
    values still lists and reads whole."""
    async with loopback(max_result_records=60, max_result_bytes=400_000) as srv:
        with KustoClient(srv.kcsb()) as client:
            client.execute_mgmt(DB, ".ingest inline into table Tombstones with (format=multijson) <| "
                                + "".join('{"scope": "run", "run_id": "r%d"}' % i for i in range(61)))
            with pytest.raises(Exception, match="E_QUERY_RESULT_SET_TOO_LARGE"):
                client.execute_query(DB, "Tombstones")
        async with saver_for(srv) as saver:
            parent: str | None = None
            for step in range(150):
                c = empty_checkpoint()
                version = saver.get_next_version(step, None)
                c["channel_values"] = {"messages": [f"{step}:" + "x" * 4000]}
                c["channel_versions"] = {"messages": version}
                await saver.aput(cfg("long", parent), c, {"step": step}, {"messages": version})
                parent = c["id"]
        async with saver_for(srv) as fresh:
            got = [x async for x in fresh.alist(cfg("long"))]
            assert [x.metadata["step"] for x in got] == list(range(149, -1, -1))
            assert all(x.checkpoint["channel_values"]["messages"][0].startswith(f"{x.metadata['step']}:") for x in got)
            latest = await fresh.aget_tuple(cfg("long"))
            assert latest is not None and latest.metadata["step"] == 149
            page = [x async for x in fresh.alist(cfg("long"), before=cfg("long", got[10].checkpoint["id"]), limit=3)]
            assert [x.metadata["step"] for x in page] == [138, 137, 136]


FILTERS = [
    {"source": "loop"},
    {"step": 3},
    {"source": "input", "step": 0},
    {"flag": True},
    {"flag": False},
    {"note": None},
    {"nested": {"a": [1, 2]}},
    {"step": "3"},
    {"missing": "x"},
    {"it's": 'say "hi"'},
]


async def _filtered(saver: Any, reference: Any) -> None:
    for step in range(6):
        cid = str(uuid6(clock_seq=step))
        for s in (saver, reference):
            c = empty_checkpoint()
            c["id"] = cid
            meta = {"source": "input" if step % 3 == 0 else "loop", "step": step, "flag": step % 2 == 0,
                    "nested": {"a": [1, 2]} if step == 4 else {"a": []}, "it's": 'say "hi"' if step == 5 else "no"}
            if step == 2:
                meta["note"] = None
            await s.aput(cfg("f"), c, meta, {})
    for flt in FILTERS:
        want = [x.checkpoint["id"] async for x in reference.alist(cfg("f"), filter=flt)]
        got = [x.checkpoint["id"] async for x in saver.alist(cfg("f"), filter=flt)]
        assert sorted(got) == sorted(want) and len(got) == len(want), flt
        got = [x.checkpoint["id"] async for x in saver.alist(cfg("f"), filter=flt, limit=1)]
        assert got == want[:1], flt


async def test_metadata_filters_are_evaluated_by_the_backend(anyio_backend: str) -> None:
    from langgraph.checkpoint.memory import InMemorySaver

    async with loopback() as srv:
        async with saver_for(srv) as saver:
            await _filtered(saver, InMemorySaver())
        sent = [r for r in srv.requests if r.route == "query" and "mv-expand" in str(r.body)]
        assert sent, "list(filter=...) asks the backend to match the metadata"


async def test_metadata_filters_on_the_embedded_store(anyio_backend: str) -> None:
    from langgraph.checkpoint.memory import InMemorySaver

    async with AsyncKustoSaver.embedded(":memory:", **FAST) as saver:
        await _filtered(saver, InMemorySaver())
        await saver.flush()
    async with AsyncKustoSaver.embedded(":memory:", **FAST) as saver:
        await _filtered(saver, InMemorySaver())  # (from the overlay, then the store)
