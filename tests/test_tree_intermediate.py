"""An intermediate aggregator (server.upstream): a site to its parent, an aggregator to its sites.

Real aggregators on 127.0.0.1 (a root with ``[tree] intermediates`` and an
intermediate with ``[upstream]``), scripted sites pushing fixed deltas. With
one intermediate holding every site and fp32 running sums at both levels, the
tree computes the flat federation's mean bit for bit: the intermediate folds
n_a·Δ_a then n_b·Δ_b exactly as a flat aggregator would, sends that fp32 sum
exact, and the root adds it to zero with weight 1 (exact) before dividing by
Σ n_i. Every aggregator of the tree then holds the root's state bit for bit
(differences are applied as a worker applies them).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch

from common.delta import DeltaKind
from common.pb.gradualdiff.v1 import admin_pb2, delta_pb2, federation_pb2
from common.spec import Method, TrainingSpec
from server.config import ConfigError, RoundPolicy, ServerConfig
from server.config_file import load_config
from server.records import UploadRecord, UploadState
from server.tree_config import TreeConfig
from server.upstream.forward import Forwarded, ForwardRecord, Ledger, send, upload_id_of
from server.upstream.link import UpstreamLink
from server.upstream.settings import UpstreamConfig
from tests.scripted import (
    ADMIN_TOKEN,
    AdminClient,
    Aggregator,
    Daemon,
    ScriptedSite,
    State,
    add,
    apply_fetched,
    assert_same_bits,
    free_port,
    make_config,
    partial_delta,
    random_delta,
    small_state,
    token_of,
    wait_for,
    weighted_mean,
    write_daemon_config,
    write_state,
)

PUBLISHED = federation_pb2.ROUND_STATE_PUBLISHED
FAILED = federation_pb2.ROUND_STATE_FAILED
AGGREGATING = federation_pb2.ROUND_STATE_AGGREGATING
INIT = small_state()


def root_config(
    tmp: Path, intermediates: Sequence[str], sites: Sequence[str] = (), **overrides: object
) -> ServerConfig:
    tmp.mkdir(parents=True, exist_ok=True)
    return make_config(
        tmp,
        [*intermediates, *sites],
        init=INIT,
        tree=TreeConfig(intermediates=tuple(intermediates)),
        **overrides,
    )


def intermediate_config(
    tmp: Path, parent: str, site_id: str, sites: Sequence[str], **overrides: object
) -> ServerConfig:
    """An intermediate of ``parent`` as ``site_id``: no init_state, run id or [training] of its own."""
    base = ServerConfig(
        listen="127.0.0.1:0",
        state_dir=tmp / "state",
        site_tokens={s: token_of(s) for s in sites},
        admin_token=ADMIN_TOKEN,
        heartbeat_interval_s=0.5,
        missed_beats=3,
        tick_s=0.05,
        upstream=UpstreamConfig(address=parent, site_id=site_id, token=token_of(site_id), max_wait_s=20.0),
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


class Tree:
    """A root, one intermediate ``inter`` under it, and scripted sites joined to the intermediate."""

    def __init__(
        self, tmp: Path, sites: dict[str, int], *, root_sites: Sequence[str] = (), **root: object
    ) -> None:
        self.root = Aggregator(root_config(tmp / "root", ["inter"], root_sites, **root))
        try:
            self.inter = Aggregator(
                intermediate_config(tmp / "inter", self.root.target, "inter", list(sites))
            )
        except BaseException:
            self.root.stop()
            raise
        self.sites = {s: ScriptedSite(self.inter.target, s, n) for s, n in sites.items()}
        self.root_admin = AdminClient(self.root.target)
        self.admin = AdminClient(self.inter.target)
        self.upstream = ScriptedSite(self.root.target, "inter")  # the root as the intermediate sees it

    def join_all(self) -> None:
        for site in self.sites.values():
            site.join()
            site.start_beating()

    def push(self, site: str, delta: State, *, round: int, base: int) -> None:
        header, payload = self.sites[site].header(delta, round=round, base=base)
        receipt = self.sites[site].push(header, payload)
        assert receipt.accepted, receipt

    def root_state(self) -> tuple[int, State]:
        return self.upstream.snapshot()

    def close(self) -> None:
        for site in [*self.sites.values(), self.upstream]:
            site.close()
        self.admin.close()
        self.root_admin.close()
        self.inter.stop()
        self.root.stop()


MakeTree = Callable[..., Tree]


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[MakeTree]:
    """A factory of Trees (each in its own folder), all closed at the end."""
    made: list[Tree] = []

    def make(sites: dict[str, int], **kw: object) -> Tree:
        made.append(Tree(tmp_path / f"tree{len(made)}", sites, **kw))  # type: ignore[arg-type]
        return made[-1]

    try:
        yield make
    finally:
        for t in made:
            t.close()


# ---------------------------------------------------------------- configuration


def test_upstream_settings_are_checked_where_they_are_built(tmp_path: Path) -> None:
    parent = "127.0.0.1:50051"
    with pytest.raises(ConfigError) as no_id:
        UpstreamConfig(address=parent, token="t")
    assert no_id.value.field == "upstream.site_id"
    with pytest.raises(ConfigError) as no_token:
        UpstreamConfig(address=parent, site_id="eu-1")
    assert no_token.value.field == "upstream.token_file"
    with pytest.raises(ConfigError) as half_tls:
        UpstreamConfig(address=parent, site_id="eu-1", token="t", cert=tmp_path / "c.pem")
    assert half_tls.value.field == "upstream.key"
    upstream = UpstreamConfig(address=parent, site_id="eu-1", token="t")
    refused = {
        "optimizer": {"optimizer": replace(ServerConfig().optimizer, name="fedadam", lr=0.01)},  # type: ignore[arg-type]
        "rounds": {"rounds": 3},
        "init_state": {"init_state": tmp_path / "init.safetensors"},
        "training.method": {"training": TrainingSpec(method=Method.FEDCYBGD)},
    }
    for field, settings in refused.items():
        with pytest.raises(ConfigError) as refusal:
            ServerConfig(upstream=upstream, **settings)  # type: ignore[arg-type]
        assert refusal.value.field == field, refusal.value


def test_an_intermediate_config_file_takes_no_training_section(tmp_path: Path) -> None:
    (tmp_path / "parent.token").write_text("secret-of-eu-1\n")
    path = tmp_path / "inter.toml"
    path.write_text('[upstream]\naddress = "root:50051"\nsite_id = "eu-1"\ntoken_file = "parent.token"\n')
    config = load_config(path, {"upstream.forward_margin_s": 30.0})
    assert config.upstream.token == "secret-of-eu-1"  # the file, found beside the config
    assert config.upstream.forward_margin_s == 30.0
    path.write_text(path.read_text() + "\n[training]\nlocal_steps = 5\n")
    with pytest.raises(ConfigError) as refusal:
        load_config(path, {})
    assert refusal.value.field == "training"


def test_ledger_keeps_a_forward_record_and_settles_its_payload(tmp_path: Path) -> None:
    site = ScriptedSite("127.0.0.1:1", "eu-1")  # never connects: only its encoder is used
    header, payload = site.header(random_delta(1, INIT), round=3, base=2, upload_id=upload_id_of("eu-1", 3))
    site.close()
    ledger = Ledger(tmp_path / "upstream")
    ledger.payload(3).write_bytes(payload)
    record = ForwardRecord(
        3, Forwarded.READY, replace(header, kind=DeltaKind.PARTIAL_SUM, sites=2), payload.layout
    )
    ledger.put(record)
    assert Ledger(tmp_path / "upstream").get(3) == record  # as a restarted daemon reads it
    ledger.put(replace(record, status=Forwarded.REFUSED, reason="round 3 is aggregating"))
    ledger.settle(3)
    assert not ledger.payload(3).exists()
    assert ledger.get(3) == replace(record, status=Forwarded.REFUSED, reason="round 3 is aggregating")
    assert ledger.get(4) is None


def test_an_intermediate_refuses_a_parent_that_trains_what_a_tree_cannot(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    spec = TrainingSpec(method=Method.FEDCYBGD)
    layered = {f"model.layers.{i}.q.weight": torch.zeros(4, 4) for i in range(2)}  # FedCyBGD's blocks
    with (
        Aggregator(make_config(tmp_path / "root", ["inter"], init=layered, training=spec)) as root,
        pytest.raises(ConfigError) as refusal,
    ):
        Aggregator(intermediate_config(tmp_path / "inter", root.target, "inter", ["a"]))
    assert refusal.value.field == "training.method"
    assert "fedcybgd" in refusal.value.message and root.target in refusal.value.message


def test_a_partial_sum_resumes_at_the_roots_offset_and_is_counted_once(tmp_path: Path) -> None:
    """The forward of a sum whose first stream was cut: it sends the rest from the root's committed
    offset; sent again (a restart that lost its ledger's last word), the root answers duplicate."""
    (tmp_path / "root").mkdir()
    with (
        Aggregator(root_config(tmp_path / "root", ["inter"])) as root,
        ScriptedSite(root.target, "inter", 40) as inter,
    ):
        inter.join()
        total = random_delta(31, INIT)  # stands for Σ n_i·Δ_i of two sites, 40 samples
        header, payload = inter.header(
            total, round=1, base=0, upload_id=upload_id_of("inter", 1), shard_bytes=4096
        )
        header = replace(header, kind=DeltaKind.PARTIAL_SUM, sites=2)
        messages = list(inter.chunks(header, payload, chunk_bytes=1024))
        with contextlib.suppress(grpc.RpcError):  # a stream cut half way
            inter.push_messages(iter(messages[: len(messages) // 2]))
        committed = inter.offset(header.upload_id).committed_offset
        assert 0 < committed < len(payload)
        ledger = Ledger(tmp_path / "upstream")
        ledger.payload(1).write_bytes(payload)
        record = ForwardRecord(1, Forwarded.READY, header, payload.layout)
        link = UpstreamLink(
            UpstreamConfig(address=root.target, site_id="inter", token=token_of("inter")), threading.Event()
        )
        try:
            assert send(record, ledger, link).status is Forwarded.ACCEPTED
            assert send(record, ledger, link).status is Forwarded.ACCEPTED  # a duplicate receipt
        finally:
            link.close()
        assert ledger.get(1) == replace(record, status=Forwarded.ACCEPTED)
        with AdminClient(root.target) as admin:
            report = admin.wait_round(1)
        assert report.state == PUBLISHED and report.samples == 40, report
        uploads = root.coordinator.store.select(UploadRecord, "round = ?", (1,))
        assert [(u.upload_id, u.state) for u in uploads] == [(header.upload_id, UploadState.ACCEPTED)]
        # Weight 1 for the sum, Σ n_i for the round: the mean is Σ n_i·Δ_i / Σ n_i.
        _, state = inter.snapshot()
        assert_same_bits(state, add(INIT, {k: v.clone().div_(40.0) for k, v in total.items()}))


# ---------------------------------------------------------------- rounds through the tree


@pytest.mark.slow
def test_an_intermediate_relays_rounds_bit_for_bit(tree: MakeTree) -> None:
    t = tree({"a": 10, "b": 30})
    t.join_all()
    states = {0: dict(INIT)}
    for number in (1, 2):
        # Small differences: a chain of them is worth serving rather than a snapshot (server.fetching).
        deltas = {
            s: partial_delta(10 * number + i, INIT, ["layers.0.q.weight"]) for i, s in enumerate(t.sites)
        }
        for scripted in t.sites.values():
            spec = scripted.await_round(after=number - 1)
            assert (spec.round, spec.base_round, spec.deadline_unix_ms) == (number, number - 1, 0), spec
        for name, delta in deltas.items():  # one after another: the intermediate folds in this order
            t.push(name, delta, round=number, base=number - 1)
        report = t.root_admin.wait_round(number)
        assert report.state == PUBLISHED, report.failure_reason
        upload = t.root.coordinator.store.get(UploadRecord, upload_id_of("inter", number))
        assert upload is not None and upload.state is UploadState.ACCEPTED
        assert (upload.kind, upload.sites, upload.sample_count) == (int(DeltaKind.PARTIAL_SUM), 2, 40)
        assert report.samples == 40
        mean = weighted_mean([(deltas["a"], 10), (deltas["b"], 30)], dtype=torch.float32)
        states[number] = add(states[number - 1], mean)
        held, root_state = t.root_state()
        assert held == number
        assert_same_bits(root_state, states[number])  # the flat federation's result, bit for bit
        assert t.admin.wait_round(number).state == PUBLISHED
        got, here = t.sites["a"].snapshot()
        assert got == number
        assert_same_bits(here, root_state)  # the intermediate serves the root's state
    # A site that held round 1 gets round 2's difference from the intermediate: applied as a worker
    # applies it, it gives the root's state.
    fetched = t.sites["b"].fetch(have=1)
    assert [(h.kind, h.round, h.base_round) for h, _ in fetched] == [(DeltaKind.DIFF, 2, 1)]
    assert_same_bits(apply_fetched(states[1], fetched), states[2])


@pytest.mark.slow
def test_a_partial_sum_the_root_no_longer_takes_fails_the_round_here_and_the_next_goes_on(
    tree: MakeTree,
) -> None:
    """The root's round closes while the partial sum waits for an upload slot: the root answers
    it as a round gone by, the intermediate fails its round naming the root's deadline, tells its
    site in its beats, and runs the root's next round."""
    t = tree({"a": 10}, root_sites=["other"], max_concurrent_uploads=1, round=RoundPolicy(deadline_s=600))
    other = ScriptedSite(t.root.target, "other", samples=5)
    try:
        other.join()
        other.start_beating()
        t.join_all()
        local = t.sites["a"].await_round(after=0).deadline_unix_ms
        parent = t.upstream.await_round(after=0).deadline_unix_ms
        # Its own deadline keeps 10 % of the root's round (600 s, nearly all left) for forwarding.
        assert parent - 61_000 < local < parent - 59_000, (parent, local)
        # "other" holds the root's only upload slot with a stream it does not finish.
        release = threading.Event()
        header, payload = other.header(random_delta(7, INIT), round=1, base=0)
        chunks = list(other.chunks(header, payload, chunk_bytes=1024))

        def held() -> Iterator[delta_pb2.DeltaChunk]:
            yield chunks[0]
            release.wait(30)

        holder = threading.Thread(target=lambda: _ignore_errors(lambda: other.push_messages(held())))
        holder.start()
        wait_for(
            lambda: t.root_admin.round(1).state == federation_pb2.ROUND_STATE_COLLECTING,
            what="other's upload",
        )
        t.push("a", random_delta(8, INIT), round=1, base=0)
        ledger = Ledger(t.inter.config.state_dir / "upstream")
        wait_for(lambda: ledger.get(1), what="the intermediate's partial sum of round 1")
        t.root_admin.stub.CloseRound(
            admin_pb2.ControlRequest(reason="test"), metadata=t.root_admin.metadata, timeout=10
        )
        assert t.root_admin.wait_round(1).state == FAILED
        release.set()
        holder.join(timeout=30)
        report = t.admin.wait_round(1)
        assert report.state == FAILED
        assert "deadline" in report.failure_reason and "1 upload(s)" in report.failure_reason, (
            report.failure_reason
        )
        record = ledger.get(1)
        assert record is not None and record.status is Forwarded.REFUSED
        beat = t.sites["a"].beat(round=1)
        assert beat.message.startswith("round 1:"), beat.message
        uploads = t.root.coordinator.store.select(UploadRecord, "upload_id = ?", (upload_id_of("inter", 1),))
        assert all(u.state is not UploadState.ACCEPTED for u in uploads)
        # The root's next round goes on, through the intermediate too.
        spec = t.sites["a"].await_round(after=1)
        assert (spec.round, spec.base_round) == (2, 0), spec
        delta = random_delta(9, INIT)
        t.push("a", delta, round=2, base=0)
        header, payload = other.header(random_delta(10, INIT), round=2, base=0)
        assert other.push(header, payload).accepted
        report = t.root_admin.wait_round(2)
        assert report.state == PUBLISHED and report.samples == 15, report
        assert t.admin.wait_round(2).state == PUBLISHED
        _, root_state = t.root_state()
        _, here = t.sites["a"].snapshot()
        assert_same_bits(here, root_state)
    finally:
        other.close()


def _ignore_errors(call: Callable[[], object]) -> None:
    with contextlib.suppress(grpc.RpcError):  # the held stream ends unfinished, on purpose
        call()


@pytest.mark.slow
def test_an_intermediate_killed_after_accepting_an_upload_forwards_it_once(tmp_path: Path) -> None:
    """``gdfed serve`` with [upstream], SIGKILLed with one of its two uploads accepted: restarted, it
    keeps that upload, takes the other, and the root counts the partial sum of both once."""
    (tmp_path / "root").mkdir()
    port = free_port()
    target = f"127.0.0.1:{port}"
    (tmp_path / "inter.token").write_text(token_of("inter") + "\n")
    config = tmp_path / "inter.toml"
    config.write_text(
        "\n".join(
            [
                f'listen = "{target}"',
                'state_dir = "inter-state"',
                "heartbeat_interval_s = 0.5",
                "missed_beats = 3",
                "tick_s = 0.05",
                f'admin_token = "{ADMIN_TOKEN}"',
                "[upstream]",
                'site_id = "inter"',
                'token_file = "inter.token"',
                "ADDRESS",
                "[sites]",
                *(f'{s} = "{token_of(s)}"' for s in ("a", "b")),
            ]
        )
        + "\n"
    )
    deltas = {"a": random_delta(21, INIT), "b": random_delta(22, INIT)}
    with Aggregator(root_config(tmp_path / "root", ["inter"])) as root:
        config.write_text(config.read_text().replace("ADDRESS", f'address = "{root.target}"'))
        daemon = Daemon(config, tmp_path / "inter.log")
        sites = {s: ScriptedSite(target, s, n) for s, n in (("a", 10), ("b", 30))}
        root_admin = AdminClient(root.target)
        try:
            daemon.start(target)
            _join_and_push_a(sites, deltas)
            daemon.kill()
            daemon.start(target)
            sites["b"].ready()
            header, payload = sites["b"].header(deltas["b"], round=1, base=0)
            assert sites["b"].push(header, payload).accepted
            report = root_admin.wait_round(1, timeout=60)
            assert report.state == PUBLISHED, report.failure_reason
            uploads = root.coordinator.store.select(UploadRecord, "round = ?", (1,))
            assert [(u.upload_id, u.state, u.sample_count, u.sites) for u in uploads] == [
                (upload_id_of("inter", 1), UploadState.ACCEPTED, 40, 2)
            ]
            want = add(INIT, weighted_mean([(deltas["a"], 10), (deltas["b"], 30)], dtype=torch.float32))
            with ScriptedSite(root.target, "inter") as upstream:
                _, root_state = upstream.snapshot()
            assert_same_bits(root_state, want)
            _, here = wait_for(lambda: _published_here(sites["a"], 1), timeout=30, what="round 1 here")
            assert_same_bits(here, root_state)
        finally:
            for site in sites.values():
                site.close()
            root_admin.close()
            daemon.cleanup()


def _join_and_push_a(sites: dict[str, ScriptedSite], deltas: dict[str, State]) -> None:
    """Every site joins its intermediate and sees round 1 open; a's upload is accepted."""
    for site in sites.values():
        site.join()
        site.start_beating()
        assert site.await_round(after=0).round == 1
    header, payload = sites["a"].header(deltas["a"], round=1, base=0)
    assert sites["a"].push(header, payload).accepted


def _published_here(site: ScriptedSite, number: int) -> tuple[int, State] | None:
    held, state = site.snapshot()
    return (held, state) if held == number else None


@pytest.mark.slow
def test_a_mid_tier_relays_a_leaf_intermediates_sum_and_its_own_sites(tmp_path: Path) -> None:
    """root ← mid ([upstream] and [tree]) ← leaf ([upstream]) ← sites a, b; site c under mid.

    The mid tier folds the leaf's partial sum with weight 1 beside c's upload and sends one
    partial sum of all three up; every tier then holds the root's state bit for bit.
    """
    root = Aggregator(root_config(tmp_path / "root", ["mid"]))
    tiers = [root]
    clients: list[ScriptedSite | AdminClient] = []
    try:
        mid = Aggregator(
            replace(
                intermediate_config(tmp_path / "mid", root.target, "mid", ["leaf", "c"]),
                tree=TreeConfig(intermediates=("leaf",)),
            )
        )
        tiers.append(mid)
        leaf = Aggregator(intermediate_config(tmp_path / "leaf", mid.target, "leaf", ["a", "b"]))
        tiers.append(leaf)
        samples = {"a": 10, "b": 30, "c": 20}
        sites = {s: ScriptedSite(leaf.target if s in "ab" else mid.target, s, n) for s, n in samples.items()}
        root_view = ScriptedSite(root.target, "mid")  # the root as the mid tier sees it
        root_admin, mid_admin = AdminClient(root.target), AdminClient(mid.target)
        clients += [*sites.values(), root_view, root_admin, mid_admin]
        for site in sites.values():
            site.join()
            site.start_beating()
        deltas = {s: partial_delta(40 + i, INIT, ["layers.0.q.weight"]) for i, s in enumerate(samples)}
        for name, site in sites.items():
            spec = site.await_round(after=0)
            assert (spec.round, spec.base_round) == (1, 0), (name, spec)
            header, payload = site.header(deltas[name], round=1, base=0)
            assert site.push(header, payload).accepted

        report = root_admin.wait_round(1, timeout=60)
        assert report.state == PUBLISHED, report.failure_reason
        assert report.samples == 60
        upload = root.coordinator.store.get(UploadRecord, upload_id_of("mid", 1))
        assert upload is not None and upload.state is UploadState.ACCEPTED
        assert (upload.kind, upload.sites, upload.sample_count) == (int(DeltaKind.PARTIAL_SUM), 3, 60)
        from_leaf = mid.coordinator.store.get(UploadRecord, upload_id_of("leaf", 1))
        assert from_leaf is not None and (from_leaf.kind, from_leaf.sites) == (int(DeltaKind.PARTIAL_SUM), 2)
        held, root_state = root_view.snapshot()
        assert held == 1
        # Σ n_i·Δ_i formed in another order than a flat aggregator's: equal to fp32 rounding.
        mean = weighted_mean([(deltas[s], n) for s, n in samples.items()])
        for name, value in add(INIT, mean).items():
            torch.testing.assert_close(root_state[name], value.to(torch.float32), rtol=1e-6, atol=1e-7)
        assert mid_admin.wait_round(1, timeout=30).state == PUBLISHED
        for name in ("a", "c"):  # a fetches from the leaf, c from the mid tier: the root's bits
            got = wait_for(
                functools.partial(_published_here, sites[name], 1), timeout=30, what=f"round 1 at {name}"
            )
            assert_same_bits(got[1], root_state)
    finally:
        for client in clients:
            client.close()
        for tier in reversed(tiers):
            tier.stop()


@pytest.mark.slow
def test_a_root_killed_while_an_intermediate_closes_its_round_takes_the_sum_once_restarted(
    tmp_path: Path,
) -> None:
    """The root (``gdfed serve`` with [tree]) is SIGKILLed between the intermediate's two uploads:
    the intermediate closes its round with the root down, retries joining until the root is back,
    then sends its partial sum, which the restarted root counts once (the flat mean's bits)."""
    port = free_port()
    root_target = f"127.0.0.1:{port}"
    (tmp_path / "root").mkdir()
    config = write_daemon_config(
        tmp_path / "root" / "root.toml",
        port=port,
        init_state=write_state(tmp_path / "root" / "init.safetensors", INIT),
        sites=["inter"],
    )
    with config.open("a") as toml:
        toml.write('\n[tree]\nintermediates = ["inter"]\n')
    root = Daemon(config, tmp_path / "root.log")
    deltas = {"a": random_delta(31, INIT), "b": random_delta(32, INIT)}
    clients: list[ScriptedSite | AdminClient] = []
    inter: Aggregator | None = None
    try:
        root.start(root_target)
        inter = Aggregator(intermediate_config(tmp_path / "inter", root_target, "inter", ["a", "b"]))
        sites = {s: ScriptedSite(inter.target, s, n) for s, n in (("a", 10), ("b", 30))}
        clients += sites.values()
        _join_and_push_a(sites, deltas)
        root.kill()
        header, payload = sites["b"].header(deltas["b"], round=1, base=0)
        assert sites["b"].push(header, payload).accepted  # the intermediate's round closes: root down
        inter_admin = AdminClient(inter.target)
        clients.append(inter_admin)
        wait_for(
            lambda: inter_admin.status().current_state == AGGREGATING, timeout=30, what="the close, root down"
        )
        time.sleep(1.0)  # its forward meets the dead root, and retries
        root.start(root_target)
        root_admin = AdminClient(root_target)
        clients.append(root_admin)
        report = root_admin.wait_round(1, timeout=90)
        assert report.state == PUBLISHED, report.failure_reason
        assert report.samples == 40  # the partial sum of a and b, counted once
        assert [(p.site_id, p.accepted, p.sample_count) for p in report.participants] == [("inter", True, 40)]
        with ScriptedSite(root_target, "inter") as upstream:
            _, root_state = upstream.snapshot()
        want = add(INIT, weighted_mean([(deltas["a"], 10), (deltas["b"], 30)], dtype=torch.float32))
        assert_same_bits(root_state, want)
        _, here = wait_for(
            lambda: _published_here(sites["a"], 1), timeout=30, what="round 1 at the intermediate"
        )
        assert_same_bits(here, root_state)
    finally:
        for client in clients:
            client.close()
        if inter is not None:
            inter.stop()
        root.cleanup()
        print(root.log())  # shown by pytest only when the test failed
