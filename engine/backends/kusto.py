"""The production store: Azure Data Explorer (Kusto) through the azure-kusto SDKs.

* Queries and control commands go through ``azure.kusto.data.KustoClient`` (the
  sync client), run in worker threads (``anyio.to_thread``) behind a bounded
  limiter, so the engine works the same on asyncio and trio.
* Every parameter value reaches Kusto as a KQL literal in the request's
  ``Parameters`` (``declare query_parameters`` in the text), written by
  :func:`encode_parameter`: strings as double-quoted literals with escapes,
  ``dynamic(<json>)``, ``datetime(2024-05-06T07:08:09.1234560Z)``, ``bool(true)``,
  ``long(5)``. Nothing a user supplies is ever spliced into KQL text.
* Rows are ingested as JSON lines (``multijson``) through the table's JSON
  ingestion mapping (``schema.mapping_name``) with the streaming, managed-streaming
  or queued ingest client, or (``ingest_mode="inline"``, for the Kusto emulator,
  which has no streaming or queued ingestion) with ``.ingest inline`` commands. A
  batch is split so one request stays under ``max_request_bytes`` (uncompressed;
  the streaming limit is 4 MB).
* Compaction's ``.delete table Checkpoints records`` is followed by the same
  deletion on the ``LatestCheckpoints`` materialized view when it exists: a soft
  delete on a view's source table does not reach rows the view already holds.
* SDK failures become :class:`TransientBackendError` (throttling, network errors,
  timeouts, 5xx and other non-permanent service errors: the ingestor retries them)
  or :class:`PermanentBackendError` (missing table or mapping, bad request, auth),
  whose message says what to fix.
* :meth:`KustoBackend.setup` checks the database against ``engine/schema.py`` and
  reports everything missing or different; ``setup(create=True)`` first runs
  ``provision.kql`` command by command.

Secrets (connection strings, keys, tokens) never appear in ``repr``, logs or the
exceptions raised here.
"""

from __future__ import annotations

import copy
import datetime as dt
import gzip
import importlib.resources
import io
import json
import logging
import math
import random
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import orjson

from ..errors import ConfigError, PermanentBackendError, TransientBackendError
from ..kql import kql_string_literal
from ..records import JsonText, b64encode, us_to_datetime
from ..schema import CHECKPOINTS, DATETIME, DYNAMIC, LATEST_VIEW, TABLES, TABLES_BY_NAME, Table, mapping_name
from .kusto_status import QueuedIngestion, StatusWatch

log = logging.getLogger(__name__)

INGEST_MODES = ("streaming", "managed", "queued", "inline")

#: Kusto entity names: letters, digits, underscores, spaces, dots and dashes
_ENTITY_NAME = re.compile(r"[\w .-]{1,1024}")

#: one streaming ingest request carries at most 4 MB; keep a margin for the envelope
_STREAMING_LIMIT = 4 * 1024 * 1024
DEFAULT_MAX_REQUEST_BYTES = _STREAMING_LIMIT - 64 * 1024
#: seconds a queued ingestion may wait for its status report: Kusto's default batching
#: policy seals a batch after 5 minutes, provision.kql's after 30 s; then processing
DEFAULT_STATUS_TIMEOUT = 900.0

_UTC = dt.timezone.utc
_PROVISION_HINT = "run provision.kql against the database, or call setup(create=True) (needs Database Admin)"

#: the service's longest request (servertimeout): one hour
MAX_REQUEST_SECONDS = 3600.0

#: streaming ingestion takes "6 concurrent ingestion requests per core" of the cluster
#: (12 on a 2-core SKU: https://learn.microsoft.com/azure/data-explorer/ingest-data-streaming);
#: a saver on Kusto sends at most this many batches at once unless told otherwise, half
#: of the smallest SKU's share, so two replicas fit it (docs/kusto.md: sizing)
DEFAULT_INGEST_CONCURRENCY = 6

#: the host suffix of a Microsoft Fabric Eventhouse's query URI
FABRIC_HOST_SUFFIX = ".kusto.fabric.microsoft.com"

#: run after provisioning (https://learn.microsoft.com/kusto/management/data-ingestion/clear-schema-cache-command)
CLEAR_STREAMING_SCHEMA_CACHE = ".clear database cache streamingingestion schema"

#: provision.kql commands that Microsoft Fabric may refuse without the saver losing
#: anything it needs: policies and the dashboards' materialized view (tables and
#: mappings must succeed)
_FABRIC_OPTIONAL = re.compile(r"\.(?:alter|alter-merge)\s+(?:table|database|materialized-view)\s+\S+\s+policy\b|\.create\s+ifnotexists\s+materialized-view\b")


# ---------------------------------------------------------------------------
# Parameters: Python values as the KQL literals Kusto parses
# ---------------------------------------------------------------------------

_KIND_ALIASES = {
    "string": "string", "long": "long", "int64": "long", "int": "int", "int32": "int",
    "bool": "bool", "boolean": "bool", "datetime": "datetime", "date": "datetime",
    "dynamic": "dynamic", "real": "real", "double": "real", "timespan": "timespan",
    "time": "timespan", "guid": "guid", "uuid": "guid", "uniqueid": "guid", "decimal": "decimal",
}


