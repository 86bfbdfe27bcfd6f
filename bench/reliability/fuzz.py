"""A fuzz loop over every Federation and Admin method of a real daemon, counting crashes.

Each case calls one method (chosen uniformly from both services' descriptors) with a random
message or a mutated valid one (``bench.reliability.messages``), under the right token, none, a
foreign one or the other role's. Streams get streams: PushDelta a real upload's chunks mutated,
dropped, duplicated, reordered or cut short, their shard specs altered or moved to a chunk that
ends no shard, or random chunks; FetchDiff and Watch are read a
little and cancelled. A *crash* is a case answered INTERNAL or UNKNOWN (an unhandled error in a
handler), the daemon exiting, a traceback in its log, or the health check failing afterwards.

Undecodable bytes (not a protobuf message at all) are a separate probe: gRPC's own deserializer
refuses them before any of the daemon's code runs, and answers INTERNAL; that figure is reported
on its own (``wire_corrupt_*``).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
from google.protobuf.message import Message
from safetensors.torch import save_file

from bench.reliability.daemon import ADMIN_TOKEN, Daemon, DaemonSpec, token_of
from bench.reliability.messages import mutate, random_message
from bench.reliability.sites import ResilientSite
from common.channel import auth_metadata
from common.pb.gradualdiff.v1 import admin_pb2, delta_pb2, federation_pb2

SITES = [f"s{i}" for i in range(8)]
CRASH_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
SERVICES = [("gradualdiff.v1.Federation", federation_pb2), ("gradualdiff.v1.Admin", admin_pb2)]


@dataclass(frozen=True)
class Method:
    service: str
    name: str
    request: type[Message]
    response: type[Message]
    client_stream: bool
    server_stream: bool

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"

    @property
    def admin(self) -> bool:
        return self.service.endswith("Admin")


def methods() -> list[Method]:
    """Every method of both services, from the generated descriptors (a new method is fuzzed too)."""
    from google.protobuf import symbol_database

    db = symbol_database.Default()
    out = []
    for full_name, module in SERVICES:
        service = module.DESCRIPTOR.services_by_name[full_name.rsplit(".", 1)[1]]
        for m in service.methods:
            out.append(
                Method(
                    full_name,
                    m.name,
                    db.GetSymbol(m.input_type.full_name),
                    db.GetSymbol(m.output_type.full_name),
                    m.client_streaming,
                    m.server_streaming,
                )
            )
    return out


@dataclass
class FuzzFigures:
    """The fuzz loop's totals."""

    cases: int = 0
    crashes: int = 0
    crash_samples: list[str] = field(default_factory=list)
    codes: Counter[str] = field(default_factory=Counter)
    methods: int = 0
    daemon_exits: int = 0
    tracebacks: int = 0
    healthy_after: bool = True
    wire_corrupt_cases: int = 0
    wire_corrupt_internal: int = 0
    seconds: float = 0.0


class Seeds:
    """Valid messages of each request type, and a real upload's chunks, for mutation."""

    def __init__(self, site: ResilientSite, round_number: int) -> None:
        s = site.site_id
        self.by_type: dict[type[Message], list[Message]] = {}
        for message in [
            federation_pb2.JoinRequest(site_id=s, capabilities=federation_pb2.Capabilities(num_samples=5)),
            federation_pb2.HeartbeatRequest(
                site_id=s, round=round_number, phase=federation_pb2.PHASE_TRAINING
            ),
            federation_pb2.AwaitRoundRequest(site_id=s, after_round=0, wait_ms=50),
            federation_pb2.FetchDiffRequest(site_id=s, have_round=0, snapshot=True),
            federation_pb2.UploadOffsetRequest(site_id=s, upload_id="fz-offset"),
            admin_pb2.StatusRequest(),
            admin_pb2.ListRoundsRequest(),
            admin_pb2.GetRoundRequest(round=round_number),
            admin_pb2.ListSitesRequest(),
            admin_pb2.WatchRequest(),
            admin_pb2.ControlRequest(reason="fuzz"),
            admin_pb2.EvictSiteRequest(site_id=SITES[-1], reason="fuzz"),
            admin_pb2.SetRoundPolicyRequest(),
            admin_pb2.RetryRoundRequest(round=round_number, reason="fuzz"),
        ]:
            self.by_type.setdefault(type(message), []).append(message)
        gen = torch.Generator().manual_seed(1)
        delta = {k: torch.randn(v.shape, generator=gen) * 1e-3 for k, v in fuzz_state().items()}
        upload = site.encode(
            delta, round=round_number, base=round_number - 1, upload_id="fz-seed", shard_bytes=4096
        )
        site.chunk_bytes = 2048
        self.chunks = list(site.messages(upload, 0))


