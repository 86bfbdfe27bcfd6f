"""SQLite persistence for the aggregator's records (one file in the state directory).

Each record dataclass maps to one table whose columns are its fields; writes
are upserts inside transactions, with WAL and ``synchronous=FULL`` so that a
record written before an acknowledgement survives a SIGKILL or power loss.
"""

from __future__ import annotations

import dataclasses
import enum
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from common.errors import InvalidArgument
from server.records import (
    ParticipantRecord,
    RoundRecord,
    RoundState,
    RunRecord,
    SiteRecord,
    SiteState,
    UploadRecord,
    UploadState,
)

T = TypeVar("T")

_TABLES: dict[type[Any], tuple[str, tuple[str, ...]]] = {
    RunRecord: ("run", ("run_id",)),
    RoundRecord: ("rounds", ("round",)),
    SiteRecord: ("sites", ("site_id",)),
    ParticipantRecord: ("participants", ("round", "site_id")),
    UploadRecord: ("uploads", ("upload_id",)),
}
_ENUMS: dict[str, type[enum.IntEnum]] = {}
for _cls in _TABLES:
    for _f in dataclasses.fields(_cls):
        if _f.type in ("RoundState", "SiteState", "UploadState"):
            _ENUMS[f"{_cls.__name__}.{_f.name}"] = {
                "RoundState": RoundState,
                "SiteState": SiteState,
                "UploadState": UploadState,
            }[str(_f.type)]

_SQL_TYPES = {"int": "INTEGER", "float": "REAL", "str": "TEXT", "bytes": "BLOB", "bool": "INTEGER"}


def _column_type(annotation: str) -> str:
    return _SQL_TYPES.get(annotation, "INTEGER")


class Store:
    """The aggregator's records in one SQLite file; safe to share between threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self.transaction():
            for cls, (table, key) in _TABLES.items():
                columns = ", ".join(
                    f"{f.name} {_column_type(str(f.type))} NOT NULL" for f in dataclasses.fields(cls)
                )
                self._db.execute(
                    f"CREATE TABLE IF NOT EXISTS {table} ({columns}, PRIMARY KEY ({', '.join(key)}))"
                )
                self._add_new_columns(cls, table)

    def _add_new_columns(self, cls: type, table: str) -> None:
        """Give a table written by an older version the columns of fields added since, at their defaults.

        Records only ever gain fields with defaults, so a state directory from an earlier release
        opens as it is and its rows read as if the new fields had always held their defaults.
        """
        present = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
        for f in dataclasses.fields(cls):
            if f.name in present:
                continue
            if f.default is dataclasses.MISSING:
                raise RuntimeError(
                    f"{table}.{f.name} is new and has no default: the state directory needs a migration"
                )
            default = f.default
            literal = (
                f"X'{default.hex()}'"
                if isinstance(default, bytes)
                else repr(int(default) if isinstance(default, bool) else default)
            )
            if isinstance(default, str):
                literal = "'" + default.replace("'", "''") + "'"
            self._db.execute(
                f"ALTER TABLE {table} ADD COLUMN {f.name} {_column_type(str(f.type))} NOT NULL DEFAULT {literal}"
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group writes so they land together or not at all."""
        with self._lock:
            if self._db.in_transaction:
                yield
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def put(self, record: object) -> None:
        """Insert or replace a record."""
        table, _ = _TABLES[type(record)]
        fields = dataclasses.fields(record)  # type: ignore[arg-type]
        names = ", ".join(f.name for f in fields)
        marks = ", ".join("?" for _ in fields)
        values = [_to_sql(getattr(record, f.name)) for f in fields]
        for f, value in zip(fields, values, strict=True):
            if isinstance(value, int) and not _INT_MIN <= value <= _INT_MAX:
                # A client's uint64 (a round number, say) past SQLite's range: refused, not a crash.
                raise InvalidArgument(f"{f.name} = {value} is out of range", field=f.name, limit=_INT_MAX)
        with self._lock:
            self._db.execute(f"INSERT OR REPLACE INTO {table} ({names}) VALUES ({marks})", values)

    def get(self, cls: type[T], *key: object) -> T | None:
        """The record of ``cls`` with primary key ``key``, or None."""
        rows = self._select(cls, " AND ".join(f"{k} = ?" for k in _TABLES[cls][1]), key)
        return rows[0] if rows else None

    def select(
        self, cls: type[T], where: str = "", args: tuple[object, ...] = (), order: str = ""
    ) -> list[T]:
        """Records of ``cls`` matching a SQL condition on its columns."""
        return self._select(cls, where, args, order)

    def _select(self, cls: type[T], where: str, args: tuple[object, ...], order: str = "") -> list[T]:
        table, key = _TABLES[cls]
        sql = f"SELECT * FROM {table}"
        if where:
            sql += f" WHERE {where}"
        sql += f" ORDER BY {order or ', '.join(key)}"
        # A client's uint64 past SQLite's signed range matches no stored row: clamped, every
        # comparison (=, <, >) gives what the true value would, where SQLite would raise instead.
        args = tuple(_clamped(a) for a in args)
        with self._lock:
            cursor = self._db.execute(sql, args)
            columns = [c[0] for c in cursor.description]
            rows = cursor.fetchall()
        return [_from_sql(cls, dict(zip(columns, row, strict=True))) for row in rows]


_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1


def _clamped(value: object) -> object:
    if isinstance(value, int) and not isinstance(value, bool):
        return min(max(value, _INT_MIN), _INT_MAX)
    return value


def _to_sql(value: object) -> object:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, enum.IntEnum):
        return int(value)
    return value


def _from_sql(cls: type[T], row: dict[str, object]) -> T:
    values: dict[str, object] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = row[f.name]
        enum_cls = _ENUMS.get(f"{cls.__name__}.{f.name}")
        if enum_cls is not None:
            value = enum_cls(int(value))  # type: ignore[call-overload]
        elif f.type == "bool":
            value = bool(value)
        values[f.name] = value
    return cls(**values)
