"""LangGraph objects to records and back: the CPU work, done in the caller.

``encode_*`` run in the task that calls the saver, before anything is sent to
an actor; ``decode_bundle`` runs after the reply. Actors only ever see strings
and bytes. Serialized values are the serde's ``(type, bytes)`` pairs, kept as
the type and the bytes themselves (the Kusto backend sends the bytes as base64
text, Kusto having no binary column type; the embedded store keeps BLOBs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    DeltaChannelHistory,
    get_checkpoint_metadata,
    writes_sort_key,
)
from langgraph.checkpoint.serde.base import SerializerProtocol

from .engine.errors import ConfigError, KustoCheckpointError
from .engine.reads import delta_walk
from .engine.records import (
    BlobRec,
    Bundle,
    CheckpointRec,
    WriteRec,
    encoded_len,
    json_bytes,
    now_us,
)


class SerializationError(KustoCheckpointError, TypeError):
    """A value could not be serialized; nothing of the call was stored."""


def _ident(value: Any, what: str, *, required: bool = True) -> str | None:
    """Ids are strings; ints and UUIDs are accepted and stored as their str()."""
    if value is None:
        if required:
            raise ConfigError(f"config['configurable']['{what}'] is required")
        return None
    if isinstance(value, str):
        return _utf8(value, f"config['configurable']['{what}']")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if type(value).__name__ == "UUID":
        return str(value)
    raise ConfigError(
        f"config['configurable']['{what}'] must be a string (or int/UUID), got {type(value).__name__}"
    )


def _utf8(value: str, what: str) -> str:
    """Every stored string must be valid Unicode (no lone surrogates): one that is not
    would fail its whole ingest batch, other threads' rows with it."""
    if value.isascii():  # the common case, checked without encoding
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(f"{what} is not valid Unicode ({exc.reason} at {exc.start}): {value!r:.80}") from None
    return value


def configurable(config: Any) -> Mapping[str, Any]:
    if not isinstance(config, Mapping):
        raise ConfigError(f"config must be a dict with a 'configurable' dict, got {type(config).__name__}")
    conf = config.get("configurable")
    if not isinstance(conf, Mapping):
        raise ConfigError("config['configurable'] must be a dict holding at least 'thread_id'")
    return conf


def ids_of(config: Any, *, thread_required: bool = True) -> tuple[str | None, str, str | None]:
    conf = configurable(config)
    tid = _ident(conf.get("thread_id"), "thread_id", required=thread_required)
    ns = conf.get("checkpoint_ns", "")
    if ns is None:
        ns = ""
    if not isinstance(ns, str):
        raise ConfigError(f"config['configurable']['checkpoint_ns'] must be a string, got {type(ns).__name__}")
    _utf8(ns, "config['configurable']['checkpoint_ns']")
    cid = _ident(conf.get("checkpoint_id"), "checkpoint_id", required=False)
    return tid, ns, cid or None


def _dump(serde: SerializerProtocol, value: Any, what: str) -> tuple[str, bytes]:
    try:
        type_, data = serde.dumps_typed(value)
    except Exception as exc:  # noqa: BLE001 - re-raised with the name of what failed
        raise SerializationError(
            f"cannot serialize {what} (a {type(value).__name__}): {exc}"
        ) from exc
    # kept as they are (no base64 in the caller); a bytearray or memoryview is copied
    # so the record cannot change under the engine
    return type_, data if type(data) is bytes else bytes(data)


def _load(serde: SerializerProtocol, type_: str, payload: bytes) -> Any:
    return serde.loads_typed((type_, payload))


