"""Draw the shipped Azure Data Explorer agent-state dashboard from a real run, without
Azure Data Explorer.

    python -m langgraph.checkpoint.kusto.loadtests.agent_dashboard [--out docs/agent-state-dashboard.png] [--threads 48]

What it does, so the picture means something:

1. Runs a workload of real LangGraph graphs on the embedded store: ``--threads``
   threads of a three-node pipeline and of a graph with a subgraph; runs that finish,
   runs whose middle node raises, runs that stop at an ``interrupt`` (half of them
   resumed), a second run on some threads, a fork made by ``update_state`` on an
   earlier checkpoint, and a few threads deleted afterwards.
2. Evaluates every tile's own query text from
   ``telemetry/dashboards/agent-state-adx.json`` through duckdb-kql on the store's
   DuckDB connection, with the stored functions registered exactly as
   ``provision.kql`` creates them (:func:`.engine.agent_state.definition`) and the
   dashboard's parameters passed as string query parameters, as the dashboard
   declares them (free-text parameters of kind ``string``).
3. Draws every tile (same titles, same 24-column layout, tables as table artists,
   the pie and bar charts as charts) with matplotlib.

It is this renderer's drawing of the dashboard's tiles, not an Azure Data Explorer
screenshot. Needs the ``loadtest`` extra (matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import json
import operator
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any, TypedDict

DASHBOARD = "dashboards/agent-state-adx.json"
#: The ADX dashboard grid is 24 columns wide (tile ``layout.x``/``width``).
GRID_COLUMNS = 24


def load_dashboard() -> dict[str, Any]:
    ref = resources.files("langgraph.checkpoint.kusto.telemetry").joinpath(DASHBOARD)
    return json.loads(ref.read_text())  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Tile:
    """A tile joined to its query (schema 52: ``tile.queryRef.queryId`` names a
    ``queries[]`` entry, which holds the text and the variables it uses)."""

    tile: dict[str, Any]
    query: dict[str, Any]

    @property
    def title(self) -> str:
        return str(self.tile["title"])

    @property
    def text(self) -> str:
        return str(self.query["text"])

    @property
    def variables(self) -> list[str]:
        return list(self.query.get("usedVariables", []))


def tiles(board: dict[str, Any]) -> list[Tile]:
    queries = {q["id"]: q for q in board["queries"]}
    return [Tile(t, queries[t["queryRef"]["queryId"]]) for t in board["tiles"]]


def default_values(board: dict[str, Any]) -> dict[str, str]:
    """The parameters' default values, by variable name."""
    return {p["variableName"]: p["defaultValue"].get("value", "") for p in board["parameters"]}


def bound(tile: Tile) -> str:
    """The tile's query with the parameters it uses declared as string query
    parameters, the way the dashboard passes its free-text parameters."""
    if not tile.variables:
        return tile.text
    decl = ", ".join(f"{v}:string" for v in tile.variables)
    return f"declare query_parameters({decl});\n{tile.text}"


def evaluate(con: Any, board: dict[str, Any], values: dict[str, str]) -> dict[str, tuple[list[str], list[tuple[Any, ...]]]]:
    """Run every tile's query on a DuckDB connection through duckdb-kql, the stored
    functions registered as provision.kql creates them. ``{tile id: (columns, rows)}``."""
    import duckdb_kql

    from ..engine import agent_state

    defs = [agent_state.definition(f) for f in agent_state.FUNCTIONS]
    out = {}
    for t in tiles(board):
        params = {v: values[v] for v in t.variables}
        rel = duckdb_kql.kql(con, bound(t), params or None, functions=defs)
        out[t.tile["id"]] = (list(rel.columns), rel.fetchall())
    return out


# -- the workload -----------------------------------------------------------------------


class _State(TypedDict, total=False):
    log: Annotated[list[str], operator.add]


def pipeline(saver: Any, *, fail: bool = False, ask: bool = False) -> Any:
    from langgraph.graph import END, START, StateGraph
    from langgraph.types import interrupt

    def node(name: str) -> Any:
        def run(state: _State) -> dict[str, Any]:
            if name == "check" and fail:
                raise RuntimeError("check failed")
            if name == "check" and ask:
                return {"log": [f"check:{interrupt('approve?')}"]}
            return {"log": [name]}

        return run

    g = StateGraph(_State)
    names = ("plan", "check", "act")
    for n in names:
        g.add_node(n, node(n))
    g.add_edge(START, names[0])
    for a, b in zip(names, names[1:]):
        g.add_edge(a, b)
    g.add_edge(names[-1], END)
    return g.compile(checkpointer=saver)


