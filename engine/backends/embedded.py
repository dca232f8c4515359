"""The embedded store: a DuckDB file queried with the very KQL sent to Kusto.

Queries go through ``duckdb-kql``: each KQL template is translated to SQL once
(with the table schema, which ``arg_max(x, *)`` and joins need) and the SQL is
reused with its bound parameters. Rows are appended natively: a batch becomes
an Arrow table and one ``INSERT ... SELECT``, the fastest append DuckDB has.
Payloads are BLOB columns (Kusto keeps them as base64 text): no base64 on
either side, and DuckDB appends BLOBs about 3.7x faster than the same values
as base64 VARCHAR (433 vs 117 MB/s of 20 KB values, measured on this machine).

DuckDB calls block, so they run in worker threads (``anyio.to_thread``) behind
a bounded limiter; each worker thread uses its own cursor on the one database.
"""

from __future__ import annotations

import atexit
import datetime as dt
import functools
import os
import re
import struct
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import anyio
import duckdb
import duckdb_kql
import orjson
import pyarrow as pa
from duckdb_kql.params import bind

from ..errors import ConfigError, PermanentBackendError, StoreLockedError, StorePathError
from ..records import JsonText, to_micros  # noqa: F401 - re-exported
from ..schema import BINARY_COLUMNS, DATETIME, DYNAMIC, INT, LONG, STRING, TABLES, TABLES_BY_NAME, Table

_DUCK_TYPES = {STRING: "VARCHAR", DYNAMIC: "JSON", LONG: "BIGINT", INT: "INTEGER", DATETIME: "TIMESTAMP"}
_ARROW_TYPES = {STRING: pa.string(), DYNAMIC: pa.string(), LONG: pa.int64(), INT: pa.int32(), DATETIME: pa.timestamp("us")}

#: KQL text -> translated SQL, shared by every instance (the schema is fixed):
#: parsing KQL is the slow part of a first query, so it happens once per process
_TRANSLATED: dict[str, Any] = {}
_TRANSLATE_LOCK = threading.Lock()
#: the soft deletes' translations: one text per batch shape (how many tombstones of
#: which scopes), a few in steady use; bounded, since shapes come and go
@functools.lru_cache(maxsize=64)
def _translate_command(text: str) -> Any:
    return duckdb_kql.to_sql(text, schema={t.name: list(t.column_names) for t in TABLES})


_DELETE_RE = re.compile(r"^\s*\.delete\s+table\s+(\w+)\s+records\s*<\|\s*(.*)$", re.S)

#: stores open in this process: closed at interpreter exit if their saver never was
#: (DuckDB's objects must not be torn down by the interpreter's finalization)
_OPEN: weakref.WeakSet[EmbeddedBackend] = weakref.WeakSet()


@atexit.register
def _close_open_stores() -> None:
    for backend in list(_OPEN):
        backend._close_now()


def _cause(exc: BaseException) -> str:
    """A DuckDB (or duckdb-kql) error as one readable cause: DuckDB's own text, whose
    first line says what failed ("IO Error: ..."), then the exception's type."""
    text = str(exc).strip() or type(exc).__name__
    first, _, rest = text.partition("\n")
    return f"{first} ({type(exc).__name__})" + (f"\n{rest}" if rest else "")


def _duck_type(column: str, kind: str) -> str:
    return "BLOB" if column in BINARY_COLUMNS else _DUCK_TYPES[kind]


#: how the payload columns may be stored: DuckDB's ``USING COMPRESSION`` method, or
#: "auto" (none given: DuckDB analyses every method it has at each checkpoint)
PAYLOAD_COMPRESSIONS = ("zstd", "uncompressed", "auto")


def _column_def(column: str, kind: str, payload_compression: str) -> str:
    sql = f'"{column}" {_duck_type(column, kind)}'
    if column in BINARY_COLUMNS and payload_compression != "auto":
        sql += f" USING COMPRESSION {payload_compression}"
    return sql


def _arrow_type(column: str, kind: str) -> pa.DataType:
    return pa.binary() if column in BINARY_COLUMNS else _ARROW_TYPES[kind]


