"""Child process of test_spool.py's SIGKILL test (not a test module itself).

    python spool_crash_child.py STORE EXPECTED_JSON RUN_ID [--finish]

Opens an AsyncKustoSaver on the DuckDB file STORE with durability="spool"
(entering replays whatever spool a killed predecessor left), checks that every
acknowledgement listed in EXPECTED_JSON is readable, then runs a load and
prints one line per acknowledged call, flushed, *after* the call returned:

    C <thread> <checkpoint_id>          aput returned
    W <thread> <checkpoint_id> <task>   aput_writes returned
    D <thread>                          adelete_thread returned

The parent kills it with SIGKILL at random moments. ``--finish``: a short load,
then a clean close (which empties the spool), then ``CLOSED``.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from typing import Any

import anyio
from langgraph.checkpoint.base import empty_checkpoint

from langgraph.checkpoint.kusto import AsyncKustoSaver

AGENTS = 16
#: threads named <run>-del<i> are deleted after this step
DELETE_AT = 3
#: small segments: many are sealed and deleted (confirmed ingested) before each kill,
#: so what they held must come back from DuckDB (its WAL), not from the spool
SETTINGS = {"flush_interval": 0.01, "retry_backoff": 0.01, "retry_backoff_max": 0.05, "spool_segment_bytes": 64 * 1024}


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def verify(saver: AsyncKustoSaver, expected: dict[str, Any]) -> list[str]:
    """Every acknowledged checkpoint and write is readable; deleted threads stay deleted.

    Adds to ``expected["deleted"]`` the threads found wholly deleted whose delete
    had started (it took effect, the kill came before its acknowledgement)."""
    seen: dict[str, dict[str, set[str]]] = {}
    # the engine's read (what alist decodes), all threads in one query
    for bundle in await saver.engine.list(None, None):
        c = bundle.checkpoint
        per = seen.setdefault(c.thread_id, {})
        if c.checkpoint_id in per:
            return [f"duplicate checkpoint {c.thread_id} {c.checkpoint_id}"]
        if not bundle.visible():
            return [f"checkpoint {c.thread_id} {c.checkpoint_id} listed with a blob missing"]
        tasks = [w.task_id for w in bundle.writes]
        if len(tasks) != len(set(tasks)):
            return [f"duplicate write in {c.thread_id} {c.checkpoint_id}: {tasks}"]
        per[c.checkpoint_id] = set(tasks)
    problems = []
    # a thread whose delete may have started (its last write acknowledged) but was not
    # acknowledged: the delete took effect wholly or not at all
    maybe = {tid for tid, _cid, task in expected["writes"] if "-del" in tid and task == f"task{DELETE_AT}"}
    maybe -= set(expected["deleted"])
    for tid in maybe:
        if not seen.get(tid):
            expected["deleted"].append(tid)
    for tid, cps in expected["checkpoints"].items():
        if tid in expected["deleted"]:
            continue
        for cid in cps:
            if cid not in seen.get(tid, {}):
                problems.append(f"missing checkpoint {tid} {cid}")
    for tid, cid, task in expected["writes"]:
        if tid in expected["deleted"]:
            continue
        if task not in seen.get(tid, {}).get(cid, set()):
            problems.append(f"missing write {tid} {cid} {task}")
    for tid in expected["deleted"]:
        if seen.get(tid):
            problems.append(f"deleted thread {tid} resurrected with {len(seen[tid])} checkpoint(s)")
    return problems


async def agent(saver: AsyncKustoSaver, run: str, i: int, steps: int) -> None:
    rng = random.Random(f"{run}-{i}")
    doomed = i % 6 == 5  # some threads are deleted once written
    tid = f"{run}-{'del' if doomed else 'a'}{i}"
    cfg: dict[str, Any] = {"configurable": {"thread_id": tid, "checkpoint_ns": ""}}
    for step in range(steps):
        cp = empty_checkpoint()
        cp["channel_values"] = {"messages": [f"{tid}:{s}" for s in range(step + 1)], "blob": "x" * rng.randint(10, 2000)}
        version = f"{step + 1:032}.0"
        cp["channel_versions"] = {"messages": version, "blob": version}
        cfg = await saver.aput(cfg, cp, {"step": step, "run": run}, {"messages": version, "blob": version})
        cid = cfg["configurable"]["checkpoint_id"]
        say(f"C {tid} {cid}")
        await saver.aput_writes(cfg, [("messages", f"w{step}")], f"task{step}")
        say(f"W {tid} {cid} task{step}")
        await anyio.sleep(rng.uniform(0, 0.04))  # a paced load: the store stays small enough to verify often
        if doomed and step == DELETE_AT:
            await saver.adelete_thread(tid)
            say(f"D {tid}")
            return


async def main(store: str, expected_path: str, run: str, finish: bool) -> None:
    with open(expected_path) as f:
        expected = json.load(f)
    say("START")
    t0 = time.monotonic()
    async with AsyncKustoSaver.embedded(store, durability="spool", **SETTINGS) as saver:
        stats = saver.engine.stats()
        say(f"OPEN replayed={stats['spool_replayed']} dropped={stats['spool_dropped_bytes']} in {time.monotonic() - t0:.2f} s")
        problems = await verify(saver, expected)
        if problems:
            for p in problems[:20]:
                say(f"PROBLEM {p}")
            say(f"FAILED {len(problems)}")
            os._exit(3)
        say(f"VERIFIED in {time.monotonic() - t0:.2f} s")
        say("LOAD")
        steps = 4 if finish else 1000
        async with anyio.create_task_group() as tg:
            for i in range(AGENTS):
                tg.start_soon(agent, saver, run, i, steps)
    say("CLOSED")


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], sys.argv[3], "--finish" in sys.argv[4:])
