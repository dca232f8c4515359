"""A loopback Kusto endpoint for tests: the real azure-kusto SDKs, over HTTP, no patching.

``LoopbackKusto`` serves Kusto's REST API on ``127.0.0.1`` (a free port, a background
thread) from an in-memory DuckDB database, running KQL through ``duckdb-kql``. Point the
unmodified ``azure-kusto-data`` / ``azure-kusto-ingest`` clients at ``server.uri`` with
``KustoConnectionStringBuilder.with_no_authentication(server.uri)`` (``server.kcsb()``).

    with LoopbackKusto(database="testdb") as server:          # or: async with (anyio)
        client = KustoClient(server.kcsb())
        client.execute_mgmt("testdb", ".create-merge table T (a:string, d:dynamic)")
        server.faults.fail_next(2, status=429, route="ingest")

Supported
---------
* ``POST /v2/rest/query`` (and ``/v1/rest/query``): KQL through ``duckdb-kql``, answered in
  the v2 frame format (v1 for /v1). ``properties`` is read as a JSON *string* (what the SDK
  sends) or an object. ``declare query_parameters`` values are read the way Kusto reads
  them (``decode_parameter``; ``encode_parameter`` is the matching encoder): every value is
  a KQL literal in a string: a string as a double-quoted literal (``"..."`` with backslash
  escapes), ``"long(5)"`` (or a JSON number, or digits), ``"dynamic(<JSON>)"``,
  ``"datetime(2024-01-02T03:04:05.0000000Z)"``, ``"bool(true)"``, ``"real(1.5)"``,
  ``"guid(..)"``, ``"timespan(1d)"``, ``"<type>(null)"``. Strict by default: a raw
  (unquoted) string, a bare datetime, bare JSON or a JSON array/object for ``dynamic`` are
  refused with a 400 saying what to send;
  ``strict_parameters=False`` accepts them as Kusto does (a raw string verbatim -- unless it
  is itself a literal: raw ``'x'`` reads as ``x``). Undeclared parameters are ignored.
  Result columns keep their Kusto types, so the SDK returns str, int, datetime (aware UTC),
  parsed JSON for dynamic, bool, float, and so on.
* ``POST /v1/rest/mgmt``: a plain query (v1 answer) or one of these commands (``db`` must be
  the served database; the SDK's ``NetDefaultDB`` placeholder is accepted here)::

      .create table T (c:type, ...) [with (...)]      .create-merge table(s) T (...)[, U (...)]
      .alter-merge table T (...)                      .drop table T [ifexists]
      .create|.create-or-alter|.alter table T ingestion json mapping "name" '<json>' ['..' ..]
      .drop table T ingestion json mapping "name"
      .show table T ingestion [json] mappings         .show database [D] ingestion [json] mappings
      .alter|.alter-merge table|database|materialized-view X policy P <anything>
          (streamingingestion: enable | disable | '{"IsEnabled": ..}'; JSON literals are parsed,
          anything else is kept as {"Command": text}; no policy has any effect but streaming)
      .delete table|database|materialized-view X policy P
      .show table|database|materialized-view X policy P
      .create|.create-or-alter|.alter [async] [ifnotexists] materialized-view [with (..)] V
          on table T { Q }   (emulated by a live DuckDB view named V: no materialization lag,
          no materialized_view(); soft delete on it only counts)
      .show materialized-views | .show materialized-view V | .drop materialized-view V
      .show tables | .show databases | .show version
      .show table T cslschema | .show table T schema as json
      .show database [D] cslschema | .show database [D] schema as json
      .delete table|materialized-view T records [with (whatif=true)]
          <| [declare query_parameters(...);] T | where ... (where/extend/project only)
      .execute database script [with (ContinueOnErrors=true)] <| one command per line
          starting with '.' (answers Completed/Failed/Skipped per command, like Kusto)
      .create|.create-or-alter|.alter function [with (folder=.., docstring=..)] F(params) { body }
          (stored for this endpoint's queries through duckdb-kql; the body is validated)
      .clear database|table T cache streamingingestion schema
          (ends the emulated schema-cache delay: ``schema_cache_seconds``)
      .get ingestion resources | .get kusto identity token
          (refused unless queued ingestion is enabled: see below)
      .ingest inline into table T [with (format=json|multijson|singlejson,
          ingestionMappingReference=m)] <| data     (mapped like streaming ingestion)

  Anything else: HTTP 400 with Kusto's error body (the SDK raises ``KustoApiError``).
* ``POST /v1/rest/ingest/{db}/{table}?streamFormat=json|multijson|singlejson[&mappingName=m]``
  (``KustoStreamingIngestClient``, ``ManagedStreamingIngestClient``'s streaming path): gzip or
  deflate bodies (``Content-Encoding``), JSON objects one after another (or arrays of them for
  multijson), mapped through the named JSON mapping (``Path`` JSONPath subset ``$.a.b``,
  ``$['a']``, ``$.a[0]``, ``$``; ``ConstValue``; ``DateTimeFromUnix*`` transforms) or, with
  no mapping name, by column name. A missing table or mapping is a permanent 400.
  ``require_streaming_policy=True`` also refuses tables whose streaming ingestion policy
  (table, else database) is not enabled, as Kusto does. A request carrying more than 4 MB
  of data (``max_streaming_bytes``, counted uncompressed) is refused with a permanent 400.
* Kusto's value-size rules, on every ingestion path: a string cell longer than 1 MB
  (``max_value_bytes``, UTF-8) is silently cut to 1 MB, a dynamic cell over 1 MB is
  silently stored as null.
* Kusto's rules that tests/test_kusto_rules.py proves the saver follows: a second soft
  delete on a table while one runs is refused (``soft_delete_seconds`` holds the table);
  a new mapping is unknown to streaming ingestion until the schema cache is cleared
  (``schema_cache_seconds``); 429 answers carry ``retry_after``; ``tls=True`` serves
  https and ``bearer_tokens`` demands a token; ``refuse_commands`` refuses matching
  commands as a service that does not offer them (Microsoft Fabric, where it differs).
  A soft delete's predicate may carry its values as string literals (read with Kusto's
  escapes, :func:`read_literal`).
* Fault injection (``server.faults``: ``fail_next``, ``delay_next``, ``drop_next``; with
  ``after=True`` the request is carried out first, so a retry stores its rows twice), request
  counters per route (``server.counts``) and a log of every request (``server.requests``,
  with the body and the ``Parameters`` exactly as the client sent them).

* Queued ingestion (``QueuedIngestClient``, the managed client's fallback) once
  ``server.enable_queued_ingestion(azurite)`` is called with a started Azurite storage
  emulator (tests/azurite_server.py): the endpoint then answers as the data management
  endpoint too (pass ``server.uri`` as the ingest URI) and a background thread ingests
  what the queue says after a batching delay, reporting each blob's outcome to the
  status queues (``QueuedIngestionService``).

Not supported
-------------
Authentication (none is checked, unless ``bearer_tokens`` names the tokens to accept:
then a request without one is refused with 401; ``tls=True`` serves https with a
self-signed certificate, PEM at ``ca_file``), queued ingestion without Azurite, ingestion
from blob URLs on the streaming route,
CSV/Avro/Parquet ingestion, update policies, ``materialized_view()``, progressive/streaming
v2 responses, ``.show operations``, extents, purge, ``.show``/``.drop`` of functions, and retention/caching policies
having any effect. DuckDB folds identifier case, so two tables differing only in case
collide. Dynamic literals in parameters must contain JSON (no single-quoted strings).
Error codes and messages imitate Kusto's but are not byte-for-byte Kusto's.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import decimal
import gzip
import json
import re
import socket
import sys
import threading
import time
import uuid
import zlib
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import duckdb_kql
import orjson
from duckdb_kql.control import SCHEMA as _COMMAND_SCHEMA
from duckdb_kql.control import strip_leading_comments
from duckdb_kql.engine import schema as _duck_schema
from duckdb_kql.errors import KqlError, KqlSchemaError, KqlSyntaxError
from duckdb_kql.params import parse_timespan
from duckdb_kql.server import KustoRestServer, Result, RestColumn, v1_response, v2_response
from duckdb_kql.translate import TYPE_MAP, quote_ident
from duckdb_kql.types import kusto_type

__all__ = ["LoopbackKusto", "Faults", "LoggedRequest", "KustoRequestError", "decode_parameter",
           "encode_parameter"]

ROUTES = ("query", "mgmt", "ingest", "other")

#: Kusto's default MaxValueSize (encoding policy): a longer string cell is cut to this
#: many UTF-8 bytes at ingestion, a larger dynamic cell is stored as null
MAX_VALUE_BYTES = 1024 * 1024
#: the most data one streaming ingestion request may carry
MAX_STREAMING_BYTES = 4 * 1024 * 1024
#: Kusto's result-set limits without ``notruncation`` (query limits)
MAX_RESULT_RECORDS = 500_000
MAX_RESULT_BYTES = 64 * 1024 * 1024


# ---------------------------------------------------------------------------
# Errors, shaped the way the SDK reads them
# ---------------------------------------------------------------------------


class KustoRequestError(Exception):
    """A request Kusto would refuse: becomes ``{"error": {...}}`` with *status*."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        code: str = "General_BadRequest",
        kind: str = "Kusto.Data.Exceptions.KustoBadRequestException",
        permanent: bool = True,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.kind, self.permanent = status, code, kind, permanent

    def body(self) -> dict[str, Any]:
        return error_body(str(self), code=self.code, kind=self.kind, permanent=self.permanent)


def error_body(message: str, *, code: str, kind: str, permanent: bool) -> dict[str, Any]:
    # The SDK's KustoApiError reads code, message, @type, @message, @context, @permanent;
    # the managed streaming client falls back to queued ingestion when @permanent is false.
    return {
        "error": {
            "code": code,
            "message": "Request is invalid and cannot be executed.",
            "@type": kind,
            "@message": message,
            "@context": {"service": "kusto-loopback", "timestamp": _iso_now()},
            "@permanent": permanent,
        }
    }


def _not_found(kind: str, name: str) -> KustoRequestError:
    return KustoRequestError(
        f"Entity ID '{name}' of kind '{kind}' was not found.",
        code="BadRequest_EntityNotFound",
        kind="Kusto.Data.Exceptions.EntityNotFoundException",
    )


def _truthy(value: Any) -> bool:
    return value is True or str(value).lower() == "true"


def _report_partial_failure(body: Any, message: str) -> None:
    """A partial query failure as Kusto reports it by default: a JSON property bag in the
    result data where a row is expected (v2: after the primary result's rows; the SDK's
    ``KustoResultTable`` raises ``KustoMultiApiError`` on it; v1: the same in the table)."""
    error = {"OneApiErrors": [{"error": {
        "code": "LimitsExceeded",
        "message": "Request is invalid and cannot be executed.",
        "@type": "Kusto.Data.Exceptions.KustoServicePartialQueryFailureLimitsExceededException",
        "@message": message,
        "@permanent": True,
    }}]}
    tables = body.get("Tables", []) if isinstance(body, dict) else [
        f for f in body if f.get("FrameType") == "DataTable" and f.get("TableKind") == "PrimaryResult"]
    for table in tables[:1]:
        table["Rows"].append(error)


def _syntax(message: str) -> KustoRequestError:
    return KustoRequestError(
        f"Syntax error: {message}",
        code="BadRequest_SyntaxError",
        kind="Kusto.Data.Exceptions.SyntaxException",
    )


#: What a fault answers, per status, unless the test gives its own body.
_FAULT_BODIES = {
    429: ("TooManyRequests", "Kusto.DataNode.Exceptions.KustoRequestThrottledException",
          "The request was denied due to throttling (injected by the loopback)."),
    500: ("InternalServiceError", "Kusto.Data.Exceptions.KustoServiceException",
          "Internal service error (injected by the loopback)."),
    503: ("ServiceUnavailable", "Kusto.Common.Svc.Exceptions.ServiceUnavailableException",
          "Service is unavailable (injected by the loopback)."),
}


def _iso_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---------------------------------------------------------------------------
# Fault injection
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Rule:
    kind: str  # "fail" | "delay" | "drop"
    remaining: int
    route: str | None
    status: int = 503
    body: Any = None
    seconds: float = 0.0
    #: fail/drop only after the request was carried out (its rows are stored): the
    #: client sees an error for work that happened, retries, and stores it twice
    after: bool = False


