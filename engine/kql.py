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
    COMPACTIONS,
    SCOPE_CHECKPOINT,
    SCOPE_EXPIRE,
    SCOPE_RUN,
    SCOPE_THREAD,
    TOMBSTONES,
    TOUCHES,
    WRITES,
)

_CK_COLUMNS = ", ".join(CHECKPOINTS.column_names)

#: A thread's expiries (scope "expire", written by the ttl option's expiry) that still
#: hold: an expiry covers the thread's rows written at or before ``expired_at`` (its last
#: activity when the expiry was decided) unless a row written after it continues that
#: history: a checkpoint whose parent, or a pending write or a touch whose checkpoint, is
#: one the expiry covers. Such a row is a turn (or a read) that raced the expiry, and it
#: wins: the thread lives on whole. A turn that starts after the expiry is visible finds
#: no checkpoint and starts afresh, so it does not revive the old history. Needs ``tomb``.
_EXPIRY_LETS = f"""let expiries = tomb | where scope == "{SCOPE_EXPIRE}" | project thread_id, expired_at = deleted_at | distinct thread_id, expired_at;
let expired_ids = expiries
| join kind=inner ({CHECKPOINTS.name} | where all_threads or thread_id in (tids)) on thread_id
| where written_at <= expired_at
| project thread_id, expired_at, checkpoint_ns, ref = checkpoint_id;
let revived = union
    (expiries | join kind=inner ({CHECKPOINTS.name} | where all_threads or thread_id in (tids)) on thread_id
        | where written_at > expired_at and isnotempty(parent_checkpoint_id)
        | project thread_id, expired_at, checkpoint_ns, ref = parent_checkpoint_id),
    (expiries | join kind=inner ({WRITES.name} | where all_threads or thread_id in (tids)) on thread_id
        | where written_at > expired_at
        | project thread_id, expired_at, checkpoint_ns, ref = checkpoint_id),
    (expiries | join kind=inner ({TOUCHES.name} | where all_threads or thread_id in (tids)) on thread_id
        | where written_at > expired_at
        | project thread_id, expired_at, checkpoint_ns, ref = checkpoint_id)
| join kind=inner expired_ids on thread_id, expired_at, checkpoint_ns, ref
| project thread_id, expired_at
| distinct thread_id, expired_at;"""

#: The tombstone filters every checkpoint read applies (``let`` statements; the caller
#: declares or binds ``tids`` and ``all_threads``). ``dead_threads``: each thread's
#: deletion floor, from thread deletions and from expiries that hold.
_TOMBSTONE_LETS = f"""let tomb = {TOMBSTONES.name} | where all_threads or thread_id in (tids) or scope == "{SCOPE_RUN}";
{_EXPIRY_LETS}
let dead_threads = union
    (tomb | where scope == "{SCOPE_THREAD}" | project thread_id, deleted_at),
    (expiries | join kind=leftanti revived on thread_id, expired_at | project thread_id, deleted_at = expired_at)
| summarize thread_deleted_at = max(deleted_at) by thread_id;
let dead_checkpoints = tomb | where scope == "{SCOPE_CHECKPOINT}" | summarize checkpoint_deleted_at = max(deleted_at) by thread_id, checkpoint_ns, checkpoint_id;
let dead_runs = tomb | where scope == "{SCOPE_RUN}" | distinct run_id;"""

#: The same lets without the expiry rule, for a database that has no expiries (most:
#: the ttl option is off): deciding whether a racing row revived an expired thread costs
#: four joins, about half again the time of an embedded read (docs/retention.md). An
#: expiry among the threads read comes back as an ``expiry_flags`` row (``expiry_`` true): the
#: engine then asks again with :data:`_TOMBSTONE_LETS`, and from then on always does.
_TOMBSTONE_LETS_NO_EXPIRY = f"""let tomb = {TOMBSTONES.name} | where all_threads or thread_id in (tids) or scope == "{SCOPE_RUN}";
let dead_threads = tomb | where scope == "{SCOPE_THREAD}" | summarize thread_deleted_at = max(deleted_at) by thread_id;
let dead_checkpoints = tomb | where scope == "{SCOPE_CHECKPOINT}" | summarize checkpoint_deleted_at = max(deleted_at) by thread_id, checkpoint_ns, checkpoint_id;
let dead_runs = tomb | where scope == "{SCOPE_RUN}" | distinct run_id;
let expiry_flags = tomb | where scope == "{SCOPE_EXPIRE}" | distinct thread_id | project thread_id, expiry_ = true;"""


