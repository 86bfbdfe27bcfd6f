"""The daemon answers the standard gRPC health service and lists its services by reflection, with
the .proto files under the names they have in protos/ (what grpcurl and a third party resolve)."""

from __future__ import annotations

from pathlib import Path

import grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.scripted import Aggregator, make_config


def test_health_and_reflection(tmp_path: Path) -> None:
    with Aggregator(make_config(tmp_path, ["a"])) as agg, grpc.insecure_channel(agg.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "gradualdiff.v1.Federation", "gradualdiff.v1.Admin"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        names = {s.name for s in answer.list_services_response.service}
        assert {"gradualdiff.v1.Federation", "gradualdiff.v1.Admin", "grpc.health.v1.Health"} <= names
        files = _reflected_files(stub, file_containing_symbol="gradualdiff.v1.Admin")
        assert {"gradualdiff/v1/admin.proto", "gradualdiff/v1/federation.proto"} <= set(files)
        assert files["gradualdiff/v1/federation.proto"].dependency == ["gradualdiff/v1/delta.proto"]
        assert set(_reflected_files(stub, file_by_filename="gradualdiff/v1/delta.proto")) == {
            "gradualdiff/v1/delta.proto"
        }


def _reflected_files(
    stub: reflection_pb2_grpc.ServerReflectionStub, **query: str
) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """The files reflection answers ``query`` with (the file and those it imports), by name."""
    (answer,) = list(
        stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**query)]), timeout=5)
    )
    assert answer.WhichOneof("message_response") == "file_descriptor_response", answer
    protos = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in answer.file_descriptor_response.file_descriptor_proto
    ]
    return {p.name: p for p in protos}
