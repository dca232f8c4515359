"""What every actor of one engine shares: settings, backend, mailboxes, telemetry.

Nothing here is actor state: mailboxes are channels, ``replies`` is the set of
reply slots still awaited (so a failing engine can answer them all), and
``failure`` is written once, when the engine fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anyio

from .backends.base import Backend
from .clock import ThreadClock
from .config import EngineConfig
from .errors import EngineFailedError
from .mailbox import Admission, Mailbox, Reply, loop_event_class
from ..telemetry import Instruments


@dataclass
class Runtime:
    config: EngineConfig
    backend: Backend
    instruments: Instruments
    mailboxes: dict[str, Mailbox] = field(default_factory=dict)
    replies: set[Reply[Any]] = field(default_factory=set)
    failure: BaseException | None = None
    #: errors of batches that could not be ingested; raised by flush()/close
    ingest_errors: list[BaseException] = field(default_factory=list)
    #: failed compaction passes (reads stay correct through tombstones; the next
    #: pass retries) and the last one's error; counted, not kept
    compaction_failures: int = 0
    last_compaction_error: BaseException | None = None
    query_limiter: anyio.CapacityLimiter | None = None
    #: whether reads apply the ttl option's expiry rule (engine/kql.py _TOMBSTONE_LETS):
    #: from the start with the ttl option, else from the first read that met an expiry
    expiries: bool = False
    #: the spool when durability="spool" (engine/spool.py): the batcher admits puts to it
    spool: Any = None
    #: puts waiting for room before they take the fast path (``Engine.put``)
    admission: Admission = field(default_factory=Admission)
    #: puts that waited for room (backpressure), and their waits summed, in seconds
    puts_waited: int = 0
    put_wait_s: float = 0.0

    #: the engine's per-thread clock (engine/clock.py): stamps rows, learns from reads
    clock: ThreadClock = field(default_factory=ThreadClock)

    #: the event loop's Event class (``loop_event_class``: the runtime is built in the loop)
    new_event: Any = field(default_factory=loop_event_class)

    def reply(self) -> Reply[Any]:
        return Reply(self.replies, self.new_event)

    def mailbox(self, name: str) -> Mailbox:
        return self.mailboxes[name]

    def fail(self, actor: str, error: BaseException) -> None:
        """Escalation: fail every waiter now and close every mailbox."""
        if self.failure is not None:
            return
        self.failure = EngineFailedError(
            f"the engine stopped: actor {actor!r} exceeded its restart intensity "
            f"({self.config.max_restarts} restarts in {self.config.restart_window}s); "
            f"last error: {error!r}"
        )
        self.failure.__cause__ = error
        for mb in self.mailboxes.values():
            mb.close()
            for msg in mb.drain():
                reply = getattr(msg, "reply", None)
                if reply is not None:
                    reply.fail(self.failure)
            mb.close_receive()  # wakes senders blocked on a full mailbox
        for reply in list(self.replies):
            reply.fail(self.failure)
