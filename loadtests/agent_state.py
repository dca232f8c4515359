"""After a run: the agent-state questions (engine/agent_state.py) asked of the store the
run wrote, each timed, and their answers summed up for the report."""

from __future__ import annotations

import collections
import datetime as dt
import time
from typing import Any

#: a report's expiry question, when the saver has no ttl of its own
DEFAULT_TTL = dt.timedelta(days=30)


async def summarize(saver: Any) -> dict[str, Any]:
    """Ask every question once (the threads' histories: the first thread's only) and sum
    the answers up: threads, runs by outcome, forks, stored bytes by table and the
    largest channels, the next expiry; ``seconds``: each question's time."""
    seconds: dict[str, float] = {}

    async def timed(name: str, call: Any) -> list[dict[str, Any]]:
        t = time.perf_counter()
        rows: list[dict[str, Any]] = await call
        seconds[name] = time.perf_counter() - t
        return rows

    threads = await timed("threads", saver.athreads())
    runs = await timed("runs", saver.aruns())
    forks = await timed("forks", saver.aforks())
    storage = await timed("storage", saver.astorage())
    ttl = dt.timedelta(seconds=saver.engine.config.ttl) if saver.engine.config.ttl else DEFAULT_TTL
    expiring = await timed("expiring", saver.aexpiring(ttl))
    history = await timed("thread_history", saver.athread_history(threads[0]["thread_id"])) if threads else []
    by_table: collections.Counter[str] = collections.Counter()
    by_channel: collections.Counter[str] = collections.Counter()
    for r in storage:
        by_table[r["table_name"]] += r["bytes"]
        if r["channel"]:
            by_channel[r["channel"]] += r["bytes"]
    return {
        "threads": len(threads),
        "checkpoints": sum(r["checkpoints"] for r in threads),
        "runs": len(runs),
        "outcomes": dict(sorted(collections.Counter(r["outcome"] for r in runs).items())),
        "forks": len(forks),
        "bytes_by_table": dict(sorted(by_table.items())),
        "top_channels": by_channel.most_common(3),
        "ttl_s": ttl.total_seconds(),
        "next_expiry": expiring[0]["expires_at"].isoformat() if expiring else None,
        "history_rows": len(history),
        "seconds": seconds,
    }


def lines(s: dict[str, Any]) -> list[str]:
    """The summary as report lines."""
    outcomes = ", ".join(f"{k} {n}" for k, n in s["outcomes"].items()) or "none"
    tables = ", ".join(f"{k} {n:,}" for k, n in s["bytes_by_table"].items())
    channels = ", ".join(f"{k} {n:,}" for k, n in s["top_channels"])
    timing = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in s["seconds"].items())
    return [
        f"  agent state: {s['threads']} threads, {s['checkpoints']} checkpoints, {s['runs']} runs ({outcomes}), "
        f"{s['forks']} forks",
        f"    payload bytes by table: {tables}" + (f"; largest channels: {channels}" if channels else ""),
        f"    next expiry under a ttl of {dt.timedelta(seconds=s['ttl_s'])}: {s['next_expiry'] or 'none'}",
        f"    questions took: {timing}",
    ]
