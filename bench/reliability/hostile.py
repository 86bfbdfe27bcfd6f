"""The malicious sites of issue 16, against a real daemon process; each case passes or fails.

- ``x100``: a site sends its delta ×100; with ``influence.clip_norm`` set the global model moves
  by no more than the bound, and the round publishes with the honest sites' uploads;
- ``near_float32_max``: a delta of 3e38 entries (sample count 2): refused or clipped, never
  overflowing the sum; the round publishes, the state stays finite and within the bound;
- ``evicted``: after EvictSite every Federation call of that site is refused (a heartbeat is told
  STOP);
- ``tokens``: no token, a forged token, another site's token for this site's id, a site token on
  the Admin service, the admin token on the Federation service: all refused;
- ``hog``: one site holds 70 idle PushDelta streams and 70 long polls; the honest site's
  heartbeats and the health check still answer within a second each.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import save_file

from bench.reliability.daemon import ADMIN_TOKEN, Admin, Daemon, DaemonSpec, Table, TomlValue, token_of
from bench.reliability.kills import initial_state, scripted_delta
from bench.reliability.sites import ResilientSite, State
from common.channel import auth_metadata
from common.pb.gradualdiff.v1 import admin_pb2, admin_pb2_grpc, delta_pb2, federation_pb2, federation_pb2_grpc

CLIP = 0.5
HONEST = {"a": 10, "b": 30}
HOG_CALLS = 70


@dataclass
class HostileFigures:
    """Each case's verdict and what was seen."""

    passed: dict[str, bool] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def failures(self) -> int:
        return sum(not ok for ok in self.passed.values())


def _move(old: State, new: State) -> float:
    return math.sqrt(sum(float((new[k].double() - old[k].double()).pow(2).sum()) for k in old))


def _round_with_a_hostile_upload(
    daemon: Daemon, sites: dict[str, ResilientSite], admin: Admin, number: int, hostile: State, samples: int
) -> tuple[str, bool, float, bool]:
    """Round ``number``: m sends ``hostile``, then a and b honest deltas; (m's status, published, move, finite)."""
    m = sites["m"]
    before = m.snapshot()[1]
    spec = m.await_round(after=number - 1)
    try:
        m.stub.PushDelta(
            m.messages(
                m.encode(
                    hostile, round=spec.round, base=spec.base_round, upload_id=f"m-{number}", samples=samples
                ),
                0,
            ),
            metadata=m.metadata,
            timeout=30,
        )
        verdict = "OK (accepted)"
    except grpc.RpcError as exc:
        verdict = exc.code().name
    init = initial_state("plain")
    for name, site in sites.items():
        if name == "m":
            continue
        site.await_round(after=number - 1)
        delta = scripted_delta("hostile", number, name, init)
        site.push(site.encode(delta, round=spec.round, base=spec.base_round, upload_id=f"{name}-{number}"))
    try:
        status = admin.wait_round_done(number, timeout=3)
    except TimeoutError:  # m's upload was refused: the round waits for it; the operator closes it
        admin.stub.CloseRound(admin_pb2.ControlRequest(reason="hostile"), metadata=admin.metadata, timeout=10)
        status = admin.wait_round_done(number, timeout=30)
    accepted = {p.site_id for p in status.participants if p.accepted}
    published = status.state == federation_pb2.ROUND_STATE_PUBLISHED and set(HONEST) <= accepted
    after = m.snapshot()[1]
    finite = all(bool(torch.isfinite(t).all()) for t in after.values())
    return verdict, published, _move(before, after), finite


