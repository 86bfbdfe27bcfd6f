"""The delta codec: tensors -> safetensors shards -> byte shuffle -> zstd frames -> chunks, and back.

Encoding writes a payload to a sink, reports each shard's spec as it is
written, and returns the whole layout; a chunk stream carries the codec and
manifest in its first chunk and each shard's spec with the shard's last
chunk. Decoding checks the spec against limits and the expected manifest,
then each shard's spec as it arrives, and decodes shard by shard. See
protos/gradualdiff/v1/delta.proto for the format (wire revision 2).
"""

from common.codec.chunks import DEFAULT_CHUNK_BYTES, ChunkVerifier, GrowingPayload, iter_chunks, make_chunk
from common.codec.decoder import (
    DecodedPiece,
    DeltaStreamDecoder,
    ShardDecoder,
    allocate,
    decode_chunks,
    decode_file,
)
from common.codec.digests import digest_of_digests, frame_digest
from common.codec.encoder import PieceSource, encode, manifest_of
from common.codec.layout import (
    BROADCAST_SHARD_BYTES,
    DEFAULT_LIMITS,
    DEFAULT_SHARD_BYTES,
    DecodeLimits,
    LayoutBuilder,
    plan_shards,
    total_bound,
    validate_layout,
    validate_spec,
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
    "GrowingPayload",
    "LayoutBuilder",
    "PieceSource",
    "ShardDecoder",
    "allocate",
    "decode_chunks",
    "decode_file",
    "digest_of_digests",
    "encode",
    "frame_digest",
    "iter_chunks",
    "make_chunk",
    "manifest_of",
    "plan_shards",
    "total_bound",
    "validate_layout",
    "validate_spec",
]
