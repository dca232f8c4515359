"""Several replica processes on one Kusto database, as behind a load balancer.

The loopback Kusto endpoint (tests/kusto_loopback.py) runs in this process, provisioned
with provision.kql through ``asetup(create=True)``. Three replica processes
(tests/replica_child.py) each hold ONE ``AsyncKustoSaver.from_connection_string(uri, db)``
with the default options for the whole run and a real LangGraph ``StateGraph`` on it.
Six threads of eight turns run at once; each turn goes to a random replica (seeded), other
than the one that answered the thread's previous turn, and is sent only after that turn
returned. Before its first turn each thread is read on every replica (a "no such thread"
answer each may keep). Two threads are deleted after their fourth turn, read on the other
replicas (empty), and continued: ``t4`` deleted on r0 and continued on r1, ``t5`` deleted on
r1 and continued on r0; the replica that continues served the turn before the delete, so it
holds the thread's state from before.

What DESIGN.md's consistency contract asks of the default options, checked here:
  * every turn sees every earlier turn of its thread, whichever replica wrote it (no stale
    read, no fork): checked on each turn's answer;
  * a deletion that returned holds everywhere (reads on the other replicas are empty) and
    is ordered by something other than host clocks;
  * at the end a fresh saver finds, per thread: every turn the driver sent, in order, in the
    latest state (for a deleted thread only the turns after the delete); one chain of
    checkpoints (four per turn, no checkpoint with two children in a namespace); nothing of
    a deleted thread from before its delete; and every channel value present (compared
    with what ``InMemorySaver`` stores for the same graph).

The cases shift r0's wall clock (``time.time``/``time.time_ns`` in that process, so
LangGraph's uuid6 checkpoint ids and the saver's timestamps both follow it): 0, +30 s, -30 s.
r0 deletes ``t4`` (+30 s: the continuation written by r1 within 30 s would sort before the
delete; -30 s: the turns r1/r2 wrote just before it would sort after it), continues ``t5``
after r1 deleted it (-30 s: the continuation sorts before the delete), and takes turns of
every thread between turns of the unskewed replicas (its checkpoint ids sort 30 s off theirs,
so "the latest checkpoint" by id is the wrong one unless the saver orders turns otherwise).
The loopback shows a streamed row as soon as its ingest request returned; Kusto's streaming
ingestion is documented for "low latency between ingestion and query", under a second
(https://learn.microsoft.com/azure/data-explorer/ingest-data-streaming).

Each such pair of events is one turn apart (seconds, even on a loaded host), well within
the skew. Every case prints its run time (``-s`` shows it).

Checked against the saver with ``cache_ttl=0, durability="ingested"`` passed to the replicas
(not what this test runs: it runs the defaults): the no-skew case passes, so the harness
expects nothing a correct saver cannot give; both skew cases fail (ids and tombstones
follow the skewed clock).
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from langgraph.checkpoint.memory import InMemorySaver

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kusto_loopback import LoopbackKusto  # noqa: E402
from replica_child import build_graph  # noqa: E402

from langgraph.checkpoint.kusto import AsyncKustoSaver  # noqa: E402

CHILD = str(Path(__file__).resolve().parent / "replica_child.py")
DB = "checkpoints"
REPLICAS = 3
THREADS = 6
TURNS = 8
#: the deleted threads: thread -> (deleting replica, continuing replica)
DELETED = {"t4": (0, 1), "t5": (1, 0)}
#: turns before the delete
DELETE_AT = 4
#: checkpoints LangGraph writes per turn of build_graph: input, and one per step (3)
CHECKPOINTS_PER_TURN = 4
SEED = 20240607
#: seconds: a replica's start (imports, opening the saver) and each command's answer
STARTUP_TIMEOUT = 60.0
CALL_TIMEOUT = 30.0

pytestmark = pytest.mark.parametrize("anyio_backend", ["asyncio"])  # LangGraph runs on asyncio


class ReplicaError(Exception):
    """A replica answered ok=false (the operation raised there)."""


class Replica:
    """One child process and the JSON-lines conversation with it."""

    def __init__(self, index: int, skew: float, uri: str, log: Path) -> None:
        self.index, self.name, self.skew, self.uri, self.log_path = index, f"r{index}", skew, uri, log
        self.proc: Process | None = None
        self._pending: dict[int, tuple[anyio.Event, list[Any]]] = {}
        self._next = 0
        self._send_lock = anyio.Lock()
        self._closed: str | None = None

    async def start(self) -> None:
        args = [sys.executable, CHILD, "--uri", self.uri, "--database", DB, "--name", self.name,
                "--clock-skew", str(self.skew)]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in kill()
        self.proc = await anyio.open_process(args, stderr=self._log)
        assert self.proc.stdout is not None
        self._out = BufferedByteReceiveStream(self.proc.stdout)
        try:
            with anyio.fail_after(STARTUP_TIMEOUT):
                ready = json.loads(await self._out.receive_until(b"\n", 1 << 26))
        except (TimeoutError, anyio.EndOfStream, anyio.IncompleteRead) as e:
            raise RuntimeError(f"{self.name} did not start ({type(e).__name__}); its stderr: {self.stderr_tail()}") from None
        assert ready.get("ready") and ready.get("clock_skew") == self.skew, ready

    async def pump(self) -> None:
        """Hand each answer line to its caller; on EOF fail every waiting call."""
        try:
            while True:
                line = await self._out.receive_until(b"\n", 1 << 26)
                msg = json.loads(line)
                slot = self._pending.pop(msg.get("id"), None)
                if slot is not None:
                    slot[1].append(msg)
                    slot[0].set()
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._closed = f"{self.name} exited; its stderr: {self.stderr_tail()}"
            for ev, _ in self._pending.values():
                ev.set()

    async def call(self, op: str, timeout: float = CALL_TIMEOUT, **fields: Any) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        if self._closed:
            raise RuntimeError(self._closed)
        self._next += 1
        cid = self._next
        ev, box = anyio.Event(), []
        self._pending[cid] = (ev, box)
        async with self._send_lock:
            await self.proc.stdin.send((json.dumps({"id": cid, "op": op, **fields}) + "\n").encode())
        try:
            with anyio.fail_after(timeout):
                await ev.wait()
        except TimeoutError:
            raise TimeoutError(f"{self.name}: no answer to {op} {fields} within {timeout} s; "
                               f"its stderr: {self.stderr_tail()}") from None
        if not box:
            raise RuntimeError(self._closed or f"{self.name}: no answer to {op} {fields}")
        msg: dict[str, Any] = box[0]
        if not msg.get("ok"):
            raise ReplicaError(f"{self.name} {op} {fields}: {msg.get('error')}")
        return msg

    def stderr_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:] or "(empty)"
        except OSError:
            return "(unreadable)"

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            with anyio.move_on_after(10):
                await self.proc.wait()
        if self.proc is not None:
            await self.proc.aclose()
        if getattr(self, "_log", None) is not None:
            self._log.close()


# -- the scenario ------------------------------------------------------------------


def routes(rng: random.Random) -> dict[str, list[int]]:
    """Per thread, the replica of each turn: never the previous turn's replica, except that
    a deleted thread's turn before the delete and its first turn after go to the replica
    that continues it (so that replica holds the thread's state from before the delete)."""
    out = {}
    for i in range(THREADS):
        tid = f"t{i}"
        forced = {}
        if tid in DELETED:
            forced = {DELETE_AT - 1: DELETED[tid][1], DELETE_AT: DELETED[tid][1]}
        route: list[int] = []
        for k in range(TURNS):
            if k in forced:
                route.append(forced[k])
                continue
            avoid = {route[-1] if route else None, forced.get(k + 1)}
            route.append(rng.choice([r for r in range(REPLICAS) if r not in avoid]))
        out[tid] = route
    return out


def user_texts(values: dict[str, Any]) -> list[str]:
    return [m for m in values.get("messages", []) if not m.startswith("r")]


def short(texts: list[str]) -> str:
    return "[" + ", ".join(texts) + "]"


async def drive_thread(tid: str, route: list[int], replicas: list[Replica], rng: random.Random,
                       sent: dict[str, list[str]], before_delete: dict[str, list[str]],
                       problems: dict[str, list[str]]) -> None:
    """The thread's turns, one after the other; problems seen on the way are recorded."""
    await anyio.sleep(rng.random() * 0.2)  # threads start interleaved
    for r in replicas:  # nothing yet, on every replica (each may remember "no such thread")
        values = (await r.call("read", thread=tid))["values"]
        if values:
            problems["read before the first turn"].append(f"{tid} on {r.name}: {values}")
    texts: list[str] = []
    expected: list[str] = []
    for k in range(TURNS):
        if tid in DELETED and k == DELETE_AT:
            deleter = DELETED[tid][0]
            await replicas[deleter].call("delete", thread=tid)
            before_delete[tid] = list(texts)
            texts, expected = [], []
            for r in replicas:
                if r.index == deleter:
                    continue
                values = (await r.call("read", thread=tid))["values"]
                if values:
                    problems["deleted thread still served by another replica"].append(
                        f"{tid} deleted on r{deleter}, then read on {r.name}: turns={values.get('turns')} "
                        f"{short(user_texts(values))}"
                    )
        r = replicas[route[k]]
        text = f"{tid}.{k}"
        texts.append(text)
        sent[tid] = list(texts)
        expected += [text, f"{r.name}: re {text} #{len(texts)}"]
        try:
            values = (await r.call("turn", thread=tid, text=text))["values"]
        except ReplicaError as e:
            problems["turn failed"].append(str(e))
            continue
        if values.get("messages") != expected or values.get("turns") != len(texts):
            seen = user_texts(values)
            prev = f"r{route[k - 1]}" if k else "none"
            if set(before_delete.get(tid, ())) & set(seen):
                kind = "stale read: a turn after the delete found the deleted turns"
            elif values.get("turns") == 1:
                kind = "stale read: a turn found no thread, though earlier turns had returned"
            else:
                kind = "stale read: a turn found an older history of its thread (fork)"
            problems[kind].append(
                f"{tid} turn {k} on {r.name} (previous turn on {prev}): turns={values.get('turns')} "
                f"{short(seen)}, expected turns={len(texts)} {short(texts)}"
            )


def lacking(checkpoint: dict[str, Any]) -> set[str]:
    return set(checkpoint["channel_versions"]) - set(checkpoint["channel_values"])


def expected_lacking(checkpoint: dict[str, Any], ephemeral: set[str]) -> set[str]:
    updated = set(checkpoint.get("updated_channels") or ())
    return {ch for ch in checkpoint["channel_versions"] if ch in ephemeral and ch not in updated}


async def learn_ephemeral_channels() -> set[str]:
    """The channels InMemorySaver returns without a value for build_graph, checked to follow
    :func:`expected_lacking` exactly on every one of its checkpoints."""
    mem = InMemorySaver()
    graph = build_graph(mem, "m")
    cfg = {"configurable": {"thread_id": "probe"}}
    for i in range(3):
        await graph.ainvoke({"messages": [f"probe.{i}"]}, cfg)
    tuples = [t async for t in mem.alist(cfg)]
    assert len(tuples) == 3 * CHECKPOINTS_PER_TURN
    ephemeral = set().union(*(lacking(t.checkpoint) for t in tuples))
    assert ephemeral and all(ch == "__start__" or ch.startswith("branch:to:") for ch in ephemeral), ephemeral
    for t in tuples:
        assert t.checkpoint.get("updated_channels") is not None
        assert lacking(t.checkpoint) == expected_lacking(t.checkpoint, ephemeral), t
    return ephemeral


async def verify_with_fresh_saver(uri: str, sent: dict[str, list[str]], before_delete: dict[str, list[str]],
                                  ephemeral: set[str], problems: dict[str, list[str]]) -> None:
    async with AsyncKustoSaver.from_connection_string(uri, DB) as saver:
        graph = build_graph(saver)

        async def check(tid: str, texts: list[str]) -> None:
            cfg = {"configurable": {"thread_id": tid}}
            state = await graph.aget_state(cfg)
            values = state.values
            if user_texts(values) != texts or values.get("turns") != len(texts):
                seen = user_texts(values)
                lost = [t for t in texts if t not in seen]
                problems["latest state lacks turns (lost turn)"].append(
                    f"{tid}: turns={values.get('turns')} {short(seen)}, sent {short(texts)}"
                    + (f"; lost {short(lost)}" if lost else "")
                )
            tuples = [t async for t in saver.alist(cfg)]
            # one chain: one root, no checkpoint with two children (per namespace), and the
            # parent links from the latest checkpoint reach every checkpoint of the thread
            children: Counter[tuple[str, str]] = Counter()
            roots: Counter[str] = Counter()
            parent_of: dict[tuple[str, str], str | None] = {}
            for t in tuples:
                ns = t.config["configurable"].get("checkpoint_ns", "")
                parent = t.parent_config["configurable"]["checkpoint_id"] if t.parent_config else None
                parent_of[(ns, t.config["configurable"]["checkpoint_id"])] = parent
                if parent is None:
                    roots[ns] += 1
                else:
                    children[(ns, parent)] += 1
            forks = sum(1 for n in children.values() if n > 1)
            chain, at = 0, state.config["configurable"].get("checkpoint_id") if tuples else None
            while at is not None and ("", at) in parent_of and chain <= len(tuples):
                chain += 1
                at = parent_of[("", at)]
            want = CHECKPOINTS_PER_TURN * len(texts)
            if forks or sum(roots.values()) != 1 or len(tuples) != want or chain != len(tuples):
                problems["not one chain per thread (fork, second root, or extra checkpoints)"].append(
                    f"{tid}: {len(tuples)} checkpoints for {len(texts)} turns (expected {want}); "
                    f"{sum(roots.values())} roots, {forks} with two or more children; "
                    f"the chain from the latest holds {chain}"
                    + (f", then names a parent that is not listed ({at})" if at is not None and chain < len(tuples) else "")
                )
            old = set(before_delete.get(tid, ()))
            if old:
                revived = [t for t in tuples if old & set(user_texts(t.checkpoint["channel_values"]))]
                if revived:
                    problems["deleted turns readable again"].append(
                        f"{tid}: {len(revived)} checkpoints hold turns from before its delete, e.g. "
                        f"{short(user_texts(revived[0].checkpoint['channel_values']))}"
                    )
            for t in tuples:
                got, want = lacking(t.checkpoint), expected_lacking(t.checkpoint, ephemeral)
                if got != want:
                    problems["checkpoint with a missing value"].append(
                        f"{tid} {t.checkpoint['id']} step {t.metadata.get('step')}: no value for "
                        f"{sorted(got - want)}; unexpected value for {sorted(want - got)}"
                    )

        async with anyio.create_task_group() as tg:  # the threads at once, as a host reads them
            for tid, texts in sent.items():
                tg.start_soon(check, tid, texts)


@pytest.mark.anyio
@pytest.mark.parametrize("skew", [0.0, 30.0, -30.0], ids=["no-skew", "r0-ahead-30s", "r0-behind-30s"])
async def test_replicas_share_threads_turns_deletes_and_clocks(skew: float, tmp_path: Path) -> None:
    started = time.monotonic()
    ephemeral = await learn_ephemeral_channels()
    rng = random.Random(SEED)
    plan = routes(rng)
    sent: dict[str, list[str]] = {}
    before_delete: dict[str, list[str]] = {}
    problems: dict[str, list[str]] = defaultdict(list)
    async with LoopbackKusto(database=DB) as srv:
        await AsyncKustoSaver.from_connection_string(srv.uri, DB).asetup(create=True)
        replicas = [Replica(i, skew if i == 0 else 0.0, srv.uri, tmp_path / f"r{i}.stderr") for i in range(REPLICAS)]
        try:
            async with anyio.create_task_group() as tg:
                for r in replicas:
                    tg.start_soon(r.start)
            up = time.monotonic()
            async with anyio.create_task_group() as pumps:
                for r in replicas:
                    pumps.start_soon(r.pump)
                async with anyio.create_task_group() as tg:
                    for tid, route in plan.items():
                        tg.start_soon(drive_thread, tid, route, replicas, random.Random(f"{SEED}{tid}"),
                                      sent, before_delete, problems)
                driven = time.monotonic()
                # clean shutdown: each replica closes its saver (flushes) and answers
                async with anyio.create_task_group() as tg:
                    for r in replicas:
                        tg.start_soon(lambda r=r: r.call("quit"))
                pumps.cancel_scope.cancel()
            closed = time.monotonic()
            await verify_with_fresh_saver(srv.uri, sent, before_delete, ephemeral, problems)
        finally:
            with anyio.CancelScope(shield=True):
                for r in replicas:
                    await r.kill()
    elapsed = time.monotonic() - started
    routes_text = " ".join(f"{t}:{''.join(str(x) for x in rt)}" for t, rt in plan.items())
    print(f"\nreplicas (r0 clock {skew:+.0f} s): {elapsed:.1f} s in all (start {up - started:.1f} s, "
          f"turns {driven - up:.1f} s, close {closed - driven:.1f} s, check {time.monotonic() - closed:.1f} s); "
          f"routes {routes_text}")
    report = "\n".join(
        f"{kind} ({len(lines)}):\n" + "\n".join(f"    {line}" for line in sorted(lines)) for kind, lines in problems.items()
    )
    if problems:
        pytest.fail(f"r0 clock {skew:+.0f} s, routes {routes_text}:\n{report}", pytrace=False)
