"""LangGraph checkpointer on Azure Data Explorer (Kusto), with an embedded store.

    from langgraph.checkpoint.kusto import AsyncKustoSaver, KustoSaver
"""

from .aio import AsyncKustoSaver
from .engine import (
    ConfigError,
    EngineClosedError,
    EngineConfig,
    EngineFailedError,
    IngestError,
    KustoCheckpointError,
    SpoolError,
)
from .rows import SerializationError
from .sync import KustoSaver

__all__ = [
    "AsyncKustoSaver",
    "ConfigError",
    "EngineClosedError",
    "EngineConfig",
    "EngineFailedError",
    "IngestError",
    "KustoCheckpointError",
    "KustoSaver",
    "SerializationError",
    "SpoolError",
]