class Faults:
    """Faults for the next requests, consumed in the order they were armed.

    A request takes at most one ``delay`` rule and at most one ``fail``/``drop`` rule that
    match its route (``None`` matches every route), so ``delay_next`` and ``fail_next``
    combine into "slow, then an error".
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        #: faults actually applied, by kind ("fail", "delay", "drop")
        self.injected: collections.Counter[str] = collections.Counter()

    def fail_next(self, n: int = 1, status: int = 503, route: str | None = None, *,
                  body: dict[str, Any] | str | None = None, after: bool = False) -> None:
        """Answer the next *n* matching requests with *status* and a Kusto error body
        (``@permanent: false``), or *body* as given (a dict is JSON, a str is text/plain).
        ``after=True``: carry the request out first, then answer with the error."""
        self._add(_Rule("fail", n, _check_route(route), status=status, body=body, after=after))

    def delay_next(self, n: int = 1, seconds: float = 1.0, route: str | None = None) -> None:
        """Hold the next *n* matching requests *seconds* before answering them normally."""
        self._add(_Rule("delay", n, _check_route(route), seconds=seconds))

    def drop_next(self, n: int = 1, route: str | None = None, *, after: bool = False) -> None:
        """Read the next *n* matching requests, then close the connection without answering
        (``after=True``: carry the request out first, then close the connection)."""
        self._add(_Rule("drop", n, _check_route(route), after=after))

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    @property
    def pending(self) -> int:
        """Requests still to be affected by armed faults."""
        with self._lock:
            return sum(r.remaining for r in self._rules)

    def _add(self, rule: _Rule) -> None:
        if rule.remaining < 1:
            raise ValueError("n must be at least 1")
        with self._lock:
            self._rules.append(rule)

    def _take(self, route: str) -> tuple[_Rule | None, _Rule | None]:
        delay = outcome = None
        with self._lock:
            for rule in self._rules:
                if rule.route not in (None, route):
                    continue
                if rule.kind == "delay" and delay is None:
                    delay = rule
                elif rule.kind != "delay" and outcome is None:
                    outcome = rule
            for rule in (delay, outcome):
                if rule is not None:
                    rule.remaining -= 1
                    self.injected[rule.kind] += 1
            self._rules = [r for r in self._rules if r.remaining > 0]
        return delay, outcome


def _check_route(route: str | None) -> str | None:
    if route is not None and route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES} or None, not {route!r}")
    return route


@dataclasses.dataclass
class LoggedRequest:
    """One request as the loopback received it."""

    route: str
    method: str
    path: str
    headers: dict[str, str]
    #: query/mgmt: the JSON body; ingest: the decompressed bytes
    body: Any
    status: int | None = None
    #: the fault applied, if any ("fail", "drop"; "delay" is kept in ``delayed``)
    fault: str | None = None
    delayed: float = 0.0
    #: time.monotonic() when it arrived
    received: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def csl(self) -> str | None:
        return self.body.get("csl") if isinstance(self.body, dict) else None

    @property
    def properties(self) -> dict[str, Any]:
        return _properties(self.body) if isinstance(self.body, dict) else {}

    @property
    def parameters(self) -> dict[str, Any]:
        """``Parameters`` exactly as the client sent them (before decoding)."""
        return self.properties.get("Parameters") or {}


def _properties(body: dict[str, Any]) -> dict[str, Any]:
    raw = body.get("properties")
    if isinstance(raw, str):  # what azure-kusto-data sends: json.dumps(...) of the bag
        raw = json.loads(raw) if raw.strip() else {}
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise KustoRequestError("'properties' must be a JSON object or a string holding one")
    return raw


# ---------------------------------------------------------------------------
# Query parameters: what the SDK sends, as Kusto reads it
# ---------------------------------------------------------------------------

_LITERAL_NAMES = {
    "long": ("long", "int64"), "int": ("int", "int32"), "real": ("real", "double"),
    "bool": ("bool", "boolean"), "datetime": ("datetime", "date"), "dynamic": ("dynamic",),
    "guid": ("guid", "uuid", "uniqueid"), "timespan": ("timespan", "time"),
    "decimal": ("decimal",), "string": (),
}
_CALL = re.compile(r"^\s*([A-Za-z_][\w]*)\s*\((.*)\)\s*$", re.S)
_INTEGER = re.compile(r"^[+-]?\d+$")


def encode_parameter(value: Any, kind: str) -> str:
    """A Python value as the ``Parameters`` string Kusto parses for a *kind* parameter.

    The reference encoding for a production backend (it is what azure-kusto-go sends):
    every value is a KQL literal in a string. Strings become a double-quoted literal with
    ``\\``, ``"`` and control characters escaped; see ``decode_parameter`` for why a raw
    string is not safe.
    """
    if value is None:
        return f"{kind}(null)"
    if kind == "string":
        out = ['"']
        for ch in str(value):
            if ch in _QUOTE_ESCAPES:
                out.append(_QUOTE_ESCAPES[ch])
            elif ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 or ch in "\u2028\u2029":
                out.append(f"\\u{ord(ch):04x}")
            else:
                out.append(ch)
        return "".join(out) + '"'
    if kind in ("long", "int"):
        return f"{kind}({int(value)})"
    if kind == "real":
        return f"real({float(value)!r})"
    if kind == "bool":
        return f"bool({str(bool(value)).lower()})"
    if kind == "datetime":
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        return f"datetime({value.strftime('%Y-%m-%dT%H:%M:%S.%f')}0Z)"
    if kind == "dynamic":
        return f"dynamic({json.dumps(value, ensure_ascii=False)})"
    if kind == "guid":
        return f"guid({uuid.UUID(str(value))})"
    if kind == "timespan":
        ticks = round(value.total_seconds() * 10_000_000)
        sign, ticks = ("-" if ticks < 0 else ""), abs(ticks)
        days, rest = divmod(ticks, 864_000_000_000)
        hours, rest = divmod(rest, 36_000_000_000)
        minutes, rest = divmod(rest, 600_000_000)
        return f"timespan({sign}{days}.{hours:02}:{minutes:02}:{rest // 10_000_000:02}." \
               f"{rest % 10_000_000:07})"
    raise ValueError(f"no encoding for {kind!r}")


_QUOTE_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def decode_parameter(name: str, kind: str, value: Any, *, strict: bool = True) -> Any:
    """One ``Parameters`` value, as sent on the wire, to the Python value of *kind*.

    ``ClientRequestProperties.set_parameter(name, value)`` stores *value* untouched and
    ``to_json()`` serializes the bag with ``json.dumps(..., default=str)``: a ``str`` goes
    as a JSON string, an ``int`` as a JSON number, a ``list``/``dict`` as JSON array/object
    and a ``datetime`` as ``str(dt)`` (``"2024-01-02 03:04:05+00:00"``). Kusto parses each
    value as a literal of the declared type ("datetime(...)", "dynamic(<json>)", "long(5)";
    long/int also as bare digits). For strings the docs show raw values ("Flash Flood")
    while azure-kusto-go sends quoted literals ("\"Flash Flood\""), so Kusto reads a value
    that *is* a KQL string literal as that literal and anything else verbatim: a raw
    ``'x'`` arrives as ``x``. Hence ``strict`` (the default) accepts only literals for
    strings (and the empty string); ``strict=False`` also takes non-literals verbatim.
    """
    if value is None:
        return None
    if kind == "string":
        if not isinstance(value, str):
            raise _bad_parameter(name, kind, value, "a string parameter is sent as a JSON string")
        if value == "":
            return ""
        try:
            text, end = read_literals(value, 0)
            if not value[end:].strip():
                return text
        except KustoRequestError:
            pass
        if strict:
            raise _bad_parameter(name, kind, value, 'send a KQL string literal, e.g. "a \\"b\\""'
                                 " (a raw value that looks like a literal is unquoted by Kusto)")
        return value

    inner, wrapped = value, False
    if isinstance(value, str):
        inner = value.strip()
        call = _CALL.match(inner)
        if call and call.group(1).lower() in _LITERAL_NAMES.get(kind, ()):
            inner, wrapped = call.group(2).strip(), True
            if inner.lower() == "null":
                return None

    try:
        if kind in ("long", "int"):
            if isinstance(inner, bool):
                raise ValueError
            if isinstance(inner, int):
                return inner
            if isinstance(inner, float) and inner.is_integer() and not strict:
                return int(inner)
            if isinstance(inner, str) and _INTEGER.match(inner):
                return int(inner)
            raise ValueError
        if kind == "real":
            if isinstance(inner, (int, float)) and not isinstance(inner, bool):
                return float(inner)
            return float(str(inner))
        if kind == "bool":
            if isinstance(inner, bool):
                return inner
            text = str(inner).lower()
            if text in ("true", "false", "1", "0"):
                return text in ("true", "1")
            raise ValueError
        if kind == "datetime":
            if not isinstance(inner, str) or (strict and not wrapped):
                raise ValueError("send a KQL literal: 'datetime(2024-01-02T03:04:05Z)'")
            return parse_datetime(inner.strip("'\""))
        if kind == "dynamic":
            if not isinstance(value, str):
                if strict:
                    raise ValueError(
                        "parameter values travel as strings: send 'dynamic(' + json.dumps(v) + ')'"
                    )
                return json.dumps(value)
            if strict and not wrapped:
                raise ValueError("send a KQL literal: 'dynamic(<json>)'")
            return json.dumps(json.loads(inner))  # JSON text; duckdb-kql casts it to JSON
        if kind == "guid":
            return uuid.UUID(str(inner).strip("'\""))
        if kind == "timespan":
            span = parse_timespan(str(inner).strip("'\""))
            if span is None:
                raise ValueError
            return span
        if kind == "decimal":
            return decimal.Decimal(str(inner))
    except (ValueError, TypeError, ArithmeticError) as exc:
        raise _bad_parameter(name, kind, value, str(exc)) from None
    raise _bad_parameter(name, kind, value, "type not supported by the loopback")


def _bad_parameter(name: str, kind: str, value: Any, why: str) -> KustoRequestError:
    hint = f": {why}" if why else ""
    return KustoRequestError(
        f"Semantic error: query parameter '{name}' of type '{kind}' has an invalid value "
        f"{json.dumps(value, default=str)[:200]}{hint}",
        code="BadRequest_InvalidArgument",
    )


def decode_parameters(csl: str, sent: Any, *, strict: bool) -> dict[str, Any]:
    """Decode what the request sent for the parameters *csl* declares; ignore the rest."""
    if not sent:
        return {}
    if not isinstance(sent, dict):
        raise KustoRequestError("'Parameters' must be an object of name -> value")
    declared = {d.name: d.type for d in duckdb_kql.query_parameters(csl)}
    return {
        name: decode_parameter(name, declared[name], value, strict=strict)
        for name, value in sent.items()
        if name in declared
    }


def parse_datetime(text: str) -> dt.datetime:
    """ISO 8601 (``Z``/offset/space separator, up to 7 fraction digits) -> naive UTC."""
    value = dt.datetime.fromisoformat(text.strip())
    if value.tzinfo is not None:
        value = value.astimezone(dt.UTC).replace(tzinfo=None)
    return value


# ---------------------------------------------------------------------------
# Small parsers for the control-command dialect
# ---------------------------------------------------------------------------

_NAME = r"(?:\[\s*(?:'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")\s*\]|[A-Za-z_][\w]*)"
#: C#-style escapes, as Kusto.Language decodes them (checked against its LiteralValue)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"', "0": "\0",
            "a": "\a", "b": "\b", "f": "\f", "v": "\v"}
_HEX_ESCAPE = re.compile(r"u([0-9a-fA-F]{4})|x([0-9a-fA-F]{1,4})")


def _unname(token: str) -> str:
    token = token.strip()
    if token.startswith("["):
        value, _ = read_literal(token[1:-1].strip(), 0)
        return value
    return token


def read_literal(text: str, pos: int) -> tuple[str, int]:
    """A KQL string literal at *pos* (after whitespace): ``'..'``, ``".."``, ``@'..'``,
    ``h'..'`` or a ``` multi-line block. Returns (value, position after it)."""
    while pos < len(text) and text[pos].isspace():
        pos += 1
    if text.startswith("```", pos):
        end = text.find("```", pos + 3)
        if end < 0:
            raise _syntax("unterminated ``` literal")
        return text[pos + 3:end], end + 3
    if pos < len(text) and text[pos] in "hH" and text[pos + 1:pos + 2] in ("'", '"', "@"):
        pos += 1
    verbatim = text.startswith(("@'", '@"'), pos)
    pos += verbatim
    if pos >= len(text) or text[pos] not in "'\"":
        raise _syntax(f"expected a string literal at: {text[pos:pos + 40]!r}")
    quote, out, i = text[pos], [], pos + 1
    while i < len(text):
        ch = text[i]
        if verbatim and ch == quote:
            if text[i + 1:i + 2] == quote:
                out.append(quote)
                i += 2
                continue
            return "".join(out), i + 1
        if not verbatim and ch == "\\" and i + 1 < len(text):
            hexa = _HEX_ESCAPE.match(text, i + 1)
            if hexa:
                out.append(chr(int(next(g for g in hexa.groups() if g), 16)))
                i = hexa.end()
                continue
            if text[i + 1] not in _ESCAPES:
                raise _syntax(f"unrecognized escape sequence \\{text[i + 1]}")
            out.append(_ESCAPES[text[i + 1]])
            i += 2
            continue
        if ch in "\r\n" and not verbatim:
            raise _syntax("a newline in a string literal must be escaped (\\n)")
        if ch == quote:
            # UTF-16 surrogate escapes (\ud83d\ude42) pair up, as in .NET strings
            joined = "".join(out).encode("utf-16-le", "surrogatepass").decode("utf-16-le")
            return joined, i + 1
        out.append(ch)
        i += 1
    raise _syntax("unterminated string literal")


