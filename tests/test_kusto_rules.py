"""Kusto's own rules for credentials, provisioning, control commands, deletion and limits,
proved through the real azure-kusto SDKs against the loopback endpoint
(tests/kusto_loopback.py), which enforces each rule as Microsoft documents it, and through
Kusto.Language (tests/kql_checker.py) where the rule is about KQL text.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kql_checker  # noqa: E402

from langgraph.checkpoint.kusto.engine import kql, schema  # noqa: E402
from langgraph.checkpoint.kusto.engine.records import TombstoneRec  # noqa: E402

needs_node = pytest.mark.skipif(not kql_checker.node_available(), reason=kql_checker.NODE_MISSING_REASON)

#: values a user may put in a thread id, namespace, checkpoint id or run id
HOSTILE = [
    "",
    "plain",
    "it's",
    'say "hi"',
    "back\\slash \\' \\\" \\",
    "\\",
    "ends with a backslash\\",
    "multi\nline\r\nand\ttab",
    "NUL \x00 inside, and \x01\x1f\x7f\x85",
    "line separators \u2028 \u2029",
    '"; .drop table Checkpoints',
    "'; .drop table Checkpoints //",
    '"); .drop table Checkpoints <| print 1',
    "pipe | take 1 | where 1 == 1",
    "non-ASCII: é ü ß 中文 🙂 \U0001f600",
    "\\u0041 is not an escape here",
    "```triple backticks```",
    "x" * 100_000,
]


# --------------------------------------------------------------------------- literals


def test_literal_writes_each_kind_as_kusto_reads_it() -> None:
    import datetime as dt

    assert kql.literal("a\"b\\c\nd") == '"a\\"b\\\\c\\nd"'
    assert kql.literal(dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.timezone.utc)) == (
        "datetime(2024-05-06T07:08:09.1234560Z)"
    )
    assert kql.literal(5) == "long(5)" and kql.literal(True) == "bool(true)"
    with pytest.raises(TypeError):
        kql.literal(1.5)
    for value in HOSTILE:
        text = kql.literal(value)
        assert "\n" not in text and "\r" not in text and "\x00" not in text
        # the inverse the embedded store uses reads back exactly the value
        assert kql.literals_as_parameters(f"T | where a == {text}") == ("T | where a == lit0", {"lit0": value})
    # datetimes too, after the strings (a string that looks like one stays a string)
    when = dt.datetime(2024, 5, 6, 7, 8, 9, 123456)
    looks = 'x"datetime(2020-01-01T00:00:00.0000000Z)'
    text = f"T | where a == {kql.literal(looks)} and w < {kql.literal(when)}"
    assert kql.literals_as_parameters(text) == ("T | where a == lit0 and w < lit_at0", {"lit0": looks, "lit_at0": when})


@needs_node
def test_every_literal_decodes_exactly_through_kusto_language() -> None:
    """Kusto.Language, the parser behind Azure Data Explorer, reads each literal back as
    exactly the value (its LiteralValue), and finds no error in ``print x = <literal>``.
    String literal rules: https://learn.microsoft.com/kusto/query/scalar-data-types/string"""
    items = [(f"v{i}", f"print x = {kql.literal(v)}") for i, v in enumerate(HOSTILE)]
    result = kql_checker.string_literals(items)
    for i, value in enumerate(HOSTILE):
        diagnostics, literals = result[f"v{i}"]
        assert not kql_checker.errors(diagnostics), (value[:80], diagnostics)
        assert literals == [value], value[:80]


def _hostile_tombs() -> list[TombstoneRec]:
    tombs = []
    for i, v in enumerate(HOSTILE[:-1]):
        tombs.append(TombstoneRec(schema.SCOPE_THREAD, thread_id=v, deleted_at=1_700_000_000_000_000 + i))
        tombs.append(TombstoneRec(schema.SCOPE_CHECKPOINT, thread_id=v, checkpoint_ns=v[::-1],
                                  checkpoint_id=v + "c", deleted_at=5 + i))
        tombs.append(TombstoneRec(schema.SCOPE_RUN, run_id=v + "r", deleted_at=7))
    return tombs


