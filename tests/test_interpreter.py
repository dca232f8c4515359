"""Process-wide interpreter settings held while engines are open (engine/interpreter.py):
``switch_interval`` (the thread switch interval) and ``gc_threshold`` (the cyclic
collector's thresholds), on both anyio backends and with the sync saver, restored on
close and on a failed open."""

from __future__ import annotations

import gc
import math
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from langgraph.checkpoint.base import empty_checkpoint

from langgraph.checkpoint.kusto import AsyncKustoSaver, ConfigError, KustoSaver, StorePathError

pytestmark = pytest.mark.anyio

DEFAULT = 0.005


GC_DEFAULT = (700, 10, 10)


@pytest.fixture(autouse=True)
def known_settings() -> Iterator[None]:
    before, gc_before = sys.getswitchinterval(), gc.get_threshold()
    sys.setswitchinterval(DEFAULT)
    gc.set_threshold(*GC_DEFAULT)
    yield
    sys.setswitchinterval(before)
    gc.set_threshold(*gc_before)


def _cfg(thread: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}


async def _round_trip(saver: AsyncKustoSaver, thread: str) -> None:
    cp = empty_checkpoint()
    cp["channel_values"] = {"x": thread}
    cp["channel_versions"] = {"x": "1"}
    await saver.aput(_cfg(thread), cp, {}, {"x": "1"})
    got = await saver.aget_tuple(_cfg(thread))
    assert got is not None and got.checkpoint["channel_values"] == {"x": thread}


async def test_set_while_open_and_restored_on_close() -> None:
    async with AsyncKustoSaver.embedded(switch_interval=0.0005) as saver:
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        await _round_trip(saver, "t")
    assert sys.getswitchinterval() == pytest.approx(DEFAULT)


async def test_unset_leaves_the_interval_alone() -> None:
    sys.setswitchinterval(0.002)
    async with AsyncKustoSaver.embedded() as saver:
        assert sys.getswitchinterval() == pytest.approx(0.002)
        await _round_trip(saver, "t")
    assert sys.getswitchinterval() == pytest.approx(0.002)


async def test_nested_engines_take_the_smallest_and_the_last_close_restores() -> None:
    async with AsyncKustoSaver.embedded(switch_interval=0.001) as outer:
        assert sys.getswitchinterval() == pytest.approx(0.001)
        async with AsyncKustoSaver.embedded(switch_interval=0.0002) as inner:
            assert sys.getswitchinterval() == pytest.approx(0.0002)
            async with AsyncKustoSaver.embedded() as plain:  # no option: changes nothing
                assert sys.getswitchinterval() == pytest.approx(0.0002)
                await _round_trip(plain, "p")
            await _round_trip(inner, "i")
        assert sys.getswitchinterval() == pytest.approx(0.001)
        await _round_trip(outer, "o")
    assert sys.getswitchinterval() == pytest.approx(DEFAULT)


async def test_a_change_made_by_someone_else_while_open_stands() -> None:
    async with AsyncKustoSaver.embedded(switch_interval=0.0005):
        sys.setswitchinterval(0.003)  # the host's own setting, made while the engine runs
        async with AsyncKustoSaver.embedded(switch_interval=0.0001):
            assert sys.getswitchinterval() == pytest.approx(0.003)
    assert sys.getswitchinterval() == pytest.approx(0.003)


async def test_restored_when_the_open_fails(tmp_path: Any) -> None:
    saver = AsyncKustoSaver.embedded(str(tmp_path), switch_interval=0.0005)  # a directory: not a store path
    with pytest.raises(StorePathError):
        async with saver:
            pass
    assert sys.getswitchinterval() == pytest.approx(DEFAULT)
    async with AsyncKustoSaver.embedded(switch_interval=0.001) as ok:  # the bookkeeping is clean
        assert sys.getswitchinterval() == pytest.approx(0.001)
        await _round_trip(ok, "t")
    assert sys.getswitchinterval() == pytest.approx(DEFAULT)


