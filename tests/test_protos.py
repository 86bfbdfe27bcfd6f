"""The generated stubs in common/pb match protos/, and the services have the RPCs the docs promise."""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import MethodDescriptor

from common import protogen
from common.pb.gradualdiff.v1 import admin_pb2, admin_pb2_grpc, delta_pb2, federation_pb2, federation_pb2_grpc

FEDERATION_RPCS = {
    # name: (client streams, server streams)
    "Join": (False, False),
    "Heartbeat": (False, False),
    "AwaitRound": (False, False),
    "FetchDiff": (False, True),
    "PushDelta": (True, False),
    "GetUploadOffset": (False, False),
}
ADMIN_RPCS = {
    "GetStatus": (False, False),
    "ListRounds": (False, False),
    "GetRound": (False, False),
    "ListSites": (False, False),
    "Watch": (False, True),
    "Pause": (False, False),
    "Resume": (False, False),
    "CloseRound": (False, False),
    "EvictSite": (False, False),
    "SetRoundPolicy": (False, False),
    "ReloadTokens": (False, False),
    "RetryRound": (False, False),
}


def test_generated_stubs_match_the_protos():
    """Regenerates common/pb into a temporary tree (protoc + mypy-protobuf) and compares file by file."""
    problems = protogen.check()
    assert problems == [], "common/pb is out of date; run `make proto`:\n" + "\n".join(problems)


def test_proto_sources_are_found():
    names = {p.as_posix() for p in protogen.proto_files()}
    assert {
        "gradualdiff/v1/delta.proto",
        "gradualdiff/v1/federation.proto",
        "gradualdiff/v1/admin.proto",
    } <= names


@pytest.mark.parametrize(
    ("module", "service", "rpcs"),
    [(federation_pb2, "Federation", FEDERATION_RPCS), (admin_pb2, "Admin", ADMIN_RPCS)],
)
def test_service_rpcs(module, service, rpcs):
    descriptor = module.DESCRIPTOR.services_by_name[service]
    assert descriptor.full_name == f"gradualdiff.v1.{service}"
    methods: dict[str, MethodDescriptor] = dict(descriptor.methods_by_name)
    assert set(methods) == set(rpcs)
    for name, (client_streaming, server_streaming) in rpcs.items():
        assert (methods[name].client_streaming, methods[name].server_streaming) == (
            client_streaming,
            server_streaming,
        ), name


def test_delta_streams_carry_delta_chunks():
    methods = federation_pb2.DESCRIPTOR.services_by_name["Federation"].methods_by_name
    assert methods["FetchDiff"].output_type is delta_pb2.DeltaChunk.DESCRIPTOR
    assert methods["PushDelta"].input_type is delta_pb2.DeltaChunk.DESCRIPTOR


def test_grpc_stubs_expose_every_rpc():
    for stub, servicer, rpcs in (
        (federation_pb2_grpc.FederationStub, federation_pb2_grpc.FederationServicer, FEDERATION_RPCS),
        (admin_pb2_grpc.AdminStub, admin_pb2_grpc.AdminServicer, ADMIN_RPCS),
    ):
        for name in rpcs:
            assert callable(getattr(servicer, name)), name
        assert stub.__init__ is not object.__init__


def test_delta_chunk_fits_grpc_default_message_size():
    """A full 1 MiB chunk plus its fields stays well under gRPC's default 4 MiB message limit."""
    chunk = delta_pb2.DeltaChunk(offset=2**63, data=bytes(1 << 20), crc32=2**32 - 1, last=True)
    assert len(chunk.SerializeToString()) < (1 << 20) + 64
