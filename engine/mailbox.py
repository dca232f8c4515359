"""Mailboxes and one-shot replies: how actors and callers talk.

A :class:`Mailbox` is a bounded FIFO plus a small redelivery queue. It
belongs to the engine, not to the actor reading it, so a
restarted actor finds every queued message where it was, and the message it
had in hand when it crashed is put back at the front (once) or failed back.

A :class:`Reply` is a one-shot slot: the sender awaits it, the actor fills it.
A caller cancelled while waiting simply stops waiting; the actor still fills
the slot later and nothing leaks or blocks. The engine keeps the set of
unfilled replies so that, if it fails, every waiter gets the error at once.
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from typing import Any, Generic, TypeVar

import anyio
import anyio.lowlevel

from .errors import EngineClosedError

T = TypeVar("T")


def loop_event_class() -> Any:
    """The running event loop's own Event class (``set``, ``is_set``, ``await wait()``, as
    anyio's). ``anyio.Event()`` looks the backend up on every call: 1.7 us against 0.13 us
    for ``asyncio.Event()``, and the engine makes a few per saver call. Outside an event
    loop (or on another library), anyio's."""
    try:
        asyncio.get_running_loop()
        return asyncio.Event
    except RuntimeError:
        pass
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_task()
            return trio.Event
        except RuntimeError:
            pass
    return anyio.Event


class Reply(Generic[T]):
    __slots__ = ("_event", "_value", "_error", "_registry")

    def __init__(self, registry: set[Reply[Any]] | None = None, new_event: Any = anyio.Event) -> None:
        self._event = new_event()
        self._value: Any = None
        self._error: BaseException | None = None
        self._registry = registry
        if registry is not None:
            registry.add(self)

    @property
    def done(self) -> bool:
        return self._event.is_set()

    def set(self, value: T) -> None:
        if self._event.is_set():
            return
        self._value = value
        self._finish()

    def fail(self, error: BaseException) -> None:
        if self._event.is_set():
            return
        self._error = error
        self._finish()

    def _finish(self) -> None:
        if self._registry is not None:
            self._registry.discard(self)
        self._event.set()

    async def wait(self) -> T:
        await self._event.wait()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[no-any-return]


class Message:
    """Base of every message. ``reply`` is None for fire-and-forget messages."""

    __slots__ = ("reply", "attempts")
    #: messages that must not be delivered again after crashing their actor
    redeliverable = True

    def __init__(self, reply: Reply[Any] | None = None) -> None:
        self.reply = reply
        self.attempts = 0


