"""Per-block work shared by encoder and decoder: (un)shuffle, zstd, finiteness.

A block is at most Codec.block_bytes of one piece and becomes one zstd frame.
These functions run on a thread pool: zstd, the shuffle kernels and numpy release the GIL,
so two cores work on two blocks at once.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zstandard

from common.codec.digests import frame_digest
from common.codec.shuffle import U8Array, unshuffle_bf16_into_f32, unshuffle_into
from common.delta import Digest
from common.dtypes import DType, is_float, itemsize, numpy_storage
from common.errors import LimitExceeded, MalformedShard

_local = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def codec_threads() -> int:
    """Threads the codec uses: GDFED_CODEC_THREADS, else the number of cores."""
    env = os.environ.get("GDFED_CODEC_THREADS", "")
    return max(1, int(env)) if env.isdigit() else max(1, os.cpu_count() or 1)


def default_executor() -> ThreadPoolExecutor:
    """A process-wide pool, so concurrent decodes share the cores instead of oversubscribing them."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=codec_threads(), thread_name_prefix="gdfed-codec")
        return _pool


# The match finder's hash table for byte planes at the fast levels: 2^8 entries (1 KiB) instead
# of level 1's 2^14 (64 KiB). A shuffled plane of a weight difference is mostly noise (the
# mantissa planes) or a few repeated symbols (the exponent plane, the zeroed low bits), which
# Huffman coding of literals captures; the short, far matches a large table finds in noise cost
# more to look up (a cache miss per byte) than they save. Measured on GPT-2-small-shaped
# differences (2026-12-01, docs/performance.md): fp32 compress 1.5x and decompress 1.2x faster,
# bf16 2.5x and 2.7x, and the frames 1-2 % smaller.
PLANE_HASH_LOG = 8
# zstd's strategy 1 ("fast") is what levels 1 and below use; stronger levels search differently
# and keep their own tables.
_FAST_STRATEGY = 1


def new_compressor(level: int, shuffled: bool) -> zstandard.ZstdCompressor:
    """A zstd context with ``level``'s parameters, tuned for byte planes when ``shuffled``.

    The decoder needs none of this (every zstd frame names what it needs); it is
    public so that benchmarks measure raw zstd with exactly the encoder's settings.
    """
    params = zstandard.ZstdCompressionParameters.from_level(level)
    if shuffled and params.strategy == _FAST_STRATEGY and params.hash_log > PLANE_HASH_LOG:
        tuned = zstandard.ZstdCompressionParameters.from_level(
            level, write_content_size=True, hash_log=PLANE_HASH_LOG
        )
        return zstandard.ZstdCompressor(compression_params=tuned)
    # The plain level lets zstd shrink its tables for small inputs (the header block).
    return zstandard.ZstdCompressor(level=level, write_content_size=True)


def _compressor(level: int, shuffled: bool) -> zstandard.ZstdCompressor:
    # Contexts are not thread-safe; one per thread, level and kind, reused across blocks.
    cache: dict[tuple[int, bool], zstandard.ZstdCompressor] | None = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    key = (level, shuffled)
    if key not in cache:
        cache[key] = new_compressor(level, shuffled)
    return cache[key]


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx: zstandard.ZstdDecompressor | None = getattr(_local, "decompressor", None)
    if dctx is None:
        dctx = _local.decompressor = zstandard.ZstdDecompressor()
    return dctx


def all_finite(block: U8Array, dtype: DType) -> bool:
    """True when every element of the (unshuffled) block is a valid value of its type.

    Floats must be finite (no NaN, no infinity); bools must be 0 or 1 (safetensors
    and torch assume so); other integers are always valid.
    """
    if block.size == 0:
        return True
    if dtype is DType.BOOL:
        return not bool((block > 1).any())
    if not is_float(dtype):
        return True
    if dtype is DType.BF16:
        # numpy has no bfloat16: an all-ones exponent (0x7F80 mask) is inf or NaN.
        exponent = np.bitwise_and(block.view(np.uint16), 0x7F80)
        return not bool((exponent == 0x7F80).any())
    # max and min propagate NaN and expose ±inf, in two allocation-free passes (np.isfinite(...).all()
    # builds a bool array first and costs about twice as much).
    values = block.view(numpy_storage(dtype))
    return bool(np.isfinite(values.max()) and np.isfinite(values.min()))


# The exponent bits an IEEE float's top byte holds (sign excluded): all of them set is inf or NaN.
# f32, bf16 and f64 keep their exponent's 7 high bits there, f16 its 5 bits.
_TOP_EXPONENT = {DType.F32: 0x7F, DType.BF16: 0x7F, DType.F64: 0x7F, DType.F16: 0x7C}


