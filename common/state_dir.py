"""What tools outside the daemon read from an aggregator's state directory: published states and the run's spec.

The aggregator alone writes the directory: ``state.db`` (SQLite, ``server.store``;
its ``rounds`` table, one row per round), ``blobs/ab/<sha256>`` (``server.blobs``;
a published round's trainable state is the blob its row names in ``state_blob``)
and ``training_spec.binpb`` (``server.genesis``, through ``write_training_spec``
below, when it creates the run, and again when a restart's ``[training]``
changes a field that may change). ``gdfed export`` and the demo's evaluator
read them here without importing the daemon, which a site's install does not
carry: the database is opened read-only, so a tool pointed at the wrong folder
creates nothing in it. ``tests/test_export.py`` reads a directory the real
aggregator wrote, so this reader cannot drift from the writer unnoticed.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import DecodeError

from common.errors import InvalidArgument, NotFound
from common.files import fsync_dir, fsync_file
from common.pb.gradualdiff.v1 import federation_pb2
from common.serde import training_spec_from_proto, training_spec_to_proto
from common.spec import RoundState, TrainingSpec

DATABASE = "state.db"
BLOBS = "blobs"
TRAINING_SPEC = "training_spec.binpb"  # a serialized gradualdiff.v1.TrainingSpec


@dataclass(frozen=True, slots=True)
class PublishedState:
    """A published round's trainable state: a safetensors file in the state directory."""

    round: int
    path: Path


def published_state(state_dir: Path, round_number: int | None = None) -> PublishedState:
    """The state file of published round ``round_number`` (the latest published one when None).

    Raises:
        NotFound: ``state_dir`` holds no run, the round is not published, or its state is no longer
            kept (``keep_states``); the message says which.
    """
    rows = _published_rounds(state_dir)
    if round_number is not None:
        rows = [row for row in rows if row[0] == round_number]
    if not rows:
        which = "no round of" if round_number is None else f"round {round_number} is not a published round of"
        raise NotFound(
            f"{which} {state_dir}" + (" is published yet" if round_number is None else ""), field="round"
        )
    number, blob = rows[0]
    if not blob:
        raise NotFound(
            f"the state of round {number} is no longer kept in {state_dir} (the aggregator keeps the "
            "last keep_states rounds' states)",
            field="round",
        )
    return PublishedState(number, blob_path(state_dir, blob))


def _published_rounds(state_dir: Path) -> list[tuple[int, str]]:
    """(round, state blob) of every published round, newest first."""
    database = state_dir / DATABASE
    if not database.is_file():
        raise NotFound(
            f"{state_dir} is not an aggregator state directory (it has no {DATABASE})", field="state_dir"
        )
    db = sqlite3.connect(database.resolve().as_uri() + "?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT round, state_blob FROM rounds WHERE state = ? ORDER BY round DESC",
            (int(RoundState.PUBLISHED),),
        ).fetchall()
    except sqlite3.DatabaseError as exc:
        raise NotFound(
            f"{database} cannot be read as an aggregator's database: {exc}", field="state_dir"
        ) from None
    finally:
        db.close()
    return [(int(number), str(blob)) for number, blob in rows]


def blob_path(state_dir: Path, digest: str) -> Path:
    """Where the aggregator keeps blob ``digest`` (a SHA-256 in hex)."""
    if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
        raise ValueError(f"not a sha256 hex digest: {digest!r}")
    return state_dir / BLOBS / digest[:2] / digest


def write_training_spec(state_dir: Path, spec: TrainingSpec) -> Path:
    """Record the run's TrainingSpec in ``state_dir`` (the aggregator: at the run's creation, and on a change).

    Written to a temporary name, fsynced and renamed: a crash leaves no half file.
    """
    path = state_dir / TRAINING_SPEC
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(training_spec_to_proto(spec).SerializeToString(deterministic=True))
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(state_dir)
    return path


def read_training_spec(state_dir: Path) -> TrainingSpec | None:
    """The run's recorded TrainingSpec (the latest its aggregator started with); None for a state directory made before runs recorded it.

    Raises:
        InvalidArgument: the file is there but is not a TrainingSpec this build reads.
    """
    path = state_dir / TRAINING_SPEC
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    msg = federation_pb2.TrainingSpec()
    try:
        msg.ParseFromString(raw)
        return training_spec_from_proto(msg)
    except (DecodeError, InvalidArgument) as exc:  # not protobuf, or an enum value this build does not know
        raise InvalidArgument(
            f"{path} is not a TrainingSpec this build reads: {exc}", field="state_dir"
        ) from None
