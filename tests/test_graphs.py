"""Real compiled LangGraph graphs (no LLM) running on KustoSaver and AsyncKustoSaver.

Each scenario builds a small graph, runs it through LangGraph's public API
(invoke / ainvoke, get_state, get_state_history, update_state, Command(resume=...))
and checks what the checkpointer gave back: accumulated state, history order,
parent links, interrupts, subgraph namespaces, and what survives a reopen.
"""

from __future__ import annotations

import asyncio
import operator
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, StateSnapshot, interrupt

from langgraph.checkpoint.kusto import AsyncKustoSaver, KustoSaver

OPTIONS: dict[str, Any] = {"flush_interval": 0.01}

#: checkpoints one run of the pipeline writes: the input, then one after each of __start__, a, b, c
PIPELINE_CHECKPOINTS_PER_RUN = 5


@pytest.fixture
def anyio_backend() -> str:
    # LangGraph runs on asyncio
    return "asyncio"


def cfg(thread_id: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread_id}}


def checkpoint_id(config: dict[str, Any] | None) -> str | None:
    return None if config is None else config["configurable"].get("checkpoint_id")


def db_file(tmp_path: Path) -> str:
    return str(tmp_path / "checkpoints.duckdb")


# ---------------------------------------------------------------------------
# graph 1: a three-node pipeline with a reducer
# ---------------------------------------------------------------------------


class PipelineState(TypedDict, total=False):
    log: Annotated[list[str], operator.add]  # reducer: every update appends
    n: int  # plain channel: last write wins


def build_pipeline(checkpointer: Any, calls: list[str] | None = None) -> Any:
    def node(name: str) -> Any:
        def run(state: PipelineState) -> dict[str, Any]:
            if calls is not None:
                calls.append(name)
            update: dict[str, Any] = {"log": [name]}
            if name == "a":
                update["n"] = state.get("n", 0) + 1
            return update

        return run

    g = StateGraph(PipelineState)
    for name in ("a", "b", "c"):
        g.add_node(name, node(name))
    g.add_edge(START, "a")
    g.add_edge("a", "b")
    g.add_edge("b", "c")
    g.add_edge("c", END)
    return g.compile(checkpointer=checkpointer)


def pipeline_input(tag: str, run: int) -> dict[str, Any]:
    return {"log": [f"{tag}{run}"]}


def pipeline_final(tag: str, runs: int) -> dict[str, Any]:
    log: list[str] = []
    for i in range(runs):
        log += [f"{tag}{i}", "a", "b", "c"]
    return {"log": log, "n": runs}


def pipeline_history(tag: str, runs: int) -> list[tuple[int, str, tuple[str, ...], dict[str, Any]]]:
    """(step, source, next, values) of every checkpoint after ``runs`` runs, newest first."""
    log: list[str] = []
    n: int | None = None
    out = []

    def snap(step: int, source: str, nxt: tuple[str, ...]) -> None:
        values: dict[str, Any] = {"log": list(log)}
        if n is not None:
            values["n"] = n
        out.append((step, source, nxt, values))

    for i in range(runs):
        base = PIPELINE_CHECKPOINTS_PER_RUN * i  # the run's input checkpoint is step base - 1
        snap(base - 1, "input", ("__start__",))
        log.append(f"{tag}{i}")
        snap(base, "loop", ("a",))
        log.append("a")
        n = (n or 0) + 1
        snap(base + 1, "loop", ("b",))
        log.append("b")
        snap(base + 2, "loop", ("c",))
        log.append("c")
        snap(base + 3, "loop", ())
    return out[::-1]


def assert_chain(history: list[StateSnapshot], thread_id: str) -> None:
    """Newest first, ids strictly decreasing, each parent is the next older snapshot."""
    assert history, "empty history"
    ids = [checkpoint_id(s.config) for s in history]
    assert all(ids), ids
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids), ids
    for newer, older in zip(history, history[1:]):
        assert checkpoint_id(newer.parent_config) == checkpoint_id(older.config)
    assert history[-1].parent_config is None
    for s in history:
        assert s.config["configurable"]["thread_id"] == thread_id
        assert s.config["configurable"]["checkpoint_ns"] == ""


