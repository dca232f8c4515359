"""OTP-style supervision of the engine's actors.

Children start in order. When one crashes, the supervisor lets it deal with the
message it had in hand (deliver once more, or fail it back to its sender) and
restarts it: alone (``one_for_one``) or together with every child started after
it (``rest_for_one``). More than ``max_restarts`` restarts within
``restart_window`` seconds escalate: the engine fails loudly, every waiting and
later caller gets :class:`EngineFailedError`, and nothing hangs.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio import CancelScope

from .actor import Actor


@dataclass
class ChildSpec:
    name: str
    factory: Callable[[], Actor]
    restarts: int = 0
    scope: CancelScope | None = None
    restart_requested: bool = False
    current: Actor | None = None
    stopped: anyio.Event = field(default_factory=anyio.Event)


def _unwrap(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class Supervisor:
    def __init__(
        self,
        children: list[ChildSpec],
        *,
        strategy: str,
        max_restarts: int,
        window: float,
        on_restart: Callable[[str, BaseException], None],
        on_escalate: Callable[[str, BaseException], None],
    ) -> None:
        self.children = children
        self.strategy = strategy
        self.max_restarts = max_restarts
        self.window = window
        self.on_restart = on_restart
        self.on_escalate = on_escalate
        self._restart_times: deque[float] = deque()
        self._escalated = False
        self._tg: Any = None

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            for index in range(len(self.children)):
                tg.start_soon(self._supervise, index, name=f"actor:{self.children[index].name}")
            task_status.started()

    async def _supervise(self, index: int) -> None:
        child = self.children[index]
        try:
            while not self._escalated:
                actor = child.factory()
                child.current = actor
                scope = anyio.CancelScope()
                child.scope = scope
                try:
                    with scope:
                        await actor.run()
                except Exception as raw:  # noqa: BLE001 - a crash is any exception
                    error = _unwrap(raw)
                    actor.on_crash(error)
                    if self._escalated:
                        return
                    if not self._allow_restart():
                        self._escalated = True
                        self.on_escalate(child.name, error)
                        if self._tg is not None:
                            self._tg.cancel_scope.cancel()
                        return
                    child.restarts += 1
                    self.on_restart(child.name, error)
                    if self.strategy == "rest_for_one":
                        for later in self.children[index + 1 :]:
                            later.restart_requested = True
                            if later.scope is not None:
                                later.scope.cancel()
                    continue
                if scope.cancelled_caught and child.restart_requested:
                    # restarted together with an earlier sibling (rest_for_one)
                    child.restart_requested = False
                    actor.on_crash(RuntimeError("restarted with an earlier sibling"))
                    continue
                return
        finally:
            child.stopped.set()

    def _allow_restart(self) -> bool:
        now = time.monotonic()
        while self._restart_times and now - self._restart_times[0] > self.window:
            self._restart_times.popleft()
        if len(self._restart_times) >= self.max_restarts:
            return False
        self._restart_times.append(now)
        return True

    def cancel(self) -> None:
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