def _lets(expiries: bool) -> str:
    """The tombstone lets of a read that unions ``expiry_flags`` into its answer (none
    with the expiry rule)."""
    if expiries:
        return _TOMBSTONE_LETS + "\nlet expiry_flags = tomb | where false | project thread_id, expiry_ = true;"
    return _TOMBSTONE_LETS_NO_EXPIRY

_CHECKPOINTS_PARAMS = (
    "tids:dynamic, all_threads:bool, ns:string, any_ns:bool, cid:string, "
    "before:string, before_at:datetime, has_before_at:bool, "
    "has_page:bool, page_at:datetime, page_ids:dynamic"
)

#: Checkpoints per page of a list (``take``), and per values query: every read stays far
#: inside Kusto's result limits by construction (a checkpoint body is at most one
#: cell, ``cell_limit``), and the Kusto backend sets ``notruncation`` on that basis
READ_PAGE = 100

#: The visible checkpoints: deduplicated, every tombstone honoured.
_VISIBLE = f"""let visible = {CHECKPOINTS.name}
| where (all_threads or thread_id in (tids)) and (any_ns or checkpoint_ns == ns) and (isempty(cid) or checkpoint_id == cid)
| summarize arg_max(written_at, *) by thread_id, checkpoint_ns, checkpoint_id
| join kind=leftouter dead_threads on thread_id
| where isnull(thread_deleted_at) or written_at > thread_deleted_at
| join kind=leftouter dead_checkpoints on thread_id, checkpoint_ns, checkpoint_id
| where isnull(checkpoint_deleted_at) or written_at > checkpoint_deleted_at
| join kind=leftanti dead_runs on run_id;"""

#: What a read tells the engine's clock besides the rows: each thread's latest
#: deletion (rows ``thread_id, tomb_at``; checkpoint rows have ``tomb_at`` null).
_FLOORS = "let floors = dead_threads | where not(all_threads) | project thread_id, tomb_at = thread_deleted_at;"

#: ``before``: the checkpoints older, in the list's order (``written_at``), than that
#: checkpoint; its time comes from the caller when it knows it (``before_at``:
#: accepted here, not ingested yet), else from the table.
_BEFORE = f"""let before_cut = toscalar({CHECKPOINTS.name}
| where isnotempty(before) and (all_threads or thread_id in (tids)) and (any_ns or checkpoint_ns == ns) and checkpoint_id == before
| summarize max(written_at));"""


def _metadata_filter(pairs: int) -> str:
    """The checkpoints whose metadata holds each of ``pairs`` (key ``mk{i}``, value whose
    text is ``mv{i}``), as ``let matched``. A bag is expanded into [key, value] pairs
    (``mv-expand kind=array``), since neither engine indexes a dynamic by a parameter."""
    if not pairs:
        return ""
    match = " or ".join(f"(mk == mk{i} and mv == mv{i})" for i in range(pairs))
    return f"""let matched = visible
| mv-expand kind=array m = metadata
| extend mk = tostring(m[0]), mv = tostring(m[1])
| where {match}
| summarize hits = count() by thread_id, checkpoint_ns, checkpoint_id
| where hits == {int(pairs)};
"""


def checkpoints_query(limit: int | None, with_values: bool, metadata_pairs: int = 0, expiries: bool = True) -> str:
    """Visible checkpoints (deduplicated, tombstones honoured), newest first, with
    the threads' deletion times (:data:`_FLOORS`).

    Newest is the highest ``written_at``: the engine's clock (engine/clock.py) stamps
    a thread's rows in causal order on every host, where checkpoint ids come from the
    writing host's clock. The union's rows come in no particular order: the caller
    sorts; ``order by`` here only chooses which rows ``take`` keeps.
    """
    columns = _CK_COLUMNS if with_values else "thread_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id, run_id, written_at"
    if isinstance(metadata_pairs, bool) or not isinstance(metadata_pairs, int) or metadata_pairs < 0:
        raise ValueError(f"metadata_pairs must be a non-negative integer, got {metadata_pairs!r}")
    declared = _CHECKPOINTS_PARAMS + "".join(f", mk{i}:string, mv{i}:string" for i in range(metadata_pairs))
    source = "visible | join kind=inner matched on thread_id, checkpoint_ns, checkpoint_id" if metadata_pairs else "visible"
    text = f"""declare query_parameters({declared});
{_lets(expiries)}
{_VISIBLE}
{_BEFORE}
{_FLOORS}
{_metadata_filter(metadata_pairs)}let page = {source}
| where isempty(before) or written_at < before_cut or (has_before_at and written_at < before_at)
| where not(has_page) or written_at < page_at or (written_at == page_at and checkpoint_id !in (page_ids))
| project {columns}
| order by written_at desc, checkpoint_id desc"""
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit must be a non-negative integer, got {limit!r}")
        text += f"\n| take {int(limit)}"
    return text + ";\nunion page, floors, expiry_flags"


