"""The load test (the project's main job): in process with a tiny workload, and as ``python -m``."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys

import pytest

from langgraph.checkpoint.kusto.loadtests import cli, workloads


def _run(argv: list[str]) -> tuple[int, dict, str]:
    out, err = io.StringIO(), io.StringIO()
    code, results = cli.execute(argv, out=out, err=err)
    return code, results, out.getvalue()


@pytest.mark.parametrize("workload", ["graph", "raw"])
def test_tiny_workload_with_baselines_verifies(workload: str) -> None:
    agents, steps = 5, 3
    code, res, text = _run(["--agents", str(agents), "--steps", str(steps), "--workload", workload])

    assert code == 0, text
    assert res["passed"] is True
    assert set(res["results"]) == {"kusto", "memory", "memory-yield", "sqlite"}
    per_thread = res["expected_checkpoints_per_thread"]
    assert per_thread == (5 * steps if workload == "graph" else steps)  # graph: input + 4 supersteps per invoke
    for key, r in res["results"].items():
        v = r["verification"]
        assert r["error"] is None, (key, r.get("traceback"))
        assert r["run_errors"] == 0, r["run_error_samples"]
        assert (v["threads"], v["ok"], v["failed"]) == (agents, agents, 0), v["failures"]
        assert v["checkpoints"] == v["expected_checkpoints"] == agents * per_thread
        assert r["ops"] == agents * steps
        assert r["ops_per_s"] > 0 and r["checkpoints_per_s"] > 0 and r["elapsed_s"] > 0
        assert r["peak_rss_bytes"] > 0
    ours = res["results"]["kusto"]
    assert ours["fresh_reader"] is True
    assert ours["store"]["rows"]["Checkpoints"] == agents * per_thread
    assert ours["engine"]["batches_failed"] == 0 and ours["engine"]["rows_in"] > 0
    assert ours["store_warnings"] == []
    # the agent-state questions, asked of the store the run wrote
    state = ours["store"]["agent_state"]
    assert (state["threads"], state["checkpoints"]) == (agents, agents * per_thread)
    runs = agents * steps if workload == "graph" else 0  # each graph invocation is a run
    assert (state["runs"], state["outcomes"], state["forks"]) == (runs, {"ok": runs} if runs else {}, 0)
    assert set(state["seconds"]) == {"threads", "runs", "forks", "storage", "expiring", "thread_history"}
    assert state["history_rows"] == per_thread and sum(state["bytes_by_table"].values()) > 0
    assert f"agent state: {agents} threads, {agents * per_thread} checkpoints, {runs} runs" in text
    for base in ("memory", "memory-yield", "sqlite"):
        assert res["comparison"][base]["ops_per_s_ratio"] > 0
    assert res["workdir"] is None  # temporary store removed
    assert not os.path.exists(ours["store"]["path"])

    op = "invocations/s" if workload == "graph" else "steps/s"
    assert f"checkpoints written: {agents * per_thread} (expected {agents * per_thread})" in text
    assert f"threads OK {agents}, failed 0" in text
    assert op in text and "checkpoints/s" in text and "peak RSS" in text and "elapsed" in text
    assert "summary (same workload, same process, one saver after another):" in text
    for label in ("AsyncKustoSaver (embedded DuckDB)", "InMemorySaver", "InMemorySaver, reads yield once", "AsyncSqliteSaver"):
        assert label in text
    assert ("compared: AsyncKustoSaver (embedded DuckDB) against 3 other saver(s): InMemorySaver; "
            "InMemorySaver, reads yield once; AsyncSqliteSaver") in text
    assert f"run size: {agents} agents x {steps} steps" in text
    # the goals say the run size they are set for; a run of another size says so
    assert "goal set for" in text and "200 agents x 20 steps" in text and "(other size)" in text
    assert "--json PATH writes these results as JSON" in text
    assert text.rstrip().endswith("RESULT: OK (all 20 threads verified: 5 on each of the 4 savers, "
                                  "each read back and checked message by message)")


def test_failed_verification_exits_non_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    real = workloads.expected_graph_messages

    def wrong(thread_id: str, steps: int, shape: workloads.Shape = workloads.DEFAULT_SHAPE) -> list:
        return real(thread_id, steps, shape)[:-1]  # expect one message fewer than the graph writes

    monkeypatch.setattr(workloads, "expected_graph_messages", wrong)
    code, res, text = _run(["--agents", "2", "--steps", "2", "--no-compare", "-q"])

    assert code == cli.EXIT_FAILED
    assert res["passed"] is False
    v = res["results"]["kusto"]["verification"]
    assert (v["ok"], v["failed"]) == (0, 2)
    assert "8 messages, expected 7" in v["failures"][0]
    assert "RESULT: FAILED" in text and "FAILED lt-" in text


def test_store_and_engine_options(tmp_path) -> None:
    store = str(tmp_path / "mine.duckdb")
    code, res, text = _run(
        ["--agents", "2", "--steps", "2", "--no-compare", "-q", "--store", store,
         "--batch-size", "7", "--flush-interval", "0.01", "-o", "ingest_concurrency=2"]
    )
    assert code == 0, text
    assert set(res["results"]) == {"kusto"}
    assert res["config"]["engine_options"] == {"batch_size": 7, "flush_interval": 0.01, "ingest_concurrency": 2}
    assert "engine options: batch_size=7, flush_interval=0.01, ingest_concurrency=2" in text
    assert os.path.exists(store)  # a store the user named is never removed

    # a second run on the same file: new thread ids, the old rows do not disturb verification
    code, res, text = _run(["--agents", "2", "--steps", "2", "--no-compare", "-q", "--store", store])
    assert code == 0, text
    assert res["results"]["kusto"]["store"]["existed"] is True


def test_gc_threshold_option_reaches_the_engine_and_is_restored() -> None:
    import gc

    before = gc.get_threshold()
    code, res, text = _run(["--agents", "2", "--steps", "2", "--no-compare", "-q", "-o", "gc_threshold=[100000,50,1000]"])
    assert code == 0, text
    assert res["config"]["engine_options"] == {"gc_threshold": [100000, 50, 1000]}
    assert res["results"]["kusto"]["engine_options"] == {"gc_threshold": [100000, 50, 1000]}
    assert gc.get_threshold() == before  # held only while our engine was open


def test_baselines_run_under_the_interpreter_settings_the_engine_options_ask_for() -> None:
    """A baseline compared with ours runs under the same gc thresholds and switch interval."""
    import gc

    from langgraph.checkpoint.kusto.loadtests import runner

    seen: dict[str, tuple] = {}

    class Seen(runner.RunHooks):
        async def opened(self, target, saver) -> None:  # type: ignore[no-untyped-def]
            seen[target.key] = (gc.get_threshold(), sys.getswitchinterval())

    before = (gc.get_threshold(), sys.getswitchinterval())
    asked = ((100000, 50, 1000), 0.001)
    assert before != asked
    cfg = runner.LoadTestConfig(agents=2, steps=2, workload="raw", compare=True, warmup=False,
                                engine_options={"gc_threshold": [100000, 50, 1000], "switch_interval": 0.001})
    res = asyncio.run(runner.run_targets(cfg, hooks=Seen()))
    assert res["passed"]
    assert set(seen) == {"kusto", "memory", "memory-yield", "sqlite"}
    for key, (thresholds, interval) in seen.items():
        assert thresholds == asked[0] and interval == pytest.approx(asked[1]), key
    assert res["interpreter_settings"] == {"gc_threshold": [100000, 50, 1000], "switch_interval": pytest.approx(0.001)}
    assert (gc.get_threshold(), sys.getswitchinterval()) == before  # restored after the run


@pytest.mark.parametrize(
    "argv",
    [["--agents", "0"], ["--steps", "x"], ["--workload", "nope"], ["-o", "no_such_option=1"], ["-o", "batch_size"]],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.execute(argv)
    assert info.value.code == 2


def test_help_states_each_default_once_and_every_ingest_mode(capsys: pytest.CaptureFixture[str]) -> None:
    import re

    from langgraph.checkpoint.kusto.engine.backends.kusto import INGEST_MODES

    with pytest.raises(SystemExit) as info:
        cli.execute(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    # one option's help, whitespace folded: everything from its flag to the next option
    for flag in re.findall(r"^  (-[-\w]+)", text, re.M):
        block = " ".join(text.split(f"\n  {flag}", 1)[1].split("\n  -", 1)[0].split())
        assert block.count("default") <= 1, (flag, block)
        assert "(default: None)" not in block and "(default: False)" not in block and "(default: [])" not in block
    assert "{" + ",".join(INGEST_MODES) + "}" in text
    assert "inline" in INGEST_MODES
    # the goals report: named goals, no outside references
    folded = " ".join(text.split())
    assert "--goals" in text and ">= 0.5x InMemorySaver's" in folded
    from langgraph.checkpoint.kusto.loadtests import reports

    for goal in reports.GOALS.values():  # --help states every goal the reports judge by
        assert f"{goal:g}x" in folded, goal
    for word in ("issue", "acceptance", "ticket", "target"):
        assert word not in text.lower(), word


def test_old_report_names_still_run_the_goals_report() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["--acceptance"]).report == "goals"
    assert parser.parse_args(["--report", "acceptance"]).report == "goals"
    assert parser.parse_args(["--goals"]).report == "goals"


def test_python_dash_m_runs_and_prints_the_summary() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "langgraph.checkpoint.kusto.loadtests", "--agents", "3", "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "graph invocations: 6" in out
    assert "checkpoints written: 30 (expected 30)" in out
    assert "threads OK 3, failed 0" in out
    assert "invocations/s" in out and "checkpoints/s" in out and "peak RSS" in out
    assert "InMemorySaver" in out and "AsyncSqliteSaver" in out
    assert out.rstrip().endswith("RESULT: OK (all 12 threads verified: 3 on each of the 4 savers, "
                                 "each read back and checked message by message)")
    assert "[kusto] verified: 3 OK, 0 failed" in proc.stderr  # progress goes to stderr
