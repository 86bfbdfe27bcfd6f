"""The hash tree a shard commits to its frames with, per Codec.digest: SHA-256 or BLAKE3.

A shard's digest is ``H(H(frame 0) || H(frame 1) || ...)`` with one algorithm
throughout (32 bytes each). Frames are hashed by the pool task that
(de)compresses them, so hashing runs on every core; the tree's top is one
small hash per shard.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import blake3

from common.delta import Digest
from common.errors import InvalidArgument

DIGEST_BYTES = 32

_SHA256 = hashlib.sha256()


def _sha256(data: bytes | memoryview) -> bytes:
    # Copying a ready context: naming the algorithm on every call costs OpenSSL a lookup.
    h = _SHA256.copy()
    h.update(data)
    return h.digest()


def _blake3(data: bytes | memoryview) -> bytes:
    # One thread per frame (blake3's default): the codec pool already hashes frames in parallel,
    # and the call releases the GIL.
    return blake3.blake3(data).digest()


def frame_digest(algo: Digest, data: bytes | memoryview) -> bytes:
    """The ``algo`` digest (32 bytes) of one frame's compressed bytes.

    Raises:
        InvalidArgument: ``algo`` is UNSPECIFIED or unknown (field ``codec.digest``).
    """
    if algo == Digest.BLAKE3:
        return _blake3(data)
    if algo == Digest.SHA256:
        return _sha256(data)
    raise InvalidArgument(f"codec.digest is {_name(algo)}; must be sha256 or blake3", field="codec.digest")


def digest_of_digests(algo: Digest, digests: Sequence[bytes]) -> bytes:
    """The ``algo`` digest over concatenated digests: a shard's over its frames', a payload's over its shards'.

    A two-level tree rather than one hash over all bytes, so that frames are
    hashed in parallel and the top still commits to every byte.
    """
    return frame_digest(algo, b"".join(digests))


def check_algo(algo: Digest) -> None:
    """Raise InvalidArgument (field ``codec.digest``) unless ``algo`` names an algorithm this build runs."""
    frame_digest(algo, b"")


def _name(algo: object) -> str:
    return algo.name.lower() if isinstance(algo, Digest) else repr(algo)
