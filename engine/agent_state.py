"""Agent state as operators ask for it: stored KQL functions, and the same questions
from Python.

Each :class:`StateFunction` is one question (the threads, one thread's history, the
runs, the forks, storage, what expires next). Its body is KQL that honours every
tombstone the saver's reads honour: it is built from the checkpoint reads' own
``let`` statements (:mod:`.kql`), so a deleted, pruned, expired or run-deleted
checkpoint is gone from these answers exactly when it is gone from ``get_tuple``.

The same text serves three ways:

* ``provision.kql`` creates each as a stored function in the ``langgraph`` folder
  (:func:`definition` writes the command; a test holds the file to it), for
  dashboards and ad-hoc queries on the cluster;
* the saver asks it (``saver.threads()`` and the rest) by sending the body with its
  parameters declared (:func:`query`), so a database provisioned before a function
  was added still answers;
* the embedded store runs that same query through duckdb-kql.

Answers read the database: rows a process accepted but has not ingested yet are not
in them (the saver's methods flush the calling process first).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from .kql import _ACTIVITY, _TOMBSTONE_LETS, _VISIBLE
from .schema import BLOBS, CHECKPOINTS, WRITES

#: The folder of the stored functions in provision.kql.
FOLDER = "langgraph"

#: Every thread (the caller's ``tids``/``all_threads`` lets pick which).
_ALL = 'let tids = dynamic([]);\nlet all_threads = true;'
#: One thread, the function's ``thread`` parameter.
_ONE = 'let tids = pack_array(thread);\nlet all_threads = false;'
#: The visible checkpoints of every namespace, every tombstone honoured.
_READ_LETS = f"""let ns = "";
let any_ns = true;
let cid = "";
{_TOMBSTONE_LETS}
{_VISIBLE}"""

#: Stored rows that reads still honour: blobs above their thread's deletion floor,
#: pending writes of visible checkpoints; one row per stored chunk, duplicates (a
#: retried ingestion) counted once.
_LIVE_ROWS = f"""let live_blobs = {BLOBS.name}
| where all_threads or thread_id in (tids)
| summarize arg_max(written_at, *) by thread_id, checkpoint_ns, channel, version, chunk
| join kind=leftouter dead_threads on thread_id
| where isnull(thread_deleted_at) or written_at > thread_deleted_at
| project thread_id, checkpoint_ns, channel, version, payload, written_at;
let live_writes = {WRITES.name}
| where all_threads or thread_id in (tids)
| summarize arg_max(written_at, *) by thread_id, checkpoint_ns, checkpoint_id, task_id, idx, chunk
| join kind=inner (visible | project thread_id, checkpoint_ns, checkpoint_id) on thread_id, checkpoint_ns, checkpoint_id
| project thread_id, checkpoint_ns, checkpoint_id, task_id, idx, channel, payload, written_at;
let storage = union
    (visible | project thread_id, table_name = "{CHECKPOINTS.name}", channel = "", size = strlen(payload)),
    (live_blobs | project thread_id, table_name = "{BLOBS.name}", channel, size = strlen(payload)),
    (live_writes | project thread_id, table_name = "{WRITES.name}", channel, size = strlen(payload))
