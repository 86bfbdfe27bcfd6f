"""The SQLite store opens a state directory written by an earlier release: new fields read as their defaults."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from server.records import RunRecord, SiteRecord
from server.store import Store


def test_a_table_from_an_older_release_gains_the_new_columns_at_their_defaults(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    # The run and sites tables as releases before pause_reason, min_sites_to_open and the site's
    # diagnosis fields wrote them, with one row each.
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE run (run_id TEXT NOT NULL, created_ms INTEGER NOT NULL, current_round INTEGER NOT NULL, "
        "paused INTEGER NOT NULL, finished INTEGER NOT NULL, min_sites INTEGER NOT NULL, "
        "min_sample_fraction REAL NOT NULL, round_deadline_s INTEGER NOT NULL, optimizer_blob TEXT NOT NULL, "
        "PRIMARY KEY (run_id))"
    )
    db.execute("INSERT INTO run VALUES ('old-run', 5, 3, 1, 0, 2, 0.5, 60, '')")
    db.execute("CREATE TABLE sites (site_id TEXT NOT NULL, state INTEGER NOT NULL, PRIMARY KEY (site_id))")
    db.commit()
    db.close()
    # Not every column SiteRecord has: the store adds the rest, this one too.
    store = Store(path)
    try:
        run = store.get(RunRecord, "old-run")
        assert run is not None
        assert (run.current_round, run.paused, run.min_sites, run.round_deadline_s) == (3, True, 2, 60)
        assert (run.pause_reason, run.min_sites_to_open) == ("", 0)
        run.pause_reason = "maintenance"
        store.put(run)
        store.put(SiteRecord(site_id="a", last_problem="CUDA out of memory", train_seconds=12.5))
    finally:
        store.close()
    store = Store(path)  # and opens again with nothing left to add
    try:
        again = store.get(RunRecord, "old-run")
        site = store.get(SiteRecord, "a")
        assert again is not None and again.pause_reason == "maintenance"
        assert site is not None and (site.last_problem, site.train_seconds) == ("CUDA out of memory", 12.5)
    finally:
        store.close()
