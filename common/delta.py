"""Plain data describing a delta on the wire: codec, manifest, shard layout, header, chunk.

These are the domain objects the codec, the aggregator and the worker pass
around; ``common.serde`` converts them to and from the protobuf messages of
``protos/gradualdiff/v1/delta.proto`` at the gRPC edge.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from common.dtypes import DType, itemsize

KIB = 1024
MIB = 1024 * 1024
GIB = 1024 * MIB


class Cast(enum.IntEnum):
    """Lossy cast of float tensors before serialization (wire enum gradualdiff.v1.Cast)."""

    NONE = 0
    BF16 = 1
    F16 = 2


class Lossy(enum.IntEnum):
    """Lossy compact form of an upload's tensors (wire enum gradualdiff.v1.Lossy); see common.codec.compact."""

    NONE = 0
    TOPK = 1
    INT8 = 2


class Digest(enum.IntEnum):
    """How a shard's frames are hashed (wire enum gradualdiff.v1.Digest); see common.codec.digests."""

    UNSPECIFIED = 0
    SHA256 = 1
    BLAKE3 = 2


class DeltaKind(enum.IntEnum):
    """What a delta is relative to (wire enum gradualdiff.v1.DeltaKind)."""

    UNSPECIFIED = 0
    DIFF = 1
    SNAPSHOT = 2
    PARTIAL_SUM = 3


MIN_BLOCK_BYTES = 64 * KIB
MAX_BLOCK_BYTES = 16 * MIB


@dataclass(frozen=True, slots=True, kw_only=True)
class Codec:
    """How tensors become payload bytes.

    The defaults are the lossless pipeline measured best on this machine:
    byte-plane shuffle in 1 MiB blocks, zstd level 1 (level 3+ buys <3% ratio on
    float deltas at a third of the speed).
    """

    cast: Cast = Cast.NONE
    byte_shuffle: bool = True
    block_bytes: int = 1 * MIB
    zstd_level: int = 1
    # Uploads only: each fp32 tensor travels as a compact form (top-k or int8), with the
    # residual kept by the worker (error feedback). topk_fraction is in (0, 1] for TOPK, else 0.
    lossy: Lossy = Lossy.NONE
    topk_fraction: float = 0.0
    # The frames' hash tree (ShardSpec.digest). BLAKE3: 3.9 GB/s on one core here against
    # SHA-256's 1.7, on the receive path of every byte (docs/benchmarks.md).
    digest: Digest = Digest.BLAKE3

    def wire_dtype(self, dtype: DType) -> DType:
        """The dtype a tensor of ``dtype`` travels in under this codec."""
        if self.cast is Cast.NONE or dtype not in (DType.F32, DType.F64):
            return dtype
        return DType.BF16 if self.cast is Cast.BF16 else DType.F16

    @property
    def name(self) -> str:
        """A short human name, e.g. ``bf16+shuffle+zstd1``, ``topk1%+bf16+shuffle+zstd1``, ``int8+shuffle+zstd1``."""
        parts = []
        if self.lossy is Lossy.TOPK:
            parts.append(f"topk{self.topk_fraction * 100:g}%")
        elif self.lossy is Lossy.INT8:
            parts.append("int8")
        if self.cast is not Cast.NONE or self.lossy is Lossy.NONE:
            parts.append("exact" if self.cast is Cast.NONE else self.cast.name.lower())
        if self.byte_shuffle:
            parts.append("shuffle")
        parts.append(f"zstd{self.zstd_level}")
        return "+".join(parts)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, dtype and shape of one tensor of a delta."""

    name: str
    dtype: DType
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)


@dataclass(frozen=True, slots=True)
class Piece:
    """Elements ``[start, start + count)`` of the flattened tensor ``manifest[tensor]``."""

    tensor: int
    start: int
    count: int


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """One shard of the payload: its sizes, digest, pieces and zstd frames (sent with its last chunk)."""

    compressed_bytes: int
    raw_bytes: int
    digest: bytes
    pieces: tuple[Piece, ...]
    frame_bytes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PayloadSpec:
    """What a header says of its payload before any byte of it: the codec and the manifest.

    The shards' specs follow with the data (Chunk.shard); a receiver bounds
    every size by the manifest before it allocates.
    """

    codec: Codec
    manifest: tuple[TensorSpec, ...]

    @property
    def raw_bytes(self) -> int:
        """Bytes of the tensors as decoded (manifest dtypes), the baseline for ratios."""
        return sum(t.nbytes for t in self.manifest)


@dataclass(frozen=True, slots=True)
class PayloadLayout:
    """Everything needed to decode a stored payload: codec, manifest and shards, with sizes and digest.

    What the encoder returns once it has written all of it, what a receiver
    has once the last chunk arrived, and what is kept beside a stored payload.
    ``digest`` (the codec's hash over the shards' digests) names a payload's
    content; it does not travel.
    """

    codec: Codec
    manifest: tuple[TensorSpec, ...]
    shards: tuple[ShardSpec, ...]
    total_bytes: int
    digest: bytes

    @property
    def spec(self) -> PayloadSpec:
        """The part a header carries."""
        return PayloadSpec(self.codec, self.manifest)

    @property
    def raw_bytes(self) -> int:
        """Bytes of the tensors as decoded (manifest dtypes), the baseline for ratios."""
        return sum(t.nbytes for t in self.manifest)

    def shard_offsets(self) -> list[int]:
        """Payload offset at which each shard starts, plus the end offset."""
        offsets = [0]
        for shard in self.shards:
            offsets.append(offsets[-1] + shard.compressed_bytes)
        return offsets


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingStats:
    """What a site's training costs and yields (wire TrainingStats): measured by the worker over a
    round (in a heartbeat: the round so far); all zero = not measured."""

    tokens_per_second: float = 0.0  # non-padding tokens trained per second
    step_seconds: float = 0.0  # mean wall time of one optimizer step
    peak_memory_bytes: int = 0  # peak accelerator memory, or the host's peak RSS
    peak_is_accelerator: bool = False  # which of the two peak_memory_bytes is
    ranks: int = 0  # processes training the site (0 = not said)
    tokens: int = 0  # non-padding tokens trained in the round


@dataclass(frozen=True, slots=True, kw_only=True)
class UploadMetrics:
    """What a worker reports with its upload."""

    train_loss: float = 0.0
    eval_loss: float = 0.0
    steps: int = 0
    train_seconds: float = 0.0
    training: TrainingStats = field(default_factory=TrainingStats)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeltaHeader:
    """The first chunk's header: who sent what for which round, and how to read it."""

    spec: PayloadSpec
    run_id: str = ""
    round: int = 0
    site_id: str = ""
    upload_id: str = ""
    sample_count: int = 0
    base_round: int = 0
    kind: DeltaKind = DeltaKind.DIFF
    metrics: UploadMetrics = field(default_factory=UploadMetrics)
    sites: int = 0  # PARTIAL_SUM: the sites' uploads the sum holds (>= 1); 0 otherwise


@dataclass(frozen=True, slots=True)
class Chunk:
    """One message of a delta stream.

    ``data`` may be a view into the received message (common.serde parses
    without copying it); a receiver that keeps it past the message copies it.
    ``shard``: the spec of the shard this chunk ends, on that chunk only.
    """

    offset: int
    data: bytes | memoryview
    crc32: int
    last: bool
    header: DeltaHeader | None = None
    shard: ShardSpec | None = None
