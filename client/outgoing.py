"""An upload on its way out: its payload encoded on a thread while the push streams finished shards.

The encoder writes the payload file (the worker's spool, in its state
directory) through ``common.codec.GrowingPayload``, which hands each shard to
the push once written: the first bytes leave after one shard's encoding,
not the whole delta's, and no encoded payload is ever held in memory (the
push reads the file back a chunk at a time).

Once the encoder has written everything, ``on_encoded`` records the upload
as pending (its header and layout, client.local_state); only then is the
last shard handed to the readers. Its last chunk, the stream's ``last``, is
the only one that lets the aggregator accept the upload, so an upload the
aggregator may count is always one a restarted worker finds and settles.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import torch

from client.local_state import LocalState
from common.codec import DEFAULT_SHARD_BYTES, GrowingPayload, PieceSource, encode
from common.codec.chunks import ends_manifest
from common.delta import Chunk, DeltaHeader, PayloadLayout, ShardSpec
from common.files import Recycler, open_over

logger = logging.getLogger(__name__)

# Writes a payload to the sink, calling the callback after each shard is written and flushed
# (common.codec.encode with on_shard); returns the layout.
EncodeFn = Callable[[BinaryIO, Callable[[ShardSpec], None]], PayloadLayout]


class Outgoing:
    """The payload of ``header`` written to ``path`` by a thread, readable while it grows.

    ``chunks`` (an ``Outbound`` for client.transfer.push) streams what is
    written and waits for the rest; it raises the encoder's error, if the
    encoder fails, once it reaches the shard that was not written.
    """

    def __init__(
        self,
        header: DeltaHeader,
        path: Path,
        encode: EncodeFn,
        *,
        on_encoded: Callable[[PayloadLayout], None],
        recycler: Recycler | None = None,
    ) -> None:
        self.header = header
        self.path = path
        # Opened here, before anything reads the path: taking over a spent file renames it there.
        self._sink = open_over(path, recycler)
        self._growing = GrowingPayload(path)
        self._encode: EncodeFn | None = encode
        self._on_encoded = on_encoded
        self._layout: PayloadLayout | None = None
        self._error: BaseException | None = None
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._run, name=f"encode {header.upload_id}", daemon=True)
        self._thread.start()

    @property
    def layout(self) -> PayloadLayout | None:
        """The whole payload's layout once it is written and recorded; None until then."""
        return self._growing.layout

    def chunks(self, header: DeltaHeader, *, start: int = 0) -> Iterator[Chunk]:
        return self._growing.chunks(header, start=start)

    def result(self) -> PayloadLayout:
        """Wait for the encoder: the layout, or the encoder's error raised here."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._layout is not None
        return self._layout

    def wait(self) -> None:
        """Wait for the encoder to stop, whichever way it ends."""
        self._thread.join()

    def _run(self) -> None:
        began = time.perf_counter()
        manifest = self.header.spec.manifest
        held: list[ShardSpec] = []

        def shard_done(spec: ShardSpec) -> None:
            # GrowingPayload sends the shard that ends the manifest as the stream's last: it waits
            # until the upload is recorded.
            if ends_manifest(spec, manifest):
                held.append(spec)
            else:
                self._growing.shard_done(spec)

        # Dropped here, not with this object: a lossy upload's compact tensors go once written.
        encode, self._encode = self._encode, None
        assert encode is not None
        try:
            with self._sink as sink:
                layout = encode(sink, shard_done)
                sink.truncate()  # a spent file taken over may be longer than this payload
            self._on_encoded(layout)
        except BaseException as exc:
            self._error = exc
            self._growing.fail(exc)
            return
        self.seconds = time.perf_counter() - began
        self._layout = layout
        for spec in held:
            self._growing.shard_done(spec)
        self._growing.finish(layout)
        logger.debug("[upload] %s encoded in %.2fs", self.header.upload_id, self.seconds)


def start_encoding(
    header: DeltaHeader,
    tensors: Mapping[str, torch.Tensor] | PieceSource,
    local: LocalState,
    *,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Outgoing:
    """Encode ``tensors`` under ``header.spec`` into the pending payload of ``header.upload_id``.

    The upload is recorded in ``local`` as pending once its payload is whole.
    """
    spec = header.spec

    def encoded(layout: PayloadLayout) -> None:
        if layout.spec != spec:
            raise RuntimeError(f"upload {header.upload_id}: the payload's manifest is not its header's")
        local.save_pending(header, layout)

    return Outgoing(
        header,
        local.payload_path(header.upload_id),
        lambda sink, on_shard: encode(
            tensors, spec.codec, sink, shard_bytes=shard_bytes, manifest=spec.manifest, on_shard=on_shard
        ),
        on_encoded=encoded,
        recycler=local.recycler,
    )
