"""The two workloads, and how each is verified.

Everything an agent produces is a pure function of ``(thread_id, step)``, so the
state each thread must end with can be computed independently and compared
value by value with what a saver gives back.

* **graph**: a compiled LangGraph ``StateGraph``: ``agent`` -> ``fanout``
  parallel tool nodes -> ``finish``, and a ``messages`` list reduced with
  ``operator.add``. A step is one ``ainvoke`` on the thread; every invoke
  continues the same thread, so the state (and each checkpointed blob) grows.
* **raw**: no graph; per step the saver gets ``aget_tuple`` (the latest
  checkpoint, with the pending writes of the previous step), ``aput`` (a new
  checkpoint whose message list is the previous one plus those pending writes
  and a new message) and ``fanout`` x ``aput_writes`` (one ~1 KB write each,
  as LangGraph writes one call per task).

The :class:`Shape` sets the size of each tool result (``payload_bytes``), the
fan-out, and whether the message list grows step after step (``growth``) or
keeps only the latest step (a bounded state).
"""

from __future__ import annotations

import asyncio
import hashlib
import operator
import time
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


@dataclass(frozen=True)
class Shape:
    """What each step writes."""

    #: characters of each tool result (graph) / pending write (raw)
    payload_bytes: int = PAYLOAD_SIZE
    #: parallel tool calls per step (graph: parallel nodes; raw: aput_writes calls)
    fanout: int = 1
    #: True: the message list accumulates over the steps; False: only the latest step is kept
    growth: bool = True

    def validate(self) -> None:
        if self.payload_bytes < 1 or self.fanout < 1:
            raise ValueError("payload_bytes and fanout must be at least 1")

    @property
    def messages_per_step(self) -> int:
        """Graph: user, agent, one per tool, final."""
        return 3 + self.fanout


DEFAULT_SHAPE = Shape()


# -- deterministic content ----------------------------------------------------


