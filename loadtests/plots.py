"""``--plot PATH``: a PNG of any report (matplotlib, headless Agg backend).

* a run (and the reports made of runs): throughput per saver, and p50/p95/p99
  latency per operation per saver (log scale);
* a sweep: throughput and p99 step latency against each swept parameter, the
  recommended value marked;
* goals: each comparison's ratio against its goal (log scale), met in green.
"""

from __future__ import annotations

from typing import Any

PCTS = ("p50_ms", "p95_ms", "p99_ms")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _all_results(res: dict[str, Any]) -> list[dict[str, Any]]:
    runs = [res] if "results" in res else list(res.get("runs", {}).values())
    out = []
    for run in runs:
        out += [r for r in run["results"].values() if r.get("ops") is not None]
    return out


def _short(label: str) -> str:
    return label.replace("AsyncKustoSaver (embedded DuckDB)", "Kusto (embedded)").replace("AsyncKustoSaver", "Kusto")


def plot_runs(res: dict[str, Any], path: str) -> None:
    plt = _pyplot()
    results = _all_results(res)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [1, 2]})
    labels = [_short(r["label"]) for r in results]
    op = results[0]["op_label"] if results else "ops"
    values = [r["ops_per_s"] for r in results]
    bars = ax1.bar(range(len(values)), values, color="tab:blue")
    ax1.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8)
    ax1.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax1.set_ylabel(f"{op}/s")
    ax1.set_title("throughput (run + flush)")
    if values and min(values) > 0 and max(values) / min(values) > 30:
        ax1.set_yscale("log")

    ops = sorted({name for r in results for name in (r.get("latency_ms") or {})})
    groups = [(r, name) for name in ops for r in results if (r.get("latency_ms") or {}).get(name, {}).get("count")]
    width = 0.27
    for i, pct in enumerate(PCTS):
        ys = [g[0]["latency_ms"][g[1]][pct] for g in groups]
        ax2.bar([x + (i - 1) * width for x in range(len(groups))], ys, width, label=pct.replace("_ms", ""))
    ax2.set_xticks(range(len(groups)), [f"{g[1]}\n{_short(g[0]['label'])}" for g in groups], rotation=60, ha="right", fontsize=7)
    ax2.set_yscale("log")
    ax2.set_ylabel("ms")
    ax2.set_title("latency per operation as the caller sees it")
    ax2.legend()
    cfg = res.get("config") or {}
    fig.suptitle(f"{res.get('report', 'run')}: {cfg.get('workload')} workload, {cfg.get('agents')} agents x {cfg.get('steps')} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(res: dict[str, Any], path: str) -> None:
    plt = _pyplot()
    params = list(res["grids"])
    base = res["base"]
    rec = (res.get("recommendation") or {}).get("settings", {})
    fig, axes = plt.subplots(2, len(params), figsize=(4.2 * len(params), 7), squeeze=False)
    for j, p in enumerate(params):
        others = [q for q in params if q != p]
        pts = [x for x in res["points"] if all(x["settings"].get(q) == base.get(q) for q in others) and x["throughput"]]
        if res["mode"] == "grid" and not pts:
            pts = [x for x in res["points"] if x["throughput"]]
        pts.sort(key=lambda x: x["settings"][p])
        xs = [x["settings"][p] for x in pts]
        top, bottom = axes[0][j], axes[1][j]
        top.plot(xs, [x["throughput"] for x in pts], "o-", color="tab:blue")
        bottom.plot(xs, [x["p99_ms"] for x in pts], "o-", color="tab:red", label="p99")
        bottom.plot(xs, [x["p50_ms"] for x in pts], "o--", color="tab:orange", label="p50")
        for ax in (top, bottom):
            if len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) >= 10:
                ax.set_xscale("log")
            ax.set_xlabel(p)
            ax.grid(alpha=0.3)
            if p in rec:
                ax.axvline(rec[p], color="green", linestyle=":", label="recommended")
        top.set_ylabel(res["metric"])
        top.set_title(f"throughput vs {p}")
        bottom.set_ylabel("step latency, ms")
        bottom.set_title(f"latency vs {p}")
        bottom.legend(fontsize=7)
    cfg = res.get("config") or {}
    fig.suptitle(f"sweep ({res['mode']}): {cfg.get('workload')} workload, {cfg.get('steps')} steps per agent")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_checks(res: dict[str, Any], path: str) -> None:
    plt = _pyplot()
    checks = [c for c in res["checks"] if c.get("ratio") is not None]
    fig, ax = plt.subplots(figsize=(11, 0.55 * max(3, len(checks)) + 1.5))
    ys = range(len(checks))
    colors = ["tab:green" if c["passed"] else ("tab:gray" if c["passed"] is None else "tab:red") for c in checks]
    ax.barh(list(ys), [c["ratio"] for c in checks], color=colors)
    for y, c in zip(ys, checks):
        if c.get("goal") is not None:
            ax.plot([c["goal"]], [y], marker="|", markersize=18, color="black")
        ax.text(c["ratio"], y, f" {c['ratio']:.2f}x (goal {c['comparison']} {c['goal'] if c.get('goal') is not None else '-'})",
                va="center", fontsize=8)
    ax.set_yticks(list(ys), [c["name"] for c in checks], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("ratio (black tick: goal)")
    ax.set_title("comparisons and their goals")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(res: dict[str, Any], path: str) -> None:
    kind = res.get("report", "run")
    if kind == "sweep":
        plot_sweep(res, path)
    elif kind == "goals":
        plot_checks(res, path)
    else:
        plot_runs(res, path)
