"""The engine on both anyio backends: read-your-writes, supervision, backpressure,
cancellation and failure paths, on the real embedded store behind a fault-injecting
backend decorator."""

from __future__ import annotations

import random
from typing import Any

import anyio
import pytest
from langgraph.checkpoint.base import empty_checkpoint

from langgraph.checkpoint.kusto import (
    AsyncKustoSaver,
    ConfigError,
    EngineClosedError,
    EngineFailedError,
    IngestError,
    SerializationError,
)
from langgraph.checkpoint.kusto.engine.backends.embedded import EmbeddedBackend
from langgraph.checkpoint.kusto.engine.backends.faulty import FaultPlan, FaultyBackend, Latency

pytestmark = pytest.mark.anyio

FAST = {"flush_interval": 0.005, "retry_backoff": 0.001, "retry_backoff_max": 0.01}


def saver_on(
    plan: FaultPlan | None = None, *, path: str = ":memory:", **options: Any
) -> tuple[AsyncKustoSaver, FaultyBackend]:
    backend = FaultyBackend(EmbeddedBackend(path), plan)
    return AsyncKustoSaver(backend, **{**FAST, **options}), backend


def checkpoint(step: int, value: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    cp = empty_checkpoint()
    cp["channel_values"] = {"messages": value if value is not None else [f"m{i}" for i in range(step + 1)]}
    cp["channel_versions"] = {"messages": f"{step + 1:032}.0"}
    return cp, {"messages": f"{step + 1:032}.0"}  # type: ignore[return-value]


async def put_chain(saver: AsyncKustoSaver, thread: str, steps: int, check_reads: bool = False) -> list[str]:
    cfg: dict[str, Any] = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
    ids = []
    for step in range(steps):
        cp, versions = checkpoint(step)
        cfg = await saver.aput(cfg, cp, {"source": "loop", "step": step}, versions)
        await saver.aput_writes(cfg, [("messages", f"w{step}")], f"task-{step}")
        ids.append(cfg["configurable"]["checkpoint_id"])
        if check_reads:
            latest = await saver.aget_tuple({"configurable": {"thread_id": thread, "checkpoint_ns": ""}})
            assert latest is not None and latest.checkpoint["id"] == cp["id"], "read overtook its write"
            assert latest.checkpoint["channel_values"]["messages"] == cp["channel_values"]["messages"]
            assert latest.pending_writes == [(f"task-{step}", "messages", f"w{step}")]
    return ids


async def stored_ids(saver: AsyncKustoSaver, thread: str) -> list[str]:
    return [t.checkpoint["id"] async for t in saver.alist({"configurable": {"thread_id": thread}})]


async def test_read_your_writes_while_ingestion_lags() -> None:
    plan = FaultPlan(ingest_latency=Latency(0.02, 0.02))
    saver, _ = saver_on(plan)
    async with saver:
        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(put_chain, saver, f"t{i}", 8, True)
        # list() merges the backend with the overlay: every id is there, once
        for i in range(30):
            ids = await stored_ids(saver, f"t{i}")
            assert len(ids) == 8 and len(set(ids)) == 8
        await saver.flush()
        assert saver.engine.stats()["overlay_records"] == 0


async def test_reads_and_writes_reach_an_idle_query_cache_in_the_callers_task(anyio_backend: str, turns: Any) -> None:
    """Direct dispatch: with the cache's mailbox empty and its task waiting for mail, a
    put's records and a cache-hit read are handled in the caller's task. On asyncio such a
    read then completes without letting any other task run (like InMemorySaver); on trio
    waiting for the already-filled reply is still a checkpoint."""
    saver, _ = saver_on(FaultPlan(ingest_latency=Latency(0.05)))
    async with saver:
        await put_chain(saver, "warm", 2, check_reads=True)  # the first read made a view
        # the batches' "ingested" reports reach the cache too (directly when it is idle):
        # let them arrive before counting, else one lands among the reads on a slow host
        await saver.flush()
        cache = saver.engine.runtime.mailboxes["cache"]  # type: ignore[union-attr]
        handled = []  # the messages the cache took in the sender's task
        direct = cache.direct

        def counting(msg: Any) -> bool:
            taken = direct(msg)
            if taken:
                handled.append(type(msg).__name__)
            return taken  # type: ignore[no-any-return]

        cache.direct = counting
        async with anyio.create_task_group() as tg:
            tg.start_soon(turns.run)
            await anyio.sleep(0.01)  # turns.run is running
            hits = saver.engine.stats()["cache_hits"]
            start = turns.count
            cfg = {"configurable": {"thread_id": "warm", "checkpoint_ns": ""}}
            for _ in range(50):
                assert (await saver.aget_tuple(cfg)) is not None
                assert cache.depth() == 0
            yielded = turns.count - start
            tg.cancel_scope.cancel()
        assert saver.engine.stats()["cache_hits"] == hits + 50
        assert handled == ["Read"] * 50
        await put_chain(saver, "warm2", 1)
        # the put's and the write's records (their batch's "ingested" report may follow)
        assert [m for m in handled[50:] if m != "Ingested"] == ["Accept"] * 2
        if anyio_backend == "asyncio":
            assert yielded == 0
        else:
            assert yielded > 0


async def test_a_crash_in_a_directly_dispatched_message_restarts_the_cache_and_loses_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A handler that raises while running in the caller's task crashes the actor in the
    actor's own task, with the message in hand: the supervisor restarts it and redelivers
    the message (a read is answered, a put's records reach the overlay), and the caller's
    send does not raise."""
    from langgraph.checkpoint.kusto.engine.actors.query_cache import QueryCache

    failing = {"_read": 1, "_accept": 1}
    for name in failing:
        original = getattr(QueryCache, name)

        def once(self: Any, msg: Any, _name: str = name, _original: Any = original) -> Any:
            if failing[_name] and anyio.get_current_task().name != "actor:cache":
                failing[_name] -= 1  # only a direct dispatch fails (the caller's task)
                raise RuntimeError(f"injected fault in a direct {_name}")
            return _original(self, msg)

        monkeypatch.setattr(QueryCache, name, once)

    saver, _ = saver_on(FaultPlan(ingest_latency=Latency(0.05)))
    async with saver:
        ids = await put_chain(saver, "t", 3, check_reads=True)
        assert failing == {"_read": 0, "_accept": 0}, "both faults should have been injected"
        assert saver.engine.restarts["cache"] == 2
        assert await stored_ids(saver, "t") == ids[::-1]
        await saver.flush()


async def test_reads_after_reopen_come_from_the_store(tmp_path: Any) -> None:
    path = str(tmp_path / "cp.duckdb")
    async with AsyncKustoSaver.embedded(path, **FAST) as saver:
        ids = await put_chain(saver, "t", 5)
    async with AsyncKustoSaver.embedded(path, **FAST) as saver:
        assert await stored_ids(saver, "t") == ids[::-1]
        latest = await saver.aget_tuple({"configurable": {"thread_id": "t", "checkpoint_ns": ""}})
        assert latest is not None and latest.checkpoint["id"] == ids[-1]
        assert latest.pending_writes == [("task-4", "messages", "w4")]
        hits = saver.engine.stats()["cache_hits"]
        again = await saver.aget_tuple({"configurable": {"thread_id": "t", "checkpoint_ns": ""}})
        assert again == latest
        assert saver.engine.stats()["cache_hits"] == hits + 1


async def test_concurrent_first_reads_share_backend_queries(tmp_path: Any) -> None:
    path = str(tmp_path / "cp.duckdb")
    async with AsyncKustoSaver.embedded(path, **FAST) as saver:
        written = {f"t{i}": await put_chain(saver, f"t{i}", 2) for i in range(40)}
    backend = FaultyBackend(EmbeddedBackend(path), FaultPlan(query_latency=Latency(0.01)))
    async with AsyncKustoSaver(backend, **FAST) as saver:
        got: dict[str, Any] = {}

        async def first_read(tid: str) -> None:
            got[tid] = await saver.aget_tuple({"configurable": {"thread_id": tid, "checkpoint_ns": ""}})

        async with anyio.create_task_group() as tg:
            for tid in [*written, "never-written"]:
                tg.start_soon(first_read, tid)
        assert got.pop("never-written") is None
        for tid, ids in written.items():
            tup = got[tid]
            assert tup is not None and tup.checkpoint["id"] == ids[-1], tid
            assert tup.pending_writes == [("task-1", "messages", "w1")]
            assert tup.checkpoint["channel_values"]["messages"] == ["m0", "m1"]
        # 41 first reads: one query for the checkpoints of every thread waiting, one
        # for the values of each; far fewer than two queries per read
        assert backend.query_calls < 41, backend.query_calls


async def test_a_coalesced_read_skips_an_incomplete_newest_checkpoint(tmp_path: Any) -> None:
    path = str(tmp_path / "cp.duckdb")
    async with AsyncKustoSaver.embedded(path, **FAST) as saver:
        ids = await put_chain(saver, "t", 3)
    # the newest checkpoint's blob is not (yet) in the store, as when another process
    # is half-way through ingesting it
    backend = EmbeddedBackend(path)
    async with AsyncKustoSaver(backend, **FAST) as saver:
        cur = backend._cursor()
        cur.execute("DELETE FROM CheckpointBlobs WHERE version = ?", [f"{3:032}.0"])
        tup = await saver.aget_tuple({"configurable": {"thread_id": "t", "checkpoint_ns": ""}})
        assert tup is not None and tup.checkpoint["id"] == ids[1]
        assert tup.checkpoint["channel_values"]["messages"] == ["m0", "m1"]


@pytest.mark.parametrize("actor", ["cache", "ingestor", "batcher", "deleter"])
async def test_crashed_actor_is_restarted_and_nothing_is_lost(actor: str) -> None:
    saver, backend = saver_on(FaultPlan(ingest_latency=Latency(0.002)))
    async with saver:
        async def crash_soon() -> None:
            await anyio.sleep(0.02)
            await saver.engine.crash(actor)

        async with anyio.create_task_group() as tg:
            tg.start_soon(crash_soon)
            for i in range(10):
                tg.start_soon(put_chain, saver, f"t{i}", 10)
        await saver.flush()
        with anyio.fail_after(5):  # the crash message may still be queued (the deleter is not on flush's path)
            while saver.engine.restarts[actor] < 1:
                await anyio.sleep(0.005)
        assert saver.engine.restarts[actor] == 1
        for i in range(10):
            ids = await stored_ids(saver, f"t{i}")
            assert len(ids) == 10 and len(set(ids)) == 10
    # reopen the same store: every row reached it, no duplicates visible
    assert backend.ingest_calls > 0


class Ledger:
    """What the callers were told was stored: checkpoint ids per thread (oldest
    first) and, per checkpoint, its pending writes."""

    def __init__(self) -> None:
        self.ids: dict[str, list[str]] = {}
        self.writes: dict[str, list[tuple[str, str, Any]]] = {}

    async def chain(self, saver: AsyncKustoSaver, thread: str, steps: int, rng: random.Random) -> None:
        cfg: dict[str, Any] = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
        prev = self.ids.get(thread, [])
        if prev:
            cfg["configurable"]["checkpoint_id"] = prev[-1]
        for step in range(steps):
            cp, versions = checkpoint(step, [f"{thread}/{step}", "v" * rng.randint(0, 500)])
            cfg = await saver.aput(cfg, cp, {"step": step}, versions)
            cid = cfg["configurable"]["checkpoint_id"]
            self.ids.setdefault(thread, []).append(cid)
            writes = [("messages", f"{thread}/{step}/w{j}") for j in range(rng.randint(1, 3))]
            await saver.aput_writes(cfg, writes, f"task-{step}")
            self.writes[cid] = [(f"task-{step}", ch, v) for ch, v in writes]
            if rng.random() < 0.3:  # read-your-writes, under fire
                latest = await saver.aget_tuple({"configurable": {"thread_id": thread, "checkpoint_ns": ""}})
                assert latest is not None and latest.checkpoint["id"] == cid, "read overtook its write"
                assert latest.pending_writes == self.writes[cid]

    async def check(self, saver: AsyncKustoSaver, *, views: bool = True) -> None:
        for thread, ids in self.ids.items():
            got = [t async for t in saver.alist({"configurable": {"thread_id": thread}})]
            assert [t.checkpoint["id"] for t in got] == ids[::-1], thread
            for t in got:
                assert t.pending_writes == self.writes[t.checkpoint["id"]], (thread, t.checkpoint["id"])
            if ids:
                latest = await saver.aget_tuple({"configurable": {"thread_id": thread, "checkpoint_ns": ""}})
                assert latest is not None and latest.checkpoint["id"] == ids[-1]
                assert latest.checkpoint["channel_values"]["messages"][0] == got[0].checkpoint["channel_values"]["messages"][0]


@pytest.mark.parametrize("durability", ["memory", "spool"])
@pytest.mark.parametrize("actor", ["cache", "ingestor", "batcher", "deleter"])
async def test_supervision_under_fire(actor: str, durability: str, tmp_path: Any, anyio_backend: str) -> None:
    """Random crashes of one actor while a load of puts, writes, reads, deletes,
    prunes and copies runs: every accepted checkpoint and write is there exactly
    once, in the overlay and then in the store."""
    rng = random.Random(f"{actor}-{durability}-{anyio_backend}")
    path = str(tmp_path / "fire.duckdb")
    plan = FaultPlan(ingest_latency=Latency(0.0, 0.003), query_latency=Latency(0.0, 0.002), ingest_error_rate=0.05)
    saver, backend = saver_on(
        plan, path=path, durability=durability, max_restarts=10_000, restart_window=1.0, max_retries=20,
        batch_size=20,
    )
    ledger = Ledger()
    crashes = 0
    # a crash cancels the actor's I/O in flight and its next incarnation starts it
    # over; the cache's reads take two queries (~0.1 s each here, under load), so
    # its crashes come further apart, or no read would ever finish (in production
    # the default restart intensity, 5 in 10 s, fails the engine long before that)
    interval = (0.3, 1.0) if actor == "cache" else (0.05, 0.4)
    async with saver:
        done = anyio.Event()

        async def fire() -> None:
            nonlocal crashes
            while not done.is_set():
                await anyio.sleep(rng.uniform(*interval))
                await saver.engine.crash(actor)
                crashes += 1

        async def deleted_then_rewritten(i: int) -> None:
            tid = f"del{i}"
            await ledger.chain(saver, tid, 4, rng)
            await saver.adelete_thread(tid)
            ledger.ids[tid] = []
            assert await stored_ids(saver, tid) == []
            await ledger.chain(saver, tid, 3, rng)

        async def pruned(i: int) -> None:
            tid = f"prune{i}"
            await ledger.chain(saver, tid, 5, rng)
            await saver.aprune([tid])
            ledger.ids[tid] = ledger.ids[tid][-1:]
            assert await stored_ids(saver, tid) == ledger.ids[tid]

        async def copied(i: int) -> None:
            src, dst = f"src{i}", f"dst{i}"
            await ledger.chain(saver, src, 4, rng)
            await saver.acopy_thread(src, dst)
            ledger.ids[dst] = list(ledger.ids[src])
            assert await stored_ids(saver, dst) == ledger.ids[src][::-1]

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                tg.start_soon(fire)
                async with anyio.create_task_group() as load:
                    for i in range(10):
                        load.start_soon(ledger.chain, saver, f"t{i}", 8, random.Random(i))
                    for i in range(3):
                        load.start_soon(deleted_then_rewritten, i)
                        load.start_soon(pruned, i)
                        load.start_soon(copied, i)
                extra = 0
                while crashes < 4:  # keep a load running until the actor crashed a few times
                    extra += 1
                    await ledger.chain(saver, f"extra{extra}", 3, rng)
                done.set()
            await ledger.check(saver)  # overlay + store
    assert crashes >= 4 and saver.engine.restarts[actor] == crashes, (crashes, saver.engine.restarts)
    # a fresh process sees the same from the store alone (duplicates from retries
    # and redelivery, if any, are invisible)
    async with AsyncKustoSaver.embedded(path, **FAST) as fresh:
        await ledger.check(fresh)
        assert fresh.engine.stats()["spool_replayed"] == 0


async def test_rest_for_one_restarts_later_siblings() -> None:
    saver, _ = saver_on(supervision="rest_for_one")
    async with saver:
        await put_chain(saver, "a", 2)
        await saver.engine.crash("ingestor")
        await put_chain(saver, "a2", 2)
        await saver.flush()
        r = saver.engine.restarts
        assert r["ingestor"] == 1
        assert (r["cache"], r["batcher"], r["deleter"]) == (0, 0, 0)
        children = saver.engine._children
        assert children["batcher"].current is not None
        assert len(await stored_ids(saver, "a2")) == 2


async def test_restart_intensity_exceeded_fails_every_caller_loudly() -> None:
    saver, backend = saver_on(
        max_restarts=2, restart_window=60, max_buffered_bytes=64 * 1024, max_batch_bytes=8 * 1024,
        ingest_queue_size=1, ingest_concurrency=1, mailbox_size=2, cell_limit=8 * 1024,
    )
    with pytest.raises(EngineFailedError):
        async with saver:
            await put_chain(saver, "t", 1)
            backend.stall()
            results: list[BaseException] = []

            async def blocked_put(i: int) -> None:
                try:
                    await put_chain(saver, f"b{i}", 50)
                except BaseException as exc:  # noqa: BLE001
                    results.append(exc)

            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    for i in range(5):
                        tg.start_soon(blocked_put, i)
                    await anyio.sleep(0.05)
                    for _ in range(3):
                        await saver.engine.crash("cache")
                        await anyio.sleep(0.01)
            assert results and all(isinstance(e, EngineFailedError) for e in results), results
            with pytest.raises(EngineFailedError):
                await saver.aget_tuple({"configurable": {"thread_id": "t"}})
            raise saver.engine.failed  # type: ignore[misc]


@pytest.mark.parametrize("durability", ["memory", "spool", "ingested"])
async def test_backpressure_bounds_memory_while_the_backend_is_stalled(durability: str, tmp_path: Any) -> None:
    bound = 256 * 1024
    saver, backend = saver_on(
        max_buffered_bytes=bound, max_batch_bytes=32 * 1024, ingest_queue_size=2,
        ingest_concurrency=2, batch_size=50, mailbox_size=8, cell_limit=16 * 1024,
        durability=durability, spool_dir=str(tmp_path / "spool"),
    )
    payload = "x" * 6000
    async with saver:
        backend.stall()
        done = 0
        peak = 0

        async def writer(i: int) -> None:
            nonlocal done
            cfg: dict[str, Any] = {"configurable": {"thread_id": f"t{i}", "checkpoint_ns": ""}}
            for step in range(5):
                cp, versions = checkpoint(step, [payload, step])
                cfg = await saver.aput(cfg, cp, {"step": step}, versions)
                done += 1

        async with anyio.create_task_group() as tg:
            for i in range(100):
                tg.start_soon(writer, i)
            for _ in range(40):
                await anyio.sleep(0.01)
                peak = max(peak, saver.engine.buffered_bytes())
            assert peak <= bound, (peak, bound)
            assert done < 500, "senders must block while the backend is stalled"
            blocked = done
            backend.resume()
        assert done == 500 and blocked < 500
        await saver.flush()
        for i in range(0, 100, 7):
            assert len(await stored_ids(saver, f"t{i}")) == 5
        stats = saver.engine.stats()
        assert stats["buffered_bytes"] == 0
        assert 0 < stats["puts_waited"] <= 500 and stats["put_wait_s"] > 0  # the stalled puts were counted


async def test_the_bound_holds_with_every_stage_past_the_batcher_full() -> None:
    """Stalled: the ingest slots, the ingestor's mailbox, the batch the ingestor holds while
    it waits for a slot and the batcher's share all fill up; together they stay in the bound."""
    bound, batch = 1024 * 1024, 64 * 1024
    saver, backend = saver_on(
        max_buffered_bytes=bound, max_batch_bytes=batch, cell_limit=batch, ingest_queue_size=4,
        ingest_concurrency=4, batch_size=500, mailbox_size=1024, flush_interval=60.0,
    )
    assert saver.options.batcher_buffer_bytes == bound - (4 + 1 + 4) * batch
    async with saver:
        backend.stall()
        peak = 0

        async def writer(i: int) -> None:
            cfg: dict[str, Any] = {"configurable": {"thread_id": f"t{i}", "checkpoint_ns": ""}}
            for step in range(20):
                cp, versions = checkpoint(step, ["y" * 2500])
                cfg = await saver.aput(cfg, cp, {"step": step}, versions)

        async with anyio.create_task_group() as tg:
            for i in range(100):
                tg.start_soon(writer, i)
            quiet, last = 0, -1
            with anyio.fail_after(10):
                while quiet < 20:  # until nothing moves for 0.1 s: every stage is as full as it gets
                    await anyio.sleep(0.005)
                    now = saver.engine.buffered_bytes()
                    quiet, last = (quiet + 1 if now == last else 0), now
                    peak = max(peak, now)
            try:
                assert peak > bound // 2, f"the stages did not fill up ({peak} of {bound})"
                assert peak <= bound, (peak, bound)
            finally:
                backend.resume()
        await saver.flush()


@pytest.mark.parametrize("durability", ["memory", "spool"])
async def test_put_timeout_under_a_stalled_backend_then_every_accepted_row_lands(durability: str, tmp_path: Any) -> None:
    saver, backend = saver_on(
        path=str(tmp_path / "st.duckdb"), durability=durability, spool_dir=str(tmp_path / "spool"), put_timeout=0.2,
        max_buffered_bytes=64 * 1024, max_batch_bytes=8 * 1024, ingest_queue_size=1, ingest_concurrency=1,
        mailbox_size=2, cell_limit=8 * 1024,
    )
    accepted: list[str] = []
    async with saver:
        backend.stall()
        with pytest.raises(TimeoutError, match="put_timeout=0.2"):
            cfg: dict[str, Any] = {"configurable": {"thread_id": "s", "checkpoint_ns": ""}}
            for step in range(200):
                cp, versions = checkpoint(step, ["z" * 3000])
                cfg = await saver.aput(cfg, cp, {}, versions)
                accepted.append(cp["id"])
        assert saver.engine.buffered_bytes() <= 64 * 1024
        assert accepted and len(accepted) < 200
        backend.resume()
        await saver.flush()
        ids = await stored_ids(saver, "s")
        assert set(accepted) <= set(ids) and len(ids) == len(set(ids))
    async with AsyncKustoSaver.embedded(str(tmp_path / "st.duckdb"), **FAST) as s:
        assert set(accepted) <= set(await stored_ids(s, "s"))


async def test_cancelled_put_applies_nothing_and_wedges_nothing() -> None:
    saver, backend = saver_on(max_buffered_bytes=64 * 1024, max_batch_bytes=8 * 1024,
                              ingest_queue_size=1, ingest_concurrency=1, mailbox_size=2,
                              cell_limit=8 * 1024)
    async with saver:
        backend.stall()
        cancelled: list[str] = []

        async def put_many(thread: str) -> None:
            cfg: dict[str, Any] = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
            for step in range(100):
                cp, versions = checkpoint(step, ["y" * 3000])
                try:
                    cfg = await saver.aput(cfg, cp, {"step": step}, versions)
                except anyio.get_cancelled_exc_class():
                    cancelled.append(cp["id"])
                    raise

        with anyio.move_on_after(0.3):
            await put_many("c")
        assert cancelled, "the put should have been blocked and then cancelled"
        backend.resume()
        await saver.flush()
        ids = await stored_ids(saver, "c")
        assert len(ids) == len(set(ids))
        # all or nothing: cancelled while blocked, it is absent; cancelled after
        # the engine took the message, it is there whole
        if cancelled[0] in ids:
            tup = await saver.aget_tuple({"configurable": {"thread_id": "c", "checkpoint_id": cancelled[0], "checkpoint_ns": ""}})
            assert tup is not None and tup.checkpoint["channel_values"]["messages"] == ["y" * 3000]
        else:
            assert len(ids) < 100
        # the engine still serves, and no reply slot is left waiting
        await put_chain(saver, "after", 3)
        await saver.flush()
        assert len(await stored_ids(saver, "after")) == 3
        assert not saver.engine.runtime.replies  # type: ignore[union-attr]


async def test_cancelled_read_leaks_no_reply_slot() -> None:
    saver, _ = saver_on(FaultPlan(query_latency=Latency(0.2)))
    async with saver:
        with anyio.move_on_after(0.05):
            await saver.aget_tuple({"configurable": {"thread_id": "slow"}})
        await saver.aget_tuple({"configurable": {"thread_id": "slow"}})
        assert not saver.engine.runtime.replies  # type: ignore[union-attr]


async def test_transient_failures_are_retried() -> None:
    saver, backend = saver_on(FaultPlan(fail_next_ingests=4, query_error_rate=0.2), max_retries=8)
    async with saver:
        await put_chain(saver, "t", 5)
        await saver.flush()
        assert saver.engine.stats()["retries"] >= 4
        assert len(await stored_ids(saver, "t")) == 5


@pytest.mark.parametrize("retried", [False, True], ids=["first-try", "retried"])
async def test_ingested_records_are_freed_without_the_cyclic_gc(retried: bool) -> None:
    """Once a batch is ingested, its records go with their last reference: nothing of
    the batch may sit in a reference cycle (tenacity's retrying object is one), where
    only a collection frees it and every record and row keeps the GC busy until then."""
    import gc

    from langgraph.checkpoint.kusto.engine.messages import Batch
    from langgraph.checkpoint.kusto.engine.records import BlobRec, CheckpointRec, WriteRec

    saver, _ = saver_on(FaultPlan(fail_next_ingests=2 if retried else 0), max_retries=4)
    async with saver:
        await put_chain(saver, "warm", 2)
        await saver.flush()
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            await put_chain(saver, "t", 10)
            await saver.flush()
            with anyio.fail_after(5):  # the cache takes the batches' outcomes from its mailbox
                while saver.engine.stats()["overlay_records"]:
                    await anyio.sleep(0.005)
            assert (saver.engine.stats()["retries"] > 0) is retried
            gc.collect()
            kept = [type(o).__name__ for o in gc.garbage if isinstance(o, (Batch, BlobRec, CheckpointRec, WriteRec))]
        finally:
            gc.garbage.clear()
            gc.set_debug(0)
            gc.enable()
        assert kept == []


async def test_permanent_failure_reaches_the_caller() -> None:
    saver, backend = saver_on(FaultPlan(fail_next_ingests=100, fail_permanently=True))
    with pytest.raises(IngestError):
        async with saver:
            await put_chain(saver, "lost", 2)
            with pytest.raises(IngestError, match="could not ingest"):
                await saver.flush()
            backend.plan.fail_next_ingests = 0
            # what failed is not shown as stored; the engine keeps serving
            assert await stored_ids(saver, "lost") == []
            await put_chain(saver, "ok", 2)
            await saver.flush()
            assert len(await stored_ids(saver, "ok")) == 2
            backend.plan.fail_next_ingests = 1
            await put_chain(saver, "lost2", 1)
    # leaving the context raised the last failure


async def test_durability_ingested_returns_after_the_backend_has_the_row() -> None:
    saver, backend = saver_on(FaultPlan(ingest_latency=Latency(0.05)), durability="ingested")
    async with saver:
        await put_chain(saver, "t", 2)
        assert await backend.inner.count_rows("Checkpoints") == 2


async def test_bad_input_gives_clear_errors_and_the_engine_keeps_serving() -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        AsyncKustoSaver.embedded(":memory:", batch_size=0)
    with pytest.raises(ConfigError, match="unknown engine option"):
        AsyncKustoSaver.embedded(":memory:", batchsize=10)
    with pytest.raises(ConfigError, match="max_buffered_bytes"):
        AsyncKustoSaver.embedded(":memory:", max_buffered_bytes=1024)
    saver = AsyncKustoSaver.embedded(":memory:", **FAST)
    with pytest.raises(EngineClosedError):
        await saver.aget_tuple({"configurable": {"thread_id": "t"}})
    async with saver:
        cp, versions = checkpoint(0, object())
        with pytest.raises(SerializationError, match="channel 'messages'"):
            await saver.aput({"configurable": {"thread_id": "t"}}, cp, {}, versions)
        with pytest.raises(ConfigError, match="thread_id"):
            await saver.aget_tuple({"configurable": {}})
        with pytest.raises(ConfigError, match="thread_id"):
            await saver.aget_tuple({"configurable": {"thread_id": {"a": 1}}})
        with pytest.raises(ConfigError, match="configurable"):
            await saver.aget_tuple({"thread_id": "t"})
        with pytest.raises(ConfigError, match="strategy"):
            await saver.aprune(["t"], strategy="most")
        with pytest.raises(SerializationError, match="metadata"):
            cp, versions = checkpoint(0)
            await saver.aput({"configurable": {"thread_id": "t"}}, cp, {"bad": object()}, versions)  # type: ignore[dict-item]
        assert await saver.aget_tuple({"configurable": {"thread_id": "t"}}) is None
        await put_chain(saver, "t", 2)
        assert len(await stored_ids(saver, "t")) == 2
    with pytest.raises(EngineClosedError):
        await saver.aput({"configurable": {"thread_id": "t"}}, *checkpoint(0)[:1], {}, {})  # type: ignore[call-arg]


def _bad_calls(saver: AsyncKustoSaver) -> list[tuple[str, type[BaseException], Any]]:
    """(what, expected error, call) for malformed input through every entry point."""
    cp, v = checkpoint(0)
    base: dict[str, Any] = {"configurable": {"thread_id": "victim", "checkpoint_ns": ""}}
    at = {"configurable": {"thread_id": "victim", "checkpoint_ns": "", "checkpoint_id": "c1"}}
    return [
        ("config None", ConfigError, lambda: saver.aput(None, cp, {}, v)),
        ("config list", ConfigError, lambda: saver.aput([base], cp, {}, v)),
        ("configurable str", ConfigError, lambda: saver.aput({"configurable": "victim"}, cp, {}, v)),
        ("thread_id float", ConfigError, lambda: saver.aput({"configurable": {"thread_id": 1.5}}, cp, {}, v)),
        ("thread_id bool", ConfigError, lambda: saver.aput({"configurable": {"thread_id": True}}, cp, {}, v)),
        ("thread_id bytes", ConfigError, lambda: saver.aput({"configurable": {"thread_id": b"victim"}}, cp, {}, v)),
        ("thread_id surrogate", ConfigError, lambda: saver.aput({"configurable": {"thread_id": "v\ud800"}}, cp, {}, v)),
        ("checkpoint_ns int", ConfigError, lambda: saver.aput({"configurable": {"thread_id": "victim", "checkpoint_ns": 0}}, cp, {}, v)),
        ("checkpoint_id dict", ConfigError, lambda: saver.aput({"configurable": {"thread_id": "victim", "checkpoint_id": {}}}, cp, {}, v)),
        ("checkpoint None", ConfigError, lambda: saver.aput(base, None, {}, v)),
        ("checkpoint without id", ConfigError, lambda: saver.aput(base, {"v": 1}, {}, v)),
        ("new_versions list", ConfigError, lambda: saver.aput(base, cp, {}, ["messages"])),
        ("new_versions int key", ConfigError, lambda: saver.aput(base, cp, {}, {1: "1"})),
        ("channel_versions None", ConfigError, lambda: saver.aput(base, {**cp, "channel_versions": None}, {}, v)),
        ("channel_values list", ConfigError, lambda: saver.aput(base, {**cp, "channel_values": [1]}, {}, v)),
        ("metadata None", ConfigError, lambda: saver.aput(base, cp, None, v)),
        ("metadata unencodable", SerializationError, lambda: saver.aput(base, cp, {"x": {1, 2}}, v)),
        ("value unencodable", SerializationError, lambda: saver.aput(base, checkpoint(0, object())[0], {}, v)),
        ("writes without checkpoint_id", ConfigError, lambda: saver.aput_writes(base, [("a", 1)], "t")),
        ("writes None", ConfigError, lambda: saver.aput_writes(at, None, "t")),
        ("writes not pairs", ConfigError, lambda: saver.aput_writes(at, [1, 2], "t")),
        ("write channel int", ConfigError, lambda: saver.aput_writes(at, [(5, 1)], "t")),
        ("task_id int", ConfigError, lambda: saver.aput_writes(at, [("a", 1)], 5)),
        ("task_path int", ConfigError, lambda: saver.aput_writes(at, [("a", 1)], "t", 7)),
        ("one write unencodable", SerializationError, lambda: saver.aput_writes(at, [("a", 1), ("b", object())], "t")),
        ("delete_thread int", ConfigError, lambda: saver.adelete_thread(5)),
        ("delete_for_runs str", ConfigError, lambda: saver.adelete_for_runs("run")),
        ("prune surrogate", ConfigError, lambda: saver.aprune(["\udfff"])),
        ("copy_thread to itself", ConfigError, lambda: saver.acopy_thread("victim", "victim")),
        ("get_tuple None", ConfigError, lambda: saver.aget_tuple(None)),
        ("list before str", ConfigError, lambda: anext(saver.alist(base, before="c1"))),
        ("list limit -1", ConfigError, lambda: anext(saver.alist(base, limit=-1))),
    ]


@pytest.mark.parametrize("durability", ["memory", "spool"])
async def test_bad_input_never_touches_other_threads(durability: str, tmp_path: Any) -> None:
    bound = 256 * 1024
    saver, backend = saver_on(
        durability=durability, spool_dir=str(tmp_path / "spool"), max_buffered_bytes=bound,
        max_batch_bytes=32 * 1024, ingest_queue_size=2, ingest_concurrency=2, cell_limit=16 * 1024,
        batch_size=50,
    )
    async with saver:
        bystanders = {f"b{i}": await put_chain(saver, f"b{i}", 2) for i in range(3)}
        for what, error, call in _bad_calls(saver):
            with pytest.raises(error):
                await call()
            # interleaved with good writes, so a bad row would share their batches
            bystanders["b0"] += await put_chain(saver, "b0", 1)
        # oversized: a value larger than the whole memory bound is admitted alone, in chunks
        huge = "h" * (2 * bound)
        cfg = await saver.aput({"configurable": {"thread_id": "huge", "checkpoint_ns": ""}}, *checkpoint(0, huge)[:1], {}, checkpoint(0)[1])
        # a checkpoint body or metadata over cell_limit cannot be chunked: refused whole
        cp, v = checkpoint(1)
        cp["channel_versions"] = {f"c{i}": "x" * 100 for i in range(300)}
        with pytest.raises(SerializationError, match="cell_limit"):
            await saver.aput(cfg, cp, {}, {})
        with pytest.raises(SerializationError, match="cell_limit"):
            await saver.aput(cfg, checkpoint(1)[0], {"notes": "n" * 20_000}, checkpoint(1)[1])
        # ids: an int is its str(), a UUID too (one thread each way)
        import uuid

        u = uuid.UUID(int=7)
        await saver.aput({"configurable": {"thread_id": 7}}, *checkpoint(0)[:1], {}, checkpoint(0)[1])
        await saver.aput({"configurable": {"thread_id": u}}, *checkpoint(0)[:1], {}, checkpoint(0)[1])
        await saver.flush()  # nothing poisoned a batch: no IngestError
        assert len(await stored_ids(saver, "7")) == 1 and len(await stored_ids(saver, str(u))) == 1
        for tid, ids in bystanders.items():
            assert await stored_ids(saver, tid) == ids[::-1]
        assert await stored_ids(saver, "victim") == []
        saver.engine._children["cache"].current.views.clear()  # type: ignore[union-attr]
        tup = await saver.aget_tuple({"configurable": {"thread_id": "huge", "checkpoint_ns": ""}})
        assert tup is not None and tup.checkpoint["channel_values"]["messages"] == huge
        assert saver.engine.stats()["batches_failed"] == 0


@pytest.mark.parametrize("durability", ["memory", "spool"])
async def test_concurrent_deletes_of_a_thread_being_written_have_a_defined_result(
    durability: str, tmp_path: Any
) -> None:
    """Writers and deleters race on one thread. Defined result: a checkpoint whose
    put returned before a delete started is gone; one whose put started after the
    last delete returned is there; nothing is half there; other threads untouched."""
    path = str(tmp_path / "race.duckdb")
    saver, _ = saver_on(FaultPlan(ingest_latency=Latency(0.0, 0.003)), path=path, durability=durability)
    before_delete: set[str] = set()  # ids acknowledged before some delete started
    after_last: set[str] = set()  # ids whose put started after the last delete returned
    acked: list[str] = []
    deletes_done = anyio.Event()

    async def writer(w: int) -> None:
        cfg: dict[str, Any] = {"configurable": {"thread_id": "hot", "checkpoint_ns": ""}}
        after = 0
        for step in range(1000):  # until a few puts started after the last delete
            late = deletes_done.is_set()
            after += late
            if after > 3:
                break
            cp, _ = checkpoint(step, [f"w{w}/{step}"])
            versions = {"messages": f"{step + 1:028}.{w:04}"}  # one writer's versions are its own
            cp["channel_versions"] = dict(versions)
            cfg = await saver.aput(cfg, cp, {"w": w}, versions)
            await saver.aput_writes(cfg, [("messages", f"w{w}/{step}")], f"task-{w}-{step}")
            acked.append(cp["id"])
            if late:
                after_last.add(cp["id"])
            await anyio.sleep(0.001)

    async def deleter() -> None:
        for _ in range(8):
            await anyio.sleep(0.01)
            snapshot = set(acked)
            await saver.adelete_thread("hot")
            before_delete.update(snapshot)
        deletes_done.set()

    async with saver:
        others = await put_chain(saver, "other", 3)
        async with anyio.create_task_group() as tg:
            tg.start_soon(deleter)
            for w in range(4):
                tg.start_soon(writer, w)
        assert after_last, "some puts should start after the last delete"

        async def check(s: AsyncKustoSaver) -> None:
            tuples = [t async for t in s.alist({"configurable": {"thread_id": "hot"}})]
            ids = [t.checkpoint["id"] for t in tuples]
            assert len(ids) == len(set(ids))
            assert not (set(ids) & before_delete)
            assert after_last <= set(ids)
            for t in tuples:  # whole: its value and its write
                (w, step) = t.metadata["w"], int(t.checkpoint["channel_values"]["messages"][0].split("/")[1])
                assert t.checkpoint["channel_values"]["messages"] == [f"w{w}/{step}"]
                assert t.pending_writes == [(f"task-{w}-{step}", "messages", f"w{w}/{step}")]
            assert await stored_ids(s, "other") == others[::-1]

        await check(saver)
        await saver.flush()
        await check(saver)
    async with AsyncKustoSaver.embedded(path, **FAST) as fresh:
        await check(fresh)


async def test_large_values_are_chunked_and_round_trip() -> None:
    saver, backend = saver_on(cell_limit=100_000)
    big = "é" * 700_000 + "end"
    async with saver:
        cp, versions = checkpoint(0, big)
        cfg = await saver.aput({"configurable": {"thread_id": "big", "checkpoint_ns": ""}}, cp, {}, versions)
        await saver.aput_writes(cfg, [("messages", big[::-1])], "t1")
        await saver.flush()
        assert await backend.inner.count_rows("CheckpointBlobs") > 5
        saver.engine._children["cache"].current.views.clear()  # type: ignore[union-attr]
        tup = await saver.aget_tuple({"configurable": {"thread_id": "big", "checkpoint_ns": ""}})
        assert tup is not None
        assert tup.checkpoint["channel_values"]["messages"] == big
        assert tup.pending_writes[0][2] == big[::-1]


async def test_deletes_take_effect_at_once_and_hold_after_reopen(tmp_path: Any) -> None:
    path = str(tmp_path / "d.duckdb")
    async with AsyncKustoSaver.embedded(path, **FAST) as saver:
        await put_chain(saver, "keep", 3)
        await put_chain(saver, "gone", 3)
        await saver.adelete_thread("gone")
        assert await stored_ids(saver, "gone") == []
        assert await saver.aget_tuple({"configurable": {"thread_id": "gone"}}) is None
        await put_chain(saver, "pruned", 4)
        await saver.aprune(["pruned"])
        assert len(await stored_ids(saver, "pruned")) == 1
        # a thread deleted then written again shows only the new rows
        await put_chain(saver, "gone", 1)
        assert len(await stored_ids(saver, "gone")) == 1
    async with AsyncKustoSaver.embedded(path, **FAST) as saver:
        assert len(await stored_ids(saver, "keep")) == 3
        assert len(await stored_ids(saver, "gone")) == 1
        assert len(await stored_ids(saver, "pruned")) == 1
        # compaction works from the Tombstones table: what the previous process deleted
        # (2 threads' tombstones and the pruned checkpoints) is compacted after the restart
        compacted = await saver.engine.compact()
        assert compacted >= 3
        assert await saver.engine.compact() == compacted  # nothing pending twice
    async with AsyncKustoSaver.embedded(path, **FAST) as saver:
        await put_chain(saver, "x", 3)
        await saver.adelete_thread("x")
        await saver.aprune(["keep"])
        assert await saver.engine.compact() >= 3
        assert await stored_ids(saver, "x") == []
        assert len(await stored_ids(saver, "keep")) == 1


async def test_embedded_store_sets_duckdb_checkpoint_threshold(tmp_path: Any) -> None:
    backend = EmbeddedBackend(str(tmp_path / "t.duckdb"), checkpoint_threshold="64MB")
    await backend.open()
    try:
        got = backend._cursor().execute("SELECT current_setting('checkpoint_threshold')").fetchone()[0]
        assert got.startswith("61.0 MiB") or got.startswith("64"), got
    finally:
        await backend.close()
    for bad in ("64", "1; DROP TABLE Checkpoints", 64):
        with pytest.raises(ValueError, match="checkpoint_threshold"):
            EmbeddedBackend(":memory:", checkpoint_threshold=bad)  # type: ignore[arg-type]


async def test_embedded_store_keeps_payloads_of_every_size_byte_for_byte(tmp_path: Any) -> None:
    # payloads reach DuckDB as an Arrow binary-view array over the bytes themselves:
    # up to 12 bytes inline in the view, longer ones as buffers of their own
    backend = EmbeddedBackend(str(tmp_path / "p.duckdb"))
    await backend.open()
    rng = random.Random(11)
    sizes = [0, 1, 4, 11, 12, 13, 16, 1000, 70_000]
    payloads = [rng.randbytes(n) for n in sizes] + [b"\x00" * 12, b"\x00" * 13]
    rows = [
        {"thread_id": f"t{i}", "checkpoint_ns": "", "channel": "c", "version": "1", "payload_type": "bytes",
         "payload": p, "chunk": 0, "chunks": 1, "written_at": i}
        for i, p in enumerate(payloads)
    ]
    try:
        await backend.ingest("CheckpointBlobs", rows)
        got = backend._cursor().execute('SELECT thread_id, payload FROM "CheckpointBlobs"').fetchall()
    finally:
        await backend.close()
    assert {tid: bytes(p) for tid, p in got} == {f"t{i}": p for i, p in enumerate(payloads)}


@pytest.mark.parametrize("method", ["zstd", "uncompressed", "auto"])
async def test_embedded_store_keeps_payloads_with_the_compression_asked_for(tmp_path: Any, method: str) -> None:
    backend = EmbeddedBackend(str(tmp_path / "c.duckdb"), payload_compression=method)
    await backend.open()
    rows = [
        {"thread_id": f"t{i}", "checkpoint_ns": "", "channel": "c", "version": "1", "payload_type": "bytes",
         "payload": b"the same text again " * 50, "chunk": 0, "chunks": 1, "written_at": i}
        for i in range(2000)
    ]
    try:
        await backend.ingest("CheckpointBlobs", rows)
        cur = backend._cursor()
        cur.execute("CHECKPOINT")
        kinds = {k for (k,) in cur.execute(
            "SELECT DISTINCT compression FROM pragma_storage_info('CheckpointBlobs') WHERE column_name = 'payload' AND segment_type <> 'VALIDITY'"
        ).fetchall()}
        stored = cur.execute('SELECT count(*) FROM "CheckpointBlobs" WHERE payload = ?', [rows[0]["payload"]]).fetchone()[0]
    finally:
        await backend.close()
    assert stored == 2000
    if method == "auto":
        assert kinds and "Uncompressed" not in kinds, kinds  # DuckDB's pick, for very repetitive data
    else:
        assert kinds == {method.upper() if method == "zstd" else "Uncompressed"}, kinds
    with pytest.raises(ValueError, match="payload_compression"):
        EmbeddedBackend(":memory:", payload_compression="lz4")


def test_batch_rows_read_by_column_match_the_row_dicts() -> None:
    # the embedded store reads a batch column by column (Rows.column); every other
    # reader iterates row dicts: both must see the same values, chunked payloads included
    from langgraph.checkpoint.kusto.engine.records import BlobRec, CheckpointRec, Rows, TombstoneRec, WriteRec
    from langgraph.checkpoint.kusto.engine.schema import TABLES_BY_NAME

    rng = random.Random(3)
    cell = 40  # 30 payload bytes per row
    records = {
        "Checkpoints": [CheckpointRec("t", "", "c1", "c0", "r", {"a": "1"}, {"a": "1"}, b'{"x":1}', "msgpack", rng.randbytes(20), 5, 1)],
        "CheckpointBlobs": [BlobRec("t", "", "a", str(n), "msgpack", rng.randbytes(n), 6, 2) for n in (0, 5, 29, 30, 31, 95)],
        "CheckpointWrites": [WriteRec("t", "", "c1", "task", "", i, "a", "msgpack", rng.randbytes(n), 7, 3) for i, n in enumerate((0, 100))],
        "Tombstones": [TombstoneRec("thread", "t", "", "", "", 9, 4)],
    }
    for table, recs in records.items():
        refs = [(r, part, 0) for r in recs for part in range(r.parts(cell))]
        rows = Rows(refs, cell)
        dicts = [r.row(part, cell) for r, part, _ in refs]
        assert list(rows) == dicts and rows[0] == dicts[0] and rows[1:] == dicts[1:] and len(rows) == len(dicts)
        for col in TABLES_BY_NAME[table].column_names:
            assert rows.column(col) == [d[col] for d in dicts], (table, col)
    assert len(Rows([(r, p, 0) for r in records["CheckpointBlobs"] for p in range(r.parts(cell))], cell)) == 1 + 1 + 1 + 1 + 2 + 4


def test_payload_base64_round_trips_and_tolerates_line_breaks() -> None:
    import base64

    from langgraph.checkpoint.kusto.engine.records import b64decode, b64encode, payload_bytes

    data = random.Random(7).randbytes(100_003)
    text = b64encode(data)
    assert text == base64.b64encode(data).decode() and b64decode(text) == data
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))  # not strict base64
    assert b64decode(wrapped) == data
    assert b64encode(b"") == "" and b64decode("") == b""
    # a backend's payload cell: bytes (BLOB) as they are, text (Kusto) decoded, null empty
    assert payload_bytes(text) == data and payload_bytes(data) == data and payload_bytes(None) == b""


