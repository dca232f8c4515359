"""The shipped Azure Data Explorer dashboard over the agent-state functions
(telemetry/dashboards/agent-state-adx.json): its structure holds together, every tile's
query parses and binds in Kusto.Language against the stored functions, every tile's
query answers on the embedded store after a workload of real LangGraph graphs, and the
script that draws docs/agent-state-dashboard.png still draws it."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import sys
import uuid
from pathlib import Path
from typing import Any

import duckdb_kql
import pytest

from langgraph.checkpoint.kusto import AsyncKustoSaver
from langgraph.checkpoint.kusto.engine import agent_state
from langgraph.checkpoint.kusto.loadtests import agent_dashboard as board_mod

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kql_checker import NODE_MISSING_REASON, check_kql, errors, format_diagnostics, node_available  # noqa: E402

#: https://learn.microsoft.com/rest/api/fabric/articles/item-management/definitions/kql-dashboard-definition
SCHEMA = "https://dataexplorer.azure.com/static/d/schema/52/dashboard.json"
TOP_LEVEL = {"$schema", "schema_version", "title", "autoRefresh", "baseQueries", "tiles", "dataSources", "pages",
             "parameters", "queries"}


@pytest.fixture(scope="module")
def board() -> dict[str, Any]:
    return board_mod.load_dashboard()


def _names(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z_]\w*", text))


# --------------------------------------------------------------------------- structure


def test_the_file_is_the_dashboard_format(board: dict[str, Any]) -> None:
    path = Path(__file__).resolve().parent.parent / "telemetry" / "dashboards" / "agent-state-adx.json"
    assert json.loads(path.read_text(encoding="utf-8")) == board
    assert set(board) == TOP_LEVEL
    assert board["$schema"] == SCHEMA and board["schema_version"] == "52"
    (source,) = board["dataSources"]
    assert source["kind"] == "manual-kusto" and source["scopeId"] == "kusto"
    # placeholders the user fills in
    assert "<cluster>" in source["clusterUri"] and source["database"] == "<database>"
    ids = [source["id"], *(p["id"] for p in board["pages"]), *(t["id"] for t in board["tiles"]),
           *(q["id"] for q in board["queries"]), *(p["id"] for p in board["parameters"])]
    assert len(ids) == len(set(ids))
    for i in ids:  # the format wants RFC 4122 ids
        assert str(uuid.UUID(i)) == i


def test_tiles_reference_what_exists(board: dict[str, Any]) -> None:
    pages = {p["id"] for p in board["pages"]}
    sources = {s["id"] for s in board["dataSources"]}
    queries = {q["id"]: q for q in board["queries"]}
    params = {p["variableName"]: p for p in board["parameters"]}
    used_queries = []
    for t in board["tiles"]:
        assert t["pageId"] in pages, t["title"]
        assert t["queryRef"]["kind"] == "query"
        q = queries[t["queryRef"]["queryId"]]
        used_queries.append(q["id"])
        assert q["dataSource"] == {"kind": "inline", "dataSourceId": q["dataSource"]["dataSourceId"]}
        assert q["dataSource"]["dataSourceId"] in sources
        lay = t["layout"]
        assert lay["x"] >= 0 and lay["x"] + lay["width"] <= board_mod.GRID_COLUMNS and lay["width"] >= 4 and lay["height"] >= 4
        # every parameter the text names is declared and listed as used, and only those
        named = {v for v in params if v in _names(q["text"])}
        assert set(q["usedVariables"]) == named, t["title"]
    assert sorted(used_queries) == sorted(queries)  # no orphan query
    assert set(params) == {"_ttl", "_thread"}
    for p in params.values():
        assert p["kind"] == "string" and p["selectionType"] == "freetext" and p["defaultValue"]["kind"] == "value"
    assert params["_ttl"]["defaultValue"]["value"] == "30.00:00:00"


def test_no_tiles_overlap(board: dict[str, Any]) -> None:
    cells: dict[tuple[str, int, int], str] = {}
    for t in board["tiles"]:
        lay = t["layout"]
        for x in range(lay["x"], lay["x"] + lay["width"]):
            for y in range(lay["y"], lay["y"] + lay["height"]):
                key = (t["pageId"], x, y)
                assert key not in cells, (t["title"], cells.get(key))
                cells[key] = t["title"]


def test_every_function_is_on_some_tile(board: dict[str, Any]) -> None:
    called = {f.name for f in agent_state.FUNCTIONS for q in board["queries"] if f"{f.name}(" in q["text"]}
    assert called == {f.name for f in agent_state.FUNCTIONS}
    kinds = {t["visualType"] for t in board["tiles"]}
    assert {"table", "pie", "bar"} <= kinds


# --------------------------------------------------------------------------- Kusto.Language


@pytest.mark.skipif(not node_available(), reason=NODE_MISSING_REASON)
def test_every_tile_parses_and_binds_against_the_stored_functions(board: dict[str, Any]) -> None:
    functions = [{"name": f.name, "parameters": f.params, "body": f.body} for f in agent_state.FUNCTIONS]
    items = [(t.title, board_mod.bound(t)) for t in board_mod.tiles(board)]
    result = check_kql(items, functions=functions)
    bad = {n: format_diagnostics(text, errors(result[n])) for n, text in items if errors(result[n])}
    assert not bad, bad
    # and the checker does know the functions: a wrong column or argument is an error
    wrong = check_kql([("col", "LangGraphThreads() | project nosuch"),
                       ("arity", "LangGraphExpiring()")], functions=functions)
    assert errors(wrong["col"]) and errors(wrong["arity"])


# --------------------------------------------------------------------------- on the embedded store


@pytest.fixture(scope="module")
def answered(board: dict[str, Any]) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        async with AsyncKustoSaver.embedded(":memory:", flush_interval=0.01) as saver:
            done = await board_mod.run_workload(saver, 14)
            con = saver.engine.runtime.backend._cursor()  # type: ignore[union-attr]
            defs = [agent_state.definition(f) for f in agent_state.FUNCTIONS]
            values = {"_ttl": "30.00:00:00", "_thread": done["forked"]}
            results = {}
            for t in board_mod.tiles(board):
                params = {v: values[v] for v in t.variables}
                rel = duckdb_kql.kql(con, board_mod.bound(t), params or None, functions=defs)
                results[t.title] = (list(rel.columns), rel.fetchall())
            return {
                "done": done, "results": results, "threads": await saver.athreads(), "runs": await saver.aruns(),
                "forks": await saver.aforks(), "history": await saver.athread_history(done["forked"]),
            }

    return asyncio.run(run())


def _rows(answered: dict[str, Any], title: str) -> list[dict[str, Any]]:
    columns, rows = answered["results"][title]
    return [dict(zip(columns, r)) for r in rows]


def _tile(board: dict[str, Any], word: str) -> board_mod.Tile:
    (t,) = [t for t in board_mod.tiles(board) if word in t.title]
    return t


def test_every_tile_answers_with_the_columns_its_visual_names(board: dict[str, Any], answered: dict[str, Any]) -> None:
    by_name = {f.name: f for f in agent_state.FUNCTIONS}
    for t in board_mod.tiles(board):
        columns, rows = answered["results"][t.title]
        assert rows, t.title
        opts = t.tile["visualOptions"]
        named = [c for key in ("xColumn", "yColumns", "seriesColumns") for c in board_mod._column(opts, key)]
        assert set(named) <= set(columns), (t.title, named, columns)
        if t.tile["visualType"] == "table":  # a table shows the function's own columns
            (fn,) = [by_name[n] for n in by_name if f"{n}(" in t.text]
            assert set(columns) <= set(fn.columns), t.title


def test_tiles_agree_with_the_savers_answers(board: dict[str, Any], answered: dict[str, Any]) -> None:
    done = answered["done"]
    outcomes = {r["outcome"]: r["runs"] for r in _rows(answered, _tile(board, "outcome").title)}
    expected: dict[str, int] = {}
    for r in answered["runs"]:
        expected[r["outcome"]] = expected.get(r["outcome"], 0) + 1
    assert outcomes == expected and set(outcomes) == {"ok", "error", "interrupted"}

    threads = [r["thread_id"] for r in _rows(answered, _tile(board, "Live threads").title)]
    assert threads == [r["thread_id"] for r in answered["threads"]]
    assert done["deleted"] and not set(done["deleted"]) & set(threads)

    for r in _rows(answered, _tile(board, "expiring").title):
        assert r["expires_at"] - r["last_at"] == dt.timedelta(days=30)

    recent = _rows(answered, _tile(board, "Recent runs").title)
    assert len(recent) == len(answered["runs"])
    starts = [r["started_at"] for r in recent]
    assert starts == sorted(starts, reverse=True)

    (fork,) = _rows(answered, _tile(board, "Forks").title)
    assert (fork["thread_id"], fork["children"]) == (done["forked"], 2) == (answered["forks"][0]["thread_id"], 2)

    history = _rows(answered, _tile(board, "history").title)
    assert [r["checkpoint_id"] for r in history] == [r["checkpoint_id"] for r in answered["history"]]
    assert "update" in {r["source"] for r in history}

    per_channel = _rows(answered, _tile(board, "channel").title)
    assert {r["table_name"] for r in per_channel} == {"Checkpoints", "CheckpointBlobs", "CheckpointWrites"}
    assert "(checkpoint)" in {r["channel"] for r in per_channel}


# --------------------------------------------------------------------------- the picture


def test_the_picture_script_draws_every_tile(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "agent-state-dashboard.png"
    done = board_mod.draw(str(out), 6)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(data) < 300_000
    assert done["forked"] and done["error"] and done["interrupted"]