def _influence(daemon: Daemon, figures: HostileFigures) -> None:
    init = initial_state("plain")
    sites = {s: ResilientSite(daemon.target, s, n, patience_s=30) for s, n in {**HONEST, "m": 20}.items()}
    admin = Admin(daemon.target)
    try:
        for site in sites.values():
            site.join()
            site.start_beating()
        x100 = {k: v * 100 for k, v in scripted_delta("hostile", 1, "m", init).items()}
        verdict, published, move, finite = _round_with_a_hostile_upload(daemon, sites, admin, 1, x100, 20)
        figures.passed["x100"] = published and finite and move <= CLIP * (1 + 1e-5)
        figures.notes["x100"] = (
            f"upload {verdict}; global move {move:.4f} (bound {CLIP}); published {published}"
        )
        huge = {k: torch.full_like(v, 3.0e38) for k, v in init.items()}
        verdict, published, move, finite = _round_with_a_hostile_upload(daemon, sites, admin, 2, huge, 2)
        figures.passed["near_float32_max"] = published and finite and move <= CLIP * (1 + 1e-5)
        figures.notes["near_float32_max"] = (
            f"upload {verdict}; global move {move:.4f} (bound {CLIP}); finite {finite}; published {published}"
        )
    finally:
        admin.close()
        for site in sites.values():
            site.close()


def _refused(call: Callable[[], object]) -> grpc.StatusCode | None:
    """The status ``call`` was refused with (a stream is read through); None if it succeeded."""
    try:
        result = call()
        if isinstance(result, Iterator):
            list(result)
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    return None


def _federation_calls(
    stub: federation_pb2_grpc.FederationStub, site: str, meta: object
) -> dict[str, Callable[[], object]]:
    kw = {"metadata": meta, "timeout": 5}

    def empty_upload() -> Iterator[delta_pb2.DeltaChunk]:
        return iter([delta_pb2.DeltaChunk()])

    return {
        "Join": lambda: stub.Join(federation_pb2.JoinRequest(site_id=site), **kw),  # type: ignore[arg-type]
        "AwaitRound": lambda: stub.AwaitRound(
            federation_pb2.AwaitRoundRequest(site_id=site, after_round=0, wait_ms=100),
            **kw,  # type: ignore[arg-type]
        ),
        "FetchDiff": lambda: stub.FetchDiff(
            federation_pb2.FetchDiffRequest(site_id=site, snapshot=True),
            **kw,  # type: ignore[arg-type]
        ),
        "PushDelta": lambda: stub.PushDelta(empty_upload(), **kw),  # type: ignore[arg-type]
        "GetUploadOffset": lambda: stub.GetUploadOffset(
            federation_pb2.UploadOffsetRequest(site_id=site, upload_id="x"),
            **kw,  # type: ignore[arg-type]
        ),
    }


def _access(daemon: Daemon, figures: HostileFigures) -> None:
    with grpc.insecure_channel(daemon.target) as channel:
        stub = federation_pb2_grpc.FederationStub(channel)
        admin_stub = admin_pb2_grpc.AdminStub(channel)
        # The evicted site: joined first, then evicted, then every call.
        e_meta = auth_metadata(token_of("e"))
        stub.Join(federation_pb2.JoinRequest(site_id="e"), metadata=e_meta, timeout=5)
        admin_stub.EvictSite(
            admin_pb2.EvictSiteRequest(site_id="e", reason="campaign"),
            metadata=auth_metadata(ADMIN_TOKEN),
            timeout=5,
        )
        let_in = [
            name for name, call in _federation_calls(stub, "e", e_meta).items() if _refused(call) is None
        ]
        beat = stub.Heartbeat(federation_pb2.HeartbeatRequest(site_id="e"), metadata=e_meta, timeout=5)
        if beat.directive != federation_pb2.DIRECTIVE_STOP:
            let_in.append("Heartbeat (not told STOP)")
        figures.passed["evicted"] = not let_in
        figures.notes["evicted"] = "every call refused" if not let_in else f"let in: {let_in}"
        # Tokens: none, forged, another site's for this id; the roles crossed.
        let_in = []
        for label, meta in (
            ("no token", ()),
            ("forged token", auth_metadata("forged")),
            ("b's token as a", auth_metadata(token_of("b"))),
            ("admin token", auth_metadata(ADMIN_TOKEN)),
        ):
            for name, call in _federation_calls(stub, "a", meta).items():
                if _refused(call) is None:
                    let_in.append(f"{name} with {label}")
        for label, meta in (("no token", ()), ("a site token", auth_metadata(token_of("a")))):
            for name, call in {
                "GetStatus": lambda m=meta: admin_stub.GetStatus(
                    admin_pb2.StatusRequest(), metadata=m, timeout=5
                ),
                "EvictSite": lambda m=meta: admin_stub.EvictSite(
                    admin_pb2.EvictSiteRequest(site_id="b"), metadata=m, timeout=5
                ),
            }.items():
                if _refused(call) is None:
                    let_in.append(f"Admin.{name} with {label}")
        figures.passed["tokens"] = not let_in
        figures.notes["tokens"] = "every call refused" if not let_in else f"let in: {let_in}"


