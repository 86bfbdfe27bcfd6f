"""Rounds end to end: a real aggregator on 127.0.0.1, scripted sites, and the operator's tools.

Every published state is checked bit for bit against what the test computes
in torch (uploads pushed one after another are folded in that order, so the
fp64 sum is reproducible exactly; see server/aggregate.py's WeightedSum).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import pytest
import torch

from common.delta import Cast, Codec, DeltaHeader, DeltaKind, PayloadLayout, UploadMetrics
from common.pb.gradualdiff.v1 import admin_pb2, federation_pb2
from server.config import RoundPolicy
from server.fetching import FetchItem, open_all
from server.records import RoundRecord
from tests.scripted import (
    ADMIN_TOKEN,
    ROOT,
    AdminClient,
    Harness,
    MakeHarness,
    State,
    Watcher,
    add,
    apply_fetched,
    assert_same_bits,
    harnesses,
    partial_delta,
    random_delta,
    rpc_code,
    token_of,
    wait_for,
)

PUBLISHED = federation_pb2.ROUND_STATE_PUBLISHED
FAILED = federation_pb2.ROUND_STATE_FAILED
OPEN = federation_pb2.ROUND_STATE_OPEN
COLLECTING = federation_pb2.ROUND_STATE_COLLECTING
AGGREGATING = federation_pb2.ROUND_STATE_AGGREGATING


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[MakeHarness]:
    with harnesses(tmp_path) as make:
        yield make


def push(h: Harness, site: str, delta: State, *, round: int, base: int, **kw: object) -> int:
    """Push ``delta`` for ``site`` to round ``round``, trained from round ``base``; assert it is
    accepted once; return the payload size."""
    head, payload = h[site].header(delta, round=round, base=base, **kw)  # type: ignore[arg-type]
    receipt = h[site].push(head, payload)
    assert receipt.accepted and not receipt.duplicate
    assert (receipt.upload_id, receipt.round, receipt.bytes_received) == (head.upload_id, round, len(payload))
    return len(payload)


def participants(status: admin_pb2.RoundStatus) -> dict[str, admin_pb2.SiteRoundStatus]:
    return {p.site_id: p for p in status.participants}


def ticks(h: Harness, n: int = 5) -> None:
    """Let the round loop tick ``n`` times (``tick_s`` each).

    A tick that changes nothing sends no event and leaves no trace, so where a test must show
    that the loop did *not* act and no later event of the run proves that it ticked in between,
    it sleeps through a few ticks. Everywhere else a test waits for an event (``Watcher``).
    """
    time.sleep(n * h.agg.config.tick_s)


def still(h: Harness, round_number: int, state: int) -> None:
    """Round ``round_number`` is still in ``state`` after a few ticks of the round loop."""
    ticks(h)
    assert h.admin.round(round_number).state == state


# ---------------------------------------------------------------- a full round


def test_full_round_publishes_the_weighted_mean(harness: MakeHarness) -> None:
    h = harness({"a": 10, "b": 30, "c": 7})
    h.join_all()
    spec = h["a"].await_round(after=0)
    assert (spec.round, spec.base_round, spec.run_id) == (1, 0, "test-run")
    # Dense in two tensors, zero in the rest: the difference is smaller than a snapshot,
    # so FetchDiff(have_round=0) streams the difference itself.
    touched = ("embed.weight", "layers.0.norm.weight")
    deltas = {s: partial_delta(i + 1, h.init, touched) for i, s in enumerate(h.sites)}
    losses = {"a": (0.5, 1.5), "b": (1.0, 2.0), "c": (4.0, 3.0)}
    sizes = {}
    for i, s in enumerate(h.sites):
        metrics = UploadMetrics(train_loss=losses[s][0], eval_loss=losses[s][1], steps=3)
        sizes[s] = push(h, s, deltas[s], round=1, base=0, metrics=metrics)
        if i < 2:  # the quorum is every participant: no close before the third upload
            still(h, 1, COLLECTING)

    status = h.admin.wait_round(1)
    assert status.state == PUBLISHED, status.failure_reason
    mean = h.mean([(deltas[s], h[s].samples) for s in h.sites])

    fetched = h["b"].fetch(have=0)
    assert [(head.kind, head.round, head.base_round) for head, _ in fetched] == [(DeltaKind.DIFF, 1, 0)]
    assert_same_bits(fetched[0][1], mean)
    assert h["b"].await_round(after=1).round == 2
    number, snapshot = h["c"].snapshot()
    assert number == 1
    assert_same_bits(snapshot, add(h.init, mean))
    # Tensors no site touched are exactly the initial ones.
    assert torch.equal(snapshot["layers.1.q.weight"], h.init["layers.1.q.weight"])

    status = h.admin.round(1)
    total = sum(h[s].samples for s in h.sites)
    assert status.samples == total == 47
    assert status.bytes_in == sum(sizes.values())
    assert status.close_reason == "all"
    assert status.diff_bytes == h["b"].fetched_bytes[0]
    assert status.bytes_out >= status.diff_bytes  # what FetchDiff served for this round
    full = sum(t.numel() * 4 for t in h.init.values())
    assert status.ratio_to_full_model == pytest.approx(sum(sizes.values()) / 3 / full)
    assert status.mean_train_loss == pytest.approx(sum(losses[s][0] * h[s].samples for s in h.sites) / total)
    assert status.mean_eval_loss == pytest.approx(sum(losses[s][1] * h[s].samples for s in h.sites) / total)
    assert 0 < status.opened_unix_ms <= status.closed_unix_ms <= status.published_unix_ms
    parts = participants(status)
    assert sorted(parts) == ["a", "b", "c"]
    for s, p in parts.items():
        assert p.accepted and not p.dropped
        assert (p.sample_count, p.bytes_in, p.train_loss, p.eval_loss) == (h[s].samples, sizes[s], *losses[s])

    run = h.admin.status()
    assert (run.run_id, run.current_round, run.current_state) == ("test-run", 2, OPEN)
    assert (run.sites_alive, run.sites_known, run.full_model_bytes, run.paused) == (3, 3, full, False)
    listed = h.admin.rounds()
    assert [r.round for r in listed] == [2, 1]
    assert listed[1].state == PUBLISHED and listed[1].samples == total
    sites = h.admin.sites()
    assert sites["b"].held_round == 1  # FetchDiff recorded what it sent
    assert all(s.state == admin_pb2.SITE_STATE_ALIVE and s.rounds_joined == 2 for s in sites.values())


def test_a_round_not_published_reports_its_uploads_so_far(harness: MakeHarness) -> None:
    h = harness({"a": 10, "b": 30, "c": 7})
    h.join_all()
    for site, (train, evaluated) in (("a", (0.5, 1.5)), ("b", (1.0, 2.0))):
        metrics = UploadMetrics(train_loss=train, eval_loss=evaluated, steps=3)
        push(h, site, random_delta(ord(site), h.init), round=1, base=0, metrics=metrics)
    status = h.admin.round(1)  # c has not uploaded: the round collects, with what it has so far
    assert (status.state, status.samples, status.published_unix_ms) == (COLLECTING, 40, 0)
    assert status.mean_train_loss == pytest.approx((0.5 * 10 + 1.0 * 30) / 40)
    assert status.mean_eval_loss == pytest.approx((1.5 * 10 + 2.0 * 30) / 40)
    assert h.admin.rounds()[0].samples == 40
    push(h, "c", random_delta(3, h.init), round=1, base=0)
    assert h.admin.wait_round(1).samples == 47


def test_quorum_holds_when_a_silent_site_is_dropped(harness: MakeHarness) -> None:
    h = harness({"a": 10, "b": 20, "c": 30})
    events = h.admin.watch()
    h.join_all()
    deltas = {s: random_delta(i + 11, h.init) for i, s in enumerate(h.sites)}
    push(h, "a", deltas["a"], round=1, base=0)
    push(h, "b", deltas["b"], round=1, base=0)
    h["c"].stop_beating()
    status = h.admin.wait_round(1, timeout=10)  # dropped after 3 missed 0.5 s beats
    assert status.state == PUBLISHED, status.failure_reason
    # While c was alive the round waited for it.
    assert events.first("site_dropped", site="c") < events.first("round_closed", round=1)
    parts = participants(status)
    assert parts["c"].dropped and not parts["c"].accepted and parts["c"].bytes_in == 0
    assert parts["a"].accepted and parts["b"].accepted and not parts["a"].dropped
    assert status.samples == 30
    assert h.admin.sites()["c"].state == admin_pb2.SITE_STATE_SILENT
    assert h.admin.status().sites_alive == 2
    _, snapshot = h["a"].snapshot()
    assert_same_bits(snapshot, add(h.init, h.mean([(deltas["a"], 10), (deltas["b"], 20)])))

    # The silent site comes back: alive again, and a participant of the open round.
    assert h["c"].beat().directive == federation_pb2.DIRECTIVE_CONTINUE
    assert h.admin.sites()["c"].state == admin_pb2.SITE_STATE_ALIVE
    assert sorted(participants(h.admin.round(2))) == ["a", "b", "c"]


def test_a_round_opens_only_when_enough_sites_are_alive(harness: MakeHarness) -> None:
    h = harness({"a": 10, "b": 20, "c": 30}, round=RoundPolicy(min_sites_to_open=2))
    events = h.admin.watch()
    h["a"].join()
    h["a"].start_beating()
    ticks(h)
    assert h.admin.status().current_round == 0  # one site alive: round 1 waits
    h["b"].join()
    h["b"].start_beating()
    assert h["a"].await_round(after=0).round == 1
    assert sorted(participants(h.admin.round(1))) == ["a", "b"]
    push(h, "a", random_delta(71, h.init), round=1, base=0)
    push(h, "b", random_delta(72, h.init), round=1, base=0)
    assert h.admin.wait_round(1).state == PUBLISHED
    # Round 2 opens at once (two alive); a falls silent, b finishes round 2 alone, and round 3 waits
    # between rounds until a second site is alive again.
    assert h["b"].await_round(after=1).round == 2
    h["a"].stop_beating()
    push(h, "b", random_delta(73, h.init), round=2, base=1)
    assert h.admin.wait_round(2).state == PUBLISHED
    h["c"].join()
    assert h["c"].await_round(after=2).round == 3
    assert sorted(participants(h.admin.round(3))) == ["b", "c"]
    # Publishing round 2 tried to open round 3 (b alone); it opened only once c joined.
    assert events.first("round_published", round=2) < events.first("site_joined", site="c")
    assert events.first("site_joined", site="c") < events.first("round_opened", round=3)


def test_explicit_min_sites_closes_early_and_refuses_the_late_site(harness: MakeHarness) -> None:
    h = harness({"a": 10, "b": 20, "c": 30}, round=RoundPolicy(min_sites=2))
    h.join_all()
    deltas = {s: random_delta(i + 21, h.init) for i, s in enumerate(h.sites)}
    late_head, late_payload = h["c"].header(deltas["c"], round=1, base=0)
    push(h, "a", deltas["a"], round=1, base=0)
    still(h, 1, COLLECTING)
    push(h, "b", deltas["b"], round=1, base=0)
    h.admin.wait_round(1, AGGREGATING, PUBLISHED)
    code = rpc_code(lambda: h["c"].push(late_head, late_payload))
    assert code in (grpc.StatusCode.ABORTED, grpc.StatusCode.FAILED_PRECONDITION)
    status = h.admin.wait_round(1)
    assert status.state == PUBLISHED and status.close_reason == "quorum"
    assert status.samples == 30
    parts = participants(status)
    assert not parts["c"].accepted and not parts["c"].dropped
    # Once round 2 is open, round 1's header is the wrong round.
    assert rpc_code(lambda: h["c"].push(late_head, late_payload)) is grpc.StatusCode.FAILED_PRECONDITION
    _, snapshot = h["c"].snapshot()
    assert_same_bits(snapshot, add(h.init, h.mean([(deltas["a"], 10), (deltas["b"], 20)])))


def test_deadline_closes_the_round_with_what_it_has(harness: MakeHarness) -> None:
    h = harness({"a": 10, "b": 20}, round=RoundPolicy(deadline_s=2))
    h.join_all()
    spec = h["a"].await_round(after=0)
    assert spec.deadline_unix_ms > 0
    delta = random_delta(31, h.init)
    push(h, "a", delta, round=1, base=0)
    status = h.admin.wait_round(1, timeout=10)
    # b is alive and has not uploaded: the round waited for it until the deadline, not a moment less.
    assert status.state == PUBLISHED and status.close_reason == "deadline"
    assert status.closed_unix_ms >= spec.deadline_unix_ms
    assert status.samples == 10
    parts = participants(status)
    assert parts["a"].accepted and not parts["b"].accepted and not parts["b"].dropped
    _, snapshot = h["b"].snapshot()
    assert_same_bits(snapshot, add(h.init, h.mean([(delta, 10)])))  # the mean of the one upload


def test_deadline_without_uploads_fails_and_the_next_round_opens(harness: MakeHarness) -> None:
    h = harness({"a": 10}, round=RoundPolicy(deadline_s=1))
    h.join_all()
    status = h.admin.wait_round(1, timeout=10)
    assert status.state == FAILED
    assert "deadline" in status.failure_reason and status.published_unix_ms == 0
    spec = h["a"].await_round(after=1)
    assert spec.round >= 2 and spec.base_round == 0  # a failed round publishes nothing
    reply = h.admin.stub.SetRoundPolicy(
        admin_pb2.SetRoundPolicyRequest(round_deadline_s=60), metadata=h.admin.metadata, timeout=10
    )
    assert reply.status.round_deadline_s == 60
    spec = h["a"].await_round(after=1)  # the open round now ends 60 s after it opened
    assert spec.deadline_unix_ms - h.admin.round(spec.round).opened_unix_ms == 60_000
    delta = random_delta(41, h.init)
    push(h, "a", delta, round=spec.round, base=0)
    assert h.admin.wait_round(spec.round).state == PUBLISHED
    # The chain from round 0 skips the failed round(s).
    assert all(h.admin.round(r).state == FAILED for r in range(1, spec.round))
    fetched = h["a"].fetch(have=0)
    assert [head.round for head, _ in fetched] == [spec.round]
    assert_same_bits(apply_fetched(h.init, fetched), add(h.init, h.mean([(delta, 10)])))


def test_deadline_below_the_explicit_minimum_fails_and_leaves_the_state(harness: MakeHarness) -> None:
    h = harness({"a": 10, "b": 20}, round=RoundPolicy(min_sites=2))
    h.join_all()
    push(h, "a", random_delta(51, h.init), round=1, base=0)
    # (One upload of the two needed does not close the round: it fails below, it never publishes.)
    # A 1 s deadline for a round opened earlier than that: it is due at once.
    time.sleep(max(0.0, 1.1 - (time.time() - h.admin.round(1).opened_unix_ms / 1000)))
    h.admin.stub.SetRoundPolicy(
        admin_pb2.SetRoundPolicyRequest(round_deadline_s=1), metadata=h.admin.metadata, timeout=10
    )
    status = h.admin.wait_round(1, timeout=10)
    assert status.state == FAILED and "needs 2 site(s)" in status.failure_reason
    assert h["a"].await_round(after=1).base_round == 0
    number, snapshot = h["a"].snapshot()
    assert number == 0
    assert_same_bits(snapshot, h.init)


def test_run_finishes_after_its_rounds(harness: MakeHarness) -> None:
    h = harness({"a": 10}, rounds=1)
    h.join_all()
    push(h, "a", random_delta(61, h.init), round=1, base=0)
    assert h.admin.wait_round(1).state == PUBLISHED
    wait_for(lambda: h.admin.status().finished, what="the run to finish")
    assert h["a"].await_round(after=1, wait_ms=200).run_finished
    assert h["a"].beat().directive == federation_pb2.DIRECTIVE_STOP
    assert [r.round for r in h.admin.rounds()] == [1]


# ---------------------------------------------------------------- FetchDiff


def test_fetch_chain_or_snapshot_gives_the_same_state(harness: MakeHarness) -> None:
    h = harness({"a": 10})
    h.join_all()
    site = h["a"]
    deltas = [
        random_delta(71, h.init),  # dense: its difference costs about a snapshot
        partial_delta(72, h.init, ["embed.weight"]),
        partial_delta(73, h.init, ["layers.0.norm.weight"]),
    ]
    held: dict[int, State] = {0: h.init}
    expected = h.init
    for number, delta in enumerate(deltas, start=1):
        assert site.await_round(after=number - 1).round == number
        push(h, "a", delta, round=number, base=number - 1)
        assert h.admin.wait_round(number).state == PUBLISHED
        expected = add(expected, h.mean([(delta, 10)]))
        held[number] = apply_fetched(held[number - 1], site.fetch(have=number - 1))
        assert_same_bits(held[number], expected)

    _, snapshot = site.snapshot()
    assert_same_bits(snapshot, expected)
    diff_bytes = {r.round: r.diff_bytes for r in h.admin.rounds()}
    site.fetch(have=0, snapshot=True)
    snapshot_bytes = site.fetched_bytes[0]
    kinds = {}
    for have in (0, 1, 2):
        fetched = site.fetch(have=have)
        chain = sum(diff_bytes[r] for r in range(have + 1, 4))
        if chain > snapshot_bytes:
            assert [(head.kind, head.round) for head, _ in fetched] == [(DeltaKind.SNAPSHOT, 3)]
        else:
            assert [(head.kind, head.round, head.base_round) for head, _ in fetched] == [
                (DeltaKind.DIFF, r, r - 1) for r in range(have + 1, 4)
            ]
        kinds[have] = fetched[0][0].kind
        # A site at round `have` that applies what it was sent holds exactly the snapshot.
        assert_same_bits(apply_fetched(held[have], fetched), snapshot)
    # The deltas were chosen so that both answers occur.
    assert kinds[0] is DeltaKind.SNAPSHOT and kinds[1] is DeltaKind.DIFF
    assert [head.kind for head, _ in site.fetch(have=1, snapshot=True)] == [DeltaKind.SNAPSHOT]
    assert site.fetch(have=3) == []
    assert rpc_code(lambda: site.fetch(have=4)) is grpc.StatusCode.FAILED_PRECONDITION


def test_differences_no_chain_can_use_are_dropped_and_their_blocks_reused(harness: MakeHarness) -> None:
    """A difference that makes every chain through it cost more than a snapshot is never sent again:
    the collector drops it, later rounds write over its file, and a site that far behind gets the snapshot."""
    h = harness({"a": 10})
    h.join_all()
    site = h["a"]
    store, blobs = h.agg.coordinator.store, h.agg.coordinator.blobs
    # Three dense rounds (each about a snapshot), then two that change one small tensor.
    deltas = [random_delta(90 + r, h.init) for r in range(3)]
    deltas += [partial_delta(95 + r, h.init, ["layers.0.norm.weight"]) for r in range(2)]
    states: dict[int, State] = {0: h.init}
    digests: dict[int, str] = {}
    reused = []
    for number, delta in enumerate(deltas, start=1):
        assert site.await_round(after=number - 1).round == number
        spent = {p.stat().st_ino for p in blobs.recycler.directory.glob("*.spent")}
        push(h, "a", delta, round=number, base=number - 1)
        assert h.admin.wait_round(number).state == PUBLISHED
        states[number] = add(states[number - 1], h.mean([(delta, 10)]))
        record = store.get(RoundRecord, number)
        assert record is not None
        digests[number] = record.diff_blob
        if number >= 4:  # the dense rounds' files were dropped: this difference took one over
            reused.append(blobs.path(record.diff_blob).stat().st_ino in spent)
        # The site one round behind still ends exactly where the aggregator is.
        assert_same_bits(apply_fetched(states[number - 1], site.fetch(have=number - 1)), states[number])

    site.fetch(have=0, snapshot=True)
    snapshot_bytes = site.fetched_bytes[0]
    records = {r.round: r for r in store.select(RoundRecord, "round > 0")}
    kept = dropped = 0
    for number in range(1, 6):
        suffix = sum(records[r].diff_bytes for r in range(number, 6))
        on_disk = bool(digests[number]) and blobs.path(digests[number]).exists()
        assert on_disk == (suffix <= snapshot_bytes), (number, suffix, snapshot_bytes)
        assert bool(records[number].diff_blob) == on_disk
        kept, dropped = kept + on_disk, dropped + (not on_disk)
        fetched = site.fetch(have=number - 1)
        if on_disk:
            assert [head.kind for head, _ in fetched] == [DeltaKind.DIFF] * (6 - number)
        else:
            assert [(head.kind, head.round) for head, _ in fetched] == [(DeltaKind.SNAPSHOT, 5)]
        assert_same_bits(apply_fetched(states[number - 1], fetched), states[5])
    assert kept >= 2 and dropped >= 2  # both answers occur
    assert reused == [True, True]


def test_a_plan_whose_file_was_dropped_opens_nothing_and_removes_its_temporaries(tmp_path: Path) -> None:
    """Between planning and opening the collector may drop a file: nothing stays open, nothing leaks."""
    layout = PayloadLayout(codec=Codec(), manifest=(), shards=(), total_bytes=0, digest=bytes(32))
    head = DeltaHeader(spec=layout.spec, run_id="r")
    kept, temporary = tmp_path / "kept.payload", tmp_path / "partial.payload"
    kept.write_bytes(b"k")
    temporary.write_bytes(b"t")
    plan = [
        FetchItem(head, layout, kept, 1),
        FetchItem(head, layout, temporary, 2, temporary=True),
        FetchItem(head, layout, tmp_path / "dropped.payload", 3),
    ]
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(FileNotFoundError):
        open_all(plan)
    assert len(os.listdir("/proc/self/fd")) == before
    assert kept.exists() and not temporary.exists()
    opened = open_all(plan[:1])
    assert [(item.round, source.read()) for item, source in opened] == [(1, b"k")]
    opened[0][1].close()


def test_zero_differences_keep_every_state_file_a_round_names(harness: MakeHarness) -> None:
    """Blobs are named by content: rounds that change nothing share one state file, and GC must keep it."""
    h = harness({"a": 10}, keep_states=1)
    h.join_all()
    site = h["a"]
    zero = {name: torch.zeros_like(t) for name, t in h.init.items()}
    for number in (1, 2, 3):
        assert site.await_round(after=number - 1).round == number
        push(h, "a", zero, round=number, base=number - 1)
        assert h.admin.wait_round(number).state == PUBLISHED
    number, snapshot = site.snapshot()
    assert number == 3
    assert_same_bits(snapshot, h.init)
    assert_same_bits(apply_fetched(h.init, site.fetch(have=0)), h.init)


def test_a_bf16_broadcast_publishes_the_state_workers_will_hold(harness: MakeHarness) -> None:
    """With a lossy cast the new state adds the decoded (rounded) difference, not the exact mean."""
    h = harness({"a": 10}, broadcast_codec=Codec(cast=Cast.BF16))
    h.join_all()
    site = h["a"]
    delta = random_delta(81, h.init)
    assert site.await_round(after=0).round == 1
    push(h, "a", delta, round=1, base=0)
    assert h.admin.wait_round(1).state == PUBLISHED
    fetched = site.fetch(have=0)
    assert [(head.kind, head.spec.codec.cast) for head, _ in fetched] == [(DeltaKind.DIFF, Cast.BF16)]
    held = apply_fetched(h.init, fetched)
    _, snapshot = site.snapshot()
    assert_same_bits(snapshot, held)
    exact = add(h.init, h.mean([(delta, 10)]))
    assert any(not torch.equal(snapshot[k], exact[k]) for k in exact)  # the rounding did reach the state


# ---------------------------------------------------------------- admin


CONTROL = admin_pb2.ControlRequest


def _admin_run(harness: MakeHarness, sites: dict[str, int] | None = None) -> tuple[Harness, Watcher]:
    """``sites`` (a, b and c with 10, 20 and 30 samples) joined and beating, round 1 open, all of it watched."""
    h = harness(sites or {"a": 10, "b": 20, "c": 30})
    events = h.admin.watch()
    h.join_all()
    assert h["a"].await_round(after=0).round == 1
    return h, events


def test_pause_takes_uploads_but_holds_the_close_until_resume(harness: MakeHarness) -> None:
    h, events = _admin_run(harness)
    admin = h.admin
    reply = admin.stub.Pause(CONTROL(reason="maintenance"), metadata=admin.metadata, timeout=10)
    assert reply.ok and reply.status.paused
    deltas = {s: random_delta(81 + i, h.init) for i, s in enumerate(h.sites)}
    for s in h.sites:
        push(h, s, deltas[s], round=1, base=0)
    still(h, 1, COLLECTING)
    reply = admin.stub.Resume(CONTROL(), metadata=admin.metadata, timeout=10)
    assert reply.ok and not reply.status.paused
    assert admin.wait_round(1).state == PUBLISHED
    _, snapshot = h["a"].snapshot()
    assert_same_bits(snapshot, add(h.init, h.mean([(deltas[s], h[s].samples) for s in h.sites])))
    assert events.first("resumed") < events.first("round_closed", round=1)
    assert events.first("paused") < events.first("resumed") < events.first("round_published", round=1)
    events.first("round_opened", round=2)  # publishing opens the next round
    for kind in ("site_joined", "paused", "resumed", "upload_accepted", "round_closed", "round_published",
                 "round_opened"):  # fmt: skip
        assert kind in events.kinds(), (kind, events.kinds())


def test_close_round_publishes_the_one_upload_it_has(harness: MakeHarness) -> None:
    h, events = _admin_run(harness)
    admin = h.admin
    delta = random_delta(91, h.init)
    push(h, "a", delta, round=1, base=0)
    assert admin.round(1).state == COLLECTING
    assert admin.stub.CloseRound(CONTROL(reason="enough"), metadata=admin.metadata, timeout=10).ok
    status = admin.wait_round(1)
    # Closed by the operator, not by the quorum (b and c are alive and have not uploaded).
    assert (status.state, status.close_reason, status.samples) == (PUBLISHED, "admin", 10)
    _, snapshot = h["a"].snapshot()
    assert_same_bits(snapshot, add(h.init, h.mean([(delta, 10)])))
    assert events.first("round_closed", round=1) < events.first("round_published", round=1)


def test_close_round_without_uploads_fails_it_and_the_next_opens(harness: MakeHarness) -> None:
    h, events = _admin_run(harness)
    admin = h.admin
    assert admin.stub.CloseRound(CONTROL(), metadata=admin.metadata, timeout=10).ok
    status = admin.wait_round(1)
    assert status.state == FAILED and "operator" in status.failure_reason
    assert h["a"].await_round(after=1).round == 2
    assert events.first("round_failed", round=1) < events.first("round_opened", round=2)


def test_close_round_while_paused_publishes_but_opens_nothing_until_resume(harness: MakeHarness) -> None:
    h, events = _admin_run(harness)
    admin = h.admin
    admin.stub.Pause(CONTROL(), metadata=admin.metadata, timeout=10)
    delta = random_delta(92, h.init)
    push(h, "b", delta, round=1, base=0)
    admin.stub.CloseRound(CONTROL(), metadata=admin.metadata, timeout=10)
    assert admin.wait_round(1).state == PUBLISHED
    _, snapshot = h["a"].snapshot()
    assert_same_bits(snapshot, add(h.init, h.mean([(delta, 20)])))
    ticks(h)  # publishing round 1 did not open round 2, and neither do the ticks after it while paused
    run = admin.status()
    assert (run.paused, run.current_round, run.current_state) == (True, 1, PUBLISHED)
    assert (
        rpc_code(lambda: admin.stub.CloseRound(CONTROL(), metadata=admin.metadata, timeout=10))
        is grpc.StatusCode.FAILED_PRECONDITION
    )
    assert admin.stub.Resume(CONTROL(), metadata=admin.metadata, timeout=10).status.current_round == 2
    assert events.first("resumed") < events.first("round_opened", round=2)


def test_evict_drops_the_site_stops_it_and_refuses_it_from_then_on(harness: MakeHarness) -> None:
    h, events = _admin_run(harness)
    admin = h.admin
    reply = admin.stub.EvictSite(
        admin_pb2.EvictSiteRequest(site_id="c", reason="misbehaving"), metadata=admin.metadata, timeout=10
    )
    assert reply.ok
    assert (
        rpc_code(
            lambda: admin.stub.EvictSite(admin_pb2.EvictSiteRequest(site_id="zz"), metadata=admin.metadata)
        )
        is grpc.StatusCode.NOT_FOUND
    )
    assert admin.sites()["c"].state == admin_pb2.SITE_STATE_EVICTED
    assert h["c"].beat().directive == federation_pb2.DIRECTIVE_STOP
    assert rpc_code(h["c"].join) is grpc.StatusCode.PERMISSION_DENIED
    head, payload = h["c"].header(random_delta(93, h.init), round=1, base=0)
    assert rpc_code(lambda: h["c"].push(head, payload)) is grpc.StatusCode.PERMISSION_DENIED
    deltas = {s: random_delta(94 + i, h.init) for i, s in enumerate("ab")}
    push(h, "a", deltas["a"], round=1, base=0)
    push(h, "b", deltas["b"], round=1, base=0)
    status = admin.wait_round(1)  # a and b are all the live participants now
    assert status.state == PUBLISHED and status.close_reason == "all"
    assert participants(status)["c"].dropped
    _, snapshot = h["a"].snapshot()
    assert_same_bits(snapshot, add(h.init, h.mean([(deltas["a"], 10), (deltas["b"], 20)])))
    assert events.first("site_evicted", round=1, site="c") < events.first("round_closed", round=1)


def test_set_round_policy_refuses_a_bad_request_and_applies_a_good_one_to_the_open_round(
    harness: MakeHarness,
) -> None:
    h, _ = _admin_run(harness, {"a": 10, "b": 20})
    admin = h.admin
    bad = admin_pb2.SetRoundPolicyRequest(
        quorum=federation_pb2.Quorum(min_sites=3, min_sample_fraction=1.5), round_deadline_s=99
    )
    assert (
        rpc_code(lambda: admin.stub.SetRoundPolicy(bad, metadata=admin.metadata, timeout=10))
        is grpc.StatusCode.INVALID_ARGUMENT
    )
    run = admin.status()
    assert (run.quorum.min_sites, run.quorum.min_sample_fraction, run.round_deadline_s) == (0, 0.0, 0)
    reply = admin.stub.SetRoundPolicy(
        admin_pb2.SetRoundPolicyRequest(quorum=federation_pb2.Quorum(min_sites=1), round_deadline_s=120),
        metadata=admin.metadata,
        timeout=10,
    )
    assert (reply.status.quorum.min_sites, reply.status.round_deadline_s) == (1, 120)
    spec = h["a"].await_round(after=0)
    assert spec.round == 1 and spec.quorum.min_sites == 1 and spec.deadline_unix_ms > 0
    delta = random_delta(96, h.init)
    push(h, "b", delta, round=1, base=0)
    status = admin.wait_round(1)
    assert (status.state, status.close_reason, status.samples) == (PUBLISHED, "quorum", 20)
    _, snapshot = h["a"].snapshot()
    assert_same_bits(snapshot, add(h.init, h.mean([(delta, 20)])))


def test_admin_credentials(harness: MakeHarness) -> None:
    h = harness({"a": 10})
    for token, code in (
        (token_of("a"), grpc.StatusCode.PERMISSION_DENIED),
        ("wrong", grpc.StatusCode.UNAUTHENTICATED),
    ):
        with AdminClient(h.agg.target, token) as other:
            assert rpc_code(other.status) is code
            pause = functools.partial(
                other.stub.Pause, admin_pb2.ControlRequest(), metadata=other.metadata, timeout=10
            )
            assert rpc_code(pause) is code
    assert (
        rpc_code(lambda: h.admin.stub.GetStatus(admin_pb2.StatusRequest(), timeout=10))
        is grpc.StatusCode.UNAUTHENTICATED
    )
    assert not h.admin.status().paused  # nothing above took effect
    assert rpc_code(lambda: h.admin.round(7)) is grpc.StatusCode.NOT_FOUND
    too_long = admin_pb2.ControlRequest(reason="x" * 513)
    assert (
        rpc_code(lambda: h.admin.stub.Pause(too_long, metadata=h.admin.metadata, timeout=10))
        is grpc.StatusCode.INVALID_ARGUMENT
    )
    assert not h.admin.status().paused


# ---------------------------------------------------------------- the CLI


def _run_all(target: str, *commands: tuple[Path, Sequence[str]]) -> list[tuple[int, str, str]]:
    """Run ``gdfed`` commands (token file, args) at once, each in its own interpreter; (rc, stdout, stderr) each.

    Each pays the interpreter's start-up, so independent ones run side by side.
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONIOENCODING="utf-8")
    env.pop("GDFED_ADMIN_TOKEN", None)
    procs = []
    for token_file, (command, *rest) in commands:
        argv = [sys.executable, "-m", "common.cli", command, "--aggregator", target]
        argv += ["--admin-token-file", str(token_file), *rest]
        procs.append(
            subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8"
            )
        )
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=60)
        out.append((proc.returncode, stdout, stderr))
    return out