def read_literals(text: str, pos: int) -> tuple[str, int]:
    """One or more adjacent string literals, concatenated as KQL does (``'[' '{..}' ']'``)."""
    value, pos = read_literal(text, pos)
    while True:
        m = re.compile(r"\s*(?=[hH]?@?['\"]|```)").match(text, pos)
        if m is None:
            return value, pos
        more, pos = read_literal(text, m.end())
        value += more


def _with_props(text: str | None) -> dict[str, str]:
    """``k = v, k2 = 'v 2'`` (the inside of ``with (...)``) -> lowercase-keyed dict."""
    props: dict[str, str] = {}
    if not text:
        return props
    pos = 0
    item = re.compile(r"\s*([A-Za-z_][\w]*)\s*=\s*")
    while pos < len(text):
        m = item.match(text, pos)
        if not m:
            break
        pos = m.end()
        if pos < len(text) and text[pos] in "'\"@":
            value, pos = read_literal(text, pos)
        else:
            end = re.compile(r"\s*(,|$)").search(text, pos)
            value, pos = text[pos:end.start()].strip(), end.start()
        props[m.group(1).lower()] = value
        comma = re.compile(r"\s*,?").match(text, pos)
        pos = comma.end() if comma else len(text)
    return props


def _columns_decl(text: str) -> list[tuple[str, str]]:
    """``a:string, ['b c']:dynamic`` -> [(name, canonical kql type)]."""
    columns, pos = [], 0
    item = re.compile(rf"\s*({_NAME})\s*:\s*([A-Za-z_][\w]*)\s*(?:,|$)")
    text = text.strip()
    while pos < len(text):
        m = item.match(text, pos)
        if not m:
            raise _syntax(f"bad column declaration near {text[pos:pos + 40]!r}")
        kind = m.group(2).lower()
        if kind not in TYPE_MAP:
            raise _syntax(f"unknown column type '{m.group(2)}'")
        columns.append((_unname(m.group(1)), kusto_type(TYPE_MAP[kind])))
        pos = m.end()
    return columns


def _split_script(script: str) -> list[str]:
    """A database script: a command starts on each line whose first character is '.'."""
    commands: list[list[str]] = []
    in_block = False  # inside a ``` literal, a line starting with '.' is text
    for line in script.splitlines():
        if not in_block and line.lstrip().startswith("."):
            commands.append([line])
        elif commands:
            commands[-1].append(line)
        if line.count("```") % 2:
            in_block = not in_block
    return ["\n".join(c).strip() for c in commands]


def _statement_split(predicate: str) -> tuple[str, str]:
    """``declare query_parameters(...); T | where ...`` -> (declaration incl. ';', body)."""
    text = predicate.strip()
    if not re.match(r"declare\s+query_parameters\s*\(", text, re.I):
        return "", text
    depth, quote, i = 0, "", 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == ";" and depth == 0:
            return text[:i + 1], text[i + 1:].strip()
        i += 1
    raise _syntax("declare query_parameters(...) must end with ';'")


def _literals_as_parameters(body: str) -> tuple[str, dict[str, str]]:
    """A soft delete's predicate with every string literal (``"..."``, ``'...'``,
    ``@"..."``, ``h"..."``) replaced by a generated parameter holding the value Kusto reads
    (:func:`read_literal`, C# escapes as Kusto.Language decodes them): duckdb-kql splices a
    literal's text into SQL as is, which would not read escapes such as ``\\u0000``. A
    literal is where the one literal function puts user values in a control command
    (Microsoft documents the predicate as a plain query:
    https://learn.microsoft.com/kusto/management/soft-delete-command)."""
    out: list[str] = []
    values: dict[str, str] = {}
    pos = 0
    start = re.compile(r"(?<![\w.])(?:[hH]?@?)(?=['\"])")
    while True:
        m = start.search(body, pos)
        if m is None:
            out.append(body[pos:])
            break
        value, end = read_literal(body, m.start())
        name = f"__loopback_lit{len(values)}"
        values[name] = value
        out.append(body[pos:m.start()] + name)
        pos = end
    return "".join(out), values


# ---------------------------------------------------------------------------
# JSON ingestion mappings
# ---------------------------------------------------------------------------

_PATH_STEP = re.compile(r"\.([A-Za-z_$][\w$-]*)|\[\s*'((?:[^'\\]|\\.)*)'\s*\]"
                        r"|\[\s*\"((?:[^\"\\]|\\.)*)\"\s*\]|\[\s*(\d+)\s*\]")
_MISSING = object()
_UNIX = {"datetimefromunixseconds": 1, "datetimefromunixmilliseconds": 1e3,
         "datetimefromunixmicroseconds": 1e6, "datetimefromunixnanoseconds": 1e9}


@dataclasses.dataclass(frozen=True)
class ColumnMapping:
    column: str
    path: str | None
    const: str | None
    transform: str | None


def parse_mapping(text: str) -> list[ColumnMapping]:
    try:
        entries = json.loads(text)
    except ValueError as exc:
        raise KustoRequestError(f"Ingestion mapping is not valid JSON: {exc}") from None
    if not isinstance(entries, list):
        raise KustoRequestError("Ingestion mapping must be a JSON array")
    out = []
    for entry in entries:
        lowered = {k.lower(): v for k, v in entry.items()} if isinstance(entry, dict) else {}
        props = {k.lower(): v for k, v in (lowered.get("properties") or {}).items()}
        column = lowered.get("column")
        if not isinstance(column, str) or not column:
            raise KustoRequestError(f"Ingestion mapping entry without a column: {entry!r}")
        path = props.get("path", lowered.get("path"))
        const = props.get("constvalue", lowered.get("constvalue"))
        transform = props.get("transform", lowered.get("transform"))
        if transform and transform.lower() not in _UNIX and transform.lower() != "none":
            raise KustoRequestError(
                f"Mapping transform '{transform}' is not supported by the loopback")
        if path is not None and not re.fullmatch(rf"\$(?:{_PATH_STEP.pattern})*", path):
            raise KustoRequestError(f"Mapping path '{path}' is not supported by the loopback")
        out.append(ColumnMapping(column, path, const, transform))
    return out


def _extract(doc: Any, path: str) -> Any:
    value = doc
    for m in _PATH_STEP.finditer(path, 1):
        name, sq, dq, index = m.groups()
        if index is not None:
            if not isinstance(value, list) or int(index) >= len(value):
                return _MISSING
            value = value[int(index)]
            continue
        key = name if name is not None else re.sub(r"\\(.)", r"\1", sq if sq is not None else dq)
        if not isinstance(value, dict) or key not in value:
            return _MISSING
        value = value[key]
    return value


def _to_column(value: Any, kind: str) -> Any:
    """A JSON value as a DuckDB value for a column of Kusto *kind* (null when it does not
    convert, as Kusto does)."""
    if value is None or value is _MISSING:
        return None
    try:
        if kind == "string":
            return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        if kind == "dynamic":
            return json.dumps(value, ensure_ascii=False)
        if kind in ("long", "int"):
            if isinstance(value, bool):
                return int(value)
            if isinstance(value, float):
                return int(value) if value.is_integer() else None
            return int(value)
        if kind == "real":
            return float(value)
        if kind == "bool":
            if isinstance(value, str):
                return {"true": True, "false": False}.get(value.lower())
            return bool(value)
        if kind == "datetime":
            return parse_datetime(value) if isinstance(value, str) else None
        if kind == "guid":
            return uuid.UUID(str(value))
        if kind == "timespan":
            return parse_timespan(str(value))
        if kind == "decimal":
            return decimal.Decimal(str(value))
    except (ValueError, TypeError, ArithmeticError):
        return None
    return value


def _json_documents(data: str, fmt: str) -> list[dict[str, Any]]:
    decoder, pos, docs = json.JSONDecoder(), 0, []
    while True:
        while pos < len(data) and data[pos] in " \t\r\n,\ufeff":
            pos += 1
        if pos >= len(data):
            return docs
        try:
            value, pos = decoder.raw_decode(data, pos)
        except ValueError as exc:
            raise KustoRequestError(
                f"Stream ingestion failed: invalid {fmt} data at offset {pos}: {exc}",
                code="BadRequest_InvalidData",
            ) from None
        values = value if isinstance(value, list) and fmt == "multijson" else [value]
        docs.extend(values)
        if not all(isinstance(v, dict) for v in values):
            raise KustoRequestError(
                f"Stream ingestion failed: {fmt} records must be JSON objects",
                code="BadRequest_InvalidData",
            )


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------