def assert_pipeline_history(history: list[StateSnapshot], thread_id: str, tag: str, runs: int) -> None:
    expected = pipeline_history(tag, runs)
    got = [(s.metadata["step"], s.metadata["source"], s.next, s.values) for s in history]
    assert got == expected
    assert_chain(history, thread_id)


def assert_pipeline_state(state: StateSnapshot, history: list[StateSnapshot], tag: str, runs: int) -> None:
    assert state.values == pipeline_final(tag, runs)
    assert state.next == ()
    assert state.metadata["step"] == PIPELINE_CHECKPOINTS_PER_RUN * runs - 2 and state.metadata["source"] == "loop"
    assert state.config == history[0].config
    assert checkpoint_id(state.parent_config) == checkpoint_id(history[1].config)


# ---------------------------------------------------------------------------
# graph 2: a human-in-the-loop node (interrupt)
# ---------------------------------------------------------------------------


class ApprovalState(TypedDict, total=False):
    log: Annotated[list[str], operator.add]
    answer: str


QUESTION = {"question": "ship it?"}


def build_approval(checkpointer: Any) -> Any:
    def draft(state: ApprovalState) -> dict[str, Any]:
        return {"log": ["draft"]}

    def ask(state: ApprovalState) -> dict[str, Any]:
        answer = interrupt(QUESTION)
        return {"answer": answer, "log": [f"ask:{answer}"]}

    def finish(state: ApprovalState) -> dict[str, Any]:
        return {"log": [f"finish:{state['answer']}"]}

    g = StateGraph(ApprovalState)
    g.add_node("draft", draft)
    g.add_node("ask", ask)
    g.add_node("finish", finish)
    g.add_edge(START, "draft")
    g.add_edge("draft", "ask")
    g.add_edge("ask", "finish")
    g.add_edge("finish", END)
    return g.compile(checkpointer=checkpointer)


APPROVAL_INPUT = {"log": ["start"]}
APPROVAL_WAITING = {"log": ["start", "draft"]}


def approval_done(answer: str) -> dict[str, Any]:
    return {"log": ["start", "draft", f"ask:{answer}", f"finish:{answer}"], "answer": answer}


def assert_interrupted(result: dict[str, Any]) -> None:
    interrupts = result["__interrupt__"]
    assert [i.value for i in interrupts] == [QUESTION]
    assert {k: v for k, v in result.items() if k != "__interrupt__"} == APPROVAL_WAITING


def assert_waiting(state: StateSnapshot) -> None:
    assert state.next == ("ask",)
    assert state.values == APPROVAL_WAITING
    assert [t.name for t in state.tasks] == ["ask"]
    assert [i.value for i in state.tasks[0].interrupts] == [QUESTION]
    assert [i.value for i in state.interrupts] == [QUESTION]


def assert_done(state: StateSnapshot, answer: str) -> None:
    assert state.next == ()
    assert state.values == approval_done(answer)
    assert state.interrupts == ()


# ---------------------------------------------------------------------------
# graph 3: a parent graph with a subgraph node that interrupts
# ---------------------------------------------------------------------------


class SubState(TypedDict, total=False):
    question: str
    answer: str
    notes: Annotated[list[str], operator.add]


class ParentState(TypedDict, total=False):
    log: Annotated[list[str], operator.add]
    question: str
    answer: str


