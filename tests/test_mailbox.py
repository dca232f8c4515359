"""The mailbox on both anyio backends: FIFO, the bound, all-or-nothing sends under
cancellation, closing, and the room check the put fast path relies on."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from langgraph.checkpoint.kusto import EngineClosedError
from langgraph.checkpoint.kusto.engine.mailbox import Admission, Mailbox

pytestmark = pytest.mark.anyio


async def test_fifo_and_bound() -> None:
    box = Mailbox("t", 3)
    for i in range(3):
        assert box.has_room()
        box.send_nowait(i)
    assert not box.has_room()
    with pytest.raises(anyio.WouldBlock):
        box.send_nowait(3)
    assert [await box.receive() for _ in range(3)] == [0, 1, 2]
    assert box.depth() == 0


async def test_blocked_sender_resumes_when_the_reader_makes_room() -> None:
    box = Mailbox("t", 1)
    box.send_nowait("a")
    done = anyio.Event()

    async def sender() -> None:
        await box.send("b")
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(sender)
        await anyio.wait_all_tasks_blocked()
        assert box.blocked_senders() == 1 and not done.is_set()
        assert await box.receive() == "a"
        await done.wait()
    assert await box.receive() == "b"


async def test_cancelled_send_is_all_or_nothing() -> None:
    """Cancelled while blocked: the message is absent and the send raised. Cancelled in
    the instant the reader made room: either that, or the send returned and it is there."""
    for cancel_after_room in (False, True):
        box = Mailbox("t", 1)
        box.send_nowait("a")
        outcome: list[str] = []
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:

                async def sender() -> None:
                    try:
                        await box.send("x")
                        outcome.append("sent")
                    except anyio.get_cancelled_exc_class():
                        outcome.append("cancelled")
                        raise

                tg.start_soon(sender)
                await anyio.wait_all_tasks_blocked()
                if cancel_after_room:
                    assert await box.receive() == "a"
                scope.cancel()
        queued = box.drain()
        if outcome == ["sent"]:
            assert queued[-1:] == ["x"]
        else:
            assert outcome == ["cancelled"] and "x" not in queued
        assert box.blocked_senders() == 0


async def test_room_given_to_a_cancelled_sender_is_not_lost() -> None:
    """The reader wakes the first waiting sender, which is cancelled before it runs:
    the room must pass on to the second one, which would otherwise wait forever."""
    box = Mailbox("t", 1)
    box.send_nowait("a")
    first = anyio.CancelScope()
    outcome: list[str] = []

    async def first_sender() -> None:
        with first:
            await box.send("x")
            outcome.append("x sent")

    async def second_sender() -> None:
        await box.send("y")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(first_sender)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(second_sender)
            await anyio.wait_all_tasks_blocked()
            assert box.blocked_senders() == 2
            first.cancel()  # the first sender is cancelled, and before it runs...
            assert await box.receive() == "a"  # ...the reader gives it the room
            got = [await box.receive()]
            if got == ["x"]:  # it had already taken the room: its send completed
                got.append(await box.receive())
    assert got[-1] == "y" and ("x" in got) == (outcome == ["x sent"])
    assert box.depth() == 0 and box.blocked_senders() == 0


async def test_close_drains_then_ends_and_refuses_sends() -> None:
    box = Mailbox("t", 4)
    box.send_nowait(1)
    box.close()
    with pytest.raises(EngineClosedError):
        box.send_nowait(2)
    assert not box.has_room()
    assert await box.receive() == 1
    with pytest.raises(anyio.EndOfStream):
        await box.receive()


async def test_close_receive_fails_blocked_senders() -> None:
    box = Mailbox("t", 1)
    box.send_nowait(1)
    errors: list[BaseException] = []

    async def sender() -> None:
        try:
            await box.send(2)
        except EngineClosedError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(sender)
        await anyio.wait_all_tasks_blocked()
        assert box.drain() == [1]
        box.close_receive()
    assert len(errors) == 1


async def test_a_busy_reader_yields_to_other_tasks(turns: Any) -> None:
    n = 5 * Mailbox.YIELD_EVERY + 10
    box = Mailbox("t", n)
    for i in range(n):
        box.send_nowait(i)
    async with anyio.create_task_group() as tg:
        tg.start_soon(turns.run)
        await anyio.sleep(0)
        start = turns.count
        for _ in range(n):
            await box.receive()
        assert turns.count - start >= n // Mailbox.YIELD_EVERY - 1
        tg.cancel_scope.cancel()


# -- the admission queue (Engine.put waits there for room, then takes the fast path) --


async def queue_up(tg: Any, put: Any, *calls: tuple[Any, ...]) -> None:
    """Start one waiter per ``calls`` entry, each queued behind the one before."""
    for args in calls:
        tg.start_soon(put, *args)
        await anyio.wait_all_tasks_blocked()


async def test_admission_admits_in_arrival_order_as_room_appears() -> None:
    box = Mailbox("t", 2)
    gate = Admission()
    box.on_room = gate.poke
    admitted: list[int] = []

    def admit(i: int) -> None:
        box.send_nowait(i)  # no yield since the room check: it cannot fail
        admitted.append(i)

    async def put(i: int) -> None:
        await gate.wait(lambda _i: box.has_room(), admit, i)

    box.send_nowait(-2)
    box.send_nowait(-1)
    async with anyio.create_task_group() as tg:
        for i in range(5):
            tg.start_soon(put, i)
            await anyio.wait_all_tasks_blocked()  # each queues behind the one before
        assert len(gate) == 5 and admitted == []
        for _ in range(7):
            await box.receive()  # each message taken makes room for exactly one waiter
            await anyio.wait_all_tasks_blocked()
            assert box.depth() <= 2
    assert admitted == [0, 1, 2, 3, 4] and len(gate) == 0


async def test_admission_one_poke_admits_every_waiter_there_is_room_for() -> None:
    # the poke runs each admitted waiter's admit itself: a queue of thousands drains
    # as far as the room goes at once, not one waiter per pass of the event loop
    gate = Admission()
    room = [0]
    admitted: list[int] = []
    woke: list[int] = []

    def admit(i: int) -> None:
        room[0] -= 1
        admitted.append(i)

    async def put(i: int) -> None:
        waited = await gate.wait(lambda _i: room[0] > 0, admit, i)
        woke.append(i)
        assert waited

    async with anyio.create_task_group() as tg:
        for i in range(6):
            tg.start_soon(put, i)
            await anyio.wait_all_tasks_blocked()
        room[0] = 4
        gate.poke()
        assert admitted == [0, 1, 2, 3] and woke == [] and len(gate) == 2  # before any waiter ran
        await anyio.wait_all_tasks_blocked()
        assert sorted(woke) == [0, 1, 2, 3]  # the order the backend resumes them in is its own
        room[0] = 2
        gate.poke()
    assert admitted == sorted(woke) == [0, 1, 2, 3, 4, 5] and len(gate) == 0
    # with nobody waiting and room there, a caller is admitted at once and does not wait
    room[0] = 1
    assert await gate.wait(lambda _i: room[0] > 0, admit, 6) is False and admitted[-1] == 6


async def test_admission_a_waiter_cancelled_after_its_admit_ran_stays_admitted() -> None:
    gate = Admission()
    room = [0]
    admitted: list[str] = []
    finished: list[str] = []

    async def put(name: str, scope: anyio.CancelScope) -> None:
        with scope:
            await gate.wait(lambda _n: room[0] > 0, lambda n: (admitted.append(n), room.__setitem__(0, room[0] - 1)), name)
            finished.append(name)

    first, second = anyio.CancelScope(), anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        await queue_up(tg, put, ("first", first), ("second", second))
        room[0] = 1
        gate.poke()  # admits "first" only: its admit ran, it has not resumed yet
        first.cancel()
        second.cancel()  # still queued: leaves nothing behind
        await anyio.wait_all_tasks_blocked()
    # "first" was admitted whole (it may still see its wait return: the wake came first);
    # "second" was not, and nothing is left queued
    assert admitted == ["first"] and "second" not in finished and len(gate) == 0 and room[0] == 0


def full_box_with_a_gate() -> tuple[Mailbox, Admission]:
    """A full one-slot mailbox whose room wakes an admission queue."""
    box = Mailbox("t", 1)
    gate = Admission()
    box.on_room = gate.poke
    box.send_nowait("full")
    return box, gate


async def test_admission_a_cancelled_waiter_passes_its_turn_on_and_leaves_nothing() -> None:
    box, gate = full_box_with_a_gate()
    admitted: list[str] = []

    def admit(name: str) -> None:
        box.send_nowait(name)
        admitted.append(name)

    async def put(name: str, scope: anyio.CancelScope | None = None) -> None:
        with scope or anyio.CancelScope():
            await gate.wait(lambda _n: box.has_room(), admit, name)

    head, middle = anyio.CancelScope(), anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        await queue_up(tg, put, ("head", head), ("middle", middle), ("last",))
        middle.cancel()
        await anyio.wait_all_tasks_blocked()
        assert len(gate) == 2
        head.cancel()  # the first in line leaves: "last" is first now
        await anyio.wait_all_tasks_blocked()
        assert len(gate) == 1 and admitted == []
        assert await box.receive() == "full"  # room: "last" is admitted
        await anyio.wait_all_tasks_blocked()
    assert admitted == ["last"] and len(gate) == 0
    assert await box.receive() == "last"


async def test_admission_wakes_waiters_when_the_mailbox_closes() -> None:
    box, gate = full_box_with_a_gate()
    errors: list[BaseException] = []

    async def put() -> None:
        try:
            await gate.wait(lambda: box.has_room() or box.closed, lambda: box.send_nowait("x"))
        except EngineClosedError as exc:  # raised by the send, in the waiter
            errors.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(put)
            await anyio.wait_all_tasks_blocked()
            box.close()
    assert len(errors) == 3 and len(gate) == 0


# -- direct dispatch: a parked reader's handler runs in the sender's task --


class DirectReader:
    """A reader that takes ints directly (in the sender's task) and queues anything else;
    it records which task handled each message."""

    def __init__(self, box: Mailbox) -> None:
        self.box = box
        self.handled: list[tuple[Any, str, str]] = []  # (message, how, task)
        box.direct = self.direct

    def direct(self, msg: Any) -> bool:
        if not isinstance(msg, int):
            return False
        self.handled.append((msg, "direct", anyio.get_current_task().name))
        if msg == 99:  # a handler that sends to its own mailbox
            self.box.send_nowait(100)
        return True

    async def serve(self, n: int) -> None:
        for _ in range(n):
            msg = await self.box.receive()
            self.handled.append((msg, "queued", anyio.get_current_task().name))

    async def park(self, tg: Any, n: int) -> None:
        """Serve ``n`` queued messages in a task of ``tg``; return once it waits in receive()."""
        tg.start_soon(self.serve, n, name="reader")
        await anyio.wait_all_tasks_blocked()


async def test_direct_dispatch_runs_in_the_senders_task_while_the_reader_is_parked() -> None:
    box = Mailbox("t", 4)
    reader = DirectReader(box)
    box.send_nowait(1)  # nobody waits in receive(): queued
    assert box.depth() == 1
    async with anyio.create_task_group() as tg:
        await reader.park(tg, 2)  # the reader took 1 and is parked again
        box.send_nowait(2)
        # handled before send_nowait returned, by this task, and nothing queued
        assert reader.handled[-1] == (2, "direct", anyio.get_current_task().name)
        assert box.depth() == 0
        tg.cancel_scope.cancel()
    assert [(m, how) for m, how, _ in reader.handled] == [(1, "queued"), (2, "direct")]


async def test_direct_dispatch_never_overtakes_a_queued_message() -> None:
    """A message the reader declines is queued; everything after it queues behind it until
    the reader has drained the mailbox, so FIFO order holds."""
    box = Mailbox("t", 8)
    reader = DirectReader(box)
    async with anyio.create_task_group() as tg:
        await reader.park(tg, 4)
        box.send_nowait("declined")  # queued, the reader woken but not run yet
        box.send_nowait(3)  # could be handled directly, but "declined" is ahead of it
        box.send_nowait(4)
        assert box.depth() == 3 and reader.handled == []
        await anyio.wait_all_tasks_blocked()
        box.send_nowait(5)  # drained and parked again: direct
        tg.cancel_scope.cancel()
    assert [(m, how) for m, how, _ in reader.handled] == [
        ("declined", "queued"), (3, "queued"), (4, "queued"), (5, "direct")
    ]


async def test_a_send_from_inside_a_direct_handler_is_queued_not_nested() -> None:
    box = Mailbox("t", 4)
    reader = DirectReader(box)
    async with anyio.create_task_group() as tg:
        await reader.park(tg, 1)
        box.send_nowait(99)  # its handler sends 100 to the same mailbox
        assert [(m, how) for m, how, _ in reader.handled] == [(99, "direct")]
        assert box.depth() == 1
    assert [(m, how) for m, how, _ in reader.handled] == [(99, "direct"), (100, "queued")]


async def test_no_direct_dispatch_to_a_full_closed_or_cancelled_reader() -> None:
    box = Mailbox("t", 1)
    reader = DirectReader(box)
    async with anyio.create_task_group() as tg:
        await reader.park(tg, 1)
        tg.cancel_scope.cancel()  # the parked reader is cancelled...
    box.send_nowait(1)  # ...so it no longer counts as parked: queued
    assert box.depth() == 1 and reader.handled == []
    with pytest.raises(anyio.WouldBlock):
        box.send_nowait(2)
    box.close()
    with pytest.raises(EngineClosedError):
        box.send_nowait(3)
    assert reader.handled == []
