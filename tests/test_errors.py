"""Errors a user can read: every error is the package's own (or LangGraph's), says what
failed and where, and a process that used a saver exits cleanly.

Real components throughout: a second process really holds the DuckDB file, the load tool
runs as ``python -m``, the azure-kusto SDK talks to a closed loopback port and to the
loopback endpoint (tests/kusto_loopback.py) with injected faults.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import duckdb
import pytest
from langgraph.checkpoint.base import empty_checkpoint

sys.path.insert(0, os.path.dirname(__file__))
from kusto_loopback import LoopbackKusto  # noqa: E402

import langgraph.checkpoint.kusto as package  # noqa: E402
from langgraph.checkpoint.kusto import (  # noqa: E402
    AsyncKustoSaver,
    EngineClosedError,
    IngestError,
    KustoCheckpointError,
    KustoSaver,
    PermanentBackendError,
    StoreLockedError,
    StorePathError,
    TransientBackendError,
    UsageError,
)
from langgraph.checkpoint.kusto.engine.backends.embedded import EmbeddedBackend  # noqa: E402
from langgraph.checkpoint.kusto.engine.backends.kusto import KustoBackend  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
DB = "testdb"
CONFIG = {"configurable": {"thread_id": "t1", "checkpoint_ns": ""}}
#: engine options that make failing tests quick
FAST = {"flush_interval": 0.01, "retry_backoff": 0.01, "retry_backoff_max": 0.02, "max_retries": 1}


def _put_one(saver: Any) -> dict[str, Any]:
    return saver.put(CONFIG, empty_checkpoint(), {"step": 0}, {})  # type: ignore[no-any-return]


def _child(script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True, timeout=timeout
    )


# --------------------------------------------------------------------------- the embedded store's file


HOLDER = """
    import sys
    from langgraph.checkpoint.kusto import KustoSaver
    from langgraph.checkpoint.base import empty_checkpoint

    with KustoSaver.embedded(sys.argv[1]) as saver:
        saver.put({"configurable": {"thread_id": "held", "checkpoint_ns": ""}}, empty_checkpoint(), {}, {})
        saver.flush()
        print("holding", flush=True)
        sys.stdin.readline()  # until the test lets go
"""


@pytest.fixture(scope="module")
def held_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A store file another process (a KustoSaver in a child interpreter) has open."""
    path = str(tmp_path_factory.mktemp("held") / "held.duckdb")
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLDER), path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "holding", proc.stderr
        yield path
    finally:
        proc.communicate("\n", timeout=60)
    assert proc.returncode == 0


def _assert_locked_message(exc: BaseException, path: str) -> None:
    text = str(exc)
    assert isinstance(exc, KustoCheckpointError) and isinstance(exc, PermanentBackendError)
    assert path in text.splitlines()[0]
    assert "one process at a time owns an embedded store file" in text
    assert "Kusto" in text  # where to go for several replicas
    assert "PID " in text


def test_a_store_another_process_holds_is_store_locked_error_sync(held_store: str) -> None:
    with pytest.raises(StoreLockedError) as caught:
        with KustoSaver.embedded(held_store):
            pass
    _assert_locked_message(caught.value, held_store)


@pytest.mark.anyio
async def test_a_store_another_process_holds_is_store_locked_error_async(held_store: str) -> None:
    with pytest.raises(StoreLockedError) as caught:
        async with AsyncKustoSaver.embedded(held_store):
            pass
    _assert_locked_message(caught.value, held_store)


def test_a_store_in_a_missing_folder_names_the_folder(tmp_path: Path) -> None:
    path = str(tmp_path / "missing" / "dir" / "x.duckdb")
    with pytest.raises(StorePathError) as caught:
        with KustoSaver.embedded(path):
            pass
    first = str(caught.value).splitlines()[0]
    assert str(tmp_path / "missing" / "dir") in first and "does not exist" in first
    assert not (tmp_path / "missing").exists()  # nothing created on the way


