"""Tree benchmark: one round of 64 sites, flat (one daemon) against a tree (a root and 4 intermediates).

Every aggregator is a real ``gdfed serve`` process on 127.0.0.1. The state is the
first ``--blocks`` transformer blocks of GPT-2 small in fp32 (2: 14.2M parameters,
56.7 MB); the sites push one of ``DISTINCT`` exact-codec deltas each, under their own upload
ids, all at once from threads of this process; every intermediate gets each of them as often
(so its partial sum is a sum of different deltas, compressed as such).

- flat: the 64 sites push to the root;
- tree: 16 sites push to each of 4 intermediates; each pushes its partial sum
  (Σ n_i Δ_i, PARTIAL_SUM) to the root when its 16 are in, then adopts the root's
  published difference, which is when its sites can fetch the round.

Measured, at the root: its peak RSS (VmRSS sampled every 50 ms over the round) and VmHWM;
its ingest time, first chunk → last acceptance (from its own records: each accepted
upload's acceptance time, from the Watch stream, less its upload_seconds); its CPU-seconds over the
round; and the round time, the sites' first chunk → the root's publication (tree: also → the last
intermediate's adoption). All daemons and the senders share this machine's cores.

    python -m bench.tree [--sites 64] [--intermediates 4] [--blocks 2] [--quick]

Writes the "tree" section of docs/benchmarks.md and keys ``tree_*`` of docs/benchmarks.json.
"""

from __future__ import annotations

import argparse
import io
import math
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from safetensors.torch import save_file

from bench.aggregator import cpu_seconds, free_port, status_kib
from bench.workload import MB, gpt2_small_shapes, machine, realistic_delta, write_section
from common.channel import auth_metadata
from common.codec import encode, iter_chunks
from common.delta import Codec, DeltaHeader, DeltaKind, PayloadLayout
from common.pb.gradualdiff.v1 import admin_pb2, admin_pb2_grpc, federation_pb2, federation_pb2_grpc
from common.serde import chunk_to_wire

ADMIN = "bench-admin"
PUSH = "/gradualdiff.v1.Federation/PushDelta"
SAMPLES = 100  # per site
DISTINCT = 4  # different deltas among the sites
PUBLISHED = federation_pb2.ROUND_STATE_PUBLISHED


def block_shapes(blocks: int) -> dict[str, tuple[int, ...]]:
    """The first ``blocks`` transformer blocks of GPT-2 small (no embeddings)."""
    prefixes = tuple(f"transformer.h.{i}." for i in range(blocks))
    return {k: v for k, v in gpt2_small_shapes().items() if k.startswith(prefixes)}


def token(site: str) -> str:
    return f"token-{site}"


