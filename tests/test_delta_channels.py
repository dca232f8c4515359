"""LangGraph 1.2's DeltaChannel (beta) on both savers, and the other parts of
langgraph-checkpoint 4.x parity: ``list({})``, and pending writes in
``writes_sort_key`` order on every read path.

A DeltaChannel stores no value at most checkpoints: LangGraph rebuilds it from the
pending writes on the parent chain back to the nearest ``_DeltaSnapshot``
(``BaseCheckpointSaver.get_delta_channel_history``). Every graph here keeps a plain
``operator.add`` list beside the delta list and writes the same items to both, so
the plain list, which every checkpoint stores whole, is the oracle: after any turn,
fork, replay, prune or copy the two must be equal.
"""

from __future__ import annotations

import operator
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, TypedDict

import anyio
import anyio.to_thread
import pytest
from langgraph.channels.delta import DeltaChannel
from langgraph.checkpoint.base import ERROR, INTERRUPT, BaseCheckpointSaver, empty_checkpoint
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph

from langgraph.checkpoint.kusto import AsyncKustoSaver, KustoSaver
from langgraph.checkpoint.kusto.engine import kql
from langgraph.checkpoint.kusto.engine.backends.embedded import EmbeddedBackend

pytestmark = pytest.mark.anyio

OPTIONS: dict[str, Any] = {"flush_interval": 0.01}
#: rows stay in the overlay (accepted, not ingested) for the whole test
HELD: dict[str, Any] = {"flush_interval": 3600.0, "batch_size": 100_000}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # LangGraph runs on asyncio


class CountingBackend(EmbeddedBackend):
    """The real embedded store, counting the queries it runs."""

    def __init__(self, path: str = ":memory:") -> None:
        super().__init__(path)
        self.queries: list[str] = []

    async def query(self, kql_text: str, params: Any) -> list[dict[str, Any]]:
        self.queries.append(kql_text)
        return await super().query(kql_text, params)


def append(state: list[Any], writes: list[list[Any]]) -> list[Any]:
    out = list(state)
    for w in writes:
        out.extend(w)
    return out


FREQ = 3  # a _DeltaSnapshot every third update: prune has something to keep and something to drop


def build(checkpointer: Any, *, freq: int = FREQ) -> Any:
    """START -> (a, b in parallel) -> call -> END; ``call`` runs a subgraph that keeps
    its own state (``checkpointer=True``: namespace "call") with its own delta list."""

    # the functional form: the annotations are objects here, not strings to evaluate later
    S = TypedDict("S", {"sd": Annotated[list, DeltaChannel(append, snapshot_frequency=freq)],
                        "sp": Annotated[list, operator.add]})

    def s1(s: Any) -> dict[str, Any]:
        item = f"s{len(s['sp'])}"
        return {"sd": [item], "sp": [item]}

    sg = StateGraph(S)
    sg.add_node("s1", s1)
    sg.add_edge(START, "s1")
    sg.add_edge("s1", END)
    sub = sg.compile(checkpointer=True)

    P = TypedDict("P", {"d": Annotated[list, DeltaChannel(append, snapshot_frequency=freq)],
                        "p": Annotated[list, operator.add], "sub_d": list, "sub_p": list}, total=False)

    def a(s: Any) -> dict[str, Any]:
        return {"d": [f"a{len(s['p'])}"], "p": [f"a{len(s['p'])}"]}

    def b(s: Any) -> dict[str, Any]:
        return {"d": [f"b{len(s['p'])}"], "p": [f"b{len(s['p'])}"]}

    async def call(s: Any) -> dict[str, Any]:
        out = await sub.ainvoke({"sd": ["x"], "sp": ["x"]})
        return {"sub_d": out["sd"], "sub_p": out["sp"]}

    def call_sync(s: Any) -> dict[str, Any]:
        out = sub.invoke({"sd": ["x"], "sp": ["x"]})
        return {"sub_d": out["sd"], "sub_p": out["sp"]}

    from langchain_core.runnables import RunnableLambda

    g = StateGraph(P)
    g.add_node("a", a)
    g.add_node("b", b)
    g.add_node("call", RunnableLambda(call_sync, afunc=call))
    g.add_edge(START, "a")
    g.add_edge(START, "b")
    g.add_edge("a", "call")
    g.add_edge("b", "call")
    g.add_edge("call", END)
    return g.compile(checkpointer=checkpointer)


def cfg(thread_id: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread_id}}


def turn(i: int) -> dict[str, Any]:
    return {"d": [f"in{i}"], "p": [f"in{i}"]}


