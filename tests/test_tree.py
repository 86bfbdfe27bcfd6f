"""A tree of aggregators on 127.0.0.1 (issue 20): a root, intermediates, scripted sites.

Each intermediate is a real aggregator (in-process, or ``gdfed serve`` where the test kills it)
whose ``[upstream]`` is the root; the root names it in ``[tree] intermediates``. The sites are
``tests.scripted.ScriptedSite``s pushing fixed deltas, so a tree and a flat federation (one
aggregator, the same sites, the same uploads in the same order) can be compared round by round.

The fp32 tolerance. Both sum x_i = n_i·Δ_i in an fp32 running sum (``accumulator = "fp32"``),
associated otherwise: flat ((x_a + x_b) + x_c) + x_d, tree (x_a + x_b) + (x_c + x_d), the partial
sums sent exactly (fp32, lossless codec). Each of the two means is within K·2^-24·Σ|x_i| / Σ n_i
of the exact one (K − 1 roundings of the sum, one of the products and one of the division, each
at most 2^-24 of Σ|x_i|; K = 4 uploads), so they differ by at most e_r = 2K·2^-24·Σ n_i|Δ_i| / Σ n_i
per element. The new state differs by the server rule's sensitivity to its mean times that, plus
one fp32 rounding of θ + D per round:

- FedAvg (lr 1): |θ_tree − θ_flat| ≤ Σ_r e_r + Σ_r ulp(θ_r);
- FedAdam (η, τ): D = η·m / (√v + τ) moves by at most 2η/τ per unit of the mean, and m, v carry
  every earlier round's mean forward, so |θ_tree − θ_flat| ≤ R·(2η/τ)·Σ_r e_r + Σ_r ulp(θ_r).

With deltas on a 2^-20 grid every sum is exact in fp32, whatever the association: there the
tree is bit-identical to the flat federation. Every intermediate's published state is
bit-identical to the root's (it adds the root's difference as a worker does).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch

from common.pb.gradualdiff.v1 import federation_pb2, federation_pb2_grpc
from server.config import OptimizerConfig, RoundPolicy, ServerConfig
from server.tree_config import TreeConfig
from server.upstream.settings import UpstreamConfig
from tests.scripted import (
    ADMIN_TOKEN,
    AdminClient,
    Aggregator,
    Daemon,
    Harness,
    ScriptedSite,
    State,
    assert_same_bits,
    free_port,
    make_config,
    random_delta,
    small_state,
    token_of,
)

PUBLISHED = federation_pb2.ROUND_STATE_PUBLISHED
SAMPLES = {"a": 10, "b": 20, "c": 30, "d": 40}
UNDER = {"i1": ("a", "b"), "i2": ("c", "d")}
ROUNDS = 3
FEDADAM = OptimizerConfig(name="fedadam", lr=1e-2, tau=1e-3)  # type: ignore[arg-type]
Deltas = dict[tuple[int, str], State]


# ---------------------------------------------------------------- building a tree


def upstream(root: str, site_id: str) -> UpstreamConfig:
    """``[upstream]`` of intermediate ``site_id``: the root's address and its own token there."""
    return UpstreamConfig(address=root, site_id=site_id, token=token_of(site_id))


def intermediate_config(
    tmp: Path, root: str, site_id: str, sites: Sequence[str], **overrides: object
) -> ServerConfig:
    """An intermediate: its own sites and tokens, its upstream, and no round 0 or training of its own."""
    tmp.mkdir(parents=True, exist_ok=True)
    base = make_config(tmp, sites)
    return replace(base, init_state=None, run_id="", upstream=upstream(root, site_id), **overrides)  # type: ignore[arg-type]


def root_config(
    tmp: Path, intermediates: Sequence[str], init: Mapping[str, torch.Tensor], **overrides: object
) -> ServerConfig:
    tmp.mkdir(parents=True, exist_ok=True)
    policy = RoundPolicy(min_sites=len(intermediates), min_sites_to_open=len(intermediates))
    overrides.setdefault("round", policy)
    return make_config(
        tmp, intermediates, init=init, tree=TreeConfig(intermediates=tuple(intermediates)), **overrides
    )


