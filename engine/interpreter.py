"""Process-wide interpreter settings that engines hold while they are open.

Two settings, each opt-in (``None`` leaves the interpreter alone):

``EngineConfig.switch_interval``: the thread switch interval
(``sys.setswitchinterval``). A backend call that runs in a worker thread (DuckDB's
insert and query, the Kusto SDK's HTTP request) takes the GIL again several times
before it returns: judging by the waits below (not counted), DuckDB's Python layer
about ten times per ``INSERT ... SELECT`` from an Arrow table, three for ``SELECT 1``.
While the event loop runs Python code, each of those waits for the loop to be told
to give the GIL up, which CPython does after the switch interval (5 ms by default).
One 500-row insert that takes 2 ms on an idle process takes 40-65 ms beside a busy
loop, and the forced switches happen one interval at a time, so every worker thread
together gets at most about 200 of them a second: that, not DuckDB, caps the
embedded store's ingest rate on a busy host. Engines that ask for it get the
smallest value asked for.

``EngineConfig.gc_threshold``: the cyclic garbage collector's thresholds
(``gc.set_threshold``). Thousands of concurrent LangGraph threads keep millions of
objects alive (their message lists, coroutine frames, the engine's records), and
CPython's defaults, (700, 10, 10), make it walk all of them again and again: full
collections took 38% of a 5,000-agent raw run. Engines that ask for it get the
largest value asked for, per generation.

While at least one engine that sets a setting is open, the setting is the
combination of the values those engines asked for; when the last one closes, the
value found when the first one opened comes back, unless something else changed it
in the meantime (then it is left as it is).
"""

from __future__ import annotations

import gc
import sys
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class HeldSetting(Generic[T]):
    """One interpreter setting, held by the engines open now."""

    def __init__(
        self,
        read: Callable[[], T],
        write: Callable[[T], None],
        combine: Callable[[list[T]], T],
        same: Callable[[T, T], bool],
    ) -> None:
        self._read = read
        self._write = write
        self._combine = combine
        self._same = same
        self._lock = threading.Lock()
        #: values asked for by the engines open now (one entry per engine)
        self._asked: list[T] = []
        #: the value before the first of them opened
        self._saved: T | None = None
        #: what this setting wrote last, as the interpreter reads it back
        self._set: T | None = None

    def acquire(self, value: T) -> None:
        """An engine that asks for ``value`` opens."""
        with self._lock:
            if not self._asked:
                self._saved = self._read()
            self._asked.append(value)
            self._apply()

    def release(self, value: T) -> None:
        """The engine that called ``acquire(value)`` has closed."""
        with self._lock:
            self._asked.remove(value)
            if self._asked:
                self._apply()
                return
            if self._saved is not None and self._still_ours():
                self._write(self._saved)
            self._saved = self._set = None

    def _still_ours(self) -> bool:
        """Nothing else changed the setting since it was last written here (or it never was)."""
        return self._set is None or self._same(self._read(), self._set)

    def _apply(self) -> None:
        if not self._still_ours():
            return  # changed by someone else since: theirs stands
        self._write(self._combine(self._asked))
        self._set = self._read()


def _set_gc_threshold(thresholds: tuple[int, ...]) -> None:
    gc.set_threshold(*thresholds)


def _largest_per_generation(asked: list[tuple[int, ...]]) -> tuple[int, ...]:
    return tuple(max(gen) for gen in zip(*asked))


SWITCH_INTERVAL: HeldSetting[float] = HeldSetting(
    sys.getswitchinterval,
    sys.setswitchinterval,
    min,
    lambda a, b: abs(a - b) < 1e-9,  # the interpreter keeps microseconds
)

GC_THRESHOLD: HeldSetting[tuple[int, ...]] = HeldSetting(
    gc.get_threshold,
    _set_gc_threshold,
    _largest_per_generation,
    lambda a, b: tuple(a) == tuple(b),
)


def asked_for(config: Any) -> list[tuple[HeldSetting[Any], Any]]:
    """The settings an EngineConfig asks for, each with its value (the ones it leaves alone omitted)."""
    pairs = ((SWITCH_INTERVAL, config.switch_interval), (GC_THRESHOLD, config.gc_threshold))
    return [(setting, value) for setting, value in pairs if value is not None]
