"""Scripted sites for integration tests: real gRPC calls and the common/ codec, no ML.

A ScriptedSite joins, waits for a round, fetches the global state, and
pushes a delta it is given, the way a worker would, but without a model.
``Aggregator`` runs the real server in-process on an ephemeral port;
``AdminClient`` is the operator's side and ``Watcher`` its event stream, the
way a test waits for something to happen (or shows that it did not) without
sleeping; ``Daemon`` runs ``gdfed serve`` as a subprocess (for crash tests).
Every round number a helper takes is a keyword (``round=``, ``base=``,
``after=``, ``have=``), so a call says which number is which. The helpers at the bottom compute, in torch,
what the aggregator must publish.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, TypeVar

import grpc
import numpy as np
import torch
from safetensors.torch import save_file

from common.channel import auth_metadata
from common.codec import DEFAULT_SHARD_BYTES, decode_chunks, encode, iter_chunks
from common.delta import Cast, Chunk, Codec, DeltaHeader, DeltaKind, PayloadLayout, UploadMetrics
from common.dtypes import DType
from common.pb.gradualdiff.v1 import admin_pb2, admin_pb2_grpc, delta_pb2, federation_pb2, federation_pb2_grpc
from common.serde import chunk_from_proto, chunk_to_proto
from server.app import create_server, shutdown
from server.config import RoundPolicy, ServerConfig
from tests.codec_helpers import bits, block_frame, rebuild, split_frames, unzstd

ADMIN_TOKEN = "admin-secret"
# Reconnect within a fraction of a second once a restarted aggregator listens again
# (gRPC's default backoff grows from 1 s to 120 s).
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 300),
]
ROOT = Path(__file__).resolve().parent.parent

T = TypeVar("T")
State = dict[str, torch.Tensor]


def token_of(site: str) -> str:
    return f"token-{site}"


def small_state(seed: int = 0, layers: int = 2, width: int = 32) -> State:
    gen = torch.Generator().manual_seed(seed)
    state = {"embed.weight": torch.randn(50, width, generator=gen) * 0.02}
    for i in range(layers):
        state[f"layers.{i}.q.weight"] = torch.randn(width, width, generator=gen) * 0.02
        state[f"layers.{i}.norm.weight"] = torch.ones(width)
    return state


def write_state(path: Path, state: Mapping[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def make_config(
    tmp: Path, sites: Sequence[str], *, init: Mapping[str, torch.Tensor] | None = None, **overrides: object
) -> ServerConfig:
    """A config for an in-process aggregator in ``tmp``; ``init`` is the round-0 state (small_state())."""
    path = write_state(tmp / "init.safetensors", small_state() if init is None else init)
    base = ServerConfig(
        listen="127.0.0.1:0",
        state_dir=tmp / "state",
        init_state=path,
        run_id="test-run",
        site_tokens={s: token_of(s) for s in sites},
        admin_token=ADMIN_TOKEN,
        heartbeat_interval_s=0.5,
        missed_beats=3,
        tick_s=0.05,
        round=RoundPolicy(),
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


def wait_for(
    predicate: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> T:
    """Poll until ``predicate()`` is truthy and return it; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


@dataclass
class Aggregator:
    """A running aggregator for one test (in-process, real gRPC on an ephemeral port)."""

    config: ServerConfig
    server: grpc.Server = field(init=False)
    port: int = field(init=False)

    def __post_init__(self) -> None:
        self.server, self.port, self.coordinator = create_server(self.config)
        self._stopped = False

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            shutdown(self.server, self.coordinator, grace=1.0)

    def __enter__(self) -> Aggregator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Payload(bytes):
    """An encoded payload's bytes with the layout the encoder returned for them.

    Wire revision 2 sends the shard specs with the chunks, so pushing a payload needs its layout;
    a test that tampers with the bytes keeps them as ``Payload(tampered, payload.layout)``.
    """

    layout: PayloadLayout

    def __new__(cls, data: bytes, layout: PayloadLayout) -> Payload:
        made = super().__new__(cls, data)
        made.layout = layout
        return made


