"""common.files on real files: rewrite() over existing and spent files, the Recycler's bound."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.files import Recycler, rewrite


def test_rewrite_overwrites_in_place_and_cuts_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "payload"
    path.write_bytes(b"old" * 1000)
    inode = path.stat().st_ino
    with rewrite(path) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new"
    assert path.stat().st_ino == inode


def test_rewrite_takes_the_largest_spent_file(tmp_path: Path) -> None:
    recycler = Recycler(tmp_path / "recycled", keep=3)
    for name, size in (("small", 10), ("large", 5000), ("medium", 100)):
        (tmp_path / name).write_bytes(b"x" * size)
        recycler.retire(tmp_path / name)
    assert not (tmp_path / "large").exists()
    inodes = {p.stat().st_size: p.stat().st_ino for p in (tmp_path / "recycled").glob("*.spent")}

    target = tmp_path / "state.tmp"
    with rewrite(target, recycler) as f:
        f.write(b"y" * 42)
    assert target.read_bytes() == b"y" * 42
    assert target.stat().st_ino == inodes[5000]
    assert sorted(p.stat().st_size for p in (tmp_path / "recycled").glob("*.spent")) == [10, 100]


def test_rewrite_without_a_spent_file_creates_one(tmp_path: Path) -> None:
    recycler = Recycler(tmp_path / "recycled", keep=1)
    with rewrite(tmp_path / "fresh", recycler) as f:
        f.write(b"abc")
    assert (tmp_path / "fresh").read_bytes() == b"abc"


def test_a_failed_rewrite_leaves_the_file_uncut_for_the_caller_to_discard(tmp_path: Path) -> None:
    path = tmp_path / "payload"
    path.write_bytes(b"0123456789")
    with pytest.raises(RuntimeError), rewrite(path) as f:
        f.write(b"ab")
        raise RuntimeError("encoder failed")
    assert path.read_bytes() == b"ab23456789"


def test_retire_beyond_keep_deletes(tmp_path: Path) -> None:
    recycler = Recycler(tmp_path / "recycled", keep=1)
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(b"z")
        recycler.retire(tmp_path / name)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert len(list((tmp_path / "recycled").glob("*.spent"))) == 1
    recycler.retire(tmp_path / "missing")  # nothing there: no error


def test_a_spent_file_still_open_here_is_not_taken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader that opened a file before it was retired keeps reading what it opened."""
    monkeypatch.chdir(tmp_path)  # a relative directory: open files are listed by absolute path
    recycler = Recycler(Path("recycled"), keep=2)
    state = tmp_path / "state"
    state.write_bytes(b"round 7 state")
    with state.open("rb") as reader:
        recycler.retire(state)
        assert not recycler.take(tmp_path / "next")
        with rewrite(tmp_path / "next", recycler) as f:
            f.write(b"round 9 state")
        assert reader.read() == b"round 7 state"
    assert recycler.take(tmp_path / "later")
    assert (tmp_path / "later").read_bytes() == b"round 7 state"
