"""Every instrument, attribute and span name, in one place (documented in the table of docs/telemetry.md).

Semantic conventions are followed where one exists: ``db.client.operation.duration``
with ``db.system.name``, ``db.operation.name``, ``db.namespace``, ``db.collection.name``,
``server.address`` and ``error.type``.

``db.system.name``: the registry of the OpenTelemetry semantic conventions has no value
for Kusto / Azure Data Explorer, nor for DuckDB. Its rule for an unlisted system is a
custom value: the product's name in lowercase, without a version. Cloud services in the
registry carry their platform as a prefix (``azure.cosmosdb``, ``aws.dynamodb``,
``gcp.spanner``), so the Kusto backend reports ``azure.kusto``: "kusto" because that is
the engine's name in every client, SDK (``azure-kusto-data``) and resource provider
(``Microsoft.Kusto``), and it covers every service that runs it and this client reaches
(Azure Data Explorer, Fabric Eventhouse, the Kusto emulator), where
``azure.data_explorer`` would name only one of them. The embedded store reports
``duckdb``.
"""

from __future__ import annotations

METER_NAME = "langgraph.checkpoint.kusto"
TRACER_NAME = "langgraph.checkpoint.kusto"

#: backend name (``Backend.name``) -> ``db.system.name`` value
DB_SYSTEM_VALUES = {"kusto": "azure.kusto", "duckdb": "duckdb"}

# -- attributes ----------------------------------------------------------------

DB_SYSTEM_NAME = "db.system.name"
DB_OPERATION_NAME = "db.operation.name"
DB_NAMESPACE = "db.namespace"
DB_COLLECTION_NAME = "db.collection.name"
SERVER_ADDRESS = "server.address"
ERROR_TYPE = "error.type"
ACTOR = "kusto_checkpoint.actor"
#: the backend table of a batch (semantic convention: the collection)
TABLE = DB_COLLECTION_NAME
OUTCOME = "kusto_checkpoint.outcome"
CACHE_RESULT = "kusto_checkpoint.cache.result"
MESSAGE = "kusto_checkpoint.message"
BATCH_ROWS_ATTR = "kusto_checkpoint.batch.rows"
#: how a fork was seen: "put" (written here from a parent that already had a newer
#: child) or "read" (the backend's newest checkpoint is a sibling of the one written here)
FORK_SEEN_BY = "kusto_checkpoint.fork.seen_by"
LINKS_DROPPED = "kusto_checkpoint.batch.links_dropped"

# attribute values
OUTCOME_OK = "ok"
OUTCOME_FAILED = "failed"
FORK_SEEN_BY_PUT = "put"
FORK_SEEN_BY_READ = "read"
CACHE_HIT = "hit"
CACHE_MISS = "miss"
OP_INGEST = "ingest"
OP_QUERY = "query"

# -- metrics ---------------------------------------------------------------------

OPERATION_DURATION = "db.client.operation.duration"
MAILBOX_DEPTH = "kusto_checkpoint.mailbox.depth"
MAILBOX_CAPACITY = "kusto_checkpoint.mailbox.capacity"
BATCH_ROWS = "kusto_checkpoint.batch.rows"
BATCH_BYTES = "kusto_checkpoint.batch.bytes"
INGEST_DURATION = "kusto_checkpoint.ingest.duration"
INGEST_BATCHES = "kusto_checkpoint.ingest.batches"
INGEST_RETRIES = "kusto_checkpoint.ingest.retries"
QUERY_DURATION = "kusto_checkpoint.query.duration"
ACTOR_RESTARTS = "kusto_checkpoint.actor.restarts"
BACKPRESSURE_WAIT = "kusto_checkpoint.backpressure.wait"
BUFFERED_BYTES = "kusto_checkpoint.buffered.bytes"
OVERLAY_ROWS = "kusto_checkpoint.overlay.records"
OVERLAY_BYTES = "kusto_checkpoint.overlay.bytes"
CACHE_REQUESTS = "kusto_checkpoint.cache.requests"
VISIBILITY_LAG = "kusto_checkpoint.visibility.lag"
TOMBSTONES_PENDING = "kusto_checkpoint.tombstones.pending"
COMPACTION_FAILURES = "kusto_checkpoint.compaction.failures"
FORKS = "kusto_checkpoint.forks"
EXPIRED_THREADS = "kusto_checkpoint.expiry.threads"
ROWS_REMOVED = "kusto_checkpoint.compaction.rows"
OLDEST_LIVE_AGE = "kusto_checkpoint.expiry.oldest_live_age"

#: every metric, in the order of the table in docs/telemetry.md
METRICS = (
    OPERATION_DURATION, MAILBOX_DEPTH, MAILBOX_CAPACITY, BATCH_ROWS, BATCH_BYTES, INGEST_DURATION,
    INGEST_BATCHES, INGEST_RETRIES, QUERY_DURATION, ACTOR_RESTARTS, BACKPRESSURE_WAIT, BUFFERED_BYTES,
    OVERLAY_ROWS, OVERLAY_BYTES, CACHE_REQUESTS, VISIBILITY_LAG, TOMBSTONES_PENDING, COMPACTION_FAILURES,
    FORKS, EXPIRED_THREADS, ROWS_REMOVED, OLDEST_LIVE_AGE,
)

# -- spans -------------------------------------------------------------------------
#
# * one span per saver call, named after the method (``db.operation.name``: ``put``,
#   ``put_writes``, ``get_tuple``, ``list``, ``delete_thread``, ...), kind CLIENT;
# * one child span per actor that handles a message the call sent: ``<actor> <Message>``
#   (``batcher Put``, ``cache Read``, ``deleter DeleteThreads``), kind INTERNAL;
# * one child span per backend query a read caused: ``query Checkpoints`` /
#   ``query values``, kind CLIENT;
# * one root span per ingested batch, ``ingest <Table>``, kind CLIENT, linked to the
#   spans of the puts whose rows it carries (at most MAX_LINKS links; the rest are
#   counted in ``kusto_checkpoint.batch.links_dropped``).

SPAN_INGEST = "ingest {table}"
SPAN_QUERY_CHECKPOINTS = "query Checkpoints"
SPAN_QUERY_VALUES = "query values"
#: an agent-state question (engine/agent_state.py), named after its stored function
SPAN_QUERY_STATE = "query {function}"
SPAN_ACTOR = "{actor} {message}"

#: links per ingest span: the SDK's default span link limit (OTEL_SPAN_LINK_COUNT_LIMIT)
MAX_LINKS = 128


def db_system_name(backend_name: str) -> str:
    return DB_SYSTEM_VALUES.get(backend_name, backend_name)


def ingest_span_name(table: str) -> str:
    return SPAN_INGEST.format(table=table)


def actor_span_name(actor: str, message: str) -> str:
    return SPAN_ACTOR.format(actor=actor, message=message)
