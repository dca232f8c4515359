"""Every code block of README.md and docs/*.md works as written, and every link resolves.

A block fenced as ```` ```python ```` runs on its own, in a fresh namespace, as
a file pasted from the page would. A block that needs something this machine
does not have (an Azure Data Explorer cluster, credentials, the Kusto
emulator) is fenced as ```` ```python no-run ````: it is compiled, not run,
and its calls to ``from_connection_string`` are checked against the real
signature. In both, every name a block uses is defined in the block (or is a
builtin). A ```` ```bash ```` block must parse (``bash -n``), and every load-tool
command in it must parse with the tool's own argument parser. A
```` ```text ```` block (a diagram, sample output) is not run. A ```` ```kql ````
block (a query to run against the database) parses and binds in Kusto.Language
against the schema provision.kql creates, its stored functions included (and tests that use
it run it).
"""

from __future__ import annotations

import ast
import builtins
import importlib.util
import inspect
import re
import shlex
import shutil
import sys
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest

from langgraph.checkpoint.kusto import EngineConfig, KustoSaver

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # kql_checker
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.S | re.M)
KINDS = {"python", "python no-run", "bash", "text", "kql"}
LOADTEST = "langgraph.checkpoint.kusto.loadtests"


def _blocks(kind: str) -> list[tuple[str, str]]:
    """(page:line, code) of every block fenced as ``kind``, over all pages."""
    out = []
    for page in PAGES:
        text = page.read_text()
        for m in FENCE.finditer(text):
            if m.group(1).strip() == kind:
                line = text.count("\n", 0, m.start()) + 1
                out.append((f"{page.relative_to(ROOT)}:{line}", m.group(2)))
    return out


def _ids(blocks: list[tuple[str, str]]) -> list[str]:
    return [where for where, _ in blocks]


def test_every_block_says_what_it_is() -> None:
    for page in PAGES:
        for m in FENCE.finditer(page.read_text()):
            assert m.group(1).strip() in KINDS, (
                f"{page.relative_to(ROOT)}: a block fenced {m.group(1)!r}; fence it as one of {sorted(KINDS)}"
            )


def _undefined_names(tree: ast.AST) -> set[str]:
    """Names a block reads that nothing in it binds (scopes folded together: a
    block is short, and a name bound anywhere in it was defined by its author)."""
    bound, used = set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return used - bound


PYTHON = _blocks("python")
NO_RUN = _blocks("python no-run")
BASH = _blocks("bash")


def test_the_pages_have_examples() -> None:
    assert len(PYTHON) >= 5 and len(NO_RUN) >= 4 and len(BASH) >= 4


@pytest.mark.parametrize("where,code", PYTHON, ids=_ids(PYTHON))
def test_python_block_runs_on_its_own(where: str, code: str) -> None:
    tree = compile(code, where, "exec", flags=ast.PyCF_ONLY_AST, dont_inherit=True)
    assert not _undefined_names(tree), f"{where} uses names it does not define: {_undefined_names(tree)}"
    namespace: dict[str, object] = {"__name__": "__main__"}
    exec(compile(code, where, "exec", dont_inherit=True), namespace)  # noqa: S102 - our own documentation


@pytest.mark.parametrize("where,code", NO_RUN, ids=_ids(NO_RUN))
def test_python_block_that_needs_a_cluster_compiles_and_uses_the_real_signature(where: str, code: str) -> None:
    tree = compile(code, where, "exec", flags=ast.PyCF_ONLY_AST, dont_inherit=True)
    assert not _undefined_names(tree), f"{where} uses names it does not define: {_undefined_names(tree)}"
    signature = inspect.signature(KustoSaver.from_connection_string)
    named = {n for n, p in signature.parameters.items() if p.kind is not p.VAR_KEYWORD}
    accepted = named | {f.name for f in fields(EngineConfig)} | {"portal_backend"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_connection_string":
            keywords = {k.arg for k in node.keywords if k.arg is not None}
            assert keywords <= accepted, f"unknown keyword(s) {keywords - accepted} in {where}"
            assert len(node.args) <= 2, "cluster_uri and database are the only positional arguments"


def test_the_cluster_examples_call_from_connection_string() -> None:
    calls = sum(code.count(".from_connection_string(") for _, code in NO_RUN)
    assert calls >= 4


def _commands(code: str) -> list[list[str]]:
    """The simple commands of a bash block, as words (continuations joined, comments dropped)."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        cmd: list[str] = []
        for w in [*words, ";"]:
            if w in ("&&", "||", ";", "|"):
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(w)
    return out


@pytest.mark.parametrize("where,code", BASH, ids=_ids(BASH))
def test_bash_block_parses_and_its_load_tool_commands_parse(where: str, code: str) -> None:
    from langgraph.checkpoint.kusto.loadtests import cli

    bash = shutil.which("bash")
    assert bash is not None
    proc = subprocess.run([bash, "-n"], input=code, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{where}: {proc.stderr}"
    for cmd in _commands(code):
        args: list[str] | None = None
        if cmd[0] == "kusto-checkpoint-loadtest":
            args = cmd[1:]
        elif cmd[0].startswith("python") and cmd[1:3] == ["-m", LOADTEST]:
            args = cmd[3:]
        elif cmd[0].startswith("python") and cmd[1:2] == ["-m"] and cmd[2].startswith(LOADTEST + "."):
            assert importlib.util.find_spec(cmd[2]) is not None, f"{where}: no module {cmd[2]}"
        if args is not None:
            try:
                cli.build_parser().parse_args(args)
            except SystemExit as exc:  # argparse's usage error
                pytest.fail(f"{where}: the load tool refuses {shlex.join(cmd)} (exit {exc.code})")


KQL = _blocks("kql")


@pytest.mark.parametrize("where,code", KQL, ids=_ids(KQL))
def test_kql_block_parses_and_binds(where: str, code: str) -> None:
    from kql_checker import NODE_MISSING_REASON, check_kql, errors, format_diagnostics, node_available

    if not node_available():
        pytest.skip(NODE_MISSING_REASON)
    from langgraph.checkpoint.kusto.engine import agent_state

    # the database provision.kql creates holds the agent-state functions too
    functions = [{"name": f.name, "parameters": f.params, "body": f.body} for f in agent_state.FUNCTIONS]
    diagnostics = errors(check_kql([(where, code)], functions=functions)[where])
    assert not diagnostics, format_diagnostics(code, diagnostics)


# -- links ----------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`[^`\n]*`")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {_slug(h) for h in re.findall(r"^#{1,6}\s+(.*?)\s*$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_resolves(page: Path) -> None:
    text = INLINE_CODE.sub("", FENCE.sub("", page.read_text()))
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.relative_to(ROOT)}: the link {target} points nowhere"
        if anchor:
            assert dest.suffix == ".md", f"{page.relative_to(ROOT)}: an anchor into {dest.name}"
            assert anchor in _anchors(dest), (
                f"{page.relative_to(ROOT)}: no heading #{anchor} in {dest.relative_to(ROOT)}"
            )
