"""common.retry on a fake clock: full jitter under the exponential ceiling, the bounds, what is never retried;
and its users: common.errors.is_round_over, client.transfer.push resuming or giving the round up."""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import grpc
import pytest
import torch

from client.delta_stub import DeltaStub
from client.transfer import PUSH, RoundOver, StoredPayload, push
from common.codec import encode
from common.delta import Chunk, Codec, DeltaHeader, DeltaKind
from common.errors import is_round_over
from common.pb.gradualdiff.v1 import federation_pb2
from common.retry import Retrier, RetryPolicy

Code = grpc.StatusCode


class Failure(grpc.RpcError):
    """What a failed call raises: a status code and its details."""

    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class FakeTime:
    """A clock that moves only when slept on (or when a call is said to take time)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.slept.append(seconds)
        self.now += seconds


class Top(random.Random):
    """Jitter that always draws the ceiling: the waits are the ceilings themselves."""

    def uniform(self, a: float, b: float) -> float:
        return b


def retrier(time: FakeTime, policy: RetryPolicy, rng: random.Random | None = None) -> Retrier:
    return Retrier(policy, sleep=time.sleep, clock=time.clock, rng=rng or random.Random(0))


def failing(*codes: grpc.StatusCode, then: str = "done", takes: float = 0.0, time: FakeTime | None = None):
    """A call that fails with ``codes`` in turn, then returns ``then``; ``calls`` counts the tries."""
    left = list(codes)

    def call() -> str:
        call.calls += 1  # type: ignore[attr-defined]
        if time is not None:
            time.now += takes
        if left:
            raise Failure(left.pop(0), f"scripted {call.calls}")  # type: ignore[attr-defined]
        return then

    call.calls = 0  # type: ignore[attr-defined]
    return call


def test_a_retryable_failure_is_retried_until_the_call_succeeds(caplog: pytest.LogCaptureFixture) -> None:
    time = FakeTime()
    call = failing(Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED, Code.RESOURCE_EXHAUSTED)
    with caplog.at_level(logging.WARNING, logger="common.retry"):
        assert retrier(time, RetryPolicy()).call("join", call) == "done"
    assert call.calls == 4 and len(time.slept) == 3
    # One line per wait, naming the call, the code, the attempt and the delay.
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    for attempt, (line, delay) in enumerate(zip(lines, time.slept, strict=True), start=1):
        assert line.startswith("[join] ") and f"attempt {attempt} failed" in line and f"{delay:.1f}s" in line
    assert "UNAVAILABLE" in lines[0] and "RESOURCE_EXHAUSTED" in lines[2]


def test_waits_are_drawn_between_zero_and_an_exponential_ceiling() -> None:
    policy = RetryPolicy(first_delay=0.5, multiplier=2.0, max_delay=30.0, max_attempts=11, max_elapsed=1e9)
    ceilings = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    assert [policy.ceiling(k) for k in range(10)] == ceilings
    assert policy.ceiling(10_000) == 30.0  # no overflow however long it goes on

    top = FakeTime()
    with pytest.raises(Failure):
        retrier(top, policy, Top()).call("fetch", failing(*[Code.UNAVAILABLE] * 11))
    assert top.slept == ceilings

    # Full jitter: each wait anywhere in [0, ceiling], so many sites do not come back in step.
    draws: list[list[float]] = []
    for seed in range(200):
        time = FakeTime()
        with pytest.raises(Failure):
            retrier(time, policy, random.Random(seed)).call("fetch", failing(*[Code.UNAVAILABLE] * 11))
        assert all(0 <= wait <= ceiling for wait, ceiling in zip(time.slept, ceilings, strict=True))
        draws.append(time.slept)
    for k, ceiling in enumerate(ceilings):
        column = [waits[k] for waits in draws]
        assert min(column) < 0.1 * ceiling and max(column) > 0.9 * ceiling


def test_the_total_wait_is_bounded_and_the_last_wait_shortened_to_fit() -> None:
    time = FakeTime()
    start = time.now
    policy = RetryPolicy(first_delay=1.0, max_delay=4.0, max_elapsed=20.0)
    call = failing(*[Code.UNAVAILABLE] * 100, takes=0.5, time=time)
    with pytest.raises(Failure):
        retrier(time, policy, Top()).call("await", call)
    # Each try takes 0.5 s; waits 1, 2, 4, 4, ... and the last one cut to end at the bound, which
    # counts from the first failure (0.5 s in): the last try starts at the bound, and fails.
    assert time.slept[:3] == [1.0, 2.0, 4.0]
    assert time.now - start == pytest.approx(0.5 + 20.0 + 0.5)
    assert sum(time.slept) + 0.5 * call.calls == pytest.approx(21.0)
    assert max(time.slept) <= 4.0


def test_the_bound_counts_from_the_first_failure_not_from_a_long_first_try() -> None:
    # An upload that streamed for an hour before its link dropped still gets its whole allowance.
    time = FakeTime()
    tries: list[float] = []

    def call() -> str:
        tries.append(time.now)
        if len(tries) == 1:
            time.now += 3600.0
        if len(tries) < 4:
            raise Failure(Code.UNAVAILABLE)
        return "done"

    assert retrier(time, RetryPolicy(max_elapsed=60.0)).call("upload", call) == "done"
    assert len(tries) == 4


def test_progress_between_failures_starts_the_bounds_again() -> None:
    time = FakeTime()
    policy = RetryPolicy(first_delay=1.0, max_delay=1.0, max_attempts=3, max_elapsed=1e9)
    done = [0]
    plan = iter([True, False] * 4 + [False] * 5)

    def call() -> str:
        moved = next(plan)
        if moved:
            done[0] += 1  # the call got somewhere (a delta applied, an offset committed) before failing
        raise Failure(Code.UNAVAILABLE)

    with pytest.raises(Failure):
        retrier(time, policy, Top()).call("fetch", call, progress=lambda: done[0])
    # Each try that moved things on started the count of three again; the third in a row without ends it.
    assert time.slept == [1.0] * 8


def test_a_code_that_may_mean_never_gets_a_few_tries_however_long_the_bound() -> None:
    # RESOURCE_EXHAUSTED: a busy aggregator, or an upload over one of its limits (LimitExceeded).
    time = FakeTime()
    policy = RetryPolicy(max_elapsed=1e9)
    call = failing(*[Code.RESOURCE_EXHAUSTED] * 100)
    with pytest.raises(Failure) as info:
        retrier(time, policy).call("upload", call)
    assert info.value.code() is Code.RESOURCE_EXHAUSTED
    assert call.calls == policy.limited_attempts and len(time.slept) == policy.limited_attempts - 1
    # Other codes in between do not reset the count of tries of a limited one.
    mixed = failing(*[Code.RESOURCE_EXHAUSTED, Code.UNAVAILABLE] * 50)
    with pytest.raises(Failure):
        retrier(FakeTime(), policy).call("upload", mixed)
    assert mixed.calls == 2 * policy.limited_attempts - 1


def test_max_attempts_bounds_the_tries() -> None:
    time = FakeTime()
    call = failing(*[Code.UNAVAILABLE] * 10)
    with pytest.raises(Failure):
        retrier(time, RetryPolicy(max_attempts=3)).call("upload", call)
    assert call.calls == 3 and len(time.slept) == 2


@pytest.mark.parametrize(
    "code",
    [Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION, Code.PERMISSION_DENIED, Code.NOT_FOUND, Code.ABORTED],
)
def test_a_code_the_policy_does_not_retry_is_raised_at_once(code: grpc.StatusCode) -> None:
    time = FakeTime()
    call = failing(code)
    with pytest.raises(Failure) as info:
        retrier(time, RetryPolicy()).call("join", call)
    assert info.value.code() is code and call.calls == 1 and time.slept == []


def test_an_error_that_is_not_a_failed_call_is_raised_at_once() -> None:
    time = FakeTime()

    def broken() -> None:
        raise ValueError("not a call failure")

    with pytest.raises(ValueError):
        retrier(time, RetryPolicy()).call("fetch", broken)
    assert time.slept == []


def test_a_stopped_worker_stops_retrying() -> None:
    time = FakeTime()
    retry = Retrier(
        RetryPolicy(),
        sleep=time.sleep,
        clock=time.clock,
        rng=random.Random(0),
        stopped=lambda: bool(time.slept),
    )
    call = failing(*[Code.UNAVAILABLE] * 10)
    with pytest.raises(Failure):
        retry.call("await", call)
    assert call.calls == 1 and len(time.slept) == 1  # stopped during the first wait: no second try


@pytest.mark.parametrize(
    "settings",
    [
        {"max_attempts": 0, "max_elapsed": float("inf")},
        {"first_delay": 0.0},
        {"first_delay": 5.0, "max_delay": 1.0},
        {"multiplier": 0.5},
        {"max_elapsed": 0.0},
    ],
)
def test_a_policy_that_could_loop_forever_or_makes_no_sense_is_refused(settings: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**settings)  # type: ignore[arg-type]


# ---------------------------------------------------------------- is_round_over


def test_a_round_is_over_by_status_code_whatever_the_message() -> None:
    assert is_round_over(Failure(Code.ABORTED, "round 3 is aggregating; it takes no more uploads"))
    assert is_round_over(Failure(Code.ABORTED, ""))
    assert not is_round_over(Failure(Code.UNAVAILABLE, "the round closed"))
    assert not is_round_over(Failure(Code.FAILED_PRECONDITION, "header.round is 2; the open round is 3"))
    assert not is_round_over(grpc.RpcError())  # a bare error carries no status


# ---------------------------------------------------------------- push


class FakeStub:
    """PushDelta and GetUploadOffset of an aggregator that fails as scripted and keeps what it received."""

    def __init__(self, push_failures: list[Failure], committed: int = 0, complete: bool = False) -> None:
        self.push_failures = push_failures
        self.committed, self.complete = committed, complete
        self.starts: list[int] = []
        self.offset_asks = 0

    def PushDelta(self, messages: Iterator[Chunk], **kw: object) -> federation_pb2.PushReceipt:
        chunks = list(messages)
        self.starts.append(chunks[0].offset)
        if self.push_failures:
            raise self.push_failures.pop(0)
        assert chunks[-1].last
        return federation_pb2.PushReceipt(upload_id="u", round=1, accepted=True)

    def GetUploadOffset(self, request: federation_pb2.UploadOffsetRequest, **kw: object) -> object:
        self.offset_asks += 1
        return federation_pb2.UploadOffsetReply(committed_offset=self.committed, complete=self.complete)


@pytest.fixture
def upload(tmp_path: Path) -> tuple[DeltaHeader, StoredPayload]:
    sink = io.BytesIO()
    layout = encode({"w": torch.randn(40_000, generator=torch.Generator().manual_seed(0))}, Codec(), sink)
    header = DeltaHeader(
        spec=layout.spec, run_id="run", round=1, base_round=0, site_id="a", upload_id="u", kind=DeltaKind.DIFF
    )
    payload = tmp_path / "u.payload"
    payload.write_bytes(sink.getvalue())
    return header, StoredPayload(payload, layout)


def _push(
    stub: FakeStub, upload: tuple[DeltaHeader, StoredPayload], time: FakeTime
) -> federation_pb2.PushReceipt:
    retry = Retrier(PUSH, sleep=time.sleep, clock=time.clock, rng=random.Random(0))
    return push(cast(DeltaStub, stub), (), *upload, retrier=retry)


def test_a_broken_push_resumes_from_the_offset_the_aggregator_holds(
    upload: tuple[DeltaHeader, StoredPayload],
) -> None:
    time = FakeTime()
    stub = FakeStub([Failure(Code.UNAVAILABLE), Failure(Code.INTERNAL)], committed=4096)
    assert _push(stub, upload, time).accepted
    assert stub.starts == [0, 4096, 4096] and stub.offset_asks == 2 and len(time.slept) == 2


def test_a_push_the_aggregator_already_holds_whole_is_a_duplicate(
    upload: tuple[DeltaHeader, StoredPayload],
) -> None:
    stub = FakeStub([Failure(Code.UNAVAILABLE)], complete=True)
    receipt = _push(stub, upload, FakeTime())
    assert receipt.accepted and receipt.duplicate and stub.starts == [0]


@pytest.mark.parametrize(
    "failure",
    [
        Failure(Code.ABORTED, "round 1 is aggregating; it takes no more uploads"),  # no "closed" in it
        Failure(Code.ABORTED, "round 1 closed before upload 'u' finished"),
        Failure(Code.FAILED_PRECONDITION, "header.round is 1; the open round is 2"),
    ],
)
def test_a_push_into_a_round_that_is_over_gives_the_round_up_at_once(
    upload: tuple[DeltaHeader, StoredPayload], failure: Failure
) -> None:
    time = FakeTime()
    stub = FakeStub([failure])
    with pytest.raises(RoundOver):
        _push(stub, upload, time)
    assert stub.starts == [0] and time.slept == []


def test_a_push_gives_up_once_the_aggregator_is_away_for_longer_than_the_bound(
    upload: tuple[DeltaHeader, StoredPayload],
) -> None:
    time = FakeTime()
    stub = FakeStub([Failure(Code.UNAVAILABLE)] * 1000)
    with pytest.raises(Failure):
        _push(stub, upload, time)
    assert time.now - 1000.0 == pytest.approx(PUSH.max_elapsed)
    assert len(stub.starts) > 10 and max(time.slept) <= PUSH.max_delay


def test_a_push_that_moves_on_between_failures_is_not_given_up(
    upload: tuple[DeltaHeader, StoredPayload],
) -> None:
    # Each resume finds more committed: the time bound starts again at each failure after it.
    time = FakeTime()

    class Slow(FakeStub):
        def PushDelta(self, messages: Iterator[Chunk], **kw: object) -> federation_pb2.PushReceipt:
            time.now += PUSH.max_elapsed  # each try streams for as long as the whole bound
            return super().PushDelta(messages, **kw)

        def GetUploadOffset(self, request: federation_pb2.UploadOffsetRequest, **kw: object) -> object:
            self.committed += 1024
            return super().GetUploadOffset(request, **kw)

    stub = Slow([Failure(Code.UNAVAILABLE)] * 5)
    assert _push(stub, upload, time).accepted
    assert stub.starts == [0, 1024, 2048, 3072, 4096, 5120]


def test_a_push_started_by_an_earlier_process_asks_where_it_stands_first(
    upload: tuple[DeltaHeader, StoredPayload],
) -> None:
    stub = FakeStub([], committed=8192)
    retry = Retrier(PUSH, sleep=FakeTime().sleep, rng=random.Random(0))
    receipt = push(cast(DeltaStub, stub), (), *upload, retrier=retry, resume=True)
    assert receipt.accepted and stub.offset_asks == 1 and stub.starts == [8192]
