"""The actor runtime: mailboxes, request/reply, supervisor, actors, backends."""

from .config import EngineConfig
from .core import Engine
from .errors import (
    ActorCrashedError,
    BackendError,
    ConfigError,
    EngineClosedError,
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

__all__ = [
    "ActorCrashedError",
    "BackendError",
    "ConfigError",
    "Engine",
    "EngineClosedError",
    "EngineConfig",
    "EngineFailedError",
    "IngestError",
    "KustoCheckpointError",
    "PermanentBackendError",
    "PutTimeoutError",
    "SpoolError",
    "StoreLockedError",
    "StorePathError",
    "TransientBackendError",
    "UsageError",
]
