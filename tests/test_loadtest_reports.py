"""The load tool's reports, outputs and options: real runs at tiny sizes, no mocks.

Timing figures are not asserted (speed is measured by the tool, not by unit
tests); what is asserted is that each figure is there, has the right shape, and
that what must hold by construction holds (injected latency is at least what
was injected, buffered bytes never exceed the bound, every thread verifies).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import statistics
import time

import anyio
import pytest

from langgraph.checkpoint.kusto import EngineConfig
from langgraph.checkpoint.kusto.loadtests import cli, reports, runner
from langgraph.checkpoint.kusto.loadtests.display import PlainProgress, RichProgress, progress_display
from langgraph.checkpoint.kusto.loadtests.inject import InjectSpecError, LognormalLatency, parse_inject

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--agents", "3", "--steps", "2"]


def _run(argv: list[str]) -> tuple[int, dict, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code, results = cli.execute(argv, out=out, err=err)
    return code, results, out.getvalue(), err.getvalue()


def _assert_png(path: str) -> None:
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.shape[0] > 100 and img.shape[1] > 100


def _assert_dist(d: dict, unit: str = "_ms") -> None:
    assert d["count"] > 0
    for k in ("min", "mean", "p50", "p95", "p99", "max"):
        assert isinstance(d[k + unit], float)
    assert d["min" + unit] <= d["p50" + unit] <= d["p95" + unit] <= d["p99" + unit] <= d["max" + unit]


def test_run_writes_json_with_every_figure_and_a_png(tmp_path) -> None:
    js, png = str(tmp_path / "r.json"), str(tmp_path / "r.png")
    code, res, text, _ = _run([*TINY, "--workload", "raw", "--json", js, "--plot", png, "-q"])
    assert code == 0, text
    with open(js) as f:
        data = json.load(f)
    assert data["report"] == "run"
    assert set(data["results"]) == {"kusto", "memory", "memory-yield", "sqlite"}
    for key, r in data["results"].items():
        assert r["ops_per_s"] > 0 and r["checkpoints_per_s"] > 0 and r["peak_rss_bytes"] > 0
        for op in ("aget_tuple", "aput", "aput_writes", "step"):
            _assert_dist(r["latency_ms"][op])
        assert r["latency_ms"]["aput"]["count"] == 3 * 2
    ours = data["results"]["kusto"]
    b = ours["backend"]
    assert b["batch_rows"]["count"] > 0 and b["batch_rows"]["mean"] >= 1
    _assert_dist(b["visibility_lag_ms"])
    _assert_dist(b["calls_ms"]["ingest"])
    assert ours["engine"]["retries"] == 0 and sum(ours["engine"]["restarts"].values()) == 0
    names = [c["name"] for c in data["checks"]]
    assert "raw: ours vs InMemorySaver checkpoints/s" in names and "raw: ours vs AsyncSqliteSaver checkpoints/s" in names
    for c in data["checks"]:
        assert c["ratio"] > 0 and c["ours"]["value"] > 0 and c["base"]["value"] > 0
    _assert_png(png)
    # the final tables
    assert "latency per operation, as the caller sees it" in text
    assert "rows/batch mean/p50/p99" in text and "visibility lag p50/p99 ms" in text and "retries" in text
    assert f"results written to {js}" in text and f"plot written to {png}" in text


@pytest.mark.parametrize(
    ("workload", "extra"),
    [("graph", ["--fanout", "3", "--no-growth", "--payload-bytes", "200"]), ("raw", ["--fanout", "2", "--payload-bytes", "3000"])],
)
def test_workload_shapes_verify_on_every_saver(workload: str, extra: list[str]) -> None:
    code, res, text, _ = _run([*TINY, "--workload", workload, *extra, "-q"])
    assert code == 0, text
    assert all(r["verification"]["failed"] == 0 for r in res["results"].values())
    assert res["config"]["fanout"] == int(extra[1])
    if workload == "raw":
        # one aput_writes call per tool: fanout of them per step
        assert res["results"]["kusto"]["latency_ms"]["aput_writes"]["count"] == 3 * 2 * 2


def test_sweep_recommends_settings_and_plots(tmp_path) -> None:
    png, js = str(tmp_path / "s.png"), str(tmp_path / "s.json")
    code, res, text, _ = _run(
        [*TINY, "--workload", "raw", "--sweep", "--sweep-param", "batch_size=5,50", "--sweep-param", "agents=2,3",
         "--sweep-param", "ingest_concurrency=1,2", "--plot", png, "--json", js, "-q"]
    )
    assert code == 0, text
    assert res["report"] == "sweep" and res["mode"] == "oat"
    seen = {(p["settings"]["batch_size"], p["settings"]["agents"], p["settings"]["ingest_concurrency"]) for p in res["points"]}
    c = EngineConfig().ingest_concurrency  # the unswept settings are the defaults
    assert {(5, 3, c), (50, 3, c), (500, 2, c), (500, 3, 1), (500, 3, 2)} <= seen
    assert all(p["throughput"] > 0 and p["p99_ms"] > 0 for p in res["points"])
    rec = res["recommendation"]
    assert rec["settings"]["batch_size"] in (5, 50, 500) and rec["settings"]["ingest_concurrency"] in (1, 2, c)
    assert "agents" not in rec["settings"]
    assert res["saturation"]["agents"] in (2, 3)
    assert "RECOMMENDED: batch_size=" in text and "SATURATION:" in text
    _assert_png(png)
    assert json.load(open(js))["recommendation"] == rec


def test_sweep_of_the_switch_interval_runs_each_value_and_restores_the_interval(tmp_path) -> None:
    import sys

    before = sys.getswitchinterval()
    png = str(tmp_path / "s.png")
    code, res, text, _ = _run(
        [*TINY, "--workload", "raw", "--sweep", "--sweep-param", "switch_interval=0.001,0.0005", "--rounds", "2",
         "--plot", png, "-q"]
    )
    assert code == 0, text
    assert res["rounds"] == 2 and all(len(p["round_throughputs"]) == 2 for p in res["points"])
    seen = [p["settings"]["switch_interval"] for p in res["points"]]
    assert seen == [before, 0.001, 0.0005]  # the interpreter's own interval, then each value
    runs = [r for k, r in res["runs"].items() if k != "confirm"]
    options = [next(iter(r["results"].values()))["engine_options"].get("switch_interval") for r in runs]
    assert options == [before, 0.001, 0.0005]
    assert res["recommendation"]["settings"]["switch_interval"] in (before, 0.001, 0.0005)
    assert sys.getswitchinterval() == before
    _assert_png(png)


def test_sweep_rounds_run_every_point_each_round_in_alternating_order() -> None:
    import asyncio

    cfg = runner.LoadTestConfig(agents=3, steps=2, workload="raw", compare=False)
    started: list[str] = []

    def on_event(e: dict) -> None:
        if e["event"] == "start":
            started.append(e["target"])

    res = asyncio.run(reports.report_sweep(cfg, on_event, grids={"batch_size": [5, 50]}, rounds=3, confirm=False))
    keys = [reports._sweep_point_key(p["settings"]) for p in res["points"]]
    assert len(keys) == 3  # the default (500), then 5 and 50
    assert started == keys + keys[::-1] + keys
    for p in res["points"]:
        rates = p["round_throughputs"]
        assert len(rates) == 3 and all(r > 0 for r in rates)
        assert p["throughput"] == sorted(rates)[1]  # the median run's figures
    assert res["rounds"] == 3 and res["passed"]
    text = "\n".join(cli.format_sweep(res))
    assert "median throughput of 3 interleaved rounds" in text
    with pytest.raises(ValueError, match="rounds"):
        asyncio.run(reports.report_sweep(cfg, grids={"batch_size": [5]}, rounds=0))


def test_recommend_picks_highest_throughput_within_the_latency_slack() -> None:
    pts = [
        {"settings": {"batch_size": 10}, "throughput": 100.0, "p99_ms": 10.0},
        {"settings": {"batch_size": 100}, "throughput": 300.0, "p99_ms": 14.0},
        {"settings": {"batch_size": 1000}, "throughput": 500.0, "p99_ms": 40.0},
    ]
    assert reports.recommend(pts, 1.5, ["batch_size"])["settings"] == {"batch_size": 100}
    assert reports.recommend(pts, 5.0, ["batch_size"])["settings"] == {"batch_size": 1000}
    assert reports.recommend([], 1.5, ["batch_size"]) is None


def test_injected_latency_slows_every_backend_call_and_hiding_reports_the_ratio() -> None:
    code, res, text, _ = _run(
        [*TINY, "--workload", "raw", "--latency-hiding", "--inject", "ingest=80ms,query=30ms", "--rounds", "2", "-q"]
    )
    assert code == 0, text
    assert sorted(res["runs"]) == ["round 1", "round 2"]
    for run in res["runs"].values():
        slow = run["results"]["kusto-injected"]["backend"]["calls_ms"]
        zero = run["results"]["kusto-0ms"]["backend"]["calls_ms"]
        assert slow["ingest"]["min_ms"] >= 80.0 and slow["query"]["min_ms"] >= 30.0
        assert slow["ingest"]["p50_ms"] > zero["ingest"]["p50_ms"]
        # both runs use the same engine options, and say so
        assert run["results"]["kusto-0ms"]["engine_options"] == run["results"]["kusto-injected"]["engine_options"]
    (c,) = res["checks"]
    assert c["goal"] == 0.8 and c["ratio"] > 0
    # the goal says the run size it is set for; this tiny run is not that size, and says so
    assert c["goal_at"].startswith("graph workload, 200 agents x 20 steps") and c["at_goal_size"] is False
    # the ratio is the median of each round's own ratio; the figures are medians over the rounds
    rounds = [r["results"] for r in res["runs"].values()]
    per_round = [r["kusto-injected"]["ops_per_s"] / r["kusto-0ms"]["ops_per_s"] for r in rounds]
    assert c["ratio"] == pytest.approx(statistics.median(per_round))
    assert c["ours"]["value"] == pytest.approx(statistics.median(r["kusto-injected"]["ops_per_s"] for r in rounds))
    # the second round runs the variants in reverse order
    assert [next(iter(r)) for r in rounds] == ["kusto-0ms", "kusto-injected"]
    assert "latency hiding (raw, ingest=80ms,query=30ms,dist=fixed)" in text
    assert c["note"].startswith("both runs with the same engine options")
    assert "median of 2 interleaved rounds' ratios" in c["note"]


def test_faulty_backend_sleeps_per_call_without_blocking_others() -> None:
    from langgraph.checkpoint.kusto.engine.backends.embedded import EmbeddedBackend

    async def main() -> float:
        backend = parse_inject("ingest=200ms,query=200ms").wrap(EmbeddedBackend(":memory:"))
        await backend.open()
        try:
            t0 = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for _ in range(10):
                    tg.start_soon(backend.query, "Checkpoints | count", {})
                    tg.start_soon(backend.ingest, "Checkpoints", [])
            return time.perf_counter() - t0
        finally:
            await backend.close()

    elapsed = anyio.run(main)
    assert 0.2 <= elapsed < 1.0  # 20 calls of 200 ms each, concurrently: not 4 s


def test_inject_syntax() -> None:
    s = parse_inject("ingest=200ms,query=0.1,dist=lognormal,sigma=0.3,error_rate=0.01,seed=3")
    assert (s.ingest, s.query, s.dist, s.sigma, s.seed) == (0.2, 0.1, "lognormal", 0.3, 3)
    assert s.ingest_error_rate == s.query_error_rate == 0.01
    plan = s.plan()
    assert isinstance(plan.ingest_latency, LognormalLatency) and plan.ingest_error_rate == 0.01
    assert parse_inject("ingest=150us").ingest == pytest.approx(150e-6)
    exp = parse_inject("query=50ms,dist=exponential").plan().query_latency
    assert (exp.fixed, exp.jitter) == (0.0, 0.05)
    import random

    rng = random.Random(0)
    samples = sorted(LognormalLatency(0.1, 0.5).sample(rng) for _ in range(2001))
    assert 0.09 < samples[1000] < 0.11  # the median is the given latency
    for bad, msg in [("ingest", "expected key=value"), ("ingest=fast", "not a duration"), ("latency=1s", "unknown key"),
                     ("dist=pareto", "dist must be one of"), ("error_rate=2", "between 0 and 1"), ("", "empty")]:
        with pytest.raises(InjectSpecError, match=msg):
            parse_inject(bad)


def test_memory_bound_report_keeps_buffered_bytes_under_the_bound() -> None:
    bound = 2 * 2**20
    code, res, text, _ = _run(
        ["--agents", "6", "--steps", "3", "--workload", "raw", "--report", "memory-bound",
         "--memory-bound-bytes", "2MiB", "-q"]
    )
    assert code == 0, text
    s = res["stall"]
    assert s["idle_rss_bytes"] > 0 and s["peak_rss_bytes"] >= s["idle_rss_bytes"]
    assert 0 < s["max_buffered_bytes"] <= bound
    first, second = res["checks"]
    assert first["passed"] is True and first["base"]["value"] == bound
    assert second["ours"]["value"] == s["rss_growth_bytes"]
    assert res["runs"]["stalled"]["results"]["kusto-stalled"]["verification"]["failed"] == 0
    assert "stalled backend: idle RSS" in text


def test_telemetry_report_collects_spans_and_metrics_only_when_on() -> None:
    code, res, text, _ = _run([*TINY, "--workload", "raw", "--report", "telemetry", "--rounds", "3", "-q"])
    assert code == 0, text
    assert sorted(res["runs"]) == ["round 1", "round 2", "round 3"]
    run = res["runs"]["round 3"]["results"]
    assert "telemetry" not in run["kusto-otel-off"]
    metrics_only = run["kusto-otel-metrics"]["telemetry"]
    assert metrics_only["spans"] == 0 and metrics_only["mode"] == "metrics"
    assert metrics_only["metric_points"] > 0 and "db.client.operation.duration" in metrics_only["metrics"]
    traced = run["kusto-otel-traces"]["telemetry"]
    assert traced["spans"] >= 3 * 2 * 3  # a span per saver call at least
    sampled = run["kusto-otel-sampled"]["telemetry"]
    assert sampled["spans"] < traced["spans"]
    metrics_check, traces_check, sampled_check = res["checks"]
    assert metrics_check["goal"] == 0.9 and metrics_check["passed"] is not None
    assert metrics_check["goal_at"] == "raw workload, 200 agents x 20 steps"
    assert metrics_check["run_at"] == "raw workload, 3 agents x 2 steps"
    assert traces_check["passed"] is None and sampled_check["passed"] is None  # reported, not judged
    offs = [r["results"]["kusto-otel-off"]["checkpoints_per_s"] for r in res["runs"].values()]
    assert metrics_check["base"]["value"] == pytest.approx(statistics.median(offs))
    # the ratio is the median of each round's own ratio (a drift moves both sides of a round)
    per_round = [r["results"]["kusto-otel-metrics"]["checkpoints_per_s"] / r["results"]["kusto-otel-off"]["checkpoints_per_s"]
                 for r in res["runs"].values()]
    assert metrics_check["ratio"] == pytest.approx(statistics.median(per_round))
    # every other round runs the variants in reverse order
    firsts = [next(iter(r["results"])) for r in res["runs"].values()]
    assert firsts[0] == "kusto-otel-off" and firsts[1] == "kusto-otel-sampled" and firsts[2] == "kusto-otel-off"


def test_durability_report_covers_every_mode_the_engine_accepts() -> None:
    from langgraph.checkpoint.kusto.engine.config import DURABILITY_MODES

    code, res, text, _ = _run([*TINY, "--workload", "raw", "--report", "durability", "-q"])
    assert code == 0, text
    assert [t["mode"] for t in res["table"]] == list(DURABILITY_MODES)
    for t in res["table"]:
        assert t["throughput"] > 0 and t["p99_aput_ms"] > 0 and t["error"] is None
    (c,) = res["checks"]
    if "spool" in DURABILITY_MODES:
        assert c["ratio"] is not None
    else:
        assert c["passed"] is None and "no 'spool' yet" in c["note"]
    assert "durability modes (engine accepts:" in text


def test_scale_report_reports_both_sizes() -> None:
    code, res, text, _ = _run([*TINY, "--workload", "raw", "--report", "scale", "--scale-agents", "7", "--rounds", "1",
                               "--no-isolate", "-q"])
    assert code == 0, text
    assert res["agents"] == [3, 7] and res["fresh_processes"] is False
    assert {r["pid"] for r in res["runs"].values()} == {os.getpid()}
    assert res["rss"]["small"]["peak_rss_bytes"] > 0 and res["rss"]["large"]["peak_rss_bytes"] > 0
    large = res["runs"]["7_agents"]["results"]["kusto-7-agents"]
    assert large["verification"]["threads"] == 3  # a sample as large as the small run
    assert large["store"]["rows"]["Checkpoints"] == 7 * 2
    # throughput counts every checkpoint written, not only the sampled threads'
    assert large["checkpoints_per_s"] == pytest.approx(7 * 2 / large["elapsed_s"])
    small = res["runs"]["3_agents"]["results"]["kusto-3-agents"]
    assert small["checkpoints_per_s"] == pytest.approx(3 * 2 / small["elapsed_s"])
    assert "sampled threads verified" in text
    for r in (small, large):  # the garbage collector's share, measured over the write phase
        assert 0 <= r["gc_s"] <= r["cpu_s"] + 0.5 and len(r["gc_collections"]) == 3
    assert "GC " in res["checks"][0]["note"] and "full collections" in res["checks"][0]["note"]
    # for reference, the yielding InMemorySaver at both sizes, every thread of its own verified
    floor = res["checks"][1]
    assert floor["name"].startswith("scale, InMemorySaver, reads yield once") and floor["passed"] is None
    fl = res["runs"]["7_agents"]["results"]["memory-yield"]
    fs = res["runs"]["3_agents"]["results"]["memory-yield"]
    assert fl["verification"]["ok"] == 3 and fs["verification"]["ok"] == 3 and fl["ops"] == 7 * 2
    assert floor["ratio"] == pytest.approx(fl["checkpoints_per_s"] / fs["checkpoints_per_s"])
    # and ours against it at each size: how our own cost scales, the interpreter's taken out
    ours_l = res["runs"]["7_agents"]["results"]["kusto-7-agents"]["checkpoints_per_s"] / fl["checkpoints_per_s"]
    ours_s = small["checkpoints_per_s"] / fs["checkpoints_per_s"]
    rel = res["checks"][2]
    assert rel["name"] == "scale, ours / InMemorySaver, reads yield once: at 7 agents / at 3" and rel["passed"] is None
    assert rel["ours"]["value"] == pytest.approx(ours_l) and rel["base"]["value"] == pytest.approx(ours_s)
    assert rel["ratio"] == pytest.approx(ours_l / ours_s)
    assert "x the yielding InMemorySaver (7 agents)" in text


def test_scale_report_judges_the_median_of_interleaved_rounds() -> None:
    code, res, text, _ = _run([*TINY, "--workload", "raw", "--report", "scale", "--scale-agents", "7",
                               "--rounds", "3", "--no-compare", "-q"])
    assert code == 0, text
    assert res["rounds"] == 3 and res["fresh_processes"] is True
    # every run in a Python process of its own (--isolate, the default), none of them this one
    pids = [r["pid"] for r in res["runs"].values()]
    assert len(set(pids)) == 6 and os.getpid() not in pids
    assert set(res["runs"]) == {"3_agents", "7_agents", "3_agents, round 2", "7_agents, round 2",
                                "3_agents, round 3", "7_agents, round 3"}
    assert list(res["runs"])[2:4] == ["7_agents, round 2", "3_agents, round 2"]  # every other round reversed

    def cps(n: int, name: str) -> float:
        return res["runs"][name]["results"][f"kusto-{n}-agents"]["checkpoints_per_s"]

    ratios = [cps(7, f"7_agents{s}") / cps(3, f"3_agents{s}") for s in ("", ", round 2", ", round 3")]
    (c,) = res["checks"]
    assert c["ratio"] == pytest.approx(statistics.median(ratios))
    assert c["ours"]["value"] == pytest.approx(statistics.median(cps(7, n) for n in res["runs"] if n.startswith("7")))
    assert c["note"].startswith("median of 3 interleaved rounds' ratios")
    # peak RSS from round 1, where the small size ran first in the process
    assert res["rss"]["small"]["peak_rss_bytes"] == res["runs"]["3_agents"]["results"]["kusto-3-agents"]["peak_rss_bytes"]
    assert res["rss"]["large"]["peak_rss_bytes"] == res["runs"]["7_agents"]["results"]["kusto-7-agents"]["peak_rss_bytes"]


def test_scale_runs_in_fresh_processes_pass_their_events_on() -> None:
    events: list[dict] = []
    cfg = runner.LoadTestConfig(agents=2, steps=2, workload="raw", warmup=False)
    res = asyncio.run(reports.report_scale(cfg, events.append, large_agents=4, rounds=1, fresh_processes=True))
    assert res["passed"] is True
    every_target = sorted(["kusto-2-agents", "memory-yield", "kusto-4-agents", "memory-yield"])
    for kind in ("start", "written", "verified"):
        assert sorted(e["target"] for e in events if e["event"] == kind) == every_target, kind
    pids = {res["runs"]["2_agents"]["pid"], res["runs"]["4_agents"]["pid"], os.getpid()}
    assert len(pids) == 3


def test_run_with_rounds_judges_in_memory_saver_on_the_median_of_paired_ratios() -> None:
    code, res, text, _ = _run([*TINY, "--workload", "raw", "--rounds", "3", "-q"])
    assert code == 0, text
    assert set(res["results"]) == {"kusto", "memory", "memory-yield", "sqlite"}  # the tables: round 1, every baseline
    rounds = res["rounds"]
    assert sorted(rounds) == ["round 1", "round 2", "round 3"]
    for r in rounds.values():
        assert set(r["results"]) == {"kusto", "memory", "memory-yield"}
    # the later rounds alternate which saver goes first; round 1 ran ours first
    assert [next(iter(r["results"])) for r in rounds.values()] == ["kusto", "memory-yield", "kusto"]
    by_name = {c["name"]: c for c in res["checks"]}
    mem = by_name["raw: ours vs InMemorySaver checkpoints/s"]
    per_round = [r["results"]["kusto"]["checkpoints_per_s"] / r["results"]["memory"]["checkpoints_per_s"]
                 for r in rounds.values()]
    assert mem["ratio"] == pytest.approx(statistics.median(per_round))
    assert mem["base"]["value"] == pytest.approx(
        statistics.median(r["results"]["memory"]["checkpoints_per_s"] for r in rounds.values()))
    assert "median of 3 interleaved rounds' ratios" in mem["note"]
    # the yielding InMemorySaver: judged nowhere, its ratio over the same rounds
    floor = by_name["raw: ours vs InMemorySaver, reads yield once checkpoints/s"]
    assert floor["passed"] is None and floor["goal"] is None and "floor" in floor["note"]
    assert floor["ratio"] == pytest.approx(statistics.median(
        r["results"]["kusto"]["checkpoints_per_s"] / r["results"]["memory-yield"]["checkpoints_per_s"] for r in rounds.values()))
    # the SQLite baseline ran once: its ratio is round 1's
    sq = by_name["raw: ours vs AsyncSqliteSaver checkpoints/s"]
    assert sq["ratio"] == pytest.approx(res["results"]["kusto"]["checkpoints_per_s"] / res["results"]["sqlite"]["checkpoints_per_s"])
    assert res["passed"] is True


def test_goals_report_runs_every_section_in_its_own_process(tmp_path) -> None:
    js, png = str(tmp_path / "a.json"), str(tmp_path / "a.png")
    code, res, text, _ = _run(
        [*TINY, "--goals", "--scale-agents", "5", "--memory-bound-bytes", "2MiB",
         "--json", js, "--plot", png, "-q"]
    )
    assert code == 0, text
    data = json.load(open(js))
    assert data["report"] == "goals"
    assert list(data["sections"]) == list(reports.GOAL_SECTIONS)
    assert all(s["exit_code"] == 0 and s["passed"] for s in data["sections"].values())
    by_section = {c["section"] for c in data["checks"]}
    assert by_section == set(reports.GOAL_SECTIONS)
    for c in data["checks"]:
        assert {"name", "ratio", "goal", "goal_at", "run_at", "passed", "ours", "base"} <= set(c)
    judged = [c for c in data["checks"] if c["passed"] is not None]
    assert data["checks_passed"] + data["checks_failed"] == len(judged) >= 8
    # the raw and graph sections judge InMemorySaver over rounds, in their own processes too
    for c in data["checks"]:
        if c["section"] in ("raw", "graph") and "InMemorySaver" in c["name"]:
            assert f"median of {reports.DEFAULT_COMPARE_ROUNDS} interleaved rounds' ratios" in c["note"], c
    assert data["verified"] is True
    assert f"GOALS: {data['checks_passed']} of {len(judged)} met" in text and "#### section scale" in text
    assert "goal set for" in text and "(other size)" in text  # a tiny run, judged against goals set for 200 x 20
    _assert_png(png)


def test_non_tty_progress_is_plain_lines_and_a_tty_gets_the_live_display() -> None:
    code, res, text, err = _run([*TINY, "--no-compare"])
    assert code == 0
    assert "[kusto] running 6 steps on AsyncKustoSaver (embedded DuckDB) ..." in err
    assert "[kusto] verified: 3 OK, 0 failed" in err
    assert "\x1b[" not in err and "\x1b[" not in text  # no terminal escapes in logs

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(progress_display(io.StringIO()), PlainProgress)
    assert progress_display(io.StringIO(), "none") is None
    tty = Tty()
    live = progress_display(tty)
    assert isinstance(live, RichProgress)
    live({"event": "start", "target": "k", "label": "our saver", "ops": 10})
    live({"event": "progress", "target": "k", "done": 5, "total": 10, "elapsed_s": 1.0})
    live({"event": "written", "target": "k", "ops": 10, "elapsed_s": 2.0})
    live.close()
    assert "our saver" in tty.getvalue()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--inject", "ingest=fast"], "not a duration"),
        (["--inject", "speed=1"], "unknown key"),
        (["--sweep-param", "colour=1,2"], "NAME one of batch_size"),
        (["--sweep-param", "batch_size=0"], "must be at least 1"),
        (["--memory-bound-bytes", "lots"], "not a size"),
        (["--cluster-uri", "https://x.kusto.windows.net"], "--cluster-uri needs --database"),
        (["--json", "/no/such/dir/r.json"], "no such directory"),
        (["-o", "durability=sometimes"], "durability must be one of"),
        (["--report", "nope"], "invalid choice"),
        (["--fanout", "0"], "must be at least 1"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.execute(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(
    not os.environ.get("KUSTO_LOADTEST_POSTGRES_URL"),
    reason="set KUSTO_LOADTEST_POSTGRES_URL (e.g. postgresql://user:pw@localhost/db) to run the Postgres baseline",
)
def test_postgres_baseline_runs_with_its_setup() -> None:
    url = os.environ["KUSTO_LOADTEST_POSTGRES_URL"]
    code, res, text, _ = _run([*TINY, "--workload", "raw", "--postgres-url", url, "-q"])
    assert code == 0, text
    pg = res["results"]["postgres"]
    assert pg["verification"]["ok"] == 3 and pg["latency_ms"]["aput"]["count"] == 6
    assert "AsyncPostgresSaver" in text and "ours vs AsyncPostgresSaver" in text
    assert ":pg@" not in json.dumps(pg["store"]) or "***" in json.dumps(pg["store"])


def test_config_rejects_a_store_with_a_cluster() -> None:
    cfg = runner.LoadTestConfig(cluster_uri="https://x", database="d", store="f.duckdb")
    with pytest.raises(ValueError, match="cannot be combined"):
        cfg.validate()


def test_fsync_counter_is_found_wherever_the_engine_reports_it() -> None:
    assert reports.fsync_count({"rows_in": 3, "restarts": {"batcher": 0}}) is None
    assert reports.fsync_count({"fsyncs": 12}) == 12
    assert reports.fsync_count({"spool": {"bytes": 5, "fsync_count": 7}}) == 7


@pytest.mark.parametrize("yielding", [False, True])
def test_yielding_in_memory_saver_gives_the_loop_one_turn_per_read_and_reads_the_same(yielding: bool) -> None:
    import asyncio

    from langgraph.checkpoint.base import empty_checkpoint
    from langgraph.checkpoint.memory import InMemorySaver

    async def main() -> tuple[list[str], object, object]:
        saver = runner.yielding_memory_saver() if yielding else InMemorySaver()
        cfg = {"configurable": {"thread_id": "t", "checkpoint_ns": ""}}
        ckpt = empty_checkpoint()
        ckpt["channel_values"] = {"messages": ["hi"]}
        ckpt["channel_versions"] = {"messages": saver.get_next_version(None, None)}
        await saver.aput(cfg, ckpt, {"source": "input", "step": -1}, ckpt["channel_versions"])
        ran: list[str] = []

        async def other() -> None:
            ran.append("other")

        task = asyncio.get_running_loop().create_task(other())
        tup = await saver.aget_tuple(cfg)
        seen = list(ran)
        await task
        return seen, tup, saver.get_tuple(cfg)

    seen, got, direct = asyncio.run(main())
    # InMemorySaver returns without letting another task run; the yielding one lets it run once
    assert seen == (["other"] if yielding else [])
    assert got == direct and got.checkpoint["channel_values"] == {"messages": ["hi"]}
