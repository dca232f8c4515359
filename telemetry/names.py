"""Every instrument and span name, in one place (documented in the README table).

Semantic conventions are followed where one exists: ``db.client.operation.duration``
with ``db.system.name``, ``db.operation.name`` and ``db.namespace``. Kusto has no
registered ``db.system.name`` value, so the conventions' rule for unlisted systems
applies: a short lowercase name of our own, ``kusto`` (and ``duckdb`` for the
embedded store, which is registered).
"""

METER_NAME = "langgraph.checkpoint.kusto"
TRACER_NAME = "langgraph.checkpoint.kusto"

# attributes
DB_SYSTEM_NAME = "db.system.name"
DB_OPERATION_NAME = "db.operation.name"
DB_NAMESPACE = "db.namespace"
ERROR_TYPE = "error.type"
ACTOR = "kusto_checkpoint.actor"
TABLE = "kusto_checkpoint.table"
OUTCOME = "kusto_checkpoint.outcome"
CACHE_RESULT = "kusto_checkpoint.cache.result"

# metrics
OPERATION_DURATION = "db.client.operation.duration"
MAILBOX_DEPTH = "kusto_checkpoint.mailbox.depth"
MAILBOX_CAPACITY = "kusto_checkpoint.mailbox.capacity"
BATCH_ROWS = "kusto_checkpoint.batch.rows"
BATCH_BYTES = "kusto_checkpoint.batch.bytes"
INGEST_DURATION = "kusto_checkpoint.ingest.duration"
INGEST_BATCHES = "kusto_checkpoint.ingest.batches"
INGEST_RETRIES = "kusto_checkpoint.ingest.retries"
ACTOR_RESTARTS = "kusto_checkpoint.actor.restarts"
BACKPRESSURE_WAIT = "kusto_checkpoint.backpressure.wait"
BUFFERED_BYTES = "kusto_checkpoint.buffered.bytes"
OVERLAY_ROWS = "kusto_checkpoint.overlay.records"
OVERLAY_BYTES = "kusto_checkpoint.overlay.bytes"
CACHE_REQUESTS = "kusto_checkpoint.cache.requests"
VISIBILITY_LAG = "kusto_checkpoint.visibility.lag"
TOMBSTONES_PENDING = "kusto_checkpoint.tombstones.pending"