def latest_query(expiries: bool = True) -> str:
    """The latest visible checkpoint of each (thread, namespace) asked for, with the
    threads' deletion times.

    One query answers the first reads of many threads at once (the query
    cache coalesces concurrent misses into it).
    """
    return f"""declare query_parameters({_CHECKPOINTS_PARAMS});
{_lets(expiries)}
{_VISIBLE}
{_FLOORS}
let newest = visible
| summarize arg_max(written_at, *) by thread_id, checkpoint_ns
| project {_CK_COLUMNS};
union newest, floors, expiry_flags"""


def checkpoints_params(
    thread_ids: tuple[str, ...] | None,
    checkpoint_ns: str | None,
    checkpoint_id: str | None,
    before: str | None = None,
    before_at: int | None = None,
    page: tuple[int, list[str]] | None = None,
    metadata: tuple[tuple[str, str], ...] = (),
) -> dict[str, Any]:
    """``page``: the previous page's oldest stamp and the ids it returned with that stamp
    (the next page starts below them). ``metadata``: the (key, text) pairs of
    :func:`checkpoints_query`'s ``metadata_pairs``."""
    pairs = {}
    for i, (k, v) in enumerate(metadata):
        pairs[f"mk{i}"] = k
        pairs[f"mv{i}"] = v
    return {
        **pairs,
        "tids": list(thread_ids or ()),
        "all_threads": thread_ids is None,
        "ns": checkpoint_ns or "",
        "any_ns": checkpoint_ns is None,
        "cid": checkpoint_id or "",
        "before": before or "",
        "before_at": us_to_datetime(before_at or 0),
        "has_before_at": before_at is not None,
        "has_page": page is not None,
        "page_at": us_to_datetime(page[0] if page else 0),
        "page_ids": list(page[1]) if page else [],
    }


#: The highest stamp of each thread asked for, in every table (a deletion is stamped
#: above it: engine/clock.py).
STAMPS_QUERY = f"""declare query_parameters(tids:dynamic);
let c = {CHECKPOINTS.name} | where thread_id in (tids) | summarize t = max(written_at) by thread_id;
let b = {BLOBS.name} | where thread_id in (tids) | summarize t = max(written_at) by thread_id;
let w = {WRITES.name} | where thread_id in (tids) | summarize t = max(written_at) by thread_id;
let d = {TOMBSTONES.name} | where thread_id in (tids) | summarize t = max(deleted_at) by thread_id;
let r = {TOUCHES.name} | where thread_id in (tids) | summarize t = max(written_at) by thread_id;
union c, b, w, d, r
| summarize t = max(t) by thread_id"""


#: Each live thread's last activity: its newest checkpoint, pending write or touch above
#: its deletion floor (thread deletions and expiries that hold). Needs the tombstone lets.
_ACTIVITY = f"""let activity = union
    ({CHECKPOINTS.name} | where all_threads or thread_id in (tids) | project thread_id, written_at),
    ({WRITES.name} | where all_threads or thread_id in (tids) | project thread_id, written_at),
    ({TOUCHES.name} | where all_threads or thread_id in (tids) | project thread_id, written_at)
| join kind=leftouter dead_threads on thread_id
| where isnull(thread_deleted_at) or written_at > thread_deleted_at
| summarize last_at = max(written_at) by thread_id;"""


def expiry_query(limit: int) -> str:
    """An expiry pass's question, in one round trip: up to ``limit`` threads whose last
    activity is before ``cutoff`` (rows ``kind_ = "due"``, oldest first, ``last_at``: what
    the expiry covers), and the live threads' count and oldest activity (one row ``kind_ =
    "live"``)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    return f"""declare query_parameters(cutoff:datetime);