class _HTTPServer(KustoRestServer):
    """duckdb-kql's REST server (socket, DuckDB connection, ``run``), with our handler."""

    daemon_threads = True

    def __init__(self, owner: LoopbackKusto, con: Any) -> None:
        super().__init__(con, port=0, quiet=owner.quiet)
        self.RequestHandlerClass = _Handler
        self._lock = threading.RLock()  # shared by ``run`` and every DuckDB access of ours
        self.owner = owner
        self.connections: set[socket.socket] = set()
        self.workers: set[threading.Thread] = set()

    def process_request(self, request: Any, client_address: Any) -> None:
        self.connections.add(request)
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        me = threading.current_thread()
        self.workers.add(me)
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.workers.discard(me)

    def shutdown_request(self, request: Any) -> None:
        self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
            return  # a client that went away (timeouts, drops): not a server bug
        self.owner.errors.append(exc)
        if not self.quiet:
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    # answers go out in two writes (headers, body); with Nagle on, each would wait
    # ~40 ms for the client's delayed ACK
    disable_nagle_algorithm = True
    protocol_version = "HTTP/1.1"
    server_version = "kusto-loopback/1"

    @property
    def owner(self) -> LoopbackKusto:
        return self.server.owner  # type: ignore[attr-defined]

    def log_message(self, fmt: str, *args: Any) -> None:
        if not self.owner.quiet:
            super().log_message(fmt, *args)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload: Any, content_type: str = "application/json") -> None:
        if isinstance(payload, (bytes, str)):
            body = payload.encode() if isinstance(payload, str) else payload
        else:
            body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        for name, value in self.owner._extra_headers(status):
            self.send_header(name, value)
        self.send_header("Content-Type", f"{content_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's interface
        self.owner._count("other")
        self._send(404 if self.path.rstrip("/") else 200,
                   {"name": "kusto-loopback", "database": self.owner.database})

    def do_POST(self) -> None:  # noqa: N802 - http.server's interface
        owner = self.owner
        url = urlsplit(self.path)
        path = url.path.rstrip("/")
        route = ("query" if path in ("/v1/rest/query", "/v2/rest/query")
                 else "mgmt" if path in ("/v1/rest/mgmt", "/v2/rest/mgmt")
                 else "ingest" if path.startswith("/v1/rest/ingest/") else "other")
        raw = self._read_body()
        entry = LoggedRequest(route, "POST", self.path, dict(self.headers.items()), raw)
        if route in ("query", "mgmt"):
            try:
                entry.body = json.loads(raw or b"{}")
            except ValueError:
                pass  # answered below, unless a fault comes first
        owner._count(route, entry)
        refusal = owner._refuse_unauthenticated(self.headers)
        if refusal is not None:
            entry.status = refusal[0]
            self._send(*refusal)
            return
        delay, outcome = owner.faults._take(route)
        if delay is not None:
            entry.delayed = delay.seconds
            if owner._stopping.wait(delay.seconds):
                outcome = _Rule("drop", 1, None)  # shutting down: do not answer
        if outcome is not None and outcome.after:
            self._carry_out(route, path, url, raw, entry)
        if outcome is not None and outcome.kind == "drop":
            entry.fault = "drop"
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if outcome is not None:
            entry.fault, entry.status = "fail", outcome.status
            if isinstance(outcome.body, str):
                self._send(outcome.status, outcome.body, "text/plain")
            else:
                code, kind, message = _FAULT_BODIES.get(
                    outcome.status, ("General_Error", "Kusto.Data.Exceptions.KustoServiceException",
                                     f"HTTP {outcome.status} (injected by the loopback)."))
                self._send(outcome.status, outcome.body or error_body(
                    message, code=code, kind=kind, permanent=False))
            return
        status, payload = self._carry_out(route, path, url, raw, entry)
        entry.status = status
        self._send(status, payload)

    def _carry_out(self, route: str, path: str, url: Any, raw: bytes, entry: LoggedRequest
                   ) -> tuple[int, Any]:
        """Run the request; a refusal or a loopback bug becomes Kusto's error answer."""
        owner = self.owner
        try:
            if route == "ingest":
                return owner._ingest(url, self.headers, raw, entry)
            if route in ("query", "mgmt"):
                request = entry.body
                if not isinstance(request, dict):
                    raise KustoRequestError("request body must be a JSON object")
                request_id = self.headers.get("x-ms-client-request-id", str(uuid.uuid4()))
                v2 = path.startswith("/v2/")
                return owner._execute(route, v2, request, request_id)
            raise KustoRequestError(f"no route for POST {url.path}", status=404,
                                    code="General_NotFound")
        except KustoRequestError as exc:
            return exc.status, exc.body()
        except Exception as exc:  # noqa: BLE001 - a loopback bug: answer, and keep it for the test
            owner.errors.append(exc)
            return 500, error_body(f"loopback internal error: {exc!r}",
                                   code="InternalServiceError",
                                   kind="Kusto.Data.Exceptions.KustoServiceException",
                                   permanent=True)


# ---------------------------------------------------------------------------
# The endpoint
# ---------------------------------------------------------------------------


class LoopbackKusto:
    """A Kusto endpoint on 127.0.0.1 backed by in-memory DuckDB. See the module docstring.

    Attributes: ``uri``, ``database``, ``faults`` (:class:`Faults`), ``counts`` (requests per
    route: "query", "mgmt", "ingest", "other"), ``requests`` (every :class:`LoggedRequest`),
    ``errors`` (exceptions the handler did not turn into an answer: should stay empty),
    ``mappings`` ({(table, name): (kind, json text)}), ``policies``
    ({(entity kind, entity name, policy): value}), ``materialized_views`` ({name: info}).
    """

    def __init__(self, database: str = "testdb", *, strict_parameters: bool = True,
                 require_streaming_policy: bool = False, quiet: bool = True,
                 max_value_bytes: int = MAX_VALUE_BYTES,
                 max_streaming_bytes: int = MAX_STREAMING_BYTES,
                 max_result_records: int = MAX_RESULT_RECORDS,
                 max_result_bytes: int = MAX_RESULT_BYTES, tls: bool = False,
                 bearer_tokens: Any = None, schema_cache_seconds: float = 0.0) -> None:
        if not re.fullmatch(r"[A-Za-z_][\w-]*", database):
            raise ValueError(f"unsupported database name {database!r}")
        self.database = database
        self.max_value_bytes = max_value_bytes
        self.max_streaming_bytes = max_streaming_bytes
        self.max_result_records = max_result_records
        self.max_result_bytes = max_result_bytes
        self.strict_parameters = strict_parameters
        self.require_streaming_policy = require_streaming_policy
        self.quiet = quiet
        self.faults = Faults()
        self.counts: collections.Counter[str] = collections.Counter()
        self.requests: list[LoggedRequest] = []
        self.errors: list[BaseException] = []
        self.mappings: dict[tuple[str, str], tuple[str, str]] = {}
        self.policies: dict[tuple[str, str, str], Any] = {}
        self.materialized_views: dict[str, dict[str, Any]] = {}
        #: queued ingestion (data management emulation), see enable_queued_ingestion
        self.queued: QueuedIngestionService | None = None
        self._table_props: dict[str, dict[str, str]] = {}
        self._log_lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._rules_init(tls=tls, bearer_tokens=bearer_tokens, schema_cache_seconds=schema_cache_seconds)

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> LoopbackKusto:
        if self._httpd is not None or self._stopping.is_set():
            raise RuntimeError("a LoopbackKusto starts once; make a new one")
        con = duckdb_kql.connect()
        con.execute(f"ATTACH ':memory:' AS {quote_ident(self.database)}")
        con.execute(f"USE {quote_ident(self.database)}")
        self.con = con
        self._httpd = _HTTPServer(self, con)
        self._rules_start(self._httpd)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"kusto-loopback:{self._httpd.server_address[1]}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd = self._httpd
        if httpd is None:
            return
        if self.queued is not None:
            self.queued.stop()
        self._stopping.set()
        httpd.shutdown()
        for sock in list(httpd.connections):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for worker in list(httpd.workers):
            worker.join(timeout=5)
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with httpd._lock:
            self.con.close()
        self._httpd = None

    def __enter__(self) -> LoopbackKusto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> LoopbackKusto:
        import anyio

        return await anyio.to_thread.run_sync(self.start)

    async def __aexit__(self, *exc: object) -> None:
        import anyio

        await anyio.to_thread.run_sync(self.stop)

    # -- TLS and bearer tokens (tests/test_kusto_rules.py) ---------------------

    def _rules_init(self, *, tls: bool, bearer_tokens: Any, schema_cache_seconds: float) -> None:
        #: streaming ingestion's schema cache: for this many seconds after a mapping is
        #: created or altered, a streaming ingest that names it is refused as Kusto refuses
        #: an unknown mapping, unless '.clear database|table cache streamingingestion
        #: schema' ran since ("Schema updates, such as creation and modification of tables
        #: and ingestion mappings, may take up to 5 minutes for the streaming ingestion
        #: service": https://learn.microsoft.com/azure/data-explorer/ingest-data-streaming;
        #: https://learn.microsoft.com/kusto/management/data-ingestion/streaming-ingestion-schema-changes)
        self.schema_cache_seconds = schema_cache_seconds
        #: the next N cache-clearing commands answer Status=Failed for one node
        self.schema_cache_clear_failures = 0
        self._schema_changes: dict[str, float] = {}
        #: a soft delete holds its table this long after it ran (the extents replacement
        #: phase); a second soft delete on the same table meanwhile is refused: "Don't run
        #: multiple parallel soft delete operations on the same table, as this may result
        #: in failures of some or all the commands"
        #: (https://learn.microsoft.com/kusto/concepts/data-soft-delete). Each refusal is
        #: kept in ``soft_delete_refusals``
        #: regular expressions: a command matching one is refused (400, permanent), as a
        #: service that does not offer it answers (e.g. a Microsoft Fabric Eventhouse)
        self.refuse_commands: list[str] = []
        #: the Retry-After header sent with every 429 answer (seconds, or an HTTP date);
        #: None sends none
        self.retry_after: str | None = None
        self.soft_delete_seconds = 0.0
        self.soft_delete_refusals: list[str] = []
        self._deleting: set[tuple[str, str]] = set()
        #: serve https with a self-signed certificate for 127.0.0.1 (``ca_file`` is its
        #: PEM: hand it to the client, e.g. REQUESTS_CA_BUNDLE), so a client that sends
        #: tokens only over https can be tested as in production
        self.tls = tls
        self.ca_file: str | None = None
        #: when a collection: every request must carry ``Authorization: Bearer <token>``
        #: with a token in it (checked at request time, so a test may add tokens as its
        #: credential issues them), else 401 as Kusto answers an unauthenticated request
        self.bearer_tokens = bearer_tokens
        #: the Authorization header of every request, in order
        self.authorizations: list[str | None] = []

    def _rules_start(self, httpd: Any) -> None:
        if not self.tls:
            return
        import ssl
        import tempfile

        cert, key = _self_signed_certificate("127.0.0.1")
        folder = tempfile.mkdtemp(prefix="kusto-loopback-tls-")
        self.ca_file = f"{folder}/cert.pem"
        with open(self.ca_file, "wb") as f:
            f.write(cert)
        with open(f"{folder}/key.pem", "wb") as f:
            f.write(key)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.ca_file, f"{folder}/key.pem")
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)

    def _schema_changed(self, table: str) -> None:
        self._schema_changes[table] = time.monotonic()

    def _refuse_stale_mapping(self, table: str, mapping_name: str | None) -> None:
        changed = self._schema_changes.get(table)
        if (mapping_name and changed is not None
                and time.monotonic() - changed < self.schema_cache_seconds):
            raise KustoRequestError(
                f"Mapping reference '{mapping_name}' of type 'Json' in table '{table}' of "
                f"database '{self.database}' wasn't found.",
                code="BadRequest_MappingReferenceWasNotFound",
                kind="Kusto.Data.Exceptions.EntityNotFoundException")

    def _cmd_clear_schema_cache(self, m: re.Match[str], _p: Any) -> dict[str, Any]:
        table = m.group("table")
        if table is not None:
            self._require_table(_unname(table))
        if self.schema_cache_clear_failures > 0:
            self.schema_cache_clear_failures -= 1
            return _v1([("NodeId", "string"), ("Status", "string")],
                       [["Node1", "Succeeded"], ["Node2", "Failed"]])
        if table is None:
            self._schema_changes.clear()
        else:
            self._schema_changes.pop(_unname(table), None)
        return _v1([("NodeId", "string"), ("Status", "string")], [["Node1", "Succeeded"]])

    def _extra_headers(self, status: int) -> list[tuple[str, str]]:
        if status == 429 and self.retry_after is not None:
            return [("Retry-After", self.retry_after)]
        return []

    def _refuse_listed_command(self, text: str) -> None:
        for pattern in self.refuse_commands:
            if re.match(pattern, text, re.I | re.S):
                raise KustoRequestError(f"The command is not supported by this service: {text[:60]!r}",
                                        code="BadRequest_CommandNotSupported")

    def _soft_delete_enter(self, handler: Any, m: re.Match[str]) -> tuple[str, str] | None:
        if handler is not LoopbackKusto._cmd_delete_records:
            return None
        key = (m.group("kind").lower(), _unname(m.group("table")))
        with self._log_lock:
            if key in self._deleting:
                self.soft_delete_refusals.append(key[1])
                raise KustoRequestError(
                    f"Soft delete failed: another soft delete is running on {key[0]} '{key[1]}'; "
                    "parallel soft deletes on one table are not supported",
                    code="General_BadRequest", status=409, permanent=False)
            self._deleting.add(key)
        return key

    def _soft_delete_exit(self, key: tuple[str, str] | None) -> None:
        if key is None:
            return
        if self.soft_delete_seconds:
            self._stopping.wait(self.soft_delete_seconds)
        with self._log_lock:
            self._deleting.discard(key)

    def _refuse_unauthenticated(self, headers: Any) -> tuple[int, Any] | None:
        header = headers.get("Authorization")
        with self._log_lock:
            self.authorizations.append(header)
        if self.bearer_tokens is None:
            return None
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() == "bearer" and token in self.bearer_tokens:
            return None
        return 401, error_body("Unauthorized: the request has no valid bearer token",
                               code="Unauthorized", kind="Kusto.Common.Svc.Exceptions.UnauthorizedException",
                               permanent=True)

    # -- conveniences for tests -----------------------------------------------

    @property
    def uri(self) -> str:
        if self._httpd is None:
            raise RuntimeError("not started")
        url = self._httpd.url
        return "https://" + url.partition("://")[2] if self.tls else url

    def kcsb(self) -> Any:
        """``KustoConnectionStringBuilder.with_no_authentication(uri)``, default db set."""
        from azure.kusto.data import KustoConnectionStringBuilder

        kcsb = KustoConnectionStringBuilder.with_no_authentication(self.uri)
        kcsb.initial_catalog = self.database
        return kcsb

    def sql(self, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
        """Run DuckDB SQL directly (serialized with the requests)."""
        with self._lock:
            cursor = self.con.execute(statement, params) if params else self.con.execute(statement)
            return cursor.fetchall() if cursor.description else []

    def rows(self, table: str) -> list[dict[str, Any]]:
        """Every row of *table* in insertion order, dynamic columns parsed."""
        columns = self._columns(table)
        if columns is None:
            raise KeyError(table)
        out = []
        for row in self.sql(f"SELECT * FROM {quote_ident(table)} ORDER BY rowid"):
            out.append({name: (json.loads(v) if kind == "dynamic" and v is not None else v)
                        for (name, kind), v in zip(columns.items(), row, strict=True)})
        return out

    def streaming_enabled(self, table: str) -> bool:
        for key in (("table", table), ("database", self.database)):
            policy = self.policies.get((*key, "streamingingestion"))
            if isinstance(policy, dict) and "IsEnabled" in policy:
                return bool(policy["IsEnabled"])
        return False

    def enable_queued_ingestion(self, storage: Any, **options: Any) -> QueuedIngestionService:
        """Serve queued ingestion over ``storage`` (a started ``tests.azurite_server.Azurite``):
        see :class:`QueuedIngestionService` (``options`` go to it). Stopped with the server."""
        if self.queued is not None:
            raise RuntimeError("queued ingestion is enabled already")
        self.queued = QueuedIngestionService(self, storage, **options).start()
        return self.queued

    # -- internals ----------------------------------------------------------

    @property
    def _lock(self) -> threading.RLock:
        assert self._httpd is not None, "not started"
        return self._httpd._lock

    def _count(self, route: str, entry: LoggedRequest | None = None) -> None:
        with self._log_lock:
            self.counts[route] += 1
            if entry is not None:
                self.requests.append(entry)

    def _columns(self, table: str) -> dict[str, str] | None:
        """Kusto column types of base table *table* (exact name), or None."""
        with self._lock:
            rows = self.con.execute(
                "SELECT table_name, column_name, data_type FROM information_schema.columns "
                "WHERE table_catalog = current_database() AND table_name = ? "
                "AND table_name IN (SELECT table_name FROM information_schema.tables "
                "  WHERE table_catalog = current_database() AND table_type = 'BASE TABLE') "
                "ORDER BY ordinal_position", [table]).fetchall()
        return {c: kusto_type(t) for name, c, t in rows if name == table} or None

    def _tables(self) -> list[str]:
        with self._lock:
            rows = self.con.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_catalog = "
                "current_database() AND table_type = 'BASE TABLE' ORDER BY table_name").fetchall()
        return [r[0] for r in rows]

    def _require_table(self, table: str) -> dict[str, str]:
        columns = self._columns(table)
        if columns is None:
            raise _not_found("Table", table)
        return columns

    def _check_database(self, name: str | None) -> None:
        if name and name != self.database:
            raise _not_found("Database", name)

    # -- query and mgmt -------------------------------------------------------

    def _execute(self, route: str, v2: bool, request: dict[str, Any], request_id: str
                 ) -> tuple[int, Any]:
        csl = request.get("csl")
        if not isinstance(csl, str) or not csl.strip():
            raise KustoRequestError("request has no 'csl' to run")
        if not (route == "mgmt" and request.get("db") == "NetDefaultDB"):
            # NetDefaultDB: the SDK's placeholder when no database is given (e.g. the queued
            # ingest client's cluster-level commands)
            self._check_database(request.get("db"))
        properties = _properties(request)
        parameters = properties.get("Parameters") or {}
        options = {str(k).lower(): v for k, v in (properties.get("Options") or {}).items()}
        head = strip_leading_comments(csl).strip()
        if head.startswith("."):
            if route != "mgmt":
                raise KustoRequestError(
                    "Control commands must be sent to the management endpoint (/v1/rest/mgmt)")
            return 200, self._command(head, parameters)
        notruncation = _truthy(options.pop("notruncation", False))
        result = self._query(csl, parameters, options)
        failure = None if notruncation else self._truncation(result)
        if failure is not None:
            result = Result(result.columns, result.rows[: failure[0]])
        body = v2_response(result, request_id) if v2 else v1_response(result)
        if failure is not None:
            _report_partial_failure(body, failure[1])
        return 200, body

    def _truncation(self, result: Result) -> tuple[int, str] | None:
        """Kusto's result-set limits (query limits: 500,000 records, 64 MB), unless the
        request set ``notruncation``: past either, Kusto has already answered 200 OK and
        reports a partial query failure in the result data after the rows it sent
        (https://learn.microsoft.com/azure/data-explorer/kusto/concepts/querylimits,
        https://learn.microsoft.com/azure/data-explorer/kusto/concepts/partial-query-failures)."""
        if len(result.rows) > self.max_result_records:
            return self.max_result_records, (
                f"Query result set has exceeded the internal record count limit "
                f"{self.max_result_records} (E_QUERY_RESULT_SET_TOO_LARGE).")
        size = 0
        for i, row in enumerate(result.rows):
            size += len(orjson.dumps(list(row), default=str))
            if size > self.max_result_bytes:
                return i, (
                    f"Query result set has exceeded the internal data size limit "
                    f"{self.max_result_bytes} (E_QUERY_RESULT_SET_TOO_LARGE).")
        return None

    def _query(self, csl: str, parameters: Any, options: dict[str, Any]) -> Result:  # noqa: D401
        try:
            decoded = decode_parameters(csl, parameters, strict=self.strict_parameters)
            assert self._httpd is not None
            return self._httpd.run(csl, decoded or None, self.database, options)
        except KqlError as exc:
            raise _kql_error(exc) from None
        except KustoRequestError:
            raise
        except Exception as exc:  # noqa: BLE001 - any engine failure is the answer
            raise KustoRequestError(f"Query execution failed: {exc}") from None

    def _command(self, text: str, parameters: Any = None) -> dict[str, Any]:
        text = text.strip().rstrip(";").strip()
        self._refuse_listed_command(text)
        for pattern, handler in _COMMANDS:
            m = pattern.match(text)
            if m:
                held = self._soft_delete_enter(handler, m)
                try:
                    with self._lock:  # one command at a time, like a database's admin queue
                        return handler(self, m, parameters)
                except KustoRequestError:
                    raise
                except KqlError as exc:
                    raise _kql_error(exc) from None
                except Exception as exc:  # noqa: BLE001 - e.g. a DuckDB error: the answer
                    raise KustoRequestError(f"Command failed: {exc}") from None
                finally:
                    self._soft_delete_exit(held)
        raise _syntax(f"the loopback does not support this command: {text[:120]!r}")

    # tables ------------------------------------------------------------------

    def _cmd_create_table(self, m: re.Match[str], _p: Any) -> dict[str, Any]:
        verb = m.group("verb").lower()
        created = []
        for tm in re.finditer(rf"({_NAME})\s*\(([^)]*)\)", m.group("tables")):
            table, declared = _unname(tm.group(1)), _columns_decl(tm.group(2))
            existing = self._columns(table)
            with self._lock:
                if existing is None:
                    if verb == "alter-merge":
                        raise _not_found("Table", table)
                    cols = ", ".join(f"{quote_ident(c)} {TYPE_MAP[k]}" for c, k in declared)
                    self.con.execute(f"CREATE TABLE {quote_ident(table)} ({cols})")
                else:
                    for column, kind in declared:
                        if column in existing and existing[column] != kind:
                            raise KustoRequestError(
                                f"Column '{column}' of table '{table}' is of type "
                                f"'{existing[column]}'; it cannot be changed to '{kind}'")
                        if column not in existing:
                            if verb == "create":
                                raise KustoRequestError(
                                    f"Table '{table}' already exists with a different schema")
                            self.con.execute(f"ALTER TABLE {quote_ident(table)} ADD COLUMN "
                                             f"{quote_ident(column)} {TYPE_MAP[kind]}")
            self._table_props.setdefault(table, {}).update(_with_props(m.group("with")))
            created.append(table)
        return self._cslschema_result(created)

    def _cmd_drop_table(self, m: re.Match[str], _p: Any) -> dict[str, Any]:
        table = _unname(m.group("table"))
        if self._columns(table) is None:
            if m.group("ifexists"):
                return self._show_tables_result()
            raise _not_found("Table", table)
        with self._lock:
            self.con.execute(f"DROP TABLE {quote_ident(table)}")
        for key in [k for k in self.mappings if k[0] == table]:
            del self.mappings[key]
        for key in [k for k in self.policies if k[:2] == ("table", table)]:
            del self.policies[key]
        self._table_props.pop(table, None)
        return self._show_tables_result()

    def _show_tables_result(self) -> dict[str, Any]:
        return _v1([("TableName", "string"), ("DatabaseName", "string"), ("Folder", "string"),
                    ("DocString", "string")],
                   [[t, self.database, self._table_props.get(t, {}).get("folder"),
                     self._table_props.get(t, {}).get("docstring")] for t in self._tables()])

    def _cmd_show_tables(self, m: re.Match[str], _p: Any) -> dict[str, Any]:
        return self._show_tables_result()

    def _cslschema_result(self, tables: list[str]) -> dict[str, Any]:
        rows = []
        for table in tables:
            columns = self._require_table(table)
            props = self._table_props.get(table, {})
            rows.append([table, ",".join(f"{_cslname(c)}:{k}" for c, k in columns.items()),
                         self.database, props.get("folder"), props.get("docstring")])
        return _v1([("TableName", "string"), ("Schema", "string"), ("DatabaseName", "string"),
                    ("Folder", "string"), ("DocString", "string")], rows)

    def _table_schema_json(self, table: str) -> dict[str, Any]:
        from duckdb_kql.types import net_type

        return {"Name": table, "OrderedColumns": [
            {"Name": c, "Type": net_type(k), "CslType": k}
            for c, k in self._require_table(table).items()]}

    def _cmd_show_table_schema(self, m: re.Match[str], _p: Any) -> dict[str, Any]:
        table = _unname(m.group("table"))
        if m.group("form").lower() == "cslschema":
            return self._cslschema_result([table])
        props = self._table_props.get(table, {})
        return _v1([("TableName", "string"), ("Schema", "string"), ("DatabaseName", "string"),
                    ("Folder", "string"), ("DocString", "string")],
                   [[table, json.dumps(self._table_schema_json(table)), self.database,
                     props.get("folder"), props.get("docstring")]])

    def _cmd_show_database_schema(self, m: re.Match[str], _p: Any) -> dict[str, Any]:
        if m.group("db"):
            self._check_database(_unname(m.group("db")))
        if m.group("form").lower() == "cslschema":
            return self._cslschema_result(self._tables())
        schema = {"Databases": {self.database: {
            "Name": self.database,
            "Tables": {t: self._table_schema_json(t) for t in self._tables()},
            "MaterializedViews": {n: {"Name": n, "SourceTable": v["source"], "Query": v["query"]}
                                  for n, v in self.materialized_views.items()},
            "ExternalTables": {}, "Functions": {},
        }}}
        return _v1([("DatabaseSchema", "string")], [[json.dumps(schema)]])

    def _cmd_show_databases(self, m: re.Match[str], _p: Any) -> dict[str, Any]:
        columns = _COMMAND_SCHEMA[".show databases"]
        values = {"DatabaseName": self.database, "PersistentStorage": "", "Version": "v1.0",
                  "IsCurrent": True, "DatabaseAccessMode": "ReadWrite", "PrettyName": None,
                  "ReservedSlot1": None, "DatabaseId": None, "InTransitionTo": "",
                  "SuspensionState": None}
        return v1_response(Result([RestColumn(c.name, c.column_type or "string", c.data_type,
                                              c.column_type) for c in columns],
                                  [[values[c.name] for c in columns]]))

    def _cmd_show_version(self, m: re.Match[str], _p: Any) -> dict[str, Any]:
        return v1_response(self._query(".show version", None, {}))

    # ingestion mappings --------------------------------------------------------

    def _cmd_mapping(self, m: re.Match[str], _p: Any) -> dict[str, Any]:
        verb, kind = m.group("verb").lower(), m.group("kind").lower()
        table = _unname(m.group("table"))
        rest = m.group("rest")
        name, pos = (read_literal(rest, 0) if rest.lstrip()[:1] in ("'", '"', "@")
                     else _bare_name(rest))
        body, pos = read_literals(rest, pos)
        if rest[pos:].strip() and not re.fullmatch(r"\s*with\s*\(.*\)\s*", rest[pos:], re.S):
            raise _syntax(f"unexpected text after the mapping: {rest[pos:pos + 40]!r}")
        columns = self._require_table(table)
        if kind != "json":
            raise KustoRequestError(f"The loopback only supports json mappings, not '{kind}'")
        unknown = [e.column for e in parse_mapping(body) if e.column not in columns]
        if unknown:
            raise KustoRequestError(f"Mapping refers to columns that table '{table}' does not "
                                    f"have: {unknown}")
        exists = (table, name) in self.mappings
        if verb == "create" and exists:
            raise KustoRequestError(f"Ingestion mapping '{name}' already exists on table '{table}'",
                                    code="BadRequest_EntityAlreadyExists")
        if verb == "alter" and not exists:
            raise _not_found("IngestionMapping", name)
        self.mappings[(table, name)] = (kind, body)
        self._schema_changed(table)
        return self._mappings_result([(table, name)])

    def _cmd_drop_mapping(self, m: re.Match[str], _p: Any) -> dict[str, Any]:
        table, rest = _unname(m.group("table")), m.group("rest")
        name, _ = (read_literal(rest, 0) if rest.lstrip()[:1] in ("'", '"', "@")
                   else _bare_name(rest))
        if self.mappings.pop((table, name), None) is None:
            raise _not_found("IngestionMapping", name)
        return self._mappings_result([k for k in self.mappings if k[0] == table])

    def _cmd_show_mappings(self, m: re.Match[str], _p: Any) -> dict[str, Any]:
        scope = m.group("scope").lower()
        if scope == "table":
            table = _unname(m.group("name"))
            self._require_table(table)
            keys = [k for k in self.mappings if k[0] == table]
        else:
            if m.group("name"):
                self._check_database(_unname(m.group("name")))
            keys = list(self.mappings)
        kind = (m.group("kind") or "").lower()
        return self._mappings_result([k for k in keys if not kind or self.mappings[k][0] == kind])

    def _mappings_result(self, keys: list[tuple[str, str]]) -> dict[str, Any]:
        return _v1([("Name", "string"), ("Kind", "string"), ("Mapping", "string"),
                    ("LastUpdatedOn", "datetime"), ("Database", "string"), ("Table", "string")],
                   [[name, self.mappings[(table, name)][0].capitalize(),
                     self.mappings[(table, name)][1], None, self.database, table]
                    for table, name in keys])

    # policies --------------------------------------------------------------------

    def _entity(self, kind: str, raw: str) -> tuple[str, str]:
        kind, name = kind.lower(), _unname(raw)
        if kind == "database":
            self._check_database(name)
        elif kind == "table":
            self._require_table(name)
        elif name not in self.materialized_views:
            raise _not_found("MaterializedView", name)
        return kind, name

    def _cmd_alter_policy(self, m: re.Match[str], _p: Any) -> dict[str, Any]:
        kind, name = self._entity(m.group("kind"), m.group("name"))
        policy, rest = m.group("policy").lower(), m.group("rest").strip()
        value: Any
        if rest[:1] in ("'", '"', "@", "`"):
            text, _ = read_literal(rest, 0)
            try:
                value = json.loads(text)
            except ValueError:
                raise KustoRequestError(f"Policy '{policy}' is not valid JSON") from None
        elif policy == "streamingingestion" and rest.lower() in ("enable", "disable"):
            value = {"IsEnabled": rest.lower() == "enable"}
        else:
            value = {"Command": rest}
        if m.group("verb").lower() == "alter-merge" and isinstance(
                self.policies.get((kind, name, policy)), dict) and isinstance(value, dict):
            value = {**self.policies[(kind, name, policy)], **value}
        self.policies[(kind, name, policy)] = value
        return self._policy_result(kind, name, policy)

    def _cmd_delete_policy(self, m: re.Match[str], _p: Any) -> dict[str, Any]:
        kind, name = self._entity(m.group("kind"), m.group("name"))
        self.policies.pop((kind, name, m.group("policy").lower()), None)
        return self._policy_result(kind, name, m.group("policy").lower())

    def _cmd_show_policy(self, m: re.Match[str], _p: Any) -> dict[str, Any]:
        kind, name = self._entity(m.group("kind"), m.group("name"))
        return self._policy_result(kind, name, m.group("policy").lower())

    def _policy_result(self, kind: str, name: str, policy: str) -> dict[str, Any]:
        entity = f"[{self.database}]" if kind == "database" else f"[{self.database}].[{name}]"
        value = self.policies.get((kind, name, policy))
        return _v1([("PolicyName", "string"), ("EntityName", "string"), ("Policy", "string"),
                    ("ChildEntities", "string"), ("EntityType", "string")],
                   [[_POLICY_NAMES.get(policy, policy.capitalize()) + "Policy", entity,
                     json.dumps(value), None,
                     {"materialized-view": "MaterializedView"}.get(kind, kind.capitalize())]])

    # materialized views ---------------------------------------------------------

    def _cmd_create_view(self, m: re.Match[str], _p: Any) -> dict[str, Any]:
        verb, name = m.group("verb").lower(), _unname(m.group("name"))
        source, query = _unname(m.group("source")), m.group("query").strip()
        self._require_table(source)
        if name in self.materialized_views or self._columns(name) is not None:
            if m.group("ifnotexists"):
                return self._views_result([name])
            if verb == "create":
                raise KustoRequestError(f"Materialized view '{name}' already exists",
                                        code="BadRequest_EntityAlreadyExists")
        elif verb == "alter":
            raise _not_found("MaterializedView", name)
        with self._lock:
            sql = duckdb_kql.to_sql(query, schema=_duck_schema(self.con))
            self.con.execute(f"CREATE OR REPLACE VIEW {quote_ident(name)} AS {sql}")
        self.materialized_views[name] = {
            "source": source, "query": query, "with": _with_props(m.group("with")),
            "created": dt.datetime.now(dt.UTC).replace(tzinfo=None)}
        return self._views_result([name])

    def _cmd_show_views(self, m: re.Match[str], _p: Any) -> dict[str, Any]:
        if m.group("name"):
            name = _unname(m.group("name"))
            if name not in self.materialized_views:
                raise _not_found("MaterializedView", name)
            return self._views_result([name])
        return self._views_result(sorted(self.materialized_views))

    def _cmd_drop_view(self, m: re.Match[str], _p: Any) -> dict[str, Any]:
        name = _unname(m.group("name"))
        if self.materialized_views.pop(name, None) is None:
            if m.group("ifexists"):
                return self._views_result([])
            raise _not_found("MaterializedView", name)
        with self._lock:
            self.con.execute(f"DROP VIEW IF EXISTS {quote_ident(name)}")
        return self._views_result([])

    def _views_result(self, names: list[str]) -> dict[str, Any]:
        columns = _COMMAND_SCHEMA[".show materialized-views"]
        rows = []
        for name in names:
            view = self.materialized_views[name]
            now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
            values = {"Name": name, "SourceTable": view["source"], "Query": view["query"],
                      "MaterializedTo": now, "LastRun": now, "LastRunResult": "Completed",
                      "IsHealthy": True, "IsEnabled": True, "Status": "Enabled",
                      "Folder": view["with"].get("folder", ""),
                      "DocString": view["with"].get("docstring", ""),
                      "AutoUpdateSchema": view["with"].get("autoupdateschema", "false") == "true",
                      "EffectiveDateTime": view["created"], "LastDefinitionUpdate": view["created"],
                      "Lookback": None, "LookbackColumn": None}
            rows.append([values[c.name] for c in columns])
        kinds = {"time": "timespan"}
        return v1_response(Result([RestColumn(c.name, kinds.get(c.column_type or "", c.column_type
                                                                  or "string"),
                                              c.data_type, c.column_type) for c in columns], rows))

    # stored functions --------------------------------------------------------------

    def _cmd_create_function(self, m: re.Match[str], _p: Any) -> dict[str, Any]:
        """``.create|.create-or-alter|.alter function [with (...)] Name(params) { body }``:
        stored for this database's queries (duckdb-kql's stored functions). As Kusto
        (https://learn.microsoft.com/kusto/management/create-alter-function): ``.create``
        of an existing name fails, ``.alter`` of a missing one fails, the body is
        validated (here: translated, its parameters declared) unless
        ``skipvalidation``, and the answer is the function's row of ``.show functions``."""
        from duckdb_kql.stored_functions import parse_functions

        verb = m.group("verb").lower()
        parsed = parse_functions([m.string])
        assert parsed is not None
        (name, function), = parsed[None].items()
        assert self._httpd is not None
        current = dict((self._httpd.functions or {}).get(None, {}))
        if verb == "create" and name in current:
            raise KustoRequestError(f"Function '{name}' already exists", code="BadRequest_EntityAlreadyExists")
        if verb == "alter" and name not in current:
            raise _not_found("Function", name)
        params = function.parameters.strip()[1:-1].strip()
        body = function.body.strip()[1:-1]
        if "skipvalidation" not in m.string.lower():
            declared = f"declare query_parameters({params});\n" if params else ""
            tables = _duck_schema(self.con)
            key = (declared + body, repr(sorted(tables.items())))
            if key not in _VALID_FUNCTIONS:  # the same definition on the same tables: checked once
                duckdb_kql.to_sql(declared + body, schema=tables)
                _VALID_FUNCTIONS.add(key)
        current[name] = function
        self._httpd.functions = {**(self._httpd.functions or {}), None: current}
        columns = _COMMAND_SCHEMA[".show functions"]
        values = {"Name": name, "Parameters": function.parameters, "Body": function.body,
                  "Folder": function.folder, "DocString": function.docstring}
        return v1_response(Result([RestColumn(c.name, c.column_type or "string", c.data_type, c.column_type)
                                   for c in columns], [[values[c.name] for c in columns]]))

    # soft delete ------------------------------------------------------------------

    def _cmd_delete_records(self, m: re.Match[str], parameters: Any) -> dict[str, Any]:
        table, predicate = _unname(m.group("table")), m.group("predicate")
        whatif = _with_props(m.group("with")).get("whatif", "false").lower() == "true"
        view = m.group("kind").lower() == "materialized-view"
        if view and table not in self.materialized_views:
            raise _not_found("MaterializedView", table)
        if not view:
            self._require_table(table)
        declaration, body = _statement_split(predicate)
        body, literals = _literals_as_parameters(body)
        if literals:
            declaration = (f"declare query_parameters({', '.join(f'{n}:string' for n in literals)});"
                           f"{declaration}")
        head = re.match(rf"\s*({_NAME})\s*(?=\||$)", body)
        if head is None or _unname(head.group(1)) != table:
            raise KustoRequestError(
                f"The predicate of '.delete table {table} records' must be a query over "
                f"'{table}' (\"{table} | where ...\")")
        operators = re.sub(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", "''", body)
        if not re.search(r"\|\s*where\b", operators):
            raise KustoRequestError("The predicate must contain at least one 'where' operator")
        if re.search(r"\|\s*(?!where\b|extend\b|project\b)[a-z-]+", operators):
            raise KustoRequestError("The predicate may only use 'where', 'extend' and 'project'")
        # The predicate runs over a view of T that carries DuckDB's rowid, and the rows it
        # selects are deleted by rowid. The emulated materialized view is a live view of
        # its source table, so there is nothing to delete from it: only count.
        source = "__loopback_delete_source"
        query = f"{declaration}\n{source}{body[head.end():]}\n| project __loopback_rowid"
        with self._lock:
            rowid = "0" if view else "rowid"
            self.con.execute(f"CREATE OR REPLACE VIEW {source} AS SELECT *, "
                             f"{rowid} AS __loopback_rowid FROM {quote_ident(table)}")
            try:
                decoded = decode_parameters(query, parameters, strict=self.strict_parameters)
                decoded.update(literals)
                sql = duckdb_kql.to_sql(query, schema=_duck_schema(self.con), parameters=decoded)
                if sql.unbound:
                    raise KqlSchemaError(", ".join(sql.unbound),
                                         hint="declared query parameter with no value")
                ids = [r[0] for r in self.con.execute(f"SELECT * FROM ({sql})",
                                                      sql.parameters or None).fetchall()]
                if ids and not whatif and not view:
                    self.con.execute(f"DELETE FROM {quote_ident(table)} WHERE rowid IN "
                                     f"(SELECT UNNEST(?::BIGINT[]))", [ids])
            finally:
                self.con.execute(f"DROP VIEW IF EXISTS {source}")
        rows = [[table, self.database, str(uuid.uuid4()), None if whatif else str(uuid.uuid4()),
                 len(ids)]] if ids else []
        return _v1([("TableName", "string"), ("DatabaseName", "string"),
                    ("OriginalExtentId", "string"), ("ResultExtentId", "string"),
                    ("RecordsMatchPredicate", "long")], rows)

    def _cmd_ingestion_resources(self, m: re.Match[str], _p: Any) -> dict[str, Any]:
        if self.queued is not None:
            return self.queued.resources_result()
        raise KustoRequestError(
            "Queued ingestion is not supported by the loopback: '.get ingestion resources' "
            "needs a data management endpoint with blob storage and queues",
            code="BadRequest_NotSupported")

    def _cmd_identity_token(self, m: re.Match[str], _p: Any) -> dict[str, Any]:
        if self.queued is None:
            return self._cmd_ingestion_resources(m, _p)  # the same refusal
        return _v1([("AuthorizationContext", "string")], [[self.queued.identity_token]])

    # scripts ------------------------------------------------------------------------

    def _cmd_script(self, m: re.Match[str], parameters: Any) -> dict[str, Any]:
        continue_on_errors = _with_props(m.group("with")).get(
            "continueonerrors", "false").lower() == "true"
        rows, failed = [], False
        for command in _split_script(m.group("script")):
            kind = " ".join(command.split()[:2])
            if failed:
                rows.append([str(uuid.uuid4()), kind, command, "Skipped", ""])
                continue
            try:
                self._command(command, parameters)
                rows.append([str(uuid.uuid4()), kind, command, "Completed", ""])
            except KustoRequestError as exc:
                rows.append([str(uuid.uuid4()), kind, command, "Failed", str(exc)])
                failed = not continue_on_errors
        return _v1([("OperationId", "guid"), ("CommandType", "string"), ("CommandText", "string"),
                    ("Result", "string"), ("Reason", "string")], rows)

    # -- streaming ingestion ------------------------------------------------------

    def _ingest(self, url: Any, headers: Any, raw: bytes, entry: LoggedRequest
                ) -> tuple[int, Any]:
        parts = [unquote(p) for p in url.path.split("/")[4:]]
        if len(parts) != 2 or not all(parts):
            raise KustoRequestError("expected /v1/rest/ingest/{database}/{table}", status=404,
                                    code="General_NotFound")
        database, table = parts
        query = {k.lower(): v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        self._check_database(database)
        if query.get("sourcekind", "").lower() == "uri":
            raise KustoRequestError("The loopback does not ingest from blob URIs")
        columns = self._require_table(table)
        if self.require_streaming_policy and not self.streaming_enabled(table):
            raise KustoRequestError(
                f"Streaming ingestion policy is not enabled for table '{table}' in database "
                f"'{self.database}'", code="BadRequest_StreamingIngestionPolicyNotEnabled")
        fmt = query.get("streamformat", "").lower()
        if fmt not in ("json", "multijson", "singlejson"):
            raise KustoRequestError(f"The loopback ingests json/multijson/singlejson, not '{fmt}'")
        encoding = headers.get("Content-Encoding", "").lower()
        try:
            data = (gzip.decompress(raw) if encoding == "gzip"
                    else zlib.decompress(raw) if encoding == "deflate" else raw)
            text = data.decode("utf-8")
        except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
            raise KustoRequestError(f"Stream ingestion failed: cannot decode the body "
                                    f"({encoding or 'identity'}): {exc}",
                                    code="BadRequest_InvalidData") from None
        entry.body = data
        if len(data) > self.max_streaming_bytes:
            raise KustoRequestError(
                f"Stream ingestion failed: the request carries {len(data)} bytes of data, over "
                f"the streaming ingestion limit of {self.max_streaming_bytes} bytes; use queued "
                "ingestion for larger data", code="BadRequest_StreamingIngestionDataTooLarge")
        self._refuse_stale_mapping(table, query.get("mappingname"))
        count = self._store(table, columns, _json_documents(text, fmt), query.get("mappingname"))
        return 200, _v1([("ConsumedRecordsCount", "long"), ("UpdatePolicyStatus", "string"),
                         ("UpdatePolicyFailureCode", "string"),
                         ("UpdatePolicyFailureReason", "string")],
                        [[count, "Inactive", "Unknown", None]])

    def _store(self, table: str, columns: dict[str, str], docs: list[dict[str, Any]],
               mapping_name: str | None) -> int:
        """Map JSON documents to rows of *table* and append them (Kusto's value-size rules
        applied); returns the number of rows."""
        if mapping_name:
            found = self.mappings.get((table, mapping_name))
            if found is None:
                raise KustoRequestError(
                    f"Mapping reference '{mapping_name}' of type 'Json' in table '{table}' of "
                    f"database '{self.database}' wasn't found.",
                    code="BadRequest_MappingReferenceWasNotFound",
                    kind="Kusto.Data.Exceptions.EntityNotFoundException")
            mapping = parse_mapping(found[1])
        else:
            mapping = [ColumnMapping(c, f"$[{json.dumps(c)}]", None, None) for c in columns]
        names = [e.column for e in mapping]
        rows = [[self._limited(self._mapped(doc, e, columns[e.column]), columns[e.column])
                 for e in mapping] for doc in docs]
        if rows:
            slots = "(" + ", ".join("CAST(? AS JSON)" if columns[n] == "dynamic" else "?"
                                    for n in names) + ")"
            insert = (f"INSERT INTO {quote_ident(table)} "
                      f"({', '.join(quote_ident(n) for n in names)}) VALUES ")
            with self._lock:
                for start in range(0, len(rows), 200):
                    chunk = rows[start:start + 200]
                    self.con.execute(insert + ", ".join([slots] * len(chunk)),
                                     [v for row in chunk for v in row])
        return len(rows)

    def _limited(self, value: Any, kind: str) -> Any:
        """What Kusto stores for a cell: a string over the value-size limit is cut to it
        (at a character boundary), a dynamic value over it becomes null; both silently."""
        if kind not in ("string", "dynamic") or not isinstance(value, str):
            return value
        data = value.encode("utf-8")
        if len(data) <= self.max_value_bytes:
            return value
        if kind == "dynamic":
            return None
        return data[:self.max_value_bytes].decode("utf-8", "ignore")

    # -- .ingest inline --------------------------------------------------------------

    def _cmd_ingest_inline(self, m: re.Match[str], _p: Any) -> dict[str, Any]:
        table = _unname(m.group("table"))
        columns = self._require_table(table)
        props = _with_props(m.group("with"))
        fmt = props.get("format", "csv").lower()
        if fmt not in ("json", "multijson", "singlejson"):
            raise KustoRequestError(f"The loopback ingests json/multijson/singlejson inline, not '{fmt}'")
        mapping = props.get("ingestionmappingreference")
        self._store(table, columns, _json_documents(m.group("data").lstrip("\r\n"), fmt), mapping)
        return _v1([("ExtentId", "guid")], [[str(uuid.uuid4())]])

    @staticmethod
    def _mapped(doc: dict[str, Any], entry: ColumnMapping, kind: str) -> Any:
        if entry.path is None:
            return _to_column(entry.const, kind)
        value = _extract(doc, entry.path)
        scale = _UNIX.get((entry.transform or "").lower())
        if scale and isinstance(value, (int, float)) and not isinstance(value, bool):
            return dt.datetime(1970, 1, 1) + dt.timedelta(seconds=value / scale)
        return _to_column(value, kind)


def _self_signed_certificate(host: str) -> tuple[bytes, bytes]:
    """A self-signed certificate (PEM) for an IP address, and its key (PEM)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


_POLICY_NAMES = {"streamingingestion": "StreamingIngestion", "retention": "Retention",
                 "caching": "Caching", "ingestionbatching": "IngestionBatching",
                 "ingestiontime": "IngestionTime", "update": "Update", "merge": "Merge"}


def _kql_error(exc: KqlError) -> KustoRequestError:
    prefix = ("Syntax error: " if isinstance(exc, KqlSyntaxError)
              else "Semantic error: " if isinstance(exc, KqlSchemaError) else "")
    return KustoRequestError(f"{prefix}{exc}", code="General_BadRequest",
                             kind="Kusto.Data.Exceptions.SemanticException" if prefix.startswith(
                                 "Sem") else "Kusto.Data.Exceptions.KustoBadRequestException")


def _v1(columns: list[tuple[str, str]], rows: list[list[Any]]) -> dict[str, Any]:
    return v1_response(Result([RestColumn.derived(n, k) for n, k in columns], rows))


def _cslname(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z_]\w*", name) else "[" + json.dumps(name) + "]"


def _bare_name(text: str) -> tuple[str, int]:
    m = re.match(r"\s*([A-Za-z_][\w-]*)", text)
    if m is None:
        raise _syntax(f"expected a name at {text[:40]!r}")
    return m.group(1), m.end()


_WITH = r"""\s*with\s*\((?P<with>(?:[^()'"]|'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")*)\)"""


#: function definitions (with the tables they were checked on) that translated: every
#: endpoint a test suite starts is provisioned with the same ones
_VALID_FUNCTIONS: set[tuple[str, str]] = set()


def _rx(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern.replace("NAME", _NAME).replace("WITH", _WITH), re.I | re.S)


_COMMANDS: list[tuple[re.Pattern[str], Any]] = [
    (_rx(r"\.(?P<verb>create|create-merge|alter-merge)\s+tables?\s+(?P<tables>NAME\s*\(.*?\))"
         r"(?:WITH)?$"), LoopbackKusto._cmd_create_table),
    (_rx(r"\.drop\s+table\s+(?P<table>NAME)(?P<ifexists>\s+ifexists)?$"),
     LoopbackKusto._cmd_drop_table),
    (_rx(r"\.(?P<verb>create|create-or-alter|alter)\s+table\s+(?P<table>NAME)\s+ingestion\s+"
         r"(?P<kind>\w+)\s+mapping\s+(?P<rest>.+)$"), LoopbackKusto._cmd_mapping),
    (_rx(r"\.drop\s+table\s+(?P<table>NAME)\s+ingestion\s+\w+\s+mapping\s+(?P<rest>.+)$"),
     LoopbackKusto._cmd_drop_mapping),
    (_rx(r"\.show\s+(?P<scope>table|database)(?:\s+(?P<name>NAME))?\s+ingestion\s+"
         r"(?:(?P<kind>json|csv|avro|parquet|orc|w3clogfile)\s+)?mappings$"),
     LoopbackKusto._cmd_show_mappings),
    (_rx(r"\.(?P<verb>alter|alter-merge)\s+(?P<kind>table|database|materialized-view)\s+"
         r"(?P<name>NAME)\s+policy\s+(?P<policy>[\w]+)\s+(?P<rest>.+)$"),
     LoopbackKusto._cmd_alter_policy),
    (_rx(r"\.delete\s+(?P<kind>table|database|materialized-view)\s+(?P<name>NAME)\s+policy\s+"
         r"(?P<policy>\w+)$"), LoopbackKusto._cmd_delete_policy),
    (_rx(r"\.show\s+(?P<kind>table|database|materialized-view)\s+(?P<name>NAME)\s+policy\s+"
         r"(?P<policy>\w+)$"), LoopbackKusto._cmd_show_policy),
    (_rx(r"\.(?P<verb>create|create-or-alter|alter)(?:\s+async)?(?P<ifnotexists>\s+ifnotexists)?"
         r"\s+materialized-view\s+(?:WITH\s*)?(?P<name>NAME)\s+on\s+table\s+"
         r"(?P<source>NAME)\s*\{(?P<query>.*)\}$"), LoopbackKusto._cmd_create_view),
    (_rx(r"\.show\s+materialized-views?(?:\s+(?P<name>NAME))?$"), LoopbackKusto._cmd_show_views),
    (_rx(r"\.drop\s+materialized-view\s+(?P<name>NAME)(?P<ifexists>\s+ifexists)?$"),
     LoopbackKusto._cmd_drop_view),
    (_rx(r"\.(?P<verb>create|create-or-alter|alter)\s+function\b.*\}$"),
     LoopbackKusto._cmd_create_function),
    (_rx(r"\.show\s+tables$"), LoopbackKusto._cmd_show_tables),
    (_rx(r"\.show\s+databases$"), LoopbackKusto._cmd_show_databases),
    (_rx(r"\.show\s+version$"), LoopbackKusto._cmd_show_version),
    (_rx(r"\.show\s+table\s+(?P<table>NAME)\s+(?P<form>cslschema|schema\s+as\s+json)$"),
     LoopbackKusto._cmd_show_table_schema),
    (_rx(r"\.show\s+database(?:\s+(?P<db>(?!schema\b|cslschema\b)NAME))?\s+"
         r"(?P<form>cslschema|schema\s+as\s+json)$"), LoopbackKusto._cmd_show_database_schema),
    (_rx(r"\.delete(?:\s+async)?\s+(?P<kind>table|materialized-view)\s+(?P<table>NAME)\s+"
         r"records(?:WITH)?\s*<\|(?P<predicate>.+)$"),
     LoopbackKusto._cmd_delete_records),
    (_rx(r"\.get\s+ingestion\s+resources$"), LoopbackKusto._cmd_ingestion_resources),
    (_rx(r"\.get\s+kusto\s+identity\s+token$"), LoopbackKusto._cmd_identity_token),
    (_rx(r"\.ingest\s+inline\s+into\s+table\s+(?P<table>NAME)(?:WITH)?\s*<\|(?P<data>.*)$"),
     LoopbackKusto._cmd_ingest_inline),
    (_rx(r"\.clear\s+(?:database|table\s+(?P<table>NAME))\s+cache\s+streamingingestion\s+schema$"),
     LoopbackKusto._cmd_clear_schema_cache),
    (_rx(r"\.execute\s+database\s+script(?:WITH)?\s*<\|(?P<script>.+)$"),
     LoopbackKusto._cmd_script),
]


# ---------------------------------------------------------------------------
# Queued ingestion: the data management service, over Azurite
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class _QueuedFailure:
    """An injected rejection: the next ``n`` blobs fail with this report."""

    n: int
    code: str
    details: str
    status: str
    should_retry: bool


class QueuedIngestionService:
    """What Kusto's data management (``ingest-``) endpoint does for queued ingestion, on
    an Azurite storage account (``tests/azurite_server.py``):

    * ``.get ingestion resources`` answers ``ResourceTypeName``/``StorageRoot`` rows: a
      ``SecuredReadyForAggregationQueue``, ``TempStorage`` (a blob container),
      ``FailedIngestionsQueue``, ``SuccessfulIngestionsQueue`` (Azurite queues) and an
      ``IngestionsStatusTable``, as account-SAS URLs (path style: ``http://127.0.0.1:port/
      devstoreaccount1/<name>?<sas>``; the SDK's ``_ResourceUri`` splits them into the
      account URL and the container/queue name); ``.get kusto identity token`` an
      ``AuthorizationContext``. The status table is listed (the SDK requires every kind)
      but not used: the Python SDK reports only to queues (``ReportMethod.Queue``).
    * A background thread reads the ingestion queue (the SDK's ``IngestionBlobInfo``
      JSON, base64), groups blobs per (database, table) and seals a group after
      ``batching_delay`` seconds or ``max_items`` blobs (the batching policy's
      MaximumBatchingTimeSpan / MaximumNumberOfItems; Kusto's defaults are 5 minutes
      and 1000 items: https://learn.microsoft.com/azure/data-explorer/kusto/management/batching-policy),
      then downloads each blob (gzip by its magic bytes), maps its JSON rows like the
      streaming route (``ingestionMappingReference``) and appends them.
    * Each blob's outcome is reported as Kusto does for ``ReportLevel`` FailuresOnly (0)
      or FailuresAndSuccesses (2) with ``ReportMethod`` Queue: a base64 JSON message on
      the success or failure queue with ``OperationId``, ``Database``, ``Table``,
      ``IngestionSourceId`` (the blob's ``Id``), ``IngestionSourcePath``,
      ``RootActivityId`` and ``SucceededOn``, or ``FailedOn``, ``Details``, ``ErrorCode``,
      ``FailureStatus``, ``OriginatesFromUpdatePolicy``, ``ShouldRetry`` (the fields
      azure-kusto-ingest's ``status.py`` reads). DoNotReport (1): nothing, as Kusto.

    ``fail_next(n, code=..., details=...)`` makes the next ``n`` blobs fail with that
    report (nothing of them is stored); a missing table or mapping fails a blob by itself;
    ``lose_reports_next(n)``: the next ``n`` blobs are ingested without a report.
    ``ingested`` / ``failed`` list the source ids handled; ``sealed`` the time each group
    was sealed (``time.monotonic()``) with its table and blob count.
    """

    INGEST_QUEUE = "readyforaggregation-secured"
    CONTAINER = "tempstorage"
    SUCCESS_QUEUE = "successfulingestions"
    FAILURE_QUEUE = "failedingestions"
    STATUS_TABLE = "ingestionsstatus"

    def __init__(self, server: LoopbackKusto, storage: Any, *, batching_delay: float = 0.2,
                 max_items: int = 1000, poll_interval: float = 0.05) -> None:
        self.server = server
        self.storage = storage
        self.batching_delay = batching_delay
        self.max_items = max_items
        self.poll_interval = poll_interval
        self.identity_token = "loopback-authorization-context-" + uuid.uuid4().hex
        self.ingested: list[str] = []
        self.failed: list[str] = []
        self.sealed: list[tuple[float, str, int]] = []
        self._failures: list[_QueuedFailure] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fail_lock = threading.Lock()
        self._lost_reports = 0

    # -- setup ---------------------------------------------------------------

    def start(self) -> QueuedIngestionService:
        from azure.storage.blob import BlobServiceClient
        from azure.storage.queue import QueueServiceClient

        cs = self.storage.connection_string
        BlobServiceClient.from_connection_string(cs).create_container(self.CONTAINER)
        queues = QueueServiceClient.from_connection_string(cs)
        for name in (self.INGEST_QUEUE, self.SUCCESS_QUEUE, self.FAILURE_QUEUE):
            queues.create_queue(name)
        self._thread = threading.Thread(target=self._run, name="kusto-loopback:queued",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def resources_result(self) -> dict[str, Any]:
        blob, queue = self.storage.endpoints["blob"], self.storage.endpoints["queue"]
        table = self.storage.endpoints["table"]
        bsas, qsas = self.storage.sas("blob"), self.storage.sas("queue")
        rows = [
            ["SecuredReadyForAggregationQueue", f"{queue}/{self.INGEST_QUEUE}?{qsas}"],
            ["TempStorage", f"{blob}/{self.CONTAINER}?{bsas}"],
            ["FailedIngestionsQueue", f"{queue}/{self.FAILURE_QUEUE}?{qsas}"],
            ["SuccessfulIngestionsQueue", f"{queue}/{self.SUCCESS_QUEUE}?{qsas}"],
            ["IngestionsStatusTable", f"{table}/{self.STATUS_TABLE}?{qsas}"],
        ]
        return _v1([("ResourceTypeName", "string"), ("StorageRoot", "string")], rows)

    def fail_next(self, n: int = 1, *, code: str = "BadRequest_InvalidMapping",
                  details: str = "Mapping is invalid (injected by the loopback).",
                  status: str = "Permanent", should_retry: bool = False) -> None:
        with self._fail_lock:
            self._failures.append(_QueuedFailure(n, code, details, status, should_retry))

    def lose_reports_next(self, n: int = 1) -> None:
        """The next ``n`` blobs are ingested but report nothing (a report that never comes)."""
        with self._fail_lock:
            self._lost_reports += n

    def _take_failure(self) -> _QueuedFailure | None:
        with self._fail_lock:
            while self._failures and self._failures[0].n <= 0:
                self._failures.pop(0)
            if not self._failures:
                return None
            self._failures[0].n -= 1
            return self._failures[0]

    # -- the service ------------------------------------------------------------

    def _run(self) -> None:
        import time

        from azure.storage.queue import QueueClient, TextBase64DecodePolicy

        cs = self.storage.connection_string
        inbox = QueueClient.from_connection_string(
            cs, self.INGEST_QUEUE, message_decode_policy=TextBase64DecodePolicy())
        groups: dict[tuple[str, str], tuple[float, list[dict[str, Any]]]] = {}
        while not (self._stop.wait(self.poll_interval) or self.server._stopping.is_set()):
            try:
                for m in inbox.receive_messages(messages_per_page=32, visibility_timeout=300):
                    info = json.loads(m.content)
                    key = (info.get("DatabaseName"), info.get("TableName"))
                    since, items = groups.setdefault(key, (time.monotonic(), []))
                    items.append(info)
                    inbox.delete_message(m)
                now = time.monotonic()
                for key, (since, items) in list(groups.items()):
                    if now - since >= self.batching_delay or len(items) >= self.max_items:
                        del groups[key]
                        self.sealed.append((now, str(key[1]), len(items)))
                        for info in items:
                            self._ingest_blob(info)
            except Exception as exc:  # noqa: BLE001 - a loopback bug: keep it for the test
                if not self._stop.is_set():
                    self.server.errors.append(exc)

    def _ingest_blob(self, info: dict[str, Any]) -> None:
        from azure.storage.blob import BlobClient

        database, table = info.get("DatabaseName"), info.get("TableName")
        source_id = str(info.get("Id"))
        path = str(info.get("BlobPath"))
        props = info.get("AdditionalProperties") or {}
        failure = self._take_failure()
        try:
            if failure is not None:
                raise KustoRequestError(failure.details, code=failure.code)
            self.server._check_database(database)
            columns = self.server._require_table(str(table))
            fmt = str(props.get("format", "csv")).lower()
            if fmt not in ("json", "multijson", "singlejson"):
                raise KustoRequestError(f"The loopback ingests json/multijson/singlejson, not '{fmt}'",
                                        code="BadRequest_FormatNotSupported")
            data = BlobClient.from_blob_url(path).download_blob().readall()
            if data[:2] == b"\x1f\x8b":
                data = gzip.decompress(data)
            docs = _json_documents(data.decode("utf-8"), fmt)
            self.server._store(str(table), columns, docs, props.get("ingestionMappingReference"))
        except KustoRequestError as exc:
            self.failed.append(source_id)
            self._report(info, False, code=failure.code if failure else exc.code,
                         details=str(exc), status=failure.status if failure else "Permanent",
                         should_retry=failure.should_retry if failure else False)
            return
        self.ingested.append(source_id)
        with self._fail_lock:
            lost, self._lost_reports = self._lost_reports > 0, max(0, self._lost_reports - 1)
        if not lost:
            self._report(info, True)

    def _report(self, info: dict[str, Any], ok: bool, *, code: str = "", details: str = "",
                status: str = "", should_retry: bool = False) -> None:
        from azure.storage.queue import QueueClient, TextBase64EncodePolicy

        level = int(info.get("ReportLevel", 1))
        method = int(info.get("ReportMethod", 0))
        # ReportLevel: 0 FailuresOnly, 1 DoNotReport, 2 FailuresAndSuccesses;
        # ReportMethod: 0 Queue, 1 Table, 2 QueueAndTable (tables are not emulated)
        if level == 1 or (ok and level != 2) or method == 1:
            return
        message: dict[str, Any] = {
            "OperationId": str(uuid.uuid4()),
            "Database": info.get("DatabaseName"),
            "Table": info.get("TableName"),
            "IngestionSourceId": str(info.get("Id")),
            "IngestionSourcePath": str(info.get("BlobPath")).split("?")[0],
            "RootActivityId": str(uuid.uuid4()),
        }
        if ok:
            message["SucceededOn"] = _iso_now()
        else:
            message.update(FailedOn=_iso_now(), Details=details, ErrorCode=code,
                           FailureStatus=status, OriginatesFromUpdatePolicy=False,
                           ShouldRetry=should_retry)
        queue = QueueClient.from_connection_string(
            self.storage.connection_string, self.SUCCESS_QUEUE if ok else self.FAILURE_QUEUE,
            message_encode_policy=TextBase64EncodePolicy())
        with queue:
            queue.send_message(json.dumps(message))