@pytest.mark.anyio
async def test_a_store_path_that_cannot_hold_a_store_async(tmp_path: Path) -> None:
    with pytest.raises(StorePathError, match="missing"):
        async with AsyncKustoSaver.embedded(str(tmp_path / "missing" / "x.duckdb")):
            pass
    with pytest.raises(StorePathError, match="is a folder"):
        async with AsyncKustoSaver.embedded(str(tmp_path)):
            pass
    not_duckdb = tmp_path / "notes.duckdb"
    not_duckdb.write_text("not a database " * 500)
    with pytest.raises(StorePathError) as caught:
        async with AsyncKustoSaver.embedded(str(not_duckdb)):
            pass
    assert str(not_duckdb) in str(caught.value).splitlines()[0]
    assert "not a valid DuckDB database file" in str(caught.value)


@pytest.mark.anyio
async def test_embedded_query_errors_name_the_store_and_the_cause(tmp_path: Path) -> None:
    path = str(tmp_path / "s.duckdb")
    backend = EmbeddedBackend(path)
    await backend.open()
    try:
        with pytest.raises(PermanentBackendError) as caught:
            await backend.query("NoSuchTable | count", {})
        first = str(caught.value).splitlines()[0]
        assert first.startswith(f"query on the embedded store {path} failed: ")
        assert "NoSuchTable" in first or "Catalog Error" in first
        assert not isinstance(caught.value, duckdb.Error)
        with pytest.raises(PermanentBackendError, match=f"count.* on the embedded store {re.escape(path)} failed"):
            await backend.count_rows("NoSuchTable")
    finally:
        await backend.close()
    with pytest.raises(PermanentBackendError, match=f"the embedded store {re.escape(path)} is closed"):
        await backend.query("Checkpoints | count", {})


@pytest.mark.anyio
async def test_a_failed_embedded_ingest_names_the_store_table_and_cause(tmp_path: Path) -> None:
    path = str(tmp_path / "s.duckdb")
    async with AsyncKustoSaver.embedded(path, **FAST) as saver:
        saver.backend._cursor().execute('ALTER TABLE "Checkpoints" RENAME TO "Elsewhere"')  # from under the saver
        await saver.aput(CONFIG, empty_checkpoint(), {}, {})
        with pytest.raises(IngestError) as caught:
            await saver.flush()
    first = str(caught.value).splitlines()[0]
    assert f"ingestion into Checkpoints on the embedded store {path} failed: Catalog Error" in first, first
    assert isinstance(caught.value.__cause__, IngestError)
    assert isinstance(caught.value.__cause__.__cause__, PermanentBackendError)


