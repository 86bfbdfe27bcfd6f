"""The parent's published rounds, published here: the same states, bit for bit, the same round numbers.

    FetchDiff(have_round = this aggregator's latest published round) at the parent
      DIFF D_r (base_round = that round)  -> publish_diff: θ_r = θ_{r-1} + D_r, stored with D_r
      SNAPSHOT θ_r (a chain too long)      -> θ_r stored as it came; its sites fetch a snapshot

``publish_diff`` (server.publish) adds each difference in the state's dtype
exactly as a worker applies it, from the values the parent's stream decoded
to, so every aggregator of a tree holds the root's state, and the
difference it serves its own sites is the root's (re-encoded with the
root's codec: a cast one's values are already representable, so they
travel unchanged). A round's record here becomes PUBLISHED whatever it was:
open, aggregating, or FAILED because this subtree's part was lost (its
failure reason stays on it as the round's note); the state follows the
root's in every case.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import torch

from common.codec import DeltaStreamDecoder, allocate
from common.codec.decoder import place_piece
from common.delta import Chunk, Codec, DeltaHeader, DeltaKind, Lossy, TensorSpec
from common.statefile import StateReader, write_state
from server.blobs import BlobStore
from server.collector import collect_garbage
from server.publish import Published, StoredPayload, publish_diff
from server.records import RoundRecord, RoundState, UploadRecord
from server.run_state import RunState
from server.spool import Spool
from server.upstream.link import UpstreamLink

logger = logging.getLogger(__name__)

Delta = tuple[DeltaHeader, dict[str, torch.Tensor]]


class OutOfStep(Exception):
    """A difference from the parent does not start at this aggregator's latest round."""


def decoded_deltas(chunks: Iterator[Chunk]) -> Iterator[Delta]:
    """Each delta of a FetchDiff stream, decoded whole, in the order they come."""
    decoder: DeltaStreamDecoder | None = None
    tensors: dict[str, torch.Tensor] = {}

    def finished() -> Delta:
        assert decoder is not None and decoder.header is not None
        for piece in decoder.finish():
            place_piece(tensors[piece.name], piece)
        decoder.close()
        return decoder.header, tensors

    for chunk in chunks:
        if chunk.header is not None and decoder is not None:
            yield finished()
            decoder = None
        if decoder is None:
            if chunk.header is None:
                raise ValueError("the parent's FetchDiff stream starts without a header")
            tensors = allocate(chunk.header.spec.manifest)
            decoder = DeltaStreamDecoder(into=tensors)
        for piece in decoder.feed(chunk):
            place_piece(tensors[piece.name], piece)
    if decoder is not None:
        yield finished()


