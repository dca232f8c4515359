"""Load test for the Kusto checkpointer: the project's main job.

    python -m langgraph.checkpoint.kusto.loadtests            # 100 agents x 10 steps, with baselines
    kusto-checkpoint-loadtest --workload raw --agents 200 --steps 20

Runs many concurrent LangGraph agents (a compiled ``StateGraph``, no LLM) on
:class:`~langgraph.checkpoint.kusto.AsyncKustoSaver` over an embedded DuckDB
file, reads every thread back through a fresh saver on the same file, and
compares throughput with LangGraph's ``InMemorySaver`` and ``AsyncSqliteSaver``.

Modules:

* :mod:`.workloads` - the graph, the raw-saver workload, and their verification;
* :mod:`.runner` - runs a workload on each saver and builds the results dict;
* :mod:`.cli` - argument parsing and the plain-text report (``main``).
"""
