"""State directories across wire revision 2: the uploads table gains its shard columns, revision 1's runs are refused.

Revision 2 (issue 19) sends a payload's shard specs with its chunks, so the
aggregator keeps them in its records: an upload's accepted shards with its
committed offset, a stored payload's layout beside its header. A state
directory written before has no layouts for its payloads and is refused by name.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from common.errors import FailedPrecondition
from common.serde import layout_from_bytes
from server.records import RoundRecord, UploadRecord, UploadState
from server.store import Store
from tests.scripted import Aggregator, ScriptedSite, make_config


def test_an_uploads_table_without_the_shard_columns_gains_them_empty(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    # The uploads table as wire revision 1 wrote it (its columns up to the training figures).
    db.execute(
        "CREATE TABLE uploads (upload_id TEXT NOT NULL, round INTEGER NOT NULL, site_id TEXT NOT NULL, "
        "state INTEGER NOT NULL, sample_count INTEGER NOT NULL, total_bytes INTEGER NOT NULL, "
        "committed_offset INTEGER NOT NULL, header BLOB NOT NULL, PRIMARY KEY (upload_id))"
    )
    db.execute("INSERT INTO uploads VALUES ('u1', 1, 'a', 1, 10, 0, 4096, X'0a00')")
    db.commit()
    db.close()
    store = Store(path)
    try:
        upload = store.get(UploadRecord, "u1")
        assert upload is not None
        assert (upload.state, upload.committed_offset, upload.shards, upload.layout) == (
            UploadState.RECEIVING,
            4096,
            b"",
            b"",
        )
        upload.shards = b"\x01\x02"
        store.put(upload)
    finally:
        store.close()
    store = Store(path)
    try:
        again = store.get(UploadRecord, "u1")
        assert again is not None and again.shards == b"\x01\x02"
    finally:
        store.close()


def test_a_state_directory_of_wire_revision_1_is_refused_naming_it(tmp_path: Path) -> None:
    config = make_config(tmp_path, ["a"])
    with Aggregator(config) as agg, ScriptedSite(agg.target, "a") as site:
        site.join()
        [(head, _)] = site.fetch(have=0, snapshot=True)
        assert head.round == 0
    store = Store(config.state_dir / "state.db")
    try:
        genesis = store.get(RoundRecord, 0)
        assert genesis is not None and genesis.snapshot_header
        # The layout revision 2 keeps beside the header, as the stored payload's spec.
        assert layout_from_bytes(genesis.snapshot_layout).spec == head.spec
        genesis.snapshot_layout = b""  # as revision 1 left it: a header, no layout
        store.put(genesis)
    finally:
        store.close()
    with pytest.raises(FailedPrecondition, match=r"wire revision 1 of gradualdiff\.v1") as info:
        Aggregator(config)
    assert info.value.field == "state_dir"
