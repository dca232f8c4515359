"""Check KQL with Microsoft's own parser and semantic binder, from Python.

Runs ``tests/kqlcheck/check.js`` under Node.js. That script uses
Kusto.Language, the library behind Azure Data Explorer's editors, published on
npm as ``@kusto/language-service-next`` at the version pinned in
``tests/kqlcheck/package.json``. Install it with::

    npm ci --prefix tests/kqlcheck

Typical use in a test::

    from kql_checker import check_kql, errors, node_available

    if not node_available():
        pytest.skip(NODE_MISSING_REASON)
    result = check_kql([("latest", "declare query_parameters(t:string); LatestCheckpoints | where thread_id == t")])
    assert errors(result["latest"]) == []

The tables default to the ones in ``engine/schema.py``. The materialized
views default to the ones that ``provision.kql`` creates, with their columns
worked out by the binder from each view's query.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
KQLCHECK_DIR = Path(__file__).resolve().parent / "kqlcheck"
CHECK_JS = KQLCHECK_DIR / "check.js"
PROVISION_KQL = REPO_ROOT / "provision.kql"
SCHEMA_PY = REPO_ROOT / "engine" / "schema.py"
_PACKAGE_JSON = KQLCHECK_DIR / "node_modules" / "@kusto" / "language-service-next" / "package.json"

NODE_MISSING_REASON = (
    "the KQL checker needs Node.js (>= 18) and its npm package: "
    "run `npm ci --prefix tests/kqlcheck`"
)

Diagnostic = dict[str, Any]


# --------------------------------------------------------------------------- schema


@lru_cache(maxsize=1)
def load_schema() -> ModuleType:
    """Return the ``engine/schema.py`` module: the installed package if it is
    importable, otherwise the file in this checkout, loaded by its path."""
    try:
        return importlib.import_module("langgraph.checkpoint.kusto.engine.schema")
    except Exception:  # not installed, or the package's __init__ fails mid-development
        pass
    name = "_kusto_checkpoint_schema_by_path"
    spec = importlib.util.spec_from_file_location(name, SCHEMA_PY)
    if spec is None or spec.loader is None:  # pragma: no cover - file missing
        raise ImportError(f"cannot load {SCHEMA_PY}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while building the class
    spec.loader.exec_module(module)
    return module


def default_tables() -> dict[str, list[tuple[str, str]]]:
    """The tables of ``engine/schema.py`` as ``{name: [(column, kusto_type), ...]}``."""
    return {t.name: [tuple(c) for c in t.columns] for t in load_schema().TABLES}


# --------------------------------------------------------------------------- scripts

_BLANK = re.compile(r"^\s*$")
_COMMENT = re.compile(r"^\s*//")


def _split_blank_lines(text: str) -> list[tuple[int, str]]:
    # Fallback with the same rule as duckdb_kql.split_script: blank lines
    # separate statements (a KQL string literal can't contain a newline, so a
    # blank line is never inside one); chunks holding only comments are dropped.
    out: list[tuple[int, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if _BLANK.match(lines[i]):
            i += 1
            continue
        j = i
        while j < len(lines) and not _BLANK.match(lines[j]):
            j += 1
        chunk = lines[i:j]
        if any(not _COMMENT.match(line) for line in chunk):
            out.append((i + 1, "\n".join(chunk).strip()))
        i = j
    return out


def split_script(text: str) -> list[tuple[int, str]]:
    """Split a Kusto database script into ``(first_line, statement)`` pairs.

    Uses ``duckdb_kql.split_script`` when it is installed, and otherwise the same
    rule implemented here: statements are separated by blank lines, and chunks
    that hold only ``//`` comments are dropped.
    """
    try:
        from duckdb_kql import split_script as _split  # type: ignore[import-not-found]
    except ImportError:
        return _split_blank_lines(text)
    return list(_split(text))


def split_commands(text: str) -> list[tuple[int, str]]:
    """Like :func:`split_script`, but removes the ``//`` comment lines at the
    start of each statement and gives the line number of the first line of code.
    What is left is exactly what to send to Kusto, one command at a time."""
    out: list[tuple[int, str]] = []
    for line, stmt in split_script(text):
        lines = stmt.splitlines()
        k = 0
        while k < len(lines) and (_COMMENT.match(lines[k]) or _BLANK.match(lines[k])):
            k += 1
        out.append((line + k, "\n".join(lines[k:]).strip()))
    return out


def provision_commands(path: Path = PROVISION_KQL) -> list[tuple[int, str]]:
    """The commands of ``provision.kql`` as ``(line, command)`` pairs."""
    return split_commands(path.read_text(encoding="utf-8"))


_VIEW = re.compile(
    r"^\.create(?:-or-alter)?\s+(?:async\s+)?(?:ifnotexists\s+)?materialized-view\s+"
    r"(?:with\s*\((?P<props>[^)]*)\)\s*)?(?P<name>\w+)\s+on\s+table\s+(?P<source>\w+)\s*"
    r"\{(?P<query>.*)\}\s*$",
    re.DOTALL,
)


def parse_materialized_views(commands: list[tuple[int, str]]) -> dict[str, dict[str, str]]:
    """``{view: {"source": table, "query": text, "properties": text}}`` for each
    materialized-view creation command among ``commands``."""
    views: dict[str, dict[str, str]] = {}
    for _, cmd in commands:
        m = _VIEW.match(cmd)
        if m:
            views[m["name"]] = {
                "source": m["source"],
                "query": m["query"].strip(),
                "properties": (m["props"] or "").strip(),
            }
    return views


def default_views() -> dict[str, dict[str, str]]:
    """The materialized views that ``provision.kql`` creates."""
    if not PROVISION_KQL.exists():
        return {}
    return parse_materialized_views(provision_commands())


# --------------------------------------------------------------------------- checker


def node_available() -> bool:
    """True when Node.js and the installed npm package are both present."""
    return shutil.which("node") is not None and _PACKAGE_JSON.is_file() and CHECK_JS.is_file()


def check_kql(
    items: list[tuple[str, str]],
    tables: dict[str, list[tuple[str, str]]] | None = None,
    *,
    views: dict[str, dict[str, str]] | None = None,
    functions: list[dict[str, str]] | None = None,
    database: str = "db",
    analyzers: bool = False,
    timeout: float = 300.0,
) -> dict[str, list[Diagnostic]]:
    """Parse and bind each ``(name, text)`` item (a query or a control command)
    with Kusto.Language. Returns ``{name: [diagnostic, ...]}``. Each diagnostic is a
    dict with ``severity`` ("Error", "Warning", "Suggestion", ...), ``is_error``,
    ``code`` (e.g. "KS142"), ``message``, ``start`` and ``length`` (offsets into
    the item's text), and ``source`` ("binder", or "analyzer" for the editor's
    style analyzers, which run only with ``analyzers=True``).

    ``tables`` defaults to engine/schema.py. ``views`` defaults to the
    materialized views in provision.kql (``{name: {"query": ...}}``; their
    columns come from binding the query). Pass ``views={}`` to declare none.
    ``functions`` declares stored functions in the database, each
    ``{"name": ..., "parameters": "x:string", "body": ...}`` as ``.create function``
    would define it; a call binds through the function's body.
    Raises ``RuntimeError`` if Node or the npm package is missing, or if the
    checker rejects its input.
    """
    names = [name for name, _ in items]
    if len(set(names)) != len(names):
        raise ValueError("item names must be unique")
    if not node_available():
        raise RuntimeError(NODE_MISSING_REASON)
    if tables is None:
        tables = default_tables()
    if views is None:
        views = default_views()
    payload = {
        "database": database,
        "tables": {t: [list(c) for c in cols] for t, cols in tables.items()},
        "materialized_views": {
            v: {k: spec[k] for k in ("query", "columns") if k in spec} for v, spec in views.items()
        },
        "functions": list(functions or []),
        "analyzers": analyzers,
        "items": [{"name": name, "text": text} for name, text in items],
    }
    proc = subprocess.run(
        ["node", str(CHECK_JS)],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"kqlcheck failed (exit {proc.returncode}): {proc.stderr.strip()}")
    results = json.loads(proc.stdout)
    return {r["name"]: r["diagnostics"] for r in results}


def errors(diagnostics: list[Diagnostic]) -> list[Diagnostic]:
    """Only the diagnostics that would make Kusto reject the text."""
    return [d for d in diagnostics if d.get("is_error")]


def format_diagnostics(text: str, diagnostics: list[Diagnostic]) -> str:
    """Human-readable diagnostics, quoting the text each one points at."""
    out = []
    for d in diagnostics:
        start, length = d.get("start"), d.get("length")
        where = ""
        if start is not None:
            snippet = text[start : start + max(length or 0, 1)]
            where = f" at {start} ({snippet!r})"
        out.append(f"{d['severity']} {d.get('code')}{where}: {d['message']}")
    return "\n".join(out)


def string_literals(items: list[tuple[str, str]], *, timeout: float = 300.0) -> dict[str, tuple[list[Diagnostic], list[str]]]:
    """Parse each ``(name, text)`` with Kusto.Language and read back the value of every
    string literal in it, as the parser decodes it (``LiteralValue``). Returns
    ``{name: (diagnostics, [value, ...])}``."""
    if not node_available():
        raise RuntimeError(NODE_MISSING_REASON)
    payload = {
        "database": "db",
        "tables": {t: [list(c) for c in cols] for t, cols in default_tables().items()},
        "literals": True,
        "items": [{"name": name, "text": text} for name, text in items],
    }
    proc = subprocess.run(
        ["node", str(CHECK_JS)], input=json.dumps(payload), capture_output=True, text=True,
        encoding="utf-8", timeout=timeout, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"kqlcheck failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return {r["name"]: (r["diagnostics"], r.get("literals", [])) for r in json.loads(proc.stdout)}