class Driver:
    """One scenario, two savers: AsyncKustoSaver through LangGraph's async API,
    KustoSaver through its sync API (called from a worker thread)."""

    def __init__(self, kind: str, saver: Any, graph: Any) -> None:
        self.kind, self.saver, self.graph = kind, saver, graph

    async def _sync(self, fn: Any, *args: Any, **kw: Any) -> Any:
        return await anyio.to_thread.run_sync(lambda: fn(*args, **kw))

    async def invoke(self, inp: Any, config: Any) -> Any:
        if self.kind == "async":
            return await self.graph.ainvoke(inp, config)
        return await self._sync(self.graph.invoke, inp, config)

    async def state(self, config: Any) -> Any:
        if self.kind == "async":
            return await self.graph.aget_state(config)
        return await self._sync(self.graph.get_state, config)

    async def history(self, config: Any) -> list[Any]:
        if self.kind == "async":
            return [s async for s in self.graph.aget_state_history(config)]
        return await self._sync(lambda: list(self.graph.get_state_history(config)))

    async def update(self, config: Any, values: Any) -> Any:
        if self.kind == "async":
            return await self.graph.aupdate_state(config, values)
        return await self._sync(self.graph.update_state, config, values)

    async def saver_call(self, name: str, *args: Any, **kw: Any) -> Any:
        if self.kind == "async":
            result = getattr(self.saver, name if name == "flush" else "a" + name)(*args, **kw)
            if name == "list":
                return [t async for t in result]
            return await result
        fn = getattr(self.saver, name)
        if name == "list":
            return await self._sync(lambda: list(fn(*args, **kw)))
        return await self._sync(fn, *args, **kw)


@asynccontextmanager
async def opened(kind: str, backend: Any = None, *, freq: int = FREQ, **options: Any) -> AsyncIterator[Driver]:
    backend = backend if backend is not None else EmbeddedBackend(":memory:")
    opts = {**OPTIONS, **options}
    if kind == "async":
        async with AsyncKustoSaver(backend, **opts) as saver:
            yield Driver(kind, saver, build(saver, freq=freq))
    else:
        saver = KustoSaver(backend, **opts)
        await anyio.to_thread.run_sync(saver.__enter__)
        try:
            yield Driver(kind, saver, build(saver, freq=freq))
        finally:
            await anyio.to_thread.run_sync(saver.__exit__, None, None, None)


def same(values: dict[str, Any]) -> None:
    """The delta lists equal their plain twins, and are not trivially empty."""
    assert values["d"] == values["p"], values
    assert values["d"], values
    if "sub_p" in values:
        assert values["sub_d"] == values["sub_p"], values


KINDS = ["async", "sync"]


@pytest.mark.parametrize("kind", KINDS)
async def test_turns_forks_replay_and_subgraph(kind: str) -> None:
    async with opened(kind) as io:
        c = cfg("t")
        for i in range(5):
            out = await io.invoke(turn(i), c)
            same(out)
        st = await io.state(c)
        same(st.values)
        assert st.values["p"][:4] == ["in0", "a1", "b1", "in1"]  # a before b: the writes' order
        assert len(st.values["sub_p"]) == 10  # the subgraph's own state, kept across the 5 turns
        # every checkpoint in the history rebuilds its delta list (a walk each)
        hist = await io.history(c)
        rebuilt = [h.values for h in hist if h.values.get("p")]
        assert len(rebuilt) > 10
        for values in rebuilt:
            assert values.get("d", []) == values["p"]
        # fork: update_state on a checkpoint of turn 2, then run on from the fork
        older = next(h for h in hist if h.values.get("p", [])[-1:] == ["in2"])
        fork = await io.update(older.config, {"d": ["u"], "p": ["u"]})
        out = await io.invoke(turn(9), fork)
        same(out)
        assert out["p"] == ["in0", "a1", "b1", "in1", "a4", "b4", "in2", "u", "in9", "a9", "b9"]
        # the thread's latest checkpoint is now the fork's
        same((await io.state(c)).values)
        assert (await io.state(c)).values["p"] == out["p"]
        # replay from an older checkpoint (no input: re-runs from there)
        before_b = next(h for h in hist if h.next == ("a", "b") and h.values.get("p", [])[-1:] == ["in1"])
        out = await io.invoke(None, before_b.config)
        same(out)
        assert out["p"] == ["in0", "a1", "b1", "in1", "a4", "b4"]  # turn 1 again, nothing after it


