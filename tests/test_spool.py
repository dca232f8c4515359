"""durability="spool": group commit, replay, torn records, truncation, and SIGKILL.

The SIGKILL test runs a load in a child process (tests/spool_crash_child.py) on a
DuckDB file, kills it at random moments, and checks after every restart that
each put acknowledged before the kill is readable; a clean last run leaves the
spool empty.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import anyio
import pytest

from langgraph.checkpoint.kusto import AsyncKustoSaver, ConfigError, IngestError, KustoSaver, SpoolError
from langgraph.checkpoint.kusto.engine import spool as spool_mod
from langgraph.checkpoint.kusto.engine.backends.embedded import EmbeddedBackend
from langgraph.checkpoint.kusto.engine.backends.faulty import FaultPlan, FaultyBackend
from langgraph.checkpoint.kusto.engine.records import BlobRec, CheckpointRec, TombstoneRec, WriteRec
from langgraph.checkpoint.kusto.engine.spool import (
    SEGMENT_HEADER,
    decode_records,
    encode_records,
    frame,
    iter_segment_files,
    read_segment,
)

from test_engine import FAST, checkpoint, put_chain, stored_ids

pytestmark = pytest.mark.anyio

CHILD = os.path.join(os.path.dirname(__file__), "spool_crash_child.py")


def spooled(path: str = ":memory:", plan: FaultPlan | None = None, **options: Any) -> tuple[AsyncKustoSaver, FaultyBackend]:
    backend = FaultyBackend(EmbeddedBackend(path), plan)
    return AsyncKustoSaver(backend, **{**FAST, "durability": "spool", **options}), backend


def segment_files(d: Any) -> list[str]:
    return list(iter_segment_files(str(d)))


# -- the file format ------------------------------------------------------------------


def test_records_round_trip_through_the_spool_encoding() -> None:
    recs = [
        BlobRec("t", "ns", "ch", "00001.0", "msgpack", b"ABC\x00\xff" * 10, 123),
        CheckpointRec("t", "ns", "c1", "c0", "run", {"ch": "00001.0"}, {"ch": "00001.0"},
                      b'{"step":1,"n":{"1":[1,2]}}', "msgpack", b"x", 124),
        WriteRec("t", "ns", "c1", "task", "path", -1, "__error__", "json", b"{}", 125),
        BlobRec("t", "ns", "empty", "00001.0", "empty", b"", 128),
        TombstoneRec("thread", thread_id="t", deleted_at=126),
        TombstoneRec("run", run_id="r", deleted_at=127),
    ]
    back = decode_records(encode_records(recs))
    assert back == recs


def test_a_torn_tail_and_a_corrupt_record_are_dropped_never_replayed() -> None:
    payloads = [encode_records([TombstoneRec("thread", thread_id=f"t{i}", deleted_at=i)]) for i in range(5)]
    data = SEGMENT_HEADER + b"".join(frame(p) for p in payloads)
    assert read_segment(data).payloads == payloads
    # power loss mid-write: the last record is cut anywhere in its frame
    last = len(frame(payloads[-1]))
    for cut in range(1, last):
        res = read_segment(data[:-cut])
        assert res.payloads == payloads[:4] and res.dropped == last - cut and res.problems
    # a flipped bit in the middle: that record alone is lost, reading resumes after it
    f0, f1 = len(frame(payloads[0])), len(frame(payloads[1]))
    pos = len(SEGMENT_HEADER) + f0 + f1 // 2
    bad = data[:pos] + bytes([data[pos] ^ 0x10]) + data[pos + 1 :]
    res = read_segment(bad)
    assert res.payloads == [payloads[0]] + payloads[2:] and res.dropped == f1
    # garbage appended (a torn frame header), a torn segment header, an empty file
    assert read_segment(data + b"\xd5\x8a").payloads == payloads
    assert read_segment(SEGMENT_HEADER[:5]).payloads == []
    assert read_segment(b"") == spool_mod.ReadResult([], 0, [])


# -- configuration ----------------------------------------------------------------------


def test_spool_configuration_is_validated(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="durability"):
        AsyncKustoSaver.embedded(":memory:", durability="disk")
    with pytest.raises(ConfigError, match="spool_dir"):
        AsyncKustoSaver.embedded(":memory:", durability="spool")  # nowhere to put it
    with pytest.raises(ConfigError, match="spool_dir"):
        AsyncKustoSaver.from_connection_string("http://127.0.0.1:1", "db", durability="spool")
    with pytest.raises(ConfigError, match="spool_dir"):
        AsyncKustoSaver.embedded(":memory:", durability="spool", spool_dir=42)
    with pytest.raises(ConfigError, match="spool_segment_bytes"):
        AsyncKustoSaver.embedded(":memory:", durability="spool", spool_dir=str(tmp_path), spool_segment_bytes=0)
    # the embedded store's default: next to its file
    saver = AsyncKustoSaver.embedded(str(tmp_path / "x.duckdb"), durability="spool")
    assert saver.engine.spool is not None and saver.engine.spool.dir == str(tmp_path / "x.duckdb.spool")
    # a remote backend with spool_dir
    saver = AsyncKustoSaver.from_connection_string("http://127.0.0.1:1", "db", durability="spool", spool_dir=tmp_path / "s")
    assert saver.engine.spool is not None and saver.engine.spool.dir == str(tmp_path / "s")


async def test_one_spool_directory_serves_one_engine(tmp_path: Any) -> None:
    a, _ = spooled(spool_dir=str(tmp_path / "s"))
    b, _ = spooled(spool_dir=str(tmp_path / "s"))
    async with a:
        with pytest.raises(SpoolError, match="in use"):
            async with b:
                pass
        await put_chain(a, "t", 2)
    assert not os.path.exists(tmp_path / "s")


# -- group commit and truncation ------------------------------------------------------------


async def test_concurrent_puts_share_fsyncs_and_a_clean_close_empties_the_spool(tmp_path: Any) -> None:
    path = str(tmp_path / "g.duckdb")
    # small segments: a put ingested before its group is written is skipped, so how many
    # bytes reach the spool depends on how fast ingestion runs (313 KB of 1000 records seen)
    segment = 16 * 1024
    async with AsyncKustoSaver.embedded(path, durability="spool", spool_segment_bytes=segment, **FAST) as saver:
        async with anyio.create_task_group() as tg:
            for i in range(100):
                tg.start_soon(put_chain, saver, f"t{i}", 5, True)
        st = saver.engine.stats()
        # 500 puts + 500 put_writes; a put already ingested when its group is written is not written
        assert st["spool_records_written"] + st["spool_records_skipped"] == 1000
        assert st["spool_fsyncs"] < 500, "concurrent puts must share fsyncs (group commit)"
        # sealed segments go as soon as everything in them is ingested
        await saver.flush()
        await anyio.sleep(0.05)
        st = saver.engine.stats()
        assert st["spool_records"] == 0
        assert st["spool_segments"] <= 1 and len(segment_files(path + ".spool")) <= 1
        assert st["spool_bytes_written"] > 5 * segment  # so several segments were sealed
    assert not os.path.exists(path + ".spool")
    async with AsyncKustoSaver.embedded(path, **FAST) as saver:
        for i in range(0, 100, 9):
            assert len(await stored_ids(saver, f"t{i}")) == 5


async def test_a_put_ingested_before_its_group_is_written_is_not_counted_live(
    tmp_path: Any, monkeypatch: Any
) -> None:
    real = spool_mod.Spool._new_segment_sync

    def slow_new_segment(self: Any, number: int) -> Any:
        time.sleep(0.2)  # meanwhile the put's rows are ingested
        return real(self, number)

    monkeypatch.setattr(spool_mod.Spool, "_new_segment_sync", slow_new_segment)
    saver, _ = spooled(spool_dir=str(tmp_path / "s"), flush_interval=0.001, spool_segment_bytes=4096)
    async with saver:
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(put_chain, saver, f"t{i}", 3)
        await saver.flush()
        st = saver.engine.stats()
        assert st["spool_records_skipped"] > 0
        assert st["spool_records"] == 0
        assert st["spool_records_written"] + st["spool_records_skipped"] == 120
    assert not os.path.exists(tmp_path / "s")


async def test_sync_saver_spools_too(tmp_path: Any) -> None:
    path = str(tmp_path / "s.duckdb")

    def run() -> None:
        with KustoSaver.embedded(path, durability="spool", portal_backend="trio", **FAST) as saver:
            cp, versions = checkpoint(0)
            cfg = saver.put({"configurable": {"thread_id": "s", "checkpoint_ns": ""}}, cp, {}, versions)
            assert saver.engine.stats()["spool_records_written"] == 1
            assert saver.get_tuple(cfg) is not None

    await anyio.to_thread.run_sync(run)
    assert not os.path.exists(path + ".spool")


# -- replay --------------------------------------------------------------------------------


#: for the savers that ``_snapshot_while_stalled`` stalls: rows stay in the batcher until the
#: snapshot is taken. With batches leaving every few ms, the stalled ingest slots and the
#: ingestor's queue filled up, the batcher blocked, and a spooled put then waited for it
#: forever: the test hung whenever the puts took long enough to make that many batches.
HOLD_BATCHES = {"flush_interval": 60.0}


async def _snapshot_while_stalled(saver: AsyncKustoSaver, backend: FaultyBackend, src: str, dst: str, work: Any) -> None:
    """Run ``work`` with ingestion stalled, copy the spool (a crash at that moment), then let it drain.
    ``saver`` must hold its rows in the batcher meanwhile (:data:`HOLD_BATCHES`)."""
    assert saver.options.flush_interval >= HOLD_BATCHES["flush_interval"]
    backend.stall()
    await work()
    assert saver.engine.stats()["spool_records"] > 0
    shutil.copytree(src, dst)
    backend.resume()


async def test_replay_restores_unacknowledged_rows_without_duplicates_or_resurrection(tmp_path: Any) -> None:
    store = str(tmp_path / "r.duckdb")
    sdir, snap = str(tmp_path / "spool"), str(tmp_path / "snap")
    saver, backend = spooled(store, spool_dir=sdir, **HOLD_BATCHES)
    ids: dict[str, list[str]] = {}

    async def work() -> None:
        ids["keep"] = await put_chain(saver, "keep", 3)
        ids["gone"] = await put_chain(saver, "gone", 3)
        await saver.adelete_thread("gone")
        ids["again"] = await put_chain(saver, "gone", 2)  # written again after the delete
        ids["pruned"] = await put_chain(saver, "pruned", 3)
        await saver.adelete_thread("wholly-gone")
        await put_chain(saver, "late", 1)

    async with saver:
        await put_chain(saver, "wholly-gone", 2)
        await saver.flush()
        await _snapshot_while_stalled(saver, backend, sdir, snap, work)
    assert not os.path.exists(sdir)

    async def check(s: AsyncKustoSaver) -> None:
        assert await stored_ids(s, "keep") == ids["keep"][::-1]
        assert await stored_ids(s, "gone") == ids["again"][::-1]
        assert await stored_ids(s, "wholly-gone") == []
        latest = await s.aget_tuple({"configurable": {"thread_id": "gone", "checkpoint_ns": ""}})
        assert latest is not None and latest.checkpoint["id"] == ids["again"][-1]
        assert latest.pending_writes == [("task-1", "messages", "w1")]

    # the backend has every row already; replaying them all again (as after a crash
    # just before the segments were deleted) shows no duplicate and no deleted row
    os.rename(snap, sdir)
    async with AsyncKustoSaver.embedded(store, spool_dir=sdir, **FAST) as s:  # durability="memory" replays too
        assert s.engine.stats()["spool_replayed"] > 0
        await check(s)
        await s.flush()
        await check(s)
    assert not os.path.exists(sdir)
    # compaction removes covered rows physically; a later replay still does not bring them back
    async with AsyncKustoSaver.embedded(store, **FAST) as s:
        assert await s.engine.compact() >= 0
        await check(s)


async def test_replay_into_a_fresh_store_drops_a_torn_tail_with_a_warning(tmp_path: Any, caplog: Any) -> None:
    sdir, snap = str(tmp_path / "spool"), str(tmp_path / "snap")
    saver, backend = spooled(spool_dir=sdir, **HOLD_BATCHES)
    ids: dict[str, list[str]] = {}

    async def work() -> None:
        for i in range(5):
            ids[f"t{i}"] = await put_chain(saver, f"t{i}", 3)
        cp, versions = checkpoint(9)
        await saver.aput({"configurable": {"thread_id": "torn", "checkpoint_ns": ""}}, cp, {}, versions)

    async with saver:
        await _snapshot_while_stalled(saver, backend, sdir, snap, work)
    [seg] = segment_files(snap)
    size = os.path.getsize(seg)
    with open(seg, "r+b") as f:  # power loss in the middle of the last put's record
        f.truncate(size - 7)
    caplog.set_level(logging.WARNING, logger="langgraph.checkpoint.kusto.spool")
    # a fresh (in-memory) store: only what the spool holds can show up
    async with AsyncKustoSaver.embedded(":memory:", durability="spool", spool_dir=snap, **FAST) as s:
        st = s.engine.stats()
        assert st["spool_dropped_bytes"] > 0 and st["spool_replayed"] == 5 * 3 * 2
        assert any("torn or corrupt tail" in r.getMessage() for r in caplog.records)
        for i in range(5):
            assert await stored_ids(s, f"t{i}") == ids[f"t{i}"][::-1]
        assert await stored_ids(s, "torn") == []
        await put_chain(s, "new", 2)
    assert not os.path.exists(snap)


async def test_a_replayed_segment_is_deleted_only_after_all_its_records_were_sent(
    tmp_path: Any, monkeypatch: Any
) -> None:
    sdir, snap = str(tmp_path / "spool"), str(tmp_path / "snap")
    saver, backend = spooled(spool_dir=sdir, **HOLD_BATCHES)

    async def work() -> None:
        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(put_chain, saver, f"t{i}", 5)

    async with saver:
        await _snapshot_while_stalled(saver, backend, sdir, snap, work)
    doomed: list[tuple[int, int]] = []
    real = spool_mod.Spool._doom

    def watch(self: Any, seg: Any) -> None:
        if seg.number in self.segments:
            doomed.append((seg.number, self.replayed_records))
        real(self, seg)

    monkeypatch.setattr(spool_mod.Spool, "_doom", watch)
    from langgraph.checkpoint.kusto.engine.mailbox import Mailbox

    real_send = Mailbox.send

    async def slow_send(self: Any, msg: Any) -> None:
        if self.name == "batcher":
            await anyio.sleep(0.01)
        await real_send(self, msg)

    monkeypatch.setattr(Mailbox, "send", slow_send)
    # every replayed put is its own batch and is ingested before the next one is sent
    async with AsyncKustoSaver.embedded(":memory:", spool_dir=snap, batch_size=1, mailbox_size=1, **FAST) as s:
        total = s.engine.stats()["spool_replayed"]
        assert total == 100
        await s.flush()
        for i in range(10):
            assert len(await stored_ids(s, f"t{i}")) == 5
    assert doomed and all(n == total for _, n in doomed), doomed


async def test_a_permanently_failed_batch_stays_spooled_for_the_next_start(tmp_path: Any) -> None:
    store, sdir = str(tmp_path / "p.duckdb"), str(tmp_path / "spool")
    saver, backend = spooled(store, FaultPlan(fail_next_ingests=1000, fail_permanently=True), spool_dir=sdir)
    with pytest.raises(IngestError):
        async with saver:
            ids = await put_chain(saver, "p", 2)
    assert segment_files(sdir), "the failed records are kept for a replay"
    async with AsyncKustoSaver.embedded(store, durability="spool", spool_dir=sdir, **FAST) as s:
        assert await stored_ids(s, "p") == ids[::-1]
    async with AsyncKustoSaver.embedded(store, **FAST) as s:
        assert await stored_ids(s, "p") == ids[::-1]
    assert not os.path.exists(sdir)


async def test_a_failed_spool_write_fails_the_put_clearly_and_the_spool_stays_clean(
    tmp_path: Any, monkeypatch: Any
) -> None:
    sdir = str(tmp_path / "spool")
    saver, backend = spooled(spool_dir=sdir)
    real = spool_mod._datasync
    failures = {"left": 1}

    def flaky(fd: int) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    async with saver:
        await put_chain(saver, "before", 1)
        monkeypatch.setattr(spool_mod, "_datasync", flaky)
        cp, versions = checkpoint(0)
        with pytest.raises(SpoolError, match="No space left"):
            await saver.aput({"configurable": {"thread_id": "x", "checkpoint_ns": ""}}, cp, {}, versions)
        backend.stall()
        ids = await put_chain(saver, "after", 2)
        assert saver.engine.stats()["spool_write_errors"] == 1
        shutil.copytree(sdir, str(tmp_path / "snap"))
        backend.resume()
    # what the spool holds after the failure reads back cleanly (the torn bytes were cut)
    async with AsyncKustoSaver.embedded(":memory:", spool_dir=str(tmp_path / "snap"), **FAST) as s:
        assert s.engine.stats()["spool_dropped_bytes"] == 0
        assert await stored_ids(s, "after") == ids[::-1]


# -- SIGKILL ---------------------------------------------------------------------------


class Child:
    def __init__(self, store: str, expected: str, run: str, finish: bool = False) -> None:
        args = [sys.executable, CHILD, store, expected, run] + (["--finish"] if finish else [])
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.started = threading.Event()
        self.loading = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            if line == "START":
                self.started.set()
            elif line == "LOAD":
                self.loading.set()
        self.started.set()

    def finish(self, timeout: float) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self._reader.join(5)
        assert self.proc.stderr is not None
        return rc, self.proc.stderr.read()


def test_sigkill_at_random_moments_loses_no_acknowledged_put(tmp_path: Any) -> None:
    store = str(tmp_path / "crash.duckdb")
    exp_path = str(tmp_path / "expected.json")
    expected: dict[str, Any] = {"checkpoints": {}, "writes": [], "deleted": []}
    rng = random.Random(int(os.environ.get("SPOOL_CRASH_SEED", "5")))
    kills = kills_under_load = replays = replayed = acked = 0
    open_times: list[float] = []
    started = time.monotonic()
    run = 0
    while kills < 24:
        run += 1
        with open(exp_path, "w") as f:
            json.dump(expected, f)
        child = Child(store, exp_path, f"r{run}")
        assert child.started.wait(30), "the child did not start"
        t_start = time.monotonic()
        if rng.random() < 0.3:  # while opening (replay) or verifying, or early in the load
            time.sleep(rng.uniform(0.0, 1.0))
        else:  # in the middle of the load
            assert child.loading.wait(30), child.lines[-5:]
            open_times.append(time.monotonic() - t_start)
            time.sleep(rng.uniform(0.02, 0.8))
        under_load = child.loading.is_set()
        child.proc.send_signal(signal.SIGKILL)
        rc, err = child.finish(30)
        assert rc == -signal.SIGKILL, (rc, child.lines[-5:], err[-2000:])
        kills += 1
        kills_under_load += under_load
        for line in child.lines:
            if line.startswith(("PROBLEM", "FAILED")):
                pytest.fail(f"run {run}: {line}\n" + "\n".join(child.lines[:30]))
            if line.startswith("OPEN replayed=") and not line.startswith("OPEN replayed=0 "):
                replays += 1
                replayed += int(line.split()[1].split("=")[1])
            acked += line[:2] in ("C ", "W ", "D ")
        _collect(child.lines, expected)
    # a clean run: everything acknowledged is there, the load finishes, the spool empties
    with open(exp_path, "w") as f:
        json.dump(expected, f)
    child = Child(store, exp_path, "final", finish=True)
    rc, err = child.finish(60)
    assert rc == 0 and child.lines[-1] == "CLOSED", (rc, child.lines[-5:], err[-3000:])
    assert any(line.startswith("VERIFIED") for line in child.lines)
    _collect(child.lines, expected)
    assert not os.path.exists(store + ".spool") or not segment_files(store + ".spool")
    elapsed = time.monotonic() - started
    assert kills >= 20 and kills_under_load >= 10, (kills, kills_under_load)
    assert replays >= 10, "most restarts should have found a spool to replay"
    # segments were deleted as their rows were ingested: much of what was acknowledged
    # came back from DuckDB after the kill, not from the spool
    assert replayed < acked, (replayed, acked)
    n_ck = sum(len(v) for k, v in expected["checkpoints"].items() if k not in expected["deleted"])
    assert n_ck > 500, n_ck

    # and the store alone (no spool left) holds every acknowledged checkpoint and write, once
    async def verify_store() -> None:
        async with AsyncKustoSaver.embedded(store, **FAST) as saver:
            from spool_crash_child import verify

            problems = await verify(saver, expected)
            assert not problems, problems[:10]

    anyio.run(verify_store)
    print(f"\nSIGKILL test: {kills} kills ({kills_under_load} under load), {replays} replays "
          f"({replayed} records replayed of {acked} acknowledged calls), "
          f"{n_ck} acknowledged checkpoints, {elapsed:.1f} s; open+verify took "
          f"{min(open_times):.2f}-{max(open_times):.2f} s")


def _collect(lines: list[str], expected: dict[str, Any]) -> None:
    for line in lines:
        parts = line.split(" ")
        if parts[0] == "C":
            expected["checkpoints"].setdefault(parts[1], []).append(parts[2])
        elif parts[0] == "W":
            expected["writes"].append(parts[1:4])
        elif parts[0] == "D":
            expected["deleted"].append(parts[1])