def build_parent_with_subgraph(checkpointer: Any) -> Any:
    def prep(state: SubState) -> dict[str, Any]:
        return {"notes": ["prep"]}

    def ask(state: SubState) -> dict[str, Any]:
        return {"answer": interrupt(state["question"]), "notes": ["asked"]}

    sub = StateGraph(SubState)
    sub.add_node("prep", prep)
    sub.add_node("ask", ask)
    sub.add_edge(START, "prep")
    sub.add_edge("prep", "ask")
    sub.add_edge("ask", END)
    subgraph = sub.compile()  # inherits the parent's checkpointer, under its own namespace

    def before(state: ParentState) -> dict[str, Any]:
        return {"log": ["before"], "question": "color?"}

    def after(state: ParentState) -> dict[str, Any]:
        return {"log": [f"after:{state['answer']}"]}

    g = StateGraph(ParentState)
    g.add_node("before", before)
    g.add_node("sub", subgraph)
    g.add_node("after", after)
    g.add_edge(START, "before")
    g.add_edge("before", "sub")
    g.add_edge("sub", "after")
    g.add_edge("after", END)
    return g.compile(checkpointer=checkpointer)


def assert_parent_waiting_in_subgraph(state: StateSnapshot) -> None:
    assert state.next == ("sub",)
    assert state.values == {"log": ["start", "before"], "question": "color?"}
    assert [t.name for t in state.tasks] == ["sub"]
    task = state.tasks[0]
    assert [i.value for i in task.interrupts] == ["color?"]
    sub_state = task.state
    assert isinstance(sub_state, StateSnapshot), sub_state
    assert sub_state.next == ("ask",)
    assert sub_state.values == {"question": "color?", "notes": ["prep"]}
    ns = sub_state.config["configurable"]["checkpoint_ns"]
    assert ns.startswith("sub:"), ns
    assert [t.name for t in sub_state.tasks] == ["ask"]
    assert [i.value for i in sub_state.tasks[0].interrupts] == ["color?"]


PARENT_DONE = {"log": ["start", "before", "after:blue"], "question": "color?", "answer": "blue"}


def namespaces(tuples: list[Any]) -> set[str]:
    return {t.config["configurable"]["checkpoint_ns"].split(":")[0] for t in tuples}


# ---------------------------------------------------------------------------
# 1 + 2: several runs of a reducer pipeline on one thread
# ---------------------------------------------------------------------------


def test_pipeline_history_sync() -> None:
    with KustoSaver.embedded(":memory:", **OPTIONS) as saver:
        graph = build_pipeline(saver)
        config = cfg("t-sync")
        for i in range(3):
            assert graph.invoke(pipeline_input("in", i), config) == pipeline_final("in", i + 1)

        history = list(graph.get_state_history(config))
        assert len(history) == 3 * PIPELINE_CHECKPOINTS_PER_RUN
        assert_pipeline_history(history, "t-sync", "in", 3)
        assert_pipeline_state(graph.get_state(config), history, "in", 3)

        # a limited history is the newest prefix; the saver's own list agrees with the graph
        assert [s.config for s in graph.get_state_history(config, limit=4)] == [s.config for s in history[:4]]
        assert [t.config for t in saver.list(config)] == [s.config for s in history]


@pytest.mark.anyio
async def test_pipeline_history_async() -> None:
    async with AsyncKustoSaver.embedded(":memory:", **OPTIONS) as saver:
        graph = build_pipeline(saver)
        config = cfg("t-async")
        for i in range(3):
            assert await graph.ainvoke(pipeline_input("in", i), config) == pipeline_final("in", i + 1)

        history = [s async for s in graph.aget_state_history(config)]
        assert len(history) == 3 * PIPELINE_CHECKPOINTS_PER_RUN
        assert_pipeline_history(history, "t-async", "in", 3)
        assert_pipeline_state(await graph.aget_state(config), history, "in", 3)

        limited = [s.config async for s in graph.aget_state_history(config, limit=4)]
        assert limited == [s.config for s in history[:4]]
        assert [t.config async for t in saver.alist(config)] == [s.config for s in history]


# ---------------------------------------------------------------------------
# 3: interrupt() and Command(resume=...)
# ---------------------------------------------------------------------------


