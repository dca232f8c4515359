"""LangGraph checkpointer on Azure Data Explorer (Kusto), with an embedded store.

    from langgraph.checkpoint.kusto import AsyncKustoSaver, KustoSaver
"""

from .aio import AsyncKustoSaver
from .engine import (
    ActorCrashedError,
    BackendError,
    ConfigError,
    EngineClosedError,
    EngineConfig,
    EngineFailedError,
    IngestError,
    KustoCheckpointError,
    PermanentBackendError,
    PutTimeoutError,
    SpoolError,
    StoreLockedError,
    StorePathError,
    TransientBackendError,
    UsageError,
)
from .engine.backends.kusto import SchemaError
from .rows import SerializationError
from .sync import KustoSaver

__all__ = [
    "ActorCrashedError",
    "AsyncKustoSaver",
    "BackendError",
    "ConfigError",
    "EngineClosedError",
    "EngineConfig",
    "EngineFailedError",
    "IngestError",
    "KustoCheckpointError",
    "KustoSaver",
    "PermanentBackendError",
    "PutTimeoutError",
    "SchemaError",
    "SerializationError",
    "SpoolError",
    "StoreLockedError",
    "StorePathError",
    "TransientBackendError",
    "UsageError",
]
