"""The real daemon (`gdfed serve`) killed and restarted under running uploads.

The daemon runs as a subprocess on a TOML config; scripted sites talk to it
over gRPC. SIGKILL gives it no chance to clean up: what survives is what it
made durable (SQLite records, fsynced spools). The final global state must
be bit-identical to an uninterrupted in-process run of the same uploads in
the same order, and an acknowledged upload must count exactly once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from common.delta import MIB, DeltaHeader
from common.pb.gradualdiff.v1 import delta_pb2, federation_pb2
from tests.scripted import (
    AdminClient,
    Daemon,
    Harness,
    Payload,
    ScriptedSite,
    State,
    assert_same_bits,
    free_port,
    random_delta,
    wait_for,
    write_daemon_config,
    write_state,
)

pytestmark = pytest.mark.slow

SAMPLES = {"a": 10, "b": 30}
SHARD = 4 * MIB


def _init() -> State:
    # 14 MB of fp32: an upload is ~12 MB in 4 MiB shards, so a commit happens mid-stream.
    gen = torch.Generator().manual_seed(7)
    return {
        "blocks.0.weight": torch.randn(2500, 1000, generator=gen) * 0.02,
        "blocks.1.weight": torch.randn(1000, 1000, generator=gen) * 0.02,
        "norm.weight": torch.ones(1000),
    }


@pytest.fixture(scope="module")
def init() -> State:
    return _init()


@pytest.fixture(scope="module")
def deltas(init: State) -> dict[str, State]:
    return {"a": random_delta(1, init), "b": random_delta(2, init)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, init: State, deltas: dict[str, State]) -> State:
    """The state an uninterrupted in-process aggregator publishes for a's then b's upload."""
    h = Harness(tmp_path_factory.mktemp("reference"), SAMPLES, init=init)
    try:
        h.join_all()
        for name in ("a", "b"):
            head, payload = h[name].header(deltas[name], round=1, base=0, shard_bytes=SHARD)
            receipt = h[name].push(head, payload, chunk_bytes=MIB)
            assert receipt.accepted and not receipt.duplicate
        assert h.admin.wait_round(1, timeout=60).state == federation_pb2.ROUND_STATE_PUBLISHED
        number, state = h["a"].snapshot()
        assert number == 1
        return state
    finally:
        h.close()


class Run:
    """A daemon on a fresh state directory, two scripted sites and an admin client."""

    def __init__(self, tmp: Path, init: State) -> None:
        port = free_port()
        self.target = f"127.0.0.1:{port}"
        config = write_daemon_config(
            tmp / "gdfed.toml",
            port=port,
            init_state=write_state(tmp / "init.safetensors", init),
            sites=list(SAMPLES),
        )
        self.daemon = Daemon(config, tmp / "daemon.log")
        self.sites = {name: ScriptedSite(self.target, name, n) for name, n in SAMPLES.items()}
        self.admin = AdminClient(self.target)

    def start(self) -> None:
        self.daemon.start(self.target)
        for site in self.sites.values():
            site.ready()

    def restart_after_kill(self) -> None:
        self.daemon.kill()
        self.start()

    def close(self) -> None:
        for site in self.sites.values():
            site.close()
        self.admin.close()
        self.daemon.cleanup()


@pytest.fixture
def run(tmp_path: Path, init: State) -> Iterator[Run]:
    r = Run(tmp_path, init)
    try:
        yield r
    finally:
        r.close()
        print(r.daemon.log())  # shown by pytest only when the test failed


class Cut:
    """An upload's 1 MiB chunks (cut at shard ends too), and where the daemon's first commit lands."""

    def __init__(self, site: ScriptedSite, head: DeltaHeader, payload: Payload) -> None:
        self.messages = list(site.chunks(head, payload, chunk_bytes=MIB))
        self.ends = [m.offset + len(m.data) for m in self.messages]
        self.shard_ends = payload.layout.shard_offsets()[1:]
        self.commit = next(i for i, end in enumerate(self.ends) if end >= 8 * MIB and end in self.shard_ends)

    @property
    def committed(self) -> int:
        """The offset of the first commit: the first shard end at or past 8 MiB (server.uploads)."""
        return self.ends[self.commit]


def _half_stream(
    site: ScriptedSite, messages: list[delta_pb2.DeltaChunk]
) -> tuple[grpc.Future[federation_pb2.PushReceipt], threading.Event]:
    """Stream ``messages`` (the first chunks of an upload), then hold the stream open until the event is set."""
    release = threading.Event()

    def paused() -> Iterator[delta_pb2.DeltaChunk]:
        yield from messages
        release.wait(60)

    return site.stub.PushDelta.future(paused(), metadata=site.metadata, timeout=120), release


def _end(future: grpc.Future[federation_pb2.PushReceipt], release: threading.Event) -> None:
    """Let a half-streamed call end; it failed (the daemon went away under it)."""
    release.set()
    with pytest.raises(grpc.RpcError):
        future.result(timeout=30)


def test_sigkill_mid_round_restarts_into_the_same_round(
    run: Run, deltas: dict[str, State], reference: State
) -> None:
    a, b = run.sites["a"], run.sites["b"]
    run.start()
    for site in (a, b):
        site.join()
        site.start_beating()
    head_a, payload_a = a.header(deltas["a"], round=1, base=0, shard_bytes=SHARD)
    receipt = a.push(head_a, payload_a, chunk_bytes=MIB)
    assert receipt.accepted and not receipt.duplicate
    assert run.admin.round(1).bytes_in == len(payload_a)

    # Crash 1: after one accepted upload.
    run.restart_after_kill()
    time.sleep(1.0)  # several ticks: the sites, beating again, must not be dropped for the daemon's downtime
    status = run.admin.round(1)
    assert status.state == federation_pb2.ROUND_STATE_COLLECTING, (status.close_reason, status.failure_reason)
    parts = {p.site_id: p for p in status.participants}
    assert parts["a"].accepted and not parts["b"].accepted and not parts["b"].dropped
    assert (status.bytes_in, a.offset(head_a.upload_id).complete) == (len(payload_a), True)

    # Crash 2: while b's upload is half-streamed, past its first commit.
    head_b, payload_b = b.header(deltas["b"], round=1, base=0, shard_bytes=SHARD)
    assert len(payload_b) > 10 * MIB
    cut = Cut(b, head_b, payload_b)
    # The commit lies at the end of a shard past the first: the resumed stream brings the shards
    # after it, and the daemon must know the first ones from what it recorded with the offset (their
    # specs came with chunks that are not sent again).
    assert cut.shard_ends[0] < cut.committed < len(payload_b), (cut.shard_ends, cut.committed)
    # One chunk past the commit: received, perhaps, but never committed; the resume sends it again.
    future, release = _half_stream(b, cut.messages[: cut.commit + 2])
    wait_for(
        lambda: b.offset(head_b.upload_id).committed_offset == cut.committed,
        timeout=30,
        what="the first commit",
    )
    run.daemon.kill()
    _end(future, release)
    run.start()

    assert b.offset(head_b.upload_id).committed_offset == cut.committed  # fsynced before it was recorded
    again = a.push(head_a, payload_a, chunk_bytes=MIB)  # a never saw its receipt, say: it sends again
    assert again.accepted and again.duplicate
    # Each shard of b folds once: its first two from the spool when the stream resumes, the rest as
    # they arrive; a shard folded twice or not at all would change the published bits below.
    receipt = b.push(head_b, payload_b, start=cut.committed, chunk_bytes=MIB)
    assert receipt.accepted and not receipt.duplicate and receipt.bytes_received == len(payload_b)

    status = run.admin.wait_round(1, timeout=60)
    assert status.state == federation_pb2.ROUND_STATE_PUBLISHED, status.failure_reason
    assert status.samples == 40  # a's upload counted once, across two restarts and a resend
    assert status.bytes_in == len(payload_a) + len(payload_b)
    assert sorted(p.site_id for p in status.participants if p.accepted) == ["a", "b"]
    number, state = a.snapshot()
    assert number == 1
    assert_same_bits(state, reference)

    # SIGTERM: a clean exit, at once when nothing is streaming.
    for site in (a, b):
        site.stop_beating()
    started = time.monotonic()
    assert run.daemon.terminate(timeout=15) == 0
    assert time.monotonic() - started < 5


def test_sigterm_commits_a_half_streamed_upload(run: Run, deltas: dict[str, State], reference: State) -> None:
    a, b = run.sites["a"], run.sites["b"]
    run.start()
    for site in (a, b):
        site.join()
        site.start_beating()
    head_a, payload_a = a.header(deltas["a"], round=1, base=0, shard_bytes=SHARD)
    assert a.push(head_a, payload_a, chunk_bytes=MIB).accepted

    head_b, payload_b = b.header(deltas["b"], round=1, base=0, shard_bytes=SHARD)
    cut = Cut(b, head_b, payload_b)
    future, release = _half_stream(b, cut.messages[: cut.commit + 2])
    wait_for(
        lambda: b.offset(head_b.upload_id).committed_offset == cut.committed,
        timeout=30,
        what="the first commit",
    )
    time.sleep(0.3)  # the chunk after the commit lands
    started = time.monotonic()
    # The daemon waits out its grace period (5 s) for the stream, then cuts it and exits.
    assert run.daemon.terminate(timeout=20) == 0
    assert time.monotonic() - started < 12
    _end(future, release)

    run.start()
    # The break committed everything received, into the shard after the committed one.
    assert b.offset(head_b.upload_id).committed_offset == cut.ends[cut.commit + 1]
    receipt = b.push(head_b, payload_b, start=cut.ends[cut.commit + 1], chunk_bytes=MIB)
    assert receipt.accepted and not receipt.duplicate
    status = run.admin.wait_round(1, timeout=60)
    assert status.state == federation_pb2.ROUND_STATE_PUBLISHED, status.failure_reason
    assert status.samples == 40
    _, state = a.snapshot()
    assert_same_bits(state, reference)


def test_sigkill_mid_upload_over_a_recycled_spool_file(
    run: Run, tmp_path_factory: pytest.TempPathFactory, init: State, deltas: dict[str, State]
) -> None:
    """Round 2's uploads are written over round 1's spool files (other bytes, about the same size).

    Killed past b's first commit, restarted, resumed: the published state must
    still be bit-identical to an uninterrupted run, so nothing of the old file
    beyond the committed offset may reach the sum.
    """
    second = {"a": random_delta(3, init), "b": random_delta(4, init)}
    h = Harness(tmp_path_factory.mktemp("reference2"), SAMPLES, init=init)
    try:
        h.join_all()
        for number, batch in ((1, deltas), (2, second)):
            for name in ("a", "b"):
                head, payload = h[name].header(batch[name], round=number, base=number - 1, shard_bytes=SHARD)
                assert h[name].push(head, payload, chunk_bytes=MIB).accepted
            assert h.admin.wait_round(number, timeout=60).state == federation_pb2.ROUND_STATE_PUBLISHED
        reference = h["a"].snapshot()[1]
    finally:
        h.close()

    a, b = run.sites["a"], run.sites["b"]
    run.start()
    for site in (a, b):
        site.join()
        site.start_beating()
    for name in ("a", "b"):
        head, payload = run.sites[name].header(deltas[name], round=1, base=0, shard_bytes=SHARD)
        assert run.sites[name].push(head, payload, chunk_bytes=MIB).accepted
    assert run.admin.wait_round(1, timeout=60).state == federation_pb2.ROUND_STATE_PUBLISHED
    recycled = run.daemon.config.parent / "state" / "spool" / "recycled"
    wait_for(
        lambda: len(list(recycled.glob("*.spent"))) == 2, timeout=30, what="round 1's spool files recycled"
    )

    head_a, payload_a = a.header(second["a"], round=2, base=1, shard_bytes=SHARD)
    assert a.push(head_a, payload_a, chunk_bytes=MIB).accepted
    assert len(list(recycled.glob("*.spent"))) == 1  # a's upload took one over
    head_b, payload_b = b.header(second["b"], round=2, base=1, shard_bytes=SHARD)
    cut = Cut(b, head_b, payload_b)
    future, release = _half_stream(b, cut.messages[: cut.commit + 1])
    wait_for(
        lambda: b.offset(head_b.upload_id).committed_offset == cut.committed,
        timeout=30,
        what="the first commit",
    )
    assert not list(recycled.glob("*.spent"))  # and b's the other one
    run.daemon.kill()
    _end(future, release)
    run.start()

    receipt = b.push(head_b, payload_b, start=b.offset(head_b.upload_id).committed_offset, chunk_bytes=MIB)
    assert receipt.accepted and receipt.bytes_received == len(payload_b)
    status = run.admin.wait_round(2, timeout=60)
    assert status.state == federation_pb2.ROUND_STATE_PUBLISHED, status.failure_reason
    number, state = a.snapshot()
    assert number == 2
    assert_same_bits(state, reference)
    for site in (a, b):
        site.stop_beating()