| summarize rows = count(), bytes = sum(size) by thread_id, table_name, channel;"""

#: A root-namespace checkpoint's step counts when the graph's loop wrote it.
_IS_STEP = 'checkpoint_ns == "" and tostring(metadata.source) == "loop"'


@dataclass(frozen=True)
class StateFunction:
    """One stored function: ``name(params)``, documented by ``doc``, answering ``body``."""

    name: str
    #: Kusto parameter list without parentheses (``"thread:string"``), or "".
    params: str
    doc: str
    body: str
    #: the result's columns, in order
    columns: tuple[str, ...]


THREADS = StateFunction(
    name="LangGraphThreads",
    params="",
    doc="Live threads: first and last activity, checkpoints, namespaces, steps, runs, stored bytes",
    body=f"""{_ALL}
{_READ_LETS}
{_LIVE_ROWS}
{_ACTIVITY}
let ck = visible
| summarize first_at = min(written_at), checkpoints = count(), steps = countif({_IS_STEP}) by thread_id;
let nss = visible | distinct thread_id, checkpoint_ns | summarize namespaces = count() by thread_id;
let rns = visible | where isnotempty(run_id) | distinct thread_id, run_id | summarize runs = count() by thread_id;
let sizes = storage | summarize bytes = sum(bytes) by thread_id;
ck
| join kind=inner activity on thread_id
| join kind=leftouter nss on thread_id
| join kind=leftouter rns on thread_id
| join kind=leftouter sizes on thread_id
| project thread_id, first_at, last_at, checkpoints, namespaces, steps, runs = coalesce(runs, tolong(0)), bytes = coalesce(bytes, tolong(0))
| order by last_at desc, thread_id asc""",
    columns=("thread_id", "first_at", "last_at", "checkpoints", "namespaces", "steps", "runs", "bytes"),
)

THREAD_HISTORY = StateFunction(
    name="LangGraphThreadHistory",
    params="thread:string",
    doc="One thread's visible checkpoints, oldest first: parent, step, source, run and pending writes",
    body=f"""{_ONE}
{_READ_LETS}
{_LIVE_ROWS}
let w = live_writes
| distinct checkpoint_ns, checkpoint_id, task_id, idx, channel
| summarize writes = count(), write_channels = array_sort_asc(make_set(channel)) by checkpoint_ns, checkpoint_id;
visible
| join kind=leftouter w on checkpoint_ns, checkpoint_id
| project checkpoint_ns, checkpoint_id, parent_checkpoint_id, step = tolong(metadata.step), source = tostring(metadata.source), run_id, written_at, writes = coalesce(writes, tolong(0)), write_channels = coalesce(write_channels, dynamic([]))
| order by written_at asc, checkpoint_ns asc, checkpoint_id asc""",
    columns=(
        "checkpoint_ns", "checkpoint_id", "parent_checkpoint_id", "step", "source", "run_id", "written_at",
        "writes", "write_channels",
    ),
)

RUNS = StateFunction(
    name="LangGraphRuns",
    params="",
    doc="Runs (checkpoints with a run_id): steps, start, end, duration and outcome (error, interrupted or ok)",
    body=f"""{_ALL}
{_READ_LETS}
{_LIVE_ROWS}
let runs = visible
| where isnotempty(run_id)
| summarize started_at = min(written_at), ended_at = max(written_at), checkpoints = count(), steps = countif({_IS_STEP}) by thread_id, run_id;
let heads = visible
| where isnotempty(run_id) and checkpoint_ns == ""
| summarize arg_max(written_at, checkpoint_id) by thread_id, run_id
| project thread_id, run_id, checkpoint_id;
let signals = live_writes
| where checkpoint_ns == "" and channel in ("__error__", "__interrupt__")
| summarize errors = countif(channel == "__error__"), interrupts = countif(channel == "__interrupt__") by thread_id, checkpoint_id;
let outcomes = heads
| join kind=leftouter signals on thread_id, checkpoint_id
| project thread_id, run_id, outcome = case(errors > 0, "error", interrupts > 0, "interrupted", "ok");
runs
| join kind=leftouter outcomes on thread_id, run_id
| project thread_id, run_id, started_at, ended_at, duration = ended_at - started_at, checkpoints, steps, outcome = coalesce(outcome, "ok")
| order by started_at asc, thread_id asc, run_id asc""",
    columns=("thread_id", "run_id", "started_at", "ended_at", "duration", "checkpoints", "steps", "outcome"),
)

FORKS = StateFunction(
    name="LangGraphForks",
    params="",
    doc="Fork points: visible checkpoints with two or more visible children, and those children",
    body=f"""{_ALL}
{_READ_LETS}
visible
| where isnotempty(parent_checkpoint_id)
| summarize children = count(), child_ids = array_sort_asc(make_set(checkpoint_id)) by thread_id, checkpoint_ns, checkpoint_id = parent_checkpoint_id
| where children > 1
| join kind=inner (visible | project thread_id, checkpoint_ns, checkpoint_id) on thread_id, checkpoint_ns, checkpoint_id
| project thread_id, checkpoint_ns, checkpoint_id, children, child_ids
| order by thread_id asc, checkpoint_ns asc, checkpoint_id asc""",
    columns=("thread_id", "checkpoint_ns", "checkpoint_id", "children", "child_ids"),
)

STORAGE = StateFunction(
    name="LangGraphStorage",
    params="",
    doc="Stored rows and payload size per thread, table and channel (base64 characters on Kusto, bytes embedded)",
    body=f"""{_ALL}
{_READ_LETS}
{_LIVE_ROWS}
storage
| order by thread_id asc, table_name asc, channel asc""",
    columns=("thread_id", "table_name", "channel", "rows", "bytes"),
)

EXPIRING = StateFunction(
    name="LangGraphExpiring",
    params="ttl:timespan",
    doc="Live threads by when a ttl would expire them (last write or touch plus ttl), soonest first",
    body=f"""{_ALL}
{_READ_LETS}
{_ACTIVITY}
activity
| project thread_id, last_at, expires_at = last_at + ttl
| order by expires_at asc, thread_id asc""",
    columns=("thread_id", "last_at", "expires_at"),
)

FUNCTIONS: tuple[StateFunction, ...] = (THREADS, THREAD_HISTORY, RUNS, FORKS, STORAGE, EXPIRING)
BY_NAME = {f.name: f for f in FUNCTIONS}


def _kql_string(text: str) -> str:
    """A docString property value: our own constant text, no quote or backslash in it."""
    if '"' in text or "\\" in text or "\n" in text:
        raise ValueError(f"a docstring must be plain text: {text!r}")
    return f'"{text}"'


def definition(f: StateFunction) -> str:
    """The ``provision.kql`` command that creates ``f`` (no blank line inside: the
    script's commands are separated by blank lines)."""
    return (
        f".create-or-alter function with (folder = {_kql_string(FOLDER)}, docstring = {_kql_string(f.doc)})\n"
        f"{f.name}({f.params}) {{\n{f.body}\n}}"
    )


def query(f: StateFunction) -> str:
    """The query the saver sends for ``f``: its body, its parameters declared."""
    return f"declare query_parameters({f.params});\n{f.body}" if f.params else f.body


def _plain(value: Any) -> Any:
    # a datetime is UTC in both stores; the embedded one hands it over without a zone
    if isinstance(value, dt.datetime) and value.tzinfo is None:
        return value.replace(tzinfo=dt.timezone.utc)
    return value


def plain_rows(f: StateFunction, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The backend's rows as plain dicts of ``f.columns``, in the function's order:
    datetimes aware (UTC), durations ``timedelta``, lists for sets, ints for counts."""
    return [{c: _plain(r.get(c)) for c in f.columns} for r in rows]


def provision_commands() -> str:
    """The commands provision.kql ends with: every function's :func:`definition`."""
    return "\n\n".join(definition(f) for f in FUNCTIONS)