def test_sync_saver_sets_it_from_its_own_loop_thread() -> None:
    with KustoSaver.embedded(switch_interval=0.0005) as saver:
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        cp = empty_checkpoint()
        saver.put(_cfg("s"), cp, {}, {})
        assert saver.get_tuple(_cfg("s")) is not None
    assert sys.getswitchinterval() == pytest.approx(DEFAULT)


@pytest.mark.parametrize("bad", [0, -0.001, math.nan, math.inf, True, "0.001"])
def test_bad_values_are_refused(bad: Any) -> None:
    with pytest.raises(ConfigError, match="switch_interval"):
        AsyncKustoSaver.embedded(switch_interval=bad)


# -- gc_threshold ------------------------------------------------------------------


async def test_gc_threshold_set_while_open_and_restored_on_close() -> None:
    async with AsyncKustoSaver.embedded(gc_threshold=(100_000, 50, 1_000)) as saver:
        assert gc.get_threshold() == (100_000, 50, 1_000)
        assert sys.getswitchinterval() == pytest.approx(DEFAULT)  # the other setting is left alone
        await _round_trip(saver, "t")
    assert gc.get_threshold() == GC_DEFAULT


async def test_gc_threshold_unset_leaves_the_collector_alone() -> None:
    gc.set_threshold(5_000, 20, 30)
    async with AsyncKustoSaver.embedded(switch_interval=0.001) as saver:
        assert gc.get_threshold() == (5_000, 20, 30)
        await _round_trip(saver, "t")
    assert gc.get_threshold() == (5_000, 20, 30)


async def test_nested_engines_take_the_largest_per_generation_and_the_last_close_restores() -> None:
    async with AsyncKustoSaver.embedded(gc_threshold=[50_000, 5, 100]) as outer:  # a list is taken too
        assert outer.options.gc_threshold == (50_000, 5, 100)
        assert gc.get_threshold() == (50_000, 5, 100)
        async with AsyncKustoSaver.embedded(gc_threshold=(10_000, 40, 1_000)) as inner:
            assert gc.get_threshold() == (50_000, 40, 1_000)
            await _round_trip(inner, "i")
        assert gc.get_threshold() == (50_000, 5, 100)
        await _round_trip(outer, "o")
    assert gc.get_threshold() == GC_DEFAULT


async def test_a_gc_change_made_by_someone_else_while_open_stands() -> None:
    async with AsyncKustoSaver.embedded(gc_threshold=(100_000, 50, 1_000)):
        gc.set_threshold(2_000, 10, 10)  # the host's own setting, made while the engine runs
        async with AsyncKustoSaver.embedded(gc_threshold=(200_000, 50, 1_000)):
            assert gc.get_threshold() == (2_000, 10, 10)
    assert gc.get_threshold() == (2_000, 10, 10)


async def test_both_restored_when_the_open_fails(tmp_path: Any) -> None:
    saver = AsyncKustoSaver.embedded(str(tmp_path), switch_interval=0.0005, gc_threshold=(100_000, 50, 1_000))
    with pytest.raises(StorePathError):
        async with saver:
            pass
    assert sys.getswitchinterval() == pytest.approx(DEFAULT)
    assert gc.get_threshold() == GC_DEFAULT


def test_sync_saver_holds_gc_threshold_from_its_own_loop_thread() -> None:
    with KustoSaver.embedded(gc_threshold=(100_000, 50, 1_000)) as saver:
        assert gc.get_threshold() == (100_000, 50, 1_000)
        saver.put(_cfg("s"), empty_checkpoint(), {}, {})
        assert saver.get_tuple(_cfg("s")) is not None
    assert gc.get_threshold() == GC_DEFAULT


@pytest.mark.parametrize(
    "bad", [(0, 10, 10), (700, 10), (700, 10, 10, 10), (700.0, 10, 10), (True, 10, 10), "700,10,10", 700, (700, -1, 10)]
)
def test_bad_gc_thresholds_are_refused(bad: Any) -> None:
    with pytest.raises(ConfigError, match="gc_threshold"):
        AsyncKustoSaver.embedded(gc_threshold=bad)
