"""Every KQL text the engine sends passes Microsoft's parser and binder, and
translates through duckdb-kql: one KQL for both backends."""

from __future__ import annotations

import duckdb_kql
import pytest
from kql_checker import NODE_MISSING_REASON, check_kql, errors, format_diagnostics, node_available

from langgraph.checkpoint.kusto.engine import kql, schema
from langgraph.checkpoint.kusto.engine.records import TombstoneRec


def _texts() -> list[tuple[str, str]]:
    tombs = [
        TombstoneRec(schema.SCOPE_THREAD, thread_id="t'\"|;.drop table x", deleted_at=1),
        TombstoneRec(schema.SCOPE_RUN, run_id="r", deleted_at=2),
        TombstoneRec(schema.SCOPE_CHECKPOINT, thread_id="t", checkpoint_ns="n", checkpoint_id="c", deleted_at=3),
    ]
    out = list(kql.all_templates())
    for t in (schema.CHECKPOINTS, schema.WRITES, schema.BLOBS):
        text, params = kql.compaction_command(t.name, tombs)
        # user strings reach a control command only as literals (test_kusto_rules.py reads
        # each back through Kusto.Language)
        assert params == {} and kql.literal(tombs[0].thread_id) in text
        out.append((f"compact_{t.name}", text))
    from langgraph.checkpoint.kusto.engine.backends.kusto import CLEAR_STREAMING_SCHEMA_CACHE

    out.append(("clear_streaming_schema_cache", CLEAR_STREAMING_SCHEMA_CACHE))  # after provisioning
    return out


@pytest.mark.skipif(not node_available(), reason=NODE_MISSING_REASON)
def test_templates_pass_kusto_language() -> None:
    items = _texts()
    result = check_kql(items)
    bad = {name: format_diagnostics(text, errors(result[name])) for name, text in items if errors(result[name])}
    assert not bad, bad


def test_queries_translate_with_duckdb_kql() -> None:
    tables = {t.name: list(t.column_names) for t in schema.TABLES}
    for name, text in kql.all_templates():
        sql = duckdb_kql.to_sql(text, schema=tables)
        assert sql.declarations or "declare" not in text, name


def test_limit_must_be_a_validated_integer() -> None:
    with pytest.raises(ValueError):
        kql.checkpoints_query("10; .drop table Checkpoints", True)  # type: ignore[arg-type]
    assert "| take 3;\n" in kql.checkpoints_query(3, True)
