"""The interpreter's thread switch interval while engines run (``EngineConfig.switch_interval``).

A backend call that runs in a worker thread (DuckDB's insert and query, the Kusto
SDK's HTTP request) takes the GIL again several times before it returns: judging by
the waits below (not counted), DuckDB's Python layer about ten times per ``INSERT ...
SELECT`` from an Arrow table, three for ``SELECT 1``. While the event loop runs
Python code, each of those waits for
the loop to be told to give the GIL up, which CPython does after the switch
interval (``sys.setswitchinterval``, 5 ms by default). One 500-row insert that
takes 2 ms on an idle process takes 40-65 ms beside a busy loop, and the forced
switches happen one interval at a time, so every worker thread together gets at
most about 200 of them a second: that, not DuckDB, caps the embedded store's
ingest rate on a busy host.

The interval is process-wide. While at least one engine that sets it is open, it is
the smallest value those engines asked for; when the last one closes, the value
found when the first one opened comes back, unless something else changed it in the
meantime (then it is left as it is).
"""

from __future__ import annotations

import sys
import threading

_lock = threading.Lock()
#: values asked for by the engines open now (one entry per engine)
_asked: list[float] = []
#: the interval before the first of them opened
_saved: float | None = None
#: what this module set last
_set: float | None = None


def acquire(interval: float) -> None:
    """An engine opens with ``switch_interval=interval``."""
    global _saved
    with _lock:
        if not _asked:
            _saved = sys.getswitchinterval()
        _asked.append(interval)
        _apply(min(_asked))


def release(interval: float) -> None:
    """The engine that called ``acquire(interval)`` has closed."""
    global _saved, _set
    with _lock:
        _asked.remove(interval)
        if _asked:
            _apply(min(_asked))
            return
        if _saved is not None and _still_ours():
            sys.setswitchinterval(_saved)
        _saved = _set = None


def _still_ours() -> bool:
    """Nothing else changed the interval since this module last set it (or it never did)."""
    return _set is None or abs(sys.getswitchinterval() - _set) < 1e-9


def _apply(interval: float) -> None:
    global _set
    if not _still_ours():
        return  # changed by someone else since: theirs stands
    sys.setswitchinterval(interval)
    _set = sys.getswitchinterval()  # as the interpreter stores it (microseconds)