#: LangGraph's durability modes: "async" (the default) saves a step's checkpoint in
#: the background while the next step runs, so a task's writes may reach the saver
#: before the checkpoint they belong to; "sync" saves before each step; "exit" at the end
DURABILITIES = ["sync", "async", "exit"]
#: the interrupt scenarios run on several threads: the order in which the saver
#: receives a checkpoint and its writes varies from run to run under "async"
APPROVAL_THREADS = 10


@pytest.mark.parametrize("durability", DURABILITIES)
def test_interrupt_resume_sync(durability: str) -> None:
    with KustoSaver.embedded(":memory:", **OPTIONS) as saver:
        graph = build_approval(saver)
        for i in range(APPROVAL_THREADS):
            config = cfg(f"t-approval-{i}")
            assert_interrupted(graph.invoke(APPROVAL_INPUT, config, durability=durability))
            assert_waiting(graph.get_state(config))

            resumed = graph.invoke(Command(resume=f"yes{i}"), config, durability=durability)
            assert resumed == approval_done(f"yes{i}")
            assert_done(graph.get_state(config), f"yes{i}")
            assert_chain(list(graph.get_state_history(config)), config["configurable"]["thread_id"])


@pytest.mark.anyio
@pytest.mark.parametrize("durability", DURABILITIES)
async def test_interrupt_resume_async(durability: str) -> None:
    async with AsyncKustoSaver.embedded(":memory:", **OPTIONS) as saver:
        graph = build_approval(saver)
        for i in range(APPROVAL_THREADS):
            config = cfg(f"t-approval-{i}")
            assert_interrupted(await graph.ainvoke(APPROVAL_INPUT, config, durability=durability))
            assert_waiting(await graph.aget_state(config))

            resumed = await graph.ainvoke(Command(resume=f"yes{i}"), config, durability=durability)
            assert resumed == approval_done(f"yes{i}")
            assert_done(await graph.aget_state(config), f"yes{i}")
            history = [s async for s in graph.aget_state_history(config)]
            assert_chain(history, config["configurable"]["thread_id"])


# ---------------------------------------------------------------------------
# 4: subgraph with its own checkpoint namespace
# ---------------------------------------------------------------------------


SUBGRAPH_THREADS = 5  # several, for the same reason as APPROVAL_THREADS


def test_subgraph_interrupt_sync() -> None:
    with KustoSaver.embedded(":memory:", **OPTIONS) as saver:
        graph = build_parent_with_subgraph(saver)
        for i in range(SUBGRAPH_THREADS):
            config = cfg(f"t-sub-{i}")
            result = graph.invoke({"log": ["start"]}, config)
            assert [it.value for it in result["__interrupt__"]] == ["color?"]

            assert_parent_waiting_in_subgraph(graph.get_state(config, subgraphs=True))
            # without subgraphs=True the task carries only the subgraph's config
            shallow = graph.get_state(config).tasks[0].state
            assert shallow["configurable"]["checkpoint_ns"].startswith("sub:")
            assert namespaces(list(saver.list(config))) == {"", "sub"}

            assert graph.invoke(Command(resume="blue"), config) == PARENT_DONE
            final = graph.get_state(config, subgraphs=True)
            assert final.next == () and final.values == PARENT_DONE and final.tasks == ()


@pytest.mark.anyio
async def test_subgraph_interrupt_async() -> None:
    async with AsyncKustoSaver.embedded(":memory:", **OPTIONS) as saver:
        graph = build_parent_with_subgraph(saver)
        for i in range(SUBGRAPH_THREADS):
            config = cfg(f"t-sub-{i}")
            result = await graph.ainvoke({"log": ["start"]}, config)
            assert [it.value for it in result["__interrupt__"]] == ["color?"]

            assert_parent_waiting_in_subgraph(await graph.aget_state(config, subgraphs=True))
            assert namespaces([t async for t in saver.alist(config)]) == {"", "sub"}

            assert await graph.ainvoke(Command(resume="blue"), config) == PARENT_DONE
            final = await graph.aget_state(config, subgraphs=True)
            assert final.next == () and final.values == PARENT_DONE and final.tasks == ()


