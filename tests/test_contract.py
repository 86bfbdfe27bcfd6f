"""The contract as a third party meets it: protos/ compiles alone and stays compatible with the
released v1; every Federation call refuses another site's id; uploads follow the round's codec."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from common import protocompat
from common.codec.compact import compact_tensor
from common.delta import KIB, Cast, Codec, Digest, Lossy, PayloadSpec
from common.pb.gradualdiff.v1 import federation_pb2
from common.protogen import PROTO_DIR
from common.spec import TrainingSpec
from tests.scripted import ROOT, Harness, MakeHarness, State, harnesses, random_delta, refusal

V1 = PROTO_DIR / "gradualdiff" / "v1"


# --- protos/ on its own -----------------------------------------------------------------------


def test_protos_compile_with_protos_as_the_only_root(tmp_path: Path) -> None:
    """What a third party runs: protoc -I protos, then imports the stubs from their own tree."""
    protos = sorted(str(p.relative_to(ROOT)) for p in V1.glob("*.proto"))
    assert len(protos) == 3
    done = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", "protos", f"--python_out={tmp_path}", *protos],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    generated = tmp_path / "gradualdiff" / "v1"
    assert {p.name for p in generated.glob("*_pb2.py")} == {
        "admin_pb2.py",
        "delta_pb2.py",
        "federation_pb2.py",
    }
    (tmp_path / "gradualdiff" / "__init__.py").write_text("")
    (generated / "__init__.py").write_text("")
    # A fresh interpreter with only the generated tree: imports between the files must resolve there.
    script = (
        "from gradualdiff.v1 import admin_pb2, federation_pb2\n"
        "print(admin_pb2.DESCRIPTOR.name, [d.name for d in federation_pb2.DESCRIPTOR.dependencies])\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == ["gradualdiff/v1/admin.proto", "['gradualdiff/v1/delta.proto']"]


def test_our_stubs_register_the_files_under_their_published_names() -> None:
    assert federation_pb2.DESCRIPTOR.name == "gradualdiff/v1/federation.proto"
    assert [d.name for d in federation_pb2.DESCRIPTOR.dependencies] == ["gradualdiff/v1/delta.proto"]
    assert federation_pb2.JoinRequest.__module__ == "common.pb.gradualdiff.v1.federation_pb2"


# --- the breaking-change check ----------------------------------------------------------------


def test_protos_are_compatible_with_the_released_v1() -> None:
    released = protocompat.load_released()
    assert "1" in released["messages"][".gradualdiff.v1.JoinRequest"]  # a snapshot, not an empty file
    assert protocompat.breaking_changes(released, protocompat.snapshot()) == []


def _edited(tmp_path: Path, file: str, old: str, new: str) -> protocompat.Snapshot:
    """The snapshot of a copy of protos/ with ``old`` replaced by ``new`` in ``file``."""
    copy = tmp_path / "protos"
    shutil.copytree(PROTO_DIR, copy)
    path = copy / "gradualdiff" / "v1" / file
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))
    return protocompat.snapshot(copy)


@pytest.mark.parametrize(
    ("file", "old", "new", "problem"),
    [
        # retyped
        (
            "federation.proto",
            "  uint64 after_round = 2;",
            "  int64 after_round = 2;",
            "AwaitRoundRequest: field 2",
        ),
        # renumbered (the old number is gone)
        ("federation.proto", "  uint32 wait_ms = 3;", "  uint32 wait_ms = 9;", "AwaitRoundRequest: field 3"),
        # removed
        ("federation.proto", "  uint32 wait_ms = 3;", "", "AwaitRoundRequest: field 3"),
        # renamed (JSON and every generated accessor change)
        (
            "federation.proto",
            "  uint32 wait_ms = 3;",
            "  uint32 wait_millis = 3;",
            "AwaitRoundRequest: field 3",
        ),
        # an enum value renumbered
        ("delta.proto", "CAST_F16 = 2;", "CAST_F16 = 3;", "Cast: value 2"),
        # an RPC's streaming changed
        (
            "federation.proto",
            "rpc AwaitRound(AwaitRoundRequest) returns (RoundSpec)",
            "rpc AwaitRound(AwaitRoundRequest) returns (stream RoundSpec)",
            "Federation: rpc AwaitRound",
        ),
    ],
)
def test_a_breaking_change_is_caught(tmp_path: Path, file: str, old: str, new: str, problem: str) -> None:
    problems = protocompat.breaking_changes(protocompat.load_released(), _edited(tmp_path, file, old, new))
    assert len(problems) == 1 and problem in problems[0], problems


def test_adding_is_not_breaking(tmp_path: Path) -> None:
    current = _edited(
        tmp_path, "federation.proto", "  uint32 wait_ms = 3;", "  uint32 wait_ms = 3;\n  bool x = 4;"
    )
    assert "4" in current["messages"][".gradualdiff.v1.AwaitRoundRequest"]
    assert protocompat.breaking_changes(protocompat.load_released(), current) == []


# --- defect 10: every call with a site_id checks it against the token -------------------------


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[MakeHarness]:
    with harnesses(tmp_path) as make:
        yield make


def _calls(h: Harness, site_id: str) -> dict[str, object]:
    """Every Federation call with a site_id field, made by site a's token claiming ``site_id``."""
    a = h["a"]
    md, t = a.metadata, 10
    return {
        "Join": lambda: a.stub.Join(federation_pb2.JoinRequest(site_id=site_id), metadata=md, timeout=t),
        "Heartbeat": lambda: a.stub.Heartbeat(
            federation_pb2.HeartbeatRequest(site_id=site_id), metadata=md, timeout=t
        ),
        "AwaitRound": lambda: a.stub.AwaitRound(
            federation_pb2.AwaitRoundRequest(site_id=site_id, after_round=0, wait_ms=10),
            metadata=md,
            timeout=t,
        ),
        "FetchDiff": lambda: a.stub.FetchDiff(
            federation_pb2.FetchDiffRequest(site_id=site_id, have_round=0, snapshot=True),
            metadata=md,
            timeout=t,
        ),
        "GetUploadOffset": lambda: a.stub.GetUploadOffset(
            federation_pb2.UploadOffsetRequest(site_id=site_id, upload_id="a-1"), metadata=md, timeout=t
        ),
    }


