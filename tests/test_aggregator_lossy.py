"""Lossy uploads (top-k, int8) against a real aggregator: exact folding, refusals, cuts and resumes.

Scripted sites compress their deltas the way a worker does
(``common.codec.compact.compact_tensor``) and push them in many small shards,
so the compact parts of a tensor span shards and chunks. The published state
must be, bit for bit, Σ n_i · sent_i / Σ n_i with sent_i the dense tensors the
sites' error feedback accounted for.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from common.codec.compact import compact_tensor
from common.delta import MIB, Cast, Codec, DeltaHeader, Lossy
from common.pb.gradualdiff.v1 import federation_pb2
from common.spec import TrainingSpec
from server.config import ServerConfig
from server.config_file import load_config
from tests.scripted import (
    AdminClient,
    Daemon,
    MakeHarness,
    Payload,
    ScriptedSite,
    State,
    add,
    assert_same_bits,
    final_state,
    free_port,
    harnesses,
    random_delta,
    rpc_code,
    small_state,
    wait_for,
    weighted_mean,
    write_daemon_config,
    write_state,
)

PUBLISHED = federation_pb2.ROUND_STATE_PUBLISHED
TOPK = Codec(cast=Cast.BF16, lossy=Lossy.TOPK, topk_fraction=0.05)
INT8 = Codec(lossy=Lossy.INT8)
WIDE = small_state(seed=5, width=128)  # 39,680 fp32 values
SHARD = 4 * 1024  # tiny shards: int8 codes of the 50×128 embedding span two of them
CHUNK = 1024


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[MakeHarness]:
    with harnesses(tmp_path, init=WIDE) as make:
        yield make


def lossy_upload(
    site: ScriptedSite, delta: State, codec: Codec, **kw: Any
) -> tuple[DeltaHeader, Payload, State]:
    """A round-1 upload of ``delta`` compressed under ``codec``, and the dense tensors it stands for."""
    tensors: State = {}
    sent: State = {}
    for name, t in delta.items():
        wire, sent[name] = compact_tensor(name, t, codec)
        tensors.update(wire)
    kw.setdefault("shard_bytes", SHARD)
    head, payload = site.header(tensors, round=1, base=0, codec=codec, **kw)
    return head, payload, sent


@pytest.mark.parametrize("codec", [TOPK, INT8], ids=["topk", "int8"])
def test_topk_and_int8_uploads_publish_the_weighted_mean_of_what_was_sent(harness: Any, codec: Codec) -> None:
    h = harness({"a": 10, "b": 30}, training=TrainingSpec(upload_codec=codec))
    h.join_all()
    da, db = random_delta(1, h.init), random_delta(2, h.init)
    head_a, payload_a, sent_a = lossy_upload(h["a"], da, codec)
    head_b, payload_b, sent_b = lossy_upload(h["b"], db, codec)
    assert len(payload_a.layout.shards) >= 2 and len(payload_b.layout.shards) >= 2
    for site, head, payload in ((h["a"], head_a, payload_a), (h["b"], head_b, payload_b)):
        receipt = site.push(head, payload, chunk_bytes=CHUNK)
        assert receipt.accepted and not receipt.duplicate
    state = final_state(h)
    assert_same_bits(state, add(h.init, h.mean([(sent_a, 10), (sent_b, 30)])))
    status = h.admin.round(1)
    assert status.bytes_in == len(payload_a) + len(payload_b)
    raw = sum(t.numel() * 4 for t in da.values())
    assert len(payload_a) < (raw / 20 if codec is TOPK else raw / 3)  # 5% of the entries in bf16; 1 byte each


def _tamper_gaps(codec: Codec, delta: State, site: ScriptedSite, how: str) -> tuple[DeltaHeader, Payload]:
    tensors: State = {}
    for name, t in delta.items():
        wire, _ = compact_tensor(name, t, codec)
        tensors.update(wire)
    gaps = tensors["layers.1.q.weight:gaps"].to(torch.int64)
    if how == "repeat":
        gaps[3] = 0
    else:  # the last index lands past the tensor's end
        gaps[-1] += 128 * 128
    tensors["layers.1.q.weight:gaps"] = gaps.to(torch.uint32)
    head, payload = site.header(tensors, round=1, base=0, codec=codec, shard_bytes=SHARD)
    return head, payload


@pytest.mark.parametrize("how", ["repeat", "out-of-range", "wrong-k", "wrong-scale-shape"])
def test_a_bad_lossy_upload_is_refused_and_changes_nothing(harness: Any, how: str) -> None:
    codec = INT8 if how == "wrong-scale-shape" else TOPK  # a round takes one codec (its upload_codec)
    h = harness({"a": 10, "b": 30}, training=TrainingSpec(upload_codec=codec))
    h.join_all()
    a = h["a"]
    da = random_delta(3, h.init)
    if how in ("repeat", "out-of-range"):
        head, payload = _tamper_gaps(TOPK, da, a, how)
    elif how == "wrong-k":
        head, payload, _ = lossy_upload(a, da, TOPK)
        # The header claims 5.1%: the round's codec says 5%, and the tensors hold 5%'s entries.
        head = dataclasses.replace(
            head,
            spec=dataclasses.replace(head.spec, codec=dataclasses.replace(TOPK, topk_fraction=0.051)),
        )
    else:
        tensors: State = {}
        for name, t in da.items():
            wire, _ = compact_tensor(name, t, INT8)
            tensors.update(wire)
        tensors["embed.weight:scale"] = tensors["embed.weight:scale"][:-1]
        head, payload = a.header(tensors, round=1, base=0, codec=INT8, shard_bytes=SHARD)
    code = rpc_code(lambda: a.push(head, payload, chunk_bytes=CHUNK))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    # The daemon keeps going: a good upload from each site publishes exactly their mean.
    db = random_delta(4, h.init)
    good_head, good_payload, sent_a = lossy_upload(a, da, codec)
    assert a.push(good_head, good_payload, chunk_bytes=CHUNK).accepted
    head_b, payload_b, sent_b = lossy_upload(h["b"], db, codec)
    assert h["b"].push(head_b, payload_b, chunk_bytes=CHUNK).accepted
    assert_same_bits(final_state(h), add(h.init, h.mean([(sent_a, 10), (sent_b, 30)])))


@pytest.mark.parametrize("codec", [TOPK, INT8], ids=["topk", "int8"])
def test_a_cut_lossy_upload_resumes_and_counts_once(harness: Any, codec: Codec) -> None:
    h = harness({"a": 10}, training=TrainingSpec(upload_codec=codec))
    h.join_all()
    site = h["a"]
    delta = random_delta(5, h.init)
    head, payload, sent = lossy_upload(site, delta, codec)
    chunks = list(site.chunks(head, payload, chunk_bytes=CHUNK))
    cut = len(chunks) // 2 + 1  # mid-upload, and (int8) mid-way through a tensor's codes
    assert rpc_code(lambda: site.push_messages(iter(chunks[:cut]))) is grpc.StatusCode.ABORTED
    acc = h.agg.coordinator.state.acc
    wait_for(lambda: acc.folded_shards(head.upload_id), what="a shard of the cut upload to fold")
    committed = site.offset(head.upload_id).committed_offset
    assert 0 < committed < len(payload)
    receipt = site.push(head, payload, start=committed, chunk_bytes=CHUNK)
    assert receipt.accepted and not receipt.duplicate
    assert site.push(head, payload, chunk_bytes=CHUNK).duplicate
    assert_same_bits(final_state(h), add(h.init, h.mean([(sent, 10)])))


@pytest.mark.slow
def test_sigkilled_daemon_counts_lossy_uploads_once(tmp_path: Path) -> None:
    """An int8 upload accepted before a SIGKILL (replayed from its spool), another one cut by a second."""
    gen = torch.Generator().manual_seed(8)
    init = {"big.weight": torch.randn(3000, 4000, generator=gen) * 0.02, "norm.weight": torch.ones(1000)}
    port = free_port()
    target = f"127.0.0.1:{port}"
    config = write_daemon_config(
        tmp_path / "gdfed.toml",
        port=port,
        init_state=write_state(tmp_path / "init.safetensors", init),
        sites=["a", "b"],
    )
    with config.open("a") as toml:  # the round's codec: every upload of the round uses it
        toml.write('\n[training.upload_codec]\nlossy = "int8"\n')
    daemon = Daemon(config, tmp_path / "daemon.log")
    a, b = ScriptedSite(target, "a", 10), ScriptedSite(target, "b", 30)
    admin = AdminClient(target)
    try:
        daemon.start(target)
        for site in (a, b):
            site.join()
            site.start_beating()
        head_b, payload_b, sent_b = lossy_upload(b, random_delta(9, init), INT8, shard_bytes=MIB)
        assert b.push(head_b, payload_b, chunk_bytes=MIB).accepted
        daemon.kill()  # b's upload is accepted: the restart rebuilds the sum from its spool
        daemon.start(target)

        head_a, payload_a, sent_a = lossy_upload(a, random_delta(10, init), INT8, shard_bytes=2 * MIB)
        assert len(payload_a) > 9 * MIB
        messages = list(a.chunks(head_a, payload_a, chunk_bytes=MIB))
        # Chunks are cut at shard ends too: the first commit lands at the first shard end at or
        # past 8 MiB, after the end of another shard and before the last.
        ends = [m.offset + len(m.data) for m in messages]
        shard_ends = payload_a.layout.shard_offsets()[1:]
        commit = next(i for i, end in enumerate(ends) if end >= 8 * MIB and end in shard_ends)
        committed = ends[commit]
        assert shard_ends[0] < committed < len(payload_a)
        release = threading.Event()

        def paused() -> Iterator[Any]:
            yield from messages[: commit + 2]
            release.wait(60)

        future = a.stub.PushDelta.future(paused(), metadata=a.metadata, timeout=120)
        wait_for(
            lambda: a.offset(head_a.upload_id).committed_offset == committed,
            timeout=30,
            what="the first commit",
        )
        daemon.kill()  # mid-upload: a's folded shards die with the process, its spool stays
        release.set()
        with pytest.raises(grpc.RpcError):
            future.result(timeout=30)
        daemon.start(target)
        for site in (a, b):
            site.ready()
        assert a.offset(head_a.upload_id).committed_offset == committed
        receipt = a.push(head_a, payload_a, start=committed, chunk_bytes=MIB)
        assert receipt.accepted and not receipt.duplicate
        assert b.push(head_b, payload_b, chunk_bytes=MIB).duplicate

        status = admin.wait_round(1, timeout=60)
        assert status.state == PUBLISHED, status.failure_reason
        assert status.samples == 40
        number, state = a.snapshot()
        assert number == 1
        dtype = {"fp32": torch.float32, "fp64": torch.float64}[ServerConfig().accumulator]
        assert_same_bits(state, add(init, weighted_mean([(sent_b, 30), (sent_a, 10)], dtype)))
    finally:
        for site in (a, b):
            site.close()
        admin.close()
        daemon.cleanup()
        print(daemon.log())


def test_config_turns_lossy_uploads_on(tmp_path: Path) -> None:
    def load(text: str) -> ServerConfig:
        path = tmp_path / "gdfed.toml"
        path.write_text(text)
        return load_config(path, {})

    config = load('[training.upload_codec]\ncast = "bf16"\nlossy = "topk"\ntopk_fraction = 0.01\n')
    assert config.training.upload_codec == Codec(cast=Cast.BF16, lossy=Lossy.TOPK, topk_fraction=0.01)
    assert load('[training.upload_codec]\nlossy = "topk"\n').training.upload_codec.topk_fraction == 0.01
    assert load('[training.upload_codec]\nlossy = "int8"\n').training.upload_codec == INT8
    with pytest.raises(ValueError, match=r"topk_fraction is 2.0; with lossy = topk it must be in \(0, 1\]"):
        load('[training.upload_codec]\nlossy = "topk"\ntopk_fraction = 2.0\n')
    with pytest.raises(ValueError, match="known"):
        load('[training.upload_codec]\nlossy = "top5"\n')
    with pytest.raises(ValueError, match="uploads only"):
        load('[broadcast_codec]\nlossy = "int8"\n')
