"""Every KQL text the engine sends, in one place.

The same text runs on Azure Data Explorer and, through duckdb-kql, on the
embedded DuckDB store. Every value that comes from a user (thread ids,
namespaces, checkpoint and run ids) is a declared query parameter in a query;
the only things formatted into a query's text are integers the engine validated
itself (``take`` limits) and parameter *names* it generated (``p0``, ``p1``...).
A control command (compaction's soft deletes) carries user values as literals
written by :func:`literal`, the one function that does so.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from .records import TombstoneRec, us_to_datetime
from .schema import (
    BLOBS,
    CHECKPOINTS,
    COMPACTION_DONE,
    COMPACTION_LEASE,
    COMPACTIONS,
    SCOPE_CHECKPOINT,
    SCOPE_RUN,
    SCOPE_THREAD,
    TOMBSTONES,
    WRITES,
)

_CK_COLUMNS = ", ".join(CHECKPOINTS.column_names)

#: The tombstone filters every checkpoint read applies (``let`` statements).
_TOMBSTONE_LETS = f"""let tomb = {TOMBSTONES.name} | where all_threads or thread_id in (tids) or scope == "{SCOPE_RUN}";
let dead_threads = tomb | where scope == "{SCOPE_THREAD}" | summarize thread_deleted_at = max(deleted_at) by thread_id;
let dead_checkpoints = tomb | where scope == "{SCOPE_CHECKPOINT}" | summarize checkpoint_deleted_at = max(deleted_at) by thread_id, checkpoint_ns, checkpoint_id;
let dead_runs = tomb | where scope == "{SCOPE_RUN}" | distinct run_id;"""

_CHECKPOINTS_BODY = f"""declare query_parameters(tids:dynamic, all_threads:bool, ns:string, any_ns:bool, cid:string);
{_TOMBSTONE_LETS}
{CHECKPOINTS.name}
| where (all_threads or thread_id in (tids)) and (any_ns or checkpoint_ns == ns) and (isempty(cid) or checkpoint_id == cid)
| summarize arg_max(written_at, *) by thread_id, checkpoint_ns, checkpoint_id
| join kind=leftouter dead_threads on thread_id
| where isnull(thread_deleted_at) or written_at > thread_deleted_at
| join kind=leftouter dead_checkpoints on thread_id, checkpoint_ns, checkpoint_id
| where isnull(checkpoint_deleted_at) or written_at > checkpoint_deleted_at
| join kind=leftanti dead_runs on run_id
| project {{columns}}
| order by checkpoint_id desc"""


def checkpoints_query(limit: int | None, with_values: bool) -> str:
    """Visible checkpoints (deduplicated, tombstones honoured), newest first.

    ``before`` is applied by the caller: Kusto has no ``<`` on strings (and
    duckdb-kql no ``strcmp``), so no KQL both run could express it.
    """
    columns = _CK_COLUMNS if with_values else "thread_id, checkpoint_ns, checkpoint_id, run_id, written_at"
    text = _CHECKPOINTS_BODY.replace("{columns}", columns)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit must be a non-negative integer, got {limit!r}")
        text += f"\n| take {int(limit)}"
    return text


def latest_query() -> str:
    """The latest visible checkpoint of each (thread, namespace) asked for.

    One query answers the first reads of many threads at once (the query
    cache coalesces concurrent misses into it).
    """
    body = _CHECKPOINTS_BODY.replace("{columns}", _CK_COLUMNS)
    head, _, _ = body.rpartition("\n| project ")
    return f"{head}\n| summarize arg_max(checkpoint_id, *) by thread_id, checkpoint_ns\n| project {_CK_COLUMNS}"


def checkpoints_params(
    thread_ids: tuple[str, ...] | None,
    checkpoint_ns: str | None,
    checkpoint_id: str | None,
) -> dict[str, Any]:
    return {
        "tids": list(thread_ids or ()),
        "all_threads": thread_ids is None,
        "ns": checkpoint_ns or "",
        "any_ns": checkpoint_ns is None,
        "cid": checkpoint_id or "",
    }


#: Blobs and pending writes of a set of checkpoints, in one round trip. The
#: filters select a superset (each column matched on its own list of values);
#: the caller keeps the exact (thread, namespace, channel, version) keys.
VALUES_QUERY = f"""declare query_parameters(tids:dynamic, channels:dynamic, versions:dynamic, cids:dynamic);
let dead_threads = {TOMBSTONES.name} | where thread_id in (tids) and scope == "{SCOPE_THREAD}" | summarize thread_deleted_at = max(deleted_at) by thread_id;
let blobs = {BLOBS.name}
| where thread_id in (tids) and channel in (channels) and version in (versions)
| join kind=leftouter dead_threads on thread_id
| where isnull(thread_deleted_at) or written_at > thread_deleted_at
| project kind_ = "blob", thread_id, checkpoint_ns, checkpoint_id = "", channel, version, task_id = "", task_path = "", idx = tolong(0), payload_type, payload, chunk, chunks, written_at;
let writes = {WRITES.name}
| where thread_id in (tids) and checkpoint_id in (cids)
| join kind=leftouter dead_threads on thread_id
| where isnull(thread_deleted_at) or written_at > thread_deleted_at
| project kind_ = "write", thread_id, checkpoint_ns, checkpoint_id, channel, version = "", task_id, task_path, idx, payload_type, payload, chunk, chunks, written_at;
union blobs, writes"""



# ---------------------------------------------------------------------------
# Literals: the one way a value is written into the text of a control command
# ---------------------------------------------------------------------------

#: Kusto's documented escapes inside a double-quoted string literal: the enclosing quote,
#: the backslash, \t and \n (https://learn.microsoft.com/kusto/query/scalar-data-types/string);
#: \r and every other control character go as \uXXXX, which Kusto.Language (the parser
#: behind Azure Data Explorer) decodes as C# does (tests/test_kusto_rules.py reads every
#: literal back through it)
_QUOTE_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_NEEDS_ESCAPE = re.compile(r'[\\"\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]')
_UNESCAPE = re.compile(r'\\(?:u([0-9a-f]{4})|(.))', re.S)
_UNESCAPES = {"\\": "\\", '"': '"', "n": "\n", "r": "\r", "t": "\t"}


def _escape(m: re.Match[str]) -> str:
    ch = m.group(0)
    return _QUOTE_ESCAPES.get(ch) or f"\\u{ord(ch):04x}"


def kql_string_literal(value: str) -> str:
    """A double-quoted KQL string literal that Kusto reads back as exactly ``value``."""
    if not isinstance(value, str):
        raise TypeError(f"a string literal needs a str, got {type(value).__name__}")
    return '"' + _NEEDS_ESCAPE.sub(_escape, value) + '"'


def literal(value: Any) -> str:
    """``value`` as a KQL literal: the one function that writes a value into the text of
    a control command (Kusto.Language refuses ``declare query_parameters`` before a
    control command, KS198, and no Microsoft document or SDK shows it after ``<|``).

    str: a double-quoted string literal (:func:`kql_string_literal`); datetime (naive is
    UTC): ``datetime(2024-05-06T07:08:09.1234560Z)``; int: ``long(5)``; bool:
    ``bool(true)``. Anything else is refused."""
    if isinstance(value, str):
        return kql_string_literal(value)
    if isinstance(value, bool):
        return "bool(true)" if value else "bool(false)"
    if isinstance(value, int):
        return f"long({value})"
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
        return f"datetime({value.strftime('%Y-%m-%dT%H:%M:%S')}.{value.microsecond:06d}0Z)"
    raise TypeError(f"no KQL literal for a {type(value).__name__}")


_STRING_LITERAL = re.compile(r'"((?:[^"\\]|\\.)*)"', re.S)


def literals_as_parameters(text: str) -> tuple[str, dict[str, str]]:
    """The inverse of :func:`kql_string_literal` over a command's text: every
    double-quoted literal becomes a declared parameter ``lit0, lit1, ...`` (for
    translators, such as duckdb-kql, that splice literal text into SQL). Only the
    escapes :func:`kql_string_literal` writes are decoded."""
    params: dict[str, str] = {}

    def sub(m: re.Match[str]) -> str:
        name = f"lit{len(params)}"
        params[name] = _UNESCAPE.sub(
            lambda e: chr(int(e.group(1), 16)) if e.group(1) else _UNESCAPES[e.group(2)], m.group(1)
        ).encode("utf-16-le", "surrogatepass").decode("utf-16-le")
        return name

    return _STRING_LITERAL.sub(sub, text), params


def compaction_command(table: str, tombs: list[TombstoneRec]) -> tuple[str, dict[str, Any]]:
    """``.delete table T records <| T | where ...`` for a batch of tombstones.

    One disjunct per tombstone; every value is a literal (:func:`literal`), so the
    command is the plain form Microsoft documents
    (https://learn.microsoft.com/kusto/management/soft-delete-command). The second item
    (parameters) is always empty; it stays for the backends' ``command(text, params)``.
    A thread or checkpoint tombstone covers rows with ``written_at < deleted_at``.
    """
    preds: list[str] = []
    for t in tombs:
        if t.scope == SCOPE_THREAD:
            preds.append(f"(thread_id == {literal(t.thread_id)} and written_at < {literal(us_to_datetime(t.deleted_at))})")
        elif t.scope == SCOPE_CHECKPOINT and table in (CHECKPOINTS.name, WRITES.name):
            preds.append(
                f"(thread_id == {literal(t.thread_id)} and checkpoint_ns == {literal(t.checkpoint_ns)} "
                f"and checkpoint_id == {literal(t.checkpoint_id)} and written_at < {literal(us_to_datetime(t.deleted_at))})"
            )
        elif t.scope == SCOPE_RUN and table == CHECKPOINTS.name:
            preds.append(f"(run_id == {literal(t.run_id)})")
    if not preds:
        return "", {}
    return f".delete table {table} records <| {table} | where {' or '.join(preds)}", {}


_TOMB_KEY = "scope, thread_id, checkpoint_ns, checkpoint_id, run_id, deleted_at"


def pending_tombstones_query(limit: int) -> str:
    """Tombstones not yet compacted (no 'done' row in Compactions), oldest first: what
    compaction still has to do, whichever process wrote them and whenever."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    return (
        f'let done = {COMPACTIONS.name} | where entry == "{COMPACTION_DONE}" | distinct {_TOMB_KEY};\n'
        f"{TOMBSTONES.name}\n| distinct {_TOMB_KEY}\n| join kind=leftanti done on {_TOMB_KEY}\n"
        f"| order by deleted_at asc\n| take {int(limit)}"
    )


#: compaction lease claims written after ``since`` (the claimant's clock)
LEASE_QUERY = f"""declare query_parameters(since:datetime);
{COMPACTIONS.name}
| where entry == "{COMPACTION_LEASE}" and written_at > since
| distinct term, owner"""


def all_templates() -> list[tuple[str, str]]:
    """Every query shape, for the KQL checker and the embedded translator."""
    return [
        ("checkpoints", checkpoints_query(None, True)),
        ("checkpoints_limit", checkpoints_query(10, True)),
        ("checkpoint_headers", checkpoints_query(None, False)),
        ("latest", latest_query()),
        ("values", VALUES_QUERY),
        ("pending_tombstones", pending_tombstones_query(100)),
        ("lease", LEASE_QUERY),
    ]
