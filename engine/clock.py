"""The times every row carries, ordered the same way on every host.

A row's ``written_at`` (and a tombstone's ``deleted_at``) decide two things: which
checkpoint of a thread is the latest, and which rows a deletion covers (a thread
tombstone hides the thread's rows stamped before it). Host wall clocks disagree by
seconds, so a plain wall-clock stamp lets a host that runs 30 s ahead delete the
next turn written elsewhere, or one that runs behind leave deleted turns readable.

:class:`ThreadClock` is a hybrid logical clock kept per thread: a stamp is the host's
clock, raised above every stamp of that thread this process has *observed*. Every
turn starts with a read of its thread (LangGraph reads before it writes), and reads
observe the stamps they return: the latest checkpoint's, its values', and the
thread's tombstone. A deletion first reads the thread's highest stamp in every table.
So whatever happened before an operation, on any replica, and was visible to it, is
stamped lower than what the operation writes: the order follows causality, whatever
the hosts' clocks say. Stamps stay within microseconds of the host clock unless a
host ahead of it wrote the thread (then they run ahead with it).
"""

from __future__ import annotations

from collections import OrderedDict

from .records import now_us


class ThreadClock:
    """Per-thread stamps that exceed everything observed of the thread.

    Bounded: the floors of the ``max_threads`` most recently used threads are kept;
    a thread forgotten here is observed again by its next read.
    """

    __slots__ = ("_floor", "max_threads")

    def __init__(self, max_threads: int = 100_000) -> None:
        self._floor: OrderedDict[str, int] = OrderedDict()
        self.max_threads = max_threads

    def stamp(self, thread_id: str) -> int:
        """A stamp for a row of ``thread_id``: later than any stamp observed or issued
        for it here, and than this process's previous stamps (strictly increasing)."""
        t = now_us()
        floor = self._floor.get(thread_id)
        if floor is not None:
            if t <= floor:
                t = floor + 1
            self._floor.move_to_end(thread_id)
        self._floor[thread_id] = t
        if len(self._floor) > self.max_threads:
            self._floor.popitem(last=False)
        return t

    def observe(self, thread_id: str, stamp: int) -> None:
        """Note a stamp of ``thread_id`` seen in the backend (or written by anyone)."""
        floor = self._floor.get(thread_id)
        if floor is None or stamp > floor:
            self._floor[thread_id] = stamp
            if floor is None and len(self._floor) > self.max_threads:
                self._floor.popitem(last=False)

    def floor(self, thread_id: str) -> int | None:
        return self._floor.get(thread_id)
