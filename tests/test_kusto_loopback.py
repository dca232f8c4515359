"""The loopback Kusto endpoint, driven by the real, unpatched azure-kusto SDK clients.

Sync tests use the SDK directly; anyio tests (asyncio and trio) run the sync clients in
worker threads, and the SDK's aiohttp client is tested on asyncio (it has no trio support).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import anyio
import pytest
from azure.kusto.data import ClientRequestProperties, KustoClient
from azure.kusto.data.data_format import DataFormat
from azure.kusto.data.exceptions import (
    KustoApiError,
    KustoNetworkError,
    KustoServiceError,
    KustoThrottlingError,
)
from azure.kusto.ingest import (
    IngestionProperties,
    KustoStreamingIngestClient,
    ManagedStreamingIngestClient,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kusto_loopback import LoopbackKusto, decode_parameter, encode_parameter  # noqa: E402

DB = "testdb"
UTC = dt.UTC

TABLE = "Items"
MAPPING = "Items_json_mapping"
COLUMNS = "thread_id:string, seq:long, n:int, body:string, metadata:dynamic, written_at:datetime"
MAPPING_JSON = json.dumps([
    {"column": "thread_id", "datatype": "string", "Properties": {"Path": "$.thread_id"}},
    {"column": "seq", "datatype": "long", "Properties": {"Path": "$.seq"}},
    {"column": "n", "datatype": "int", "Properties": {"Path": "$.n"}},
    {"column": "body", "datatype": "string", "Properties": {"Path": "$.payload.text"}},
    {"column": "metadata", "datatype": "dynamic", "Properties": {"Path": "$.metadata"}},
    {"column": "written_at", "datatype": "datetime", "Properties": {"Path": "$.written_at"}},
])

#: Strings that break anything that splices values into KQL text.
TRICKY = [
    "plain",
    "",
    "it's",
    'say "hi"',
    "back\\slash \\' \\\"",
    "multi\nline\r\nand\ttab",
    "pipe | take 1",
    "semi; .drop table Items",
    "'; .drop table Items //",
    '"); .drop table Items <| print 1',
    "non-ASCII: é ü ß 中文 🙂",
    "  padded  ",
    '{"json": [1, 2]}',
    "dynamic(['x'])",
    "datetime(2020-01-01)",
    "$kqlp0 ? %s {0}",
]

T0 = dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)


def _iso(value: dt.datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f0Z")  # Kusto's 7 digits


# How parameter values must be sent: a KQL literal in a string, for every type.
def kql_string(value: str) -> str:
    return encode_parameter(value, "string")  # '"a \\"b\\""'


def kql_datetime(value: dt.datetime) -> str:
    return encode_parameter(value, "datetime")  # 'datetime(2024-05-06T07:08:09.1234560Z)'


def kql_dynamic(value: object) -> str:
    return encode_parameter(value, "dynamic")  # 'dynamic(["a", 1])'


def crp(**parameters: object) -> ClientRequestProperties:
    props = ClientRequestProperties()
    for name, value in parameters.items():
        props.set_parameter(name, value)
    return props


def records(count: int, thread: str = "t") -> list[dict]:
    return [{
        "thread_id": TRICKY[i % len(TRICKY)] if thread == "tricky" else f"{thread}-{i}",
        "seq": 10_000_000_000 + i,
        "n": i,
        "payload": {"text": TRICKY[-1 - i % len(TRICKY)]},
        "metadata": {"step": i, "source": "loop", "tags": ["a", TRICKY[i % len(TRICKY)]],
                     "nested": {"k": TRICKY[i % len(TRICKY)]}},
        "written_at": _iso(T0 + dt.timedelta(minutes=i)),
    } for i in range(count)]


def jsonl(rows: list[dict]) -> str:
    return "\n".join(json.dumps(r, ensure_ascii=False) for r in rows)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def server():
    with LoopbackKusto(database=DB) as srv:
        yield srv
        assert srv.errors == [], f"loopback bugs: {srv.errors!r}"


@pytest.fixture
def client(server):
    with KustoClient(server.kcsb()) as kusto:
        yield kusto


@pytest.fixture
def ingest(server):
    ingest_client = KustoStreamingIngestClient(server.kcsb())
    yield ingest_client
    ingest_client.close()


def provision(client: KustoClient) -> None:
    client.execute_mgmt(DB, f".create-merge table {TABLE} ({COLUMNS})")
    client.execute_mgmt(
        DB, f".create-or-alter table {TABLE} ingestion json mapping \"{MAPPING}\" '{MAPPING_JSON}'")
    client.execute_mgmt(DB, f".alter table {TABLE} policy streamingingestion enable")


@pytest.fixture
def items(client):
    provision(client)
    return TABLE


def props(mapping: str | None = MAPPING, fmt: DataFormat = DataFormat.MULTIJSON,
          table: str = TABLE) -> IngestionProperties:
    return IngestionProperties(DB, table, data_format=fmt, ingestion_mapping_reference=mapping)


def query(client: KustoClient, kql: str, **parameters: object) -> list[dict]:
    response = client.execute_query(DB, kql, crp(**parameters) if parameters else None)
    return [row.to_dict() for row in response.primary_results[0]]


# --------------------------------------------------------------------------- lifecycle


def test_starts_on_loopback_and_stops_cleanly():
    srv = LoopbackKusto()
    with srv:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", srv.uri)
        port = int(srv.uri.rsplit(":", 1)[1])
        with urllib.request.urlopen(srv.uri + "/") as answer:
            assert json.load(answer)["database"] == "testdb"
        # a keep-alive connection left open by a client does not hold up the stop
        idle = socket.create_connection(("127.0.0.1", port))
    idle.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert srv.counts["other"] == 1


def test_two_servers_get_different_ports():
    with LoopbackKusto() as one, LoopbackKusto(database="other") as two:
        assert one.uri != two.uri
        assert two.database == "other"


def test_no_authentication_connection_string(server, client):
    kcsb = server.kcsb()
    assert kcsb.aad_federated_security is False
    assert kcsb.initial_catalog == DB
    client.execute_mgmt(DB, ".show version")
    sent = server.requests[-1]
    assert "Authorization" not in sent.headers
    assert sent.headers["x-ms-client-request-id"].startswith("KPC.execute;")
    # without a database argument the SDK uses the connection string's Initial Catalog
    assert [r.to_dict() for r in client.execute_query(None, "print x = 1").primary_results[0]] \
        == [{"x": 1}]


# --------------------------------------------------------------------------- mgmt


def test_create_merge_table_is_idempotent_and_merges_columns(server, client):
    client.execute_mgmt(DB, ".create-merge table T (a:string, b:long)")
    client.execute_mgmt(DB, ".create-merge table T (a:string, b:long)")
    result = client.execute_mgmt(DB, ".create-merge table T (a:string, c:dynamic) "
                                     "with (folder = 'f', docstring = \"doc (with parens)\")")
    row = result.primary_results[0][0].to_dict()
    assert row["Schema"] == "a:string,b:long,c:dynamic"
    assert (row["Folder"], row["DocString"]) == ("f", "doc (with parens)")
    with pytest.raises(KustoApiError, match="cannot be changed"):
        client.execute_mgmt(DB, ".create-merge table T (b:string)")
    shown = client.execute_mgmt(DB, ".show table T cslschema").primary_results[0][0]
    assert shown["Schema"] == "a:string,b:long,c:dynamic"
    tables = client.execute_mgmt(DB, ".show tables").primary_results[0]
    assert [r["TableName"] for r in tables] == ["T"]


def test_schema_introspection(server, client, items):
    as_json = client.execute_mgmt(DB, f".show table {TABLE} schema as json").primary_results[0][0]
    columns = json.loads(as_json["Schema"])["OrderedColumns"]
    assert [(c["Name"], c["CslType"]) for c in columns] == [
        ("thread_id", "string"), ("seq", "long"), ("n", "int"), ("body", "string"),
        ("metadata", "dynamic"), ("written_at", "datetime")]
    assert columns[0]["Type"] == "System.String"
    db_csl = client.execute_mgmt(DB, f".show database {DB} cslschema").primary_results[0]
    assert {r["TableName"]: r["Schema"] for r in db_csl} == {
        TABLE: COLUMNS.replace(", ", ",")}
    db_json = client.execute_mgmt(DB, ".show database schema as json").primary_results[0][0]
    tables = json.loads(db_json["DatabaseSchema"])["Databases"][DB]["Tables"]
    assert list(tables) == [TABLE]
    mappings = client.execute_mgmt(DB, f".show table {TABLE} ingestion json mappings")
    [mapping] = [r.to_dict() for r in mappings.primary_results[0]]
    assert mapping["Name"] == MAPPING and mapping["Kind"] == "Json"
    assert json.loads(mapping["Mapping"]) == json.loads(MAPPING_JSON)
    assert len(client.execute_mgmt(DB, ".show database ingestion mappings").primary_results[0]) == 1
    version = client.execute_mgmt(DB, ".show version").primary_results[0][0]
    assert version["ServiceType"] == "Engine"
    databases = client.execute_mgmt(DB, ".show databases").primary_results[0]
    assert [r["DatabaseName"] for r in databases] == [DB]


def test_mapping_commands(server, client, items):
    with pytest.raises(KustoApiError, match="already exists"):
        client.execute_mgmt(DB, f".create table {TABLE} ingestion json mapping \"{MAPPING}\" '[]'")
    with pytest.raises(KustoApiError, match="does not have"):
        client.execute_mgmt(DB, f".create-or-alter table {TABLE} ingestion json mapping \"m2\" "
                                "'[{\"column\": \"nope\", \"Properties\": {\"Path\": \"$.x\"}}]'")
    # adjacent literals concatenate, and a ``` block is a literal too
    client.execute_mgmt(DB, f".create-or-alter table {TABLE} ingestion json mapping 'm3'\n"
                            "'[' '{\"column\": \"n\", \"Properties\": {\"Path\": \"$.v\"}}' ']'")
    client.execute_mgmt(DB, f".create-or-alter table {TABLE} ingestion json mapping \"m4\"\n```\n"
                            '[{"column": "n", "Properties": {"ConstValue": "7"}}]\n```')
    assert {name for table, name in server.mappings} == {MAPPING, "m3", "m4"}
    client.execute_mgmt(DB, f".drop table {TABLE} ingestion json mapping \"m4\"")
    assert {name for table, name in server.mappings} == {MAPPING, "m3"}


def test_policies(server, client, items):
    assert server.streaming_enabled(TABLE)
    client.execute_mgmt(DB, f".alter table {TABLE} policy streamingingestion disable")
    assert not server.streaming_enabled(TABLE)
    client.execute_mgmt(DB, f".delete table {TABLE} policy streamingingestion")
    client.execute_mgmt(DB, f".alter database {DB} policy streamingingestion enable")
    assert server.streaming_enabled(TABLE)  # inherited from the database
    client.execute_mgmt(DB, f".alter table {TABLE} policy streamingingestion "
                            "'{\"IsEnabled\": false}'")
    assert not server.streaming_enabled(TABLE)  # the table's own policy wins
    client.execute_mgmt(DB, f".alter-merge table {TABLE} policy retention "
                            "softdelete = 30d recoverability = disabled")
    client.execute_mgmt(DB, f".alter table {TABLE} policy caching hot = 7d")
    client.execute_mgmt(DB, f".alter table {TABLE} policy ingestionbatching "
                            "'{\"MaximumBatchingTimeSpan\": \"00:00:30\"}'")
    shown = client.execute_mgmt(DB, f".show table {TABLE} policy ingestionbatching")
    row = shown.primary_results[0][0]
    assert row["PolicyName"] == "IngestionBatchingPolicy"
    assert json.loads(row["Policy"]) == {"MaximumBatchingTimeSpan": "00:00:30"}
    assert server.policies[("table", TABLE, "caching")] == {"Command": "hot = 7d"}
    with pytest.raises(KustoApiError, match="was not found"):
        client.execute_mgmt(DB, ".alter table Nope policy caching hot = 1d")


def test_materialized_view_is_emulated_by_a_live_view(server, client, ingest, items):
    client.execute_mgmt(
        DB, ".create ifnotexists materialized-view with (backfill = true, docString = \"a (b)\") "
            f"Latest on table {TABLE}\n{{\n    {TABLE}\n"
            "    | summarize arg_max(seq, *) by thread_id\n}")
    # ifnotexists: a second create is a no-op, a plain create is an error
    client.execute_mgmt(DB, f".create ifnotexists materialized-view Latest on table {TABLE} "
                            f"{{ {TABLE} | take 1 }}")
    with pytest.raises(KustoApiError, match="already exists"):
        client.execute_mgmt(DB, f".create materialized-view Latest on table {TABLE} "
                                f"{{ {TABLE} | take 1 }}")
    rows = records(3, "a") + records(2, "b")
    ingest.ingest_from_stream(io.StringIO(jsonl(rows)), props())
    latest = query(client, "Latest | order by thread_id asc | project thread_id, seq")
    assert [r["thread_id"] for r in latest] == ["a-0", "a-1", "a-2", "b-0", "b-1"]
    views = client.execute_mgmt(DB, ".show materialized-views").primary_results[0]
    assert [(v["Name"], v["SourceTable"], v["DocString"]) for v in views] == [
        ("Latest", TABLE, "a (b)")]
    client.execute_mgmt(DB, ".alter-merge materialized-view Latest policy retention "
                            "softdelete = 1d")
    # soft delete on the view: counted, nothing to delete (the view is live)
    deleted = client.execute_mgmt(DB, ".delete materialized-view Latest records <| "
                                      "Latest | where thread_id == 'a-1'").primary_results[0]
    assert sum(r["RecordsMatchPredicate"] for r in deleted) == 1
    client.execute_mgmt(DB, ".drop materialized-view Latest")
    assert server.materialized_views == {}


def test_unknown_command_is_a_kusto_error(server, client):
    with pytest.raises(KustoApiError) as caught:
        client.execute_mgmt(DB, ".frobnicate table T")
    error = caught.value.get_api_error()
    assert error.code == "BadRequest_SyntaxError" and error.permanent is True
    assert error.type == "Kusto.Data.Exceptions.SyntaxException"
    with pytest.raises(KustoApiError, match="was not found"):
        client.execute_query("otherdb", "print 1")
    with pytest.raises(KustoApiError):
        client.execute_query(DB, "Nope | take 1")


def test_database_script(server, client):
    script = (".create-merge table S (a:string)\n\n"
              ".create-or-alter table S ingestion json mapping 'S_map'\n"
              "'[{\"column\": \"a\", \"Properties\": {\"Path\": \"$.a\"}}]'\n"
              ".alter table S policy streamingingestion enable\n")
    result = client.execute_mgmt(DB, ".execute database script <|\n" + script)
    assert [r["Result"] for r in result.primary_results[0]] == ["Completed"] * 3
    failing = client.execute_mgmt(DB, ".execute database script <|\n.alter table Nope policy "
                                      "caching hot = 1d\n.create-merge table U (a:string)")
    assert [r["Result"] for r in failing.primary_results[0]] == ["Failed", "Skipped"]
    assert "Nope" in failing.primary_results[0][0]["Reason"]
    tolerant = client.execute_mgmt(DB, ".execute database script with (ContinueOnErrors=true) <|"
                                       "\n.frobnicate\n.create-merge table U (a:string)")
    assert [r["Result"] for r in tolerant.primary_results[0]] == ["Failed", "Completed"]


def test_project_provision_script_runs_twice():
    """Every command of provision.kql (the project's DDL) is accepted, and re-running is safe."""
    path = Path(__file__).resolve().parents[1] / "provision.kql"
    if not path.exists():
        pytest.skip("no provision.kql")
    body = "\n".join(line for line in path.read_text().splitlines()
                     if not line.lstrip().startswith("//"))
    commands = [c.strip() for c in re.split(r"\n\s*\n", body) if c.strip()]
    with LoopbackKusto() as srv, KustoClient(srv.kcsb()) as kusto:
        for _ in range(2):
            for command in commands:
                kusto.execute_mgmt(DB, command)
        tables = [r["TableName"] for r in kusto.execute_mgmt(DB, ".show tables").primary_results[0]]
        assert all(srv.streaming_enabled(t) for t in tables)
        assert all((t, f"{t}_json_mapping") in srv.mappings for t in tables)
        assert srv.errors == []


# --------------------------------------------------------------------------- ingest + query


def test_stream_ingest_and_query_with_parameters(server, client, ingest, items, tmp_path):
    rows = records(len(TRICKY), "tricky")
    half = len(rows) // 2
    result = ingest.ingest_from_stream(io.StringIO(jsonl(rows[:half])), props())
    assert result.status.name == "SUCCESS"
    sent = server.requests[-1]
    assert sent.route == "ingest" and sent.headers["Content-Encoding"] == "gzip"
    assert f"streamFormat=multijson&mappingName={MAPPING}" in sent.path
    # the rest from a file, as newline-delimited JSON
    path = tmp_path / "rows.json"
    path.write_text(jsonl(rows[half:]), encoding="utf-8")
    ingest.ingest_from_file(str(path), props(fmt=DataFormat.JSON))
    assert len(server.rows(TABLE)) == len(TRICKY)

    # a string parameter finds each tricky value exactly, and nothing else
    for i, value in enumerate(TRICKY):
        found = query(client, f"declare query_parameters(t:string); {TABLE} | where thread_id == t",
                      t=kql_string(value))
        assert [r["thread_id"] for r in found] == [value]
        row = found[0]
        assert row["seq"] == 10_000_000_000 + i and isinstance(row["seq"], int)
        assert row["n"] == i and isinstance(row["n"], int)
        assert row["body"] == TRICKY[-1 - i]
        assert row["metadata"] == rows[i]["metadata"]  # dynamic -> parsed dict
        assert row["written_at"] == T0 + dt.timedelta(minutes=i)  # aware UTC datetime
        assert row["written_at"].tzinfo is not None

    # dynamic list parameter with `in`
    some = TRICKY[::3]
    found = query(client, f"declare query_parameters(ids:dynamic); {TABLE} "
                          "| where thread_id in (ids) | project thread_id", ids=kql_dynamic(some))
    assert sorted(r["thread_id"] for r in found) == sorted(some)
    assert server.requests[-1].parameters == {"ids": kql_dynamic(some)}

    # datetime comparisons (and a long parameter sent as a JSON number)
    found = query(client, f"declare query_parameters(since:datetime, until:datetime, min:long);"
                          f" {TABLE} | where written_at >= since and written_at < until"
                          " and seq >= min | order by written_at asc | project n, written_at",
                  since=kql_datetime(T0 + dt.timedelta(minutes=2)),
                  until=kql_datetime(T0 + dt.timedelta(minutes=5)), min=10_000_000_003)
    assert [r["n"] for r in found] == [3, 4]

    # dynamic member access, and a dynamic value computed by the query
    found = query(client, f"declare query_parameters(k:string); {TABLE} "
                          "| where tostring(metadata.nested.k) == k "
                          "| project step = toint(metadata.step), tags = metadata.tags",
                  k=kql_string(TRICKY[6]))
    assert found == [{"step": 6, "tags": ["a", TRICKY[6]]}]


def test_ingest_without_mapping_maps_by_column_name(server, client, ingest, items):
    raw = {"thread_id": "x", "seq": 1, "n": 2, "body": "b", "metadata": [1, {"a": None}],
           "written_at": "2024-01-01T00:00:00Z", "unknown": "ignored"}
    ingest.ingest_from_stream(io.StringIO(json.dumps(raw)), props(mapping=None))
    [row] = server.rows(TABLE)
    assert row == {"thread_id": "x", "seq": 1, "n": 2, "body": "b", "metadata": [1, {"a": None}],
                   "written_at": dt.datetime(2024, 1, 1)}


def test_multijson_accepts_arrays_and_pretty_printing(server, client, ingest, items):
    text = json.dumps(records(3), indent=2) + "\n" + json.dumps(records(1, "z")[0], indent=4)
    ingest.ingest_from_stream(io.StringIO(text), props())
    assert [r["thread_id"] for r in server.rows(TABLE)] == ["t-0", "t-1", "t-2", "z-0"]


def test_ingest_errors_are_permanent_kusto_errors(server, client, ingest, items):
    with pytest.raises(KustoApiError, match="Mapping reference") as caught:
        ingest.ingest_from_stream(io.StringIO(jsonl(records(1))), props(mapping="nope"))
    error = caught.value.get_api_error()
    assert error.permanent is True and error.code == "BadRequest_MappingReferenceWasNotFound"
    with pytest.raises(KustoApiError, match="Entity ID 'Nope' of kind 'Table'"):
        ingest.ingest_from_stream(io.StringIO(jsonl(records(1))), props(table="Nope"))
    with pytest.raises(KustoApiError, match="invalid multijson"):
        ingest.ingest_from_stream(io.StringIO('{"thread_id": "x"'), props())
    with pytest.raises(KustoApiError, match="not 'csv'"):
        ingest.ingest_from_stream(io.StringIO("a,b"), props(mapping=None, fmt=DataFormat.CSV))
    assert server.rows(TABLE) == []


def test_value_size_rules_of_kusto(server, client, ingest, items):
    """A string cell over 1 MB (UTF-8) is cut to 1 MB, a dynamic cell over 1 MB is null,
    silently, on streaming and inline ingestion alike."""
    limit = server.max_value_bytes
    assert limit == 1024 * 1024
    exact = "x" * limit
    long_ascii = "y" * (limit + 10)
    long_utf8 = "é" * (limit // 2) + "z"  # 2 bytes each: the cut falls inside no character
    big_meta = {"blob": "m" * limit}
    docs = [
        {"thread_id": "exact", "payload": {"text": exact}, "metadata": {"ok": 1}},
        {"thread_id": "ascii", "payload": {"text": long_ascii}, "metadata": big_meta},
        {"thread_id": "utf8", "payload": {"text": long_utf8}, "metadata": [1]},
    ]
    ingest.ingest_from_stream(io.StringIO(jsonl(docs[:2])), props())
    client.execute_mgmt(DB, f".ingest inline into table {TABLE} with (format='multijson', "
                            f"ingestionMappingReference='{MAPPING}') <|\n{jsonl(docs[2:])}")
    rows = {r["thread_id"]: r for r in server.rows(TABLE)}
    assert rows["exact"]["body"] == exact and rows["exact"]["metadata"] == {"ok": 1}
    assert rows["ascii"]["body"] == long_ascii[:limit] and rows["ascii"]["metadata"] is None
    assert rows["utf8"]["body"] == "é" * (limit // 2) and rows["utf8"]["metadata"] == [1]
    got = query(client, f"{TABLE} | where thread_id == 'ascii' | project n = strlen(body)")
    assert got == [{"n": limit}]


def test_streaming_request_over_4_mb_is_refused(server, client, ingest, items):
    limit = server.max_streaming_bytes
    assert limit == 4 * 1024 * 1024
    doc = {"thread_id": "big", "payload": {"text": "b" * 900_000}}
    under = jsonl([doc] * 4)  # 3.6 MB
    over = jsonl([doc] * 5)  # 4.5 MB (gzip makes it tiny on the wire: the data counts)
    ingest.ingest_from_stream(io.StringIO(under), props())
    with pytest.raises(KustoApiError, match="over the streaming ingestion limit") as caught:
        ingest.ingest_from_stream(io.StringIO(over), props())
    assert caught.value.get_api_error().permanent is True
    assert len(server.rows(TABLE)) == 4
    sizes = [len(r.body) for r in server.requests if r.route == "ingest"]
    assert sizes == [len(under.encode()), len(over.encode())]


def test_ingest_inline(server, client, items):
    rows = records(5, "tricky")
    client.execute_mgmt(DB, f".ingest inline into table {TABLE} with (format=\"multijson\", "
                            f"ingestionMappingReference=\"{MAPPING}\") <|\n{jsonl(rows)}")
    got = server.rows(TABLE)
    assert [r["thread_id"] for r in got] == [r["thread_id"] for r in rows]
    assert [r["body"] for r in got] == [r["payload"]["text"] for r in rows]
    with pytest.raises(KustoApiError, match="Mapping reference 'nope'"):
        client.execute_mgmt(DB, f".ingest inline into table {TABLE} with (format='json', "
                                f"ingestionMappingReference='nope') <| {jsonl(rows[:1])}")
    with pytest.raises(KustoApiError, match="not 'csv'"):
        client.execute_mgmt(DB, f".ingest inline into table {TABLE} <| a,b")
    assert len(server.rows(TABLE)) == 5


@pytest.mark.parametrize("kind", ["fail", "drop"])
def test_faults_after_the_work_store_the_rows(server, client, ingest, items, kind):
    """``after=True``: the rows land, the client still sees an error (a retry duplicates)."""
    if kind == "fail":
        server.faults.fail_next(1, status=503, route="ingest", after=True)
        expected: type[Exception] = KustoApiError
    else:
        server.faults.drop_next(1, route="ingest", after=True)
        expected = KustoNetworkError
    with pytest.raises(expected):
        ingest.ingest_from_stream(io.StringIO(jsonl(records(2))), props())
    assert [r["thread_id"] for r in server.rows(TABLE)] == ["t-0", "t-1"]
    ingest.ingest_from_stream(io.StringIO(jsonl(records(2))), props())  # the retry
    assert [r["thread_id"] for r in server.rows(TABLE)] == ["t-0", "t-1", "t-0", "t-1"]
    assert server.faults.injected[kind] == 1 and server.requests[-2].fault == kind


def test_streaming_policy_can_be_required(client):
    with LoopbackKusto(require_streaming_policy=True) as srv, \
            KustoClient(srv.kcsb()) as kusto, KustoStreamingIngestClient(srv.kcsb()) as ingest:
        kusto.execute_mgmt(DB, f".create-merge table {TABLE} ({COLUMNS})")
        with pytest.raises(KustoApiError, match="Streaming ingestion policy is not enabled"):
            ingest.ingest_from_stream(io.StringIO(jsonl(records(1))), props(mapping=None))
        kusto.execute_mgmt(DB, f".alter database {DB} policy streamingingestion enable")
        ingest.ingest_from_stream(io.StringIO(jsonl(records(1))), props(mapping=None))
        assert len(srv.rows(TABLE)) == 1


# --------------------------------------------------------------------------- parameters


def test_parameter_wire_format_of_the_sdk(server, client):
    """What ClientRequestProperties.set_parameter puts on the wire, value by value."""
    client.execute_query(DB, "declare query_parameters(s:string, l:long, d:dynamic, t:datetime);"
                             " print s, l, d, t",
                         crp(s=kql_string("a'b\""), l=5, d=kql_dynamic(["x"]), t=kql_datetime(T0)))
    body = server.requests[-1].body
    assert isinstance(body["properties"], str)  # a JSON string, not an object
    assert json.loads(body["properties"])["Parameters"] == {
        "s": '"a\'b\\""', "l": 5, "d": 'dynamic(["x"])',
        "t": "datetime(2024-05-06T07:08:09.1234560Z)"}


def test_parameters_round_trip_their_types(server, client):
    [row] = query(client, "declare query_parameters(s:string, l:long, i:int, d:dynamic, "
                          "t:datetime, b:bool, r:real, nd:dynamic, nt:datetime); "
                          "print s = s, l = l, i = i, d = d, t = t, b = b, r = r, nd = nd, nt = nt",
                  s=kql_string(TRICKY[7]), l="-9000000000", i="int(42)",
                  d=kql_dynamic({"k": [1, "two"]}),
                  t=kql_datetime(T0), b="bool(true)", r="real(1.5)", nd="dynamic(null)",
                  nt="datetime(null)")
    assert row == {"s": TRICKY[7], "l": -9000000000, "i": 42, "d": {"k": [1, "two"]}, "t": T0,
                   "b": True, "r": 1.5, "nd": None, "nt": None}


def test_sdk_naive_parameter_values_are_refused_like_kusto(server, client):
    """A raw string, a list or a datetime handed straight to set_parameter is not a literal."""
    with pytest.raises(KustoApiError, match="send a KQL string literal"):
        query(client, "declare query_parameters(s:string); print s", s="raw value")
    with pytest.raises(KustoApiError, match="parameter values travel as strings"):
        query(client, "declare query_parameters(d:dynamic); print d", d=["a"])
    with pytest.raises(KustoApiError, match="datetime"):
        query(client, "declare query_parameters(t:datetime); print t", t=T0)
    with pytest.raises(KustoApiError, match="invalid value"):
        query(client, "declare query_parameters(l:long); print l", l="12abc")
    with pytest.raises(KustoApiError):
        query(client, "declare query_parameters(s:string); print s")  # no value, no default
    # an undeclared parameter is ignored, as Kusto does
    assert query(client, "print x = 1", extra="value") == [{"x": 1}]


def test_lenient_parameters_accept_sdk_naive_values():
    with LoopbackKusto(strict_parameters=False) as srv, KustoClient(srv.kcsb()) as kusto:
        [row] = query(kusto, "declare query_parameters(d:dynamic, t:datetime, s:string, q:string);"
                             " print d = d, t = t, s = s, q = q",
                      d=["a", 1], t=T0, s="Flash Flood", q="'quoted'")
        # a raw string is taken verbatim, unless it is itself a literal: the hazard of raw strings
        assert row == {"d": ["a", 1], "t": T0, "s": "Flash Flood", "q": "quoted"}


@pytest.mark.parametrize(("kind", "sent", "expected"), [
    ("string", '"datetime(2020-01-01)"', "datetime(2020-01-01)"),
    ("string", "'it\\'s'", "it's"), ("string", '@"c:\\dir"', "c:\\dir"), ("string", "", ""),
    ("string", '"a" \'b\'', "ab"), ("string", '"\\ud83d\\ude42 \\x41"', "🙂 A"),
    ("long", 7, 7), ("long", "7", 7), ("long", "long(-7)", -7), ("long", "long(null)", None),
    ("int", "int(3)", 3),
    ("datetime", "datetime(2024-01-02T03:04:05.1234567Z)",
     dt.datetime(2024, 1, 2, 3, 4, 5, 123456)),
    ("datetime", "datetime(2024-01-02 03:04:05+02:00)", dt.datetime(2024, 1, 2, 1, 4, 5)),
    ("datetime", "datetime(2024-01-02)", dt.datetime(2024, 1, 2)),
    ("dynamic", 'dynamic(["a", {"b": null}])', '["a", {"b": null}]'),
    ("dynamic", "dynamic(null)", None),
    ("bool", "false", False), ("real", "real(2.5)", 2.5),
    ("timespan", "timespan(1d)", dt.timedelta(days=1)), ("timespan", "time(00:00:30)",
                                                          dt.timedelta(seconds=30)),
])
def test_decode_parameter(kind, sent, expected):
    assert decode_parameter("p", kind, sent) == expected


@pytest.mark.parametrize(("kind", "sent"), [
    ("string", 5), ("string", "raw"), ("string", '"unterminated'), ("string", '"a"b'),
    ("long", True), ("long", 1.5), ("long", "1e3"),
    ("datetime", "2024-01-02T03:04:05Z"), ("datetime", "datetime(yesterday)"),
    ("dynamic", '["a"]'), ("dynamic", ["a"]), ("dynamic", "dynamic(['single quotes'])"),
])
def test_decode_parameter_refuses(kind, sent):
    with pytest.raises(Exception, match="invalid value"):
        decode_parameter("p", kind, sent)


@pytest.mark.parametrize("value", TRICKY + ["\x00\x07\x7f\u2028", "a\\", "\\", '"', "'"])
def test_encode_then_decode_is_exact(value):
    assert decode_parameter("p", "string", encode_parameter(value, "string")) == value
    wrapped = {"k": value, "l": [value]}
    assert json.loads(decode_parameter("p", "dynamic", encode_parameter(wrapped, "dynamic"))) \
        == wrapped


_KQLCHECK = Path(__file__).resolve().parent / "kqlcheck"
_LITERAL_VALUES_JS = r"""
const path = require("path");
const dir = path.dirname(require.resolve("@kusto/language-service-next/package.json",
                                         { paths: [process.argv[1]] }));
require(path.join(dir, "bridge.min.js"));
require(path.join(dir, "Kusto.Language.Bridge.min.js"));
const K = globalThis.Kusto.Language;
const out = JSON.parse(require("fs").readFileSync(0, "utf8")).map((text) => {
  const code = K.KustoCode.ParseAndAnalyze(text);
  const errors = [];
  const diagnostics = code.GetDiagnostics();
  for (let i = 0; i < diagnostics.Count; i++) errors.push(diagnostics.getItem(i).Message);
  let value = null;
  const walk = (node) => {
    if (!node || value !== null) return;
    if (typeof node.LiteralValue === "string") { value = node.LiteralValue; return; }
    for (let i = 0; i < (node.ChildCount || 0); i++) walk(node.GetChild(i));
  };
  walk(code.Syntax);
  return { value, errors };
});
process.stdout.write(JSON.stringify(out));
"""


def test_string_and_dynamic_encodings_parse_as_kusto_parses_them():
    """Microsoft's own parser (Kusto.Language, tests/kqlcheck) reads every encoded string
    parameter back as the original value, and accepts every encoded dynamic literal."""
    if shutil.which("node") is None or not (_KQLCHECK / "node_modules").is_dir():
        pytest.skip("needs Node.js and `npm ci --prefix tests/kqlcheck`")
    values = TRICKY + ["\x00\x07\x7f\u2028", "a\\", '"', "'"]
    texts = [f"print v = {encode_parameter(v, 'string')}" for v in values]
    texts += [f"print v = {encode_parameter({'k': v, 'l': [v, 1]}, 'dynamic')}" for v in values]
    done = subprocess.run(["node", "-e", _LITERAL_VALUES_JS, str(_KQLCHECK)], text=True,
                          input=json.dumps(texts), capture_output=True, timeout=120, check=True)
    results = json.loads(done.stdout)
    assert [r["errors"] for r in results] == [[]] * len(texts)
    assert [r["value"] for r in results[:len(values)]] == values


# --------------------------------------------------------------------------- soft delete


def test_delete_records_with_a_parameter(server, client, ingest, items):
    rows = records(4, "keep") + records(3, "gone") + records(len(TRICKY), "tricky")
    ingest.ingest_from_stream(io.StringIO(jsonl(rows)), props())
    command = (f".delete table {TABLE} records <| declare query_parameters(p:string);\n"
               f"{TABLE} | where thread_id == p")
    for value in ["gone-0", "gone-2", TRICKY[8], TRICKY[9]]:
        result = client.execute_mgmt(DB, command, crp(p=kql_string(value))).primary_results[0]
        assert sum(r["RecordsMatchPredicate"] for r in result) == 1
    left = [r["thread_id"] for r in server.rows(TABLE)]
    assert "gone-1" in left and "gone-0" not in left and TRICKY[8] not in left
    assert len(left) == len(rows) - 4

    # whatif counts without deleting; no match is an empty result
    whatif = client.execute_mgmt(
        DB, f".delete table {TABLE} records with (whatif=true) <| declare query_parameters("
            f"ids:dynamic); {TABLE} | where thread_id in (ids)",
        crp(ids=kql_dynamic(["keep-0", "keep-1", "nobody"]))).primary_results[0]
    assert sum(r["RecordsMatchPredicate"] for r in whatif) == 2
    assert len(server.rows(TABLE)) == len(rows) - 4
    none = client.execute_mgmt(DB, command, crp(p=kql_string("nobody"))).primary_results[0]
    assert len(none) == 0

    # datetime predicate
    client.execute_mgmt(DB, f".delete table {TABLE} records <| declare query_parameters("
                            f"before:datetime); {TABLE} | where written_at < before",
                        crp(before=kql_datetime(T0 + dt.timedelta(minutes=2))))
    assert all(r["written_at"] >= dt.datetime(2024, 5, 6, 7, 10) for r in server.rows(TABLE))


def test_delete_records_predicate_rules(server, client, items):
    client.execute_mgmt(DB, ".create-merge table Other (thread_id:string)")
    with pytest.raises(KustoApiError, match="must be a query over"):
        client.execute_mgmt(DB, f".delete table {TABLE} records <| Other | where thread_id == 'x'")
    with pytest.raises(KustoApiError, match="at least one 'where'"):
        client.execute_mgmt(DB, f".delete table {TABLE} records <| {TABLE}")
    with pytest.raises(KustoApiError, match="only use"):
        client.execute_mgmt(DB, f".delete table {TABLE} records <| {TABLE} | where n > 1 | take 1")
    # a '|' inside a string literal is not an operator
    client.execute_mgmt(DB, f".delete table {TABLE} records <| {TABLE} "
                            "| where body == 'a | take 1'")


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize("route", ["query", "mgmt", "ingest"])
@pytest.mark.parametrize(("status", "expected"), [
    (429, KustoThrottlingError), (503, KustoApiError), (500, KustoApiError)])
def test_fail_next_raises_the_sdk_error(server, client, ingest, items, route, status, expected):
    calls = {
        "query": lambda: client.execute_query(DB, f"{TABLE} | count"),
        "mgmt": lambda: client.execute_mgmt(DB, ".show tables"),
        "ingest": lambda: ingest.ingest_from_stream(io.StringIO(jsonl(records(1))), props()),
    }
    before = server.counts[route]
    server.faults.fail_next(1, status=status, route=route)
    with pytest.raises(expected) as caught:
        calls[route]()
    if expected is KustoApiError:
        assert caught.value.get_api_error().permanent is False
        assert caught.value.http_response.status_code == status
    else:
        assert not isinstance(caught.value, KustoServiceError)  # throttling is its own branch
    calls[route]()  # the fault is used up
    assert server.counts[route] == before + 2
    assert server.faults.pending == 0 and server.faults.injected["fail"] == 1
    assert len(server.rows(TABLE)) == (1 if route == "ingest" else 0)


def test_faults_only_hit_their_route_and_count(server, client, ingest, items):
    server.faults.fail_next(2, status=503, route="ingest")
    client.execute_query(DB, f"{TABLE} | count")  # not affected
    for _ in range(2):
        with pytest.raises(KustoApiError):
            ingest.ingest_from_stream(io.StringIO(jsonl(records(1))), props())
    ingest.ingest_from_stream(io.StringIO(jsonl(records(1))), props())
    assert [r.status for r in server.requests if r.route == "ingest"] == [503, 503, 200]
    assert server.counts["ingest"] == 3


def test_custom_fault_body(server, client):
    server.faults.fail_next(1, status=503, body="upstream proxy error")
    with pytest.raises(KustoServiceError, match="upstream proxy error") as caught:
        client.execute_query(DB, "print 1")
    assert not isinstance(caught.value, KustoApiError)  # no JSON body: plain service error


@pytest.mark.parametrize("route", ["query", "mgmt", "ingest"])
def test_drop_next_is_a_network_error(server, client, ingest, items, route):
    server.faults.drop_next(1, route=route)
    with pytest.raises(KustoNetworkError):
        if route == "ingest":
            ingest.ingest_from_stream(io.StringIO(jsonl(records(1))), props())
        elif route == "mgmt":
            client.execute_mgmt(DB, ".show tables")
        else:
            client.execute_query(DB, "print 1")
    assert server.requests[-1].fault == "drop"
    client.execute_query(DB, "print 1")  # the SDK reconnects; no retry consumed another fault
    assert server.faults.injected["drop"] == 1 and server.counts[route] >= 1


def test_delay_next_slows_the_answer(server, client):
    server.faults.delay_next(1, seconds=0.6)
    started = time.monotonic()
    assert query(client, "print x = 1") == [{"x": 1}]
    assert time.monotonic() - started >= 0.6
    started = time.monotonic()
    query(client, "print x = 1")
    assert time.monotonic() - started < 0.6


def test_delay_beyond_the_client_timeout_is_a_network_error(server):
    """The SDK's own timeout is servertimeout + a 30 s ``_client_server_delta``, so a test
    that wants it to fire quickly has to lower that class default on its client instance."""
    kusto = KustoClient(server.kcsb())
    kusto._client_server_delta = dt.timedelta(0)
    options = ClientRequestProperties()
    options.set_option(ClientRequestProperties.request_timeout_option_name,
                       dt.timedelta(seconds=1))
    server.faults.delay_next(1, seconds=3)
    started = time.monotonic()
    with pytest.raises(KustoNetworkError):
        kusto.execute_query(DB, "print 1", options)
    assert time.monotonic() - started < 2.5
    assert json.loads(server.requests[-1].body["properties"])["Options"] == {
        "servertimeout": "0:00:01"}  # a timedelta goes over the wire as str(timedelta)
    kusto.close()


def test_delay_and_failure_combine(server, client):
    server.faults.delay_next(1, seconds=0.3)
    server.faults.fail_next(1, status=429)
    started = time.monotonic()
    with pytest.raises(KustoThrottlingError):
        client.execute_query(DB, "print 1")
    assert time.monotonic() - started >= 0.3


def test_faults_validate_their_arguments(server):
    with pytest.raises(ValueError):
        server.faults.fail_next(1, route="queries")
    with pytest.raises(ValueError):
        server.faults.drop_next(0)
    server.faults.delay_next(3, 1.0)
    assert server.faults.pending == 3
    server.faults.clear()
    assert server.faults.pending == 0


# --------------------------------------------------------------------------- managed streaming


def test_managed_streaming_retries_transient_errors(server, client, items):
    managed = ManagedStreamingIngestClient(server.kcsb())
    server.faults.fail_next(2, status=503, route="ingest")
    managed.ingest_from_stream(io.StringIO(jsonl(records(2))), props())
    attempts = [r for r in server.requests if r.route == "ingest"]
    assert [r.status for r in attempts] == [503, 503, 200]
    ids = [r.headers["x-ms-client-request-id"] for r in attempts]
    assert [i.rsplit(";", 1)[1] for i in ids] == ["0", "1", "2"]
    assert all(i.startswith("KPC.executeManagedStreamingIngest;") for i in ids)
    assert len(server.rows(TABLE)) == 2
    managed.close()


def test_managed_streaming_falls_back_to_queued_which_needs_a_dm_endpoint(server, client, items):
    """Three transient failures (or throttling) make the managed client switch to queued
    ingestion, whose first step (.get ingestion resources) the loopback refuses."""
    managed = ManagedStreamingIngestClient(server.kcsb())
    server.faults.fail_next(3, status=429, route="ingest")
    with pytest.raises(KustoApiError, match="Queued ingestion is not supported"):
        managed.ingest_from_stream(io.StringIO(jsonl(records(1))), props())
    assert server.requests[-1].csl == ".get ingestion resources"
    assert server.requests[-1].body["db"] == "NetDefaultDB"
    managed.close()


# --------------------------------------------------------------------------- anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


@pytest.mark.anyio
async def test_sync_sdk_from_async_code_concurrently():
    async with LoopbackKusto() as srv:
        kusto = KustoClient(srv.kcsb())
        ingest_client = KustoStreamingIngestClient(srv.kcsb())
        await anyio.to_thread.run_sync(provision, kusto)
        limiter = anyio.CapacityLimiter(8)

        async def write(i: int) -> None:
            rows = records(5, f"w{i}")
            await anyio.to_thread.run_sync(
                lambda: ingest_client.ingest_from_stream(io.StringIO(jsonl(rows)), props()),
                limiter=limiter)

        async def read(i: int) -> None:
            await anyio.to_thread.run_sync(
                lambda: query(kusto, f"declare query_parameters(p:string); {TABLE} "
                                     "| where thread_id startswith p | count",
                      p=kql_string(f"w{i}-")),
                limiter=limiter)

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(write, i)
                tg.start_soon(read, i)
        [count] = await anyio.to_thread.run_sync(query, kusto, f"{TABLE} | count")
        assert count == {"Count": 100}
        srv.faults.fail_next(1, status=429, route="query")
        with pytest.raises(KustoThrottlingError):
            await anyio.to_thread.run_sync(query, kusto, "print 1")
        kusto.close()
        ingest_client.close()
        assert srv.errors == []


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_aio_client(anyio_backend):
    aio = pytest.importorskip("azure.kusto.data.aio", reason="pip install 'azure-kusto-data[aio]'")
    async with LoopbackKusto() as srv, aio.KustoClient(srv.kcsb()) as kusto:
        await kusto.execute_mgmt(DB, f".create-merge table {TABLE} ({COLUMNS})")
        ingest_client = KustoStreamingIngestClient(srv.kcsb())
        await anyio.to_thread.run_sync(
            lambda: ingest_client.ingest_from_stream(io.StringIO(jsonl(records(3))),
                                                     props(mapping=None)))
        ingest_client.close()
        response = await kusto.execute_query(
            DB, f"declare query_parameters(ids:dynamic, t:datetime); {TABLE} "
                "| where thread_id in (ids) and written_at > t | project thread_id, metadata",
            crp(ids=kql_dynamic(["t-1", "t-2"]), t=kql_datetime(T0)))
        rows = [r.to_dict() for r in response.primary_results[0]]
        assert sorted(r["thread_id"] for r in rows) == ["t-1", "t-2"]
        assert all(isinstance(r["metadata"], dict) for r in rows)

        srv.faults.fail_next(1, status=429)
        with pytest.raises(KustoThrottlingError):
            await kusto.execute_query(DB, "print 1")
        srv.faults.fail_next(1, status=503)
        with pytest.raises(KustoApiError):
            await kusto.execute_query(DB, "print 1")
        srv.faults.drop_next(1)
        with pytest.raises(KustoNetworkError):
            await kusto.execute_query(DB, "print 1")
        # a delayed answer can be abandoned by cancellation; the loopback does not mind
        srv.faults.delay_next(1, seconds=5)
        with pytest.raises(TimeoutError):
            with anyio.fail_after(0.3):
                await kusto.execute_query(DB, "print 1")
        assert [r.to_dict() for r in (await kusto.execute_query(DB, "print x = 2"))
                .primary_results[0]] == [{"x": 2}]
    assert srv.errors == []