async def test_a_store_with_base64_text_payloads_is_converted_to_blobs_on_open(tmp_path: Any) -> None:
    """Stores written before payloads were BLOBs kept base64 text: opening one converts it
    once, chunked values included, and everything reads back as it was written."""
    import duckdb

    path = str(tmp_path / "old.duckdb")
    big = [f"m{i}-" + "z" * 50 for i in range(200)]  # ~11 KB: chunked at cell_limit=4000
    async with AsyncKustoSaver.embedded(path, cell_limit=4000, **FAST) as saver:
        await put_chain(saver, "small", 3)
        cp, versions = checkpoint(0, big)
        cfg = await saver.aput({"configurable": {"thread_id": "big", "checkpoint_ns": ""}}, cp, {}, versions)
        await saver.aput_writes(cfg, [("messages", big)], "task")
    con = duckdb.connect(path)  # back to the earlier layout: base64 VARCHAR payloads
    for table in ("Checkpoints", "CheckpointBlobs", "CheckpointWrites"):
        con.execute(f'ALTER TABLE "{table}" ALTER COLUMN payload TYPE VARCHAR USING to_base64(payload)')
    assert con.execute("SELECT max(chunks) FROM CheckpointBlobs").fetchone()[0] > 1
    con.close()
    async with AsyncKustoSaver.embedded(path, cell_limit=4000, **FAST) as saver:
        tup = await saver.aget_tuple({"configurable": {"thread_id": "big", "checkpoint_ns": ""}})
        assert tup is not None and tup.checkpoint["channel_values"]["messages"] == big
        assert tup.pending_writes == [("task", "messages", big)]
        small = await saver.aget_tuple({"configurable": {"thread_id": "small", "checkpoint_ns": ""}})
        assert small is not None and small.checkpoint["channel_values"]["messages"] == ["m0", "m1", "m2"]
        assert len(await stored_ids(saver, "small")) == 3
    con = duckdb.connect(path)
    types = {r[0] for r in con.execute(
        "SELECT data_type FROM information_schema.columns WHERE column_name = 'payload'").fetchall()}
    con.close()
    assert types == {"BLOB"}