def layout_of(payload: bytes, layout: PayloadLayout | None = None) -> PayloadLayout:
    """``layout``, else the one a ``Payload`` carries."""
    if layout is not None:
        return layout
    if not isinstance(payload, Payload):
        raise TypeError("a payload of plain bytes needs its layout (pass layout=)")
    return payload.layout


class ScriptedSite:
    """A site driven by the test, over real gRPC."""

    def __init__(self, target: str, site_id: str, samples: int = 10, token: str | None = None) -> None:
        self.site_id = site_id
        self.samples = samples
        self.channel = grpc.insecure_channel(target, options=FAST_RECONNECT)
        self.stub = federation_pb2_grpc.FederationStub(self.channel)
        self.metadata = auth_metadata(token if token is not None else token_of(site_id))
        self.run_id = ""
        self.fetched_bytes: list[int] = []  # the payload size of each delta of the latest fetch
        self._beating: threading.Event | None = None
        self._beat_thread: threading.Thread | None = None

    def close(self) -> None:
        self.stop_beating()
        self.channel.close()

    def ready(self, timeout: float = 30.0) -> None:
        """Wait until the channel is connected (after an aggregator restart)."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def __enter__(self) -> ScriptedSite:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def join(self, held_round: int = 0) -> federation_pb2.JoinReply:
        reply = self.stub.Join(
            federation_pb2.JoinRequest(
                site_id=self.site_id,
                capabilities=federation_pb2.Capabilities(num_samples=self.samples),
                held_round=held_round,
            ),
            metadata=self.metadata,
            timeout=10,
        )
        self.run_id = reply.run_id
        return reply

    def beat(self, *, round: int = 0, phase: int = 1) -> federation_pb2.HeartbeatReply:
        return self.stub.Heartbeat(
            federation_pb2.HeartbeatRequest(
                site_id=self.site_id, round=round, phase=federation_pb2.Phase.ValueType(phase)
            ),
            metadata=self.metadata,
            timeout=10,
        )

    def start_beating(self, interval: float = 0.1) -> None:
        """Heartbeat from a background thread until stop_beating(); errors (server down) are ignored."""
        if self._beating is not None:
            return
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                with contextlib.suppress(grpc.RpcError):
                    self.stub.Heartbeat(
                        federation_pb2.HeartbeatRequest(
                            site_id=self.site_id, phase=federation_pb2.PHASE_IDLE
                        ),
                        metadata=self.metadata,
                        timeout=2,
                    )
                stop.wait(interval)

        self._beating = stop
        self._beat_thread = threading.Thread(target=loop, name=f"beat-{self.site_id}", daemon=True)
        self._beat_thread.start()

    def stop_beating(self) -> None:
        if self._beating is not None and self._beat_thread is not None:
            self._beating.set()
            self._beat_thread.join(timeout=5)
        self._beating = None
        self._beat_thread = None

    def await_round(self, *, after: int, wait_ms: int = 10_000) -> federation_pb2.RoundSpec:
        """The round after round ``after`` (AwaitRound's long poll)."""
        return self.stub.AwaitRound(
            federation_pb2.AwaitRoundRequest(site_id=self.site_id, after_round=after, wait_ms=wait_ms),
            metadata=self.metadata,
            timeout=wait_ms / 1000 + 5,
        )

    def fetch(self, *, have: int, snapshot: bool = False) -> list[tuple[DeltaHeader, State]]:
        """Every delta of the FetchDiff stream for a site holding round ``have``, decoded (and the
        payload size of each in ``fetched_bytes``)."""
        stream = self.stub.FetchDiff(
            federation_pb2.FetchDiffRequest(site_id=self.site_id, have_round=have, snapshot=snapshot),
            metadata=self.metadata,
            timeout=60,
        )
        out = []
        current: list[Chunk] = []
        self.fetched_bytes = []
        for msg in stream:
            chunk = chunk_from_proto(msg)
            if chunk.header is not None and current:
                out.append(decode_chunks(current))
                current = []
            if chunk.header is not None:
                self.fetched_bytes.append(0)
            self.fetched_bytes[-1] += len(chunk.data)
            current.append(chunk)
        if current:
            out.append(decode_chunks(current))
        return out

    def snapshot(self) -> tuple[int, State]:
        """The latest published round and its whole state (FetchDiff with snapshot=true)."""
        [(head, state)] = self.fetch(have=0, snapshot=True)
        assert head.kind is DeltaKind.SNAPSHOT
        return head.round, state

    def header(
        self,
        delta: Mapping[str, torch.Tensor],
        *,
        round: int,
        base: int,
        codec: Codec | None = None,
        upload_id: str | None = None,
        samples: int | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        metrics: UploadMetrics | None = None,
    ) -> tuple[DeltaHeader, Payload]:
        """``delta`` encoded as an upload for round ``round``, trained from round ``base``'s state."""
        sink = io.BytesIO()
        layout = encode(delta, codec or Codec(), sink, shard_bytes=shard_bytes)
        header = DeltaHeader(
            spec=layout.spec,
            run_id=self.run_id,
            round=round,
            site_id=self.site_id,
            upload_id=upload_id or f"{self.site_id}-{uuid.uuid4().hex[:8]}",
            sample_count=self.samples if samples is None else samples,
            base_round=base,
            kind=DeltaKind.DIFF,
            metrics=metrics or UploadMetrics(train_loss=1.0, eval_loss=2.0, steps=1),
        )
        return header, Payload(sink.getvalue(), layout)

    def chunks(
        self,
        header: DeltaHeader,
        payload: bytes,
        start: int = 0,
        chunk_bytes: int = 64 * 1024,
        *,
        layout: PayloadLayout | None = None,
    ) -> Iterator[delta_pb2.DeltaChunk]:
        """The PushDelta messages of ``payload`` (a ``Payload``, or bytes with their ``layout``)."""
        source = io.BytesIO(payload)
        for chunk in iter_chunks(
            header, layout_of(payload, layout), source, start=start, chunk_bytes=chunk_bytes
        ):
            yield chunk_to_proto(chunk)

    def push(
        self,
        header: DeltaHeader,
        payload: bytes,
        start: int = 0,
        chunk_bytes: int = 64 * 1024,
        *,
        layout: PayloadLayout | None = None,
    ) -> federation_pb2.PushReceipt:
        return self.push_messages(self.chunks(header, payload, start, chunk_bytes, layout=layout))

    def push_messages(self, messages: Iterator[delta_pb2.DeltaChunk]) -> federation_pb2.PushReceipt:
        receipt: federation_pb2.PushReceipt = self.stub.PushDelta(
            messages, metadata=self.metadata, timeout=60
        )
        return receipt

    def offset(self, upload_id: str) -> federation_pb2.UploadOffsetReply:
        return self.stub.GetUploadOffset(
            federation_pb2.UploadOffsetRequest(site_id=self.site_id, upload_id=upload_id),
            metadata=self.metadata,
            timeout=10,
        )


class AdminClient:
    """The operator's side: the Admin stub with the admin token (or another token, to be refused)."""

    def __init__(self, target: str, token: str = ADMIN_TOKEN) -> None:
        self.channel = grpc.insecure_channel(target, options=FAST_RECONNECT)
        self.stub = admin_pb2_grpc.AdminStub(self.channel)
        self.metadata = auth_metadata(token)
        self._watchers: list[Watcher] = []

    def close(self) -> None:
        for watcher in self._watchers:
            watcher.close()
        self.channel.close()

    def watch(self) -> Watcher:
        """A Watch stream that is receiving events when this returns (closed with this client)."""
        watcher = Watcher(self)
        self._watchers.append(watcher)
        return watcher

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def status(self) -> admin_pb2.RunStatus:
        return self.stub.GetStatus(admin_pb2.StatusRequest(), metadata=self.metadata, timeout=10)

    def round(self, number: int) -> admin_pb2.RoundStatus:
        return self.stub.GetRound(admin_pb2.GetRoundRequest(round=number), metadata=self.metadata, timeout=10)

    def rounds(self, limit: int = 0) -> list[admin_pb2.RoundStatus]:
        reply = self.stub.ListRounds(
            admin_pb2.ListRoundsRequest(limit=limit), metadata=self.metadata, timeout=10
        )
        return list(reply.rounds)

    def sites(self) -> dict[str, admin_pb2.SiteStatus]:
        reply = self.stub.ListSites(admin_pb2.ListSitesRequest(), metadata=self.metadata, timeout=10)
        return {s.site_id: s for s in reply.sites}

    def wait_round(self, number: int, *states: int, timeout: float = 20.0) -> admin_pb2.RoundStatus:
        """Round ``number``'s status once it is in one of ``states`` (default: published or failed)."""
        wanted = states or (federation_pb2.ROUND_STATE_PUBLISHED, federation_pb2.ROUND_STATE_FAILED)

        def ready() -> admin_pb2.RoundStatus | None:
            try:
                status = self.round(number)
            except grpc.RpcError as exc:
                if exc.code() is grpc.StatusCode.NOT_FOUND:
                    return None
                raise
            return status if status.state in wanted else None

        return wait_for(ready, timeout, 0.05, f"round {number} to reach {wanted}")


class Watcher:
    """The admin Watch stream, read by a thread into a list in the order the aggregator sent it.

    The aggregator emits its events under its lock, so their order is the order things happened
    in. A test shows that something did *not* happen before X by finding it after X, without a
    fixed sleep: ``w.first("upload_accepted", site="c") < w.first("round_closed", round=1)``
    says the round did not close before c's upload, however slowly the loop ran.
    """

    def __init__(self, admin: AdminClient, timeout: float = 10.0) -> None:
        self._events: list[admin_pb2.RunEvent] = []
        self._changed = threading.Condition()
        self._ended = False
        self._error: grpc.RpcError | None = None
        self._stream = admin.stub.Watch(admin_pb2.WatchRequest(), metadata=admin.metadata)
        self._thread = threading.Thread(target=self._pump, name="watch", daemon=True)
        self._thread.start()
        self._subscribed(admin, timeout)

    def _pump(self) -> None:
        try:
            for event in self._stream:
                with self._changed:
                    self._events.append(event)
                    self._changed.notify_all()
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.CANCELLED:
                self._error = exc
        finally:
            with self._changed:
                self._ended = True
                self._changed.notify_all()

    def _subscribed(self, admin: AdminClient, timeout: float) -> None:
        """Return once the aggregator sends this stream its events.

        The stream says nothing until something happens, so ask for an empty policy change: it
        changes nothing, and the aggregator announces it (``policy_changed``) to its watchers.
        """
        deadline = time.monotonic() + timeout
        while True:
            admin.stub.SetRoundPolicy(admin_pb2.SetRoundPolicyRequest(), metadata=admin.metadata, timeout=10)
            if self._wait(lambda: self._find("policy_changed", None, None), 0.2) is not None:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the Watch stream sent nothing within {timeout}s")

    def _find(self, kind: str, round: int | None, site: str | None) -> int | None:
        for i, event in enumerate(self._events):
            if event.kind == kind and round in (None, event.round) and site in (None, event.site_id):
                return i
        return None

    def _wait(self, found: Callable[[], int | None], timeout: float) -> int | None:
        with self._changed:
            self._changed.wait_for(lambda: found() is not None or self._ended, timeout)
            if self._error is not None:
                raise self._error
            return found()

    def first(
        self, kind: str, *, round: int | None = None, site: str | None = None, timeout: float = 20.0
    ) -> int:
        """The position of the first ``kind`` event (of that round and site, if given), once it has come."""
        index = self._wait(lambda: self._find(kind, round, site), timeout)
        if index is None:
            raise AssertionError(
                f"no {kind} event (round={round}, site={site}) within {timeout}s; saw {self.events}"
            )
        return index

    @property
    def events(self) -> list[tuple[str, int, str]]:
        """(kind, round, site_id) of every event so far, in order."""
        with self._changed:
            return [(e.kind, e.round, e.site_id) for e in self._events]

    def kinds(self) -> list[str]:
        return [kind for kind, _, _ in self.events]

    def close(self) -> None:
        self._stream.cancel()
        self._thread.join(timeout=5)


def rpc_code(call: Callable[[], object]) -> grpc.StatusCode:
    """The status code ``call`` fails with; AssertionError if it succeeds."""
    try:
        call()
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    raise AssertionError("the call succeeded; expected an error status")


def refusal(call: object) -> grpc.RpcError:
    """The RpcError ``call`` (a callable) fails with (a stream is read to its end); AssertionError if it succeeds."""
    try:
        result = call()  # type: ignore[operator]
        if isinstance(result, Iterator):
            list(result)
    except grpc.RpcError as exc:
        return exc
    raise AssertionError("the call succeeded; expected an error status")


def free_port() -> int:
    """A port that was free a moment ago (bind to 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_daemon_config(
    path: Path, *, port: int, init_state: Path, sites: Sequence[str], min_sites: int = 0, deadline_s: int = 0
) -> Path:
    """A TOML config for ``gdfed serve`` (keys as server.config_file.load_config reads them)."""
    lines = [
        f'listen = "127.0.0.1:{port}"',
        f'state_dir = "{path.parent / "state"}"',
        f'init_state = "{init_state}"',
        'run_id = "crash-run"',
        "heartbeat_interval_s = 0.5",
        "missed_beats = 3",
        "tick_s = 0.05",
        f'admin_token = "{ADMIN_TOKEN}"',
        "",
        "[round]",
        f"min_sites = {min_sites}",
        f"deadline_s = {deadline_s}",
        "",
        "[sites]",
        *(f'{site} = "{token_of(site)}"' for site in sites),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


class Daemon:
    """``gdfed serve --config FILE`` as a subprocess, its output in a log file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, target: str, timeout: float = 60.0) -> None:
        self._log = self.log_path.open("ab")
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "common.cli", "serve", "--config", str(self.config)],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        with grpc.insecure_channel(target) as channel:
            future = grpc.channel_ready_future(channel)
            deadline = time.monotonic() + timeout
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"the daemon exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    future.result(timeout=0.2)
                    break
                except grpc.FutureTimeoutError:
                    if time.monotonic() > deadline:
                        raise AssertionError(
                            f"the daemon did not listen within {timeout}s:\n{self.log()}"
                        ) from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-8000:]

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._close_log()

    def terminate(self, timeout: float) -> int:
        """SIGTERM and the exit code (AssertionError if it takes longer than ``timeout``)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the daemon did not exit within {timeout}s of SIGTERM:\n{self.log()}"
            ) from None
        self._close_log()
        return code

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def random_delta(seed: int, like: Mapping[str, torch.Tensor], scale: float = 1e-3) -> State:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * scale for k, v in like.items()}


def partial_delta(
    seed: int, like: Mapping[str, torch.Tensor], names: Collection[str], scale: float = 1e-3
) -> State:
    """Random in the tensors ``names``, zero elsewhere: compresses to far less than a snapshot."""
    gen = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape, generator=gen) * scale if k in names else torch.zeros(v.shape)
        for k, v in like.items()
    }


def weighted_mean(
    contributions: Sequence[tuple[Mapping[str, torch.Tensor], int]], dtype: torch.dtype = torch.float64
) -> State:
    """Σ n_i Δ_i / Σ n_i as the aggregator forms it: a ``dtype`` running sum in the given order, one division, fp32."""
    names = list(contributions[0][0])
    total = sum(n for _, n in contributions)
    out: State = {}
    for name in names:
        acc = torch.zeros(contributions[0][0][name].shape, dtype=dtype)
        for delta, n in contributions:
            acc.add_(delta[name].to(dtype), alpha=float(n))
        out[name] = acc.div_(float(total)).to(torch.float32)
    return out


def accumulator_dtype(config: ServerConfig) -> torch.dtype:
    """The dtype of the running sum the aggregator was configured with (fp64 where it has no such setting)."""
    name = getattr(config, "accumulator", "fp64")
    return {"fp32": torch.float32, "fp64": torch.float64}[name]


def add(state: Mapping[str, torch.Tensor], diff: Mapping[str, torch.Tensor]) -> State:
    """θ + D in θ's dtype, as the aggregator and a worker apply a difference."""
    return {k: v.clone().add_(diff[k].to(v.dtype)) for k, v in state.items()}