def _expected_literals(table: str, tombs: list[TombstoneRec]) -> list[str]:
    out: list[str] = []
    for t in tombs:
        if t.scope == schema.SCOPE_THREAD:
            out.append(t.thread_id)
        elif t.scope == schema.SCOPE_CHECKPOINT and table in (schema.CHECKPOINTS.name, schema.WRITES.name):
            out += [t.thread_id, t.checkpoint_ns, t.checkpoint_id]
        elif t.scope == schema.SCOPE_RUN and table == schema.CHECKPOINTS.name:
            out.append(t.run_id)
    return out


@needs_node
def test_compaction_commands_carry_exact_literals_and_bind() -> None:
    """Every control command the product sends with user values (compaction's soft
    deletes, and the same on the LatestCheckpoints view) parses and binds in
    Kusto.Language, and its literals read back as exactly the user's values, in order."""
    from langgraph.checkpoint.kusto.engine.backends.kusto import latest_view_deletion

    tombs = _hostile_tombs()
    items, expected = [], {}
    for table in (schema.CHECKPOINTS.name, schema.WRITES.name, schema.BLOBS.name):
        text, params = kql.compaction_command(table, tombs)
        assert params == {} and "declare" not in text
        items.append((table, text))
        expected[table] = _expected_literals(table, tombs)
    view = latest_view_deletion(items[0][1])
    assert view is not None
    items.append(("view", view))
    expected["view"] = expected[schema.CHECKPOINTS.name]
    parsed = kql_checker.string_literals(items)
    bound = kql_checker.check_kql(items)
    for name, text in items:
        diagnostics, literals = parsed[name]
        assert not kql_checker.errors(bound[name]), kql_checker.format_diagnostics(text, bound[name])
        assert literals == expected[name], name


# --------------------------------------------------------------------------- credentials

import time  # noqa: E402
from collections import Counter  # noqa: E402

import anyio  # noqa: E402
from azure.core.credentials import AccessToken  # noqa: E402
from azure.core.exceptions import ClientAuthenticationError  # noqa: E402
from langgraph.checkpoint.base import empty_checkpoint  # noqa: E402
from kusto_loopback import LoopbackKusto  # noqa: E402

from langgraph.checkpoint.kusto import AsyncKustoSaver  # noqa: E402
from langgraph.checkpoint.kusto.engine.backends.kusto import (  # noqa: E402
    TOKEN_REFRESH_SECONDS,
    KustoBackend,
)

DB = "checkpoints"
FAST = {"flush_interval": 0.01, "retry_backoff": 0.01, "retry_backoff_max": 0.05}