def top_plane_finite(planes: U8Array, wire: DType) -> bool:
    """True when the shuffled ``planes`` of a float block surely hold no inf or NaN.

    Reads only the top byte plane (1/itemsize of the block, still in cache from
    zstd): an element whose top byte lacks some exponent bit is finite. False
    means "maybe not": the caller checks the decoded values in full. Real deltas
    never come near the all-ones exponent, so the full check is the rare path,
    and this costs about a fifth of it.
    """
    mask = _TOP_EXPONENT.get(wire)
    if mask is None or planes.size == 0:
        return False
    top = planes[planes.size - planes.size // itemsize(wire) :]
    bits = np.bitwise_and(top, mask, out=thread_scratch("top plane", top.size))
    return int(bits.max()) != mask


def thread_scratch(slot: str, nbytes: int) -> U8Array:
    """The calling thread's reusable byte buffer named ``slot``, at least ``nbytes`` long.

    A fresh array per block costs page faults on every byte; the codec pool's
    threads use the same few buffers block after block (byte planes to
    compress, a cast block's wire values, the top plane's exponent bits). A
    buffer is valid until its thread asks for the same slot again.
    """
    buffers: dict[str, U8Array] | None = getattr(_local, "scratch", None)
    if buffers is None:
        buffers = _local.scratch = {}
    buf = buffers.get(slot)
    if buf is None or buf.size < nbytes:
        buf = buffers[slot] = np.empty(nbytes, dtype=np.uint8)
    return buf[:nbytes]


def compress_frame(
    data: U8Array, shuffled: bool, level: int, algo: Digest = Digest.BLAKE3
) -> tuple[bytes, bytes]:
    """Bytes ready for zstd (byte planes when ``shuffled``) as one frame; with the frame's ``algo`` digest."""
    frame = _compressor(level, shuffled).compress(data.data)
    return frame, frame_digest(algo, frame)


def compressed_size_hint(frame: bytes | memoryview) -> int:
    """The decompressed size a zstd frame declares, or -1 when it declares none."""
    try:
        return int(zstandard.frame_content_size(frame))
    except zstandard.ZstdError:
        return -1


def decompress_exact(frame: bytes | memoryview, size: int, where: str) -> bytes:
    """Decompress a frame that must hold exactly ``size`` bytes; refuse before allocating otherwise.

    The declared content size is read from the frame header first, so a frame
    lying about its size (a zstd bomb) is refused without decompressing it.
    """
    declared = compressed_size_hint(frame)
    if declared != size:
        raise MalformedShard(
            f"{where}: zstd frame declares {declared} decoded bytes; the layout says {size}",
            field=where,
            limit=size,
        )
    try:
        out = _decompressor().decompress(frame, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise MalformedShard(f"{where}: zstd frame is corrupt: {exc}", field=where) from None
    if len(out) != size:
        raise LimitExceeded(
            f"{where}: frame decoded to {len(out)} bytes, not {size}", field=where, limit=size
        )
    return out


def decode_block(
    frame: bytes | memoryview,
    out: U8Array,
    wire: DType,
    target: DType,
    shuffled: bool,
    where: str,
    algo: Digest = Digest.BLAKE3,
) -> tuple[bool, bytes]:
    """Decompress one block into ``out`` (unshuffling, and upcasting a lossy cast, on the way).

    ``out`` holds the block's elements in the ``target`` dtype; the frame holds
    them in the ``wire`` dtype. Converting here, block by block on the pool,
    keeps a cast payload from needing a second full pass and buffer.

    Returns whether the block is all finite, and the frame's ``algo`` digest
    (taken here so that hashing, too, spreads over the pool's threads).
    """
    digest = frame_digest(algo, frame)
    count = out.size // itemsize(target)
    raw = decompress_exact(frame, count * itemsize(wire), where)
    planes = np.frombuffer(raw, dtype=np.uint8)
    if wire == target:
        if shuffled:
            unshuffle_into(planes, out, itemsize(wire))
        else:
            out[:] = planes
    elif shuffled and wire is DType.BF16 and target is DType.F32:
        unshuffle_bf16_into_f32(planes, out)
    else:
        wire_values = planes
        if shuffled:
            wire_values = thread_scratch("wire values", planes.size)
            unshuffle_into(planes, wire_values, itemsize(wire))
        _upcast(wire_values, wire, out, target)
    # An upcast keeps inf and NaN as they are, so the wire planes answer for the target too.
    finite = (shuffled and top_plane_finite(planes, wire)) or all_finite(out, target)
    return finite, digest


def _upcast(src: U8Array, wire: DType, out: U8Array, target: DType) -> None:
    if wire is DType.BF16 and target is DType.F32:
        # bf16 is the top half of an fp32: shifting the bits is the exact conversion.
        np.left_shift(src.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)
    elif wire is DType.BF16:
        f32 = np.empty(src.size // 2, dtype=np.uint32)
        np.left_shift(src.view(np.uint16), 16, out=f32, dtype=np.uint32)
        out.view(numpy_storage(target))[:] = f32.view(np.float32)
    else:
        out.view(numpy_storage(target))[:] = src.view(numpy_storage(wire))
