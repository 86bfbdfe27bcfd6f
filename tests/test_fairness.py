"""Fair share against a real aggregator: one site's idle streams and long polls cannot take the
threads that the others' heartbeats and the health check need."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.pb.gradualdiff.v1 import delta_pb2, federation_pb2, federation_pb2_grpc
from tests.scripted import MakeHarness, harnesses, wait_for

HOG_CALLS = 70  # more than the 64 threads the daemon's pool had before fair share


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[MakeHarness]:
    with harnesses(tmp_path) as make:
        yield make


def _idle(stop: threading.Event) -> Iterator[delta_pb2.DeltaChunk]:
    """A PushDelta request stream that sends nothing until ``stop`` (then ends)."""
    stop.wait(60)
    return
    yield  # a generator


@pytest.mark.slow
def test_one_sites_idle_streams_and_polls_starve_no_one(harness: MakeHarness) -> None:
    h = harness({"hog": 10, "honest": 10})
    h.join_all(beat=False)
    hog, honest = h["hog"], h["honest"]
    stop = threading.Event()
    # Separate channels: HTTP/2 may cap the streams of one connection, and the test is about threads.
    push_channel = grpc.insecure_channel(h.agg.target)
    poll_channel = grpc.insecure_channel(h.agg.target)
    pushes = federation_pb2_grpc.FederationStub(push_channel)
    polls = federation_pb2_grpc.FederationStub(poll_channel)
    calls: list[Any] = []  # grpc futures
    try:
        for _ in range(HOG_CALLS):
            calls.append(pushes.PushDelta.future(_idle(stop), metadata=hog.metadata, timeout=60))
            calls.append(
                polls.AwaitRound.future(
                    federation_pb2.AwaitRoundRequest(site_id="hog", after_round=999, wait_ms=60_000),
                    metadata=hog.metadata,
                    timeout=60,
                )
            )
        refused = wait_for(
            lambda: (n := sum(c.done() for c in calls)) >= 2 * (HOG_CALLS - 2) and n,
            timeout=30,
            what="the hog's extra calls refused",
        )
        assert refused == 2 * (HOG_CALLS - 2)  # two of each kind still held
        for call in (c for c in calls if c.done()):
            exc = call.exception()
            assert isinstance(exc, grpc.RpcError) and exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, exc
            assert "per site" in (exc.details() or "") and "retry in" in (exc.details() or ""), (
                exc.details() or ""
            )
        # The hog holds its share; the honest site's beats and the health check answer at once.
        with grpc.insecure_channel(h.agg.target) as channel:
            checker = health_pb2_grpc.HealthStub(channel)
            for _ in range(10):
                started = time.monotonic()
                assert honest.beat().directive == federation_pb2.DIRECTIVE_CONTINUE
                answer = checker.Check(health_pb2.HealthCheckRequest(), timeout=2)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
                assert time.monotonic() - started < 1.0
        # The honest site's own long calls are not counted against the hog's.
        assert honest.fetch(have=0, snapshot=True)
        assert honest.await_round(after=0, wait_ms=0).round >= 0
    finally:
        stop.set()
        for call in calls:
            call.cancel()
        push_channel.close()
        poll_channel.close()


def test_the_total_of_long_calls_is_bounded_and_named(harness: MakeHarness) -> None:
    h = harness({"a": 10, "b": 10, "c": 10}, max_long_calls=2)
    h.join_all(beat=False)

    def hold(s: str) -> grpc.Future[federation_pb2.RoundSpec]:
        return h[s].stub.AwaitRound.future(
            federation_pb2.AwaitRoundRequest(site_id=s, after_round=999, wait_ms=30_000),
            metadata=h[s].metadata,
            timeout=40,
        )

    held = [hold(s) for s in "ab"]

    def c_refused() -> grpc.RpcError | None:
        # A held poll that came while one of c's probes held a slot was refused itself: again.
        for i, s in enumerate("ab"):
            if held[i].done():
                held[i] = hold(s)
                return None
        return _refused(h["c"])

    try:
        exc = wait_for(c_refused, timeout=10, what="c refused once a and b wait")
        assert exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_long_calls = 2" in (exc.details() or "") and "retry in" in (exc.details() or ""), (
            exc.details() or ""
        )
    finally:
        for call in held:
            call.cancel()
    # Once the others' polls end, c's goes through.
    wait_for(lambda: _refused(h["c"]) is None or None, timeout=10, what="c served again")


def _refused(site: object) -> grpc.RpcError | None:
    try:
        site.await_round(after=0, wait_ms=0)  # type: ignore[attr-defined]
    except grpc.RpcError as exc:
        return exc
    return None