class Tree:
    """A root, intermediates (in-process) and a ScriptedSite per site under them."""

    def __init__(
        self,
        tmp: Path,
        under: Mapping[str, Sequence[str]],
        samples: Mapping[str, int],
        init: Mapping[str, torch.Tensor],
        **root_overrides: object,
    ) -> None:
        self.under = under
        self.root = Aggregator(root_config(tmp / "root", list(under), init, **root_overrides))
        self.admin = AdminClient(self.root.target)
        self.inters: dict[str, Aggregator] = {}
        self.sites: dict[str, ScriptedSite] = {}
        self.inter_admin: dict[str, AdminClient] = {}
        try:
            for name, members in under.items():
                policy = RoundPolicy(min_sites=len(members))
                self.inters[name] = agg = Aggregator(
                    intermediate_config(tmp / name, self.root.target, name, members, round=policy)
                )
                self.inter_admin[name] = AdminClient(agg.target)
                for site in members:
                    self.sites[site] = ScriptedSite(agg.target, site, samples[site])
        except BaseException:
            self.close()
            raise

    def join_all(self) -> None:
        for site in self.sites.values():
            site.join()
            site.start_beating()

    def run_round(self, number: int, deltas: Deltas, order: Sequence[str]) -> None:
        """Every site of ``order`` pushes its delta of round ``number``; the root and every
        intermediate publish it."""
        for site in order:
            assert self.sites[site].await_round(after=number - 1).round == number
        for site in order:
            head, payload = self.sites[site].header(deltas[number, site], round=number, base=number - 1)
            receipt = self.sites[site].push(head, payload)
            assert receipt.accepted and not receipt.duplicate
        assert self.admin.wait_round(number, timeout=60).state == PUBLISHED
        for admin in self.inter_admin.values():
            assert admin.wait_round(number, timeout=60).state == PUBLISHED

    def root_state(self) -> tuple[int, State]:
        """The root's latest published state, fetched as its first intermediate fetches."""
        name = next(iter(self.under))
        with ScriptedSite(self.root.target, name) as fetcher:
            return fetcher.snapshot()

    def close(self) -> None:
        for site in self.sites.values():
            site.close()
        for admin in self.inter_admin.values():
            admin.close()
        self.admin.close()
        for agg in self.inters.values():
            agg.stop()
        self.root.stop()


@contextlib.contextmanager
def tree(
    tmp: Path, under: Mapping[str, Sequence[str]], samples: Mapping[str, int], init: State, **kw: object
) -> Iterator[Tree]:
    t = Tree(tmp, under, samples, init, **kw)
    try:
        yield t
    finally:
        t.close()


# ---------------------------------------------------------------- the uploads and the tolerance


def make_deltas(init: State, sites: Sequence[str], *, grid: bool) -> Deltas:
    """A fixed delta per (round, site); ``grid``: small integers times 2^-20, exact in every fp32 sum."""
    out: Deltas = {}
    for r in range(1, ROUNDS + 1):
        for i, site in enumerate(sites):
            delta = random_delta(100 * r + i, init)
            if grid:
                delta = {k: torch.round(v * 2e4).clamp_(-64, 64) * 2.0**-20 for k, v in delta.items()}
            out[r, site] = delta
    return out


def mean_bound(deltas: Deltas, samples: Mapping[str, int], number: int) -> State:
    """e_r: how far two fp32 means of round ``number``'s n_i·Δ_i, summed in other orders, may differ."""
    sites = [s for (r, s) in deltas if r == number]
    total = sum(samples[s] for s in sites)
    out: State = {}
    for k, like in deltas[number, sites[0]].items():
        acc = torch.zeros(like.shape, dtype=torch.float64)
        for s in sites:
            acc += samples[s] * deltas[number, s][k].abs().double()
        out[k] = acc * (2 * len(sites) * 2.0**-24 / total)
    return out


