"""Live progress and the final tables.

Progress goes to stderr: a ``rich`` progress display (one bar per saver, with
rate and elapsed time) when stderr is a terminal, plain timestamped lines
otherwise (logs, CI, pipes). The report itself goes to stdout as plain text,
the same on a terminal and in a file.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TextIO

Event = dict[str, Any]

#: seconds between plain progress lines for one saver
PLAIN_INTERVAL = 2.0


class PlainProgress:
    """Progress as plain lines: start, a line every few seconds, written, verified."""

    def __init__(self, stream: TextIO, interval: float = PLAIN_INTERVAL) -> None:
        self.stream = stream
        self.interval = interval
        self._last: dict[str, float] = {}

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def __call__(self, ev: Event) -> None:
        kind, key = ev["event"], ev.get("target", "")
        if kind == "start":
            self._last[key] = time.monotonic()
            self._print(f"[{key}] running {ev['ops']} steps on {ev['label']} ...")
        elif kind == "progress":
            now = time.monotonic()
            if now - self._last.get(key, 0.0) >= self.interval:
                self._last[key] = now
                rate = ev["done"] / ev["elapsed_s"] if ev["elapsed_s"] > 0 else 0.0
                self._print(f"[{key}] {ev['done']}/{ev['total']} steps, {ev['elapsed_s']:.0f} s, {rate:.0f} steps/s")
        elif kind == "written":
            self._print(f"[{key}] written and stored in {ev['elapsed_s']:.2f} s; verifying ...")
        elif kind == "verified":
            v = ev["verification"]
            self._print(f"[{key}] verified: {v['ok']} OK, {v['failed']} failed")
        elif kind == "error":
            self._print(f"[{key}] ERROR: {ev['error']}")
        elif kind == "note":
            self._print(ev["text"])

    def close(self) -> None:
        pass


class RichProgress:
    """A live ``rich`` display: one bar per saver (steps done / total, steps/s, elapsed)."""

    def __init__(self, stream: TextIO) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = Console(file=stream)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
            transient=False,
        )
        self.tasks: dict[str, Any] = {}
        self.progress.start()

    def __call__(self, ev: Event) -> None:
        kind, key = ev["event"], ev.get("target", "")
        p = self.progress
        if kind == "start":
            self.tasks[key] = p.add_task(ev["label"], total=ev["ops"], rate="", status="running")
        elif key in self.tasks:
            t = self.tasks[key]
            if kind == "progress":
                rate = ev["done"] / ev["elapsed_s"] if ev["elapsed_s"] > 0 else 0.0
                p.update(t, completed=ev["done"], rate=f"{rate:,.0f} steps/s")
            elif kind == "written":
                p.update(t, completed=p.tasks[t].total, status=f"stored in {ev['elapsed_s']:.2f} s, verifying")
            elif kind == "verified":
                v = ev["verification"]
                p.update(t, status=f"verified {v['ok']} OK, {v['failed']} failed")
            elif kind == "error":
                p.update(t, status=f"[red]ERROR: {ev['error']}")
        if kind == "note":
            self.console.print(ev["text"])

    def close(self) -> None:
        self.progress.stop()


def progress_display(stream: TextIO, mode: str = "auto") -> Any:
    """``auto``: rich on a terminal, plain lines otherwise; ``rich``, ``plain`` or ``none``."""
    if mode == "none":
        return None
    if mode == "rich" or (mode == "auto" and _isatty(stream)):
        return RichProgress(stream)
    return PlainProgress(stream)


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


# -- formatting helpers ------------------------------------------------------------------


def mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def num(v: float | None, fmt: str = ",.1f") -> str:
    return "n/a" if v is None else format(v, fmt)


def xr(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}x"


def table(headers: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    """A plain fixed-width table; ``align``: one of 'l'/'r' per column (default: first left, rest right)."""
    align = align or ("l" + "r" * (len(headers) - 1))
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if a == "l" else str(c).rjust(w) for c, w, a in zip(cells, widths, align)).rstrip()

    out = [line(headers), "-" * len(line(headers))]
    out += [line(r) for r in rows]
    return out


Formatter = Callable[[dict[str, Any]], list[str]]