def kusto_datetime_text(value: dt.datetime | int) -> str:
    """ISO 8601 UTC with 7 fractional digits (Kusto's precision): ``2024-05-06T07:08:09.1234560Z``.

    An int is epoch microseconds; a naive datetime is UTC."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = us_to_datetime(value)
    if not isinstance(value, dt.datetime):
        raise TypeError(f"expected a datetime or epoch microseconds, got {type(value).__name__}")
    if value.tzinfo is not None:
        value = value.astimezone(_UTC).replace(tzinfo=None)
    return (
        f"{value.year:04d}-{value.month:02d}-{value.day:02d}T{value.hour:02d}:{value.minute:02d}:"
        f"{value.second:02d}.{value.microsecond:06d}0Z"
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, JsonText):
        return orjson.Fragment(bytes(value))
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _dumps(value: Any) -> bytes:
    if isinstance(value, JsonText):
        return bytes(value)
    return orjson.dumps(value, default=_json_default)


def _infer_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "long"
    if isinstance(value, float):
        return "real"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dt.datetime):
        return "datetime"
    if isinstance(value, dt.timedelta):
        return "timespan"
    return "dynamic"


def encode_parameter(value: Any, kind: str | None = None) -> str:
    """``value`` as the ``Parameters`` string Kusto parses for a parameter of ``kind``.

    Every value is a KQL literal: ``"a \\"b\\""``, ``long(5)``, ``bool(true)``,
    ``datetime(2024-05-06T07:08:09.1234560Z)``, ``dynamic(["a", 1])``, ``real(1.5)``,
    ``timespan(...)``, ``guid(...)``. ``kind`` is the declared type (inferred from the
    Python type when None). Raises ``TypeError``/``ValueError`` for a value that does not
    fit its kind.
    """
    kind = _KIND_ALIASES.get((kind or _infer_kind(value)).lower())
    if kind is None:
        raise ValueError("unsupported parameter type")
    if value is None:
        return '""' if kind == "string" else f"{kind}(null)"
    if kind == "string":
        if not isinstance(value, str):
            raise TypeError(f"a string parameter needs a str, got {type(value).__name__}")
        return kql_string_literal(value)
    if kind in ("long", "int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"a {kind} parameter needs an int, got {type(value).__name__}")
        return f"{kind}({value})"
    if kind == "bool":
        if not isinstance(value, bool):
            raise TypeError(f"a bool parameter needs a bool, got {type(value).__name__}")
        return "bool(true)" if value else "bool(false)"
    if kind == "datetime":
        return f"datetime({kusto_datetime_text(value)})"
    if kind == "dynamic":
        return f"dynamic({_dumps(value).decode()})"
    if kind == "real":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"a real parameter needs a number, got {type(value).__name__}")
        f = float(value)
        if math.isnan(f):
            return "real(nan)"
        if math.isinf(f):
            return "real(+inf)" if f > 0 else "real(-inf)"
        return f"real({f!r})"
    if kind == "timespan":
        if not isinstance(value, dt.timedelta):
            raise TypeError(f"a timespan parameter needs a timedelta, got {type(value).__name__}")
        ticks = (value.days * 86_400 + value.seconds) * 10_000_000 + value.microseconds * 10
        sign, ticks = ("-" if ticks < 0 else ""), abs(ticks)
        days, rest = divmod(ticks, 864_000_000_000)
        hours, rest = divmod(rest, 36_000_000_000)
        minutes, rest = divmod(rest, 600_000_000)
        seconds, frac = divmod(rest, 10_000_000)
        return f"timespan({sign}{days}.{hours:02}:{minutes:02}:{seconds:02}.{frac:07})"
    if kind == "guid":
        import uuid

        return f"guid({uuid.UUID(str(value))})"
    if kind == "decimal":
        return f"decimal({value})"
    raise ValueError("unsupported parameter type")  # pragma: no cover


_DECLARE = re.compile(r"declare\s+query_parameters\s*\(", re.I)


def declared_parameters(kql: str) -> dict[str, tuple[str, bool]]:
    """``{name: (type, has_default)}`` for every ``declare query_parameters(...)`` in ``kql``."""
    out: dict[str, tuple[str, bool]] = {}
    for m in _DECLARE.finditer(kql):
        i, depth, quote, start = m.end(), 1, "", m.end()
        items: list[str] = []
        while i < len(kql) and depth:
            ch = kql[i]
            if quote:
                if ch == "\\":
                    i += 1
                elif ch == quote:
                    quote = ""
            elif ch in "'\"":
                quote = ch
            elif ch in "([{":
                depth += 1
            elif ch in ")]}":
                depth -= 1
                if depth == 0:
                    items.append(kql[start:i])
            elif ch == "," and depth == 1:
                items.append(kql[start:i])
                start = i + 1
            i += 1
        for item in items:
            head, eq, _default = item.partition("=")
            name, colon, kind = head.partition(":")
            name, kind = name.strip(), kind.strip().lower()
            if name and colon:
                out[name] = (kind, bool(eq))
    return out


# ---------------------------------------------------------------------------
# Rows -> JSON lines
# ---------------------------------------------------------------------------


def row_to_json(spec: Table, row: Mapping[str, Any]) -> bytes:
    """One row as one JSON object, in the shape the table's JSON mapping reads."""
    doc: dict[str, Any] = {}
    for col, kind in spec.columns:
        v = row.get(col)
        if v is None:
            doc[col] = None
        elif kind == DYNAMIC:
            doc[col] = orjson.Fragment(bytes(v)) if isinstance(v, JsonText) else v
        elif kind == DATETIME:
            doc[col] = v if isinstance(v, str) else kusto_datetime_text(v)
        elif isinstance(v, (bytes, bytearray, memoryview)):
            doc[col] = b64encode(bytes(v))  # a payload: Kusto has no binary type
        else:
            doc[col] = v
    return orjson.dumps(doc, default=_json_default)


#: Kusto's default MaxValueSize of a string column, in bytes of UTF-8 (base64 text: one
#: byte a character): a longer value is truncated at ingestion and the ingestion succeeds
DEFAULT_MAX_VALUE_SIZE = 1_048_576


def split_payloads(lines: Sequence[bytes], max_bytes: int) -> list[bytes]:
    """JSON lines grouped into request bodies of at most ``max_bytes`` each (a single
    line larger than that goes alone: the service decides what to do with it)."""
    out: list[bytes] = []
    current: list[bytes] = []
    size = 0
    for line in lines:
        n = len(line) + 1
        if current and size + n > max_bytes:
            out.append(b"\n".join(current))
            current, size = [], 0
        current.append(line)
        size += n
    if current:
        out.append(b"\n".join(current))
    return out


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def _status_of(exc: BaseException) -> int | None:
    resp = getattr(exc, "http_response", None)
    if resp is None:
        return None
    status = getattr(resp, "status_code", None)
    if status is None:
        status = getattr(resp, "status", None)
    return status if isinstance(status, int) else None


def _describe(exc: BaseException) -> str:
    """What the service said, without anything from the connection string."""
    from azure.kusto.data.exceptions import KustoApiError, KustoMultiApiError

    if isinstance(exc, KustoApiError):
        err = exc.get_api_error()
        text = err.description or err.message or str(exc)
        return f"{err.code}: {text}" if err.code else text
    if isinstance(exc, KustoMultiApiError):
        return "; ".join(f"{e.code}: {e.description or e.message}" for e in exc.get_api_errors()) or str(exc)
    return str(exc) or type(exc).__name__


def _is_transient_api(exc: BaseException) -> bool:
    from azure.kusto.data.exceptions import KustoApiError, KustoMultiApiError

    status = _status_of(exc)
    if isinstance(exc, KustoApiError):
        permanent = exc.get_api_error().permanent
        if permanent is not None:
            return not permanent
    elif isinstance(exc, KustoMultiApiError):
        errs = exc.get_api_errors()
        if errs and all(e.permanent is False for e in errs):
            return True
        if errs and any(e.permanent for e in errs):
            return False
    return status is None or status >= 500 or status in (408, 429)


def _endpoint_of(exc: BaseException) -> str | None:
    """The scheme, host and port the failed request went to, when the SDK's exception says."""
    endpoint = getattr(exc, "endpoint", None)  # KustoNetworkError
    if isinstance(endpoint, str) and endpoint:
        return _safe_uri(endpoint)
    for resp in (getattr(exc, "http_response", None), *getattr(exc, "args", ())):
        url = getattr(resp, "url", None)
        if url:
            return _safe_uri(str(url))
    return None