@pytest.mark.parametrize("kind", KINDS)
async def test_prune_keep_latest_keeps_the_chain_to_the_snapshot(kind: str) -> None:
    async with opened(kind) as io:
        c, other = cfg("t"), cfg("u")
        for i in range(5):
            await io.invoke(turn(i), c)
        await io.invoke(turn(0), other)
        expected = (await io.state(c)).values
        same(expected)
        before = await io.saver_call("list", c)
        await io.saver_call("prune", ["t"], strategy="keep_latest")
        after = await io.saver_call("list", c)
        # something went (older than the nearest snapshot), the chain to it stayed
        assert 1 < len([t for t in after if t.config["configurable"]["checkpoint_ns"] == ""]) < len(
            [t for t in before if t.config["configurable"]["checkpoint_ns"] == ""]
        )
        assert {t.config["configurable"]["checkpoint_ns"] for t in after} == {"", "call"}
        st = await io.state(c)
        assert st.values == expected  # the delta lists read as before, not []
        out = await io.invoke(turn(5), c)  # and the next turn continues from them
        same(out)
        assert out["p"][: len(expected["p"])] == expected["p"]
        assert len(out["sub_p"]) == len(expected["sub_p"]) + 2
        # the other thread was not touched; pruning again is harmless
        assert len(await io.saver_call("list", other)) > 3
        await io.saver_call("prune", ["t"], strategy="keep_latest")
        same((await io.state(c)).values)
        assert (await io.state(c)).values == out


@pytest.mark.parametrize("kind", KINDS)
async def test_copy_thread_carries_what_the_delta_lists_need(kind: str) -> None:
    async with opened(kind) as io:
        c, copy = cfg("src"), cfg("dst")
        for i in range(4):
            await io.invoke(turn(i), c)
        expected = (await io.state(c)).values
        await io.saver_call("copy_thread", "src", "dst")
        assert (await io.state(copy)).values == expected
        out = await io.invoke(turn(7), copy)
        same(out)
        assert out["p"][: len(expected["p"])] == expected["p"]
        # a pruned source copies as well
        await io.saver_call("prune", ["src"], strategy="keep_latest")
        await io.saver_call("copy_thread", "src", "dst2")
        assert (await io.state(cfg("dst2"))).values == expected
        same(await io.invoke(turn(8), cfg("dst2")))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("held", [False, True], ids=["ingested", "overlay"])
async def test_history_costs_one_backend_query(kind: str, held: bool) -> None:
    backend = CountingBackend()
    async with opened(kind, backend, freq=100, **(HELD if held else {})) as io:
        c = cfg("t")
        for i in range(4):
            await io.invoke(turn(i), c)
        if held:
            assert io.saver.engine.stats()["rows_ingested"] == 0  # every row is in the overlay
        else:
            await io.saver_call("flush")
        latest = (await io.state(c)).config
        for channels in (["d"], ["d", "p", "nothing"]):
            backend.queries.clear()
            ours = await io.saver_call("get_delta_channel_history", config=latest, channels=channels)
            assert backend.queries == [kql.delta_history_query(expiries=False)]  # no ttl, no expiry met
            # the base class's walk: one get_tuple per ancestor, several queries
            backend.queries.clear()
            walked = await anyio.to_thread.run_sync(
                lambda: BaseCheckpointSaver.get_delta_channel_history(io.saver, config=latest, channels=channels)
            )
            assert len(backend.queries) > 4
            assert ours == walked
        values = [v for _, _, v in ours["d"]["writes"]]
        assert sum(values, []) == (await io.state(c)).values["p"]  # no snapshot (freq=100): every write since the root
        # no checkpoint id: the latest; nothing asked: nothing read
        backend.queries.clear()
        assert await io.saver_call("get_delta_channel_history", config=c, channels=["d"]) == {"d": ours["d"]}
        assert await io.saver_call("get_delta_channel_history", config=c, channels=[]) == {}
        assert len(backend.queries) == 1
        # a deleted thread has no history
        await io.saver_call("delete_thread", "t")
        assert await io.saver_call("get_delta_channel_history", config=latest, channels=["d"]) == {"d": {"writes": []}}


@pytest.mark.parametrize("kind", KINDS)
async def test_list_of_an_empty_config_lists_every_thread(kind: str) -> None:
    async with opened(kind) as io:
        await io.invoke(turn(0), cfg("one"))
        await io.invoke(turn(0), cfg("two"))
        everything = await io.saver_call("list", {})
        assert {t.config["configurable"]["thread_id"] for t in everything} == {"one", "two"}
        assert [t.config for t in everything] == [t.config for t in await io.saver_call("list", None)]
        assert len(await io.saver_call("list", {}, limit=2)) == 2
        # InMemorySaver does the same
        mem = InMemorySaver()
        g = build(mem)
        g.invoke(turn(0), cfg("one"))
        g.invoke(turn(0), cfg("two"))
        assert len(list(mem.list({}))) == len(everything)


