"""Command line: ``python -m langgraph.checkpoint.kusto.loadtests`` / ``kusto-checkpoint-loadtest``.

Parses the arguments, runs the chosen report (:mod:`.reports`), prints it as
plain text on stdout, writes it as JSON (``--json``) and a PNG (``--plot``).
Progress goes to stderr: a live display on a terminal, plain lines otherwise.
Exits non-zero if any thread could not be verified or a saver failed (and, with
``--strict``, if the goals report finds a goal missed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from langgraph.checkpoint.kusto.engine.backends.kusto import INGEST_MODES

from ..engine.errors import KustoCheckpointError
from . import agent_state, reports, runner
from .display import mib, num, progress_display, table, xr
from .inject import InjectSpecError, parse_inject
from .workloads import PAYLOAD_SIZE, WORKLOADS

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

#: defaults of --agents / --steps: a quick run, and the size the goals are set for
RUN_DEFAULTS = (100, 10)
GOALS_DEFAULTS = reports.GOAL_SIZE


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {v}")
    return v


_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmg]i?b?|b)?\s*$", re.I)


def _size(text: str) -> int:
    """Bytes: 33554432, 32MiB, 32MB (both 2**20), 512KiB, 1GiB."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 32MiB, 65536)")
    unit = (m.group(2) or "b").lower()[0]
    v = int(float(m.group(1)) * {"b": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit])
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return v