class Node:
    """One ``gdfed serve`` process, its admin stub and its Watch events (kind, site, unix_ms)."""

    def __init__(self, tmp: Path, name: str, config: str) -> None:
        self.name = name
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        folder = tmp / name
        folder.mkdir()
        path = folder / "gdfed.toml"
        path.write_text(
            f'listen = "{self.target}"\nstate_dir = "{folder / "state"}"\nrun_id = "bench-tree"\n'
            f'admin_token = "{ADMIN}"\nheartbeat_interval_s = 60.0\ntick_s = 0.05\n' + config
        )
        self.log = (folder / "daemon.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "common.cli", "serve", "--config", str(path)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.channel = grpc.insecure_channel(self.target)
        self.admin = admin_pb2_grpc.AdminStub(self.channel)
        self.meta = auth_metadata(ADMIN)
        self.events: list[tuple[str, str, int, int]] = []  # kind, site, round, unix_ms
        self._changed = threading.Condition()
        self._cancel: Callable[[], object] = lambda: None  # the Watch stream's

    def ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.status()
                break
            except grpc.RpcError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} did not start; see {self.log.name}") from None
                time.sleep(0.2)
        stream = self.admin.Watch(admin_pb2.WatchRequest(), metadata=self.meta)
        self._cancel = stream.cancel
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: Iterable[admin_pb2.RunEvent]) -> None:
        try:
            for event in stream:
                with self._changed:
                    self.events.append((event.kind, event.site_id, event.round, event.unix_ms))
                    self._changed.notify_all()
        except grpc.RpcError:
            pass

    def wait_event(self, kind: str, round_number: int, timeout: float = 600.0) -> int:
        """The unix_ms of the first ``kind`` event of ``round_number``, once it has come."""

        def found() -> int | None:
            return next((ms for k, _, r, ms in self.events if k == kind and r == round_number), None)

        with self._changed:
            if not self._changed.wait_for(lambda: found() is not None, timeout):
                raise RuntimeError(f"{self.name}: no {kind} of round {round_number} in {timeout}s")
            at = found()
            assert at is not None
            return at

    def wait_accepted(self, round_number: int, count: int, timeout: float = 600.0) -> None:
        """Return once ``count`` uploads of ``round_number`` are accepted here."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.accepted_ms(round_number)) >= count, timeout):
                raise RuntimeError(
                    f"{self.name}: {count} uploads of round {round_number} not in after {timeout}s"
                )

    def accepted_ms(self, round_number: int) -> dict[str, int]:
        with self._changed:
            return {s: ms for k, s, r, ms in self.events if k == "upload_accepted" and r == round_number}

    def status(self) -> admin_pb2.RunStatus:
        return self.admin.GetStatus(admin_pb2.StatusRequest(), metadata=self.meta, timeout=10)

    def round(self, number: int) -> admin_pb2.RoundStatus:
        return self.admin.GetRound(admin_pb2.GetRoundRequest(round=number), metadata=self.meta, timeout=10)

    def stop(self) -> None:
        self._cancel()
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.channel.close()
        self.log.close()


def sites_toml(sites: Sequence[str]) -> str:
    return "[sites]\n" + "".join(f'{s} = "{token(s)}"\n' for s in sites)


def root_config(init: Path, sites: Sequence[str], *, intermediates: bool) -> str:
    tree = "[tree]\nintermediates = [" + ", ".join(f'"{s}"' for s in sites) + "]\n" if intermediates else ""
    return (
        f'init_state = "{init}"\nrounds = 1\n[round]\nmin_sites = {len(sites)}\n'
        f"min_sites_to_open = {len(sites)}\n{tree}{sites_toml(sites)}"
    )


def intermediate_config(tmp: Path, name: str, root: Node, sites: Sequence[str]) -> str:
    token_file = tmp / f"{name}.upstream.token"
    token_file.write_text(token(name) + "\n")
    return (
        f'[round]\nmin_sites = {len(sites)}\n[upstream]\naddress = "{root.target}"\nsite_id = "{name}"\n'
        f'token_file = "{token_file}"\n{sites_toml(sites)}'
    )


@dataclass
class Site:
    site_id: str
    channel: grpc.Channel
    stub: federation_pb2_grpc.FederationStub
    push_call: grpc.StreamUnaryMultiCallable[bytes, federation_pb2.PushReceipt]
    meta: tuple[tuple[str, str], ...]
    run_id: str = ""


def join(target: str, site_id: str) -> Site:
    channel = grpc.insecure_channel(target)
    stub = federation_pb2_grpc.FederationStub(channel)
    push_call: grpc.StreamUnaryMultiCallable[bytes, federation_pb2.PushReceipt] = channel.stream_unary(
        PUSH, request_serializer=None, response_deserializer=federation_pb2.PushReceipt.FromString
    )
    meta = tuple(auth_metadata(token(site_id)))
    site = Site(site_id, channel, stub, push_call, meta)
    reply = stub.Join(
        federation_pb2.JoinRequest(
            site_id=site_id, capabilities=federation_pb2.Capabilities(num_samples=SAMPLES)
        ),
        metadata=meta,
        timeout=60,
    )
    site.run_id = reply.run_id
    return site


def await_round(site: Site) -> federation_pb2.RoundSpec:
    spec: federation_pb2.RoundSpec = site.stub.AwaitRound(
        federation_pb2.AwaitRoundRequest(site_id=site.site_id, after_round=0, wait_ms=60_000),
        metadata=site.meta,
        timeout=70,
    )
    assert spec.round == 1, spec
    return spec


class Sampler:
    """Peak VmRSS of some processes, and the first one's CPU time, every 50 ms, on a thread."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.peaks = {pid: status_kib(pid, "VmRSS") for pid in pids}
        self.cpu = [(time.time(), cpu_seconds(pids[0]))]  # (wall clock, CPU-s) of pids[0]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        first = next(iter(self.peaks))
        while not self._stop.wait(0.05):
            for pid in self.peaks:
                self.peaks[pid] = max(self.peaks[pid], status_kib(pid, "VmRSS"))
            self.cpu.append((time.time(), cpu_seconds(first)))

    def cpu_between(self, start: float, end: float) -> float:
        """The first process's CPU-seconds from the last sample at or before ``start`` to the first at
        or after ``end`` (wall clock): at most a sample's 50 ms more on each side."""
        before = max((c for t, c in self.cpu if t <= start), default=self.cpu[0][1])
        after = min((c for t, c in self.cpu if t >= end), default=self.cpu[-1][1])
        return after - before

    def stop(self) -> dict[int, float]:
        """Peak RSS per pid, MB."""
        self._stop.set()
        self._thread.join()
        return {pid: kib * 1024 / MB for pid, kib in self.peaks.items()}