def test_another_sites_id_is_refused_by_every_call(harness: MakeHarness) -> None:
    h = harness({"a": 10, "b": 10})
    h.join_all()
    for name, call in _calls(h, "b").items():
        error = refusal(call)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, (name, error.details())
        details = error.details() or ""
        assert "'b'" in details and "'a'" in details, (name, details)


def test_an_empty_site_id_means_the_tokens_site(harness: MakeHarness) -> None:
    """Kept for clients that never filled the field; Join alone requires it (it registers the site)."""
    h = harness({"a": 10, "b": 10})
    h.join_all()
    calls = _calls(h, "")
    assert refusal(calls.pop("Join")).code() == grpc.StatusCode.PERMISSION_DENIED
    for name, call in calls.items():
        result = call()  # type: ignore[operator]
        if isinstance(result, Iterator):
            assert list(result), name  # the snapshot of round 0
    own = _calls(h, "a")
    assert own["GetUploadOffset"]().committed_offset == 0  # type: ignore[operator]


# --- defect 9: the round's codec -------------------------------------------------------------


def _push(h: Harness, codec: Codec) -> federation_pb2.PushReceipt:
    """Site a's round-1 upload of a random delta, in ``codec`` (compacted first if it is lossy)."""
    a = h["a"]
    tensors: State = {}
    for name, t in random_delta(1, h.init).items():
        tensors.update(compact_tensor(name, t, codec)[0] if codec.lossy is not Lossy.NONE else {name: t})
    head, payload = a.header(tensors, round=1, base=0, codec=codec)
    return a.push(head, payload)


@pytest.mark.parametrize(
    ("round_codec", "sent", "field", "got", "expected"),
    [
        (Codec(), Codec(cast=Cast.BF16), "codec.cast", "bf16", "none"),
        (Codec(cast=Cast.BF16), Codec(), "codec.cast", "none", "bf16"),
        (Codec(), Codec(lossy=Lossy.INT8), "codec.lossy", "int8", "none"),
        (
            Codec(lossy=Lossy.TOPK, topk_fraction=0.1),
            Codec(lossy=Lossy.TOPK, topk_fraction=0.5),
            "codec.topk_fraction",
            "0.5",
            "0.1",
        ),
    ],
)
def test_an_upload_in_another_codec_is_refused(
    harness: MakeHarness, round_codec: Codec, sent: Codec, field: str, got: str, expected: str
) -> None:
    h = harness({"a": 10}, training=TrainingSpec(upload_codec=round_codec))
    h.join_all()
    error = refusal(lambda: _push(h, sent))
    details = error.details() or ""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, details
    assert re.search(rf"{re.escape(field)} is {re.escape(got)}\b.* says {re.escape(expected)}\b", details), (
        details
    )
    # Nothing was counted: the same site then uploads in the round's codec.
    assert _push(h, round_codec).accepted


def test_packing_is_the_senders_choice(harness: MakeHarness) -> None:
    """Block size, byte shuffle, zstd level and digest only pack the same values: any valid choice is taken."""
    round_codec = Codec(cast=Cast.BF16)
    h = harness({"a": 10}, training=TrainingSpec(upload_codec=round_codec))
    h.join_all()
    sent = dataclasses.replace(
        round_codec, block_bytes=64 * KIB, zstd_level=3, byte_shuffle=False, digest=Digest.SHA256
    )
    assert sent != round_codec and round_codec.digest is Digest.BLAKE3
    assert _push(h, sent).accepted


def test_an_upload_that_names_no_digest_is_refused_naming_the_field(harness: MakeHarness) -> None:
    """Wire revision 2: a sender names its hash tree's algorithm; one of the first v1 wire leaves it unset."""
    h = harness({"a": 10})
    h.join_all()
    a = h["a"]
    head, payload = a.header(random_delta(1, h.init), round=1, base=0)
    unnamed = dataclasses.replace(head.spec.codec, digest=Digest.UNSPECIFIED)
    error = refusal(
        lambda: a.push(dataclasses.replace(head, spec=PayloadSpec(unnamed, head.spec.manifest)), payload)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "codec.digest" in (error.details() or "")
    # Refused from the header: nothing of the upload was counted or spent, so it goes through named.
    assert a.push(head, payload).accepted