class IssuingCredential:
    """A real azure-core TokenCredential: issues tokens the loopback accepts, counts
    ``get_token`` per scope and ``close()``, and refuses tokens once closed (as a closed
    azure-identity credential can no longer reach its token source)."""

    def __init__(self, accepted: set[str], lifetime: float = 3600.0) -> None:
        self.accepted = accepted
        self.lifetime = lifetime
        self.calls: Counter[tuple[str, ...]] = Counter()
        self.closes = 0

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        if self.closes:
            raise ClientAuthenticationError("this credential was closed")
        self.calls[scopes] += 1
        token = f"token-{sum(self.calls.values())}"
        self.accepted.add(token)
        return AccessToken(token, int(time.time() + self.lifetime))

    def close(self) -> None:
        self.closes += 1

    def __enter__(self) -> IssuingCredential:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def tls_loopback(monkeypatch: pytest.MonkeyPatch) -> Any:
    """An https loopback that refuses requests without a token it accepts; requests (the
    SDK's HTTP client) trusts its certificate through REQUESTS_CA_BUNDLE."""

    async def start() -> LoopbackKusto:
        srv = LoopbackKusto(database=DB, tls=True, bearer_tokens=set())
        await anyio.to_thread.run_sync(srv.start)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", srv.ca_file or "")
        return srv

    return start


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_saver_never_closes_a_credential_it_did_not_create(tls_loopback: Any) -> None:
    """The SDK's client ``close()`` closes the credential it was given
    (azure-kusto-data/azure/kusto/data/client.py ``close`` -> ``_AadHelper.close`` ->
    ``AzureIdentityTokenCredentialProvider.close``): closing a saver, or ``setup()`` on a
    closed one, must not close the caller's credential, which the caller goes on using."""
    srv = await tls_loopback()
    try:
        cred = IssuingCredential(srv.bearer_tokens)
        backend = KustoBackend(srv.uri, DB, credential=cred)
        assert (await backend.setup(create=True)).ok  # opens and closes its own clients
        assert cred.closes == 0
        for _ in range(2):  # a saver closed, then used again
            saver = AsyncKustoSaver(backend, **FAST)
            async with saver:
                cfg = {"configurable": {"thread_id": "t", "checkpoint_ns": ""}}
                await saver.aput(cfg, empty_checkpoint(), {"step": 1}, {})
                await saver.flush()
                assert await saver.aget_tuple(cfg) is not None
            assert cred.closes == 0
            assert (await backend.setup()).ok  # setup() on a closed saver
            assert cred.closes == 0
        assert all(a is not None and a.startswith("Bearer token-") for a in srv.authorizations)
        assert srv.errors == []
    finally:
        await anyio.to_thread.run_sync(srv.stop)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_tokens_are_cached_per_scope_until_shortly_before_expiry(tls_loopback: Any) -> None:
    """The SDK asks for a token on every request (``AzureIdentityTokenCredentialProvider.
    _get_token_from_cache_impl`` returns None in azure-kusto-data's _token_providers.py) and
    ``AzureCliCredential`` does not cache: N requests cost one ``get_token`` per scope, and
    a token inside azure-core's refresh window (DEFAULT_REFRESH_WINDOW_SECONDS) is renewed."""
    srv = await tls_loopback()
    try:
        lasting = IssuingCredential(srv.bearer_tokens, lifetime=3600)
        backend = KustoBackend(srv.uri, DB, credential=lasting)
        await backend.setup(create=True)
        await backend.open()
        try:
            for _ in range(10):
                assert await backend.query("print x = 1", {}) == [{"x": 1}]
        finally:
            await backend.close()
        requests = len(srv.authorizations)
        assert requests > 10 + len(lasting.calls)
        assert set(lasting.calls.values()) == {1}, lasting.calls  # one token per scope, ever
        assert len(set(srv.authorizations)) == len(lasting.calls)

        expiring = IssuingCredential(srv.bearer_tokens, lifetime=TOKEN_REFRESH_SECONDS - 60)
        backend = KustoBackend(srv.uri, DB, credential=expiring)
        await backend.open()
        try:
            for _ in range(3):
                await backend.query("print x = 1", {})
        finally:
            await backend.close()
        assert sum(expiring.calls.values()) == 3  # near expiry: renewed at each request
        assert srv.errors == []
    finally:
        await anyio.to_thread.run_sync(srv.stop)


# --------------------------------------------------------------------------- provisioning


async def _first_put(srv: LoopbackKusto, **options: Any) -> None:
    saver = AsyncKustoSaver.from_connection_string(cluster_uri=srv.uri, database=DB, **{**FAST, **options})
    async with saver:
        cfg = {"configurable": {"thread_id": "t", "checkpoint_ns": ""}}
        await saver.aput(cfg, empty_checkpoint(), {"step": 1}, {})
        await saver.flush()


@pytest.mark.anyio
async def test_streaming_ingestion_works_at_once_after_setup_create() -> None:
    """Streaming ingestion nodes cache the schema: a new mapping is unknown to them for
    minutes unless '.clear database cache streamingingestion schema' runs
    (https://learn.microsoft.com/kusto/management/data-ingestion/streaming-ingestion-schema-changes).
    The loopback refuses the new mapping for an hour; setup(create=True) clears the cache."""
    async with LoopbackKusto(database=DB, schema_cache_seconds=3600) as srv:
        backend = KustoBackend(srv.uri, DB)
        report = await backend.setup(create=True)
        assert report.ok and not report.warnings, report
        sent = [r.csl for r in srv.requests if r.csl]
        assert ".clear database cache streamingingestion schema" in sent
        await _first_put(srv)
        assert len(srv.rows("Checkpoints")) == 1
        assert srv.errors == []