def with_subgraph(saver: Any) -> Any:
    from langgraph.graph import END, START, StateGraph

    sub = StateGraph(_State)
    sub.add_node("tool", lambda s: {"log": ["tool"]})
    sub.add_edge(START, "tool")
    sub.add_edge("tool", END)
    g = StateGraph(_State)
    g.add_node("route", lambda s: {"log": ["route"]})
    g.add_node("tools", sub.compile())
    g.add_edge(START, "route")
    g.add_edge("route", "tools")
    g.add_edge("tools", END)
    return g.compile(checkpointer=saver)


def _cfg(thread: str, run: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"configurable": {"thread_id": thread}}
    if run:
        out["metadata"] = {"run_id": run}
    return out


async def run_workload(saver: Any, threads: int) -> dict[str, Any]:
    """Write ``threads`` threads of real graphs (see the module docstring); returns
    what was done: the forked thread, the deleted ones, counts of each kind of run."""
    from langgraph.types import Command

    done = {"ok": 0, "error": 0, "interrupted": 0, "resumed": 0, "deleted": [], "forked": ""}
    for i in range(threads):
        tid = f"thread-{i:02d}"
        kind = i % 6
        if kind in (0, 1, 2):
            await pipeline(saver).ainvoke({"log": ["in"]}, _cfg(tid, f"run-{i:02d}a"))
            done["ok"] += 1
            if i % 4 == 0:  # a second run on the same thread
                await pipeline(saver).ainvoke({"log": ["again"]}, _cfg(tid, f"run-{i:02d}b"))
                done["ok"] += 1
        elif kind == 3:
            try:
                await pipeline(saver, fail=True).ainvoke({"log": ["in"]}, _cfg(tid, f"run-{i:02d}a"))
            except RuntimeError:
                done["error"] += 1
        elif kind == 4:
            graph = pipeline(saver, ask=True)
            await graph.ainvoke({"log": ["in"]}, _cfg(tid, f"run-{i:02d}a"))
            done["interrupted"] += 1
            if i % 12 == 4:  # half of them are answered by a second run
                await graph.ainvoke(Command(resume="yes"), _cfg(tid, f"run-{i:02d}b"))
                done["resumed"] += 1
        else:
            await with_subgraph(saver).ainvoke({"log": ["in"]}, _cfg(tid, f"run-{i:02d}a"))
            done["ok"] += 1
    # a fork: update_state on the checkpoint after the first node branches the history
    forked = "thread-01"
    graph = pipeline(saver)
    after_plan = [s async for s in graph.aget_state_history(_cfg(forked)) if s.metadata.get("step") == 1][-1]
    await graph.aupdate_state(after_plan.config, {"log": ["edited"]})
    done["forked"] = forked
    # a few threads deleted: gone from every tile
    for i in range(2, threads, 17):
        tid = f"thread-{i:02d}"
        await saver.adelete_thread(tid)
        done["deleted"].append(tid)
    await saver.flush()
    return done


# -- drawing ----------------------------------------------------------------------------

_BG, _TILE, _BORDER, _TEXT, _MUTED = "#f5f5f5", "#ffffff", "#d6d6d6", "#242424", "#6b6b6b"
_HEADER = "#ebebeb"
# outcome colours, then a palette for series
_OUTCOME = {"ok": "#3a9b5c", "error": "#d13438", "interrupted": "#ca5010"}
_PALETTE = ["#0078d4", "#8764b8", "#00b7c3", "#ca5010", "#3a9b5c", "#d13438", "#986f0b"]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return value.strftime("%m-%d %H:%M:%S.%f")[:-3]
    if isinstance(value, dt.timedelta):
        return f"{value.total_seconds() * 1000:.1f} ms"
    if isinstance(value, str) and value.startswith("["):
        try:
            items = json.loads(value)  # a dynamic array comes back as JSON text
        except ValueError:
            items = None
        if isinstance(items, list):
            return ", ".join(_short(str(x)) for x in items)
    if isinstance(value, (list, tuple)):
        return ", ".join(_short(str(x)) for x in value)
    return _short(str(value))


