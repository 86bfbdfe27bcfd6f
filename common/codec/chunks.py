"""Cutting a payload into chunks (from a stored file, or from one still being encoded), and checking a chunk
stream: order, checksums, and each shard's spec as it arrives with the shard's last chunk.

Wire revision 2: the header carries only the codec and the manifest; a
chunk's data lies within one shard, and the chunk that ends a shard carries
that shard's spec. :class:`ChunkVerifier` bounds every byte it accepts before
the spec that accounts for it arrives (by the limits and by what is left of
the manifest), so a receiver never buffers what a sender merely claims.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, cast

import google_crc32c
import numpy as np

from common.codec.layout import DEFAULT_LIMITS, DecodeLimits, LayoutBuilder, total_bound
from common.delta import MIB, Chunk, DeltaHeader, PayloadLayout, PayloadSpec, ShardSpec, TensorSpec
from common.errors import ChunkOrderError, DataLoss, InvalidArgument, LimitExceeded, MalformedShard

DEFAULT_CHUNK_BYTES = 1 * MIB


def _load_crc32c() -> Callable[[int, int, int], int] | None:
    # google_crc32c's own functions take bytes only (a memoryview, as common.serde.chunk_from_wire
    # hands out, is refused); the C library it bundles takes any address, so views are checked in place.
    libs = Path(google_crc32c.__file__).parent.parent / "google_crc32c.libs"
    for path in sorted(libs.glob("libcrc32c*.so*")):
        try:
            extend = ctypes.CDLL(str(path)).crc32c_extend
        except (OSError, AttributeError):
            continue
        extend.argtypes = (ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t)
        extend.restype = ctypes.c_uint32
        return cast(Callable[[int, int, int], int], extend)
    return None


_EXTEND = _load_crc32c()


def crc32c(data: bytes | memoryview) -> int:
    """CRC-32C (Castagnoli) of ``data``; hardware-accelerated, ~16 GB/s here against zlib.crc32's 1.9."""
    if type(data) is bytes or _EXTEND is None:
        return int(google_crc32c.value(bytes(data)))
    array = np.frombuffer(data, dtype=np.uint8)
    return int(_EXTEND(0, array.ctypes.data, array.size)) if array.size else 0


def make_chunk(
    offset: int,
    data: bytes | memoryview,
    last: bool,
    header: DeltaHeader | None = None,
    shard: ShardSpec | None = None,
) -> Chunk:
    """A chunk with its CRC-32C filled in."""
    return Chunk(offset=offset, data=data, crc32=crc32c(data), last=last, header=header, shard=shard)


def _check_chunk_bytes(chunk_bytes: int) -> None:
    if not 0 < chunk_bytes <= DEFAULT_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be 1..{DEFAULT_CHUNK_BYTES}, got {chunk_bytes}")


def _read_exact(source: BinaryIO, size: int, offset: int) -> bytes:
    data = source.read(size)
    while len(data) < size:
        more = source.read(size - len(data))
        if not more:
            raise EOFError(
                f"payload source ended at offset {offset + len(data)}; the shard ends at {offset + size}"
            )
        data += more
    return data


def _shard_chunks(
    source: BinaryIO,
    shard: ShardSpec,
    begin: int,
    start: int,
    last: bool,
    header: DeltaHeader | None,
    chunk_bytes: int,
) -> Iterator[Chunk]:
    """Chunks of the shard at ``[begin, begin + compressed_bytes)`` from ``start`` (``source`` is there)."""
    end = begin + shard.compressed_bytes
    offset = max(start, begin)
    while offset < end:
        size = min(chunk_bytes, end - offset)
        data = _read_exact(source, size, offset)
        ends = offset + size == end
        yield make_chunk(offset, data, ends and last, header, shard if ends else None)
        header = None
        offset += size