def _mapping(value: Any, what: str, *, keys: str | None = None) -> Mapping[str, Any]:
    """``value`` must be a dict (with string keys when ``keys`` names them): bad input
    is refused here, in the caller, before anything reaches the engine."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{what} must be a dict, got {type(value).__name__}")
    if keys is not None:
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{what} must have string {keys}, got {type(k).__name__} {k!r}")
            _utf8(k, f"{what} key")
            if isinstance(v, str):
                _utf8(v, f"{what}[{k!r}]")
    return value


def _metadata_json(config: Any, metadata: CheckpointMetadata) -> bytes:
    _mapping(metadata, "metadata")
    try:
        meta = get_checkpoint_metadata(config, metadata)
    except (AttributeError, TypeError) as exc:
        raise ConfigError(f"config['metadata'] / config['configurable'] must be dicts: {exc}") from exc
    try:
        return json_bytes(meta)
    except TypeError as exc:
        bad = [k for k, v in meta.items() if not _jsonable(v)]
        raise SerializationError(
            f"checkpoint metadata must be JSON-serializable; key(s) {bad} are not: {exc}"
        ) from exc


def _jsonable(v: Any) -> bool:
    try:
        orjson.dumps(v, option=orjson.OPT_NON_STR_KEYS)
        return True
    except TypeError:
        return False


def encode_put(
    serde: SerializerProtocol,
    config: Any,
    checkpoint: Checkpoint,
    metadata: CheckpointMetadata,
    new_versions: ChannelVersions,
    cell_limit: int,
    stamp: Callable[[str], int] | None = None,
) -> tuple[list[BlobRec | CheckpointRec], dict[str, Any]]:
    """Records for one ``put``: the changed channels' blobs first, then the checkpoint.

    ``stamp(thread_id)`` gives the records' ``written_at`` (the engine's
    :class:`~.engine.clock.ThreadClock`; default: this host's clock)."""
    tid, ns, parent = ids_of(config)
    assert tid is not None
    if not isinstance(checkpoint, Mapping) or "id" not in checkpoint:
        raise ConfigError("checkpoint must be a Checkpoint dict with an 'id'")
    cid = _ident(checkpoint["id"], "checkpoint id")
    assert cid is not None
    _mapping(new_versions, "new_versions", keys="channel names")
    _mapping(checkpoint.get("channel_versions", {}), "checkpoint['channel_versions']", keys="channel names")
    c = dict(checkpoint)
    values: Mapping[str, Any] = _mapping(c.pop("channel_values", None) or {}, "checkpoint['channel_values']")
    written_at = stamp(tid) if stamp is not None else now_us()
    records: list[BlobRec | CheckpointRec] = []
    new_v: dict[str, str] = {}
    for ch, ver in new_versions.items():
        if ch in values:
            type_, payload = _dump(serde, values[ch], f"the value of channel {ch!r}")
        else:
            type_, payload = "empty", b""
        sver = str(ver)
        new_v[ch] = sver
        records.append(BlobRec(tid, ns, ch, sver, type_, payload, written_at))
    type_, payload = _dump(serde, c, "the checkpoint")
    if encoded_len(len(payload)) > cell_limit:
        raise SerializationError(
            f"the checkpoint body (without channel values) is {encoded_len(len(payload))} characters "
            f"of base64, over "
            f"cell_limit={cell_limit}: too many channels or versions in one checkpoint"
        )
    meta_json = _metadata_json(config, metadata)
    if len(meta_json) > cell_limit:
        raise SerializationError(f"checkpoint metadata is {len(meta_json)} bytes, over cell_limit={cell_limit}")
    run_id = orjson.loads(meta_json).get("run_id") if b'"run_id"' in meta_json else None
    records.append(
        CheckpointRec(
            thread_id=tid,
            checkpoint_ns=ns,
            checkpoint_id=cid,
            parent_checkpoint_id=parent or "",
            run_id=str(run_id) if run_id is not None else "",
            channel_versions={k: str(v) for k, v in checkpoint.get("channel_versions", {}).items()},
            new_versions=new_v,
            metadata_json=meta_json,
            payload_type=type_,
            payload=payload,
            written_at=written_at,
        )
    )
    next_config = {"configurable": {"thread_id": tid, "checkpoint_ns": ns, "checkpoint_id": cid}}
    return records, next_config


def encode_writes(
    serde: SerializerProtocol,
    config: Any,
    writes: Sequence[tuple[str, Any]],
    task_id: str,
    task_path: str,
    stamp: Callable[[str], int] | None = None,
) -> list[WriteRec]:
    tid, ns, cid = ids_of(config)
    assert tid is not None
    if cid is None:
        raise ConfigError("put_writes needs config['configurable']['checkpoint_id'] (the checkpoint the writes belong to)")
    if not isinstance(task_id, str):
        raise ConfigError(f"task_id must be a string, got {type(task_id).__name__}")
    _utf8(task_id, "task_id")
    if task_path is not None and not isinstance(task_path, str):
        raise ConfigError(f"task_path must be a string, got {type(task_path).__name__}")
    _utf8(task_path or "", "task_path")
    if isinstance(writes, (str, bytes, Mapping)) or not isinstance(writes, Sequence):
        raise ConfigError(f"writes must be a list of (channel, value) pairs, got {type(writes).__name__}")
    for w in writes:
        if not isinstance(w, (tuple, list)) or len(w) != 2 or not isinstance(w[0], str):
            raise ConfigError(f"writes must be (channel: str, value) pairs, got {w!r:.80}")
        _utf8(w[0], "a write's channel")
    written_at = stamp(tid) if stamp is not None else now_us()
    out = []
    for idx, (channel, value) in enumerate(writes):
        type_, payload = _dump(serde, value, f"the write to channel {channel!r}")
        out.append(
            WriteRec(
                tid, ns, cid, task_id, task_path or "", WRITES_IDX_MAP.get(channel, idx),
                channel, type_, payload, written_at,
            )
        )
    return out


