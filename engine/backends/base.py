"""The backend protocol: the only thing the engine needs from a store.

Two implementations: :mod:`.embedded` (DuckDB through duckdb-kql, the default)
and :mod:`.kusto` (Azure Data Explorer through the azure-kusto SDKs).

Rows are plain ``dict`` objects keyed by column name (see :mod:`..schema`):
strings, ints, ``datetime`` (UTC, aware) and, for ``dynamic`` columns, plain
JSON-compatible Python values. Query results use the same shape. The engine hands
``ingest`` a :class:`~..records.Rows`: a sequence that builds each row dict as it
is read, and whose ``column(name)`` gives one column's values without them (the
embedded store appends column by column).

Every value that comes from a user reaches the backend as a query parameter
declared by the KQL text (``declare query_parameters(...)``), never spliced in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

Row = dict[str, Any]


@runtime_checkable
class Backend(Protocol):
    #: short name used in telemetry (``db.system.name``) and errors
    name: str

    async def open(self) -> None:
        """Connect (and, for the embedded store, create the tables)."""

    async def close(self) -> None:
        """Release connections. Idempotent."""

    async def ingest(self, table: str, rows: Sequence[Row]) -> None:
        """Append ``rows`` to ``table``. Raises TransientBackendError or
        PermanentBackendError. May be retried with the same rows: reads dedup."""

    async def query(self, kql: str, params: Mapping[str, Any]) -> list[Row]:
        """Run a KQL query whose parameters are declared in its text."""

    async def command(self, kql: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        """Run a control command (``.delete table T records <| ...``, ``.show ...``)."""


class PendingIngest(Protocol):
    """Rows handed to the backend and not yet confirmed (see ``submit`` below)."""

    async def wait(self) -> None:
        """Return once the backend confirms the rows are ingested; raise
        TransientBackendError (e.g. no confirmation in time: send them again) or
        PermanentBackendError (the backend rejected them) as ``ingest`` does."""


# A backend may also have ``async def submit(self, table, rows) -> PendingIngest | None``:
# hand the rows over and return None if they are ingested already, or a PendingIngest
# to await. ``ingest`` stays the whole operation (submit, then wait); the ingestor
# prefers ``submit`` so that a batch awaiting a slow confirmation (Kusto's queued
# ingestion: the batching policy's minutes) does not hold an ingest slot meanwhile.
