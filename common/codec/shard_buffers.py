"""The pool of shard buffers that chunk streams fill, kept from one stream to the next.

A stream's compressed shard bytes are gathered into one of these buffers
(common.codec.assembler) and handed back once the shard is decoded, so a
worker fetching a payload every round reuses pages it has touched already.
"""

from __future__ import annotations

import threading

import numpy as np

from common.codec.shuffle import U8Array


class BufferPool:
    """Byte buffers kept from one stream to the next, at most ``keep`` of them.

    A fresh buffer costs a page fault (and the kernel zeroing a page) for
    every page written into it; a worker fetches a payload every round, so its
    streams' shard buffers are taken from here and given back when decoded.
    """

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._free: list[U8Array] = []
        self._lock = threading.Lock()  # streams decode on several threads at once

    def take(self, nbytes: int) -> U8Array:
        """A buffer of at least ``nbytes`` (the smallest kept one that fits, else a new one)."""
        with self._lock:
            fitting = [i for i, buf in enumerate(self._free) if buf.size >= nbytes]
            if fitting:
                return self._free.pop(min(fitting, key=lambda i: self._free[i].size))
        return np.empty(nbytes, dtype=np.uint8)

    def give(self, buffer: U8Array) -> None:
        """Keep ``buffer`` for a later stream, or let it go when ``keep`` larger ones are kept already."""
        with self._lock:
            self._free.append(buffer)
            self._free.sort(key=lambda buf: buf.size, reverse=True)
            del self._free[self.keep :]

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return sum(buf.size for buf in self._free)


# A stream holds DeltaStreamDecoder.MAX_PENDING (2) shards decoding and one arriving: what one
# stream after another needs (a worker's fetches). 32 MiB shards of the exact codec are ~22 MB
# compressed: ~66 MB kept.
SHARD_BUFFERS = BufferPool(keep=3)