def with_nan(header: DeltaHeader, payload: Payload, shard: int = -1) -> tuple[DeltaHeader, Payload]:
    """The upload with the first block of shard ``shard`` replaced by NaNs, every size and digest made consistent.

    The encoder refuses NaN, so a NaN delta is made by tampering: everything
    else about it is valid, the shards before ``shard`` decode and fold.
    """
    layout = payload.layout
    frames = split_frames(layout, payload)
    piece = layout.shards[shard].pieces[0]
    assert layout.manifest[piece.tensor].dtype is DType.F32 and layout.codec.cast is Cast.NONE
    count = len(unzstd(frames[shard][1])) // 4
    frames[shard][1] = block_frame(np.full(count, np.nan, dtype=np.float32), DType.F32, layout.codec)
    new_layout, new_payload = rebuild(layout, frames)
    return header, Payload(new_payload, new_layout)


def assert_same_bits(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> None:
    """The same tensor names (in any order), each with the same dtype, shape and bits."""
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(bits(got[name]), bits(tensor)), (
            f"{name}: differs in {_differing(got[name], tensor)} elements"
        )


def _differing(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((bits(a) != bits(b)).sum())


def apply_fetched(state: Mapping[str, torch.Tensor], fetched: Sequence[tuple[DeltaHeader, State]]) -> State:
    """Apply a FetchDiff answer: a SNAPSHOT replaces the state, each DIFF is added."""
    out = dict(state)
    for head, tensors in fetched:
        if head.kind is DeltaKind.SNAPSHOT:
            out = dict(tensors)
        else:
            assert head.kind is DeltaKind.DIFF, head.kind
            out = add(out, tensors)
    return out


class Harness:
    """An in-process aggregator, a ScriptedSite per site (id -> samples) and an AdminClient."""

    def __init__(
        self,
        tmp: Path,
        sites: Mapping[str, int],
        *,
        init: Mapping[str, torch.Tensor] | None = None,
        **overrides: object,
    ) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp
        self.init = dict(small_state() if init is None else init)
        self.agg = Aggregator(make_config(tmp, list(sites), init=self.init, **overrides))
        self.sites = {name: ScriptedSite(self.agg.target, name, samples) for name, samples in sites.items()}
        self.admin = AdminClient(self.agg.target)

    def __getitem__(self, site: str) -> ScriptedSite:
        return self.sites[site]

    def join_all(self, beat: bool = True) -> None:
        """Every site joins (and heartbeats from a thread, so none is dropped while the test works)."""
        for site in self.sites.values():
            site.join()
            if beat:
                site.start_beating()

    def mean(self, contributions: Sequence[tuple[Mapping[str, torch.Tensor], int]]) -> State:
        """What this aggregator publishes (FedAvg, lr 1) for these uploads accepted in this order."""
        return weighted_mean(contributions, accumulator_dtype(self.agg.config))

    def close(self) -> None:
        for site in self.sites.values():
            site.close()
        self.admin.close()
        self.agg.stop()


MakeHarness = Callable[..., Harness]


@contextlib.contextmanager
def harnesses(tmp: Path, **defaults: object) -> Iterator[MakeHarness]:
    """A factory of Harnesses (each in its own folder under ``tmp``), all closed on exit.

    ``defaults`` apply to every Harness unless its call overrides them (e.g. ``init=WIDE``).
    """
    made: list[Harness] = []

    def make(sites: Mapping[str, int], **overrides: object) -> Harness:
        h = Harness(tmp / f"run{len(made)}", sites, **(defaults | overrides))  # type: ignore[arg-type]
        made.append(h)
        return h

    try:
        yield make
    finally:
        for h in made:
            h.close()


def final_state(h: Harness) -> State:
    """The state round 1 published (asserting it did), as site ``a`` fetches it."""
    status = h.admin.wait_round(1)
    assert status.state == federation_pb2.ROUND_STATE_PUBLISHED, status.failure_reason
    number, state = h["a"].snapshot()
    assert number == 1
    return state
