"""Exceptions raised by the engine and its backends."""

from __future__ import annotations


class KustoCheckpointError(Exception):
    """Base class for every error this package raises on purpose."""


class EngineClosedError(KustoCheckpointError, RuntimeError):
    """The engine was closed (or never started): the saver cannot be used now."""


class EngineFailedError(KustoCheckpointError, RuntimeError):
    """The engine stopped after an actor exceeded its restart intensity."""


class ConfigError(KustoCheckpointError, ValueError):
    """A configuration value is invalid; the message names it."""


class BackendError(KustoCheckpointError):
    """A backend call failed."""


class TransientBackendError(BackendError):
    """A failure worth retrying: throttling, 5xx, timeouts, connection resets."""


class PermanentBackendError(BackendError):
    """A failure that retrying will not fix: missing table or mapping, bad request, auth."""


class StoreLockedError(PermanentBackendError):
    """The embedded store's DuckDB file is open in another process: one process at a
    time owns an embedded store file (several replicas share a Kusto database instead)."""


class StorePathError(PermanentBackendError):
    """The embedded store's file cannot be created or opened where its path points
    (its folder does not exist, the path is a folder, or the file is not a DuckDB database)."""


class UsageError(KustoCheckpointError, RuntimeError):
    """The saver was used in a way it cannot serve: a sync method called from the event
    loop's own thread (AsyncKustoSaver), or a saver entered while it is already open."""


class PutTimeoutError(KustoCheckpointError, TimeoutError):
    """A put was not accepted (or, per ``durability``, made durable or ingested) within
    ``put_timeout``. Also a ``TimeoutError``."""


class IngestError(KustoCheckpointError):
    """Rows accepted by the engine could not be ingested; they are not stored."""


class ActorCrashedError(KustoCheckpointError, RuntimeError):
    """The actor handling a request crashed twice on it; the request was failed back."""


class SpoolError(KustoCheckpointError):
    """The spool (durability="spool") could not be written (disk full, I/O error)
    or opened (in use by another process). A put that raises it was accepted in
    memory and will still be ingested, but it was not made durable locally."""