def _filler(thread_id: str, step: int, size: int = PAYLOAD_SIZE) -> str:
    """``size`` characters that depend on the thread and step (not compressible to a constant)."""
    seed = hashlib.sha256(f"{thread_id}/{step}".encode()).hexdigest()
    return (seed * (size // len(seed) + 1))[:size]


def user_message(thread_id: str, step: int) -> dict[str, Any]:
    return {"type": "human", "id": f"{thread_id}/{step}/user", "content": f"step {step}: look it up"}


def _call_id(step: int, k: int) -> str:
    return f"call-{step}" if k == 0 else f"call-{step}-{k}"


def ai_message(thread_id: str, step: int, fanout: int = 1) -> dict[str, Any]:
    return {
        "type": "ai",
        "id": f"{thread_id}/{step}/agent",
        "content": "",
        "tool_calls": [
            {"id": _call_id(step, k), "name": "lookup", "args": {"query": f"q{step}"}, "type": "tool_call"}
            for k in range(fanout)
        ],
        "response_metadata": {"model": "no-llm", "step": step},
    }


def tool_message(thread_id: str, step: int, k: int = 0, size: int = PAYLOAD_SIZE) -> dict[str, Any]:
    return {
        "type": "tool",
        "id": f"{thread_id}/{step}/tool" + (f"{k}" if k else ""),
        "tool_call_id": _call_id(step, k),
        "name": "lookup",
        "content": _filler(f"{thread_id}#{k}" if k else thread_id, step, size),
    }


def tool_messages(thread_id: str, step: int, shape: Shape) -> list[dict[str, Any]]:
    return [tool_message(thread_id, step, k, shape.payload_bytes) for k in range(shape.fanout)]


def final_message(thread_id: str, step: int) -> dict[str, Any]:
    return {"type": "ai", "id": f"{thread_id}/{step}/final", "content": f"answer {step}"}


# -- the graph workload ---------------------------------------------------------


def _step_of(state: dict[str, Any]) -> int:
    return state.get("step", 0)


def _tool_node_name(k: int, fanout: int) -> str:
    # LangGraph applies parallel writes in node-name order: zero-pad so it is k's order
    return "tool" if fanout == 1 else f"tool_{k:03d}"


def build_graph(shape: Shape = DEFAULT_SHAPE) -> Any:
    """The uncompiled ``StateGraph``: ``agent`` -> ``fanout`` tool nodes in parallel -> ``finish``."""
    from langgraph.graph import END, START, StateGraph

    window = shape.messages_per_step

    def keep_latest_step(old: list[Any], new: list[Any]) -> list[Any]:
        return (old + new)[-window:]

    reducer = operator.add if shape.growth else keep_latest_step

    # functional form: the reducer is a local, which string annotations could not see
    AgentState = TypedDict(  # type: ignore[misc]  # noqa: UP013
        "AgentState",
        {"messages": Annotated[list[dict[str, Any]], reducer], "thread": str, "step": int},
        total=False,
    )

    async def agent(state: AgentState) -> dict[str, Any]:
        return {"messages": [ai_message(state["thread"], _step_of(state), shape.fanout)]}

    def make_tool(k: int) -> Callable[[AgentState], Awaitable[dict[str, Any]]]:
        async def tool(state: AgentState) -> dict[str, Any]:
            return {"messages": [tool_message(state["thread"], _step_of(state), k, shape.payload_bytes)]}

        return tool

    async def finish(state: AgentState) -> dict[str, Any]:
        step = _step_of(state)
        return {"messages": [final_message(state["thread"], step)], "step": step + 1}

    builder = StateGraph(AgentState)
    builder.add_node("agent", agent)
    tools = [_tool_node_name(k, shape.fanout) for k in range(shape.fanout)]
    for k, name in enumerate(tools):
        builder.add_node(name, make_tool(k))
        builder.add_edge("agent", name)
    builder.add_node("finish", finish)
    builder.add_edge(START, "agent")
    builder.add_edge(tools if len(tools) > 1 else tools[0], "finish")
    builder.add_edge("finish", END)
    return builder


def graph_input(thread_id: str, step: int) -> dict[str, Any]:
    return {"messages": [user_message(thread_id, step)], "thread": thread_id}


def expected_graph_messages(thread_id: str, steps: int, shape: Shape = DEFAULT_SHAPE) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for s in range(steps) if shape.growth else range(steps - 1, steps):
        out += [user_message(thread_id, s), ai_message(thread_id, s, shape.fanout)]
        out += tool_messages(thread_id, s, shape)
        out.append(final_message(thread_id, s))
    return out


def thread_config(thread_id: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread_id}}


#: called after each step with its duration in seconds
OnStep = Callable[[float], None]


def run_config(thread_id: str, step: int) -> dict[str, Any]:
    """Each invocation is one run, its id in the checkpoints' metadata, as LangGraph's
    server records it (what ``delete_for_runs`` and the ``runs()`` question read)."""
    return {**thread_config(thread_id), "metadata": {"run_id": f"{thread_id}:run-{step}"}}


async def graph_agent(graph: Any, thread_id: str, steps: int, on_step: OnStep | None = None) -> None:
    clock = time.perf_counter
    for step in range(steps):
        t0 = clock()
        await graph.ainvoke(graph_input(thread_id, step), run_config(thread_id, step))
        if on_step is not None:
            on_step(clock() - t0)


# -- the raw workload -----------------------------------------------------------


def expected_raw_messages(thread_id: str, steps: int, shape: Shape = DEFAULT_SHAPE) -> list[dict[str, Any]]:
    """Messages of the latest checkpoint after ``steps`` steps (its pending writes are the last tool messages)."""
    out: list[dict[str, Any]] = []
    for s in range(steps):
        if not shape.growth:
            out = []
        if s:
            out += tool_messages(thread_id, s - 1, shape)
        out.append(ai_message(thread_id, s, shape.fanout))
    return out


def _task_id(step: int, k: int) -> str:
    return f"tool-{step}" if k == 0 else f"tool-{step}-{k:03d}"


class RawStepError(AssertionError):
    """A read inside the raw workload did not return what the agent had just written."""


async def raw_agent(
    saver: BaseCheckpointSaver,
    thread_id: str,
    steps: int,
    on_step: OnStep | None = None,
    shape: Shape = DEFAULT_SHAPE,
) -> None:
    """get_tuple -> put -> put_writes (x fanout), ``steps`` times, each step building on what was read."""
    cfg = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    version: Any = None
    last_id: str | None = None
    clock = time.perf_counter
    for step in range(steps):
        t0 = clock()
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
            messages = list(tup.checkpoint["channel_values"].get("messages", [])) if shape.growth else []
            pending = sorted(tup.pending_writes, key=lambda w: w[0])  # task ids sort in k's order
            messages += [value for _task, channel, value in pending if channel == "messages"]
            parent = tup.config
        messages.append(ai_message(thread_id, step, shape.fanout))
        version = saver.get_next_version(version, None)
        checkpoint = empty_checkpoint()
        checkpoint["id"] = last_id = str(uuid6(clock_seq=step))
        checkpoint["channel_values"] = {"messages": messages}
        checkpoint["channel_versions"] = {"messages": version}
        checkpoint["versions_seen"] = {"agent": {"messages": version}}
        checkpoint["updated_channels"] = ["messages"]
        metadata = {"source": "loop", "step": step, "parents": {}, "thread": thread_id}
        next_cfg = await saver.aput(parent, checkpoint, metadata, {"messages": version})  # type: ignore[arg-type]
        for k, msg in enumerate(tool_messages(thread_id, step, shape)):
            await saver.aput_writes(next_cfg, [("messages", msg)], _task_id(step, k))
        if on_step is not None:
            on_step(clock() - t0)


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


async def verify_graph_thread(
    graph: Any, saver: BaseCheckpointSaver, thread_id: str, steps: int, expected_ckpts: int,
    shape: Shape = DEFAULT_SHAPE,
) -> tuple[list[str], int, int]:
    cfg = thread_config(thread_id)
    problems: list[str] = []
    state = await graph.aget_state(cfg)
    msgs = state.values.get("messages", [])
    want = expected_graph_messages(thread_id, steps, shape)
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


async def verify_raw_thread(
    saver: BaseCheckpointSaver, thread_id: str, steps: int, expected_ckpts: int, shape: Shape = DEFAULT_SHAPE
) -> tuple[list[str], int, int]:
    cfg = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    problems: list[str] = []
    tup = await saver.aget_tuple(cfg)
    if tup is None:
        return ["no checkpoint"], await _count(saver, cfg), 0
    msgs = tup.checkpoint["channel_values"].get("messages", [])
    want = expected_raw_messages(thread_id, steps, shape)
    if msgs != want:
        problems.append(_diff(msgs, want))
    writes = [(ch, v) for _t, ch, v in sorted(tup.pending_writes, key=lambda w: w[0])]
    if writes != [("messages", m) for m in tool_messages(thread_id, steps - 1, shape)]:
        problems.append(f"pending writes: {len(writes)} (expected the last step's {shape.fanout} tool message(s))")
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


async def reference_checkpoints_per_thread(workload: str, steps: int, shape: Shape = DEFAULT_SHAPE) -> int:
    """Checkpoints one thread of ``steps`` steps writes, measured on an InMemorySaver.

    LangGraph decides how many checkpoints an invoke writes (input, one per
    superstep...); measuring it keeps the expectation right across versions.
    """
    from langgraph.checkpoint.memory import InMemorySaver

    saver = InMemorySaver()
    tid = "reference"
    if workload == "graph":
        graph = build_graph(shape).compile(checkpointer=saver)
        await graph_agent(graph, tid, steps)
        return await _count(saver, thread_config(tid))
    await raw_agent(saver, tid, steps, shape=shape)
    return await _count(saver, {"configurable": {"thread_id": tid, "checkpoint_ns": ""}})