def _network_cause(exc: BaseException) -> str:
    """What went wrong on the wire, from the innermost exception the SDK chained:
    ``connection refused (ConnectionRefusedError)``, ``timed out (ReadTimeout)``..."""
    import socket
    import ssl

    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain and len(chain) < 20:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    root = chain[-1]
    names = {type(e).__name__ for e in chain}
    if isinstance(root, ConnectionRefusedError):
        what = "connection refused"
    elif isinstance(root, socket.gaierror):
        what = "host name not resolved (DNS)"
    elif isinstance(root, ssl.SSLError):
        what = "TLS handshake failed"
    elif isinstance(root, TimeoutError) or any("Timeout" in n for n in names):
        what = "no answer in time (timed out)"
    elif names & {"RemoteDisconnected", "IncompleteRead"}:
        what = "connection closed without an answer"
    elif isinstance(root, ConnectionResetError):
        what = "connection reset"
    elif isinstance(root, ConnectionError) or "ProtocolError" in names:
        what = "connection closed without an answer"
    else:
        what = (str(root).strip().splitlines() or ["network error"])[0][:200]
    return f"{what} ({type(root).__name__})"


def map_error(
    exc: BaseException, *, database: str, action: str, table: str | None = None, host: str | None = None
) -> Exception:
    """An SDK exception as TransientBackendError or PermanentBackendError (not raised). The
    message's first line names the request, its endpoint (scheme, host and port only: the
    one the SDK reports, else ``host``) and the cause: ``query to https://c.kusto.windows.net
    (database db) failed: connection refused (ConnectionRefusedError)``."""
    from azure.kusto.data.exceptions import (
        KustoAuthenticationError,
        KustoClientError,
        KustoClosedError,
        KustoNetworkError,
        KustoServiceError,
        KustoThrottlingError,
    )

    where = _endpoint_of(exc) or (_safe_uri(host) if host else "Kusto")
    head = f"{action} to {where} (database {database}) failed"
    if isinstance(exc, KustoThrottlingError):
        return TransientBackendError(f"{head}: Kusto throttled the {action} (HTTP 429); retry later")
    if isinstance(exc, KustoNetworkError):
        return TransientBackendError(
            f"{head}: {_network_cause(exc)}: network error or timeout during the {action} (the "
            "connection failed, was dropped or did not answer in time)"
        )
    if isinstance(exc, KustoClosedError):
        return PermanentBackendError(f"{head}: the Kusto backend is closed")
    if isinstance(exc, KustoAuthenticationError):
        return PermanentBackendError(
            f"{head}: authentication with Kusto failed ({exc.authentication_method}): check the "
            "credential (DefaultAzureCredential: az login, managed identity or AZURE_* environment "
            "variables) and the cluster URI"
        )
    if isinstance(exc, KustoServiceError):
        status = _status_of(exc)
        what = _describe(exc)
        if status in (401, 403):
            return PermanentBackendError(
                f"{head}: Kusto refused the {action} (HTTP {status}, not authorized) on database {database!r}: "
                "grant the identity Database Viewer and Database Ingestor (Database Admin for "
                "setup(create=True) and compaction); check the credential"
            )
        if status == 404 and action.startswith("ingestion"):
            return PermanentBackendError(
                f"{head}: the streaming ingestion endpoint does not exist: enable streaming ingestion on "
                f"the cluster, or use ingest_mode='queued' ({what})"
            )
        if _is_transient_api(exc):
            code = f"HTTP {status}" if status else "no HTTP status"
            return TransientBackendError(f"{head}: Kusto failed the {action} ({code}), retryable: {what}")
        low = what.lower()
        if "mapping" in low and ("not found" in low or "wasn't found" in low or "was not found" in low):
            mp = mapping_name(table) if table else "the JSON ingestion mapping"
            return PermanentBackendError(
                f"{head}: the ingestion mapping {mp!r} is missing on table {table!r} in database "
                f"{database!r}: {_PROVISION_HINT} ({what})"
            )
        if "streamingingestionpolicynotenabled" in low or "streaming ingestion policy" in low:
            return PermanentBackendError(
                f"{head}: streaming ingestion is not enabled for table {table!r}: {_PROVISION_HINT}, and "
                f"enable streaming ingestion on the cluster, or use ingest_mode='queued' ({what})"
            )
        if ("database" in low and ("not found" in low or "was not found" in low)) and "kind 'database'" in low:
            return PermanentBackendError(
                f"{head}: database {database!r} was not found: check database= and the cluster URI ({what})"
            )
        if (
            ("kind 'table'" in low and "not found" in low)
            or "failed to resolve table" in low
            or "could not be resolved" in low
            or "unknown table" in low
            or ("table" in low and "could not be found" in low)
            or ("table" in low and "does not exist" in low)
        ):
            return PermanentBackendError(
                f"{head}: a table the {action} needs is missing in database {database!r}: {_PROVISION_HINT} ({what})"
            )
        return PermanentBackendError(
            f"{head}: Kusto rejected the {action} (HTTP {status}): {what.rstrip('.')}. If the schema is "
            f"out of date, {_PROVISION_HINT}"
        )
    if isinstance(exc, KustoClientError):
        return PermanentBackendError(f"{head}: the Kusto client could not run it: {type(exc).__name__}: {exc}")
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return TransientBackendError(f"{head}: {_network_cause(exc)}: network error during the {action}")
    return PermanentBackendError(f"{head}: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------
# Schema check
# ---------------------------------------------------------------------------


class SchemaError(PermanentBackendError):
    """The database does not match engine/schema.py; ``report`` lists every difference."""

    def __init__(self, report: SchemaReport) -> None:
        self.report = report
        super().__init__(str(report))


@dataclass
class SchemaReport:
    """What :meth:`KustoBackend.setup` found: ``problems`` stop the saver from working,
    ``warnings`` do not."""

    database: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: commands run by setup(create=True), in order
    commands_run: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        if self.ok:
            head = f"database {self.database!r} matches the langgraph-checkpoint-kusto schema"
        else:
            head = (
                f"database {self.database!r} does not match the langgraph-checkpoint-kusto schema "
                f"({len(self.problems)} problem(s)); {_PROVISION_HINT}:"
            )
        lines = [head] + [f"  - {p}" for p in self.problems]
        if self.warnings:
            lines.append("warnings:")
            lines += [f"  - {w}" for w in self.warnings]
        return "\n".join(lines)


def _mapping_path_column(path: Any) -> str | None:
    if not isinstance(path, str):
        return None
    m = re.fullmatch(r"\$\.([A-Za-z_][\w]*)|\$\[\s*'([^']*)'\s*\]|\$\[\s*\"([^\"]*)\"\s*\]", path.strip())
    if m is None:
        return None
    return next(g for g in m.groups() if g is not None)


def check_mapping(spec: Table, mapping_text: str) -> list[str]:
    """Differences between a JSON mapping (as ``.show ... ingestion json mappings`` shows
    it) and what the table's columns need: every column from ``$.<column>``."""
    name = mapping_name(spec.name)
    try:
        entries = json.loads(mapping_text)
    except ValueError:
        return [f"mapping {name!r} on table {spec.name}: not valid JSON"]
    if not isinstance(entries, list):
        return [f"mapping {name!r} on table {spec.name}: not a JSON array"]
    by_column: dict[str, dict[str, Any]] = {}
    for e in entries:
        if isinstance(e, dict):
            low = {str(k).lower(): v for k, v in e.items()}
            props = {str(k).lower(): v for k, v in (low.get("properties") or {}).items()}
            col = low.get("column")
            if isinstance(col, str):
                by_column[col] = {
                    "path": props.get("path", low.get("path")),
                    "datatype": low.get("datatype") or props.get("datatype") or "",
                    "transform": props.get("transform", low.get("transform")),
                }
    problems = []
    for col, kind in spec.columns:
        e = by_column.get(col)
        if e is None:
            problems.append(f"mapping {name!r} on table {spec.name}: no entry for column {col!r} (expected path $.{col})")
            continue
        src = _mapping_path_column(e["path"])
        if src != col:
            problems.append(
                f"mapping {name!r} on table {spec.name}: column {col!r} reads {e['path']!r}, expected '$.{col}'"
            )
        dtype = str(e["datatype"] or "").lower()
        if dtype and _KIND_ALIASES.get(dtype, dtype) != kind:
            problems.append(f"mapping {name!r} on table {spec.name}: column {col!r} has datatype {dtype!r}, expected {kind!r}")
        transform = e["transform"]
        if transform and str(transform).lower() not in ("none", "null"):
            problems.append(f"mapping {name!r} on table {spec.name}: column {col!r} has transform {transform!r}, expected none")
    return problems


# ---------------------------------------------------------------------------
# provision.kql
# ---------------------------------------------------------------------------


def provision_text() -> str:
    """provision.kql: packaged with ``langgraph.checkpoint.kusto``, else the repository root."""
    try:
        res = importlib.resources.files("langgraph.checkpoint.kusto").joinpath("provision.kql")
        if res.is_file():
            return res.read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError, OSError):
        pass
    path = Path(__file__).resolve().parents[2] / "provision.kql"
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PermanentBackendError(
            "provision.kql was not found (neither in the langgraph.checkpoint.kusto package nor "
            f"at {path}); reinstall the package"
        ) from exc