def decode_bundle(serde: SerializerProtocol, bundle: Bundle) -> CheckpointTuple:
    c = bundle.checkpoint
    checkpoint: Checkpoint = _load(serde, c.payload_type, c.payload)
    values: dict[str, Any] = {}
    for ch, ver in checkpoint.get("channel_versions", {}).items():
        blob = bundle.blobs.get((ch, str(ver)))
        if blob is None or blob.payload_type == "empty":
            continue
        values[ch] = _load(serde, blob.payload_type, blob.payload)
    checkpoint["channel_values"] = values
    cfg = {"configurable": {"thread_id": c.thread_id, "checkpoint_ns": c.checkpoint_ns, "checkpoint_id": c.checkpoint_id}}
    parent = (
        {"configurable": {"thread_id": c.thread_id, "checkpoint_ns": c.checkpoint_ns, "checkpoint_id": c.parent_checkpoint_id}}
        if c.parent_checkpoint_id
        else None
    )
    return CheckpointTuple(
        config=cfg,  # type: ignore[arg-type]
        checkpoint=checkpoint,
        metadata=orjson.loads(c.metadata_json),
        parent_config=parent,  # type: ignore[arg-type]
        pending_writes=[(w.task_id, w.channel, _load(serde, w.payload_type, w.payload)) for w in bundle.writes],
    )


def delta_history(
    serde: SerializerProtocol,
    heads: Mapping[str, CheckpointRec],
    blobs: Mapping[tuple[str, str], BlobRec],
    writes: Mapping[str, Sequence[WriteRec]],
    target: str | None,
    channels: Sequence[str],
) -> dict[str, DeltaChannelHistory]:
    """``get_delta_channel_history``'s answer from what ``Engine.delta_history`` read,
    as LangGraph's InMemorySaver computes it: per channel, the writes on the chain,
    oldest first (within a checkpoint in ``writes_sort_key`` order), the seed's own
    writes included, and the seed itself."""
    chain, seeds = delta_walk(heads, blobs, target, channels)
    out: dict[str, DeltaChannelHistory] = {}
    for ch in channels:
        stop = seeds.get(ch)
        collected: list[Any] = []
        for cid in chain:  # newest first
            ws = [w for w in writes.get(cid, ()) if w.channel == ch]
            ws.sort(key=lambda w: writes_sort_key(w.task_path, w.task_id, w.idx), reverse=True)
            collected.extend(ws)
            if cid == stop:
                break
        entry: DeltaChannelHistory = {
            "writes": [(w.task_id, ch, _load(serde, w.payload_type, w.payload)) for w in reversed(collected)]
        }
        if stop is not None:
            blob = blobs[(ch, heads[stop].channel_versions[ch])]
            if not blob.complete:
                raise KustoCheckpointError(
                    f"the stored value of channel {ch!r} at checkpoint {stop} is still being ingested "
                    "(a chunk is missing); read again shortly"
                )
            entry["seed"] = _load(serde, blob.payload_type, blob.payload)
        out[ch] = entry
    return out


def metadata_matches(bundle: Bundle, filter: Mapping[str, Any]) -> bool:
    meta = orjson.loads(bundle.checkpoint.metadata_json)
    return all(meta.get(k) == v for k, v in filter.items())


def metadata_pushdown(filter: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """The part of a ``list`` filter the backend can evaluate: (key, text) for each
    string, integer or boolean value, as Kusto's ``tostring`` writes it. A match there is
    a superset of the exact one (``"1"`` and ``1`` read alike), which
    :func:`metadata_matches` then applies; other values (None, floats, lists, dicts) are
    matched only here."""
    out = []
    for k, v in filter.items():
        if not isinstance(k, str):
            continue
        if isinstance(v, bool):
            out.append((_utf8(k, "a filter key"), "true" if v else "false"))
        elif isinstance(v, int) and abs(v) < 2**63:
            out.append((_utf8(k, "a filter key"), str(v)))
        elif isinstance(v, str):
            out.append((_utf8(k, "a filter key"), _utf8(v, "a filter value")))
    return tuple(out)