# -- pending writes in writes_sort_key order ---------------------------------

#: (task_id, task_path, writes), put in this order; several tasks on one path, a
#: push task, writes with no task path (input, update_state), special channels
#: whose idx is negative (WRITES_IDX_MAP)
TASK_WRITES: list[tuple[str, str, list[tuple[str, Any]]]] = [
    ("t-b", "~__pregel_pull, b", [("x", "b0"), (ERROR, "boom"), ("x", "b2")]),
    ("t-z", "~__pregel_pull, a", [("x", "z0")]),
    ("t-a", "~__pregel_pull, a", [("y", "a0"), ("x", "a1"), (INTERRUPT, "stop")]),
    ("t-q", "", [("x", "q0")]),
    ("0-p", "~__pregel_push, 1", [("x", "p0"), (ERROR, "push failed")]),
    ("t-0", "~__pregel_pull, a", [("x", "00")]),
]


async def _fill(io: Driver, thread: str) -> tuple[Any, Any]:
    """A checkpoint with TASK_WRITES, and a child checkpoint (for the history walk)."""
    meta: Any = {"source": "loop", "step": 0, "parents": {}}
    c1 = empty_checkpoint()
    c1["channel_versions"] = {"x": "1", "y": "1"}
    c1["channel_values"] = {"x": "base", "y": "base"}
    cfg1 = await io.saver_call("put", {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}, c1, meta, {"x": "1", "y": "1"})
    for task_id, path, writes in TASK_WRITES:
        await io.saver_call("put_writes", cfg1, writes, task_id, path)
    c2 = empty_checkpoint()
    c2["channel_versions"] = {"x": "2", "y": "2"}
    cfg2 = await io.saver_call("put", cfg1, c2, {**meta, "step": 1}, {"x": "2", "y": "2"})
    return cfg1, cfg2


def _oracle() -> tuple[list[Any], Any]:
    mem = InMemorySaver()
    meta: Any = {"source": "loop", "step": 0, "parents": {}}
    c1 = empty_checkpoint()
    c1["channel_versions"] = {"x": "1", "y": "1"}
    c1["channel_values"] = {"x": "base", "y": "base"}
    cfg1 = mem.put({"configurable": {"thread_id": "m", "checkpoint_ns": ""}}, c1, meta, {"x": "1", "y": "1"})
    for task_id, path, writes in TASK_WRITES:
        mem.put_writes(cfg1, writes, task_id, path)
    c2 = empty_checkpoint()
    c2["channel_versions"] = {"x": "2", "y": "2"}
    cfg2 = mem.put(cfg1, c2, {**meta, "step": 1}, {"x": "2", "y": "2"})
    tup = mem.get_tuple(cfg1)
    assert tup is not None and tup.pending_writes
    return tup.pending_writes, mem.get_delta_channel_history(config=cfg2, channels=["x"])


@pytest.mark.parametrize("kind", KINDS)
async def test_pending_writes_come_back_in_writes_sort_key_order(kind: str, tmp_path: Path) -> None:
    expected, expected_history = _oracle()
    assert expected[0] == ("t-q", "x", "q0")  # no task path first
    assert [w[2] for w in expected[1:5]] == ["00", "stop", "a0", "a1"]  # by task id, then idx (INTERRUPT's is negative)
    db = str(tmp_path / "w.duckdb")

    def latest_of(tid: str) -> Any:
        return {"configurable": {"thread_id": tid, "checkpoint_ns": ""}}

    async with opened(kind, EmbeddedBackend(db), **HELD) as io:
        # the overlay (nothing is ingested), read by id, and by list
        cfg1, cfg2 = await _fill(io, "t")
        assert io.saver.engine.stats()["rows_ingested"] == 0
        assert (await io.saver_call("get_tuple", cfg1)).pending_writes == expected
        listed = await io.saver_call("list", latest_of("t"))
        assert [t.pending_writes for t in listed] == [[], expected]
        assert (await io.saver_call("get_delta_channel_history", config=cfg2, channels=["x"])) == expected_history
        # the view: a read of the latest checkpoint made one, the writes go through it
        meta: Any = {"source": "loop", "step": 0, "parents": {}}
        v1 = await io.saver_call("put", latest_of("v"), empty_checkpoint(), meta, {})
        assert (await io.saver_call("get_tuple", latest_of("v"))).pending_writes == []
        for task_id, path, writes in TASK_WRITES:
            await io.saver_call("put_writes", v1, writes, task_id, path)
        hits = io.saver.engine.stats()["cache_hits"]
        assert (await io.saver_call("get_tuple", latest_of("v"))).pending_writes == expected
        assert io.saver.engine.stats()["cache_hits"] == hits + 1
    # the backend: a fresh saver on the same file has neither overlay nor views
    async with opened(kind, EmbeddedBackend(db)) as io:
        assert (await io.saver_call("get_tuple", cfg1)).pending_writes == expected
        assert (await io.saver_call("get_tuple", latest_of("v"))).pending_writes == expected
        listed = await io.saver_call("list", latest_of("t"))
        assert [t.pending_writes for t in listed] == [[], expected]
        assert (await io.saver_call("get_delta_channel_history", config=cfg2, channels=["x"])) == expected_history
        everything = await io.saver_call("list", None)
        assert [t.pending_writes for t in everything if t.pending_writes] == [expected, expected]