def test_the_load_tool_says_in_one_line_that_the_store_folder_is_missing(tmp_path: Path) -> None:
    store = tmp_path / "missing" / "dir" / "x.duckdb"
    proc = subprocess.run(
        [sys.executable, "-m", "langgraph.checkpoint.kusto.loadtests", "--store", str(store),
         "--agents", "2", "--steps", "1", "--no-compare"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert lines[0].startswith("kusto-checkpoint-loadtest: error: ")
    assert str(tmp_path / "missing" / "dir") in lines[0] and "does not exist" in lines[0]


def test_the_load_tool_says_in_one_line_that_another_process_holds_the_store(held_store: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "langgraph.checkpoint.kusto.loadtests", "--store", held_store,
         "--agents", "2", "--steps", "1", "--no-compare"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert held_store in lines[0] and "one process at a time" in lines[0]


# --------------------------------------------------------------------------- used before / after its block


def test_kusto_saver_before_and_after_with_raises_engine_closed_error(tmp_path: Path) -> None:
    saver = KustoSaver.embedded(str(tmp_path / "s.duckdb"))
    for call in (lambda: saver.get_tuple(CONFIG), lambda: _put_one(saver), saver.flush,
                 lambda: list(saver.list(CONFIG))):
        with pytest.raises(EngineClosedError, match="KustoSaver is not open: use it inside `with saver:`"):
            call()
    with pytest.raises(EngineClosedError, match="not open"):
        anyio.run(saver.aget_tuple, CONFIG)  # the async methods of the sync saver too
    with saver:
        _put_one(saver)
    for call in (lambda: saver.get_tuple(CONFIG), lambda: _put_one(saver), saver.flush):
        with pytest.raises(EngineClosedError) as caught:
            call()
        assert "KustoSaver is closed" in str(caught.value) and "not open" not in str(caught.value)
    with pytest.raises(EngineClosedError, match="closed"):
        anyio.run(saver.aget_tuple, CONFIG)
    with pytest.raises(EngineClosedError, match="closed"):
        saver.__enter__()  # a closed saver does not come back half-working
    with KustoSaver.embedded(str(tmp_path / "s.duckdb")) as again:  # a new one does
        assert again.get_tuple(CONFIG) is not None
        with pytest.raises(UsageError, match="already open"):
            again.__enter__()


@pytest.mark.anyio
async def test_async_kusto_saver_before_and_after_async_with_raises_engine_closed_error(tmp_path: Path) -> None:
    saver = AsyncKustoSaver.embedded(str(tmp_path / "s.duckdb"))
    with pytest.raises(EngineClosedError, match="not open"):
        await saver.aget_tuple(CONFIG)
    # its sync methods, from another thread (where LangGraph's sync API calls them)
    with pytest.raises(EngineClosedError, match="AsyncKustoSaver is not open: use it inside `async with saver:`"):
        await anyio.to_thread.run_sync(saver.get_tuple, CONFIG)
    async with saver:
        await anyio.to_thread.run_sync(_put_one, saver)
        with pytest.raises(UsageError, match="only allowed from a thread other than the event loop's"):
            saver.get_tuple(CONFIG)  # from the loop's own thread
    with pytest.raises(EngineClosedError) as caught:
        await anyio.to_thread.run_sync(saver.get_tuple, CONFIG)
    assert "AsyncKustoSaver is closed" in str(caught.value)
    with pytest.raises(EngineClosedError) as caught:
        await saver.aget_tuple(CONFIG)
    assert "closed" in str(caught.value) and "not open" not in str(caught.value)
    with pytest.raises(EngineClosedError, match="closed"):
        async with saver:
            pass


# --------------------------------------------------------------------------- Kusto backend errors


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connecting is refused
    return int(port)


@pytest.mark.anyio
async def test_network_errors_name_the_host_and_the_cause_in_their_first_line() -> None:
    """The real SDK against a closed loopback port. The endpoint comes from the SDK's own
    exception: ``KustoNetworkError.endpoint`` (azure-kusto-data, azure/kusto/data/exceptions.py),
    its cause chain ends in the socket's ``ConnectionRefusedError``."""
    uri = f"http://127.0.0.1:{_closed_port()}"
    backend = KustoBackend(uri, DB)
    await backend.open()
    try:
        row = {"scope": "thread", "thread_id": "t", "deleted_at": 1}
        for action, call in (("query", lambda: backend.query("print 1", {})),
                             ("control command", lambda: backend.command(".show tables")),
                             ("ingestion into Tombstones", lambda: backend.ingest("Tombstones", [row]))):
            with pytest.raises(TransientBackendError) as caught:
                await call()
            first = str(caught.value).splitlines()[0]
            assert first.startswith(f"{action} to {uri} (database {DB}) failed: connection refused (ConnectionRefusedError)"), first
    finally:
        await backend.close()

    # through the saver: the IngestError of flush() says the same in its first line
    # (durability="memory": the put returns at once, and flush() reports what failed)
    async with AsyncKustoSaver.from_connection_string(uri, DB, durability="memory", **FAST) as saver:
        await saver.aput(CONFIG, empty_checkpoint(), {}, {})
        with pytest.raises(IngestError) as caught:
            await saver.flush()
        first = str(caught.value).splitlines()[0]
        assert f"to {uri} (database {DB}) failed: connection refused" in first, first
        with pytest.raises(TransientBackendError, match=f"query to {re.escape(uri)} .*connection refused"):
            await saver.aget_tuple({"configurable": {"thread_id": "other", "checkpoint_ns": ""}})
    # leaving reports the batches that could not be ingested (IngestError), nothing else


@pytest.mark.anyio
async def test_service_errors_name_the_host_the_status_and_the_cause() -> None:
    """The loopback endpoint answers with injected HTTP errors; what the SDK raises for each
    status is azure-kusto-data's ``_handle_http_error`` (azure/kusto/data/client_base.py:
    429 -> KustoThrottlingError, 404 on ingestion -> "ingestion endpoint does not exist",
    a JSON error body -> KustoApiError with the response)."""
    async with LoopbackKusto(database=DB) as srv:
        backend = KustoBackend(srv.uri, DB)
        await backend.setup(create=True)
        await backend.open()
        row = {"scope": "thread", "thread_id": "t", "deleted_at": 1}
        try:
            for route, action, call in (
                ("query", "query", lambda: backend.query("Tombstones | count", {})),
                ("mgmt", "control command", lambda: backend.command(".show tables")),
                ("ingest", "ingestion into Tombstones", lambda: backend.ingest("Tombstones", [row])),
            ):
                head = f"{action} to {srv.uri} (database {DB}) failed: "
                for status, kind, cause in (
                    (503, TransientBackendError, f"Kusto failed the {action} (HTTP 503), retryable: ServiceUnavailable"),
                    (500, TransientBackendError, f"Kusto failed the {action} (HTTP 500), retryable"),
                    (429, TransientBackendError, f"Kusto throttled the {action} (HTTP 429)"),
                    (403, PermanentBackendError, f"Kusto refused the {action} (HTTP 403, not authorized)"),
                ):
                    srv.faults.fail_next(1, status=status, route=route)
                    with pytest.raises(kind) as caught:
                        await call()
                    first = str(caught.value).splitlines()[0]
                    assert first.startswith(head + cause), first
                srv.faults.drop_next(1, route=route)
                with pytest.raises(TransientBackendError) as caught:
                    await call()
                assert str(caught.value).startswith(head + "connection closed without an answer"), str(caught.value)
                await call()  # faults used up
            with pytest.raises(PermanentBackendError) as caught:
                await backend.query("Nope | count", {})
            first = str(caught.value).splitlines()[0]
            assert first.startswith(f"query to {srv.uri} (database {DB}) failed: a table the query needs is missing")
        finally:
            await backend.close()


# --------------------------------------------------------------------------- repr


def test_the_savers_repr_shows_the_backend_and_no_secret() -> None:
    assert repr(KustoSaver.embedded("x.duckdb")) == "KustoSaver(backend=EmbeddedBackend(path='x.duckdb'))"
    assert repr(AsyncKustoSaver.embedded()) == "AsyncKustoSaver(backend=EmbeddedBackend(path=':memory:'))"
    saver = AsyncKustoSaver.from_connection_string("https://c1.westeurope.kusto.windows.net", "db")
    assert repr(saver) == (
        "AsyncKustoSaver(backend=KustoBackend(cluster='https://c1.westeurope.kusto.windows.net', "
        "database='db', ingest_mode='streaming'))"
    )
    secret = "s3cr3t-app-key"
    saver = KustoSaver.from_connection_string(
        credential=f"Data Source=https://c2.kusto.windows.net;Initial Catalog=db2;AAD Federated Security=True;"
        f"Application Client Id=11111111-2222-3333-4444-555555555555;Application Key={secret};Authority Id=t",
        ingest_mode="queued",
    )
    assert repr(saver) == (
        "KustoSaver(backend=KustoBackend(cluster='https://c2.kusto.windows.net', database='db2', ingest_mode='queued'))"
    )


# --------------------------------------------------------------------------- every error is ours


def test_every_exported_error_is_the_packages_and_is_in_the_readme() -> None:
    errors = [getattr(package, n) for n in package.__all__ if n.endswith("Error")]
    assert len(errors) >= 15
    text = README.read_text()
    section = text[text.index("\n## Errors\n"):]
    section = section[: section.index("\n## ", 1)]
    for cls in errors:
        assert issubclass(cls, KustoCheckpointError), cls
        assert f"`{cls.__name__}`" in section, f"{cls.__name__} is not in the README's Errors section"


# --------------------------------------------------------------------------- threads and DuckDB at close


def _threads() -> set[threading.Thread]:
    return set(threading.enumerate())


def test_closing_a_kusto_saver_joins_its_threads_and_closes_duckdb(tmp_path: Path) -> None:
    path = str(tmp_path / "s.duckdb")
    before = _threads()
    with KustoSaver.embedded(path) as saver:
        for _ in range(5):
            _put_one(saver)
        saver.flush()
        assert saver.get_tuple(CONFIG) is not None
        assert len(_threads() - before) >= 2  # the portal's and at least one worker thread
    assert _threads() - before == set()  # every thread it started has ended
    assert saver.backend._con is None
    # DuckDB let go of the file: another process can open it at once
    proc = _child("import duckdb, sys; print(duckdb.connect(sys.argv[1]).execute('select count(*) from Checkpoints').fetchone()[0])", path)
    assert proc.returncode == 0 and proc.stdout.strip() == "5", proc.stderr


def test_a_kusto_saver_left_open_is_closed_at_exit(tmp_path: Path) -> None:
    """Without `with` and without close(): the process still exits (it used to hang in the
    portal's finalizer), every accepted row is in the store, and it says what happened."""
    path = str(tmp_path / "s.duckdb")
    proc = _child(
        """
        import sys
        from langgraph.checkpoint.base import empty_checkpoint
        from langgraph.checkpoint.kusto import KustoSaver

        saver = KustoSaver.embedded(sys.argv[1]).__enter__()
        for i in range(3):
            saver.put({"configurable": {"thread_id": "t", "checkpoint_ns": ""}}, empty_checkpoint(), {}, {})
        print("done", flush=True)
        """,
        path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done"
    assert "was still open at interpreter exit: closing it" in proc.stderr
    assert "terminate called" not in proc.stderr and "FATAL" not in proc.stderr
    con = duckdb.connect(path)
    try:
        assert con.execute("select count(*) from Checkpoints").fetchone()[0] == 3
    finally:
        con.close()


def test_an_async_saver_left_open_leaves_a_closed_store_at_exit(tmp_path: Path) -> None:
    """The loop ended without leaving `async with`: the store is still closed at exit."""
    path = str(tmp_path / "s.duckdb")
    proc = _child(
        """
        import asyncio, sys
        from langgraph.checkpoint.base import empty_checkpoint
        from langgraph.checkpoint.kusto import AsyncKustoSaver

        async def main():
            saver = AsyncKustoSaver.embedded(sys.argv[1])
            await saver.__aenter__()
            await saver.aput({"configurable": {"thread_id": "t", "checkpoint_ns": ""}}, empty_checkpoint(), {}, {})
            await saver.flush()

        asyncio.run(main())
        """,
        path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "terminate called" not in proc.stderr and "FATAL" not in proc.stderr
    con = duckdb.connect(path)
    try:
        assert con.execute("select count(*) from Checkpoints").fetchone()[0] == 1
    finally:
        con.close()


EXITER = """
import sys, threading
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.kusto import KustoSaver

def busy():  # contends for the GIL while the saver closes and the interpreter exits
    while True:
        sum(range(1000))

cfg = {"configurable": {"thread_id": "t", "checkpoint_ns": ""}}
with KustoSaver.embedded(sys.argv[1], flush_interval=0.001) as saver:
    for i in range(10):
        cfg = saver.put(cfg, empty_checkpoint(), {"step": i}, {})
        saver.put_writes(cfg, [("c", i)], f"task{i}")
    saver.get_tuple(cfg)
    threading.Thread(target=busy, daemon=True).start()
if sys.argv[2] == "forget":  # a second saver, never closed
    KustoSaver.embedded(sys.argv[1] + ".2").__enter__().put(cfg, empty_checkpoint(), {}, {})
"""


@pytest.mark.slow  # about 20-50 s: 20 interpreters, 4 at a time
def test_processes_that_used_the_sync_saver_exit_cleanly(tmp_path: Path) -> None:
    """20 runs of a small script on ``KustoSaver.embedded(file)`` (half of them also leaving
    a second saver open), 4 at a time, a busy thread in each contending for the GIL while the
    saver closes and the interpreter exits: every one exits with code 0
    and says nothing of a thread torn down inside C++ at exit ("terminate called after
    throwing an instance of ''", "FATAL: exception not rethrown")."""
    script = tmp_path / "exiter.py"
    script.write_text(EXITER)
    runs = 20

    def run(i: int) -> tuple[int, str]:
        proc = subprocess.run(
            [sys.executable, str(script), str(tmp_path / f"s{i}.duckdb"), "forget" if i % 2 else "close"],
            capture_output=True, text=True, timeout=50,  # a hang at exit fails here
        )
        return proc.returncode, proc.stderr

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(runs)))
    for i, (code, err) in enumerate(results):
        assert "terminate called" not in err and "FATAL" not in err and "Traceback" not in err, (i, err)
        assert code == 0, (i, code, err)
