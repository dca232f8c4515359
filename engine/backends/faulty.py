"""A backend decorator that injects latency, failures and stalls.

Wraps any real backend (the embedded store in tests and load runs). It is how
the engine's tests reach the failure paths with the real store underneath, and
how the load tool shows, without a cluster, what batching and the query cache
hide of a remote store's latency.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from ..errors import PermanentBackendError, TransientBackendError
from .base import Backend


@dataclass
class Latency:
    """Per-call latency in seconds: ``fixed`` plus an exponential part of mean ``jitter``."""

    fixed: float = 0.0
    jitter: float = 0.0

    def sample(self, rng: random.Random) -> float:
        extra = rng.expovariate(1.0 / self.jitter) if self.jitter > 0 else 0.0
        return self.fixed + extra


@dataclass
class FaultPlan:
    ingest_latency: Latency = field(default_factory=Latency)
    query_latency: Latency = field(default_factory=Latency)
    #: probability that an ingest / query call fails with a transient error
    ingest_error_rate: float = 0.0
    query_error_rate: float = 0.0
    #: fail the next N ingest calls (transient unless permanent=True)
    fail_next_ingests: int = 0
    fail_permanently: bool = False
    #: fail the next N control commands (compaction's ``.delete``) permanently
    fail_next_commands: int = 0


class FaultyBackend:
    def __init__(self, inner: Backend, plan: FaultPlan | None = None, *, seed: int = 0) -> None:
        self.inner = inner
        self.plan = plan or FaultPlan()
        self.name = inner.name
        self.database = getattr(inner, "database", "")
        self._rng = random.Random(seed)
        self._open_gate: anyio.Event | None = None
        self.ingest_calls = 0
        self.query_calls = 0
        self.injected_failures = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    # -- stalls ------------------------------------------------------------

    def stall(self) -> None:
        """From now on, ingest calls wait until :meth:`resume` (the backend stops answering)."""
        if self._open_gate is None:
            self._open_gate = anyio.Event()

    def resume(self) -> None:
        gate, self._open_gate = self._open_gate, None
        if gate is not None:
            gate.set()

    async def _gate(self) -> None:
        while self._open_gate is not None:
            await self._open_gate.wait()

    # -- protocol ----------------------------------------------------------

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        self.resume()
        await self.inner.close()

    async def ingest(self, table: str, rows: Sequence[Mapping[str, Any]]) -> None:
        self.ingest_calls += 1
        await self._gate()
        delay = self.plan.ingest_latency.sample(self._rng)
        if delay:
            await anyio.sleep(delay)
        if self.plan.fail_next_ingests > 0:
            self.plan.fail_next_ingests -= 1
            self.injected_failures += 1
            if self.plan.fail_permanently:
                raise PermanentBackendError(f"injected permanent failure ingesting into {table}")
            raise TransientBackendError(f"injected transient failure ingesting into {table}")
        if self.plan.ingest_error_rate and self._rng.random() < self.plan.ingest_error_rate:
            self.injected_failures += 1
            raise TransientBackendError(f"injected transient failure ingesting into {table}")
        await self.inner.ingest(table, rows)

    async def query(self, kql: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        self.query_calls += 1
        delay = self.plan.query_latency.sample(self._rng)
        if delay:
            await anyio.sleep(delay)
        if self.plan.query_error_rate and self._rng.random() < self.plan.query_error_rate:
            self.injected_failures += 1
            raise TransientBackendError("injected transient query failure")
        return await self.inner.query(kql, params)

    async def command(self, kql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        if self.plan.fail_next_commands > 0:
            self.plan.fail_next_commands -= 1
            self.injected_failures += 1
            raise PermanentBackendError(f"injected failure of a control command: {kql[:40]!r}")
        return await self.inner.command(kql, params)
