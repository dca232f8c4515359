"""OpenTelemetry metrics and traces of the checkpointer (names in :mod:`.names`)."""

from . import names
from .instruments import Instruments

__all__ = ["Instruments", "names"]
