"""Agent state in KQL: the stored functions provision.kql creates, and the saver's
threads() / thread_history() / runs() / forks() / storage() / expiring().

One known workload of real LangGraph graphs (a finished run, a failed run, an interrupt
then its resume, a subgraph, a fork made by update_state, a deleted thread, a pruned
thread, a deleted run) is written once per store; every function's answer is checked
exactly against what the graphs did (LangGraph's own get_state_history is the oracle
for histories). The same answers come from the embedded store, from the stored
definitions run through duckdb-kql, and from the Kusto backend on the loopback endpoint
(through the real SDK), where a second replica asks.
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path
from typing import Any

import duckdb_kql
import pytest
from langgraph.types import Command

from langgraph.checkpoint.kusto import AsyncKustoSaver, KustoSaver
from langgraph.checkpoint.kusto.engine import agent_state
from langgraph.checkpoint.kusto.engine.errors import ConfigError
from langgraph.checkpoint.kusto.loadtests.agent_dashboard import pipeline, with_subgraph

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kql_checker import (  # noqa: E402
    NODE_MISSING_REASON,
    check_kql,
    errors,
    format_diagnostics,
    node_available,
    provision_commands,
)
from kusto_loopback import LoopbackKusto  # noqa: E402

from langgraph.checkpoint.kusto.engine.backends.kusto import KustoBackend  # noqa: E402

pytestmark = pytest.mark.anyio

FAST = {"flush_interval": 0.01, "retry_backoff": 0.01, "retry_backoff_max": 0.05}
DB = "agents"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # LangGraph runs on asyncio


# --------------------------------------------------------------------------- the workload


def run_cfg(thread: str, run: str | None = None, checkpoint_id: str | None = None) -> dict[str, Any]:
    conf: dict[str, Any] = {"thread_id": thread}
    if checkpoint_id:
        conf["checkpoint_id"] = checkpoint_id
    out: dict[str, Any] = {"configurable": conf}
    if run:
        out["metadata"] = {"run_id": run}
    return out


async def write_workload(saver: AsyncKustoSaver) -> dict[str, Any]:
    """Write the workload; returns what the checks need (LangGraph's own histories)."""
    await pipeline(saver).ainvoke({"log": ["in"]}, run_cfg("done", "r-done"))
    with pytest.raises(RuntimeError):
        await pipeline(saver, fail=True).ainvoke({"log": ["in"]}, run_cfg("failed", "r-fail"))
    await pipeline(saver, ask=True).ainvoke({"log": ["in"]}, run_cfg("asked", "r-ask"))
    await pipeline(saver, ask=True).ainvoke(Command(resume="yes"), run_cfg("asked", "r-resume"))
    await with_subgraph(saver).ainvoke({"log": ["in"]}, run_cfg("nested", "r-nested"))
    # a fork: update_state on the checkpoint after "plan" branches the history there
    forked = pipeline(saver)
    await forked.ainvoke({"log": ["in"]}, run_cfg("forked", "r-fork"))
    after_a = [s async for s in forked.aget_state_history(run_cfg("forked")) if s.metadata["step"] == 1][0]
    await forked.aupdate_state(after_a.config, {"log": ["edited"]})
    # gone, pruned, and a thread whose first run is deleted
    await pipeline(saver).ainvoke({"log": ["in"]}, run_cfg("gone", "r-gone"))
    await saver.adelete_thread("gone")
    await pipeline(saver).ainvoke({"log": ["in"]}, run_cfg("pruned", "r-prune"))
    await saver.aprune(["pruned"], strategy="keep_latest")
    await pipeline(saver).ainvoke({"log": ["in"]}, run_cfg("rerun", "r-first"))
    await pipeline(saver).ainvoke({"log": ["again"]}, run_cfg("rerun", "r-second"))
    await saver.adelete_for_runs(["r-first"])
    histories = {}
    graph = pipeline(saver)
    for thread in ("done", "failed", "asked", "nested", "forked", "pruned", "rerun"):
        histories[thread] = [s async for s in graph.aget_state_history(run_cfg(thread))]
    return {"histories": histories, "fork_point": after_a.config["configurable"]["checkpoint_id"]}


#: thread -> (checkpoints in every namespace, namespaces, root loop steps, runs)
EXPECTED_THREADS = {
    # input, then one per super-step: __start__, plan, check, act
    "done": (5, 1, 4, 1),
    # input, __start__, plan; check raised: no checkpoint after it
    "failed": (3, 1, 2, 1),
    # input, __start__, plan (interrupted in check); resumed: check, act
    "asked": (5, 1, 4, 2),
    # root: input, __start__, route, tools; the subgraph: its input, __start__, tool
    "nested": (7, 2, 3, 1),
    # a finished run, and update_state's checkpoint (source "update", no run)
    "forked": (6, 1, 4, 1),
    # keep_latest keeps the newest checkpoint
    "pruned": (1, 1, 1, 1),
    # the second run only: its input, then __start__, plan, check, act
    "rerun": (5, 1, 4, 1),
}

#: (thread, run) -> (checkpoints, root loop steps, outcome)
EXPECTED_RUNS = {
    ("done", "r-done"): (5, 4, "ok"),
    ("failed", "r-fail"): (3, 2, "error"),
    ("asked", "r-ask"): (3, 2, "interrupted"),
    ("asked", "r-resume"): (2, 2, "ok"),
    ("nested", "r-nested"): (7, 3, "ok"),
    ("forked", "r-fork"): (5, 4, "ok"),
    ("pruned", "r-prune"): (1, 1, "ok"),
    ("rerun", "r-second"): (5, 4, "ok"),
}


def check_answers(answers: dict[str, Any], written: dict[str, Any], ttl: dt.timedelta) -> None:
    threads = {r["thread_id"]: r for r in answers["threads"]}
    assert set(threads) == set(EXPECTED_THREADS)  # "gone" is gone
    for tid, (checkpoints, namespaces, steps, runs) in EXPECTED_THREADS.items():
        row = threads[tid]
        assert (row["checkpoints"], row["namespaces"], row["steps"], row["runs"]) == (checkpoints, namespaces, steps, runs), tid
        assert row["first_at"] <= row["last_at"] and row["bytes"] > 0
    lasts = [r["last_at"] for r in answers["threads"]]
    assert lasts == sorted(lasts, reverse=True)  # most recently active first

    runs = {(r["thread_id"], r["run_id"]): r for r in answers["runs"]}
    assert {k: (r["checkpoints"], r["steps"], r["outcome"]) for k, r in runs.items()} == EXPECTED_RUNS
    for r in runs.values():
        assert r["duration"] == r["ended_at"] - r["started_at"] >= dt.timedelta(0)

    # every root-namespace history is LangGraph's own, oldest first
    for tid, history in written["histories"].items():
        rows = [r for r in answers["history"][tid] if r["checkpoint_ns"] == ""]
        oracle = list(reversed(history))
        assert [r["checkpoint_id"] for r in rows] == [s.config["configurable"]["checkpoint_id"] for s in oracle], tid
        assert [r["step"] for r in rows] == [s.metadata["step"] for s in oracle], tid
        assert [r["source"] for r in rows] == [s.metadata["source"] for s in oracle], tid
        parents = [(s.parent_config or {}).get("configurable", {}).get("checkpoint_id", "") for s in oracle]
        if tid not in ("pruned", "rerun"):  # there the parent rows are gone, the links stay
            assert [r["parent_checkpoint_id"] for r in rows] == parents, tid
    nested = answers["history"]["nested"]
    assert {r["checkpoint_ns"].split(":")[0] for r in nested} == {"", "tools"}
    assert [r["source"] for r in nested if r["checkpoint_ns"]] == ["input", "loop", "loop"]
    # the failed run's last checkpoint holds check's error, the interrupted one check's interrupt
    # and (written by the resuming run) the resume value
    assert "__error__" in answers["history"]["failed"][-1]["write_channels"]
    asked = answers["history"]["asked"]
    assert [r["run_id"] for r in asked] == ["r-ask"] * 3 + ["r-resume"] * 2
    assert {"__interrupt__", "__resume__"} <= set(asked[2]["write_channels"])
    assert asked[-1]["writes"] == 0 and asked[-1]["write_channels"] == []
    for tid, rows in answers["history"].items():
        for r in rows:
            assert r["writes"] >= len(r["write_channels"]), (tid, r)

    forks = answers["forks"]
    assert [(r["thread_id"], r["checkpoint_id"], r["children"]) for r in forks] == [("forked", written["fork_point"], 2)]
    children = {r["checkpoint_id"]: r for r in answers["history"]["forked"] if r["parent_checkpoint_id"] == written["fork_point"]}
    assert forks[0]["child_ids"] == sorted(children)
    assert sorted(r["source"] for r in children.values()) == ["loop", "update"]

    storage = answers["storage"]
    assert {r["thread_id"] for r in storage} == set(EXPECTED_THREADS)
    per_thread: dict[str, int] = {}
    for r in storage:
        per_thread[r["thread_id"]] = per_thread.get(r["thread_id"], 0) + r["bytes"]
        assert r["rows"] > 0 and r["bytes"] >= 0
        assert r["table_name"] in ("Checkpoints", "CheckpointBlobs", "CheckpointWrites")
        assert (r["channel"] == "") == (r["table_name"] == "Checkpoints")
    assert per_thread == {t: r["bytes"] for t, r in threads.items()}
    ck_rows = {r["thread_id"]: r["rows"] for r in storage if r["table_name"] == "Checkpoints"}
    assert ck_rows == {t: v[0] for t, v in EXPECTED_THREADS.items()}
    assert any(r["channel"] == "__error__" for r in storage if r["thread_id"] == "failed")

    expiring = answers["expiring"]
    assert [r["thread_id"] for r in expiring] == [r["thread_id"] for r in sorted(answers["threads"], key=lambda r: (r["last_at"], r["thread_id"]))]
    for r in expiring:
        assert r["last_at"] == threads[r["thread_id"]]["last_at"]
        assert r["expires_at"] == r["last_at"] + ttl


async def ask_everything(saver: AsyncKustoSaver, ttl: dt.timedelta) -> dict[str, Any]:
    return {
        "threads": await saver.athreads(),
        "runs": await saver.aruns(),
        "forks": await saver.aforks(),
        "storage": await saver.astorage(),
        "expiring": await saver.aexpiring(ttl),
        "history": {t: await saver.athread_history(t) for t in (*EXPECTED_THREADS, "gone")},
    }


# --------------------------------------------------------------------------- the functions


def test_provision_creates_every_function_as_written_here() -> None:
    commands = [c for _, c in provision_commands() if c.lstrip().startswith(".create-or-alter function")]
    assert commands == [agent_state.definition(f) for f in agent_state.FUNCTIONS], (
        "provision.kql's functions differ from engine/agent_state.py: replace them with the output of "
        "python -c 'from langgraph.checkpoint.kusto.engine import agent_state as a; print(a.provision_commands())'"
    )
    for f in agent_state.FUNCTIONS:
        assert f'folder = "{agent_state.FOLDER}"' in agent_state.definition(f) and f.doc
        assert f.name.startswith("LangGraph")


@pytest.mark.skipif(not node_available(), reason=NODE_MISSING_REASON)
def test_every_function_parses_and_binds_in_kusto_language() -> None:
    items = [(f"query {f.name}", agent_state.query(f)) for f in agent_state.FUNCTIONS]
    items += [(f"create {f.name}", agent_state.definition(f)) for f in agent_state.FUNCTIONS]
    result = check_kql(items)
    bad = {n: format_diagnostics(t, errors(result[n])) for n, t in items if errors(result[n])}
    assert not bad, bad


def test_a_docstring_with_a_quote_is_refused() -> None:
    f = agent_state.StateFunction("LangGraphX", "", 'say "hi"', "Checkpoints", ("thread_id",))
    with pytest.raises(ValueError, match="plain text"):
        agent_state.definition(f)


async def test_exact_answers_on_the_embedded_store_and_from_the_stored_functions(tmp_path: Path) -> None:
    ttl = dt.timedelta(hours=6)
    path = str(tmp_path / "agents.duckdb")
    async with AsyncKustoSaver.embedded(path, **FAST) as saver:
        written = await write_workload(saver)
        answers = await ask_everything(saver, ttl)
        check_answers(answers, written, ttl)
        assert answers["history"]["gone"] == []
        # the stored definitions, as provision.kql creates them, run through duckdb-kql on
        # the same database and answer the same rows
        con = saver.engine.runtime.backend._cursor()  # type: ignore[union-attr]
        defs = [agent_state.definition(f) for f in agent_state.FUNCTIONS]
        calls = {
            "threads": "LangGraphThreads()", "runs": "LangGraphRuns()", "forks": "LangGraphForks()",
            "storage": "LangGraphStorage()", "expiring": "LangGraphExpiring(6h)",
        }
        for key, call in calls.items():
            f = next(f for f in agent_state.FUNCTIONS if call.startswith(f.name + "("))
            rel = duckdb_kql.kql(con, call, functions=defs)
            rows = agent_state.plain_rows(f, [dict(zip(rel.columns, r)) for r in rel.fetchall()])
            for r in rows:  # dynamic columns come back as JSON text from a raw relation
                if isinstance(r.get("child_ids"), str):
                    r["child_ids"] = __import__("json").loads(r["child_ids"])
            assert rows == answers[key], key
        rel = duckdb_kql.kql(con, 'LangGraphThreadHistory("asked") | count', functions=defs)
        assert rel.fetchall() == [(len(answers["history"]["asked"]),)]


def test_the_sync_saver_answers_the_same_questions() -> None:
    with KustoSaver.embedded(":memory:", ttl=60, **FAST) as saver:
        pipeline(saver).invoke({"log": ["in"]}, run_cfg("t", "r"))
        (row,) = saver.threads()
        assert (row["thread_id"], row["checkpoints"], row["steps"], row["runs"]) == ("t", 5, 4, 1)
        assert [(r["run_id"], r["outcome"]) for r in saver.runs()] == [("r", "ok")]
        assert len(saver.thread_history("t")) == 5 and saver.forks() == []
        assert {r["thread_id"] for r in saver.storage()} == {"t"}
        (exp,) = saver.expiring()  # the saver's own ttl
        assert exp["expires_at"] - exp["last_at"] == dt.timedelta(seconds=60)


async def test_bad_arguments_are_refused_clearly() -> None:
    async with AsyncKustoSaver.embedded(":memory:", **FAST) as saver:
        with pytest.raises(ConfigError, match="needs a ttl"):
            await saver.aexpiring()
        for bad in (-1, 0, float("nan"), "1h", True):
            with pytest.raises(ConfigError, match="ttl"):
                await saver.aexpiring(bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="thread_id"):
            await saver.athread_history(42)  # type: ignore[arg-type]
        assert await saver.athread_history('x" | take 1; .drop table Checkpoints') == []
        assert await saver.athreads() == [] and await saver.aruns() == []


async def test_an_expired_thread_leaves_every_answer() -> None:
    async with AsyncKustoSaver.embedded(":memory:", ttl=0.3, expiry_interval=3600, **FAST) as saver:
        await pipeline(saver).ainvoke({"log": ["in"]}, run_cfg("old", "r-old"))
        await saver.flush()
        import anyio

        await anyio.sleep(0.4)
        await pipeline(saver).ainvoke({"log": ["in"]}, run_cfg("new", "r-new"))
        assert [r["thread_id"] for r in await saver.aexpiring()] == ["old", "new"]
        assert await saver.engine.expire() == 1
        assert [r["thread_id"] for r in await saver.athreads()] == ["new"]
        assert [r["run_id"] for r in await saver.aruns()] == ["r-new"]
        assert await saver.athread_history("old") == []
        assert {r["thread_id"] for r in await saver.astorage()} == {"new"}
        assert [r["thread_id"] for r in await saver.aexpiring()] == ["new"]


# --------------------------------------------------------------------------- on Kusto


async def test_exact_answers_through_the_kusto_sdk_from_another_replica() -> None:
    """provision.kql creates the functions on the endpoint; one replica writes the
    workload, another asks (the functions read the database, not a process's memory);
    the stored functions called by name answer as the saver's methods do."""
    ttl = dt.timedelta(hours=6)
    async with LoopbackKusto(database=DB) as srv:
        report = await KustoBackend(srv.uri, DB).setup(create=True)
        assert report.ok
        uri = srv.uri
        async with AsyncKustoSaver.from_connection_string(cluster_uri=uri, database=DB, **FAST) as writer:
            written = await write_workload(writer)
            await writer.flush()
        async with AsyncKustoSaver.from_connection_string(cluster_uri=uri, database=DB, **FAST) as other:
            answers = await ask_everything(other, ttl)
            check_answers(answers, written, ttl)
            backend = other.engine.runtime.backend  # type: ignore[union-attr]
            stored = await backend.query("LangGraphThreads()", {})
            assert agent_state.plain_rows(agent_state.THREADS, stored) == answers["threads"]
            stored = await backend.query(
                'declare query_parameters(t:string); LangGraphThreadHistory(t)', {"t": "asked"})
            assert agent_state.plain_rows(agent_state.THREAD_HISTORY, stored) == answers["history"]["asked"]
        assert srv.errors == []
