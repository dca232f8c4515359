"""Expiry (the ``ttl`` option): the deleter's pass that deletes threads idle too long.

A pass asks the backend, in one query (:func:`..kql.expiry_query`), which threads'
last activity (checkpoint, pending write, or touch by a read) is older than the ttl,
and writes one ``expire`` tombstone per thread, stamped with that last activity. The
tombstone travels like a ``delete_thread`` tombstone, so every replica's next read
honours it, and compaction removes the rows later. It is conditional: a row written
after it that continues the history it covers (a turn, or a read, that raced the
expiry) revives the thread whole (``_EXPIRY_LETS`` in engine/kql.py). Nothing here is
kept between passes: a restarted process, or another replica, simply asks again.

Passes run once per database at a time: each process ticks every ``expiry_interval``
and only the holder of the expiry lease (the Compactions table, the same rule as
compaction's) runs the pass.
"""

from __future__ import annotations

import time
from typing import Any

import anyio

from .. import kql
from ..records import TombstoneRec, TouchRec, now_us, to_micros, us_to_datetime
from ..retry import retrying
from ..schema import COMPACTIONS, SCOPE_EXPIRE

#: a pass stops after this many batches; the next tick goes on (a pass stays short)
MAX_BATCHES_PER_PASS = 20


async def take_lease(rt: Any, owner: str, entry: str, interval: float) -> int | None:
    """Claim this term of ``entry`` (compaction's or the expiry's lease); the term if
    ``owner`` won it, else None. A claim of the last half interval (this term's, the
    previous term's late one, or a long pass's renewal) means another process works or
    just did. Claims that race are all visible after ``compaction_lease_settle``, and
    everyone picks the same winner: the smallest owner."""
    cfg = rt.config
    now = now_us()
    span = max(1, int(interval * 1_000_000))
    term = now // span
    since = {"since": us_to_datetime(now - span // 2), "lease": entry}
    if await rt.backend.query(kql.LEASE_QUERY, since):
        return None
    await rt.backend.ingest(COMPACTIONS.name, [lease_row(entry, owner, term, now)])
    await anyio.sleep(cfg.compaction_lease_settle)
    owners = [r["owner"] for r in await rt.backend.query(kql.LEASE_QUERY, since) if r["term"] == term]
    return term if owners and min(owners) == owner else None


def lease_row(entry: str, owner: str, term: int, at: int) -> dict[str, Any]:
    return {
        "entry": entry, "term": term, "owner": owner, "scope": "", "thread_id": "",
        "checkpoint_ns": "", "checkpoint_id": "", "run_id": "", "deleted_at": at, "written_at": at,
    }


async def expire_pass(rt: Any, state: Any, write: Any) -> int:
    """Expire every thread idle longer than the ttl, ``expiry_batch`` at a time; returns
    the threads expired. ``write(tombstones)`` hands tombstones to the batcher and
    returns once they are accepted (or ingested, by the engine's durability)."""
    cfg = rt.config
    inst = rt.instruments
    expired = 0
    for _ in range(MAX_BATCHES_PER_PASS):
        cutoff = us_to_datetime(now_us() - int(cfg.ttl * 1_000_000))
        rows = await retrying(cfg, lambda: rt.backend.query(kql.expiry_query(cfg.expiry_batch), {"cutoff": cutoff}))
        due: list[TombstoneRec] = []
        for row in rows:
            if row["kind_"] == "live":
                state.live_threads = int(row.get("threads") or 0)
                state.oldest_live_at = to_micros(row["last_at"]) if row.get("last_at") is not None else None
            else:
                last = to_micros(row["last_at"])
                rt.clock.observe(row["thread_id"], last)
                due.append(TombstoneRec(SCOPE_EXPIRE, thread_id=row["thread_id"], deleted_at=last))
        if not due:
            break
        await write(due)
        expired += len(due)
        state.expired += len(due)
        inst.expired_threads.add(len(due), inst.bound())
        if len(due) < cfg.expiry_batch:
            break
    return expired


def touch(rt: Any, state: Any, thread_id: str, checkpoint_ns: str, checkpoint_id: str) -> TouchRec | None:
    """The touch to write for a read of ``thread_id`` (ttl_refresh_on_read), or None when
    this engine touched the thread less than ``ttl / 10`` ago."""
    every = rt.config.touch_every
    if every is None:
        return None
    now = time.monotonic()
    touched = state.touched
    last = touched.get(thread_id)
    if last is not None and now - last < every:
        return None
    touched.pop(thread_id, None)
    touched[thread_id] = now
    if len(touched) > rt.config.cache_max_threads:  # forget the longest-untouched
        for t in list(touched)[: len(touched) - rt.config.cache_max_threads]:
            del touched[t]
    return TouchRec(thread_id, checkpoint_ns, checkpoint_id, rt.clock.stamp(thread_id))