async def test_delta_graph_through_the_kusto_backend() -> None:
    """The history query and the delta-aware prune through the real azure-kusto SDK
    (payloads as base64 text, dynamic columns as JSON) against the loopback endpoint."""
    from kusto_loopback import LoopbackKusto

    from langgraph.checkpoint.kusto.engine.backends.kusto import KustoBackend

    async with LoopbackKusto(database="checkpoints") as srv:
        assert (await KustoBackend(srv.uri, "checkpoints").setup(create=True)).ok
        async with AsyncKustoSaver.from_connection_string(
            cluster_uri=srv.uri, database="checkpoints", flush_interval=0.01
        ) as saver:
            await saver.setup()  # awaited in the engine's loop
            io = Driver("async", saver, build(saver))
            c = cfg("t")
            for i in range(4):
                same(await io.invoke(turn(i), c))
            await saver.flush()
            expected = (await io.state(c)).values
            latest = (await io.state(c)).config
            walked = await anyio.to_thread.run_sync(
                lambda: BaseCheckpointSaver.get_delta_channel_history(saver, config=latest, channels=["d"])
            )
            assert await saver.aget_delta_channel_history(config=latest, channels=["d"]) == walked
            await saver.aprune(["t"], strategy="keep_latest")
            assert (await io.state(c)).values == expected
            same(await io.invoke(turn(4), c))
        assert srv.errors == [], f"loopback bugs: {srv.errors!r}"


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.parametrize("held", [False, True], ids=["ingested", "overlay"])
async def test_history_on_both_anyio_backends(anyio_backend: str, held: bool) -> None:
    """The engine's history read (the FIFO barrier, the query, the overlay merge) on
    asyncio and trio: the same answer as InMemorySaver's for the same calls, before and
    after a checkpoint of the chain is deleted by prune's tombstones."""
    _, expected_history = _oracle()
    backend = CountingBackend()
    async with AsyncKustoSaver(backend, **({**OPTIONS, **HELD} if held else OPTIONS)) as saver:
        io = Driver("async", saver, None)
        _, cfg2 = await _fill(io, "t")
        if not held:
            await saver.flush()
        backend.queries.clear()
        assert await saver.aget_delta_channel_history(config=cfg2, channels=["x"]) == expected_history
        assert backend.queries == [kql.delta_history_query(expiries=False)]  # no ttl, no expiry met
        # no DeltaChannel metadata: keep_latest keeps only the latest, and the walk stops there
        await saver.aprune(["t"], strategy="keep_latest")
        assert await saver.aget_delta_channel_history(config=cfg2, channels=["x"]) == {"x": {"writes": []}}


def test_the_walk_starts_at_the_newest_stamp_not_the_highest_id() -> None:
    """Checkpoint ids come from the writing host's clock; the newest checkpoint is the
    one with the highest stamp (engine/clock.py), as every read orders them."""
    from langgraph.checkpoint.kusto.engine.reads import delta_walk
    from langgraph.checkpoint.kusto.engine.records import BlobRec, CheckpointRec

    def head(cid: str, parent: str, stamp: int, version: str) -> CheckpointRec:
        return CheckpointRec("t", "", cid, parent, "", {"d": version}, {}, b"{}", "", b"", stamp)

    # the second turn ran on a host whose clock (and so ids) runs behind: a lower id
    heads = {"z": head("z", "", 1, "1"), "b": head("b", "z", 2, "2")}
    blobs = {("d", "1"): BlobRec("t", "", "d", "1", "json", b"[]", 1)}
    assert delta_walk(heads, blobs, None, ["d"]) == (["z"], {"d": "z"})
