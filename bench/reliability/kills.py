"""SIGKILL of the daemon at random moments, under every server optimizer, FlexLoRA, FedCyBGD and
lossy uploads; each run checked against a fault-free run of the same uploads.

A scenario is a daemon configuration and a fixed script of uploads (seeded deltas, one site after
another in a fixed order, so the running sum is formed in the same order every time). It runs
twice: once with no fault (the reference) and once through the fault proxy while a seeded
``Chaos`` SIGKILLs the daemon mid-upload, just after a round's last upload (aggregation,
publication) and again while it recovers, restarting it on the same state directory each time.
Then every acknowledged upload must be counted exactly once (the round's accepted sites and
samples), every round published, and the final global state bit-identical to the reference's.
"""

from __future__ import annotations

import random
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.reliability.daemon import Admin, Daemon, DaemonSpec, Table, TomlValue, unexpected_tracebacks
from bench.reliability.proxy import FaultProxy, FaultRates
from bench.reliability.sites import ResilientSite, State
from common.codec.compact import compact_tensor
from common.delta import Cast, Codec, Lossy
from common.pb.gradualdiff.v1 import federation_pb2

SITES = {"a": 10, "b": 30, "c": 20}
WIDTH = 96


@dataclass(frozen=True)
class Scenario:
    """A daemon configuration and its upload script."""

    name: str
    extra: Mapping[str, TomlValue | Table]
    state: str = "plain"  # plain | lora | blocks: what round 0 holds
    rounds: int = 2
    codec: Codec = field(default_factory=Codec)


def _optimizer(name: str, **params: float) -> Mapping[str, Table]:
    return {"optimizer": {"name": name, **params}}


SCENARIOS = [
    Scenario("fedavg", _optimizer("fedavg")),
    Scenario("fedavgm", _optimizer("fedavgm", momentum=0.9)),
    Scenario("fedadam", _optimizer("fedadam", lr=0.01)),
    Scenario("fedyogi", _optimizer("fedyogi", lr=0.01)),
    Scenario("fedadagrad", _optimizer("fedadagrad", lr=0.01)),
    Scenario(
        "flexlora",
        {"training": {"method": "flexlora", "mode": "lora", "lora": {"rank": 4, "alpha": 16.0}}},
        state="lora",
    ),
    Scenario("fedcybgd", {"training": {"method": "fedcybgd", "mode": "full"}}, state="blocks", rounds=3),
    Scenario(
        "topk",
        {"training": {"upload_codec": {"lossy": "topk", "topk_fraction": 0.05, "cast": "bf16"}}},
        codec=Codec(cast=Cast.BF16, lossy=Lossy.TOPK, topk_fraction=0.05),
    ),
    Scenario(
        "int8-fedavgm",
        {"training": {"upload_codec": {"lossy": "int8"}}, **_optimizer("fedavgm", momentum=0.5)},
        codec=Codec(lossy=Lossy.INT8),
    ),
]