def tolerance(
    deltas: Deltas, samples: Mapping[str, int], states: Sequence[State], optimizer: OptimizerConfig
) -> State:
    """The per-element bound of the module's docstring, for the states after each round."""
    gain = 1.0
    if optimizer.name == "fedadam":
        assert optimizer.tau is not None
        gain = len(states) * 2 * optimizer.lr / optimizer.tau
    bound: State = {}
    for number, state in enumerate(states, start=1):
        e = mean_bound(deltas, samples, number)
        for k, theta in state.items():
            ulp = theta.double().abs() * 2.0**-23 + 2.0**-149
            bound[k] = bound.get(k, torch.zeros_like(ulp)) + gain * e[k] + ulp
    return bound


def assert_within(got: State, want: State, bound: State) -> float:
    """Every element of ``got`` within ``bound`` of ``want``; the largest difference over its bound."""
    worst = 0.0
    for k, w in want.items():
        diff = (got[k].double() - w.double()).abs()
        assert bool((diff <= bound[k]).all()), (
            f"{k}: differs by up to {diff.max():.3g}, bound {bound[k].min():.3g}"
        )
        worst = max(worst, float((diff / bound[k]).max()))
    return worst


def flat_states(tmp: Path, init: State, deltas: Deltas, optimizer: OptimizerConfig) -> list[State]:
    """The state after each round of the flat federation: every site under one aggregator, a b c d in order."""
    h = Harness(tmp, SAMPLES, init=init, optimizer=optimizer, round=RoundPolicy(min_sites=len(SAMPLES)))
    try:
        h.join_all()
        out = []
        for r in range(1, ROUNDS + 1):
            for site in SAMPLES:
                assert h[site].await_round(after=r - 1).round == r
                head, payload = h[site].header(deltas[r, site], round=r, base=r - 1)
                assert h[site].push(head, payload).accepted
            assert h.admin.wait_round(r, timeout=60).state == PUBLISHED
            number, state = h["a"].snapshot()
            assert number == r
            out.append(state)
        return out
    finally:
        h.close()


# ---------------------------------------------------------------- the tree equals the flat federation


@pytest.mark.slow
@pytest.mark.parametrize(
    ("rule", "grid"),
    [("fedavg", False), ("fedadam", False), ("fedavg", True)],
    ids=["fedavg", "fedadam", "fedavg-exact"],
)
def test_a_tree_of_two_intermediates_publishes_the_flat_federations_state(
    tmp_path: Path, rule: str, grid: bool
) -> None:
    init = small_state()
    optimizer = FEDADAM if rule == "fedadam" else OptimizerConfig()
    deltas = make_deltas(init, list(SAMPLES), grid=grid)
    flat = flat_states(tmp_path / "flat", init, deltas, optimizer)
    with tree(tmp_path / "tree", UNDER, SAMPLES, init, optimizer=optimizer) as t:
        t.join_all()
        for r in range(1, ROUNDS + 1):
            t.run_round(r, deltas, list(SAMPLES))
            number, root = t.root_state()
            assert number == r
            for members in UNDER.values():
                got_r, at_site = t.sites[members[0]].snapshot()
                assert got_r == r
                assert_same_bits(at_site, root)  # an intermediate serves the root's state exactly
            if grid:
                assert_same_bits(root, flat[r - 1])
            else:
                assert_within(root, flat[r - 1], tolerance(deltas, SAMPLES, flat[:r], optimizer))
            status = t.admin.round(r)
            parts = {p.site_id: p for p in status.participants if p.accepted}
            assert status.samples == sum(SAMPLES.values())
            assert {k: (p.sample_count, p.sites) for k, p in parts.items()} == {"i1": (30, 2), "i2": (70, 2)}
        view = {i.site_id: i for i in t.admin.status().intermediates}
        assert {k: (v.round, v.sites, v.samples) for k, v in view.items()} == {
            "i1": (3, 2, 30),
            "i2": (3, 2, 70),
        }


# ---------------------------------------------------------------- an intermediate killed and restarted

KILL_SAMPLES = {"a": 10, "b": 20}