def fuzz_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"model.layers.0.w": torch.randn(32, 32, generator=gen), "model.norm": torch.ones(32)}


def _chunk_stream(rng: random.Random, seeds: Seeds, case: int) -> list[delta_pb2.DeltaChunk]:
    """A PushDelta request stream: random chunks, or the real upload's chunks broken some way."""
    if rng.random() < 0.25:
        return [random_message(rng, delta_pb2.DeltaChunk) for _ in range(rng.randint(0, 4))]
    chunks = [type(c)() for c in seeds.chunks]
    for new, old in zip(chunks, seeds.chunks, strict=True):
        new.CopyFrom(old)
    chunks[0].header.upload_id = f"fz-{case}"  # a fresh upload each time, or every case is a duplicate
    for _ in range(rng.randint(1, 3)):
        if not chunks:
            break
        op = rng.choice(
            ["mutate", "mutate", "drop", "duplicate", "swap", "truncate", "header", "flip", "shard"]
        )
        i = rng.randrange(len(chunks))
        if op == "mutate":
            chunks[i] = mutate(rng, chunks[i])
        elif op == "drop" and len(chunks) > 1:
            del chunks[i]
        elif op == "duplicate":
            chunks.insert(i, chunks[i])
        elif op == "swap" and len(chunks) > 1:
            j = rng.randrange(len(chunks))
            chunks[i], chunks[j] = chunks[j], chunks[i]
        elif op == "truncate":
            del chunks[i:]
        elif op == "header" and chunks[0].HasField("header"):
            chunks[0].header.CopyFrom(mutate(rng, chunks[0].header))
        elif op == "shard":
            _break_shard(rng, chunks)
        elif op == "flip" and chunks[i].data:
            data = bytearray(chunks[i].data)
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            chunks[i].data = bytes(data)
    return chunks


def _break_shard(rng: random.Random, chunks: list[delta_pb2.DeltaChunk]) -> None:
    """Wire revision 2's spec-with-the-data: a shard spec altered, or moved to a chunk that ends no shard."""
    ending = [i for i, c in enumerate(chunks) if c.HasField("shard")]
    if not ending:
        return
    i = rng.choice(ending)
    if rng.random() < 0.5:
        chunks[i] = _copy(chunks[i])
        chunks[i].shard.CopyFrom(mutate(rng, chunks[i].shard))
        return
    j = rng.randrange(len(chunks))
    if j == i:
        return
    # Copies: "duplicate" may have put one message object at two places in the list.
    chunks[j] = _copy(chunks[j])
    chunks[j].shard.CopyFrom(chunks[i].shard)
    chunks[i] = _copy(chunks[i])
    chunks[i].ClearField("shard")


def _copy(chunk: delta_pb2.DeltaChunk) -> delta_pb2.DeltaChunk:
    out = delta_pb2.DeltaChunk()
    out.CopyFrom(chunk)
    return out


def _metadata(rng: random.Random, method: Method) -> Any:
    r = rng.random()
    if r < 0.8:
        return auth_metadata(ADMIN_TOKEN if method.admin else token_of(rng.choice(SITES)))
    if r < 0.87:
        return ()
    if r < 0.94:
        return auth_metadata(token_of(SITES[0]) if method.admin else ADMIN_TOKEN)  # the other role's
    return auth_metadata(f"forged-{rng.randrange(10**6)}")


def one_case(
    channel: grpc.Channel, method: Method, rng: random.Random, seeds: Seeds, case: int
) -> grpc.StatusCode:
    """Call ``method`` once with hostile input; the status it ended with."""
    metadata = _metadata(rng, method)
    serialize = method.request.SerializeToString
    deserialize = method.response.FromString
    try:
        if method.client_stream:
            chunks = _chunk_stream(rng, seeds, case)
            call = channel.stream_unary(
                method.path, request_serializer=serialize, response_deserializer=deserialize
            )
            call(iter(chunks), metadata=metadata, timeout=5)
            return grpc.StatusCode.OK
        valid = seeds.by_type.get(method.request)
        request = (
            mutate(rng, rng.choice(valid))
            if valid and rng.random() < 0.7
            else random_message(rng, method.request)
        )
        if method.server_stream:
            stream = channel.unary_stream(
                method.path, request_serializer=serialize, response_deserializer=deserialize
            )
            responses: Any = stream(request, metadata=metadata, timeout=0.5 if method.name == "Watch" else 5)
            try:
                for n, _ in enumerate(responses):
                    if n >= 3:
                        break
            finally:
                responses.cancel()
            return grpc.StatusCode.OK
        unary = channel.unary_unary(
            method.path, request_serializer=serialize, response_deserializer=deserialize
        )
        unary(request, metadata=metadata, timeout=3)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        if code in CRASH_CODES:
            raise CaseCrashed(f"{method.name}: {code.name}: {exc.details()}") from exc
        return code


