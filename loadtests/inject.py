"""``--inject``: per-call latency and errors for the backend, without a cluster.

Syntax: comma-separated ``key=value`` pairs::

    ingest=200ms,query=100ms                    fixed latency per call
    ingest=200ms,query=100ms,dist=lognormal     lognormal around those medians (sigma 0.5)
    ingest=0.2,query=50ms,dist=exponential      exponential with those means
    ingest=200ms,error_rate=0.01                1% transient failures on both kinds of call
    ingest_error_rate=0.05,query_error_rate=0   per kind

Durations take ``us``, ``ms`` or ``s`` (bare numbers are seconds). The plan is
applied by the engine's own
:class:`~langgraph.checkpoint.kusto.engine.backends.faulty.FaultyBackend`, which
sleeps per call (``anyio.sleep``), so injected latency never blocks other calls.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Any

DISTRIBUTIONS = ("fixed", "exponential", "lognormal")
KEYS = ("ingest", "query", "dist", "sigma", "error_rate", "ingest_error_rate", "query_error_rate", "seed")

_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(us|ms|s)?\s*$")


class InjectSpecError(ValueError):
    pass


def parse_duration(text: str) -> float:
    m = _DURATION.match(text)
    if not m:
        raise InjectSpecError(f"not a duration: {text!r} (use e.g. 200ms, 0.2s, 150us)")
    value = float(m.group(1))
    return value * {"us": 1e-6, "ms": 1e-3, "s": 1.0, None: 1.0}[m.group(2)]


def _rate(key: str, text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise InjectSpecError(f"{key} must be a number between 0 and 1, got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise InjectSpecError(f"{key} must be between 0 and 1, got {v}")
    return v


@dataclass
class LognormalLatency:
    """Per-call latency drawn from a lognormal of median ``median`` seconds (a ``Latency`` look-alike)."""

    median: float
    sigma: float = 0.5

    def sample(self, rng: random.Random) -> float:
        return rng.lognormvariate(math.log(self.median), self.sigma) if self.median > 0 else 0.0


@dataclass(frozen=True)
class InjectSpec:
    ingest: float = 0.0
    query: float = 0.0
    dist: str = "fixed"
    sigma: float = 0.5
    ingest_error_rate: float = 0.0
    query_error_rate: float = 0.0
    seed: int = 0

    @property
    def zero(self) -> bool:
        return not (self.ingest or self.query or self.ingest_error_rate or self.query_error_rate)

    def describe(self) -> str:
        parts = [f"ingest={self.ingest * 1000:g}ms", f"query={self.query * 1000:g}ms", f"dist={self.dist}"]
        if self.dist == "lognormal":
            parts.append(f"sigma={self.sigma:g}")
        if self.ingest_error_rate:
            parts.append(f"ingest_error_rate={self.ingest_error_rate:g}")
        if self.query_error_rate:
            parts.append(f"query_error_rate={self.query_error_rate:g}")
        return ",".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ingest_s": self.ingest, "query_s": self.query, "dist": self.dist, "sigma": self.sigma,
            "ingest_error_rate": self.ingest_error_rate, "query_error_rate": self.query_error_rate,
            "spec": self.describe(),
        }

    def _latency(self, seconds: float) -> Any:
        from langgraph.checkpoint.kusto.engine.backends.faulty import Latency

        if self.dist == "exponential":
            return Latency(fixed=0.0, jitter=seconds)
        if self.dist == "lognormal":
            return LognormalLatency(seconds, self.sigma)
        return Latency(fixed=seconds)

    def plan(self) -> Any:
        """The engine's ``FaultPlan`` for this spec."""
        from langgraph.checkpoint.kusto.engine.backends.faulty import FaultPlan

        return FaultPlan(
            ingest_latency=self._latency(self.ingest),
            query_latency=self._latency(self.query),
            ingest_error_rate=self.ingest_error_rate,
            query_error_rate=self.query_error_rate,
        )

    def wrap(self, backend: Any) -> Any:
        """``backend`` behind a FaultyBackend applying this spec."""
        from langgraph.checkpoint.kusto.engine.backends.faulty import FaultyBackend

        return FaultyBackend(backend, self.plan(), seed=self.seed)


def parse_inject(text: str) -> InjectSpec:
    """Parse the ``--inject`` syntax (see the module docstring); raises InjectSpecError."""
    values: dict[str, Any] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, raw = part.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not raw.strip():
            raise InjectSpecError(f"expected key=value, got {part!r}")
        raw = raw.strip()
        if key not in KEYS:
            raise InjectSpecError(f"unknown key {key!r}; known: {', '.join(KEYS)}")
        if key in ("ingest", "query"):
            values[key] = parse_duration(raw)
        elif key == "dist":
            if raw not in DISTRIBUTIONS:
                raise InjectSpecError(f"dist must be one of {', '.join(DISTRIBUTIONS)}, got {raw!r}")
            values["dist"] = raw
        elif key == "sigma":
            try:
                values["sigma"] = float(raw)
            except ValueError:
                raise InjectSpecError(f"sigma must be a number, got {raw!r}") from None
            if not values["sigma"] > 0:
                raise InjectSpecError(f"sigma must be positive, got {raw!r}")
        elif key == "seed":
            try:
                values["seed"] = int(raw)
            except ValueError:
                raise InjectSpecError(f"seed must be an integer, got {raw!r}") from None
        elif key == "error_rate":
            values["ingest_error_rate"] = values["query_error_rate"] = _rate(key, raw)
        else:
            values[key] = _rate(key, raw)
    if not values:
        raise InjectSpecError("empty --inject spec (e.g. ingest=200ms,query=100ms)")
    return InjectSpec(**values)
