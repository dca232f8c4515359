"""LangGraph's own conformance suite, on the embedded store: all 8 capabilities."""

from __future__ import annotations

import pytest
from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.conformance.report import ProgressCallbacks

from langgraph.checkpoint.kusto import AsyncKustoSaver

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    # LangGraph's suite is asyncio code; the engine's own tests cover trio
    return "asyncio"


@checkpointer_test(name="AsyncKustoSaver[embedded]")
async def embedded_saver():
    async with AsyncKustoSaver.embedded(":memory:", flush_interval=0.01) as saver:
        yield saver


async def test_conformance_all_capabilities() -> None:
    report = await validate(embedded_saver, progress=ProgressCallbacks.verbose())
    failures = {cap: r.failures for cap, r in report.results.items() if r.failures}
    assert not failures, failures
    detected = sorted(cap for cap, r in report.results.items() if r.detected)
    passed = sorted(cap for cap, r in report.results.items() if r.passed)
    assert len(detected) == 8, detected
    assert passed == detected, (passed, detected)