def intermediate_toml(tmp: Path, *, port: int, root: str, site_id: str, sites: Sequence[str]) -> Path:
    """``gdfed serve``'s config for an intermediate (keys as server.config_file reads them)."""
    folder = tmp / site_id
    folder.mkdir(parents=True)
    token = folder / "upstream.token"
    token.write_text(token_of(site_id) + "\n")
    lines = [
        f'listen = "127.0.0.1:{port}"',
        f'state_dir = "{folder / "state"}"',
        "heartbeat_interval_s = 0.5",
        "missed_beats = 3",
        "tick_s = 0.05",
        f'admin_token = "{ADMIN_TOKEN}"',
        "[round]",
        f"min_sites = {len(sites)}",
        "[upstream]",
        f'address = "{root}"',
        f'site_id = "{site_id}"',
        f'token_file = "{token}"',
        "[sites]",
        *(f'{site} = "{token_of(site)}"' for site in sites),
    ]
    path = folder / "gdfed.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def flat_reference(tmp: Path, init: State, deltas: Deltas, rounds: int) -> list[State]:
    """a then b under one aggregator, ``rounds`` rounds: what the root must publish."""
    h = Harness(tmp, KILL_SAMPLES, init=init, round=RoundPolicy(min_sites=2))
    try:
        h.join_all()
        out = []
        for r in range(1, rounds + 1):
            for site in KILL_SAMPLES:
                head, payload = h[site].header(deltas[r, site], round=r, base=r - 1)
                assert h[site].push(head, payload).accepted
            assert h.admin.wait_round(r, timeout=60).state == PUBLISHED
            out.append(h["a"].snapshot()[1])
        return out
    finally:
        h.close()


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["accepted_here", "accepted_at_root"])
def test_an_intermediate_killed_after_accepting_an_upload_is_counted_once(
    tmp_path: Path, kill_at: str
) -> None:
    """SIGKILL the intermediate (``gdfed serve``) once it has accepted a's upload, or once the root
    has accepted its partial sum; restarted on its state directory, the root counts the upload once."""
    init = small_state()
    deltas = make_deltas(init, list(KILL_SAMPLES), grid=False)
    reference = flat_reference(tmp_path / "flat", init, deltas, rounds=2)
    port = free_port()
    target = f"127.0.0.1:{port}"
    root = Aggregator(root_config(tmp_path / "root", ["i1"], init))
    config = intermediate_toml(tmp_path, port=port, root=root.target, site_id="i1", sites=list(KILL_SAMPLES))
    daemon = Daemon(config, tmp_path / "i1.log")
    sites = {name: ScriptedSite(target, name, n) for name, n in KILL_SAMPLES.items()}
    admin, inter_admin = AdminClient(root.target), AdminClient(target)
    try:
        daemon.start(target)
        watcher = admin.watch()
        for site in sites.values():
            site.join()
            site.start_beating()
        assert sites["a"].await_round(after=0).round == 1
        uploads = {name: site.header(deltas[1, name], round=1, base=0) for name, site in sites.items()}
        assert sites["a"].push(*uploads["a"]).accepted
        if kill_at == "accepted_at_root":
            assert sites["b"].push(*uploads["b"]).accepted
            watcher.first("upload_accepted", round=1, site="i1", timeout=60)
        daemon.kill()
        daemon.start(target)
        for site in sites.values():
            site.ready()
        if kill_at == "accepted_here":
            # a's upload survived the kill: pushed again, it is a duplicate; b's closes the round.
            receipt = sites["a"].push(*uploads["a"])
            assert receipt.accepted and receipt.duplicate
            assert sites["b"].push(*uploads["b"]).accepted
        for r in (1, 2):
            if r == 2:
                for name, site in sites.items():
                    assert site.await_round(after=1).round == 2
                    assert site.push(*site.header(deltas[2, name], round=2, base=1)).accepted
            status = admin.wait_round(r, timeout=60)
            assert status.state == PUBLISHED, status.failure_reason
            [part] = [p for p in status.participants if p.accepted]
            assert (part.site_id, part.sites, part.sample_count) == ("i1", 2, 30)
            assert status.samples == 30  # a's 10 samples and b's 20, once
            assert inter_admin.wait_round(r, timeout=60).state == PUBLISHED
            number, state = sites["a"].snapshot()
            assert number == r
            assert_same_bits(state, reference[r - 1])  # one intermediate: its sum is the flat sum
        assert [e for e in watcher.events if e[0] == "upload_accepted" and e[2] == "i1"] == [
            ("upload_accepted", 1, "i1"),
            ("upload_accepted", 2, "i1"),
        ]
    finally:
        for site in sites.values():
            site.close()
        admin.close()
        inter_admin.close()
        daemon.cleanup()
        root.stop()
        print(daemon.log())  # shown by pytest only when the test failed