Payload = tuple[PayloadLayout, bytes]


def push_all(sites: Sequence[Site], payloads: Sequence[Payload]) -> float:
    """Every site pushes at once (released by a barrier), site<i> payload (i // DISTINCT) % DISTINCT:
    with 4 intermediates (site<i> under i % 4) each gets every payload as often. The release's
    wall-clock time."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(sites) + 1)

    def push(site: Site, layout: PayloadLayout, data: bytes) -> None:
        header = DeltaHeader(
            spec=layout.spec,
            run_id=site.run_id,
            round=1,
            site_id=site.site_id,
            upload_id=f"r1-{site.site_id}",
            sample_count=SAMPLES,
            base_round=0,
            kind=DeltaKind.DIFF,
        )
        messages = (chunk_to_wire(c) for c in iter_chunks(header, layout, io.BytesIO(data)))
        barrier.wait()
        try:
            site.push_call(messages, metadata=site.meta, timeout=1800)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=push, args=(s, *payloads[(int(s.site_id[4:]) // DISTINCT) % len(payloads)]))
        for s in sites
    ]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.time()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} upload(s) failed: {errors[0]}")
    return start


def ingest_window(root: Node) -> tuple[float, float]:
    """(first chunk, last acceptance) at the root, wall clock, from its records of round 1."""
    accepted = root.accepted_ms(1)
    seconds = {p.site_id: p.upload_seconds for p in root.round(1).participants if p.accepted}
    first = min(accepted[s] / 1000 - seconds[s] for s in seconds)
    return first, max(accepted[s] for s in seconds) / 1000


def run(tmp: Path, init: Path, payloads: Sequence[Payload], sites: int, fan: int) -> dict[str, float]:
    """One round of ``sites`` sites: flat (``fan`` 0) or under ``fan`` intermediates."""
    names = [f"site{i}" for i in range(sites)]
    nodes: list[Node] = []
    try:
        if fan == 0:
            root = Node(tmp, "flat-root", root_config(init, names, intermediates=False))
            nodes.append(root)
            root.ready()
            under = {root: names}
        else:
            tops = [f"inter{j}" for j in range(fan)]
            root = Node(tmp, "tree-root", root_config(init, tops, intermediates=True))
            nodes.append(root)
            root.ready()
            under = {}
            for j, name in enumerate(tops):
                mine = names[j::fan]
                node = Node(tmp, name, intermediate_config(tmp, name, root, mine))
                nodes.append(node)
                under[node] = mine
            for node in nodes[1:]:
                node.ready()
        clients = [join(node.target, s) for node, members in under.items() for s in members]
        for site in clients:
            await_round(site)
        baseline = status_kib(root.proc.pid, "VmRSS") * 1024 / MB
        sampler = Sampler([n.proc.pid for n in nodes])
        cpu0 = cpu_seconds(root.proc.pid)
        start = push_all(clients, payloads)
        root.wait_accepted(1, fan or sites)
        idle_cpu = cpu_seconds(root.proc.pid) - cpu0
        published = root.wait_event("round_published", 1) / 1000
        adopted = max(n.wait_event("round_published", 1) for n in nodes) / 1000
        cpu = cpu_seconds(root.proc.pid) - cpu0
        time.sleep(0.1)  # a CPU sample after the publication
        peaks = sampler.stop()
        first_chunk, last_accepted = ingest_window(root)
        ingest_cpu = sampler.cpu_between(first_chunk, last_accepted)
        detail = root.round(1)
        assert detail.state == PUBLISHED and detail.samples == sites * SAMPLES, detail
        row = {
            "fan": fan,
            "root_uploads": len(detail.participants),
            "root_in_MB": detail.bytes_in / MB,
            "root_ingest_s": last_accepted - first_chunk,
            "root_peak_rss_MB": peaks[root.proc.pid],
            "root_hwm_MB": status_kib(root.proc.pid, "VmHWM") * 1024 / MB,
            "root_baseline_MB": baseline,
            "root_cpu_s": cpu,
            "root_ingest_cpu_s": ingest_cpu,
            # Heartbeats, polls and joins while the sites push (0 flat, but for the samples' 50 ms).
            "root_before_ingest_cpu_s": max(0.0, idle_cpu - ingest_cpu),
            "round_s": published - start,
            "round_to_sites_s": adopted - start,
            "publish_s": detail.aggregate_seconds,
            "inter_peak_rss_MB": max((peaks[n.proc.pid] for n in nodes[1:]), default=0.0),
        }
        for site in clients:
            site.channel.close()
        return row
    finally:
        for node in reversed(nodes):
            node.stop()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sites", type=int, default=64)
    parser.add_argument("--intermediates", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=2, help="GPT-2-small transformer blocks in the state")
    parser.add_argument(
        "--quick", action="store_true", help="8 sites, 2 intermediates, 1 block; writes no docs"
    )
    args = parser.parse_args()
    if args.quick:
        args.sites, args.intermediates, args.blocks = 8, 2, 1
    shapes = block_shapes(args.blocks)
    params = sum(math.prod(s) for s in shapes.values())
    raw_MB = 4 * params / MB
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        init = tmp / "init.safetensors"
        save_file(realistic_delta(shapes, seed=1, step_std=0.02), str(init))
        payloads = []
        for seed in range(DISTINCT):
            sink = io.BytesIO()
            layout = encode(realistic_delta(shapes, seed=2 + seed), Codec(), sink)
            payloads.append((layout, sink.getvalue()))
        wire = sum(len(data) for _, data in payloads) / len(payloads)
        for fan in (0, args.intermediates):
            row = run(tmp, init, payloads, args.sites, fan)
            rows.append(row)
            print(
                f"{'flat' if not fan else f'tree of {fan}'}: root ingest {row['root_ingest_s']:.2f} s "
                f"({row['root_uploads']} uploads, {row['root_in_MB']:.0f} MB), peak RSS "
                f"{row['root_peak_rss_MB']:.0f} MB, CPU {row['root_cpu_s']:.1f} s, round {row['round_s']:.2f} s",
                flush=True,
            )
    flat, tree = rows
    table = _section(args, params, raw_MB, wire, flat, tree)
    print(table)
    if not args.quick:
        write_section("tree", table, _figures(args, raw_MB, wire, flat, tree))
        print("wrote docs/benchmarks.md and docs/benchmarks.json")
    return 0


def _section(
    args: argparse.Namespace,
    params: int,
    raw_MB: float,
    wire: float,
    flat: dict[str, float],
    tree: dict[str, float],
) -> str:
    fan, sites = args.intermediates, args.sites
    lines = [
        "## A tree of aggregators (bench/tree.py)",
        "",
        f"One round of {sites} sites: flat (one `gdfed serve`) against a tree (a root and {fan} intermediates, "
        f"{sites // fan} sites each), every daemon its own process on 127.0.0.1. State: the first {args.blocks} "
        f"transformer blocks of GPT-2 small, {params / 1e6:.1f}M fp32 parameters ({raw_MB:.1f} MB); each site "
        f"pushes one of {DISTINCT} different exact-codec deltas ({wire / MB:.1f} MB on the wire), all at once, "
        f"every intermediate each of them as often. Machine: {machine()}; the daemons and the senders share its cores.",
        "Root ingest: first chunk → last acceptance at the root (its records; in the tree the window spans the",
        "intermediates' closes, which differ); root ingest CPU-s: the root's user + system CPU over that window",
        "(sampled every 50 ms); *to publication*: its CPU from the sites' first chunk to its publication; round: the",
        "sites' first chunk → the root's publication; *to sites*: → the last aggregator to publish (in the tree, the",
        "last intermediate to adopt the root's difference, after which its sites fetch the round from it).",
        "",
        "| layout | uploads at the root | MB decoded / on the wire into the root | root ingest s | root ingest CPU-s "
        "| root CPU-s per decoded GB | root CPU-s to publication | root peak RSS MB | round s | to sites s "
        "| intermediate peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in (("flat", flat), (f"tree, {fan} intermediates", tree)):
        inter = f"{row['inter_peak_rss_MB']:.0f}" if row["fan"] else "—"
        lines.append(
            f"| {name} | {row['root_uploads']:.0f} | {row['root_uploads'] * raw_MB:.0f} / {row['root_in_MB']:.0f} | "
            f"{row['root_ingest_s']:.2f} | {row['root_ingest_cpu_s']:.2f} | "
            f"{row['root_ingest_cpu_s'] / (row['root_uploads'] * raw_MB / 1000):.2f} | {row['root_cpu_s']:.1f} | "
            f"{row['root_peak_rss_MB']:.0f} | {row['round_s']:.2f} | {row['round_to_sites_s']:.2f} | {inter} |"
        )
    partial = tree["root_in_MB"] / max(tree["root_uploads"], 1)
    lines += [
        "",
        f"The root's RSS after start: {flat['root_baseline_MB']:.0f} MB (flat), {tree['root_baseline_MB']:.0f} MB "
        f"(tree). In the tree the root spent {tree['root_before_ingest_cpu_s']:.2f} CPU-s before the first partial "
        "sum came (heartbeats, polls and joins of its intermediates while their sites pushed).",
        f"A partial sum on the wire: {partial:.1f} MB, {partial / raw_MB:.3f} of its fp32 size (a sum of "
        f"{sites // fan} different uploads, fp32, exact codec); one site's upload: {wire / MB:.1f} MB, "
        f"{wire / MB / raw_MB:.3f}.",
        f"The root ingests {fan} uploads instead of {sites}: its ingest time, CPU and RSS no longer grow with the "
        "sites. The round does not get shorter here: the intermediates decode the same bytes on the same 2 cores,",
        "and each intermediate polls the root while its round is under way (server/upstream/relay_loop.py,",
        "BUSY_POLL_S), so forwarding and adopting each wait for its next pass.",
    ]
    return "\n".join(lines)


def _figures(
    args: argparse.Namespace, raw_MB: float, wire: float, flat: dict[str, float], tree: dict[str, float]
) -> dict[str, object]:
    figures: dict[str, object] = {
        "tree_sites": args.sites,
        "tree_intermediates": args.intermediates,
        "tree_state_MB": round(raw_MB, 1),
        "tree_site_upload_MB": round(wire / MB, 2),
        "tree_partial_sum_MB": round(tree["root_in_MB"] / max(tree["root_uploads"], 1), 2),
    }
    for prefix, row in (("tree_flat", flat), ("tree_tree", tree)):
        figures |= {
            f"{prefix}_root_uploads": int(row["root_uploads"]),
            f"{prefix}_root_ingest_s": round(row["root_ingest_s"], 3),
            f"{prefix}_root_peak_rss_MB": round(row["root_peak_rss_MB"], 1),
            f"{prefix}_root_hwm_MB": round(row["root_hwm_MB"], 1),
            f"{prefix}_root_cpu_s": round(row["root_cpu_s"], 2),
            f"{prefix}_root_ingest_cpu_s": round(row["root_ingest_cpu_s"], 2),
            f"{prefix}_root_before_ingest_cpu_s": round(row["root_before_ingest_cpu_s"], 2),
            f"{prefix}_root_cpu_s_per_decoded_GB": round(
                row["root_ingest_cpu_s"] / (row["root_uploads"] * raw_MB / 1000), 2
            ),
            f"{prefix}_round_s": round(row["round_s"], 2),
            f"{prefix}_round_to_sites_s": round(row["round_to_sites_s"], 2),
            f"{prefix}_publish_s": round(row["publish_s"], 3),
        }
    figures["tree_tree_intermediate_peak_rss_MB"] = round(tree["inter_peak_rss_MB"], 1)
    return figures


if __name__ == "__main__":
    sys.exit(main())