@pytest.mark.anyio
async def test_mapping_not_found_is_retried_for_a_bounded_time_after_provisioning() -> None:
    """If clearing the cache fails on a node, setup warns, and the saver retries a 'mapping
    not found' for ``schema_cache_grace`` seconds after provisioning; after that it is the
    permanent error it is."""
    # the schema cache outlasts the rest of provisioning (functions, policies) after the mapping
    async with LoopbackKusto(database=DB, schema_cache_seconds=3.0) as srv:
        srv.schema_cache_clear_failures = 3
        backend = KustoBackend(srv.uri, DB)
        report = await backend.setup(create=True)
        assert report.ok and any("streamingingestion schema" in w for w in report.warnings), report
        saver = AsyncKustoSaver(backend, flush_interval=0.01, retry_backoff=0.1, retry_backoff_max=0.3,
                                max_retries=40)
        async with saver:
            cfg = {"configurable": {"thread_id": "t", "checkpoint_ns": ""}}
            await saver.aput(cfg, empty_checkpoint(), {"step": 1}, {})
            await saver.flush()  # refused at first, then accepted once the cache caught up
        refused = [r for r in srv.requests if r.route == "ingest" and r.status == 400]
        assert refused and len(srv.rows("Checkpoints")) == 1
        # outside the grace window the same refusal is permanent
        backend.schema_cache_grace = 0.0
        with srv._lock:
            srv._schema_changed("Checkpoints")
        from langgraph.checkpoint.kusto import IngestError

        saver = AsyncKustoSaver(backend, **FAST)
        with pytest.raises(IngestError, match="mapping"):
            async with saver:
                await saver.aput(cfg, empty_checkpoint(), {"step": 2}, {})
                await saver.flush()
        assert srv.errors == []


# --------------------------------------------------------------------------- deletion


async def _put_thread(saver: AsyncKustoSaver, thread_id: str, steps: int = 2) -> None:
    cfg: dict[str, Any] = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    for step in range(steps):
        c = empty_checkpoint()
        c["channel_values"] = {"messages": [f"m{i}" for i in range(step + 1)]}
        version = saver.get_next_version(None, None) if step == 0 else f"{step + 1}"
        c["channel_versions"] = {"messages": version}
        cfg = await saver.aput(cfg, c, {"step": step}, {"messages": version})
        await saver.aput_writes(cfg, [("messages", f"pending {step}")], task_id=f"task{step}")


def _cfg(thread_id: str) -> Any:
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}


def _saver(srv: LoopbackKusto, **options: Any) -> AsyncKustoSaver:
    return AsyncKustoSaver.from_connection_string(
        cluster_uri=srv.uri, database=DB, **{**FAST, "compaction_interval": 0, **options})


@pytest.mark.anyio
async def test_compaction_resumes_from_the_tombstones_table_after_a_restart() -> None:
    """What was deleted before a restart is compacted after it: pending = tombstones
    without a 'done' row in Compactions, not a list in one process's memory."""
    async with LoopbackKusto(database=DB) as srv:
        await KustoBackend(srv.uri, DB).setup(create=True)
        async with _saver(srv) as saver:
            await _put_thread(saver, "gone")
            await _put_thread(saver, "kept")
            await saver.adelete_thread("gone")
            await saver.flush()
        assert {r["thread_id"] for r in srv.rows("Checkpoints")} == {"gone", "kept"}
        async with _saver(srv) as saver:  # a new process
            assert await saver.engine.compact() == 1
            assert await saver.aget_tuple({"configurable": {"thread_id": "kept"}}) is not None
        for table in ("Checkpoints", "CheckpointBlobs", "CheckpointWrites"):
            assert {r["thread_id"] for r in srv.rows(table)} == {"kept"}, table
        done = [r for r in srv.rows("Compactions") if r["entry"] == "done"]
        assert [(r["scope"], r["thread_id"]) for r in done] == [("thread", "gone")]
        async with _saver(srv) as saver:  # and nothing is compacted twice
            assert await saver.engine.compact() == 0
        assert len([r for r in srv.requests if r.csl and r.csl.startswith(".delete table")]) == 4  # one per data table
        assert srv.errors == []


