"""The Kusto backend through the real azure-kusto SDKs, against the loopback endpoint
(tests/kusto_loopback.py), and against a live cluster when one is configured.

Every loopback test starts its own endpoint and provisions it with provision.kql through
``setup(create=True)``. The live-cluster tests (conformance, a put/get round trip,
a short load run) run only when ``KUSTO_CLUSTER_URI`` and ``KUSTO_DATABASE`` are set
(authentication: DefaultAzureCredential; ``KUSTO_INGEST_MODE`` picks the ingest mode,
``KUSTO_INGEST_URI`` the data management endpoint, ``KUSTO_PROVISION=1`` runs
provision.kql first; ``KUSTO_LOAD_AGENTS`` / ``KUSTO_LOAD_STEPS`` size the load run).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import os
import random
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from azure.kusto.data import KustoClient, KustoConnectionStringBuilder
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.base.id import uuid6
from langgraph.checkpoint.conformance import checkpointer_test, validate

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kql_checker  # noqa: E402
from kusto_loopback import LoopbackKusto, decode_parameter  # noqa: E402
from kusto_loopback import encode_parameter as reference_encode  # noqa: E402

from langgraph.checkpoint.kusto import AsyncKustoSaver, IngestError, KustoSaver  # noqa: E402
from langgraph.checkpoint.kusto.engine import schema  # noqa: E402
from langgraph.checkpoint.kusto.engine.backends.kusto import (  # noqa: E402
    KustoBackend,
    SchemaError,
    check_mapping,
    declared_parameters,
    encode_parameter,
    latest_view_deletion,
    provision_commands,
    row_to_json,
    split_payloads,
)
from langgraph.checkpoint.kusto.engine.errors import (  # noqa: E402
    ConfigError,
    PermanentBackendError,
    TransientBackendError,
)
from langgraph.checkpoint.kusto.engine.records import JsonText  # noqa: E402

DB = "checkpoints"
UTC = dt.timezone.utc

#: Strings that break anything that splices values into KQL text.
TRICKY = [
    "plain",
    "it's",
    'say "hi"',
    "back\\slash \\' \\\" \\",
    "multi\nline\r\nand\ttab",
    "pipe | take 1",
    "semi; .drop table Checkpoints",
    "'; .drop table Checkpoints //",
    '"); .drop table Checkpoints <| print 1',
    ".drop table CheckpointBlobs",
    "non-ASCII: é ü ß 中文 🙂",
    "  padded  ",
    '{"json": [1, 2]}',
    "dynamic(['x'])",
    "datetime(2020-01-01)",
    "$kqlp0 ? %s {0}",
    "ctrl \x00\x07\x7f\u2028 end",
]

#: engine options that make the tests quick
FAST = {"flush_interval": 0.01, "retry_backoff": 0.01, "retry_backoff_max": 0.05}


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])


@asynccontextmanager
async def loopback(provision: bool = True, **options: Any) -> AsyncIterator[LoopbackKusto]:
    """A loopback Kusto endpoint, provisioned with provision.kql through setup(create=True)."""
    async with LoopbackKusto(database=DB, **options) as srv:
        if provision:
            report = await KustoBackend(srv.uri, DB).setup(create=True)
            assert report.ok and report.commands_run == len(provision_commands())
        yield srv
        assert srv.errors == [], f"loopback bugs: {srv.errors!r}"


def saver_for(srv: LoopbackKusto, **options: Any) -> AsyncKustoSaver:
    return AsyncKustoSaver.from_connection_string(cluster_uri=srv.uri, database=DB, **{**FAST, **options})


def mgmt(srv: LoopbackKusto, command: str) -> None:
    with KustoClient(srv.kcsb()) as client:
        client.execute_mgmt(DB, command)


def config(thread_id: str, ns: str = "", checkpoint_id: str | None = None) -> dict[str, Any]:
    conf: dict[str, Any] = {"thread_id": thread_id, "checkpoint_ns": ns}
    if checkpoint_id is not None:
        conf["checkpoint_id"] = checkpoint_id
    return {"configurable": conf}


def checkpoint(saver: Any, step: int, previous: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    c = empty_checkpoint()
    c["id"] = str(uuid6(clock_seq=-1))
    old = (previous or {}).get("channel_versions", {}).get("messages")
    version = saver.get_next_version(old, None)
    c["channel_values"] = {"messages": [f"message {i}" for i in range(step + 1)]}
    c["channel_versions"] = {"messages": version}
    return c, {"messages": version}


async def put_steps(saver: AsyncKustoSaver, thread_id: str, steps: int, ns: str = "", note: str = "") -> list[str]:
    ids, parent, prev = [], None, None
    for step in range(steps):
        c, new_versions = checkpoint(saver, step, prev)
        meta = {"source": "loop", "step": step, "note": note}
        cfg = config(thread_id, ns, parent)
        out = await saver.aput(cfg, c, meta, new_versions)  # type: ignore[arg-type]
        await saver.aput_writes(out, [("messages", f"pending {step} {note}")], task_id=f"task {note} {step}")
        parent, prev = out["configurable"]["checkpoint_id"], c
        ids.append(parent)
    return ids


# --------------------------------------------------------------------------- units


def test_string_parameters_encode_like_the_reference_and_decode_exactly() -> None:
    for value in TRICKY + ["", "a\\", '"', "'", "\\u0041"]:
        mine = encode_parameter(value, "string")
        assert mine == reference_encode(value, "string")
        assert decode_parameter("p", "string", mine) == value


def test_other_parameter_kinds_decode_exactly() -> None:
    when = dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    assert encode_parameter(when, "datetime") == "datetime(2024-05-06T07:08:09.1234560Z)"
    assert decode_parameter("p", "datetime", encode_parameter(when, "datetime")) == when.replace(tzinfo=None)
    naive = dt.datetime(2024, 1, 2, 3, 4, 5)
    assert encode_parameter(naive, "datetime") == "datetime(2024-01-02T03:04:05.0000000Z)"
    assert encode_parameter(1_700_000_000_000_001, "datetime") == "datetime(2023-11-14T22:13:20.0000010Z)"
    aware_other = dt.datetime(2024, 1, 2, 5, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert encode_parameter(aware_other, "datetime") == "datetime(2024-01-02T03:04:05.0000000Z)"
    for value in (True, False):
        assert decode_parameter("p", "bool", encode_parameter(value, "bool")) is value
    for value in (0, -5, 2**62):
        assert decode_parameter("p", "long", encode_parameter(value, "long")) == value
    bag = {"k": TRICKY, "n": [1, 2.5, None, True], "nested": {"x": "'\"|;"}}
    for value in (bag, TRICKY, [], "just a string", 42):
        enc = encode_parameter(value, "dynamic")
        assert enc.startswith("dynamic(") and enc.endswith(")")
        assert json.loads(decode_parameter("p", "dynamic", enc)) == value
    assert encode_parameter(JsonText(b'{"a":1}'), "dynamic") == 'dynamic({"a":1})'
    assert encode_parameter(None, "string") == '""'
    assert encode_parameter(None, "datetime") == "datetime(null)"
    assert encode_parameter(dt.timedelta(days=1, seconds=1, microseconds=5), "timespan") == "timespan(1.00:00:01.0000050)"
    # inferred from the Python type when undeclared
    assert encode_parameter("x") == '"x"' and encode_parameter(3) == "long(3)" and encode_parameter(["a"]) == 'dynamic(["a"])'
    with pytest.raises(TypeError):
        encode_parameter(5, "string")
    with pytest.raises(TypeError):
        encode_parameter("5", "long")
    with pytest.raises(TypeError):
        encode_parameter(1, "bool")


@pytest.mark.skipif(not kql_checker.node_available(), reason=kql_checker.NODE_MISSING_REASON)
def test_encoded_literals_pass_kusto_language() -> None:
    when = dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    literals = [encode_parameter(v, "string") for v in TRICKY]
    literals += [encode_parameter({"k": v, "l": [v, 1]}, "dynamic") for v in TRICKY]
    literals += [encode_parameter(when, "datetime"), encode_parameter(True, "bool"), encode_parameter(-7, "long"),
                 encode_parameter(dt.timedelta(seconds=90), "timespan"), encode_parameter(1.5, "real")]
    items = [(f"v{i}", f"print v = {lit}") for i, lit in enumerate(literals)]
    result = kql_checker.check_kql(items)
    bad = {name: kql_checker.errors(result[name]) for name, _ in items if kql_checker.errors(result[name])}
    assert not bad, bad


@pytest.mark.skipif(not kql_checker.node_available(), reason=kql_checker.NODE_MISSING_REASON)
def test_setup_commands_pass_kusto_language() -> None:
    items = [("schema", ".show database schema as json"), ("db_policy", f".show database {DB} policy streamingingestion")]
    for t in schema.TABLES:
        items += [(f"mappings_{t.name}", f".show table {t.name} ingestion json mappings"),
                  (f"policy_{t.name}", f".show table {t.name} policy streamingingestion")]
    result = kql_checker.check_kql(items, database=DB)
    bad = {name: kql_checker.errors(result[name]) for name, _ in items if kql_checker.errors(result[name])}
    assert not bad, bad


def test_declared_parameters() -> None:
    text = (".delete table T records <| declare query_parameters(t0:string, d0:datetime, ids : dynamic, "
            "n:long = long(5), s:string = 'a,b)'); T | where x == t0")
    assert declared_parameters(text) == {
        "t0": ("string", False), "d0": ("datetime", False), "ids": ("dynamic", False),
        "n": ("long", True), "s": ("string", True)}
    assert declared_parameters("print 1") == {}


def test_row_to_json() -> None:
    row = {
        "thread_id": "t\"\n", "checkpoint_ns": "", "checkpoint_id": "c", "parent_checkpoint_id": None,
        "run_id": "r", "channel_versions": {"a": "1"}, "new_versions": {},
        "metadata": JsonText(b'{"step":1,"note":"\\u00e9"}'), "payload_type": "msgpack", "payload": "AAAA",
        "written_at": 1_700_000_000_123_456, "unknown_column": "ignored",
    }
    doc = orjson.loads(row_to_json(schema.CHECKPOINTS, row))
    assert list(doc) == list(schema.CHECKPOINTS.column_names)
    assert doc["metadata"] == {"step": 1, "note": "é"}
    assert doc["written_at"] == "2023-11-14T22:13:20.1234560Z"
    assert doc["parent_checkpoint_id"] is None and doc["thread_id"] == "t\"\n"
    assert b'"metadata":{"step":1,"note":"\\u00e9"}' in row_to_json(schema.CHECKPOINTS, row)  # embedded raw
    aware = dict(row, written_at=dt.datetime(2024, 1, 1, tzinfo=UTC))
    assert orjson.loads(row_to_json(schema.CHECKPOINTS, aware))["written_at"] == "2024-01-01T00:00:00.0000000Z"


def test_split_payloads() -> None:
    lines = [b"x" * n for n in (100, 200, 300, 5000, 10, 10)]
    bodies = split_payloads(lines, 700)
    assert b"\n".join(bodies) == b"\n".join(lines)
    assert [len(b) for b in bodies] == [100 + 1 + 200 + 1 + 300, 5000, 10 + 1 + 10]
    assert all(len(b) <= 700 or b.count(b"\n") == 0 for b in bodies)
    assert split_payloads([], 700) == []


def test_cell_limit_over_kustos_max_value_size_is_refused() -> None:
    """Kusto cuts a string cell over MaxValueSize (1 MB) without an error: a cell_limit
    above it would store truncated chunks, so the saver refuses it up front."""
    with pytest.raises(ConfigError, match="MaxValueSize"):
        AsyncKustoSaver.from_connection_string("http://127.0.0.1:9", DB, cell_limit=2_000_000)
    assert AsyncKustoSaver.from_connection_string("http://127.0.0.1:9", DB, cell_limit=1_048_576)
    # a column whose encoding policy raised MaxValueSize: say so to the backend
    wide = KustoBackend("http://127.0.0.1:9", DB, max_value_size=4 * 1024 * 1024)
    assert AsyncKustoSaver(wide, cell_limit=2_000_000, max_batch_bytes=4 * 1024 * 1024,
                           max_buffered_bytes=256 * 1024 * 1024).options.cell_limit == 2_000_000
    with pytest.raises(ConfigError, match="max_value_size"):
        KustoBackend("http://127.0.0.1:9", DB, max_value_size=0)


def test_a_bytes_payload_goes_to_kusto_as_base64_text() -> None:
    data = bytes(range(256)) * 3
    line = orjson.loads(row_to_json(schema.BLOBS, {"thread_id": "t", "payload": data, "chunk": 0, "chunks": 1}))
    import base64

    assert base64.b64decode(line["payload"]) == data and line["thread_id"] == "t"


@pytest.mark.anyio
@asyncio_only
async def test_a_row_over_the_streaming_limit_is_refused_before_sending() -> None:
    async with loopback() as srv:
        backend = KustoBackend(srv.uri, DB)
        await backend.open()
        try:
            row = {"scope": "x" * (5 * 1024 * 1024), "deleted_at": 1}
            with pytest.raises(PermanentBackendError, match="cell_limit"):
                await backend.ingest("Tombstones", [row])
            assert srv.counts["ingest"] == 0
        finally:
            await backend.close()


def test_provision_commands_match_the_kql_checker_splitter() -> None:
    assert provision_commands() == [cmd for _, cmd in kql_checker.provision_commands()]


def test_check_mapping_reports_differences() -> None:
    good = [{"column": c, "datatype": k, "Properties": {"Path": f"$.{c}"}} for c, k in schema.TOMBSTONES.columns]
    assert check_mapping(schema.TOMBSTONES, json.dumps(good)) == []
    # the shape `.show ... mappings` may answer with: lower-case keys, path at the top
    alt = [{"column": c, "path": f"$['{c}']", "datatype": "", "transform": None} for c, _ in schema.TOMBSTONES.columns]
    assert check_mapping(schema.TOMBSTONES, json.dumps(alt)) == []
    bad = good[1:] + [{"column": "scope", "datatype": "long", "Properties": {"Path": "$.other"}}]
    problems = check_mapping(schema.TOMBSTONES, json.dumps(bad))
    assert problems == [
        "mapping 'Tombstones_json_mapping' on table Tombstones: column 'scope' reads '$.other', expected '$.scope'",
        "mapping 'Tombstones_json_mapping' on table Tombstones: column 'scope' has datatype 'long', expected 'string'",
    ]


def test_configuration_is_validated() -> None:
    with pytest.raises(ConfigError, match="ingest_mode"):
        KustoBackend("https://c.kusto.windows.net", "db", ingest_mode="fast")
    with pytest.raises(ConfigError, match="database"):
        KustoBackend("https://c.kusto.windows.net", None)
    with pytest.raises(ConfigError, match="cluster_uri"):
        KustoBackend("c.kusto.windows.net", "db")
    with pytest.raises(ConfigError, match="https"):
        KustoBackend("http://127.0.0.1:1", "db", credential=_FakeCredential())
    with pytest.raises(ConfigError, match="TokenCredential"):
        KustoBackend("https://c.kusto.windows.net", "db", credential=42)
    with pytest.raises(ConfigError, match="query_timeout"):
        KustoBackend("https://c.kusto.windows.net", "db", query_timeout=0)
    for bad in ("db']; .drop table Checkpoints", 'd"b', "a|b", "x\ny"):
        with pytest.raises(ConfigError, match="database must be a Kusto database name"):
            KustoBackend("https://c.kusto.windows.net", bad, credential=_FakeCredential())
    assert KustoBackend("https://c.kusto.windows.net", "my db-2.v1_é", credential=_FakeCredential()).database
    with pytest.raises(ConfigError, match="unknown engine option"):
        AsyncKustoSaver.from_connection_string("https://c.kusto.windows.net", "db", credential=_FakeCredential(),
                                               batch_sise=3)
    queued = AsyncKustoSaver.from_connection_string("https://c.kusto.windows.net", "db", credential=_FakeCredential(),
                                                    ingest_mode="queued")
    assert queued.options.visibility_delay > 0  # queued rows show up late: the overlay keeps them
    for mode, delay in (("streaming", 0), ("inline", 0), ("managed", 120)):
        saver = AsyncKustoSaver.from_connection_string("https://c.kusto.windows.net", "db",
                                                       credential=_FakeCredential(), ingest_mode=mode)
        assert saver.options.visibility_delay == delay, mode


def test_every_backend_gets_the_same_defaults_and_a_smaller_bound_stays_valid() -> None:
    from langgraph.checkpoint.kusto import EngineConfig
    from langgraph.checkpoint.kusto.engine.backends.embedded import EmbeddedBackend
    from langgraph.checkpoint.kusto.engine.backends.faulty import FaultyBackend

    def opts(**options: Any) -> Any:
        return AsyncKustoSaver.from_connection_string(
            "https://c.kusto.windows.net", "db", credential=_FakeCredential(), **options
        ).options

    # on Kusto, 6 slots: streaming ingestion's per-core limit (test_kusto_rules.py), and a
    # memory bound that holds them
    o = opts()
    assert (o.ingest_concurrency, o.max_buffered_bytes) == (6, 128 * 2**20)
    assert o.batcher_buffer_bytes == (128 - (4 + 1 + 6) * 4) * 2**20
    assert opts(ingest_concurrency=2).ingest_concurrency == 2
    assert opts(ingest_concurrency=16).ingest_concurrency == 16  # named: as asked
    # a smaller bound without the slots named: as many slots as three quarters of it hold
    o = opts(max_buffered_bytes=64 * 2**20)
    assert (o.ingest_concurrency, o.batcher_buffer_bytes) == (6, 20 * 2**20)
    assert opts(max_buffered_bytes=32 * 2**20, max_batch_bytes=2**20).ingest_concurrency == 6
    assert opts(max_buffered_bytes=40 * 2**20).ingest_concurrency == 4  # never under 4
    # the embedded store: an ingest call holds its slot for a busy loop's turn: 16 slots,
    # also behind a FaultyBackend; the consistency each store calls for (engine/config.py)
    for local in (EmbeddedBackend(), FaultyBackend(EmbeddedBackend())):
        o = AsyncKustoSaver(local).options
        assert (o.consistency, o.durability) == ("sticky", "memory")
        assert dataclasses.replace(o, consistency=None) == EngineConfig()
        assert AsyncKustoSaver(local, max_buffered_bytes=64 * 2**20).options.ingest_concurrency == 7
    kusto = FaultyBackend(KustoBackend("https://c.kusto.windows.net", "db", credential=_FakeCredential()))
    o = AsyncKustoSaver(kusto).options
    assert (o.consistency, o.durability) == ("shared", "ingested")
    assert dataclasses.replace(o, consistency=None, durability="memory") == EngineConfig(ingest_concurrency=6)


class _FakeCredential:
    def get_token(self, *scopes: str, **kwargs: Any) -> Any:  # pragma: no cover - never called
        raise AssertionError("no network in this test")


SECRET = "SuperSecretAppKey123"


def test_secrets_stay_out_of_repr_and_errors() -> None:
    text = (f"Data Source=https://mycluster.westeurope.kusto.windows.net;Initial Catalog=mydb;"
            f"AAD Federated Security=True;Application Client Id=abc;Application Key={SECRET};Authority Id=tenant")
    backend = KustoBackend(credential=text)
    assert backend.database == "mydb"
    assert SECRET not in repr(backend) and SECRET not in str(vars(backend).get("cluster_uri"))
    assert repr(backend) == ("KustoBackend(cluster='https://mycluster.westeurope.kusto.windows.net', "
                             "database='mydb', ingest_mode='streaming')")
    kcsb = KustoConnectionStringBuilder.with_aad_application_key_authentication(
        "https://mycluster.kusto.windows.net", "abc", SECRET, "tenant")
    backend = KustoBackend(credential=kcsb, database="db")
    assert SECRET not in repr(backend)
    backend = KustoBackend("https://user:pw@mycluster.kusto.windows.net", "db", credential=_FakeCredential())
    assert "pw" not in repr(backend)
    with pytest.raises(ConfigError) as caught:
        KustoBackend(credential=f"Data Source=https://c.kusto.windows.net;Bogus Keyword={SECRET}", database="db")
    assert SECRET not in str(caught.value) and caught.value.__cause__ is None and caught.value.__context__ is None
    saver = AsyncKustoSaver.from_connection_string(credential=text)
    assert SECRET not in repr(saver.backend)


@pytest.mark.anyio
@asyncio_only
async def test_ingest_modes_pick_their_clients_and_endpoints() -> None:
    from azure.kusto.ingest import KustoStreamingIngestClient, ManagedStreamingIngestClient, QueuedIngestClient

    uri = "https://mycluster.westeurope.kusto.windows.net"
    cases = [
        ({"ingest_mode": "streaming"}, KustoStreamingIngestClient, None),
        ({"ingest_mode": "managed"}, ManagedStreamingIngestClient, "https://ingest-mycluster.westeurope.kusto.windows.net"),
        ({"ingest_mode": "queued"}, QueuedIngestClient, "https://ingest-mycluster.westeurope.kusto.windows.net"),
        ({"ingest_mode": "queued", "ingest_uri": "https://dm.example.net"}, QueuedIngestClient, "https://dm.example.net"),
        ({"ingest_mode": "managed", "ingest_uri": "https://dm.example.net/"}, ManagedStreamingIngestClient,
         "https://dm.example.net"),
    ]
    for options, kind, dm in cases:
        backend = KustoBackend(uri, "db", credential=_FakeCredential(), **options)
        await backend.open()  # builds the clients; no request is sent
        try:
            client = backend._ingest_client
            assert type(client) is kind
            queued = client.queued_client if kind is ManagedStreamingIngestClient else client
            if dm is not None:
                assert queued._connection_datasource == dm
            assert backend._client._kusto_cluster.rstrip("/") == uri
        finally:
            await backend.close()


@pytest.mark.anyio
@asyncio_only
async def test_default_credential_is_created_lazily_and_closed() -> None:
    from azure.identity import DefaultAzureCredential

    backend = KustoBackend("https://mycluster.kusto.windows.net", "db")
    assert backend._token_credential is None  # nothing built before open()
    await backend.open()
    assert isinstance(backend._token_credential, DefaultAzureCredential)
    await backend.close()
    assert backend._token_credential is None


# --------------------------------------------------------------------------- backend on the loopback


@pytest.mark.anyio
async def test_managed_streaming_ingests_through_the_loopback() -> None:
    async with loopback() as srv:
        async with saver_for(srv, ingest_mode="managed") as saver:
            ids = await put_steps(saver, "managed 'thread'", 3)
            await saver.flush()
        async with saver_for(srv, ingest_mode="managed") as saver:
            listed = [t.config["configurable"]["checkpoint_id"] async for t in saver.alist(config("managed 'thread'"))]
        assert listed == ids[::-1]
        assert all("KPC.executeManagedStreamingIngest" in r.headers["x-ms-client-request-id"]
                   for r in srv.requests if r.route == "ingest")


@pytest.mark.anyio
async def test_setup_reports_an_empty_database_precisely() -> None:
    async with loopback(provision=False) as srv:
        with pytest.raises(SchemaError) as caught:
            await KustoBackend(srv.uri, DB).setup()
        report = caught.value.report
        assert [p.split(" (expected")[0] for p in report.problems] == [
            f"table {t.name} is missing" for t in schema.TABLES]
        message = str(caught.value)
        assert "provision.kql" in message and "setup(create=True)" in message
        assert "written_at:datetime" in message  # says what the table needs
        assert any(schema.LATEST_VIEW in w for w in report.warnings)


@pytest.mark.anyio
async def test_setup_reports_a_missing_table_mapping_column_and_type() -> None:
    async with loopback() as srv:
        backend = KustoBackend(srv.uri, DB)
        assert (await backend.setup()).ok  # nothing missing after provisioning
        assert (await backend.setup(create=True)).ok  # provisioning again is harmless
        mgmt(srv, ".drop table Tombstones")
        mgmt(srv, '.drop table CheckpointBlobs ingestion json mapping "CheckpointBlobs_json_mapping"')
        mgmt(srv, ".drop table CheckpointWrites")
        mgmt(srv, ".create table CheckpointWrites (thread_id:string, checkpoint_ns:string, checkpoint_id:long)")
        mgmt(srv, ".alter table Checkpoints policy streamingingestion disable")
        with pytest.raises(SchemaError) as caught:
            await backend.setup()
        problems = caught.value.report.problems
        assert "table Tombstones is missing (expected columns: scope:string, thread_id:string, checkpoint_ns:string, " \
               "checkpoint_id:string, run_id:string, deleted_at:datetime)" in problems
        assert "table CheckpointBlobs: JSON ingestion mapping 'CheckpointBlobs_json_mapping' is missing" in problems
        assert "table CheckpointWrites: column checkpoint_id has type long, expected string" in problems
        assert "table CheckpointWrites: column task_id:string is missing" in problems
        assert "table CheckpointWrites: JSON ingestion mapping 'CheckpointWrites_json_mapping' is missing" in problems
        assert "table Checkpoints: streaming ingestion policy is not enabled (table or database)" in problems
        assert "table CheckpointWrites: streaming ingestion policy is not enabled (table or database)" in problems
        assert len(problems) == 7 + 8  # + the other 8 missing CheckpointWrites columns
        assert sum("CheckpointWrites: column" in p and "is missing" in p for p in problems) == 9
        # the saver facade delegates; the embedded store has nothing to set up
        with pytest.raises(SchemaError):
            await saver_for(srv).setup()  # a coroutine, as on AsyncPostgresSaver / AsyncSqliteSaver
        with pytest.raises(SchemaError):
            await saver_for(srv).asetup()  # the same, under the name KustoSaver also has
        assert await AsyncKustoSaver.embedded().setup() is None
        assert await AsyncKustoSaver.embedded().asetup() is None
        # provisioning cannot change a column's type: it says which command failed and why
        with pytest.raises(PermanentBackendError) as caught:
            await backend.setup(create=True)
        assert "provision.kql failed at command 3 ('.create-merge table CheckpointWrites (')" in str(caught.value)
        assert "'checkpoint_id' of table 'CheckpointWrites' is of type 'long'" in str(caught.value)
        mgmt(srv, ".drop table CheckpointWrites")
        mgmt(srv, ".drop table Checkpoints")
        async with saver_for(srv) as saver:  # open, awaited in the engine's own loop
            with pytest.raises(SchemaError, match="table Checkpoints is missing"):
                await saver.setup()
            assert (await saver.setup(create=True)).ok


@pytest.mark.anyio
async def test_queries_commands_and_result_types() -> None:
    async with loopback() as srv:
        backend = KustoBackend(srv.uri, DB)
        await backend.open()
        try:
            rows = [{"thread_id": t, "checkpoint_ns": "ns", "checkpoint_id": f"c{i}", "parent_checkpoint_id": "",
                     "run_id": "r", "channel_versions": {"messages": "1"}, "new_versions": {},
                     "metadata": JsonText(orjson.dumps({"note": t, "step": i})), "payload_type": "json",
                     "payload": t, "written_at": 1_700_000_000_000_000 + i}
                    for i, t in enumerate(TRICKY)]
            await backend.ingest("Checkpoints", rows)
            found = await backend.query(
                "declare query_parameters(tids:dynamic, ns:string, after:datetime);\n"
                "Checkpoints | where thread_id in (tids) and checkpoint_ns == ns and written_at >= after",
                {"tids": TRICKY, "ns": "ns", "after": dt.datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)})
            assert sorted(r["thread_id"] for r in found) == sorted(TRICKY)
            first = next(r for r in found if r["checkpoint_id"] == "c1")
            assert first["metadata"] == {"note": TRICKY[1], "step": 1}
            assert first["channel_versions"] == {"messages": "1"}
            assert first["written_at"] == dt.datetime(2023, 11, 14, 22, 13, 20, 1, tzinfo=UTC)
            assert first["written_at"].tzinfo is not None
            for value in TRICKY:
                [one] = await backend.query("declare query_parameters(t:string); Checkpoints | where thread_id == t",
                                            {"t": value})
                assert one["payload"] == value
            deleted = await backend.command(
                ".delete table Checkpoints records <| declare query_parameters(t0:string, d0:datetime);\n"
                "Checkpoints | where thread_id == t0 and written_at < d0",
                {"t0": TRICKY[7], "d0": dt.datetime(2100, 1, 1, tzinfo=UTC)})
            assert sum(r["RecordsMatchPredicate"] for r in deleted) == 1
            assert len(srv.rows("Checkpoints")) == len(TRICKY) - 1
            with pytest.raises(PermanentBackendError, match="without a value"):
                await backend.query("declare query_parameters(t:string); Checkpoints | where thread_id == t", {})
            # no user value ever reaches the KQL text
            for request in srv.requests:
                if request.csl is not None:
                    assert not any(v in request.csl for v in TRICKY[1:])
        finally:
            await backend.close()
            await backend.close()  # idempotent


@pytest.mark.anyio
async def test_big_batches_are_split_into_requests() -> None:
    async with loopback() as srv:
        backend = KustoBackend(srv.uri, DB, max_request_bytes=4096)
        await backend.open()
        try:
            rows = [{"scope": "thread", "thread_id": f"t{i}" + "x" * 300, "checkpoint_ns": "", "checkpoint_id": "",
                     "run_id": "", "deleted_at": 1_700_000_000_000_000} for i in range(100)]
            before = srv.counts["ingest"]
            await backend.ingest("Tombstones", rows)
            requests = [r for r in srv.requests if r.route == "ingest"]
            assert srv.counts["ingest"] - before >= 100 * 300 // 4096
            assert all(len(r.body) <= 4096 for r in requests)
            assert len(srv.rows("Tombstones")) == 100
            assert all(r.path.endswith("mappingName=Tombstones_json_mapping") or "mappingName=Tombstones_json_mapping"
                       in r.path for r in requests)
        finally:
            await backend.close()


@pytest.mark.anyio
async def test_errors_are_classified_with_what_to_fix() -> None:
    async with loopback() as srv:
        backend = KustoBackend(srv.uri, DB)
        await backend.open()
        row = {"scope": "thread", "thread_id": "t", "deleted_at": 1}
        try:
            for route, call in (("query", lambda: backend.query("Tombstones | count", {})),
                                ("mgmt", lambda: backend.command(".show tables")),
                                ("ingest", lambda: backend.ingest("Tombstones", [row]))):
                for fault in ("429", "503", "500", "drop"):
                    if fault == "drop":
                        srv.faults.drop_next(1, route=route)
                    else:
                        srv.faults.fail_next(1, status=int(fault), route=route)
                    with pytest.raises(TransientBackendError):
                        await call()
                await call()  # faults used up
            with pytest.raises(PermanentBackendError, match="provision.kql"):
                await backend.query("Nope | count", {})
            mgmt(srv, '.drop table Tombstones ingestion json mapping "Tombstones_json_mapping"')
            with pytest.raises(PermanentBackendError) as caught:
                await backend.ingest("Tombstones", [row])
            assert "Tombstones_json_mapping" in str(caught.value) and "setup(create=True)" in str(caught.value)
            assert not isinstance(caught.value, TransientBackendError)
            mgmt(srv, ".drop table Tombstones")
            with pytest.raises(PermanentBackendError, match="provision.kql"):
                await backend.ingest("Tombstones", [row])
            with pytest.raises(PermanentBackendError, match="Syntax"):
                await backend.command(".frobnicate table T")
        finally:
            await backend.close()
        with pytest.raises(PermanentBackendError, match="not open"):
            await backend.query("print 1", {})


@pytest.mark.anyio
async def test_wrong_database_is_a_clear_error() -> None:
    async with loopback() as srv:
        with pytest.raises(PermanentBackendError, match="elsewhere"):
            await KustoBackend(srv.uri, "elsewhere").setup()


# --------------------------------------------------------------------------- the savers on the loopback

_conformance_server: dict[str, LoopbackKusto] = {}


async def _conformance_lifespan() -> AsyncIterator[None]:
    async with loopback() as srv:
        _conformance_server["srv"] = srv
        yield
        _conformance_server.clear()


@checkpointer_test(name="AsyncKustoSaver[kusto-loopback]", lifespan=_conformance_lifespan)
async def kusto_saver() -> AsyncIterator[AsyncKustoSaver]:
    srv = _conformance_server["srv"]
    async with AsyncKustoSaver.from_connection_string(cluster_uri=srv.uri, database=DB, **FAST) as saver:
        yield saver


@pytest.mark.anyio
@asyncio_only
async def test_conformance_all_capabilities_on_the_loopback() -> None:
    report = await validate(kusto_saver)
    failures = {cap: r.failures for cap, r in report.results.items() if r.failures}
    assert not failures, failures
    detected = sorted(cap for cap, r in report.results.items() if r.detected)
    passed = sorted(cap for cap, r in report.results.items() if r.passed)
    assert len(detected) == 8, detected
    assert passed == detected, (passed, detected)


@pytest.mark.anyio
async def test_tricky_thread_ids_round_trip_through_kusto() -> None:
    async with loopback() as srv:
        written: dict[str, list[str]] = {}
        async with saver_for(srv) as saver:
            for i, tid in enumerate(TRICKY):
                written[tid] = await put_steps(saver, tid, 2, ns=TRICKY[-1 - i], note=tid)
            await saver.flush()
        # a fresh saver has an empty overlay and cache: everything below comes from Kusto
        async with saver_for(srv) as saver:
            for i, tid in enumerate(TRICKY):
                ns = TRICKY[-1 - i]
                tup = await saver.aget_tuple(config(tid, ns))
                assert tup is not None, tid
                assert tup.config["configurable"]["thread_id"] == tid
                assert tup.config["configurable"]["checkpoint_ns"] == ns
                assert tup.config["configurable"]["checkpoint_id"] == written[tid][-1]
                # LangGraph's get_checkpoint_metadata drops NUL characters from metadata
                # strings (the embedded store does the same); ids keep them
                assert tup.metadata["note"] == tid.replace("\x00", "")
                assert tup.checkpoint["channel_values"]["messages"] == ["message 0", "message 1"]
                assert [w[2] for w in tup.pending_writes or []] == [f"pending 1 {tid}"]
                assert tup.pending_writes[0][0] == f"task {tid} 1"  # type: ignore[index]
                listed = [t async for t in saver.alist(config(tid, ns))]
                assert [t.config["configurable"]["checkpoint_id"] for t in listed] == written[tid][::-1]
                filtered = [t async for t in saver.alist(None, filter={"note": tid.replace("\x00", "")})]
                assert {t.config["configurable"]["thread_id"] for t in filtered} == {tid}
            for tid in TRICKY[::2]:
                await saver.adelete_thread(tid)
            await saver.flush()
            compacted = await saver.engine.compact()  # .delete table T records, parameters and all
        assert compacted == len(TRICKY[::2])
        async with saver_for(srv) as saver:
            for i, tid in enumerate(TRICKY):
                tup = await saver.aget_tuple(config(tid, TRICKY[-1 - i]))
                assert (tup is None) == (tid in TRICKY[::2]), tid
        left = {r["thread_id"] for r in srv.rows("Checkpoints")}
        assert left == set(TRICKY[1::2])  # compaction removed the deleted threads' rows
        assert {r["thread_id"] for r in srv.rows("CheckpointBlobs")} == set(TRICKY[1::2])
        for request in srv.requests:
            # queries carry user values as parameters; control commands (compaction's soft
            # deletes) as literals of the one literal function (test_kusto_rules.py)
            if request.csl is not None and not request.csl.startswith(".delete "):
                assert not any(v in request.csl for v in TRICKY[1:])


def arm_faults(srv: LoopbackKusto, route: str) -> None:
    """Seven failures in a row on ``route``: throttling, 5xx and dropped connections."""
    srv.faults.fail_next(2, status=429, route=route)
    srv.faults.fail_next(2, status=503, route=route)
    srv.faults.drop_next(2, route=route)
    srv.faults.fail_next(1, status=500, route=route)


@pytest.mark.anyio
async def test_faults_on_ingest_and_query_lose_nothing() -> None:
    async with loopback() as srv:
        threads = [f"fault-{i}" for i in range(12)]
        written: dict[str, list[str]] = {}
        async with saver_for(srv, max_retries=8, batch_size=7) as saver:
            arm_faults(srv, "ingest")

            async def writer(tid: str) -> None:
                written[tid] = await put_steps(saver, tid, 4)
                assert (await saver.aget_tuple(config(tid))) is not None  # read-your-writes meanwhile

            async with anyio.create_task_group() as tg:
                for tid in threads:
                    tg.start_soon(writer, tid)
            await saver.flush()
            stats = saver.engine.stats()
        assert srv.faults.pending == 0
        assert stats["retries"] >= 7 and stats["batches_failed"] == 0
        # a fresh saver reads everything back from Kusto, through query faults
        async with saver_for(srv, max_retries=8) as saver:
            arm_faults(srv, "query")
            for tid in threads:
                listed = [t async for t in saver.alist(config(tid))]
                assert [t.config["configurable"]["checkpoint_id"] for t in listed] == written[tid][::-1], tid
                for t in listed:
                    assert len(t.pending_writes or []) == 1
                    assert t.checkpoint["channel_values"]["messages"]
            assert saver.engine.stats()["batches_failed"] == 0
        assert srv.faults.pending == 0  # every armed fault hit a request
        assert srv.faults.injected == {"fail": 10, "drop": 4}


@pytest.mark.anyio
async def test_a_permanent_ingest_error_surfaces_from_flush() -> None:
    async with loopback() as srv:
        mgmt(srv, '.drop table Checkpoints ingestion json mapping "Checkpoints_json_mapping"')
        saver = saver_for(srv, max_retries=3)
        with pytest.raises(IngestError):  # leaving the context raises it too
            async with saver:
                await put_steps(saver, "doomed", 1)
                with pytest.raises(IngestError) as caught:
                    await saver.flush()
                message = str(caught.value)
                assert "Checkpoints_json_mapping" in message and "provision.kql" in message
                assert isinstance(caught.value.__cause__, IngestError) or "Checkpoints" in message
                ingests = [r for r in srv.requests if r.route == "ingest" and "Checkpoints" in r.path]
                assert len(ingests) == 1  # permanent: not retried
                await put_steps(saver, "doomed-too", 1)


@pytest.mark.anyio
async def test_sync_saver_through_the_loopback() -> None:
    async with loopback(provision=False) as srv:

        def run() -> None:
            with KustoSaver.from_connection_string(srv.uri, DB, portal_backend="trio", **FAST) as saver:
                assert saver.setup(create=True).ok
                parent = None
                for step in range(3):
                    c, versions = checkpoint(saver, step)
                    out = saver.put(config("sync 'thread'\n", "", parent), c, {"step": step}, versions)  # type: ignore[arg-type]
                    parent = out["configurable"]["checkpoint_id"]
                saver.put_writes(out, [("messages", "w")], task_id="t1")
                saver.flush()
            with KustoSaver.from_connection_string(srv.uri, DB, **FAST) as saver:
                tup = saver.get_tuple(config("sync 'thread'\n"))
                assert tup is not None and tup.config["configurable"]["checkpoint_id"] == parent
                assert tup.pending_writes == [("t1", "messages", "w")]
                assert len(list(saver.list(config("sync 'thread'\n")))) == 3
                saver.delete_thread("sync 'thread'\n")
                assert saver.get_tuple(config("sync 'thread'\n")) is None
            with KustoSaver.from_connection_string(srv.uri, DB, **FAST) as saver:
                assert saver.get_tuple(config("sync 'thread'\n")) is None
            assert KustoSaver.from_connection_string(srv.uri, DB).setup().ok  # not open: opens for the check

        await anyio.to_thread.run_sync(run)


# --------------------------------------------------------------------------- large values

MB = 1024 * 1024


async def put_values(saver: AsyncKustoSaver, thread_id: str, values: dict[str, Any],
                     parent: dict[str, Any] | None = None,
                     versions: dict[str, str] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Put one checkpoint whose channels ``values`` are new; the channels in ``versions``
    keep the version they had (their values come from earlier checkpoints)."""
    c = empty_checkpoint()
    c["id"] = str(uuid6(clock_seq=-1))
    all_versions = dict(versions or {})
    new_versions = {ch: saver.get_next_version(all_versions.get(ch), None) for ch in values}
    all_versions.update(new_versions)
    c["channel_values"] = dict(values)
    c["channel_versions"] = all_versions
    out = await saver.aput(parent or config(thread_id), c, {"source": "loop", "step": len(all_versions)}, new_versions)
    return out, all_versions


