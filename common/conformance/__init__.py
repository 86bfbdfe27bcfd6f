"""Conformance vectors of the delta wire format: deltas to decode, and malformed ones to refuse.

``protos/gradualdiff/v1/vectors/`` holds, for every codec (exact, bf16 and f16
casts, top-k, int8; byte shuffle on and off) and both digests (SHA-256,
BLAKE3), a delta as a receiver meets it: its stream of serialized
``DeltaChunk`` messages (the header in the first, each shard's spec in the
chunk that ends it; two streams for an upload resumed mid-shard), and the
tensors it decodes to (safetensors); and malformed streams, each with the gRPC
status and the ``google.rpc.ErrorInfo`` reason a receiver must refuse it with,
and the stage it does so at. ``index.json`` describes them all;
docs/protocol.md says how to use them.

The modules: :mod:`.vectors` (the index: what a vector is, reading and
writing it), :mod:`.streams` (cutting a payload into chunks by the rule, or
as a plan says), :mod:`.tamper` (taking a payload apart into frames and
putting it back with every size and digest consistent), :mod:`.valid`,
:mod:`.malformed` and :mod:`.malformed_stream` (the generator, deterministic:
fixed data, fixed zstd level), :mod:`.check` (decode, refuse, re-encode and
re-stream). ``python -m common.conformance --write`` regenerates the files,
``--check`` verifies them against this implementation.
"""

from __future__ import annotations

from common.conformance.vectors import VECTORS_DIR, Refusal, Vector, load

__all__ = ["VECTORS_DIR", "Refusal", "Vector", "load"]