class Mailbox:
    """A bounded FIFO with one reader, owned by the engine.

    Written on a deque and anyio Events rather than a memory object stream for
    two guarantees the engine relies on: a ``send`` either enqueues the message
    or raises (never both, even when cancelled at the moment the reader makes
    room), and :meth:`has_room` tells, without a yield in between, whether a
    ``send_nowait`` will succeed, so a caller can hand one put to two actors
    atomically. The reader yields to the event loop every ``YIELD_EVERY``
    messages so a busy actor does not starve the others. Not more often: with
    thousands of agents each pass of the event loop takes hundreds of ms, and an
    actor that handled 64 messages a pass let its mailbox fill and every put wait
    (5,000 agents x 10 raw steps, with the admission queue admitting in the poke:
    2,133 steps/s at 64, 2,026 at 256, 2,615 at 1,024, 2,577 at 4,096).

    **Direct dispatch.** A reader may set :attr:`direct`, a handler for messages it can
    handle without awaiting. While the reader is parked in :meth:`receive` with nothing
    queued, :meth:`send_nowait` offers the message to that handler first, in the
    sender's task, and queues it only if the handler declines. Handling it then is
    exactly what the reader would do next, and nothing queued is overtaken; a send made
    from inside such a handler is queued, not nested. The query cache uses it so that a
    read it can answer from memory costs no task switch.
    """

    YIELD_EVERY = 1024

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self._buf: deque[Any] = deque()
        self._redeliver: deque[Any] = deque()
        self._reader: Any = None
        self._space: deque[Any] = deque()
        self._since_yield = 0
        self._new_event = loop_event_class()
        #: called whenever room may have appeared (a message taken, the mailbox closed):
        #: the engine's admission gate (:class:`Admission`) listens here
        self.on_room: Any = None
        #: no more sends; the reader drains what is queued
        self.closed = False
        #: the engine failed: nothing is read any more, senders get an error
        self._receive_closed = False
        #: the reader waits in :meth:`receive` with nothing queued
        self._parked = False
        #: the reader's handler for a message handed over in the sender's task while the
        #: reader is parked (see :meth:`send_nowait`); None: every message is queued
        self.direct: Any = None
        self._directing = False

    # -- sending -------------------------------------------------------------

    def has_room(self) -> bool:
        return len(self._buf) < self.size and not self.closed and not self._receive_closed

    def send_nowait(self, msg: Any) -> None:
        """Enqueue or raise anyio.WouldBlock (full) / EngineClosedError (closed)."""
        if self.closed or self._receive_closed:
            raise EngineClosedError(f"the {self.name} mailbox is closed")
        if len(self._buf) >= self.size:
            raise anyio.WouldBlock
        if self.direct is not None and self._parked and not self._buf and not self._redeliver and not self._directing:
            # direct dispatch: the reader is parked with nothing queued, so handling the
            # message now, in the sender's task, is what the reader would do next, and no
            # message sent earlier is overtaken
            self._directing = True
            try:
                if self.direct(msg):
                    return
            finally:
                self._directing = False
        self._buf.append(msg)
        reader = self._reader
        if reader is not None:
            self._reader = None
            reader.set()

    async def send(self, msg: Any) -> None:
        """Enqueue, waiting while the mailbox is full (the backpressure)."""
        while True:
            try:
                self.send_nowait(msg)
                return
            except anyio.WouldBlock:
                pass
            event = self._new_event()
            self._space.append(event)
            try:
                await event.wait()
            except BaseException:
                if event.is_set():
                    self._wake_sender()  # pass the room we were given on
                else:
                    self._space.remove(event)
                raise

    def _wake_sender(self) -> None:
        if self._space:
            self._space.popleft().set()
        if self.on_room is not None:
            self.on_room()

    # -- receiving -----------------------------------------------------------

    async def receive(self) -> Any:
        """Next message; raises anyio.EndOfStream once closed and drained."""
        while True:
            if self._redeliver:
                return self._redeliver.popleft()
            if self._buf:
                self._since_yield += 1
                if self._since_yield >= self.YIELD_EVERY:
                    self._since_yield = 0
                    await anyio.lowlevel.checkpoint()
                    continue
                msg = self._buf.popleft()
                self._wake_sender()
                return msg
            if self._receive_closed:
                raise anyio.ClosedResourceError
            if self.closed:
                raise anyio.EndOfStream
            self._since_yield = 0
            reader = self._reader = self._new_event()
            self._parked = True
            try:
                await reader.wait()
            finally:
                self._parked = False

    def receive_nowait(self) -> Any:
        """Next message or raises anyio.WouldBlock / anyio.EndOfStream."""
        if self._redeliver:
            return self._redeliver.popleft()
        if self._buf:
            msg = self._buf.popleft()
            self._wake_sender()
            return msg
        if self.closed or self._receive_closed:
            raise anyio.EndOfStream
        raise anyio.WouldBlock

    def redeliver(self, msg: Any) -> None:
        self._redeliver.appendleft(msg)

    def interrupt(self, msg: Any) -> None:
        """Put ``msg`` at the very front and wake the reader (a direct dispatch that crashed
        hands the crash to the reader's own task this way)."""
        self.redeliver(msg)
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.set()

    # -- state ---------------------------------------------------------------

    def depth(self) -> int:
        return len(self._buf) + len(self._redeliver)

    def blocked_senders(self) -> int:
        return len(self._space)

    def _wake_all(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.set()
        while self._space:
            self._space.popleft().set()
        if self.on_room is not None:
            self.on_room()

    def close(self) -> None:
        """No more sends; the reader drains what is queued, then sees EndOfStream."""
        self.closed = True
        self._wake_all()

    def drain(self) -> list[Any]:
        """Take every queued message (used when the engine fails)."""
        out = list(self._redeliver) + list(self._buf)
        self._redeliver.clear()
        self._buf.clear()
        return out

    def close_receive(self) -> None:
        """The reader is gone: blocked and later senders get EngineClosedError."""
        self._receive_closed = True
        self._wake_all()


class _Waiter:
    __slots__ = ("event", "ready", "admit", "args", "done", "error")

    def __init__(self, event: Any, ready: Any, admit: Any, args: tuple[Any, ...]) -> None:
        self.event = event
        self.ready = ready
        self.admit = admit
        self.args = args
        self.done = False
        self.error: BaseException | None = None


class Admission:
    """A FIFO of callers waiting until a condition over several mailboxes holds.

    ``Engine.put`` hands a put to two actors at once, without a yield, when both
    mailboxes have room and the batcher's share of the memory bound holds its bytes
    (the fast path). A put that finds no room waits here, in arrival order. Whenever
    room may have appeared (:attr:`Mailbox.on_room`, a batch handed on) :meth:`poke`
    admits waiters from the front for as long as the condition holds: it runs each
    one's ``admit`` (the put's two sends) right there, then wakes it. While anyone
    waits, new puts queue behind them, so nobody is overtaken and the bound is never
    exceeded.

    Admitting in the poke, not in the woken task, keeps a long queue moving: a waiter
    that had to run first to take its turn and then wake the next one let one put
    through per pass of the event loop (5,000 agents x 10 raw steps, readers yielding
    every 1,024 messages: 2,209 steps/s that way, 2,615 admitting in the poke).
    """

    __slots__ = ("_waiters", "_new_event")

    def __init__(self) -> None:
        self._waiters: deque[_Waiter] = deque()
        self._new_event = loop_event_class()

    def __len__(self) -> int:
        return len(self._waiters)

    def poke(self) -> None:
        """Room may have appeared: admit waiters from the front while it lasts."""
        waiters = self._waiters
        while waiters:
            w = waiters[0]
            if not w.ready(*w.args):
                return
            waiters.popleft()
            w.done = True
            try:
                w.admit(*w.args)
            except Exception as exc:  # noqa: BLE001 - raised in the waiter (a closed engine)
                w.error = exc
            w.event.set()

    async def wait(self, ready: Any, admit: Any, *args: Any) -> bool:
        """Queue up until it is this caller's turn and ``ready(*args)`` holds, and have
        ``admit(*args)`` run then, with no yield in between (by this caller, or by
        whoever made the room). Returns whether the caller had to wait; raises what
        ``admit`` raised. A caller cancelled before its turn leaves nothing behind;
        one cancelled after its ``admit`` ran has been admitted."""
        w = _Waiter(self._new_event(), ready, admit, args)
        self._waiters.append(w)
        self.poke()
        waited = not w.done
        if waited:
            try:
                await w.event.wait()
            except BaseException:
                if not w.done:
                    self._waiters.remove(w)
                    self.poke()  # the next in line may fit where this one did not
                raise
        if w.error is not None:
            raise w.error
        return waited
