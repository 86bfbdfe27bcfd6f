"""The upload spool on real files: recycled files are overwritten, cut to size, and bounded in number."""

from __future__ import annotations

import os
from pathlib import Path

from server.spool import Spool


def _spool_upload(spool: Spool, upload_id: str, data: bytes) -> None:
    writer = spool.open_at(upload_id, 0)
    for start in range(0, len(data), 1000):
        writer.write(data[start : start + 1000])
    writer.flush()
    assert writer.finish() == len(data)
    writer.close()


def test_a_recycled_file_holds_exactly_the_new_upload(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    _spool_upload(spool, "first", os.urandom(10_000))
    spool.delete("first")
    assert not spool.path("first").exists()
    [recycled] = list((tmp_path / "spool" / "recycled").glob("*.spent"))
    inode = recycled.stat().st_ino

    second = os.urandom(4_000)
    _spool_upload(spool, "second", second)
    path = spool.path("second")
    assert path.stat().st_ino == inode  # the same file, taken over
    assert path.read_bytes() == second  # nothing of the first upload is left behind
    assert spool.read("second", 1000, 2000) == second[1000:3000]
    assert not list((tmp_path / "spool" / "recycled").glob("*.spent"))


def test_a_resumed_upload_drops_uncommitted_bytes_of_a_recycled_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    _spool_upload(spool, "old", b"x" * 9_000)
    spool.delete("old")
    writer = spool.open_at("new", 0)
    writer.write(b"a" * 3_000)
    assert writer.sync() == 3_000
    writer.write(b"b" * 500)  # received, never committed
    writer.close()

    resumed = spool.open_at("new", 3_000)
    resumed.write(b"c" * 2_000)
    resumed.finish()
    resumed.close()
    assert spool.path("new").read_bytes() == b"a" * 3_000 + b"c" * 2_000


def test_at_most_max_recycled_files_are_kept(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_recycled=2)
    for name in ("a", "b", "c"):
        _spool_upload(spool, name, os.urandom(1_000))
    for name in ("a", "b", "c"):
        spool.delete(name)
    assert len(list((tmp_path / "spool" / "recycled").glob("*.spent"))) == 2
    assert spool.existing() == []