def _engine_option(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw  # a bare string, e.g. durability=ingested
    return key.strip().replace("-", "_"), value


def _inject(text: str) -> str:
    try:
        parse_inject(text)
    except InjectSpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _sweep_param(text: str) -> tuple[str, list[Any]]:
    name, sep, raw = text.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or name not in reports.SWEEP_PARAMS:
        raise argparse.ArgumentTypeError(
            f"expected NAME=V1,V2,... with NAME one of {', '.join(reports.SWEEP_PARAMS)}, got {text!r}"
        )
    conv = _positive_float if name in ("flush_interval", "switch_interval") else _positive_int
    values = [conv(v.strip()) for v in raw.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"no values for {name}")
    return name, values


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each default once: argparse adds "(default: X)" only where the help does not
    already say it and there is a default to state (not None, a flag's False, or [])."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.default == []:
            return text
        return super()._get_help_string(action)


def _report_name(text: str) -> str:
    return reports.REPORT_ALIASES.get(text, text)


def _goals_text() -> str:
    """The goals, as ``--help`` states them (from :data:`.reports.GOALS`)."""
    g = {k: f"{v:g}x" for k, v in reports.GOALS.items()}
    return (
        "The comparisons and their goals (ours / the other figure, measured in the same process): "
        f"raw: >= {g['raw-memory']} InMemorySaver's and >= {g['raw-sqlite']} AsyncSqliteSaver's checkpoints/s; "
        f"graph: >= {g['graph-memory']} InMemorySaver's invocations/s; latency-hiding: >= {g['latency-hiding']} "
        f"the throughput without injected latency; scale: >= {g['scale']} from {GOALS_DEFAULTS[0]:,} to "
        f"{reports.DEFAULT_SCALE_AGENTS:,} agents; memory-bound: buffered bytes <= {g['memory-buffered']} and "
        f"RSS growth <= {g['memory-rss']} max_buffered_bytes; telemetry: >= {g['telemetry']} with the "
        f"OpenTelemetry SDK's metrics; durability: spool >= {g['durability']} memory. Each goal is set for "
        f"{reports.sizes(*GOALS_DEFAULTS)} (scale: up to {reports.DEFAULT_SCALE_AGENTS:,} agents); a run of "
        "another size is judged against it all the same, and says so."
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kusto-checkpoint-loadtest",
        description=(
            "Load test of the Kusto checkpointer (embedded DuckDB store by default, or a cluster): "
            "many concurrent LangGraph agents, every thread read back and verified, compared with "
            "LangGraph's own savers in the same run. Reports: run (default), sweep, latency-hiding, "
            "scale, memory-bound, telemetry, durability, goals (every comparison that has a goal, "
            f"at the run size the goals are set for: {reports.sizes(*GOALS_DEFAULTS)})."
        ),
        epilog=_goals_text(),
        formatter_class=_HelpFormatter,
    )
    what = p.add_argument_group("what to run")
    what.add_argument("--report", choices=reports.REPORTS, type=_report_name, default="run", help="which report")
    what.add_argument("--sweep", dest="report", action="store_const", const="sweep", help="same as --report sweep")
    what.add_argument("--latency-hiding", dest="report", action="store_const", const="latency-hiding",
                      help="same as --report latency-hiding")
    what.add_argument("--goals", dest="report", action="store_const", const="goals",
                      help="same as --report goals: every comparison that has a goal, each section in its own process")
    what.add_argument("--acceptance", dest="report", action="store_const", const="goals", help=argparse.SUPPRESS)

    wl = p.add_argument_group("workload")
    wl.add_argument("--agents", type=_positive_int, help=f"concurrent agents, one thread each (default: {RUN_DEFAULTS[0]}; goals report {GOALS_DEFAULTS[0]})")
    wl.add_argument("--steps", type=_positive_int, help=f"steps per agent: graph invokes or raw rounds (default: {RUN_DEFAULTS[1]}; goals report {GOALS_DEFAULTS[1]})")
    wl.add_argument("--workload", choices=WORKLOADS, default="graph",
                    help="graph: a compiled StateGraph (agent -> tools -> finish), one ainvoke per step; "
                    "raw: aget_tuple + aput + aput_writes per step on the saver directly")
    wl.add_argument("--payload-bytes", type=_positive_int, default=PAYLOAD_SIZE, help="size of each tool result / pending write")
    wl.add_argument("--fanout", type=_positive_int, default=1, help="parallel tool calls per step (graph: parallel nodes; raw: aput_writes calls)")
    wl.add_argument("--growth", action=argparse.BooleanOptionalAction, default=True,
                    help="the message list grows every step (--no-growth: only the latest step is kept)")

    store = p.add_argument_group("our saver")
    store.add_argument("--store", metavar="PATH", help="DuckDB file for our saver (default: a temporary file, removed at the end)")
    store.add_argument("--keep", action="store_true", help="keep the temporary store files and print where they are")
    store.add_argument("--cluster-uri", metavar="URI", help="an Azure Data Explorer cluster instead of the embedded store (azure-identity credentials)")
    store.add_argument("--database", metavar="DB", help="the cluster's database (with --cluster-uri)")
    store.add_argument("--ingest-mode", choices=INGEST_MODES, default="streaming",
                       help="with --cluster-uri: how rows reach Kusto (inline: for the Kusto emulator)")
    store.add_argument("--batch-size", type=_positive_int, help="engine option batch_size (rows per table that trigger a batch)")
    store.add_argument("--flush-interval", type=_positive_float, help="engine option flush_interval (seconds a row may wait)")
    store.add_argument("--ingest-concurrency", type=_positive_int, help="engine option ingest_concurrency (batches sent at once)")
    store.add_argument("-o", "--engine-option", action="append", type=_engine_option, default=[], metavar="KEY=VALUE",
                       help="any other engine option, e.g. -o durability=ingested (repeatable)")
    store.add_argument("--inject", type=_inject, metavar="SPEC",
                       help="latency/errors per backend call, e.g. ingest=200ms,query=100ms[,dist=fixed|exponential|lognormal]"
                       "[,sigma=0.5][,error_rate=0.01|ingest_error_rate=..|query_error_rate=..]; "
                       f"latency-hiding default: {reports.DEFAULT_HIDING_INJECT}")

    base = p.add_argument_group("baselines")
    base.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                      help="also run the workload on InMemorySaver, AsyncSqliteSaver (and AsyncPostgresSaver with --postgres-url)")
    base.add_argument("--postgres-url", metavar="URL",
                      help="PostgreSQL URL: AsyncPostgresSaver (after its setup()) joins the baselines")
    base.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                      help="read every thread back through a fresh saver and check it")
    base.add_argument("--verify-sample", type=_positive_int, metavar="N",
                      help="verify only N threads spread over all of them (default: every thread; "
                      "the scale report's large run verifies as many as its small run)")

    rep = p.add_argument_group("reports")
    rep.add_argument("--sweep-param", action="append", type=_sweep_param, default=[], metavar="NAME=V1,V2,..",
                     help=f"sweep only these (repeatable; NAME: {', '.join(reports.SWEEP_PARAMS)}); default grids: "
                     + "; ".join(f"{k}={','.join(map(str, v))}" for k, v in reports.SWEEP_DEFAULTS.items())
                     + f" ({', '.join(reports.SWEEP_OPTIONAL)}: only when named)")
    rep.add_argument("--sweep-mode", choices=("oat", "grid"), default="oat",
                     help="oat: one parameter at a time around the current settings; grid: every combination")
    rep.add_argument("--sweep-slack", type=_positive_float, default=1.5,
                     help="recommend the highest throughput whose p99 step latency is within this factor of the best p99")
    rep.add_argument("--sweep-confirm", action=argparse.BooleanOptionalAction, default=True,
                     help="oat: run the combined recommendation once to confirm it")
    rep.add_argument("--scale-agents", type=_positive_int, default=reports.DEFAULT_SCALE_AGENTS,
                     help="scale: the large agent count (compared with --agents)")
    rep.add_argument("--memory-bound-bytes", type=_size, default=reports.DEFAULT_MEMORY_BOUND,
                     help="memory-bound: max_buffered_bytes for the stalled-backend run (e.g. 32MiB)")
    rep.add_argument("--rounds", "--telemetry-rounds", dest="rounds", type=_positive_int, metavar="N",
                     help="latency-hiding, scale and telemetry: interleaved rounds of every variant (scale: of both "
                     "agent counts), the order reversed every other round; each ratio is the median of the rounds' own "
                     "ratios; sweep: every point N times, the points' order reversed every other round, each point's "
                     "figures from its run with the median throughput; run (with the baselines): ours and InMemorySaver "
                     "N-1 more times, the InMemorySaver ratio their median (default: "
                     f"{reports.DEFAULT_HIDING_ROUNDS} for latency-hiding, {reports.DEFAULT_SCALE_ROUNDS} for scale, "
                     f"{reports.DEFAULT_TELEMETRY_ROUNDS} for telemetry, {reports.DEFAULT_COMPARE_ROUNDS} in the goals "
                     "report's raw and graph sections, 1 otherwise)")
    rep.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                     help="goals: run each section in a fresh Python process (clean RSS figures); "
                     "scale: each run (one agent count, one round) in a fresh Python process, so that no run "
                     "inherits another's heap")
    rep.add_argument("--strict", action="store_true", help="goals: exit 1 when a goal is missed")

    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", help="write the results as JSON (every figure printed, and more)")
    out.add_argument("--plot", metavar="PATH", help="write a PNG plot of the results (throughput and latency per saver; "
                     "sweep: throughput and latency per setting; goals: each ratio against its goal)")
    out.add_argument("--progress", choices=("auto", "rich", "plain", "none"), default="auto",
                     help="live progress on stderr: auto = a live display on a terminal, plain lines otherwise")
    out.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr (same as --progress none)")
    return p