# ---------------------------------------------------------------------------
# 5: interrupt, close, reopen the file with a new saver, resume
# ---------------------------------------------------------------------------


def test_reopen_and_resume_sync(tmp_path: Path) -> None:
    path = db_file(tmp_path)
    config = cfg("t-reopen")
    with KustoSaver.embedded(path, **OPTIONS) as saver:
        graph = build_approval(saver)
        assert_interrupted(graph.invoke(APPROVAL_INPUT, config))
        before = [s.config for s in graph.get_state_history(config)]

    with KustoSaver.embedded(path, **OPTIONS) as saver:
        graph = build_approval(saver)
        assert_waiting(graph.get_state(config))
        assert [s.config for s in graph.get_state_history(config)] == before

        assert graph.invoke(Command(resume="later"), config) == approval_done("later")
        history = list(graph.get_state_history(config))
        assert_done(history[0], "later")
        assert_chain(history, "t-reopen")
        assert [s.config for s in history[-len(before):]] == before


@pytest.mark.anyio
async def test_reopen_and_resume_async(tmp_path: Path) -> None:
    path = db_file(tmp_path)
    config = cfg("t-reopen")
    async with AsyncKustoSaver.embedded(path, **OPTIONS) as saver:
        graph = build_approval(saver)
        assert_interrupted(await graph.ainvoke(APPROVAL_INPUT, config))
        before = [s.config async for s in graph.aget_state_history(config)]

    async with AsyncKustoSaver.embedded(path, **OPTIONS) as saver:
        graph = build_approval(saver)
        assert_waiting(await graph.aget_state(config))
        assert [s.config async for s in graph.aget_state_history(config)] == before

        assert await graph.ainvoke(Command(resume="later"), config) == approval_done("later")
        history = [s async for s in graph.aget_state_history(config)]
        assert_done(history[0], "later")
        assert_chain(history, "t-reopen")
        assert [s.config for s in history[-len(before):]] == before


@pytest.mark.anyio
async def test_reopen_subgraph_across_saver_kinds(tmp_path: Path) -> None:
    """Interrupted inside a subgraph by the sync saver, resumed by the async one."""
    path = db_file(tmp_path)
    config = cfg("t-reopen-sub")
    with KustoSaver.embedded(path, **OPTIONS) as saver:
        graph = build_parent_with_subgraph(saver)
        await asyncio.to_thread(graph.invoke, {"log": ["start"]}, config)

    async with AsyncKustoSaver.embedded(path, **OPTIONS) as saver:
        graph = build_parent_with_subgraph(saver)
        assert_parent_waiting_in_subgraph(await graph.aget_state(config, subgraphs=True))
        assert await graph.ainvoke(Command(resume="blue"), config) == PARENT_DONE


# ---------------------------------------------------------------------------
# 6: time travel: fork from an earlier checkpoint, and update_state
# ---------------------------------------------------------------------------


def snapshot_with_next(history: list[StateSnapshot], nxt: tuple[str, ...]) -> StateSnapshot:
    (found,) = [s for s in history if s.next == nxt]
    return found