let tids = dynamic([]);
let all_threads = true;
{_TOMBSTONE_LETS}
{_ACTIVITY}
let due = activity
| where last_at < cutoff
| order by last_at asc
| take {int(limit)}
| project kind_ = "due", thread_id, last_at, threads = tolong(1);
let live = activity
| where last_at >= cutoff
| summarize last_at = min(last_at), threads = count()
| project kind_ = "live", thread_id = "", last_at, threads;
union due, live"""


#: Of the expiries asked about (``tids``), those a racing row revived: compaction leaves
#: their rows alone.
REVIVED_QUERY = f"""declare query_parameters(tids:dynamic);
let all_threads = false;
{_TOMBSTONE_LETS}
revived"""


#: Blobs and pending writes of a set of checkpoints, in one round trip. The
#: filters select a superset (each column matched on its own list of values);
#: the caller keeps the exact (thread, namespace, channel, version) keys. A blob a
#: thread deletion covers comes back flagged ``hidden_``: a checkpoint that still
#: names it is not returned (never a state with a value missing).
VALUES_QUERY = f"""declare query_parameters(tids:dynamic, channels:dynamic, versions:dynamic, cids:dynamic);
let all_threads = false;
{_TOMBSTONE_LETS}
let blobs = {BLOBS.name}
| where thread_id in (tids) and channel in (channels) and version in (versions)
| join kind=leftouter dead_threads on thread_id
| project kind_ = "blob", thread_id, checkpoint_ns, checkpoint_id = "", channel, version, task_id = "", task_path = "", idx = tolong(0), payload_type, payload, chunk, chunks, written_at, hidden_ = isnotnull(thread_deleted_at) and written_at <= thread_deleted_at;
let writes = {WRITES.name}
| where thread_id in (tids) and checkpoint_id in (cids)
| join kind=leftouter dead_threads on thread_id
| where isnull(thread_deleted_at) or written_at > thread_deleted_at
| project kind_ = "write", thread_id, checkpoint_ns, checkpoint_id, channel, version = "", task_id, task_path, idx, payload_type, payload, chunk, chunks, written_at, hidden_ = false;
union blobs, writes"""
_VALUES_NO_EXPIRY = VALUES_QUERY.replace(_TOMBSTONE_LETS, _TOMBSTONE_LETS_NO_EXPIRY)


def values_query(expiries: bool = True) -> str:
    """:data:`VALUES_QUERY`, or without the expiry rule (:data:`_TOMBSTONE_LETS_NO_EXPIRY`)."""
    return VALUES_QUERY if expiries else _VALUES_NO_EXPIRY



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


#: a datetime literal as :func:`literal` writes it
_DATETIME_LITERAL = re.compile(r"datetime\((\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{7})Z\)")


def literals_as_parameters(text: str) -> tuple[str, dict[str, str | dt.datetime]]:
    """The inverse of :func:`literal` over a command's text, for translators (such as
    duckdb-kql) that splice literal text into SQL: every double-quoted literal becomes a
    parameter ``lit0, lit1, ...`` (a str; only the escapes :func:`kql_string_literal`
    writes are decoded), then every datetime literal a parameter ``lit_at0, ...`` (a naive
    UTC datetime). What remains is the same text for every command of the same shape."""
    params: dict[str, str | dt.datetime] = {}

    def sub(m: re.Match[str]) -> str:
        name = f"lit{len(params)}"
        params[name] = _UNESCAPE.sub(
            lambda e: chr(int(e.group(1), 16)) if e.group(1) else _UNESCAPES[e.group(2)], m.group(1)
        ).encode("utf-16-le", "surrogatepass").decode("utf-16-le")
        return name

    text = _STRING_LITERAL.sub(sub, text)  # first: a string may hold datetime-like text
    strings = len(params)

    def stamp(m: re.Match[str]) -> str:
        name = f"lit_at{len(params) - strings}"
        params[name] = dt.datetime.fromisoformat(m.group(1)[:26])  # 7 digits: the last is 0
        return name

    return _DATETIME_LITERAL.sub(stamp, text), params


def compaction_command(table: str, tombs: list[TombstoneRec]) -> tuple[str, dict[str, Any]]:
    """``.delete table T records <| T | where ...`` for a batch of tombstones.

    One disjunct per tombstone; every value is a literal (:func:`literal`), so the
    command is the plain form Microsoft documents
    (https://learn.microsoft.com/kusto/management/soft-delete-command). The second item
    (parameters) is always empty; it stays for the backends' ``command(text, params)``.
    A thread or checkpoint tombstone covers rows with ``written_at < deleted_at``, an
    expiry those with ``written_at <= deleted_at`` (the thread's last activity; the caller
    leaves out expiries a racing row revived: :data:`REVIVED_QUERY`).
    """
    preds: list[str] = []
    for t in tombs:
        if t.scope == SCOPE_THREAD:
            preds.append(f"(thread_id == {literal(t.thread_id)} and written_at < {literal(us_to_datetime(t.deleted_at))})")
        elif t.scope == SCOPE_EXPIRE:
            preds.append(f"(thread_id == {literal(t.thread_id)} and written_at <= {literal(us_to_datetime(t.deleted_at))})")
        elif t.scope == SCOPE_CHECKPOINT and table in (CHECKPOINTS.name, WRITES.name, TOUCHES.name):
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
    compaction still has to do, whichever process wrote them and whenever. An expiry
    waits until its ``deleted_at`` (the thread's last activity) is before
    ``expire_cutoff``: a turn racing it has had that long to revive the thread."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    return (
        "declare query_parameters(expire_cutoff:datetime);\n"
        f'let done = {COMPACTIONS.name} | where entry == "{COMPACTION_DONE}" | distinct {_TOMB_KEY};\n'
        f"{TOMBSTONES.name}\n"
        f'| where scope != "{SCOPE_EXPIRE}" or deleted_at < expire_cutoff\n'
        f"| distinct {_TOMB_KEY}\n| join kind=leftanti done on {_TOMB_KEY}\n"
        f"| order by deleted_at asc\n| take {int(limit)}"
    )


#: lease claims (``entry``: compaction's or the expiry's) written after ``since`` (the
#: claimant's clock)
LEASE_QUERY = f"""declare query_parameters(since:datetime, lease:string);
{COMPACTIONS.name}
| where entry == lease and written_at > since
| distinct term, owner"""


#: What ``get_delta_channel_history`` needs for one (thread, namespace), in one round
#: trip: every visible checkpoint's parent link and channel versions (the walk up the
#: parent chain runs in the caller: KQL has no recursion both backends run), the
#: stored (non-"empty") values of the asked channels, which are the seeds the walk
#: stops at, and the pending writes to those channels. Tombstones are honoured by the
#: checkpoint reads' own lets (one thread, one namespace).
DELTA_HISTORY_QUERY = f"""declare query_parameters(tids:dynamic, all_threads:bool, ns:string, any_ns:bool, cid:string, channels:dynamic);
{_lets(True)}
{_VISIBLE}
let heads = visible
| project kind_ = "checkpoint", thread_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id, run_id, channel_versions, written_at;
let blobs = {BLOBS.name}
| where thread_id in (tids) and checkpoint_ns == ns and channel in (channels) and payload_type != "empty"
| join kind=leftouter dead_threads on thread_id
| where isnull(thread_deleted_at) or written_at > thread_deleted_at
| project kind_ = "blob", thread_id, checkpoint_ns, checkpoint_id = "", channel, version, task_id = "", task_path = "", idx = tolong(0), payload_type, payload, chunk, chunks, written_at;
let writes = {WRITES.name}
| where thread_id in (tids) and checkpoint_ns == ns and channel in (channels)
| join kind=leftouter dead_threads on thread_id
| where isnull(thread_deleted_at) or written_at > thread_deleted_at
| project kind_ = "write", thread_id, checkpoint_ns, checkpoint_id, channel, version = "", task_id, task_path, idx, payload_type, payload, chunk, chunks, written_at;
union heads, blobs, writes, expiry_flags"""
_DELTA_HISTORY_NO_EXPIRY = DELTA_HISTORY_QUERY.replace(_lets(True), _lets(False))


def delta_history_query(expiries: bool = True) -> str:
    """:data:`DELTA_HISTORY_QUERY`, or without the expiry rule (then an ``expiry_flags`` row,
    ``expiry_`` true, says an expiry applies: ask again with it)."""
    return DELTA_HISTORY_QUERY if expiries else _DELTA_HISTORY_NO_EXPIRY


def all_templates() -> list[tuple[str, str]]:
    """Every query shape, for the KQL checker and the embedded translator."""
    return [
        ("checkpoints", checkpoints_query(None, True)),
        ("checkpoints_no_expiry", checkpoints_query(None, True, expiries=False)),
        ("checkpoints_limit_no_expiry", checkpoints_query(READ_PAGE, True, expiries=False)),
        ("checkpoint_headers_no_expiry", checkpoints_query(READ_PAGE, False, expiries=False)),
        ("latest_no_expiry", latest_query(expiries=False)),
        ("values_no_expiry", _VALUES_NO_EXPIRY),
        ("delta_history_no_expiry", _DELTA_HISTORY_NO_EXPIRY),
        ("checkpoints_limit", checkpoints_query(10, True)),
        ("checkpoints_metadata", checkpoints_query(10, True, 2)),
        ("checkpoint_headers", checkpoints_query(None, False)),
        ("latest", latest_query()),
        ("values", VALUES_QUERY),
        ("stamps", STAMPS_QUERY),
        ("delta_history", DELTA_HISTORY_QUERY),
        ("pending_tombstones", pending_tombstones_query(100)),
        ("expiry", expiry_query(1000)),
        ("revived", REVIVED_QUERY),
        ("lease", LEASE_QUERY),
    ]