@pytest.mark.anyio
async def test_compaction_goes_in_batches_one_table_at_a_time() -> None:
    async with LoopbackKusto(database=DB) as srv:
        await KustoBackend(srv.uri, DB).setup(create=True)
        srv.soft_delete_seconds = 0.05  # a second soft delete on a table meanwhile is refused
        async with _saver(srv, compaction_batch=2) as saver:
            for i in range(5):
                await _put_thread(saver, f"gone{i}", steps=1)
            await _put_thread(saver, "kept", steps=1)
            await saver.engine.delete_threads([f"gone{i}" for i in range(5)])
            await saver.flush()
            assert await saver.engine.compact() == 5
        deletes = [r.csl for r in srv.requests if r.csl and r.csl.startswith(".delete ")]
        # 3 batches (2, 2, 1) x (Checkpoints, its view, CheckpointWrites, CheckpointBlobs, Touches)
        assert len(deletes) == 15 and srv.soft_delete_refusals == []
        assert [d.count(" or ") + 1 for d in deletes if d.startswith(".delete table Checkpoints")] == [2, 2, 1]
        for table in ("Checkpoints", "CheckpointBlobs", "CheckpointWrites"):
            assert {r["thread_id"] for r in srv.rows(table)} == {"kept"}, table
        assert srv.errors == []


def test_the_loopback_refuses_a_second_concurrent_soft_delete_on_a_table() -> None:
    import threading

    from azure.kusto.data import KustoClient
    from azure.kusto.data.exceptions import KustoServiceError

    with LoopbackKusto(database=DB) as srv:
        with KustoClient(srv.kcsb()) as client:
            client.execute_mgmt(DB, ".create table T (a:string)")
            client.execute_mgmt(DB, ".create table U (a:string)")
        srv.soft_delete_seconds = 0.5
        outcomes: list[str] = []

        def delete(table: str) -> None:
            with KustoClient(srv.kcsb()) as client:
                try:
                    client.execute_mgmt(DB, f'.delete table {table} records <| {table} | where a == "x"')
                    outcomes.append(f"{table} ok")
                except KustoServiceError:
                    outcomes.append(f"{table} refused")

        workers = [threading.Thread(target=delete, args=(t,)) for t in ("T", "T", "U")]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert sorted(outcomes) == ["T ok", "T refused", "U ok"]  # other tables may run in parallel
        assert srv.soft_delete_refusals == ["T"]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_replicas_compact_one_at_a_time_under_a_lease() -> None:
    """Three replica processes on one database, each deleting threads and ticking its
    compaction: one soft delete at a time (the loopback refuses a second one on the same
    table, holding each for 0.3 s), one winner per term, and every deleted thread's rows
    end up removed whichever replica deleted them."""
    async with LoopbackKusto(database=DB) as srv:
        await KustoBackend(srv.uri, DB).setup(create=True)
        srv.soft_delete_seconds = 0.3
        # batches of one: a pass (3 batches x 4 soft deletes x 0.3 s) outlasts half the
        # interval, so the winner's lease renewals are what keeps the others out
        options = {"compaction_interval": 3.0, "compaction_lease_settle": 0.3, "compaction_batch": 1}
        savers = [_saver(srv, **options) for _ in range(3)]
        async with savers[0], savers[1], savers[2]:
            for i, saver in enumerate(savers):
                await _put_thread(saver, f"gone{i}")
                await _put_thread(saver, f"kept{i}")
                await saver.adelete_thread(f"gone{i}")
                await saver.flush()
            with anyio.fail_after(60):
                while len([r for r in srv.rows("Compactions") if r["entry"] == "done"]) < 3:
                    await anyio.sleep(0.2)
            failures = [s.engine.stats()["compaction_failures"] for s in savers]
        assert srv.soft_delete_refusals == [] and failures == [0, 0, 0]
        for table in ("Checkpoints", "CheckpointBlobs", "CheckpointWrites"):
            assert {r["thread_id"] for r in srv.rows(table)} == {"kept0", "kept1", "kept2"}, table
        claims: dict[int, set[str]] = {}
        for r in srv.rows("Compactions"):
            if r["entry"] == "lease":
                claims.setdefault(r["term"], set()).add(r["owner"])
        done_by = {r["owner"] for r in srv.rows("Compactions") if r["entry"] == "done"}
        # whoever compacted had the smallest claim of its term
        assert done_by and all(any(o == min(c) for c in claims.values()) for o in done_by)
        assert srv.errors == []