class Adopter:
    """Publishes the parent's rounds in this aggregator's store.

    Given the run's ``state``, ``blobs`` and ``spool`` (a published round's uploads are spent) and
    ``snapshot_estimate`` (``Fetching.snapshot_estimate``, for the collector).
    """

    def __init__(
        self,
        *,
        state: RunState,
        blobs: BlobStore,
        spool: Spool,
        snapshot_estimate: Callable[[RoundRecord], int],
        keep_states: int,
    ) -> None:
        self._state = state
        self._blobs = blobs
        self._spool = spool
        self._snapshot_estimate = snapshot_estimate
        self._keep_states = keep_states

    def catch_up(
        self, link: UpstreamLink, *, before: Callable[[int], None], after: Callable[[int], None]
    ) -> int:
        """Publish every round the parent published after this aggregator's latest one: the chain of
        its differences, or its latest state whole if a difference is out of step here. ``before``
        and ``after`` are called with each round's number around its adoption; the rounds adopted.

        Raises:
            grpc.RpcError: the parent stayed away through the link's retries (what was adopted stays).
        """
        try:
            return self._fetch(link, snapshot=False, before=before, after=after)
        except OutOfStep as exc:
            logger.warning("[upstream] %s; fetching the parent's latest state whole", exc)
            return self._fetch(link, snapshot=True, before=before, after=after)

    def _fetch(
        self,
        link: UpstreamLink,
        *,
        snapshot: bool,
        before: Callable[[int], None],
        after: Callable[[int], None],
    ) -> int:
        adopted = [0]

        def attempt() -> None:
            # Again from what is held now: a stream cut after some rounds resumes after them.
            with self._state.lock:
                held = self._state.latest_published().round
            for header, tensors in decoded_deltas(link.fetch(held, snapshot=snapshot)):
                before(header.round)
                self.adopt(header, tensors)
                after(header.round)
                adopted[0] += 1

        link.retrier.call("upstream fetch", attempt, progress=lambda: adopted[0])
        return adopted[0]

    def adopt(self, header: DeltaHeader, tensors: dict[str, torch.Tensor]) -> None:
        """Publish round ``header.round`` from the parent's difference or snapshot (``tensors`` is consumed).

        Raises:
            OutOfStep: a difference whose base is not this aggregator's latest published round.
        """
        previous = self._state.latest_published()
        if header.kind is DeltaKind.SNAPSHOT:
            published = self._store_snapshot(tensors)
        else:
            if header.base_round != previous.round:
                raise OutOfStep(
                    f"the parent's difference of round {header.round} applies to round {header.base_round}; "
                    f"this aggregator holds round {previous.round}"
                )
            codec = header.spec.codec
            published = publish_diff(
                tensors,
                blobs=self._blobs,
                previous_state=previous.state_blob,
                run_id=self._state.run.run_id,
                round_number=header.round,
                base_round=previous.round,
                broadcast=codec if codec.lossy is Lossy.NONE else Codec(),
            )
        self._record(header.round, published)

    def _store_snapshot(self, tensors: dict[str, torch.Tensor]) -> Published:
        start = time.perf_counter()
        manifest = self._state_manifest(tensors)
        temp = self._blobs.temp_path(".safetensors")
        digest = write_state(temp, manifest, lambda spec: tensors[spec.name])
        state_blob = self._blobs.adopt(temp, digest)
        # No difference to serve: a site behind this round fetches a snapshot (server.fetching).
        return Published(StoredPayload("", b"", 0, b""), state_blob, time.perf_counter() - start)

    def _state_manifest(self, tensors: dict[str, torch.Tensor]) -> tuple[TensorSpec, ...]:
        reader = StateReader(self._blobs.path(self._state.latest_published().state_blob))
        missing = [t.name for t in reader.manifest if t.name not in tensors]
        if missing:
            raise OutOfStep(f"the parent's snapshot lacks {missing[0]!r} of this aggregator's state")
        return reader.manifest

    def _record(self, number: int, published: Published) -> None:
        """Round ``number`` PUBLISHED here, with the parent's state (under the lock)."""
        state = self._state
        with state.lock:
            now = state.now_ms()
            record = state.store.get(RoundRecord, number)
            if record is None:
                record = RoundRecord(
                    round=number,
                    state=RoundState.PUBLISHED,
                    opened_ms=now,
                    closed_ms=now,
                    close_reason="the parent's round (none was open here)",
                )
            accepted = state.accepted_records(number) if not record.failure_reason else []
            samples = sum(u.sample_count for u in accepted)
            weight = 1 / samples if samples else 0.0
            # FAILED too: the root published the round, and every state in the tree is the root's.
            record = replace(
                record,
                state=RoundState.PUBLISHED,
                published_ms=now,
                closed_ms=record.closed_ms or now,
                samples=samples,
                diff_blob=published.diff.blob,
                diff_header=published.diff.header,
                diff_layout=published.diff.layout,
                diff_bytes=published.diff.nbytes,
                state_blob=published.state_blob,
                aggregate_seconds=published.seconds,
                mean_train_loss=sum(u.train_loss * u.sample_count for u in accepted) * weight,
                mean_eval_loss=sum(u.eval_loss * u.sample_count for u in accepted) * weight,
            )
            run = state.run
            with state.store.transaction():
                state.store.put(record)
                if number > run.current_round:
                    state.store.put(replace(run, current_round=number))
                state.abandon_uploads(number, "the round closed before this upload finished")
            run.current_round = max(run.current_round, number)
            if state.acc is not None and state.acc.round == number:
                state.acc.release()
                state.acc = None
            try:  # published: what is left is housekeeping
                for upload in state.store.select(UploadRecord, "round = ?", (number,)):
                    self._spool.delete(upload.upload_id)
                collect_garbage(
                    store=state.store,
                    blobs=self._blobs,
                    keep_states=self._keep_states,
                    snapshot_estimate=self._snapshot_estimate,
                )
            except Exception:
                logger.exception("[upstream] round=%d adopted; cleaning up after it failed", number)
            logger.info(
                "[upstream] round=%d published here from the parent's %s%s",
                number,
                f"difference ({published.diff.nbytes} bytes)" if published.diff.blob else "state, whole",
                f"; this subtree's part was lost: {record.failure_reason}" if record.failure_reason else "",
            )
            state.emit("round_published", round_number=number, state=RoundState.PUBLISHED)
            state.changed.notify_all()
