"""The storage model: table names, columns and their Kusto types, in one place.

Every table is append-only. A row is never updated: a retry or a replay may
ingest the same row twice, so every read deduplicates on the row's key (the
``key`` columns below, plus ``chunk`` for chunked payloads). Deletions are rows
in ``Tombstones`` that reads honour until compaction removes what they cover.

Payloads (serialized channel values and pending writes) are bytes: base64 text
in Kusto, which has no binary column type, and BLOBs in the embedded store
(:data:`BINARY_COLUMNS`). A payload is split into ``chunks`` rows whose base64
text is at most ``cell_limit`` characters each; a value with a missing chunk is
not yet visible.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Kusto scalar types used by the schema.
STRING = "string"
DYNAMIC = "dynamic"
LONG = "long"
INT = "int"
DATETIME = "datetime"

#: string columns that hold bytes: base64 text in Kusto, BLOB in the embedded store
BINARY_COLUMNS = frozenset({"payload"})


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[tuple[str, str], ...]
    #: columns that identify a logical row (dedup key), without ``chunk``
    key: tuple[str, ...]
    #: the column that orders duplicates (newest wins unless said otherwise)
    time_column: str
    doc: str

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c for c, _ in self.columns)

    @property
    def chunked(self) -> bool:
        return "chunk" in self.column_names


CHECKPOINTS = Table(
    name="Checkpoints",
    columns=(
        ("thread_id", STRING),
        ("checkpoint_ns", STRING),
        ("checkpoint_id", STRING),
        ("parent_checkpoint_id", STRING),
        ("run_id", STRING),
        ("channel_versions", DYNAMIC),
        ("new_versions", DYNAMIC),
        ("metadata", DYNAMIC),
        ("payload_type", STRING),
        ("payload", STRING),
        ("written_at", DATETIME),
    ),
    key=("thread_id", "checkpoint_ns", "checkpoint_id"),
    time_column="written_at",
    doc=(
        "One row per checkpoint: the checkpoint body without channel values. "
        "channel_versions (channel -> version, as strings) locates its blobs; "
        "new_versions lists the blobs written with it, which must be complete "
        "before the checkpoint is visible."
    ),
)

BLOBS = Table(
    name="CheckpointBlobs",
    columns=(
        ("thread_id", STRING),
        ("checkpoint_ns", STRING),
        ("channel", STRING),
        ("version", STRING),
        ("payload_type", STRING),
        ("payload", STRING),
        ("chunk", INT),
        ("chunks", INT),
        ("written_at", DATETIME),
    ),
    key=("thread_id", "checkpoint_ns", "channel", "version"),
    time_column="written_at",
    doc="One logical row per (channel, version) value; only changed channels are written.",
)

WRITES = Table(
    name="CheckpointWrites",
    columns=(
        ("thread_id", STRING),
        ("checkpoint_ns", STRING),
        ("checkpoint_id", STRING),
        ("task_id", STRING),
        ("task_path", STRING),
        ("idx", LONG),
        ("channel", STRING),
        ("payload_type", STRING),
        ("payload", STRING),
        ("chunk", INT),
        ("chunks", INT),
        ("written_at", DATETIME),
    ),
    key=("thread_id", "checkpoint_ns", "checkpoint_id", "task_id", "idx"),
    time_column="written_at",
    doc="Pending writes per (checkpoint, task, idx).",
)

TOMBSTONES = Table(
    name="Tombstones",
    columns=(
        ("scope", STRING),
        ("thread_id", STRING),
        ("checkpoint_ns", STRING),
        ("checkpoint_id", STRING),
        ("run_id", STRING),
        ("deleted_at", DATETIME),
    ),
    key=("scope", "thread_id", "checkpoint_ns", "checkpoint_id", "run_id"),
    time_column="deleted_at",
    doc=(
        "Deletions that reads honour: scope 'thread' hides every row of thread_id "
        "written before deleted_at; 'expire' (the ttl option's expiry) hides every row of "
        "thread_id written at or before deleted_at, the thread's last activity, unless a row "
        "written after it continues that history (a write racing the expiry wins); 'run' "
        "hides checkpoints of run_id; 'checkpoint' "
        "hides one checkpoint (thread_id, checkpoint_ns, checkpoint_id) written before "
        "deleted_at (prune writes one per checkpoint it removes: Kusto has no ordering "
        "operators on strings, so a range tombstone could not be evaluated)."
    ),
)

COMPACTIONS = Table(
    name="Compactions",
    columns=(
        ("entry", STRING),
        ("term", LONG),
        ("owner", STRING),
        ("scope", STRING),
        ("thread_id", STRING),
        ("checkpoint_ns", STRING),
        ("checkpoint_id", STRING),
        ("run_id", STRING),
        ("deleted_at", DATETIME),
        ("written_at", DATETIME),
    ),
    key=("entry", "term", "owner", "scope", "thread_id", "checkpoint_ns", "checkpoint_id", "run_id", "deleted_at"),
    time_column="written_at",
    doc=(
        "Compaction's durable record, shared by every process on the database. entry "
        "'done': the tombstone (scope .. deleted_at) has been compacted (its covered rows "
        "soft-deleted from every table); pending = Tombstones without a 'done' row, so a "
        "restart resumes where compaction stopped. entry 'lease': owner's claim to compact "
        "in term (epoch seconds // compaction_interval); the smallest owner among a term's "
        "claims compacts, one process per database at a time."
    ),
)

TOUCHES = Table(
    name="Touches",
    columns=(
        ("thread_id", STRING),
        ("checkpoint_ns", STRING),
        ("checkpoint_id", STRING),
        ("written_at", DATETIME),
    ),
    key=("thread_id", "checkpoint_ns", "checkpoint_id", "written_at"),
    time_column="written_at",
    doc=(
        "Reads that refresh a thread's time to live (ttl_refresh_on_read): the thread, "
        "the checkpoint read, and when. Expiry counts them as activity."
    ),
)

COMPACTION_DONE = "done"
COMPACTION_LEASE = "lease"
#: the expiry's lease (ttl): same rule as compaction's, its own term
EXPIRY_LEASE = "expiry-lease"

TABLES: tuple[Table, ...] = (CHECKPOINTS, BLOBS, WRITES, TOMBSTONES, COMPACTIONS, TOUCHES)
TABLES_BY_NAME = {t.name: t for t in TABLES}

#: The materialized view of the latest checkpoint per (thread_id, checkpoint_ns).
LATEST_VIEW = "LatestCheckpoints"

#: Name of the JSON ingestion mapping created for every table.
MAPPING_SUFFIX = "_json_mapping"


def mapping_name(table: str) -> str:
    return f"{table}{MAPPING_SUFFIX}"


SCOPE_THREAD = "thread"
SCOPE_RUN = "run"
SCOPE_CHECKPOINT = "checkpoint"
#: a thread that outlived the ttl option: conditional on no racing write (engine/kql.py)
SCOPE_EXPIRE = "expire"