# --------------------------------------------------------------------------- Microsoft Fabric


def test_fabric_is_recognised_by_its_query_uri() -> None:
    fabric = KustoBackend("https://trd-abc123.z0.kusto.fabric.microsoft.com", "db", credential=IssuingCredential(set()))
    adx = KustoBackend("https://mycluster.westeurope.kusto.windows.net", "db", credential=IssuingCredential(set()))
    assert fabric.fabric and not adx.fabric


@pytest.mark.anyio
async def test_on_fabric_provisioning_and_compaction_degrade_with_a_clear_message(caplog: Any) -> None:
    """Where an Eventhouse refuses an optional command (policies, the dashboards' view) or
    soft delete, setup() skips it with a warning and compaction stops with an error in the
    log, instead of failing; reads stay correct through tombstones (docs/kusto.md)."""
    async with LoopbackKusto(database=DB) as srv:
        srv.refuse_commands = [r"\.alter(-merge)? table \w+ policy (retention|caching)", r"\.delete "]
        backend = KustoBackend(srv.uri, DB)
        backend.fabric = True  # the loopback's host is 127.0.0.1: say what the URI would
        report = await backend.setup(create=True)
        assert report.ok
        skipped = [w for w in report.warnings if "Microsoft Fabric refused" in w]
        assert len(skipped) == 2 * len(schema.TABLES), report.warnings
        saver = AsyncKustoSaver(backend, **{**FAST, "compaction_interval": 0})
        with caplog.at_level("ERROR", logger="langgraph.checkpoint.kusto.compaction"):
            async with saver:
                await _put_thread(saver, "gone")
                await saver.adelete_thread("gone")
                await saver.flush()
                assert await saver.engine.compact() == 0
                assert await saver.aget_tuple({"configurable": {"thread_id": "gone"}}) is None
                assert await saver.engine.compact() == 0  # off: not tried again
        assert "Microsoft Fabric refused the soft delete" in caplog.text
        assert len([r for r in srv.requests if r.csl and r.csl.startswith(".delete ")]) == 1
        # on Azure Data Explorer the same refusal of a table's command fails setup
        adx = KustoBackend(srv.uri, DB)
        with pytest.raises(Exception, match="provision.kql failed"):
            await adx.setup(create=True)


# --------------------------------------------------------------------------- limits


def test_timeouts_are_capped_at_the_services_one_hour() -> None:
    """A request runs at most an hour (https://learn.microsoft.com/kusto/concepts/query-limits,
    limit on request execution time)."""
    from langgraph.checkpoint.kusto.engine.errors import ConfigError

    cred = IssuingCredential(set())
    for name in ("query_timeout", "command_timeout"):
        assert getattr(KustoBackend("https://c.kusto.windows.net", "db", credential=cred, **{name: 3600}), name) == 3600
        with pytest.raises(ConfigError, match=f"{name} must be a number of seconds in \\(0, 3600\\]"):
            KustoBackend("https://c.kusto.windows.net", "db", credential=cred, **{name: 3601})
    saver = AsyncKustoSaver.from_connection_string("https://c.kusto.windows.net", "db", credential=cred,
                                                   command_timeout=1800)
    assert saver.backend.command_timeout == 1800


