"""Turning backend rows into records: dedup, chunk reassembly, visibility.

Runs in the query cache's child tasks, never in its message loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import orjson

from .retry import retrying
from .records import BlobRec, CheckpointRec, WriteRec, json_bytes, newer_write, payload_bytes, to_micros


def _dyn(value: Any) -> Any:
    if isinstance(value, (str, bytes)):
        return orjson.loads(value) if value else None
    return value


def _versions(value: Any) -> dict[str, str]:
    v = _dyn(value)
    if not isinstance(v, dict):
        return {}
    return {str(k): str(x) for k, x in v.items()}


async def ask(rt: Any, trace: Any, stage: str, template: Callable[[bool], str], params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One read query, ``template(rt.expiries)``, retried and timed (span ``stage`` under
    ``trace``). A query made without the expiry rule that met an expiry (an
    ``expiry_flags`` row, engine/kql.py) is asked again with it, and the runtime applies
    the rule from then on; a query made with the rule has no such row."""
    while True:
        text = template(rt.expiries)
        rows: list[dict[str, Any]] = await rt.instruments.query(
            trace, stage, retrying(rt.config, lambda: rt.backend.query(text, params))
        )
        if not any(r.get("expiry_") for r in rows):
            return rows
        rt.expiries = True


def checkpoint_from_row(row: dict[str, Any]) -> CheckpointRec:
    meta = _dyn(row.get("metadata"))
    return CheckpointRec(
        thread_id=row["thread_id"],
        checkpoint_ns=row["checkpoint_ns"] or "",
        checkpoint_id=row["checkpoint_id"],
        parent_checkpoint_id=row.get("parent_checkpoint_id") or "",
        run_id=row.get("run_id") or "",
        channel_versions=_versions(row.get("channel_versions")),
        new_versions=_versions(row.get("new_versions")),
        metadata_json=json_bytes(meta if meta is not None else {}),
        payload_type=row.get("payload_type") or "",
        payload=payload_bytes(row.get("payload")),
        written_at=to_micros(row["written_at"]),
    )


def _assemble(parts: dict[int, Any], chunks: int) -> tuple[bytes, bool]:
    """The payload from its chunks: bytes (BLOB cells), or base64 texts (Kusto), which
    are joined before decoding (a chunk's text need not end on a 4-character group)."""
    if chunks <= 1:
        return payload_bytes(parts.get(0)), 0 in parts
    if len(parts) < chunks or any(i not in parts for i in range(chunks)):
        return b"", False
    cells = [parts[i] for i in range(chunks)]
    if all(isinstance(c, str) for c in cells):
        return payload_bytes("".join(cells)), True
    return b"".join(payload_bytes(c) for c in cells), True


def values_from_rows(
    rows: Iterable[dict[str, Any]],
) -> tuple[dict[tuple[str, str, str, str], BlobRec], dict[tuple[str, str, str, str, int], WriteRec]]:
    """Blobs and writes from a ``VALUES_QUERY`` answer, deduplicated and reassembled.

    Duplicated rows (a retried batch) are identical, so any copy serves. Of two
    *different* writes with one key, :func:`newer_write` decides.
    """
    blob_parts: dict[tuple[Any, ...], tuple[dict[str, Any], dict[int, Any]]] = {}
    write_parts: dict[tuple[Any, ...], tuple[dict[str, Any], dict[int, Any]]] = {}
    for row in rows:
        written_at = to_micros(row["written_at"])
        chunk = int(row.get("chunk") or 0)
        if row["kind_"] == "blob":
            k = (row["thread_id"], row["checkpoint_ns"] or "", row["channel"], row["version"], written_at)
            head, parts = blob_parts.setdefault(k, (row, {}))
        else:
            k = (
                row["thread_id"], row["checkpoint_ns"] or "", row["checkpoint_id"],
                row["task_id"], int(row["idx"]), written_at,
            )
            head, parts = write_parts.setdefault(k, (row, {}))
        parts[chunk] = row.get("payload")
    blobs: dict[tuple[str, str, str, str], BlobRec] = {}
    for (tid, ns, ch, ver, written_at), (head, parts) in blob_parts.items():
        payload, complete = _assemble(parts, int(head.get("chunks") or 1))
        if head.get("hidden_"):  # covered by a thread deletion: its checkpoint is not visible
            complete = False
        rec = BlobRec(tid, ns, ch, ver, head.get("payload_type") or "", payload, written_at, complete=complete)
        old = blobs.get(rec.key)
        if old is None or (rec.complete and (not old.complete or rec.written_at > old.written_at)):
            blobs[rec.key] = rec
    writes: dict[tuple[str, str, str, str, int], WriteRec] = {}
    for (tid, ns, cid, task, idx, written_at), (head, parts) in write_parts.items():
        payload, complete = _assemble(parts, int(head.get("chunks") or 1))
        rec = WriteRec(
            tid, ns, cid, task, head.get("task_path") or "", idx, head.get("channel") or "",
            head.get("payload_type") or "", payload, written_at, complete=complete,
        )
        old = writes.get(rec.key)
        if old is None:
            writes[rec.key] = rec
        elif not old.complete:
            writes[rec.key] = rec if rec.complete else old
        elif rec.complete:
            writes[rec.key] = newer_write(old, rec)
    return blobs, writes


def delta_walk(
    heads: Mapping[str, CheckpointRec],
    blobs: Mapping[tuple[str, str], BlobRec],
    target: str | None,
    channels: Sequence[str],
) -> tuple[list[str], dict[str, str]]:
    """The parent chain a delta channel's value at ``target`` is rebuilt from.

    From ``target``'s parent up, oldest last: the checkpoints whose writes replay,
    as far as the nearest one that holds a stored value (a snapshot) of every channel
    in ``channels``, or the root. Returns that chain and, per channel, the checkpoint
    its seed is stored at (absent: no stored value on the path, start empty).
    ``target`` None: the latest checkpoint (the highest stamp, as every read orders
    them: engine/clock.py).
    """
    if target is None:
        newest = max(heads.values(), key=lambda h: (h.written_at, h.checkpoint_id), default=None)
        target = newest.checkpoint_id if newest is not None else None
    head = heads.get(target) if target is not None else None
    chain: list[str] = []
    seeds: dict[str, str] = {}
    if head is None:
        return chain, seeds
    remaining = set(channels)
    visited: set[str] = set()
    cur = head.parent_checkpoint_id or None
    while cur is not None and remaining and cur not in visited:
        h = heads.get(cur)
        if h is None:  # deleted, pruned, or not copied: the walk ends here
            break
        chain.append(cur)
        visited.add(cur)
        for ch in list(remaining):
            ver = h.channel_versions.get(ch)
            if ver is not None and (ch, ver) in blobs:
                seeds[ch] = cur
                remaining.discard(ch)
        cur = h.parent_checkpoint_id or None
    return chain, seeds
