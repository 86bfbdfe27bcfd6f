"""The daemon answers the standard gRPC health service and lists its services by reflection."""

from __future__ import annotations

from pathlib import Path

import grpc
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