def provision_commands(text: str | None = None) -> list[str]:
    """The commands of provision.kql: blank lines separate commands, ``//`` lines are comments."""
    text = provision_text() if text is None else text
    out: list[str] = []
    for chunk in re.split(r"\n[ \t]*(?:\r?\n[ \t]*)+", text.replace("\r\n", "\n")):
        lines = [ln for ln in chunk.splitlines() if not ln.lstrip().startswith("//")]
        cmd = "\n".join(lines).strip()
        if cmd:
            out.append(cmd)
    return out


# ---------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------


def _safe_uri(uri: str | None) -> str:
    if not uri:
        return "?"
    try:
        parts = urlsplit(uri.split(";", 1)[0])
    except ValueError:
        return "?"
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}" if parts.scheme else host or "?"


def _copy_kcsb(kcsb: Any) -> Any:
    """An independent copy (the ingest clients rewrite their builder's Data Source)."""
    new = copy.copy(kcsb)
    internal = getattr(kcsb, "_internal_dict", None)
    if isinstance(internal, dict):
        new._internal_dict = dict(internal)
    return new


#: a cached token is renewed this many seconds before it expires: azure-core's own
#: refresh window (azure/core/pipeline/policies/_authentication.py,
#: DEFAULT_REFRESH_WINDOW_SECONDS), which its pipelines apply to every credential
TOKEN_REFRESH_SECONDS = 300.0