def ingest_sizes(srv: LoopbackKusto) -> list[int]:
    """Data bytes (uncompressed) of every streaming ingestion request the loopback received."""
    return [len(r.body) for r in srv.requests if r.route == "ingest"]


@pytest.mark.anyio
async def test_a_5_mb_value_and_a_20_mb_checkpoint_round_trip_byte_for_byte() -> None:
    rng = random.Random(20240506)
    five = rng.randbytes(5 * MB)
    state = {  # one checkpoint of 20 MB: bytes, non-ASCII text, a long message list
        "blob": rng.randbytes(8 * MB),
        "text": "".join(rng.choices("aé中🙂\n\"\\|;", k=4 * MB)),  # ~7 MB of UTF-8
        "history": [{"role": "user", "content": f"message {i} " + "x" * 3000} for i in range(2000)],
    }
    tid = "big 'thread' | \"values\""
    async with loopback() as srv:
        async with saver_for(srv) as saver:
            first, versions = await put_values(saver, tid, {"five": five})
            second, _ = await put_values(saver, tid, state, first, versions)
            await saver.flush()
            # read-your-writes from the overlay, before any backend read
            assert (await saver.aget_tuple(second)).checkpoint["channel_values"]["blob"] == state["blob"]  # type: ignore[union-attr]
        sizes = ingest_sizes(srv)
        assert max(sizes) <= 4 * MB, max(sizes)  # no streaming request over Kusto's 4 MB
        assert sum(sizes) > 25 * MB and len(sizes) >= 7  # ~36 MB of base64 went in several requests
        assert all(r.status == 200 for r in srv.requests if r.route == "ingest")
        blobs = srv.rows("CheckpointBlobs")
        assert max(len(r["payload"]) for r in blobs) <= 1_000_000  # under Kusto's 1 MB cell limit
        serialized = {ch: len(saver.serde.dumps_typed(v)[1]) for ch, v in {"five": five, **state}.items()}
        assert serialized["five"] >= 5 * MB and sum(serialized[ch] for ch in state) >= 20 * MB
        chunks = {r["channel"]: r["chunks"] for r in blobs}
        assert chunks == {ch: -(-((n + 2) // 3 * 4) // 1_000_000) for ch, n in serialized.items()}
        assert sorted((r["channel"], r["chunk"]) for r in blobs) == sorted(
            (ch, i) for ch, n in chunks.items() for i in range(n))
        # a fresh saver has nothing cached: all of it comes back through the SDK
        async with saver_for(srv) as saver:
            latest = await saver.aget_tuple(config(tid))
            assert latest is not None and latest.config == second
            values = latest.checkpoint["channel_values"]
            assert values["five"] == five and values["blob"] == state["blob"]
            assert values["text"] == state["text"] and values["history"] == state["history"]
            older = await saver.aget_tuple(first)
            assert older is not None and older.checkpoint["channel_values"] == {"five": five}
            listed = [t.config async for t in saver.alist(config(tid))]
            assert listed == [second, first]


@pytest.mark.anyio
async def test_a_value_with_a_missing_chunk_is_not_visible_until_it_arrives() -> None:
    from azure.kusto.data.data_format import DataFormat
    from azure.kusto.ingest import IngestionProperties, KustoStreamingIngestClient

    big = random.Random(3).randbytes(3 * MB)  # 4 MB of base64: 5 chunks
    tid = "chunky"
    async with loopback() as srv:
        async with saver_for(srv) as saver:
            cp0, versions = await put_values(saver, tid, {"small": "v0"})
            cp1, versions = await put_values(saver, tid, {"big": big}, cp0, versions)
            cp2, _ = await put_values(saver, tid, {"small": "v2"}, cp1, versions)  # refers to big
            await saver.flush()
        [missing] = [r for r in srv.rows("CheckpointBlobs") if r["channel"] == "big" and r["chunk"] == 3]
        assert missing["chunks"] == 5
        srv.sql('DELETE FROM "CheckpointBlobs" WHERE channel = ? AND chunk = 3', ["big"])

        async with saver_for(srv) as saver:
            # cp1 wrote big and cp2 refers to it: neither is visible, never half-read
            latest = await saver.aget_tuple(config(tid))
            assert latest is not None and latest.config == cp0
            assert latest.checkpoint["channel_values"] == {"small": "v0"}
            assert await saver.aget_tuple(cp2) is None and await saver.aget_tuple(cp1) is None
            assert [t.config async for t in saver.alist(config(tid))] == [cp0]

        # the chunk arrives (say, a slow ingestion request): the checkpoints become visible
        line = row_to_json(schema.BLOBS, {**missing, "written_at": missing["written_at"].replace(tzinfo=UTC)})
        props = IngestionProperties(DB, schema.BLOBS.name, data_format=DataFormat.MULTIJSON,
                                    ingestion_mapping_reference=schema.mapping_name(schema.BLOBS.name))
        with KustoStreamingIngestClient(srv.kcsb()) as ingest:
            await anyio.to_thread.run_sync(ingest.ingest_from_stream, io.BytesIO(line), props)
        async with saver_for(srv) as saver:
            latest = await saver.aget_tuple(config(tid))
            assert latest is not None and latest.config == cp2
            assert latest.checkpoint["channel_values"] == {"small": "v2", "big": big}
            assert [t.config async for t in saver.alist(config(tid))] == [cp2, cp1, cp0]


@pytest.mark.anyio
async def test_duplicates_from_retried_requests_are_absorbed_by_reads() -> None:
    """Requests that landed but answered with an error (or a dropped connection) are retried:
    Kusto stores those rows twice, and reads still show every checkpoint and write once."""
    async with loopback() as srv:
        threads = [f"dup-{i}" for i in range(6)]
        written: dict[str, list[str]] = {}
        srv.faults.fail_next(3, status=503, route="ingest", after=True)
        srv.faults.drop_next(2, route="ingest", after=True)
        async with saver_for(srv, max_retries=8, batch_size=5) as saver:
            for tid in threads:
                written[tid] = await put_steps(saver, tid, 3, note=tid)
            await saver.flush()
            assert saver.engine.stats()["batches_failed"] == 0
        assert srv.faults.pending == 0
        checkpoints = {(r["thread_id"], r["checkpoint_id"]) for r in srv.rows("Checkpoints")}
        assert len(checkpoints) == 18
        # the faults fall on whichever tables' requests come first, so duplicates are
        # counted over every table a batch writes to
        stored = [repr(sorted(r.items())) for table in ("Checkpoints", "CheckpointWrites", "CheckpointBlobs")
                  for r in srv.rows(table)]
        assert len(stored) > len(set(stored))  # duplicates landed
        async with saver_for(srv) as saver:
            for tid in threads:
                listed = [t async for t in saver.alist(config(tid))]
                assert [t.config["configurable"]["checkpoint_id"] for t in listed] == written[tid][::-1]
                for step, t in enumerate(reversed(listed)):
                    assert t.pending_writes == [(f"task {tid} {step}", "messages", f"pending {step} {tid}")]
                    assert t.checkpoint["channel_values"]["messages"] == [f"message {i}" for i in range(step + 1)]


# --------------------------------------------------------------------------- inline ingestion (the emulator's way)


@pytest.mark.anyio
async def test_inline_ingestion_mode_round_trips_tricky_values() -> None:
    async with loopback() as srv:
        written: dict[str, list[str]] = {}
        async with saver_for(srv, ingest_mode="inline") as saver:
            assert (await saver.asetup()).ok  # no streaming policy needed
            for tid in TRICKY:
                written[tid] = await put_steps(saver, tid, 2, note=tid)
            await saver.flush()
        assert srv.counts["ingest"] == 0  # no streaming endpoint used
        inline = [r for r in srv.requests if r.csl and r.csl.startswith(".ingest inline")]
        assert {r.csl.split()[4] for r in inline} == {"Checkpoints", "CheckpointBlobs", "CheckpointWrites"}
        async with saver_for(srv, ingest_mode="inline") as saver:
            for tid in TRICKY:
                listed = [t async for t in saver.alist(config(tid))]
                assert [t.config["configurable"]["checkpoint_id"] for t in listed] == written[tid][::-1]
                assert listed[0].metadata["note"] == tid.replace("\x00", "")
                assert listed[0].pending_writes == [(f"task {tid} 1", "messages", f"pending 1 {tid}")]


# --------------------------------------------------------------------------- the materialized view and compaction


def test_latest_view_deletion_mirrors_the_checkpoints_deletion() -> None:
    from langgraph.checkpoint.kusto.engine import kql
    from langgraph.checkpoint.kusto.engine.records import TombstoneRec

    tombs = [TombstoneRec(schema.SCOPE_THREAD, thread_id="t'; .drop", deleted_at=5),
             TombstoneRec(schema.SCOPE_RUN, run_id="r", deleted_at=6)]
    text, params = kql.compaction_command(schema.CHECKPOINTS.name, tombs)
    view = latest_view_deletion(text)
    assert view is not None
    assert view == text.replace(".delete table Checkpoints records <| Checkpoints |",
                                ".delete materialized-view LatestCheckpoints records <| LatestCheckpoints |", 1)
    assert params == {} and view.endswith(text.partition(" records <| Checkpoints ")[2])
    for table in (schema.WRITES.name, schema.BLOBS.name):
        assert latest_view_deletion(kql.compaction_command(table, tombs)[0]) is None
    assert latest_view_deletion(".show tables") is None
    if kql_checker.node_available():
        result = kql_checker.check_kql([("view", view)])
        assert not kql_checker.errors(result["view"]), result["view"]


@pytest.mark.anyio
async def test_compaction_also_deletes_from_the_latest_view() -> None:
    async with loopback() as srv:
        async with saver_for(srv) as saver:
            await put_steps(saver, "gone", 2)
            await put_steps(saver, "kept", 2)
            await saver.adelete_thread("gone")
            await saver.flush()
            assert await saver.engine.compact() == 1
        sent = [r for r in srv.requests if r.csl and r.csl.startswith(".delete ")]
        [source] = [r for r in sent if r.csl.startswith(".delete table Checkpoints ")]
        [view] = [r for r in sent if r.csl.startswith(".delete materialized-view")]
        assert sent.index(view) == sent.index(source) + 1  # right after the source table
        assert view.csl == latest_view_deletion(source.csl)
        assert view.parameters == source.parameters == {}
        assert {r["thread_id"] for r in srv.rows("Checkpoints")} == {"kept"}
        # without the view (not provisioned, or dropped) compaction does not try it
        mgmt(srv, ".drop materialized-view LatestCheckpoints")
        async with saver_for(srv) as saver:
            await saver.adelete_thread("kept")
            await saver.flush()
            assert await saver.engine.compact() == 1
        views = [r for r in srv.requests if r.csl and r.csl.startswith(".delete materialized-view")]
        assert len(views) == 1 and srv.rows("Checkpoints") == []


# --------------------------------------------------------------------------- LangGraph graphs on the loopback


@pytest.mark.anyio
@asyncio_only
@pytest.mark.parametrize("durability", ["sync", "async"])
async def test_graph_with_an_interrupt_runs_and_resumes_through_kusto(durability: str) -> None:
    """A compiled StateGraph that interrupts, on AsyncKustoSaver through the real SDK; a
    second saver (nothing cached: a restarted process) resumes it."""
    from langgraph.types import Command
    from test_graphs import (
        APPROVAL_INPUT,
        approval_done,
        assert_chain,
        assert_done,
        assert_interrupted,
        assert_waiting,
        build_approval,
    )

    threads = [f"approval {i} 'q' | {durability}" for i in range(3)]
    async with loopback() as srv:
        async with saver_for(srv) as saver:
            graph = build_approval(saver)
            for tid in threads:
                cfg = {"configurable": {"thread_id": tid}}
                assert_interrupted(await graph.ainvoke(APPROVAL_INPUT, cfg, durability=durability))
                assert_waiting(await graph.aget_state(cfg))
        async with saver_for(srv) as saver:
            graph = build_approval(saver)
            for i, tid in enumerate(threads):
                cfg = {"configurable": {"thread_id": tid}}
                assert_waiting(await graph.aget_state(cfg))
                resumed = await graph.ainvoke(Command(resume=f"yes {i}"), cfg, durability=durability)
                assert resumed == approval_done(f"yes {i}")
                assert_done(await graph.aget_state(cfg), f"yes {i}")
                assert_chain([s async for s in graph.aget_state_history(cfg)], tid)
        assert srv.counts["ingest"] > 0 and srv.counts["query"] > 0


@pytest.mark.anyio
@asyncio_only
async def test_sync_graph_with_a_subgraph_interrupt_through_kusto() -> None:
    from langgraph.types import Command
    from test_graphs import PARENT_DONE, assert_parent_waiting_in_subgraph, build_parent_with_subgraph

    async with loopback() as srv:

        def run() -> None:
            cfg = {"configurable": {"thread_id": "sub 'graph'"}}
            with KustoSaver.from_connection_string(srv.uri, DB, **FAST) as saver:
                graph = build_parent_with_subgraph(saver)
                result = graph.invoke({"log": ["start"]}, cfg)
                assert [it.value for it in result["__interrupt__"]] == ["color?"]
            with KustoSaver.from_connection_string(srv.uri, DB, **FAST) as saver:
                graph = build_parent_with_subgraph(saver)
                assert_parent_waiting_in_subgraph(graph.get_state(cfg, subgraphs=True))
                assert graph.invoke(Command(resume="blue"), cfg) == PARENT_DONE
                final = graph.get_state(cfg, subgraphs=True)
                assert final.next == () and final.values == PARENT_DONE

        await anyio.to_thread.run_sync(run)


# --------------------------------------------------------------------------- live cluster

LIVE_URI = os.environ.get("KUSTO_CLUSTER_URI")
LIVE_DB = os.environ.get("KUSTO_DATABASE")
live = pytest.mark.skipif(
    not (LIVE_URI and LIVE_DB),
    reason="live Kusto tests need KUSTO_CLUSTER_URI and KUSTO_DATABASE (DefaultAzureCredential signs in, e.g. "
    "from AZURE_TENANT_ID/AZURE_CLIENT_ID/AZURE_CLIENT_SECRET; KUSTO_INGEST_MODE=streaming|managed|queued|inline, "
    "KUSTO_PROVISION=1 runs provision.kql first; see docs/kusto.md)",
)


LIVE_MODE = os.environ.get("KUSTO_INGEST_MODE", "streaming")


def live_saver(**options: Any) -> AsyncKustoSaver:
    return AsyncKustoSaver.from_connection_string(
        cluster_uri=LIVE_URI, database=LIVE_DB, ingest_mode=LIVE_MODE,
        ingest_uri=os.environ.get("KUSTO_INGEST_URI") or None, **options)


async def _live_lifespan() -> AsyncIterator[None]:
    await live_saver().asetup(create=os.environ.get("KUSTO_PROVISION") == "1")
    yield


@checkpointer_test(name="AsyncKustoSaver[live]", lifespan=_live_lifespan)
async def live_kusto_saver() -> AsyncIterator[AsyncKustoSaver]:
    async with live_saver() as saver:
        yield saver


@live
@pytest.mark.anyio
@asyncio_only
async def test_live_conformance() -> None:
    report = await validate(live_kusto_saver)
    failures = {cap: r.failures for cap, r in report.results.items() if r.failures}
    assert not failures, failures
    assert len([c for c, r in report.results.items() if r.passed]) == 8


@live
@pytest.mark.anyio
@asyncio_only
async def test_live_put_get() -> None:
    await live_saver().asetup(create=os.environ.get("KUSTO_PROVISION") == "1")
    tid = f"live {uuid.uuid4()} 'quoted' \"and\" | piped"
    async with live_saver() as saver:
        ids = await put_steps(saver, tid, 3, note=tid)
        await saver.flush()
    async with live_saver() as saver:
        tup = await saver.aget_tuple(config(tid))
        if tup is None and LIVE_MODE != "streaming":
            pytest.skip("queued ingestion: rows not queryable yet")
        assert tup is not None and tup.config["configurable"]["checkpoint_id"] == ids[-1]
        assert tup.metadata["note"] == tid
        assert [t.config["configurable"]["checkpoint_id"] async for t in saver.alist(config(tid))] == ids[::-1]
        await saver.adelete_thread(tid)
        assert await saver.aget_tuple(config(tid)) is None


@live
@pytest.mark.anyio
@asyncio_only
async def test_live_short_load_run() -> None:
    """A short load run on the cluster: KUSTO_LOAD_AGENTS (20) concurrent agents x
    KUSTO_LOAD_STEPS (5) steps of put + put_writes + get_tuple, flushed, then every thread
    read back by a fresh saver (polling until KUSTO_VISIBILITY_TIMEOUT for queued
    ingestion), checked, and deleted. Prints the throughput (pytest -s shows it)."""
    agents = int(os.environ.get("KUSTO_LOAD_AGENTS", "20"))
    steps = int(os.environ.get("KUSTO_LOAD_STEPS", "5"))
    patience = float(os.environ.get("KUSTO_VISIBILITY_TIMEOUT", "60" if LIVE_MODE in ("streaming", "inline") else "600"))
    run = uuid.uuid4().hex[:12]
    threads = [f"live-load {run} {i} 'q' | \"x\"" for i in range(agents)]
    written: dict[str, list[str]] = {}
    async with live_saver() as saver:

        async def agent(tid: str) -> None:
            written[tid] = await put_steps(saver, tid, steps, note=run)
            assert (await saver.aget_tuple(config(tid))).config["configurable"]["checkpoint_id"] == written[tid][-1]  # type: ignore[union-attr]

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for tid in threads:
                tg.start_soon(agent, tid)
        accepted = time.perf_counter() - started
        await saver.flush()
        ingested = time.perf_counter() - started
        stats = saver.engine.stats()
    assert stats["batches_failed"] == 0, stats
    print(f"\nlive load ({LIVE_MODE}): {agents * steps} checkpoints accepted in {accepted:.2f} s, "
          f"ingested in {ingested:.2f} s ({agents * steps / ingested:.0f}/s), retries {stats['retries']}")
    deadline = time.monotonic() + patience
    missing = set(threads)
    while missing:
        async with live_saver() as saver:  # fresh: nothing cached, all from the cluster
            for tid in sorted(missing):
                listed = [t async for t in saver.alist(config(tid))]
                if len(listed) < steps:
                    continue
                assert [t.config["configurable"]["checkpoint_id"] for t in listed] == written[tid][::-1]
                assert all(len(t.pending_writes or []) == 1 and t.metadata["note"] == run for t in listed)
                missing.discard(tid)
        if missing:
            assert time.monotonic() < deadline, f"{len(missing)} threads not visible after {patience:.0f} s"
            await anyio.sleep(5)
    async with live_saver() as saver:
        for tid in threads:
            await saver.adelete_thread(tid)
        assert await saver.aget_tuple(config(threads[0])) is None