def test_time_travel_sync() -> None:
    with KustoSaver.embedded(":memory:", **OPTIONS) as saver:
        calls: list[str] = []
        graph = build_pipeline(saver, calls)
        config = cfg("t-travel")
        graph.invoke(pipeline_input("in", 0), config)
        history = list(graph.get_state_history(config))
        at_b = snapshot_with_next(history, ("b",))

        # replay from "before b": only b and c run again, in a new branch off that checkpoint
        calls.clear()
        assert graph.invoke(None, at_b.config) == pipeline_final("in", 1)
        assert calls == ["b", "c"]
        forked = list(graph.get_state_history(config))
        new, old = forked[:3], forked[3:]
        assert [(s.metadata["source"], s.metadata["step"], s.next) for s in new] == [
            ("loop", 4, ()),
            ("loop", 3, ("c",)),
            ("fork", 2, ("b",)),  # a copy of the checkpoint replayed from
        ]
        assert new[2].values == at_b.values
        assert checkpoint_id(new[2].parent_config) == checkpoint_id(at_b.config)
        for newer, older in zip(new, new[1:]):
            assert checkpoint_id(newer.parent_config) == checkpoint_id(older.config)
        # the old branch is intact
        assert [s.config for s in old] == [s.config for s in history]

        # edit the past: an update on "before b" forks again, and the run continues from it
        edited = graph.update_state(at_b.config, {"log": ["edited"], "n": 10})
        state = graph.get_state(edited)
        assert state.values == {"log": ["in0", "a", "edited"], "n": 10}
        assert state.next == ("b",)
        assert state.metadata["source"] == "update"
        assert checkpoint_id(state.parent_config) == checkpoint_id(at_b.config)
        assert graph.get_state(config).config == state.config  # the update is the newest

        calls.clear()
        assert graph.invoke(None, config) == {"log": ["in0", "a", "edited", "b", "c"], "n": 10}
        assert calls == ["b", "c"]

        # update the latest state as node c: nothing left to run, the next run builds on it
        graph.update_state(config, {"log": ["patched"], "n": 99}, as_node="c")
        latest = graph.get_state(config)
        assert latest.values == {"log": ["in0", "a", "edited", "b", "c", "patched"], "n": 99}
        assert latest.next == ()
        assert graph.invoke(pipeline_input("in", 1), config) == {
            "log": ["in0", "a", "edited", "b", "c", "patched", "in1", "a", "b", "c"],
            "n": 100,
        }


@pytest.mark.anyio
async def test_time_travel_async() -> None:
    async with AsyncKustoSaver.embedded(":memory:", **OPTIONS) as saver:
        calls: list[str] = []
        graph = build_pipeline(saver, calls)
        config = cfg("t-travel")
        await graph.ainvoke(pipeline_input("in", 0), config)
        history = [s async for s in graph.aget_state_history(config)]
        at_c = snapshot_with_next(history, ("c",))

        calls.clear()
        assert await graph.ainvoke(None, at_c.config) == pipeline_final("in", 1)
        assert calls == ["c"]
        forked = [s async for s in graph.aget_state_history(config)]
        new, old = forked[:2], forked[2:]
        assert [(s.metadata["source"], s.metadata["step"], s.next) for s in new] == [
            ("loop", 4, ()),
            ("fork", 3, ("c",)),
        ]
        assert checkpoint_id(new[0].parent_config) == checkpoint_id(new[1].config)
        assert checkpoint_id(new[1].parent_config) == checkpoint_id(at_c.config)
        assert [s.config for s in old] == [s.config for s in history]

        edited = await graph.aupdate_state(at_c.config, {"log": ["edited"]})
        state = await graph.aget_state(edited)
        assert state.values == {"log": ["in0", "a", "b", "edited"], "n": 1}
        assert state.next == ("c",)
        assert checkpoint_id(state.parent_config) == checkpoint_id(at_c.config)

        calls.clear()
        assert await graph.ainvoke(None, config) == {"log": ["in0", "a", "b", "edited", "c"], "n": 1}
        assert calls == ["c"]


# ---------------------------------------------------------------------------
# 7: many threads at once, then everything is in the store after a reopen
# ---------------------------------------------------------------------------

THREADS = 50
RUNS = 5