class CachedTokenCredential:
    """A TokenCredential in front of another, that keeps each token until shortly before
    it expires, per (scopes, claims, tenant).

    The Kusto SDK asks its credential for a token on every request
    (``AzureIdentityTokenCredentialProvider._get_token_from_cache_impl`` returns None:
    azure-kusto-data/azure/kusto/data/_token_providers.py), and some azure-identity
    credentials do not cache (``AzureCliCredential`` runs ``az`` each time). ``close()``
    does nothing: the SDK's client ``close()`` closes the credential it was given
    (``AzureIdentityTokenCredentialProvider.close``), and a credential the caller passed
    in is the caller's to close; :class:`KustoBackend` closes one it created itself."""

    def __init__(self, credential: Any, refresh_seconds: float = TOKEN_REFRESH_SECONDS) -> None:
        import threading

        self.credential = credential
        self.refresh_seconds = refresh_seconds
        self._tokens: dict[tuple[Any, ...], Any] = {}
        self._locks: dict[tuple[Any, ...], Any] = {}
        self._lock = threading.Lock()
        self._new_lock = threading.Lock

    def get_token(self, *scopes: str, claims: str | None = None, tenant_id: str | None = None, **kwargs: Any) -> Any:
        import time

        key = (scopes, claims, tenant_id, kwargs.get("enable_cae"))
        token = self._tokens.get(key)
        if token is not None and token.expires_on - time.time() > self.refresh_seconds:
            return token
        with self._lock:
            lock = self._locks.setdefault(key, self._new_lock())
        with lock:  # one request per scope at a time: callers waiting share its answer
            token = self._tokens.get(key)
            if token is not None and token.expires_on - time.time() > self.refresh_seconds:
                return token
            extra = {k: v for k, v in (("claims", claims), ("tenant_id", tenant_id)) if v is not None}
            token = self.credential.get_token(*scopes, **extra, **kwargs)
            self._tokens[key] = token
            return token

    def close(self) -> None:
        """Nothing: see the class docstring."""

    def __enter__(self) -> CachedTokenCredential:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class KustoBackend:
    """Azure Data Explorer behind the backend protocol.

    ``cluster_uri``: ``https://<cluster>.<region>.kusto.windows.net`` (or ``http://`` for a
    local/loopback endpoint, which connects without authentication). ``credential``: an
    azure-identity ``TokenCredential`` (default: ``DefaultAzureCredential``), a ready
    ``KustoConnectionStringBuilder``, or a Kusto connection string. ``ingest_mode``:
    ``"streaming"`` (rows queryable when the request returns), ``"managed"`` (streaming,
    falling back to queued for large or repeatedly failing batches), ``"queued"``
    (``ingest_uri`` defaults to the cluster's ``ingest-`` endpoint) or ``"inline"``
    (``.ingest inline`` management commands: for the Kusto emulator and prototyping
    only, Kusto advises against it in production). ``query_timeout``: seconds, sent as
    ``servertimeout`` (the client waits 30 s longer). ``threads``: worker threads for the
    SDK's blocking calls, shared by ingestion and queries: 24 holds the engine's default
    16 ingest slots and the engine's 8 queries at once, so reads never wait behind ingests.
    ``status_timeout``: seconds a queued ingestion (``"queued"``, and ``"managed"`` when it
    falls back to queued) may wait for Kusto's status report before the batch is sent
    again; ``status_poll_interval``: seconds between reads of the status queues while
    some batch waits (see docs/kusto-ingestion.md).
    """

    name = "kusto"
    #: several processes may share the database (consistency "shared" by default)
    exclusive = False
    #: the engine's ingest_concurrency unless the caller sets it (saver/base.py)
    default_ingest_concurrency = DEFAULT_INGEST_CONCURRENCY

    def __init__(
        self,
        cluster_uri: str | None = None,
        database: str | None = None,
        *,
        credential: Any = None,
        ingest_mode: str = "streaming",
        query_timeout: float = 60.0,
        command_timeout: float = 600.0,
        ingest_uri: str | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        threads: int = 24,
        max_value_size: int = DEFAULT_MAX_VALUE_SIZE,
        status_timeout: float = DEFAULT_STATUS_TIMEOUT,
        status_poll_interval: float = 1.0,
    ) -> None:
        from azure.kusto.data import KustoConnectionStringBuilder

        if isinstance(max_value_size, bool) or not isinstance(max_value_size, int) or max_value_size < 1024:
            raise ConfigError(f"max_value_size must be an integer >= 1024, got {max_value_size!r}")
        #: Kusto's largest string cell (the payload columns' MaxValueSize); the saver
        #: refuses a cell_limit above it, since Kusto cuts a longer value without an error
        self.max_value_size = max_value_size

        if ingest_mode not in INGEST_MODES:
            raise ConfigError(f"ingest_mode must be one of {INGEST_MODES}, got {ingest_mode!r}")
        # a request runs at most one hour on the service: "the default timeout is four
        # minutes for queries and 10 minutes for management commands ... capped at one
        # hour" (https://learn.microsoft.com/kusto/concepts/query-limits, limit on request
        # execution time); the SDK waits 30 s longer than servertimeout
        for name, value, top in (("query_timeout", query_timeout, MAX_REQUEST_SECONDS),
                                 ("command_timeout", command_timeout, MAX_REQUEST_SECONDS)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value <= top):
                raise ConfigError(f"{name} must be a number of seconds in (0, {top:g}], got {value!r}")
        if isinstance(max_request_bytes, bool) or not isinstance(max_request_bytes, int) or max_request_bytes < 1024:
            raise ConfigError(f"max_request_bytes must be an integer >= 1024, got {max_request_bytes!r}")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads must be a positive integer, got {threads!r}")

        self._base_kcsb: Any = None
        self._token_credential: Any = None
        self._no_auth = False
        if isinstance(credential, KustoConnectionStringBuilder):
            self._base_kcsb = _copy_kcsb(credential)
        elif isinstance(credential, str):
            self._base_kcsb = _parse_connection_string(credential)
        elif cluster_uri is not None and ";" in cluster_uri:
            self._base_kcsb = _parse_connection_string(cluster_uri)
        elif credential is not None and not callable(getattr(credential, "get_token", None)):
            raise ConfigError(
                "credential must be an azure-identity TokenCredential, a KustoConnectionStringBuilder "
                f"or a connection string, got {type(credential).__name__}"
            )
        if self._base_kcsb is not None:
            source = self._base_kcsb.data_source
            if not source:
                raise ConfigError("the connection string has no Data Source (the cluster URI)")
            if cluster_uri is not None and ";" not in cluster_uri and cluster_uri.rstrip("/") != source:
                self._base_kcsb["Data Source"] = cluster_uri.rstrip("/")
            self.cluster_uri = self._base_kcsb.data_source
            if database is None and self._base_kcsb.initial_catalog not in (None, "NetDefaultDB"):
                database = self._base_kcsb.initial_catalog
        else:
            if not isinstance(cluster_uri, str) or not re.match(r"^https?://[^/\s]+", cluster_uri):
                raise ConfigError(
                    "cluster_uri must be the cluster's URL, e.g. https://<cluster>.<region>.kusto.windows.net "
                    f"(got {_safe_uri(cluster_uri) if isinstance(cluster_uri, str) else type(cluster_uri).__name__!r})"
                )
            self.cluster_uri = cluster_uri.rstrip("/")
            if self.cluster_uri.startswith("http://"):
                if credential is not None:
                    raise ConfigError(
                        "a credential needs an https:// cluster URI; http:// connects without authentication "
                        "(local or loopback endpoints only)"
                    )
                self._no_auth = True
            else:
                self._token_credential = credential
        if not isinstance(database, str) or not database:
            raise ConfigError("database must be the name of the Kusto database")
        if not _ENTITY_NAME.fullmatch(database):
            raise ConfigError(
                "database must be a Kusto database name (letters, digits, underscores, spaces, "
                f"dots and dashes), got {database!r}"
            )
        if ingest_uri is not None and not re.match(r"^https?://[^/\s]+", ingest_uri):
            raise ConfigError("ingest_uri must be the data management endpoint's URL (https://ingest-<cluster>...)")
        self.database = database
        self.ingest_mode = ingest_mode
        self.ingest_uri = ingest_uri.rstrip("/") if ingest_uri else None
        self.query_timeout = float(query_timeout)
        self.command_timeout = float(command_timeout)
        self.max_request_bytes = max_request_bytes
        self.threads = threads
        self._owns_credential = False
        self._cached_credential: CachedTokenCredential | None = None
        #: requests wait until then after a 429 (time.monotonic()), whichever slot got it
        self._throttled_until = 0.0
        self._throttle_streak = 0
        self._client: Any = None
        self._ingest_client: Any = None
        self._limiter: anyio.CapacityLimiter | None = None
        #: whether the LatestCheckpoints view exists (None: not looked yet)
        self._has_view: bool | None = None
        #: queued ingestion (and managed fallbacks): Kusto's status reports awaited
        self._status = StatusWatch(self, status_timeout, status_poll_interval)
        #: seconds after setup(create=True) during which a streaming ingest refused for a
        #: missing mapping is retried: schema changes "may take up to 5 minutes" to reach
        #: streaming ingestion (https://learn.microsoft.com/azure/data-explorer/ingest-data-streaming)
        self.schema_cache_grace = 300.0
        self._provisioned_at: float | None = None
        #: a Microsoft Fabric Eventhouse (its query URI's host is *.kusto.fabric.microsoft.com):
        #: provisioning skips what Fabric refuses of the optional commands, compaction stops
        #: with a clear message if soft delete is refused (docs/kusto.md)
        self.fabric = (urlsplit(self.cluster_uri).hostname or "").lower().endswith(FABRIC_HOST_SUFFIX)

    def __repr__(self) -> str:
        return (
            f"KustoBackend(cluster={_safe_uri(self.cluster_uri)!r}, database={self.database!r}, "
            f"ingest_mode={self.ingest_mode!r})"
        )

    # -- connections --------------------------------------------------------

    def _kcsb(self, uri: str | None = None) -> Any:
        from azure.kusto.data import KustoConnectionStringBuilder

        if self._base_kcsb is not None:
            kcsb = _copy_kcsb(self._base_kcsb)
            if uri is not None:
                kcsb["Data Source"] = uri
            return kcsb
        target = uri or self.cluster_uri
        if self._no_auth:
            return KustoConnectionStringBuilder.with_no_authentication(target)
        if self._token_credential is None:
            try:
                from azure.identity import DefaultAzureCredential
            except ImportError as exc:  # pragma: no cover - a declared dependency
                raise ConfigError("azure-identity is needed for DefaultAzureCredential: pip install azure-identity") from exc
            self._token_credential = DefaultAzureCredential()
            self._owns_credential = True
        if self._cached_credential is None or self._cached_credential.credential is not self._token_credential:
            self._cached_credential = CachedTokenCredential(self._token_credential)
        # the SDK closes the credential it is given when its client closes: it gets the
        # cache, whose close() leaves the caller's credential open
        return KustoConnectionStringBuilder.with_azure_token_credential(target, credential=self._cached_credential)

    def _open_sync(self) -> tuple[Any, Any]:
        from azure.kusto.data import KustoClient
        from azure.kusto.ingest import KustoStreamingIngestClient, ManagedStreamingIngestClient, QueuedIngestClient

        client = KustoClient(self._kcsb())
        try:
            if self.ingest_mode == "inline":
                ingest = None  # .ingest inline goes through the query client
            elif self.ingest_mode == "streaming":
                ingest = KustoStreamingIngestClient(self._kcsb())
            elif self.ingest_mode == "managed":
                # an explicit ingest_uri is used as given (the SDK would prefix "ingest-")
                dm = self._kcsb(self.ingest_uri) if self.ingest_uri else None
                ingest = ManagedStreamingIngestClient(self._kcsb(), dm, auto_correct_endpoint=dm is None)
            elif self.ingest_uri:
                ingest = QueuedIngestClient(self._kcsb(self.ingest_uri), auto_correct_endpoint=False)
            else:
                ingest = QueuedIngestClient(self._kcsb())
        except BaseException:
            client.close()
            raise
        return client, ingest

    async def open(self) -> None:
        if self._client is not None:
            return
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.threads)
        try:
            client, ingest = await anyio.to_thread.run_sync(self._open_sync, limiter=self._limiter)
        except ConfigError:
            raise
        except Exception as exc:
            raise map_error(exc, database=self.database, action="connection setup", host=self.cluster_uri) from None
        self._client, self._ingest_client = client, ingest
        self._has_view = None
        log.debug("opened %r", self)

    async def close(self) -> None:
        client, ingest = self._client, self._ingest_client
        self._client = self._ingest_client = None
        credential = self._token_credential if self._owns_credential else None
        if self._owns_credential:
            self._token_credential, self._owns_credential = None, False
        if client is None and ingest is None and credential is None:
            return

        def _close() -> None:
            for c in (ingest, client, credential):
                if c is None:
                    continue
                try:
                    c.close()
                except Exception:  # noqa: BLE001 - closing is best effort
                    log.debug("closing %s failed", type(c).__name__, exc_info=True)

        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_close)
        self._limiter = None

    def _require_open(self) -> Any:
        if self._client is None:
            raise PermanentBackendError("the Kusto backend is not open (use the saver inside `with`/`async with`)")
        return self._client

    async def _run(self, fn: Any, *args: Any) -> Any:
        limiter = self._limiter
        if limiter is None:
            raise PermanentBackendError("the Kusto backend is not open (use the saver inside `with`/`async with`)")
        wait = self._throttled_until - time.monotonic()
        if wait > 0:  # the service said 429: every slot waits, not only the refused one
            await anyio.sleep(wait)
        try:
            result = await anyio.to_thread.run_sync(fn, *args, limiter=limiter)
        except TransientBackendError as exc:
            self._note_throttling(exc)
            raise
        self._throttle_streak = 0
        return result

    def _note_throttling(self, exc: TransientBackendError) -> None:
        """On HTTP 429: hold every request of this backend until the service's Retry-After
        (when the answer carried one), else for an exponential backoff with full jitter
        that grows with consecutive throttles (max 30 s); the value also rides on
        ``exc.retry_after`` for the engine's retry (engine/retry.py). Streaming ingestion
        is limited per cluster (6 concurrent requests per core:
        https://learn.microsoft.com/azure/data-explorer/ingest-data-streaming), and 429
        means back off."""
        from azure.kusto.data.exceptions import KustoThrottlingError

        cause = exc.__cause__
        response = getattr(cause, "http_response", None)
        if response is None and isinstance(cause, KustoThrottlingError) and len(cause.args) > 1:
            response = cause.args[1]
        status = getattr(response, "status_code", getattr(response, "status", None))
        if not isinstance(cause, KustoThrottlingError) and status != 429:
            return
        after = _retry_after_seconds(getattr(response, "headers", None))
        self._throttle_streak += 1
        if after is None:
            after = random.uniform(0, min(30.0, 0.5 * 2 ** min(self._throttle_streak, 16)))
        exc.retry_after = after  # type: ignore[attr-defined]
        self._throttled_until = max(self._throttled_until, time.monotonic() + after)

    # -- queries and commands ---------------------------------------------

    def _properties(self, kql: str, params: Mapping[str, Any], timeout: float) -> Any:
        from azure.kusto.data import ClientRequestProperties

        props = ClientRequestProperties()
        props.set_option(ClientRequestProperties.request_timeout_option_name, dt.timedelta(seconds=timeout))
        declared = declared_parameters(kql) if ("declare" in kql or params) else {}
        missing = [n for n, (_, has_default) in declared.items() if not has_default and n not in params]
        if missing:
            raise PermanentBackendError(f"query parameters without a value: {sorted(missing)}")
        for name, value in params.items():
            if not re.fullmatch(r"[A-Za-z_][\w]*", name):
                raise PermanentBackendError(f"invalid query parameter name {name!r}")
            kind = declared.get(name, (None, False))[0]
            try:
                props.set_parameter(name, encode_parameter(value, kind))
            except (TypeError, ValueError) as exc:
                raise PermanentBackendError(
                    f"query parameter {name!r} (declared {kind or 'undeclared'}): cannot encode a "
                    f"{type(value).__name__}: {exc}"
                ) from None
        return props

    def _execute_sync(self, kql: str, params: Mapping[str, Any], mgmt: bool) -> list[dict[str, Any]]:
        client = self._require_open()
        props = self._properties(kql, params, self.command_timeout if mgmt else self.query_timeout)
        if not mgmt:
            # Kusto stops a result at 500,000 records or 64 MB with a partial-query failure
            # unless the request sets notruncation; every read the engine sends is bounded
            # by construction instead (pages of checkpoints, values per page: engine/kql.py)
            # https://learn.microsoft.com/azure/data-explorer/kusto/concepts/querylimits
            props.set_option("notruncation", True)
        action = "control command" if mgmt else "query"
        try:
            if mgmt:
                response = client.execute_mgmt(self.database, kql, props)
            else:
                response = client.execute_query(self.database, kql, props)
            tables = response.primary_results
        except Exception as exc:  # noqa: BLE001 - mapped
            raise map_error(exc, database=self.database, action=action, host=self.cluster_uri) from exc
        if not tables:
            return []
        from azure.kusto.data.response import KustoResponseDataSetV1

        return _rows(tables[0], dynamic_as_text=isinstance(response, KustoResponseDataSetV1))

    async def query(self, kql: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        return await self._run(self._execute_sync, kql, dict(params or {}), False)  # type: ignore[no-any-return]

    async def command(self, kql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        params = dict(params or {})
        rows: list[dict[str, Any]] = await self._run(self._execute_sync, kql, params, True)
        view_cmd = latest_view_deletion(kql)
        if view_cmd is not None and await self._latest_view_exists():
            # after the source table, so rows deleted from it are never materialized again
            await self._run(self._execute_sync, view_cmd, params, True)
        return rows

    async def _latest_view_exists(self) -> bool:
        if self._has_view is None:
            rows = await self._run(self._execute_sync, ".show materialized-views", {}, True)
            self._has_view = any(r.get("Name") == LATEST_VIEW for r in rows)
        return self._has_view

    # -- ingestion ------------------------------------------------------------

    async def ingest(self, table: str, rows: Sequence[Mapping[str, Any]]) -> None:
        pending = await self.submit(table, rows)
        if pending is not None:
            await pending.wait()

    async def submit(self, table: str, rows: Sequence[Mapping[str, Any]]) -> QueuedIngestion | None:
        """Send ``rows``; None once they are ingested (streaming, inline), or, for what went
        to queued ingestion, a :class:`QueuedIngestion` whose ``wait()`` returns once
        Kusto's status reports say every blob succeeded (the engine's ingestor awaits it
        without holding an ingest slot)."""
        spec = TABLES_BY_NAME.get(table)
        if spec is None:
            raise PermanentBackendError(f"no table {table!r} in the schema (engine/schema.py)")
        if not rows:
            return None
        try:
            queued: list[str] = await self._run(self._ingest_sync, spec, rows)
        except PermanentBackendError as exc:
            if not self._schema_cache_catching_up(exc):
                raise
            raise TransientBackendError(
                f"streaming ingestion into {spec.name} does not see its mapping yet: the nodes' "
                "schema cache is catching up with provisioning (retried)"
            ) from exc
        if not queued:
            return None
        return self._status.expect(spec.name, queued)

    def _ingest_sync(self, spec: Table, rows: Sequence[Mapping[str, Any]]) -> list[str]:
        """Send the rows; returns the source ids of the blobs that went to queued ingestion."""
        from azure.kusto.data.data_format import DataFormat
        from azure.kusto.ingest import IngestionProperties, IngestionStatus, ReportLevel, ReportMethod, StreamDescriptor

        ingest = self._ingest_client
        if ingest is None and self.ingest_mode != "inline":
            raise PermanentBackendError("the Kusto backend is not open (use the saver inside `with`/`async with`)")
        try:
            lines = [row_to_json(spec, r) for r in rows]
        except (TypeError, orjson.JSONEncodeError) as exc:
            raise PermanentBackendError(f"a row for {spec.name} cannot be encoded as JSON: {exc}") from None
        if self.ingest_mode == "inline":
            self._ingest_inline_sync(spec, lines)
            return []
        props = IngestionProperties(
            self.database,
            spec.name,
            data_format=DataFormat.MULTIJSON,
            ingestion_mapping_reference=mapping_name(spec.name),
            # queued ingestion (and the managed client's fallback to it) reports each
            # blob's outcome to the status queues: without it a blob Kusto rejects later
            # is never seen (IngestionProperties defaults to DoNotReport)
            report_level=ReportLevel.FailuresAndSuccesses,
            report_method=ReportMethod.Queue,
        )
        queued: list[str] = []
        for body in split_payloads(lines, self.max_request_bytes):
            if self.ingest_mode == "streaming" and len(body) > _STREAMING_LIMIT:
                raise PermanentBackendError(
                    f"a {spec.name} row of {len(body)} bytes is over streaming ingestion's 4 MB request "
                    "limit: lower the cell_limit engine option, or use ingest_mode='managed'"
                )
            stream = io.BytesIO(gzip.compress(body, compresslevel=3, mtime=0))
            descriptor = StreamDescriptor(stream, is_compressed=True, size=len(body))
            try:
                result = ingest.ingest_from_stream(descriptor, props)
            except Exception as exc:  # noqa: BLE001 - mapped
                raise map_error(
                    exc, database=self.database, action=f"ingestion into {spec.name}", table=spec.name,
                    host=self.ingest_uri or self.cluster_uri,
                ) from exc
            if getattr(result, "status", None) == IngestionStatus.QUEUED:
                queued.append(str(result.source_id).lower())
        return queued

    def _ingest_inline_sync(self, spec: Table, lines: list[bytes]) -> None:
        """``.ingest inline``: the data after ``<|`` is read as data, never as KQL."""
        client = self._require_open()
        props = self._properties("", {}, self.command_timeout)
        head = (
            f".ingest inline into table {spec.name} with (format='multijson', "
            f"ingestionMappingReference='{mapping_name(spec.name)}') <|\n"
        )
        for body in split_payloads(lines, self.max_request_bytes):
            try:
                client.execute_mgmt(self.database, head + body.decode("utf-8"), props)
            except Exception as exc:  # noqa: BLE001 - mapped
                raise map_error(
                    exc, database=self.database, action=f"ingestion into {spec.name}", table=spec.name,
                    host=self.ingest_uri or self.cluster_uri,
                ) from exc

    # -- schema ------------------------------------------------------------

    async def setup(self, create: bool = False) -> SchemaReport:
        """Check the database against engine/schema.py; with ``create=True`` first run
        provision.kql, command by command. Returns the report; raises
        :class:`SchemaError` listing every missing or different table, column and mapping."""
        opened_here = self._client is None
        if opened_here:
            await self.open()
        try:
            ran = 0
            notes: list[str] = []
            if create:
                for cmd in provision_commands():
                    first = cmd.splitlines()[0][:120]
                    try:
                        await self.command(cmd)
                    except PermanentBackendError as exc:
                        if self.fabric and _FABRIC_OPTIONAL.match(cmd):
                            notes.append(
                                f"Microsoft Fabric refused {first!r} ({exc}); skipped: an Eventhouse "
                                "manages this itself (docs/kusto.md, Microsoft Fabric)"
                            )
                            continue
                        raise PermanentBackendError(
                            f"provision.kql failed at command {ran + 1} ({first!r}): {exc}. "
                            "setup(create=True) needs Database Admin on the database"
                        ) from exc
                    ran += 1
                notes += await self._clear_streaming_schema_cache()
            report = await self.check_schema()
            report.commands_run = ran
            report.warnings += notes
        finally:
            if opened_here:
                await self.close()
        if not report.ok:
            raise SchemaError(report)
        return report

    async def _clear_streaming_schema_cache(self) -> list[str]:
        """After provisioning: ``.clear database cache streamingingestion schema``, so
        streaming ingestion sees the new tables and mappings at once instead of after the
        nodes' schema cache refreshes (minutes). A node answering Failed may be retried
        safely (https://learn.microsoft.com/kusto/management/data-ingestion/clear-schema-cache-command);
        if one still fails, "mapping not found" stays retryable for
        ``schema_cache_grace`` seconds (:meth:`ingest`). Returns warnings for the report."""
        self._provisioned_at = time.monotonic()
        if self.ingest_mode not in ("streaming", "managed"):
            return []
        why = ""
        for _ in range(3):
            try:
                rows = await self.command(CLEAR_STREAMING_SCHEMA_CACHE)
            except (PermanentBackendError, TransientBackendError) as exc:
                why = str(exc)
                continue
            failed = [r for r in rows if str(r.get("Status", "")).lower() == "failed"]
            if not failed:
                return []
            why = f"{len(failed)} node(s) answered Failed"
        return [
            f"'{CLEAR_STREAMING_SCHEMA_CACHE}' did not succeed ({why}): streaming ingestion may "
            f"refuse the new mappings for a few minutes; the saver retries them for "
            f"{self.schema_cache_grace:g} s after provisioning"
        ]

    def _schema_cache_catching_up(self, exc: PermanentBackendError) -> bool:
        """A streaming ingest refused for a missing mapping within ``schema_cache_grace``
        seconds of provisioning: the nodes' schema cache, not the database, is behind."""
        if self.ingest_mode not in ("streaming", "managed") or self._provisioned_at is None:
            return False
        if time.monotonic() - self._provisioned_at > self.schema_cache_grace:
            return False
        cause = exc.__cause__
        low = (_describe(cause) if cause is not None else str(exc)).lower()
        return "mapping" in low and ("not found" in low or "wasn't found" in low or "was not found" in low)

    async def check_schema(self) -> SchemaReport:
        """Every difference between the database and engine/schema.py (no exception)."""
        report = SchemaReport(self.database)
        rows = await self.command(".show database schema as json")
        tables: dict[str, Any] = {}
        views: dict[str, Any] = {}
        if rows:
            doc = rows[0].get("DatabaseSchema")
            doc = json.loads(doc) if isinstance(doc, str) else (doc or {})
            dbs = doc.get("Databases") or {}
            db = dbs.get(self.database) or next(
                (v for k, v in dbs.items() if k.lower() == self.database.lower()), {}
            )
            tables = db.get("Tables") or {}
            views = db.get("MaterializedViews") or {}
        for spec in TABLES:
            info = tables.get(spec.name)
            if info is None:
                cols = ", ".join(f"{c}:{k}" for c, k in spec.columns)
                report.problems.append(f"table {spec.name} is missing (expected columns: {cols})")
                continue
            have = {
                c.get("Name"): str(c.get("CslType") or c.get("Type") or "").lower()
                for c in info.get("OrderedColumns") or []
            }
            for col, kind in spec.columns:
                if col not in have:
                    report.problems.append(f"table {spec.name}: column {col}:{kind} is missing")
                elif _KIND_ALIASES.get(have[col], have[col]) != kind:
                    report.problems.append(
                        f"table {spec.name}: column {col} has type {have[col]}, expected {kind}"
                    )
            extra = [c for c in have if c not in spec.column_names]
            if extra:
                report.warnings.append(f"table {spec.name} has columns the saver does not use: {extra}")
            mrows = await self.command(f".show table {spec.name} ingestion json mappings")
            wanted = mapping_name(spec.name)
            found = next((r for r in mrows if r.get("Name") == wanted), None)
            if found is None:
                report.problems.append(f"table {spec.name}: JSON ingestion mapping {wanted!r} is missing")
            else:
                report.problems += check_mapping(spec, found.get("Mapping") or "")
            if self.ingest_mode in ("streaming", "managed") and not await self._streaming_enabled(spec.name):
                msg = f"table {spec.name}: streaming ingestion policy is not enabled (table or database)"
                (report.problems if self.ingest_mode == "streaming" else report.warnings).append(msg)
        if LATEST_VIEW not in views:
            report.warnings.append(
                f"materialized view {LATEST_VIEW} is missing (the saver's reads do not use it; "
                "provision.kql creates it for dashboards and ad-hoc queries)"
            )
        return report

    async def _streaming_enabled(self, table: str) -> bool:
        for entity in (f"table {table}", f"database ['{self.database}']" if not re.fullmatch(r"[A-Za-z_]\w*", self.database) else f"database {self.database}"):
            try:
                rows = await self.command(f".show {entity} policy streamingingestion")
            except PermanentBackendError:
                return False
            for r in rows:
                policy = r.get("Policy")
                if isinstance(policy, str):
                    try:
                        policy = json.loads(policy)
                    except ValueError:
                        policy = None
                if isinstance(policy, dict):
                    enabled = policy.get("IsEnabled")
                    if enabled is not None:
                        return bool(enabled)
        return False


_CHECKPOINTS_DELETION = re.compile(
    rf"\.delete table {CHECKPOINTS.name} records <\| {CHECKPOINTS.name} (\| where .+)", re.S
)


def latest_view_deletion(kql: str) -> str | None:
    """For compaction's ``.delete table Checkpoints records`` (``kql.compaction_command``):
    the same deletion on the LatestCheckpoints view; None for any other text. The view
    has every Checkpoints column, so the predicate reads the same."""
    m = _CHECKPOINTS_DELETION.fullmatch(kql)
    if m is None:
        return None
    return f".delete materialized-view {LATEST_VIEW} records <| {LATEST_VIEW} {m.group(1)}"


def _retry_after_seconds(headers: Any) -> float | None:
    """Retry-After (delta seconds or an HTTP date, RFC 9110 10.2.3) in seconds, or None."""
    if headers is None:
        return None
    value = headers.get("Retry-After")
    if not value:
        return None
    value = str(value).strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_UTC)
    return max(0.0, (when - dt.datetime.now(_UTC)).total_seconds())


def _parse_connection_string(text: str) -> Any:
    from azure.kusto.data import KustoConnectionStringBuilder

    try:
        return KustoConnectionStringBuilder(text)
    except Exception:  # noqa: BLE001 - the error text may quote the string: never chain it
        pass
    # raised outside the handler, so not even __context__ carries the SDK's message
    keys = [part.partition("=")[0].strip() for part in text.split(";") if "=" in part]
    raise ConfigError(f"invalid Kusto connection string (keys: {keys})")


def _convert(kind: str, value: Any, dynamic_as_text: bool) -> Any:
    if value is None:
        return None
    if kind == "datetime":
        if isinstance(value, str):
            try:
                d = dt.datetime.fromisoformat(value)
            except ValueError:
                from azure.kusto.data._converters import to_datetime

                d = to_datetime(value)
        else:
            d = value
        if isinstance(d, dt.datetime):
            return d.replace(tzinfo=_UTC) if d.tzinfo is None else d.astimezone(_UTC)
        return d
    if kind == "dynamic":
        if dynamic_as_text and isinstance(value, str):
            try:
                return orjson.loads(value)
            except orjson.JSONDecodeError:
                return value
        return value
    if kind == "timespan":
        from azure.kusto.data._converters import to_timedelta

        return to_timedelta(value)
    return value


def _rows(table: Any, *, dynamic_as_text: bool) -> list[dict[str, Any]]:
    columns = [(c.column_name, (c.column_type or "").lower()) for c in table.columns]
    plain = all(k not in ("datetime", "dynamic", "timespan") for _, k in columns)
    names = [n for n, _ in columns]
    if plain:
        return [dict(zip(names, raw)) for raw in table.raw_rows]
    return [
        {n: _convert(k, v, dynamic_as_text) for (n, k), v in zip(columns, raw)}
        for raw in table.raw_rows
    ]


__all__ = [
    "INGEST_MODES",
    "CachedTokenCredential",
    "KustoBackend",
    "SchemaError",
    "SchemaReport",
    "check_mapping",
    "declared_parameters",
    "encode_parameter",
    "kusto_datetime_text",
    "latest_view_deletion",
    "map_error",
    "provision_commands",
    "provision_text",
    "row_to_json",
    "split_payloads",
]
