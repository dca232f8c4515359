"""A replica process for test_replicas.py (not a test module itself).

    python replica_child.py --uri URI --database DB --name NAME [--clock-skew SECONDS]

One host of a multi-replica deployment: it opens ONE ``AsyncKustoSaver`` with the
default options for its whole life (``from_connection_string(uri, database)``),
compiles a real LangGraph ``StateGraph`` on it (:func:`build_graph`) and serves the
parent's commands, one JSON object per line on stdin, each carrying an ``id``:

    {"id": 1, "op": "turn", "thread": "t0", "text": "hello"}   ainvoke; answers the resulting state
    {"id": 2, "op": "read", "thread": "t0"}                    aget_state; answers its values
    {"id": 3, "op": "delete", "thread": "t0"}                  adelete_thread
    {"id": 4, "op": "quit"}                                    waits for the others, closes the saver

Commands run concurrently (one task each); each is answered with one JSON line,
written only *after* the operation returned:
``{"id": 1, "ok": true, "values": {...}}`` or ``{"id": 1, "ok": false, "error": "..."}``.
The first line, once the saver is open, is ``{"ready": true, "pid": .., "clock_skew": ..}``;
``quit`` is answered after the saver was closed (every accepted row ingested).

``--clock-skew S`` shifts this process's wall clock by S seconds before anything
else is imported: ``time.time`` and ``time.time_ns`` are replaced process-wide, so
LangGraph's checkpoint ids (``langgraph.checkpoint.base.id.uuid6`` reads
``time.time_ns()`` at each call) and the saver's own timestamps (``now_us`` in
engine/records.py, also ``time.time_ns()``) both see the skewed clock, as they
would on a host whose clock is off. Monotonic clocks (timeouts, sleeps) are left alone.
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import sys
import time
from typing import Annotated, Any, TypedDict


def skew_clock(seconds: float) -> None:
    """Shift ``time.time`` / ``time.time_ns`` by ``seconds`` for the whole process."""
    if not seconds:
        return
    real_time, real_time_ns = time.time, time.time_ns
    shift_ns = int(seconds * 1_000_000_000)
    time.time = lambda: real_time() + seconds  # type: ignore[assignment]
    time.time_ns = lambda: real_time_ns() + shift_ns  # type: ignore[assignment]


class State(TypedDict, total=False):
    messages: Annotated[list[str], operator.add]
    turns: int


def build_graph(checkpointer: Any, replica: str = "") -> Any:
    """Two nodes: ``count`` raises the turn counter, ``reply`` answers the last message.

    A turn with input ``{"messages": [text]}`` leaves ``[.., text, "<replica>: re <text> #<n>"]``
    and ``turns == n``: the n-th turn of the thread as this replica saw it. A replica that
    read a stale state answers with a smaller n, and the history it wrote lacks turns."""
    from langgraph.graph import END, START, StateGraph

    def count(state: State) -> dict[str, Any]:
        return {"turns": state.get("turns", 0) + 1}

    def reply(state: State) -> dict[str, Any]:
        return {"messages": [f"{replica}: re {state['messages'][-1]} #{state['turns']}"]}

    g = StateGraph(State)
    g.add_node("count", count)
    g.add_node("reply", reply)
    g.add_edge(START, "count")
    g.add_edge("count", "reply")
    g.add_edge("reply", END)
    return g.compile(checkpointer=checkpointer)


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def serve(uri: str, database: str, name: str, skew: float) -> None:
    import anyio

    from langgraph.checkpoint.kusto import AsyncKustoSaver

    async with AsyncKustoSaver.from_connection_string(uri, database) as saver:
        graph = build_graph(saver, name)

        async def run(cmd: dict[str, Any]) -> None:
            op, cid = cmd.get("op"), cmd.get("id")
            cfg = {"configurable": {"thread_id": cmd.get("thread")}}
            try:
                if op == "turn":
                    out = await graph.ainvoke({"messages": [cmd["text"]]}, cfg)
                    answer: dict[str, Any] = {"values": dict(out)}
                elif op == "read":
                    snap = await graph.aget_state(cfg)
                    answer = {"values": dict(snap.values)}
                elif op == "delete":
                    await saver.adelete_thread(cmd["thread"])
                    answer = {}
                else:
                    raise ValueError(f"unknown op {op!r}")
            except Exception as e:  # noqa: BLE001 - reported to the parent, which fails the test
                _say({"id": cid, "ok": False, "error": f"{type(e).__name__}: {e}"})
                return
            _say({"id": cid, "ok": True, **answer})

        quit_id = None
        async with anyio.create_task_group() as tg:
            _say({"ready": True, "pid": os.getpid(), "clock_skew": skew, "name": name})
            while True:
                line = await anyio.to_thread.run_sync(sys.stdin.readline)
                if not line:  # the parent went away
                    break
                cmd = json.loads(line)
                if cmd.get("op") == "quit":
                    quit_id = cmd.get("id")
                    break
                tg.start_soon(run, cmd)
    # the saver is closed: every row it accepted is in the backend
    _say({"id": quit_id, "ok": True, "closed": True})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--uri", required=True)
    p.add_argument("--database", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--clock-skew", type=float, default=0.0)
    args = p.parse_args()
    skew_clock(args.clock_skew)  # before langgraph and the saver are imported (serve imports them)
    import asyncio

    asyncio.run(serve(args.uri, args.database, args.name, args.clock_skew))


if __name__ == "__main__":
    main()