@pytest.mark.parametrize("cell_limit", [4, 7, 1000, 1001, 1002, 1003])
def test_payload_chunks_fit_the_cell_limit_as_base64_and_concatenate(cell_limit: int) -> None:
    """Chunks are cut on 3-byte boundaries: each chunk's base64 text fits cell_limit, and
    the chunks' texts joined are the whole value's text (so Kusto text chunks and BLOB
    chunks reassemble alike)."""
    import base64

    from langgraph.checkpoint.kusto.engine.reads import values_from_rows
    from langgraph.checkpoint.kusto.engine.records import BlobRec

    data = random.Random(cell_limit).randbytes(5_000)
    rec = BlobRec("t", "", "messages", "1", "msgpack", data, 1_700_000_000_000_000)
    n = rec.parts(cell_limit)
    rows = [rec.row(i, cell_limit) for i in range(n)]
    assert b"".join(r["payload"] for r in rows) == data
    texts = [base64.b64encode(r["payload"]).decode() for r in rows]
    assert max(len(t) for t in texts) <= cell_limit
    assert "".join(texts) == base64.b64encode(data).decode()
    assert all(r["chunks"] == n for r in rows) and n == -(-len(data) // (max(3, cell_limit // 4 * 3)))

    def answer(payloads: list) -> dict:
        out = [{**r, "kind_": "blob", "payload": p} for r, p in zip(rows, payloads)]
        random.Random(1).shuffle(out)
        return values_from_rows(out)[0]

    for cells in ([r["payload"] for r in rows], texts):  # BLOB cells, Kusto's text cells
        (got,) = answer(cells).values()
        assert got.complete and got.payload == data
    if n > 1:  # a chunk missing: not visible, never half-read
        (got,) = values_from_rows([{**r, "kind_": "blob"} for r in rows[1:]])[0].values()
        assert not got.complete and got.payload == b""


def test_metadata_json_kept_by_records_is_right_sized() -> None:
    """orjson returns documents in buffers many times their size; a cached record must not keep one."""
    import tracemalloc

    from langgraph.checkpoint.kusto.engine.records import json_bytes

    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        kept = [json_bytes({"source": "loop", "step": i, "parents": {}}) for i in range(500)]
        small = tracemalloc.take_snapshot()
        large = [json_bytes({"note": "x" * 3000, "step": i}) for i in range(100)]
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(s.size_diff for s in small.compare_to(before, "filename"))
    assert grown / len(kept) < 512, grown / len(kept)
    grown = sum(s.size_diff for s in after.compare_to(small, "filename"))
    assert grown / len(large) < 4096, grown / len(large)
    assert kept[3] == b'{"source":"loop","step":3,"parents":{}}'
