"""The README's and docs/*.md's Python examples run, in order, as written.

A block fenced as ```` ```python ```` runs (all of them in one namespace, top to
bottom). A block that needs something this machine does not have (an Azure Data
Explorer cluster, credentials, the Kusto emulator) is fenced as
```` ```python no-run ````: it is compiled, not run, and its calls to
``from_connection_string`` are checked against the real signature.
"""

from __future__ import annotations

import ast
import inspect
import re
from dataclasses import fields
from pathlib import Path

import pytest
from langgraph.checkpoint.kusto import EngineConfig, KustoSaver

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```(python[^\n]*)\n(.*?)^```", re.S | re.M)


def _blocks() -> list[tuple[str, str]]:
    blocks = FENCE.findall(README.read_text())
    unknown = {info for info, _ in blocks} - {"python", "python no-run"}
    assert not unknown, f"README python blocks are fenced `python` (run) or `python no-run`, not {unknown}"
    return blocks


def test_readme_examples_run() -> None:
    blocks = [code for info, code in _blocks() if info == "python"]
    assert len(blocks) >= 3
    namespace: dict[str, object] = {"__name__": "readme"}
    for block in blocks:
        exec(compile(block, str(README), "exec", dont_inherit=True), namespace)  # noqa: S102 - our own README


def test_readme_examples_that_need_a_cluster_compile_and_use_the_real_signature() -> None:
    blocks = [code for info, code in _blocks() if info == "python no-run"]
    assert len(blocks) >= 3
    signature = inspect.signature(KustoSaver.from_connection_string)
    named = {n for n, p in signature.parameters.items() if p.kind is not p.VAR_KEYWORD}
    accepted = named | {f.name for f in fields(EngineConfig)} | {"portal_backend"}
    calls = 0
    for block in blocks:
        tree = compile(block, str(README), "exec", flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
                       dont_inherit=True)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_connection_string":
                calls += 1
                keywords = {k.arg for k in node.keywords if k.arg is not None}
                assert keywords <= accepted, f"unknown keyword(s) {keywords - accepted} in README"
                assert len(node.args) <= 2, "cluster_uri and database are the only positional arguments"
    assert calls >= 4


# -- docs/*.md: the same rules, each page in its own namespace ------------------

DOCS = sorted((README.parent / "docs").glob("*.md"))


def _page_blocks(page: Path) -> list[tuple[str, str]]:
    blocks = FENCE.findall(page.read_text())
    unknown = {info for info, _ in blocks} - {"python", "python no-run"}
    assert not unknown, f"{page.name}: python blocks are fenced `python` (run) or `python no-run`, not {unknown}"
    return blocks


def test_docs_pages_are_collected() -> None:
    assert any(_page_blocks(page) for page in DOCS), "no docs/*.md page has a python block"


@pytest.mark.parametrize("page", DOCS, ids=[p.name for p in DOCS])
def test_docs_examples_run(page: Path) -> None:
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    for info, block in _page_blocks(page):
        if info == "python":
            exec(compile(block, str(page), "exec", dont_inherit=True), namespace)  # noqa: S102 - our own docs
        else:
            compile(block, str(page), "exec", flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)