# ---------------------------------------------------------------- 256 sites under 4 intermediates


class SharedSite(ScriptedSite):
    """A ScriptedSite on a channel it shares with the other sites of its intermediate."""

    def __init__(self, channel: grpc.Channel, site_id: str, samples: int) -> None:
        super().__init__("127.0.0.1:1", site_id, samples)
        self.channel.close()
        self.channel = channel
        self.stub = federation_pb2_grpc.FederationStub(channel)

    def close(self) -> None:
        self.stop_beating()  # the channel is the test's


@pytest.mark.slow
def test_256_sites_under_4_intermediates_finish_3_rounds(tmp_path: Path) -> None:
    init = small_state(layers=1, width=8)
    under = {f"i{j}": [f"s{j}-{k}" for k in range(64)] for j in range(4)}
    samples = {
        site: 1 + (7 * n) % 13 for n, site in enumerate(s for members in under.values() for s in members)
    }
    deltas: Deltas = {
        (r, site): random_delta(1000 * r + n, init)
        for r in range(1, ROUNDS + 1)
        for n, site in enumerate(samples)
    }
    with contextlib.ExitStack() as stack:
        root = Aggregator(root_config(tmp_path / "root", list(under), init))
        stack.callback(root.stop)
        admin = stack.enter_context(AdminClient(root.target))
        sites: dict[str, SharedSite] = {}
        admins: dict[str, AdminClient] = {}
        for name, members in under.items():
            # Sites that do not beat stay alive for 10 x 30 s: the test's threads push, they do not beat.
            config = intermediate_config(
                tmp_path / name,
                root.target,
                name,
                members,
                round=RoundPolicy(min_sites=len(members)),
                heartbeat_interval_s=30.0,
                missed_beats=10,
            )
            agg = Aggregator(config)
            stack.callback(agg.stop)
            admins[name] = stack.enter_context(AdminClient(agg.target))
            channel = grpc.insecure_channel(agg.target)
            stack.callback(channel.close)
            sites |= {s: SharedSite(channel, s, samples[s]) for s in members}
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda site: site.join(), sites.values()))
            theta = {k: v.double() for k, v in init.items()}
            bound = {k: torch.zeros_like(v) for k, v in theta.items()}
            for r in range(1, ROUNDS + 1):
                for members in under.values():
                    assert sites[members[0]].await_round(after=r - 1).round == r

                def push(site: SharedSite, r: int = r) -> bool:
                    receipt = site.push(*site.header(deltas[r, site.site_id], round=r, base=r - 1))
                    return bool(receipt.accepted and not receipt.duplicate)

                assert all(pool.map(push, sites.values()))
                status = admin.wait_round(r, timeout=120)
                assert status.state == PUBLISHED, status.failure_reason
                assert status.samples == sum(samples.values())
                assert sorted((p.site_id, p.sites) for p in status.participants if p.accepted) == [
                    (name, 64) for name in under
                ]
                for name in under:
                    assert admins[name].wait_round(r, timeout=120).state == PUBLISHED
                e = mean_bound(deltas, samples, r)
                total = sum(samples.values())
                for k in theta:
                    step = torch.zeros_like(theta[k])
                    for site, n in samples.items():
                        step += n * deltas[r, site][k].double()
                    theta[k] = theta[k] + step / total
                    bound[k] = bound[k] + e[k] + theta[k].abs() * 2.0**-23 + 2.0**-149
            with ScriptedSite(root.target, "i0") as fetcher:
                _, root_state = fetcher.snapshot()
            assert_within(root_state, {k: v.float() for k, v in theta.items()}, bound)
            for members in under.values():
                number, state = sites[members[0]].snapshot()
                assert number == ROUNDS
                assert_same_bits(state, root_state)
