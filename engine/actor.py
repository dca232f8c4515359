"""The actor base: one task, one mailbox, state that only it touches.

An actor is an *incarnation*: the supervisor builds a new one after a crash.
What must survive a crash (rows not yet ingested, the read overlay) lives in a
``state`` object the engine owns and hands to every incarnation; what may be
lost (a cache) lives on the incarnation. Work that waits on I/O runs in child
tasks of the actor's task group and reports back through the actor's own
mailbox, so the actor's loop never waits on the backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from .errors import ActorCrashedError
from .mailbox import Mailbox, Message

if TYPE_CHECKING:
    from .runtime import Runtime


class InjectedCrash(Exception):
    """Raised inside an actor by a :class:`Crash` message (fault injection)."""


class Crash(Message):
    """Makes the receiving actor raise: a real crash through the real mailbox."""

    __slots__ = ()
    redeliverable = False


class _Fault:
    """A direct dispatch that raised: the reader's own task takes it and crashes with
    the message in hand, as if it had raised there."""

    __slots__ = ("error", "msg")

    def __init__(self, error: BaseException, msg: Any) -> None:
        self.error = error
        self.msg = msg


class Actor:
    name = "actor"
    #: message classes :meth:`handle_now` handles without awaiting anything; while the
    #: actor waits for mail with none queued, a sender runs it in its own task (direct
    #: dispatch, :meth:`Mailbox.send_nowait`) instead of queuing the message and waking it
    direct_types: frozenset[type] = frozenset()

    def __init__(self, runtime: Runtime, mailbox: Mailbox, state: Any) -> None:
        self.runtime = runtime
        self.mailbox = mailbox
        self.state = state
        self.in_hand: Any = None
        self.tg: TaskGroup | None = None
        self._direct_fn = self._direct

    async def run(self) -> None:
        """Serve the mailbox until it is closed and drained."""
        async with anyio.create_task_group() as tg:
            self.tg = tg
            await self.on_start()
            try:
                if self.direct_types:
                    self.mailbox.direct = self._direct_fn
                while True:
                    try:
                        msg = await self.mailbox.receive()
                    except (anyio.EndOfStream, anyio.ClosedResourceError):
                        break
                    self.in_hand = msg
                    if isinstance(msg, _Fault):
                        self.in_hand = msg.msg
                        raise msg.error
                    if isinstance(msg, Crash):
                        raise InjectedCrash(f"injected crash in {self.name}")
                    parent = getattr(msg, "trace", None)  # set by a traced saver call
                    if parent is None:
                        await self.handle(msg)
                    else:
                        with self.runtime.instruments.actor_span(self.name, msg, parent):
                            await self.handle(msg)
                    self.in_hand = None
                await self.on_stop()
            finally:
                if self.mailbox.direct is self._direct_fn:
                    self.mailbox.direct = None
                self.tg = None
            tg.cancel_scope.cancel()

    async def on_start(self) -> None:
        """Called at the start of every incarnation (resume work kept in state)."""

    async def on_stop(self) -> None:
        """Called once the mailbox is closed and drained."""

    async def handle(self, msg: Any) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def handle_now(self, msg: Any) -> None:  # pragma: no cover - abstract
        """Handle a message of :attr:`direct_types` without awaiting anything."""
        raise NotImplementedError

    def _direct(self, msg: Any) -> bool:
        """Handle ``msg`` in the sender's task, the actor being parked with no mail queued
        (there is no other task in the actor's state at this moment: the event loop runs
        one task at a time and the actor's own waits in ``receive``). Returns False for a
        message it does not take that way. A handler that raises crashes the actor as if
        its own task had raised, with ``msg`` in hand: the sender's send succeeds, and the
        supervisor restarts the actor and redelivers or fails back ``msg``."""
        if type(msg) not in self.direct_types:
            return False
        self.in_hand = msg
        try:
            parent = getattr(msg, "trace", None)
            if parent is None:
                self.handle_now(msg)
            else:
                with self.runtime.instruments.actor_span(self.name, msg, parent):
                    self.handle_now(msg)
        except Exception as exc:  # noqa: BLE001 - a crash, taken to the actor's task
            self.mailbox.direct = None
            self.mailbox.interrupt(_Fault(exc, msg))
        self.in_hand = None
        return True

    def on_crash(self, error: BaseException) -> None:
        """Deal with the message in hand: deliver it once more, or fail it back."""
        msg, self.in_hand = self.in_hand, None
        if msg is None or not isinstance(msg, Message):
            return
        if msg.redeliverable and msg.attempts < 1:
            msg.attempts += 1
            self.mailbox.redeliver(msg)
        elif msg.reply is not None:
            msg.reply.fail(
                ActorCrashedError(f"{self.name} crashed while handling {type(msg).__name__}: {error!r}")
            )