def iter_chunks(
    header: DeltaHeader,
    layout: PayloadLayout,
    source: BinaryIO,
    *,
    start: int = 0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[Chunk]:
    """Chunks of the stored payload in ``source`` from offset ``start``; the first one carries ``header``.

    Chunks are cut at shard boundaries; the chunk that ends a shard carries its
    spec, and the one that ends the last shard is ``last`` (a payload of no
    shards is one empty last chunk, as is a resume at its very end). ``source``
    is positioned at payload offset ``start`` by this function, so a resumed
    upload passes the offset the receiver acknowledged, anywhere in a shard.
    """
    _check_chunk_bytes(chunk_bytes)
    total = layout.total_bytes
    if not 0 <= start <= total:
        raise ValueError(f"start offset {start} is outside the payload (0..{total})")
    source.seek(start)
    first: DeltaHeader | None = header
    begin = 0
    for index, shard in enumerate(layout.shards):
        end = begin + shard.compressed_bytes
        if end > start:
            last = index == len(layout.shards) - 1
            for chunk in _shard_chunks(source, shard, begin, start, last, first, chunk_bytes):
                first = None
                yield chunk
        begin = end
    if first is not None:
        yield make_chunk(start, b"", True, first)


def ends_manifest(shard: ShardSpec, manifest: Sequence[TensorSpec]) -> bool:
    """Whether ``shard`` is the payload's last: its last piece ends the manifest's last tensor."""
    if not manifest or not shard.pieces:
        return False
    piece = shard.pieces[-1]
    return piece.tensor == len(manifest) - 1 and piece.start + piece.count == manifest[-1].numel


class GrowingPayload:
    """A payload file that an encoder is still writing, streamed by shards as they complete.

    The encoder's thread writes ``path`` (``encode(..., sink, on_shard=payload.shard_done)``)
    and then calls :meth:`finish` with the layout, or :meth:`fail` with what
    went wrong; :meth:`chunks` streams every complete shard as soon as it is
    reported, blocking for the next. Whether a shard is the last one follows
    from its pieces (they end the manifest), so its last chunk goes at once.
    Several streams may read at once, and a stream may be started again (a
    resume at the receiver's offset). Thread-safe.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._cond = threading.Condition()
        self._shards: list[ShardSpec] = []
        self._layout: PayloadLayout | None = None
        self._error: BaseException | None = None

    def shard_done(self, spec: ShardSpec) -> None:
        """The shard's bytes are in the file (flushed): readers may send it."""
        with self._cond:
            self._shards.append(spec)
            self._cond.notify_all()

    def finish(self, layout: PayloadLayout) -> None:
        """The encoder returned ``layout``, whose shards are those reported."""
        with self._cond:
            if layout.shards != tuple(self._shards):
                raise ValueError("the finished layout's shards differ from the ones reported by shard_done")
            self._layout = layout
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        """The encoder failed: every stream waiting for a shard raises ``error``."""
        with self._cond:
            self._error = error
            self._cond.notify_all()

    @property
    def layout(self) -> PayloadLayout | None:
        """The whole layout, once the encoder finished."""
        with self._cond:
            return self._layout

    def _wait(self, index: int) -> ShardSpec | None:
        """Shard ``index``'s spec once reported; None once the encoder finished with fewer shards."""
        with self._cond:
            while True:
                if index < len(self._shards):
                    return self._shards[index]
                if self._error is not None:
                    raise self._error
                if self._layout is not None:
                    return None
                self._cond.wait()

    def chunks(
        self, header: DeltaHeader, *, start: int = 0, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> Iterator[Chunk]:
        """Like :func:`iter_chunks`, from ``start``, each shard as soon as the encoder reports it."""
        _check_chunk_bytes(chunk_bytes)
        if start < 0:
            raise ValueError(f"start offset {start} is negative")
        manifest = header.spec.manifest
        first: DeltaHeader | None = header
        begin = 0
        index = 0
        source: BinaryIO | None = None
        try:
            while (shard := self._wait(index)) is not None:
                end = begin + shard.compressed_bytes
                if end > start:
                    if source is None:
                        source = open(self.path, "rb")  # noqa: SIM115 (closed below, however the stream ends)
                        source.seek(max(start, begin))
                    last = ends_manifest(shard, manifest)
                    for chunk in _shard_chunks(source, shard, begin, start, last, first, chunk_bytes):
                        first = None
                        yield chunk
                    if last:
                        return
                begin = end
                index += 1
            if start > begin:
                raise ValueError(f"start offset {start} is outside the payload (0..{begin})")
            # No shards, or a resume at the very end: the one empty last chunk.
            yield make_chunk(begin, b"", True, first)
        finally:
            if source is not None:
                source.close()


class ChunkVerifier:
    """Checks a chunk stream as it arrives: order, integrity, bounds, and each shard's spec.

    A verifier starts at the offset the receiver already holds (0, or the
    committed offset of a resumed upload, with the specs of the shards that
    end at or before it). Bytes of the shard in progress are bounded before
    its spec arrives by :meth:`LayoutBuilder.shard_bound` (the shard raw-size
    limit and what is left of the manifest), the whole stream by
    :func:`total_bound`; a spec must end exactly where its chunk ends and is
    checked against the shards before it (:class:`LayoutBuilder`).
    """

    def __init__(
        self,
        spec: PayloadSpec,
        *,
        limits: DecodeLimits = DEFAULT_LIMITS,
        start: int = 0,
        shards: Sequence[ShardSpec] = (),
    ) -> None:
        self.spec = spec
        self.limits = limits
        self._builder = LayoutBuilder(spec, limits, shards)
        self._begins = [0]
        for shard in self._builder.shards:
            self._begins.append(self._begins[-1] + shard.compressed_bytes)
        if start < self._builder.end:
            raise ValueError(
                f"start offset {start} is before the end {self._builder.end} of the shards given"
            )
        self.offset = start
        self._total_bound = total_bound(spec, limits)
        self._shard_bound = self._builder.shard_bound()
        self.done = False
        self._layout: PayloadLayout | None = None
        self._check_bounds(start, "the resumed offset")

    @property
    def shards(self) -> tuple[ShardSpec, ...]:
        """The shard specs accepted so far."""
        return self._builder.shards

    @property
    def layout(self) -> PayloadLayout | None:
        """The whole layout, once the last chunk has been accepted."""
        return self._layout

    @property
    def shard_bound(self) -> int:
        """The most bytes the shard in progress may have (what a receiver may have to buffer for it)."""
        return self._shard_bound

    def shard_begin(self, index: int) -> int:
        """Payload offset where shard ``index`` begins (``len(shards)``: the shard in progress)."""
        return self._begins[index]

    def check(self, chunk: Chunk) -> int | None:
        """Raise the typed error for the first thing wrong with ``chunk``, else advance.

        Returns the index of the shard this chunk completes (its spec is then in
        :attr:`shards`), or None.
        """
        if self.done:
            raise ChunkOrderError(
                f"chunk at offset {chunk.offset} arrived after the last chunk", field="offset"
            )
        size = len(chunk.data)
        if size > self.limits.max_chunk_bytes:
            raise LimitExceeded(
                f"chunk at offset {chunk.offset} carries {size} bytes; the limit is {self.limits.max_chunk_bytes}",
                field="data",
                limit=self.limits.max_chunk_bytes,
            )
        if chunk.offset != self.offset:
            what = "repeats bytes already received" if chunk.offset < self.offset else "leaves a gap"
            raise ChunkOrderError(
                f"chunk offset is {chunk.offset}, expected {self.offset}: it {what}", field="offset"
            )
        if crc32c(chunk.data) != chunk.crc32:
            raise DataLoss(f"chunk at offset {chunk.offset} fails its CRC-32C", field="crc32")
        end = chunk.offset + size
        self._check_bounds(end, f"chunk at offset {chunk.offset}")
        completed = None
        if chunk.shard is not None:
            begin = self._builder.end
            # The spec's own checks first (they name what is wrong with it), then where it ends; a
            # stream that fails either is refused, so the builder's state after a refusal is moot.
            completed = self._builder.add(chunk.shard)
            if self._builder.end != end:
                raise MalformedShard(
                    f"shards[{completed}].compressed_bytes is {chunk.shard.compressed_bytes}, but the chunk at "
                    f"offset {chunk.offset} that carries it ends the shard at {end - begin} bytes (a shard "
                    "ends exactly where the chunk carrying its spec ends)",
                    field=f"shards[{completed}].compressed_bytes",
                )
            self._begins.append(self._builder.end)
            self._shard_bound = self._builder.shard_bound()
        if chunk.last:
            if end != self._builder.end:
                raise ChunkOrderError(
                    f"chunk marked last ends at {end}, inside shard {len(self._builder.shards)} "
                    f"(from {self._builder.end}), whose spec never came",
                    field="last",
                )
            self._layout = self._builder.finish()
        self.offset = end
        self.done = chunk.last
        return completed

    def _check_bounds(self, end: int, what: str) -> None:
        pending = end - self._builder.end
        if pending > 0 and self._builder.complete:
            raise InvalidArgument(
                f"{what} runs to {end}, past the end of the payload: the shards received, which end at "
                f"{self._builder.end}, cover the manifest already",
                field="data",
            )
        if end > self._total_bound:
            raise LimitExceeded(
                f"{what} runs to {end}, past {self._total_bound} bytes, the most this manifest and "
                f"the limits allow (max_total_bytes {self.limits.max_total_bytes})",
                field="data",
                limit=self._total_bound,
            )
        if pending > self._shard_bound:
            raise LimitExceeded(
                f"{what} runs to {end}: {pending} bytes of shard {len(self._builder.shards)} with no spec yet, "
                f"past the {self._shard_bound} a shard may have (max_shard_raw_bytes "
                f"{self.limits.max_shard_raw_bytes}, and what is left of the manifest)",
                field="data",
                limit=self._shard_bound,
            )