def _dynamic_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, JsonText):
        return value.decode()
    return orjson.dumps(value).decode()


class EmbeddedBackend:
    """DuckDB file (or ``":memory:"``) behind the backend protocol."""

    name = "duckdb"
    #: one process at a time owns the store (DuckDB locks the file), so nothing another
    #: process writes can be missed: consistency "sticky" is exact here
    exclusive = True

    def __init__(
        self,
        path: str = ":memory:",
        *,
        threads: int = 4,
        checkpoint_threshold: str = "256MB",
        payload_compression: str = "zstd",
    ) -> None:
        """``threads``: worker threads for DuckDB calls. ``checkpoint_threshold``: DuckDB's
        WAL size that triggers a checkpoint; DuckDB's 16MB default makes it rewrite
        and compress so often that ingesting large checkpoints runs at half speed
        (measured: 57 vs 105 MB/s of payload); a crash replays at most this much WAL.
        ``payload_compression``: how the tables this store creates keep their payload
        columns: "zstd" (the default), "uncompressed", or "auto" (DuckDB's choice, its
        own default). A DuckDB checkpoint blocks every append while it runs, and with
        "auto" it tries each method on every payload segment: raw workload, 3,000 agents
        x 10 steps, checkpoint 10.2 s "auto" (file 135 MB), 0.4 s "uncompressed"
        (218 MB), 0.4 s "zstd" (14 MB); 5,000 x 20 steps: 1,151 / 1,809 / 1,765
        steps/s, peak RSS 2,253 / 3,298 / 1,964 MB, file 515 / 2,610 / 146 MB. Tables
        that already exist keep the method they were created with."""
        if isinstance(path, os.PathLike):
            path = os.fspath(path)
        if not isinstance(path, str) or not path:
            raise ConfigError(f"path must be a DuckDB file path or ':memory:', got {path!r}")
        if not isinstance(checkpoint_threshold, str) or not re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]i?B", checkpoint_threshold):
            raise ConfigError(f"checkpoint_threshold must be a size like '256MB', got {checkpoint_threshold!r}")
        self.checkpoint_threshold = checkpoint_threshold
        if payload_compression not in PAYLOAD_COMPRESSIONS:
            raise ConfigError(f"payload_compression must be one of {PAYLOAD_COMPRESSIONS}, got {payload_compression!r}")
        self.payload_compression = payload_compression
        self.path = path
        self.database = "memory" if path == ":memory:" else path
        self._con: duckdb.DuckDBPyConnection | None = None
        self._local = threading.local()
        self._cursors: list[duckdb.DuckDBPyConnection] = []
        self._cursors_lock = threading.Lock()
        self._limiter = anyio.CapacityLimiter(threads)
        self._schema: dict[str, list[str]] | None = None

    def __repr__(self) -> str:
        return f"EmbeddedBackend(path={self.path!r})"

    @property
    def default_spool_dir(self) -> str | None:
        """Where durability="spool" keeps its spool unless spool_dir is set: next to the file."""
        return None if self.path == ":memory:" else self.path + ".spool"

    # -- lifecycle ---------------------------------------------------------

    async def open(self) -> None:
        if self._con is not None:
            return
        await anyio.to_thread.run_sync(self._open_sync, limiter=self._limiter)

    def _open_sync(self) -> None:
        con = self._connect()
        try:
            self._prepare(con)
        except BaseException as exc:
            con.close()
            if isinstance(exc, (duckdb.Error, duckdb_kql.KqlError)):
                raise PermanentBackendError(f"preparing the embedded store {self.path} failed: {_cause(exc)}") from exc
            raise
        self._con = con
        _OPEN.add(self)

    def _connect(self) -> duckdb.DuckDBPyConnection:
        """The DuckDB connection; a path DuckDB cannot use is the package's error, naming it."""
        path = self.path
        if path != ":memory:":
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder):
                raise StorePathError(
                    f"the embedded store's folder {folder} does not exist (path {path!r}): "
                    "create the folder first, or give a path in an existing one"
                )
            if os.path.isdir(path):
                raise StorePathError(f"the embedded store's path {path!r} is a folder: give the path of a DuckDB file in it")
        try:
            return duckdb_kql.connect(path)
        except duckdb.Error as exc:
            text = str(exc)
            if "lock" in text.lower() and ("conflicting" in text.lower() or "could not set lock" in text.lower()):
                pid = re.search(r"\(PID (\d+)\)", text)
                holder = f"another process (PID {pid.group(1)})" if pid else "another process"
                raise StoreLockedError(
                    f"the embedded store {path} is open in {holder}: one process at a time owns an "
                    "embedded store file. Close the saver in the other process, or give each process its "
                    "own file; for several replicas sharing checkpoints, use a Kusto database "
                    "(from_connection_string)"
                ) from exc
            if isinstance(exc, (duckdb.IOException, duckdb.SerializationException)) or "not a valid DuckDB" in text:
                raise StorePathError(f"the embedded store {path} cannot be opened: {_cause(exc)}") from exc
            raise PermanentBackendError(f"opening the embedded store {path} failed: {_cause(exc)}") from exc

    def _prepare(self, con: duckdb.DuckDBPyConnection) -> None:
        con.execute(f"SET checkpoint_threshold = '{self.checkpoint_threshold}'")
        con.execute("SET python_enable_replacements = true")  # _append finds its Arrow table by name
        for table in TABLES:
            cols = ", ".join(_column_def(c, k, self.payload_compression) for c, k in table.columns)
            con.execute(f'CREATE TABLE IF NOT EXISTS "{table.name}" ({cols})')
            existing = dict(con.execute(
                "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ?", [table.name]
            ).fetchall())
            for c, k in table.columns:
                if c not in existing:
                    con.execute(f'ALTER TABLE "{table.name}" ADD COLUMN {_column_def(c, k, self.payload_compression)}')
                elif c in BINARY_COLUMNS and existing[c] == "VARCHAR":
                    self._migrate_payload(con, table.name, c)
        self._schema = {t.name: list(t.column_names) for t in TABLES}
        from .. import kql

        for _, text in kql.all_templates():  # translate up front, not in the first reads
            self._translate(text)

    @staticmethod
    def _migrate_payload(con: duckdb.DuckDBPyConnection, table: str, column: str) -> None:
        """A store written before payloads were BLOBs: decode its base64 text once.
        Its chunks were cut every ``cell_limit`` characters, so with a ``cell_limit``
        that is a multiple of 4 (the default) each chunk decodes on its own."""
        try:
            con.execute(f'ALTER TABLE "{table}" ALTER COLUMN "{column}" TYPE BLOB USING from_base64("{column}")')
        except duckdb.Error as exc:
            raise PermanentBackendError(
                f"cannot convert {table}.{column} of this store (base64 text, written by an earlier "
                f"version) to BLOB: {exc}; its chunks do not decode on their own (a cell_limit that "
                "is not a multiple of 4): re-create the store"
            ) from exc

    async def close(self) -> None:
        if self._con is None:
            return
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._close_now)

    def _close_now(self) -> None:
        """Close every cursor and the connection (DuckDB then stops its own threads)."""
        con, self._con = self._con, None
        _OPEN.discard(self)
        with self._cursors_lock:
            cursors, self._cursors = self._cursors, []
        for cur in cursors:
            try:
                cur.close()
            except duckdb.Error:
                pass
        if con is not None:
            con.close()
        self._local = threading.local()

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            raise PermanentBackendError(f"the embedded store {self.path} is closed")
        cur = getattr(self._local, "cursor", None)
        if cur is None or getattr(self._local, "con", None) is not self._con:
            cur = self._con.cursor()
            cur.execute("SET TimeZone = 'UTC'")
            self._local.cursor = cur
            self._local.con = self._con
            with self._cursors_lock:
                self._cursors.append(cur)
        return cur

    # -- ingest ------------------------------------------------------------

    async def ingest(self, table: str, rows: Sequence[Mapping[str, Any]]) -> None:
        spec = TABLES_BY_NAME.get(table)
        if spec is None:
            raise PermanentBackendError(f"no table {table!r} in the embedded store")
        if not rows:
            return
        # the Arrow table is built here, in the event loop's thread: it is Python work that
        # holds the GIL throughout, and in a worker thread every reacquisition of the GIL
        # waits for a busy loop to give it up (the switch interval, 5 ms): ingest calls of a
        # saturated host took 100-200 ms that way. The worker only runs DuckDB's insert,
        # which releases the GIL.
        arrow = _to_arrow(spec, rows)
        await anyio.to_thread.run_sync(self._append, spec, arrow, limiter=self._limiter)

    def _append(self, spec: Table, arrow: pa.Table) -> None:
        cur = self._cursor()
        cols = ", ".join(f'"{c}"' for c in spec.column_names)
        # DuckDB finds the Arrow table by its name among this frame's locals (a replacement
        # scan), so the insert is one call into DuckDB, not register + execute + unregister:
        # each call from this worker thread waits for the GIL, up to the switch interval
        # (5 ms) while the event loop is busy. Raw 200x20: ingest call p50 101-111 ms
        # against 173 ms with register/unregister (inside the worker 58-61 against 76-80)
        _kusto_checkpoint_incoming = arrow  # noqa: F841 - read by DuckDB's replacement scan
        try:
            cur.execute(f'INSERT INTO "{spec.name}" ({cols}) SELECT {cols} FROM _kusto_checkpoint_incoming')
        except duckdb.Error as exc:
            raise PermanentBackendError(
                f"ingestion into {spec.name} on the embedded store {self.path} failed: {_cause(exc)}"
            ) from exc

    # -- queries -----------------------------------------------------------

    def _translate(self, kql: str) -> Any:
        tr = _TRANSLATED.get(kql)
        if tr is None:
            with _TRANSLATE_LOCK:
                tr = _TRANSLATED.get(kql)
                if tr is None:
                    tr = _TRANSLATED[kql] = duckdb_kql.to_sql(kql, schema=self._schema)
        return tr

    async def query(self, kql: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        return await anyio.to_thread.run_sync(self._query_sync, kql, dict(params), limiter=self._limiter)

    def _bound(self, tr: Any, params: dict[str, Any]) -> dict[str, Any]:
        values = {
            k: v.astimezone(dt.timezone.utc).replace(tzinfo=None) if isinstance(v, dt.datetime) and v.tzinfo else v
            for k, v in params.items()
        }
        bound, unbound = bind(list(tr.declarations), values)
        if unbound:
            raise PermanentBackendError(f"query parameters without a value: {unbound}")
        return {slot: v for slot, v in bound.items() if slot in tr.slots}

    def _query_sync(self, kql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        cur = self._cursor()
        try:
            tr = self._translate(kql)
            res = cur.execute(str(tr), self._bound(tr, params))
            names = [d[0] for d in res.description]
            dynamic = [i for i, d in enumerate(res.description) if str(d[1]).upper() == "JSON"]
            out = []
            for row in res.fetchall():
                rec = dict(zip(names, row))
                for i in dynamic:
                    v = row[i]
                    rec[names[i]] = orjson.loads(v) if isinstance(v, str) else v
                out.append(rec)
            return out
        except (duckdb.Error, duckdb_kql.KqlError) as exc:
            raise PermanentBackendError(f"query on the embedded store {self.path} failed: {_cause(exc)}") from exc

    async def command(self, kql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        return await anyio.to_thread.run_sync(self._command_sync, kql, dict(params or {}), limiter=self._limiter)

    def _command_sync(self, kql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        m = _DELETE_RE.match(kql)
        if m is None:
            raise PermanentBackendError(f"the embedded store does not run this command: {kql[:60]!r}")
        table, query = m.group(1), m.group(2)
        spec = TABLES_BY_NAME.get(table)
        if spec is None:
            raise PermanentBackendError(f"no table {table!r}")
        from ..kql import literals_as_parameters

        # duckdb-kql splices a literal's text into SQL: each literal becomes a declared
        # parameter, decoded by the inverse of the one literal function; what remains is
        # the same text for every batch of the same shape, so its translation (the slow
        # part) is cached
        query, literals = literals_as_parameters(query)
        if literals:
            declared = ", ".join(f"{n}:{'string' if isinstance(v, str) else 'datetime'}" for n, v in literals.items())
            query = f"declare query_parameters({declared});\n{query}"
            params = {**params, **literals}
        cur = self._cursor()
        try:
            tr = _translate_command(query)
        except duckdb_kql.KqlError as exc:
            raise PermanentBackendError(f"command on the embedded store {self.path} failed: {_cause(exc)}") from exc
        cols = list(spec.column_names)
        cond = " AND ".join(f'd."{c}" IS NOT DISTINCT FROM t."{c}"' for c in cols if spec.columns[cols.index(c)][1] != DYNAMIC)
        sql = f'DELETE FROM "{table}" AS t WHERE EXISTS (SELECT 1 FROM ({tr}) AS d WHERE {cond})'
        try:
            n = cur.execute(sql, self._bound(tr, params)).fetchall()
        except duckdb.Error as exc:
            raise PermanentBackendError(f"command on the embedded store {self.path} failed: {_cause(exc)}") from exc
        # the column Kusto's soft delete reports its count in (RecordsMatchPredicate:
        # https://learn.microsoft.com/kusto/management/soft-delete-command)
        return [{"TableName": table, "RecordsMatchPredicate": n[0][0] if n else 0}]

    # -- introspection used by tests and the load tool ----------------------

    async def count_rows(self, table: str) -> int:
        def _count() -> int:
            try:
                return int(self._cursor().execute(f'SELECT count(*) FROM "{table}"').fetchone()[0])
            except duckdb.Error as exc:
                raise PermanentBackendError(f"counting {table} on the embedded store {self.path} failed: {_cause(exc)}") from exc

        return await anyio.to_thread.run_sync(_count, limiter=self._limiter)


def _to_arrow(spec: Table, rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    arrays = []
    column = getattr(rows, "column", None)  # a batch's Rows: read off its records
    for col, kind in spec.columns:
        values = column(col) if column is not None else [r.get(col) for r in rows]
        if col in BINARY_COLUMNS:
            arrays.append(_binary_view(values))
            continue
        if kind == DYNAMIC:
            values = [_dynamic_text(v) for v in values]
        arrays.append(pa.array(values, type=_arrow_type(col, kind)))
    return pa.Table.from_arrays(arrays, names=list(spec.column_names))


#: Arrow's binary-view layout: 16 bytes per value, the value itself when it has at
#: most 12 bytes, else its length, first 4 bytes, data buffer index and offset
_VIEW_INLINE = struct.Struct("<i12s")
_VIEW_REF = struct.Struct("<i4sii")


def _binary_view(values: list[Any]) -> pa.Array:
    """The payloads as an Arrow binary-view array over the ``bytes`` objects themselves.

    ``pa.array(values, pa.binary())`` copies every payload into one buffer, in the
    event loop's thread, with the GIL held: for payloads written a few hundred ms
    before, that copy ran at memory speed, not cache speed, and took 15-45 us of loop
    CPU per raw step (3 rows, ~16 KB), most of the ingest path's cost. Here each value
    larger than 12 bytes is its own data buffer (no copy; the array keeps the ``bytes``
    alive), and the one copy is DuckDB's, in the worker thread, without the GIL.
    """
    if any(type(v) is not bytes for v in values):  # None, or bytes-like: the copying path
        return pa.array([None if v is None else bytes(v) for v in values], type=pa.binary())
    views = bytearray(16 * len(values))
    buffers = []
    for i, v in enumerate(values):
        if len(v) <= 12:
            _VIEW_INLINE.pack_into(views, 16 * i, len(v), v)
        else:
            _VIEW_REF.pack_into(views, 16 * i, len(v), v, len(buffers), 0)  # "4s" takes the first 4 bytes
            buffers.append(pa.py_buffer(v))
    return pa.Array.from_buffers(pa.binary_view(), len(values), [None, pa.py_buffer(views), *buffers])
