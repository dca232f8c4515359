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
    async with LoopbackKusto(database=DB, schema_cache_seconds=0.6) as srv:
        srv.schema_cache_clear_failures = 3
        backend = KustoBackend(srv.uri, DB)
        report = await backend.setup(create=True)
        assert report.ok and any("streamingingestion schema" in w for w in report.warnings), report
        saver = AsyncKustoSaver(backend, flush_interval=0.01, retry_backoff=0.1, retry_backoff_max=0.3,
                                max_retries=20)
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
