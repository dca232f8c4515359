"""OpenTelemetry metrics and traces of the checkpointer (names in :mod:`.names`).

The saver reports through the OpenTelemetry API to whatever SDK the host set up
(nothing, at no measurable cost, when there is none). :func:`configure_telemetry`
sets up console, OTLP and Prometheus export in one call for hosts without a setup.
"""

from . import names
from .instruments import Instruments
from .setup import TelemetryHandle, configure_telemetry

__all__ = ["Instruments", "TelemetryHandle", "configure_telemetry", "names"]
