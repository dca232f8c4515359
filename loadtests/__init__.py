"""Load test for the Kusto checkpointer: the project's main job.

    python -m langgraph.checkpoint.kusto.loadtests            # 100 agents x 10 steps, with baselines
    kusto-checkpoint-loadtest --workload raw --agents 200 --steps 20 --json r.json --plot r.png
    kusto-checkpoint-loadtest --sweep                         # tune batch size, flush interval, concurrency
    kusto-checkpoint-loadtest --goals                         # every comparison that has a goal, at its size

Runs many concurrent LangGraph agents (a compiled ``StateGraph``, no LLM) or the
raw saver workload on :class:`~langgraph.checkpoint.kusto.AsyncKustoSaver` (the
embedded DuckDB store, or a cluster), reads every thread back through a fresh
saver, and compares with LangGraph's ``InMemorySaver``, ``AsyncSqliteSaver`` and
(given a URL) ``AsyncPostgresSaver`` in the same process.

Modules:

* :mod:`.workloads` - the graph, the raw-saver workload, their shape and verification;
* :mod:`.metrics` - per-operation latency, and what the backend saw (batch sizes, visibility lag);
* :mod:`.inject` - the ``--inject`` syntax (latency / errors per backend call);
* :mod:`.runner` - runs a workload on each saver and builds the results dict;
* :mod:`.reports` - sweep, latency hiding, scale, memory bound, telemetry, durability, goals;
* :mod:`.display` / :mod:`.plots` - live progress, tables, PNG plots;
* :mod:`.cli` - argument parsing (``main``).
"""
