"""The two workloads, and how each is verified.

Everything an agent produces is a pure function of ``(thread_id, step)``, so the
state each thread must end with can be computed independently and compared
value by value with what a saver gives back.

* **graph**: a compiled LangGraph ``StateGraph`` with three nodes
  (``agent`` -> ``tool`` -> ``finish``) and a ``messages`` list reduced with
  ``operator.add``. A step is one ``ainvoke`` on the thread; every invoke
  continues the same thread, so the state (and each checkpointed blob) grows.
* **raw**: no graph; per step the saver gets ``aget_tuple`` (the latest
  checkpoint, with the pending write of the previous step), ``aput`` (a new
  checkpoint whose message list is the previous one plus that pending write and
  a new message) and ``aput_writes`` (a ~1 KB write against the new checkpoint).
"""

from __future__ import annotations

import asyncio
import hashlib
import operator
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, TypedDict

from langgraph.checkpoint.base import BaseCheckpointSaver, empty_checkpoint
from langgraph.checkpoint.base.id import uuid6

#: size of a tool result / raw pending write, in characters
PAYLOAD_SIZE = 1024
#: agents verified at once
VERIFY_CONCURRENCY = 32

WORKLOADS = ("graph", "raw")


# -- deterministic content ----------------------------------------------------


def _filler(thread_id: str, step: int, size: int = PAYLOAD_SIZE) -> str:
    """``size`` characters that depend on the thread and step (not compressible to a constant)."""
    seed = hashlib.sha256(f"{thread_id}/{step}".encode()).hexdigest()
    return (seed * (size // len(seed) + 1))[:size]


def user_message(thread_id: str, step: int) -> dict[str, Any]:
    return {"type": "human", "id": f"{thread_id}/{step}/user", "content": f"step {step}: look it up"}


def ai_message(thread_id: str, step: int) -> dict[str, Any]:
    return {
        "type": "ai",
        "id": f"{thread_id}/{step}/agent",
        "content": "",
        "tool_calls": [
            {"id": f"call-{step}", "name": "lookup", "args": {"query": f"q{step}"}, "type": "tool_call"}
        ],
        "response_metadata": {"model": "no-llm", "step": step},
    }


def tool_message(thread_id: str, step: int) -> dict[str, Any]:
    return {
        "type": "tool",
        "id": f"{thread_id}/{step}/tool",
        "tool_call_id": f"call-{step}",
        "name": "lookup",
        "content": _filler(thread_id, step),
    }


def final_message(thread_id: str, step: int) -> dict[str, Any]:
    return {"type": "ai", "id": f"{thread_id}/{step}/final", "content": f"answer {step}"}


# -- the graph workload ---------------------------------------------------------


class AgentState(TypedDict, total=False):
    messages: Annotated[list[dict[str, Any]], operator.add]
    thread: str
    step: int


def _step_of(state: AgentState) -> int:
    return state.get("step", 0)


async def _agent(state: AgentState) -> dict[str, Any]:
    return {"messages": [ai_message(state["thread"], _step_of(state))]}


async def _tool(state: AgentState) -> dict[str, Any]:
    return {"messages": [tool_message(state["thread"], _step_of(state))]}


async def _finish(state: AgentState) -> dict[str, Any]:
    step = _step_of(state)
    return {"messages": [final_message(state["thread"], step)], "step": step + 1}


def build_graph() -> Any:
    """The uncompiled ``StateGraph``: ``agent`` -> ``tool`` -> ``finish``."""
    from langgraph.graph import END, START, StateGraph

    builder = StateGraph(AgentState)
    builder.add_node("agent", _agent)
    builder.add_node("tool", _tool)
    builder.add_node("finish", _finish)
    builder.add_edge(START, "agent")
    builder.add_edge("agent", "tool")
    builder.add_edge("tool", "finish")
    builder.add_edge("finish", END)
    return builder


def graph_input(thread_id: str, step: int) -> dict[str, Any]:
    return {"messages": [user_message(thread_id, step)], "thread": thread_id}


def expected_graph_messages(thread_id: str, steps: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for s in range(steps):
        out += [user_message(thread_id, s), ai_message(thread_id, s), tool_message(thread_id, s), final_message(thread_id, s)]
    return out


def thread_config(thread_id: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread_id}}


async def graph_agent(graph: Any, thread_id: str, steps: int, on_step: Callable[[], None] | None = None) -> None:
    cfg = thread_config(thread_id)
    for step in range(steps):
        await graph.ainvoke(graph_input(thread_id, step), cfg)
        if on_step is not None:
            on_step()


# -- the raw workload -----------------------------------------------------------


def expected_raw_messages(thread_id: str, steps: int) -> list[dict[str, Any]]:
    """Messages of the latest checkpoint after ``steps`` steps (its pending write is the last tool message)."""
    out: list[dict[str, Any]] = []
    for s in range(steps):
        if s:
            out.append(tool_message(thread_id, s - 1))
        out.append(ai_message(thread_id, s))
    return out


class RawStepError(AssertionError):
    """A read inside the raw workload did not return what the agent had just written."""


async def raw_agent(
    saver: BaseCheckpointSaver, thread_id: str, steps: int, on_step: Callable[[], None] | None = None
) -> None:
    """get_tuple -> put -> put_writes, ``steps`` times, each step building on what was read."""
    cfg = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    version: Any = None
    last_id: str | None = None
    for step in range(steps):
        tup = await saver.aget_tuple(cfg)
        if step == 0:
            if tup is not None:
                raise RawStepError(f"{thread_id}: a new thread already has a checkpoint")
            messages: list[dict[str, Any]] = []
            parent = cfg
        else:
            if tup is None or tup.config["configurable"]["checkpoint_id"] != last_id:
                got = None if tup is None else tup.config["configurable"]["checkpoint_id"]
                raise RawStepError(f"{thread_id} step {step}: latest checkpoint is {got}, just wrote {last_id}")
            messages = list(tup.checkpoint["channel_values"].get("messages", []))
            messages += [value for _task, channel, value in tup.pending_writes if channel == "messages"]
            parent = tup.config
        messages.append(ai_message(thread_id, step))
        version = saver.get_next_version(version, None)
        checkpoint = empty_checkpoint()
        checkpoint["id"] = last_id = str(uuid6(clock_seq=step))
        checkpoint["channel_values"] = {"messages": messages}
        checkpoint["channel_versions"] = {"messages": version}
        checkpoint["versions_seen"] = {"agent": {"messages": version}}
        checkpoint["updated_channels"] = ["messages"]
        metadata = {"source": "loop", "step": step, "parents": {}, "thread": thread_id}
        next_cfg = await saver.aput(parent, checkpoint, metadata, {"messages": version})  # type: ignore[arg-type]
        await saver.aput_writes(next_cfg, [("messages", tool_message(thread_id, step))], f"tool-{step}")
        if on_step is not None:
            on_step()


# -- running and verifying --------------------------------------------------------


@dataclass
class RunOutcome:
    """What one workload run did (the write phase)."""

    ops: int = 0
    errors: list[str] = field(default_factory=list)


async def run_agents(
    thread_ids: Sequence[str], agent: Callable[[str], Awaitable[None]]
) -> RunOutcome:
    """All agents at once; an agent that raises stops there and is reported."""
    outcome = RunOutcome()

    async def one(tid: str) -> None:
        try:
            await agent(tid)
        except Exception as exc:  # noqa: BLE001 - reported, the other agents go on
            outcome.errors.append(f"{tid}: {type(exc).__name__}: {exc}")

    await asyncio.gather(*(one(t) for t in thread_ids))
    return outcome


@dataclass
class Verification:
    threads: int = 0
    ok: int = 0
    failed: int = 0
    #: checkpoints found by alist, summed over threads
    checkpoints: int = 0
    expected_checkpoints: int = 0
    messages: int = 0
    #: first few failure descriptions
    failures: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "threads": self.threads,
            "ok": self.ok,
            "failed": self.failed,
            "checkpoints": self.checkpoints,
            "expected_checkpoints": self.expected_checkpoints,
            "messages": self.messages,
            "failures": list(self.failures),
            "passed": self.threads > 0 and self.failed == 0,
        }


def _diff(got: list[Any], want: list[Any]) -> str:
    if len(got) != len(want):
        return f"{len(got)} messages, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            return f"message {i} differs: {str(g)[:80]!r} != {str(w)[:80]!r}"
    return "differs"


async def _count(saver: BaseCheckpointSaver, cfg: dict[str, Any]) -> int:
    n = 0
    async for _ in saver.alist(cfg):
        n += 1
    return n


async def verify_graph_thread(graph: Any, saver: BaseCheckpointSaver, thread_id: str, steps: int, expected_ckpts: int) -> tuple[list[str], int, int]:
    cfg = thread_config(thread_id)
    problems: list[str] = []
    state = await graph.aget_state(cfg)
    msgs = state.values.get("messages", [])
    want = expected_graph_messages(thread_id, steps)
    if msgs != want:
        problems.append(_diff(msgs, want))
    if state.values.get("step") != steps:
        problems.append(f"step is {state.values.get('step')}, expected {steps}")
    if state.next:
        problems.append(f"graph not finished, next={state.next}")
    n = await _count(saver, cfg)
    if n != expected_ckpts:
        problems.append(f"{n} checkpoints, expected {expected_ckpts}")
    return problems, n, len(msgs)


async def verify_raw_thread(saver: BaseCheckpointSaver, thread_id: str, steps: int, expected_ckpts: int) -> tuple[list[str], int, int]:
    cfg = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    problems: list[str] = []
    tup = await saver.aget_tuple(cfg)
    if tup is None:
        return ["no checkpoint"], await _count(saver, cfg), 0
    msgs = tup.checkpoint["channel_values"].get("messages", [])
    want = expected_raw_messages(thread_id, steps)
    if msgs != want:
        problems.append(_diff(msgs, want))
    writes = [(ch, v) for _t, ch, v in tup.pending_writes]
    if writes != [("messages", tool_message(thread_id, steps - 1))]:
        problems.append(f"pending writes: {len(writes)} (expected the last tool message)")
    if tup.metadata.get("step") != steps - 1:
        problems.append(f"latest checkpoint is step {tup.metadata.get('step')}, expected {steps - 1}")
    n = await _count(saver, cfg)
    if n != expected_ckpts:
        problems.append(f"{n} checkpoints, expected {expected_ckpts}")
    return problems, n, len(msgs)


async def verify_threads(
    thread_ids: Sequence[str],
    check: Callable[[str], Awaitable[tuple[list[str], int, int]]],
    expected_ckpts: int,
    *,
    concurrency: int = VERIFY_CONCURRENCY,
    keep_failures: int = 10,
) -> Verification:
    v = Verification(threads=len(thread_ids), expected_checkpoints=expected_ckpts * len(thread_ids))
    sem = asyncio.Semaphore(concurrency)

    async def one(tid: str) -> None:
        async with sem:
            try:
                problems, n, m = await check(tid)
            except Exception as exc:  # noqa: BLE001 - a failed read is a failed thread
                problems, n, m = [f"{type(exc).__name__}: {exc}"], 0, 0
        v.checkpoints += n
        v.messages += m
        if problems:
            v.failed += 1
            if len(v.failures) < keep_failures:
                v.failures.append(f"{tid}: " + "; ".join(problems))
        else:
            v.ok += 1

    await asyncio.gather(*(one(t) for t in thread_ids))
    return v


async def reference_checkpoints_per_thread(workload: str, steps: int) -> int:
    """Checkpoints one thread of ``steps`` steps writes, measured on an InMemorySaver.

    LangGraph decides how many checkpoints an invoke writes (input, one per
    superstep...); measuring it keeps the expectation right across versions.
    """
    from langgraph.checkpoint.memory import InMemorySaver

    saver = InMemorySaver()
    tid = "reference"
    if workload == "graph":
        graph = build_graph().compile(checkpointer=saver)
        await graph_agent(graph, tid, steps)
        return await _count(saver, thread_config(tid))
    await raw_agent(saver, tid, steps)
    return await _count(saver, {"configurable": {"thread_id": tid, "checkpoint_ns": ""}})
