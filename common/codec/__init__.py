"""The delta codec: tensors -> safetensors shards -> byte shuffle -> zstd frames -> chunks, and back.

Encoding writes a payload to a sink and returns its layout; decoding checks
the layout against limits and the expected manifest, then decodes shard by
shard as chunks arrive. See protos/gradualdiff/v1/delta.proto for the format.
"""

from common.codec.chunks import DEFAULT_CHUNK_BYTES, ChunkVerifier, iter_chunks, make_chunk
from common.codec.decoder import (
    DecodedPiece,
    DeltaStreamDecoder,
    ShardDecoder,
    allocate,
    decode_chunks,
    decode_file,
)
from common.codec.encoder import PieceSource, encode, manifest_of
from common.codec.layout import (
    BROADCAST_SHARD_BYTES,
    DEFAULT_LIMITS,
    DEFAULT_SHARD_BYTES,
    DecodeLimits,
    plan_shards,
    validate_layout,
)

__all__ = [
    "BROADCAST_SHARD_BYTES",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_LIMITS",
    "DEFAULT_SHARD_BYTES",
    "ChunkVerifier",
    "DecodeLimits",
    "DecodedPiece",
    "DeltaStreamDecoder",
    "PieceSource",
    "ShardDecoder",
    "allocate",
    "decode_chunks",
    "decode_file",
    "encode",
    "iter_chunks",
    "make_chunk",
    "manifest_of",
    "plan_shards",
    "validate_layout",
]