def test_kusto_defaults_to_streaming_ingestions_share_of_a_small_cluster() -> None:
    """6 concurrent streaming ingestions per core (12 on a 2-core SKU:
    https://learn.microsoft.com/azure/data-explorer/ingest-data-streaming): a saver's
    default leaves room for a second replica on the smallest cluster."""
    saver = AsyncKustoSaver.from_connection_string("https://c.kusto.windows.net", "db",
                                                   credential=IssuingCredential(set()))
    assert saver.options.ingest_concurrency == 6 and 2 * 6 <= 12


@pytest.mark.anyio
async def test_throttling_backs_off_for_retry_after_on_every_slot() -> None:
    """A 429 with Retry-After: no request of any slot reaches the service before it has
    passed (no retry storm), then everything is ingested."""
    async with LoopbackKusto(database=DB) as srv:
        await KustoBackend(srv.uri, DB).setup(create=True)
        srv.retry_after = "1"
        async with _saver(srv, ingest_concurrency=4, batch_size=1, max_retries=8) as saver:
            srv.faults.fail_next(1, status=429, route="ingest")
            await saver.aput(_cfg("t0"), empty_checkpoint(), {}, {})  # one batch: refused
            with anyio.fail_after(10):
                while not any(r.status == 429 for r in srv.requests):
                    await anyio.sleep(0.01)
            await anyio.sleep(0.1)  # the client has the answer: the other slots must wait too
            for i in range(1, 4):
                await saver.aput(_cfg(f"t{i}"), empty_checkpoint(), {}, {})
            await saver.flush()
        ingests = [r for r in srv.requests if r.route == "ingest"]
        [refused] = [r for r in ingests if r.status == 429]
        later = [r for r in ingests if r.received > refused.received]
        assert len(later) == 4 and all(r.received - refused.received >= 0.95 for r in later), [
            round(r.received - refused.received, 3) for r in later]
        assert len(srv.rows("Checkpoints")) == 4
        assert srv.errors == []


@pytest.mark.anyio
async def test_throttling_without_retry_after_backs_off_exponentially() -> None:
    from langgraph.checkpoint.kusto.engine.backends.kusto import _retry_after_seconds

    assert _retry_after_seconds({"Retry-After": "7"}) == 7.0
    assert _retry_after_seconds({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert _retry_after_seconds({}) is None and _retry_after_seconds({"Retry-After": "soon"}) is None
    async with LoopbackKusto(database=DB) as srv:
        await KustoBackend(srv.uri, DB).setup(create=True)
        backend = KustoBackend(srv.uri, DB)
        async with AsyncKustoSaver(backend, **{**FAST, "max_retries": 8, "compaction_interval": 0}) as saver:
            srv.faults.fail_next(3, status=429, route="ingest")
            await _put_thread(saver, "t", steps=1)
            await saver.flush()
            assert backend._throttle_streak == 0  # reset by the success
        ingests = [r for r in srv.requests if r.route == "ingest"]
        gaps = [b.received - a.received for a, b in zip(ingests, ingests[1:]) if a.status == 429]
        assert len(gaps) == 3 and len(srv.rows("Checkpoints")) == 1


# --------------------------------------------------------------------------- docs/kusto.md


@needs_node
def test_the_kql_in_docs_kusto_md_parses_and_binds() -> None:
    import re

    text = (Path(__file__).resolve().parent.parent / "docs" / "kusto.md").read_text()
    blocks = re.findall(r"^```kql\n(.*?)^```", text, re.S | re.M)
    assert len(blocks) >= 3
    items = [(f"block{i}", b.strip()) for i, b in enumerate(blocks)]
    result = kql_checker.check_kql(items)
    for name, block in items:
        assert not kql_checker.errors(result[name]), kql_checker.format_diagnostics(block, result[name])
    # the compaction example is what compaction_command writes
    tombs = [TombstoneRec(schema.SCOPE_THREAD, thread_id='it\'s "x"', deleted_at=1714979289123456),
             TombstoneRec(schema.SCOPE_RUN, run_id="r1")]
    assert kql.compaction_command("Checkpoints", tombs)[0] in [b.strip() for b in blocks]
    assert kql.LEASE_QUERY in [b.strip() for b in blocks]
