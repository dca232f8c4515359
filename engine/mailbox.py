"""Mailboxes and one-shot replies: how actors and callers talk.

A :class:`Mailbox` is a bounded anyio memory object stream plus a small
redelivery queue. It belongs to the engine, not to the actor reading it, so a
restarted actor finds every queued message where it was, and the message it
had in hand when it crashed is put back at the front (once) or failed back.

A :class:`Reply` is a one-shot slot: the sender awaits it, the actor fills it.
A caller cancelled while waiting simply stops waiting; the actor still fills
the slot later and nothing leaks or blocks. The engine keeps the set of
unfilled replies so that, if it fails, every waiter gets the error at once.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Generic, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .errors import EngineClosedError

T = TypeVar("T")


class Reply(Generic[T]):
    __slots__ = ("_event", "_value", "_error", "_registry")

    def __init__(self, registry: set[Reply[Any]] | None = None) -> None:
        self._event = anyio.Event()
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
    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        send, receive = anyio.create_memory_object_stream[Any](size)
        self._send: MemoryObjectSendStream[Any] = send
        self._receive: MemoryObjectReceiveStream[Any] = receive
        self._redeliver: deque[Any] = deque()
        self.closed = False

    async def send(self, msg: Any) -> None:
        try:
            await self._send.send(msg)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise EngineClosedError(f"the {self.name} mailbox is closed") from None

    def send_nowait(self, msg: Any) -> None:
        try:
            self._send.send_nowait(msg)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise EngineClosedError(f"the {self.name} mailbox is closed") from None

    async def receive(self) -> Any:
        """Next message; raises anyio.EndOfStream once closed and drained."""
        if self._redeliver:
            return self._redeliver.popleft()
        return await self._receive.receive()

    def receive_nowait(self) -> Any:
        """Next message or raises anyio.WouldBlock / anyio.EndOfStream."""
        if self._redeliver:
            return self._redeliver.popleft()
        return self._receive.receive_nowait()

    def redeliver(self, msg: Any) -> None:
        self._redeliver.appendleft(msg)

    def depth(self) -> int:
        return self._receive.statistics().current_buffer_used + len(self._redeliver)

    def blocked_senders(self) -> int:
        return self._send.statistics().tasks_waiting_send

    def close(self) -> None:
        """No more sends; the reader drains what is queued, then sees EndOfStream."""
        self.closed = True
        self._send.close()

    def drain(self) -> list[Any]:
        """Take every queued message (used when the engine fails)."""
        out = list(self._redeliver)
        self._redeliver.clear()
        while True:
            try:
                out.append(self._receive.receive_nowait())
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                return out

    def close_receive(self) -> None:
        self._receive.close()