def test_status_and_admin_cli(harness: MakeHarness, tmp_path: Path) -> None:
    h = harness({"a": 10, "b": 20})
    h.join_all()
    deltas = {"a": random_delta(101, h.init), "b": random_delta(102, h.init)}
    sizes = {s: push(h, s, deltas[s], round=1, base=0) for s in "ab"}
    assert h.admin.wait_round(1).state == PUBLISHED
    token = tmp_path / "admin.token"
    token.write_text(ADMIN_TOKEN + "\n")
    wrong = tmp_path / "wrong.token"
    wrong.write_text("nope\n")
    target = h.agg.target

    (rc, table, err), (rc_json, raw, err_json), (rc_round, detail, _), (rc_bad, _, bad) = _run_all(
        target,
        (token, ["status"]),
        (token, ["status", "--json"]),
        (token, ["status", "--round", "1"]),
        (wrong, ["status"]),
    )
    assert rc == 0, err
    lines = table.splitlines()
    assert lines[0].startswith("run test-run: round 2/∞ open, sites 2 alive / 2 known")
    assert "quorum min_sites=all" in lines[0]
    [row1] = [line for line in lines if line.split()[:2] == ["1", "published"]]
    assert row1.split()[2:4] == ["2/2", "30"]
    assert row1.rstrip().endswith("all 2 live sites")
    assert any(line.split()[:2] == ["2", "open"] for line in lines)
    assert any(line.split()[:2] == ["a", "alive"] for line in lines)
    assert any(line.split()[:2] == ["b", "alive"] for line in lines)

    assert rc_json == 0, err_json
    doc = json.loads(raw)
    assert doc["schema"] == "gdfed.status/1"
    assert doc["run"]["run_id"] == "test-run" and doc["run"]["current_round"] == 2
    round1 = next(r for r in doc["rounds"] if r["round"] == 1)
    assert round1["state"] == "published"
    assert int(round1["samples"]) == 30 and int(round1["bytes_in"]) == sum(sizes.values())
    assert round1["close_reason"] == "all"
    assert {p["site_id"]: int(p["bytes_in"]) for p in round1["participants"]} == sizes
    assert {s["site_id"]: s["state"] for s in doc["sites"]} == {"a": "alive", "b": "alive"}

    assert rc_round == 0
    assert any(line.split()[:2] == ["a", "accepted"] and "samples=10" in line for line in detail.splitlines())
    assert any(line.split()[:2] == ["b", "accepted"] and "samples=20" in line for line in detail.splitlines())
    assert rc_bad == 1 and "UNAUTHENTICATED" in bad

    (rc, out, err), (rc_missing, _, missing) = _run_all(
        target, (token, ["admin", "pause", "--reason", "cli"]), (token, ["admin", "evict", "nobody"])
    )
    assert rc == 0, err
    assert "(paused)" in out
    assert rc_missing == 1 and "NOT_FOUND" in missing
    assert h.admin.status().paused

    (rc_policy, out, err), (rc_evict, _, err_evict) = _run_all(
        target,
        (token, ["admin", "policy", "--min-sites", "1", "--deadline", "30"]),
        (token, ["admin", "evict", "b", "--reason", "cli test"]),
    )
    assert rc_policy == 0, err
    assert "min_sites=1" in out and "deadline=30s" in out
    assert rc_evict == 0, err_evict
    run = h.admin.status()
    assert (run.quorum.min_sites, run.round_deadline_s) == (1, 30)
    assert h.admin.sites()["b"].state == admin_pb2.SITE_STATE_EVICTED

    (rc, out, err), (rc_close, _, err_close) = _run_all(
        target, (token, ["admin", "resume"]), (token, ["admin", "close-round"])
    )
    assert rc == 0, err
    assert rc_close == 0, err_close
    assert not h.admin.status().paused
    # close-round ran while round 2 had no upload: it failed, and round 3 opened on resume.
    assert h.admin.wait_round(2).state == FAILED
    wait_for(lambda: h.admin.status().current_round == 3, what="round 3")

    # The operator's commands start without torch (it costs seconds per call).
    argv = [sys.executable, "-X", "importtime", "-m", "common.cli", "status", "--aggregator", target]
    result = subprocess.run(
        [*argv, "--admin-token-file", str(token)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line]
    assert "common.channel" in imported and "grpc" in imported  # it got as far as connecting
    assert not [m for m in imported if m == "torch" or m.startswith("torch.")]