class CaseCrashed(Exception):
    """A case ended INTERNAL or UNKNOWN."""


def _raw(data: bytes) -> bytes:
    return data


def _wire_corrupt(channel: grpc.Channel, rng: random.Random, seeds: Seeds, figures: FuzzFigures) -> None:
    """Bytes that are no protobuf message, to every method (identity serializers)."""
    for method in methods():
        for _ in range(10):
            valid = seeds.chunks[0] if method.client_stream else random_message(rng, method.request)
            raw = valid.SerializeToString()
            blob = (
                raw[: rng.randrange(len(raw))] + b"\xff\xff\xff\xff\x0f" if raw else b"\xff\xff\xff\xff\x0f"
            )
            figures.wire_corrupt_cases += 1
            meta = auth_metadata(ADMIN_TOKEN if method.admin else token_of(SITES[0]))
            try:
                if method.client_stream:
                    channel.stream_unary(method.path, _raw, _raw)(iter([blob]), metadata=meta, timeout=3)
                elif method.server_stream:
                    for _ in channel.unary_stream(method.path, _raw, _raw)(blob, metadata=meta, timeout=0.5):
                        break
                else:
                    channel.unary_unary(method.path, _raw, _raw)(blob, metadata=meta, timeout=3)
            except grpc.RpcError as exc:
                if exc.code() is grpc.StatusCode.INTERNAL:
                    figures.wire_corrupt_internal += 1


def run(
    root: Path, *, cases: int, seed: int, threads: int = 6, log: Callable[[str], None] = print
) -> FuzzFigures:
    """``cases`` fuzz cases against a fresh daemon in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    init = root / "init.safetensors"
    save_file(fuzz_state(), str(init))
    daemon = Daemon(root, DaemonSpec(SITES, init))
    figures = FuzzFigures()
    started = time.monotonic()
    daemon.start()
    all_methods = methods()
    figures.methods = len(all_methods)
    lock = threading.Lock()
    try:
        joined = [ResilientSite(daemon.target, s, 5, patience_s=30) for s in SITES]
        for site in joined:
            site.join()
        spec = joined[0].await_round(after=0)
        seeds = Seeds(joined[0], spec.round)
        for site in joined:
            site.close()
        log_start = len(daemon.log_text())
        next_case = iter(range(cases))

        def worker(index: int) -> None:
            rng = random.Random(f"{seed}/{index}")
            with grpc.insecure_channel(daemon.target) as channel:
                while True:
                    with lock:
                        case = next(next_case, None)
                    if case is None:
                        return
                    method = rng.choice(all_methods)
                    try:
                        code = one_case(channel, method, rng, seeds, case)
                        with lock:
                            figures.codes[code.name] += 1
                    except CaseCrashed as exc:
                        with lock:
                            figures.crashes += 1
                            figures.codes["CRASH"] += 1
                            if len(figures.crash_samples) < 20:
                                figures.crash_samples.append(str(exc)[:300])
                    with lock:
                        figures.cases += 1
                        if figures.cases % 2000 == 0:
                            log(f"[fuzz] {figures.cases} cases, {figures.crashes} crash(es)")
                    if case % 500 == 0 and not daemon.alive():
                        with lock:
                            figures.daemon_exits += 1
                            figures.crashes += 1
                            daemon.start()

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(worker, range(threads)))
        figures.healthy_after = daemon.alive() and daemon.healthy(timeout=5)
        tail = daemon.log_text()[log_start:]
        figures.tracebacks = tail.count("Traceback")
        figures.crashes += figures.tracebacks + (0 if figures.healthy_after else 1)
        if figures.tracebacks:
            where = tail.index("Traceback")
            figures.crash_samples.append("log: " + tail[max(0, where - 300) : where + 1200])
        with grpc.insecure_channel(daemon.target) as channel:
            _wire_corrupt(channel, random.Random(seed), seeds, figures)
    finally:
        daemon.stop()
    figures.seconds = time.monotonic() - started
    return figures