def _hog(daemon: Daemon, figures: HostileFigures) -> None:
    stop = threading.Event()

    def idle() -> Iterator[delta_pb2.DeltaChunk]:
        stop.wait(60)
        return
        yield

    meta = auth_metadata(token_of("hog"))
    channels = [grpc.insecure_channel(daemon.target) for _ in range(2)]
    calls: list[Any] = []  # grpc call futures of two reply types
    slowest = 0.0
    failures = 0
    try:
        stub = federation_pb2_grpc.FederationStub(channels[0])
        polls = federation_pb2_grpc.FederationStub(channels[1])
        stub.Join(federation_pb2.JoinRequest(site_id="hog"), metadata=meta, timeout=5)
        for _ in range(HOG_CALLS):
            calls.append(stub.PushDelta.future(idle(), metadata=meta, timeout=60))
            calls.append(
                polls.AwaitRound.future(
                    federation_pb2.AwaitRoundRequest(site_id="hog", after_round=999, wait_ms=60_000),
                    metadata=meta,
                    timeout=60,
                )
            )
        deadline = time.monotonic() + 30
        while sum(c.done() for c in calls) < 2 * HOG_CALLS - 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        with grpc.insecure_channel(daemon.target) as channel:
            honest = federation_pb2_grpc.FederationStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            a_meta = auth_metadata(token_of("a"))
            for _ in range(10):
                t0 = time.monotonic()
                try:
                    honest.Heartbeat(federation_pb2.HeartbeatRequest(site_id="a"), metadata=a_meta, timeout=2)
                    health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                except grpc.RpcError:
                    failures += 1
                slowest = max(slowest, time.monotonic() - t0)
    finally:
        stop.set()
        for c in calls:
            c.cancel()
        for ch in channels:
            ch.close()
    held = sum(not c.done() for c in calls)
    figures.passed["hog"] = failures == 0 and slowest < 1.0
    figures.notes["hog"] = (
        f"{2 * HOG_CALLS} idle calls, refused beyond the site's share; honest beat + health check "
        f"slowest {slowest:.3f} s, {failures} failed"
    ) + (f" ({held} still held at the end)" if held > 8 else "")


def run(root: Path, log: Callable[[str], None] = print) -> HostileFigures:
    """Every case, on one daemon (influence bounded at ``CLIP``)."""
    root.mkdir(parents=True, exist_ok=True)
    init = root / "init.safetensors"
    save_file(initial_state("plain"), str(init))
    names = [*HONEST, "m", "e", "hog"]
    # Rounds open with the three sites of the influence cases, which run first; e and hog come later.
    extra: dict[str, TomlValue | Table] = {
        "influence": {"clip_norm": CLIP},
        "round": {"min_sites_to_open": 3},
    }
    daemon = Daemon(root, DaemonSpec(names, init, 0, extra))
    figures = HostileFigures()
    daemon.start()
    try:
        for name, case in (("influence", _influence), ("tokens/evicted", _access), ("hog", _hog)):
            try:
                case(daemon, figures)
            except Exception as exc:
                figures.passed[name] = False
                figures.notes[name] = f"{type(exc).__name__}: {exc}"
        figures.passed["healthy_after"] = daemon.healthy(timeout=5)
    finally:
        daemon.stop()
    for name, ok in figures.passed.items():
        log(f"[hostile] {name}: {'pass' if ok else 'FAIL'} {figures.notes.get(name, '')}")
    return figures
