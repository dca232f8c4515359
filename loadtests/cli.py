"""Command line: ``python -m langgraph.checkpoint.kusto.loadtests`` / ``kusto-checkpoint-loadtest``.

Parses the arguments, runs :func:`.runner.run`, prints the results dict as plain
lines, and exits non-zero if any thread could not be verified (or a saver failed).
Progress lines go to stderr (``--quiet`` drops them); the report goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from . import runner
from .workloads import WORKLOADS

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


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


def _engine_option(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw  # a bare string, e.g. durability=ingested
    return key.strip().replace("-", "_"), value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kusto-checkpoint-loadtest",
        description=(
            "Load test of the Kusto checkpointer on its embedded DuckDB store: many concurrent "
            "LangGraph agents, every thread read back through a fresh saver and verified, "
            "compared with InMemorySaver and AsyncSqliteSaver. No cluster needed."
        ),
    )
    p.add_argument("--agents", type=_positive_int, default=100, help="concurrent agents, one thread each (default: 100)")
    p.add_argument("--steps", type=_positive_int, default=10, help="steps per agent: graph invokes or raw get/put rounds (default: 10)")
    p.add_argument(
        "--workload",
        choices=WORKLOADS,
        default="graph",
        help="graph: a compiled StateGraph (agent -> tool -> finish), one ainvoke per step; "
        "raw: aget_tuple + aput + aput_writes per step on the saver directly (default: graph)",
    )
    p.add_argument("--store", metavar="PATH", help="DuckDB file for our saver (default: a temporary file, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the temporary store files and print where they are")
    p.add_argument("--batch-size", type=_positive_int, help="engine option batch_size (rows per table that trigger a batch)")
    p.add_argument("--flush-interval", type=_positive_float, help="engine option flush_interval (seconds a row may wait)")
    p.add_argument(
        "-o",
        "--engine-option",
        action="append",
        type=_engine_option,
        default=[],
        metavar="KEY=VALUE",
        help="any other engine option, e.g. -o ingest_concurrency=8 -o durability=ingested (repeatable)",
    )
    p.add_argument(
        "--compare",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the same workload on InMemorySaver and AsyncSqliteSaver (default: on)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return p


def config_from_args(args: argparse.Namespace) -> runner.LoadTestConfig:
    options: dict[str, Any] = dict(args.engine_option)
    if args.batch_size is not None:
        options["batch_size"] = args.batch_size
    if args.flush_interval is not None:
        options["flush_interval"] = args.flush_interval
    return runner.LoadTestConfig(
        agents=args.agents,
        steps=args.steps,
        workload=args.workload,
        store=args.store,
        keep=args.keep,
        compare=args.compare,
        engine_options=options,
    )


# -- formatting -------------------------------------------------------------------


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def _x(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}x"


def format_report(res: dict[str, Any]) -> list[str]:
    """The results dict as plain lines."""
    cfg = res["config"]
    lines: list[str] = []
    workload = (
        "graph (StateGraph agent -> tool -> finish, one ainvoke per step)"
        if cfg["workload"] == "graph"
        else "raw (aget_tuple + aput + aput_writes per step)"
    )
    env = res["environment"]
    lines.append("langgraph-checkpoint-kusto load test")
    lines.append(f"workload: {workload}")
    lines.append(f"agents: {cfg['agents']} x {cfg['steps']} steps, all agents concurrent")
    opts = ", ".join(f"{k}={v}" for k, v in sorted(cfg["engine_options"].items())) or "defaults"
    lines.append(f"engine options: {opts}")
    lines.append(
        f"python {env['python']} on {env['cpus']} CPUs; langgraph {env['versions'].get('langgraph')}, "
        f"duckdb {env['versions'].get('duckdb')}"
    )
    for key, r in res["results"].items():
        lines.append("")
        lines.extend(_format_target(r, res))
    if res["comparison"] or len(res["results"]) > 1:
        lines.append("")
        lines.extend(_format_table(res))
    lines.append("")
    if res.get("workdir"):
        lines.append(f"store files kept in: {res['workdir']}")
    lines.append(f"total time: {res['total_s']:.1f} s, process peak RSS: {_mib(res['process_peak_rss_bytes'])}")
    failed = [r["label"] for r in res["results"].values() if not r["passed"]]
    if failed:
        lines.append(f"RESULT: FAILED ({', '.join(failed)})")
    else:
        threads = sum(r["verification"]["threads"] for r in res["results"].values())
        lines.append(f"RESULT: OK (all {threads} threads verified)")
    return lines


def _format_target(r: dict[str, Any], res: dict[str, Any]) -> list[str]:
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
    lines.append(f"  peak RSS: {_mib(r['peak_rss_bytes'])} (at start {_mib(r['rss_start_bytes'])})")
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
        lines.append(f"  store: {where}, {_mib(store['file_bytes'])}" + (f"; rows: {rows}" if rows else ""))
    for w in r.get("store_warnings") or []:
        lines.append(f"  WARNING: {w}")
    eng = r.get("engine")
    if eng:
        restarts = sum(eng.get("restarts", {}).values())
        lines.append(
            f"  engine: rows_in {eng.get('rows_in')}, batches_ok {eng.get('batches_ok')}, "
            f"batches_failed {eng.get('batches_failed')}, retries {eng.get('retries')}, restarts {restarts}, "
            f"cache hits {eng.get('cache_hits')} / misses {eng.get('cache_misses')}, "
            f"peak batcher {_mib(eng.get('peak_batcher_bytes'))}"
        )
    if r.get("error"):
        lines.append(f"  ERROR: {r['error']}")
    return lines


def _format_table(res: dict[str, Any]) -> list[str]:
    results = res["results"]
    op = next((r["op_label"] for r in results.values() if r.get("op_label")), "ops")
    head = f"{'saver':<34} {op + '/s':>14} {'checkpoints/s':>14} {'elapsed s':>10} {'peak RSS':>12} {'verified':>10}  {'ours vs it':>10}"
    lines = ["comparison (same workload, same process):", head, "-" * len(head)]
    for key, r in results.items():
        if r.get("ops") is None:
            lines.append(f"{r['label']:<34} ERROR: {r['error']}")
            continue
        v = r.get("verification") or {}
        verified = f"{v.get('ok', 0)}/{v.get('threads', 0)}"
        ratio = "-" if key == "kusto" else _x((res["comparison"].get(key) or {}).get("ops_per_s_ratio"))
        lines.append(
            f"{r['label']:<34} {r['ops_per_s']:>14.1f} {r.get('checkpoints_per_s', 0.0):>14.1f} "
            f"{r['elapsed_s']:>10.2f} {_mib(r['peak_rss_bytes']):>12} {verified:>10}  {ratio:>10}"
        )
    lines.append(
        "(elapsed = run + flush: everything stored; 'ours vs it' = our throughput / its throughput; "
        "peak RSS is the whole process's, and the savers run one after another in it)"
    )
    return lines


def _progress_printer(stream: TextIO) -> Any:
    def on_event(ev: dict[str, Any]) -> None:
        kind = ev["event"]
        if kind == "start":
            print(f"[{ev['target']}] running {ev['ops']} steps on {ev['label']} ...", file=stream, flush=True)
        elif kind == "progress":
            print(f"[{ev['target']}] {ev['done']}/{ev['total']} steps, {ev['elapsed_s']:.0f} s", file=stream, flush=True)
        elif kind == "written":
            print(f"[{ev['target']}] written and stored in {ev['elapsed_s']:.2f} s; verifying ...", file=stream, flush=True)
        elif kind == "verified":
            v = ev["verification"]
            print(f"[{ev['target']}] verified: {v['ok']} OK, {v['failed']} failed", file=stream, flush=True)
        elif kind == "error":
            print(f"[{ev['target']}] ERROR: {ev['error']}", file=stream, flush=True)

    return on_event


def execute(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> tuple[int, dict[str, Any]]:
    """Parse ``argv``, run, print the report to ``out``; return (exit code, results dict).

    Usage errors exit through argparse (SystemExit with code 2).
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
    results = runner.run(cfg, None if args.quiet else _progress_printer(err))
    for line in format_report(results):
        print(line, file=out)
    for r in results["results"].values():
        if r.get("traceback"):
            print(f"\n{r['label']} failed:\n{r['traceback']}", file=err)
    return (EXIT_OK if results["passed"] else EXIT_FAILED), results


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry: the exit code (0: every thread verified)."""
    try:
        code, _ = execute(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