def initial_state(kind: str, seed: int = 0) -> State:
    """Round 0: a few decoder-like blocks (``model.layers.N.``), LoRA pairs at rank 4, or both plain."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "lora":
        out = {}
        for i in range(3):
            out[f"model.layers.{i}.q.lora_A.default.weight"] = torch.randn(4, WIDTH, generator=gen) * 0.02
            out[f"model.layers.{i}.q.lora_B.default.weight"] = torch.randn(WIDTH, 4, generator=gen) * 0.02
        return out
    out = {"model.embed.weight": torch.randn(4 * WIDTH, WIDTH, generator=gen) * 0.02}
    for i in range(3):
        out[f"model.layers.{i}.q.weight"] = torch.randn(WIDTH, WIDTH, generator=gen) * 0.02
        out[f"model.layers.{i}.norm.weight"] = torch.ones(WIDTH)
    return out


def _seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def scripted_delta(scenario: str, round_number: int, site: str, like: Mapping[str, torch.Tensor]) -> State:
    gen = torch.Generator().manual_seed(_seed(scenario, round_number, site))
    return {k: torch.randn(v.shape, generator=gen) * 1e-3 for k, v in like.items()}


@dataclass
class KillRecord:
    """One SIGKILL: when (what the daemon was doing, as its round's state said just before)."""

    scenario: str
    aimed_at: str  # upload | close | recovery
    observed: str  # the round's state just before the kill, or "starting" during recovery


class Chaos:
    """SIGKILLs a daemon on request, from any thread, and restarts it on the same state directory.

    One strike at a time; while it runs (kill, maybe a kill during recovery, restart) further
    requests are ignored. Sites keep retrying meanwhile, through the proxy.
    """

    def __init__(self, daemon: Daemon, scenario: str, rng: random.Random) -> None:
        self.daemon = daemon
        self.scenario = scenario
        self.rng = rng
        self.records: list[KillRecord] = []
        self.errors: list[str] = []
        self._busy = threading.Lock()
        self._thread: threading.Thread | None = None
        self._admin = Admin(daemon.target)

    def strike(self, aimed_at: str, round_number: int, *, delay: float = 0.0, recovery: bool = False) -> bool:
        if not self._busy.acquire(blocking=False):
            return False

        def run() -> None:
            try:
                if delay:
                    time.sleep(delay)
                self.records.append(KillRecord(self.scenario, aimed_at, self._observe(round_number)))
                self.daemon.kill()
                if recovery:
                    self.daemon.spawn()
                    time.sleep(self.rng.uniform(0.3, 3.0))  # before, while or after it recovers
                    observed = "serving" if self.daemon.healthy(0.2) else "starting"
                    self.records.append(KillRecord(self.scenario, "recovery", observed))
                    self.daemon.kill()
                self.daemon.start()
            except Exception as exc:  # reported, never swallowed: the run then fails its checks
                self.errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                self._busy.release()

        self._thread = threading.Thread(target=run, name="chaos", daemon=True)
        self._thread.start()
        return True

    def _observe(self, round_number: int) -> str:
        try:
            state = self._admin.round(round_number, timeout=0.3).state
        except Exception:
            return "unknown"
        return str(federation_pb2.RoundState.Name(state)).removeprefix("ROUND_STATE_").lower()

    def settle(self) -> None:
        """Wait for the strike under way (its restart) to finish."""
        if self._thread is not None:
            self._thread.join(120)
        self._admin.close()


@dataclass
class RunResult:
    """One scripted run's outcome."""

    final: State
    acked: dict[tuple[int, str], int]  # (round, site) -> samples of the acknowledged upload
    rounds: list[federation_pb2.RoundState.ValueType]
    accepted: dict[int, tuple[list[str], int]]  # round -> (accepted sites, samples)
    kills: list[KillRecord] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    retried: dict[str, int] = field(default_factory=dict)
    tracebacks: int = 0
    proxy_faults: int = 0


def run_script(
    root: Path,
    scenario: Scenario,
    *,
    chaos_seed: int | None = None,
    kills: int = 3,
    rates: FaultRates | None = None,
) -> RunResult:
    """Run ``scenario``'s script on a fresh daemon in ``root``; with ``chaos_seed``, through the
    fault proxy and with ``kills`` strikes (mid-upload, after a round's last upload, during
    recovery, chosen at random)."""
    init = initial_state(scenario.state)
    root.mkdir(parents=True, exist_ok=True)
    init_path = root / "init.safetensors"
    save_file(init, str(init_path))
    daemon = Daemon(root, DaemonSpec(list(SITES), init_path, scenario.rounds, dict(scenario.extra)))
    daemon.start()
    proxy = FaultProxy(daemon.port, seed=chaos_seed, rates=rates) if chaos_seed is not None else None
    rng = random.Random(chaos_seed)
    chaos = Chaos(daemon, scenario.name, rng) if chaos_seed is not None else None
    # Where each strike lands: (kind, round, the n-th upload of that round, message index).
    plan: list[tuple[str, int, int, int]] = []
    for i in range(kills if chaos else 0):
        kind = ("upload", "close")[i % 2]
        plan.append((kind, rng.randint(1, scenario.rounds), rng.randrange(len(SITES)), rng.randrange(12)))
    recovery_on = rng.randrange(len(plan)) if plan else -1

    def fire(kind: str, round_number: int, nth: int, message: int, last: int = 0) -> None:
        for n, (k, r, which, at) in enumerate(plan):
            if (k, r) != (kind, round_number) or (
                kind == "upload" and (which, min(at, last)) != (nth, message)
            ):
                continue
            assert chaos is not None
            delay = rng.uniform(0.0, 0.04) if kind == "close" else 0.0
            if chaos.strike(kind, round_number, delay=delay, recovery=n == recovery_on):
                plan[n] = ("done", 0, 0, 0)
            return

    target = proxy.target if proxy else daemon.target
    sites = {s: ResilientSite(target, s, n) for s, n in SITES.items()}
    acked: dict[tuple[int, str], int] = {}
    errors: list[str] = []
    residual: dict[str, State] = {s: {} for s in SITES}
    try:
        for site in sites.values():
            site.join()
            site.start_beating()
        after = 0
        for _ in range(scenario.rounds):
            uploaded: list[str] = []
            specs = {s: site.await_round(after=after) for s, site in sites.items()}
            number = max(spec.round for spec in specs.values())
            for s, site in sites.items():
                spec = specs[s] if specs[s].round == number else site.await_round(after=after)
                if spec.sits_out or spec.run_finished:
                    continue
                names = list(spec.trainable_tensors) or list(init)
                delta = scripted_delta(scenario.name, number, s, {k: init[k] for k in names})
                tensors = _compact(delta, scenario.codec, residual[s])
                upload = site.encode(
                    tensors, round=number, base=spec.base_round, upload_id=f"{scenario.name}-r{number}-{s}",
                    codec=scenario.codec, shard_bytes=16 * 1024,
                )  # fmt: skip

                last = sum(1 for _ in site.messages(upload, 0)) - 1

                def hook(i: int, number: int = number, nth: int = len(uploaded), last: int = last) -> None:
                    if chaos is not None:
                        fire("upload", number, nth, i, last)

                site.push(upload, on_message=hook)
                acked[(number, s)] = site.samples
                uploaded.append(s)
            if chaos is not None and uploaded:
                fire("close", number, 0, 0)
            after = number
        if chaos is not None:
            chaos.settle()
            errors += chaos.errors
        if proxy is not None:
            proxy.faults = False
        admin = Admin(daemon.target)
        try:
            rounds, accepted = [], {}
            for number in range(1, scenario.rounds + 1):
                status = admin.wait_round_done(number)
                rounds.append(status.state)
                accepted[number] = (
                    sorted(p.site_id for p in status.participants if p.accepted),
                    status.samples,
                )
        finally:
            admin.close()
        direct = ResilientSite(daemon.target, "a", SITES["a"])
        try:
            _, final = direct.snapshot()
        finally:
            direct.close()
    finally:
        for site in sites.values():
            site.close()
        if proxy is not None:
            proxy.close()
        daemon.stop()
    retried: dict[str, int] = {}
    for site in sites.values():
        for code, count in site.codes.items():
            retried[code] = retried.get(code, 0) + count
    return RunResult(
        final=final,
        acked=acked,
        rounds=rounds,
        accepted=accepted,
        kills=chaos.records if chaos else [],
        errors=errors,
        retried=retried,
        tracebacks=unexpected_tracebacks(daemon.log_text()),
        proxy_faults=proxy.counts.faults if proxy is not None else 0,
    )


def _compact(delta: State, codec: Codec, residual: State) -> State:
    """What the site sends: the delta itself, or under a lossy codec its compact form, with error
    feedback (the part not sent is kept in ``residual`` and added to the next round's delta)."""
    if codec.lossy is Lossy.NONE:
        return delta
    out: State = {}
    for name, t in delta.items():
        compensated = t + residual.get(name, torch.zeros_like(t))
        wire, sent = compact_tensor(name, compensated, codec)
        residual[name] = compensated - sent
        out.update(wire)
    return out


def same_bits(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    if sorted(a) != sorted(b):
        return False
    return all(
        a[k].dtype == b[k].dtype
        and a[k].shape == b[k].shape
        and torch.equal(a[k].contiguous().view(torch.uint8), b[k].contiguous().view(torch.uint8))
        for k in a
    )


@dataclass
class KillFigures:
    """The kill campaign's totals."""

    scenarios: list[str] = field(default_factory=list)
    kills: list[KillRecord] = field(default_factory=list)
    proxy_faults: int = 0
    acked: int = 0
    lost: int = 0
    double_counted: int = 0
    mismatches: int = 0
    rounds: int = 0
    rounds_failed: int = 0
    tracebacks: int = 0
    errors: list[str] = field(default_factory=list)
    retried: dict[str, int] = field(default_factory=dict)


def check_counts(result: RunResult) -> tuple[int, int]:
    """(lost, double-counted) acknowledged uploads, from each round's accepted sites and samples."""
    lost = double = 0
    for number, (sites, samples) in result.accepted.items():
        mine = {s: n for (r, s), n in result.acked.items() if r == number}
        lost += len(set(mine) - set(sites))
        expected = sum(mine.values())
        if samples > expected:
            double += max(1, round((samples - expected) / min(SITES.values())))
    return lost, double


def campaign(
    root: Path, scenarios: list[Scenario], *, seed: int, kills: int, log: Callable[[str], None]
) -> KillFigures:
    figures = KillFigures()
    for index, scenario in enumerate(scenarios):
        started = time.monotonic()
        figures.scenarios.append(scenario.name)
        try:
            reference = run_script(root / scenario.name / "reference", scenario)
            faulted = run_script(
                root / scenario.name / "faulted", scenario, chaos_seed=seed + index, kills=kills
            )
        except Exception as exc:
            figures.errors.append(f"{scenario.name}: {type(exc).__name__}: {exc}")
            figures.mismatches += 1
            log(f"[kills] {scenario.name}: FAILED {type(exc).__name__}: {exc}")
            continue
        lost, double = check_counts(faulted)
        ref_lost, ref_double = check_counts(reference)
        figures.kills += faulted.kills
        figures.proxy_faults += faulted.proxy_faults
        figures.acked += len(faulted.acked)
        figures.lost += lost + ref_lost
        figures.double_counted += double + ref_double
        figures.mismatches += 0 if same_bits(faulted.final, reference.final) else 1
        figures.rounds += len(faulted.rounds) + len(reference.rounds)
        published = federation_pb2.ROUND_STATE_PUBLISHED
        figures.rounds_failed += sum(s != published for s in faulted.rounds + reference.rounds)
        figures.tracebacks += faulted.tracebacks + reference.tracebacks
        figures.errors += [f"{scenario.name}: {e}" for e in faulted.errors]
        for code, count in faulted.retried.items():
            figures.retried[code] = figures.retried.get(code, 0) + count
        log(
            f"[kills] {scenario.name}: {len(faulted.kills)} kill(s) at "
            f"{', '.join(f'{k.aimed_at}/{k.observed}' for k in faulted.kills)}; "
            f"{len(faulted.acked)} acked, lost {lost}, double {double}, "
            f"bit-identical {same_bits(faulted.final, reference.final)} ({time.monotonic() - started:.0f} s)"
        )
    return figures
