"""The global trainable state on the aggregator's disk: a plain safetensors file, written and read a tensor at a time.

The aggregator writes these files (``server.publish``, ``server.genesis``); the
aggregator, ``gdfed export`` and the demo's evaluator read them, so the format
lives here, where a site install finds it without the daemon.

The aggregator never needs the whole state in memory: a new state is
``previous + difference``, computed tensor by tensor. The file is a standard
safetensors file (``safetensors.torch.load_file`` reads it), written by
streaming each tensor after a header that is known up front, and read with
ordinary file reads rather than mmap, so reading does not leave the file's
pages in the process's resident set.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from common.delta import TensorSpec
from common.dtypes import DType, itemsize, to_torch
from common.files import Recycler, fsync_file, rewrite

_LEN = struct.Struct("<Q")


def write_state(
    path: Path,
    manifest: Sequence[TensorSpec],
    tensor: Callable[[TensorSpec], torch.Tensor],
    recycler: Recycler | None = None,
) -> str:
    """Write a safetensors file of ``manifest``, asking ``tensor(spec)`` for each tensor in order.

    Written to a temporary name, fsynced and renamed, so a crash leaves either
    the old file or the complete new one. Returns the file's SHA-256 (hex),
    taken from the bytes as they are written, so a content-addressed store
    need not read the file back to name it. With a ``recycler`` the file is
    written over the blocks of a spent one.
    """
    entries: dict[str, object] = {}
    offset = 0
    for spec in manifest:
        entries[spec.name] = {
            "dtype": spec.dtype.name,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    tmp = path.with_name(path.name + ".tmp")
    digest = hashlib.sha256()
    with rewrite(tmp, recycler) as f:
        head = _LEN.pack(len(header)) + header
        f.write(head)
        digest.update(head)
        for spec in manifest:
            value = tensor(spec).detach().to("cpu", to_torch(spec.dtype)).contiguous()
            if tuple(value.shape) != spec.shape:
                raise ValueError(
                    f"tensor {spec.name!r} has shape {list(value.shape)}, expected {list(spec.shape)}"
                )
            data = value.reshape(-1).view(torch.uint8).numpy().data
            f.write(data)
            digest.update(data)
    fsync_file(tmp)  # after rewrite() cut the file to its length
    os.replace(tmp, path)
    return digest.hexdigest()


class StateReader:
    """Reads tensors of a state file one at a time (ordinary reads, no mmap)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with path.open("rb") as f:
            (length,) = _LEN.unpack(f.read(8))
            raw = json.loads(f.read(length))
        self._base = 8 + length
        self._entries: dict[str, tuple[TensorSpec, int]] = {}
        for name, entry in raw.items():
            if name == "__metadata__":
                continue
            spec = TensorSpec(name, DType[entry["dtype"]], tuple(entry["shape"]))
            begin, end = entry["data_offsets"]
            if end - begin != spec.numel * itemsize(spec.dtype):
                raise ValueError(f"{path}: entry {name!r} has {end - begin} bytes for shape {spec.shape}")
            self._entries[name] = (spec, begin)

    @property
    def manifest(self) -> tuple[TensorSpec, ...]:
        return tuple(spec for spec, _ in sorted(self._entries.values(), key=lambda e: e[1]))

    def read(self, name: str, into: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor: freshly allocated, or read into the front of ``into`` (1-D uint8, large enough)."""
        spec, begin = self._entries[name]
        if into is None:
            out = torch.empty(spec.shape, dtype=to_torch(spec.dtype))
        else:
            out = into[: spec.nbytes].view(to_torch(spec.dtype)).view(spec.shape)
        buf = out.reshape(-1).view(torch.uint8).numpy()
        with self.path.open("rb") as f:
            f.seek(self._base + begin)
            if f.readinto(buf.data) != buf.size:
                raise ValueError(f"{self.path}: truncated at tensor {name!r}")
        return out

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for spec in self.manifest:
            yield spec.name, self.read(spec.name)