def config_from_args(args: argparse.Namespace) -> runner.LoadTestConfig:
    options: dict[str, Any] = dict(args.engine_option)
    for name in ("batch_size", "flush_interval", "ingest_concurrency"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    defaults = GOALS_DEFAULTS if args.report == "goals" else RUN_DEFAULTS
    return runner.LoadTestConfig(
        agents=args.agents or defaults[0],
        steps=args.steps or defaults[1],
        workload=args.workload,
        store=args.store,
        keep=args.keep,
        compare=args.compare,
        engine_options=options,
        payload_bytes=args.payload_bytes,
        fanout=args.fanout,
        growth=args.growth,
        postgres_url=args.postgres_url,
        cluster_uri=args.cluster_uri,
        database=args.database,
        ingest_mode=args.ingest_mode,
        inject=args.inject,
        verify=args.verify,
        verify_sample=args.verify_sample,
    )


def child_argv(args: argparse.Namespace, cfg: runner.LoadTestConfig) -> list[str]:
    """Arguments a goals section's process gets (the same sizes and options)."""
    argv = ["--agents", str(cfg.agents), "--steps", str(cfg.steps), "--payload-bytes", str(cfg.payload_bytes),
            "--fanout", str(cfg.fanout), "--growth" if cfg.growth else "--no-growth",
            "--verify" if cfg.verify else "--no-verify",
            *(["--verify-sample", str(cfg.verify_sample)] if cfg.verify_sample else []),
            "--scale-agents", str(args.scale_agents), "--memory-bound-bytes", str(args.memory_bound_bytes),
            *(["--rounds", str(args.rounds)] if args.rounds else []),
            "--progress", "none" if args.quiet else args.progress]
    for k, v in cfg.engine_options.items():
        argv += ["-o", f"{k}={json.dumps(v)}"]
    if cfg.postgres_url:
        argv += ["--postgres-url", cfg.postgres_url]
    if cfg.cluster_uri:
        argv += ["--cluster-uri", cfg.cluster_uri, "--database", cfg.database or "", "--ingest-mode", cfg.ingest_mode]
    if cfg.inject:
        argv += ["--inject", cfg.inject]
    return argv


# -- formatting -------------------------------------------------------------------


def _workload_line(cfg: dict[str, Any]) -> str:
    fan = cfg.get("fanout", 1)
    if cfg["workload"] == "graph":
        tools = "tool" if fan == 1 else f"{fan} parallel tools"
        text = f"graph (StateGraph agent -> {tools} -> finish, one ainvoke per step)"
    else:
        text = "raw (aget_tuple + aput + aput_writes per step)" if fan == 1 else f"raw (aget_tuple + aput + {fan} x aput_writes per step)"
    growth = "growing message list" if cfg.get("growth", True) else "latest step only"
    return f"{text}; {cfg.get('payload_bytes', PAYLOAD_SIZE)} B tool results, {growth}"


def format_report(res: dict[str, Any]) -> list[str]:
    """One run (a :func:`.runner.run_targets` dict) as plain lines."""
    cfg = res["config"]
    lines: list[str] = []
    env = res["environment"]
    labels = [r["label"] for r in res["results"].values()]
    lines.append("langgraph-checkpoint-kusto load test")
    if len(labels) > 1:
        lines.append(f"compared: {labels[0]} against {len(labels) - 1} other saver(s): {'; '.join(labels[1:])} "
                     "(the same workload on each, one saver after another in this process)")
    else:
        lines.append(f"saver: {', '.join(labels)}")
    lines.append(f"workload: {_workload_line(cfg)}")
    lines.append(f"run size: {cfg['agents']} agents x {cfg['steps']} steps, all agents concurrent, one thread each")
    opts = ", ".join(f"{k}={v}" for k, v in sorted(cfg["engine_options"].items())) or "defaults"
    lines.append(f"engine options: {opts}")
    if cfg.get("inject"):
        lines.append(f"injected into our backend calls: {cfg['inject']}")
    lines.append(
        f"python {env['python']} on {env['cpus']} CPUs; langgraph {env['versions'].get('langgraph')}, "
        f"duckdb {env['versions'].get('duckdb')}"
    )
    for r in res["results"].values():
        lines.append("")
        lines.extend(_format_saver(r, res))
    lines.append("")
    lines.extend(format_summary_tables(res))
    lines.append("")
    if res.get("checks"):
        lines += [f"ours against the other savers, with the goals this tool sets "
                  f"(this run: {reports.sizes(cfg['agents'], cfg['steps'])}):",
                  *format_checks(res["checks"]), ""]
    if res.get("workdir"):
        lines.append(f"store files kept in: {res['workdir']}")
    lines.append(f"total time: {res['total_s']:.1f} s, process peak RSS: {mib(res['process_peak_rss_bytes'])}")
    lines.append(result_line(res))
    return lines


def result_line(res: dict[str, Any]) -> str:
    failed = [r["label"] for r in res["results"].values() if not r["passed"]]
    if failed:
        return f"RESULT: FAILED ({', '.join(failed)})"
    if not res["config"].get("verify", True):
        return "RESULT: OK (not verified: --no-verify)"
    per_saver = [r["verification"]["threads"] for r in res["results"].values()]
    threads, n = sum(per_saver), len(per_saver)
    savers = "1 saver" if n == 1 else f"each of the {n} savers"
    if res["config"].get("verify_sample") and res["config"]["verify_sample"] < res["config"]["agents"]:
        return (f"RESULT: OK ({threads} sampled threads verified, every checkpoint row present; "
                f"{res['config']['verify_sample']} of {res['config']['agents']} on {savers})")
    if len(set(per_saver)) == 1 and n > 1:
        return (f"RESULT: OK (all {threads} threads verified: {per_saver[0]} on {savers}, "
                "each read back and checked message by message)")
    return f"RESULT: OK (all {threads} threads verified, each read back and checked message by message)"


def _format_saver(r: dict[str, Any], res: dict[str, Any]) -> list[str]:
    lines = [f"== {r['label']} =="]
    if r.get("ops") is None:
        lines.append(f"  ERROR: {r['error']}")
        return lines
    op = r["op_label"]
    op_title = "graph invocations" if op == "invocations" else "raw steps"
    lines.append(f"  {op_title}: {r['ops']}  ->  {r['ops_per_s']:.1f} {op}/s")
    v = r.get("verification")
    if v is not None:
        lines.append(
            f"  checkpoints written: {v['checkpoints']} (expected {v['expected_checkpoints']})  ->  "
            f"{r['checkpoints_per_s']:.1f} checkpoints/s"
        )
    lines.append(
        f"  elapsed: {r['elapsed_s']:.2f} s (run {r['run_s']:.2f} s + flush {r['flush_s']:.2f} s); "
        f"open {r['open_s']:.2f} s, close {r['close_s']:.2f} s"
    )
    lines.append(f"  peak RSS: {mib(r['peak_rss_bytes'])} (at start {mib(r['rss_start_bytes'])})")
    if r["run_errors"]:
        lines.append(f"  agent errors: {r['run_errors']}")
        lines.extend(f"    {e}" for e in r["run_error_samples"])
    if v is not None:
        how = "a fresh saver on the same store" if r["fresh_reader"] else "the same saver (nothing to reopen)"
        lines.append(
            f"  verified through {how} in {r['verify_s']:.2f} s: "
            f"threads OK {v['ok']}, failed {v['failed']}, messages read {v['messages']}"
        )
        lines.extend(f"    FAILED {f}" for f in v["failures"])
    store = r.get("store") or {}
    if store.get("path"):
        where = store["path"] + (" [temporary, removed]" if store.get("temporary") and not res.get("workdir") else "")
        rows = ", ".join(f"{k} {n}" for k, n in (store.get("rows") or {}).items())
        lines.append(f"  store: {where}, {mib(store['file_bytes'])}" + (f"; rows: {rows}" if rows else ""))
    if store.get("agent_state"):
        lines.extend(agent_state.lines(store["agent_state"]))
    for w in r.get("store_warnings") or []:
        lines.append(f"  WARNING: {w}")
    eng = r.get("engine")
    if eng:
        restarts = sum(eng.get("restarts", {}).values())
        lines.append(
            f"  engine: rows_in {eng.get('rows_in')}, batches_ok {eng.get('batches_ok')}, "
            f"batches_failed {eng.get('batches_failed')}, retries {eng.get('retries')}, restarts {restarts}, "
            f"cache hits {eng.get('cache_hits')} / misses {eng.get('cache_misses')}, "
            f"peak batcher {mib(eng.get('peak_batcher_bytes'))}"
        )
    tel = r.get("telemetry")
    if tel:
        lines.append(f"  telemetry: {tel['spans']} spans, {tel['metric_points']} metric points from {len(tel['metrics'])} instruments ({tel['hook']})")
    inj = r.get("inject")
    if inj:
        lines.append(f"  injected: {inj['spec']}; injected failures {inj.get('injected_failures', 0)}")
    if r.get("error"):
        lines.append(f"  ERROR: {r['error']}")
    return lines


def format_summary_tables(res: dict[str, Any]) -> list[str]:
    """Throughput per saver, latency per operation, and what our engine did."""
    results = res["results"]
    op = next((r["op_label"] for r in results.values() if r.get("op_label")), "ops")
    lines = ["summary (same workload, same process, one saver after another):"]
    rows = []
    for key, r in results.items():
        if r.get("ops") is None:
            rows.append([r["label"], "ERROR", "", "", "", "", ""])
            continue
        v = r.get("verification")
        verified = f"{v['ok']}/{v['threads']}" if v else "-"
        ratio = "-" if key not in res.get("comparison", {}) else xr(res["comparison"][key].get("ops_per_s_ratio"))
        rows.append([r["label"], num(r["ops_per_s"]), num(r.get("checkpoints_per_s")), f"{r['elapsed_s']:.2f}",
                     mib(r["peak_rss_bytes"]), verified, ratio])
    lines += table(["saver", f"{op}/s", "checkpoints/s", "elapsed s", "peak RSS", "verified", "ours vs it"], rows)
    if res.get("comparison"):
        lines.append("(elapsed = run + flush: everything stored; 'ours vs it' = our throughput / its throughput)")

    lines += ["", "latency per operation, as the caller sees it (ms; step = one ainvoke / one raw round):"]
    rows = []
    for r in results.values():
        for name, d in (r.get("latency_ms") or {}).items():
            if d.get("count"):
                rows.append([r["label"], name, str(d["count"]), num(d["p50_ms"], ".3f"), num(d["p95_ms"], ".3f"),
                             num(d["p99_ms"], ".3f"), num(d["max_ms"], ".2f")])
    lines += table(["saver", "operation", "count", "p50", "p95", "p99", "max"], rows, "llrrrrr")

    ours = [r for r in results.values() if r.get("backend")]
    if ours:
        lines += ["", "our engine (backend calls as the engine made them):"]
        rows = []
        for r in ours:
            b, eng = r["backend"], r.get("engine") or {}
            br, lag = b["batch_rows"], b["visibility_lag_ms"]
            ing = (b["calls_ms"].get("ingest") or {})
            restarts = sum((eng.get("restarts") or {}).values())
            rows.append([
                r["label"], str(br.get("count", 0)),
                f"{num(br.get('mean'), '.0f')}/{num(br.get('p50'), '.0f')}/{num(br.get('p99'), '.0f')}",
                f"{num(ing.get('p50_ms'), '.1f')}/{num(ing.get('p99_ms'), '.1f')}",
                f"{num(lag.get('p50_ms'), '.1f')}/{num(lag.get('p99_ms'), '.1f')}",
                str(eng.get("retries", "n/a")), str(restarts), mib(eng.get("peak_batcher_bytes")),
            ])
        lines += table(["saver", "batches", "rows/batch mean/p50/p99", "ingest call p50/p99 ms",
                        "visibility lag p50/p99 ms", "retries", "restarts", "peak batcher"], rows)
    return lines


def format_checks(checks: list[dict[str, Any]]) -> list[str]:
    """The comparisons as a table: ratio, the goal and the run size it is set for, met or missed."""
    rows = []
    for c in checks:
        if c["passed"] is None:
            verdict = "-"
        else:
            verdict = "met" if c["passed"] else "missed"
            if c.get("at_goal_size") is False:
                verdict += " (other size)"
        goal = "-" if c.get("goal") is None else f"{c['comparison']} {c['goal']:g}x"
        o, b = c["ours"], c["base"]
        rows.append([c["name"], xr(c["ratio"]), goal, c.get("goal_at") or ("any" if c.get("goal") is not None else "-"),
                     verdict, f"{_fig(o['value'], o['unit'])} ({o['label']})", f"{_fig(b['value'], b['unit'])} ({b['label']})"])
    lines = table(["comparison", "ratio", "goal", "goal set for", "result", "numerator", "denominator"], rows, "lrrllll")
    if any(c.get("at_goal_size") is False for c in checks):
        lines.append("(other size: this run's size is not the one the goal is set for; the goal is judged all the same. "
                     "--goals runs every comparison at its goal's size)")
    notes = [f"  {c['name']}: {c['note']}" for c in checks if c.get("note")]
    if notes:
        lines += ["notes:", *notes]
    return lines


def _fig(v: float | None, unit: str) -> str:
    if v is None:
        return "n/a"
    if unit == "bytes":
        return mib(v)
    if unit.startswith("x "):  # a ratio as a figure: "0.43x the yielding InMemorySaver"
        return f"{v:.2f}{unit}"
    return f"{v:,.1f} {unit}"


def format_any(res: dict[str, Any]) -> list[str]:
    """Any report's dict as plain lines."""
    kind = res.get("report", "run")
    if kind == "run":
        return format_report(res)
    if kind == "goals":
        return format_goals(res)
    lines: list[str] = []
    for name, run in res["runs"].items():
        lines += [f"### {kind}: {name}", *format_report(run), ""]
    if kind == "sweep":
        lines += format_sweep(res)
    if kind == "durability":
        lines += format_durability(res)
    if kind == "memory-bound":
        s = res["stall"]
        lines += [f"stalled backend: idle RSS {mib(s['idle_rss_bytes'])}, peak {mib(s['peak_rss_bytes'])}, "
                  f"max buffered {mib(s['max_buffered_bytes'])} of {mib(res['bound_bytes'])}; "
                  f"{s['steps_while_stalled']} steps accepted in {s['stalled_s']:.1f} s stalled, "
                  f"agents blocked: {'yes' if s['agents_blocked'] else 'no'}", ""]
    if res.get("checks"):
        lines += [f"{kind}: comparisons and goals (this run: {reports.sizes(res['config']['agents'], res['config']['steps'])}):",
                  *format_checks(res["checks"])]
    return lines


def format_sweep(res: dict[str, Any]) -> list[str]:
    params = list(res["grids"])
    rounds = res.get("rounds", 1)
    how = f"; the run with the median throughput of {rounds} interleaved rounds" if rounds > 1 else ""
    lines = [f"sweep ({res['mode']}, {res['metric']}; step latency p50/p99 in ms{how}):"]
    rows = []
    for p in res["points"]:
        s = p["settings"]
        per_round = [" / ".join(num(t, ",.0f") for t in p.get("round_throughputs") or [])] if rounds > 1 else []
        rows.append([*(str(s.get(k)) for k in params), num(p["throughput"]), *per_round, num(p["p50_ms"], ".2f"),
                     num(p["p99_ms"], ".2f"), num(p["p99_aput_ms"], ".3f"), num(p["mean_batch_rows"], ".0f"),
                     mib(p["peak_rss_bytes"]), "ok" if p["passed"] else (p["error"] or "FAILED")])
    lines += table([*params, res["metric"], *(["rounds"] if rounds > 1 else []), "p50", "p99", "p99 aput",
                    "rows/batch", "peak RSS", "verified"], rows, "r" * (len(params) + 6 + (rounds > 1)) + "l")
    rec = res.get("recommendation")
    lines.append("")
    if rec:
        settings = ", ".join(f"{k}={v}" for k, v in rec["settings"].items())
        how = rec.get("from", f"highest throughput with p99 within {res['slack']}x of the best")
        figs = ""
        if rec.get("throughput"):
            figs = f": {num(rec['throughput'])} {res['metric']}, p99 step {num(rec.get('p99_ms'), '.2f')} ms"
        lines.append(f"RECOMMENDED: {settings}{figs} ({how}; p99 within {res['slack']}x of the best)")
        if rec.get("combined"):
            c = rec["combined"]
            lines.append(f"  (combined per-parameter picks {c['settings']} measured {num(c['throughput'])} {res['metric']})")
    else:
        lines.append("RECOMMENDED: none (no engine setting was swept, or every point failed)")
    sat = res.get("saturation")
    if sat:
        curve = ", ".join(f"{c['agents']}: {num(c['throughput'], ',.0f')} (p99 {num(c['p99_ms'], '.1f')} ms)" for c in sat["curve"])
        lines.append(f"SATURATION: throughput reaches 90% of its peak at {sat['agents']} agents ({curve})")
    return lines


def format_durability(res: dict[str, Any]) -> list[str]:
    rows = [[t["mode"], num(t["throughput"]), num(t["p50_aput_ms"], ".3f"), num(t["p99_aput_ms"], ".3f"),
             "n/a" if t["fsyncs_per_s"] is None else num(t["fsyncs_per_s"]), t["error"] or ""] for t in res["table"]]
    unit = res["table"][0]["unit"] if res["table"] else ""
    return [f"durability modes (engine accepts: {', '.join(res['modes'])}):",
            *table(["durability", unit, "p50 aput ms", "p99 aput ms", "fsyncs/s", "error"], rows, "lrrrrl"), ""]


def format_goals(res: dict[str, Any]) -> list[str]:
    env = res["environment"]
    lines = ["langgraph-checkpoint-kusto goals: every comparison this tool sets a goal for, "
             "each section in its own process",
             f"python {env['python']} on {env['cpus']} CPUs; langgraph {env['versions'].get('langgraph')}, "
             f"duckdb {env['versions'].get('duckdb')}; {res['total_s']:.0f} s in all", ""]
    lines += format_checks(res["checks"])
    dur = res["sections"].get("durability")
    if dur and dur.get("table"):
        lines += ["", *format_durability(dur)]
    scale = res["sections"].get("scale")
    if scale and scale.get("rss"):
        rss = scale["rss"]
        lines.append(f"scale: peak RSS {mib(rss['small']['peak_rss_bytes'])} at {scale['agents'][0]} agents, "
                     f"{mib(rss['large']['peak_rss_bytes'])} at {scale['agents'][1]} agents")
    unverified = [n for n, s in res["sections"].items() if not s.get("passed")]
    lines.append("")
    lines.append(f"GOALS: {res['checks_passed']} of {res['checks_passed'] + res['checks_failed']} met"
                 + (f", {res['checks_not_judged']} more for reference (no goal)" if res["checks_not_judged"] else "")
                 + ("; every thread verified" if not unverified else f"; NOT VERIFIED: {', '.join(unverified)}"))
    return lines


# -- running ------------------------------------------------------------------------


async def _run_report(args: argparse.Namespace, cfg: runner.LoadTestConfig, on_event: Any, out: TextIO, err: TextIO) -> dict[str, Any]:
    kind = args.report
    if kind == "run":
        return await reports.report_run(cfg, on_event, rounds=args.rounds or 1)
    if kind == "sweep":
        grids = dict(args.sweep_param) or None
        return await reports.report_sweep(cfg, on_event, grids=grids, mode=args.sweep_mode, slack=args.sweep_slack,
                                          confirm=args.sweep_confirm, rounds=args.rounds or 1)
    if kind == "latency-hiding":
        return await reports.report_latency_hiding(cfg, on_event, rounds=args.rounds or reports.DEFAULT_HIDING_ROUNDS)
    if kind == "scale":
        return await reports.report_scale(cfg, on_event, large_agents=args.scale_agents,
                                          rounds=args.rounds or reports.DEFAULT_SCALE_ROUNDS,
                                          fresh_processes=args.isolate)
    if kind == "memory-bound":
        return await reports.report_memory_bound(cfg, on_event, bound=args.memory_bound_bytes)
    if kind == "telemetry":
        return await reports.report_telemetry(cfg, on_event, rounds=args.rounds or reports.DEFAULT_TELEMETRY_ROUNDS)
    if kind == "durability":
        return await reports.report_durability(cfg, on_event)
    raise AssertionError(kind)


def _goals(args: argparse.Namespace, cfg: runner.LoadTestConfig, on_event: Any, out: TextIO, err: TextIO) -> dict[str, Any]:
    import time

    started = time.perf_counter()
    sections: dict[str, dict[str, Any]] = {}
    opts = {"scale_agents": args.scale_agents, "memory_bound": args.memory_bound_bytes,
            "rounds": args.rounds, "isolate": args.isolate}
    for name in reports.GOAL_SECTIONS:
        if not args.quiet:
            print(f"== goals section: {name} ==", file=err, flush=True)
        if args.isolate:
            # the child shows its own progress on our stderr when that is a real file
            stderr = err if _has_fileno(err) else None
            data, text = reports.run_section_subprocess(name, _section_child_argv(args, cfg, name), stderr=stderr)
        else:
            c = cfg if name == "latency-hiding" else _no_inject(cfg)
            data = asyncio.run(reports.run_section(name, c, on_event, opts))
            text = "\n".join(format_any(data)) + "\n"
        sections[name] = data
        print(f"#### section {name}\n{text}", file=out, flush=True)
    return reports.summarize_goals(sections, started)


def _no_inject(cfg: runner.LoadTestConfig) -> runner.LoadTestConfig:
    from dataclasses import replace

    return replace(cfg, inject=None)


def _section_child_argv(args: argparse.Namespace, cfg: runner.LoadTestConfig, name: str) -> list[str]:
    return child_argv(args, cfg if name == "latency-hiding" else _no_inject(cfg))


def _has_fileno(stream: TextIO) -> bool:
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    return True


def _open_store_first(path: str) -> None:
    """Open ``--store`` once before the run, through the library: a store this run cannot
    use (its folder is missing, another process holds it, not a DuckDB file) fails at once
    with the library's error, not after the baselines with a traceback. A file made here is
    removed again, so the run still finds the store as the user left it."""
    from ..engine.backends.embedded import EmbeddedBackend

    existed = os.path.exists(path)
    backend = EmbeddedBackend(path)

    async def probe() -> None:
        await backend.open()
        await backend.close()

    try:
        asyncio.run(probe())
    finally:
        if not existed:
            for made in (path, path + ".wal"):
                if os.path.isfile(made):
                    os.remove(made)


def execute(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> tuple[int, dict[str, Any]]:
    """Parse ``argv``, run, print the report to ``out``; return (exit code, results dict).

    Usage errors exit through argparse (SystemExit with code 2); a ``--store`` that cannot
    be opened is one line on ``err`` and code 2.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    try:
        cfg.validate()
    except Exception as exc:  # noqa: BLE001 - ConfigError and friends: a usage error
        parser.error(str(exc))
    if args.report == "goals" and args.store:
        parser.error("--store cannot be used with --goals (each section uses its own temporary stores)")
    for path in (args.json, args.plot):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            parser.error(f"no such directory for {path!r}")
    if args.store and not args.cluster_uri:
        try:
            _open_store_first(args.store)
        except KustoCheckpointError as exc:
            print(f"{parser.prog}: error: {exc}", file=err)
            return EXIT_USAGE, {"passed": False, "error": f"{type(exc).__name__}: {exc}"}
    display = progress_display(err, "none" if args.quiet else args.progress)
    try:
        if args.report == "goals":
            res = _goals(args, cfg, display, out, err)
        else:
            res = asyncio.run(_run_report(args, cfg, display, out, err))
    finally:
        if display is not None:
            display.close()
    lines = format_any(res)
    verdict = lines.pop() if lines and lines[-1].startswith(("RESULT:", "GOALS:")) else None
    for line in lines:
        print(line, file=out)
    runs = [res] if "results" in res else list(res.get("runs", {}).values())
    for run in runs:
        for r in run["results"].values():
            if r.get("traceback"):
                print(f"\n{r['label']} failed:\n{r['traceback']}", file=err)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2, default=str)
        print(f"results written to {os.path.abspath(args.json)}", file=out)
    if args.plot:
        from .plots import plot

        plot(res, args.plot)
        print(f"plot written to {os.path.abspath(args.plot)}", file=out)
    if not args.json and not args.plot:
        print("(--json PATH writes these results as JSON, --plot PATH draws them as a PNG)", file=out)
    if verdict is not None:
        print(verdict, file=out)
    ok = bool(res.get("passed")) if args.report != "goals" else bool(res.get("verified"))
    if args.report == "goals" and args.strict and res.get("checks_failed"):
        ok = False
    return (EXIT_OK if ok else EXIT_FAILED), res


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry: the exit code (0: every thread verified)."""
    try:
        code, _ = execute(argv)
    except KustoCheckpointError as exc:  # the library's own errors say what to fix: no traceback
        print(f"kusto-checkpoint-loadtest: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