async def check_threads(graph: Any, saver: AsyncKustoSaver, thread_ids: list[str]) -> None:
    for tid in thread_ids:
        config = cfg(tid)
        state = await graph.aget_state(config)
        assert state.values == pipeline_final(f"{tid}/", RUNS), tid
        assert state.next == ()
        tuples = [t async for t in saver.alist(config)]
        assert len(tuples) == RUNS * PIPELINE_CHECKPOINTS_PER_RUN, tid
    # one full history, checked snapshot by snapshot
    sample = thread_ids[len(thread_ids) // 2]
    history = [s async for s in graph.aget_state_history(cfg(sample))]
    assert_pipeline_history(history, sample, f"{sample}/", RUNS)


@pytest.mark.anyio
async def test_many_threads_concurrently(tmp_path: Path) -> None:
    path = db_file(tmp_path)
    thread_ids = [f"thread-{i:02d}" for i in range(THREADS)]

    async def drive(graph: Any, tid: str) -> None:
        for run in range(RUNS):
            result = await graph.ainvoke(pipeline_input(f"{tid}/", run), cfg(tid))
            assert result == pipeline_final(f"{tid}/", run + 1)

    async with AsyncKustoSaver.embedded(path, **OPTIONS) as saver:
        graph = build_pipeline(saver)
        await asyncio.gather(*(drive(graph, tid) for tid in thread_ids))
        await check_threads(graph, saver, thread_ids)
        await saver.flush()
        assert saver.engine.buffered_bytes() == 0
        everything = [t async for t in saver.alist(None)]
        assert len(everything) == THREADS * RUNS * PIPELINE_CHECKPOINTS_PER_RUN

    async with AsyncKustoSaver.embedded(path, **OPTIONS) as saver:
        graph = build_pipeline(saver)
        await check_threads(graph, saver, thread_ids)


# ---------------------------------------------------------------------------
# 8: delete_thread
# ---------------------------------------------------------------------------


def test_delete_thread_sync(tmp_path: Path) -> None:
    path = db_file(tmp_path)
    keep, drop = cfg("keep"), cfg("drop")

    def check(graph: Any, saver: KustoSaver) -> None:
        gone = graph.get_state(drop)
        assert gone.values == {} and gone.next == () and checkpoint_id(gone.config) is None
        assert list(graph.get_state_history(drop)) == []
        assert saver.get_tuple(drop) is None
        kept = list(graph.get_state_history(keep))
        assert_pipeline_history(kept, "keep", "k", 2)

    with KustoSaver.embedded(path, **OPTIONS) as saver:
        graph = build_pipeline(saver)
        for i in range(2):
            graph.invoke(pipeline_input("k", i), keep)
            graph.invoke(pipeline_input("d", i), drop)
        saver.flush()
        saver.delete_thread("drop")
        check(graph, saver)

    with KustoSaver.embedded(path, **OPTIONS) as saver:
        graph = build_pipeline(saver)
        check(graph, saver)
        # the deleted thread id is reusable and starts from scratch
        assert graph.invoke(pipeline_input("d", 0), drop) == pipeline_final("d", 1)
        assert_pipeline_history(list(graph.get_state_history(drop)), "drop", "d", 1)


@pytest.mark.anyio
async def test_delete_thread_async(tmp_path: Path) -> None:
    path = db_file(tmp_path)
    keep, drop = cfg("keep"), cfg("drop")

    async def check(graph: Any, saver: AsyncKustoSaver) -> None:
        gone = await graph.aget_state(drop)
        assert gone.values == {} and gone.next == () and checkpoint_id(gone.config) is None
        assert [s async for s in graph.aget_state_history(drop)] == []
        assert await saver.aget_tuple(drop) is None
        kept = [s async for s in graph.aget_state_history(keep)]
        assert_pipeline_history(kept, "keep", "k", 2)

    async with AsyncKustoSaver.embedded(path, **OPTIONS) as saver:
        graph = build_pipeline(saver)
        for i in range(2):
            await graph.ainvoke(pipeline_input("k", i), keep)
            await graph.ainvoke(pipeline_input("d", i), drop)
        # delete with rows still buffered (no flush first): the delete must still win
        await saver.adelete_thread("drop")
        await check(graph, saver)

    async with AsyncKustoSaver.embedded(path, **OPTIONS) as saver:
        graph = build_pipeline(saver)
        await check(graph, saver)
