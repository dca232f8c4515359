"""provision.kql matches engine/schema.py, and Kusto's own parser accepts it.

The structural tests parse provision.kql in Python and run everywhere. The
checker tests run each command through Kusto.Language (tests/kqlcheck). They
are skipped when Node.js or the npm package is missing; install it with
`npm ci --prefix tests/kqlcheck`.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kql_checker  # noqa: E402
from kql_checker import (  # noqa: E402
    check_kql,
    errors,
    format_diagnostics,
    node_available,
    provision_commands,
)

schema = kql_checker.load_schema()

needs_node = pytest.mark.skipif(not node_available(), reason=kql_checker.NODE_MISSING_REASON)

DATA_TABLES = [t.name for t in schema.TABLES if t.name not in (schema.TOMBSTONES.name, schema.COMPACTIONS.name)]


# --------------------------------------------------------------------------- parsing helpers


@pytest.fixture(scope="module")
def commands() -> list[tuple[int, str]]:
    cmds = provision_commands()
    assert cmds, "provision.kql has no commands"
    return cmds


def _balanced_parens(text: str, start: int) -> tuple[str, int]:
    """The text inside the parenthesis opening at ``start``, and the index after it."""
    assert text[start] == "("
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
    raise AssertionError(f"unbalanced parentheses in {text!r}")


_CREATE_MERGE = re.compile(r"^\.create-merge\s+table\s+(?P<name>\w+)\s*(?=\()")
_COLUMN = re.compile(r"^\s*(?P<name>[A-Za-z_]\w*)\s*:\s*(?P<type>\w+)\s*$")


def parse_create_merge_tables(commands: list[tuple[int, str]]) -> dict[str, list[tuple[str, str]]]:
    tables: dict[str, list[tuple[str, str]]] = {}
    for line, cmd in commands:
        if not cmd.startswith(".create-merge"):
            continue
        m = _CREATE_MERGE.match(cmd)
        assert m, f"line {line}: unexpected .create-merge form: {cmd[:80]!r}"
        body, end = _balanced_parens(cmd, m.end())
        rest = cmd[end:].strip()
        assert rest == "" or rest.startswith("with"), f"line {line}: unexpected text after columns: {rest!r}"
        columns = []
        for part in body.split(","):
            cm = _COLUMN.match(part)
            assert cm, f"line {line}: cannot parse column {part!r}"
            columns.append((cm["name"], cm["type"]))
        assert m["name"] not in tables, f"table {m['name']} is created twice"
        tables[m["name"]] = columns
    return tables


_MAPPING = re.compile(
    r'^\.create-or-alter\s+table\s+(?P<table>\w+)\s+ingestion\s+json\s+mapping\s+"(?P<name>[^"]+)"\s*(?P<rest>.*)$',
    re.DOTALL,
)
_SQ_LITERAL = re.compile(r"'((?:[^'\\\n]|\\.)*)'")


def parse_mappings(commands: list[tuple[int, str]]) -> dict[str, dict[str, list[dict]]]:
    """{table: {mapping_name: [mapping element, ...]}}"""
    out: dict[str, dict[str, list[dict]]] = {}
    for line, cmd in commands:
        if " ingestion " not in cmd:
            continue
        m = _MAPPING.match(cmd)
        assert m, f"line {line}: unexpected mapping command form: {cmd[:80]!r}"
        rest = m["rest"]
        assert _SQ_LITERAL.sub("", rest).strip() == "", f"line {line}: mapping is not only string literals"
        text = "".join(_SQ_LITERAL.findall(rest))
        elements = json.loads(text)
        out.setdefault(m["table"], {})[m["name"]] = elements
    return out


def render_create_merge(table) -> str:
    """The .create-merge command engine/schema.py implies (shown when provision.kql drifts)."""
    cols = ",\n".join(f"    {c}: {t}" for c, t in table.columns)
    return f".create-merge table {table.name} (\n{cols}\n) with (folder = \"langgraph\", docstring = \"...\")"


def render_mapping(table) -> str:
    """The JSON mapping command engine/schema.py implies (shown when provision.kql drifts)."""
    lines = [
        json.dumps({"column": c, "datatype": t, "Properties": {"Path": f"$.{c}"}}) + ("," if i < len(table.columns) - 1 else "")
        for i, (c, t) in enumerate(table.columns)
    ]
    body = "\n".join(f"'{line}'" for line in lines)
    return f'.create-or-alter table {table.name} ingestion json mapping "{schema.mapping_name(table.name)}"\n\'[\'\n{body}\n\']\''


def commands_matching(commands: list[tuple[int, str]], pattern: str) -> list[re.Match]:
    rx = re.compile(pattern, re.DOTALL)
    return [m for _, cmd in commands if (m := rx.match(cmd))]


def _days(value: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(d|h|m|s)", value)
    assert m, f"cannot read timespan {value!r}"
    return float(m[1]) / {"d": 1, "h": 24, "m": 1440, "s": 86400}[m[2]]


# --------------------------------------------------------------------------- structure (no Node)


def test_every_command_is_a_management_command(commands):
    for line, cmd in commands:
        assert cmd.startswith("."), f"line {line}: not a control command: {cmd[:60]!r}"
        assert not cmd.lstrip().startswith("//")


def test_fallback_splitter_agrees_with_duckdb_kql():
    pytest.importorskip("duckdb_kql")
    text = kql_checker.PROVISION_KQL.read_text(encoding="utf-8")
    assert kql_checker._split_blank_lines(text) == kql_checker.split_script(text)


def test_tables_and_columns_match_schema(commands):
    created = parse_create_merge_tables(commands)
    expected = {t.name: list(t.columns) for t in schema.TABLES}
    assert set(created) == set(expected), "provision.kql must create exactly the tables of engine/schema.py"
    for table in schema.TABLES:
        assert created[table.name] == list(table.columns), (
            f"{table.name}: columns/types differ from engine/schema.py; expected:\n{render_create_merge(table)}"
        )


def test_every_table_has_its_json_mapping(commands):
    mappings = parse_mappings(commands)
    assert set(mappings) == {t.name for t in schema.TABLES}
    for table in schema.TABLES:
        assert list(mappings[table.name]) == [schema.mapping_name(table.name)], table.name
        elements = mappings[table.name][schema.mapping_name(table.name)]
        expected = [{"column": c, "datatype": t, "Properties": {"Path": f"$.{c}"}} for c, t in table.columns]
        assert elements == expected, f"{table.name}: mapping differs from engine/schema.py; expected:\n{render_mapping(table)}"


def test_every_table_has_streaming_batching_retention_and_caching(commands):
    for table in schema.TABLES:
        name = table.name
        assert commands_matching(commands, rf"^\.alter table {name} policy streamingingestion enable$"), name
        batching = commands_matching(commands, rf"^\.alter table {name} policy ingestionbatching '(?P<json>[^']*)'$")
        assert len(batching) == 1, name
        policy = json.loads(batching[0]["json"])
        assert set(policy) == {"MaximumBatchingTimeSpan", "MaximumNumberOfItems", "MaximumRawDataSizeMB"}
        assert commands_matching(
            commands, rf"^\.alter-merge table {name} policy retention softdelete = \d+d recoverability = \w+$"
        ), name
        assert commands_matching(commands, rf"^\.alter table {name} policy caching hot = \d+d$"), name


def _retention_days(commands, kind: str, name: str) -> float:
    found = commands_matching(commands, rf"^\.alter-merge {kind} {name} policy retention softdelete = (\w+)")
    assert len(found) == 1, f"{kind} {name}: expected one retention policy"
    return _days(found[0][1])


def _hot_days(commands, kind: str, name: str) -> float:
    found = commands_matching(commands, rf"^\.alter {kind} {name} policy caching hot = (\w+)$")
    assert len(found) == 1, f"{kind} {name}: expected one caching policy"
    return _days(found[0][1])


def test_tombstones_outlive_the_rows_they_hide(commands):
    # A tombstone must outlive every row it covers, including rows re-ingested
    # by a retry or replay after the delete (retention counts from ingestion).
    data = max(_retention_days(commands, "table", t) for t in DATA_TABLES)
    tomb = _retention_days(commands, "table", schema.TOMBSTONES.name)
    assert tomb >= data + 7, "Tombstones retention must exceed data retention by more than any retry window"
    # Every read joins Tombstones: keep all of it hot.
    assert _hot_days(commands, "table", schema.TOMBSTONES.name) >= tomb


def test_latest_checkpoints_view(commands):
    views = kql_checker.parse_materialized_views(commands)
    assert set(views) == {schema.LATEST_VIEW}
    view = views[schema.LATEST_VIEW]
    assert view["source"] == schema.CHECKPOINTS.name
    assert " ".join(view["query"].split()) == (
        "Checkpoints | summarize arg_max(checkpoint_id, *) by thread_id, checkpoint_ns"
    )
    creating = [cmd for _, cmd in commands if "materialized-view" in cmd and cmd.startswith(".create")]
    assert len(creating) == 1 and creating[0].startswith(".create ifnotexists materialized-view"), (
        "re-running provision.kql must not alter a live view"
    )
    assert "autoUpdateSchema = true" in view["properties"]
    assert "lookback" not in view["properties"], "a lookback would let idle threads get duplicate rows"
    # An idle thread's row must not expire from the view before the thread does.
    data = max(_retention_days(commands, "table", t) for t in DATA_TABLES)
    assert _retention_days(commands, "materialized-view", schema.LATEST_VIEW) >= data
    assert _hot_days(commands, "materialized-view", schema.LATEST_VIEW) > 0
    # The view comes after its source table and before its own policies.
    order = [cmd.split("\n", 1)[0] for _, cmd in commands]
    table_at = next(i for i, c in enumerate(order) if c.startswith(".create-merge table Checkpoints"))
    view_at = next(i for i, c in enumerate(order) if "materialized-view" in c and c.startswith(".create"))
    policy_at = [i for i, c in enumerate(order) if c.startswith(".alter") and "materialized-view" in c]
    assert table_at < view_at and all(view_at < i for i in policy_at)


def test_tables_come_before_commands_that_use_them(commands):
    first_use: dict[str, int] = {}
    created_at: dict[str, int] = {}
    for i, (_, cmd) in enumerate(commands):
        m = re.match(r"^\.create-merge table (\w+)", cmd)
        if m:
            created_at[m[1]] = i
            continue
        m = re.match(r"^\.(?:alter|alter-merge|create-or-alter) table (\w+)", cmd)
        if m:
            first_use.setdefault(m[1], i)
    for table, i in first_use.items():
        assert table in created_at and created_at[table] < i, table


# --------------------------------------------------------------------------- Kusto.Language checks


@needs_node
def test_every_command_passes_kusto_language(commands):
    items = [(f"provision.kql:{line}", cmd) for line, cmd in commands]
    result = check_kql(items)
    failures = []
    for name, text in items:
        found = errors(result[name])
        if found:
            failures.append(f"{name}\n{text[:200]}\n{format_diagnostics(text, found)}")
    assert not failures, "\n\n".join(failures)


@needs_node
def test_broken_commands_and_queries_are_reported(commands):
    create_checkpoints = next(cmd for _, cmd in commands if cmd.startswith(".create-merge table Checkpoints"))
    items = {
        "typo in command": ".create-merge tabel Checkpoints (thread_id: string)",
        "unknown type": create_checkpoints.replace("payload: string", "payload: strng"),
        "unknown column": "Checkpoints | where thread_idd == 'x'",
        "unknown table in policy": ".alter table Checkpoint policy caching hot = 31d",
        "bad timespan": ".alter table Checkpoints policy caching hot = soon",
        "unknown column in delete": ".delete table Checkpoints records <| Checkpoints | where nope == 'x'",
        "unknown column in view": (
            ".create ifnotexists materialized-view LatestCheckpoints2 on table Checkpoints "
            "{ Checkpoints | summarize arg_max(checkpoint_idx, *) by thread_id }"
        ),
        "undeclared parameter": (
            "declare query_parameters(thread:string); Checkpoints | where thread_id == thread_id_param"
        ),
        "unknown view column": "LatestCheckpoints | project nope",
        "parameters before a command": (
            "declare query_parameters(tid:string);\n"
            ".delete table CheckpointWrites records <| CheckpointWrites | where thread_id == tid"
        ),
    }
    result = check_kql(list(items.items()))
    for name, text in items.items():
        assert errors(result[name]), f"{name}: expected an error for {text!r}"
    # positions point at the offending token
    [d] = errors(result["unknown column"])
    text = items["unknown column"]
    assert text[d["start"] : d["start"] + d["length"]] == "thread_idd"
    assert d["severity"] == "Error" and d["code"]


@needs_node
def test_valid_queries_with_parameters_bind():
    items = {
        "latest via view": (
            "declare query_parameters(thread_id_p:string, ns:string);\n"
            "LatestCheckpoints\n"
            "| where thread_id == thread_id_p and checkpoint_ns == ns\n"
            "| project checkpoint_id, parent_checkpoint_id, payload_type, payload, metadata, written_at"
        ),
        "dedup with tombstones": (
            "declare query_parameters(tid:string, ids:dynamic);\n"
            "let dead = Tombstones | where thread_id == tid and scope == 'thread' "
            "| summarize deleted_at = max(deleted_at) by thread_id;\n"
            "CheckpointBlobs\n"
            "| where thread_id == tid and version in (ids)\n"
            "| summarize arg_max(written_at, *) by thread_id, checkpoint_ns, channel, version, chunk\n"
            "| join kind=leftouter dead on thread_id\n"
            "| where isnull(deleted_at) or written_at > deleted_at\n"
            "| project channel, version, payload_type, payload, chunk, chunks"
        ),
        "metadata filter": (
            "declare query_parameters(k:string, v:string);\n"
            "Checkpoints | mv-expand kind=array m = metadata | where tostring(m[0]) == k and tostring(m[1]) == v"
        ),
        "writes": (
            "declare query_parameters(tid:string, cid:string);\n"
            "CheckpointWrites | where thread_id == tid and checkpoint_id == cid "
            "| summarize arg_max(written_at, *) by task_id, idx, chunk | order by task_id asc, idx asc"
        ),
        # `declare query_parameters` can't come before a control command (Kusto.Language
        # reports KS198), so compaction commands carry escaped literals.
        "compaction": (
            ".delete table CheckpointWrites records <| CheckpointWrites "
            "| where thread_id in (dynamic(['a', 'b\\'c'])) and written_at < datetime(2024-01-01T00:00:00Z)"
        ),
        "view compaction": (
            ".delete materialized-view LatestCheckpoints records <| LatestCheckpoints "
            "| where thread_id in ('a', 'b')"
        ),
    }
    result = check_kql(list(items.items()))
    for name, text in items.items():
        assert not errors(result[name]), f"{name}:\n{format_diagnostics(text, result[name])}"


@needs_node
def test_every_column_name_is_usable_bare_in_queries():
    # Guards against a schema column that collides with a KQL keyword and
    # would need ['quoting'] in every query.
    items = []
    for table in schema.TABLES:
        cols = ", ".join(table.column_names)
        items.append((f"{table.name} project", f"{table.name} | project {cols}"))
        for column, kusto_type in table.columns:
            # dynamic values can't be grouped on; project them instead
            tail = f"extend v = {column}" if kusto_type == schema.DYNAMIC else f"summarize count() by {column}"
            items.append((f"{table.name}.{column}", f"{table.name} | where isnotnull({column}) | {tail}"))
    result = check_kql(items, analyzers=False)
    for name, text in items:
        assert not errors(result[name]), f"{name}:\n{format_diagnostics(text, result[name])}"
