"""The worker's end of the delta streams: chunks framed by common.serde instead of protobuf objects.

PushDelta's requests are serialized by ``chunk_to_wire`` (a chunk's data is
copied once, into the message) and FetchDiff's responses parsed by
``chunk_from_wire`` (a chunk's data is a view of the received message, not a
copy); the bytes on the wire are those protobuf would make. Building and
parsing a DeltaChunk object would copy each MiB of payload once more on
each side. The other calls are the generated stub's.
"""

from __future__ import annotations

import grpc

from common.delta import Chunk
from common.pb.gradualdiff.v1 import federation_pb2, federation_pb2_grpc
from common.serde import chunk_from_wire, chunk_to_wire

_SERVICE = federation_pb2.DESCRIPTOR.services_by_name["Federation"]


def method_path(name: str) -> str:
    """The gRPC path of Federation's method ``name``, as the generated stub calls it."""
    service, method = _SERVICE.full_name, _SERVICE.methods_by_name[name].name
    return f"/{service}/{method}"


class DeltaStub:
    """What a worker calls to move deltas: PushDelta and FetchDiff on Chunks, GetUploadOffset."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.PushDelta: grpc.StreamUnaryMultiCallable[Chunk, federation_pb2.PushReceipt] = (
            channel.stream_unary(
                method_path("PushDelta"),
                request_serializer=chunk_to_wire,
                response_deserializer=federation_pb2.PushReceipt.FromString,
            )
        )
        self.FetchDiff: grpc.UnaryStreamMultiCallable[federation_pb2.FetchDiffRequest, Chunk] = (
            channel.unary_stream(
                method_path("FetchDiff"),
                request_serializer=federation_pb2.FetchDiffRequest.SerializeToString,
                response_deserializer=chunk_from_wire,
            )
        )
        self.GetUploadOffset = federation_pb2_grpc.FederationStub(channel).GetUploadOffset