def _short(text: str, limit: int = 26) -> str:
    # checkpoint ids are 36-character uuids: their tails tell them apart
    if len(text) == 36 and text.count("-") == 4:
        return "…" + text[-12:]
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render(board: dict[str, Any], results: dict[str, tuple[list[str], list[tuple[Any, ...]]]], out: str, note: str,
           values: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows_total = max(t["layout"]["y"] + t["layout"]["height"] for t in board["tiles"])
    unit_h, width_in = 0.52, 20.0
    height_in = rows_total * unit_h + 1.1
    fig = plt.figure(figsize=(width_in, height_in), facecolor=_BG, dpi=72)
    top = 1 - 1.0 / height_in
    fig.text(0.008, 1 - 0.42 / height_in, board["title"], color=_TEXT, fontsize=17, weight="bold", va="center")
    params = "   ".join(f"{p['displayName']}: {values[p['variableName']]}" for p in board["parameters"])
    fig.text(0.30, 1 - 0.42 / height_in, params, color=_TEXT, fontsize=10.5, va="center")
    fig.text(0.992, 1 - 0.80 / height_in, note, color=_MUTED, fontsize=9, ha="right", va="center")

    for t in tiles(board):
        lay = t.tile["layout"]
        x0 = lay["x"] / GRID_COLUMNS + 0.003
        w = lay["width"] / GRID_COLUMNS - 0.006
        y0 = top * (1 - (lay["y"] + lay["height"]) / rows_total) + 0.004
        h = top * lay["height"] / rows_total - 0.008
        frame = fig.add_axes((x0, y0, w, h))
        frame.set_facecolor(_TILE)
        frame.set_xticks([])
        frame.set_yticks([])
        for spine in frame.spines.values():
            spine.set_color(_BORDER)
        frame.text(0.012, 0.965, t.title, transform=frame.transAxes, color=_TEXT, fontsize=11.5, weight="bold", va="top")
        columns, rows = results[t.tile["id"]]
        inner = (x0 + w * 0.012, y0 + h * 0.03, w * 0.976, h * 0.82)
        kind = t.tile["visualType"]
        if not rows:
            frame.text(0.5, 0.45, "No results", transform=frame.transAxes, color=_MUTED, ha="center", fontsize=11)
        elif kind == "table":
            _table(fig, inner, columns, rows, h * height_in)
        elif kind == "pie":
            _pie(fig, inner, t.tile["visualOptions"], columns, rows)
        elif kind == "bar":
            _bar(fig, inner, t.tile["visualOptions"], columns, rows)
        else:
            raise ValueError(f"no drawing for visual type {kind!r}")

    buf = io.BytesIO()
    fig.savefig(buf, facecolor=_BG, dpi=72)
    plt.close(fig)
    from PIL import Image  # matplotlib's own dependency

    # a palette image: the same picture at a third of the bytes
    Image.open(buf).convert("RGB").quantize(colors=256).save(out, optimize=True)


def _table(fig: Any, box: tuple[float, float, float, float], columns: list[str], rows: list[tuple[Any, ...]],
           height_in: float) -> None:
    ax = fig.add_axes(box)
    ax.axis("off")
    row_in = 0.24
    fits = max(1, int(height_in * 0.82 / row_in) - 1)
    shown = rows[:fits]
    cells = [[_cell(v) for v in r] for r in shown]
    if len(rows) > fits:
        cells[-1] = [f"… {len(rows) - fits + 1} more rows"] + [""] * (len(columns) - 1)
    widths = [max(len(c), *(len(r[i]) for r in cells)) + 2 for i, c in enumerate(columns)]
    total = sum(widths)
    table = ax.table(cellText=cells, colLabels=columns, colWidths=[x / total for x in widths], loc="upper left",
                     cellLoc="left", colLoc="left", bbox=(0, 1 - (len(cells) + 1) / (fits + 1), 1, (len(cells) + 1) / (fits + 1)))
    table.auto_set_font_size(False)
    table.set_fontsize(8.5)
    for (r, _c), cell in table.get_celld().items():
        cell.set_edgecolor("#e6e6e6")
        cell.set_linewidth(0.6)
        if r == 0:
            cell.set_facecolor(_HEADER)
            cell.get_text().set_weight("bold")
        cell.get_text().set_color(_TEXT)


def _column(options: dict[str, Any], key: str) -> list[str]:
    spec = options.get(key) or {}
    if spec.get("type") != "specified":
        return []
    value = spec["value"]
    return list(value) if isinstance(value, list) else [value]


def _pie(fig: Any, box: tuple[float, float, float, float], options: dict[str, Any], columns: list[str],
         rows: list[tuple[Any, ...]]) -> None:
    (label_col,) = _column(options, "xColumn")
    (value_col,) = _column(options, "yColumns")
    li, vi = columns.index(label_col), columns.index(value_col)
    data = sorted(((str(r[li]), float(r[vi])) for r in rows), key=lambda x: -x[1])  # pie__orderBy: size
    labels = [k for k, _ in data]
    sizes = [v for _, v in data]
    colors = [_OUTCOME.get(k, _PALETTE[i % len(_PALETTE)]) for i, k in enumerate(labels)]
    ax = fig.add_axes(box)
    total = sum(sizes)
    ax.pie(sizes, labels=[f"{k}\n{v / total:.0%}" for k, v in data], colors=colors, startangle=90, counterclock=False,
           wedgeprops={"linewidth": 1.5, "edgecolor": "white"}, textprops={"color": _TEXT, "fontsize": 9.5})
    ax.legend([f"{k}: {int(v)}" for k, v in data], loc="lower left", bbox_to_anchor=(-0.05, -0.05), frameon=False,
              fontsize=9)
    ax.set_aspect("equal")


def _bar(fig: Any, box: tuple[float, float, float, float], options: dict[str, Any], columns: list[str],
         rows: list[tuple[Any, ...]]) -> None:
    (x_col,) = _column(options, "xColumn")
    (y_col,) = _column(options, "yColumns")
    series_cols = _column(options, "seriesColumns")
    xi, yi = columns.index(x_col), columns.index(y_col)
    si = columns.index(series_cols[0]) if series_cols else None
    categories: list[str] = []
    series: dict[str, dict[str, float]] = {}
    for r in rows:
        cat = str(r[xi])
        if cat not in categories:
            categories.append(cat)
        name = str(r[si]) if si is not None else y_col
        series.setdefault(name, {})[cat] = series.get(name, {}).get(cat, 0.0) + float(r[yi])
    x0, y0, w, h = box
    ax = fig.add_axes((x0 + w * 0.16, y0 + h * 0.12, w * 0.82, h * 0.86))
    ax.set_facecolor(_TILE)
    ys = list(range(len(categories)))[::-1]
    left = [0.0] * len(categories)
    for i, (name, vals) in enumerate(sorted(series.items())):
        widths = [vals.get(c, 0.0) for c in categories]
        ax.barh(ys, widths, left=left, color=_PALETTE[i % len(_PALETTE)], label=name, height=0.7)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(ys)
    ax.set_yticklabels([_short(c, 30) for c in categories], fontsize=8.5, color=_TEXT)
    ax.tick_params(axis="x", labelsize=8.5, colors=_MUTED)
    ax.set_xlabel(options.get("yColumnTitle") or y_col, fontsize=9, color=_MUTED)
    ax.grid(axis="x", color="#eeeeee")
    ax.set_axisbelow(True)
    for spine in ("top", "right"):
        ax.spines[spine].set_visible(False)
    ax.legend(loc="lower right", frameon=False, fontsize=9)


# -- the command ------------------------------------------------------------------------


async def build(threads: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, str], dict[str, Any]]:
    """Run the workload on a fresh embedded store and evaluate every tile."""
    from ..aio import AsyncKustoSaver

    board = load_dashboard()
    async with AsyncKustoSaver.embedded(":memory:", flush_interval=0.01) as saver:
        done = await run_workload(saver, threads)
        values = {**default_values(board), "_thread": done["forked"]}
        con = saver.engine.runtime.backend._cursor()  # type: ignore[union-attr]
        results = evaluate(con, board, values)
    return board, results, values, done


def draw(out: str, threads: int) -> dict[str, Any]:
    board, results, values, done = asyncio.run(build(threads))
    note = (f"drawn by loadtests/agent_dashboard.py from each tile's query on the embedded store after {threads} "
            f"threads of real LangGraph graphs ({len(done['deleted'])} deleted); not an Azure Data Explorer screenshot")
    render(board, results, out, note, values)
    return done


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Draw the Azure Data Explorer agent-state dashboard from a real run.")
    ap.add_argument("--out", default="docs/agent-state-dashboard.png")
    ap.add_argument("--threads", type=int, default=48)
    args = ap.parse_args(argv)
    done = draw(args.out, args.threads)
    print(f"wrote {args.out}: {args.threads} threads, {done['ok']} finished runs, {done['error']} failed, "
          f"{done['interrupted']} interrupted ({done['resumed']} resumed), fork on {done['forked']}, "
          f"deleted {', '.join(done['deleted'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
